"""Non-finite inputs propagate through deployed layers as through float PyTorch: an output whose
window reads a NaN or an infinity is NaN (the quantize pass detects them in the same loop on the
onednn backend); a layer that hands codes on, which cannot carry one, says so in one sentence."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import hybridops as ho
from hybridops.backend_selection import backend_unavailable_reason

BACKENDS = [b for b in ("torch", "onednn", "triton") if backend_unavailable_reason(b, "cpu") is None]


def _deployed(conv: nn.Conv2d, backend: str, keep: float = 0.3):
    torch.manual_seed(0)
    model = nn.Sequential(conv).eval()
    x = torch.randn(2, conv.in_channels, 9, 8)
    ho.hybridize_(model, ho.HybridConfig(keep=keep, fp_first_input=False), example_inputs=x)
    return ho.deploy_(model, backend, fuse=False)[0], x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("groups,layout", [(1, "nchw"), (4, "nchw"), (1, "nhwc")])
def test_outputs_reading_a_nonfinite_input_are_nan(backend, value, groups, layout):
    layer, x = _deployed(nn.Conv2d(8, 12, 3, stride=2, padding=(1, 2), groups=groups), backend)
    x[1, 5, 4, 3] = value
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = layer(x)
    # where float PyTorch's conv of the same input is not finite (ones weights: every window
    # that reads the element, in the element's group only)
    w = torch.zeros(12, 8 // groups, 3, 3)
    w[:, :, :, :] = 1.0
    expect = ~torch.isfinite(F.conv2d(torch.where(torch.isfinite(x), 0.0, x), w, None, 2, (1, 2), 1, groups))
    assert expect.any() and not expect.all()
    assert torch.equal(torch.isnan(y), expect)
    assert torch.isfinite(y[~expect]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_nan_pixel_makes_every_logit_nan(backend):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=100).eval()
    x = torch.randn(1, 3, 64, 64)
    ho.hybridize_(model, ho.HybridConfig(keep=0.25), example_inputs=x)
    ho.deploy_(model, backend)
    x[0, 1, 30, 30] = float("nan")
    with torch.no_grad():
        assert torch.isnan(model(x)).all()  # as float PyTorch: every logit reads the pixel


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_layer_handing_codes_on_refuses_a_nonfinite_input(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    ho.hybridize_(model, ho.QuantConfig(), example_inputs=x)
    ho.deploy_(model, backend)
    assert any(m.out_bits is not None for m in model.modules() if isinstance(m, ho.DeployedConv2d))
    x[0, 0, 2, 2] = float("nan")
    with torch.no_grad(), pytest.raises(ValueError, match="NaN or an infinity, which the codes this layer hands"):
        model(x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("signed", [False, True])
def test_fake_quantizer_makes_nonfinite_inputs_nan(backend, dtype, signed):
    from hybridops.ops import custom_ops, reference
    x = torch.randn(2, 3, 5, 7, dtype=dtype)
    x[0, 1, 2, 3], x[1, 0, 4, 6], x[1, 2, 0, 0] = float("nan"), float("inf"), float("-inf")
    qp = torch.tensor([0.4, 0.1 if signed else 0.5])
    y = custom_ops.fake_quantize(x, qp, 4, signed, backend)
    bad = ~torch.isfinite(x)
    assert y.dtype == dtype and torch.equal(torch.isnan(y), bad)
    assert torch.equal(y[~bad], reference.fake_quantize(x, qp, 4, signed)[~bad])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_trainable_quantized_model_propagates_like_float(value):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(1, 3, 8, 8)
    ho.hybridize_(model, ho.QuantConfig(), example_inputs=x)
    model.train()
    x[0, 0, 3, 3] = value
    y = model(x)
    # float PyTorch: the 5x5 neighbourhood of the pixel (two 3x3 convs), every channel
    expect = torch.zeros(1, 8, 8, 8, dtype=torch.bool)
    expect[:, :, 1:6, 1:6] = True
    assert torch.equal(~torch.isfinite(y), expect) and torch.isnan(y[expect]).all()
    y.nan_to_num(0.0).sum().backward()  # the STE backward runs through NaN inputs without an error


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_pass_flags_activated_nonfinite_values(backend):
    from hybridops.ops import registry
    flagged = registry.implementation(backend, "quantize_activate_flagged")
    torch.manual_seed(0)
    x = torch.randn(2, 13, 5, 6)
    qp = torch.tensor([0.5, 0.5])
    keep = torch.tensor([3, 1, 12])

    def flag(t, relu=False):
        return bool(torch.as_tensor(flagged(t, qp, 4, True, None, None, relu, keep, None)[2]))

    assert not flag(x) and not flag(x.contiguous(memory_format=torch.channels_last))
    for value in (float("nan"), float("inf"), float("-inf")):
        bad = x.clone()
        bad[1, 12, 4, 5] = value  # the last element: the tail of the last tile
        assert flag(bad) and flag(bad.contiguous(memory_format=torch.channels_last))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("-inf")
    assert not flag(bad, relu=True)  # relu(-inf) = 0 is finite, as in float PyTorch
