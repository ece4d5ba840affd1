"""Tests of hybridops_tracking: geometry, box coding, xcorr, metrics, data I/O, the tracker and
its online update, and a tiny end-to-end run. Small models only (CPU, < 2 min)."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from hybridops_tracking import boxes as B
from hybridops_tracking.crop import crop_and_resize
from hybridops_tracking.data import (SequenceError, SynthConfig, list_sequences, make_synthetic_benchmark,
                                     read_otb_sequence, synthetic_sequence, write_otb_sequence)
from hybridops_tracking.metrics import (center_error, overlap, precision_curve, success_curve, summarize)
from hybridops_tracking.model import ModelConfig, SiamRPNPP, feature_size, xcorr_depthwise
from hybridops_tracking.targets import anchor_targets, cls_loss, loc_loss

TINY = dict(width=0.125, blocks=(1, 1, 1, 1), neck_channels=16, exemplar_size=63, instance_size=127)


@pytest.fixture(autouse=True)
def _one_thread():
    # These tiny convs gain nothing from a second thread and lose a lot when the CPU is shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed=0) -> SiamRPNPP:
    torch.manual_seed(seed)
    return SiamRPNPP(ModelConfig(**TINY)).eval()


# -- geometry, anchors, box coding ------------------------------------------------------------
@pytest.mark.parametrize("cfg", [ModelConfig(), ModelConfig.small(), ModelConfig(**TINY)])
def test_score_size_matches_network(cfg):
    if cfg.width == 1.0:
        assert (feature_size(127), feature_size(255), cfg.score_size) == (15, 31, 25)  # SiamRPN++ numbers
        return
    m = SiamRPNPP(cfg).eval()
    z = torch.zeros(1, 3, cfg.exemplar_size, cfg.exemplar_size)
    x = torch.zeros(1, 3, cfg.instance_size, cfg.instance_size)
    with torch.no_grad():
        out = m(z, x)
        feats = m.backbone(x)
    assert out["cls"].shape == (1, 2, cfg.anchor_num, cfg.score_size, cfg.score_size)
    assert out["loc"].shape == (1, 4, cfg.anchor_num, cfg.score_size, cfg.score_size)
    assert all(f.shape[-1] == feature_size(cfg.instance_size) for f in feats)
    assert m.anchors.shape == (4, cfg.anchor_num, cfg.score_size, cfg.score_size)


def test_backbone_strides_and_dilations():
    m = SiamRPNPP(ModelConfig(width=0.25))
    bb = m.backbone
    assert bb.conv1.padding == (0, 0) and bb.layer2[0].conv2.stride == (2, 2) and bb.layer2[0].conv2.padding == (0, 0)
    assert bb.layer3[0].conv2.stride == (1, 1) and bb.layer3[0].conv2.dilation == (1, 1)
    assert bb.layer3[1].conv2.dilation == (2, 2) and bb.layer4[1].conv2.dilation == (4, 4)
    assert [len(l) for l in (bb.layer1, bb.layer2, bb.layer3, bb.layer4)] == [3, 4, 6, 3]


def test_anchors_centered_and_sized():
    a = B.generate_anchors(8, (0.33, 0.5, 1, 2, 3), (8,), 25)
    assert a.shape == (4, 5, 25, 25)
    assert a[0, 0, 12, 12] == 0 and a[1, 0, 12, 12] == 0  # centre cell sits on the crop centre
    assert a[0, 0, 0, 0] == -96 and a[0, 0, 0, 1] == -88
    # ratio 1 anchor is 64x64 for stride 8, scale 8 (pysot's anchors)
    assert a[2, 2, 0, 0] == 64 and a[3, 2, 0, 0] == 64
    assert a[2, 0, 0, 0] == 104 and a[3, 0, 0, 0] == 32  # int(sqrt(64/0.33)) = 13, int(13*0.33) = 4


def test_encode_decode_round_trip():
    g = torch.Generator().manual_seed(0)
    anchors = B.generate_anchors(8, (0.33, 0.5, 1, 2, 3), (4,), 9)
    boxes = torch.stack([torch.rand(5, 9, 9, generator=g) * 100 - 50, torch.rand(5, 9, 9, generator=g) * 100 - 50,
                         torch.rand(5, 9, 9, generator=g) * 80 + 2, torch.rand(5, 9, 9, generator=g) * 80 + 2])
    torch.testing.assert_close(B.decode(B.encode(boxes, anchors), anchors), boxes, rtol=1e-5, atol=1e-4)
    deltas = torch.randn(4, 5, 9, 9, generator=g) * 0.5
    torch.testing.assert_close(B.encode(B.decode(deltas, anchors), anchors), deltas, rtol=1e-5, atol=1e-5)
    # encoding an anchor against itself is zero
    assert torch.allclose(B.encode(anchors, anchors), torch.zeros_like(anchors))


def test_xywh_center_round_trip_and_iou():
    b = np.array([[10.0, 20.0, 30.0, 40.0], [0.5, 1.5, 2.0, 3.0]])
    c = B.xywh_to_center(b)
    np.testing.assert_allclose(c[0], [25, 40, 30, 40])
    np.testing.assert_allclose(B.center_to_xywh(c), b)
    # IoU of a 10x10 box with a copy shifted by 5 px: 50 / 150
    iou = B.center_iou(torch.tensor([0.0, 0, 10, 10]), torch.tensor([5.0, 0, 10, 10]))
    assert abs(float(iou) - 1 / 3) < 1e-6


# -- cross-correlation ------------------------------------------------------------------------
def test_xcorr_depthwise_matches_direct_loops():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, 4, 3, generator=g, dtype=torch.float64)
    out = xcorr_depthwise(x, k)
    assert out.shape == (2, 3, 6, 6)
    ref = torch.empty_like(out)
    for b in range(2):
        for c in range(3):
            for i in range(6):
                for j in range(6):
                    ref[b, c, i, j] = (x[b, c, i:i + 4, j:j + 3] * k[b, c]).sum()
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="same batch and channel"):
        xcorr_depthwise(x, k[:1])


# -- crops and targets ------------------------------------------------------------------------
def test_crop_and_resize_identity_and_padding():
    img = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)[:1]
    same = crop_and_resize(img, (4.0, 4.0), 8.0, 8)
    torch.testing.assert_close(same, img)  # a crop of the whole image at its own size is the image
    shifted = crop_and_resize(img, (3.0, 4.0), 8.0, 8)
    torch.testing.assert_close(shifted[..., 1:], img[..., :-1])
    fill = torch.tensor([[1.0, 2.0, 3.0]])
    far = crop_and_resize(img, (100.0, 100.0), 8.0, 4, fill)
    torch.testing.assert_close(far, fill.view(1, 3, 1, 1).expand(1, 3, 4, 4))


def test_anchor_targets_labels_and_deltas():
    anchors = B.generate_anchors(8, (0.33, 0.5, 1, 2, 3), (4,), 9)
    gt = torch.tensor([8.0, -8.0, 32.0, 32.0])
    label, delta, weight = anchor_targets(anchors, gt, generator=torch.Generator().manual_seed(0))
    pos = label == 1
    assert 0 < int(pos.sum()) <= 16 and int((label == 0).sum()) <= 64 - int(pos.sum())
    assert (B.center_iou(anchors, gt.view(4, 1, 1, 1))[pos] > 0.6).all()
    torch.testing.assert_close(weight.sum(), torch.tensor(1.0))
    torch.testing.assert_close(B.decode(delta, anchors)[:, pos], gt.view(4, 1).expand(4, int(pos.sum())))
    # the loss functions see the positives: a confident correct prediction scores lower
    logits = torch.zeros(1, 2, *label.shape)
    good = logits.clone()
    good[0, 1][pos] = 5
    good[0, 0][label == 0] = 5
    assert cls_loss(good, label[None]) < cls_loss(logits, label[None])
    assert float(loc_loss(delta[None], delta[None], weight[None])) == 0.0


# -- metrics ----------------------------------------------------------------------------------
def test_otb_metrics_hand_computed():
    gt = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], float)
    pred = np.array([[0, 0, 10, 10],      # IoU 1, error 0
                     [5, 0, 10, 10],      # IoU 50/150 = 1/3, error 5
                     [0, 0, 5, 10],       # IoU 1/2, error 2.5
                     [30, 40, 10, 10]],   # IoU 0, error 50
                    float)
    np.testing.assert_allclose(overlap(pred, gt), [1, 1 / 3, 0.5, 0])
    np.testing.assert_allclose(center_error(pred, gt), [0, 5, 2.5, 50])
    p = precision_curve(pred, gt)
    assert p[0] == 0.25 and p[2] == 0.25 and p[3] == 0.5 and p[5] == 0.75 and p[20] == 0.75 and p[50] == 1.0
    s = success_curve(pred, gt)
    # thresholds 0, .05, ..: overlap > t; frames above: t<1/3: 3, 1/3<=t<1/2: 2, 1/2<=t<1: 1, t=1: 0
    expected = np.array([3 if t < 1 / 3 else 2 if t < 0.5 else 1 if t < 1 else 0 for t in np.linspace(0, 1, 21)]) / 4
    np.testing.assert_allclose(s, expected)
    # AUC by hand: (7 thresholds * 3 + 3 * 2 + 10 * 1 + 0) / (21 * 4)
    summary = summarize(pred, gt)
    assert abs(summary["success_auc"] - (7 * 3 + 3 * 2 + 10 * 1) / 84) < 1e-12
    assert summary["precision"] == 0.75


# -- data -------------------------------------------------------------------------------------
def test_synthetic_sequence_properties():
    cfg = SynthConfig(frames=30, width=128, height=96, target_size=(16, 24))
    frames, boxes = synthetic_sequence(cfg, seed=3)
    assert len(frames) == 30 and boxes.shape == (30, 4)
    assert frames[0].shape == (96, 128, 3) and frames[0].dtype == np.uint8
    assert (boxes[:, 2:] > 0).all()
    assert boxes[:, 2].max() > boxes[:, 2].min()  # scale changes
    assert np.linalg.norm(boxes[-1, :2] - boxes[0, :2]) > 1  # target moves
    f2, b2 = synthetic_sequence(cfg, seed=3)
    np.testing.assert_array_equal(b2, boxes)
    np.testing.assert_array_equal(f2[7], frames[7])  # deterministic per seed


def test_reader_round_trips_generated_sequence(tmp_path):
    frames, boxes = synthetic_sequence(SynthConfig(frames=6, width=96, height=80, target_size=(14, 20)), seed=5)
    write_otb_sequence(tmp_path / "seqA", frames, boxes, ext="png")
    seq = read_otb_sequence(tmp_path / "seqA")
    assert seq.name == "seqA" and len(seq) == 6
    np.testing.assert_array_equal(seq.boxes, boxes)
    for i in range(6):
        np.testing.assert_array_equal(seq.image(i), frames[i])
    paths = make_synthetic_benchmark(tmp_path / "bench", 2, SynthConfig(frames=4, width=96, height=80,
                                                                        target_size=(14, 20)))
    assert list_sequences(tmp_path / "bench") == paths
    assert list_sequences(paths[0]) == [paths[0]]


def test_reader_accepts_tabs_spaces_and_no_img_folder(tmp_path):
    from PIL import Image
    d = tmp_path / "flat"
    d.mkdir()
    for i in range(2):
        Image.new("RGB", (20, 20)).save(d / f"{i:04d}.jpg")
    (d / "groundtruth_rect.txt").write_text("1\t2\t3\t4\n5 6 7 8\n")
    seq = read_otb_sequence(d)
    np.testing.assert_array_equal(seq.boxes, [[1, 2, 3, 4], [5, 6, 7, 8]])


def _write_seq(path, n=3, n_gt=3):
    frames, boxes = synthetic_sequence(SynthConfig(frames=max(n, n_gt, 2), width=64, height=64, target_size=(10, 14)), 0)
    write_otb_sequence(path, frames[:n], boxes[:n_gt], ext="png")
    return path


def test_bad_folder_missing_groundtruth(tmp_path):
    p = _write_seq(tmp_path / "s")
    (p / "groundtruth_rect.txt").unlink()
    with pytest.raises(SequenceError, match=r"s: missing ground truth .*groundtruth_rect\.txt"):
        read_otb_sequence(p)


def test_bad_folder_mismatched_counts(tmp_path):
    p = _write_seq(tmp_path / "s", n=3, n_gt=4)
    with pytest.raises(SequenceError, match=r"s: 3 images in .* but 4 boxes"):
        read_otb_sequence(p)


def test_bad_folder_unreadable_image(tmp_path):
    p = _write_seq(tmp_path / "s")
    (p / "img" / "0002.png").write_bytes(b"this is not an image")
    with pytest.raises(SequenceError, match=r"s: cannot read image .*0002\.png"):
        read_otb_sequence(p)


def test_bad_folder_malformed_groundtruth_and_missing_dir(tmp_path):
    p = _write_seq(tmp_path / "s")
    (p / "groundtruth_rect.txt").write_text("1,2,3,4\n1,2,3\n1,2,3,4\n")
    with pytest.raises(SequenceError, match="line 2 .* not four numbers"):
        read_otb_sequence(p)
    with pytest.raises(SequenceError, match="is not a directory"):
        read_otb_sequence(tmp_path / "nope")


def test_cli_reports_bad_folder_once(tmp_path, capsys):
    from hybridops_tracking.cli import main
    p = _write_seq(tmp_path / "s")
    (p / "groundtruth_rect.txt").unlink()
    assert main(["track", str(p), "--checkpoint", str(tmp_path / "none.pt"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "missing ground truth" in err


# -- tracker (float) --------------------------------------------------------------------------
def test_tracker_float_outputs_finite_boxes():
    from hybridops_tracking.tracker import SiamRPNTracker
    frames, boxes = synthetic_sequence(SynthConfig(frames=5, width=128, height=96, target_size=(16, 24)), 1)
    t = SiamRPNTracker(tiny_model())
    t.init(frames[0], boxes[0])
    for f in frames[1:]:
        box, score = t.track(f)
        assert box.shape == (4,) and np.isfinite(box).all() and 0 <= score <= 1
        assert box[2] >= 10 and box[3] >= 10
        assert -1e-6 <= box[0] + box[2] / 2 <= 128 and -1e-6 <= box[1] + box[3] / 2 <= 96


def test_tracker_post_processing_follows_a_planted_peak():
    """With a response peaked at one anchor, the tracker moves to that anchor's decoded box."""
    from hybridops_tracking.tracker import SiamRPNTracker, TrackParams

    model = tiny_model()
    cfg = model.config
    s = cfg.score_size
    cell = (s // 2 + 2, s // 2 - 1)  # 2 rows down, 1 column left of the centre

    def fake_track(x):
        cls = torch.full((1, 2, cfg.anchor_num, s, s), -10.0)
        cls[0, 0] = 10.0
        cls[0, 1, 2, cell[0], cell[1]] = 10.0
        cls[0, 0, 2, cell[0], cell[1]] = -10.0
        return {"cls": cls, "loc": torch.zeros(1, 4, cfg.anchor_num, s, s), "cls_hidden": []}

    t = SiamRPNTracker(model, TrackParams(window_influence=0.0, lr=1.0, penalty_k=0.0))
    frame = np.zeros((200, 200, 3), np.uint8)
    t.init(frame, (80, 80, 32, 32))  # centre (96, 96); s_z = 64, so scale_z = 63 / 64
    model.track = fake_track
    box, score = t.track(frame)
    scale_z = cfg.exemplar_size / 64
    assert score > 0.99
    np.testing.assert_allclose(box[0] + box[2] / 2, 96 + (-1 * cfg.stride) / scale_z, atol=1e-4)
    np.testing.assert_allclose(box[1] + box[3] / 2, 96 + (2 * cfg.stride) / scale_z, atol=1e-4)
    np.testing.assert_allclose(box[2:], model.anchors[2:, 2, 0, 0].numpy() / scale_z, atol=1e-4)
