"""The CUDA C++ kernels (``csrc/``, extension ``hybridops._C``) against the plain-torch reference,
through the ``hybridops::`` custom ops and the raw ``torch.ops.hybridops.cuda_*`` ops.

GPU tests are marked ``gpu`` and skipped when the extension or a GPU is missing. Integer results
(accumulators, packed codes) must be exactly equal. Float outputs: the kernels perform the same
IEEE fp32 operations in the same order as the reference (no FMA contraction), so they agree in
practice; the tolerances below allow one unit in the last place of the final rounding.

Outputs are allocated in C++, out of reach of a monkeypatched ``torch.empty``; instead each GPU
test first fills the CUDA caching allocator's free blocks with 0xFF bytes (NaN in every float
dtype, -1 in int32, 255 in uint8), so that elements a kernel forgets to write fail the comparison.
"""
from __future__ import annotations

import pytest
import torch

from hybridops import backend
from hybridops.backend import backend_unavailable_reason
from hybridops.ops import cuda_ext, packing

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
DEVICE = "cuda"

# One unit in the last place of the output dtype, relative; absolute for values near zero.
TOL = {torch.float32: dict(rtol=1.3e-6, atol=1e-5), torch.float64: dict(rtol=1.3e-6, atol=1e-5),
       torch.float16: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


@pytest.fixture(autouse=True)
def poison_allocator(request):
    if request.node.get_closest_marker("gpu") is None or _gpu_skip_reason() is not None:
        yield
        return
    blocks = [torch.full((n,), 0xFF, dtype=torch.uint8, device=DEVICE)
              for n in [512] * 64 + [32 << 10] * 32 + [1 << 20] * 4 + [8 << 20, 32 << 20]]
    del blocks
    yield


def _qparams(lo: float, hi: float, signed: bool) -> torch.Tensor:
    """[alpha, beta] mapping [lo, hi] onto [0, 1] (eq 8), or |t| <= hi onto [0, 1] (eq 6)."""
    if signed:
        return torch.tensor([1.0 / hi, 0.0], device=DEVICE)
    return torch.tensor([1.0 / (hi - lo), -lo / (hi - lo)], device=DEVICE)


def _codes(shape, bits: int, signed: bool, gen: torch.Generator) -> torch.Tensor:
    lv = packing.levels(bits, signed)
    return torch.randint(-lv if signed else 0, lv + 1, shape, generator=gen)


def _assert_same(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, got.dtype, ref.shape, ref.dtype)
    if got.dtype.is_floating_point:
        assert not got.isnan().any() or ref.isnan().any(), "unwritten (NaN-poisoned) output elements"
        torch.testing.assert_close(got, ref, **TOL[got.dtype])
    else:
        assert torch.equal(got, ref), f"{(got != ref).sum().item()} of {got.numel()} elements differ"


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


# ----------------------------------------------------------------------------- fake_quantize
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bits,signed", [(2, True), (4, False), (5, True), (8, True), (8, False)])
def test_fake_quantize(dtype, bits, signed):
    gen = torch.Generator().manual_seed(bits)
    x = (torch.randn(3, 5, 7, 9, generator=gen) * 2).to(DEVICE, dtype)
    x[0, 0, 0, :3] = torch.tensor([0.0, -0.0, 3.0])  # zero sign, and a value on the clamp
    qp = _qparams(-2.0, 3.0, signed)
    for inp in (x, x.to(memory_format=torch.channels_last), x[:, 1::2, :, ::3], x.flatten()[1:]):
        got = ops.fake_quantize(inp, qp, bits, signed, "cuda")
        ref = ops.fake_quantize(inp, qp, bits, signed, "torch")
        # Codes are exact; code / levels rounds like torch's CUDA division by a scalar.
        _assert_same(got, ref)
        assert torch.equal(got, ref)
        if inp.is_non_overlapping_and_dense():
            assert got.stride() == inp.stride()


@gpu
def test_fake_quantize_empty():
    x = torch.empty(0, 4, device=DEVICE)
    assert ops.fake_quantize(x, _qparams(0.0, 1.0, False), 4, False, "cuda").shape == (0, 4)


# ----------------------------------------------------------------------------- quantize_activate
@gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("bits,signed", [(2, False), (3, True), (4, False), (4, True), (5, False), (7, True),
                                         (8, True)])
@pytest.mark.parametrize("channels", [1, 3, 7, 16, 17, 64])
def test_quantize_activate_codes(layout, bits, signed, channels):
    gen = torch.Generator().manual_seed(channels)
    x = torch.randn(2, channels, 5, 6, generator=gen).to(DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x[..., ::2]
    qp = _qparams(-2.0, 2.0, signed)
    got = ops.quantize_activate(x, qp, bits, signed, None, None, False, None, None, "cuda")
    ref = ops.quantize_activate(x, qp, bits, signed, None, None, False, None, None, "torch")
    _assert_same(got[1], ref[1])
    assert got[0].shape == ref[0].shape == (0,) and got[0].dtype == ref[0].dtype


@gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype,slice_dtype", [(torch.float32, None), (torch.float16, torch.float32),
                                               (torch.float32, torch.float16), (torch.float64, None),
                                               (torch.bfloat16, None), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("bits,signed,relu", [(4, False, True), (5, True, False), (3, False, False)])
@pytest.mark.parametrize("c", [9, 32])
def test_quantize_activate_fused(layout, dtype, slice_dtype, bits, signed, relu, c):
    gen = torch.Generator().manual_seed(bits + c)
    x = (torch.randn(2, c, 4, 10, generator=gen) * 1.5).to(DEVICE, dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x[:, :, :, ::3]
    bn_scale = (torch.rand(c, generator=gen) + 0.5).to(DEVICE)
    bn_shift = (torch.randn(c, generator=gen) * 0.3).to(DEVICE, torch.float64)
    keep = torch.tensor([7, 0, 3, 8, 3], device=DEVICE, dtype=torch.int32)  # unsorted, one repeated
    qp = _qparams(-1.0, 2.5, signed)
    args = (x, qp, bits, signed, bn_scale, bn_shift, relu, keep, slice_dtype)
    got = ops.quantize_activate(*args, "cuda")
    ref = ops.quantize_activate(*args, "torch")
    _assert_same(got[1], ref[1])
    assert len(ref[1].unique()) > 2  # the codes are not trivially constant
    # The slice is the same fp32 value cast once: equal.
    _assert_same(got[0], ref[0])
    assert torch.equal(got[0], ref[0])


@gpu
def test_quantize_activate_empty_batch():
    x = torch.randn(0, 5, 3, 3, device=DEVICE)
    keep = torch.tensor([1, 4], device=DEVICE)
    x_slice, codes = ops.quantize_activate(x, _qparams(0.0, 1.0, False), 4, False, None, None, True, keep, None,
                                           "cuda")
    assert x_slice.shape == (0, 3, 3, 2) and codes.shape == (0, 3, 3, 3) and codes.dtype == torch.uint8


# ----------------------------------------------------------------------------- qconv2d
def _conv_inputs(n, cin, h, w, cout, k, groups, bits_a, a_signed, bits_w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    x_codes = packing.pack_codes(_codes((n, h, w, cin), bits_a, a_signed, gen), bits_a).to(DEVICE)
    w_packed = packing.pack_weight(_codes((cout, cin // groups, kh, kw), bits_w, True, gen), bits_w).to(DEVICE)
    return x_codes, w_packed, gen


def _qconv(backend_name, x_codes, w_packed, cin, bits_a, a_signed, bits_w, scale, bias, stride, padding, dilation,
           groups, relu=False, fp_out=None, fp_idx=None, rq=None, rq_bits=4, rq_signed=False, out_dtype=torch.float32):
    return ops.qconv2d(x_codes, w_packed, cin, bits_a, a_signed, bits_w, scale, bias, list(stride), list(padding),
                       list(dilation), groups, relu, fp_out, fp_idx, rq, rq_bits, rq_signed, out_dtype, backend_name)


# (N, C_in, H, W, C_out, kernel, stride, padding (t, b, l, r), dilation, groups, bits_a, a_signed, bits_w)
# and the kernel each runs on the project's H100 (132 SMs), see test_qconv2d_plan.
CONV_CASES = [
    ((1, 3, 9, 9, 8, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1, 4, False, 4), "direct"),     # stem, batch 1, C_in 3
    ((2, 17, 6, 7, 33, 3, (1, 1), (2, 2, 2, 2), (2, 2), 1, 5, True, 8), "mma_32x64"),  # C_in 17: gathered loads
    ((1, 64, 9, 9, 48, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 4, False, 4), "mma_32x64"),  # cp.async, 4-bit
    ((2, 32, 7, 7, 40, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, 7, False, 2), "mma_32x64"),  # 1x1
    ((1, 32, 8, 9, 24, 1, (2, 2), (0, 1, 1, 0), (1, 1), 1, 4, True, 4), "mma_32x64"),   # strided 1x1, asym. pad
    ((1, 96, 13, 13, 64, 5, (2, 2), (0, 0, 0, 0), (1, 1), 1, 4, False, 4), "mma_32x64"),  # RT-MDNet conv2-like
    ((2, 48, 11, 13, 20, 5, (2, 2), (2, 1, 0, 3), (1, 3), 1, 5, True, 5), "mma_32x64"),  # 5x5, dil 3, asym pad
    ((1, 40, 7, 8, 36, 3, (1, 2), (4, 4, 5, 4), (3, 2), 1, 8, True, 4), "mma_32x64"),  # padding > kernel, dil 3
    ((1, 16, 2, 3, 16, 5, (1, 1), (2, 2, 2, 2), (1, 1), 1, 4, False, 8), "mma_32x64"),  # H, W < kernel
    ((1, 16, 9, 8, 16, 7, (1, 1), (3, 3, 3, 3), (1, 1), 1, 5, True, 5), "mma_32x64"),   # 7x7, one-byte codes
    ((1, 150, 6, 6, 20, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 4, False, 4), "mma_32x64"),  # 3 K chunks, tail
    ((1, 64, 6, 6, 64, 3, (1, 1), (1, 1, 1, 1), (1, 1), 2, 4, True, 4), "mma_32x64"),   # groups, aligned
    ((1, 34, 5, 6, 34, 3, (1, 1), (1, 1, 1, 1), (1, 1), 2, 4, False, 2), "mma_32x64"),  # group 1 starts mid-byte
    ((1, 51, 5, 5, 48, 3, (2, 1), (1, 1, 1, 1), (1, 1), 3, 5, False, 4), "mma_32x64"),  # groups, mixed widths
    ((1, 8, 6, 6, 12, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4, 4, True, 2), "direct"),       # C_out/g = 3 (odd)
    ((1, 32, 7, 7, 32, 3, (1, 1), (1, 1, 1, 1), (1, 1), 32, 4, False, 4), "direct"),    # depthwise
    ((1, 5, 4, 5, 10, 3, (2, 2), (1, 1, 1, 1), (2, 1), 5, 7, False, 8), "direct"),     # depthwise x2, C_in 5
    ((1, 160, 5, 5, 24, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 4, False, 8), "mma_32x64"),  # cp.async, K tail
    ((2, 64, 56, 56, 128, 3, (1, 1), (2, 2, 2, 2), (2, 2), 1, 4, False, 4), "mma_64x64"),  # dilated 3x3
    ((8, 64, 48, 48, 256, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 4, False, 4), "mma_128x128"),  # batch, big tiles
    ((8, 64, 48, 48, 256, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 8, True, 8), "mma_128x128"),   # one-byte, big tiles
]


def _case_id(case):
    c = case[0]
    return "x".join(map(str, c[:6])) + f"-g{c[9]}-a{c[10]}{'s' if c[11] else 'u'}w{c[12]}"


@needs_ext
@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
def test_qconv2d_plan(case):
    """Every kernel (tile shape and the direct path) is exercised by CONV_CASES on an H100."""
    (n, cin, h, w, cout, k, stride, pad, dil, groups, *_), plan = case
    ho = (h + pad[0] + pad[1] - dil[0] * (k - 1) - 1) // stride[0] + 1
    wo = (w + pad[2] + pad[3] - dil[1] * (k - 1) - 1) // stride[1] + 1
    ext = cuda_ext.load()
    assert ext.qconv2d_plan(n * ho * wo, cin // groups, cout // groups, groups, False, 132) == plan
    # Packed requantization of an odd per-group channel count needs one writer per byte.
    assert ext.qconv2d_plan(n * ho * wo, 17, 17, 2, True, 132) == "direct"


@gpu
@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
def test_qconv2d_accumulators(case):
    n, cin, h, w, cout, k, stride, pad, dil, groups, ba, asg, bw = case[0]
    x_codes, w_packed, _ = _conv_inputs(n, cin, h, w, cout, k, groups, ba, asg, bw)
    scale = torch.ones(cout, device=DEVICE)
    args = (x_codes, w_packed, cin, ba, asg, bw, scale, None, stride, pad, dil, groups)
    _assert_same(_qconv("cuda", *args, out_dtype=torch.int32), _qconv("torch", *args, out_dtype=torch.int32))


@gpu
@pytest.mark.parametrize("cin", [32, 24, 6])  # cp.async rows, gathered rows, direct path
@pytest.mark.parametrize("bits_w", [2, 4, 5, 8])
@pytest.mark.parametrize("bits_a,a_signed", [(4, False), (4, True), (5, False), (7, False), (7, True), (8, True),
                                             (2, False)])
def test_qconv2d_bit_widths(cin, bits_a, a_signed, bits_w):
    cout = 20
    x_codes, w_packed, _ = _conv_inputs(2, cin, 5, 4, cout, 3, 1, bits_a, a_signed, bits_w, seed=bits_a * 9 + bits_w)
    args = (x_codes, w_packed, cin, bits_a, a_signed, bits_w, torch.ones(cout, device=DEVICE), None, (1, 1),
            (1, 1, 1, 1), (1, 1), 1)
    _assert_same(_qconv("cuda", *args, out_dtype=torch.int32), _qconv("torch", *args, out_dtype=torch.int32))


@gpu
def test_qconv2d_extreme_codes():
    """Largest-magnitude codes everywhere: the int8 widening and sign extension at the range ends."""
    for bits_a, a_signed, bits_w in [(4, True, 4), (4, False, 4), (7, False, 8), (8, True, 8), (8, True, 2)]:
        lva, lvw = packing.levels(bits_a, a_signed), packing.levels(bits_w, True)
        cin, cout = 64, 32
        a = torch.full((1, 5, 5, cin), lva, dtype=torch.int16)
        a[..., 1::2] = -lva if a_signed else 0
        wq = torch.full((cout, cin, 3, 3), -lvw, dtype=torch.int16)
        wq[:, ::3] = lvw
        x_codes = packing.pack_codes(a, bits_a).to(DEVICE)
        w_packed = packing.pack_weight(wq, bits_w).to(DEVICE)
        args = (x_codes, w_packed, cin, bits_a, a_signed, bits_w, torch.ones(cout, device=DEVICE), None, (1, 1),
                (1, 1, 1, 1), (1, 1), 1)
        _assert_same(_qconv("cuda", *args, out_dtype=torch.int32), _qconv("torch", *args, out_dtype=torch.int32))


def _epilogue_inputs(cout, ho, wo, n, gen, kept, fp_dtype):
    scale = (torch.rand(cout, generator=gen) * 0.02 + 0.01).to(DEVICE)
    bias = torch.randn(cout, generator=gen).to(DEVICE)
    # The pruned branch's output for the kept channels only, as a non-contiguous NHWC view.
    fp_big = torch.randn(n, ho, wo, 2 * len(kept), generator=gen).to(DEVICE, fp_dtype)
    return scale, bias, fp_big[..., ::2], torch.tensor(kept, device=DEVICE)


@gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_bias,with_fp,relu", [(True, True, True), (False, True, False), (True, False, True)])
@pytest.mark.parametrize("cin,cout", [(13, 11), (32, 40)])  # direct path, tensor cores
def test_qconv2d_float_epilogue(out_dtype, with_bias, with_fp, relu, cin, cout):
    n = 2
    x_codes, w_packed, gen = _conv_inputs(n, cin, 6, 5, cout, 3, 1, 4, False, 4, seed=3)
    scale, bias, fp_out, fp_idx = _epilogue_inputs(cout, 3, 2, n, gen, [9, 2, 5, 0, cout - 1], torch.float16)
    args = (x_codes, w_packed, cin, 4, False, 4, scale, bias if with_bias else None, (2, 2), (1, 1, 1, 0), (1, 1), 1)
    ep = dict(relu=relu, fp_out=fp_out if with_fp else None, fp_idx=fp_idx if with_fp else None, out_dtype=out_dtype)
    _assert_same(_qconv("cuda", *args, **ep), _qconv("torch", *args, **ep))


@gpu
@pytest.mark.parametrize("cin,cout,groups", [(16, 24, 1), (6, 6, 1), (64, 96, 2)])
def test_qconv2d_fp_add_repeated_index(cin, cout, groups):
    """Unsorted kept channels with a repeat (index_add sums both columns) and int64/int32 indices."""
    n = 1
    x_codes, w_packed, gen = _conv_inputs(n, cin, 5, 5, cout, 3, groups, 4, False, 4, seed=7)
    for idx_dtype in (torch.int64, torch.int32):
        scale, bias, fp_out, fp_idx = _epilogue_inputs(cout, 5, 5, n, gen, [cout - 1, 3, 0, 3, 5, 3], torch.float32)
        fp_idx = fp_idx.to(idx_dtype)
        args = (x_codes, w_packed, cin, 4, False, 4, scale, bias, (1, 1), (1, 1, 1, 1), (1, 1), groups)
        ep = dict(relu=True, fp_out=fp_out, fp_idx=fp_idx)
        _assert_same(_qconv("cuda", *args, **ep), _qconv("torch", *args, **ep))


@gpu
@pytest.mark.parametrize("rq_bits,rq_signed", [(4, False), (2, False), (4, True), (5, False), (5, True), (8, True),
                                               (8, False)])
@pytest.mark.parametrize("cin,cout,groups", [(10, 7, 1), (10, 10, 5), (32, 33, 1), (34, 34, 2), (64, 64, 2)])
def test_qconv2d_requantize(rq_bits, rq_signed, cin, cout, groups):
    n, h, w = 2, 5, 5
    x_codes, w_packed, gen = _conv_inputs(n, cin, h, w, cout, 3, groups, 5, False, 4, seed=cout)
    scale, bias, fp_out, fp_idx = _epilogue_inputs(cout, h, w, n, gen, [cout - 1, 0, cout // 2], torch.float32)
    scale = scale / (cin // groups) * 10
    args = (x_codes, w_packed, cin, 5, False, 4, scale, bias, (1, 1), (1, 1, 1, 1), (1, 1), groups)
    ep = dict(relu=not rq_signed, fp_out=fp_out, fp_idx=fp_idx)
    y = _qconv("torch", *args, **ep)
    rq = _qparams(y.min().item(), y.max().item(), False) if not rq_signed else _qparams(0.0, y.abs().max().item(), True)
    got = _qconv("cuda", *args, **ep, rq=rq, rq_bits=rq_bits, rq_signed=rq_signed)
    ref = _qconv("torch", *args, **ep, rq=rq, rq_bits=rq_bits, rq_signed=rq_signed)
    _assert_same(got, ref)
    assert ref.shape[-1] == packing.packed_size(cout, rq_bits)
    assert len(packing.unpack_codes(ref, rq_bits, cout, rq_signed).unique()) > 2


@gpu
def test_qconv2d_empty_batch():
    x_codes, w_packed, _ = _conv_inputs(0, 6, 5, 5, 4, 3, 1, 4, False, 4)
    args = (x_codes, w_packed, 6, 4, False, 4, torch.ones(4, device=DEVICE), None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert _qconv("cuda", *args).shape == (0, 5, 5, 4)
    assert _qconv("cuda", *args, rq=_qparams(0.0, 1.0, False), rq_bits=4).shape == (0, 5, 5, 2)


@gpu
def test_qconv2d_other_device_and_stream():
    """Kernels run on the input's device and the current stream (no device 0 or default stream)."""
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    x_codes, w_packed, _ = _conv_inputs(1, 32, 6, 6, 32, 3, 1, 4, False, 4)
    x_codes, w_packed = x_codes.to(dev), w_packed.to(dev)
    args = (x_codes, w_packed, 32, 4, False, 4, torch.ones(32, device=dev), None, [1, 1], [1, 1, 1, 1], [1, 1], 1)
    ref = _qconv("torch", *args, out_dtype=torch.int32)
    stream = torch.cuda.Stream(device=dev)
    with torch.cuda.stream(stream):
        got = _qconv("cuda", *args, out_dtype=torch.int32)
    stream.synchronize()
    _assert_same(got, ref)


@gpu
def test_qconv2d_argument_errors():
    x_codes, w_packed, _ = _conv_inputs(1, 8, 4, 4, 4, 3, 1, 4, False, 4)
    scale = torch.ones(4, device=DEVICE)
    tail = (None, [1, 1], [1, 1, 1, 1], [1, 1], 1, False, None, None, None, 4, False, torch.float32)
    with pytest.raises(RuntimeError, match=r"x_codes must be contiguous packed codes.*NHWC.*strides"):
        ops.cuda_qconv2d(x_codes.transpose(1, 2), w_packed, 8, 4, False, 4, scale, *tail)
    with pytest.raises(RuntimeError, match=r"w_packed has 2 bytes per tap, expected 4"):
        ops.cuda_qconv2d(x_codes, w_packed[..., :2].contiguous(), 8, 4, False, 4, scale, *tail)
    with pytest.raises(RuntimeError, match=r"scale must have shape \[4\], got \[5\]"):
        ops.cuda_qconv2d(x_codes, w_packed, 8, 4, False, 4, torch.ones(5, device=DEVICE), *tail)
    with pytest.raises(RuntimeError, match=r"x_codes must have dtype Byte, got Float"):
        ops.cuda_qconv2d(x_codes.float(), w_packed, 8, 4, False, 4, scale, *tail)
    with pytest.raises(RuntimeError, match=r"w_packed must be a CUDA tensor on cuda.*got a tensor on cpu"):
        ops.cuda_qconv2d(x_codes, w_packed.cpu(), 8, 4, False, 4, scale, *tail)
    with pytest.raises(RuntimeError, match="unsigned 8-bit"):
        ops.cuda_quantize_activate(torch.randn(1, 2, 3, 3, device=DEVICE), _qparams(0.0, 1.0, False), 8, False, None,
                                   None, False, None, None)


# ----------------------------------------------------------------------------- opcheck
@gpu
def test_opcheck_cuda_ops():
    x = torch.randn(2, 5, 3, 4, device=DEVICE)
    qp = _qparams(-1.0, 1.0, False)
    torch.library.opcheck(ops.cuda_fake_quantize, (x, qp, 4, False))
    keep = torch.tensor([3, 1], device=DEVICE)
    torch.library.opcheck(ops.cuda_quantize_activate, (x, qp, 4, False, None, None, True, keep, None))
    torch.library.opcheck(ops.cuda_quantize_activate, (x.to(memory_format=torch.channels_last), qp, 5, True,
                                                       torch.rand(5, device=DEVICE), None, False, None,
                                                       torch.float16))
    for cin, cout in [(6, 5), (32, 24)]:
        x_codes, w_packed, gen = _conv_inputs(1, cin, 4, 4, cout, 3, 1, 4, False, 4)
        scale, bias, fp_out, fp_idx = _epilogue_inputs(cout, 4, 4, 1, gen, [4, 1], torch.float32)
        torch.library.opcheck(ops.cuda_qconv2d, (x_codes, w_packed, cin, 4, False, 4, scale, bias, [1, 1],
                                                 [1, 1, 1, 1], [1, 1], 1, True, fp_out.contiguous(), fp_idx, None, 4,
                                                 False, torch.float32))
        torch.library.opcheck(ops.cuda_qconv2d, (x_codes, w_packed, cin, 4, False, 4, scale, None, [1, 1],
                                                 [1, 1, 1, 1], [1, 1], 1, False, None, None, qp, 4, False,
                                                 torch.float32))
        torch.library.opcheck(ops.cuda_qconv2d, (x_codes, w_packed, cin, 4, False, 4, scale, None, [2, 1],
                                                 [0, 1, 2, 0], [1, 1], 1, False, None, None, None, 4, False,
                                                 torch.int32))


@gpu
def test_opcheck_public_ops_on_cuda_backend():
    x = torch.randn(1, 5, 3, 4, device=DEVICE, requires_grad=True)
    qp = _qparams(-1.0, 1.0, False)
    torch.library.opcheck(ops.fake_quantize, (x, qp, 4, False, "cuda"))
    keep = torch.tensor([3, 1], device=DEVICE)
    torch.library.opcheck(ops.quantize_activate, (x, qp, 4, False, None, None, True, keep, None, "cuda"))
    x_codes, w_packed, gen = _conv_inputs(1, 32, 4, 4, 20, 3, 1, 4, False, 4)
    scale, bias, fp_out, fp_idx = _epilogue_inputs(20, 4, 4, 1, gen, [4, 1], torch.float32)
    fp_out = fp_out.contiguous().requires_grad_()
    torch.library.opcheck(ops.qconv2d, (x_codes, w_packed, 32, 4, False, 4, scale, bias, [1, 1], [1, 1, 1, 1], [1, 1],
                                        1, True, fp_out, fp_idx, None, 4, False, torch.float32, "cuda"))
