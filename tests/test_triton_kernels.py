"""The Triton kernels (``hybridops.kernels``) against the plain-torch reference, through the
``hybridops::`` custom ops.

Runs on a CUDA GPU, or on the CPU under ``TRITON_INTERPRET=1`` (as CI does); skipped otherwise.
Integer results (accumulators, packed codes) must be exactly equal; float outputs within a
tolerance per dtype. Fresh kernel outputs are poisoned (NaN / 0xAB) so that elements a kernel
forgets to write fail the comparison of whole tensors. bfloat16 runs only on the GPU: the
interpreter converts fp32 to bf16 by truncation (GPU.md).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridops.backend import backend_unavailable_reason, triton_interpreter
from hybridops.ops import packing

DEVICE = torch.device("cpu" if triton_interpreter() else "cuda")


def _skip_reason():
    if not triton_interpreter() and not torch.cuda.is_available():
        return "the triton kernels need a CUDA GPU or TRITON_INTERPRET=1."
    return backend_unavailable_reason("triton", DEVICE)


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(DEVICE.type != "cuda", reason="bf16 is wrong in the interpreter")]

ops = torch.ops.hybridops

# Float tolerances of the kernels' outputs against the reference: fp32 does the same IEEE
# operations in the same order (equal in practice; the tolerance is torch's default for fp32);
# fp16 and bf16 allow one unit in the last place of the final rounding.
TOL = {torch.float32: dict(rtol=1.3e-6, atol=1e-5), torch.float64: dict(rtol=1.3e-6, atol=1e-5),
       torch.float16: dict(rtol=1e-3, atol=1e-3), torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


@pytest.fixture(autouse=True)
def poison_fresh_tensors(monkeypatch):
    """Every ``torch.empty`` / ``torch.empty_like`` during a test comes back filled with NaN
    (floats) or 0xAB bytes (integers), so unwritten output elements cannot pass by luck."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.dtype.is_floating_point:
            t.fill_(math.nan)
        elif t.dtype != torch.bool:
            t.fill_(0xAB if t.dtype == torch.uint8 else -0x55)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.fixture(autouse=True, scope="module")
def few_qconv_configs():
    """On a GPU, tune qconv2d over two tiles only (a wgmma one and a small-M mma.sync one):
    every new shape key would otherwise compile and time all configs. (The interpreter has a
    single config anyway.)"""
    from hybridops.kernels import qconv

    configs = qconv._qconv_kernel.configs
    with pytest.MonkeyPatch.context() as mp:
        if DEVICE.type == "cuda":
            mp.setattr(qconv._qconv_kernel, "configs", [configs[0], configs[-1]])
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
        torch.testing.assert_close(got, ref, **TOL[got.dtype])
    else:
        assert torch.equal(got, ref), f"{(got != ref).sum().item()} of {got.numel()} elements differ"


# ----------------------------------------------------------------------------- fake_quantize
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64,
                                   pytest.param(torch.bfloat16, marks=gpu_only)])
@pytest.mark.parametrize("bits,signed", [(2, True), (4, False), (5, True), (8, True), (8, False)])
def test_fake_quantize(dtype, bits, signed):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 5, 7, 9, generator=gen) * 2
    x[0, 0, 0, :4] = torch.tensor([math.nan, math.inf, -math.inf, -0.0])  # NaN has code 0
    x = x.to(DEVICE, dtype)
    qp = _qparams(-2.0, 3.0, signed)
    for inp in (x, x.to(memory_format=torch.channels_last), x[:, 1::2, :, ::3]):
        got = ops.fake_quantize(inp, qp, bits, signed, "triton")
        ref = ops.fake_quantize(inp, qp, bits, signed, "torch")
        # Codes are exact, so are code / levels; the output keeps the input's layout.
        assert torch.equal(got, ref) and got.dtype == ref.dtype
        assert got.stride() == ref.stride()


def test_fake_quantize_empty():
    x = torch.empty(0, 4, device=DEVICE)
    assert ops.fake_quantize(x, _qparams(0.0, 1.0, False), 4, False, "triton").shape == (0, 4)


# ----------------------------------------------------------------------------- quantize_activate
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("bits,signed", [(2, False), (3, True), (4, False), (4, True), (5, False), (7, True),
                                         (8, True)])
@pytest.mark.parametrize("channels", [1, 7, 16])
def test_quantize_activate_codes(layout, bits, signed, channels):
    gen = torch.Generator().manual_seed(channels)
    x = torch.randn(2, channels, 5, 3, generator=gen)
    x[0, 0, 0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    x = x.to(DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    qp = _qparams(-2.0, 2.0, signed)
    got = ops.quantize_activate(x, qp, bits, signed, None, None, False, None, None, "triton")
    ref = ops.quantize_activate(x, qp, bits, signed, None, None, False, None, None, "torch")
    _assert_same(got[1], ref[1])
    _assert_same(got[0], ref[0])


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype,slice_dtype", [(torch.float32, None), (torch.float16, torch.float32),
                                               (torch.float32, torch.float16), (torch.float64, None),
                                               pytest.param(torch.bfloat16, None, marks=gpu_only)])
@pytest.mark.parametrize("bits,signed,relu", [(4, False, True), (5, True, False), (3, False, False)])
def test_quantize_activate_fused(layout, dtype, slice_dtype, bits, signed, relu):
    gen = torch.Generator().manual_seed(bits)
    c = 9
    x = (torch.randn(2, c, 4, 10, generator=gen) * 1.5).to(DEVICE, dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":  # H and W do not merge: the launcher copies
        x = x[:, :, :, ::3]
    bn_scale = (torch.rand(c, generator=gen) + 0.5).to(DEVICE)
    bn_shift = (torch.randn(c, generator=gen) * 0.3).to(DEVICE, torch.float64)
    keep = torch.tensor([7, 0, 3, 8], device=DEVICE)  # unsorted on purpose
    qp = _qparams(-1.0, 2.5, signed)
    args = (x, qp, bits, signed, bn_scale, bn_shift, relu, keep, slice_dtype)
    got = ops.quantize_activate(*args, "triton")
    ref = ops.quantize_activate(*args, "torch")
    _assert_same(got[1], ref[1])
    assert len(ref[1].unique()) > 2  # the codes are not trivially constant
    # The slice is the same fp32 value cast once: exact in fp32/fp16 (one ulp in bf16).
    _assert_same(got[0], ref[0])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_quantize_activate_repeated_keep_idx(layout, index_dtype):
    # A grouped conv's pruned branch reads its group's input channels once per kept output.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 3, 5, generator=gen).to(DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    keep = torch.tensor([4, 5, 0, 1, 4, 5, 4, 5, 3], device=DEVICE, dtype=index_dtype)
    args = (x, _qparams(-1.0, 1.0, False), 4, False, torch.rand(6, generator=gen).to(DEVICE), None, True, keep,
            torch.float16)
    got = ops.quantize_activate(*args, "triton")
    ref = ops.quantize_activate(*args, "torch")
    _assert_same(got[1], ref[1])
    _assert_same(got[0], ref[0])


def test_quantize_activate_empty_batch():
    x = torch.randn(0, 5, 3, 3, device=DEVICE)
    keep = torch.tensor([1, 4], device=DEVICE)
    x_slice, codes = ops.quantize_activate(x, _qparams(0.0, 1.0, False), 4, False, None, None, True, keep, None,
                                           "triton")
    assert x_slice.shape == (0, 3, 3, 2) and codes.shape == (0, 3, 3, 3) and codes.dtype == torch.uint8


# ----------------------------------------------------------------------------- qconv2d
def _conv_inputs(n, cin, h, w, cout, k, groups, bits_a, a_signed, bits_w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    x_codes = packing.pack_codes(_codes((n, h, w, cin), bits_a, a_signed, gen), bits_a).to(DEVICE)
    w_packed = packing.pack_weight(_codes((cout, cin // groups, kh, kw), bits_w, True, gen), bits_w).to(DEVICE)
    return x_codes, w_packed, gen


def _qconv(backend, x_codes, w_packed, cin, bits_a, a_signed, bits_w, scale, bias, stride, padding, dilation,
           groups, relu=False, fp_out=None, fp_idx=None, rq=None, rq_bits=4, rq_signed=False, out_dtype=torch.float32):
    return ops.qconv2d(x_codes, w_packed, cin, bits_a, a_signed, bits_w, scale, bias, list(stride), list(padding),
                       list(dilation), groups, relu, fp_out, fp_idx, rq, rq_bits, rq_signed, out_dtype, backend)


# (N, C_in, H, W, C_out, kernel, stride, padding (t, b, l, r), dilation, groups, bits_a, a_signed, bits_w)
CONV_CASES = [
    (1, 3, 9, 9, 8, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1, 4, False, 4),      # stem-like, batch 1, C_in 3
    (2, 17, 6, 7, 33, 3, (1, 1), (2, 2, 2, 2), (2, 2), 1, 5, True, 8),     # C_in 17, C_out past one tile
    (2, 16, 5, 6, 24, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, 7, False, 2),    # 1x1
    (1, 16, 5, 6, 24, 1, (2, 2), (0, 1, 1, 0), (1, 1), 1, 4, True, 4),     # strided 1x1, asymmetric pad
    (2, 5, 11, 13, 6, 5, (2, 2), (2, 1, 0, 3), (1, 3), 1, 4, True, 5),     # 5x5, asymmetric pad, dil 3
    (1, 6, 7, 8, 4, 3, (1, 2), (4, 4, 5, 4), (1, 1), 1, 4, False, 4),      # padding larger than needed
    (1, 4, 2, 3, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1), 1, 4, False, 8),      # H, W smaller than the kernel
    (2, 4, 7, 7, 3, 3, (1, 1), (0, 0, 0, 0), (3, 3), 1, 7, True, 4),       # dil 3: 1x1 output
    (1, 70, 4, 4, 12, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 4, False, 4),    # several K chunks (packed)
    (1, 40, 4, 4, 12, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 8, True, 8),     # several K chunks (one byte)
    (2, 6, 5, 5, 4, 3, (1, 1), (1, 1, 1, 1), (1, 1), 2, 4, False, 4),      # groups, odd C_in/g (unaligned)
    (1, 9, 5, 5, 6, 3, (2, 1), (1, 1, 1, 1), (1, 1), 3, 5, False, 4),      # groups, mixed packed/one byte
    (1, 8, 6, 6, 12, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4, 4, True, 2),      # groups, C_out/g = 3 (odd)
    (1, 6, 5, 5, 6, 3, (1, 1), (1, 1, 1, 1), (1, 1), 6, 4, False, 4),      # depthwise
    (1, 5, 4, 5, 10, 3, (2, 2), (1, 1, 1, 1), (2, 1), 5, 7, False, 8),     # depthwise x2, C_in 5
    (1, 3, 7, 6, 4, 7, (1, 1), (3, 3, 3, 3), (1, 1), 1, 5, True, 5),       # 7x7
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-g{c[9]}-a{c[10]}w{c[12]}")
def test_qconv2d_accumulators(case):
    n, cin, h, w, cout, k, stride, pad, dil, groups, ba, asg, bw = case
    x_codes, w_packed, _ = _conv_inputs(n, cin, h, w, cout, k, groups, ba, asg, bw)
    scale = torch.ones(cout, device=DEVICE)
    args = (x_codes, w_packed, cin, ba, asg, bw, scale, None, stride, pad, dil, groups)
    _assert_same(_qconv("triton", *args, out_dtype=torch.int32), _qconv("torch", *args, out_dtype=torch.int32))


@pytest.mark.parametrize("bits_w", [2, 4, 5, 8])
@pytest.mark.parametrize("bits_a,a_signed", [(4, False), (4, True), (5, False), (7, True), (8, True), (2, False)])
def test_qconv2d_bit_widths(bits_a, a_signed, bits_w):
    x_codes, w_packed, _ = _conv_inputs(2, 11, 5, 4, 9, 3, 1, bits_a, a_signed, bits_w, seed=bits_a * 9 + bits_w)
    args = (x_codes, w_packed, 11, bits_a, a_signed, bits_w, torch.ones(9, device=DEVICE), None, (1, 1),
            (1, 1, 1, 1), (1, 1), 1)
    _assert_same(_qconv("triton", *args, out_dtype=torch.int32), _qconv("torch", *args, out_dtype=torch.int32))


def _epilogue_inputs(cout, ho, wo, n, gen, kept, fp_dtype):
    scale = (torch.rand(cout, generator=gen) * 0.02 + 0.01).to(DEVICE)
    bias = torch.randn(cout, generator=gen).to(DEVICE)
    # The pruned branch's output for the kept channels only, as a non-contiguous NHWC view.
    fp_big = torch.randn(n, ho, wo, 2 * len(kept), generator=gen).to(DEVICE, fp_dtype)
    return scale, bias, fp_big[..., ::2], torch.tensor(kept, device=DEVICE)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.float64,
                                       pytest.param(torch.bfloat16, marks=gpu_only)])
@pytest.mark.parametrize("with_bias,with_fp,relu", [(True, True, True), (False, True, False), (True, False, True)])
def test_qconv2d_float_epilogue(out_dtype, with_bias, with_fp, relu):
    n, cin, h, w, cout = 2, 13, 6, 5, 11
    x_codes, w_packed, gen = _conv_inputs(n, cin, h, w, cout, 3, 1, 4, False, 4, seed=3)
    scale, bias, fp_out, fp_idx = _epilogue_inputs(cout, 3, 2, n, gen, [9, 2, 5, 0], torch.float16)
    args = (x_codes, w_packed, cin, 4, False, 4, scale, bias if with_bias else None, (2, 2), (1, 1, 1, 0), (1, 1), 1)
    ep = dict(relu=relu, fp_out=fp_out if with_fp else None, fp_idx=fp_idx if with_fp else None, out_dtype=out_dtype)
    _assert_same(_qconv("triton", *args, **ep), _qconv("torch", *args, **ep))


@pytest.mark.parametrize("rq_bits,rq_signed", [(4, False), (2, False), (4, True), (5, False), (5, True), (8, True)])
@pytest.mark.parametrize("cout,groups", [(7, 1), (10, 5), (33, 1)])
def test_qconv2d_requantize(rq_bits, rq_signed, cout, groups):
    n, cin, h, w = 2, 10, 5, 5
    x_codes, w_packed, gen = _conv_inputs(n, cin, h, w, cout, 3, groups, 5, False, 4, seed=cout)
    scale, bias, fp_out, fp_idx = _epilogue_inputs(cout, h, w, n, gen, [cout - 1, 0, cout // 2], torch.float32)
    args = (x_codes, w_packed, cin, 5, False, 4, scale, bias, (1, 1), (1, 1, 1, 1), (1, 1), groups)
    ep = dict(relu=not rq_signed, fp_out=fp_out, fp_idx=fp_idx)
    y = _qconv("torch", *args, **ep)
    rq = _qparams(y.min().item(), y.max().item(), False) if not rq_signed else _qparams(0.0, y.abs().max().item(), True)
    got = _qconv("triton", *args, **ep, rq=rq, rq_bits=rq_bits, rq_signed=rq_signed)
    ref = _qconv("torch", *args, **ep, rq=rq, rq_bits=rq_bits, rq_signed=rq_signed)
    _assert_same(got, ref)
    assert ref.shape[-1] == packing.packed_size(cout, rq_bits)
    assert len(packing.unpack_codes(ref, rq_bits, cout, rq_signed).unique()) > 2


def test_qconv2d_empty_batch():
    x_codes, w_packed, _ = _conv_inputs(0, 6, 5, 5, 4, 3, 1, 4, False, 4)
    args = (x_codes, w_packed, 6, 4, False, 4, torch.ones(4, device=DEVICE), None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert _qconv("triton", *args).shape == (0, 5, 5, 4)
    assert _qconv("triton", *args, rq=_qparams(0.0, 1.0, False), rq_bits=4).shape == (0, 5, 5, 2)


def test_qconv2d_empty_output_is_an_error():
    # 3x3 input, 5x5 kernel, no padding: nothing to compute, and the op says so.
    x_codes, w_packed, _ = _conv_inputs(1, 4, 3, 3, 2, 5, 1, 4, False, 4)
    args = (x_codes, w_packed, 4, 4, False, 4, torch.ones(2, device=DEVICE), None, (1, 1), (0, 0, 0, 0), (1, 1), 1)
    with pytest.raises(ValueError, match="empty output"):
        _qconv("triton", *args)


def test_qconv2d_rejects_unsigned_8bit_activations():
    x_codes, w_packed, _ = _conv_inputs(1, 4, 3, 3, 2, 1, 1, 8, False, 4)
    args = (x_codes, w_packed, 4, 8, False, 4, torch.ones(2, device=DEVICE), None, (1, 1), (0, 0, 0, 0), (1, 1), 1)
    with pytest.raises(ValueError, match="unsigned 8-bit"):
        _qconv("triton", *args)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="checks the CPU-tensor error of a GPU run")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    from hybridops.kernels import _common

    monkeypatch.setattr(_common, "INTERPRET", False)
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="CUDA device, got cpu"):
        ops.fake_quantize(x, _qparams(0.0, 1.0, False), 4, False, "triton")


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
def test_qconv2d_random(p):
    x_codes, w_packed, gen = _conv_inputs(p["n"], p["cin"], p["h"], p["w"], p["cout"], p["k"], p["groups"],
                                          p["bits_a"], p["a_signed"], p["bits_w"], seed=p["seed"])
    cout = p["cout"]
    args = (x_codes, w_packed, p["cin"], p["bits_a"], p["a_signed"], p["bits_w"],
            (torch.rand(cout, generator=gen) * 0.1).to(DEVICE), None, p["stride"], p["pad"], p["dil"], p["groups"])
    if p["mode"] == "int32":
        ep = dict(out_dtype=torch.int32)
    elif p["mode"] == "float":
        ep = dict(relu=True)
    else:
        ep = dict(rq=_qparams(-1.0, 1.0, False), rq_bits=p["rq_bits"])
    _assert_same(_qconv("triton", *args, **ep), _qconv("torch", *args, **ep))


# ----------------------------------------------------------------------------- opcheck
def test_opcheck_fake_quantize():
    x = torch.randn(2, 3, 4, device=DEVICE, requires_grad=True)
    torch.library.opcheck(ops.fake_quantize, (x, _qparams(-1.0, 1.0, False), 4, False, "triton"))


def test_opcheck_quantize_activate():
    x = torch.randn(1, 5, 3, 4, device=DEVICE, requires_grad=True)
    keep = torch.tensor([3, 1], device=DEVICE)
    torch.library.opcheck(ops.quantize_activate, (x, _qparams(-1.0, 1.0, False), 4, False, None, None, True, keep,
                                                  None, "triton"))


def test_opcheck_qconv2d():
    x_codes, w_packed, gen = _conv_inputs(1, 6, 4, 4, 5, 3, 1, 4, False, 4)
    scale, bias, fp_out, fp_idx = _epilogue_inputs(5, 4, 4, 1, gen, [4, 1], torch.float32)
    fp_out = fp_out.contiguous().requires_grad_()
    torch.library.opcheck(ops.qconv2d, (x_codes, w_packed, 6, 4, False, 4, scale, bias, [1, 1], [1, 1, 1, 1], [1, 1],
                                        1, True, fp_out, fp_idx, None, 4, False, torch.float32, "triton"))
    torch.library.opcheck(ops.qconv2d, (x_codes, w_packed, 6, 4, False, 4, scale, None, [1, 1], [1, 1, 1, 1], [1, 1],
                                        1, False, None, None, _qparams(-1.0, 1.0, False), 4, False, torch.float32,
                                        "triton"))
