"""Conversion of models whose Linear layers read channels-last activations: torchvision's
ConvNeXt-Tiny (Linear on (N, H, W, C)) and ViT-B/16 (Linear on (N, L, C)). Hybridize, one
training step, deploy, deployed outputs equal the hybrid model's, and the BOPs of one Linear
checked by hand (eq 17 at its real number of positions)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import hybridops as ho
from hybridops.attention import AttentionProducts, HybridMultiheadAttention, HybridWindowAttention


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
    fresh = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    report = ho.hybridize_(model, ho.HybridConfig(keep=0.25, convert_linear=True), example_inputs=x)
    assert len(report.converted) > 20
    assert report.skipped == []  # nn.MultiheadAttention's projections convert too (its rewrite)

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
    ho.load_deployed_(fresh, model.state_dict(), backend="torch")  # saved and rebuilt from the float model
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), y_deployed)


def test_swin_t_converts_its_window_attention_projections():
    # torchvision's ShiftedWindowAttention hands self.qkv.weight and self.proj.weight to a function;
    # its rewrite (HybridWindowAttention: the same windows, projections called as modules) lets
    # them convert; the model deploys, equals the hybrid, and reloads into a fresh Swin-T
    torch.manual_seed(0)
    model = torchvision.models.swin_t(num_classes=10).eval()
    nn.init.normal_(model.head.weight, std=0.02)
    fresh = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y_float = model(x)
    report = ho.hybridize_(model, ho.HybridConfig(keep=0.25, convert_linear=True), example_inputs=x)
    assert report.skipped == []
    attn = model.features[1][1].attn
    assert isinstance(attn, HybridWindowAttention) and isinstance(attn.qkv, ho.HybridLinear)
    assert isinstance(attn.proj, ho.HybridLinear) and isinstance(model.features[0][0], ho.HybridConv2d)
    with torch.no_grad():
        y_hybrid = model(x)
    assert (y_hybrid - y_float).norm() / y_float.norm() < 0.5  # untrained 4-bit conversion stays near float
    ho.deploy_(model, backend="torch")
    assert isinstance(model.features[1][1].attn.qkv, ho.DeployedLinear)
    with torch.no_grad():
        y_deployed = model(x)
    assert y_hybrid.abs().max() > 0
    torch.testing.assert_close(y_deployed, y_hybrid, rtol=1e-4, atol=1e-4 * y_hybrid.abs().max().item())
    ho.load_deployed_(fresh, model.state_dict(), backend="torch")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), y_deployed)


@pytest.mark.parametrize("shape", [(2, 14, 14, 96), (1, 20, 13, 96), (2, 7, 7, 96), (1, 3, 5, 96)])
def test_window_attention_rewrite_equals_torchvision(shape):
    # shifted and unshifted windows, padded maps, a map smaller than a window (no shift)
    torch.manual_seed(0)
    for shift in ([0, 0], [3, 3]):
        ref = torchvision.models.swin_transformer.ShiftedWindowAttention(96, [7, 7], shift, 3).eval()
        nn.init.normal_(ref.relative_position_bias_table, std=1.0)  # a bias that matters
        new = HybridWindowAttention.from_float(ref).eval()
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(new(x), ref(x), rtol=1e-5, atol=1e-5)


def _mha_inputs(batch_first: bool, kdim: int, n=3, lq=5, lk=7, e=16):
    g = torch.Generator().manual_seed(kdim)
    q = torch.randn(n, lq, e, generator=g)
    k = torch.randn(n, lk, kdim, generator=g)
    v = torch.randn(n, lk, kdim, generator=g)
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    return q, k, v


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [16, 12])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_rewrite_equals_torch(batch_first, kdim, need_weights):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    new = HybridMultiheadAttention.from_float(mha).eval()
    q, k, v = _mha_inputs(batch_first, kdim)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 4:] = True
    masks = [dict(), dict(key_padding_mask=pad), dict(attn_mask=torch.rand(5, 7) > 0.7),
             dict(attn_mask=torch.randn(3 * 4, 5, 7), key_padding_mask=torch.zeros(3, 7).masked_fill(pad, -1e4))]
    for kw in masks:
        if "attn_mask" in kw and kw["attn_mask"].dtype == torch.bool:
            kw["attn_mask"][:, 0] = False  # no fully masked row
        with torch.no_grad():
            a, wa = mha(q, k, v, need_weights=need_weights, **kw)
            b, wb = new(q, k, v, need_weights=need_weights, **kw)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert (wa is None) == (wb is None)
        if wa is not None:
            torch.testing.assert_close(wb, wa, rtol=1e-5, atol=1e-6)
    # unbatched input
    q1, k1, v1 = (t[0] if batch_first else t[:, 0] for t in (q, k, v))
    with torch.no_grad():
        torch.testing.assert_close(new(q1, k1, v1)[0], mha(q1, k1, v1)[0], rtol=1e-5, atol=1e-6)


def test_multihead_attention_bad_input_and_unsupported_forms():
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    new = HybridMultiheadAttention.from_float(mha)
    q, k, v = _mha_inputs(True, 16)
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        new(q, k, v, key_padding_mask=torch.zeros(3, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D attn_mask must be"):
        new(q, k, v, attn_mask=torch.zeros(4, 7))
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        new(q, k, v, is_causal=True)
    with pytest.raises(ValueError, match="share batch and length"):
        new(q, k[:, :6], v)
    # add_bias_kv has no rewrite: the module stays float and the report says why
    model = nn.Sequential(nn.Linear(16, 16))
    model.attn = nn.MultiheadAttention(16, 4, add_bias_kv=True)
    report = ho.hybridize_(model, ho.HybridConfig(convert_linear=True))
    assert ("attn", "nn.MultiheadAttention with add_bias_kv=True is not supported") in report.skipped
    assert type(model.attn) is nn.MultiheadAttention


def test_vit_attention_projections_deploy_and_reload():
    torch.manual_seed(0)
    model = _vit().eval()
    fresh = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    ho.hybridize_(model, ho.HybridConfig(keep=0.25, convert_linear=True), example_inputs=x)
    attn = model.encoder.layers.encoder_layer_0.self_attention
    assert isinstance(attn, HybridMultiheadAttention) and isinstance(attn.out_proj, ho.HybridLinear)
    with torch.no_grad():
        y_hybrid = model(x)
    ho.deploy_(model, backend="onednn" if "onednn" in ho.available_backends() else "torch")
    assert isinstance(attn.q_proj, ho.DeployedLinear) and isinstance(attn.out_proj, ho.DeployedLinear)
    with torch.no_grad():
        y_deployed = model(x)
    torch.testing.assert_close(y_deployed, y_hybrid, rtol=1e-4, atol=1e-4 * y_hybrid.abs().max().item())
    ho.load_deployed_(fresh, model.state_dict(), backend=attn.q_proj.backend)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), y_deployed)


def test_timm_vit_converts_trains_deploys_and_reloads():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32).eval()
    fresh = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    report = ho.hybridize_(model, ho.HybridConfig(keep=0.25, convert_linear=True), example_inputs=x)
    assert report.skipped == [] and "blocks.0.attn.qkv" in report.converted
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    loss = F.cross_entropy(model(x), torch.tensor([1, 7])) + ho.regularization(model, 1e-2, 1e-4)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        y_hybrid = model(x)
    ho.deploy_(model, backend="onednn" if "onednn" in ho.available_backends() else "torch")
    assert isinstance(model.blocks[0].attn.qkv, ho.DeployedLinear)
    with torch.no_grad():
        y_deployed = model(x)
    torch.testing.assert_close(y_deployed, y_hybrid, rtol=1e-4, atol=1e-4 * y_hybrid.abs().max().item())
    ho.load_deployed_(fresh, model.state_dict(), backend=model.blocks[0].attn.qkv.backend)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), y_deployed)


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


def _attention_models():
    timm = pytest.importorskip("timm")
    return [("vit", _vit, (2, 3, 32, 32), "encoder.layers.encoder_layer_0.self_attention"),
            ("swin", lambda: torchvision.models.swin_t(num_classes=10), (2, 3, 64, 64), "features.1.1.attn"),
            ("timm", lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32),
             (2, 3, 32, 32), "blocks.0.attn")]


@pytest.mark.parametrize("which", ["vit", "swin", "timm"])
def test_quantized_attention_products_train_deploy_reload_and_count(which):
    # bits_attention=6 (the paper's HybTransT): every rewritten attention module quantizes Q, K, V
    # with learnable intervals; a training step moves them, the deployed model (the integer-QK^T
    # op) equals the trained one in eval, reloads into a fresh model, and count_bops has the rows
    _, ctor, shape, attn_name = next(m for m in _attention_models() if m[0] == which)
    torch.manual_seed(0)
    model = ctor().eval()
    head = getattr(model, "head", None) or getattr(getattr(model, "heads", None), "head", None)
    nn.init.normal_(head.weight, std=0.02)
    fresh = copy.deepcopy(model)
    x = torch.randn(shape)
    ho.hybridize_(model, ho.HybridConfig(keep=0.25, bits_attention=6), example_inputs=x)
    products = model.get_submodule(attn_name).attention
    assert isinstance(products, AttentionProducts) and products.quantized and products.calibrated
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = F.cross_entropy(model(x), torch.tensor([1, 7])) + ho.regularization(model, 1e-2, 1e-4)
    opt.zero_grad()
    loss.backward()
    assert products.q_quant.c.grad is not None and products.q_quant.c.grad.abs() > 0
    opt.step()
    model.eval()
    with torch.no_grad():
        y_hybrid = model(x)
    rows = {r.name: r for r in ho.count_bops(model, shape).layers}
    qk, pv = rows[f"{attn_name}.attention.qk"], rows[f"{attn_name}.attention.pv"]
    assert (qk.kind, qk.bits_a, qk.bits_w, pv.bits_a, pv.bits_w) == ("att", 6, 6, 32, 6)
    assert qk.quant == pytest.approx(qk.positions * qk.c_in * qk.c_out * (36 + 12 + math.log2(qk.c_in)))
    backend = "onednn" if "onednn" in ho.available_backends() else "torch"
    ho.deploy_(model, backend=backend)
    assert products.backend == backend
    with torch.no_grad():
        y_deployed = model(x)
    torch.testing.assert_close(y_deployed, y_hybrid, rtol=1e-4, atol=1e-4 * y_hybrid.abs().max().item())
    ho.load_deployed_(fresh, model.state_dict(), backend=backend)
    assert isinstance(fresh.get_submodule(attn_name).attention, AttentionProducts)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), y_deployed)


def test_multihead_attention_need_weights_with_quantized_products():
    # need_weights=True returns the probabilities of the quantized products (computed in PyTorch)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()  # head_dim 8: the op's smallest
    new = HybridMultiheadAttention.from_float(mha, bits_attention=6).eval()
    q, k, v = _mha_inputs(True, 32, e=32)
    with torch.no_grad():
        out_w, weights = new(q, k, v, need_weights=True)
        out, none = new(q, k, v, need_weights=False)
    assert none is None and weights.shape == (3, 5, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 5))
    torch.testing.assert_close(out_w, out, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ref = mha(q, k, v, need_weights=False)[0]
    assert 0 < (out - ref).norm() / ref.norm() < 0.2  # 6-bit products: close, not equal


def test_attention_products_stay_float_where_head_dim_is_not_a_multiple_of_8():
    # 4 heads of 4: the quantized-attention op needs head dims in multiples of 8; the conversion
    # says so, still converts the projections, and the model runs
    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, t):
            return self.attn(t, t, t, need_weights=False)[0]

    model = SelfAttention()
    x = torch.randn(2, 5, 16)
    report = ho.hybridize_(model, ho.HybridConfig(convert_linear=True, bits_attention=6), example_inputs=x)
    assert report.skipped == [("attn.attention", "its attention products stay float: head_dim 4 is not a multiple "
                                                 "of 8 (the int8 units' K step)")]
    assert isinstance(model.attn, HybridMultiheadAttention) and not model.attn.attention.quantized
    assert isinstance(model.attn.q_proj, ho.HybridLinear)
    assert model(x).shape == (2, 5, 16)
