"""hybridops-track CLI: bad input ends in one ``error:`` line (no traceback), and ``compare --data``
never mixes its synthetic sequences with a folder's own."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hybridops_tracking import cli
from hybridops_tracking.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hybridops_tracking.data import SynthConfig, synthetic_sequence, write_otb_sequence
from hybridops_tracking.model import ModelConfig, SiamRPNPP
from hybridops_tracking.pysot import ours_to_pysot

TINY = dict(width=0.125, blocks=(1, 1, 1, 1), neck_channels=16, exemplar_size=63, instance_size=127)
SYNTH = SynthConfig(frames=6, width=96, height=80, target_size=(14, 20))


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny convs on a shared 2-core machine: one thread is faster and leaves the other core free.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def seq_dir(tmp_path):
    frames, boxes = synthetic_sequence(SYNTH, seed=3)
    return write_otb_sequence(tmp_path / "data" / "seq", frames, boxes)


@pytest.fixture
def float_ckpt(tmp_path):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "f.pt", SiamRPNPP(ModelConfig(**TINY)), "float")


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("command", ["track", "evaluate"])
def test_deploy_with_float_checkpoint_is_one_error_line(command, seq_dir, float_ckpt, capsys):
    assert cli.main([command, str(seq_dir), "--checkpoint", str(float_ckpt), "--deploy", "--quiet",
                     "--out", str(seq_dir.parent.parent / "o")]) == 2
    _one_error_line(capsys, "float checkpoint", str(float_ckpt))


@pytest.mark.parametrize("command", ["track", "evaluate"])
def test_missing_checkpoint_is_one_error_line(command, seq_dir, tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert cli.main([command, str(seq_dir), "--checkpoint", str(missing), "--quiet"]) == 2
    _one_error_line(capsys, "does not exist", str(missing))


def test_unreadable_checkpoint_and_train_init_errors(seq_dir, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    assert cli.main(["track", str(seq_dir), "--checkpoint", str(junk), "--quiet"]) == 2
    _one_error_line(capsys, "not a readable torch checkpoint")
    assert cli.main(["train", "--out", str(tmp_path / "x.pt"), "--init", str(tmp_path / "gone.pt"),
                     "--steps", "1", "--quiet"]) == 2
    _one_error_line(capsys, "does not exist")
    with pytest.raises(CheckpointError, match="float checkpoint"):
        load_checkpoint(save_checkpoint(tmp_path / "f2.pt", SiamRPNPP(ModelConfig(**TINY))), deploy=True)


@pytest.mark.parametrize("extra, needle", [({"rpn_head.mask_head.conv.weight": torch.zeros(1)}, "has no counterpart"),
                                           ({}, "'neck.downsample2.downsample.0.weight', so it is not a complete")])
def test_pysot_checkpoint_with_unknown_or_missing_keys_is_one_error_line(extra, needle, seq_dir, tmp_path, capsys):
    """A pysot model.pth with a part this tracker lacks (SiamMask's mask head) or without one it
    needs: one error line naming the file and the key, for track and for train --init."""
    sd = {**ours_to_pysot(SiamRPNPP(ModelConfig(**TINY)).state_dict()), **extra}
    if not extra:
        sd = {k: v for k, v in sd.items() if not k.startswith("neck.downsample2.")}
    pth = tmp_path / "model.pth"
    torch.save({"state_dict": sd}, pth)
    assert cli.main(["track", str(seq_dir), "--checkpoint", str(pth), "--quiet", "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys, str(pth), needle)
    assert cli.main(["train", "--out", str(tmp_path / "x.pt"), "--init", str(pth), "--steps", "1", "--quiet"]) == 2
    _one_error_line(capsys, str(pth), needle)


def test_train_neg_and_color_options(tmp_path, monkeypatch, capsys):
    """--neg / --color reach the pair sampler; one sequence leaves the pairs positive (said so);
    a value that is not a probability is an argparse error."""
    from hybridops_tracking.train import PairSampler

    monkeypatch.setattr(ModelConfig, "small", classmethod(lambda cls, **kw: cls(**TINY)))
    labels, sample = [], PairSampler.sample

    def spy(self, n):
        batch = sample(self, n)
        labels.append(batch[2])
        return batch

    monkeypatch.setattr(PairSampler, "sample", spy)
    data = tmp_path / "data"
    for i in range(2):
        frames, boxes = synthetic_sequence(SYNTH, seed=20 + i)
        write_otb_sequence(data / f"s{i}", frames, boxes)
    common = ["--steps", "1", "--batch-size", "2", "--max-gap", "2", "--quiet", "--threads", "1"]
    assert cli.main(["train", "--data", str(data), "--neg", "1", "--color", "1", "--out", str(tmp_path / "a.pt"),
                     *common]) == 0
    assert labels and not any((lab == 1).any() for lab in labels)
    assert cli.main(["train", "--data", str(data / "s0"), "--out", str(tmp_path / "b.pt"), *common]) == 0
    assert "every pair is positive" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--out", str(tmp_path / "c.pt"), "--neg", "1.5"])
    assert e.value.code == 2 and "not a probability" in capsys.readouterr().err


def test_compare_refuses_a_folder_with_other_sequences(seq_dir, tmp_path, capsys):
    real_root = seq_dir.parent  # holds the sequence "seq", as a real data set would
    before = sorted(p.name for p in real_root.iterdir())
    assert cli.main(["compare", "--data", str(real_root), "--out", str(tmp_path / "cmp"), "--quiet"]) == 2
    _one_error_line(capsys, "holds other files", "seq")
    assert sorted(p.name for p in real_root.iterdir()) == before  # nothing was written into it
    assert not (tmp_path / "cmp").exists()


def test_compare_scores_only_the_sequences_it_generated(tmp_path, monkeypatch):
    """A leftover synth_007 from an earlier, larger run in --data is not scored."""
    data = tmp_path / "synth"
    frames, boxes = synthetic_sequence(SYNTH, seed=99)
    write_otb_sequence(data / "synth_007", frames, boxes)
    monkeypatch.setattr(ModelConfig, "small", classmethod(lambda cls, **kw: cls(**TINY)))
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--data", str(data), "--out", str(out), "--num-sequences", "1", "--frames", "6",
                     "--float-steps", "1", "--hybrid-steps", "1", "--batch-size", "2", "--online-interval", "3",
                     "--online-iterations", "1", "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())["results"]
    for row in res.values():
        assert sorted(row["per_sequence"]) == ["synth_000"]
    assert np.isfinite([row["precision"] for row in res.values()]).all()
