"""Pieces shared by the Triton kernels: the quantizer arithmetic, nibble unpacking, launch options.

The quantizer (eq 6-9) must give codes bitwise equal to :mod:`hybridops.ops.reference`, so it
repeats the reference's fp32 operation order exactly, and every kernel that computes codes from
floats is launched with ``enable_fp_fusion=False``: otherwise the compiler contracts
``mag * alpha + beta`` into one FMA, whose single rounding differs from torch's two.
"""
from __future__ import annotations

import operator
import os

import torch
import triton
import triton.language as tl

# Forwarded to every launch. The interpreter drops keywords that are not kernel arguments, and
# numpy never contracts, so this is also correct under TRITON_INTERPRET=1.
LAUNCH_OPTS = {"enable_fp_fusion": False}

# Read here, not from hybridops.backend_selection: kernels import nothing above the op layer.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_index(v) -> int:
    """A loop bound as a Python int under the interpreter, where every scalar (a kernel argument,
    ``tl.program_id``, and whatever a kernel computes from them, even ``it_lo = 0``) is a
    ``tl.tensor`` holding a one-element numpy array."""
    if isinstance(v, tl.constexpr):
        v = v.value
    if isinstance(v, tl.tensor):
        data = v.handle.data
        if data.size != 1:
            raise TypeError(f"a loop bound must be a scalar, got a tensor of shape {tuple(v.shape)}")
        return int(data.reshape(()))
    return operator.index(v)


def _interpreter_range(arg1, arg2=None, step=None, **hints):
    """``tl.range`` under TRITON_INTERPRET=1: Python's range over the bounds as ints; the compiler
    hints (``num_stages``, ...) mean nothing there."""
    start, end = (0, arg1) if arg2 is None else (arg1, arg2)
    return range(_interpreter_index(start), _interpreter_index(end), 1 if step is None else _interpreter_index(step))


# The kernels' loops over run-time bounds: ``for i in loop_range(lo, hi)`` (builtin ``range`` and
# ``tl.range`` take the same arguments, keywords included).
#
# Compiled, this *is* ``tl.range``: the code generator resolves the global and sees
# ``triton.language.range`` itself, so the loop (pipelining and all) is the IR that
# ``tl.range(...)`` or the builtin ``range(...)`` gives (builtin ``range`` lowers as ``tl.range``
# with its defaults): no argument, constexpr or other, is added to the kernels, and their TTGIR
# and PTX are unchanged (checked for every shipped tile and variant on Triton 3.6 and 3.8).
# Chosen at import, like the interpreter itself (triton.jit reads TRITON_INTERPRET when it wraps).
#
# Interpreted, the interpreter runs the kernel as Python, where ``range(lo, hi)`` calls
# ``__index__`` on ``lo`` and ``hi``: ``tl.tensor``s whose data is a one-element (not
# zero-dimensional) numpy array. Up to Triton 3.6 the interpreter's ``__index__`` is
# ``int(self.handle.data)``, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted
# to Python scalars": the NumPy 1.25 deprecation of scalar conversion of ndim > 0 arrays, expired);
# Triton 3.8 squeezes the array first (triton-lang/triton#9171). Converting the bounds here makes
# the loops independent of both, on every Triton and NumPy version.
loop_range = _interpreter_range if INTERPRET else tl.range


def check_device(t: torch.Tensor, name: str) -> None:
    """Triton kernels need CUDA tensors, except under the CPU interpreter."""
    if t.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"the triton kernels expect {name} on a CUDA device, got {t.device} "
            "(set TRITON_INTERPRET=1 to run them on the CPU, or use backend='torch')."
        )


# CUDA's launch limits: grid x up to 2^31 - 1, y and z up to 65535.
_GRID_LIMITS = (2**31 - 1, 65535, 65535)
INT32_MAX = 2**31 - 1


def check_grid(grid, kernel: str) -> None:
    """Refuse a launch grid past CUDA's limits with a sentence saying which axis and why (the
    driver's own error names neither)."""
    for axis, (size, limit) in enumerate(zip(grid, _GRID_LIMITS)):
        if size > limit:
            raise ValueError(f"{kernel}: launch grid axis {'xyz'[axis]} would be {size} programs, past CUDA's "
                             f"limit of {limit}; split the batch or the channels into several calls.")


def check_int32_span(count: int, what: str) -> None:
    """The kernels compute offsets inside one image (and pixel indices) in int32, and only the
    per-image base offsets in int64: refuse inputs where such an offset could overflow."""
    if count > INT32_MAX:
        raise ValueError(f"{what} spans {count} elements, past the 2^31 - 1 that the kernels index in int32; "
                         "use smaller images or batches.")


@triton.jit
def quant_codes(t, alpha, beta, LEVELS: tl.constexpr, SIGNED: tl.constexpr):
    """Integer codes (int32) of ``t`` under eq 6-7 (``SIGNED``) or eq 8-9, in the reference's
    order: ``u = clamp(mag * alpha + beta, 0, 1)``, ``q = floor(u * levels + 0.5)``, times
    ``sign(t)`` for signed codes. ``t``, ``alpha``, ``beta`` share one float dtype."""
    if SIGNED:
        mag = tl.abs(t)
    else:
        mag = t
    u = mag * alpha + beta
    # clamp(u, 0, 1) written with comparisons so that NaN maps to 0 and hence to code 0, as in
    # the reference, whatever NaN convention the platform's min/max follow.
    u = tl.where(u > 0.0, tl.where(u < 1.0, u, 1.0), 0.0)
    q = tl.floor(u * LEVELS + 0.5).to(tl.int32)
    if SIGNED:
        # sign(0) = 0: a zero input gives code 0 even when beta rounds up to a level.
        q = tl.where(t > 0, q, tl.where(t < 0, -q, 0))
    return q


@triton.jit
def unpack_nibble(v, shift, SIGNED: tl.constexpr):
    """The 4-bit code at bit ``shift`` (0 or 4) of bytes ``v`` (int32), as int8; signed codes
    are 4-bit two's complement, sign-extended by ``(x ^ 8) - 8``."""
    x = (v >> shift) & 0xF
    if SIGNED:
        x = (x ^ 8) - 8
    return x.to(tl.int8)


# SWAR nibble expansion (issue 11): each 32-bit register holds four packed bytes; two masks and a
# shift split them into four low and four high codes at once, instead of one byte per operation.
# A signed nibble (bit 3 set) becomes a negative int8 by OR-ing 0xF0 into its byte:
# (x & 0x08) * 30 = 0xF0 per byte, and no product crosses into the next byte (0x08 * 30 < 0x100).
# swar_unpack_reference in tests/test_kernels.py repeats these operations on numpy words.
_SWAR_SPLIT = """{
.reg .b32 t;
and.b32 $0, $2, 0x0F0F0F0F;
shr.b32 t, $2, 4;
and.b32 $1, t, 0x0F0F0F0F;
"""
_SWAR_SIGN = """.reg .b32 s;
and.b32 s, $0, 0x08080808;
mul.lo.u32 s, s, 30;
or.b32 $0, $0, s;
and.b32 s, $1, 0x08080808;
mul.lo.u32 s, s, 30;
or.b32 $1, $1, s;
"""
SWAR_UNSIGNED_ASM = tl.constexpr(_SWAR_SPLIT + "}")
SWAR_SIGNED_ASM = tl.constexpr(_SWAR_SPLIT + _SWAR_SIGN + "}")


@triton.jit
def unpack_nibbles(v, SIGNED: tl.constexpr, SWAR: tl.constexpr):
    """Bytes ``v`` (uint8) -> ``(low, high)`` nibble codes as int8 tiles of ``v``'s shape.
    ``SWAR``: four bytes per 32-bit operation (inline PTX, GPU only); otherwise one
    :func:`unpack_nibble` per byte (the interpreter's path, with the same results)."""
    if SWAR:
        if SIGNED:
            lo, hi = tl.inline_asm_elementwise(SWAR_SIGNED_ASM, "=r,=r,r", [v], dtype=(tl.int8, tl.int8),
                                               is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(SWAR_UNSIGNED_ASM, "=r,=r,r", [v], dtype=(tl.int8, tl.int8),
                                               is_pure=True, pack=4)
    else:
        w = v.to(tl.int32)
        lo = unpack_nibble(w, 0, SIGNED)
        hi = unpack_nibble(w, 4, SIGNED)
    return lo, hi


@triton.jit
def pack_pairs(q, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """``q (BLOCK_ROWS, BLOCK_COLS)`` int32 codes of consecutive channels -> bytes
    ``(BLOCK_ROWS, BLOCK_COLS // 2)``: channel ``2j`` in the low nibble, ``2j + 1`` in the high
    one (the packing format of :mod:`hybridops.kernels.packing`)."""
    lo, hi = tl.split(tl.reshape(q, (BLOCK_ROWS, BLOCK_COLS // 2, 2)))
    return ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)
