"""Epilogue fusion and code chaining at deploy time (docs/kernels.md).

A deployed conv followed by ``BatchNorm2d`` (eval mode) and ``ReLU`` becomes one layer (a deployed
Linear followed by ``ReLU`` too, as a transformer's FFN): the
BatchNorm folds into the integer conv's per-channel ``scale`` and ``bias`` and into the rows of
the pruned branch's weights, and the ReLU moves into the integer conv's epilogue (a float-input
layer, the network's first, folds the BatchNorm into the same scales and applies the ReLU after
its single float conv). The folded
modules are replaced by ``nn.Identity``, so no separate elementwise pass reads and writes the
activation after the layer. Only modules used once in the traced graph are replaced (torchvision's
ResNet blocks call one ``relu`` module several times: that ReLU stays a module of its own), and
only layers called once. Folding rescales the pruned branch's weights by the BatchNorm's
per-channel gain, so online-update SGD steps on them differ per channel from the unfused layer's.

Then skip connections (:func:`fuse_skip_connections_`): where a deployed integer conv's (or
Linear's) output, through a folded BatchNorm, is added to another tensor, as at the end of every
ResNet block, the add and a ReLU that follows it move into the layer's epilogue
(``layer(x, residual)``, :attr:`~hybridops.deployed.DeployedConv2d.residual`); a ReLU module that
the model calls at several places (torchvision's blocks call one ``relu`` twice) folds into the
conv before each call. Only modules whose forward takes one tensor are rewritten, each traced
alone in the mode it is deployed in: a branch on ``self.training`` inside it (or inside a child
whose code it inlines, such as a drop-path module) is fixed at that mode, and forward hooks on
such inlined children no longer fire. Both edit the model's code, not only its modules: the module whose forward
holds them (the block) gets the rewritten graph's code as its forward (an attribute of the
instance: class, submodules, attributes and state dict stay as they were), which calls the fused
layers. Save such a model with ``state_dict`` (:func:`hybridops.load_deployed_` refolds it):
pickling the module object cannot carry generated code.

Then chains: when a deployed integer conv's only consumer (through ``nn.Identity`` alone) is
another deployed conv that has no full-precision branch and reads zero-padded quantized input,
the producer (itself without a full-precision branch, whose online update needs float outputs)
re-quantizes in its epilogue to the consumer's input codes and the consumer takes packed codes: between the two no float activation is written, only packed low-bit codes (the
situation of the network-level quantized copy, and of quantized-only models).
"""
from __future__ import annotations

import inspect
import operator
import types
from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .deployed import DEPLOYED_LAYERS, DeployedConv2d, DeployedLinear
from .graph import LayerTracer, set_submodule, trace


@torch.no_grad()
def fold_batchnorm_into_(layer: DeployedConv2d, bn: nn.BatchNorm2d) -> None:
    """Absorb an eval-mode BatchNorm that follows ``layer``: ``bn(y) = y * g + shift`` with
    ``g = gamma / sqrt(var + eps)`` scales the integer epilogue's ``scale`` and ``bias`` and the
    pruned branch's rows."""
    if layer.path not in ("hybrid", "codes", "merged"):
        raise ValueError("only a layer with a quantized branch folds a BatchNorm into its scales.")
    if layer.relu or layer.out_qparams is not None:
        raise ValueError("a BatchNorm folds in before the epilogue's ReLU / re-quantization, which this layer "
                         "already has.")
    if bn.num_features != layer.out_channels:
        raise ValueError(f"the BatchNorm has {bn.num_features} channels, the layer {layer.out_channels}.")
    g = (bn.weight.float() if bn.affine else 1.0) / (bn.running_var.float() + bn.eps).sqrt()
    shift = (bn.bias.float() if bn.affine else 0.0) - bn.running_mean.float() * g
    layer.scale.mul_(g)
    if layer.bias is None:
        layer.bias = shift.clone()
    else:
        layer.bias.mul_(g).add_(shift)
    rows = g.index_select(0, layer.fp_out_idx)
    layer.fp_weight.mul_(rows.view(-1, 1, 1, 1).to(layer.fp_weight.dtype))
    if layer.fp_bias is not None:
        layer.fp_bias.mul_(rows.to(layer.fp_bias.dtype))


def fuse_epilogues_(model: nn.Module) -> List[str]:
    """Fold BatchNorm2d / ReLU that follow deployed integer convs into those convs (ReLU that
    follows a deployed Linear into that Linear), in place. Returns one ``"conv+bn+relu"``-style
    entry per fused layer."""
    gm = trace(model, "BatchNorm and ReLU stay separate passes after the deployed layers.")
    if gm is None:
        return []
    modules = dict(model.named_modules())
    uses = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")

    def sole_module_user(node, kind):
        """The single user of ``node`` if it is a once-used module of type ``kind`` fed by it."""
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        ok = (user.op == "call_module" and type(modules.get(user.target)) is kind and uses[user.target] == 1
              and len(user.args) == 1 and user.args[0] is node)
        return user if ok else None

    fused = []
    for node in gm.graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        # integer layers fold into their epilogue; a float-input (merged) layer folds into its weights
        if not (isinstance(layer, (DeployedConv2d, DeployedLinear)) and layer.path in ("hybrid", "merged")):
            continue
        if uses[node.target] != 1:
            continue  # a layer called twice would fold in the BatchNorm of each call
        parts, tail = [node.target], node
        bn_node = sole_module_user(node, nn.BatchNorm2d) if isinstance(layer, DeployedConv2d) else None
        if bn_node is not None:
            bn = modules[bn_node.target]
            if bn.training or bn.running_mean is None:
                continue  # batch statistics cannot be folded into constants
            fold_batchnorm_into_(layer, bn)
            set_submodule(model, bn_node.target, nn.Identity())
            layer.absorbed.append([bn_node.target, type(bn).__name__])
            parts.append(bn_node.target)
            tail = bn_node
        relu_node = sole_module_user(tail, nn.ReLU)
        if relu_node is not None:
            layer.relu = True
            set_submodule(model, relu_node.target, nn.Identity())
            layer.absorbed.append([relu_node.target, "ReLU"])
            parts.append(relu_node.target)
        if len(parts) > 1:
            fused.append("+".join(parts))
    return fused + fuse_skip_connections_(model) + chain_codes_(model)


# ----------------------------------------------------------------------------- skip connections
def _is_relu(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_) and len(node.args) >= 1
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _add_operands(node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node, bool]]:
    """``(a, b, in_place)`` of a two-tensor add without ``alpha`` (``a + b``, ``a += b``,
    ``torch.add(a, b)``, ``a.add(b)``, ``a.add_(b)``); None for anything else."""
    if node.kwargs or len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
        return node.args[0], node.args[1], node.target is operator.iadd
    if node.op == "call_method" and node.target in ("add", "add_"):
        return node.args[0], node.args[1], node.target == "add_"
    return None


def _own(node: fx.Node) -> bool:
    """Whether ``node`` is the traced module's own code, not its children's (whose code the
    tracer inlines): a child's ops carry that child in their module stack."""
    stack = node.meta.get("nn_module_stack") or {}
    return len(stack) <= (1 if node.op == "call_module" else 0)


def _through_identities(node: fx.Node, modules: Dict[str, nn.Module]) -> Tuple[fx.Node, List[fx.Node]]:
    """The last node of the chain ``node -> Identity -> ... -> Identity`` (each with one user) and
    the Identity nodes on it (folded BatchNorms)."""
    hops = []
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not (user.op == "call_module" and isinstance(modules.get(user.target), nn.Identity)):
            break
        hops.append(user)
        node = user
    return node, hops


_IN_PLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                       operator.irshift, operator.imatmul)


def _single_input_forward(module: nn.Module) -> bool:
    """Whether the module's forward takes one tensor and nothing else: tracing a module alone
    makes every argument a placeholder, so a branch on a defaulted argument (``skip=None``) would
    be fixed at the traced side."""
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    return len(params) == 1 and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _mutates(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """Whether ``node`` may write into one of its inputs (an in-place op or module)."""
    if node.op == "call_method":
        return node.target.endswith("_")
    if node.op == "call_function":
        return (node.target in _IN_PLACE_OPERATORS or getattr(node.target, "__name__", "").endswith("_")
                or bool(node.kwargs.get("inplace")) or (len(node.args) > 1 and node.args[-1] is True))
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    return False


def _fold_graph(graph: fx.Graph, modules: Dict[str, nn.Module], calls: Counter, decide: bool) -> List[str]:
    """Fold ReLUs and skip-connection adds into the deployed integer layers of one module's graph
    (see :func:`fuse_skip_connections_`). ``decide``: choose what to fold and set the layers' flags
    (deploy time); otherwise fold what the layers' flags say was folded (a rebuilt checkpoint,
    whose chained layers already hand codes on)."""
    done = []
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        layer = modules.get(node.target) if node.op == "call_module" else None
        if not (isinstance(layer, DEPLOYED_LAYERS) and layer.path in ("hybrid", "codes") and calls[id(layer)] == 1
                and len(node.args) == 1 and not node.kwargs and (layer.out_qparams is None or not decide)):
            continue
        end, hops = _through_identities(node, modules)
        user = next(iter(end.users)) if len(end.users) == 1 else None
        operands = _add_operands(user) if user is not None and _own(user) else None
        if operands is not None and (layer.residual if not decide else not (layer.relu or layer.residual)):
            a, b, in_place = operands
            other = b if a is end else a
            # the layer moves to just before the add: nothing in between may write into what it
            # reads; and an in-place add must write into the layer's output, not into the other
            # tensor (which the caller, or a view of it, may hold)
            between = [n for n in graph.nodes if order[node] < order[n] < order[user] and n not in hops]
            if other is end or (in_place and other is a) or any(_mutates(n, modules) for n in between):
                continue
            after = next(iter(user.users)) if len(user.users) == 1 else None
            with_relu = after is not None and _is_relu(after, modules) and _own(after) and (
                layer.relu if not decide else True)
            if not decide and layer.relu and not with_relu:
                raise ValueError(f"the checkpoint's layer {node.target!r} applies a ReLU after its residual, but this "
                                 "model's code has none after that add: build the same float model the deployed one "
                                 "was made from.")
            if decide:
                layer.set_residual_()
                layer.relu = with_relu
            node.args = (node.args[0], other)
            user.prepend(node)  # after the residual's producer, which may come later in the code
            last = after if with_relu else user
            last.replace_all_uses_with(node)
            for n in ([after] if with_relu else []) + [user] + hops[::-1]:
                graph.erase_node(n)
            done.append(f"{node.target}+add" + ("+relu" if with_relu else ""))
        elif user is not None and _is_relu(user, modules) and _own(user) and not layer.residual and (
                layer.relu or decide):
            layer.relu = True
            user.replace_all_uses_with(end)
            graph.erase_node(user)
            done.append(f"{node.target}+relu")
    return done


def fuse_skip_connections_(model: nn.Module, decide: bool = True) -> List[str]:
    """Fold skip-connection adds and repeatedly called ReLUs into deployed integer layers (see
    the module docstring), in place; the modules whose code changed get the rewritten code as their
    forward. Returns one ``"layer+add+relu"`` / ``"layer+add"`` / ``"layer+relu"`` entry per fold.

    ``decide=False`` (:func:`hybridops.load_deployed_`): fold what the layers' saved flags say
    was folded, into a freshly built float model's code."""
    gm = trace(model, "skip connections and shared ReLUs stay separate passes after the deployed layers.")
    if gm is None:
        return []
    modules = dict(model.named_modules())
    calls = Counter(id(modules[n.target]) for n in gm.graph.nodes if n.op == "call_module")
    done = []
    # children first: a block's folds are made in the block, not in a parent that inlines it
    for name, _ in reversed(list(model.named_modules())):
        module = model.get_submodule(name)
        if not name or LayerTracer().is_leaf_module(module, name) or not _single_input_forward(module):
            continue  # (the root is the caller's object: its own code stays as it is)
        try:
            graph = LayerTracer().trace(module)
        except Exception:
            continue  # a module fx cannot trace keeps its code (the model stays correct)
        local = dict(module.named_modules())
        folds = _fold_graph(graph, local, calls, decide)
        if not folds:
            continue
        graph.lint()
        # The module keeps its class, attributes, submodules and state; only its forward becomes
        # the rewritten graph's code (which reads the module's own attributes).
        module.forward = types.MethodType(type(fx.GraphModule(module, graph)).forward, module)
        done += [f"{name}.{f}" for f in folds]
    if not decide:
        folded = {f.split("+")[0] for f in done}
        lost = [n for n, m in model.named_modules() if isinstance(m, DEPLOYED_LAYERS) and m.residual and n not in folded]
        if lost:
            raise ValueError(f"the checkpoint's layer {lost[0]!r} adds a residual in its epilogue, but this model's code "
                             "adds none to its output (in a submodule's forward): build the same float model the "
                             "deployed one was made from.")
    return done


def _integer_conv(m) -> bool:
    return isinstance(m, DeployedConv2d) and m.path in ("hybrid", "codes")


def chain_codes_(model: nn.Module) -> List[str]:
    """Let pairs of deployed integer convs pass packed codes (see the module docstring), in place.
    Returns one ``"producer->consumer"`` entry per chained pair."""
    gm = trace(model, "deployed quantized layers pass float activations to each other.")
    if gm is None:
        return []
    modules = dict(model.named_modules())
    uses = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    chained = []
    for node in gm.graph.nodes:
        producer = modules.get(node.target) if node.op == "call_module" else None
        # A producer with a full-precision branch keeps float outputs: codes carry no gradient,
        # and its branch must stay trainable for the online update.
        if (not _integer_conv(producer) or producer.out_qparams is not None or producer.kept_channels
                or producer.residual or uses[node.target] != 1):
            continue
        end, _ = _through_identities(node, modules)
        if len(end.users) != 1:
            continue
        hop = next(iter(end.users))
        consumer = modules.get(hop.target) if hop.op == "call_module" else None
        # the producer's output is the consumer's input (args[0]), not (also) its residual
        if not (_integer_conv(consumer) and consumer.kept_channels == 0 and consumer.padding_mode == "zeros"
                and not consumer.codes_input and consumer.backend == producer.backend and hop.args[0] is end
                and end not in hop.args[1:] and uses[hop.target] == 1):
            continue  # (the code format between the two is the backend's: both must run on the same one)
        producer.set_output_codes_(consumer.in_qparams, consumer.bits_a, consumer.a_signed)
        consumer.set_codes_input_()
        chained.append(f"{node.target}->{hop.target}")
    return chained
