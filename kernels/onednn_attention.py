"""The ``onednn`` backend's quantized attention (``hybridops::quantized_attention``) on the CPU.

Codes come from the backend's vectorised quantize pass (``hybridops._C_cpu``, bitwise equal to the
reference's codes). Then one of two paths (design and measurements: docs/attention.md):

* **Flash** (long sequences, :data:`FLASH_MIN_SCORES`; V of Q's head dim; the codes' products
  exact in a float GEMM, :func:`flash_exact`: every partial sum of ``D`` products of codes below
  2^24, which the fp32 accumulator holds exactly): PyTorch's CPU flash attention kernel on the codes
  as floats with ``scale = s_qk``. It multiplies the exact product by the scale once
  (``float(S_int) * s_qk``, as the reference; with a mask it adds the mask to that product), then a
  blockwise online softmax and ``P @ V`` in cache-sized tiles; rows that attend no key are 0.
* **Grouped** (otherwise): the integer scores ``S_int = Cq @ Ck^T`` from ``torch._int_mm`` on int8
  codes (oneDNN's s8 x s8 -> s32 GEMM: VNNI / AMX), one call per (batch, head), then the
  reference's fp32 scale, mask and softmax, and ``P @ V`` in bf16 for bf16 inputs (fp32 otherwise),
  heads in groups whose scores stay in cache. ``torch._int_mm`` has no batched form on the CPU,
  and its K operand is fastest as a contiguous ``(D, Lk)`` matrix: a transposed view of ``(Lk, D)``
  codes took 60x longer at ViT-B shapes (measured, torch 2.14.1, AMD EPYC with AVX-512 VNNI), so
  K's codes are transposed once (int8, a quarter of a float copy). Where oneDNN's int8 GEMM is not
  exact (:func:`int_mm_exact`: on AVX2 without VNNI the u8 x s8 pairs of ``vpmaddubsw`` saturate at
  16 bits) the product runs as a float matmul of the codes instead, exact while
  ``D * 127^2 < 2^24``, in float64 beyond.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import onednn

# fp32 holds every integer below 2^24 exactly
_EXACT_F32 = 1 << 24
# The fp32 scores of one group of heads (and their softmax, the same size): small enough to stay in
# cache between the passes over them. Measured at 2 threads (AMD EPYC, VNNI): at TransT's
# 8 x 1024 x 1024 all heads at once (33 MB per pass, fresh pages every call) took 65 ms, groups
# of 1 MiB and 4 MiB 9-11 ms, 16 MiB 32 ms; ViT-B's 12 x 197 x 197 was 2.8 ms at once, 1.2 ms in
# 1 MiB groups.
SCORE_BYTES = 1 << 20
# Scores per head (Lq * Lk) from which the flash path runs. Measured (2026-12-08, AMD EPYC, VNNI,
# bench/bench_attention.py; SDPA / op in one run, before -> after taking the flash path): TransT's
# 8 x 1024 x 1024 x 32 fp32 0.74 -> 0.93 (1 thread), 0.62 -> 0.89 (2), its 256 x 1024 cross
# attention 0.57 -> 0.69-0.77 at 2 threads; but ViT-B's 12 x 197 x 197 x 64 in bf16 1.17 -> 0.77
# (1), 1.00 -> 0.66 (2): short sequences keep the grouped path, whose scores stay in cache.
FLASH_MIN_SCORES = 1 << 17
# Multiply-adds of one head's Q K^T below which one batched float matmul of the codes beats a
# torch._int_mm call per head (the call's fixed cost dominates a Swin window's 49 x 49 x 32).
SMALL_PRODUCT = 1 << 18


@functools.lru_cache(maxsize=None)
def int_mm_exact() -> bool:
    """Whether ``torch._int_mm`` on int8 gives exact int32 products on this CPU: worst-case
    operands (every code +-127) and random ones against int64."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (24, 64), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (64, 40), dtype=torch.int8, generator=g)
    a[0].fill_(127)
    a[1].fill_(-127)
    b[:, 0].fill_(127)
    return torch.equal(torch._int_mm(a, b).to(torch.int64), a.to(torch.int64) @ b.to(torch.int64))


def codes(x: torch.Tensor, qparams: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes of ``x (B, H, L, D)`` as int8 ``(B, H, L, D)``, contiguous: the C++ quantize
    pass reads the rows of ``x`` as pixels of a ``(B*H, D, L, 1)`` channels-last image and writes
    ``code + 2^(b-1)`` bytes; subtracting the zero point in uint8 wraps to the code's int8 bits."""
    b, h, length, d = x.shape
    img = x.reshape(b * h, length, 1, d).permute(0, 3, 1, 2)
    _, u8 = onednn.quantize_activate(img, qparams, bits, True)
    return torch.sub(u8, onednn.zero_point(bits, True)).view(torch.int8).view(b, h, length, d)


def int_scores(cq: torch.Tensor, ck_t: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``S_int = Cq @ Ck^T`` exactly: ``cq`` int8 ``(n, Lq, D)``, ``ck_t`` int8 ``(n, D, Lk)``
    contiguous -> int32 ``(n, Lq, Lk)`` (written into ``out`` when given)."""
    n, lq, d = cq.shape
    lk = ck_t.shape[-1]
    if out is None:
        out = torch.empty((n, lq, lk), dtype=torch.int32)
    if not int_mm_exact() or lq * lk * d < SMALL_PRODUCT:
        # one batched float matmul of the codes: exact (every partial sum is an integer below
        # 2^24 in fp32, or held exactly in float64)
        dt = torch.float32 if d * 127 * 127 < _EXACT_F32 else torch.float64
        return out.copy_(torch.matmul(cq.to(dt), ck_t.to(dt)))
    for i in range(n):
        torch._int_mm(cq[i], ck_t[i], out=out[i])
    return out


def flash_exact(head_dim: int, bits: int) -> bool:
    """Whether a float GEMM of ``bits``-bit codes over ``head_dim`` is exact in an fp32
    accumulator: ``head_dim * (2^(b-1))^2 < 2^24``."""
    return head_dim * (1 << (bits - 1)) ** 2 < _EXACT_F32


def _flash(cq, ck, cv, s_qk, attn_mask, is_causal) -> torch.Tensor:
    """PyTorch's CPU flash attention kernel on float codes ``(B, H, L, D)``, ``scale = s_qk`` (a
    Python float holds the fp32 scalar exactly). Called as its aten op, not through
    ``scaled_dot_product_attention`` under ``sdpa_kernel``, whose backend switches are process-wide
    flags other threads would see. The mask goes in as the reference applies it: additive fp32
    (bool: 0 where attended, -inf elsewhere), expanded to ``(B, H, Lq, Lk)`` (stride 0 costs no copy),
    detached (a learned bias, Swin's, arrives with its grad flag)."""
    mask = None
    if attn_mask is not None:
        mask = attn_mask.detach()
        if mask.dtype == torch.bool:  # one pass: 0 where attended, -inf elsewhere
            mask = torch.where(mask, torch.zeros((), dtype=torch.float32), float("-inf"))
        mask = mask.to(torch.float32).expand(cq.shape[0], cq.shape[1], cq.shape[2], ck.shape[2])
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        cq, ck, cv, 0.0, is_causal, attn_mask=mask, scale=float(s_qk))[0]


def _dead_rows(attn_mask: torch.Tensor) -> torch.Tensor:
    """Rows of the mask that allow no key (their softmax is NaN; the contract makes them 0)."""
    if attn_mask.dtype == torch.bool:
        return ~attn_mask.any(-1, keepdim=True)
    return (attn_mask == float("-inf")).all(-1, keepdim=True)


def heads_per_group(lq: int, lk: int, heads: int) -> int:
    """How many heads' scores are computed at once: as many as keep one group's fp32 scores within
    :data:`SCORE_BYTES`, at least one."""
    return max(1, min(heads, SCORE_BYTES // (4 * lq * lk)))


def quantized_attention_finite(q, k, v, q_qparams, k_qparams, v_qparams: Optional[torch.Tensor], s_qk,
                               step_v: Optional[torch.Tensor], bits, attn_mask: Optional[torch.Tensor],
                               is_causal) -> torch.Tensor:
    """See :func:`hybridops.ops.reference.quantized_attention_finite` (same arguments, same
    result: scores bitwise equal before the softmax, fp32 / bf16 roundings after it).

    The flash path where it applies (module docstring). Otherwise heads go in groups (:func:`heads_per_group`) through preallocated buffers, each pass on a
    group's scores while they are in cache: integer scores, ``float(S_int) * s_qk``, the mask,
    softmax, ``P @ V``."""
    b, h, lq, _ = q.shape
    lk, dv = k.shape[2], v.shape[-1]
    if lk == 0:
        return q.new_zeros((b, h, lq, dv))
    # bf16 units for P @ V where the input is bf16: codes up to 127 are exact in bf16, and oneDNN
    # accumulates in fp32; fp32 and fp16 inputs keep P in fp32 (the CPU has no fast fp16 GEMM)
    pv_dt = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
    if lq * lk >= FLASH_MIN_SCORES and flash_exact(q.shape[-1], bits) and dv == q.shape[-1]:
        # (the flash kernel wants Dv == D)
        # bf16 holds every code up to 2^8 exactly (bf16 inputs: P @ V in bf16 units, as below)
        vv = v if v_qparams is None else codes(v, v_qparams, bits)
        out = _flash(codes(q, q_qparams, bits).to(pv_dt), codes(k, k_qparams, bits).to(pv_dt),
                     vv.to(pv_dt).contiguous(), s_qk, attn_mask, is_causal)
        return (out if v_qparams is None else torch.mul(out, step_v)).to(q.dtype)
    cq = codes(q, q_qparams, bits)
    ck_t = codes(k, k_qparams, bits).transpose(-1, -2).contiguous()
    vv = (v if v_qparams is None else codes(v, v_qparams, bits)).to(pv_dt)
    mask = dead = None
    if is_causal:
        mask = torch.ones(lq, lk, dtype=torch.bool).triu_(1)  # True: excluded
    elif attn_mask is not None:
        mask = (~attn_mask if attn_mask.dtype == torch.bool else attn_mask).expand(b, h, lq, lk)  # bool: excluded
        # causal rows always attend key 0; a mask may leave a row nothing
        dead = _dead_rows(attn_mask).expand(b, h, lq, 1)
    # Batch and heads as one axis of b * h matrices, grouped across both: Swin's windows are the
    # batch (64 windows x 3 heads of 49 tokens at 224 px), one group instead of 64 loops.
    bh = b * h
    cq, ck_t, vv = cq.view(bh, lq, -1), ck_t.view(bh, -1, lk), vv.reshape(bh, lk, dv)
    if mask is not None and not is_causal:
        mask, dead = mask.reshape(bh, lq, lk), dead.reshape(bh, lq, 1)
    g = heads_per_group(lq, lk, bh)
    s_int = torch.empty((g, lq, lk), dtype=torch.int32)
    s = torch.empty((g, lq, lk), dtype=torch.float32)
    p = torch.empty((g, lq, lk), dtype=torch.float32)
    p_low = torch.empty((g, lq, lk), dtype=pv_dt) if pv_dt != torch.float32 else p
    out = torch.empty((bh, lq, dv), dtype=pv_dt)
    for h0 in range(0, bh, g):
        n = min(g, bh - h0)
        heads = slice(h0, h0 + n)
        torch.mul(int_scores(cq[heads], ck_t[heads], s_int[:n]), s_qk, out=s[:n])  # one IEEE multiply
        if mask is not None and mask.dtype == torch.bool:
            s[:n].masked_fill_(mask if is_causal else mask[heads], float("-inf"))
        elif mask is not None:
            s[:n].add_(mask[heads].to(torch.float32))
        torch.ops.aten._softmax.out(s[:n], -1, False, out=p[:n])
        if dead is not None:
            p[:n].masked_fill_(dead[heads], 0.0)
        if p_low is not p:
            p_low[:n].copy_(p[:n])
        torch.bmm(p_low[:n], vv[heads], out=out[heads])
    out = out.view(b, h, lq, dv)
    return (out if v_qparams is None else torch.mul(out, step_v)).to(q.dtype)
