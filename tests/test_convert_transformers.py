"""Conversion of models whose Linear layers read channels-last activations: torchvision's
ConvNeXt-Tiny (Linear on (N, H, W, C)) and ViT-B/16 (Linear on (N, L, C)). Hybridize, one
training step, deploy, deployed outputs equal the hybrid model's, and the BOPs of one Linear
checked by hand (eq 17 at its real number of positions)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import hybridops as ho


def test_hybrid_linear_reads_the_last_axis():
    lin = nn.Linear(16, 32)
    h = ho.HybridLinear.from_float(lin)
    x = torch.randn(2, 4, 4, 16)
    y = h(x)
    assert y.shape == (2, 4, 4, 32)
    h.eval()
    with torch.no_grad():  # untrained: quantized + pruned branch stay close to the float layer
        rel = (h(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.3


def _convnext():
    return torchvision.models.convnext_tiny(num_classes=10)


def _vit():
    m = torchvision.models.vit_b_16(image_size=32, num_classes=10)
    nn.init.normal_(m.heads.head.weight, std=0.02)  # torchvision starts the head at zero: outputs would all be 0
    return m


@pytest.mark.parametrize("ctor,linear_name,positions", [
    (_convnext, "features.1.0.block.3", 8 * 8),                 # 32x32 input, stem stride 4: 8x8 pixels
    (_vit, "encoder.layers.encoder_layer_0.mlp.0", 2 * 2 + 1),  # 2x2 patches + the class token
])
def test_channels_last_linear_models(ctor, linear_name, positions):
    torch.manual_seed(0)
    model = ctor().eval()
    x = torch.randn(2, 3, 32, 32)
    report = ho.hybridize_(model, ho.HybridConfig(keep=0.25, convert_linear=True), example_inputs=x)
    assert len(report.converted) > 20
    # nn.MultiheadAttention reads out_proj.weight itself: that Linear stays float, and says why
    assert all("NonDynamicallyQuantizableLinear" in why for _, why in report.skipped)

    # one training step moves the weights, intervals and gates and keeps the loss finite
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    before = model.get_submodule(linear_name).quant.weight.detach().clone()
    loss = F.cross_entropy(model(x), torch.tensor([1, 7])) + ho.regularization(model, 1e-2, 1e-4)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(model.get_submodule(linear_name).quant.weight, before)

    model.eval()
    with torch.no_grad():
        y_hybrid = model(x)
    bops = ho.count_bops(model, (1, 3, 32, 32))
    row = next(r for r in bops.layers if r.name == linear_name)
    lin = model.get_submodule(linear_name)
    c_in, c_out = lin.in_features, lin.out_features
    assert (row.positions, row.c_in, row.c_out, row.k2) == (positions, c_in, c_out, 1)
    assert row.baseline == pytest.approx(positions * c_in * c_out * (32 * 32 + 64 + math.log2(c_in)))
    assert row.quant == pytest.approx(positions * c_in * c_out * (4 * 4 + 8 + math.log2(c_in)))
    kept = row.pruned_c_out
    assert 0 < kept < c_out and row.pruned_c_in == c_in
    assert row.pruned == pytest.approx(positions * c_in * kept * (32 * 32 + 64 + math.log2(c_in)))
    assert 0 < bops.rc < 1

    ho.deploy_(model, backend="torch")
    assert isinstance(model.get_submodule(linear_name), ho.DeployedLinear)
    with torch.no_grad():
        y_deployed = model(x)
    torch.testing.assert_close(y_deployed, y_hybrid, rtol=1e-4, atol=1e-4 * y_hybrid.abs().max().item())


def test_swin_t_converts_with_its_attention_projections_left_in_float():
    # torchvision's ShiftedWindowAttention hands self.qkv.weight and self.proj.weight to a function:
    # those Linear layers stay float (with the reason) and everything else converts and deploys
    torch.manual_seed(0)
    model = torchvision.models.swin_t(num_classes=10).eval()
    nn.init.normal_(model.head.weight, std=0.02)
    x = torch.randn(2, 3, 64, 64)
    report = ho.hybridize_(model, ho.HybridConfig(keep=0.25, convert_linear=True), example_inputs=x)
    skipped = dict(report.skipped)
    assert {n.rsplit(".", 1)[1] for n in skipped} == {"qkv", "proj"} and len(skipped) == 24
    assert all("ShiftedWindowAttention reads its weight directly" in why for why in skipped.values())
    assert isinstance(model.features[1][0].mlp[0], ho.HybridLinear) and isinstance(model.features[0][0], ho.HybridConv2d)
    with torch.no_grad():
        y_hybrid = model(x)
    ho.deploy_(model, backend="torch")
    assert isinstance(model.features[1][0].mlp[0], ho.DeployedLinear)
    with torch.no_grad():
        y_deployed = model(x)
    assert y_hybrid.abs().max() > 0
    torch.testing.assert_close(y_deployed, y_hybrid, rtol=1e-4, atol=1e-4 * y_hybrid.abs().max().item())


def test_a_layer_whose_weight_its_parent_reads_is_not_converted():
    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.other = nn.Linear(4, 4)

        def forward(self, x):
            return F.linear(x, self.lin.weight) + self.other(x)

    model = Reads()
    report = ho.hybridize_(model, ho.HybridConfig(convert_linear=True), example_inputs=torch.randn(3, 4))
    assert report.converted == ["other"] and [n for n, _ in report.skipped] == ["lin"]
    assert model(torch.randn(3, 4)).shape == (3, 4)
