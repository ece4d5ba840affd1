"""Plain-PyTorch reference implementations of every kernel (the ``torch`` backend).

Obviously correct, runs on any device, and is what the Triton and CUDA kernels are tested
against. The exact fp32 operation order below is part of the contract: kernels that perform
the same IEEE operations (no fused multiply-add in the quantizer arithmetic) produce bitwise
identical codes.

Quantizer parameters are passed as ``qparams = tensor([alpha, beta], float32)`` with
``alpha = 0.5 / d`` and ``beta = 0.5 - c * alpha`` (eq 6 and 8), computed by the caller so
that every backend shares one division.

Rounding of a non-negative value ``v`` is ``floor(v + 0.5)``; signed codes round the magnitude
(half away from zero). This is what :func:`hybridops.quant.quantize_codes` computes too.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..kernels.geometry import conv_out_size
from ..kernels.packing import levels, pack_codes, unpack_codes, unpack_weight


def codes_from_qparams(t: torch.Tensor, qparams: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Integer codes (int16) of fp32 ``t`` under eq 6-7 (``signed``) or eq 8-9 (unsigned)."""
    alpha, beta = qparams[0], qparams[1]
    lv = float(levels(bits, signed))
    mag = t.abs() if signed else t
    u = torch.clamp(mag * alpha + beta, 0.0, 1.0)
    q = torch.floor(u * lv + 0.5)
    if signed:
        q = q * torch.sign(t)
    # A NaN input has no code: casting NaN to an integer is undefined in C (x86 happens to give
    # 0 for int16, the GPU's cvt gives 0), so map it to code 0 explicitly on every platform.
    return torch.nan_to_num(q, nan=0.0).to(torch.int16)


def fake_quantize(x: torch.Tensor, qparams: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """``code / levels`` for every element of ``x`` (eq 6-7 or 8-9), in the dtype of ``x``;
    NaN where ``x`` is NaN or infinite (a code would hide it from what follows, which float
    PyTorch would make non-finite). Computed in fp32 (float64 inputs stay float64)."""
    t = x if x.dtype == torch.float64 else x.to(torch.float32)
    q = codes_from_qparams(t, qparams.to(t.dtype), bits, signed)
    # A multiplication by the reciprocal (what torch does for a scalar divisor on CUDA), so that
    # every backend and device rounds the same way.
    y = q.to(t.dtype) * (1.0 / levels(bits, signed))
    return torch.where(torch.isfinite(t), y, float("nan")).to(x.dtype)


def _activated(x, bn_scale, bn_shift, relu) -> torch.Tensor:
    """``t = relu?(x * bn_scale[c] + bn_shift[c])`` in fp32, NHWC."""
    t = x.permute(0, 2, 3, 1).to(torch.float32)
    if bn_scale is not None:
        t = t * bn_scale.to(torch.float32)
    if bn_shift is not None:
        t = t + bn_shift.to(torch.float32)
    return torch.relu(t) if relu else t


def quantize_activate(
    x: torch.Tensor,
    qparams: torch.Tensor,
    bits: int,
    signed: bool,
    bn_scale: Optional[torch.Tensor] = None,
    bn_shift: Optional[torch.Tensor] = None,
    relu: bool = False,
    fp_in_idx: Optional[torch.Tensor] = None,
    slice_dtype: Optional[torch.dtype] = None,
):
    """Fused quantize-activate.

    x: ``(N, C, H, W)`` float, any memory format. Computes in fp32
    ``t = relu?(x * bn_scale[c] + bn_shift[c])`` and returns ``(x_slice, codes)``:

    * ``x_slice``: ``(N, H, W, len(fp_in_idx))`` in ``slice_dtype`` (default ``x.dtype``), the
      channels ``fp_in_idx`` of ``t``, which the full-precision branch consumes; an empty
      ``(0,)`` tensor when ``fp_in_idx`` is None;
    * ``codes``: ``uint8 (N, H, W, packed(C))``, the packed codes of ``t`` (eq 8-9, or 6-7 if
      ``signed``).

    (The float output comes first so that autograd tooling that sums all outputs starts from a
    float.)
    """
    return _codes_and_slice(x, _activated(x, bn_scale, bn_shift, relu), qparams, bits, signed, fp_in_idx,
                            slice_dtype)


def _codes_and_slice(x, t, qparams, bits, signed, fp_in_idx, slice_dtype):
    """:func:`quantize_activate`'s outputs from the activated ``t`` (NHWC fp32)."""
    codes = pack_codes(codes_from_qparams(t, qparams.to(torch.float32), bits, signed), bits)
    if fp_in_idx is None:
        x_slice = x.new_empty((0,), dtype=slice_dtype or x.dtype)
    else:
        x_slice = t.index_select(-1, fp_in_idx.to(torch.long)).to(slice_dtype or x.dtype).contiguous()
    return x_slice, codes


def quantize_activate_flagged(x, qparams, bits, signed, bn_scale=None, bn_shift=None, relu=False, fp_in_idx=None,
                              slice_dtype=None):
    """:func:`quantize_activate` and whether an activated value ``t`` is NaN or infinite (which no
    code can carry: the whole-layer op propagates it, hybridops/ops/layer_op.py). As on every
    backend, the test is on ``t``: a ReLU maps -inf to 0, as float PyTorch would."""
    t = _activated(x, bn_scale, bn_shift, relu)
    return (*_codes_and_slice(x, t, qparams, bits, signed, fp_in_idx, slice_dtype), not bool(torch.isfinite(t).all()))


def int_conv2d(
    a: torch.Tensor,
    w: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    max_code_product: int,
) -> torch.Tensor:
    """Exact integer convolution of codes: ``a (N, C, H, W)``, ``w (C_out, C/g, KH, KW)`` ->
    ``int32 (N, C_out, Ho, Wo)``. ``padding`` is ``(top, bottom, left, right)`` of zero codes;
    ``max_code_product`` bounds ``|a * w|`` (from the bit widths, so no device sync is needed)."""
    bound = max_code_product * w.shape[1] * w.shape[2] * w.shape[3]
    # fp32 sums of integers are exact below 2^24 in any order; past that, or on CUDA where
    # cuDNN may use TF32, use float64.
    dt = torch.float32 if (bound < 2**24 and a.device.type == "cpu") else torch.float64
    top, bottom, left, right = padding
    ap = F.pad(a.to(dt), (left, right, top, bottom))
    out = _conv2d(ap, w.to(dt), None, stride, (0, 0), dilation, groups)
    return torch.round(out).to(torch.int32)


def _conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
            padding_hw: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
    """``F.conv2d`` (symmetric ``padding_hw``) run with stride 1 along a dimension that has one
    output, which is the same output: the stride only moves windows after the first.

    PyTorch 2.14.1's fp32 CPU convolution (oneDNN's ``brg_conv_fwd``) gets a batch > 1
    single-channel input in NHWC memory (what unpacked codes and channel slices are) at stride
    (1, s > 1) with one output along W wrong: output rows s apart in its first rows, the rest
    unwritten (found by bench/fuzz_onednn.py, docs/cpu_backend.md)."""
    ho = conv_out_size(x.shape[2], weight.shape[2], stride[0], 2 * padding_hw[0], dilation[0])
    wo = conv_out_size(x.shape[3], weight.shape[3], stride[1], 2 * padding_hw[1], dilation[1])
    run_stride = (1 if ho == 1 else stride[0], 1 if wo == 1 else stride[1])
    out = F.conv2d(x, weight, bias, run_stride, tuple(padding_hw), tuple(dilation), groups)
    return out if run_stride == tuple(stride) else out[:, :, :ho, :wo]


def qconv2d(
    x_codes: torch.Tensor,
    w_packed: torch.Tensor,
    in_channels: int,
    bits_a: int,
    a_signed: bool,
    bits_w: int,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool = False,
    fp_out: Optional[torch.Tensor] = None,
    fp_out_idx: Optional[torch.Tensor] = None,
    requant_qparams: Optional[torch.Tensor] = None,
    requant_bits: int = 4,
    requant_signed: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Packed low-bit convolution with the hybrid epilogue.

    x_codes: ``uint8 (N, H, W, packed(C_in))``; w_packed: ``uint8 (C_out, KH, KW, packed(C_in/g))``.
    ``acc = sum(A_q * W_q)`` exactly in int32; then, in fp32,
    ``y = acc * scale[co] + bias[co]``, ``y[..., fp_out_idx[j]] += fp_out[..., j]`` (the pruned
    branch, given only for its kept channels), ``y = relu(y)`` if asked. Returns NHWC:

    * ``out_dtype=torch.int32``: the raw accumulators (no epilogue arguments allowed);
    * ``requant_qparams`` given: the packed codes of ``y`` for the next quantized layer;
    * otherwise ``y`` in ``out_dtype``.
    """
    n, h, w_, _ = x_codes.shape
    c_out, kh, kw, _ = w_packed.shape
    a = unpack_codes(x_codes, bits_a, in_channels, a_signed).permute(0, 3, 1, 2)
    wq = unpack_weight(w_packed, bits_w, in_channels // groups)
    bound = levels(bits_a, a_signed) * levels(bits_w, True)
    acc = int_conv2d(a, wq, stride, padding, dilation, groups, bound).permute(0, 2, 3, 1)
    if out_dtype == torch.int32:
        return acc.contiguous()
    y = acc.to(torch.float32) * scale.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    if fp_out is not None:
        y = y.index_add(-1, fp_out_idx.to(torch.long), fp_out.to(torch.float32))
    if relu:
        y = torch.relu(y)
    if requant_qparams is not None:
        return pack_codes(codes_from_qparams(y, requant_qparams.to(torch.float32), requant_bits, requant_signed), requant_bits)
    return y.to(out_dtype).contiguous()


def float_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], groups: int = 1) -> torch.Tensor:
    """``F.conv2d`` with padding ``(top, bottom, left, right)``: the input is padded (a copy)
    only where the padding is asymmetric, which ``F.conv2d`` cannot express."""
    top, bottom, left, right = padding
    if top != bottom or left != right:
        x = F.pad(x, (left, right, top, bottom))
        top = left = 0
    return _conv2d(x, weight, bias, stride, (top, left), dilation, groups)


def pruned_branch_conv(fp_in: torch.Tensor, fp_weight: torch.Tensor, fp_bias: Optional[torch.Tensor],
                       stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """The pruned branch's conv on its NHWC float slice ``fp_in (N, H, W, C_f)``, in ``fp_in``'s
    dtype, with padding ``(top, bottom, left, right)``: NHWC ``(N, Ho, Wo, K_p)``."""
    dt = fp_in.dtype
    return float_conv2d(fp_in.permute(0, 3, 1, 2), fp_weight.to(dt), None if fp_bias is None else fp_bias.to(dt),
                        stride, padding, dilation).permute(0, 2, 3, 1)


def hybrid_conv2d(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding, dilation,
                  groups, relu, fp_in, fp_weight, fp_bias, fp_out_idx, requant_qparams, requant_bits, requant_signed,
                  out_dtype) -> torch.Tensor:
    """A whole hybrid layer from codes: :func:`qconv2d` with ``fp_out`` the pruned branch's conv
    (:func:`pruned_branch_conv`, ungrouped) of the float slice ``fp_in``."""
    fp_out = pruned_branch_conv(fp_in, fp_weight, fp_bias, stride, padding, dilation)
    return qconv2d(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding, dilation,
                   groups, relu, fp_out, fp_out_idx, requant_qparams, requant_bits, requant_signed, out_dtype)


# ----------------------------------------------------------------------------- quantized attention
# The contract of hybridops::quantized_attention (docs/attention.md). Inputs q (B, H, Lq, D),
# k (B, H, Lk, D), v (B, H, Lk, Dv); fp32 arithmetic (fp64 for float64 inputs, which gradcheck needs).

def attention_compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs (as :func:`fake_quantize`), else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def attention_codes(x: torch.Tensor, qparams: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes (int16) of ``x`` under eq 6-7, computed in :func:`attention_compute_dtype`."""
    dt = attention_compute_dtype(x)
    return codes_from_qparams(x.to(dt), qparams.to(dt), bits, True)


def attention_sm_scale(sm_scale: Optional[float], head_dim: int) -> float:
    """The softmax scale: ``sm_scale``, or ``1 / sqrt(head_dim)`` when it is None."""
    return 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale


def attention_scales(q_clip: torch.Tensor, k_clip: torch.Tensor, v_clip: Optional[torch.Tensor], bits: int,
                     sm_scale: Optional[float], head_dim: int, dtype: torch.dtype):
    """``(s_qk, step_v)``, 0-d tensors in ``dtype``: the scores are ``float(S_int) * s_qk`` with
    ``s_qk = ((q_clip / levels) * (k_clip / levels)) * sm_scale`` (``sm_scale`` None:
    ``1 / sqrt(head_dim)``), and V's codes are worth ``step_v = v_clip / levels`` (None without
    ``v_clip``). Computed once by the caller, like qparams, so every backend multiplies by the
    same rounded scalar."""
    lv = float(levels(bits, True))
    scale = torch.tensor(attention_sm_scale(sm_scale, head_dim), dtype=dtype, device=q_clip.device)
    s_qk = (q_clip.to(dtype) / lv) * (k_clip.to(dtype) / lv) * scale
    return s_qk, None if v_clip is None else v_clip.to(dtype) / lv


def attention_int_scores(q: torch.Tensor, k: torch.Tensor, q_qparams: torch.Tensor, k_qparams: torch.Tensor,
                         bits: int) -> torch.Tensor:
    """``S_int = Cq @ Ck^T`` exactly, int32 ``(B, H, Lq, Lk)``: a float64 product of the codes is
    exact (``|S_int| <= D * 127^2``, far below 2^53)."""
    cq = attention_codes(q, q_qparams, bits).to(torch.float64)
    ck = attention_codes(k, k_qparams, bits).to(torch.float64)
    return torch.matmul(cq, ck.transpose(-1, -2)).to(torch.int32)


def attention_allowed(attn_mask: Optional[torch.Tensor], is_causal: bool, lq: int, lk: int,
                      device) -> Optional[torch.Tensor]:
    """Which keys each query attends, a bool tensor broadcastable to ``(B, H, Lq, Lk)``, or None
    for all of them. Causal is aligned top-left, as in ``F.scaled_dot_product_attention``: query
    ``i`` attends keys ``j <= i``. A float mask excludes the keys where it is ``-inf``."""
    if is_causal:
        return torch.ones(lq, lk, dtype=torch.bool, device=device).tril()
    if attn_mask is None:
        return None
    return attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf")


def masked_scores(s: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
    """The scores after the mask: ``-inf`` where a bool mask (or causality) excludes a key; plus
    the mask, cast to the scores' dtype, where it is additive."""
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        return s + attn_mask.to(s.dtype)
    allowed = attention_allowed(attn_mask, is_causal, s.shape[-2], s.shape[-1], s.device)
    return s if allowed is None else s.masked_fill(~allowed, float("-inf"))


def softmax_rows(s: torch.Tensor) -> torch.Tensor:
    """Softmax over keys; a row that attends no key (all ``-inf``) gets probabilities 0, so its
    output is 0, as ``F.scaled_dot_product_attention`` gives on torch 2.14."""
    if s.shape[-1] == 0:
        return s
    p = torch.softmax(s, -1)
    return p.masked_fill(s.amax(-1, keepdim=True) == float("-inf"), 0.0)


def quantized_attention_finite(q, k, v, q_qparams, k_qparams, v_qparams, s_qk, step_v, bits, attn_mask,
                               is_causal) -> torch.Tensor:
    """The op's arithmetic, which every backend implements under this name and these positional
    arguments: ``S = float(S_int) * s_qk`` (:func:`attention_scales`), masked, softmax ``P``, and
    ``out = P @ V_hat`` with ``V_hat = float(Cv) * step_v`` (``v_qparams`` None: ``V_hat = v``),
    in the input's dtype. A non-finite q, k or quantized v counts as its code (NaN: 0, +-inf:
    +-levels); a float v must be finite (the op zeroes its non-finite values before the call and
    makes what they reach NaN after it: :func:`attention_nonfinite`)."""
    b, h, lq, _ = q.shape
    dv = v.shape[-1]
    dt = attention_compute_dtype(q)
    if k.shape[2] == 0:  # every row attends no key
        return q.new_zeros((b, h, lq, dv))
    s = masked_scores(attention_int_scores(q, k, q_qparams, k_qparams, bits).to(dt) * s_qk, attn_mask, is_causal)
    v_hat = v.to(dt) if v_qparams is None else attention_codes(v, v_qparams, bits).to(dt) * step_v
    return torch.matmul(softmax_rows(s), v_hat).to(q.dtype)


def attention_finite_values(v: torch.Tensor) -> torch.Tensor:
    """Float ``v`` with its non-finite values replaced by 0 (what they reach is made NaN after)."""
    return torch.where(torch.isfinite(v), v, torch.zeros((), dtype=v.dtype, device=v.device))


def attention_has_nonfinite(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether q, k or v may hold a NaN or an infinity: their sum is finite otherwise. One read of
    each and one sync (``isfinite(x).all()`` costs several passes: 0.2 ms per bf16 ViT-B tensor on
    a 2-core EPYC). Finite values can overflow the sum (near fp32's largest value); that only sends
    the call through :func:`attention_nonfinite`, which then marks nothing."""
    dt = attention_compute_dtype(q)
    return not bool(torch.isfinite(q.sum(dtype=dt) + k.sum(dtype=dt) + v.sum(dtype=dt)))


def attention_nonfinite(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
    """``out`` with NaN wherever a non-finite input reaches it (no code carries NaN or inf, so
    the op propagates them as float attention would): a row of q reaches its output row, a row
    of k every output row that attends that key, an element ``v[j, e]`` column ``e`` of every
    output row that attends key ``j``. A row that attends no key stays 0."""
    lq, lk = q.shape[2], k.shape[2]
    allowed = attention_allowed(attn_mask, is_causal, lq, lk, q.device)
    if allowed is None:
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    allowed = allowed.expand(q.shape[0], q.shape[1], lq, lk)
    q_bad = ~torch.isfinite(q).all(-1) & allowed.any(-1)
    k_bad = (allowed & ~torch.isfinite(k).all(-1)[:, :, None, :]).any(-1)
    # counts of non-finite values reached, exact in float (at most Lk)
    v_bad = torch.matmul(allowed.to(torch.float32), (~torch.isfinite(v)).to(torch.float32)) > 0
    return out.masked_fill((q_bad | k_bad)[..., None] | v_bad, float("nan"))


def quantized_attention(q, k, v, q_qparams, k_qparams, v_qparams, q_clip, k_clip, v_clip, bits, attn_mask=None,
                        is_causal=False, sm_scale=None) -> torch.Tensor:
    """The whole contract of ``hybridops::quantized_attention`` (docs/attention.md): scales,
    :func:`quantized_attention_finite`, and the non-finite rule of :func:`attention_nonfinite`."""
    s_qk, step_v = attention_scales(q_clip, k_clip, v_clip, bits, sm_scale, q.shape[-1], attention_compute_dtype(q))
    if not attention_has_nonfinite(q, k, v):
        return quantized_attention_finite(q, k, v, q_qparams, k_qparams, v_qparams, s_qk, step_v, bits, attn_mask,
                                          is_causal)
    v_in = v if v_qparams is not None else attention_finite_values(v)
    out = quantized_attention_finite(q, k, v_in, q_qparams, k_qparams, v_qparams, s_qk, step_v, bits, attn_mask,
                                     is_causal)
    return attention_nonfinite(out, q, k, v, attn_mask, is_causal)
