"""Trainable hybrid layers vs their deployed (packed integer) versions."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hybridops as ho
from hybridops.kernels.packing import unpack_weight

# The deployed layer computes the same function in a different order (integer accumulators
# times one folded scale instead of float fake-quantized conv times out_scale): it matches the
# trainable layer to fp32 rounding, about 5e-7 absolute on these unit-scale layers.
ATOL, RTOL = 2e-5, 1e-5

CONV_CASES = {
    "plain": dict(in_channels=5, out_channels=7, kernel_size=3, padding=1),
    "stride2_groups": dict(in_channels=6, out_channels=9, kernel_size=3, stride=2, padding=1, groups=3),
    "depthwise": dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6),
    "depthwise_mult": dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=2, groups=4, bias=False),
    "dilation": dict(in_channels=5, out_channels=4, kernel_size=3, padding=2, dilation=2),
    "same_even_kernel": dict(in_channels=3, out_channels=5, kernel_size=4, padding="same"),
    "same_even_dilated": dict(in_channels=3, out_channels=5, kernel_size=(2, 4), padding="same", dilation=(1, 2)),
    "reflect": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
    "replicate_asym": dict(in_channels=4, out_channels=6, kernel_size=(3, 1), padding=(1, 0),
                           padding_mode="replicate"),
    "valid_1x1": dict(in_channels=7, out_channels=3, kernel_size=1, padding="valid"),
    "7x7_stride3": dict(in_channels=3, out_channels=4, kernel_size=7, stride=3, padding=4),
}


def _hybrid(conv_kwargs, keep=0.5, quantize_input=True, relu_input=True, seed=0, x_shape=(2, None, 9, 11)):
    torch.manual_seed(seed)
    conv = nn.Conv2d(**conv_kwargs)
    h = ho.HybridConv2d.from_float(conv, keep=keep, quantize_input=quantize_input)
    x = torch.randn(x_shape[0], conv.in_channels, *x_shape[2:])
    if relu_input:
        x = x.relu()
    h.calibrate(x)
    h.eval()
    return conv, h, x


@pytest.mark.parametrize("case", sorted(CONV_CASES))
@pytest.mark.parametrize("quantize_input", [True, False])
def test_deployed_conv_equals_trainable_eval(case, quantize_input):
    conv, h, x = _hybrid(CONV_CASES[case], quantize_input=quantize_input)
    d = ho.deploy_layer(h, "torch")
    with torch.no_grad():
        y_h, y_d, y_f = h(x), d(x), conv(x)
    assert y_d.shape == y_f.shape and y_d.dtype == y_f.dtype
    torch.testing.assert_close(y_d, y_h, atol=ATOL, rtol=RTOL)
    assert d.kept_channels == h.pruned.gate.kept_mask().sum().item() > 0
    # and an untrained hybrid layer is already close to the float layer it replaces
    assert ((y_h - y_f).norm() / y_f.norm()).item() < 0.15


@pytest.mark.parametrize("case", ["plain", "depthwise"])
def test_deployed_signed_input(case):
    # calibration saw negative inputs: signed activation codes (eq 6-7 style)
    conv, h, x = _hybrid(CONV_CASES[case], relu_input=False)
    assert h.quant.aq.signed
    d = ho.deploy_layer(h, "torch")
    assert d.a_signed
    with torch.no_grad():
        torch.testing.assert_close(d(x), h(x), atol=ATOL, rtol=RTOL)


def test_deployed_weights_are_the_quantized_codes():
    conv, h, x = _hybrid(CONV_CASES["stride2_groups"])
    d = ho.deploy_layer(h, "torch")
    codes = unpack_weight(d.w_packed, 4, 2)
    assert torch.equal(codes.to(torch.int16), h.quant.wq.codes(h.quant.weight)[0])
    assert int(codes.abs().max()) <= 7
    # scale folds out_scale / (levels_a * levels_w)
    torch.testing.assert_close(d.scale, h.quant.out_scale.detach() / (15 * 7))
    kept = h.pruned.gate.kept_indices()
    assert torch.equal(d.fp_out_idx, kept)
    assert torch.equal(d.fp_weight.detach(), h.pruned.weight.detach()[kept])


def test_deployed_with_no_kept_channel_and_all_kept():
    conv, h, x = _hybrid(CONV_CASES["plain"], keep=1.0)
    assert h.pruned.gate.kept_mask().all()
    with torch.no_grad():
        torch.testing.assert_close(ho.deploy_layer(h, "torch")(x), h(x), atol=ATOL, rtol=RTOL)
        h.pruned.gate.logits.fill_(-5.0)
    d = ho.deploy_layer(h, "torch")
    assert d.kept_channels == 0
    with torch.no_grad():
        torch.testing.assert_close(d(x), h(x), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(d(x), h.quant(x), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("quantize_input", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_deployed_linear_equals_trainable(quantize_input, bias):
    torch.manual_seed(0)
    lin = nn.Linear(13, 6, bias=bias)
    h = ho.HybridLinear.from_float(lin, keep=0.5, quantize_input=quantize_input)
    x = torch.randn(3, 4, 13).relu()
    h.calibrate(x)
    h.eval()
    d = ho.deploy_layer(h, "torch")
    with torch.no_grad():
        y = d(x)
        torch.testing.assert_close(y, h(x), atol=ATOL, rtol=RTOL)
    assert y.shape == (3, 4, 6)
    assert d.out_features == 6
    with pytest.raises(ValueError, match=r"expects input \(\.\.\., 13\)"):
        d(torch.randn(2, 12))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("quantize_input", [True, False])
def test_deployed_output_layout_matches_nn_conv2d(memory_format, quantize_input):
    conv, h, x = _hybrid(CONV_CASES["stride2_groups"], quantize_input=quantize_input)
    d = ho.deploy_layer(h, "torch")
    x = x.contiguous(memory_format=memory_format)
    with torch.no_grad():
        y, ref = d(x), conv(x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert y.stride() == ref.stride()
    assert y.is_contiguous(memory_format=memory_format)
    if memory_format == torch.contiguous_format:
        y.view(y.shape[0], -1)  # real models call .view on conv outputs


def test_deployed_float64_input_keeps_dtype():
    conv, h, x = _hybrid(CONV_CASES["plain"])
    d = ho.deploy_layer(h, "torch")
    with torch.no_grad():
        y = d(x.double())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y.float(), d(x).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["plain", "stride2_groups", "dilation", "reflect", "same_even_kernel"])
def test_deployed_gradients_only_to_fp_branch(case):
    conv, h, x = _hybrid(CONV_CASES[case])
    d = ho.deploy_layer(h, "torch")
    assert [n for n, p in d.named_parameters()] == ["fp_weight"]
    assert not any(b.requires_grad for b in d.buffers())
    xd = x.clone().requires_grad_()
    y = d(xd)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    # reference: autograd through the trainable layer's pruned branch (eval mask), the only
    # differentiable part after deploy (the quantized branch is frozen integer data)
    xp = x.clone().requires_grad_()
    h.zero_grad()
    (h.pruned(xp) * g).sum().backward()
    kept = h.pruned.gate.kept_indices()
    torch.testing.assert_close(d.fp_weight.grad, h.pruned.weight.grad[kept], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xd.grad, xp.grad, atol=1e-5, rtol=1e-5)


def test_deployed_fp_input_gradient_to_fp_weight():
    conv, h, x = _hybrid(CONV_CASES["depthwise"], quantize_input=False)
    d = ho.deploy_layer(h, "torch")
    y = d(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    h.zero_grad()
    (h.pruned(x) * g).sum().backward()
    kept = h.pruned.gate.kept_indices()
    torch.testing.assert_close(d.fp_weight.grad, h.pruned.weight.grad[kept], atol=1e-5, rtol=1e-5)


def test_deployed_online_update_changes_output_through_fp_branch_only():
    conv, h, x = _hybrid(CONV_CASES["plain"])
    d = ho.deploy_layer(h, "torch")
    packed = d.w_packed.clone()
    opt = torch.optim.SGD(d.parameters(), lr=0.1)
    y0 = d(x).detach()
    target = torch.randn_like(y0)
    F.mse_loss(d(x), target).backward()
    opt.step()
    y1 = d(x).detach()
    assert torch.equal(d.w_packed, packed)
    changed = (y1 - y0).abs().flatten(2).amax(-1).amax(0) > 0
    kept = set(d.fp_out_idx.tolist())
    assert all(bool(changed[c]) == (c in kept) for c in range(7))


def test_deployed_empty_batch():
    for quantize_input in (True, False):
        conv, h, x = _hybrid(CONV_CASES["stride2_groups"], quantize_input=quantize_input)
        d = ho.deploy_layer(h, "torch")
        x0 = torch.randn(0, 6, 9, 11)
        y = d(x0)
        assert y.shape == conv(x0).shape == (0, 9, 5, 6)
    torch.manual_seed(0)
    lin = ho.HybridLinear.from_float(nn.Linear(5, 3))
    lin.calibrate(torch.rand(4, 5))
    assert ho.deploy_layer(lin, "torch")(torch.randn(0, 5)).shape == (0, 3)


def test_deployed_bad_input():
    conv, h, x = _hybrid(CONV_CASES["plain"])
    d = ho.deploy_layer(h, "torch")
    with pytest.raises(ValueError, match=r"expects input \(N, 5, H, W\), got \(2, 4, 9, 11\)"):
        d(torch.randn(2, 4, 9, 11))
    with pytest.raises(ValueError, match=r"expects input \(N, 5, H, W\)"):
        d(torch.randn(5, 9, 11))
    with pytest.raises(ValueError, match="floating-point"):
        d(torch.ones(2, 5, 9, 11, dtype=torch.int32))


def test_nan_input_propagates_through_hybrid_layer():
    # A code cannot carry a NaN, so the deployed layer (and an eval-mode trainable layer, which
    # computes what the deployed one does) makes every output that reads it NaN, as float PyTorch
    # does (docs/layer_op.md, non-finite inputs). In training mode the fake-quantized branch maps
    # NaN to code 0, but channels are masked by multiplication (needed for the gate's
    # straight-through gradient) and NaN * 0 is NaN, so there too every channel at that pixel is NaN.
    conv, h, x = _hybrid(CONV_CASES["valid_1x1"], keep=0.5)
    d = ho.deploy_layer(h, "torch")
    xn = x.clone()
    xn[0, :, 0, 0] = float("nan")
    with torch.no_grad():
        y_h, y_d = h(xn), d(xn)
        h.train()
        y_train = h(xn)
        h.eval()
    for y in (y_train, y_d, y_h):
        assert bool(y[0, :, 0, 0].isnan().all())
        assert int(y.isnan().sum()) == int(y[0, :, 0, 0].isnan().sum())  # nothing else is touched
    torch.testing.assert_close(y_d[1], y_h[1], atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------- trainable layers
def test_hybrid_layer_structure_and_residual_start():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    h = ho.HybridConv2d.from_float(conv, keep=0.25)
    x = torch.rand(2, 4, 8, 8)
    h.calibrate(x)
    assert h.pruned.bias is None and h.quant.bias is not None
    kept = h.pruned.gate.kept_mask()
    assert int(kept.sum()) == 2  # ceil(0.25 * 8)
    residual = h.quant.weight - h.quant.effective_weight()
    torch.testing.assert_close(h.pruned.weight.detach(), residual)
    norms = residual.flatten(1).norm(dim=1)
    assert norms[kept].min() >= norms[~kept].max()  # the largest residuals are kept
    # the residual makes the hybrid layer closer to the float layer than its quantized branch
    h.eval()
    with torch.no_grad():
        e_h = (h(x) - conv(x)).norm()
        e_q = (h.quant(x) - conv(x)).norm()
    assert e_h < e_q


def test_lazy_calibration_on_first_forward():
    torch.manual_seed(0)
    h = ho.HybridConv2d(3, 4, 3)
    assert not h.calibrated
    h(torch.rand(1, 3, 5, 5))
    assert h.calibrated and bool(h.quant.calibrated_flag == 1)


def test_layer_bad_arguments():
    with pytest.raises(ValueError, match=r"keep must lie in \(0, 1\]"):
        ho.HybridConv2d(3, 4, 3, keep=0.0)
    with pytest.raises(ValueError, match="groups=2 must divide in_channels=3"):
        ho.HybridConv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        ho.QuantConv2d(3, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 8\]"):
        ho.QuantConv2d(3, 4, 3, bits_w=9)
    with pytest.raises(ValueError, match="temperature tau must be positive"):
        ho.PrunedConv2d(3, 4, 3, tau=0.0)


def test_memory_format_and_dtype_moves_keep_kernel_buffers_intact():
    """model.to(channels_last / bf16) restrides and casts the float weights, but the packed weights
    stay K-major contiguous and the epilogue scales and quantizer parameters stay fp32."""
    conv, h, x = _hybrid(CONV_CASES["plain"])
    d = ho.deploy_layer(h, "torch")
    scale = d.scale.clone()
    d = d.to(memory_format=torch.channels_last).to(torch.bfloat16)
    assert d.w_packed.is_contiguous() and d.w_packed.dtype == torch.uint8
    assert d.scale.dtype == torch.float32 and torch.equal(d.scale, scale)
    assert d.in_qparams.dtype == torch.float32 and d.fp_weight.dtype == torch.bfloat16


def test_act_stats_belong_to_the_latest_training_forward():
    """eq 12 uses this step's statistics: an eval forward clears them, so regularization() never
    backpropagates through a finished step's graph."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    x = torch.randn(2, 3, 9, 9)
    ho.hybridize_(m, ho.HybridConfig(), example_inputs=x)
    m.train()
    m(x).sum().backward()
    assert m[2].quant.act_stats is not None
    m.eval()
    m(x)
    assert m[2].quant.act_stats is None
    ho.regularization(m).backward()  # would raise if a stale graph were reused
