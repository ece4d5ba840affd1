"""Configuration of a hybrid conversion."""
from __future__ import annotations

from dataclasses import dataclass

from .ops.packing import MAX_BITS, MIN_BITS


@dataclass
class HybridConfig:
    """How :func:`hybridops.hybridize_` turns float layers into hybrid ones.

    Attributes:
        bits_w: weight bit width of the quantized branch (the paper: 4 or 5).
        bits_a: activation bit width of the quantized branch.
        keep: fraction of output channels the full-precision branch starts with, in (0, 1]
            (the channels with the largest quantization residual are kept).
        fp_first_input: keep the first converted layer's input activations in full precision
            (the paper does: the image is not quantized). Its weights are still quantized.
        convert_linear: convert ``nn.Linear`` layers too.
        tau: Gumbel-softmax temperature of the channel gates (eq 13).
        gate_threshold: channels with selection probability below this are dropped at eval and
            deploy time.
        gate_init_logit: initial gate logit magnitude (kept: ``+``, dropped: ``-``).
        normalize: include the quantization normalisation regularisers (eq 10-12) in
            :func:`hybridops.regularization` ("N" in the paper's Q+N+P ablation).
        mu0, sigma0: targets of eq 11 for the mean and standard deviation of the normalised
            weights ``alpha_W |W| + beta_W``.
    """

    bits_w: int = 4
    bits_a: int = 4
    keep: float = 0.25
    fp_first_input: bool = True
    convert_linear: bool = True
    tau: float = 1.0
    gate_threshold: float = 0.5
    gate_init_logit: float = 3.0
    normalize: bool = True
    mu0: float = 0.5
    sigma0: float = 0.25

    def __post_init__(self):
        for name in ("bits_w", "bits_a"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not MIN_BITS <= v <= MAX_BITS:
                raise ValueError(f"{name} must be an integer in [{MIN_BITS}, {MAX_BITS}] (the paper uses 4 or 5), got {v!r}.")
        if not (isinstance(self.keep, (int, float)) and 0.0 < self.keep <= 1.0):
            raise ValueError(f"keep is the fraction of channels the full-precision branch keeps and must lie in (0, 1], "
                             f"got {self.keep!r}.")
        if not self.tau > 0:
            raise ValueError(f"tau (the Gumbel-softmax temperature) must be positive, got {self.tau!r}.")
        if not 0.0 < self.gate_threshold < 1.0:
            raise ValueError(f"gate_threshold must lie in (0, 1), got {self.gate_threshold!r}.")
        if not self.gate_init_logit > 0:
            raise ValueError(f"gate_init_logit must be positive, got {self.gate_init_logit!r}.")
        if not (0.0 <= self.mu0 <= 1.0 and self.sigma0 >= 0.0):
            raise ValueError(f"mu0 must lie in [0, 1] and sigma0 be non-negative, got mu0={self.mu0!r}, "
                             f"sigma0={self.sigma0!r}.")
