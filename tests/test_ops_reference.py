"""Packing format, reference ops against direct int64 computations, custom-op registration."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import hybridops as ho
from hybridops.kernels import packing
from hybridops.ops import reference
from hybridops.kernels.packing import levels, pack_codes, pack_weight, packed_size, unpack_codes, unpack_weight


# ----------------------------------------------------------------------------- packing
def _random_codes(shape, bits, signed, gen):
    lv = levels(bits, signed)
    lo = -lv if signed else 0
    return torch.randint(lo, lv + 1, shape, generator=gen, dtype=torch.int16)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("channels", [1, 5, 8, 33])
def test_pack_unpack_roundtrip(bits, signed, channels):
    g = torch.Generator().manual_seed(bits * 100 + channels)
    codes = _random_codes((3, 2, channels), bits, signed, g)
    # every extreme code appears
    lv = levels(bits, signed)
    codes[0, 0, 0] = lv
    codes[0, 1, 0] = -lv if signed else 0
    p = pack_codes(codes, bits)
    assert p.dtype == torch.uint8 and p.is_contiguous()
    assert p.shape == (3, 2, packed_size(channels, bits))
    assert p.shape[-1] == ((channels + 1) // 2 if bits <= 4 else channels)
    out = unpack_codes(p, bits, channels, signed)
    assert out.dtype == (torch.int16 if (bits == 8 and not signed) else torch.int8)
    assert torch.equal(out.to(torch.int16), codes)


def test_pack_layout_hand_computed():
    # channel 2j in the low nibble, 2j+1 in the high nibble, two's complement; odd count padded with 0
    codes = torch.tensor([[1, -1, 7, -7, 3]], dtype=torch.int8)
    p = pack_codes(codes, 4)
    assert p.tolist() == [[0xF1, 0x97, 0x03]]
    assert pack_codes(torch.tensor([[-3, 5]]), 6).tolist() == [[253, 5]]


@pytest.mark.parametrize("bits", [2, 4, 5, 8])
@pytest.mark.parametrize("cin", [3, 4, 7])
def test_pack_weight_roundtrip(bits, cin):
    g = torch.Generator().manual_seed(cin + bits)
    w = _random_codes((6, cin, 3, 2), bits, True, g).to(torch.int8)
    p = pack_weight(w, bits)
    assert p.shape == (6, 3, 2, packed_size(cin, bits)) and p.dtype == torch.uint8
    assert torch.equal(unpack_weight(p, bits, cin), w)


def test_packing_errors():
    with pytest.raises(TypeError, match="integer tensor"):
        pack_codes(torch.ones(4), 4)
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 8\]"):
        pack_codes(torch.ones(4, dtype=torch.int8), 9)
    with pytest.raises(TypeError, match="must be torch.uint8"):
        unpack_codes(torch.ones(4, dtype=torch.int8), 4, 8, True)
    with pytest.raises(ValueError, match="expected 3 for 5 channels at 4 bits"):
        unpack_codes(torch.ones(2, 4, dtype=torch.uint8), 4, 5, True)
    with pytest.raises(ValueError, match="must be 4-D"):
        pack_weight(torch.ones(3, 3, dtype=torch.int8), 4)


# ----------------------------------------------------------------------------- int conv
def _direct_int64_conv(a, w, stride, padding, dilation, groups):
    """acc[n, co, y, x] = sum A_q * W_q by unfold, in int64 (no floats involved)."""
    top, bottom, left, right = padding
    ap = F.pad(a.to(torch.int64), (left, right, top, bottom))
    n, c, h, wd = ap.shape
    co, cig, kh, kw = w.shape
    ho_ = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo_ = (wd - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = torch.zeros(n, co, ho_, wo_, dtype=torch.int64)
    cog = co // groups
    w64 = w.to(torch.int64)
    for i, j in itertools.product(range(kh), range(kw)):
        y0, x0 = i * dilation[0], j * dilation[1]
        patch = ap[:, :, y0:y0 + stride[0] * (ho_ - 1) + 1:stride[0], x0:x0 + stride[1] * (wo_ - 1) + 1:stride[1]]
        for gi in range(groups):
            pa = patch[:, gi * cig:(gi + 1) * cig]                       # (n, cig, ho, wo)
            wg = w64[gi * cog:(gi + 1) * cog, :, i, j]                   # (cog, cig)
            out[:, gi * cog:(gi + 1) * cog] += torch.einsum("nchw,oc->nohw", pa, wg)
    return out


GEOMETRIES = [
    # cin, cout, k, stride, padding (t, b, l, r), dilation, groups, h, w, bits_a, a_signed, bits_w
    (5, 6, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, 7, 9, 4, False, 4),
    (7, 3, (3, 2), (2, 1), (0, 2, 1, 0), (1, 2), 1, 8, 7, 4, True, 4),       # asymmetric padding
    (6, 9, (3, 3), (2, 2), (2, 2, 2, 2), (2, 1), 3, 9, 10, 5, False, 4),     # groups, dilation
    (4, 4, (3, 3), (1, 2), (1, 1, 1, 1), (1, 1), 4, 6, 6, 3, False, 2),     # depthwise
    (3, 5, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, 1, 5, 8, False, 8),     # 1x1, batch-1 rows, 8-bit
    (9, 2, (7, 7), (3, 3), (4, 4, 4, 4), (1, 1), 1, 5, 5, 8, True, 8),      # padding > kernel/2, 7x7
    # one channel, one output along a strided W: PyTorch's fp32 CPU conv leaves outputs unwritten
    # (bench/fuzz_onednn.py's find, the residual mismatch in docs/cpu_backend.md)
    (1, 2, (2, 3), (1, 3), (3, 2, 0, 2), (1, 1), 1, 3, 2, 2, True, 2),
]


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_qconv2d_int32_accumulators_exact(geo):
    cin, cout, k, stride, pad, dil, groups, h, w, ba, asg, bw = geo
    g = torch.Generator().manual_seed(cin * cout + h)
    a = _random_codes((2, cin, h, w), ba, asg, g)
    wq = _random_codes((cout, cin // groups, *k), bw, True, g)
    x_codes = pack_codes(a.permute(0, 2, 3, 1), ba)
    w_packed = pack_weight(wq, bw)
    acc = torch.ops.hybridops.qconv2d(x_codes, w_packed, cin, ba, asg, bw, torch.ones(cout), None, list(stride),
                                      list(pad), list(dil), groups, False, None, None, None, 4, False, torch.int32,
                                      "torch")
    expect = _direct_int64_conv(a, wq, stride, pad, dil, groups).permute(0, 2, 3, 1)
    assert acc.dtype == torch.int32 and acc.shape == expect.shape
    assert torch.equal(acc.to(torch.int64), expect)


def test_float_conv2d_one_output_along_a_strided_dimension():
    # a batch-2 single-channel input in NHWC memory (a channel slice) at stride (1, 3) with one
    # output along W: PyTorch's fp32 CPU conv alone leaves outputs unwritten there
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 4, 1, generator=g).permute(0, 3, 1, 2)
    w, b = torch.randn(3, 1, 2, 3, generator=g), torch.randn(3, generator=g)
    for top, bottom, left, right in ((0, 0, 0, 0), (1, 2, 0, 1)):
        y = reference.float_conv2d(x, w, b, (1, 3), (top, bottom, left, right), (1, 1))
        expect = F.conv2d(F.pad(x.double(), (left, right, top, bottom)), w.double(), b.double(), (1, 3))
        assert y.shape == expect.shape and expect.shape[2:] == (6 + top + bottom - 1, 1)
        torch.testing.assert_close(y.double(), expect, rtol=1e-5, atol=1e-5)


def test_int_conv2d_exact_above_fp32_mantissa():
    # 8-bit codes over a big reduction exceed 2^24: the reference switches to float64 and stays exact
    g = torch.Generator().manual_seed(0)
    a = torch.full((1, 300, 5, 5), 255, dtype=torch.int16)
    w = torch.full((2, 300, 3, 3), 127, dtype=torch.int16)
    w[1] = -127
    w[1, 0, 0, 0] = 126
    out = reference.int_conv2d(a, w, (1, 1), (1, 1, 1, 1), (1, 1), 1, 255 * 127)
    expect = _direct_int64_conv(a, w, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert int(expect.abs().max()) > 2 ** 24
    assert torch.equal(out.to(torch.int64), expect)
    del g


def test_qconv2d_float_epilogue_matches_hand_formula():
    g = torch.Generator().manual_seed(3)
    cin, cout = 5, 6
    a = _random_codes((2, cin, 6, 5), 4, False, g)
    wq = _random_codes((cout, cin, 3, 3), 4, True, g)
    scale = torch.rand(cout, generator=g) + 0.1
    bias = torch.randn(cout, generator=g)
    fp_out_idx = torch.tensor([4, 1])
    fp_out = torch.randn(2, 4, 3, 2, generator=g)
    args = (pack_codes(a.permute(0, 2, 3, 1), 4), pack_weight(wq, 4), cin, 4, False, 4, scale, bias,
            [1, 1], [0, 0, 0, 0], [1, 1], 1)
    y = torch.ops.hybridops.qconv2d(*args, True, fp_out, fp_out_idx, None, 4, False, torch.float32, "torch")
    acc = _direct_int64_conv(a, wq, (1, 1), (0, 0, 0, 0), (1, 1), 1).permute(0, 2, 3, 1).float()
    expect = acc * scale + bias
    expect[..., 4] += fp_out[..., 0]
    expect[..., 1] += fp_out[..., 1]
    torch.testing.assert_close(y, expect.relu(), atol=1e-5, rtol=1e-6)
    # requantized output: the packed codes of the same y
    qp = torch.tensor([0.25, 0.0])
    codes = torch.ops.hybridops.qconv2d(*args, True, fp_out, fp_out_idx, qp, 4, False, torch.float32, "torch")
    assert codes.dtype == torch.uint8 and codes.shape == (2, 4, 3, 3)
    assert torch.equal(unpack_codes(codes, 4, cout, False).to(torch.int16),
                       reference.codes_from_qparams(y, qp, 4, False))


def test_quantize_activate_reference():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4).contiguous(memory_format=torch.channels_last)
    qp = torch.tensor([2.0, -0.5])
    sc, sh = torch.rand(5) + 0.5, torch.randn(5)
    keep = torch.tensor([3, 0])
    xs, codes = torch.ops.hybridops.quantize_activate(x, qp, 4, False, sc, sh, True, keep, torch.float32, "torch")
    t = (x * sc.view(1, -1, 1, 1) + sh.view(1, -1, 1, 1)).relu()
    assert xs.shape == (2, 3, 4, 2)
    torch.testing.assert_close(xs, t[:, [3, 0]].permute(0, 2, 3, 1))
    expect = ho.quantize_codes(t.permute(0, 2, 3, 1), torch.tensor(0.5), torch.tensor(0.25), 4, False)[0]
    assert torch.equal(unpack_codes(codes, 4, 5, False).to(torch.int16), expect)
    # without fp_in_idx the slice is an empty (0,) tensor
    xs2, codes2 = torch.ops.hybridops.quantize_activate(x, qp, 4, False, None, None, False, None, None, "torch")
    assert xs2.shape == (0,) and codes2.shape == (2, 3, 4, 3)


def test_quantize_activate_gradient_reaches_kept_channels_only():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    qp = torch.tensor([2.0, -0.5])
    sc, sh = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64)
    keep = torch.tensor([1, 4])
    xs, _ = torch.ops.hybridops.quantize_activate(x, qp, 4, False, sc, sh, True, keep, torch.float64, "torch")
    gout = torch.randn_like(xs)
    (xs * gout).sum().backward()
    xr = x.detach().clone().requires_grad_()
    tr = (xr * sc.view(1, -1, 1, 1) + sh.view(1, -1, 1, 1)).relu()[:, [1, 4]].permute(0, 2, 3, 1)
    (tr * gout).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-6, rtol=1e-6)
    assert bool((x.grad[:, [0, 2, 3]] == 0).all())


# ----------------------------------------------------------------------------- opcheck
def test_opcheck_fake_quantize():
    x = torch.randn(2, 5, 4, 4, requires_grad=True)
    for signed in (True, False):
        opcheck(torch.ops.hybridops.fake_quantize.default, (x, torch.tensor([2.0, -0.5]), 4, signed, "torch"))


def test_opcheck_quantize_activate():
    x = torch.randn(2, 5, 4, 3, requires_grad=True)
    qp = torch.tensor([2.0, -0.5])
    opcheck(torch.ops.hybridops.quantize_activate.default,
            (x, qp, 4, False, torch.rand(5), torch.randn(5), True, torch.tensor([0, 3]), torch.float32, "torch"))
    opcheck(torch.ops.hybridops.quantize_activate.default,
            (x, qp, 5, True, None, None, False, None, None, "torch"))


def _qconv_inputs(cin=5, cout=6, bits=4):
    g = torch.Generator().manual_seed(7)
    a = _random_codes((2, 6, 7, cin), bits, False, g)
    w = _random_codes((cout, cin, 3, 3), bits, True, g)
    return pack_codes(a, bits), pack_weight(w, bits)


def test_opcheck_qconv2d_float_int32_and_requant():
    xc, wp = _qconv_inputs()
    fp = torch.randn(2, 4, 5, 2, requires_grad=True)
    geo = ([1, 1], [0, 0, 0, 0], [1, 1], 1)
    opcheck(torch.ops.hybridops.qconv2d.default,
            (xc, wp, 5, 4, False, 4, torch.rand(6), torch.randn(6), *geo, True, fp, torch.tensor([1, 4]), None, 4,
             False, torch.float32, "torch"))
    opcheck(torch.ops.hybridops.qconv2d.default,
            (xc, wp, 5, 4, False, 4, torch.rand(6), None, [2, 1], [1, 0, 0, 1], [1, 2], 1, False, None, None, None,
             4, False, torch.int32, "torch"))
    # requantized outputs are uint8: opcheck's autograd tests need a float output, so schema/fake only
    opcheck(torch.ops.hybridops.qconv2d.default,
            (xc, wp, 5, 4, False, 4, torch.rand(6), torch.randn(6), *geo, True, None, None,
             torch.tensor([0.25, 0.0]), 4, False, torch.float32, "torch"),
            test_utils=("test_schema", "test_faketensor"))


def test_qconv2d_backward_only_to_fp_out():
    xc, wp = _qconv_inputs()
    fp = torch.randn(2, 4, 5, 2, requires_grad=True)
    scale = torch.rand(6, requires_grad=True)
    y = torch.ops.hybridops.qconv2d(xc, wp, 5, 4, False, 4, scale, None, [1, 1], [0, 0, 0, 0], [1, 1], 1, True,
                                    fp, torch.tensor([1, 4]), None, 4, False, torch.float32, "torch")
    g = torch.randn_like(y)
    (y * g).sum().backward()
    expect = torch.where(y > 0, g, torch.zeros_like(g))[..., [1, 4]]
    torch.testing.assert_close(fp.grad, expect)
    assert scale.grad is None  # the quantized branch is frozen integer data


# ----------------------------------------------------------------------------- bad input, empty batch
def test_ops_bad_input_messages():
    xc, wp = _qconv_inputs()
    s = torch.rand(6)
    geo = ([1, 1], [0, 0, 0, 0], [1, 1], 1, False, None, None, None, 4, False, torch.float32, "torch")
    with pytest.raises(ValueError, match="x_codes must be packed uint8"):
        torch.ops.hybridops.qconv2d(xc.to(torch.int8), wp, 5, 4, False, 4, s, None, *geo)
    with pytest.raises(ValueError, match="expected 4 for in_channels=7"):
        torch.ops.hybridops.qconv2d(xc, wp, 7, 4, False, 4, s, None, *geo)
    with pytest.raises(ValueError, match=r"scale must have shape \(6,\)"):
        torch.ops.hybridops.qconv2d(xc, wp, 5, 4, False, 4, torch.rand(5), None, *geo)
    with pytest.raises(ValueError, match="empty output"):
        torch.ops.hybridops.qconv2d(xc[:, :1, :1], wp, 5, 4, False, 4, s, None, *geo)
    with pytest.raises(ValueError, match="raw accumulators"):
        torch.ops.hybridops.qconv2d(xc, wp, 5, 4, False, 4, s, torch.zeros(6), [1, 1], [0, 0, 0, 0], [1, 1], 1,
                                    False, None, None, None, 4, False, torch.int32, "torch")
    with pytest.raises(ValueError, match="quantize_activate expects x of shape"):
        torch.ops.hybridops.quantize_activate(torch.randn(2, 3, 4), torch.tensor([1.0, 0.0]), 4, False, None, None,
                                              False, None, None, "torch")
    with pytest.raises(ValueError, match="floating-point x"):
        torch.ops.hybridops.quantize_activate(torch.ones(1, 3, 2, 2, dtype=torch.int32), torch.tensor([1.0, 0.0]),
                                              4, False, None, None, False, None, None, "torch")
    with pytest.raises(ValueError, match=r"bn_scale must have shape \(3,\)"):
        torch.ops.hybridops.quantize_activate(torch.randn(1, 3, 2, 2), torch.tensor([1.0, 0.0]), 4, False,
                                              torch.ones(4), None, False, None, None, "torch")
    with pytest.raises(ValueError, match="unsigned 8-bit"):
        torch.ops.hybridops.quantize_activate(torch.randn(1, 3, 2, 2), torch.tensor([1.0, 0.0]), 8, False,
                                              None, None, False, None, None, "triton")


def test_ops_empty_batch():
    xc, wp = _qconv_inputs()
    x0 = torch.randn(0, 5, 6, 7)
    xs, codes = torch.ops.hybridops.quantize_activate(x0, torch.tensor([2.0, -0.5]), 4, False, None, None, False,
                                                      torch.tensor([0, 2]), None, "torch")
    assert xs.shape == (0, 6, 7, 2) and codes.shape == (0, 6, 7, 3)
    y = torch.ops.hybridops.qconv2d(codes, wp, 5, 4, False, 4, torch.rand(6), None, [1, 1], [1, 1, 1, 1], [1, 1],
                                    1, False, None, None, None, 4, False, torch.float32, "torch")
    assert y.shape == (0, 6, 7, 6) and y.dtype == torch.float32
    acc = torch.ops.hybridops.qconv2d(codes, wp, 5, 4, False, 4, torch.rand(6), None, [2, 2], [0, 0, 0, 0], [1, 1],
                                      1, False, None, None, None, 4, False, torch.int32, "torch")
    assert acc.shape == (0, 2, 3, 6) and acc.dtype == torch.int32


# ----------------------------------------------------------------------------- backends
def test_backend_resolution_and_errors():
    # "auto" on the CPU picks the oneDNN int8 backend wherever its extension loads
    auto_cpu = "onednn" if ho.backend_unavailable_reason("onednn", "cpu") is None else "torch"
    assert ho.resolve_backend("auto", "cpu") == auto_cpu
    assert ho.resolve_backend(None, "cpu") == auto_cpu
    assert ho.resolve_backend("torch", "cpu") == "torch"
    assert "torch" in ho.available_backends("cpu")
    with pytest.raises(RuntimeError, match="the cuda backend"):
        ho.resolve_backend("cuda", "cpu")
    with pytest.raises(RuntimeError, match="unknown backend 'bogus'"):
        ho.resolve_backend("bogus", "cpu")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        ho.set_backend("bogus")
    assert ho.get_backend() == "auto"
    with ho.use_backend("torch"):
        assert ho.get_backend() == "torch"
        assert ho.resolve_backend(None, "cpu") == "torch"
    assert ho.get_backend() == "auto"


def test_quantize_activate_gradient_with_repeated_input_channels():
    # a grouped conv's pruned branch gathers the same input channel once per kept output channel
    # of its group: the gradients of the repeated copies must add up
    torch.manual_seed(0)
    x = torch.randn(1, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([2, 0, 2, 2])
    xs, _ = torch.ops.hybridops.quantize_activate(x, torch.tensor([2.0, -0.5]), 4, True, None, None, False, keep,
                                                  torch.float64, "torch")
    gout = torch.randn_like(xs)
    (xs * gout).sum().backward()
    expect = torch.zeros_like(x)
    expect[:, 0] = gout[..., 1]
    expect[:, 2] = gout[..., 0] + gout[..., 2] + gout[..., 3]
    torch.testing.assert_close(x.grad, expect)
