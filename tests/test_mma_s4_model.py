"""A bit-exact model, on the CPU, of the data path of ``qconv_mma_s4_kernel`` (``csrc/qconv2d.cu``,
Ampere / Ada 4-bit tensor cores), checked against plain dot products.

The kernel hands nibble-packed codes (``docs/format.md``: channel 2j in the low nibble of byte j)
to ``mma.sync.m16n8k64 .u4/.s4 x .s4`` without unpacking them. Whether that multiplies the right
codes depends on three layouts meeting: the shared-memory ring (cp.async 16-byte units, stored
at a swizzled position, ``unit_offset``), ``ldmatrix.x4`` (which 4 bytes of which row each lane
receives) and the m16n8k64 fragment layout of the PTX ISA ("Matrix Fragments for
mma.m16n8k64", 4-bit types: eight elements per 32-bit register, element e in bits 4e..4e+3).
This models each step on bytes and registers, as the kernel's code computes its addresses, and
compares the accumulators (in the m16n8 accumulator layout the epilogue stages) with the
integer product of the unpacked codes. It runs without a GPU; the kernel itself has not run.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hybridops.kernels import packing

ROW_BYTES = 64   # kChunk: bytes of an operand row per k tile (128 packed channels)
CH = 128         # MmaLayout<..., S4 = true>::CH: channels per k tile


def unit_offset(row: int, unit: int) -> int:
    """csrc/qconv2d.cu's unit_offset: 16-byte unit of a 64-byte row, swizzled by (row >> 1) & 3."""
    return row * ROW_BYTES + ((unit ^ ((row >> 1) & 3)) << 4)


def ring_stage(packed_rows: np.ndarray, chunk: int) -> np.ndarray:
    """One ring stage as load_tile fills it: unit u of row r is bytes [64 chunk + 16 u, + 16) of
    the row's packed codes, stored at unit_offset(r, u). Past the row it is zero: cp.async's
    zero-filled units (C_in / groups % 32 == 0) or gather16's zero codes (any other C_in, which
    gathers the same canonical packed bytes code by code)."""
    rows, nbytes = packed_rows.shape
    padded = np.zeros((rows, -(-nbytes // ROW_BYTES) * ROW_BYTES), np.uint8)
    padded[:, :nbytes] = packed_rows
    smem = np.zeros(rows * ROW_BYTES, np.uint8)
    for r in range(rows):
        for u in range(4):
            off = chunk * ROW_BYTES + 16 * u
            smem[unit_offset(r, u):unit_offset(r, u) + 16] = padded[r, off:off + 16]
    return smem


def ldmatrix_x4(smem: np.ndarray, lane_addr) -> np.ndarray:
    """ldmatrix.sync.aligned.m8n8.x4.b16: lane 8q + r supplies the address of row r of matrix q;
    lane (gid = lane / 4, tig = lane % 4) receives, in register q, bytes [4 tig, 4 tig + 4) of row
    gid of matrix q (two b16 elements, the lower one in the low half). Returns uint32 [32, 4]."""
    regs = np.zeros((32, 4), np.uint32)
    for lane in range(32):
        gid, tig = lane // 4, lane % 4
        for q in range(4):
            addr = lane_addr(8 * q + gid) + 4 * tig
            regs[lane, q] = int.from_bytes(bytes(smem[addr:addr + 4]), "little")
    return regs


def nibbles(word: int, signed: bool, order: str) -> list:
    """The eight 4-bit elements of a register, element 0 first: at bits 0-3 (the PTX ISA's
    order) or, for the order-independence check, at bits 28-31."""
    vals = [(word >> (4 * e)) & 0xF for e in range(8)]
    if order == "high_first":
        vals = vals[::-1]
    return [(v ^ 8) - 8 if signed else v for v in vals]


def mma_m16n8k64(acc: np.ndarray, a_regs: np.ndarray, b_regs: np.ndarray, a_signed: bool, order: str) -> None:
    """mma.sync.aligned.m16n8k64.row.col.s32.{u4,s4}.s4.s32 per the PTX ISA's fragment layouts
    (groupID = lane >> 2, threadID_in_group = lane % 4):
      A (16 x 64): a0 row gid, k 8 tig + e; a1 row gid + 8, same k; a2, a3 the same with k + 32;
      B (64 x 8):  b0 column gid, k 8 tig + e; b1 k + 32;
      C (16 x 8):  c0, c1 row gid, columns 2 tig, 2 tig + 1; c2, c3 row gid + 8.
    acc: int64 [32, 4], the lanes' c0..c3, updated in place."""
    a = np.zeros((16, 64), np.int64)
    b = np.zeros((64, 8), np.int64)
    for lane in range(32):
        gid, tig = lane // 4, lane % 4
        for r in range(4):
            a[gid + 8 * (r & 1), 32 * (r >> 1) + 8 * tig:32 * (r >> 1) + 8 * tig + 8] = \
                nibbles(int(a_regs[lane, r]), a_signed, order)
        for r in range(2):
            b[32 * r + 8 * tig:32 * r + 8 * tig + 8, gid] = nibbles(int(b_regs[lane, r]), True, order)
    d = a @ b
    for lane in range(32):
        gid, tig = lane // 4, lane % 4
        acc[lane] += [d[gid, 2 * tig], d[gid, 2 * tig + 1], d[gid + 8, 2 * tig], d[gid + 8, 2 * tig + 1]]


def warp_gemm(a_packed, b_packed, cin, a_signed, tile, order="low_first"):
    """The kernel's mainloop for one CTA tile (all k tiles, every warp) on packed rows:
    a_packed [BM, bytes] (output pixels), b_packed [BN, bytes] (output channels). Returns the
    accumulators [BM, BN] as the epilogue stages them from c0..c3."""
    bm, bn, warps_m, warps_n = tile
    wm_rows, wn_cols = bm // warps_m, bn // warps_n
    mt, nt = wm_rows // 16, wn_cols // 8
    nchunk = -(-cin // CH)
    half_last = cin % CH != 0 and cin % CH <= CH // 2  # qconv_mma's half_last
    out = np.zeros((bm, bn), np.int64)
    for warp in range(warps_m * warps_n):
        wm, wn = warp // warps_n, warp % warps_n
        acc = np.zeros((mt, nt, 32, 4), np.int64)
        for chunk in range(nchunk):
            sa, sb = ring_stage(a_packed, chunk), ring_stage(b_packed, chunk)
            ksteps = 1 if half_last and chunk == nchunk - 1 else 2
            # b_lane = unit_offset(wn * WN + (lane & 7), lane >> 3), + j * 8 rows
            b = [ldmatrix_x4(sb, lambda l, j=j: unit_offset(wn * wn_cols + (l & 7), l >> 3) + j * 8 * ROW_BYTES)
                 for j in range(nt)]
            for i in range(mt):
                for ks in range(ksteps):
                    # a_lane[ks] = unit_offset(wm * WM + (lane & 15), 2 ks + (lane >> 4)), + i * 16 rows
                    a = ldmatrix_x4(sa, lambda l, i=i, ks=ks: unit_offset(wm * wm_rows + (l & 15), 2 * ks + (l >> 4))
                                    + i * 16 * ROW_BYTES)
                    for j in range(nt):
                        mma_m16n8k64(acc[i, j], a, b[j][:, 2 * ks:2 * ks + 2], a_signed, order)
        for i in range(mt):
            for j in range(nt):
                for lane in range(32):
                    gid, tig = lane // 4, lane % 4
                    for half in range(2):
                        r = wm * wm_rows + i * 16 + gid + 8 * half
                        c = wn * wn_cols + j * 8 + 2 * tig
                        out[r, c:c + 2] = acc[i, j, lane, 2 * half:2 * half + 2]
    return out


def _codes(rows, cin, signed, gen):
    lo, hi = (-8, 7) if signed else (0, 15)
    return torch.randint(lo, hi + 1, (rows, cin), generator=gen)


@pytest.mark.parametrize("cin", [64, 128, 160, 224, 200, 17])
@pytest.mark.parametrize("a_signed", [False, True], ids=["u4", "s4"])
@pytest.mark.parametrize("tile", [(32, 64, 1, 4), (64, 64, 2, 2)], ids=["32x64", "64x64"])
def test_s4_data_path_is_the_dot_product(cin, a_signed, tile):
    """Packed rows as stored -> ring -> ldmatrix -> m16n8k64 -> accumulators equals A @ B^T on
    the codes, for unsigned (u4: post-ReLU codes 0..15) and signed activations against signed
    weights: whole chunks (128), a K tail inside k-step 1 (224 = 128 + 96), last chunks of at most
    64 channels, whose k-step 1 the kernel skips (64, 160), and gathered odd channel counts whose
    last byte holds one code (200, 17)."""
    gen = torch.Generator().manual_seed(cin * 7 + a_signed)
    bm, bn = tile[:2]
    a_codes, w_codes = _codes(bm, cin, a_signed, gen), _codes(bn, cin, True, gen)
    a_packed = packing.pack_codes(a_codes, 4).numpy()
    b_packed = packing.pack_codes(w_codes, 4).numpy()
    got = warp_gemm(a_packed, b_packed, cin, a_signed, tile)
    np.testing.assert_array_equal(got, a_codes.numpy().astype(np.int64) @ w_codes.numpy().astype(np.int64).T)


def test_nibble_order_inside_a_register_does_not_matter():
    """A and B registers are read from identically laid out rows, so the product is the same
    whichever end of a register PTX numbers element 0 from: the packed format needs no reorder."""
    gen = torch.Generator().manual_seed(3)
    a_codes, w_codes = _codes(32, 128, False, gen), _codes(64, 128, True, gen)
    a_packed, b_packed = packing.pack_codes(a_codes, 4).numpy(), packing.pack_codes(w_codes, 4).numpy()
    ref = a_codes.numpy().astype(np.int64) @ w_codes.numpy().astype(np.int64).T
    for order in ("low_first", "high_first"):
        np.testing.assert_array_equal(warp_gemm(a_packed, b_packed, 128, False, (32, 64, 1, 4), order), ref)


def test_unsigned_codes_need_u4():
    """Post-ReLU codes 8..15 read as s4 would be -8..-1: the unsigned variant must use .u4."""
    gen = torch.Generator().manual_seed(5)
    a_codes = torch.full((32, 64), 15)
    w_codes = _codes(64, 64, True, gen)
    a_packed, b_packed = packing.pack_codes(a_codes, 4).numpy(), packing.pack_codes(w_codes, 4).numpy()
    ref = a_codes.numpy().astype(np.int64) @ w_codes.numpy().astype(np.int64).T
    assert not np.array_equal(warp_gemm(a_packed, b_packed, 64, True, (32, 64, 1, 4)), ref)
    np.testing.assert_array_equal(warp_gemm(a_packed, b_packed, 64, False, (32, 64, 1, 4)), ref)
