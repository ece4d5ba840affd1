"""Conversion configs: one dataclass per kind of branch set, dispatched on type by
:func:`hybridops.hybridize_` (as torchao dispatches its ``quantize_`` on the config's type).

* :class:`QuantConfig` — the quantized branch alone (the paper's "Q" / "Q+N" rows, and the
  quantized copy of a network-level hybrid);
* :class:`PruneConfig` — the channel-pruned full-precision branch alone ("P", and the pruned copy of
  a network-level hybrid);
* :class:`HybridConfig` — both, summed per layer (eq 5 at layer level).

``keep`` means one thing everywhere: the *fraction* of output channels a pruned branch starts
with, in (0, 1]; ``ceil(keep * C_out)`` channels are kept, chosen by importance (see each
config). Channel masks are called ``kept_mask``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .kernels.packing import MAX_BITS, MIN_BITS


def kept_count(keep: float, channels: int) -> int:
    """Channels a pruned branch with keep fraction ``keep`` starts with: ``ceil(keep * C)``, at least 1."""
    return max(1, math.ceil(keep * channels - 1e-9))


def _check_bits(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or not MIN_BITS <= v <= MAX_BITS:
        raise ValueError(f"{name} must be an integer in [{MIN_BITS}, {MAX_BITS}] (the paper uses 4 or 5), got {v!r}.")


@dataclass
class QuantConfig:
    """The quantized branch: QIL intervals (eq 6-9) with the normalisation regularisers (eq 10-12).

    Attributes:
        bits_w: weight bit width (the paper: 4 or 5).
        bits_a: activation bit width.
        fp_first_input: keep the first converted layer's input in full precision (the paper does:
            the image is not quantized). Its weights are still quantized.
        convert_linear: convert ``nn.Linear`` layers too.
        normalize: include eq 10-12 in :func:`hybridops.regularization` ("N" of the ablations).
        mu0, sigma0: eq 11's targets for the mean and standard deviation of the normalised weights
            ``alpha_W |W| + beta_W``; None (default): each layer's own values at calibration. Fixed
            targets such as 0.5 / 0.25 (the middle of the interval) pushed the calibrated weights
            (mean ~0.2-0.45) towards more clipping and cost accuracy (docs/design.md §4).
        bits_attention: quantize the activations of the attention products (Q, K, V) to this
            many bits in the attention modules the conversion rewrites (``nn.MultiheadAttention``,
            torchvision's Swin window attention; hybridops/attention.py), ``Q K^T`` then an exact
            integer product; None (default): the products stay float. The paper's HybTransT: 6.
    """

    bits_w: int = 4
    bits_a: int = 4
    fp_first_input: bool = True
    convert_linear: bool = True
    normalize: bool = True
    mu0: Optional[float] = None
    sigma0: Optional[float] = None
    bits_attention: Optional[int] = None

    def __post_init__(self):
        _check_bits("bits_w", self.bits_w)
        _check_bits("bits_a", self.bits_a)
        if self.bits_attention is not None:
            _check_bits("bits_attention", self.bits_attention)
        if not ((self.mu0 is None or 0.0 <= self.mu0 <= 1.0) and (self.sigma0 is None or self.sigma0 >= 0.0)):
            raise ValueError(f"mu0 must lie in [0, 1] and sigma0 be non-negative, got mu0={self.mu0!r}, "
                             f"sigma0={self.sigma0!r}.")


@dataclass
class PruneConfig:
    """The channel-pruned full-precision branch: Gumbel-softmax gates (eq 13-15).

    Attributes:
        keep: fraction of output channels kept at the start, in (0, 1]; the channels with the
            largest L1 weight norm are kept.
        convert_linear: convert ``nn.Linear`` layers too.
        keep_output_layer: the output layer (the last conv / linear called, a classifier's head,
            whose channels are the classes), if converted, keeps every channel for good: its gate is not prunable and
            :func:`hybridops.prune_loss` leaves it out.
        tau: Gumbel-softmax temperature (eq 13).
        gate_threshold: channels with selection probability below this are dropped at eval and
            deploy time.
        gate_init_logit: initial gate logit magnitude (kept: ``+``, dropped: ``-``).
    """

    keep: float = 0.25
    convert_linear: bool = True
    keep_output_layer: bool = True
    tau: float = 1.0
    gate_threshold: float = 0.5
    gate_init_logit: float = 3.0

    def __post_init__(self):
        _check_gates(self)


def _check_gates(cfg) -> None:
    if not (isinstance(cfg.keep, (int, float)) and 0.0 < cfg.keep <= 1.0):
        raise ValueError(f"keep is the fraction of channels the full-precision branch keeps and must lie in (0, 1], "
                         f"got {cfg.keep!r}.")
    if not cfg.tau > 0:
        raise ValueError(f"tau (the Gumbel-softmax temperature) must be positive, got {cfg.tau!r}.")
    if not 0.0 < cfg.gate_threshold < 1.0:
        raise ValueError(f"gate_threshold must lie in (0, 1), got {cfg.gate_threshold!r}.")
    if not cfg.gate_init_logit > 0:
        raise ValueError(f"gate_init_logit must be positive, got {cfg.gate_init_logit!r}.")


@dataclass
class HybridConfig(QuantConfig):
    """Both branches, summed per layer (eq 5): the fields of :class:`QuantConfig` plus the gate
    fields of :class:`PruneConfig`. ``keep``: fraction of output channels the pruned branch starts
    with; the channels with the largest quantization residual ``W - dequant(W_q)`` are kept."""

    keep: float = 0.25
    tau: float = 1.0
    gate_threshold: float = 0.5
    gate_init_logit: float = 3.0

    def __post_init__(self):
        super().__post_init__()
        _check_gates(self)

    def quant(self) -> QuantConfig:
        """The quantized half of this config (the quantized copy of a network-level hybrid)."""
        return QuantConfig(self.bits_w, self.bits_a, self.fp_first_input, self.convert_linear, self.normalize,
                           self.mu0, self.sigma0, self.bits_attention)

    def prune(self) -> PruneConfig:
        """The pruned half of this config (the pruned copy of a network-level hybrid)."""
        return PruneConfig(self.keep, self.convert_linear, True, self.tau, self.gate_threshold, self.gate_init_logit)


CONFIG_TYPES = (QuantConfig, PruneConfig, HybridConfig)
