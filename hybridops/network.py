"""Network-level hybrid (eq 3-5): two parallel copies of a backbone, summed at the end.

    A^h = f^q(A0; W^q) + f^p(A0; W^p)                                          (eq 5)

``f^q`` has every conv / linear layer quantized; ``f^p`` has every layer channel-pruned with its
own activation chain (eq 14). Pruning compounds: a pruned layer whose input comes (through
zero-preserving modules such as ReLU or max-pooling) from another pruned layer reads only that
layer's kept channels, so at deploy time both its output rows and its input columns are sliced.
The producer/consumer pairs are found by tracing the pruned copy with ``torch.fx``.

Initialisation: ``f^q`` starts from the float weights (calibrated), ``f^p`` from the float weights
with BatchNorm folded into the preceding convolutions (so the gate masks exactly the activation,
eq 14) and its last layer zeroed, so that ``A^h`` starts equal to ``f^q`` and the full-precision
network learns the residual.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .config import HybridConfig
from .conversion import calibrate_, deploy_, hybridize_
from .graph import set_submodule, trace
from .layers import PRUNED_LAYERS

# Modules and functions that map a zero channel to a zero channel, channel for channel.
_ZERO_PRESERVING_MODULES = (nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.Dropout, nn.Identity, nn.AdaptiveAvgPool2d,
                            nn.AvgPool2d, nn.LeakyReLU)
_ZERO_PRESERVING_FUNCTIONS = (F.relu, torch.relu, F.max_pool2d, F.relu6, F.dropout, F.adaptive_avg_pool2d)


def _trace(model: nn.Module) -> Optional[fx.GraphModule]:
    return trace(model, "pruning will not compound across layers (each pruned layer keeps all its input channels).")


def fold_batchnorm_(model: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d (its only user) into that conv, in
    place, replacing the BN by ``nn.Identity``. Returns the number folded."""
    gm = _trace(model)
    if gm is None:
        return 0
    modules = dict(model.named_modules())
    folded = 0
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and type(modules.get(src.target)) is nn.Conv2d
                and len(src.users) == 1):
            continue
        conv, bn = modules[src.target], modules[node.target]
        set_submodule(model, src.target, fuse_conv_bn_eval(conv.eval(), bn.eval()))
        set_submodule(model, node.target, nn.Identity())
        folded += 1
    return folded


def find_pruned_producers(model: nn.Module) -> Dict[str, str]:
    """``{consumer: producer}`` for pruned layers whose input is another pruned layer's output
    reached only through zero-preserving modules (so the consumer's input channels outside the
    producer's kept set are always zero)."""
    gm = _trace(model)
    if gm is None:
        return {}
    modules = dict(model.named_modules())
    pairs = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), PRUNED_LAYERS):
            continue
        if getattr(modules[node.target], "groups", 1) != 1:
            continue  # a grouped conv's channel-to-group map does not survive input slicing
        src = node.args[0]
        while isinstance(src, fx.Node):
            if src.op == "call_module" and isinstance(modules.get(src.target), PRUNED_LAYERS):
                pairs[node.target] = src.target
                break
            zero_preserving = (
                (src.op == "call_module" and isinstance(modules.get(src.target), _ZERO_PRESERVING_MODULES))
                or (src.op == "call_function" and src.target in _ZERO_PRESERVING_FUNCTIONS)
                or (src.op == "call_method" and src.target in ("relu", "relu_")))
            if not zero_preserving:
                break
            src = src.args[0]
    return pairs


class HybridNetwork(nn.Module):
    """``quant_net(x) + pruned_net(x)`` (eq 5) built from one float backbone.

    Args:
        backbone: a float model (not modified; both branches are deep copies).
        config: :class:`HybridConfig` (bit widths, initial keep ratio, gate settings).
        example_inputs: real inputs to calibrate the quantized network on (else lazily).
        filter_fn: as in :func:`hybridize_`, applied to both copies.
    """

    def __init__(self, backbone: nn.Module, config: Optional[HybridConfig] = None, example_inputs=None,
                 filter_fn: Optional[Callable] = None):
        super().__init__()
        config = config if config is not None else HybridConfig()
        self.quant_net = copy.deepcopy(backbone)
        hybridize_(self.quant_net, config.quant(), filter_fn)
        pruned = copy.deepcopy(backbone).eval()
        fold_batchnorm_(pruned)
        pruned.train(backbone.training)
        hybridize_(pruned, config.prune(), filter_fn)
        self.pruned_net = pruned
        layers = [m for m in pruned.modules() if isinstance(m, PRUNED_LAYERS)]
        with torch.no_grad():  # the pruned network starts as a zero residual
            layers[-1].weight.zero_()
            if layers[-1].bias is not None:
                layers[-1].bias.zero_()
        self.producers = find_pruned_producers(pruned)
        for consumer, producer in self.producers.items():
            # A plain attribute, not a submodule: the gate is owned (and saved) by its producer.
            object.__setattr__(pruned.get_submodule(consumer), "input_gate", pruned.get_submodule(producer).gate)
        if example_inputs is not None:
            calibrate_(self.quant_net, example_inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_net(x) + self.pruned_net(x)

    def in_channel_map(self) -> Dict[nn.Module, torch.Tensor]:
        """``{pruned layer: input channels it reads}`` from its producer's kept channels."""
        return {self.pruned_net.get_submodule(c): self.pruned_net.get_submodule(p).gate.kept_indices()
                for c, p in self.producers.items()}

    def deploy_(self, backend: Optional[str] = "auto", fuse: bool = True) -> "HybridNetwork":
        """Deploy both networks in place: packed integer weights for ``quant_net``, and for
        ``pruned_net`` rows and (compounded) columns of dropped channels removed."""
        deploy_(self.quant_net, backend, fuse=fuse)
        # (an explicit map, even an empty one, deploys pruned_net as a plain model)
        deploy_(self.pruned_net, backend, self.in_channel_map(), fuse=fuse)
        return self
