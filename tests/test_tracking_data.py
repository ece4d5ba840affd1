"""Data set readers on fixtures generated here (tiny images in tmp_path), one test per format
quirk; plus the real-sequence training sampler and the metrics' handling of absent frames."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hybridops_tracking.data import (OTB_START_FRAMES, SequenceError, load_dataset, parse_boxes, read_got10k_sequence,
                                     read_lasot_sequence, read_otb_sequence, read_uav123_sequence, read_vot_sequence,
                                     sorted_frames)
from hybridops_tracking.metrics import summarize


def _images(folder, numbers, fmt="{:04d}.jpg", size=(16, 12)):
    """Write one tiny image per frame number; pixel value = frame number, so that a test can tell
    from the pixels which file a frame came from."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        Image.fromarray(np.full((size[1], size[0], 3), n % 256, np.uint8)).save(folder / fmt.format(n), quality=100)
    return folder


def _lines(rows, sep=","):
    return "\n".join(sep.join(f"{v:g}" for v in r) for r in rows) + "\n"


def _rows(n, offset=0):
    return [[i + offset, 2 * i + 1, 5, 6] for i in range(n)]


# -- OTB ---------------------------------------------------------------------------------------
def test_otb_numeric_frame_order(tmp_path):
    """1.jpg ... 12.jpg: text order would put 10.jpg after 1.jpg and pair it with box 2."""
    seq = tmp_path / "Num"
    _images(seq / "img", range(1, 13), fmt="{}.jpg")
    (seq / "groundtruth_rect.txt").write_text(_lines(_rows(12)))
    s = read_otb_sequence(seq)
    assert [p.name for p in s.frames][:3] == ["1.jpg", "2.jpg", "3.jpg"] and s.frames[9].name == "10.jpg"
    assert abs(int(s.image(9)[0, 0, 0]) - 10) <= 2  # frame 10's pixels, with its box row 10
    np.testing.assert_array_equal(s.boxes[9], [9, 19, 5, 6])


def test_otb_start_frame_from_sequence_list(tmp_path):
    """David's ground truth starts at img/0300.jpg (OTB's sequence list)."""
    assert OTB_START_FRAMES["David"] == 300
    seq = tmp_path / "David"
    _images(seq / "img", range(295, 306))
    (seq / "groundtruth_rect.txt").write_text(_lines(_rows(4)))
    s = read_otb_sequence(seq)
    assert [p.name for p in s.frames] == ["0300.jpg", "0301.jpg", "0302.jpg", "0303.jpg"]
    other = tmp_path / "Unknown"
    _images(other / "img", range(1, 6))
    (other / "groundtruth_rect.txt").write_text(_lines(_rows(3)))
    with pytest.raises(SequenceError, match="first annotated frame is not known"):
        read_otb_sequence(other)
    assert [p.name for p in read_otb_sequence(other, start_frame=2).frames] == ["0002.jpg", "0003.jpg", "0004.jpg"]


def test_otb_multi_target_files(tmp_path):
    seq = tmp_path / "Jogging"
    _images(seq / "img", range(1, 4))
    (seq / "groundtruth_rect.1.txt").write_text(_lines(_rows(3)))
    (seq / "groundtruth_rect.2.txt").write_text(_lines(_rows(3, offset=50)))
    seqs = load_dataset(tmp_path, "otb")
    assert [s.name for s in seqs] == ["Jogging-1", "Jogging-2"]
    assert seqs[1].boxes[0, 0] == 50 and seqs[0].boxes[0, 0] == 0
    with pytest.raises(SequenceError, match="has 2 targets"):
        read_otb_sequence(seq)


def test_otb_bom_and_separators(tmp_path):
    """A UTF-8 BOM, tabs, commas and spaces (mixed, as real OTB files are) all parse."""
    seq = tmp_path / "Bom"
    _images(seq / "img", range(1, 4))
    (seq / "groundtruth_rect.txt").write_bytes(b"\xef\xbb\xbf1\t2\t3\t4\r\n5,6,7,8\n9 10  11 12\n")
    s = read_otb_sequence(seq)
    np.testing.assert_array_equal(s.boxes, [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])


def test_unknown_format_lines_give_one_line_errors(tmp_path):
    f = tmp_path / "g.txt"
    f.write_text("1,2,3\n")
    with pytest.raises(SequenceError, match=r"line 1 .* not four numbers") as e:
        parse_boxes(f, "x")
    assert "\n" not in str(e.value)
    f.write_text("m1,2,3,4,5,6\n")
    with pytest.raises(SequenceError, match="segmentation mask"):
        parse_boxes(f, "x")
    with pytest.raises(SequenceError, match="unknown data set format"):
        load_dataset(tmp_path, "kitti")


def test_skip_bad_keeps_going_and_reports(tmp_path):
    good = tmp_path / "Good"
    _images(good / "img", range(1, 4))
    (good / "groundtruth_rect.txt").write_text(_lines(_rows(3)))
    bad = tmp_path / "Bad"
    _images(bad / "img", range(1, 4))
    (bad / "groundtruth_rect.txt").write_text(_lines(_rows(2)))
    with pytest.raises(SequenceError, match="Bad"):
        load_dataset(tmp_path, "otb")
    skipped = []
    seqs = load_dataset(tmp_path, "otb", skip_bad=True, skipped=skipped)
    assert [s.name for s in seqs] == ["Good"]
    assert skipped and skipped[0][0] == "Bad" and "first annotated frame" in skipped[0][1]


# -- GOT-10k, LaSOT, VOT, UAV123 -----------------------------------------------------------------
def test_got10k_absence_and_list(tmp_path):
    root = tmp_path / "val"
    for name in ("GOT-10k_Val_000001", "GOT-10k_Val_000002"):
        _images(root / name, range(1, 5), fmt="{:08d}.jpg")
        (root / name / "groundtruth.txt").write_text(_lines(_rows(4)))
    (root / "GOT-10k_Val_000001" / "absence.label").write_text("0\n0\n1\n0\n")
    (root / "list.txt").write_text("GOT-10k_Val_000001\nGOT-10k_Val_000002\n")
    seqs = load_dataset(root, "got10k")
    assert [s.name for s in seqs] == ["GOT-10k_Val_000001", "GOT-10k_Val_000002"]
    assert seqs[0].absent.tolist() == [False, False, True, False] and not seqs[1].absent.any()
    test_split = tmp_path / "GOT-10k_Test_000001"
    _images(test_split, range(1, 4), fmt="{:08d}.jpg")
    (test_split / "groundtruth.txt").write_text("1,2,3,4\n")
    with pytest.raises(SequenceError, match="only the first box"):
        read_got10k_sequence(test_split)


def test_lasot_category_folders_and_occlusion_flags(tmp_path):
    seq = tmp_path / "airplane" / "airplane-1"
    _images(seq / "img", range(1, 5), fmt="{:08d}.jpg")
    (seq / "groundtruth.txt").write_text(_lines(_rows(4)))
    (seq / "full_occlusion.txt").write_text("0,1,0,0")
    (seq / "out_of_view.txt").write_text("0,0,0,1")
    seqs = load_dataset(tmp_path, "lasot")
    assert [s.name for s in seqs] == ["airplane-1"]
    assert seqs[0].absent.tolist() == [False, True, False, True]
    assert read_lasot_sequence(seq).valid.sum() == 2


def test_vot_polygons_become_axis_aligned_boxes(tmp_path):
    seq = tmp_path / "ball"
    _images(seq / "color", range(1, 3), fmt="{:08d}.jpg")
    # A rotated square (diamond) and a plain rectangle line in the same file.
    (seq / "groundtruth.txt").write_text("10,0,20,10,10,20,0,10\n1,2,3,4\n")
    s = read_vot_sequence(seq)
    np.testing.assert_allclose(s.boxes, [[0, 0, 20, 20], [1, 2, 3, 4]])


def test_uav123_nan_rows_are_absent_and_not_scored(tmp_path):
    (tmp_path / "anno" / "UAV123").mkdir(parents=True)
    _images(tmp_path / "data_seq" / "UAV123" / "car1", range(1, 5), fmt="{:06d}.jpg")
    (tmp_path / "anno" / "UAV123" / "car1.txt").write_text("1,2,5,6\nNaN,NaN,NaN,NaN\n3,4,5,6\n3,4,5,6\n")
    seqs = load_dataset(tmp_path, "uav123")
    s = seqs[0]
    assert s.name == "car1" and s.absent.tolist() == [False, True, False, False]
    pred = s.boxes.copy()
    pred[1] = [500, 500, 5, 5]  # a wrong box on the absent frame must not count
    assert summarize(pred, s.boxes, s.valid)["precision"] == 1.0
    with pytest.raises(SequenceError, match="pass its start_frame"):
        (tmp_path / "anno" / "UAV123" / "car1_2.txt").write_text("1,2,5,6\n")
        read_uav123_sequence(tmp_path / "anno" / "UAV123" / "car1_2.txt", tmp_path)
    part = read_uav123_sequence(tmp_path / "anno" / "UAV123" / "car1_2.txt", tmp_path, start_frame=3)
    assert [p.name for p in part.frames] == ["000003.jpg"]


def test_sorted_frames_puts_unnumbered_files_last(tmp_path):
    _images(tmp_path, [3, 20, 100], fmt="f{}.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "cover.png")
    assert [p.name for p in sorted_frames(tmp_path)] == ["f3.png", "f20.png", "f100.png", "cover.png"]


# -- training on real sequences ------------------------------------------------------------------
def test_pair_sampler_on_real_sequences_uses_visible_frames_and_augments(tmp_path):
    from hybridops_tracking.model import ModelConfig, SiamRPNPP
    from hybridops_tracking.train import PairSampler, TrainConfig

    seq = tmp_path / "car"
    _images(seq, range(1, 7), fmt="{:08d}.jpg", size=(96, 80))
    rows = [[30, 30, 20, 16]] * 6
    rows[2] = [float("nan")] * 4
    (seq / "groundtruth.txt").write_text(_lines(rows))
    s = read_got10k_sequence(seq)
    mc = ModelConfig(width=0.125, blocks=(1, 1, 1, 1), neck_channels=16, exemplar_size=63, instance_size=127)
    anchors = SiamRPNPP(mc).anchors
    tc = TrainConfig(blur=1.0, flip=1.0, max_gap=2, seed=3)
    sampler = PairSampler(mc, anchors, tc, sequences=[s])
    z, x, label, delta, weight = sampler.sample(6)
    assert z.shape == (6, 3, 63, 63) and x.shape == (6, 3, 127, 127)
    assert torch.isfinite(z).all() and torch.isfinite(x).all() and (label == 1).any(dim=(1, 2, 3)).all()
    assert 2 not in sampler.seqs[0][1 + 1]  # frame 3 (index 2) has no box and is never sampled
    assert len(sampler.seqs[0][0].cache) >= 1  # images were decoded lazily from disk


def test_flipped_pairs_keep_labels_on_the_target(tmp_path):
    """With flip on, the positive anchors still sit where the (mirrored) target is in the crop."""
    from hybridops_tracking.model import ModelConfig, SiamRPNPP
    from hybridops_tracking.train import PairSampler, TrainConfig

    seq = tmp_path / "sq"
    seq.mkdir()
    rows = []
    for i in range(4):
        img = np.zeros((100, 140, 3), np.uint8)
        x, y = 30 + 15 * i, 40
        img[y:y + 20, x:x + 20] = 255  # a bright square on black: its crop position is measurable
        Image.fromarray(img).save(seq / f"{i + 1:08d}.png")
        rows.append([x, y, 20, 20])
    (seq / "groundtruth.txt").write_text(_lines(rows))
    mc = ModelConfig(width=0.125, blocks=(1, 1, 1, 1), neck_channels=16, exemplar_size=63, instance_size=127)
    anchors = SiamRPNPP(mc).anchors
    sampler = PairSampler(mc, anchors, TrainConfig(flip=1.0, shift=0.3, scale=0.0, seed=1),
                          sequences=[read_got10k_sequence(seq)])
    _, x, label, _, _ = sampler.sample(12)
    checked = 0
    for b in range(12):
        bright = x[b].mean(0) > 128
        cols = torch.nonzero(bright)[:, 1].float()
        target_dx = float(cols.mean()) - (mc.instance_size - 1) / 2
        anchor_dx = float(anchors[0][label[b] == 1].mean())
        if abs(target_dx) > 6:  # clearly off-centre: the sign must agree
            assert np.sign(target_dx) == np.sign(anchor_dx), (b, target_dx, anchor_dx)
            assert abs(target_dx - anchor_dx) < 12
            checked += 1
    assert checked >= 3


def test_real_otb_crossing_when_present():
    """The real OTB sequence shared with this project (tab-separated ground truth), when the
    machine has it; every other reader test runs on generated fixtures."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "otb" / "Crossing"
    if not root.is_dir():
        pytest.skip(f"{root} is not on this machine (the generated-fixture tests cover the reader)")
    s = read_otb_sequence(root)
    assert len(s) == 120 and s.frames[0].name == "0001.jpg" and s.frames[-1].name == "0120.jpg"
    np.testing.assert_array_equal(s.boxes[0], [205, 151, 17, 50])
    assert s.valid.all() and s.image(0).ndim == 3
