"""What only the CUDA C++ backend (``csrc/``, extension ``hybridops._C``) has: the extension's
loading and build info, the qconv2d kernel selection (``qconv2d_plan``), devices and streams, and
the raw ``torch.ops.hybridops.cuda_*`` ops. The kernels' results against the reference are tested,
for every kernel backend, by ``test_kernels.py``.

GPU tests are marked ``gpu`` and skipped when the extension or a GPU is missing.
"""
from __future__ import annotations

import pytest
import torch
from test_kernels import (CONV_CASES, assert_same, conv_case_id, conv_cases, conv_inputs, epilogue_inputs,
                          make_qparams, poison_cuda_allocator, run_qconv)

from hybridops import backend
from hybridops.backend import backend_unavailable_reason
from hybridops.ops import cuda_ext

ops = torch.ops.hybridops
_EXT_REASON = backend_unavailable_reason("cuda", "cpu")  # None once the extension imports
_EXT_MISSING = _EXT_REASON is not None and "hybridops._C" in _EXT_REASON


def _gpu_skip_reason():
    if not torch.cuda.is_available():
        return "the cuda kernels need a CUDA GPU."
    return backend_unavailable_reason("cuda", "cuda")


def gpu(fn):
    """Mark a test as needing the extension and a GPU."""
    reason = _gpu_skip_reason() if not _EXT_MISSING else _EXT_REASON
    return pytest.mark.gpu(pytest.mark.skipif(reason is not None, reason=str(reason))(fn))


needs_ext = pytest.mark.skipif(_EXT_MISSING, reason=str(_EXT_REASON))


# ----------------------------------------------------------------------------- without a GPU
@pytest.mark.skipif(not _EXT_MISSING, reason="the extension is installed; this checks the error without it")
def test_missing_extension_message():
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=r"hybridops\._C.*pip install --no-build-isolation"):
        torch.ops.hybridops.fake_quantize(x, torch.tensor([1.0, 0.0]), 4, False, "cuda")


@needs_ext
def test_stale_extension_message(monkeypatch):
    """A build whose op schemas predate the sources is refused with a sentence saying so."""
    monkeypatch.setattr(cuda_ext, "OPS_VERSION", cuda_ext.OPS_VERSION + 1)
    cuda_ext.load.cache_clear()
    backend._cuda_ext_import_error.cache_clear()
    try:
        reason = backend_unavailable_reason("cuda", "cuda")
        assert reason is not None and "stale" in reason and "pip install" in reason
    finally:
        monkeypatch.undo()
        cuda_ext.load.cache_clear()
        backend._cuda_ext_import_error.cache_clear()
    assert backend_unavailable_reason("cuda", "cpu") == "the cuda backend runs on CUDA tensors, got a tensor on cpu."


@needs_ext
def test_build_info():
    info = cuda_ext.build_info()
    assert info["ops_version"] == cuda_ext.OPS_VERSION
    assert info["cuda_archs"] and info["cuda_runtime"] > 0
    assert set(info["qconv2d_kernels"]) == {"mma_128x128", "mma_64x64", "mma_32x64", "direct"}


@needs_ext
@pytest.mark.parametrize("case", conv_cases(), ids=conv_case_id)
def test_qconv2d_plan(case):
    """The kernel each shared CONV_CASES shape runs on an H100 (132 SMs)."""
    (n, cin, h, w, cout, k, stride, pad, dil, groups, *_), plan = case
    ho = (h + pad[0] + pad[1] - dil[0] * (k - 1) - 1) // stride[0] + 1
    wo = (w + pad[2] + pad[3] - dil[1] * (k - 1) - 1) // stride[1] + 1
    ext = cuda_ext.load()
    assert ext.qconv2d_plan(n * ho * wo, cin // groups, cout // groups, groups, False, 132) == plan
    # Packed requantization of an odd per-group channel count needs one writer per byte.
    assert ext.qconv2d_plan(n * ho * wo, 17, 17, 2, True, 132) == "direct"


@needs_ext
def test_conv_cases_exercise_every_kernel():
    assert {plan for _, plan in conv_cases()} == set(cuda_ext.build_info()["qconv2d_kernels"])
    assert len(CONV_CASES) == len(conv_cases())


# ----------------------------------------------------------------------------- GPU
@gpu
def test_qconv2d_other_device_and_stream():
    """Kernels run on the input's device and the current stream (no device 0 or default stream)."""
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    x_codes, w_packed, _ = conv_inputs(1, 32, 6, 6, 32, 3, 1, 4, False, 4)
    x_codes, w_packed = x_codes.to(dev), w_packed.to(dev)
    args = (x_codes, w_packed, 32, 4, False, 4, torch.ones(32, device=dev), None, [1, 1], [1, 1, 1, 1], [1, 1], 1)
    ref = run_qconv("torch", *args, out_dtype=torch.int32)
    poison_cuda_allocator(dev)
    stream = torch.cuda.Stream(device=dev)
    with torch.cuda.stream(stream):
        got = run_qconv("cuda", *args, out_dtype=torch.int32)
    stream.synchronize()
    assert_same(got, ref)


@gpu
def test_qconv2d_argument_errors():
    x_codes, w_packed, _ = conv_inputs(1, 8, 4, 4, 4, 3, 1, 4, False, 4)
    scale = torch.ones(4, device="cuda")
    tail = (None, [1, 1], [1, 1, 1, 1], [1, 1], 1, False, None, None, None, 4, False, torch.float32)
    with pytest.raises(RuntimeError, match=r"x_codes must be contiguous packed codes.*NHWC.*strides"):
        ops.cuda_qconv2d(x_codes.transpose(1, 2), w_packed, 8, 4, False, 4, scale, *tail)
    with pytest.raises(RuntimeError, match=r"w_packed has 2 bytes per tap, expected 4"):
        ops.cuda_qconv2d(x_codes, w_packed[..., :2].contiguous(), 8, 4, False, 4, scale, *tail)
    with pytest.raises(RuntimeError, match=r"scale must have shape \[4\], got \[5\]"):
        ops.cuda_qconv2d(x_codes, w_packed, 8, 4, False, 4, torch.ones(5, device="cuda"), *tail)
    with pytest.raises(RuntimeError, match=r"x_codes must have dtype Byte, got Float"):
        ops.cuda_qconv2d(x_codes.float(), w_packed, 8, 4, False, 4, scale, *tail)
    with pytest.raises(RuntimeError, match=r"w_packed must be a CUDA tensor on cuda.*got a tensor on cpu"):
        ops.cuda_qconv2d(x_codes, w_packed.cpu(), 8, 4, False, 4, scale, *tail)
    with pytest.raises(RuntimeError, match="unsigned 8-bit"):
        ops.cuda_quantize_activate(torch.randn(1, 2, 3, 3, device="cuda"), make_qparams(0.0, 1.0, False), 8, False,
                                   None, None, False, None, None)


@gpu
def test_opcheck_cuda_ops():
    x = torch.randn(2, 5, 3, 4, device="cuda")
    qp = make_qparams(-1.0, 1.0, False)
    torch.library.opcheck(ops.cuda_fake_quantize, (x, qp, 4, False))
    keep = torch.tensor([3, 1], device="cuda")
    torch.library.opcheck(ops.cuda_quantize_activate, (x, qp, 4, False, None, None, True, keep, None))
    torch.library.opcheck(ops.cuda_quantize_activate, (x.to(memory_format=torch.channels_last), qp, 5, True,
                                                       torch.rand(5, device="cuda"), None, False, None,
                                                       torch.float16))
    for cin, cout in [(6, 5), (32, 24)]:
        x_codes, w_packed, gen = conv_inputs(1, cin, 4, 4, cout, 3, 1, 4, False, 4)
        scale, bias, fp_out, fp_idx = epilogue_inputs(cout, 4, 4, 1, gen, [4, 1], torch.float32)
        torch.library.opcheck(ops.cuda_qconv2d, (x_codes, w_packed, cin, 4, False, 4, scale, bias, [1, 1],
                                                 [1, 1, 1, 1], [1, 1], 1, True, fp_out.contiguous(), fp_idx, None, 4,
                                                 False, torch.float32))
        torch.library.opcheck(ops.cuda_qconv2d, (x_codes, w_packed, cin, 4, False, 4, scale, None, [1, 1],
                                                 [1, 1, 1, 1], [1, 1], 1, False, None, None, qp, 4, False,
                                                 torch.float32))
        torch.library.opcheck(ops.cuda_qconv2d, (x_codes, w_packed, cin, 4, False, 4, scale, None, [2, 1],
                                                 [0, 1, 2, 0], [1, 1], 1, False, None, None, None, 4, False,
                                                 torch.int32))
