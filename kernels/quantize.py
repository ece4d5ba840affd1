"""Elementwise quantizer kernels: ``fake_quantize`` and the fused ``quantize_activate``.

Both are memory-bound single passes; their codes are bitwise equal to
:mod:`hybridops.ops.reference` (see :mod:`._common` for why FMA contraction is disabled).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .packing import levels, packed_size

from .derived import cached
from ._common import LAUNCH_OPTS, check_device, check_grid, check_int32_span, pack_pairs, quant_codes

# 1024 elements per program: measured fastest for this pass on H100 (docs/gpu.md).
_BLOCK = 1024


# ----------------------------------------------------------------------------- fake_quantize
@triton.jit
def _fake_quantize_kernel(x_ptr, out_ptr, qp_ptr, numel, LEVELS: tl.constexpr, INV_LEVELS: tl.constexpr,
                          SIGNED: tl.constexpr,
                          F64: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if F64:
        t = x.to(tl.float64)
        alpha = tl.load(qp_ptr).to(tl.float64)
        beta = tl.load(qp_ptr + 1).to(tl.float64)
        y = quant_codes(t, alpha, beta, LEVELS, SIGNED).to(tl.float64) * INV_LEVELS
        y = tl.where(t - t == 0.0, y, float("nan"))
    else:
        t = x.to(tl.float32)
        alpha = tl.load(qp_ptr)
        beta = tl.load(qp_ptr + 1)
        # The reference multiplies by the reciprocal (as torch does for a scalar divisor on CUDA),
        # which also avoids fp32 '/', an approximate div.full on NVIDIA GPUs.
        y = quant_codes(t, alpha, beta, LEVELS, SIGNED).to(tl.float32) * INV_LEVELS
        y = tl.where(t - t == 0.0, y, float("nan"))
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def fake_quantize(x: torch.Tensor, qparams: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """``code / levels`` for every element of ``x`` (eq 6-7 if ``signed``, else eq 8-9); NaN where
    ``x`` is NaN or infinite (``t - t`` is 0 exactly for finite ``t``), as float PyTorch would
    propagate it.

    x: any shape and strides, float16/bfloat16/float32 (computed in fp32) or float64 (in fp64);
    qparams: ``float32 (2,) = [alpha, beta]``. Returns a tensor like ``torch.empty_like(x)``
    (same dtype, and the same strides when ``x`` is dense).
    """
    check_device(x, "x")
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    # One flat pass over storage needs x in out's element order; only non-dense views get copied.
    src = x if x.stride() == out.stride() else torch.empty_like(out).copy_(x)
    grid = (triton.cdiv(x.numel(), _BLOCK),)
    check_grid(grid, "fake_quantize")  # offsets are int64 in the kernel: only the grid can overflow
    _fake_quantize_kernel[grid](src, out, qparams.contiguous(), x.numel(), LEVELS=levels(bits, signed), INV_LEVELS=1.0 / levels(bits, signed),
                                SIGNED=signed, F64=x.dtype == torch.float64, BLOCK=_BLOCK, **LAUNCH_OPTS)
    return out


# ----------------------------------------------------------------------------- quantize_activate
@triton.jit
def _activate(x, c, c_ok, scale_ptr, shift_ptr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
              RELU: tl.constexpr):
    """``t = relu?(x * bn_scale[c] + bn_shift[c])`` in fp32 (reference order), ``c`` the
    channel of each column of ``x``."""
    t = x.to(tl.float32)
    if HAS_SCALE:
        t = t * tl.load(scale_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        t = t + tl.load(shift_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if RELU:
        t = tl.where(t < 0.0, 0.0, t)  # keeps NaN, like torch.relu
    return t


@triton.jit
def _quantize_activate_kernel(
    x_ptr, codes_ptr, slice_ptr, qp_ptr, scale_ptr, shift_ptr, slot_ptr, keep_ptr, repeat_ptr, flag_ptr,
    C, HW, sxn, sxp, sxc, CODE_ROW, SLICE_ROW, C_TILES,
    LEVELS: tl.constexpr, SIGNED: tl.constexpr, NIBBLE: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, RELU: tl.constexpr, HAS_SLICE: tl.constexpr, FLAG: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One tile of ``BLOCK_P`` pixels of image ``program_id(1)``.

    x is addressed as ``x[n, c, p] = x_ptr[n*sxn + p*sxp + c*sxc]`` with ``p = h*W + w``, which
    covers NCHW (``sxp = 1``) and channels_last (``sxc = 1``) alike.

    * ``program_id(2) < C_TILES``: ``BLOCK_C`` (even) channels, read once, give the codes
      (``uint8 (N, HW, CODE_ROW)``) and, through the inverse map ``slot[c]`` (a position of c in
      fp_in_idx, or -1), the float slice ``(N, HW, SLICE_ROW)``.
    * the programs after them fill the slice positions ``k`` that the inverse map cannot hold:
      ``fp_in_idx`` repeats a channel when a grouped pruned branch reads it for several kept
      outputs (``repeat[k] = 1``). Only those channels are read a second time; without repeats
      these programs exit after one small load.
    * ``FLAG``: ``flag_ptr[0]`` (int32, zeroed) is set to 1 when an activated value of the tile is
      NaN or infinite, which no code can carry (one atomic, only when it happens).
    """
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HW
    pix = n * HW + p
    x_pix = x_ptr + n * sxn + p[:, None] * sxp
    if pid_c < C_TILES:
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        mask = p_ok[:, None] & c_ok[None, :]
        x = tl.load(x_pix + c[None, :] * sxc, mask=mask, other=0.0)
        t = _activate(x, c, c_ok, scale_ptr, shift_ptr, HAS_SCALE, HAS_SHIFT, RELU)
        q = quant_codes(t, tl.load(qp_ptr), tl.load(qp_ptr + 1), LEVELS, SIGNED)
        if FLAG:
            # t - t is 0 exactly for finite t, NaN for NaN and both infinities
            bad = tl.max(tl.max(tl.where(mask & (t - t != 0.0), 1, 0), axis=1), axis=0)
            if bad > 0:
                tl.atomic_max(flag_ptr, 1)
        # The channel past an odd C pads its byte with a zero code (packing format).
        q = tl.where(c_ok[None, :], q, 0)
        if NIBBLE:
            j = pid_c * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)
            tl.store(codes_ptr + pix[:, None] * CODE_ROW + j[None, :], pack_pairs(q, BLOCK_P, BLOCK_C),
                     mask=p_ok[:, None] & (j < CODE_ROW)[None, :])
        else:
            tl.store(codes_ptr + pix[:, None] * CODE_ROW + c[None, :], (q & 0xFF).to(tl.uint8), mask=mask)
        if HAS_SLICE:
            slot = tl.load(slot_ptr + c, mask=c_ok, other=-1)
            tl.store(slice_ptr + pix[:, None] * SLICE_ROW + slot[None, :], t.to(slice_ptr.dtype.element_ty),
                     mask=mask & (slot >= 0)[None, :])
    else:
        k = (pid_c - C_TILES) * BLOCK_C + tl.arange(0, BLOCK_C)
        rep = tl.load(repeat_ptr + k, mask=k < SLICE_ROW, other=0) != 0
        if tl.max(rep.to(tl.int32), axis=0) > 0:
            rc = tl.load(keep_ptr + k, mask=rep, other=0)
            r_mask = p_ok[:, None] & rep[None, :]
            rx = tl.load(x_pix + rc[None, :] * sxc, mask=r_mask, other=0.0)
            rt = _activate(rx, rc, rep, scale_ptr, shift_ptr, HAS_SCALE, HAS_SHIFT, RELU)
            tl.store(slice_ptr + pix[:, None] * SLICE_ROW + k[None, :], rt.to(slice_ptr.dtype.element_ty),
                     mask=r_mask)


def _hw_stride(x: torch.Tensor) -> Optional[int]:
    """The stride of the merged (H, W) pixel index of ``x (N, C, H, W)``, or None when H and W
    cannot be merged into one strided dimension."""
    _, _, h, w = x.shape
    if h == 1:
        return x.stride(3)
    if w == 1:
        return x.stride(2)
    return x.stride(3) if x.stride(2) == w * x.stride(3) else None


def inverse_index(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Dense ``int32 (size,)`` map ``slot[idx[j]] = j``, -1 elsewhere. Where ``idx`` repeats a
    value, ``slot`` holds one of its positions."""
    slot = torch.full((size,), -1, dtype=torch.int32, device=idx.device)
    slot[idx.to(torch.long)] = torch.arange(idx.shape[0], dtype=torch.int32, device=idx.device)
    return slot


def _slot_and_repeats(keep: torch.Tensor, channels: int):
    """The inverse map of ``keep`` and an int8 flag per position it does not point back to (the
    repeats, found without a host sync)."""
    slot = inverse_index(keep, channels)
    back = torch.arange(keep.shape[0], dtype=torch.int32, device=keep.device)
    return slot, (slot[keep.to(torch.long)] != back).to(torch.int8)


def quantize_activate_flagged(
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
    """:func:`quantize_activate`'s ``(x_slice, codes)`` and ``nonfinite``, an ``int32 (1,)`` tensor
    on x's device, 1 when an activated value was NaN or infinite (found in the same pass)."""
    flag = torch.zeros((1,), dtype=torch.int32, device=x.device)
    x_slice, codes = _quantize_activate(x, qparams, bits, signed, bn_scale, bn_shift, relu, fp_in_idx, slice_dtype,
                                        flag)
    return x_slice, codes, flag


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
    """Fused quantize-activate in one read of ``x``; see
    :func:`hybridops.ops.reference.quantize_activate`.

    x: ``(N, C, H, W)`` float, NCHW, channels_last or any view whose H and W merge into one
    strided dimension (other views are copied first). ``t = relu?(x * bn_scale[c] + bn_shift[c])``
    in fp32. Returns ``(x_slice, codes)``: ``x_slice (N, H, W, len(fp_in_idx))`` in ``slice_dtype``
    (default ``x.dtype``; an empty ``(0,)`` tensor without ``fp_in_idx``, which may repeat
    channels) and ``codes uint8 (N, H, W, packed(C))`` (eq 8-9, or eq 6-7 if ``signed``).
    """
    return _quantize_activate(x, qparams, bits, signed, bn_scale, bn_shift, relu, fp_in_idx, slice_dtype, None)


def _quantize_activate(x, qparams, bits, signed, bn_scale, bn_shift, relu, fp_in_idx, slice_dtype,
                       flag: Optional[torch.Tensor]):
    check_device(x, "x")
    n, c, h, w = x.shape
    sdt = slice_dtype or x.dtype
    codes = torch.empty((n, h, w, packed_size(c, bits)), dtype=torch.uint8, device=x.device)
    if fp_in_idx is None:
        x_slice = torch.empty((0,), dtype=sdt, device=x.device)
    else:
        x_slice = torch.empty((n, h, w, fp_in_idx.shape[0]), dtype=sdt, device=x.device)
    if x.numel() == 0:
        return x_slice, codes
    sxp = _hw_stride(x)
    if sxp is None:
        x = x.contiguous()
        sxp = 1
    # Kernels get real tensors for every pointer, even unused ones: an empty tensor's null
    # pointer is not one.
    has_slice = x_slice.numel() > 0
    kp = x_slice.shape[-1] if has_slice else 0
    if has_slice:
        keep = fp_in_idx.contiguous()
        slot, repeat = cached("slot_and_repeats", (keep,), c, lambda: _slot_and_repeats(keep, c))
    else:
        keep = slot = repeat = codes
    # Pairs of channels per tile; most channels per tile when they are contiguous in memory
    # (channels_last), most pixels when the pixels are (NCHW).
    block_c = min(triton.next_power_of_2(c + c % 2), 64 if x.stride(1) == 1 else 4)
    block_c = max(block_c, 2)
    block_p = _BLOCK // block_c
    c_tiles = triton.cdiv(c, block_c)
    grid = (triton.cdiv(h * w, block_p), n, c_tiles + triton.cdiv(kp, block_c))
    # One program row per image (grid y) and per channel tile (z); offsets inside an image are
    # int32 in the kernel (the image's base offset is int64).
    check_grid(grid, "quantize_activate")
    check_int32_span((h * w - 1) * abs(sxp) + (c - 1) * abs(x.stride(1)) + 1, "x: one image")
    _quantize_activate_kernel[grid](
        x, codes, x_slice if has_slice else codes, qparams.contiguous(),
        bn_scale.contiguous() if bn_scale is not None else x, bn_shift.contiguous() if bn_shift is not None else x,
        slot, keep, repeat, flag if flag is not None else codes,
        c, h * w, x.stride(0), sxp, x.stride(1), codes.shape[3], kp, c_tiles,
        LEVELS=levels(bits, signed), SIGNED=signed, NIBBLE=bits <= 4, HAS_SCALE=bn_scale is not None,
        HAS_SHIFT=bn_shift is not None, RELU=relu, HAS_SLICE=has_slice, FLAG=flag is not None,
        BLOCK_P=block_p, BLOCK_C=block_c, **LAUNCH_OPTS,
    )
    return x_slice, codes
