"""Network-level hybrid (eq 3-5): parallel copies of a backbone, summed at the end.

    A^h = f^q(A0; W^q) + f^p(A0; W^p)                                          (eq 5)

``f^q`` has every conv / linear layer quantized; ``f^p`` has every layer channel-pruned with its
own activation chain (eq 14). Pruning compounds: a pruned layer whose input comes (through
zero-preserving modules such as ReLU or max-pooling) from another pruned layer reads only that
layer's kept channels, so at deploy time both its output rows and its input columns are sliced.
The producer/consumer pairs are found by tracing the pruned copy with ``torch.fx``.

The same class builds the paper's Table 3 ablations, a sum of two quantized (QQ) or two pruned
(PP) copies, from a config per branch.

Initialisation: ``f^q`` starts from the float weights (calibrated), ``f^p`` from the float weights
with BatchNorm folded into the preceding convolutions (so the gate masks exactly the activation,
eq 14) and its last layer zeroed, so that ``A^h`` starts equal to ``f^q`` and the full-precision
network learns the residual.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .config import HybridConfig, PruneConfig, QuantConfig
from .conversion import Config, deploy_, float_layer_order, hybridize_
from .graph import set_submodule, trace
from .layers import PRUNED_LAYERS
from .thin import thin_network_

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


@torch.no_grad()
def _scale_output_(layer: nn.Module, factor: float) -> None:
    """Multiply a float layer's weight and bias by ``factor``."""
    for p in (layer.weight, layer.bias):
        if p is not None:
            p.mul_(factor)


class HybridNetwork(nn.Module):
    """A sum of branch networks built from one float backbone (eq 5): by default
    ``quant_net(x) + pruned_net(x)``, the paper's hybrid.

    Args:
        backbone: a float model (not modified; every branch is a deep copy).
        config: :class:`HybridConfig` (bit widths, initial keep ratio, gate settings) for the default
            pair of branches ``(config.quant(), config.prune())``.
        example_inputs: real inputs to calibrate the quantized branches on (else lazily).
        filter_fn: as in :func:`hybridize_`, applied to every branch.
        branches: instead of ``config``, the branches' configs, each a :class:`QuantConfig` or a
            :class:`PruneConfig`: the rows of the paper's Table 3 are ``(Q, P)`` (the hybrid),
            ``(Q, Q)`` and ``(P, P)``; a single config is that branch alone.

    Initialisation: every branch starts from the float weights (a pruned branch with BatchNorm
    folded, eq 14, and its most important channels kept, see :class:`PruneConfig`). A pruned
    branch after the first starts as a zero residual (its output layer zeroed): it learns what the
    branches before it miss. The output layers of the branches that do start from the float model
    have their outputs divided by their number (``(Q, Q)``: each quantized copy carries half), so
    the sum starts at the float model up to quantization, except that a pruned first branch (PP)
    starts with only its kept channels. The output layer is the last converted layer called on
    ``example_inputs`` (the last registered without them).
    """

    # hybridops.bops merges the rows of the copies in self.branches (one backbone layer, one row)
    sums_branches = True

    def __init__(self, backbone: nn.Module, config: Optional[HybridConfig] = None, example_inputs=None,
                 filter_fn: Optional[Callable] = None, branches: Optional[Sequence[Config]] = None):
        super().__init__()
        if branches is not None and config is not None:
            raise ValueError("pass either config (the quantized + pruned hybrid) or branches, not both.")
        if branches is None:
            config = config if config is not None else HybridConfig()
            if not isinstance(config, HybridConfig):
                raise TypeError(f"config must be a HybridConfig (for other branch sets pass branches=), "
                                f"got {type(config).__name__}.")
            branches = (config.quant(), config.prune())
        branches = tuple(branches)
        bad = [type(b).__name__ for b in branches if type(b) not in (QuantConfig, PruneConfig)]
        if not branches or bad:
            raise TypeError(f"branches must be a non-empty sequence of QuantConfig / PruneConfig, got {bad or 'none'}.")
        self.configs = branches
        nets = []
        residual = [i > 0 and isinstance(cfg, PruneConfig) for i, cfg in enumerate(branches)]
        share = 1.0 / sum(not r for r in residual)
        # the output layer (the last conv / linear called, converted or not), scaled in each float
        # copy before conversion, so that a quantized copy calibrates on the scaled weights
        order = float_layer_order(backbone, example_inputs)
        if not order:
            raise ValueError("the backbone has no nn.Conv2d / nn.Linear layer to build branches from.")
        output = order[-1]
        for cfg, is_residual in zip(branches, residual):
            net = copy.deepcopy(backbone)
            if isinstance(cfg, PruneConfig):
                net.eval()
                fold_batchnorm_(net)
                net.train(backbone.training)
            _scale_output_(net.get_submodule(output), 0.0 if is_residual else share)
            hybridize_(net, cfg, filter_fn, example_inputs)
            nets.append(net)
        self.branches = nn.ModuleList(nets)
        # {consumer: producer} of each pruned branch (empty for a quantized one)
        self.producers = [find_pruned_producers(net) if isinstance(cfg, PruneConfig) else {}
                          for net, cfg in zip(nets, branches)]
        for net, pairs in zip(nets, self.producers):
            for consumer, producer in pairs.items():
                # A plain attribute, not a submodule: the gate is owned (and saved) by its producer.
                object.__setattr__(net.get_submodule(consumer), "input_gate", net.get_submodule(producer).gate)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints of the quantized + pruned network saved before branch sets named its two
        # copies quant_net / pruned_net.
        if [type(c) for c in self.configs] == [QuantConfig, PruneConfig]:
            for old, new in (("quant_net.", "branches.0."), ("pruned_net.", "branches.1.")):
                for key in [k for k in state_dict if k.startswith(prefix + old)]:
                    state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _first(self, kind: type) -> Optional[nn.Module]:
        return next((net for net, cfg in zip(self.branches, self.configs) if isinstance(cfg, kind)), None)

    @property
    def quant_net(self) -> Optional[nn.Module]:
        """The (first) quantized branch; None in a network without one (PP)."""
        return self._first(QuantConfig)

    @property
    def pruned_net(self) -> Optional[nn.Module]:
        """The (first) pruned branch; None in a network without one (QQ, Q alone)."""
        return self._first(PruneConfig)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for net in self.branches[1:]:
            out = out + net(x)
        return out

    def in_channel_map(self, branch: int) -> Dict[nn.Module, torch.Tensor]:
        """``{pruned layer: input channels it reads}`` of branch ``branch``, from its producers' kept channels."""
        net = self.branches[branch]
        return {net.get_submodule(c): net.get_submodule(p).gate.kept_indices() for c, p in self.producers[branch].items()}

    def deploy_(self, backend: Optional[str] = "auto", fuse: bool = True,
                fp_dtype: Optional[torch.dtype] = None) -> "HybridNetwork":
        """Deploy every branch in place: packed integer weights for a quantized branch, and for a
        pruned one rows and (compounded) columns of dropped channels removed (``fp_dtype`` as in
        :func:`hybridops.deploy_`). A pruned branch then runs on its kept channels end to end
        (:func:`hybridops.thin.thin_network_`: no scatter into the full width between layers; the
        same layers, parameters and state dict keys)."""
        for i, net in enumerate(self.branches):
            # (an explicit map, even an empty one, deploys the branch as a plain model)
            deploy_(net, backend, self.in_channel_map(i), fuse=fuse, fp_dtype=fp_dtype)
            if isinstance(self.configs[i], PruneConfig):
                thin_network_(net)
        return self
