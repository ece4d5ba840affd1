"""What only the Triton backend (``hybridops.kernels``) has: the interpreter. The kernels' results
against the reference are tested, for every kernel backend, by ``test_kernels.py``.
"""
from __future__ import annotations

import pytest
import torch

from hybridops.backend_selection import backend_unavailable_reason


@pytest.mark.skipif(backend_unavailable_reason("triton", "cpu") is not None,
                    reason="checks the CPU-tensor error of a GPU run; needs Triton and TRITON_INTERPRET=1")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    from hybridops.kernels import _common

    monkeypatch.setattr(_common, "INTERPRET", False)
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="CUDA device, got cpu"):
        torch.ops.hybridops.fake_quantize(x, torch.tensor([1.0, 0.0]), 4, False, "triton")


def _run_ptx(asm: str, word: "np.ndarray") -> tuple:
    """Execute the SWAR unpacking PTX of ``kernels/_common.py`` on numpy uint32 words: its four
    instructions (and, shr, mul.lo, or on 32-bit registers), operands ``$0, $1`` (outputs) and
    ``$2`` (the packed input), as the GPU would. Anything else in the text fails the test."""
    import numpy as np

    regs = {"$2": word.astype(np.uint32)}
    for line in asm.strip().strip("{}").splitlines():
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.rstrip(";").split(None, 1)
        dst, *src = [a.strip() for a in rest.split(",")]
        vals = [regs[a] if a in regs else np.uint32(int(a, 0)) for a in src]
        if op == "and.b32":
            regs[dst] = vals[0] & vals[1]
        elif op == "or.b32":
            regs[dst] = vals[0] | vals[1]
        elif op == "shr.b32":
            regs[dst] = vals[0] >> vals[1]
        elif op == "mul.lo.u32":
            regs[dst] = (vals[0].astype(np.uint64) * np.uint64(vals[1]) & 0xFFFFFFFF).astype(np.uint32)
        else:
            raise AssertionError(f"unexpected PTX instruction {line!r}")
    return regs["$0"], regs["$1"]


@pytest.mark.parametrize("signed", [False, True])
def test_swar_nibble_unpacking_matches_the_format(signed):
    """The inline PTX that splits four packed bytes per register (GPU only) gives, byte for byte,
    the codes of hybridops.kernels.packing.unpack_codes: every byte value in every byte position."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("triton")
    from hybridops.kernels import _common
    from hybridops.kernels.packing import unpack_codes

    asm = (_common.SWAR_SIGNED_ASM if signed else _common.SWAR_UNSIGNED_ASM).value
    rng = np.random.default_rng(0)
    b = np.concatenate([np.repeat(np.arange(256, dtype=np.uint8)[:, None], 4, 1),  # each value in each byte
                        rng.integers(0, 256, (4096, 4), dtype=np.uint8)])
    lo, hi = _run_ptx(asm, b.view("<u4")[:, 0])
    got = np.stack([lo.view(np.uint8).reshape(-1, 4), hi.view(np.uint8).reshape(-1, 4)], -1).reshape(-1, 8)
    expect = unpack_codes(torch.from_numpy(b), 4, 8, signed).numpy().view(np.uint8)
    np.testing.assert_array_equal(got, expect)




@pytest.mark.skipif(backend_unavailable_reason("triton", "cpu") is not None,
                    reason="checks the interpreter's loops; needs Triton and TRITON_INTERPRET=1")
def test_interpreter_loops_take_one_element_array_bounds():
    """Under the interpreter every scalar of a kernel is a tl.tensor over a one-element numpy array,
    and the kernels' run-time loops take such bounds through ``_common.loop_range``: Python ints,
    whether or not the interpreter's own ``__index__`` can convert them (Triton <= 3.6 calls
    ``int()`` on the array, which NumPy >= 2.4 refuses). Compiled, ``loop_range`` is ``tl.range``."""
    np = pytest.importorskip("numpy")
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    from hybridops.kernels import _common

    def scalar(v):
        return tl.tensor(TensorHandle(np.array([v], dtype=np.int32), tl.int32), tl.int32)

    assert _common.loop_range is _common._interpreter_range
    assert list(_common.loop_range(scalar(2), scalar(7), num_stages=1)) == [2, 3, 4, 5, 6]
    assert list(_common.loop_range(scalar(3))) == [0, 1, 2]
    assert list(_common.loop_range(0, scalar(9), scalar(4))) == [0, 4, 8]
    assert list(_common.loop_range(scalar(5), tl.constexpr(3))) == []
    block = tl.tensor(TensorHandle(np.arange(2, dtype=np.int32), tl.int32), tl.block_type(tl.int32, [2]))
    with pytest.raises(TypeError, match="must be a scalar"):
        _common.loop_range(block)
