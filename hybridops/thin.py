"""The thin half of the network-level hybrid: a deployed pruned network run on its kept channels.

A deployed pruned layer (``fp_only``) computes its K kept output channels and scatters them into
a full-width tensor of zeros; its consumer then reads back the K channels it needs. In a pruned
network (eq 5's ``f^p``, :class:`hybridops.HybridNetwork`) that is a full-width write, a
full-width read and full-width pooling, ReLU and additions per layer around K-wide convolutions.
:func:`thin_network_` rewrites the traced network so that every value carries only the channels
that can be non-zero (its *channel set*, the producer's ``fp_out_idx``):

* a pruned conv / linear layer reads its ``fp_in_idx`` columns straight from its producer's
  set (the identity when they are the same channels in the same order, else one K-wide gather)
  and writes its own set (``DeployedConv2d.thin_forward``);
* modules and functions that map a zero channel to a zero channel, channel by channel (ReLU,
  pooling, dropout, identity) run on the thin tensor;
* an addition of values with different sets (a residual join) adds them in the union of the
  two sets; with equal sets it is a plain addition;
* ``flatten(x, 1)`` of a thin value whose spatial size is known to be 1x1 (after an adaptive
  average pool to 1x1) keeps the set;
* anything else, and the network's output, gets the full width back (zeros outside the set).

Results equal the deployed network's: the same convolutions on the same channels, and additions
of exact zeros dropped. Parameters and buffers stay those of the deployed layers (an online update
of the pruned branch trains the same tensors; the state dict keeps its keys).
"""
from __future__ import annotations

import operator
import types
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .deployed import DEPLOYED_LAYERS, DeployedLinear
from .graph import trace

# Modules and functions that map a zero channel to a zero channel, channel by channel.
_ZERO_PRESERVING_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                            nn.AdaptiveMaxPool2d, nn.Dropout, nn.Identity)
_ZERO_PRESERVING_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.leaky_relu, F.max_pool2d, F.avg_pool2d,
                              F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout)
_ZERO_PRESERVING_METHODS = ("relu", "relu_")
_ADDS = (operator.add, operator.iadd, torch.add)


def _call_thin(layer: nn.Module, x: torch.Tensor, columns: Optional[torch.Tensor] = None) -> torch.Tensor:
    return layer.thin_forward(x, columns)


def _take(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Channels ``positions`` (dim 1) of ``x``, in ``x``'s memory format."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    y = x.index_select(1, positions)
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y


def _widen(x: torch.Tensor, positions: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` (dim 1 holding the channels ``positions``) placed in a tensor of ``width`` channels,
    zeros elsewhere, in ``x``'s memory format."""
    shape = (x.shape[0], width) + tuple(x.shape[2:])
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out = x.new_zeros(shape)
    out = out.contiguous(memory_format=torch.channels_last) if channels_last else out
    return out.index_copy_(1, positions, x)


def _union_add(a: torch.Tensor, pos_a: torch.Tensor, b: torch.Tensor, pos_b: torch.Tensor, width: int) -> torch.Tensor:
    """``a + b`` in a tensor of ``width`` channels, ``a`` holding channels ``pos_a`` of it and
    ``b`` channels ``pos_b`` (the positions of each set in the union of both)."""
    return _widen(a, pos_a, width).index_add_(1, pos_b, b)


class _Value:
    """What the rewrite knows of a value: its node in the new graph, its channel set (sorted
    channel numbers of the full width, or None for the full width), the full width, and whether
    its spatial size is 1x1."""

    __slots__ = ("node", "channels", "width", "unit_spatial")

    def __init__(self, node, channels: Optional[Tuple[int, ...]] = None, width: Optional[int] = None,
                 unit_spatial: bool = False):
        self.node, self.channels, self.width, self.unit_spatial = node, channels, width, unit_spatial


class _Rewriter:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.graph = fx.Graph()
        self.values: Dict[fx.Node, _Value] = {}
        self.buffers: Dict[Tuple[int, ...], str] = {}
        self.thin_layers = 0

    def index(self, channels: Tuple[int, ...]) -> fx.Node:
        """A get_attr node for an int64 tensor of ``channels`` (one buffer per distinct tuple)."""
        name = self.buffers.get(channels)
        if name is None:
            name = self.buffers[channels] = f"thin_index_{len(self.buffers)}"
        return self.graph.get_attr(name)

    def full(self, v: _Value) -> fx.Node:
        if v.channels is None:
            return v.node
        return self.graph.call_function(_widen, (v.node, self.index(v.channels), v.width))

    def arg(self, a):
        """An argument of an op the rewrite does not know: thin values get their full width back."""
        if isinstance(a, fx.Node):
            return self.full(self.values[a])
        if isinstance(a, (list, tuple)):
            return type(a)(self.arg(x) for x in a)
        if isinstance(a, dict):
            return {k: self.arg(x) for k, x in a.items()}
        return a

    def copy(self, node: fx.Node) -> _Value:
        new = self.graph.node_copy(node, lambda n: self.full(self.values[n]))
        return _Value(new)

    def columns(self, v: _Value, reads: Tuple[int, ...], width: int) -> fx.Node:
        """The channels ``reads`` of value ``v`` (``width`` channels in full), in that order."""
        if v.channels == reads:
            return v.node
        if v.channels is None:
            if reads == tuple(range(width)):
                return v.node
            return self.graph.call_function(_take, (v.node, self.index(reads)))
        where = {c: i for i, c in enumerate(v.channels)}
        if all(c in where for c in reads):
            return self.graph.call_function(_take, (v.node, self.index(tuple(where[c] for c in reads))))
        return self.graph.call_function(_take, (self.full(v), self.index(reads)))

    def thin_layer(self, node: fx.Node, layer: nn.Module) -> _Value:
        x = self.values[node.args[0]]
        reads = tuple(range(layer.in_channels)) if layer.fp_in_idx is None else tuple(layer.fp_in_idx.tolist())
        mod = self.graph.get_attr(node.target)
        if x.channels is None or x.channels == reads:
            y = self.graph.call_function(_call_thin, (mod, self.columns(x, reads, layer.in_channels)))
        else:
            # only the channels of x's set can be non-zero: read those the layer reads, with their
            # weight columns (a residual union read by a layer that reads every channel stays thin)
            in_set = {c: i for i, c in enumerate(x.channels)}
            used = [j for j, c in enumerate(reads) if c in in_set]
            if not used:
                y = self.graph.call_function(_call_thin, (mod, self.columns(x, reads, layer.in_channels)))
            else:
                positions = tuple(in_set[reads[j]] for j in used)
                xs = x.node if positions == tuple(range(len(x.channels))) else \
                    self.graph.call_function(_take, (x.node, self.index(positions)))
                y = self.graph.call_function(_call_thin, (mod, xs, self.index(tuple(used))))
        self.thin_layers += 1
        return _Value(y, tuple(layer.fp_out_idx.tolist()), layer.out_channels, isinstance(layer, DeployedLinear))

    def add(self, node: fx.Node, a: _Value, b: _Value) -> _Value:
        if a.channels == b.channels:
            return _Value(self.graph.call_function(operator.add, (a.node, b.node)), a.channels, a.width,
                          a.unit_spatial and b.unit_spatial)
        if a.channels is None or b.channels is None:
            return _Value(self.graph.call_function(operator.add, (self.full(a), self.full(b))))
        union = tuple(sorted(set(a.channels) | set(b.channels)))
        pos = {c: i for i, c in enumerate(union)}
        new = self.graph.call_function(_union_add, (
            a.node, self.index(tuple(pos[c] for c in a.channels)),
            b.node, self.index(tuple(pos[c] for c in b.channels)), len(union)))
        return _Value(new, union, a.width, a.unit_spatial and b.unit_spatial)

    def visit(self, node: fx.Node) -> _Value:
        if node.op == "placeholder":
            return _Value(self.graph.node_copy(node))
        if node.op == "output":
            self.graph.output(self.arg(node.args[0]))
            return _Value(None)
        first = self.values.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if node.op == "call_module":
            mod = self.modules[node.target]
            if (isinstance(mod, DEPLOYED_LAYERS) and mod.path == "fp_only" and mod.groups == 1 and mod.kept_channels
                    and first is not None and len(node.args) == 1 and not node.kwargs
                    # a linear layer's channels are its input's last axis: thin only on a 2-D value
                    # (flatten(x, 1) of a 1x1 one), where that is axis 1
                    and (not isinstance(mod, DeployedLinear) or first.unit_spatial)):
                return self.thin_layer(node, mod)
            if isinstance(mod, _ZERO_PRESERVING_MODULES) and first is not None and len(node.args) == 1:
                unit = first.unit_spatial or (isinstance(mod, nn.AdaptiveAvgPool2d) and
                                              tuple(torch.nn.modules.utils._pair(mod.output_size)) == (1, 1))
                return _Value(self.graph.call_module(node.target, (first.node,)), first.channels, first.width, unit)
        if node.op == "call_function":
            if node.target in _ZERO_PRESERVING_FUNCTIONS and first is not None:
                args = (first.node,) + tuple(self.arg(a) for a in node.args[1:])
                kwargs = {k: self.arg(v) for k, v in node.kwargs.items()}
                unit = first.unit_spatial or (node.target is F.adaptive_avg_pool2d and
                                              tuple(torch.nn.modules.utils._pair(node.args[1] if len(node.args) > 1
                                                                                 else node.kwargs.get("output_size")))
                                              == (1, 1))
                return _Value(self.graph.call_function(node.target, args, kwargs), first.channels, first.width, unit)
            if node.target in _ADDS and len(node.args) == 2 and not node.kwargs and \
                    all(isinstance(a, fx.Node) for a in node.args):
                return self.add(node, self.values[node.args[0]], self.values[node.args[1]])
            if node.target is torch.flatten and first is not None and first.unit_spatial and \
                    tuple(node.args[1:]) in ((1,), (1, -1)) and not node.kwargs:
                flat = self.graph.call_function(torch.flatten, (first.node, 1))
                return _Value(flat, first.channels, first.width, True)
        if node.op == "call_method" and node.target in _ZERO_PRESERVING_METHODS and first is not None \
                and len(node.args) == 1:
            return _Value(self.graph.call_method(node.target, (first.node,)), first.channels, first.width,
                          first.unit_spatial)
        return self.copy(node)

    def run(self, net: nn.Module) -> Optional[Callable]:
        """The rewritten forward, as a function of ``net`` (its code reads ``net``'s own
        attributes); None when no layer runs thin. Registers the channel sets on ``net``."""
        for node in self.gm.graph.nodes:
            self.values[node] = self.visit(node)
        if not self.thin_layers:
            return None
        device = next((t.device for t in net.parameters()), torch.device("cpu"))
        for channels, name in self.buffers.items():
            # not saved: the sets come from the deployed layers' own index buffers, which it holds;
            # buffers, so that they move with net.to(device)
            index = torch.tensor(channels, dtype=torch.long, device=device)
            net.register_buffer(name, index, persistent=False)
            self.gm.register_buffer(name, index, persistent=False)
        return type(fx.GraphModule(self.gm, self.graph)).forward


def thin_network_(net: nn.Module) -> bool:
    """Make ``net`` (a deployed pruned network) run on its kept channels, in place: its forward
    becomes the rewritten graph's, over the same layers (parameters, state dict keys, indexing and
    repr unchanged). Returns False, leaving ``net`` as it was, when ``torch.fx`` cannot trace it
    or no layer can run thin. Save it with ``state_dict`` (the forward is generated code, which
    pickling the module object cannot carry)."""
    gm = trace(net, "the pruned network runs at full width.")
    if gm is None:
        return False
    forward = _Rewriter(gm).run(net)
    if forward is None:
        return False
    forward.hybridops_thin = True  # marks it for full_width_
    net.forward = types.MethodType(forward, net)
    return True


def full_width_(model: nn.Module) -> int:
    """Give every network that :func:`thin_network_` rewrote inside ``model`` its own forward back
    (each deployed layer then runs whole, scattering into the full width; e.g. for counting BOPs
    with hooks on the layers, which the thin forward does not call). Returns how many."""
    restored = 0
    for m in model.modules():
        forward = m.__dict__.get("forward")
        if getattr(forward, "hybridops_thin", False):
            del m.__dict__["forward"]
            restored += 1
    return restored
