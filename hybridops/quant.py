"""QIL-style learnable-interval quantizers (Jung et al., CVPR 2019), as used by the paper.

Per layer a learnable interval centre ``c`` and width ``d > 0`` (stored as ``log d`` so it stays
positive without clamping gradients away) define ``alpha = 0.5 / d`` and
``beta = 0.5 - c * alpha`` (that is ``-0.5 c / d + 0.5``), and

* weights / signed activations (eq 6-7):
  ``hat = sign(x) * clamp(alpha |x| + beta, 0, 1)``, ``code = round(hat * (2^(b-1) - 1))``;
* unsigned activations (eq 8-9):
  ``hat = clamp(alpha x + beta, 0, 1)``, ``code = round(hat * (2^b - 1))``.

Values below the interval (``|x| < c - d``) are pruned to 0, values above it clip to 1.
Rounding is ``floor(v + 0.5)`` on magnitudes and uses the straight-through estimator in training.
The fake-quantized value is ``code / levels`` in ``[-1, 1]``; a layer multiplies its integer
accumulator by an output scale (calibrated at conversion, learned afterwards), so
``dequant(W) = hat_q * 2d`` when ``c = d`` (the calibrated start: ``beta = 0``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .ops import custom_ops
from .kernels.packing import check_bits, levels
from .ops.reference import codes_from_qparams


def qparams(c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``tensor([alpha, beta])`` in float32, differentiable in ``c`` and ``d`` (eq 6 and 8)."""
    alpha = 0.5 / d.float()
    return torch.stack((alpha, 0.5 - c.float() * alpha))


def interval_hat(x: torch.Tensor, c: torch.Tensor, d: torch.Tensor, signed: bool) -> torch.Tensor:
    """The un-rounded quantizer ``hat(x)`` of eq 6 (``signed``) or eq 8: plain autograd, float64-safe.

    Its gradient is the straight-through gradient of the rounded quantizer (gradcheck it)."""
    alpha = 0.5 / d
    beta = 0.5 - c * alpha
    if signed:
        return torch.sign(x) * torch.clamp(alpha * x.abs() + beta, 0.0, 1.0)
    return torch.clamp(alpha * x + beta, 0.0, 1.0)


def quantize_codes(x: torch.Tensor, c: torch.Tensor, d: torch.Tensor, bits: int, signed: bool) -> Tuple[torch.Tensor, float]:
    """Integer codes and their scale: ``x_hat_q = codes * scale`` (eq 7 / eq 9).

    Returns ``(codes int16, 1 / levels)``; codes lie in ``[-(2^(b-1)-1), 2^(b-1)-1]`` if
    ``signed`` else ``[0, 2^b - 1]``. This is what the kernels consume."""
    check_bits(bits)
    t = x.detach().float()
    return codes_from_qparams(t, qparams(c.detach(), d.detach()), bits, signed), 1.0 / levels(bits, signed)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward (bit-exact, unlike ``x * g + (x - x * g).detach()``), gradient times ``g``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: float) -> torch.Tensor:
        ctx.g = g
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.g, None


def fake_quantize(x: torch.Tensor, c: torch.Tensor, d: torch.Tensor, bits: int, signed: bool,
                  backend: str = "torch") -> torch.Tensor:
    """Fake-quantized ``x`` (``codes * scale`` of :func:`quantize_codes`, as float) with the
    straight-through gradient to ``x``, ``c`` and ``d``."""
    return custom_ops.fake_quantize(x, qparams(c, d), bits, signed, backend)


def _mse_clip(x: torch.Tensor, bits: int, signed: bool, grid: int = 48) -> float:
    """Clip value ``s`` (interval ``[0, s]`` on magnitudes, i.e. ``c = d = s / 2``) minimising
    the quantization MSE of ``x`` over ``grid`` candidates in ``(0.1, 1] * max|x|``: low bit
    widths want a clip well under max|x|."""
    mag = (x.detach().abs() if signed else x.detach().clamp_min(0)).float().flatten()
    if mag.numel() > 1 << 14:  # a fixed random subsample keeps calibration cheap on big tensors
        g = torch.Generator().manual_seed(0)
        mag = mag[torch.randint(mag.numel(), (1 << 14,), generator=g).to(mag.device)]
    mag = mag[torch.isfinite(mag)]
    top = float(mag.max()) if mag.numel() else 0.0
    if top <= 0.0:
        return 1.0
    lv = levels(bits, signed)
    s = top * (0.1 + 0.9 * torch.arange(1, grid + 1, device=mag.device, dtype=torch.float32) / grid).view(-1, 1)
    q = torch.floor(torch.clamp(mag / s, 0, 1) * lv + 0.5) * (s / lv)
    err = ((q - mag) ** 2).sum(dim=1)
    return float(s[int(torch.argmin(err))])


class IntervalQuantizer(nn.Module):
    """Learnable-interval quantizer of one layer's weights or input activations.

    Args:
        bits: bit width, 2-8.
        signed: signed codes (eq 6-7) or unsigned (eq 8-9). Weights are always signed; an
            activation quantizer decides at calibration (negative inputs seen -> signed).
        c, d: initial interval centre and width; ``d`` must be positive.
        device: where the parameters live (the layer's device).
        batched: the first axis of what it quantizes is the batch (an activation quantizer); the
            gradient scale below then counts the elements of one sample.

    Gradient scaling (LSQ, Esser et al., ICLR 2020): the task gradient of ``c`` and ``log d`` sums
    the straight-through gradients of every element the quantizer saw, so it grows with the layer
    (``conv1``'s ``c`` of a ResNet-50 gets ~200x a weight's gradient) and one plain SGD step can move
    the interval past the weights it covers. The forward multiplies the gradient reaching ``(alpha,
    beta)`` by ``1 / sqrt(N * levels)`` (``N``: elements of the weight, or of one sample of the
    activation), as LSQ does for its step size; the values are untouched, so deploy is unaffected.
    :func:`hybridops.quant_loss` reads :meth:`qparams` directly and keeps its own, unscaled, gradient.
    """

    def __init__(self, bits: int, signed: bool, c: float = 0.5, d: float = 0.5, device=None, batched: bool = False):
        super().__init__()
        check_bits(bits)
        if not d > 0:
            raise ValueError(f"the quantization interval width d must be positive, got d={d}.")
        self.bits = bits
        self.signed = signed
        self.batched = batched
        self.c = nn.Parameter(torch.tensor(float(c), device=device))
        self.log_d = nn.Parameter(torch.tensor(math.log(d), device=device))

    @property
    def d(self) -> torch.Tensor:
        return self.log_d.exp()

    @property
    def levels(self) -> int:
        return levels(self.bits, self.signed)

    def qparams(self) -> torch.Tensor:
        return qparams(self.c, self.d)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, signed: Optional[bool] = None) -> float:
        """Set ``c = d = s / 2`` with ``s`` the MSE-optimal clip for ``x``; return ``s``
        (the value one code step of ``1 / levels`` is worth: ``dequant = hat_q * s``)."""
        if signed is not None:
            self.signed = signed
        s = _mse_clip(x, self.bits, self.signed)
        self.c.fill_(s / 2)
        self.log_d.fill_(math.log(s / 2))
        return s

    def grad_scale(self, x: torch.Tensor) -> float:
        """LSQ's ``1 / sqrt(N * levels)`` for quantizing ``x`` (see the class docstring)."""
        n = x.numel() // max(1, x.shape[0]) if (self.batched and x.dim() > 1) else x.numel()
        return 1.0 / math.sqrt(max(1, n) * self.levels)

    def forward(self, x: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        q = self.qparams()
        if torch.is_grad_enabled() and q.requires_grad:
            q = _ScaleGrad.apply(q, self.grad_scale(x))
        return custom_ops.fake_quantize(x, q, self.bits, self.signed, backend)

    def codes(self, x: torch.Tensor) -> Tuple[torch.Tensor, float]:
        return quantize_codes(x, self.c, self.d, self.bits, self.signed)

    # ``signed`` is decided by calibration (negative inputs seen), so it is state: without it a
    # state_dict loaded into a freshly built model would quantize signed inputs as unsigned.
    def get_extra_state(self) -> dict:
        return {"signed": bool(self.signed), "bits": int(self.bits)}

    def set_extra_state(self, state: dict) -> None:
        if int(state["bits"]) != self.bits:
            raise ValueError(f"the saved quantizer has {state['bits']} bits but this one has {self.bits}; "
                             "build the model with the same HybridConfig bit widths before loading.")
        self.signed = bool(state["signed"])

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, c={float(self.c.detach()):.4g}, d={float(self.d.detach()):.4g}"
