"""Data set readers on fixtures generated here (tiny images in tmp_path), one test per format
quirk; plus the real-sequence training sampler and the metrics' handling of absent frames."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hybridops_tracking.data import (OTB_FRAME_RANGES, SequenceError, SynthConfig, load_dataset, parse_boxes,
                                     read_got10k_sequence, read_lasot_sequence, read_otb_sequence, read_uav123_sequence,
                                     read_vot_sequence, sorted_frames)
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


def _touch(folder, numbers, fmt="{:04d}.jpg"):
    """Empty image files (read with check_images=False): enough for frame ranges of hundreds of frames."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        (folder / fmt.format(n)).touch()
    return folder


def _otb(root, name, numbers, n_rows):
    """An OTB folder with images ``numbers`` and ``n_rows`` boxes; row k is ``[k, 2k+1, 5, 6]``."""
    _touch(root / name / "img", numbers)
    (root / name / "groundtruth_rect.txt").write_text(_lines(_rows(n_rows)))
    return root / name


def test_otb_frame_ranges_from_sequence_list():
    """The toolkits' start / end frames (OTB_FRAME_RANGES cites where each comes from)."""
    assert OTB_FRAME_RANGES["David"] == (300, 770) and OTB_FRAME_RANGES["Tiger1"] == (6, 354)
    assert OTB_FRAME_RANGES["Football1"] == (1, 74) and OTB_FRAME_RANGES["Freeman3"] == (1, 460)
    assert OTB_FRAME_RANGES["Freeman4"] == (1, 283) and OTB_FRAME_RANGES["Diving"] == (1, 215)
    assert OTB_FRAME_RANGES["BlurCar1"] == (247, 988) and OTB_FRAME_RANGES["BlurCar4"] == (18, 397)


def test_otb_start_frame_ground_truth_covers_the_range(tmp_path):
    """David: 770 images, 471 boxes whose first row is img/0300.jpg."""
    s = read_otb_sequence(_otb(tmp_path, "David", range(1, 771), 471), check_images=False)
    assert len(s) == 471 and s.frames[0].name == "0300.jpg" and s.frames[-1].name == "0770.jpg"
    np.testing.assert_array_equal(s.boxes[0], [0, 1, 5, 6])
    # BlurCar3's images themselves start at 0003.jpg: nothing to cut.
    s = read_otb_sequence(_otb(tmp_path, "BlurCar3", range(3, 360), 357), check_images=False)
    assert len(s) == 357 and s.frames[0].name == "0003.jpg"


@pytest.mark.parametrize("name, images, end", [("Football1", 81, 74), ("Freeman3", 474, 460),
                                               ("Freeman4", 297, 283), ("Diving", 231, 215)])
def test_otb_end_frame_drops_the_images_after_it(tmp_path, name, images, end):
    """Images past the toolkit's end frame are not part of the sequence, whether the ground truth
    stops there or not."""
    s = read_otb_sequence(_otb(tmp_path, name, range(1, images + 1), end), check_images=False)
    assert len(s) == end and s.frames[-1].name == f"{end:04d}.jpg"
    np.testing.assert_array_equal(s.boxes[-1], _rows(end)[-1])
    s = read_otb_sequence(_otb(tmp_path / "full", name, range(1, images + 1), images), check_images=False)
    assert len(s) == end and s.frames[-1].name == f"{end:04d}.jpg"


def test_otb_tiger1_drops_ground_truth_rows_before_the_start(tmp_path):
    """Tiger1: 354 images and 354 rows; the toolkit tracks from image 6 with rows 6.. (row k is image k)."""
    s = read_otb_sequence(_otb(tmp_path, "Tiger1", range(1, 355), 354), check_images=False)
    assert len(s) == 349 and s.frames[0].name == "0006.jpg" and s.frames[-1].name == "0354.jpg"
    np.testing.assert_array_equal(s.boxes[0], _rows(354)[5])
    # A copy whose file already starts at image 6 reads the same.
    t = read_otb_sequence(_otb(tmp_path / "trimmed", "Tiger1", range(1, 355), 349), check_images=False)
    assert [f.name for f in t.frames] == [f.name for f in s.frames]
    np.testing.assert_array_equal(t.boxes[0], _rows(1)[0])


def test_otb_range_mismatch_and_overrides(tmp_path):
    # David renumbered 1..471: OTB's range does not fit; refused rather than misaligned.
    renumbered = _otb(tmp_path, "David", range(1, 472), 471)
    with pytest.raises(SequenceError, match=r"fit neither .* pass start_frame \(hybridops-track: --start-frame\)"):
        read_otb_sequence(renumbered, check_images=False)
    assert read_otb_sequence(renumbered, check_images=False, start_frame=1).frames[0].name == "0001.jpg"
    other = tmp_path / "Unknown"
    _images(other / "img", range(1, 6))
    (other / "groundtruth_rect.txt").write_text(_lines(_rows(3)))
    with pytest.raises(SequenceError, match="first annotated frame is not known"):
        read_otb_sequence(other)
    assert [p.name for p in read_otb_sequence(other, start_frame=2).frames] == ["0002.jpg", "0003.jpg", "0004.jpg"]
    assert [p.name for p in read_otb_sequence(other, end_frame=3).frames] == ["0001.jpg", "0002.jpg", "0003.jpg"]
    assert abs(int(read_otb_sequence(other, start_frame=2).image(0)[0, 0, 0]) - 2) <= 2  # image 2's pixels


def test_load_dataset_applies_the_ranges(tmp_path):
    _otb(tmp_path, "Football1", range(1, 82), 74)
    _otb(tmp_path, "Tiger1", range(1, 355), 354)
    seqs = {s.name: s for s in load_dataset(tmp_path, "otb", check_images=False)}
    assert len(seqs["Football1"]) == 74 and len(seqs["Tiger1"]) == 349


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


def _flat_sequences(root, values, n=4, size=(96, 80)):
    """GOT-10k folders whose every image is one grey ``value``: a crop's mean tells its sequence."""
    seqs = []
    for v in values:
        d = root / f"flat{v}"
        d.mkdir(parents=True)
        for i in range(1, n + 1):
            Image.fromarray(np.full((size[1], size[0], 3), v, np.uint8)).save(d / f"{i:08d}.png")
        (d / "groundtruth.txt").write_text(_lines([[30 + 2 * i, 25, 20, 16] for i in range(n)]))
        seqs.append(read_got10k_sequence(d))
    return seqs


def _tiny():
    from hybridops_tracking.model import ModelConfig, SiamRPNPP
    mc = ModelConfig(width=0.125, blocks=(1, 1, 1, 1), neck_channels=16, exemplar_size=63, instance_size=127)
    return mc, SiamRPNPP(mc).anchors


def test_neg_and_color_zero_keep_the_pairs_of_the_sampler_before_them():
    """neg=0, color=0: the same pairs, seed for seed, as the sampler had before negative pairs and
    colour jitter existed (its output on this configuration, recorded before the change)."""
    from hybridops_tracking.train import PairSampler, TrainConfig

    mc, anchors = _tiny()
    tc = TrainConfig(num_sequences=3, seq_frames=8, synth=SynthConfig(frames=8, width=96, height=80,
                     target_size=(14, 20)), blur=0.5, flip=0.5, max_gap=3, seed=5, neg=0.0, color=0.0)
    z, x, label, _, _ = PairSampler(mc, anchors, tc).sample(6)
    assert [int(torch.nonzero(lab.flatten() == 1).sum()) for lab in label] == [469, 201, 173, 547, 449, 439]
    assert [int((lab == 0).sum()) for lab in label] == [62, 63, 63, 61, 62, 62]
    z_means = [123.758, 122.985, 124.679, 132.692, 124.575, 123.986]
    x_means = [121.045, 119.817, 120.022, 128.701, 127.212, 120.349]
    assert [float(t.mean()) for t in z] == pytest.approx(z_means, abs=2e-3)
    assert [float(t.mean()) for t in x] == pytest.approx(x_means, abs=2e-3)


def test_negative_pairs_have_no_positive_anchor_and_no_regression(tmp_path):
    """neg=1: template and search from different sequences; no positive anchor, at most 16
    negatives (pysot's AnchorTarget), zero regression weight."""
    from hybridops_tracking.targets import loc_loss
    from hybridops_tracking.train import PairSampler, TrainConfig

    mc, anchors = _tiny()
    seqs = _flat_sequences(tmp_path, (40, 120, 200))
    sampler = PairSampler(mc, anchors, TrainConfig(neg=1.0, flip=0.5, seed=2), sequences=seqs)
    z, x, label, delta, weight = sampler.sample(10)
    for b in range(10):
        assert not (label[b] == 1).any() and 1 <= int((label[b] == 0).sum()) <= 16
        assert float(weight[b].abs().sum()) == 0.0 and float(delta[b].abs().sum()) == 0.0
        assert abs(float(z[b].mean()) - float(x[b].mean())) > 40  # search crop from another sequence
    assert float(loc_loss(torch.randn_like(delta), delta, weight)) == 0.0


def test_negative_targets_sit_around_the_other_object():
    from hybridops_tracking.boxes import generate_anchors
    from hybridops_tracking.targets import negative_targets

    anchors = generate_anchors(8, (0.33, 0.5, 1, 2, 3), (8,), 25)  # pysot's 25x25 map, stride 8
    g = torch.Generator().manual_seed(0)
    label, _, _ = negative_targets(anchors, torch.tensor([17.0, -30.0, 40, 50]), generator=g)
    neg = anchors[:2][:, label == 0]
    assert neg.shape[1] == 16 and not (label == 1).any()
    assert float((neg[0] - 16).abs().max()) <= 24 and float((neg[1] + 32).abs().max()) <= 24  # 3 cells of 8 px
    label, _, _ = negative_targets(anchors, torch.tensor([95.0, 95.0, 40, 50]), generator=g)  # at the corner
    assert float(anchors[0][label == 0].min()) >= 96 - 24 and 1 <= int((label == 0).sum()) <= 16


def test_negative_pairs_need_a_second_sequence(tmp_path):
    """With one sequence neg is off: the pairs equal those of neg=0, all positive."""
    from hybridops_tracking.train import PairSampler, TrainConfig

    mc, anchors = _tiny()
    seq = _flat_sequences(tmp_path, (90,))
    a = PairSampler(mc, anchors, TrainConfig(neg=0.8, seed=4), sequences=seq)
    b = PairSampler(mc, anchors, TrainConfig(neg=0.0, seed=4), sequences=seq)
    assert a.neg == 0.0
    for ta, tb in zip(a.sample(4), b.sample(4)):
        torch.testing.assert_close(ta, tb, rtol=0, atol=0)
    with pytest.raises(ValueError, match="neg is a probability"):
        TrainConfig(neg=1.5)


def test_colour_augmentation_shifts_each_crop_by_a_constant(tmp_path):
    """color=1: pysot's PCA colour jitter moves every pixel of a crop by one RGB offset of a few
    grey levels (flat grey images stay flat, at another level per crop)."""
    from hybridops_tracking.train import PairSampler, TrainConfig

    mc, anchors = _tiny()
    seqs = _flat_sequences(tmp_path, (128,))
    z, x, *_ = PairSampler(mc, anchors, TrainConfig(color=1.0, seed=0), sequences=seqs).sample(6)
    for crops in (z, x):
        flat = crops.flatten(2)
        assert float((flat - flat.mean(2, keepdim=True)).abs().max()) < 1e-3  # one offset per crop and channel
        shift = flat.mean(2) - 128
        assert float(shift.abs().max()) < 40 and float(shift.abs().mean()) > 0.5
        assert len({round(float(v), 3) for v in shift.flatten()}) == shift.numel()  # drawn per crop and channel


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


# -- layout detection and the start frame --------------------------------------------------------
def _gt(folder, n, name="groundtruth.txt"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(_lines(_rows(n)))
    return folder


def test_layouts_are_detected_from_their_files(tmp_path):
    from hybridops_tracking.data import detect_format

    otb = tmp_path / "otb"
    _images(_gt(otb / "Car", 3, "groundtruth_rect.txt") / "img", range(1, 4))
    got = tmp_path / "got"
    for s in ("GOT-10k_Train_000001", "GOT-10k_Train_000002"):
        _images(_gt(got / s, 3), range(1, 4), fmt="{:08d}.jpg")
        (got / s / "absence.label").write_text("0\n0\n0\n")
    (got / "list.txt").write_text("GOT-10k_Train_000001\nGOT-10k_Train_000002\n")
    lasot = tmp_path / "lasot"
    seq = _gt(lasot / "airplane" / "airplane-1", 3)
    _images(seq / "img", range(1, 4), fmt="{:08d}.jpg")
    (seq / "full_occlusion.txt").write_text("0,0,0\n")
    (seq / "out_of_view.txt").write_text("0,0,0\n")
    vot = tmp_path / "vot"
    _images(_gt(vot / "ball", 3) / "color", range(1, 4), fmt="{:08d}.jpg")
    (vot / "list.txt").write_text("ball\n")
    uav = tmp_path / "uav"
    (uav / "anno" / "UAV123").mkdir(parents=True)
    for root, fmt in ((otb, "otb"), (otb / "Car", "otb"), (got, "got10k"), (got / "GOT-10k_Train_000001", "got10k"),
                      (lasot, "lasot"), (lasot / "airplane" / "airplane-1", "lasot"), (vot, "vot"), (uav, "uav123")):
        assert detect_format(root) == fmt, root
    assert [s.name for s in load_dataset(lasot)] == ["airplane-1"]  # no format given
    assert len(load_dataset(got)) == 2
    with pytest.raises(SequenceError, match="not recognisable from its files; pass --format"):
        detect_format(_images(_gt(tmp_path / "bare" / "s", 3), range(1, 4)).parent)
    # --format still overrides: the GOT-10k folders read as VOT sequences (same files)
    assert [s.name for s in load_dataset(got, "vot")] == ["GOT-10k_Train_000001", "GOT-10k_Train_000002"]


def test_start_frame_through_load_dataset_and_the_cli(tmp_path, capsys):
    """Ground truth starting at frame 11 of 20 images: the reader asks for the start frame, and
    load_dataset / hybridops-track --start-frame pass it."""
    from hybridops_tracking import cli

    seq = _gt(tmp_path / "Late", 10, "groundtruth_rect.txt")
    _images(seq / "img", range(1, 21))
    with pytest.raises(SequenceError, match=r"pass start_frame \(hybridops-track: --start-frame\)"):
        load_dataset(seq)
    (s,) = load_dataset(seq, start_frame=11)
    assert s.frames[0].name == "0011.jpg" and len(s.frames) == 10
    _images(_gt(tmp_path / "Other", 20, "groundtruth_rect.txt") / "img", range(1, 21))
    with pytest.raises(SequenceError, match="holds 2 sequences; a start frame applies to one sequence"):
        load_dataset(tmp_path, start_frame=11)
    args = cli.build_parser().parse_args(["rescore", str(tmp_path / "r"), "--data", str(seq), "--start-frame", "11"])
    assert cli._sequences(args, seq)[0].frames[0].name == "0011.jpg" and args.format == "otb"
