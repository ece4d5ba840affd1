"""Per-attribute results: attribute files (pysot's data set JSON, the OTB toolkit's per-sequence
attrs.txt and attr_list.txt), per-attribute scores, and the tables / JSON / plots that evaluate and
rescore write. Fixtures are generated here; nothing is read from ../shared."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hybridops_tracking import cli
from hybridops_tracking.attributes import (OTB_ATTRIBUTES, AttributeFileError, attribute_groups, load_attributes,
                                           parse_tags, read_attribute_file)
from hybridops_tracking.benchmark import rescore, score_results, write_tracker_results
from hybridops_tracking.checkpoint import save_checkpoint
from hybridops_tracking.data import SynthConfig, load_dataset, synthetic_sequence, write_otb_sequence
from hybridops_tracking.model import ModelConfig, SiamRPNPP

SYNTH = SynthConfig(frames=5, width=96, height=80, target_size=(14, 20))


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machine
    yield
    torch.set_num_threads(n)


def _otb(root, names=("Car", "Dog", "Fish"), multi="Jog"):
    """OTB folders ``names`` plus a two-target folder ``multi`` (groundtruth_rect.1/.2.txt)."""
    for i, name in enumerate(names):
        frames, boxes = synthetic_sequence(SYNTH, seed=20 + i)
        write_otb_sequence(root / name, frames, boxes)
    if multi:
        frames, boxes = synthetic_sequence(SYNTH, seed=30)
        d = write_otb_sequence(root / multi, frames, boxes)
        (d / "groundtruth_rect.txt").rename(d / "groundtruth_rect.1.txt")
        np.savetxt(d / "groundtruth_rect.2.txt", boxes + [4, 2, 0, 0], fmt="%.2f", delimiter=",")
    return root


def _pysot_json(path, attrs):
    """A data set JSON in pysot's layout (video_dir, init_rect, img_names, gt_rect, attr)."""
    js = {name: {"video_dir": name, "init_rect": [1, 2, 3, 4], "img_names": [f"{name}/img/0001.png"],
                 "gt_rect": [[1, 2, 3, 4]], "attr": a} for name, a in attrs.items()}
    path.write_text(json.dumps(js))
    return path


# -- reading attributes --------------------------------------------------------------------------
def test_tags_as_the_toolkits_write_them():
    assert parse_tags("SV, DEF, FM, OPR, BC", "x") == ["SV", "DEF", "FM", "OPR", "BC"]
    assert parse_tags("IV ,SV\n", "x") == ["IV", "SV"]  # OTB's list has 'Car4<TAB>IV ,SV'
    assert parse_tags("SV, OCC, DEF,", "x") == ["SV", "OCC", "DEF"]  # and 'Walking<TAB>SV, OCC, DEF,'
    assert parse_tags("occ; iv occ", "x") == ["OCC", "IV"]
    assert parse_tags("1,0,1,0,0,0,0,0,0,0,1", "x") == ["IV", "OCC", "LR"]  # 11 flags in OTB's order
    assert parse_tags("", "x") == []
    with pytest.raises(AttributeFileError, match="3 0/1 flags"):
        parse_tags("1 0 1", "f")
    with pytest.raises(AttributeFileError, match="not an attribute tag"):
        parse_tags("IV, 3.5", "f")
    assert list(OTB_ATTRIBUTES) == ["IV", "SV", "OCC", "DEF", "MB", "FM", "IPR", "OPR", "OV", "BC", "LR"]


def test_attribute_files_pysot_json_and_attr_list(tmp_path):
    js = _pysot_json(tmp_path / "OTB100.json", {"Car": ["IV", "SV"], "Dog": ["DEF"], "Jogging-1": ["OCC"]})
    assert read_attribute_file(js) == {"Car": ["IV", "SV"], "Dog": ["DEF"], "Jogging-1": ["OCC"]}
    lst = tmp_path / "attr_list.txt"
    lst.write_text("\ufeffBasketball\tIV, OCC, DEF, OPR, BC\nCar4\tIV ,SV\n\nWalking\tSV, OCC, DEF,\n")
    assert read_attribute_file(lst) == {"Basketball": ["IV", "OCC", "DEF", "OPR", "BC"], "Car4": ["IV", "SV"],
                                        "Walking": ["SV", "OCC", "DEF"]}
    bad = tmp_path / "bad.json"
    bad.write_text('{"Car": {"attr": ["IV"]')
    with pytest.raises(AttributeFileError, match="not valid JSON"):
        read_attribute_file(bad)
    bad.write_text(json.dumps({"meta": {"date": 1}, "results": {}}))  # e.g. our own results.json
    with pytest.raises(AttributeFileError, match="no 'attr' lists"):
        read_attribute_file(bad)
    with pytest.raises(AttributeFileError, match="does not exist"):
        read_attribute_file(tmp_path / "missing.json")


def test_where_attributes_come_from(tmp_path):
    """Per sequence: attrs.txt first, then a pysot JSON in the data root (exact, case-insensitive,
    multi-target base name), then attr_list.txt; --attrs replaces them all; other JSON files
    (results.json) are passed over."""
    root = _otb(tmp_path / "OTB")
    (root / "Car" / "attrs.txt").write_text("SV, DEF, FM, OPR, BC")
    _pysot_json(root / "OTB.json", {"Car": ["LR"], "dog": ["IV", "OCC"]})
    (root / "results.json").write_text(json.dumps({"meta": {}, "results": {}}))
    (root / "attr_list.txt").write_text("Jog\tOCC, DEF, OPR\nFish\tIV\n")
    seqs = load_dataset(root, "otb")
    assert [s.name for s in seqs] == ["Car", "Dog", "Fish", "Jog-1", "Jog-2"]
    sources = []
    tags = load_attributes(seqs, root, sources=sources)
    assert tags == {"Car": ["SV", "DEF", "FM", "OPR", "BC"], "Dog": ["IV", "OCC"], "Fish": ["IV"],
                    "Jog-1": ["OCC", "DEF", "OPR"], "Jog-2": ["OCC", "DEF", "OPR"]}
    assert sources == ["1 attrs.txt file", str(root / "OTB.json"), str(root / "attr_list.txt")]
    groups = attribute_groups(tags, [s.name for s in seqs])
    assert list(groups) == ["IV", "SV", "OCC", "DEF", "FM", "OPR", "BC"]  # OTB's order
    assert groups["IV"] == ["Dog", "Fish"] and groups["OCC"] == ["Dog", "Jog-1", "Jog-2"]

    explicit = _pysot_json(tmp_path / "mine.json", {"Car": ["IV"], "Fish": ["XYZ"]})
    assert load_attributes(seqs, root, explicit) == {"Car": ["IV"], "Fish": ["XYZ"]}
    assert list(attribute_groups({"a": ["ZZ", "LR", "AB"]})) == ["LR", "AB", "ZZ"]  # others sorted after OTB's
    with pytest.raises(AttributeFileError, match="names none of the 5 sequences"):
        load_attributes(seqs, root, _pysot_json(tmp_path / "other.json", {"Basketball": ["IV"]}))
    (root / "Dog" / "attrs.txt").write_text("IV, 12")
    with pytest.raises(AttributeFileError, match="Dog/attrs.txt"):
        load_attributes(seqs, root)
    assert load_attributes(load_dataset(_otb(tmp_path / "plain", multi=None), "otb"), tmp_path / "plain") == {}


# -- scores --------------------------------------------------------------------------------------
def test_attribute_scores_equal_scoring_that_subset(tmp_path):
    root = _otb(tmp_path / "OTB", multi=None)
    seqs = load_dataset(root, "otb")
    groups = {"IV": ["Car", "Fish"], "OCC": ["Dog"], "SV": ["Car", "Dog", "Fish"]}
    rng = np.random.default_rng(0)
    boxes = {s.name: s.boxes + rng.normal(0, 6, s.boxes.shape) * [1, 1, 0.3, 0.3] for s in seqs}
    r = score_results(boxes, seqs, groups)
    for a, names in groups.items():
        sub = [s for s in seqs if s.name in names]
        ref = score_results({n: boxes[n] for n in names}, sub)
        got = r["by_attribute"][a]
        assert got["sequences"] == len(names)
        for k in ("precision", "success_auc", "norm_precision"):
            assert got[k] == pytest.approx(ref[k], abs=1e-12), (a, k)
        np.testing.assert_allclose(got["curves"]["success"], ref["curves"]["success"])
    assert r["by_attribute"]["SV"]["success_auc"] == pytest.approx(r["success_auc"])  # every sequence: overall
    assert "by_attribute" not in score_results(boxes, seqs)


# -- rescore / evaluate outputs ------------------------------------------------------------------
def _results(tmp_path, seqs):
    res = tmp_path / "results"
    write_tracker_results(res, "good", {s.name: s.boxes for s in seqs})
    # right on Car only; 40 px off on the others
    write_tracker_results(res, "half", {s.name: s.boxes + ([0, 0, 0, 0] if s.name == "Car" else [40, 0, 0, 0])
                                        for s in seqs})
    return res


def test_rescore_writes_attribute_tables_json_and_plots(tmp_path):
    root = _otb(tmp_path / "OTB", multi=None)
    _pysot_json(root / "OTB.json", {"Car": ["IV", "SV"], "Dog": ["SV", "OCC"], "Fish": ["SV"]})
    seqs = load_dataset(root, "otb")
    res = _results(tmp_path, seqs)
    out = tmp_path / "table"
    assert cli.main(["rescore", str(res), "--data", str(root), "--out", str(out)]) == 0
    js = json.loads((out / "results.json").read_text())
    assert js["attributes"] == {"IV": {"name": "illumination variation", "sequences": ["Car"]},
                                "SV": {"name": "scale variation", "sequences": ["Car", "Dog", "Fish"]},
                                "OCC": {"name": "occlusion", "sequences": ["Dog"]}}
    half = js["results"]["half"]["by_attribute"]
    assert half["IV"]["precision"] == 1.0 and half["OCC"]["precision"] == 0.0
    assert half["SV"]["precision"] == pytest.approx(1 / 3) and half["SV"]["sequences"] == 3
    assert len(half["IV"]["success_curve"]) == 21 and len(half["IV"]["norm_precision_curve"]) == 51
    assert js["results"]["good"]["by_attribute"]["OCC"]["success_auc"] > 0.95
    assert "3 attributes for 3 of 3 sequences" in js["meta"]["attributes"]
    table = (out / "table.md").read_text()
    assert "## Per attribute" in table and "### Success AUC by attribute" in table
    assert "| OCC occlusion (1) | **1.000** | 0.000 |" in table  # precision row, best in bold
    assert "| SV scale variation (3) |" in table
    for a in ("IV", "SV", "OCC"):
        for k in ("success", "precision"):
            assert (out / "attributes" / f"{a}_{k}_plot.png").stat().st_size > 0
            assert f"attributes/{a}_{k}_plot.png" in table

    # Re-scored with fewer attributes: the table and the plots folder follow.
    lst = tmp_path / "attr_list.txt"
    lst.write_text("Car\tIV\n")
    assert cli.main(["rescore", str(res), "--data", str(root), "--out", str(out), "--attrs", str(lst)]) == 0
    assert sorted(p.name for p in (out / "attributes").iterdir()) == ["IV_precision_plot.png", "IV_success_plot.png"]
    assert "SV scale" not in (out / "table.md").read_text()
    assert cli.main(["rescore", str(res), "--data", str(root), "--out", str(out), "--no-attrs"]) == 0
    assert "Per attribute" not in (out / "table.md").read_text() and not list((out / "attributes").iterdir())
    assert "attributes" not in json.loads((out / "results.json").read_text())


def test_bad_attribute_file_is_one_error_line(tmp_path, capsys):
    root = _otb(tmp_path / "OTB", names=("Car",), multi=None)
    seqs = load_dataset(root, "otb")
    res = _results(tmp_path, seqs)
    for text, msg in (('{"Car": [', "not valid JSON"), (json.dumps({"Bolt": {"attr": ["IV"]}}), "names none")):
        (tmp_path / "a.json").write_text(text)
        assert cli.main(["rescore", str(res), "--data", str(root), "--attrs", str(tmp_path / "a.json")]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and msg in err and "Traceback" not in err
    assert cli.main(["rescore", str(res), "--data", str(root), "--attrs", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_evaluate_merges_runs_per_attribute(tmp_path):
    """evaluate scores its own run and the runs already in --out per attribute, from attrs.txt files."""
    root = _otb(tmp_path / "OTB", names=("Car", "Dog"), multi=None)
    (root / "Car" / "attrs.txt").write_text("IV, SV")
    (root / "Dog" / "attrs.txt").write_text("SV")
    seqs = load_dataset(root, "otb")
    out = tmp_path / "runs"
    write_tracker_results(out, "good", {s.name: s.boxes for s in seqs})
    ck = tmp_path / "tiny.pt"
    save_checkpoint(ck, SiamRPNPP(ModelConfig(width=0.125, blocks=(1, 1, 1, 1), neck_channels=16, exemplar_size=63,
                                              instance_size=127)), "float")
    assert cli.main(["evaluate", str(root), "--checkpoint", str(ck), "--out", str(out), "--quiet",
                     "--threads", "1"]) == 0
    js = json.loads((out / "results.json").read_text())
    assert set(js["results"]) == {"good", "tiny"}
    for k in ("good", "tiny"):
        assert set(js["results"][k]["by_attribute"]) == {"IV", "SV"}
        assert js["results"][k]["by_attribute"]["SV"]["success_auc"] == pytest.approx(js["results"][k]["success_auc"],
                                                                                      abs=1e-4)
    assert js["results"]["good"]["by_attribute"]["IV"]["precision"] == 1.0
    assert "| IV illumination variation (1) |" in (out / "table.md").read_text()
    rows = rescore(out, seqs, attributes={"IV": ["Car"]})
    assert rows["tiny"]["by_attribute"]["IV"]["success_auc"] == pytest.approx(
        js["results"]["tiny"]["by_attribute"]["IV"]["success_auc"], abs=1e-4)


def test_evaluate_without_attribute_files_writes_no_attribute_section(tmp_path):
    root = _otb(tmp_path / "plain", names=("Car",), multi=None)
    ck = tmp_path / "tiny.pt"
    save_checkpoint(ck, SiamRPNPP(ModelConfig(width=0.125, blocks=(1, 1, 1, 1), neck_channels=16, exemplar_size=63,
                                              instance_size=127)), "float")
    out = tmp_path / "runs"
    assert cli.main(["evaluate", str(root), "--checkpoint", str(ck), "--out", str(out), "--quiet",
                     "--threads", "1"]) == 0
    js = json.loads((out / "results.json").read_text())
    assert "attributes" not in js and "by_attribute" not in js["results"]["tiny"]
    assert "Per attribute" not in (out / "table.md").read_text() and not (out / "attributes").exists()
