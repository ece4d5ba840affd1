"""The onednn CPU backend against the reference: integers and codes exactly, floats within the
tolerances stated in kernels/onednn.py (bitwise where our epilogue computes them)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import hypothesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridops.kernels import derived
from hybridops.ops import custom_ops, layer_op, registry
from hybridops.ops import reference as R
from hybridops.kernels.packing import pack_codes, pack_weight

O = pytest.importorskip("hybridops.kernels.onednn", reason="the onednn backend did not load")
# (after the skip: the shared cases import the backend)
from onednn_cases import NEAR_RESIDUAL, check_qconv2d, conv_cases, conv_inputs, qparams, ref_codes_of  # noqa: E402

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The nightly-size sweep around the residual mismatch's geometry (bench/fuzz_onednn.py runs the
# same generator at any size): about 8 s on 2 idle CPU cores, up to ten times that while other
# runs share them.
NIGHTLY = settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def test_registry_auto_picks_onednn_on_cpu():
    assert registry.auto_candidates("cpu")[0] == "onednn"
    assert registry.unavailable_reason("onednn", "cpu") is None
    assert registry.code_bytes(7, 4, "onednn") == 7 and registry.code_bytes(7, 4, "torch") == 4
    # oneDNN named the convolution implementation it picked (brg_conv_fwd:...amx, jit_uni_int8:avx2, ...)
    assert ":" in O.isa() and not O.isa().startswith("unknown")


def test_zero_point_format():
    # signed codes shift by 2^(b-1); unsigned codes (8-bit up to 255) are the bytes themselves.
    c = torch.tensor([-127, 0, 127], dtype=torch.int16)
    assert O.codes_from_int(c, 8, True).tolist() == [1, 128, 255]
    assert O.codes_from_int(torch.tensor([0, 255]), 8, False).tolist() == [0, 255]
    assert torch.equal(O.codes_to_int(O.codes_from_int(c, 8, True), 8, True), c)


# ----------------------------------------------------------------------------- quantize_activate
@FUZZ
@given(n=st.integers(1, 2), c=st.integers(1, 9), h=st.integers(1, 5), w=st.integers(1, 6), bits=st.integers(2, 8),
       signed=st.booleans(), relu=st.booleans(), bn=st.booleans(), layout=st.sampled_from(["nchw", "cl", "strided"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), nan=st.booleans(),
       keep=st.booleans(), slice_dt=st.sampled_from([None, torch.float32, torch.bfloat16]), seed=st.integers(0, 99))
def test_quantize_activate_matches_reference(n, c, h, w, bits, signed, relu, bn, layout, dtype, nan, keep, slice_dt,
                                             seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w + 2, generator=g) * 2).to(dtype)
    x = x[..., 1:-1] if layout == "strided" else x[..., :w]  # strided: a non-contiguous view
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    if nan:
        x = x.clone()
        x[0, 0, 0, 0] = float("nan")
        x[-1, -1, -1, -1] = float("inf")
    qp = qparams(-1.5 if signed else 0.0, 2.0, signed)
    bs = torch.rand(c, generator=g) + 0.5 if bn else None
    bb = torch.randn(c, generator=g) if bn else None
    ki = torch.randperm(c, generator=g)[: max(1, c // 2)] if keep else None
    s, codes = O.quantize_activate(x, qp, bits, signed, bs, bb, relu, ki, slice_dt)
    rs, rcodes = R.quantize_activate(x, qp, bits, signed, bs, bb, relu, ki, slice_dt)
    assert codes.dtype == torch.uint8 and codes.shape == (n, h, w, c)
    assert torch.equal(ref_codes_of(codes, bits, signed), rcodes)
    assert s.dtype == rs.dtype and s.shape == rs.shape
    assert torch.equal(s.float().nan_to_num(7.0), rs.float().nan_to_num(7.0))  # bitwise, NaN where the reference has it


def test_nan_inputs_give_code_zero():
    x = torch.full((1, 3, 2, 2), float("nan"))
    for signed in (False, True):
        _, codes = O.quantize_activate(x, qparams(0.0, 1.0, signed), 4, signed)
        assert (O.codes_to_int(codes, 4, signed) == 0).all()


def test_fake_quantize_matches_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 5, generator=g) * 3
    x[0, 0, 0] = float("nan")
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        for bits, signed in ((4, True), (8, False), (2, False)):
            qp = qparams(-1.0 if signed else 0.0, 2.0, signed)
            a = registry.implementation("onednn", "fake_quantize")(x.to(dt), qp, bits, signed)
            b = R.fake_quantize(x.to(dt), qp, bits, signed)
            assert a.dtype == dt and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
            assert bool(a[0, 0, 0].isnan())  # the NaN input stays NaN


# ----------------------------------------------------------------------------- qconv2d
@FUZZ
@given(k=conv_cases())
def test_qconv2d_matches_reference(k):
    check_qconv2d(k)


@pytest.mark.slow
@NIGHTLY
@hypothesis.seed(0)
@given(k=conv_cases(**NEAR_RESIDUAL))
def test_qconv2d_sweep_near_residual_geometry(k):
    check_qconv2d(k)


@pytest.mark.parametrize("bits_a", [2, 4, 8])
def test_qconv2d_residual_mismatch_geometry(bits_a):
    # docs/cpu_backend.md's residual mismatch (signed codes, C_in=1, 2x3 kernel, stride (1, 3),
    # padding (3, 2, 0, 2), 3x2 input) at batch 2: the reference's fp32 conv left outputs
    # unwritten there (hybridops/ops/reference.py, _conv2d)
    check_qconv2d(dict(n=2, groups=1, cin=1, cout=2, kh=2, kw=3, stride=[1, 3], dil=[1, 1], pad=[3, 2, 0, 2], h=3,
                       w=2, bits_a=bits_a, a_signed=True, bits_w=4, relu=False, seed=bits_a, rq_bits=4,
                       rq_signed=True, fp_dt=torch.float32))


@pytest.mark.parametrize("bits_a,a_signed", [(2, False), (4, True), (5, False), (8, True), (8, False)])
@pytest.mark.parametrize("n,h,w", [(1, 1, 1), (3, 1, 1), (2, 3, 4), (197, 1, 1)])
def test_qconv2d_pointwise_runs_on_the_int8_matmul(bits_a, a_signed, n, h, w, monkeypatch):
    # A 1x1 kernel at stride 1, unpadded, one group is a matrix product of the pixels (a Linear's
    # rows are (M, C, 1, 1)): it runs on oneDNN's int8 matmul, exactly as the convolution did.
    k = dict(n=n, groups=1, cin=24, cout=20, kh=1, kw=1, stride=[1, 1], dil=[1, 1], pad=[0, 0, 0, 0], h=h, w=w,
             bits_a=bits_a, a_signed=a_signed, bits_w=4, relu=a_signed, seed=bits_a + n, rq_bits=4,
             rq_signed=not a_signed, fp_dt=torch.bfloat16 if a_signed else torch.float32)
    calls = {"matmul": 0, "conv": 0}

    def counted(name, fn):
        def call(*args):
            calls[name] += 1
            return fn(*args)
        return call

    O.pairs_saturate()  # (measured once with both primitives: before the count starts)
    monkeypatch.setattr(O, "_qlinear", counted("matmul", O._qlinear))
    monkeypatch.setattr(O, "_qconv", counted("conv", O._qconv))
    check_qconv2d(k)
    assert calls["matmul"] > 0 and calls["conv"] == 0


def test_fp_linear():
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(37, 48, generator=g), torch.randn(7, 48, generator=g), torch.randn(7, generator=g)
    ref = F.linear(x, w, b)
    with torch.no_grad():
        y = O.fp_linear(x, w, b)
        assert y.shape == (37, 7) and y.dtype == torch.float32
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        if O.bf16_supported():  # bf16 operands, fp32 accumulation, bf16 output
            yb = O.fp_linear(x, w, b, torch.bfloat16)
            assert yb.dtype == torch.bfloat16
            torch.testing.assert_close(yb.float(), ref, rtol=3e-2, atol=1e-1)
        assert O.fp_linear(x[:0], w, b).shape == (0, 7)
        w.mul_(-1)  # an online update in place: the next call reads the new weight
        torch.testing.assert_close(O.fp_linear(x, w, b), -ref + 2 * b, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="no-grad"):
        O.fp_linear(x, w.requires_grad_(), b)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        O.fp_linear(x, w.detach(), b, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_row_slice_and_linear_rows(dtype):
    # fp_in_idx listing every channel in order copies or converts the row without a gather; a
    # Linear's rows (M, C, 1, 1) take the direct path. bf16 rounding (half to even, NaN, inf,
    # overflow to inf) must equal torch's .to(torch.bfloat16) bit for bit.
    x = torch.randn(9, 40, 1, 1) * 3
    flat = x.view(-1)
    flat[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.4e38, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8])
    qp = qparams(-1.5, 2.0, True)
    idx = torch.arange(40)
    s, codes = O.quantize_activate(x, qp, 4, True, fp_in_idx=idx, slice_dtype=dtype)
    rs, rcodes = R.quantize_activate(x, qp, 4, True, fp_in_idx=idx, slice_dtype=dtype)
    assert torch.equal(ref_codes_of(codes, 4, True), rcodes)
    assert s.dtype == dtype and torch.equal(s.view(torch.int16 if dtype == torch.bfloat16 else torch.int32).view(-1)[1:],
                                            rs.view(torch.int16 if dtype == torch.bfloat16 else torch.int32).view(-1)[1:])
    assert s.view(-1)[0].isnan()
    # the bf16 epilogue output rounds the same way
    y0 = torch.randn(9, 1, 1, 40) * 1e3
    y0.view(-1)[:3] = torch.tensor([1.0 + 2.0 ** -8, 3.4e38, -(1.0 + 3 * 2.0 ** -8)])
    y = O._epilogue(y0.clone(), None, None, None, False, None, 0, False, torch.bfloat16)
    assert torch.equal(y.view(torch.int16), y0.to(torch.bfloat16).view(torch.int16))


def test_int32_exact_past_2_pow_24():
    # 8-bit unsigned x 8-bit weights, 3x3 x 256 channels: |acc| can reach 255*127*2304 > 2^24, so
    # the backend splits the reduction; the accumulators must still be exact.
    g = torch.Generator().manual_seed(1)
    a = torch.randint(200, 256, (1, 4, 4, 256), generator=g)
    wq = torch.randint(100, 128, (8, 256, 3, 3), generator=g)
    wp = pack_weight(wq.to(torch.int8), 8)
    args = (256, 8, False, 8, torch.ones(8), None, [1, 1], [1, 1, 1, 1], [1, 1], 1)
    acc = O.qconv2d(O.codes_from_int(a, 8, False), wp, *args, out_dtype=torch.int32)
    racc = R.qconv2d(pack_codes(a, 8), wp, *args, out_dtype=torch.int32)
    assert racc.max() > 2**24 and torch.equal(acc, racc)


@pytest.mark.parametrize("signed", [False, True])
def test_eight_bit_codes_exact_where_pairs_of_products_saturate(signed):
    # Without VNNI / AMX oneDNN adds u8 x s8 products in pairs into 16 bits with saturation
    # (255 * 127 * 2 > 32767); the backend must route 8/8-bit layers around it on such machines
    # and be exact on every machine.
    g = torch.Generator().manual_seed(2)
    lo, hi = (90, 128) if signed else (200, 256)
    a = torch.randint(lo, hi, (2, 5, 5, 16), generator=g) * (torch.randint(0, 2, (2, 5, 5, 16), generator=g) * 2 - 1
                                                             if signed else 1)
    wq = torch.randint(100, 128, (8, 16, 3, 3), generator=g).to(torch.int8)
    wp = pack_weight(wq, 8)
    scale, bias = torch.rand(8, generator=g) * 1e-4, torch.randn(8, generator=g)
    args = (16, 8, signed, 8, scale, bias, [1, 1], [1, 1, 1, 1], [1, 1], 1)
    for out_dtype in (torch.int32, torch.float32):
        y = O.qconv2d(O.codes_from_int(a, 8, signed), wp, *args, out_dtype=out_dtype)
        ref = R.qconv2d(pack_codes(a, 8), wp, *args, out_dtype=out_dtype)
        assert torch.equal(y, ref) if out_dtype == torch.int32 else torch.allclose(y, ref, rtol=1e-6, atol=1e-6)
    assert isinstance(O.pairs_saturate(), bool)


def test_empty_batch():
    wp = pack_weight(torch.ones(4, 3, 3, 3, dtype=torch.int8), 4)
    out = O.qconv2d(torch.zeros(0, 5, 5, 3, dtype=torch.uint8), wp, 3, 4, False, 4, torch.ones(4), None, [1, 1],
                    [1, 1, 1, 1], [1, 1], 1)
    assert out.shape == (0, 5, 5, 4)
    s, codes = O.quantize_activate(torch.zeros(0, 3, 5, 5), qparams(0, 1, False), 4, False, fp_in_idx=torch.tensor([1]))
    assert codes.shape == (0, 5, 5, 3) and s.shape == (0, 5, 5, 1)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        k = dict(n=2, groups=1, cin=64, cout=32, kh=3, kw=3, stride=[1, 1], dil=[1, 1], pad=[1, 1, 1, 1], h=14, w=14,
                 bits_a=4, a_signed=False, bits_w=4, seed=threads)
        u8, ref, wp, scale, bias, g = conv_inputs(k)
        geo = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
        kept = torch.tensor([3, 7, 30])
        fp = torch.randn(2, 14, 14, 3, generator=g)
        qp = qparams(0.0, 2.0, False)
        c = O.qconv2d(u8, wp, 64, 4, False, 4, scale, bias, *geo, True, fp, kept, qp, 4, False)
        rc = R.qconv2d(ref, wp, 64, 4, False, 4, scale, bias, *geo, True, fp, kept, qp, 4, False)
        assert torch.equal(ref_codes_of(c, 4, False), rc)
        x = torch.randn(2, 64, 14, 14, generator=g).contiguous(memory_format=torch.channels_last)
        s, codes = O.quantize_activate(x, qp, 4, False, None, None, True, kept, None)
        rs, rcodes = R.quantize_activate(x, qp, 4, False, None, None, True, kept, None)
        assert torch.equal(ref_codes_of(codes, 4, False), rcodes) and torch.equal(s, rs)
    finally:
        torch.set_num_threads(old)


def test_weight_prepacked_once_and_repacked_after_in_place_change():
    k = dict(n=1, groups=1, cin=8, cout=4, kh=3, kw=3, stride=[1, 1], dil=[1, 1], pad=[1, 1, 1, 1], h=5, w=5,
             bits_a=4, a_signed=True, bits_w=4, seed=3)
    u8, ref, wp, scale, bias, g = conv_inputs(k)
    args = (8, 4, True, 4, scale, None, [1, 1], [1, 1, 1, 1], [1, 1], 1)
    O.qconv2d(u8, wp, *args, out_dtype=torch.int32)
    n_entries = derived.size("onednn_int_weight")
    # packed for the input shape (N, C, H, W): oneDNN picks the blocked layout the conv runs on
    key = (4, 8, 1, (1, 1), (1, 1), (1, 1), 8, (1, 8, 5, 5), 0, None)
    first = derived.peek("onednn_int_weight", (wp,), key)
    assert first is not None
    O.qconv2d(u8, wp, *args, out_dtype=torch.int32)
    assert derived.size("onednn_int_weight") == n_entries and derived.peek("onednn_int_weight", (wp,), key) is first
    wp.copy_(pack_weight(-R.unpack_weight(wp, 4, 8), 4))  # in place: bumps _version, so the cache must re-pack
    assert torch.equal(O.qconv2d(u8, wp, *args, out_dtype=torch.int32), R.qconv2d(ref, wp, *args, out_dtype=torch.int32))
    # one packing per input shape, at most PER_SOURCES of them per weight (many resolutions: bounded)
    for hw in range(3, 15):
        xs = torch.randint(0, 16, (1, hw, hw, 8), dtype=torch.uint8)
        O.qconv2d(xs, wp, *args, out_dtype=torch.int32)
    assert sum(k[2] == (id(wp),) for k in derived._entries if k[0] == "onednn_int_weight") <= derived.PER_SOURCES


# ----------------------------------------------------------------------------- FP branch
@pytest.mark.parametrize("groups,pad", [(1, [1, 1, 1, 1]), (1, [0, 2, 1, 0]), (3, [1, 1, 0, 0])])
def test_fp_conv2d(groups, pad):
    g = torch.Generator().manual_seed(groups)
    x = torch.randn(2, 6, 9, 8, generator=g)
    w = torch.randn(3 * groups, 6 // groups, 3, 3, generator=g)
    b = torch.randn(3 * groups, generator=g)
    ref = F.conv2d(F.pad(x, (pad[2], pad[3], pad[0], pad[1])), w, b, 2, 0, 1, groups)
    with torch.no_grad():
        y = O.fp_conv2d(x, w, b, [2, 2], pad, [1, 1], groups)
        assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.float32
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        # bf16 (AMX-BF16 / AVX-512): bf16 inputs and weights, fp32 accumulation, bf16 output; a CPU
        # without bf16 convolutions gets one sentence saying so
        if O.bf16_supported():
            yb = O.fp_conv2d(x, w, b, [2, 2], pad, [1, 1], groups, torch.bfloat16)
            assert yb.dtype == torch.bfloat16
            torch.testing.assert_close(yb.float(), ref, rtol=3e-2, atol=6e-2)
        else:
            with pytest.raises(RuntimeError, match="needs a CPU with AVX-512"):
                O.fp_conv2d(x, w, b, [2, 2], pad, [1, 1], groups, torch.bfloat16)
        # an online update changes the weight in place: the next call must see the new weight
        w.mul_(-1)
        torch.testing.assert_close(O.fp_conv2d(x, w, b, [2, 2], pad, [1, 1], groups), -ref + 2 * b.view(1, -1, 1, 1),
                                   rtol=1e-4, atol=1e-4)


def test_fp_conv2d_refuses_autograd():
    w = torch.randn(2, 3, 1, 1, requires_grad=True)
    with pytest.raises(RuntimeError, match="no-grad"):
        O.fp_conv2d(torch.randn(1, 3, 4, 4), w, None, [1, 1], [0, 0, 0, 0], [1, 1], 1)


# ----------------------------------------------------------------------------- through the custom ops
def test_custom_ops_dispatch_and_clear_errors():
    x = torch.randn(1, 5, 4, 4)
    qp = qparams(0.0, 2.0, False)
    s, codes = custom_ops.quantize_activate(x, qp, 4, False, None, None, False, None, None, "onednn")
    assert codes.shape == (1, 4, 4, 5)  # one code per byte on this backend
    wp = pack_weight(torch.ones(2, 5, 3, 3, dtype=torch.int8), 4)
    args = (5, 4, False, 4, torch.ones(2), None, [1, 1], [1, 1, 1, 1], [1, 1], 1, False, None, None, None, 4, False)
    y = custom_ops.qconv2d(codes, wp, *args, torch.float32, "onednn")
    assert y.shape == (1, 4, 4, 2)
    # nibble-packed codes (the storage format) are the wrong input here: one sentence says so
    with pytest.raises(ValueError, match=r"expected 5 for in_channels=5 at 4 bits"):
        custom_ops.qconv2d(pack_codes(O.codes_to_int(codes, 4, False), 4), wp, *args, torch.float32, "onednn")


def test_deployed_model_matches_torch_backend_and_reloads():
    import hybridops as ho
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    ho.hybridize_(model, ho.HybridConfig(bits_w=4, bits_a=4, keep=0.25), example_inputs=x)
    model.eval()
    ref = copy.deepcopy(model)
    ho.deploy_(model, backend="onednn")
    ho.deploy_(ref, backend="torch")
    assert set(ho.backends_in_use(model).values()) == {"onednn"}
    with torch.no_grad():
        y, yr = model(x), ref(x)
        torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
        # saved and loaded into a second model deployed the same way: same outputs
        fresh = copy.deepcopy(model)
        for p in fresh.parameters():
            p.data.zero_()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)


def test_fp_branch_in_bf16_inside_an_fp32_model():
    """deploy_(fp_dtype=torch.bfloat16): the pruned branch computes in bf16 (the quantize pass writes
    its slice in bf16), the rest stays fp32; saved and reloaded with the setting."""
    import io

    import hybridops as ho
    torchvision = pytest.importorskip("torchvision")
    if not O.bf16_supported():
        pytest.skip("this CPU has no bf16 convolution in oneDNN (the option is refused, tested below)")
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(16, 24, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(24, 8, 1))
    x = torch.randn(2, 16, 10, 10).relu().contiguous(memory_format=torch.channels_last)
    ho.hybridize_(conv, ho.HybridConfig(keep=0.5, fp_first_input=False), example_inputs=x)
    conv.eval()
    with torch.no_grad():
        for m in conv.modules():
            if isinstance(m, ho.HybridConv2d):
                m.pruned.weight.normal_(std=0.1)  # a branch that matters
    fp32 = ho.deploy_(copy.deepcopy(conv), backend="onednn")
    bf16 = ho.deploy_(copy.deepcopy(conv), backend="onednn", fp_dtype=torch.bfloat16)
    assert bf16[0].fp_dtype == torch.bfloat16 and fp32[0].fp_dtype is None
    with torch.no_grad():
        y32, y16 = fp32[0](x), bf16[0](x)
        ref16 = ho.deploy_(copy.deepcopy(conv), backend="torch", fp_dtype=torch.bfloat16)[0](x)
    assert y16.dtype == torch.float32 and not torch.equal(y16, y32)
    # one layer: bf16 rounding of the branch's input and weights only (~2^-8 relative of that branch)
    assert ((y16 - y32).norm() / y32.norm()).item() < 1e-2
    torch.testing.assert_close(y16, ref16, rtol=1e-2, atol=1e-2)  # the reference backend agrees
    buf = io.BytesIO()
    torch.save(bf16.state_dict(), buf)
    buf.seek(0)
    fresh = torch.nn.Sequential(torch.nn.Conv2d(16, 24, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(24, 8, 1))
    ho.load_deployed_(fresh, torch.load(buf), backend="onednn")
    assert fresh[0].fp_dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), bf16(x))


def test_fp_dtype_bad_input(monkeypatch):
    import hybridops as ho

    conv = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3))
    ho.hybridize_(conv, ho.HybridConfig(keep=0.5, fp_first_input=False), example_inputs=torch.randn(1, 4, 6, 6))
    dep = ho.deploy_(conv.eval(), backend="onednn")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        dep[0].set_fp_dtype_(torch.int8)
    # as on a CPU without bf16
    monkeypatch.setattr(registry.loaded("onednn"), "fp_conv_dtypes", (torch.float32,))
    with pytest.raises(ValueError, match="no torch.bfloat16 convolution"):
        dep[0].set_fp_dtype_(torch.bfloat16)


def test_merged_stem_packed_once_per_weight_version():
    """A full-precision-input layer (the stem) runs both branches as one float conv; on this
    backend at inference its merged weight is built and packed once per version of its sources,
    with the result of F.conv2d on the merged weight; a changed source rebuilds it."""
    import hybridops as ho

    torch.manual_seed(0)
    stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 7, stride=2, padding=3))
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    ho.hybridize_(stem, ho.HybridConfig(keep=0.25), example_inputs=x)
    dep = ho.deploy_(stem.eval(), backend="onednn")[0]
    assert dep.path == "merged"
    sources = (dep.w_packed, dep.scale, dep.bias, dep.fp_weight, dep.fp_bias, dep.fp_in_idx, dep.fp_out_idx)

    def merged():
        return layer_op.merged_weight_and_bias(dep.spec, *sources, torch.float32)

    with torch.no_grad():
        w, b = merged()
        expect = F.conv2d(x, w, b, 2, 3)
        y = dep(x)
        cached = derived.peek("merged_weight", sources, (dep.spec, torch.float32))
        assert cached is not None
        torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)
        assert torch.equal(dep(x), y)
        assert derived.peek("merged_weight", sources, (dep.spec, torch.float32)) is cached  # not rebuilt
        dep.fp_weight.mul_(2.0)  # an online update of the FP branch: the merged weight follows
        w2, b2 = merged()
        torch.testing.assert_close(dep(x), F.conv2d(x, w2, b2, 2, 3), rtol=1e-5, atol=1e-5)
        assert derived.peek("merged_weight", sources, (dep.spec, torch.float32)) is not cached
    # training through the layer still differentiates the FP branch
    dep.fp_weight.requires_grad_(True)
    dep(x).sum().backward()
    assert dep.fp_weight.grad is not None and dep.fp_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float64])
def test_qconv2d_residual_in_other_dtypes_keeps_the_geometry(out_dtype):
    """A residual with an output dtype our epilogue does not write: the conv runs in that dtype
    (on the caller's geometry, here a stride-2 conv with one output row, which the backend
    rewrites internally), then torch adds the residual."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (1, 4, 4, 8), dtype=torch.uint8, generator=g)
    w = pack_weight(torch.randint(-7, 8, (8, 8, 3, 3), generator=g).to(torch.int8), 4)
    scale = torch.rand(8, generator=g) * 0.01
    args = (codes, w, 8, 4, False, 4, scale, None, [2, 2], [0, 0, 0, 0], [1, 1], 1)
    plain = O.qconv2d(*args, False, None, None, None, 4, False, out_dtype)
    residual = torch.randn(plain.shape, generator=g).to(out_dtype)
    got = O.qconv2d(*args, True, None, None, None, 4, False, out_dtype, residual=residual)
    assert got.shape == plain.shape == (1, 1, 1, 8)
    assert torch.equal(got, torch.relu(plain + residual))
