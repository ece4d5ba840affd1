"""Packed low-bit implicit-GEMM convolution with the hybrid epilogue (docs/kernels.md).

GEMM view: ``M = N * Ho * Wo`` output pixels, ``N = C_out``, ``K = KH * KW * C_in/groups``.
Codes are unpacked in registers to int8 and multiplied on the int8 tensor cores (int32
accumulation), both operands K-major as they are stored.

Operands. Weights are made compute-ready once per weight tensor (:func:`compute_ready_weight`,
cached): int8, one code per byte, channels zero-padded to :data:`tiles.K_PAD`, so the B tile goes
from global to shared memory untouched and needs no channel mask. Nibble-packed activation codes
are split with SWAR bit operations (four bytes per 32-bit register, ``_common.unpack_nibbles``) and
interleaved back into channel order, so that a K step of ``BLOCK_K`` channels is one ``tl.dot``
whatever the bit widths.

Tiles. One config per shape from the shipped table of :mod:`.tiles` (no autotuning unless
``HYBRIDOPS_AUTOTUNE=1``), so a cold process compiles one kernel per layer specialisation.

Groups. Output-channel tiles are aligned to ``BLOCK_N`` (even, so that re-quantized nibble
pairs ``2j, 2j+1`` land in one tile and the epilogue writes whole bytes); a tile that straddles
groups loops over them, masking the weight rows of the other groups.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .packing import levels, packed_size, unpack_codes
from .geometry import conv_out_size

from . import tiles
from ._common import (INTERPRET, LAUNCH_OPTS, check_device, check_grid, check_int32_span, loop_range, pack_pairs,
                      quant_codes, unpack_nibble, unpack_nibbles)
from .derived import cached
from .quantize import inverse_index

# Output modes of the epilogue.
_OUT_INT32, _OUT_FLOAT, _OUT_CODES = 0, 1, 2


def _autotune_configs():
    """The configs ``HYBRIDOPS_AUTOTUNE=1`` times: the shipped tiles (all spill-free); under the
    interpreter only its own tile (nothing can be timed there)."""
    pool = (tiles.INTERPRETER_TILE,) if INTERPRET else tiles.SHIPPED
    return [triton.Config(t.meta(), num_warps=t.num_warps, num_stages=t.num_stages) for t in pool]


def _prune(configs, named_args, **kwargs):
    """Drop tiles much wider than the problem (few input channels per group, few output
    channels): they only multiply zeros. The narrowest ones always survive."""
    meta = {**named_args, **kwargs}
    k_need = max(triton.next_power_of_2(meta["CIN_G"]), 32)
    n_need = max(triton.next_power_of_2(meta["C_OUT"]), 64)
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= k_need and c.kwargs["BLOCK_N"] <= n_need]
    return kept or configs


@triton.jit
def _byte_codes(row, ok, ch, c_lim, sc, K_FULL: tl.constexpr):
    """int8 one-byte codes at channels ``ch`` (a ``(1, BLOCK_K)`` row) of the pixels ``row`` (a
    ``(BLOCK_M, 1)`` column of pointers, ``ok`` its mask); channels ``>= c_lim`` read as zero
    codes, unless ``K_FULL`` says that this K step lies below ``c_lim``."""
    if K_FULL:
        mask = ok
    else:
        mask = ok & (ch < c_lim)
    return tl.load(row + ch * sc, mask=mask, other=0).to(tl.int8, bitcast=True)


@triton.jit
def _nibble_codes(row, ok, cb, k0, CIN_G, sc, A_SIGNED: tl.constexpr, A_ALIGNED: tl.constexpr,
                  SWAR: tl.constexpr, K_FULL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """int8 codes ``(BLOCK_M, BLOCK_K)`` of the nibble-packed channels ``cb + i`` (``i <
    BLOCK_K``; ``k0`` = ``cb`` within the group) of the pixels ``row``, in channel order."""
    if A_ALIGNED:
        # cb is even: byte j holds channels cb + 2j (low nibble) and cb + 2j + 1 (high). A byte
        # whose high nibble is past the group's channels (odd C_in: the zero pad nibble) still
        # loads: the compute-ready weights are zero there.
        jb = tl.arange(0, BLOCK_K // 2)
        if K_FULL:
            mask = ok
        else:
            mask = ok & ((k0 + 2 * jb) < CIN_G)[None, :]
        v = tl.load(row + (cb // 2 + jb)[None, :] * sc, mask=mask, other=0)
        lo, hi = unpack_nibbles(v, A_SIGNED, SWAR)
        return tl.reshape(tl.join(lo, hi), (BLOCK_M, BLOCK_K))
    else:
        # A group starting mid-byte (odd C_in per group, grouped): one load per code, rare.
        i = tl.arange(0, BLOCK_K)
        ch = cb + i
        if K_FULL:
            mask = ok
        else:
            mask = ok & ((k0 + i) < CIN_G)[None, :]
        v = tl.load(row + (ch // 2)[None, :] * sc, mask=mask, other=0).to(tl.int32)
        return unpack_nibble(v, ((ch % 2) * 4)[None, :], A_SIGNED)


@triton.jit
def _k_step(acc, x_img, w_rows, ih0, iw0, m_ok, w_ok, kk, tap, k0, c0, H, W, CIN_G, sxh, sxw, sxc, swh, sww, KW,
            DIL_H, DIL_W, A_NIB: tl.constexpr, A_SIGNED: tl.constexpr, A_ALIGNED: tl.constexpr, SWAR: tl.constexpr,
            MASK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc`` plus one K step: tap ``tap``, channels ``k0 .. k0 + BLOCK_K`` of the group starting
    at channel ``c0``; ``MASK_K``: the step reaches past C_in per group (its activation loads are
    masked per channel)."""
    kh = tap // KW
    kw = tap % KW
    ih = ih0 + kh * DIL_H
    iw = iw0 + kw * DIL_W
    a_ok = (m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, None]
    a_row = (x_img + ih * sxh + iw * sxw)[:, None]
    # The B tile goes to the MMA as stored: one int8 code per byte, zero past C_in per group
    # (padded to K_PAD), so only the tile's output columns are masked.
    b = tl.load((w_rows + kh * swh + kw * sww)[None, :] + (k0 + kk)[:, None], mask=w_ok, other=0)
    if A_NIB:
        a = _nibble_codes(a_row, a_ok, c0 + k0, k0, CIN_G, sxc, A_SIGNED, A_ALIGNED, SWAR, not MASK_K, BLOCK_M,
                          BLOCK_K)
    else:
        a = _byte_codes(a_row, a_ok, (c0 + k0 + kk)[None, :], c0 + CIN_G, sxc, not MASK_K)
    return tl.dot(a, b, acc, out_dtype=tl.int32)


@triton.jit
def _qconv_kernel(
    x_ptr, w_ptr, out_ptr, scale_ptr, bias_ptr, fp_ptr, slot_ptr, rq_ptr,
    M, M_BUCKET, H, W, HO, WO, C_OUT, CIN_G, COUT_G, OUT_ROW,
    sxn, sxh, sxw, sxc, swo, swh, sww, sfn, sfh, sfw, sfk,
    STRIDE_H, STRIDE_W, PAD_T, PAD_L, DIL_H, DIL_W, KH, KW,
    xf_ptr, wf_ptr, fb_ptr, CF, sxfn, sxfh, sxfw, swfo, swfh, swfw,
    A_NIB: tl.constexpr, A_SIGNED: tl.constexpr, A_ALIGNED: tl.constexpr, SWAR: tl.constexpr,
    OUT_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_FP: tl.constexpr,
    RELU: tl.constexpr, RQ_LEVELS: tl.constexpr, RQ_SIGNED: tl.constexpr, RQ_NIB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_FULL: tl.constexpr,
    SPLIT_K: tl.constexpr = 1, ITERS_PER_SPLIT=0,
    FP_FUSED: tl.constexpr = False, FP_IEEE: tl.constexpr = False, BLOCK_KF: tl.constexpr = 16,
):
    """One ``BLOCK_M x BLOCK_N`` tile of ``out (N, Ho, Wo, OUT_ROW)``.

    Split-K (``SPLIT_K > 1``, ungrouped convs, ``OUT_MODE`` 0): program ``(m, n, s)`` runs the
    iterations ``[s * ITERS_PER_SPLIT, (s + 1) * ITERS_PER_SPLIT)`` of the tap x channel-chunk loop
    and adds its int32 partial sums atomically into ``out`` (zeroed by the launcher); integer sums
    make the result exact and independent of the order the splits land in.

    Input codes ``x[n, h, w, byte]`` are addressed through their strides (``sx*``, in bytes);
    weights are compute-ready (:func:`compute_ready_weight`: int8 ``w[co, kh, kw, c]``, channels
    contiguous and zero-padded to :data:`tiles.K_PAD`, strides ``sw*``); the pruned branch
    ``fp[n, ho, wo, j]`` through ``sf*`` and the inverse map ``slot[co]`` (= j, or -1 for channels
    it does not feed). ``OUT_MODE``: 0 int32 accumulators, 1 float ``y``, 2 packed codes of ``y``
    (``_OUT_INT32/_FLOAT/_CODES``).

    ``FP_FUSED`` (ungrouped, one K split, a float output mode): the pruned branch is computed here
    instead of read from ``fp``: a second K loop over the float slice ``xf[n, h, w, c]`` (``CF``
    channels, strides ``sxf*``) and the branch's weights scattered to output rows,
    ``wf[co, kh, kw, c]`` (zero rows for channels the branch does not feed, strides ``swf*``),
    into an fp32 accumulator, plus the scattered bias ``fb[co]``; ``FP_IEEE``: fp32 operands are
    multiplied in fp32, not TF32.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    img = offs_m // (HO * WO)
    rem = offs_m % (HO * WO)
    oh = rem // WO
    ow = rem % WO
    ih0 = oh * STRIDE_H - PAD_T
    iw0 = ow * STRIDE_W - PAD_L
    x_img = x_ptr + img.to(tl.int64) * sxn

    n0 = pid_n * BLOCK_N
    co = n0 + tl.arange(0, BLOCK_N)
    co_ok = co < C_OUT
    w_rows = w_ptr + co.to(tl.int64) * swo
    kk = tl.arange(0, BLOCK_K)

    # Iterations: taps x full K steps first, then (C_in per group not a multiple of BLOCK_K) one
    # partial step per tap; split-K cuts this sequence into ranges of ITERS_PER_SPLIT.
    n_full = CIN_G // BLOCK_K
    main_end = KH * KW * n_full
    MID_BYTE: tl.constexpr = A_NIB and not A_ALIGNED
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    g_first = n0 // COUT_G
    g_last = (tl.minimum(n0 + BLOCK_N, C_OUT) - 1) // COUT_G
    for g in loop_range(g_first, g_last + 1):
        c0 = g * CIN_G
        w_ok = (co_ok & (co >= g * COUT_G) & (co < (g + 1) * COUT_G))[None, :]
        it_lo = 0
        it_hi = KH * KW * tl.cdiv(CIN_G, BLOCK_K)
        if SPLIT_K > 1:
            it_lo = pid_k * ITERS_PER_SPLIT
            it_hi = tl.minimum(it_lo + ITERS_PER_SPLIT, it_hi)
        if MID_BYTE:
            # Groups starting mid-byte load code by code anyway: one loop, masked throughout and not
            # pipelined (the main / tail split below, and pipelining, spilled registers here).
            n_chunks = tl.cdiv(CIN_G, BLOCK_K)
            for it in loop_range(it_lo, it_hi, num_stages=1):
                acc = _k_step(acc, x_img, w_rows, ih0, iw0, m_ok, w_ok, kk, it // n_chunks, (it % n_chunks) * BLOCK_K,
                              c0, H, W, CIN_G, sxh, sxw, sxc, swh, sww, KW, DIL_H, DIL_W, A_NIB, A_SIGNED, A_ALIGNED,
                              SWAR, True, BLOCK_M, BLOCK_K)
        else:
            # Full K steps, taps and channel chunks in one flat loop so that the compiler pipelines
            # all of it: channels are never masked here (only the image border): vector loads.
            for it in loop_range(it_lo, tl.minimum(it_hi, main_end)):
                acc = _k_step(acc, x_img, w_rows, ih0, iw0, m_ok, w_ok, kk, it // n_full, (it % n_full) * BLOCK_K, c0,
                              H, W, CIN_G, sxh, sxw, sxc, swh, sww, KW, DIL_H, DIL_W, A_NIB, A_SIGNED, A_ALIGNED, SWAR,
                              False, BLOCK_M, BLOCK_K)
            if not K_FULL:
                # One masked step per tap, not pipelined: a second pipeline's buffers made the
                # small tiles spill, and this loop is short.
                for it in loop_range(tl.maximum(it_lo, main_end), it_hi, num_stages=1):
                    acc = _k_step(acc, x_img, w_rows, ih0, iw0, m_ok, w_ok, kk, it - main_end, n_full * BLOCK_K, c0,
                                  H, W, CIN_G, sxh, sxw, sxc, swh, sww, KW, DIL_H, DIL_W, A_NIB, A_SIGNED, A_ALIGNED,
                                  SWAR, True, BLOCK_M, BLOCK_K)

    f_fused = acc  # placeholder when the branch is not fused (the epilogue then reads fp)
    if FP_FUSED:
        f_fused = _fp_branch(xf_ptr, wf_ptr, img, ih0, iw0, m_ok, co, co_ok, H, W, CF, sxfn, sxfh, sxfw, swfo, swfh,
                             swfw, DIL_H, DIL_W, KH, KW, FP_IEEE, BLOCK_M, BLOCK_N, BLOCK_KF)
        f_fused = f_fused + tl.load(fb_ptr + co, mask=co_ok, other=0.0)[None, :]
    if SPLIT_K > 1:
        # int32 offsets (the launcher splits only accumulators of < 2^31 elements) and relaxed
        # order (the epilogue kernel runs after this launch on the stream): fewer registers.
        tl.atomic_add(out_ptr + (offs_m * OUT_ROW)[:, None] + co[None, :], acc, mask=m_ok[:, None] & co_ok[None, :],
                      sem="relaxed")
    else:
        _store_epilogue(acc, offs_m, m_ok, img, oh, ow, co, co_ok, n0, out_ptr, scale_ptr, bias_ptr, fp_ptr, slot_ptr,
                        rq_ptr, OUT_ROW, sfn, sfh, sfw, sfk, f_fused, FP_FUSED, OUT_MODE, HAS_BIAS, HAS_FP, RELU,
                        RQ_LEVELS, RQ_SIGNED,
                        RQ_NIB, BLOCK_M, BLOCK_N)


@triton.jit
def _fp_branch(xf_ptr, wf_ptr, img, ih0, iw0, m_ok, co, co_ok, H, W, CF, sxfn, sxfh, sxfw, swfo, swfh, swfw,
               DIL_H, DIL_W, KH, KW, FP_IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_KF: tl.constexpr):
    """The pruned branch's conv for one tile, in fp32: ``(BLOCK_M, BLOCK_N)`` over the pixels of
    the main loop (``img``, ``ih0``, ``iw0``) and the output channels ``co``. The weights are
    padded to a multiple of ``BLOCK_KF`` channels, so only the slice's channels are masked."""
    xf_img = xf_ptr + img.to(tl.int64) * sxfn
    wf_rows = wf_ptr + co.to(tl.int64) * swfo
    kf = tl.arange(0, BLOCK_KF)
    n_chunks = tl.cdiv(CF, BLOCK_KF)
    accf = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in loop_range(0, KH * KW * n_chunks):
        tap = it // n_chunks
        k0 = (it % n_chunks) * BLOCK_KF
        kh = tap // KW
        kw = tap % KW
        ih = ih0 + kh * DIL_H
        iw = iw0 + kw * DIL_W
        a_ok = (m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, None] & ((k0 + kf) < CF)[None, :]
        a = tl.load((xf_img + ih * sxfh + iw * sxfw)[:, None] + (k0 + kf)[None, :], mask=a_ok, other=0.0)
        b = tl.load((wf_rows + kh * swfh + kw * swfw)[None, :] + (k0 + kf)[:, None], mask=co_ok[None, :], other=0.0)
        if FP_IEEE:
            accf = tl.dot(a, b, accf, input_precision="ieee")
        else:
            accf = tl.dot(a, b, accf)
    return accf


@triton.jit
def _store_epilogue(acc, offs_m, m_ok, img, oh, ow, co, co_ok, n0, out_ptr, scale_ptr, bias_ptr, fp_ptr, slot_ptr,
                    rq_ptr, OUT_ROW, sfn, sfh, sfw, sfk, f_fused, FP_FUSED: tl.constexpr, OUT_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_FP: tl.constexpr, RELU: tl.constexpr, RQ_LEVELS: tl.constexpr, RQ_SIGNED: tl.constexpr,
                    RQ_NIB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store one tile of int32 accumulators ``acc (BLOCK_M, BLOCK_N)`` (pixels ``offs_m``, output
    channels ``co`` from ``n0``) as ``OUT_MODE`` says, through the hybrid epilogue."""
    out_rows = out_ptr + offs_m.to(tl.int64)[:, None] * OUT_ROW
    mask = m_ok[:, None] & co_ok[None, :]
    if OUT_MODE == 0:
        tl.store(out_rows + co[None, :], acc, mask=mask)
    else:
        # Epilogue in the reference's fp32 order: acc * scale + bias, + pruned branch, relu.
        y = acc.to(tl.float32) * tl.load(scale_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_FP:
            slot = tl.load(slot_ptr + co, mask=co_ok, other=-1)
            fp_ok = m_ok[:, None] & (slot >= 0)[None, :]
            if FP_FUSED:
                f = f_fused
            else:
                fp_pix = img.to(tl.int64) * sfn + oh * sfh + ow * sfw
                f = tl.load(fp_ptr + fp_pix[:, None] + slot[None, :] * sfk, mask=fp_ok, other=0.0).to(tl.float32)
            y = tl.where(fp_ok, y + f, y)
        if RELU:
            y = tl.where(y < 0.0, 0.0, y)  # keeps NaN, like torch.relu
        if OUT_MODE == 1:
            tl.store(out_rows + co[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            q = quant_codes(y, tl.load(rq_ptr), tl.load(rq_ptr + 1), RQ_LEVELS, RQ_SIGNED)
            if RQ_NIB:
                # The channel past an odd C_out pads its byte with a zero code.
                q = tl.where(co_ok[None, :], q, 0)
                jb = n0 // 2 + tl.arange(0, BLOCK_N // 2)
                tl.store(out_rows + jb[None, :], pack_pairs(q, BLOCK_M, BLOCK_N),
                         mask=m_ok[:, None] & (jb < OUT_ROW)[None, :])
            else:
                tl.store(out_rows + co[None, :], (q & 0xFF).to(tl.uint8), mask=mask)


@triton.jit
def _split_k_epilogue_kernel(
    acc_ptr, out_ptr, scale_ptr, bias_ptr, fp_ptr, slot_ptr, rq_ptr,
    M, HO, WO, C_OUT, OUT_ROW, sfn, sfh, sfw, sfk,
    OUT_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_FP: tl.constexpr, RELU: tl.constexpr,
    RQ_LEVELS: tl.constexpr, RQ_SIGNED: tl.constexpr, RQ_NIB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The epilogue of a split-K convolution: the summed int32 accumulators ``acc (M, C_OUT)`` to
    ``out`` (float or codes), tile by tile, exactly as the one-pass kernel stores them."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    img = offs_m // (HO * WO)
    rem = offs_m % (HO * WO)
    n0 = tl.program_id(1) * BLOCK_N
    co = n0 + tl.arange(0, BLOCK_N)
    co_ok = co < C_OUT
    acc = tl.load(acc_ptr + offs_m.to(tl.int64)[:, None] * C_OUT + co[None, :], mask=m_ok[:, None] & co_ok[None, :],
                  other=0)
    _store_epilogue(acc, offs_m, m_ok, img, rem // WO, rem % WO, co, co_ok, n0, out_ptr, scale_ptr, bias_ptr, fp_ptr,
                    slot_ptr, rq_ptr, OUT_ROW, sfn, sfh, sfw, sfk, acc, False, OUT_MODE, HAS_BIAS, HAS_FP, RELU, RQ_LEVELS,
                    RQ_SIGNED, RQ_NIB, BLOCK_M, BLOCK_N)


# Only with HYBRIDOPS_AUTOTUNE=1 (tiles.autotune_requested). M_BUCKET (M rounded up to a power
# of two) rather than M keys the tuning: a new batch size or resolution in the same bucket reuses
# the tuned tile instead of re-timing every config.
_TUNE_KEY = ["M_BUCKET", "C_OUT", "CIN_G", "COUT_G", "KH", "KW", "A_NIB", "OUT_MODE"]
_qconv_tuned = triton.autotune(configs=_autotune_configs(), key=_TUNE_KEY,
                               prune_configs_by={"early_config_prune": _prune})(_qconv_kernel)
# Keys tuned in this process (the autotuner's own cache is internal and differs across Triton
# versions): a CUDA-graph capture may launch a tuned key (the autotuner then only looks it up)
# but never time a new one, whose benchmark launches and syncs would break the capture.
_tuned_keys = set()


def _span(shape, strides) -> int:
    """Elements from the first to one past the last of a strided block."""
    return 1 + sum((d - 1) * abs(st) for d, st in zip(shape, strides) if d > 0)


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


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
    split_k: Optional[int] = None,
    _fused: Optional[tuple] = None,
) -> torch.Tensor:
    """Packed low-bit convolution with the hybrid epilogue; see
    :func:`hybridops.ops.reference.qconv2d`. ``split_k``: K splits (:func:`split_count`; None
    lets the launcher decide, ungrouped convs only).

    x_codes: ``uint8 (N, H, W, packed(C_in))``; w_packed: ``uint8 (C_out, KH, KW,
    packed(C_in/groups))`` (any strides); padding ``(top, bottom, left, right)``.
    ``acc = sum(A_q * W_q)`` in int32, then in fp32 ``y = acc * scale[co] + bias[co]``,
    ``y[..., fp_out_idx[j]] += fp_out[..., j]`` (entries of ``fp_out_idx`` distinct), ``relu``.
    Returns NHWC: int32 accumulators (``out_dtype=torch.int32``), ``uint8`` packed codes of
    ``y`` (``requant_qparams`` given, eq 6-9), or ``y`` in ``out_dtype``.

    ``_fused`` (from :func:`hybrid_conv2d`): ``(fp_in, wf, fb)``, the pruned branch computed in the
    kernel (``fp_out`` is then None and ``fp_out_idx`` its index map).
    """
    check_device(x_codes, "x_codes")
    n, h, w, _ = x_codes.shape
    c_out, kh, kw, _ = w_packed.shape
    ho = conv_out_size(h, kh, stride[0], padding[0] + padding[1], dilation[0])
    wo = conv_out_size(w, kw, stride[1], padding[2] + padding[3], dilation[1])
    if out_dtype == torch.int32:
        mode, out_dt, row = _OUT_INT32, torch.int32, c_out
    elif requant_qparams is not None:
        mode, out_dt, row = _OUT_CODES, torch.uint8, packed_size(c_out, requant_bits)
    else:
        mode, out_dt, row = _OUT_FLOAT, out_dtype, c_out
    # Checked before allocating the output: the kernel indexes pixels (offs_m) and offsets inside
    # one image in int32, and only the image and output-row bases in int64.
    check_int32_span(n * ho * wo + 1024, "N * Ho * Wo (output pixels, + one tile)")
    check_int32_span(_span(x_codes.shape[1:], x_codes.stride()[1:]), "x_codes: one image's codes")
    if fp_out is not None and out_dtype != torch.int32:
        check_int32_span(_span(fp_out.shape[1:], fp_out.stride()[1:]), "fp_out: one image's pruned-branch output")
    out = torch.empty((n, ho, wo, row), dtype=out_dt, device=x_codes.device)
    if out.numel() == 0:
        return out
    cin_g = in_channels // groups
    a_nib = bits_a <= 4
    has_fp = mode != _OUT_INT32 and (fp_out is not None or _fused is not None)
    fp = fp_out if fp_out is not None and has_fp else out
    m = n * ho * wo
    requant = mode == _OUT_CODES
    w_ready = cached("compute_ready_weight", (w_packed,), (bits_w, cin_g),
                     lambda: compute_ready_weight(w_packed, (bits_w, cin_g)))
    if _fused is not None:
        fp_in, wf, fb = _fused
        check_int32_span(_span(fp_in.shape[1:], fp_in.stride()[1:]), "fp_in: one image's float slice")
        fused_args = (fp_in, wf, fb, fp_in.shape[3], *fp_in.stride()[:3], *wf.stride()[:3])
    else:
        fused_args = (out, out, out, 0, 0, 0, 0, 0, 0, 0)

    args = (
        x_codes, w_ready, out, scale.contiguous(), bias.contiguous() if bias is not None else out,
        fp, cached("inverse_index", (fp_out_idx,), c_out, lambda: inverse_index(fp_out_idx, c_out)) if has_fp else out,
        requant_qparams.contiguous() if requant else out,
        m, triton.next_power_of_2(m), h, w, ho, wo, c_out, cin_g, c_out // groups, row,
        *x_codes.stride(), *w_ready.stride()[:3], *(fp.stride() if fp is not out else (0, 0, 0, 0)),
        stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1], kh, kw, *fused_args,
    )
    const = dict(
        A_NIB=a_nib, A_SIGNED=a_signed, A_ALIGNED=groups == 1 or cin_g % 2 == 0, SWAR=not INTERPRET,
        OUT_MODE=mode, HAS_BIAS=mode != _OUT_INT32 and bias is not None,
        HAS_FP=has_fp, RELU=mode != _OUT_INT32 and relu,
        RQ_LEVELS=levels(requant_bits, requant_signed) if requant else 1, RQ_SIGNED=requant and requant_signed,
        RQ_NIB=requant and requant_bits <= 4,
    )
    if _fused is not None:
        # fp32 slices multiply as cuDNN would run the separate branch: TF32 where torch allows it
        const.update(FP_FUSED=True, FP_IEEE=_fused[0].dtype == torch.float32 and not torch.backends.cudnn.allow_tf32,
                     BLOCK_KF=FP_K_STEP)
        split_k = 1  # the epilogue adds the branch in the same program as the main loop
    if tiles.autotune_requested():
        if split_k not in (None, 1):
            raise ValueError(f"split_k={split_k!r} is not autotuned: unset HYBRIDOPS_AUTOTUNE to split K, or pass "
                             "split_k=None.")
        const["K_FULL"] = cin_g % max(c.kwargs["BLOCK_K"] for c in _qconv_tuned.configs) == 0
        key = (triton.next_power_of_2(m), c_out, cin_g, c_out // groups, kh, kw, a_nib, mode, a_signed,
               groups == 1 or cin_g % 2 == 0, out.dtype, fp.dtype, scale.dtype,
               bias.dtype if bias is not None else None)
        if key not in _tuned_keys and _capturing(x_codes):
            raise RuntimeError(
                "hybridops: HYBRIDOPS_AUTOTUNE=1 would autotune the Triton qconv2d kernel for a new shape inside a "
                "CUDA graph capture, which cannot time kernels. Run the model once before capturing (the tuned "
                "tile is then reused), or unset HYBRIDOPS_AUTOTUNE to use the shipped tile table.")
        smallest = min(tiles.SHIPPED, key=lambda t: t.block_m * t.block_n)
        check_grid((triton.cdiv(m, smallest.block_m), triton.cdiv(c_out, smallest.block_n)), "qconv2d")
        _qconv_tuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c_out, meta["BLOCK_N"]))](
            *args, **const, **LAUNCH_OPTS)
        _tuned_keys.add(key)
        return out
    t = tiles.pick(m, c_out, INTERPRET, cin_g)
    const["K_FULL"] = cin_g % t.block_k == 0
    grid = (triton.cdiv(m, t.block_m), triton.cdiv(c_out, t.block_n))
    check_grid(grid, "qconv2d")
    iters = kh * kw * triton.cdiv(cin_g, t.block_k)
    split = split_count(split_k, grid[0] * grid[1], iters, groups, _sm_count(x_codes.device))
    if split > 1:
        check_int32_span(m * c_out, "N * Ho * Wo * C_out (the split-K accumulator)")
    if split == 1:
        _qconv_kernel[grid](*args, **const, **t.meta(), num_warps=t.num_warps, num_stages=t.num_stages, **LAUNCH_OPTS)
        return out
    # Split-K: int32 partial sums added atomically into a zeroed accumulator, then the epilogue.
    per = triton.cdiv(iters, split)
    split = triton.cdiv(iters, per)  # no empty split
    check_grid(grid + (split,), "qconv2d (split-K)")
    acc = out.zero_() if mode == _OUT_INT32 else torch.zeros((n, ho, wo, c_out), dtype=torch.int32,
                                                             device=x_codes.device)
    acc_args = (x_codes, w_ready, acc) + args[3:17] + (c_out,) + args[18:]  # OUT_ROW: the int32 row
    acc_const = dict(const, OUT_MODE=_OUT_INT32, HAS_BIAS=False, HAS_FP=False, RELU=False, RQ_LEVELS=1,
                     RQ_SIGNED=False, RQ_NIB=False)
    _qconv_kernel[grid + (split,)](*acc_args, **acc_const, **t.meta(), SPLIT_K=split, ITERS_PER_SPLIT=per,
                                   num_warps=t.num_warps, num_stages=min(t.num_stages, SPLIT_K_STAGES), **LAUNCH_OPTS)
    if mode != _OUT_INT32:
        bm, bn = (t.block_m, t.block_n)
        _split_k_epilogue_kernel[(triton.cdiv(m, bm), triton.cdiv(c_out, bn))](
            acc, out, *args[3:8], m, ho, wo, c_out, row, *(fp.stride() if fp is not out else (0, 0, 0, 0)),
            OUT_MODE=mode, HAS_BIAS=const["HAS_BIAS"], HAS_FP=has_fp, RELU=const["RELU"],
            RQ_LEVELS=const["RQ_LEVELS"], RQ_SIGNED=const["RQ_SIGNED"], RQ_NIB=const["RQ_NIB"], BLOCK_M=bm, BLOCK_N=bn,
            num_warps=t.num_warps, **LAUNCH_OPTS)
    return out


def compute_ready_weight(w_packed: torch.Tensor, bits_and_cin_g) -> torch.Tensor:
    """The B operand as the kernel consumes it, from storage-format weights ``uint8 (C_out, KH,
    KW, packed(C_in/g))`` (any strides): ``int8 (C_out, KH, KW, C_pad)``, one code per byte in
    channel order, ``C_pad`` = C_in per group rounded up to :data:`tiles.K_PAD` with zero codes.
    Made once per weight tensor (:func:`.derived.cached`); 4-bit weights take twice their stored bytes."""
    bits_w, cin_g = bits_and_cin_g
    codes = unpack_codes(w_packed, bits_w, cin_g, signed=True)
    return torch.nn.functional.pad(codes, (0, -cin_g % tiles.K_PAD)).contiguous()


# Pipeline depth of a split-K launch: the 32x64 batch-1 tile at 4 stages spilled 8 bytes on sm_90
# with the atomic store (0 at 3 stages, tests/test_triton_codegen.py); a split runs >= 4 iterations.
SPLIT_K_STAGES = 3


def split_count(requested: Optional[int], tiles_count: int, iters: int, groups: int,
                sms: int = tiles.SM_COUNT) -> int:
    """How many K splits a launch of ``tiles_count`` output tiles and ``iters`` K iterations
    (taps x channel chunks) per tile runs as on a GPU with ``sms`` SMs. ``requested``: a count
    (capped at ``iters``); None: split only where the tiles alone would leave SMs idle (batch-1
    layers launch 28-52 tiles on 132 SMs), into enough splits to cover the SMs, each at least 4
    iterations long so that the pipelined mainloop still has a loop to overlap; never under the
    interpreter (nothing to fill)."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"split_k must be a positive integer (or None: the launcher decides), got {requested!r}.")
        if requested > 1 and groups != 1:
            raise ValueError(f"split_k applies to ungrouped convolutions (a grouped conv's tiles loop over groups), "
                             f"got split_k={requested} with groups={groups}.")
        return min(requested, iters)
    if INTERPRET or groups != 1 or tiles_count >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, tiles_count), iters // 4, 16))


# The fused pruned branch's K step (channels per tl.dot): the smallest K of a 16-bit tensor-core
# MMA, since the slice of a pruned branch holds few channels; its weights are padded to it.
FP_K_STEP = 16

# Roofline terms of fuse_pruned_branch, from docs/gpu.md (H100, measured): bf16 / fp16 tensor-core
# GEMM about 700 TFLOP/s, fp32 402 TFLOP/s as TF32 and 52 without, a device copy 3.0 TB/s. The
# floor of the separate branch's small cuDNN conv is an estimate, not a measurement: docs/gpu.md
# measured 10-12 us for a whole batch-1 ResNet-50 layer, and a conv of a few output channels is
# taken as half of that.
_MMA_FLOPS = {torch.float16: 700e12, torch.bfloat16: 700e12}
_FP32_FLOPS = {True: 402e12, False: 52e12}  # by torch.backends.cudnn.allow_tf32
_COPY_BYTES_PER_S = 3.0e12
_SMALL_CONV_FLOOR_S = 5e-6


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else tiles.SM_COUNT


def fuse_pruned_branch(m: int, c_out: int, cin_g: int, kept: int, taps: int, slice_channels: int,
                       dtype: torch.dtype, groups: int, device: torch.device) -> bool:
    """Whether :func:`fused_hybrid_conv2d` applies and beats running the pruned branch as its own
    conv, by a roofline: the fused loop multiplies the slice against every output column of the
    tile (``c_out``, mostly zero rows), the separate conv only the ``kept`` ones but costs at least
    one small conv's floor and writes and reads its output once more. Fusing needs an ungrouped
    conv and the shipped tile table (not ``HYBRIDOPS_AUTOTUNE=1``), and gives up split-K, so a
    layer the launcher would split (too few tiles to fill the SMs) keeps the separate branch.
    ``HYBRIDOPS_FUSE_BRANCH`` (``auto``, the default; ``always``; ``never``) overrides the roofline
    where fusing applies, for measuring both sides (``bench/bench_kernels.py``)."""
    mode = os.environ.get("HYBRIDOPS_FUSE_BRANCH", "auto")
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"HYBRIDOPS_FUSE_BRANCH={mode!r}: use auto, always or never.")
    if (groups != 1 or tiles.autotune_requested() or not dtype.is_floating_point or mode == "never"
            or (INTERPRET and dtype == torch.bfloat16)):  # the interpreter's bf16 dot is wrong (docs/gpu.md)
        return False
    if mode == "always":
        return True
    t = tiles.pick(m, c_out, INTERPRET, cin_g)
    tile_count = triton.cdiv(m, t.block_m) * triton.cdiv(c_out, t.block_n)
    if split_count(None, tile_count, taps * triton.cdiv(cin_g, t.block_k), groups, _sm_count(device)) > 1:
        return False
    rate = _FP32_FLOPS[torch.backends.cudnn.allow_tf32] if dtype == torch.float32 else _MMA_FLOPS.get(dtype, 0.0)
    if not rate:
        return False
    fused_extra = 2 * m * c_out * taps * slice_channels / rate
    separate = (max(_SMALL_CONV_FLOOR_S, 2 * m * kept * taps * slice_channels / rate)
                + 2 * m * kept * (torch.finfo(dtype).bits // 8) / _COPY_BYTES_PER_S)
    return fused_extra < separate


def scattered_fp_weight(fp_weight: torch.Tensor, out_and_dtype, fp_out_idx: torch.Tensor,
                        fp_bias: Optional[torch.Tensor]) -> tuple:
    """The pruned branch's weights and bias as the fused loop reads them: ``wf (C_out, KH, KW,
    C_pad)`` in the slice's dtype, row ``fp_out_idx[j]`` = ``fp_weight[j]`` with channels last and
    zero-padded to :data:`FP_K_STEP`, other rows zero; ``fb (C_out,)`` fp32, likewise."""
    c_out, dtype = out_and_dtype
    k_p, c_f, kh, kw = fp_weight.shape
    wf = fp_weight.new_zeros((c_out, kh, kw, c_f + (-c_f % FP_K_STEP)), dtype=dtype)
    idx = fp_out_idx.to(torch.long)
    wf[idx, :, :, :c_f] = fp_weight.detach().permute(0, 2, 3, 1).to(dtype)
    fb = torch.zeros(c_out, dtype=torch.float32, device=fp_weight.device)
    if fp_bias is not None:
        fb[idx] = fp_bias.detach().float()
    return wf, fb


def fused_hybrid_conv2d(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding,
                        dilation, groups, relu, fp_in, fp_weight, fp_bias, fp_out_idx, requant_qparams, requant_bits,
                        requant_signed, out_dtype) -> torch.Tensor:
    """:func:`qconv2d` with the pruned branch's conv computed in the same kernel, one launch per
    hybrid layer (see :func:`hybridops.ops.reference.hybrid_conv2d` for the semantics; the op
    layer calls it where :func:`fuse_pruned_branch` says so). ``fp_in (N, H, W, C_f)``: the NHWC
    float slice the branch reads; ``fp_weight (K_p, C_f, KH, KW)``, ``fp_bias (K_p,)``, in any
    float dtype, are used in ``fp_in``'s dtype (fp32: as TF32 where ``torch.backends.cudnn.allow_tf32``
    lets the separate branch's cuDNN conv use it, else in fp32)."""
    if groups != 1 or tiles.autotune_requested():
        raise ValueError("the fused pruned branch needs an ungrouped conv (groups=1) and the shipped tile table "
                         f"(HYBRIDOPS_AUTOTUNE unset), got groups={groups}.")
    if INTERPRET and fp_in.dtype == torch.bfloat16:
        raise ValueError("the Triton interpreter multiplies bf16 tiles wrongly, so the fused pruned branch refuses a "
                         "bf16 slice there: use an fp16 or fp32 slice, or run on a GPU.")
    fp_in = fp_in if fp_in.stride(3) == 1 else fp_in.contiguous()  # the fused loop reads channels contiguously
    wf, fb = cached("scattered_fp_weight", (fp_weight, fp_out_idx, fp_bias), (w_packed.shape[0], fp_in.dtype),
                    lambda: scattered_fp_weight(fp_weight, (w_packed.shape[0], fp_in.dtype), fp_out_idx, fp_bias))
    return qconv2d(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding, dilation,
                   groups, relu, None, fp_out_idx, requant_qparams, requant_bits, requant_signed, out_dtype,
                   _fused=(fp_in, wf, fb))
