"""``hybridops::quantized_attention``: attention with integer QK^T on quantized Q and K.

The op checks its arguments (one sentence per problem), computes the scales once
(:func:`hybridops.ops.reference.attention_scales`), runs the backend's
``quantized_attention_finite`` (the registry's optional op: ``torch`` = the reference, ``onednn``
= ``kernels/onednn_attention.py``, ``triton`` = ``kernels/attention.py``) and propagates
non-finite inputs (:func:`hybridops.ops.reference.attention_nonfinite`). Gradients are
straight-through for q, k, v and their quantizers' ``[alpha, beta]``, exact for the clips and for
a float V. Contract, cost accounting and measurements: docs/attention.md.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels.packing import check_bits, levels
from . import reference, registry
from .custom_ops import _check, check_qparams

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_clip(clip: torch.Tensor, name: str, q: torch.Tensor) -> None:
    ok_dtypes = (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)
    _check(clip.dim() == 0 and clip.dtype in ok_dtypes,
           lambda: f"{name} must be a 0-d float32 tensor (float64 allowed with float64 inputs), got {clip.dtype} "
                   f"{tuple(clip.shape)}.")
    _check(clip.device == q.device, lambda: f"{name} is on {clip.device} but q is on {q.device}.")


def _broadcastable(shape, target) -> bool:
    return len(shape) <= len(target) and all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def check_attention_args(q, k, v, q_qparams, k_qparams, v_qparams, q_clip, k_clip, v_clip, bits, attn_mask,
                         is_causal, sm_scale) -> None:
    """ValueError with one sentence for the first argument the op cannot take."""
    check_bits(bits)
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _check(t.dim() == 4, lambda: f"quantized_attention expects {name} of shape (B, H, L, D), got "
                                     f"{tuple(t.shape)}.")
    _check(q.dtype in _INPUT_DTYPES,
           lambda: f"quantized_attention expects float32, bfloat16, float16 or float64 inputs, got {q.dtype}.")
    _check(k.dtype == q.dtype and v.dtype == q.dtype,
           lambda: f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}.")
    _check(k.device == q.device and v.device == q.device,
           lambda: f"q, k and v must be on one device, got {q.device}, {k.device} and {v.device}.")
    b, h, lq, d = q.shape
    _check(k.shape[:2] == (b, h) and v.shape[:2] == (b, h),
           lambda: f"q, k and v must have the same batch and head counts (B, H), got {tuple(q.shape[:2])}, "
                   f"{tuple(k.shape[:2])} and {tuple(v.shape[:2])}.")
    _check(k.shape[3] == d, lambda: f"k's head dim must equal q's ({d}), got {k.shape[3]}.")
    _check(v.shape[2] == k.shape[2], lambda: f"v must have one row per key ({k.shape[2]}), got {v.shape[2]}.")
    _check(d % 8 == 0 and v.shape[3] % 8 == 0,
           lambda: f"the head dims must be multiples of 8 (the int8 units' K step), got D={d} and Dv={v.shape[3]}.")
    check_qparams(q_qparams, q, "q_qparams")
    check_qparams(k_qparams, q, "k_qparams")
    _check((v_qparams is None) == (v_clip is None),
           "v_qparams and v_clip must be given together (V quantized) or both be None (V float).")
    if v_qparams is not None:
        check_qparams(v_qparams, q, "v_qparams")
        _check_clip(v_clip, "v_clip", q)
    _check_clip(q_clip, "q_clip", q)
    _check_clip(k_clip, "k_clip", q)
    _check(sm_scale is None or (sm_scale == sm_scale and abs(sm_scale) != float("inf")),
           lambda: f"sm_scale must be a finite float or None (1/sqrt(D)), got {sm_scale}.")
    if attn_mask is not None:
        target = (b, h, lq, k.shape[2])
        _check(not is_causal, "give attn_mask or is_causal, not both (as F.scaled_dot_product_attention).")
        _check(attn_mask.dtype == torch.bool or attn_mask.dtype.is_floating_point,
               lambda: f"attn_mask must be bool (True: attend) or an additive float mask, got {attn_mask.dtype}.")
        _check(attn_mask.device == q.device, lambda: f"attn_mask is on {attn_mask.device} but q is on {q.device}.")
        _check(_broadcastable(tuple(attn_mask.shape), target),
               lambda: f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (B, H, Lq, Lk) = {target}.")


def _implementation(backend: str, device: torch.device):
    registry.backend_spec(backend)  # an unknown name is a ValueError, like any bad argument
    reason = registry.unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(reason)
    impl = getattr(registry.loaded(backend), "quantized_attention_finite", None)
    _check(impl is not None, lambda: f"the {backend} backend has no quantized_attention kernel; use one of "
                                     f"'torch', 'onednn' (CPU) or 'triton'.")
    return impl


@torch.library.custom_op("hybridops::quantized_attention", mutates_args=())
def quantized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_qparams: torch.Tensor,
    k_qparams: torch.Tensor,
    v_qparams: Optional[torch.Tensor],
    q_clip: torch.Tensor,
    k_clip: torch.Tensor,
    v_clip: Optional[torch.Tensor],
    bits: int,
    attn_mask: Optional[torch.Tensor],
    is_causal: bool,
    sm_scale: Optional[float],
    backend: str,
) -> torch.Tensor:
    """Softmax attention of q ``(B, H, Lq, D)``, k ``(B, H, Lk, D)``, v ``(B, H, Lk, Dv)`` with
    the scores an exact integer product of Q's and K's signed ``bits``-bit codes; V quantized
    likewise when ``v_qparams`` / ``v_clip`` are given. Returns ``(B, H, Lq, Dv)`` in q's dtype;
    see :func:`hybridops.ops.reference.quantized_attention` and docs/attention.md."""
    check_attention_args(q, k, v, q_qparams, k_qparams, v_qparams, q_clip, k_clip, v_clip, bits, attn_mask,
                         is_causal, sm_scale)
    b, h, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[3]
    if b * h * lq * dv == 0 or lk == 0:  # nothing to compute, or rows that attend no key: 0
        return q.new_zeros((b, h, lq, dv))
    impl = _implementation(backend, q.device)
    s_qk, step_v = reference.attention_scales(q_clip, k_clip, v_clip, bits, sm_scale, d,
                                              reference.attention_compute_dtype(q))
    nonfinite = reference.attention_has_nonfinite(q, k, v)
    v_in = reference.attention_finite_values(v) if nonfinite and v_qparams is None else v
    out = impl(q, k, v_in, q_qparams, k_qparams, v_qparams, s_qk, step_v, bits, attn_mask, is_causal)
    return reference.attention_nonfinite(out, q, k, v, attn_mask, is_causal) if nonfinite else out


@quantized_attention.register_fake
def _(q, k, v, q_qparams, k_qparams, v_qparams, q_clip, k_clip, v_clip, bits, attn_mask, is_causal, sm_scale,
      backend):
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


def _setup(ctx, inputs, output):
    q, k, v, q_qparams, k_qparams, v_qparams, q_clip, k_clip, v_clip, bits, attn_mask, is_causal, sm_scale, _ = inputs
    ctx.save_for_backward(q, k, v, q_qparams, k_qparams, v_qparams, q_clip, k_clip, v_clip, attn_mask)
    ctx.bits, ctx.is_causal, ctx.sm_scale = bits, is_causal, sm_scale


class _Ste:
    """One quantized operand in the backward: its dequantized value ``code * clip / levels`` (what
    the forward multiplied) and the straight-through chain of the package's fake quantizer
    (``_fake_quantize_backward`` in custom_ops.py): inside the interval (``0 < alpha |x| + beta <
    1``) ``d value / dx = alpha * clip``, ``d / d alpha = x * clip``, ``d / d beta = sign(x) *
    clip``; ``d value / d clip = code / levels`` exactly. Non-finite inputs get no gradient."""

    def __init__(self, x, qparams, clip, bits, dt):
        t = x.to(dt)
        self.finite = torch.isfinite(t)
        self.t = torch.where(self.finite, t, torch.zeros((), dtype=dt, device=t.device))
        self.alpha, self.beta = qparams[0].to(dt), qparams[1].to(dt)
        u = self.t.abs() * self.alpha + self.beta
        self.inside = (u > 0) & (u < 1) & self.finite
        self.fq = reference.attention_codes(x, qparams, bits).to(dt) / levels(bits, True)  # code / levels
        self.clip = clip.to(dt)
        self.value = self.fq * self.clip

    def grads(self, g, x, qparams, clip):
        """Gradients to ``(x, qparams, clip)`` from ``g = d loss / d value``."""
        gi = torch.where(self.inside, g * self.clip, torch.zeros((), dtype=g.dtype, device=g.device))
        grad_qp = torch.stack(((gi * self.t).sum(), (gi * torch.sign(self.t)).sum())).to(qparams.dtype)
        return (gi * self.alpha).to(x.dtype), grad_qp, (g * self.fq).sum().to(clip.dtype)


def _backward(ctx, grad):
    q, k, v, q_qparams, k_qparams, v_qparams, q_clip, k_clip, v_clip, attn_mask = ctx.saved_tensors
    dt = reference.attention_compute_dtype(q)
    sm = reference.attention_sm_scale(ctx.sm_scale, q.shape[-1])
    sq = _Ste(q, q_qparams, q_clip, ctx.bits, dt)
    sk = _Ste(k, k_qparams, k_clip, ctx.bits, dt)
    sv = None if v_qparams is None else _Ste(v, v_qparams, v_clip, ctx.bits, dt)
    v_val = reference.attention_finite_values(v.to(dt)) if sv is None else sv.value
    # the forward recomputed in float from the dequantized operands, then softmax attention's
    # backward: dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dP P)), dQ = dS K sm, dK = dS^T Q sm
    s = reference.masked_scores(torch.matmul(sq.value, sk.value.transpose(-1, -2)) * sm, attn_mask,
                                ctx.is_causal)
    p = reference.softmax_rows(s)
    g = grad.to(dt)
    d_v = torch.matmul(p.transpose(-1, -2), g)
    d_p = torch.matmul(g, v_val.transpose(-1, -2))
    d_s = p * (d_p - (d_p * p).sum(-1, keepdim=True)) * sm
    grad_q, grad_qqp, grad_qclip = sq.grads(torch.matmul(d_s, sk.value), q, q_qparams, q_clip)
    grad_k, grad_kqp, grad_kclip = sk.grads(torch.matmul(d_s.transpose(-1, -2), sq.value), k, k_qparams, k_clip)
    if sv is None:
        grad_v, grad_vqp, grad_vclip = torch.where(torch.isfinite(v), d_v, 0.0).to(v.dtype), None, None
    else:
        grad_v, grad_vqp, grad_vclip = sv.grads(d_v, v, v_qparams, v_clip)
    return (grad_q, grad_k, grad_v, grad_qqp, grad_kqp, grad_vqp, grad_qclip, grad_kclip, grad_vclip,
            None, None, None, None, None)


quantized_attention.register_autograd(_backward, setup_context=_setup)
