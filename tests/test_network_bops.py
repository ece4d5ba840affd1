"""Network-level hybrid (eq 5, eq 14 compounding) and BOP counting (eq 17)."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torchvision

import hybridops as ho
from hybridops.layers import PRUNED_LAYERS


def _seq_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(12, 6, 1)).eval()


def _randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def test_fold_batchnorm():
    m = _seq_cnn()
    _randomise_bn(m)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = m(x)
    assert ho.fold_batchnorm_(m) == 2
    assert isinstance(m[1], nn.Identity) and isinstance(m[4], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)


def test_hybrid_network_sequential():
    backbone = _seq_cnn()
    _randomise_bn(backbone)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = backbone(x)
    net = ho.HybridNetwork(backbone, ho.HybridConfig(keep=0.5), example_inputs=x).eval()
    # the backbone itself is untouched
    assert type(backbone[0]) is nn.Conv2d
    assert all(isinstance(net.quant_net[i], ho.QuantConv2d) for i in (0, 3, 7))
    assert all(isinstance(net.pruned_net[i], ho.PrunedConv2d) for i in (0, 3, 7))
    assert isinstance(net.pruned_net[1], nn.Identity)  # BN folded in the pruned copy (eq 14)
    # compounding: conv 3 reads conv 0's kept channels (through ReLU), conv 7 reads conv 3's (ReLU, max-pool)
    assert ho.find_pruned_producers(net.pruned_net) == {"3": "0", "7": "3"}
    assert net.producers == [{}, {"3": "0", "7": "3"}]  # per branch: quantized, pruned
    # the pruned network's last layer starts at zero: A^h = f^q at init, close to the float model
    assert bool((net.pruned_net[7].weight == 0).all())
    with torch.no_grad():
        y = net(x)
        torch.testing.assert_close(y, net.quant_net(x))
    err = ((y - ref).norm() / ref.norm()).item()
    assert err < 0.2  # relative L2 error of the output, 4/4 bits, untrained
    # deploy: rows and (compounded) input columns of dropped channels are removed
    dep = copy.deepcopy(net).deploy_(backend="torch")
    k0 = int(net.pruned_net[0].gate.kept_mask().sum())
    k3 = int(net.pruned_net[3].gate.kept_mask().sum())
    assert dep.pruned_net[3].fp_weight.shape == (k3, k0, 3, 3)
    assert dep.pruned_net[7].fp_weight.shape[:2] == (int(net.pruned_net[7].gate.kept_mask().sum()), k3)
    assert dep.pruned_net[0].fp_weight.shape == (k0, 3, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(dep(x), y, atol=1e-5, rtol=1e-5)
    # after some gate changes (and FP weights away from zero), deployed == undeployed still holds
    with torch.no_grad():
        net.pruned_net[7].weight.normal_()
        net.pruned_net[0].gate.logits[:3] *= -1
        net.pruned_net[3].gate.logits[5:8] *= -1
    dep = copy.deepcopy(net).deploy_(backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(dep(x), net(x), atol=1e-5, rtol=1e-5)


def test_hybrid_network_trains():
    net = ho.HybridNetwork(_seq_cnn(), ho.HybridConfig(keep=0.5), example_inputs=torch.randn(2, 3, 16, 16))
    net.train()
    y = net(torch.randn(2, 3, 16, 16))
    (y.square().mean() + ho.regularization(net)).backward()
    assert net.pruned_net[7].weight.grad is not None and net.pruned_net[7].weight.grad.abs().sum() > 0
    assert net.quant_net[3].wq.c.grad is not None


@pytest.fixture(scope="module")
def resnet_net():
    torch.manual_seed(0)
    backbone = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = backbone(x)
    net = ho.HybridNetwork(backbone, ho.HybridConfig(keep=0.25), example_inputs=x).eval()
    return net, x, ref


def test_hybrid_network_resnet18(resnet_net):
    net, x, ref = resnet_net
    n_pruned = sum(isinstance(m, PRUNED_LAYERS) for m in net.pruned_net.modules())
    assert n_pruned == 21
    # within a basic block conv2 reads conv1's kept channels (BN folded, ReLU); residual sums break chains
    assert net.producers[1].get("layer1.0.conv2") == "layer1.0.conv1"
    assert net.producers[1].get("layer4.1.conv2") == "layer4.1.conv1"
    assert "layer2.0.conv1" not in net.producers[1]  # its input is a residual sum
    assert net.pruned_net.fc.weight.abs().sum() == 0  # last layer zeroed
    with torch.no_grad():
        y = net(x)
    assert ((y - ref).norm() / ref.norm()).item() < 0.3  # relative L2 error of the logits, untrained
    with torch.no_grad():
        net.pruned_net.fc.weight.normal_(std=0.01)
        y = net(x)
    dep = copy.deepcopy(net).deploy_(backend="torch")
    c1 = net.pruned_net.layer1[0].conv1.gate.kept_mask().sum().item()
    assert dep.pruned_net.layer1[0].conv2.fp_weight.shape[1] == c1
    with torch.no_grad():
        torch.testing.assert_close(dep(x), y, atol=1e-4, rtol=1e-4)


def test_branch_sets_qq_pp_q():
    """The paper's Table 3 rows from one call each; the sum starts at the float model and BOPs
    count both copies against one baseline."""
    backbone = _seq_cnn()
    _randomise_bn(backbone)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = backbone(x)
    q, p = ho.QuantConfig(bits_w=5, bits_a=5), ho.PruneConfig(keep=0.5)
    q_only = ho.HybridNetwork(backbone, branches=[q], example_inputs=x).eval()
    qq = ho.HybridNetwork(backbone, branches=[q, q], example_inputs=x).eval()
    pp = ho.HybridNetwork(backbone, branches=[p, p], example_inputs=x).eval()
    qp = ho.HybridNetwork(backbone, branches=[q, p], example_inputs=x).eval()
    assert isinstance(qq.branches[1][7], ho.QuantConv2d) and isinstance(pp.branches[0][3], ho.PrunedConv2d)
    with torch.no_grad():
        # QQ: each copy carries half of the output (the output layers' scales halved after
        # calibration), the sum is the float model up to quantization
        torch.testing.assert_close(qq.branches[0](x), 0.5 * q_only(x))
        for net in (q_only, qq):
            assert ((net(x) - ref).norm() / ref.norm()).item() < 0.15
        # PP: the second copy is a zero residual; the first keeps its largest-L1 channels and the
        # output layer whole
        assert bool((pp.branches[1][7].weight == 0).all())
        assert bool(pp.branches[0][7].gate.kept_mask().all())
        assert int(pp.branches[0][0].gate.kept_mask().sum()) == 4
        torch.testing.assert_close(pp(x), pp.branches[0](x))
    assert qq.pruned_net is None and pp.quant_net is None and qp.pruned_net is qp.branches[1]
    rc = {name: ho.bops_report(net, (1, 3, 16, 16)).rc for name, net in
          [("q", q_only), ("qq", qq), ("pp", pp), ("qp", qp)]}
    assert rc["qq"] == pytest.approx(2 * rc["q"])
    report = ho.bops_report(qp, (1, 3, 16, 16))
    assert [r.name for r in report.layers] == ["0", "3", "7"]  # the two copies of a layer merge
    assert rc["qp"] == pytest.approx(rc["q"] + report.pruned / report.baseline)
    pp_report = ho.bops_report(pp, (1, 3, 16, 16))
    assert [r.name for r in pp_report.layers] == ["0", "3", "7"]
    assert 0.0 < rc["pp"] < 2.0 and pp_report.quant == 0.0
    # each branch set deploys to the same outputs, through its own deploy_ or ho.deploy_
    for net in (qq, pp, qp):
        with torch.no_grad():
            net.branches[-1][7].weight.normal_(std=0.1)
            y = net(x)
        for dep in (copy.deepcopy(net).deploy_(backend="torch"), ho.deploy_(copy.deepcopy(net), backend="torch")):
            with torch.no_grad():
                torch.testing.assert_close(dep(x), y, atol=1e-4, rtol=1e-4)
    dep = ho.deploy_(copy.deepcopy(qp), backend="torch", fp_dtype=torch.bfloat16)
    assert dep.branches[1][3].fp_dtype == torch.bfloat16  # ho.deploy_ passes fp_dtype through the network


def test_branch_output_layer_by_call_order():
    """The output layer (halved in QQ, zeroed in a residual pruned branch, kept whole) is the last
    one called on the example inputs, not the last registered."""
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(8, 4, 1)  # registered first, called last
            self.body = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    torch.manual_seed(0)
    backbone = HeadFirst().eval()
    x = torch.randn(2, 3, 8, 8)
    qp = ho.HybridNetwork(backbone, ho.HybridConfig(keep=0.5), example_inputs=x)
    assert bool((qp.branches[1].head.weight == 0).all()) and bool(qp.branches[1].body.weight.abs().sum() > 0)
    assert not qp.branches[1].head.gate.prunable and qp.branches[1].body.gate.prunable
    qq = ho.HybridNetwork(backbone, branches=[ho.QuantConfig(), ho.QuantConfig()], example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(qq.branches[0](x), qq.branches[1](x))
        assert ((qq(x) - backbone(x)).norm() / backbone(x).norm()).item() < 0.2


def test_branch_sets_bad_input():
    with pytest.raises(ValueError, match="either config"):
        ho.HybridNetwork(_seq_cnn(), ho.HybridConfig(), branches=[ho.QuantConfig()])
    with pytest.raises(TypeError, match="QuantConfig / PruneConfig"):
        ho.HybridNetwork(_seq_cnn(), branches=[ho.HybridConfig()])
    with pytest.raises(TypeError, match="QuantConfig / PruneConfig"):
        ho.HybridNetwork(_seq_cnn(), branches=[])
    with pytest.raises(TypeError, match="must be a HybridConfig"):
        ho.HybridNetwork(_seq_cnn(), ho.QuantConfig())


# ----------------------------------------------------------------------------- BOPs (eq 17)
def test_layer_bops_hand_computed():
    # 3 -> 4 channels, 3x3 kernel: C_in C_out K^2 = 108, log2(27) = 4.7549
    assert ho.layer_bops(3, 4, 9, 4, 4) == pytest.approx(108 * (16 + 4 + 4 + math.log2(27)))
    assert ho.layer_bops(3, 4, 9, 4, 4) == pytest.approx(3105.5278, rel=1e-6)
    assert ho.layer_bops(3, 4, 9, 32, 32) == pytest.approx(108 * (1024 + 64 + math.log2(27)))
    assert ho.layer_bops(64, 64, 1, 5, 4) == pytest.approx(4096 * (20 + 5 + 4 + 6))
    assert ho.layer_bops(0, 4, 9, 4, 4) == 0.0
    assert ho.layer_bops(3, 0, 9, 4, 4) == 0.0


def test_count_bops_float_model_is_sum_over_layers():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
                      nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    r = ho.count_bops(m, (2, 3, 8, 8))
    assert [row.name for row in r.layers] == ["0", "2", "4"]
    expect = [ho.layer_bops(3, 8, 9, 32, 32) * 2 * 8 * 8,
              ho.layer_bops(4, 8, 9, 32, 32) * 2 * 4 * 4,  # groups=2: each output reads 4 channels
              ho.layer_bops(128, 5, 1, 32, 32) * 2]
    assert [row.baseline for row in r.layers] == pytest.approx(expect)
    assert r.baseline == pytest.approx(sum(expect))
    assert r.hybrid == pytest.approx(r.baseline) and r.rc == pytest.approx(1.0)
    assert r.layers[0].positions == 128


def test_bops_hybridized_model_rc():
    m = _seq_cnn()
    x = torch.randn(1, 3, 16, 16)
    base = ho.count_bops(m, (1, 3, 16, 16))
    ho.hybridize_(m, ho.HybridConfig(keep=0.25), example_inputs=x)
    r = ho.bops_report(m, input_shape=(1, 3, 16, 16))
    assert r.baseline == pytest.approx(base.baseline)
    assert 0 < r.rc < 1
    assert r.rc == pytest.approx((r.quant + r.pruned) / r.baseline)
    # hand check of the second layer: 8 -> 12, 3x3, 8x8 outputs, 4/4 bits, 3 kept FP channels of 12
    row = r.layers[1]
    assert (row.c_in, row.c_out, row.k2, row.positions, row.pruned_c_out) == (8, 12, 9, 64, 3)
    assert row.quant == pytest.approx(ho.layer_bops(8, 12, 9, 4, 4) * 64)
    assert row.pruned == pytest.approx(ho.layer_bops(8, 3, 9, 32, 32) * 64)
    # the first layer's input is full precision: 32-bit activations
    assert r.layers[0].bits_a == 32 and r.layers[0].quant == pytest.approx(ho.layer_bops(3, 8, 9, 32, 4) * 256)
    # deployed model: the same counts
    dep = ho.deploy_(copy.deepcopy(m), backend="torch")
    rd = ho.count_bops(dep, (1, 3, 16, 16))
    assert rd.rc == pytest.approx(r.rc)
    assert "RC =" in str(r) and r.to_dict()["rc"] == pytest.approx(r.rc)


def test_bops_hybrid_network_compounds_pruning():
    net = ho.HybridNetwork(_seq_cnn(), ho.HybridConfig(keep=0.25), example_inputs=torch.randn(1, 3, 16, 16))
    r = ho.count_bops(net, (1, 3, 16, 16))
    assert [row.name for row in r.layers] == ["0", "3", "7"]
    assert all(row.kind == "hybrid" for row in r.layers)
    row = r.layers[1]
    k0 = int(net.pruned_net[0].gate.kept_mask().sum())
    assert row.pruned_c_in == k0 == 2
    assert row.pruned == pytest.approx(ho.layer_bops(2, 3, 9, 32, 32) * 64)
    assert 0 < r.rc < 1
    rd = ho.count_bops(copy.deepcopy(net).deploy_(backend="torch"), (1, 3, 16, 16))
    assert rd.rc == pytest.approx(r.rc)


def test_count_bops_after_training_step():
    # count_bops (and copy.deepcopy) must work right after a training forward, whose regulariser
    # statistics and soft masks are non-leaf tensors
    m = _seq_cnn()
    ho.hybridize_(m, example_inputs=torch.randn(1, 3, 16, 16))
    m.train()
    m(torch.randn(2, 3, 16, 16))
    r = ho.count_bops(m, (1, 3, 16, 16))
    assert 0 < r.rc < 1
    m2 = copy.deepcopy(m)
    assert m2[3].quant.act_stats is None and m2[3].pruned.gate.noise is None
    assert m[3].quant.act_stats is not None  # the original keeps them for its regulariser


def test_checkpoints_from_before_branch_sets_load():
    """A state_dict saved before branch sets, calibrated eq 11 targets and gate state (keys
    quant_net.* / pruned_net.*, no calibrated_norm_stats, no gate _extra_state) loads strictly."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    net = ho.HybridNetwork(_seq_cnn(), ho.HybridConfig(keep=0.5), example_inputs=x)
    old = {}
    for k, v in net.state_dict().items():
        if k.endswith("calibrated_norm_stats") or k.endswith("gate._extra_state"):
            continue
        old[k.replace("branches.0.", "quant_net.").replace("branches.1.", "pruned_net.")] = v
    fresh = ho.HybridNetwork(_seq_cnn(seed=1), ho.HybridConfig(keep=0.5))
    fresh.load_state_dict(old)
    stats = fresh.quant_net[3].calibrated_norm_stats
    torch.testing.assert_close(stats, net.quant_net[3].calibrated_norm_stats)  # recomputed, same weights
    assert fresh.pruned_net[0].gate.prunable
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), net.eval()(x))


def test_bops_merge_only_hybrid_network_branches():
    """Only a HybridNetwork's copies merge: a plain model with a module called `branches` keeps its
    rows (RC 1 for a float model), and a HybridNetwork nested in a bigger model still merges."""
    class TwoWay(nn.Module):
        def __init__(self):
            super().__init__()
            self.branches = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)])

        def forward(self, x):
            return self.branches[0](x) + self.branches[1](x)

    r = ho.bops_report(TwoWay(), (1, 3, 8, 8))
    assert [row.name for row in r.layers] == ["branches.0", "branches.1"] and r.rc == pytest.approx(1.0)
    x = torch.randn(2, 3, 16, 16)
    inner = ho.HybridNetwork(_seq_cnn(), branches=[ho.QuantConfig(), ho.QuantConfig()], example_inputs=x)
    outer = nn.Sequential(nn.Identity(), inner)
    rows = [row.name for row in ho.bops_report(outer, (1, 3, 16, 16)).layers]
    assert rows == ["1.0", "1.3", "1.7"]
    assert ho.bops_report(outer, (1, 3, 16, 16)).rc == pytest.approx(ho.bops_report(inner, (1, 3, 16, 16)).rc)


def test_output_layer_left_in_float_and_recalibration():
    """A head that filter_fn leaves in float is still the output layer: it is what a residual
    pruned copy zeroes and QQ halves (no inner layer is scaled, no inner gate made unprunable);
    QQ's halving survives a later calibrate_ (weights are scaled, not the fitted output scale)."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    x = torch.randn(4, 3, 8, 8)
    keep_head_float = lambda m, name: not isinstance(m, nn.Linear)  # noqa: E731
    qp = ho.HybridNetwork(backbone, ho.HybridConfig(keep=0.5), example_inputs=x, filter_fn=keep_head_float)
    head = qp.branches[1][6]
    assert type(head) is nn.Linear and bool((head.weight == 0).all()) and bool((head.bias == 0).all())
    assert qp.branches[1][2].gate.prunable and qp.branches[1][2].weight.abs().sum() > 0
    with torch.no_grad():
        assert float(qp.branches[1](x).abs().max()) == 0.0  # the residual starts at zero
    qq = ho.HybridNetwork(backbone, branches=[ho.QuantConfig(), ho.QuantConfig()], example_inputs=x,
                          filter_fn=keep_head_float)
    with torch.no_grad():
        ref = backbone(x)
        before = ((qq(x) - ref).norm() / ref.norm()).item()
        ho.calibrate_(qq.branches[0], x)
        ho.calibrate_(qq.branches[1], x)
        after = ((qq(x) - ref).norm() / ref.norm()).item()
    assert before < 0.2 and after < 0.2, (before, after)


def test_partial_state_dict_leaves_gates_alone():
    net = ho.HybridNetwork(_seq_cnn(), ho.HybridConfig(keep=0.5), example_inputs=torch.randn(2, 3, 16, 16))
    assert not net.pruned_net[7].gate.prunable
    quant_only = {k: v for k, v in net.state_dict().items() if k.startswith("branches.0.")}
    net.load_state_dict(quant_only, strict=False)
    assert not net.pruned_net[7].gate.prunable


def test_float_multihead_attention_is_counted_like_its_converted_form():
    """A float ``nn.MultiheadAttention`` (its projections a fused ``in_proj_weight`` and an
    ``out_proj`` that is no plain ``nn.Linear``) is counted through its float rewrite: four
    projection rows and the two product rows, the same baseline as the hybrid model's."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    torch.manual_seed(0)
    model = Block().eval()
    report = ho.count_bops(model, (2, 10, 32))
    names = [r.name for r in report.layers]
    assert names == [f"mha.{p}_proj" for p in "qkv"] + ["mha.attention.qk", "mha.attention.pv", "mha.out_proj"]
    assert all(r.kind == "float" and r.rc_hybrid == 1.0 for r in report.layers)
    assert isinstance(model.mha, nn.MultiheadAttention)  # counted on a copy
    hybrid = copy.deepcopy(model)
    ho.hybridize_(hybrid, ho.HybridConfig(bits_attention=6), example_inputs=torch.randn(2, 10, 32))
    converted = ho.count_bops(hybrid, (2, 10, 32))
    assert [r.name for r in converted.layers] == names
    assert converted.baseline == pytest.approx(report.baseline) and converted.rc < 0.5
