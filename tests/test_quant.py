"""QIL quantizers (eq 6-9): hand-computed values, STE gradients, gradcheck, config errors."""
import math

import pytest
import torch

import hybridops as ho
from hybridops.quant import IntervalQuantizer, _mse_clip, qparams

# c = 0.5, d = 0.25  ->  alpha = 0.5 / d = 2, beta = 0.5 - c * alpha = -0.5 (all exact in binary)
C, D = torch.tensor(0.5), torch.tensor(0.25)


def test_qparams_hand_computed():
    q = qparams(C, D)
    assert q.dtype == torch.float32
    assert q.tolist() == [2.0, -0.5]
    q2 = qparams(torch.tensor(1.0), torch.tensor(0.5))  # alpha = 1, beta = -0.5
    assert q2.tolist() == [1.0, -0.5]


# (x, hat, code) for signed 4 bits (levels 7): hat = sign(x) clamp(2|x| - 0.5, 0, 1), code = round(7 hat)
SIGNED_CASES = [
    (0.0, 0.0, 0),       # sign(0) = 0
    (0.1, 0.0, 0),       # below the interval (|x| < c - d = 0.25): pruned to 0
    (-0.1, 0.0, 0),
    (0.25, 0.0, 0),      # lower clamp boundary exactly
    (0.5, 0.5, 4),       # 3.5 rounds half away from zero -> 4
    (-0.5, -0.5, -4),    # ... and symmetrically -> -4
    (-0.6, -0.7, -5),    # 4.9 -> 5
    (0.75, 1.0, 7),      # upper clamp boundary exactly (c + d)
    (1.0, 1.0, 7),       # above the interval: clipped
    (-3.0, -1.0, -7),
]

# unsigned 4 bits (levels 15): hat = clamp(2x - 0.5, 0, 1), code = round(15 hat)
UNSIGNED_CASES = [
    (-0.3, 0.0, 0),      # negative: clamped to 0
    (0.25, 0.0, 0),      # lower boundary
    (0.4, 0.3, 5),       # 4.5 -> 5
    (0.5, 0.5, 8),       # 7.5 -> 8
    (0.6, 0.7, 11),      # 10.5 -> 11
    (0.75, 1.0, 15),     # upper boundary
    (2.0, 1.0, 15),
]


@pytest.mark.parametrize("signed,cases", [(True, SIGNED_CASES), (False, UNSIGNED_CASES)])
def test_interval_hat_and_codes_hand_computed(signed, cases):
    x = torch.tensor([c[0] for c in cases])
    hat = ho.interval_hat(x, C, D, signed)
    torch.testing.assert_close(hat, torch.tensor([c[1] for c in cases]), atol=1e-6, rtol=0)
    codes, scale = ho.quantize_codes(x, C, D, 4, signed)
    assert codes.dtype == torch.int16
    assert codes.tolist() == [c[2] for c in cases]
    assert scale == pytest.approx(1 / (7 if signed else 15))
    fq = ho.fake_quantize(x, C, D, 4, signed)
    torch.testing.assert_close(fq, torch.tensor([c[2] for c in cases], dtype=torch.float32) * scale,
                               atol=1e-7, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_code_ranges(bits, signed):
    x = torch.linspace(-5, 5, 1001)
    codes, scale = ho.quantize_codes(x, C, D, bits, signed)
    lv = (2 ** (bits - 1) - 1) if signed else (2 ** bits - 1)
    assert int(codes.max()) == lv
    assert int(codes.min()) == (-lv if signed else 0)
    assert scale == pytest.approx(1 / lv)
    # monotone in x
    assert bool((codes[1:] >= codes[:-1]).all())


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_quantize_codes_agrees_with_fake_quantize(signed, dtype):
    torch.manual_seed(0)
    x = (torch.randn(4, 7, 5) * 0.6).to(dtype)
    c, d = torch.tensor(0.4), torch.tensor(0.3)
    codes, scale = ho.quantize_codes(x, c, d, 5, signed)
    fq = ho.fake_quantize(x, c, d, 5, signed)
    assert fq.dtype == dtype and fq.shape == x.shape
    lv = 15 if signed else 31
    # the fake-quantized value is exactly code * (1 / levels), computed in fp32 (fp64 inputs in
    # fp64) and rounded to the input's dtype
    math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert scale == 1.0 / lv
    assert torch.equal(fq, (codes.to(math_dtype) * scale).to(dtype))
    torch.testing.assert_close(fq.double(), codes.double() * scale, atol=1e-2 if dtype == torch.bfloat16 else 1e-7,
                               rtol=0)


def _xs_off_kinks(signed):
    # avoid |x| in {0, c - d, c + d} = {0, 0.1, 0.7} where the clamp / sign is not differentiable
    vals = [-1.3, -0.65, -0.4, -0.2, -0.05, 0.03, 0.15, 0.33, 0.5, 0.69, 0.9, 2.0]
    return torch.tensor(vals, dtype=torch.float64)


@pytest.mark.parametrize("signed", [True, False])
def test_interval_hat_gradcheck_float64(signed):
    x = _xs_off_kinks(signed).requires_grad_()
    c = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    d = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c, d: ho.interval_hat(x, c, d, signed), (x, c, d))
    assert torch.autograd.gradgradcheck(lambda x, c, d: ho.interval_hat(x, c, d, signed), (x, c, d))


@pytest.mark.parametrize("signed", [True, False])
def test_interval_hat_gradient_hand_derived(signed):
    # inside the interval: d hat / dx = alpha, d hat / dc = -sign(x) alpha (or -alpha),
    # d hat / dd = -0.5 sign(x) (|x| - c) / d^2 ... derived: hat = s (0.5 (|x| - c) / d + 0.5)
    x = torch.tensor([0.5, -0.3] if signed else [0.5, 0.3], dtype=torch.float64, requires_grad=True)
    c = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    d = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    ho.interval_hat(x, c, d, signed).sum().backward()
    s = torch.sign(x.detach()) if signed else torch.ones(2, dtype=torch.float64)
    mag = x.detach().abs() if signed else x.detach()
    torch.testing.assert_close(x.grad, torch.full((2,), 0.5 / 0.3, dtype=torch.float64))
    torch.testing.assert_close(c.grad, (-0.5 / 0.3 * s).sum())
    torch.testing.assert_close(d.grad, (-0.5 * (mag - 0.4) / 0.3 ** 2 * s).sum())


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fake_quantize_ste_equals_interval_hat_gradient(signed, dtype):
    torch.manual_seed(1)
    x0 = _xs_off_kinks(signed)
    x0 = torch.cat([x0, torch.randn(50, dtype=torch.float64)])
    x0 = x0[(x0.abs() - 0.1).abs() > 1e-3]
    x0 = x0[((x0.abs() - 0.7).abs() > 1e-3) & (x0.abs() > 1e-3)]
    g = torch.randn_like(x0)

    x = x0.clone().to(dtype).requires_grad_()
    c = torch.tensor(0.4, requires_grad=True)
    d = torch.tensor(0.3, requires_grad=True)
    (ho.fake_quantize(x, c, d, 4, signed) * g.to(dtype)).sum().backward()

    xr = x0.clone().requires_grad_()
    cr = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    dr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    (ho.interval_hat(xr, cr, dr, signed) * g).sum().backward()

    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.grad.double(), cr.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d.grad.double(), dr.grad, atol=1e-4, rtol=1e-4)
    # outside the interval the STE passes nothing to x
    outside = ((x0.abs() if signed else x0) * (0.5 / 0.3) + (0.5 - 0.4 * 0.5 / 0.3))
    outside = (outside <= 0) | (outside >= 1)
    assert bool((x.grad[outside] == 0).all())
    assert bool((x.grad[~outside] != 0).all())


def test_fake_quantize_forward_equals_rounded_interval_hat():
    torch.manual_seed(2)
    x = torch.randn(1000)
    for signed, lv in ((True, 7), (False, 15)):
        hat = ho.interval_hat(x, C, D, signed)
        expect = torch.sign(hat) * torch.floor(hat.abs() * lv + 0.5) * (1.0 / lv)
        assert torch.equal(ho.fake_quantize(x, C, D, 4, signed), expect)


def test_fake_quantize_nan_and_inf_documented():
    # NaN has no code: it maps to code 0 (the pruned range), on every platform; +-inf clip.
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.5])
    codes, _ = ho.quantize_codes(x, C, D, 4, True)
    assert codes.tolist() == [0, 7, -7, 4]
    codes_u, _ = ho.quantize_codes(x, C, D, 4, False)
    assert codes_u.tolist() == [0, 15, 0, 8]
    # the fake quantizer's float output keeps them non-finite, as float PyTorch would (NaN)
    fq = ho.fake_quantize(x, C, D, 4, True)
    assert fq.isnan().tolist() == [True, True, True, False]
    # ... and the STE passes no gradient through a NaN element
    xg = x.clone().requires_grad_()
    ho.fake_quantize(xg, C, D, 4, True).sum().backward()
    assert xg.grad[0].item() == 0.0


def test_fake_quantize_empty_and_bad_input():
    e = ho.fake_quantize(torch.empty(0, 3), C, D, 4, False)
    assert e.shape == (0, 3)
    with pytest.raises(ValueError, match="floating-point"):
        ho.fake_quantize(torch.ones(3, dtype=torch.int32), C, D, 4, False)
    with pytest.raises(ValueError, match="bits must be an integer in \\[2, 8\\]"):
        ho.fake_quantize(torch.ones(3), C, D, 9, False)
    with pytest.raises(ValueError, match="qparams must be a float32"):
        torch.ops.hybridops.fake_quantize(torch.ones(3), torch.tensor([1.0, 0.0], dtype=torch.float64), 4, False,
                                          "torch")
    with pytest.raises(ValueError, match="unknown backend"):
        ho.fake_quantize(torch.ones(3), C, D, 4, False, backend="tpu")


# ----------------------------------------------------------------------------- IntervalQuantizer
def test_interval_quantizer_parametrisation_keeps_d_positive():
    q = IntervalQuantizer(4, signed=True, c=0.3, d=0.2)
    assert q.d.item() == pytest.approx(0.2)
    assert q.qparams().tolist() == pytest.approx([2.5, 0.5 - 0.3 * 2.5])
    # a large negative gradient step on log_d still leaves d > 0
    with torch.no_grad():
        q.log_d -= 50.0
    assert q.d.item() > 0
    x = torch.randn(10, requires_grad=True)
    q(x).sum().backward()
    assert q.c.grad is not None and q.log_d.grad is not None


def test_interval_quantizer_calibrate_sets_c_equals_d():
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    q = IntervalQuantizer(4, signed=True)
    s = q.calibrate(w)
    assert 0 < s <= w.abs().max().item()
    assert q.c.item() == pytest.approx(s / 2) and q.d.item() == pytest.approx(s / 2)
    assert q.qparams()[1].item() == pytest.approx(0.0, abs=1e-6)  # beta = 0 when c = d
    # with beta = 0, dequant = hat_q * s: values at the clip become +-s
    fq = q(torch.tensor([10.0, -10.0]))
    assert fq.tolist() == [1.0, -1.0]
    # MSE-optimal clip beats clipping at max|w| for 4 bits on Gaussian data
    def err(clip):
        lv = 7
        return float(((torch.floor((w.abs() / clip).clamp(0, 1) * lv + 0.5) * clip / lv - w.abs()) ** 2).sum())
    assert err(s) <= err(w.abs().max().item())
    # calibrate decides signedness when asked
    q.calibrate(torch.rand(100), signed=False)
    assert q.signed is False


def test_mse_clip_degenerate_inputs():
    assert _mse_clip(torch.zeros(10), 4, True) == 1.0
    assert _mse_clip(torch.empty(0), 4, True) == 1.0
    assert _mse_clip(-torch.ones(10), 4, False) == 1.0  # nothing positive to cover


@pytest.mark.parametrize("bits", [0, 1, 9, 4.0, True])
def test_interval_quantizer_bad_bits(bits):
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 8\]"):
        IntervalQuantizer(bits, signed=True)


@pytest.mark.parametrize("d", [0.0, -0.5, float("nan")])
def test_interval_quantizer_bad_width(d):
    with pytest.raises(ValueError, match="width d must be positive"):
        IntervalQuantizer(4, signed=True, d=d)


def test_interval_quantizer_state_dict_keeps_signedness():
    q = IntervalQuantizer(4, signed=False)
    q.calibrate(torch.randn(100), signed=True)
    q2 = IntervalQuantizer(4, signed=False)
    q2.load_state_dict(q.state_dict())
    assert q2.signed is True
    x = torch.randn(50)
    assert torch.equal(q(x), q2(x))
    with pytest.raises(ValueError, match="bits"):
        IntervalQuantizer(5, signed=False).load_state_dict(q.state_dict())


# ----------------------------------------------------------------------------- HybridConfig
@pytest.mark.parametrize("kw,msg", [
    (dict(bits_w=0), r"bits_w must be an integer in \[2, 8\]"),
    (dict(bits_w=9), r"bits_w must be an integer in \[2, 8\]"),
    (dict(bits_a=0), r"bits_a must be an integer in \[2, 8\]"),
    (dict(bits_a=9), r"bits_a must be an integer in \[2, 8\]"),
    (dict(bits_a=4.5), r"bits_a must be an integer"),
    (dict(keep=0.0), r"keep .* must lie in \(0, 1\]"),
    (dict(keep=-0.1), r"keep .* must lie in \(0, 1\]"),
    (dict(keep=1.5), r"keep .* must lie in \(0, 1\]"),
    (dict(keep=float("nan")), r"keep .* must lie in \(0, 1\]"),
    (dict(tau=0.0), r"tau .* must be positive"),
    (dict(gate_threshold=1.0), r"gate_threshold must lie in \(0, 1\)"),
    (dict(gate_init_logit=0.0), r"gate_init_logit must be positive"),
    (dict(mu0=2.0), r"mu0 must lie in \[0, 1\]"),
])
def test_bad_config_one_clear_sentence(kw, msg):
    with pytest.raises(ValueError, match=msg) as e:
        ho.HybridConfig(**kw)
    text = str(e.value)
    assert text.endswith(".") and "\n" not in text


def test_good_config_edges():
    ho.HybridConfig(keep=1.0, bits_w=2, bits_a=8)
    ho.HybridConfig(keep=1e-3)
