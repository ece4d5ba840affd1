"""The ``onednn`` backend: deployed hybrid layers on the CPU's int8 units through oneDNN.

The integer convolution is oneDNN's u8 x s8 convolution as PyTorch ships it
(``torch.ops.onednn.qconv_prepack`` / ``qconv2d_pointwise``, the ops PyTorch's own x86 int8 path
lowers to; AMX-INT8 on Sapphire Rapids, VNNI or plain AVX-512 / AVX2 elsewhere: oneDNN picks the
ISA, :func:`isa` reports it). The passes oneDNN's post-ops cannot do bit-exactly are small C++
kernels of ours (``csrc/cpu/``, built as ``hybridops._C_cpu``): the fused quantize-activate and
the hybrid epilogue (bias, the pruned branch's sum into its kept channels, ReLU,
re-quantization). Design and measurements: ``docs/cpu_backend.md``.

Code format (``nibble_codes=False`` in the registry): activation codes travel one per byte as
``uint8 (N, H, W, C)`` NHWC, ``byte = code + zero_point`` with

* unsigned codes (eq 9, ``0 .. 2^b - 1``, including unsigned 8-bit ``0 .. 255``): zero point 0;
* signed codes (eq 7, ``-(2^(b-1) - 1) .. 2^(b-1) - 1``): zero point ``2^(b-1)``, so the bytes
  lie in ``1 .. 2^b - 1`` (signed 8-bit: ``1 .. 255``).

oneDNN subtracts the zero point exactly (int32 compensation) and pads with it, so the padded
border is code 0 as in the reference. Re-quantized outputs use the same format with the next
layer's zero point. :func:`codes_to_int` / :func:`codes_from_int` convert.

Exactness (asserted by tests/test_onednn.py):

* codes of ``quantize_activate`` and re-quantized codes equal the reference bit for bit
  (same fp32 operation order, no FMA; oneDNN's fp32 output ``f32(acc) * scale`` is one IEEE
  multiply like the reference's, and our epilogue adds bias, the FP branch and ReLU in the
  reference's order);
* ``out_dtype=torch.int32`` accumulators equal the reference exactly: oneDNN's fp32 output is
  exact below 2^24, and a reduction whose bound could exceed that is split into input-channel
  chunks whose partial sums are exact, added in int32;
* float outputs with ``fp_out`` or ``relu`` computed by our epilogue are bitwise equal to the
  reference in fp32 (and bf16, which rounds the same fp32 value); the plain float output (no
  FP branch, no re-quantization) takes bias and ReLU as oneDNN post-ops: tolerance 1 fp32 ulp
  per add (relative 2^-23 of |acc * scale| + |bias|), asserted at rtol 1e-6 / atol 1e-6.

Weights are reordered once into oneDNN's blocked layout and kept in the package's one cache
(:mod:`.derived`, by the packed tensor's identity and version), never per call.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .derived import cached
from .packing import levels, unpack_weight

try:
    from hybridops import _C_cpu as _C
except ImportError as e:  # the backend is unavailable without its kernels; the registry reports this reason
    raise ImportError(
        f"the onednn backend needs the compiled CPU kernels hybridops._C_cpu ({e}); reinstall with a C++ compiler: "
        f"HYBRIDOPS_BUILD_CUDA=0 pip install --no-build-isolation --no-deps -e .") from None

if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.onednn, "qconv2d_pointwise") \
        or not hasattr(torch.ops.onednn, "qlinear_pointwise"):
    raise ImportError("this PyTorch build has no oneDNN int8 convolution and matmul "
                      "(torch.ops.onednn.qconv2d_pointwise, qlinear_pointwise).")

_qconv = torch.ops.onednn.qconv2d_pointwise.default
_qprepack = torch.ops.onednn.qconv_prepack.default
_fconv = torch.ops.mkldnn._convolution_pointwise.default
_qlinear = torch.ops.onednn.qlinear_pointwise.default
_qlprepack = torch.ops.onednn.qlinear_prepack.default

# fp32 holds every integer below 2^24 exactly: the bound under which oneDNN's fp32 output of an
# int32 accumulator is the accumulator itself.
_EXACT_F32 = 1 << 24


def zero_point(bits: int, signed: bool) -> int:
    """The byte that stands for code 0: ``2^(b-1)`` for signed codes, 0 for unsigned ones."""
    return (1 << (bits - 1)) if signed else 0


def codes_to_int(codes_u8: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """This backend's u8 codes -> integer codes (int16)."""
    return codes_u8.to(torch.int16) - zero_point(bits, signed)


def codes_from_int(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Integer codes -> this backend's u8 codes (one per byte, code + zero point)."""
    return (codes.to(torch.int16) + zero_point(bits, signed)).to(torch.uint8)


# ----------------------------------------------------------------------------- constants
# Weight zero points (always 0: symmetric weights) and unit scales, per length: constants.
_zeros: Dict[int, torch.Tensor] = {}
_ones: Dict[int, torch.Tensor] = {}


def _zeros_i64(n: int) -> torch.Tensor:
    z = _zeros.get(n)
    if z is None:
        z = _zeros[n] = torch.zeros(n, dtype=torch.int64)
    return z


def _ones_f32(n: int) -> torch.Tensor:
    z = _ones.get(n)
    if z is None:
        z = _ones[n] = torch.ones(n, dtype=torch.float32)
    return z


def _geometry(h: int, w: int, kh: int, kw: int, stride, padding, dilation):
    """The convolution as oneDNN is asked to run it, and what we do around the call.

    oneDNN's ops take symmetric padding; the asymmetric remainder is padded explicitly. Two
    degenerate geometries are rewritten because oneDNN's AMX int8 convolution (torch 2.14.1's
    bundled oneDNN) gets them wrong, found by tests/test_onednn.py's fuzz: padding wider than the
    dilated kernel's reach, or an input smaller than the kernel (outputs that see only padding: wrong
    values, or a segfault) is padded explicitly; a stride > 1 along a dimension with one output (wrong values) runs
    with stride 1 and keeps the first output. Returns ``(stride, sym_padding, extra_tblr, (Ho, Wo),
    crop)``, ``crop`` True when the output must be cut to ``(Ho, Wo)``."""
    top, bottom, left, right = padding
    reach_h, reach_w = (kh - 1) * dilation[0], (kw - 1) * dilation[1]
    ph, pw = min(top, bottom, reach_h), min(left, right, reach_w)
    # An input smaller than the dilated kernel leaves outputs that see only padding (a segfault in
    # oneDNN here): that dimension's padding is all explicit.
    ph = 0 if h < reach_h + 1 else ph
    pw = 0 if w < reach_w + 1 else pw
    extra = (top - ph, bottom - ph, left - pw, right - pw)
    ho = (h + top + bottom - reach_h - 1) // stride[0] + 1
    wo = (w + left + right - reach_w - 1) // stride[1] + 1
    st = [1 if ho == 1 else stride[0], 1 if wo == 1 else stride[1]]
    return st, [ph, pw], extra, (ho, wo), st != list(stride)


def _crop(y: torch.Tensor, hw) -> torch.Tensor:
    return y[:, :, : hw[0], : hw[1]].contiguous(memory_format=torch.channels_last)


def _prepacked_int_weight(w_packed, bits_w, cin_g, groups, stride, pad_sym, dilation, zp, x_shape, ci0=0, ci1=None):
    """oneDNN's blocked s8 weight for ``w_packed`` (input channels ``ci0:ci1`` of each group),
    made once per weight version and input shape. The weight scales are passed per call
    (prepacking does not depend on them), so a BatchNorm folded into ``scale`` later needs no
    re-pack.

    Packed for the input shape ``x_shape``: without it oneDNN packs for a generic problem and may
    pick a blocked layout the convolution does not run on; every call then re-orders the weight
    (seen on AVX-512 VNNI: AcdB48a4b packed, AcdB64a4b run, 4.9 ms for a 256x1024 1x1 conv on 14x14
    whose product takes 0.07 ms)."""
    key = (bits_w, cin_g, groups, tuple(stride), tuple(pad_sym), tuple(dilation), zp, tuple(x_shape), ci0, ci1)

    def build():
        w = unpack_weight(w_packed, bits_w, cin_g)
        if ci1 is not None:
            w = w[:, ci0:ci1].contiguous()
        return _qprepack(w, _ones_f32(w.shape[0]), 1.0, zp, list(stride), list(pad_sym), list(dilation), groups,
                         list(x_shape))

    return cached("onednn_int_weight", (w_packed,), key, build)


def _pad_codes(x_nchw: torch.Tensor, extra: Tuple[int, int, int, int], zp: int) -> torch.Tensor:
    """Asymmetric padding's remainder, padded with the zero point (code 0), channels_last."""
    t, b, l, r = extra
    if not any(extra):
        return x_nchw
    return F.pad(x_nchw, (l, r, t, b), value=zp).contiguous(memory_format=torch.channels_last)


def _is_gemm(w_packed, groups, stride, pad_sym) -> bool:
    """A 1x1 kernel at stride 1 without padding over one group: a matrix product of the NHWC
    pixels with the weight, which oneDNN's int8 matmul runs faster than its convolution (a
    ``Linear`` on 197 tokens, each a 1x1 image: 0.29 ms against 1.1 ms on AVX-512 VNNI; ResNet-50's
    1x1 convolutions 3-8% faster; docs/cpu_backend.md)."""
    return (w_packed.shape[1] == 1 and w_packed.shape[2] == 1 and groups == 1 and list(stride) == [1, 1]
            and list(pad_sym) == [0, 0])


def _prepacked_gemm_weight(w_packed, bits_w, cin, m, ci0=0, ci1=None):
    """oneDNN's blocked s8 weight of a 1x1 kernel for its int8 matmul over ``m`` rows, made once
    per weight version and row count (packed for the problem, as :func:`_prepacked_int_weight`)."""
    def build():
        w = unpack_weight(w_packed, bits_w, cin).flatten(1)
        if ci1 is not None:
            w = w[:, ci0:ci1].contiguous()
        return _qlprepack(w, [m, w.shape[1]])

    return cached("onednn_gemm_weight", (w_packed,), (bits_w, cin, m, ci0, ci1), build)


def _int_conv_f32(x_nchw, w_packed, bits_w, cin_g, groups, w_scale, bias, stride, pad_sym, dilation, zp, relu,
                  out_dtype, ci0=0, ci1=None):
    if _is_gemm(w_packed, groups, stride, pad_sym):
        n, c, h, w = x_nchw.shape
        rows = x_nchw.permute(0, 2, 3, 1).reshape(n * h * w, c)  # channels_last: a view
        pw = _prepacked_gemm_weight(w_packed, bits_w, cin_g, rows.shape[0], ci0, ci1)
        y = _qlinear(rows, 1.0, zp, pw, w_scale, _zeros_i64(w_scale.shape[0]), bias, 1.0, 0, out_dtype,
                     "relu" if relu else "none", [], "")
        return y.view(n, h, w, -1).permute(0, 3, 1, 2)
    pw = _prepacked_int_weight(w_packed, bits_w, cin_g, groups, stride, pad_sym, dilation, zp, x_nchw.shape, ci0, ci1)
    return _qconv(x_nchw, 1.0, zp, pw, w_scale, _zeros_i64(w_scale.shape[0]), bias, list(stride), list(pad_sym),
                  list(dilation), groups, 1.0, 0, out_dtype, "relu" if relu else "none", [], "")


def _int32_acc(x_nchw, w_packed, in_channels, bits_a, a_signed, bits_w, stride, pad_sym, dilation, groups, zp):
    """Exact int32 accumulators (NHWC). oneDNN returns fp32 here, exact below 2^24; a larger bound
    is split along each group's input channels into chunks whose partial sums stay below it."""
    c_out, kh, kw, _ = w_packed.shape
    cin_g = in_channels // groups
    per_ch = levels(bits_a, a_signed) * levels(bits_w, True) * kh * kw
    chunk = max(1, min(cin_g, (_EXACT_F32 - 1) // max(per_ch, 1)))
    ones = _ones_f32(c_out)
    if chunk >= cin_g:
        y = _int_conv_f32(x_nchw, w_packed, bits_w, cin_g, groups, ones, None, stride, pad_sym, dilation, zp, False,
                          torch.float32)
        return y.permute(0, 2, 3, 1).to(torch.int32).contiguous()
    if per_ch >= _EXACT_F32:
        raise ValueError(f"a {kh}x{kw} kernel at {bits_a}/{bits_w} bits can exceed 2^24 per input channel; the onednn "
                         f"backend's int32 output cannot be exact there (use the torch backend).")
    n, _, h, w = x_nchw.shape
    xg = x_nchw.view(n, groups, cin_g, h, w)
    acc = None
    for c0 in range(0, cin_g, chunk):
        c1 = min(cin_g, c0 + chunk)
        xc = xg[:, :, c0:c1].reshape(n, groups * (c1 - c0), h, w).contiguous(memory_format=torch.channels_last)
        y = _int_conv_f32(xc, w_packed, bits_w, cin_g, groups, ones, None, stride, pad_sym, dilation, zp, False,
                          torch.float32, c0, c1)
        part = y.permute(0, 2, 3, 1).to(torch.int32)
        acc = part if acc is None else acc + part
    return acc.contiguous()


@functools.lru_cache(maxsize=None)
def pairs_saturate() -> bool:
    """True where oneDNN's u8 x s8 convolution adds products in pairs into 16 bits with
    saturation: x86 without VNNI or AMX (AVX2 / AVX-512 without VNNI use ``vpmaddubsw``), where
    ``255 * 127 + 255 * 127`` does not fit. Measured once with a two-channel 3x1 convolution and
    a two-column int8 matmul (the 1x1 route, :func:`_is_gemm`) whose exact results are 64770, so
    the answer is what this machine's oneDNN does, not a guess from CPU flags."""
    w = torch.full((1, 2, 3, 1), 127, dtype=torch.int8)
    w[:, :, 1:] = 0
    packed = _qprepack(w, _ones_f32(1), 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None)
    x = torch.full((1, 2, 3, 1), 255, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    y = _qconv(x, 1.0, 0, packed, _ones_f32(1), _zeros_i64(1), None, [1, 1], [0, 0], [1, 1], 1, 1.0, 0,
               torch.float32, "none", [], "")
    wl = _qlprepack(torch.full((1, 2), 127, dtype=torch.int8), [1, 2])
    yl = _qlinear(torch.full((1, 2), 255, dtype=torch.uint8), 1.0, 0, wl, _ones_f32(1), _zeros_i64(1), None, 1.0, 0,
                  torch.float32, "none", [], "")
    return int(y.item()) != 2 * 255 * 127 or int(yl.item()) != 2 * 255 * 127


def _may_saturate(bits_a: int, bits_w: int) -> bool:
    """Whether a pair of (byte, weight) products can leave 16 bits: bytes reach ``2^b - 1``
    (signed codes are shifted by the zero point), weights ``levels(bits_w)``."""
    return 2 * ((1 << bits_a) - 1) * levels(bits_w, True) > 32767 and pairs_saturate()


def _nibble_split_acc(x_nchw, w_packed, in_channels, bits_w, stride, pad_sym, dilation, groups):
    """Exact int32 accumulators of unsigned 8-bit codes where pairs of products saturate
    (:func:`pairs_saturate`): ``acc = 16 * conv(a >> 4) + conv(a & 15)``, two convolutions whose
    pairs stay far inside 16 bits (2 * 15 * 127)."""
    hi = (x_nchw >> 4).contiguous(memory_format=torch.channels_last)
    lo = (x_nchw & 15).contiguous(memory_format=torch.channels_last)
    args = (w_packed, in_channels, 4, False, bits_w, stride, pad_sym, dilation, groups, 0)
    return _int32_acc(hi, *args) * 16 + _int32_acc(lo, *args)


def _signed_grouped_acc(x_nchw, w_packed, in_channels, bits_a, bits_w, stride, pad_sym, dilation, groups, zp):
    """Exact int32 accumulators of a convolution of signed codes without a source zero point:
    torch 2.14.1's oneDNN gets grouped u8 convolutions with a zero point wrong on many shapes, and
    degenerate geometries with a zero point on a few (found by tests/test_onednn.py's fuzz and a
    ~4,500-shape sweep), while it was exact on every zero-point-free shape tried. So
    ``acc = conv(max(a, 0)) - conv(max(-a, 0))``, two unsigned convolutions."""
    a = x_nchw.to(torch.int16) - zp
    pos = a.clamp(min=0).to(torch.uint8).contiguous(memory_format=torch.channels_last)
    neg = (-a).clamp(min=0).to(torch.uint8).contiguous(memory_format=torch.channels_last)
    args = (w_packed, in_channels, bits_a, True, bits_w, stride, pad_sym, dilation, groups, 0)
    return _int32_acc(pos, *args) - _int32_acc(neg, *args)


# ----------------------------------------------------------------------------- backend ops
def fake_quantize(x: torch.Tensor, qparams: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """``code / levels`` of every element (see the reference) for fp32 / bf16 / fp16 ``x``;
    the registry sends float64 to the reference, which computes in float64."""
    out = _C.fake_quantize_f32(x.to(torch.float32).contiguous(), qparams.to(torch.float32), bits, signed)
    return out.to(x.dtype).view(x.shape) if x.dtype != torch.float32 else out.view(x.shape)


def quantize_activate_flagged(x, qparams, bits, signed, bn_scale=None, bn_shift=None, relu=False, fp_in_idx=None,
                              slice_dtype=None):
    """One pass over ``x (N, C, H, W)`` (any memory format; channels_last reads fastest):
    ``(x_slice (N, H, W, K) or (0,), codes uint8 (N, H, W, C), nonfinite)`` in this backend's code
    format; ``nonfinite``: whether ``x`` held a NaN or an infinity (tested in the same pass)."""
    sd = slice_dtype or x.dtype
    xk = x if x.dtype in (torch.float32, torch.bfloat16) else x.to(torch.float32)
    slice_bf16 = sd == torch.bfloat16
    x_slice, codes, nonfinite = _C.quantize_activate(xk, qparams, bits, signed, zero_point(bits, signed), bn_scale,
                                                     bn_shift, relu, fp_in_idx, slice_bf16)
    if fp_in_idx is not None and sd not in (torch.float32, torch.bfloat16):
        x_slice = x_slice.to(sd)
    elif fp_in_idx is None and x_slice.dtype != sd:
        x_slice = x.new_empty((0,), dtype=sd)
    return x_slice, codes, nonfinite


def quantize_activate(x, qparams, bits, signed, bn_scale=None, bn_shift=None, relu=False, fp_in_idx=None,
                      slice_dtype=None):
    """:func:`quantize_activate_flagged` without the flag: the op contract's two outputs."""
    return quantize_activate_flagged(x, qparams, bits, signed, bn_scale, bn_shift, relu, fp_in_idx, slice_dtype)[:2]


def qconv2d(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding, dilation, groups,
            relu=False, fp_out=None, fp_out_idx=None, requant_qparams=None, requant_bits=4, requant_signed=False,
            out_dtype=torch.float32, residual=None):
    """The integer conv (oneDNN, u8 x s8, int32 accumulation) with the hybrid epilogue; the
    semantics of :func:`hybridops.ops.reference.qconv2d` on this backend's code format.

    ``residual``: ``(N, Ho, Wo, C_out)`` in ``out_dtype`` (any strides), added in the epilogue
    before the ReLU as the unfused model adds it: ``relu(y + residual)`` with ``y`` rounded to
    ``out_dtype`` first (float outputs only; ``hybridops::hybrid_layer``'s residual layers)."""
    if residual is not None and out_dtype not in (torch.float32, torch.bfloat16):
        # (our epilogue writes fp32 or bf16: other dtypes round first, then add as torch does)
        y = qconv2d(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding, dilation,
                    groups, False, fp_out, fp_out_idx, None, requant_bits, requant_signed, out_dtype)
        y = y.add_(residual)
        return y.relu_() if relu else y
    zp = zero_point(bits_a, a_signed)
    cin_g = in_channels // groups
    c_out, kh, kw, _ = w_packed.shape
    stride, pad_sym, extra, out_hw, crop = _geometry(x_codes.shape[1], x_codes.shape[2], kh, kw, list(stride),
                                                      padding, dilation)
    xc = x_codes if x_codes.is_contiguous() else x_codes.contiguous()
    x = _pad_codes(xc.permute(0, 3, 1, 2), extra, zp)  # NCHW view of NHWC memory: channels_last
    if x.shape[0] == 0:  # empty batch: oneDNN rejects zero-sized tensors
        ho, wo = out_hw
        dt = torch.uint8 if requant_qparams is not None else out_dtype
        return x_codes.new_empty((0, ho, wo, c_out), dtype=dt)
    sc = scale if scale.dtype == torch.float32 else scale.to(torch.float32)
    sc = sc if sc.is_contiguous() else sc.contiguous()
    # Signed codes on a grouped or rewritten (explicitly padded / restrided) geometry: no zero point.
    # 8-bit codes where oneDNN's pairs of products saturate: signed ones without the zero point
    # (magnitudes <= 127), unsigned ones split into nibbles.
    saturating = _may_saturate(bits_a, bits_w)
    zp_free = bool(zp) and (groups > 1 or crop or any(extra) or saturating)
    if out_dtype == torch.int32 or zp_free or saturating:
        if zp_free:
            acc = _signed_grouped_acc(x, w_packed, in_channels, bits_a, bits_w, stride, pad_sym, dilation, groups, zp)
        elif saturating:
            acc = _nibble_split_acc(x, w_packed, in_channels, bits_w, stride, pad_sym, dilation, groups)
        else:
            acc = _int32_acc(x, w_packed, in_channels, bits_a, a_signed, bits_w, stride, pad_sym, dilation, groups, zp)
        acc = acc[:, : out_hw[0], : out_hw[1]].contiguous() if crop else acc
        if out_dtype == torch.int32:
            return acc
        y0 = acc.to(torch.float32) * sc  # the reference's f32(acc) * scale
        return _epilogue(y0, bias, fp_out, fp_out_idx, relu, requant_qparams, requant_bits, requant_signed, out_dtype,
                         residual)
    # (A residual goes through our epilogue, not oneDNN's sum post-op: that post-op writes into
    # its accumulator, so into a copy of the residual, and measured 1.6x our conv + epilogue on a
    # 64x56x56 layer, 1 thread; a bf16 output also rounds the layer before the add, which no
    # post-op does.)
    if fp_out is None and requant_qparams is None and residual is None and out_dtype in (torch.float32,
                                                                                          torch.bfloat16):
        # One oneDNN call: acc * scale + bias, ReLU as a post-op, written in the output dtype.
        b = None if bias is None else bias.to(torch.float32)
        y = _int_conv_f32(x, w_packed, bits_w, cin_g, groups, sc, b, stride, pad_sym, dilation, zp, relu, out_dtype)
        return (_crop(y, out_hw) if crop else y).permute(0, 2, 3, 1)
    # oneDNN: y0 = f32(acc) * scale (exact, one multiply); ours: + bias, + FP branch, ReLU, codes.
    y0 = _int_conv_f32(x, w_packed, bits_w, cin_g, groups, sc, None, stride, pad_sym, dilation, zp, False,
                       torch.float32)
    y0 = (_crop(y0, out_hw) if crop else y0).permute(0, 2, 3, 1)
    return _epilogue(y0, bias, fp_out, fp_out_idx, relu, requant_qparams, requant_bits, requant_signed, out_dtype,
                     residual)


def _epilogue(y0, bias, fp_out, fp_out_idx, relu, requant_qparams, requant_bits, requant_signed, out_dtype,
              residual=None):
    """Ours, one pass over y0 = f32(acc) * scale (NHWC): + bias, + FP branch, + residual, ReLU,
    codes / float."""
    if requant_qparams is not None:
        return _C.epilogue(y0, bias, fp_out, fp_out_idx, relu, 2, requant_qparams, requant_bits, requant_signed,
                           zero_point(requant_bits, requant_signed), None)
    mode = 1 if out_dtype == torch.bfloat16 else 0
    r = None if residual is None else residual.contiguous()  # (an NHWC view of channels_last: no copy)
    y = _C.epilogue(y0, bias, fp_out, fp_out_idx, relu, mode, None, 0, False, 0, r)
    return y if out_dtype in (torch.float32, torch.bfloat16) else y.to(out_dtype)


# ----------------------------------------------------------------------------- the pruned FP branch
def bf16_supported() -> bool:
    """Whether oneDNN runs bfloat16 convolutions on this CPU (AVX-512 BF16 / AMX-BF16, or the
    emulation on AVX-512 BW/VL/DQ / AVX-NE-CONVERT)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _fp_compute_dtype(name: str, trainable: str, x: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor], compute_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The checks of the pruned branch's prepacked float ops (``fp_conv2d``, ``fp_linear``):
    no autograd, float32 or bfloat16, bf16 units present. Returns the compute dtype."""
    if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        raise RuntimeError(f"{name} is the no-grad inference path (prepacked weights have no autograd); call it "
                           f"under torch.no_grad() or use {trainable} when training the pruned branch.")
    dt = compute_dtype or x.dtype
    if dt not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{name} computes in float32 or bfloat16, got {dt}.")
    if dt == torch.bfloat16 and not bf16_supported():
        raise RuntimeError(f"{name} in bfloat16 needs a CPU with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT, which this "
                           "one lacks; compute in float32.")
    return dt


def fp_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
              padding_tblr: Sequence[int], dilation: Sequence[int], groups: int,
              compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The pruned full-precision branch (inference, no autograd): ``conv2d(x, weight, bias)`` on
    oneDNN with ``weight`` reordered once into oneDNN's blocked layout (:mod:`.derived`: an online
    update's optimizer step bumps the weight's version, so the next call re-packs).

    x: ``(N, C, H, W)`` float32 / bfloat16, best channels_last (the NCHW view of an NHWC slice
    from :func:`quantize_activate` is exactly that). ``padding_tblr``: (top, bottom, left, right).
    ``compute_dtype``: float32 or bfloat16 (default ``x.dtype``); bf16 runs on AMX-BF16.
    Returns ``(N, C_out, Ho, Wo)`` channels_last in ``compute_dtype``: ``.permute(0, 2, 3, 1)`` is
    the contiguous NHWC ``fp_out`` that :func:`qconv2d` takes.
    """
    dt = _fp_compute_dtype("fp_conv2d", "F.conv2d", x, weight, bias, compute_dtype)
    stride, pad_sym, extra, out_hw, crop = _geometry(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3],
                                                      list(stride), padding_tblr, dilation)
    if x.dtype != dt:
        x = x.to(dt)
    if any(extra):
        t, b, l, r = extra
        x = F.pad(x, (l, r, t, b))
    if not x.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    if x.shape[0] == 0:  # oneDNN rejects zero-sized tensors
        return x.new_empty((0, weight.shape[0], *out_hw)).contiguous(memory_format=torch.channels_last)
    # Packed for this input size: without it oneDNN may pick a blocked layout the convolution does
    # not run on (seen on AVX2: Acdb24a packed, Acdb16a run), and every call re-orders the weight
    # (5 ms for a 205x512 1x1 conv whose product takes 0.1 ms).
    key = (dt, tuple(stride), tuple(pad_sym), tuple(dilation), groups, tuple(x.shape))
    w = cached("onednn_float_weight", (weight,), key, lambda: torch._C._nn.mkldnn_reorder_conv2d_weight(
        weight.detach().to(dt).contiguous().to_mkldnn(), list(pad_sym), list(stride), list(dilation), groups,
        list(x.shape)))
    b = None
    if bias is not None:
        b = cached("onednn_float_bias", (bias,), dt, lambda: bias.detach().to(dt).contiguous())
    y = _fconv(x, w, b, list(pad_sym), list(stride), list(dilation), groups, "none", [], "")
    return _crop(y, out_hw) if crop else y


def fp_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The pruned full-precision branch of a ``Linear`` (inference, no autograd): ``x (M, C) @
    weight^T + bias`` on oneDNN's matmul with ``weight`` (``(K, C)`` or a deployed layer's
    ``(K, C, 1, 1)``: the cache is keyed by the tensor itself, so pass the same one every call, not
    a fresh view) reordered once (:mod:`.derived`).
    In float32 it takes 0.39-0.45x the time of ``F.linear`` at ViT-B shapes (197 rows, 77-307 of
    768-3072 features kept) on AVX-512 VNNI; in bfloat16 the same as ``F.linear`` (both oneDNN).
    Returns ``(M, K)`` in ``compute_dtype`` (default ``x.dtype``: float32 or bfloat16)."""
    dt = _fp_compute_dtype("fp_linear", "F.linear", x, weight, bias, compute_dtype)
    x = x.to(dt) if x.dtype != dt else x
    x = x if x.is_contiguous() else x.contiguous()
    if x.shape[0] == 0:  # oneDNN rejects zero-sized tensors
        return x.new_empty((0, weight.shape[0]))
    w = cached("onednn_linear_weight", (weight,), dt,
               lambda: weight.detach().flatten(1).to(dt).contiguous().to_mkldnn())
    b = None
    if bias is not None:
        b = cached("onednn_float_bias", (bias,), dt, lambda: bias.detach().to(dt).contiguous())
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


# ----------------------------------------------------------------------------- ISA report
_isa_cache: Optional[str] = None


def isa() -> str:
    """The oneDNN implementation of a small int8 convolution on this machine, as oneDNN's verbose
    output names it (for example ``brg_conv_fwd:avx10_1_512_amx``: AMX; ``...avx512_core_vnni``:
    VNNI); measured once in a subprocess because ONEDNN_VERBOSE is read at start-up."""
    global _isa_cache
    if _isa_cache is None:
        code = ("import torch\n"
                "w=torch.randint(-7,8,(32,32,3,3),dtype=torch.int8)\n"
                "p=torch.ops.onednn.qconv_prepack(w,torch.ones(32),1.0,0,[1,1],[1,1],[1,1],1,None)\n"
                "x=torch.randint(0,15,(1,32,8,8),dtype=torch.uint8).contiguous(memory_format=torch.channels_last)\n"
                "torch.ops.onednn.qconv2d_pointwise(x,1.0,0,p,torch.ones(32),torch.zeros(32,dtype=torch.int64),None,"
                "[1,1],[1,1],[1,1],1,1.0,0,torch.float32,'none',[],'')\n")
        env = dict(os.environ, ONEDNN_VERBOSE="1")
        try:
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                 timeout=120).stdout
            m = re.findall(r"exec,cpu,convolution,([^,]+),", out)
            _isa_cache = m[-1] if m else "unknown (no oneDNN verbose line)"
        except Exception as e:  # the report says why instead of failing a benchmark
            _isa_cache = f"unknown ({type(e).__name__})"
    return _isa_cache
