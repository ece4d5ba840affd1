"""Model conversion: swap layers in place, regularise (eq 16), freeze for online updates, deploy."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .backend import resolve_backend
from .config import HybridConfig
from .deployed import DeployedConv2d, DeployedLinear
from .layers import (HYBRID_LAYERS, PRUNED_LAYERS, QUANT_LAYERS, HybridConv2d, HybridLinear, PrunedConv2d,
                     PrunedLinear, QuantConv2d, QuantLinear, _PrunedBase, _QuantBase)

MODES = ("hybrid", "quant", "prune")
FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class ConversionReport:
    """What :func:`hybridize_` did: converted layer names, and skipped ones with the reason."""

    mode: str
    converted: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"hybridize_ ({self.mode}): converted {len(self.converted)} layers, skipped {len(self.skipped)}"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _convertible(module: nn.Module, name: str, config: HybridConfig, filter_fn: Optional[FilterFn]) -> Optional[str]:
    """None if ``module`` should be converted, else the reason it is skipped (or "" for modules
    that are not layers at all)."""
    if type(module) not in (nn.Conv2d, nn.Linear):
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)):
            return f"{type(module).__name__} is not supported (only nn.Conv2d and nn.Linear are)"
        return ""
    if type(module) is nn.Linear and not config.convert_linear:
        return "config.convert_linear is False"
    if filter_fn is not None and not filter_fn(module, name):
        return "excluded by filter_fn"
    return None


def _make(module: nn.Module, config: HybridConfig, mode: str, quantize_input: bool) -> nn.Module:
    gate = dict(tau=config.tau, threshold=config.gate_threshold, init_logit=config.gate_init_logit)
    conv = isinstance(module, nn.Conv2d)
    if mode == "hybrid":
        cls = HybridConv2d if conv else HybridLinear
        new = cls.from_float(module, config.bits_w, config.bits_a, quantize_input, config.keep, **gate)
        quant = new.quant
    elif mode == "quant":
        new = (QuantConv2d if conv else QuantLinear).from_float(module, config.bits_w, config.bits_a, quantize_input)
        quant = new
    else:
        n = module.out_channels if conv else module.out_features
        keep = torch.zeros(n, dtype=torch.bool)
        keep[: max(1, int(round(config.keep * n)))] = True
        new = (PrunedConv2d if conv else PrunedLinear).from_float(module, keep=keep, **gate)
        return new
    quant.normalize = config.normalize
    quant.reg_targets = (config.mu0, config.sigma0)
    return new


@torch.no_grad()
def _first_called_layer(model: nn.Module, example_inputs) -> Optional[str]:
    """Qualified name of the first ``nn.Conv2d`` / ``nn.Linear`` that a forward pass calls."""
    order: List[str] = []
    layers = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear) + HYBRID_LAYERS + QUANT_LAYERS + \
        PRUNED_LAYERS + (DeployedConv2d, DeployedLinear)
    hooks = [m.register_forward_pre_hook(lambda mod, args, _n=n: order.append(_n))
             for n, m in model.named_modules() if isinstance(m, layers)]
    try:
        with _eval_mode(model):
            model(*example_inputs) if isinstance(example_inputs, (tuple, list)) else model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return order[0] if order else None


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for one pass, then every submodule's own mode back (a BatchNorm the user froze
    inside a training model stays frozen)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def hybridize_(model: nn.Module, config: Optional[HybridConfig] = None, filter_fn: Optional[FilterFn] = None,
               example_inputs=None, mode: str = "hybrid") -> ConversionReport:
    """Swap every ``nn.Conv2d`` (and ``nn.Linear`` if ``config.convert_linear``) in ``model``
    for its hybrid version, in place.

    Args:
        model: any module; walked with ``named_children``.
        config: a :class:`HybridConfig` (defaults: 4/4 bits, keep 0.25).
        filter_fn: ``filter_fn(module, qualified_name) -> bool``; False leaves the layer alone.
        example_inputs: a tensor (or tuple of positional inputs) of real data; if given, every
            converted layer is calibrated on it now (one forward pass in eval mode). Otherwise
            each layer calibrates on its first forward. Calibrate before wrapping in DDP.
        mode: ``"hybrid"`` (quantized + pruned, eq 5), ``"quant"`` (quantized only) or
            ``"prune"`` (channel-pruned full precision only).

    The layer that reads the model's input (the first called in the ``example_inputs`` pass, else
    the first in module order) keeps its input in full precision when ``config.fp_first_input``. Returns a :class:`ConversionReport`; raises if nothing was
    convertible.
    """
    config = config if config is not None else HybridConfig()
    if not isinstance(config, HybridConfig):
        raise TypeError(f"config must be a hybridops.HybridConfig, got {type(config).__name__}.")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    report = ConversionReport(mode)
    # The layer that reads the raw input: the first to run when example inputs show it, else the
    # first in module order (the two differ when a model registers its layers out of call order).
    first_layer = _first_called_layer(model, example_inputs) if example_inputs is not None else None
    first = [True]

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            qual = f"{prefix}.{name}" if prefix else name
            if isinstance(child, HYBRID_LAYERS + QUANT_LAYERS + PRUNED_LAYERS + (DeployedConv2d, DeployedLinear)):
                report.skipped.append((qual, "already converted"))
                continue
            why = _convertible(child, qual, config, filter_fn)
            if why is None:
                is_first = qual == first_layer if first_layer is not None else first[0]
                quantize_input = not (is_first and config.fp_first_input)
                first[0] = False
                setattr(parent, name, _make(child, config, mode, quantize_input))
                report.converted.append(qual)
            else:
                if why:
                    report.skipped.append((qual, why))
                    if isinstance(child, (nn.Conv2d, nn.Linear)):
                        first[0] = False  # an unconverted layer still sees the raw input first
                walk(child, qual)

    walk(model, "")
    if not report.converted:
        raise ValueError(f"hybridize_ found no convertible layer (nn.Conv2d or nn.Linear) in {type(model).__name__}"
                         + (f"; skipped: {report.skipped}" if report.skipped else "") + ".")
    if example_inputs is not None:
        calibrate_(model, example_inputs)
    return report


def quant_layers(model: nn.Module) -> List[_QuantBase]:
    return [m for m in model.modules() if isinstance(m, _QuantBase)]


@torch.no_grad()
def calibrate_(model: nn.Module, example_inputs) -> nn.Module:
    """(Re)calibrate every converted layer on ``example_inputs`` (one eval-mode forward pass):
    input intervals, per-channel output scales and the pruned branches' residual start."""
    layers = quant_layers(model)
    for m in layers:
        m.calibrated_flag.fill_(0.0)
        m._calibrated_cache = False
    with _eval_mode(model):
        model(*example_inputs) if isinstance(example_inputs, (tuple, list)) else model(example_inputs)
    missing = [type(m).__name__ for m in layers if not m.calibrated]
    if missing:
        raise RuntimeError(f"{len(missing)} converted layers were not reached by the calibration forward pass; "
                           "pass inputs that run the whole model.")
    return model


def pruned_layers(model: nn.Module) -> List[_PrunedBase]:
    return [m for m in model.modules() if isinstance(m, _PrunedBase)]


def quant_loss(model: nn.Module) -> torch.Tensor:
    """``L_quant = L_qW + L_qA`` (eq 10-12) over the quantized layers with normalisation enabled.

    eq 11, per layer: ``(avg(v) - mu_0)^2 + (std(v) - sigma_0)^2`` with
    ``v = alpha_W |W| + beta_W`` (un-clamped normalised weights).

    eq 12, per layer with a quantized input, from the input's mean and std in the latest training
    forward (the tensor the activation quantizer receives stands for ``A_bn``):
    ``[avg + 2 std - (c_A + d_A)]_+ + [sigma_i - std]_+ + [mu_i - avg]_+`` where the paper's
    "mu_i, sigma_i determined by (c_A, d_A)" are defined here as ``mu_i = c_A - d_A`` (the lower
    end of the interval: the mean should not fall into the pruned range) and ``sigma_i = d_A / 2``
    (the spread should cover at least a quarter of the interval's width ``2 d_A``).
    """
    total = None
    for m in quant_layers(model):
        if not getattr(m, "normalize", False):
            continue
        mu0, sigma0 = m.reg_targets
        q = m.wq.qparams()
        v = q[0] * m.weight.abs() + q[1]
        term = (v.mean() - mu0) ** 2 + (v.std() - sigma0) ** 2
        if m.aq is not None and m.act_stats is not None:
            avg, std = m.act_stats
            c, d = m.aq.c, m.aq.d
            term = term + torch.relu(avg + 2 * std - (c + d)) + torch.relu(d / 2 - std) + torch.relu((c - d) - avg)
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def prune_loss(model: nn.Module) -> torch.Tensor:
    """``L_prune = sum_l ||M_bar_l||_1`` (eq 15)."""
    terms = [m.gate.loss() for m in pruned_layers(model)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def regularization(model: nn.Module, lambda_quant: float = 1e-2, lambda_prune: float = 1e-4) -> torch.Tensor:
    """``lambda_1 * L_quant + lambda_2 * L_prune``: eq 16 without the task loss. Call it after
    the forward pass whose statistics it should use."""
    return lambda_quant * quant_loss(model) + lambda_prune * prune_loss(model)


def fp_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The full-precision branch's weights (and biases): what the online update trains."""
    params = []
    for m in model.modules():
        if isinstance(m, _PrunedBase):
            params += [m.weight] + ([m.bias] if m.bias is not None else [])
        elif isinstance(m, (DeployedConv2d, DeployedLinear)) and m.kept_channels:
            params += [m.fp_weight] + ([m.fp_bias] if m.fp_bias is not None else [])
    return params


def freeze_quantized_(model: nn.Module) -> List[nn.Parameter]:
    """Online-update mode (Fig. 1): every parameter stops requiring grad except the full-precision
    branches' weights; channel gates switch to their deterministic masks. Returns the trainable
    parameters (pass them to the optimizer)."""
    fp = fp_parameters(model)
    if not fp:
        raise ValueError("freeze_quantized_ found no full-precision branch in the model; convert it with "
                         "hybridize_(..., mode='hybrid') first.")
    keep = {id(p) for p in fp}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    for m in pruned_layers(model):
        m.gate.frozen = True
    return fp


def deploy_(model: nn.Module, backend: Optional[str] = "auto", in_channel_map: Optional[Dict[nn.Module, torch.Tensor]] = None,
            fuse: bool = True) -> nn.Module:
    """Replace trainable hybrid / quantized / pruned layers by deployed ones, in place: packed
    integer weights and frozen input intervals for the quantized branch, sliced weights for the
    pruned branch (dropped channels removed), computed by ``backend`` (``"auto"``: the fastest
    available on the layer's device; ``"torch"``, ``"triton"`` or ``"cuda"`` by name).

    ``in_channel_map`` (used by :class:`hybridops.HybridNetwork`) maps a pruned layer to the input
    channels it actually reads, when its producer was pruned too.

    ``fuse``: fold an eval-mode BatchNorm2d and a ReLU that follow a deployed integer conv into its
    epilogue (:func:`hybridops.fusion.fuse_epilogues_`), replacing them by ``nn.Identity``.
    Deploy an eval-mode model: BatchNorm layers still in training mode are left alone.
    """
    in_channel_map = in_channel_map or {}
    deployable = HYBRID_LAYERS + QUANT_LAYERS + PRUNED_LAYERS
    uncalibrated = [n for n, m in model.named_modules() if isinstance(m, HYBRID_LAYERS + QUANT_LAYERS) and not m.calibrated]
    if uncalibrated:
        raise RuntimeError(f"deploy_ needs calibrated layers; {uncalibrated[:3]} are not: call "
                           "hybridops.calibrate_(model, example_inputs) or run a forward pass first.")

    def walk(parent: nn.Module) -> int:
        count = 0
        for name, child in parent.named_children():
            if isinstance(child, deployable):
                dev = next(child.parameters()).device
                be = resolve_backend(backend, dev)
                cls = DeployedConv2d if isinstance(child, (HybridConv2d, QuantConv2d, PrunedConv2d)) else DeployedLinear
                new = cls(child, be, in_channel_map.get(child))
                new.train(child.training)
                setattr(parent, name, new)
                count += 1
            else:
                count += walk(child)
        return count

    if walk(model) == 0:
        raise ValueError("deploy_ found no hybrid, quantized or pruned layer; call hybridize_ first.")
    if fuse:
        from .fusion import fuse_epilogues_  # graph passes import the layer modules defined here

        fuse_epilogues_(model)
    return model


def backends_in_use(model: nn.Module) -> Dict[str, str]:
    """``{layer name: backend}`` for every deployed layer: which kernels actually run."""
    return {n: m.backend for n, m in model.named_modules() if isinstance(m, (DeployedConv2d, DeployedLinear))}
