"""The kernel backends (``triton``: ``hybridops.kernels``; ``cuda``: ``csrc/``, extension
``hybridops._C``) against the plain-torch reference, through the ``hybridops::`` custom ops.

Every test takes the ``backend`` fixture, parametrized over the kernel backends; a backend that
cannot run here is skipped with the reason of :func:`hybridops.backend_selection.backend_unavailable_reason`.
Tensors live on the GPU when there is one, else on the CPU (where only Triton runs, under
``TRITON_INTERPRET=1``). Integer results (accumulators, packed codes) must be exactly equal;
float outputs equal up to one unit in the last place of the final rounding (``TOL``): the kernels
perform the same IEEE fp32 operations in the same order as the reference.

Fresh outputs are poisoned so that elements a kernel forgets to write fail the comparison of
whole tensors: ``torch.empty`` / ``torch.empty_like`` (the Triton launchers) return NaN / 0xAB
filled tensors, and on the GPU the caching allocator's free blocks are filled with 0xFF bytes
first (outputs the C++ extension allocates: NaN in every float dtype, -1 in int32, 255 in uint8).
bfloat16 runs only on the GPU: the interpreter converts fp32 to bf16 by truncation (docs/gpu.md).

Backend-specific tests live in ``test_triton_kernels.py`` and ``test_cuda_kernels.py``.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridops.backend_selection import backend_unavailable_reason
from hybridops.kernels import packing

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ops = torch.ops.hybridops

gpu_only = [pytest.mark.gpu, pytest.mark.skipif(DEVICE.type != "cuda", reason="bf16 is wrong in the Triton interpreter")]
too_big_for_interpreter = pytest.mark.skipif(DEVICE.type != "cuda", reason="too large for the Triton interpreter")

# Float tolerances against the reference: fp32/fp64 equal in practice (torch's default fp32
# tolerance); fp16 and bf16 allow one unit in the last place of the final rounding.
TOL = {torch.float32: dict(rtol=1.3e-6, atol=1e-5), torch.float64: dict(rtol=1.3e-6, atol=1e-5),
       torch.float16: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_floating_point:
        t.fill_(math.nan)
    elif t.dtype != torch.bool:
        t.fill_(0xAB if t.dtype == torch.uint8 else -0x55)
    return t


def poison_cuda_allocator(device) -> None:
    """Fill free blocks of the CUDA caching allocator with 0xFF bytes, which the next
    allocations (outputs made in C++ included) reuse unwritten."""
    blocks = [torch.full((n,), 0xFF, dtype=torch.uint8, device=device)
              for n in [512] * 64 + [32 << 10] * 32 + [1 << 20] * 4 + [8 << 20, 32 << 20]]
    del blocks


@pytest.fixture(params=["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request, monkeypatch):
    """The kernel backend under test (skipped where it cannot run), with poisoned allocations."""
    reason = backend_unavailable_reason(request.param, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(empty_like(*a, **k)))
    if DEVICE.type == "cuda":
        poison_cuda_allocator(DEVICE)
    return request.param


def make_qparams(lo: float, hi: float, signed: bool) -> torch.Tensor:
    """[alpha, beta] mapping [lo, hi] onto [0, 1] (eq 8), or |t| <= hi onto [0, 1] (eq 6)."""
    if signed:
        return torch.tensor([1.0 / hi, 0.0], device=DEVICE)
    return torch.tensor([1.0 / (hi - lo), -lo / (hi - lo)], device=DEVICE)


def _codes(shape, bits: int, signed: bool, gen: torch.Generator) -> torch.Tensor:
    lv = packing.levels(bits, signed)
    return torch.randint(-lv if signed else 0, lv + 1, shape, generator=gen)


def assert_same(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, got.dtype, ref.shape, ref.dtype)
    if got.dtype.is_floating_point:
        assert not got.isnan().any() or ref.isnan().any(), "unwritten (NaN-poisoned) output elements"
        torch.testing.assert_close(got, ref, **TOL[got.dtype])
    else:
        assert torch.equal(got, ref), f"{(got != ref).sum().item()} of {got.numel()} elements differ"


# ----------------------------------------------------------------------------- fake_quantize
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64,
                                   pytest.param(torch.bfloat16, marks=gpu_only)])
@pytest.mark.parametrize("bits,signed", [(2, True), (4, False), (5, True), (8, True), (8, False)])
def test_fake_quantize(backend, dtype, bits, signed):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 5, 7, 9, generator=gen) * 2
    # NaN and the infinities give NaN (a code would hide them); 3.0 sits on the clamp; both zero signs.
    x[0, 0, 0, :6] = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, 3.0])
    x = x.to(DEVICE, dtype)
    qp = make_qparams(-2.0, 3.0, signed)
    for inp, dense in ((x, True), (x.to(memory_format=torch.channels_last), True), (x[:, 1::2, :, ::3], False),
                       (x.flatten()[1:], True)):
        got = ops.fake_quantize(inp, qp, bits, signed, backend)
        ref = ops.fake_quantize(inp, qp, bits, signed, "torch")
        # Codes are exact, and so is code * (1 / levels): equal in every dtype, NaN where x is not finite.
        assert got.dtype == ref.dtype and torch.equal(got.isnan(), ~torch.isfinite(inp))
        assert torch.equal(got.nan_to_num(), ref.nan_to_num())
        assert got.stride() == ref.stride()
        if dense:  # a dense input keeps its layout
            assert got.stride() == inp.stride()


def test_fake_quantize_empty(backend):
    x = torch.empty(0, 4, device=DEVICE)
    assert ops.fake_quantize(x, make_qparams(0.0, 1.0, False), 4, False, backend).shape == (0, 4)


# ----------------------------------------------------------------------------- quantize_activate
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("bits,signed", [(2, False), (3, True), (4, False), (4, True), (5, False), (7, True),
                                         (8, True)])
@pytest.mark.parametrize("channels", [1, 3, 7, 16, 17, 64])
def test_quantize_activate_codes(backend, layout, bits, signed, channels):
    gen = torch.Generator().manual_seed(channels)
    x = torch.randn(2, channels, 5, 6, generator=gen)
    x[0, 0, 0, 0:6:2] = torch.tensor([math.nan, math.inf, -math.inf])  # kept by the strided view
    x = x.to(DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x[..., ::2]
    qp = make_qparams(-2.0, 2.0, signed)
    got = ops.quantize_activate(x, qp, bits, signed, None, None, False, None, None, backend)
    ref = ops.quantize_activate(x, qp, bits, signed, None, None, False, None, None, "torch")
    assert_same(got[1], ref[1])
    assert ref[0].shape == (0,)
    assert_same(got[0], ref[0])


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype,slice_dtype", [(torch.float32, None), (torch.float16, torch.float32),
                                               (torch.float32, torch.float16), (torch.float64, None),
                                               pytest.param(torch.bfloat16, None, marks=gpu_only),
                                               pytest.param(torch.float32, torch.bfloat16, marks=gpu_only)])
@pytest.mark.parametrize("bits,signed,relu", [(4, False, True), (5, True, False), (3, False, False)])
@pytest.mark.parametrize("c", [9, 32])
def test_quantize_activate_fused(backend, layout, dtype, slice_dtype, bits, signed, relu, c):
    gen = torch.Generator().manual_seed(bits + c)
    x = (torch.randn(2, c, 4, 10, generator=gen) * 1.5).to(DEVICE, dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":  # H and W do not merge
        x = x[:, :, :, ::3]
    bn_scale = (torch.rand(c, generator=gen) + 0.5).to(DEVICE)
    bn_shift = (torch.randn(c, generator=gen) * 0.3).to(DEVICE, torch.float64)
    keep = torch.tensor([7, 0, 3, 8, 3], device=DEVICE, dtype=torch.int32)  # unsorted, one repeated
    qp = make_qparams(-1.0, 2.5, signed)
    args = (x, qp, bits, signed, bn_scale, bn_shift, relu, keep, slice_dtype)
    got = ops.quantize_activate(*args, backend)
    ref = ops.quantize_activate(*args, "torch")
    assert_same(got[1], ref[1])
    assert len(ref[1].unique()) > 2  # the codes are not trivially constant
    # The slice is the same fp32 value cast once: equal.
    assert_same(got[0], ref[0])
    assert torch.equal(got[0], ref[0])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_quantize_activate_repeated_input_channels(backend, layout, index_dtype):
    # A grouped conv's pruned branch reads its group's input channels once per kept output.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 3, 5, generator=gen).to(DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    keep = torch.tensor([4, 5, 0, 1, 4, 5, 4, 5, 3], device=DEVICE, dtype=index_dtype)
    args = (x, make_qparams(-1.0, 1.0, False), 4, False, torch.rand(6, generator=gen).to(DEVICE), None, True, keep,
            torch.float16)
    got = ops.quantize_activate(*args, backend)
    ref = ops.quantize_activate(*args, "torch")
    assert_same(got[1], ref[1])
    assert_same(got[0], ref[0])


def test_quantize_activate_empty_batch(backend):
    x = torch.randn(0, 5, 3, 3, device=DEVICE)
    keep = torch.tensor([1, 4], device=DEVICE)
    x_slice, codes = ops.quantize_activate(x, make_qparams(0.0, 1.0, False), 4, False, None, None, True, keep, None,
                                           backend)
    assert x_slice.shape == (0, 3, 3, 2) and codes.shape == (0, 3, 3, 3) and codes.dtype == torch.uint8


def test_quantize_activate_rejects_unsigned_8bit(backend):
    x = torch.randn(1, 2, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="unsigned 8-bit"):
        ops.quantize_activate(x, make_qparams(0.0, 1.0, False), 8, False, None, None, False, None, None, backend)


# ----------------------------------------------------------------------------- qconv2d
def conv_inputs(n, cin, h, w, cout, k, groups, bits_a, a_signed, bits_w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    x_codes = packing.pack_codes(_codes((n, h, w, cin), bits_a, a_signed, gen), bits_a).to(DEVICE)
    w_packed = packing.pack_weight(_codes((cout, cin // groups, kh, kw), bits_w, True, gen), bits_w).to(DEVICE)
    return x_codes, w_packed, gen


def run_qconv(backend, x_codes, w_packed, cin, bits_a, a_signed, bits_w, scale, bias, stride, padding, dilation,
           groups, relu=False, fp_out=None, fp_out_idx=None, rq=None, rq_bits=4, rq_signed=False, out_dtype=torch.float32):
    return ops.qconv2d(x_codes, w_packed, cin, bits_a, a_signed, bits_w, scale, bias, list(stride), list(padding),
                       list(dilation), groups, relu, fp_out, fp_out_idx, rq, rq_bits, rq_signed, out_dtype, backend)


# (N, C_in, H, W, C_out, kernel, stride, padding (t, b, l, r), dilation, groups, bits_a, a_signed, bits_w)
# and the kernel the cuda backend runs for it on the project's H100 (132 SMs): every kernel is
# exercised, which test_cuda_kernels.py::test_qconv2d_plan checks.
CONV_CASES = [
    ((1, 3, 9, 9, 8, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1, 4, False, 4), "direct"),     # stem, batch 1, C_in 3
    ((1, 3, 7, 6, 4, 7, (1, 1), (3, 3, 3, 3), (1, 1), 1, 5, True, 5), "direct"),      # 7x7, C_in 3
    ((2, 17, 6, 7, 33, 3, (1, 1), (2, 2, 2, 2), (2, 2), 1, 5, True, 8), "mma_32x64"),  # C_in 17: gathered loads
    ((1, 64, 9, 9, 48, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 4, False, 4), "mma_32x64"),  # cp.async, 4-bit
    ((2, 16, 5, 6, 24, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, 7, False, 2), "mma_32x64"),  # 1x1
    ((2, 32, 7, 7, 40, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, 7, False, 2), "mma_32x64"),  # 1x1
    ((1, 16, 5, 6, 24, 1, (2, 2), (0, 1, 1, 0), (1, 1), 1, 4, True, 4), "mma_32x64"),   # strided 1x1, asym. pad
    ((1, 32, 8, 9, 24, 1, (2, 2), (0, 1, 1, 0), (1, 1), 1, 4, True, 4), "mma_32x64"),   # strided 1x1, asym. pad
    ((1, 96, 13, 13, 64, 5, (2, 2), (0, 0, 0, 0), (1, 1), 1, 4, False, 4), "mma_32x64"),  # RT-MDNet conv2-like
    ((2, 5, 11, 13, 6, 5, (2, 2), (2, 1, 0, 3), (1, 3), 1, 4, True, 5), "direct"),     # 5x5, dil 3, asym pad
    ((2, 48, 11, 13, 20, 5, (2, 2), (2, 1, 0, 3), (1, 3), 1, 5, True, 5), "mma_32x64"),  # 5x5, dil 3, asym pad
    ((1, 6, 7, 8, 4, 3, (1, 2), (4, 4, 5, 4), (1, 1), 1, 4, False, 4), "direct"),      # padding > needed
    ((1, 40, 7, 8, 36, 3, (1, 2), (4, 4, 5, 4), (3, 2), 1, 8, True, 4), "mma_32x64"),  # padding > kernel, dil 3
    ((1, 4, 2, 3, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1), 1, 4, False, 8), "direct"),      # H, W < kernel
    ((1, 16, 2, 3, 16, 5, (1, 1), (2, 2, 2, 2), (1, 1), 1, 4, False, 8), "mma_32x64"),  # H, W < kernel
    ((2, 4, 7, 7, 3, 3, (1, 1), (0, 0, 0, 0), (3, 3), 1, 7, True, 4), "direct"),       # dil 3: 1x1 output
    ((1, 16, 9, 8, 16, 7, (1, 1), (3, 3, 3, 3), (1, 1), 1, 5, True, 5), "mma_32x64"),   # 7x7, one-byte codes
    ((1, 70, 4, 4, 12, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 4, False, 4), "direct"),    # several K chunks (packed)
    ((1, 40, 4, 4, 12, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 8, True, 8), "direct"),     # several K chunks (one byte)
    ((1, 150, 6, 6, 20, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 4, False, 4), "mma_32x64"),  # 3 K chunks, tail
    ((1, 160, 5, 5, 24, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 4, False, 8), "mma_32x64"),  # cp.async, K tail
    ((2, 6, 5, 5, 4, 3, (1, 1), (1, 1, 1, 1), (1, 1), 2, 4, False, 4), "direct"),      # groups, odd C_in/g
    ((1, 64, 6, 6, 64, 3, (1, 1), (1, 1, 1, 1), (1, 1), 2, 4, True, 4), "mma_32x64"),   # groups, aligned
    ((1, 34, 5, 6, 34, 3, (1, 1), (1, 1, 1, 1), (1, 1), 2, 4, False, 2), "mma_32x64"),  # group 1 starts mid-byte
    ((1, 9, 5, 5, 6, 3, (2, 1), (1, 1, 1, 1), (1, 1), 3, 5, False, 4), "direct"),      # groups, mixed widths
    ((1, 51, 5, 5, 48, 3, (2, 1), (1, 1, 1, 1), (1, 1), 3, 5, False, 4), "mma_32x64"),  # groups, mixed widths
    ((1, 8, 6, 6, 12, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4, 4, True, 2), "direct"),       # C_out/g = 3 (odd)
    ((1, 6, 5, 5, 6, 3, (1, 1), (1, 1, 1, 1), (1, 1), 6, 4, False, 4), "direct"),       # depthwise
    ((1, 32, 7, 7, 32, 3, (1, 1), (1, 1, 1, 1), (1, 1), 32, 4, False, 4), "direct"),    # depthwise
    ((1, 5, 4, 5, 10, 3, (2, 2), (1, 1, 1, 1), (2, 1), 5, 7, False, 8), "direct"),     # depthwise x2, C_in 5
    pytest.param(((2, 64, 56, 56, 128, 3, (1, 1), (2, 2, 2, 2), (2, 2), 1, 4, False, 4), "mma_64x64"),  # dilated
                 marks=too_big_for_interpreter),
    pytest.param(((8, 64, 48, 48, 256, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 4, False, 4), "mma_128x128"),  # batch
                 marks=too_big_for_interpreter),
    pytest.param(((8, 64, 56, 56, 128, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 4, False, 4), "mma_128x64"),  # C_out 128
                 marks=too_big_for_interpreter),
    pytest.param(((8, 64, 48, 48, 256, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 8, True, 8), "mma_128x128"),  # 1-byte
                 marks=too_big_for_interpreter),
]


def conv_case_id(case):
    c = case[0]
    return "x".join(map(str, c[:6])) + f"-g{c[9]}-a{c[10]}{'s' if c[11] else 'u'}w{c[12]}"


def conv_cases():
    """CONV_CASES without their pytest marks: ``(shape tuple, cuda plan)`` pairs."""
    return [c.values[0] if hasattr(c, "values") else c for c in CONV_CASES]


@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
def test_qconv2d_accumulators(backend, case):
    n, cin, h, w, cout, k, stride, pad, dil, groups, ba, asg, bw = case[0]
    x_codes, w_packed, _ = conv_inputs(n, cin, h, w, cout, k, groups, ba, asg, bw)
    args = (x_codes, w_packed, cin, ba, asg, bw, torch.ones(cout, device=DEVICE), None, stride, pad, dil, groups)
    assert_same(run_qconv(backend, *args, out_dtype=torch.int32), run_qconv("torch", *args, out_dtype=torch.int32))


@pytest.mark.parametrize("cin", [32, 24, 11, 6])  # cuda: cp.async rows, gathered rows, direct path
@pytest.mark.parametrize("bits_w", [2, 4, 5, 8])
@pytest.mark.parametrize("bits_a,a_signed", [(4, False), (4, True), (5, False), (7, False), (7, True), (8, True),
                                             (2, False)])
def test_qconv2d_bit_widths(backend, cin, bits_a, a_signed, bits_w):
    cout = 20
    x_codes, w_packed, _ = conv_inputs(2, cin, 5, 4, cout, 3, 1, bits_a, a_signed, bits_w, seed=bits_a * 9 + bits_w)
    args = (x_codes, w_packed, cin, bits_a, a_signed, bits_w, torch.ones(cout, device=DEVICE), None, (1, 1),
            (1, 1, 1, 1), (1, 1), 1)
    assert_same(run_qconv(backend, *args, out_dtype=torch.int32), run_qconv("torch", *args, out_dtype=torch.int32))


@pytest.mark.parametrize("bits_a,a_signed,bits_w", [(4, True, 4), (4, False, 4), (7, False, 8), (8, True, 8),
                                                    (8, True, 2)])
def test_qconv2d_extreme_codes(backend, bits_a, a_signed, bits_w):
    """Largest-magnitude codes everywhere: the int8 widening and sign extension at the range ends."""
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
    assert_same(run_qconv(backend, *args, out_dtype=torch.int32), run_qconv("torch", *args, out_dtype=torch.int32))


def epilogue_inputs(cout, ho, wo, n, gen, kept, fp_dtype):
    scale = (torch.rand(cout, generator=gen) * 0.02 + 0.01).to(DEVICE)
    bias = torch.randn(cout, generator=gen).to(DEVICE)
    # The pruned branch's output for the kept channels only, as a non-contiguous NHWC view.
    fp_big = torch.randn(n, ho, wo, 2 * len(kept), generator=gen).to(DEVICE, fp_dtype)
    return scale, bias, fp_big[..., ::2], torch.tensor(kept, device=DEVICE)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.float64,
                                       pytest.param(torch.bfloat16, marks=gpu_only)])
@pytest.mark.parametrize("with_bias,with_fp,relu", [(True, True, True), (False, True, False), (True, False, True)])
@pytest.mark.parametrize("cin,cout", [(13, 11), (32, 40)])  # cuda: direct path, tensor cores
def test_qconv2d_float_epilogue(backend, out_dtype, with_bias, with_fp, relu, cin, cout):
    n = 2
    x_codes, w_packed, gen = conv_inputs(n, cin, 6, 5, cout, 3, 1, 4, False, 4, seed=3)
    scale, bias, fp_out, fp_out_idx = epilogue_inputs(cout, 3, 2, n, gen, [9, 2, 5, 0, cout - 1], torch.float16)
    args = (x_codes, w_packed, cin, 4, False, 4, scale, bias if with_bias else None, (2, 2), (1, 1, 1, 0), (1, 1), 1)
    ep = dict(relu=relu, fp_out=fp_out if with_fp else None, fp_out_idx=fp_out_idx if with_fp else None, out_dtype=out_dtype)
    assert_same(run_qconv(backend, *args, **ep), run_qconv("torch", *args, **ep))


@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("cin,cout,groups", [(16, 24, 1), (6, 6, 1), (64, 96, 2)])
def test_qconv2d_fp_add_unsorted_index(backend, idx_dtype, cin, cout, groups):
    """Unsorted kept channels are added into the right output channels."""
    n = 1
    x_codes, w_packed, gen = conv_inputs(n, cin, 5, 5, cout, 3, groups, 4, False, 4, seed=7)
    scale, bias, fp_out, fp_out_idx = epilogue_inputs(cout, 5, 5, n, gen, [cout - 1, 3, 0, 1], torch.float32)
    args = (x_codes, w_packed, cin, 4, False, 4, scale, bias, (1, 1), (1, 1, 1, 1), (1, 1), groups)
    ep = dict(relu=True, fp_out=fp_out, fp_out_idx=fp_out_idx.to(idx_dtype))
    assert_same(run_qconv(backend, *args, **ep), run_qconv("torch", *args, **ep))


@pytest.mark.parametrize("kept,match", [([5, 3, 0, 3], "distinct"), ([0, 24], r"\[0, 24\)"), ([-1, 2], r"\[0, 24\)")])
def test_qconv2d_rejects_bad_fp_out_idx(backend, kept, match):
    """A repeated or out-of-range kept-channel index is an error on every backend (kernels write
    through it), not a backend-dependent sum or an out-of-bounds write."""
    x_codes, w_packed, gen = conv_inputs(1, 16, 5, 5, 24, 3, 1, 4, False, 4, seed=7)
    scale, bias, fp_out, _ = epilogue_inputs(24, 5, 5, 1, gen, [0, 1, 2, 3][: len(kept)], torch.float32)
    args = (x_codes, w_packed, 16, 4, False, 4, scale, bias, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    with pytest.raises(ValueError, match=match):
        run_qconv(backend, *args, relu=False, fp_out=fp_out, fp_out_idx=torch.tensor(kept, device=x_codes.device))


@pytest.mark.parametrize("rq_bits,rq_signed", [(4, False), (2, False), (4, True), (5, False), (5, True), (8, True),
                                               (8, False)])
@pytest.mark.parametrize("cin,cout,groups", [(10, 7, 1), (10, 10, 5), (32, 33, 1), (34, 34, 2), (64, 64, 2)])
def test_qconv2d_requantize(backend, rq_bits, rq_signed, cin, cout, groups):
    n, h, w = 2, 5, 5
    x_codes, w_packed, gen = conv_inputs(n, cin, h, w, cout, 3, groups, 5, False, 4, seed=cout)
    scale, bias, fp_out, fp_out_idx = epilogue_inputs(cout, h, w, n, gen, [cout - 1, 0, cout // 2], torch.float32)
    scale = scale / (cin // groups) * 10
    args = (x_codes, w_packed, cin, 5, False, 4, scale, bias, (1, 1), (1, 1, 1, 1), (1, 1), groups)
    ep = dict(relu=not rq_signed, fp_out=fp_out, fp_out_idx=fp_out_idx)
    y = run_qconv("torch", *args, **ep)
    rq = make_qparams(y.min().item(), y.max().item(), False) if not rq_signed else make_qparams(0.0, y.abs().max().item(), True)
    got = run_qconv(backend, *args, **ep, rq=rq, rq_bits=rq_bits, rq_signed=rq_signed)
    ref = run_qconv("torch", *args, **ep, rq=rq, rq_bits=rq_bits, rq_signed=rq_signed)
    assert_same(got, ref)
    assert ref.shape[-1] == packing.packed_size(cout, rq_bits)
    assert len(packing.unpack_codes(ref, rq_bits, cout, rq_signed).unique()) > 2


def test_qconv2d_empty_batch(backend):
    x_codes, w_packed, _ = conv_inputs(0, 6, 5, 5, 4, 3, 1, 4, False, 4)
    args = (x_codes, w_packed, 6, 4, False, 4, torch.ones(4, device=DEVICE), None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert run_qconv(backend, *args).shape == (0, 5, 5, 4)
    assert run_qconv(backend, *args, rq=make_qparams(0.0, 1.0, False), rq_bits=4).shape == (0, 5, 5, 2)


def test_qconv2d_empty_output_is_an_error(backend):
    # 3x3 input, 5x5 kernel, no padding: nothing to compute, and the op says so.
    x_codes, w_packed, _ = conv_inputs(1, 4, 3, 3, 2, 5, 1, 4, False, 4)
    args = (x_codes, w_packed, 4, 4, False, 4, torch.ones(2, device=DEVICE), None, (1, 1), (0, 0, 0, 0), (1, 1), 1)
    with pytest.raises(ValueError, match="empty output"):
        run_qconv(backend, *args)


def test_qconv2d_rejects_unsigned_8bit_activations(backend):
    x_codes, w_packed, _ = conv_inputs(1, 4, 3, 3, 2, 1, 1, 8, False, 4)
    args = (x_codes, w_packed, 4, 8, False, 4, torch.ones(2, device=DEVICE), None, (1, 1), (0, 0, 0, 0), (1, 1), 1)
    with pytest.raises(ValueError, match="unsigned 8-bit"):
        run_qconv(backend, *args)


@st.composite
def conv_problems(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 6))
    cout = groups * draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pad = tuple(draw(st.integers(0, 2)) for _ in range(4))
    h = draw(st.integers(max(1, dil[0] * (kh - 1) + 1 - pad[0] - pad[1]), 7))
    w = draw(st.integers(max(1, dil[1] * (kw - 1) + 1 - pad[2] - pad[3]), 7))
    bits_a = draw(st.integers(2, 8))
    a_signed = bits_a == 8 or draw(st.booleans())
    bits_w = draw(st.integers(2, 8))
    mode = draw(st.sampled_from(["int32", "float", "requant"]))
    rq_bits = draw(st.integers(2, 8))
    return dict(n=draw(st.integers(1, 2)), cin=cin, h=h, w=w, cout=cout, k=(kh, kw), groups=groups, stride=stride,
                pad=pad, dil=dil, bits_a=bits_a, a_signed=a_signed, bits_w=bits_w, mode=mode, rq_bits=rq_bits,
                seed=draw(st.integers(0, 2**16)))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=conv_problems())
def test_qconv2d_random(backend, p):
    x_codes, w_packed, gen = conv_inputs(p["n"], p["cin"], p["h"], p["w"], p["cout"], p["k"], p["groups"],
                                          p["bits_a"], p["a_signed"], p["bits_w"], seed=p["seed"])
    cout = p["cout"]
    args = (x_codes, w_packed, p["cin"], p["bits_a"], p["a_signed"], p["bits_w"],
            (torch.rand(cout, generator=gen) * 0.1).to(DEVICE), None, p["stride"], p["pad"], p["dil"], p["groups"])
    if p["mode"] == "int32":
        ep = dict(out_dtype=torch.int32)
    elif p["mode"] == "float":
        ep = dict(relu=True)
    else:
        ep = dict(rq=make_qparams(-1.0, 1.0, False), rq_bits=p["rq_bits"])
    assert_same(run_qconv(backend, *args, **ep), run_qconv("torch", *args, **ep))


# ----------------------------------------------------------------------------- Triton tile table
def _triton_modules():
    if backend_unavailable_reason("triton", DEVICE) is not None:
        pytest.skip(backend_unavailable_reason("triton", DEVICE))
    from hybridops.kernels import qconv, tiles

    return qconv, tiles


def test_tile_table_one_shipped_tile_per_shape():
    """One tile per shape from the shipped table (so a cold process compiles one kernel per layer):
    large tiles where they still give two CTAs per SM, the smallest-M tile for batch-1 layers."""
    _, tiles = _triton_modules()
    names = set(tiles.shipped_names())
    # (M = N * Ho * Wo, C_out) of ResNet-50 / RT-MDNet layers at batch 32 and 1 (bench/common.py).
    batched = [(32 * 28 * 28, 128), (32 * 31 * 31, 256), (32 * 7 * 7, 512), (32 * 51 * 51 // 4, 256)]
    single = [(28 * 28, 128), (31 * 31, 256), (7 * 7, 512), (1, 512)]
    for m, c_out in batched + single:
        t = tiles.pick(m, c_out)
        assert t.name in names
        ctas = -(-m // t.block_m) * -(-c_out // t.block_n)
        assert ctas >= 2 * tiles.SM_COUNT or t == tiles.SHIPPED[-1], (m, c_out, t)
    assert tiles.pick(32 * 31 * 31, 256) == tiles.SHIPPED[0]
    assert tiles.pick(32 * 56 * 56, 64).block_n == 64  # ResNet-50 layer1: no 128-wide tile for 64 channels
    assert tiles.pick(31 * 31, 256) == tiles.SHIPPED[-1]
    assert tiles.pick(31 * 31, 256, interpret=True) == tiles.INTERPRETER_TILE
    with tiles.forced(tiles.SHIPPED[1].name):
        assert tiles.pick(32 * 31 * 31, 256) == tiles.SHIPPED[1]
    assert tiles.pick(32 * 31 * 31, 256) == tiles.SHIPPED[0]
    with pytest.raises(ValueError, match="unknown tile"):
        tiles.by_name("m999")
    # the unmasked weight loads stay inside the compute-ready rows only if every K step divides K_PAD
    assert all(tiles.K_PAD % t.block_k == 0 for t in tiles.compiled_configs() + (tiles.INTERPRETER_TILE,))
    # K steps: the tile's 64 channels where they divide C_in per group, else 32 where those do
    # (RT-MDNet conv2's 96 channels), else 64 with masked activation loads
    assert tiles.pick(32 * 31 * 31, 256, cin_g=256).block_k == 64
    assert tiles.pick(24 * 24, 256, cin_g=96).block_k == tiles.NARROW_K
    assert tiles.pick(24 * 24, 256, cin_g=40).block_k == 64
    assert tiles.by_name(tiles.pick(24 * 24, 256, cin_g=96).name) in tiles.compiled_configs()


@pytest.mark.parametrize("tile_index", range(8))
def test_qconv2d_every_shipped_tile(backend, tile_index):
    """Each shipped tile, forced, gives the reference's codes and accumulators (aligned groups and
    a group starting mid-byte)."""
    if backend != "triton":
        pytest.skip("the tile table is the triton backend's")
    _, tiles = _triton_modules()
    assert len(tiles.compiled_configs()) == 8
    tile = tiles.compiled_configs()[tile_index]
    for cin, cout, groups in ((17, 33, 1), (34, 34, 2)):
        x_codes, w_packed, gen = conv_inputs(1, cin, 5, 4, cout, 3, groups, 4, False, 4, seed=tile_index)
        scale, bias, fp_out, fp_out_idx = epilogue_inputs(cout, 5, 4, 1, gen, [cout - 1, 0, 5], torch.float32)
        args = (x_codes, w_packed, cin, 4, False, 4, scale * 0.3, bias, (1, 1), (1, 1, 1, 1), (1, 1), groups)
        ep = dict(relu=True, fp_out=fp_out, fp_out_idx=fp_out_idx, rq=make_qparams(0.0, 2.0, False), rq_bits=4)
        raw = args[:7] + (None,) + args[8:]
        with tiles.forced(tile.name):
            got = run_qconv(backend, *args, **ep)
            acc = run_qconv(backend, *raw, out_dtype=torch.int32)
        assert_same(got, run_qconv("torch", *args, **ep))
        assert_same(acc, run_qconv("torch", *raw, out_dtype=torch.int32))


class _LaunchSpy:
    """Stands in for a Triton kernel and records the keyword arguments of its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def _spied_triton_conv(monkeypatch, cin, cout, k, groups, bits, seed):
    """A batch-1 5x4 conv case (``k x k``, same padding) for the Triton launcher with its kernel
    launches recorded: ``(qconv, tiles, spy, args, raw, (fp_out, fp_out_idx))``, where ``raw`` is
    ``args`` without the bias (for int32 accumulators)."""
    qconv, tiles = _triton_modules()
    spy = _LaunchSpy(qconv._qconv_kernel)
    monkeypatch.setattr(qconv, "_qconv_kernel", spy)
    ba, asg, bw = bits
    x_codes, w_packed, gen = conv_inputs(1, cin, 5, 4, cout, k, groups, ba, asg, bw, seed=seed)
    scale, bias, fp_out, fp_out_idx = epilogue_inputs(cout, 5, 4, 1, gen, [3, 0, cout - 1], torch.float32)
    args = (x_codes, w_packed, cin, ba, asg, bw, scale / cin, bias, [1, 1], [k // 2] * 4, [1, 1], groups)
    return qconv, tiles, spy, args, args[:7] + (None,) + args[8:], (fp_out, fp_out_idx)


@pytest.mark.parametrize("cin,groups,bits", [(128, 1, (4, False, 4)), (128, 2, (4, True, 4)), (64, 1, (5, False, 4)),
                                             (64, 1, (8, True, 8)), (80, 1, (4, False, 4))])
def test_qconv2d_full_k_steps(backend, monkeypatch, cin, groups, bits):
    """C_in per group a multiple of the K step: the Triton launcher drops the channel masks
    (K_FULL, the pipelined mainloop of test_triton_codegen.py); results stay exact. 80 channels
    are not a multiple of the K step (32 channels on the interpreter, 64 on a GPU) and keep the
    activation masks."""
    if backend != "triton":
        pytest.skip("K_FULL is the triton kernel's")
    qconv, tiles, spy, args, raw, (fp_out, fp_out_idx) = _spied_triton_conv(monkeypatch, cin, 24, 3, groups, bits,
                                                                        seed=cin + groups)
    cout = 24
    ep = dict(relu=True, fp_out=fp_out, fp_out_idx=fp_out_idx, rq=make_qparams(0.0, 1.5, False), rq_bits=4)
    assert_same(run_qconv(backend, *raw, out_dtype=torch.int32), run_qconv("torch", *raw, out_dtype=torch.int32))
    assert_same(run_qconv(backend, *args, **ep), run_qconv("torch", *args, **ep))
    step = tiles.pick(5 * 4, cout, qconv.INTERPRET).block_k
    assert [k["K_FULL"] for k in spy.launches] == [(cin // groups) % step == 0] * 2
    assert spy.launches[0]["K_FULL"] == (cin != 80)


@pytest.mark.parametrize("split", [2, 3, 7])
@pytest.mark.parametrize("cin,k,bits", [(64, 3, (4, False, 4)), (70, 3, (4, True, 4)), (40, 1, (8, True, 8)),
                                        (48, 5, (5, False, 4))])
def test_qconv2d_split_k_is_exact(backend, monkeypatch, split, cin, k, bits):
    """Split-K (batch-1 layers on a GPU): the tap x channel-chunk loop in ``split`` parts whose
    int32 partial sums add atomically, then the epilogue kernel: integers equal the reference
    exactly in every output mode; a split count past the loop's length is capped."""
    if backend != "triton":
        pytest.skip("split-K is the triton kernel's")
    qconv, tiles, spy, args, raw, (fp_out, fp_out_idx) = _spied_triton_conv(monkeypatch, cin, 20, k, 1, bits,
                                                                        seed=cin + split)
    cout = 20
    ref = run_qconv("torch", *raw, out_dtype=torch.int32)
    assert_same(qconv.qconv2d(*raw, out_dtype=torch.int32, split_k=split), ref)
    step = tiles.pick(20, cout, qconv.INTERPRET).block_k
    iters = k * k * -(-cin // step)
    launched = spy.launches[-1]
    assert launched["SPLIT_K"] == -(-iters // -(-iters // min(split, iters)))  # no empty split
    assert launched["ITERS_PER_SPLIT"] * launched["SPLIT_K"] >= iters
    for ep in (dict(relu=True, fp_out=fp_out, fp_out_idx=fp_out_idx), dict(requant_qparams=make_qparams(0.0, 1.5, False)),
               dict(requant_qparams=make_qparams(-1.0, 1.0, True), requant_bits=5, requant_signed=True)):
        got = qconv.qconv2d(*args, split_k=split, **ep)
        expect = run_qconv("torch", *args, ep.get("relu", False), ep.get("fp_out"), ep.get("fp_out_idx"),
                           ep.get("requant_qparams"), ep.get("requant_bits", 4), ep.get("requant_signed", False))
        assert_same(got, expect)


def hybrid_inputs(n, cin, h, w, cout, k, kept, c_f, fp_dtype, seed, with_bias=True, groups=1):
    """A hybrid layer's operands: codes and weights (4-bit), the epilogue, and the pruned branch
    (``kept`` output rows reading a ``c_f``-channel float slice)."""
    x_codes, w_packed, gen = conv_inputs(n, cin, h, w, cout, k, groups, 4, False, 4, seed=seed)
    scale = (torch.rand(cout, generator=gen) * 0.02 + 0.01).to(DEVICE)
    bias = torch.randn(cout, generator=gen).to(DEVICE)
    fp_in = torch.randn(n, h, w, c_f, generator=gen).to(DEVICE, fp_dtype)
    fp_weight = (torch.randn(len(kept), c_f, k, k, generator=gen) * 0.2).to(DEVICE)
    fp_bias = torch.randn(len(kept), generator=gen).to(DEVICE) if with_bias else None
    return x_codes, w_packed, scale, bias, fp_in, fp_weight, fp_bias, torch.tensor(kept, device=DEVICE)


def run_hybrid(backend, x_codes, w_packed, scale, bias, fp_in, fp_weight, fp_bias, fp_out_idx, cin, stride, padding,
               dilation, relu=True, rq=None, rq_bits=4, out_dtype=torch.float32, groups=1):
    return ops.hybrid_conv2d(x_codes, w_packed, cin, 4, False, 4, scale, bias, list(stride), list(padding),
                             list(dilation), groups, relu, fp_in, fp_weight, fp_bias, fp_out_idx, rq, rq_bits, False, out_dtype,
                             backend)


# The fused branch sums the slice in another order than the reference's float conv (and in fp32
# where the reference rounds its output to the slice's dtype): float outputs agree to these
# tolerances, re-quantized codes to within one level, in a small fraction of the elements.
FUSED_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=4e-3)}


@pytest.mark.parametrize("fp_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cin,cout,k,kept,c_f,stride,padding,dilation", [
    (32, 24, 3, [5, 0, 23, 11], 7, (1, 1), (1, 1, 1, 1), (1, 1)),     # slice not a multiple of the K step
    (64, 40, 3, [39, 2, 17], 20, (2, 2), (1, 0, 2, 1), (1, 1)),        # stride 2, asymmetric padding
    (16, 8, 1, list(range(8)), 16, (1, 1), (0, 0, 0, 0), (1, 1)),      # every row kept, 1x1
    (32, 16, 3, [3], 5, (1, 1), (2, 2, 2, 2), (2, 2)),                 # dilated
])
def test_fused_hybrid_conv_matches_the_reference(backend, monkeypatch, fp_dtype, cin, cout, k, kept, c_f, stride,
                                                 padding, dilation):
    """The pruned branch computed inside the qconv kernel (one launch per hybrid layer) gives the
    reference's conv-then-add, with bias or not, float or re-quantized outputs."""
    if backend != "triton":
        pytest.skip("the fused pruned branch is the triton kernel's")
    qconv, _ = _triton_modules()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 in both the reference and the kernel
    spy = _LaunchSpy(qconv._qconv_kernel)
    monkeypatch.setattr(qconv, "_qconv_kernel", spy)
    for with_bias in (True, False):
        t = hybrid_inputs(2, cin, 6, 5, cout, k, kept, c_f, fp_dtype, seed=cin + c_f, with_bias=with_bias)
        geo = (cin, stride, padding, dilation)
        got = qconv.fused_hybrid_conv2d(*t[:2], cin, 4, False, 4, t[2], t[3], stride, padding, dilation, 1, True,
                                        *t[4:], None, 4, False, torch.float32)
        assert spy.launches[-1]["FP_FUSED"]
        ref = run_hybrid("torch", *t, *geo)
        assert got.shape == ref.shape and not got.isnan().any()
        torch.testing.assert_close(got, ref, **FUSED_TOL[fp_dtype])
        rq = make_qparams(0.0, 4.0, False)
        codes = qconv.fused_hybrid_conv2d(*t[:2], cin, 4, False, 4, t[2], t[3], stride, padding, dilation, 1, True,
                                          *t[4:], rq, 4, False, torch.float32)
        ref_codes = packing.unpack_codes(run_hybrid("torch", *t, *geo, rq=rq), 4, cout, False).int()
        diff = (packing.unpack_codes(codes, 4, cout, False).int() - ref_codes).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, diff.float().mean()


def test_hybrid_conv_op_fuses_where_the_roofline_says(backend, monkeypatch):
    """Through the ``hybridops::hybrid_conv2d`` op: the triton backend fuses a small pruned branch
    (one kernel launch, no separate conv), and runs it as its own conv where fusing would multiply
    a wide slice against every output column or the conv is grouped; the results equal the
    reference either way."""
    if backend != "triton":
        pytest.skip("the fused pruned branch is the triton kernel's")
    qconv, _ = _triton_modules()
    gpu = torch.device("cuda") if DEVICE.type == "cuda" else torch.device("cpu")  # cpu: the H100's SM count

    def pays(m, c_f, groups=1, dtype=torch.float16):  # ResNet-50 layer3 3x3, 26 of 256 rows kept
        return qconv.fuse_pruned_branch(m, 256, 256, 26, 9, c_f, dtype, groups, gpu)

    assert pays(961, 26)  # batch 1, small slice
    assert not pays(32 * 961, 256)  # batch 32, the whole input as the slice
    assert not pays(961, 26, groups=2)  # grouped
    monkeypatch.setenv("HYBRIDOPS_FUSE_BRANCH", "always")
    assert pays(32 * 961, 256)
    assert not pays(961, 26, groups=2)  # still never grouped
    monkeypatch.setenv("HYBRIDOPS_FUSE_BRANCH", "never")
    assert not pays(961, 26)
    monkeypatch.setenv("HYBRIDOPS_FUSE_BRANCH", "sometimes")
    with pytest.raises(ValueError, match="HYBRIDOPS_FUSE_BRANCH='sometimes'"):
        pays(961, 26)
    monkeypatch.delenv("HYBRIDOPS_FUSE_BRANCH")
    if qconv.INTERPRET:  # the interpreter's bf16 dot is wrong: a bf16 slice never fuses there
        t = hybrid_inputs(1, 32, 6, 5, 24, 3, [4, 0, 9], 6, torch.bfloat16, seed=5)
        with pytest.raises(ValueError, match="interpreter multiplies bf16 tiles wrongly"):
            qconv.fused_hybrid_conv2d(*t[:2], 32, 4, False, 4, t[2], t[3], (1, 1), (1, 1, 1, 1), (1, 1), 1, True,
                                      *t[4:], None, 4, False, torch.float32)
        assert not pays(961, 26, dtype=torch.bfloat16)
        got = run_hybrid(backend, *t, 32, (1, 1), (1, 1, 1, 1), (1, 1))
        assert_same(got, run_hybrid("torch", *t, 32, (1, 1), (1, 1, 1, 1), (1, 1)))  # separate branch: exact
    else:  # a 7x7 map at batch 1: the launcher would split K, so fusing would lose it
        assert not qconv.fuse_pruned_branch(49, 512, 512, 51, 9, 51, torch.bfloat16, 1, gpu)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    spy = _LaunchSpy(qconv._qconv_kernel)
    monkeypatch.setattr(qconv, "_qconv_kernel", spy)
    t = hybrid_inputs(1, 32, 6, 5, 24, 3, [4, 0, 9], 6, torch.float32, seed=5)
    geo = (32, (1, 1), (1, 1, 1, 1), (1, 1))
    torch.testing.assert_close(run_hybrid(backend, *t, *geo), run_hybrid("torch", *t, *geo), **FUSED_TOL[torch.float32])
    assert [k["FP_FUSED"] for k in spy.launches] == [True]
    t = hybrid_inputs(1, 32, 6, 5, 24, 3, [4, 0, 9], 6, torch.float32, seed=5, groups=2)
    # separate: the reference's own fp_out, so exactly its result
    assert_same(run_hybrid(backend, *t, *geo, groups=2), run_hybrid("torch", *t, *geo, groups=2))
    assert len(spy.launches) == 2 and "FP_FUSED" not in spy.launches[-1]


def test_hybrid_conv_op_rejects_bad_branch_arguments(backend):
    t = hybrid_inputs(1, 16, 5, 5, 8, 3, [1, 2], 4, torch.float32, seed=1)
    geo = (16, (1, 1), (1, 1, 1, 1), (1, 1))
    with pytest.raises(ValueError, match="fp_in must be the NHWC float slice"):
        run_hybrid(backend, *t[:4], t[4][:, :4], *t[5:], *geo)
    with pytest.raises(ValueError, match="fp_weight must be float"):
        run_hybrid(backend, *t[:5], t[5][:, :3], *t[6:], *geo)
    with pytest.raises(ValueError, match="fp_out_idx must hold one output channel per kept row"):
        run_hybrid(backend, *t[:7], t[7][:1], *geo)
    with pytest.raises(ValueError, match="fp_out_idx"):
        run_hybrid(backend, *t[:7], torch.tensor([1, 8], device=DEVICE), *geo)  # past C_out
    with pytest.raises(ValueError, match="out_dtype must be a float dtype"):
        run_hybrid(backend, *t, *geo, out_dtype=torch.int32)


def test_qconv2d_split_k_choice_and_bad_input(backend):
    if backend != "triton":
        pytest.skip("split-K is the triton kernel's")
    qconv, tiles = _triton_modules()
    sms = tiles.SM_COUNT
    if not qconv.INTERPRET:
        # batch-1 ResNet-50 layer: 28 tiles on 132 SMs, 9 taps x 8 chunks -> split to fill the SMs
        assert qconv.split_count(None, 28, 72, 1) == min(-(-sms // 28), 72 // 4, 16)
        assert qconv.split_count(None, 2 * sms, 72, 1) == 1  # enough tiles already
        assert qconv.split_count(None, 28, 72, 2) == 1  # grouped: never
        assert qconv.split_count(None, 28, 3, 1) == 1  # too short a loop to split
    else:
        assert qconv.split_count(None, 28, 72, 1) == 1  # nothing to fill under the interpreter
    assert qconv.split_count(5, 28, 3, 1) == 3  # capped at the loop's length
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="split_k must be a positive integer"):
            qconv.split_count(bad, 28, 72, 1)
    with pytest.raises(ValueError, match="ungrouped"):
        qconv.split_count(2, 28, 72, 4)


def test_qconv2d_autotune_only_when_asked_and_never_in_capture(backend, monkeypatch):
    """HYBRIDOPS_AUTOTUNE=1 tunes (here, on the interpreter's single config); a new shape inside a
    CUDA-graph capture is refused with a clear error, a shape tuned before the capture is not."""
    if backend != "triton":
        pytest.skip("autotuning is the triton backend's")
    qconv, _ = _triton_modules()
    x_codes, w_packed, _ = conv_inputs(1, 16, 5, 5, 8, 3, 1, 4, False, 4, seed=11)
    args = (x_codes, w_packed, 16, 4, False, 4, torch.ones(8, device=DEVICE), None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    ref = run_qconv("torch", *args, out_dtype=torch.int32)
    monkeypatch.setenv("HYBRIDOPS_AUTOTUNE", "1")
    monkeypatch.setattr(qconv, "_tuned_keys", set())
    monkeypatch.setattr(qconv, "_capturing", lambda t: True)
    with pytest.raises(RuntimeError, match="autotune.*CUDA graph capture.*HYBRIDOPS_AUTOTUNE"):
        run_qconv(backend, *args, out_dtype=torch.int32)
    monkeypatch.setattr(qconv, "_capturing", lambda t: False)
    assert_same(run_qconv(backend, *args, out_dtype=torch.int32), ref)  # tuned outside the capture
    assert len(qconv._tuned_keys) == 1
    monkeypatch.setattr(qconv, "_capturing", lambda t: True)
    assert_same(run_qconv(backend, *args, out_dtype=torch.int32), ref)  # same key: looked up, not tuned
    monkeypatch.delenv("HYBRIDOPS_AUTOTUNE")
    assert_same(run_qconv(backend, *args, out_dtype=torch.int32), ref)  # the table never tunes


def test_launchers_check_grid_and_int32_limits(backend):
    """Launch grids past CUDA's limits (65535 on y and z) and images whose in-kernel int32 offsets
    would overflow are refused before any allocation or launch, naming the limit."""
    if backend != "triton":
        pytest.skip("the triton launchers' checks")
    from hybridops.kernels import _common, quantize

    _common.check_grid((2**31 - 1, 65535, 65535), "k")
    with pytest.raises(ValueError, match="axis y would be 65536 programs, past CUDA's limit of 65535"):
        _common.check_grid((1, 65536), "k")
    with pytest.raises(ValueError, match="axis z"):
        _common.check_grid((1, 1, 70000), "k")
    # quantize_activate: one program row per image on grid y.
    x = torch.randn(65536, 2, 1, 1, device=DEVICE)
    with pytest.raises(ValueError, match="quantize_activate: launch grid axis y"):
        quantize.quantize_activate(x, make_qparams(0.0, 1.0, False), 4, False)
    # qconv2d: one image of 2^32 one-byte codes, on the meta device (no memory behind it), which
    # only the interpreter's device check lets through; the check precedes every allocation.
    if DEVICE.type == "cuda":
        return
    qconv, _ = _triton_modules()
    big = torch.empty(1, 65536, 65536, 1, dtype=torch.uint8, device="meta")
    w_packed = torch.zeros(1, 1, 1, 1, dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match="2\\^31 - 1"):
        qconv.qconv2d(big, w_packed, 1, 8, True, 8, torch.ones(1, device="meta"), None, (1, 1), (0, 0, 0, 0), (1, 1), 1)


# ----------------------------------------------------------------------------- opcheck
def test_opcheck_fake_quantize(backend):
    x = torch.randn(2, 3, 4, device=DEVICE, requires_grad=True)
    torch.library.opcheck(ops.fake_quantize, (x, make_qparams(-1.0, 1.0, False), 4, False, backend))


def test_opcheck_hybrid_conv2d(backend):
    t = hybrid_inputs(1, 16, 5, 5, 8, 3, [1, 6], 4, torch.float32, seed=2)
    torch.library.opcheck(ops.hybrid_conv2d, (*t[:2], 16, 4, False, 4, *t[2:4], [1, 1], [1, 1, 1, 1], [1, 1], 1, True,
                                              *t[4:], None, 4, False, torch.float32, backend),
                          test_utils=("test_schema", "test_faketensor"))


def test_opcheck_quantize_activate(backend):
    x = torch.randn(1, 5, 3, 4, device=DEVICE, requires_grad=True)
    keep = torch.tensor([3, 1], device=DEVICE)
    torch.library.opcheck(ops.quantize_activate, (x, make_qparams(-1.0, 1.0, False), 4, False, None, None, True, keep,
                                                  None, backend))


@pytest.mark.parametrize("cin,cout", [(6, 5), (32, 20)])  # cuda: direct path, tensor cores
def test_opcheck_qconv2d(backend, cin, cout):
    x_codes, w_packed, gen = conv_inputs(1, cin, 4, 4, cout, 3, 1, 4, False, 4)
    scale, bias, fp_out, fp_out_idx = epilogue_inputs(cout, 4, 4, 1, gen, [4, 1], torch.float32)
    fp_out = fp_out.contiguous().requires_grad_()
    torch.library.opcheck(ops.qconv2d, (x_codes, w_packed, cin, 4, False, 4, scale, bias, [1, 1], [1, 1, 1, 1],
                                        [1, 1], 1, True, fp_out, fp_out_idx, None, 4, False, torch.float32, backend))
    torch.library.opcheck(ops.qconv2d, (x_codes, w_packed, cin, 4, False, 4, scale, None, [1, 1], [1, 1, 1, 1],
                                        [1, 1], 1, False, None, None, make_qparams(-1.0, 1.0, False), 4, False,
                                        torch.float32, backend))
