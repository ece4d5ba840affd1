"""The ``triton`` backend's quantized attention (``hybridops::quantized_attention``): flash-style.

Two launches. A quantize pass writes the signed codes of q, k (and v when it is quantized) as
int8, bitwise equal to the reference (the quantizer of :mod:`._common`, no FMA). Then one
program per ``BLOCK_M`` queries of one (batch, head) walks the keys in blocks of ``BLOCK_N``:
``S_int`` of the block is one int8 ``tl.dot`` with int32 accumulators (the int8 tensor cores),
``S = float(S_int) * s_qk`` as in the reference, masked, and folded into an online softmax
(running row maximum and sum, Dao et al.); ``P`` (fp32, bf16 for bf16 inputs) times the block's V
(codes converted to that float type: exact, |code| <= 127) accumulates in fp32. The output is
``acc / rowsum``, times ``step_v`` for quantized V; a row that attends no key is 0.

Head dims are padded only up to a power of two (the tile shapes ``tl.arange`` allows) and at least
32 (the K of an int8 MMA): 32, 64 and 128 run unpadded; padded columns load code 0.
Design and the contract: docs/attention.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packing import levels

from ._common import LAUNCH_OPTS, check_device, check_grid, check_int32_span, loop_range, quant_codes

_QUANT_BLOCK = 1024
# Query and key block, warps: 64 x 64 at 8 warps compiles without register spills for sm_90 in
# every variant (head dims 32-128, fp32 and bf16 P, masks: tests/test_quantized_attention.py); at
# 4 warps the fp32 variants spill (2.9 kB at D = 128). Not yet timed on a GPU.
_BLOCK_M = 64
_BLOCK_N = 64
_NUM_WARPS = 8
_MIN_D = 32
_MIN_DV = 16
_MASK_NONE, _MASK_BOOL, _MASK_ADD = 0, 1, 2


@triton.jit
def _codes_kernel(x_ptr, c_ptr, qp_ptr, numel, LEVELS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    t = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    q = quant_codes(t, tl.load(qp_ptr), tl.load(qp_ptr + 1), LEVELS, True)
    tl.store(c_ptr + offs, q.to(tl.int8), mask=ok)


def codes(x: torch.Tensor, qparams: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes of ``x`` (any shape) as int8, contiguous, in ``x``'s shape."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    if x.numel() == 0:
        return out
    grid = (triton.cdiv(x.numel(), _QUANT_BLOCK),)
    check_grid(grid, "quantized_attention codes")
    _codes_kernel[grid](x, out, qparams.contiguous(), x.numel(), LEVELS=levels(bits, True), BLOCK=_QUANT_BLOCK,
                        **LAUNCH_OPTS)
    return out


@triton.jit
def _attention_kernel(
    qc_ptr, kc_ptr, v_ptr, out_ptr, mask_ptr, scal_ptr,
    H, LQ, LK, D, DV, smb, smh, smm, smn,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, V_CODES: tl.constexpr, P_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Queries ``pid_m * BLOCK_M ...`` of (batch, head) ``program_id(1)``. q/k codes, v and out
    are contiguous ``(B, H, L, D)``; the mask is read through strides (0 where it broadcasts)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    hh = bh % H
    bh64 = bh.to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DV)
    m_ok = m < LQ
    qc = tl.load(qc_ptr + bh64 * LQ * D + m[:, None] * D + d[None, :], mask=m_ok[:, None] & (d < D)[None, :],
                 other=0)
    s_qk = tl.load(scal_ptr)
    k_base = kc_ptr + bh64 * LK * D
    v_base = v_ptr + bh64 * LK * DV
    mask_base = mask_ptr + b.to(tl.int64) * smb + hh.to(tl.int64) * smh
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    hi = LK
    if CAUSAL:  # top-left aligned: query i attends keys j <= i
        hi = tl.minimum(LK, (pid_m + 1) * BLOCK_M)
    for n0 in loop_range(0, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < LK
        kc = tl.load(k_base + n[None, :] * D + d[:, None], mask=(d < D)[:, None] & n_ok[None, :], other=0)
        s_int = tl.dot(qc, kc, out_dtype=tl.int32)
        s = s_int.to(tl.float32) * s_qk
        ok = n_ok[None, :] & m_ok[:, None]
        if CAUSAL:
            ok = ok & (n[None, :] <= m[:, None])
        if MASK == 1:
            allowed = tl.load(mask_base + m[:, None] * smm + n[None, :] * smn, mask=ok, other=0)
            ok = ok & (allowed != 0)
        if MASK == 2:
            s = s + tl.load(mask_base + m[:, None] * smm + n[None, :] * smn, mask=ok, other=0.0).to(tl.float32)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with no key yet keeps a finite reference point, so exp(-inf - ref) = 0, not NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_ref[:, None])
        corr = tl.exp(m_i - m_ref)
        l_i = l_i * corr + tl.sum(p, 1)
        vt = tl.load(v_base + n[:, None] * DV + e[None, :], mask=n_ok[:, None] & (e < DV)[None, :], other=0)
        if P_BF16:
            pv = tl.dot(p.to(tl.bfloat16), vt.to(tl.bfloat16))
        else:
            pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        acc = acc * corr[:, None] + pv
        m_i = m_new
    live = l_i > 0.0
    out = tl.where(live[:, None], acc / tl.where(live, l_i, 1.0)[:, None], 0.0)
    if V_CODES:
        out = out * tl.load(scal_ptr + 1)
    tl.store(out_ptr + bh64 * LQ * DV + m[:, None] * DV + e[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (e < DV)[None, :])


def quantized_attention_finite(q, k, v, q_qparams, k_qparams, v_qparams, s_qk, step_v, bits, attn_mask,
                               is_causal) -> torch.Tensor:
    """See :func:`hybridops.ops.reference.quantized_attention_finite` (same arguments, same
    result up to the fp32 roundings of the online softmax). float32, bfloat16, float16 inputs."""
    check_device(q, "q")
    if q.dtype == torch.float64:
        raise ValueError("the triton quantized_attention kernel takes float32, bfloat16 or float16 inputs, got "
                         "torch.float64 (use backend='torch' for float64).")
    b, h, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[-1]
    out = torch.empty((b, h, lq, dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    qc, kc = codes(q, q_qparams, bits), codes(k, k_qparams, bits)
    vv = v.contiguous() if v_qparams is None else codes(v, v_qparams, bits)
    one = torch.ones((), dtype=torch.float32, device=q.device)
    scal = torch.stack((s_qk.to(torch.float32), one if step_v is None else step_v.to(torch.float32)))
    if attn_mask is None:
        kind, mask, strides = _MASK_NONE, out, (0, 0, 0, 0)
    else:
        kind = _MASK_BOOL if attn_mask.dtype == torch.bool else _MASK_ADD
        mask = attn_mask.expand(b, h, lq, lk)
        strides = mask.stride()
        if kind == _MASK_BOOL:
            mask = mask.view(torch.uint8)
    for t, name in ((qc, "q"), (kc, "k"), (vv, "v")):
        check_int32_span(t[0, 0].numel(), f"{name}: one head")
    grid = (triton.cdiv(lq, _BLOCK_M), b * h)
    check_grid(grid, "quantized_attention")
    _attention_kernel[grid](
        qc, kc, vv, out, mask, scal, h, lq, lk, d, dv, *strides,
        CAUSAL=is_causal, MASK=kind, V_CODES=v_qparams is not None, P_BF16=q.dtype == torch.bfloat16,
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_D=max(_MIN_D, triton.next_power_of_2(d)),
        BLOCK_DV=max(_MIN_DV, triton.next_power_of_2(dv)), num_warps=_NUM_WARPS, **LAUNCH_OPTS,
    )
    return out
