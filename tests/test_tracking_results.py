"""pysot checkpoint layout, toolkit-style result folders (write, re-score, merge), normalised
precision, window-only crops with per-part timing, and the overlay GIF."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hybridops_tracking import cli
from hybridops_tracking.benchmark import (read_tracker_results, rescore, run_sequence, tracker_name, write_overlay,
                                          write_tracker_results)
from hybridops_tracking.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hybridops_tracking.crop import crop_and_resize, to_tensor
from hybridops_tracking.data import SynthConfig, load_dataset, synthetic_sequence, write_otb_sequence
from hybridops_tracking.metrics import norm_precision_curve, summarize
from hybridops_tracking.model import ModelConfig, SiamRPNPP
from hybridops_tracking.pysot import ours_to_pysot
from hybridops_tracking.tracker import SiamRPNTracker

TINY = dict(width=0.125, blocks=(1, 1, 1, 1), neck_channels=16, exemplar_size=63, instance_size=127)
SYNTH = SynthConfig(frames=6, width=96, height=80, target_size=(14, 20))


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs on a shared 2-core machine
    yield
    torch.set_num_threads(n)


# -- pysot ---------------------------------------------------------------------------------------
def _randomize_(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in list(model.parameters()) + [b for n, b in model.named_buffers() if "running" in n]:
            t.copy_(torch.rand(t.shape, generator=g) * 0.5 + (0.5 if t.dim() == 1 else -0.25))


def test_pysot_checkpoint_layout_loads_and_matches_float_tracker(tmp_path):
    """A state_dict in pysot's key layout (names written out here from pysot's modules, random
    values, DataParallel 'module.' prefix, {'state_dict': ...} wrapper, no num_batches_tracked)
    loads through load_checkpoint and scores exactly like our float model with those weights fed
    pysot's input (BGR, 0-255, no normalisation)."""
    ours = SiamRPNPP(ModelConfig(**TINY, input_format="bgr255")).eval()
    _randomize_(ours)
    sd = {f"module.{k}": v for k, v in ours_to_pysot(ours.state_dict()).items() if "num_batches_tracked" not in k}
    for key in ("module.neck.downsample2.downsample.0.weight", "module.neck.downsample4.downsample.1.running_var",
                "module.rpn_head.rpn3.cls.conv_kernel.0.weight", "module.rpn_head.rpn4.loc.head.3.bias",
                "module.rpn_head.cls_weight", "module.backbone.layer2.0.downsample.0.weight",
                "module.backbone.layer4.0.conv2.weight"):
        assert key in sd, key  # pysot's module names (AdjustAllLayer, MultiRPN, resnet_atrous)
    path = tmp_path / "model.pth"
    torch.save({"epoch": 20, "state_dict": sd}, path)

    from hybridops_tracking import pysot
    loaded = pysot.load_pysot_state_dict(torch.load(path, weights_only=True), ModelConfig(**TINY, input_format="bgr255"))
    g = torch.Generator().manual_seed(1)
    z, x = torch.rand(1, 3, 63, 63, generator=g) * 255, torch.rand(1, 3, 127, 127, generator=g) * 255
    with torch.no_grad():
        a, b = loaded(z, x), ours(z, x)
        # pysot's own convention, by hand: BGR 0-255 into an un-normalising copy of the network
        ref = SiamRPNPP(ModelConfig(**TINY, input_format="bgr255")).eval()
        ref.load_state_dict(ours.state_dict())
        c = ref(z, x)
    for k in ("cls", "loc"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        torch.testing.assert_close(a[k], c[k], rtol=0, atol=0)
    assert not torch.allclose(loaded.features(x, False)[0],
                              SiamRPNPP(ModelConfig(**TINY)).eval().features(x, False)[0])  # formats differ


def test_pysot_checkpoint_through_load_checkpoint_and_bad_keys(tmp_path):
    full = SiamRPNPP(ModelConfig(input_format="bgr255"))  # pysot's real geometry: ResNet-50, 127 / 255
    path = tmp_path / "siamrpn_r50_l234_dwxcorr.pth"
    torch.save(ours_to_pysot(full.state_dict()), path)
    m = load_checkpoint(path)
    assert m.variant == "float" and m.config.input_format == "bgr255" and m.config.score_size == 25
    torch.testing.assert_close(m.state_dict()["rpn.2.cls.head.3.weight"], full.state_dict()["rpn.2.cls.head.3.weight"])
    sd = ours_to_pysot(full.state_dict())
    sd["rpn_head.mask_head.conv.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="rpn_head.mask_head.conv.weight' has no counterpart"):
        load_checkpoint(path)


# -- result folders ------------------------------------------------------------------------------
def _dataset(tmp_path):
    for i in range(2):
        frames, boxes = synthetic_sequence(SYNTH, seed=10 + i)
        write_otb_sequence(tmp_path / "data" / f"s{i}", frames, boxes)
    return load_dataset(tmp_path / "data", "otb")


def test_result_files_rescore_and_merge(tmp_path):
    seqs = _dataset(tmp_path)
    perfect = {s.name: s.boxes for s in seqs}
    shifted = {s.name: s.boxes + [30, 0, 0, 0] for s in seqs}
    res = tmp_path / "results"
    write_tracker_results(res, "perfect", perfect)
    # another toolkit's files: tab-separated
    (res / "other").mkdir()
    for s in seqs:
        (res / "other" / f"{s.name}.txt").write_text("\n".join("\t".join(f"{v:g}" for v in b) for b in shifted[s.name]))
    assert (res / "perfect" / "s0.txt").is_file()
    np.testing.assert_allclose(read_tracker_results(res / "perfect", seqs)["s1"], seqs[1].boxes)
    (res / "overlay").mkdir()  # not a tracker: holds no <seq>.txt
    (res / "overlay" / "s0_strip.png").write_bytes(b"")
    rows = rescore(res, seqs)
    assert set(rows) == {"perfect", "other"}
    assert rows["perfect"]["precision"] == 1.0 and rows["perfect"]["success_auc"] > 0.95
    assert rows["other"]["precision"] == 0.0 and rows["other"]["norm_precision"] < 1.0
    out = tmp_path / "table"
    assert cli.main(["rescore", str(res), "--data", str(tmp_path / "data"), "--out", str(out)]) == 0
    js = json.loads((out / "results.json").read_text())
    assert set(js["results"]) == {"perfect", "other"} and "data" in js["meta"]["plot_title"]
    assert "norm. precision" in (out / "table.md").read_text() and (out / "success_plot.png").stat().st_size > 0


def test_merged_runs_keep_speed_and_updates(tmp_path):
    """evaluate's run_info.json carries FPS, the time split and online updates into re-scored tables."""
    seqs = _dataset(tmp_path)
    run = {"fps": 12.5, "ms_per_frame": {"crop": 1.0, "network": 70.0, "post": 0.5, "update": 8.0},
           "per_sequence": {s.name: {"updates": 3} for s in seqs}}
    write_tracker_results(tmp_path / "r", "hybrid-online", {s.name: s.boxes for s in seqs}, run=run)
    row = rescore(tmp_path / "r", seqs)["hybrid-online"]
    assert row["fps"] == 12.5 and row["ms_per_frame"]["update"] == 8.0
    assert [v["updates"] for v in row["per_sequence"].values()] == [3, 3]
    assert cli.main(["rescore", str(tmp_path / "r"), "--data", str(tmp_path / "data")]) == 0
    table = (tmp_path / "r" / "table.md").read_text()
    assert "| 12.5 | 1.0 / 70.0 / 0.5 / 8.0 |" in table and table.rstrip().splitlines()[-3].endswith("| 6 |")


def test_deployed_run_records_and_names_its_backends(tmp_path):
    """evaluate on a deployed model records the hybridops backends it ran on; run_info.json keeps
    them for re-scored tables, and the table, legend and JSON name them. A float run has none."""
    from hybridops_tracking import hybrid
    from hybridops_tracking.benchmark import evaluate, run_label, write_results

    seqs = _dataset(tmp_path)
    torch.manual_seed(0)
    model = SiamRPNPP(ModelConfig(**TINY)).eval()
    assert "backends" not in evaluate(model, seqs, progress=False)
    g = torch.Generator().manual_seed(0)
    example = (torch.rand(2, 3, 63, 63, generator=g) * 255, torch.rand(2, 3, 127, 127, generator=g) * 255)
    hybrid.hybridize_tracker(model, "hybrid", example_inputs=example)
    hybrid.deploy(model.eval(), "torch")
    r = evaluate(model, seqs, progress=False)
    assert r["backends"] == ["torch"]
    write_tracker_results(tmp_path / "r", "hyb-deployed", r["boxes"], run=r)
    assert json.loads((tmp_path / "r" / "hyb-deployed" / "run_info.json").read_text())["backends"] == ["torch"]
    row = rescore(tmp_path / "r", seqs)["hyb-deployed"]
    assert row["backends"] == ["torch"] and run_label("hyb-deployed", row) == "hyb-deployed (torch)"
    write_results(tmp_path / "t", {"hyb-deployed": row, "float": {**r, "backends": []}}, {"title": "t"})
    assert "| hyb-deployed (torch) |" in (tmp_path / "t" / "table.md").read_text()
    assert "| float |" in (tmp_path / "t" / "table.md").read_text()
    assert json.loads((tmp_path / "t" / "results.json").read_text())["results"]["hyb-deployed"]["backends"] == ["torch"]


def test_rescore_reports_missing_files_in_one_line(tmp_path, capsys):
    seqs = _dataset(tmp_path)
    write_tracker_results(tmp_path / "r", "t", {seqs[0].name: seqs[0].boxes})
    assert cli.main(["rescore", str(tmp_path / "r"), "--data", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "no result file" in err and "s1" in err


def test_run_names_keep_deployed_and_online_apart():
    names = {tracker_name("ck/hybrid.pt", d, o) for d in (False, True) for o in (False, True)}
    assert names == {"hybrid", "hybrid-deployed", "hybrid-online", "hybrid-deployed-online"}
    assert not any("+" in n for n in names)


def test_normalised_precision_is_resolution_free():
    gt = np.array([[0, 0, 10, 20], [0, 0, 10, 20]], float)
    pred = gt + [[2, 0, 0, 0], [0, 8, 0, 0]]  # 0.2 of the width, 0.4 of the height
    c = norm_precision_curve(pred, gt)
    assert c[19] == 0.0 and c[20] == 0.5 and c[40] == 1.0
    np.testing.assert_array_equal(norm_precision_curve(pred * 3, gt * 3), c)
    assert summarize(pred, gt)["norm_precision"] == 0.5


# -- speed: window crops and timing --------------------------------------------------------------
def test_window_crop_equals_full_frame_crop():
    t = SiamRPNTracker(SiamRPNPP(ModelConfig(**TINY)).eval())
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (90, 130, 3), dtype=np.uint8)
    full = to_tensor(img)
    fill = full.mean(dim=(2, 3))
    for center, side in (((65, 45), 40.0), ((3, 5), 70.0), ((128, 88), 33.3), ((-30, 40), 20.0), ((60.4, 20.7), 150.0)):
        win, c = t._window(img, center, side)
        assert win.shape[2] <= min(90, side + 6) and win.shape[3] <= min(130, side + 6)
        # Equal up to float32 rounding of the sampling grid (normalised by a different width):
        # ~1e-5 relative on 0-255 pixels; a wrong offset or a missing margin would differ by units.
        torch.testing.assert_close(crop_and_resize(win, c, side, 31, fill), crop_and_resize(full, center, side, 31, fill),
                                   rtol=0, atol=1e-2)


def test_run_sequence_reports_time_split(tmp_path):
    seqs = _dataset(tmp_path)
    r = run_sequence(SiamRPNPP(ModelConfig(**TINY)).eval(), seqs[0])
    assert set(r["times"]) == {"crop", "network", "post", "update", "init"}
    assert r["times"]["network"] > 0 and r["times"]["crop"] > 0 and r["times"]["update"] == 0
    assert r["fps"] > 0 and np.isfinite(r["boxes"]).all()


def test_overlay_gif_has_every_frame_with_boxes(tmp_path):
    seqs = _dataset(tmp_path)
    s = seqs[0]
    path = write_overlay(s, s.boxes + [5, 5, 0, 0], tmp_path / "o.gif", max_side=64)
    with Image.open(path) as im:
        assert im.n_frames == len(s)
        im.seek(2)
        rgb = np.asarray(im.convert("RGB")).astype(int)
    green = (rgb[..., 1] > 200) & (rgb[..., 0] < 80) & (rgb[..., 2] < 80)
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
    assert green.sum() > 10 and red.sum() > 10


def test_pysot_weights_to_hybrid_and_deployed_tracker_from_the_cli(tmp_path):
    """The user's path from a pysot model.pth: --init it, fine-tune a hybrid with L_hyb, track deployed.
    (A narrow ResNet in pysot's layout and geometry 127 / 255 stands in for the 400 MB release.)"""
    torch.manual_seed(0)
    src = SiamRPNPP(ModelConfig(width=0.125, blocks=(1, 2, 1, 1), neck_channels=16, input_format="bgr255")).eval()
    pth = tmp_path / "model.pth"
    torch.save({"state_dict": ours_to_pysot(src.state_dict())}, pth)
    m = load_checkpoint(pth)
    assert m.config.blocks == (1, 2, 1, 1) and m.config.width == 0.125 and m.config.exemplar_size == 127
    frames, boxes = synthetic_sequence(SynthConfig(frames=5, width=128, height=96, target_size=(16, 24)), seed=4)
    seq = write_otb_sequence(tmp_path / "data" / "seq", frames, boxes)
    common = ["--steps", "1", "--batch-size", "2", "--max-gap", "2", "--quiet", "--threads", "1"]
    assert cli.main(["train", "--init", str(pth), "--variant", "hybrid", "--data", str(seq), "--out",
                     str(tmp_path / "hyb.pt"), *common]) == 0
    hyb = load_checkpoint(tmp_path / "hyb.pt", deploy=True, backend="torch")
    assert hyb.config.input_format == "bgr255" and hyb.deployed
    out = tmp_path / "o"
    assert cli.main(["track", str(seq), "--checkpoint", str(tmp_path / "hyb.pt"), "--deploy", "--out", str(out),
                     "--quiet", "--threads", "1"]) == 0
    pred = np.loadtxt(out / "seq_boxes.txt", delimiter=",")
    assert pred.shape == (5, 4) and np.isfinite(pred).all()
