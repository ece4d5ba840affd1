"""Hybrid tracker tests: conversion through the hybridops API, the online update (FP branch only,
quantized codes untouched), deployment, checkpoints and a tiny end-to-end CLI run."""
from __future__ import annotations


import numpy as np
import pytest
import torch

import hybridops as ho
from hybridops_tracking import hybrid
from hybridops_tracking.checkpoint import load_checkpoint, save_checkpoint
from hybridops_tracking.data import SynthConfig, synthetic_sequence, write_otb_sequence
from hybridops_tracking.model import ModelConfig, SiamRPNPP
from hybridops_tracking.tracker import OnlineConfig, SiamRPNTracker

TINY = dict(width=0.125, blocks=(1, 1, 1, 1), neck_channels=16, exemplar_size=63, instance_size=127)
SYNTH = SynthConfig(frames=12, width=128, height=96, target_size=(16, 24))
ONLINE = OnlineConfig(interval=3, iterations=2, window=4, lr=0.5)


@pytest.fixture(autouse=True)
def _fast_cpu():
    # The hybrid layers produce subnormal floats, which x86 handles in microcode; flushing them
    # keeps these tests fast. One thread: these tiny convs gain nothing from two on a shared box.
    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


def _inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, 63, 63, generator=g) * 255, torch.rand(b, 3, 127, 127, generator=g) * 255)


@pytest.fixture(scope="module")
def float_model():
    torch.manual_seed(0)
    return SiamRPNPP(ModelConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def hybrid_model(float_model):
    m = hybrid.clone(float_model)
    hybrid.hybridize_tracker(m, "hybrid", example_inputs=_inputs(4))
    return m.eval()


@pytest.fixture(scope="module")
def frames():
    return synthetic_sequence(SYNTH, seed=2)


def test_conversion_scope_and_accuracy(float_model, hybrid_model):
    names = {n for n, m in hybrid_model.named_modules() if isinstance(m, ho.HybridConv2d)}
    assert "backbone.conv1" in names and "backbone.layer4.0.conv3" in names
    assert {f"rpn.{i}.cls.head.3" for i in range(3)} <= names  # online-update targets are hybrid
    assert not any(n.startswith(("neck", "rpn.0.loc")) for n in names)
    all_model = hybrid.clone(float_model)
    hybrid.hybridize_tracker(all_model, "hybrid", example_inputs=_inputs(4), scope="all")
    assert sum(isinstance(m, ho.HybridConv2d) for m in all_model.modules()) > len(names)
    z, x = _inputs(2, seed=1)
    with torch.no_grad():
        ref, out = float_model(z, x), hybrid_model(z, x)
    err = (out["cls"] - ref["cls"]).norm() / ref["cls"].norm()
    assert err < 0.2, f"freshly calibrated hybrid tracker deviates {float(err):.3f} from float"


def test_variants_build(float_model):
    q = hybrid.clone(float_model)
    hybrid.hybridize_tracker(q, "quant_qn", example_inputs=_inputs(2))
    assert any(isinstance(m, ho.QuantConv2d) for m in q.modules())
    assert not any(isinstance(m, (ho.HybridConv2d, ho.PrunedConv2d)) for m in q.modules())
    qp = hybrid.clone(float_model)
    hybrid.hybridize_tracker(qp, "hybrid_qp", example_inputs=_inputs(2))
    assert all(not m.quant.normalize for m in qp.modules() if isinstance(m, ho.HybridConv2d))
    # the online update needs an FP branch: quantized-only and float models are refused
    with pytest.raises(ValueError):
        hybrid.online_parameters(hybrid.clone(q))
    with pytest.raises(ValueError, match="needs a hybrid model"):
        hybrid.online_parameters(hybrid.clone(float_model))


def _run_online(model, frames):
    imgs, boxes = frames
    t = SiamRPNTracker(model, online=ONLINE)
    t.init(imgs[0], boxes[0])
    out = [t.track(f)[0] for f in imgs[1:]]
    return t, np.array(out)


def test_online_update_changes_only_fp_branch_of_last_cls_layers(hybrid_model, frames):
    model = hybrid.clone(hybrid_model)
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    codes_before = {n: m.quant.wq.codes(m.quant.weight)[0].clone() for n, m in model.named_modules()
                    if isinstance(m, ho.HybridConv2d)}
    t, boxes = _run_online(model, frames)
    assert t.updates == (len(frames[0]) - 1) // ONLINE.interval
    assert np.isfinite(boxes).all()
    after = model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed, "the online update changed nothing"
    assert changed <= {f"rpn.{i}.cls.head.3.pruned.weight" for i in range(3)}, changed
    for n, m in model.named_modules():
        if isinstance(m, ho.HybridConv2d):
            assert torch.equal(m.quant.wq.codes(m.quant.weight)[0], codes_before[n]), n
    # only kept channels may move: the dropped ones stay at their offline values
    for i in range(3):
        layer = model.rpn[i].cls.head[3]
        dropped = ~layer.pruned.gate.kept_mask()
        key = f"rpn.{i}.cls.head.3.pruned.weight"
        assert torch.equal(after[key][dropped], before[key][dropped])
    assert [p.requires_grad for p in model.parameters()].count(True) == 3


def test_frozen_check_catches_tampering(hybrid_model, frames):
    model = hybrid.clone(hybrid_model)
    t = SiamRPNTracker(model, online=ONLINE)
    t.init(frames[0][0], frames[1][0])
    with torch.no_grad():
        model.rpn[0].cls.head[3].quant.weight.add_(0.5)
    with pytest.raises(RuntimeError, match="rpn.0.cls.head.3.quant.weight"):
        t.check_frozen()


def test_deployed_tracker_online_update(hybrid_model, frames):
    model = hybrid.deploy(hybrid.clone(hybrid_model), backend="torch")
    assert isinstance(model.rpn[0].cls.head[3], ho.DeployedConv2d)
    z, x = _inputs(1, seed=3)
    with torch.no_grad():
        ref, out = hybrid_model(z, x), model(z, x)
    torch.testing.assert_close(out["cls"], ref["cls"], rtol=1e-3, atol=1e-3)
    packed = {n: m.w_packed.clone() for n, m in model.named_modules() if isinstance(m, ho.DeployedConv2d)}
    fp = model.rpn[1].cls.head[3].fp_weight.detach().clone()
    t, boxes = _run_online(model, frames)
    assert t.updates >= 1 and np.isfinite(boxes).all()
    assert not torch.equal(model.rpn[1].cls.head[3].fp_weight, fp)
    for n, m in model.named_modules():
        if isinstance(m, ho.DeployedConv2d):
            assert torch.equal(m.w_packed, packed[n]), n


def test_deployed_tracker_is_traced_and_fused(hybrid_model):
    """deploy fuses the backbone's BatchNorms into the integer kernels' epilogues (the tracker
    traces with torch.fx, and the Siamese double call is avoided by deploying the backbone first)
    without changing the outputs."""
    import warnings
    model = hybrid.clone(hybrid_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 'torch.fx could not trace SiamRPNPP' would fail here
        hybrid.deploy(model, backend="torch")
    fused = [n for n, m in model.backbone.named_modules() if isinstance(m, ho.DeployedConv2d) and "epilogue=" in repr(m)]
    assert fused and isinstance(model.backbone.layer1[0].bn1, torch.nn.Identity)
    z, x = _inputs(1, seed=5)
    with torch.no_grad():
        ref, out = hybrid_model(z, x), model(z, x)
    torch.testing.assert_close(out["cls"], ref["cls"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["loc"], ref["loc"], rtol=1e-4, atol=1e-5)


def test_checkpoint_round_trip(hybrid_model, tmp_path):
    path = save_checkpoint(tmp_path / "h.pt", hybrid.clone(hybrid_model), "hybrid")
    loaded = load_checkpoint(path)
    z, x = _inputs(1, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, x)["cls"], hybrid_model(z, x)["cls"])
    dep = load_checkpoint(path, deploy=True, backend="torch")
    assert isinstance(dep.backbone.layer1[0].conv1, ho.DeployedConv2d)


def test_end_to_end_cli_train_and_track(tmp_path):
    """Train a few steps (float, then hybrid from it) and track a short synthetic sequence."""
    from hybridops_tracking import cli
    from hybridops_tracking.model import ModelConfig as MC

    imgs, boxes = synthetic_sequence(SYNTH, seed=7)
    seq_dir = write_otb_sequence(tmp_path / "seq", imgs, boxes)
    orig = MC.small
    MC.small = classmethod(lambda cls, **kw: cls(**TINY))  # keep the CLI's preset tiny for the test
    try:
        common = ["--steps", "2", "--batch-size", "2", "--num-sequences", "2", "--seq-frames", "6", "--quiet"]
        assert cli.main(["train", "--out", str(tmp_path / "f.pt"), *common]) == 0
        assert cli.main(["train", "--out", str(tmp_path / "h.pt"), "--variant", "hybrid",
                         "--init", str(tmp_path / "f.pt"), *common]) == 0
    finally:
        MC.small = orig
    with pytest.raises(SystemExit, match="needs a hybrid checkpoint"):
        cli.main(["track", str(seq_dir), "--checkpoint", str(tmp_path / "f.pt"), "--online", "--quiet"])
    out = tmp_path / "out"
    assert cli.main(["track", str(seq_dir), "--checkpoint", str(tmp_path / "h.pt"), "--online",
                     "--online-interval", "4", "--online-iterations", "2", "--out", str(out), "--quiet"]) == 0
    pred = np.loadtxt(out / "seq_boxes.txt", delimiter=",")
    assert pred.shape == (12, 4) and np.isfinite(pred).all() and (pred[:, 2:] > 0).all()
    assert (out / "seq_strip.png").stat().st_size > 0
    assert cli.main(["evaluate", str(tmp_path), "--checkpoint", str(tmp_path / "h.pt"), "--out",
                     str(tmp_path / "ev"), "--quiet"]) == 2  # tmp_path has non-sequence folders: clear error
    assert cli.main(["evaluate", str(seq_dir), "--checkpoint", str(tmp_path / "h.pt"), "--out",
                     str(tmp_path / "ev"), "--quiet"]) == 0
    assert (tmp_path / "ev" / "success_plot.png").exists() and (tmp_path / "ev" / "table.md").exists()
