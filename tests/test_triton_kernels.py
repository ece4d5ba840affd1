"""What only the Triton backend (``hybridops.kernels``) has: the interpreter. The kernels' results
against the reference are tested, for every kernel backend, by ``test_kernels.py``.
"""
from __future__ import annotations

import pytest
import torch

from hybridops.backend import backend_unavailable_reason


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


@pytest.mark.skipif(backend_unavailable_reason("triton", "cpu") is not None, reason="needs Triton")
def test_derived_tensors_are_built_once_per_version_and_freed_with_their_source(monkeypatch):
    """Compute-ready weights and slot maps (kernels/_common.py, cached_derived): built on the first
    call, reused while the sources are unchanged, rebuilt after an in-place change or a replaced
    storage, and dropped when a source is freed."""
    import gc

    from hybridops.kernels import _common

    monkeypatch.setattr(_common, "_derived", {})  # this test's entries only
    calls = []

    def double(t, k):
        calls.append(k)
        return t * k

    w = torch.arange(4)
    first = _common.cached_derived(w, 2, double)
    assert _common.cached_derived(w, 2, double) is first and calls == [2]
    w.add_(1)  # in place: a new version
    assert torch.equal(_common.cached_derived(w, 2, double), (torch.arange(4) + 1) * 2) and calls == [2, 2]
    w.data = torch.zeros(4, dtype=torch.long)  # new storage, same tensor object and version (module.to does this)
    assert torch.equal(_common.cached_derived(w, 2, double), torch.zeros(4, dtype=torch.long)) and calls == [2] * 3
    key = ("double", 2, id(w))
    assert key in _common._derived and len(_common._derived) == 1  # rebuilt in place, not a new entry
    del w
    gc.collect()
    assert key not in _common._derived

    def shifted(t, k, bias, extra_none):
        calls.append(k)
        return t * k + bias

    w, b = torch.arange(3), torch.ones(3, dtype=torch.long)
    assert torch.equal(_common.cached_derived(w, 2, shifted, (b, None)), torch.tensor([1, 3, 5]))
    b.add_(1)  # a change in an extra source rebuilds too
    assert torch.equal(_common.cached_derived(w, 2, shifted, (b, None)), torch.tensor([2, 4, 6]))
    assert len(_common._derived) == 1
    del b
    gc.collect()
    assert not _common._derived  # any source freed: the entry goes
