"""TransT tracker tests: the model (shapes, template/track, sine encodings, the dilated ResNet),
the import of TransT's released checkpoints (``ltr`` training files), the per-cell targets and
loss against TransT's own rules, the pair sampler, hybridisation / deployment / checkpoints, the
tracking loop with its online update, and the CLI end to end."""
from __future__ import annotations

import json
import math
import pickle
import sys
import types
import warnings
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou

import hybridops as ho
from hybridops.attention import HybridMultiheadAttention
from hybridops_tracking import cli, hybrid
from hybridops_tracking.benchmark import make_tracker
from hybridops_tracking.checkpoint import (CheckpointError, ForeignObject, load_checkpoint, read_checkpoint,
                                           save_checkpoint)
from hybridops_tracking.data import SynthConfig, synthetic_sequence, write_otb_sequence
from hybridops_tracking.model import ModelConfig, SiamRPNPP
from hybridops_tracking.targets import transt_cls_loss, transt_loss, transt_positions, transt_targets
from hybridops_tracking.tracker import OnlineConfig, SiamRPNTracker, TrackParams
from hybridops_tracking.train import PairSampler, TrainConfig, train
from hybridops_tracking.transt import ResNet50Layer3, TransT, TransTConfig, sine_position_encoding
from hybridops_tracking.transt_import import (config_from_state_dict, is_transt_state_dict, ours_to_transt,
                                              transt_to_ours)
from hybridops_tracking.transt_tracker import TransTParams, TransTTracker

# head_dim 8: the quantized attention products need a multiple of 8.
TINY = dict(width=0.125, blocks=(1, 1, 1), hidden_dim=32, heads=4, fusion_layers=1, dim_feedforward=64,
            exemplar_size=32, instance_size=64)
SYNTH = SynthConfig(frames=10, width=96, height=80, target_size=(14, 20))
ONLINE = OnlineConfig(interval=3, iterations=2, window=4, lr=0.5)


@pytest.fixture(scope="module", autouse=True)
def _fast_cpu():
    # The hybrid layers produce subnormal floats, which x86 handles in microcode; flushing them
    # keeps these tests fast. One thread: these tiny layers gain nothing from two on a shared box.
    # Module scope, so that it is in force while the module-scoped models calibrate and train.
    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


def _inputs(cfg: TransTConfig, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, cfg.exemplar_size, cfg.exemplar_size, generator=g) * 255,
            torch.rand(b, 3, cfg.instance_size, cfg.instance_size, generator=g) * 255)


def _search_side(w, h, factor=4.0):
    """TransT's crop side around a w x h target, written out (not TransTConfig.crop_sides)."""
    p = (w + h) / 2
    return math.sqrt((w + (factor - 1) * p) * (h + (factor - 1) * p))


@pytest.fixture(scope="module")
def cfg():
    return TransTConfig(**TINY)


@pytest.fixture(scope="module")
def float_model(cfg):
    torch.manual_seed(0)
    return TransT(cfg).eval()


@pytest.fixture(scope="module")
def hybrid_model(float_model, cfg):
    """The tiny TransT converted (scope "all") and trained two steps, so the quantizer intervals and
    both branches have moved from their calibrated values."""
    m = hybrid.clone(float_model)
    hybrid.hybridize_tracker(m, "hybrid", example_inputs=_inputs(cfg, 4))
    torch.manual_seed(1)
    tc = TrainConfig(steps=2, batch_size=2, num_sequences=2, seq_frames=6, lr=1e-3, synth=SYNTH)
    train(m, tc, regularizer=lambda mod: hybrid.regularization(mod, 1e-3, 1e-5), progress=False)
    return m.eval()


@pytest.fixture(scope="module")
def frames():
    return synthetic_sequence(SYNTH, seed=2)


# -- model ----------------------------------------------------------------------------------------
def test_forward_shapes_and_box_range(float_model, cfg):
    z, x = _inputs(cfg, 2)
    with torch.no_grad():
        out = float_model(z, x)
    hw = cfg.score_size ** 2
    assert set(out) == {"logits", "boxes"}
    assert out["logits"].shape == (2, hw, 2) and out["boxes"].shape == (2, hw, 4)
    assert torch.isfinite(out["logits"]).all()
    assert (out["boxes"] >= 0).all() and (out["boxes"] <= 1).all()
    # the two images of the batch are not mixed: each row depends on its own pair only
    with torch.no_grad():
        single = float_model(z[1:], x[1:])
    torch.testing.assert_close(single["logits"][0], out["logits"][1], rtol=1e-5, atol=1e-5)


def test_track_after_template_equals_forward(cfg):
    torch.manual_seed(3)
    model = TransT(cfg).eval()
    z, x = _inputs(cfg, 1, seed=4)
    with pytest.raises(RuntimeError, match="template"):
        model.track(x)
    with torch.no_grad():
        ref = model(z, x)
    model.template(z)
    out = model.track(x)
    assert set(out) == {"logits", "boxes", "cls_hidden"}
    torch.testing.assert_close(out["logits"], ref["logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out["boxes"], ref["boxes"], rtol=0, atol=1e-6)
    assert out["cls_hidden"].shape == (1, cfg.score_size ** 2, cfg.hidden_dim)
    with torch.no_grad():
        torch.testing.assert_close(model.class_embed.layers[-1](out["cls_hidden"]), out["logits"], rtol=0, atol=1e-6)
        torch.testing.assert_close(model.cls_from_hidden([out["cls_hidden"]]), out["logits"], rtol=0, atol=1e-6)
    # another template changes the prediction on the same search crop
    model.template(z.flip(2))
    assert not torch.allclose(model.track(x)["logits"], out["logits"])
    # clone drops the cached template from the copy (it must be given its own), not from the model
    with pytest.raises(RuntimeError):
        hybrid.clone(model).track(x)
    assert model.zf is not None and torch.equal(model.track(x)["logits"], model.track(x)["logits"])


@pytest.mark.parametrize("overrides, needle", [
    (dict(exemplar_size=36), "exemplar_size"),
    (dict(instance_size=60), "instance_size"),
    (dict(exemplar_size=8, instance_size=64), "exemplar_size"),
    (dict(exemplar_size=64, instance_size=64), "smaller"),
    (dict(hidden_dim=30, heads=4), "divisible"),
    (dict(hidden_dim=36, heads=8), "divisible"),
    (dict(hidden_dim=18, heads=2), "multiple of 4"),
    (dict(blocks=(1, 1)), "blocks"),
    (dict(blocks=(1, 1, 1, 1)), "blocks"),
    (dict(blocks=(1, 0, 1)), "blocks"),
    (dict(fusion_layers=0), "fusion_layers"),
    (dict(width=0.03), "width"),
    (dict(template_factor=4.0, search_factor=4.0), "template_factor"),
])
def test_config_validation(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        TransTConfig(**{**TINY, **overrides})


def test_config_geometry():
    c = TransTConfig()
    assert (c.template_feature, c.score_size, c.backbone_channels) == (16, 32, 1024)
    s = TransTConfig.small()
    assert (s.exemplar_size, s.instance_size, s.score_size, s.backbone_channels) == (64, 128, 16, 256)
    assert s.hidden_dim % s.heads == 0 and (s.hidden_dim // s.heads) % 8 == 0
    z, x = c.crop_sides(30.0, 20.0)
    assert z == pytest.approx(_search_side(30, 20, 2.0)) and x == pytest.approx(_search_side(30, 20, 4.0))
    assert TransTConfig(**{**TINY, "blocks": [2, 1, 3]}).to_dict()["blocks"] == [2, 1, 3]


def _reference_sine(size: int, channels: int, temperature: float = 10000.0) -> np.ndarray:
    """DETR's PositionEmbeddingSine(channels / 2, normalize=True) on an unpadded map, with loops."""
    half = channels // 2
    out = np.zeros((channels, size, size))
    for r in range(size):
        for c in range(size):
            for i in range(half):
                dim_t = temperature ** (2 * (i // 2) / half)
                for offset, k in ((0, r + 1), (half, c + 1)):  # rows first, then columns
                    v = k / (size + 1e-6) * 2 * math.pi / dim_t
                    out[offset + i, r, c] = math.sin(v) if i % 2 == 0 else math.cos(v)
    return out


@pytest.mark.parametrize("size, channels", [(4, 8), (5, 12), (8, 32)])
def test_sine_position_encoding(size, channels):
    pe = sine_position_encoding(size, channels)
    assert pe.shape == (channels, size, size) and pe.dtype == torch.float32
    np.testing.assert_allclose(pe.numpy(), _reference_sine(size, channels), rtol=0, atol=1e-5)
    half = channels // 2
    # the first half depends on the row only, the second on the column only
    assert torch.equal(pe[:half], pe[:half, :, :1].expand(half, size, size))
    assert torch.equal(pe[half:], pe[half:, :1, :].expand(half, size, size))
    assert not torch.equal(pe[:half, 0], pe[:half, -1]) and not torch.equal(pe[half:, :, 0], pe[half:, :, -1])
    assert pe.abs().max() <= 1
    assert float(pe[0, 0, 0]) == pytest.approx(math.sin(2 * math.pi / (size + 1e-6)), abs=1e-6)
    assert float(pe[1, 0, 0]) == pytest.approx(math.cos(2 * math.pi / (size + 1e-6)), abs=1e-6)
    assert float(pe[half, 0, size - 1]) == pytest.approx(math.sin(size * 2 * math.pi / (size + 1e-6)), abs=1e-5)


def test_model_position_buffers(float_model, cfg):
    """The encodings the fusion network adds: (L, 1, C) sequences of the feature maps, row-major."""
    pz, px = float_model.pos_template, float_model.pos_search
    assert pz.shape == (cfg.template_feature ** 2, 1, cfg.hidden_dim)
    assert px.shape == (cfg.score_size ** 2, 1, cfg.hidden_dim)
    ref = sine_position_encoding(cfg.score_size, cfg.hidden_dim)
    r, c = 2, 5
    torch.testing.assert_close(px[r * cfg.score_size + c, 0], ref[:, r, c])
    assert "pos_search" not in float_model.state_dict()  # constants, not checkpoint tensors


def test_backbone_stride_channels_and_dilation():
    width = 0.125
    net = ResNet50Layer3(width, (1, 2, 3)).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 3, 64, 80) * 255)
    assert out.shape == (1, int(1024 * width), 8, 10)
    l3 = net.layer3
    assert len(l3) == 3 and len(net.layer2) == 2 and len(net.layer1) == 1
    assert l3[0].conv2.dilation == (2, 2) and l3[0].conv2.padding == (2, 2)
    assert all(b.conv2.dilation == (1, 1) and b.conv2.padding == (1, 1) for b in l3[1:])
    assert all(b.conv2.stride == (1, 1) for b in l3)
    assert l3[0].downsample[0].stride == (1, 1) and l3[0].downsample[0].kernel_size == (1, 1)
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv2.dilation == (1, 1)
    assert net.conv1.out_channels == 8 and net.conv1.stride == (2, 2)


# -- TransT checkpoint import ---------------------------------------------------------------------
# Released TransT: heads 8; the importer assumes 8 heads and 128 / 256 crops (not in the tensors).
IMPORT = dict(width=0.125, blocks=(1, 1, 1), hidden_dim=64, heads=8, fusion_layers=1, dim_feedforward=64)


@pytest.fixture(scope="module")
def import_model():
    torch.manual_seed(5)
    m = TransT(TransTConfig(**IMPORT))
    # non-trivial BN statistics, so a lost buffer would show in the outputs
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


_LTR = ("ltr", "ltr.admin", "ltr.admin.model_constructor")


def _save_ltr_checkpoint(path, net_state_dict, **save_kwargs):
    """A file as TransT's ltr framework writes it: the network's state_dict under "net" next to a
    pickled ``ltr.admin.model_constructor.NetConstructor``, whose module is gone when it is read."""
    mods = {name: types.ModuleType(name) for name in _LTR}
    ctor_mod = mods["ltr.admin.model_constructor"]

    class NetConstructor:
        def __init__(self, fun_name, fun_module, args, kwds):
            self.fun_name, self.fun_module, self.args, self.kwds = fun_name, fun_module, args, kwds

    NetConstructor.__module__ = ctor_mod.__name__
    NetConstructor.__qualname__ = "NetConstructor"
    ctor_mod.NetConstructor = NetConstructor
    assert not any(name in sys.modules for name in _LTR)
    sys.modules.update(mods)
    try:
        ctor = NetConstructor("transt_resnet50", "ltr.models.tracking.transt", (), {"settings": None})
        torch.save({"net": net_state_dict, "constructor": ctor, "net_type": "TransT", "epoch": 3,
                    "stats": {"loss": [1.0, 0.5]}}, path, **save_kwargs)
    finally:
        for name in _LTR:
            del sys.modules[name]
    return path


def test_import_ltr_checkpoint_outputs_equal(import_model, tmp_path):
    path = _save_ltr_checkpoint(tmp_path / "transt.pth", ours_to_transt(import_model.state_dict()))
    with pytest.raises(Exception):  # the file really names a class the weights-only loader refuses
        torch.load(path, map_location="cpu", weights_only=True)
    raw = read_checkpoint(path)
    assert raw["epoch"] == 3 and "ltr" not in sys.modules
    assert isinstance(raw["constructor"], ForeignObject)  # inert: nothing of ltr was imported or run
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(raw["constructor"])
    assert is_transt_state_dict(raw)
    loaded = load_checkpoint(path)
    assert isinstance(loaded, TransT) and not loaded.training
    assert loaded.variant == "float" and loaded.deployed is False
    assert loaded.config.heads == 8 and loaded.config.width == 0.125
    z, x = _inputs(loaded.config, 1, seed=6)
    with torch.no_grad():
        ref, out = import_model(z, x), loaded(z, x)
    assert torch.equal(out["logits"], ref["logits"]) and torch.equal(out["boxes"], ref["boxes"])
    ours = import_model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_foreign_functions_are_read_inert(tmp_path, zip_format):
    """A pickled function (here the builtin ``print`` and ``shutil.rmtree``) is read as the inert
    class, never as the function, in both file formats."""
    import shutil

    path = tmp_path / "f.pth"
    torch.save({"net": {"a": torch.ones(1)}, "hook": print, "clean": shutil.rmtree}, path,
               _use_new_zipfile_serialization=zip_format)
    raw = read_checkpoint(path)
    assert raw["hook"] is ForeignObject and raw["clean"] is ForeignObject
    assert isinstance(raw["clean"]("/"), ForeignObject) and tmp_path.exists()  # calling it does nothing


def test_foreign_object_in_our_checkpoint_is_one_error(float_model, tmp_path):
    path = save_checkpoint(tmp_path / "f.pt", float_model)
    raw = torch.load(path, weights_only=True)
    import shutil

    raw["model_config"]["width"] = shutil.rmtree
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="model_config holds an object of another framework"):
        load_checkpoint(path)


def test_import_legacy_format_ltr_checkpoint(import_model, tmp_path):
    """TransT was trained with PyTorch 1.5 (its README), whose torch.save wrote the legacy, non-zip
    format; such an ltr file with its pickled constructor must load too."""
    path = _save_ltr_checkpoint(tmp_path / "transt_legacy.pth", ours_to_transt(import_model.state_dict()),
                                _use_new_zipfile_serialization=False)
    loaded = load_checkpoint(path)
    z, x = _inputs(loaded.config, 1, seed=6)
    with torch.no_grad():
        assert torch.equal(loaded(z, x)["logits"], import_model(z, x)["logits"])


def test_import_bare_state_dict_with_module_prefix(import_model, tmp_path):
    sd = {"module." + k: v for k, v in ours_to_transt(import_model.state_dict()).items()}
    assert any(k.startswith("module.backbone.0.body.layer3.0.conv2") for k in sd)
    torch.save(sd, tmp_path / "bare.pth")
    loaded = load_checkpoint(tmp_path / "bare.pth")
    z, x = _inputs(loaded.config, 1, seed=7)
    with torch.no_grad():
        assert torch.equal(loaded(z, x)["logits"], import_model(z, x)["logits"])
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pth")
    assert isinstance(load_checkpoint(tmp_path / "wrapped.pth"), TransT)


def test_key_mapping_round_trip(import_model):
    sd = import_model.state_dict()
    theirs = ours_to_transt(sd)
    assert "backbone.0.body.conv1.weight" in theirs and "backbone.conv1.weight" not in theirs
    assert "featurefusion_network.decoder.norm.weight" in theirs and "class_embed.layers.2.bias" in theirs
    back = transt_to_ours({"net": theirs})
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)
    assert not is_transt_state_dict(sd)  # ours (backbone.*) is not TransT's layout
    assert not is_transt_state_dict(SiamRPNPP(ModelConfig(width=0.125, blocks=(1, 1, 1, 1), neck_channels=16,
                                                           exemplar_size=63, instance_size=127)).state_dict())


@pytest.mark.parametrize("config", [
    dict(width=0.125, blocks=(1, 2, 3), hidden_dim=32, heads=4, fusion_layers=2, dim_feedforward=48),
    dict(width=0.25, blocks=(2, 1, 1), hidden_dim=64, heads=8, fusion_layers=3, dim_feedforward=96),
])
def test_config_from_state_dict(config):
    sd = TransT(TransTConfig(**config)).state_dict()
    got = config_from_state_dict(sd, heads=config["heads"])
    for k, v in config.items():
        assert getattr(got, k) == v, (k, getattr(got, k), v)
    assert (got.exemplar_size, got.instance_size) == (128, 256)


def test_import_unknown_or_missing_keys_raise(import_model, tmp_path):
    theirs = ours_to_transt(import_model.state_dict())
    extra = {**theirs, "transformer.foo": torch.zeros(3)}
    with pytest.raises(CheckpointError, match="'transformer.foo' has no counterpart"):
        transt_to_ours(extra)
    torch.save({"net": extra}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="transformer.foo") as e:
        load_checkpoint(tmp_path / "extra.pth")
    assert str(tmp_path / "extra.pth") in str(e.value)
    # a tensor the shapes are read from
    gone = {k: v for k, v in theirs.items() if k != "input_proj.weight"}
    torch.save({"net": gone}, tmp_path / "no_proj.pth")
    with pytest.raises(CheckpointError, match="input_proj.weight.*not a complete TransT"):
        load_checkpoint(tmp_path / "no_proj.pth")
    gone = {k: v for k, v in theirs.items() if k != "backbone.0.body.layer2.0.conv1.weight"}
    torch.save({"net": gone}, tmp_path / "no_layer2.pth")
    with pytest.raises(CheckpointError, match=r"'backbone\.0\.body\.layer2\.0\.conv1\.weight'"):
        load_checkpoint(tmp_path / "no_layer2.pth")
    # any other tensor
    gone = {k: v for k, v in theirs.items() if k != "featurefusion_network.decoder.norm.weight"}
    torch.save({"net": gone}, tmp_path / "no_norm.pth")
    with pytest.raises(CheckpointError, match="missing.*featurefusion_network.decoder.norm.weight"):
        load_checkpoint(tmp_path / "no_norm.pth")
    # a tensor of the wrong shape
    bad = {**theirs, "bbox_embed.layers.0.weight": torch.zeros(3, 3)}
    torch.save({"net": bad}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(tmp_path / "shape.pth")
    # BN counters are optional
    torch.save({"net": {k: v for k, v in theirs.items() if not k.endswith("num_batches_tracked")}},
               tmp_path / "no_counters.pth")
    assert isinstance(load_checkpoint(tmp_path / "no_counters.pth"), TransT)


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture
def seq_dir(tmp_path):
    frames, boxes = synthetic_sequence(SynthConfig(frames=4, width=96, height=80, target_size=(14, 20)), seed=3)
    return write_otb_sequence(tmp_path / "data" / "seq", frames, boxes)


def test_cli_bad_transt_file_and_deploying_float_transt(import_model, float_model, seq_dir, tmp_path, capsys):
    bad = tmp_path / "transt.pth"
    _save_ltr_checkpoint(bad, {**ours_to_transt(import_model.state_dict()), "transformer.foo": torch.zeros(1)})
    out = str(tmp_path / "runs")
    assert cli.main(["evaluate", str(seq_dir.parent), "--checkpoint", str(bad), "--out", out, "--quiet"]) == 2
    _one_error_line(capsys, str(bad), "transformer.foo")
    good = _save_ltr_checkpoint(tmp_path / "good.pth", ours_to_transt(import_model.state_dict()))
    assert cli.main(["evaluate", str(seq_dir.parent), "--checkpoint", str(good), "--deploy", "--out", out,
                     "--quiet"]) == 2
    _one_error_line(capsys, str(good), "float checkpoint")
    with pytest.raises(CheckpointError, match="float checkpoint"):
        load_checkpoint(save_checkpoint(tmp_path / "f.pt", float_model), deploy=True)


# -- targets and loss -----------------------------------------------------------------------------
def _matcher_cells(box, size):
    """TransT's matcher (ltr/models/loss/matcher.py): Xmin = ceil(x0 S), Xmax = ceil(x1 S), +1
    if equal, rows likewise, cells b[Ymin:Ymax, Xmin:Xmax] of the row-major grid; restricted to
    the grid for a box over the crop's border, and where that leaves no column (row), the grid's
    nearest one: never empty (TransT's own slicing gives no cell there, e.g. for a thin box in the
    last cell, whose ceil pushes Xmin to S)."""
    cx, cy, w, h = (float(v) for v in box)
    x0, x1 = math.ceil((cx - w / 2) * size), math.ceil((cx + w / 2) * size)
    y0, y1 = math.ceil((cy - h / 2) * size), math.ceil((cy + h / 2) * size)
    if x0 == x1:
        x1 += 1
    if y0 == y1:
        y1 += 1
    cols = [x for x in range(x0, x1) if 0 <= x < size] or [min(max(x0, 0), size - 1)]
    rows = [y for y in range(y0, y1) if 0 <= y < size] or [min(max(y0, 0), size - 1)]
    return [y * size + x for y in rows for x in cols]


def test_transt_positions_match_transt_matcher_inside_the_crop():
    g = torch.Generator().manual_seed(0)
    for size in (8, 16, 5):
        for _ in range(200):
            wh = torch.rand(2, generator=g) * 0.6 + 0.01
            c = wh / 2 + torch.rand(2, generator=g) * (1 - wh)
            box = torch.cat([c, wh])
            got = transt_positions(box, size)
            assert got.dtype == torch.int64
            assert got.tolist() == _matcher_cells(box, size), (box, size)
    # cell boundaries exactly on the box edges: [0.25, 0.75) of 8 cells is columns 2..5
    assert transt_positions(torch.tensor([0.5, 0.5, 0.5, 0.5]), 8).tolist() == \
        [r * 8 + c for r in range(2, 6) for c in range(2, 6)]


@pytest.mark.parametrize("box, expected", [
    # TransT's ceil names the cell after the one holding a box edge: x in (4.2, 4.28) cells -> column 5
    ([0.53, 0.47, 0.01, 0.01], [4 * 8 + 5]),          # inside one cell: one cell
    ([0.5, 0.5, 1e-4, 1e-4], [4 * 8 + 4]),             # centre on a cell corner
    ([0.0625, 0.0625, 0.125, 0.125], [0]),           # exactly the top-left cell
    ([0.5, 0.5, 0.25, 0.5], [r * 8 + c for r in range(2, 6) for c in range(3, 5)]),  # edges on cell borders
    ([0.9, 0.5, 0.2, 0.125], [4 * 8 + 7]),           # touching the right border
    ([0.97, 0.53, 0.02, 0.02], [5 * 8 + 7]),         # thin box in the last column: TransT's slice is empty
])
def test_transt_positions_small_and_border_boxes(box, expected):
    got = transt_positions(torch.tensor(box), 8).tolist()
    assert got == expected == _matcher_cells(box, 8)


@pytest.mark.parametrize("box", [
    [0.05, 0.5, 0.3, 0.2],     # over the left border
    [1.0, 1.0, 0.4, 0.4],      # centred on the bottom-right corner
    [0.5, -0.05, 0.2, 0.3],    # over the top border
    [0.5, 0.5, 1.6, 1.4],      # larger than the crop: every cell
])
def test_transt_positions_over_the_border_are_clipped(box):
    got = transt_positions(torch.tensor(box), 8).tolist()
    assert got and got == _matcher_cells(box, 8)
    assert min(got) >= 0 and max(got) < 64


@pytest.mark.parametrize("box", [[1.3, 0.5, 0.2, 0.2], [-0.4, -0.4, 0.1, 0.1]])
def test_transt_positions_never_empty(box):
    got = transt_positions(torch.tensor(box), 8)
    assert got.numel() >= 1 and 0 <= int(got.min()) and int(got.max()) < 64


def test_transt_targets():
    size, inst = 8, 64
    gt = torch.tensor([6.0, -10.0, 20.0, 12.0])  # crop pixels, relative to the centre
    label, box = transt_targets(gt, size, inst)
    torch.testing.assert_close(box, torch.tensor([0.5 + 6 / 64, 0.5 - 10 / 64, 20 / 64, 12 / 64]))
    assert label.shape == (64,) and label.dtype == torch.int64
    pos = _matcher_cells(box, size)
    assert sorted(torch.nonzero(label == 0).flatten().tolist()) == pos and len(pos) >= 1
    assert ((label == 0) | (label == 1)).all() and int((label == 1).sum()) == 64 - len(pos)
    neg_label, neg_box = transt_targets(gt, size, inst, negative=True)
    assert (neg_label == 1).all()
    torch.testing.assert_close(neg_box, box)


def _hand_loss(logits, boxes, label, box):
    """TransT's SetCriterion, written out: weighted CE (mean over weights), then L1 and 1 - GIoU summed
    over the target cells and divided by their number."""
    w = torch.tensor([1.0, 0.0625])
    logp = F.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, label[..., None])[..., 0]
    ce = (w[label] * nll).sum() / w[label].sum()
    b, cell = torch.nonzero(label == 0, as_tuple=True)
    num = max(len(b), 1)
    l1 = giou = torch.zeros(())
    for i, j in zip(b.tolist(), cell.tolist()):
        p, t = boxes[i, j], box[i]
        l1 = l1 + (p - t).abs().sum()
        g = generalized_box_iou(box_convert(p[None], "cxcywh", "xyxy"), box_convert(t[None], "cxcywh", "xyxy"))
        giou = giou + (1 - g[0, 0])
    return 8.334 * ce, 5.0 * l1 / num + 2.0 * giou / num


def test_transt_loss_matches_hand_computation_and_backprops():
    g = torch.Generator().manual_seed(1)
    size = 8
    logits = torch.randn(3, size * size, 2, generator=g, requires_grad=True)
    boxes = torch.rand(3, size * size, 4, generator=g).mul(0.5).add(0.2).requires_grad_()
    gts = [torch.tensor([0.0, 0.0, 20.0, 14.0]), torch.tensor([-9.0, 4.0, 8.0, 30.0]),
           torch.tensor([1.0, 2.0, 3.0, 2.0])]
    label, box = (torch.stack(t) for t in zip(*(transt_targets(gt, size, 64) for gt in gts)))
    loss, parts = transt_loss({"logits": logits, "boxes": boxes}, label, box)
    ce, loc = _hand_loss(logits.detach(), boxes.detach(), label, box)
    assert parts["cls"] == pytest.approx(float(ce), rel=1e-5)
    assert parts["loc"] == pytest.approx(float(loc), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(ce + loc), rel=1e-5)
    # F.cross_entropy's weighted mean is what transt_cls_loss computes
    ref_ce = F.cross_entropy(logits.detach().transpose(1, 2), label, weight=torch.tensor([1.0, 0.0625]))
    assert float(transt_cls_loss(logits.detach(), label)) == pytest.approx(float(ref_ce), rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert torch.isfinite(boxes.grad).all()
    pos = (label == 0)
    assert (boxes.grad[pos].abs().sum(-1) > 0).all()
    assert (boxes.grad[~pos] == 0).all()  # box terms only on the target cells


def test_transt_loss_without_positive_cells():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 64, 2, generator=g, requires_grad=True)
    boxes = torch.rand(2, 64, 4, generator=g, requires_grad=True)
    label = torch.ones(2, 64, dtype=torch.long)
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2)
    loss, parts = transt_loss({"logits": logits, "boxes": boxes}, label, box)
    assert parts["loc"] == 0.0 and math.isfinite(parts["cls"]) and parts["cls"] > 0
    ce, loc = _hand_loss(logits.detach(), boxes.detach(), label, box)
    assert float(loss.detach()) == pytest.approx(float(ce), rel=1e-5) and float(loc) == 0
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert boxes.grad is None or (boxes.grad == 0).all()


# -- pair sampling and training -------------------------------------------------------------------
def test_pair_sampler_for_transt(float_model, cfg):
    tc = TrainConfig(shift=0.0, scale=0.0, neg=0.0, num_sequences=2, seq_frames=6, max_gap=3, synth=SYNTH, seed=4)
    sampler = PairSampler.for_model(float_model, tc)
    assert sampler.anchors is None
    z, x, label, box = sampler.sample(5)
    s = cfg.score_size
    assert z.shape == (5, 3, cfg.exemplar_size, cfg.exemplar_size)
    assert x.shape == (5, 3, cfg.instance_size, cfg.instance_size)
    assert label.shape == (5, s * s) and label.dtype == torch.int64 and box.shape == (5, 4)
    assert float(z.min()) >= 0 and float(z.max()) <= 255 and float(x.max()) > 1
    torch.testing.assert_close(box[:, :2], torch.full((5, 2), 0.5), rtol=0, atol=1e-6)
    # the target's size relative to the search crop, for some frame of the pool (scale 0: no jitter)
    synth = SynthConfig(**{**asdict(SYNTH), "frames": tc.seq_frames})
    pool = np.concatenate([synthetic_sequence(synth, tc.seed + i)[1] for i in range(tc.num_sequences)])
    expected = np.array([[w / _search_side(w, h), h / _search_side(w, h)] for w, h in pool[:, 2:]])
    for b in range(5):
        err = np.abs(expected - box[b, 2:].numpy()).max(axis=1)
        assert err.min() < 1e-5, (box[b], expected)
        lab, _ = transt_targets(torch.tensor([0.0, 0.0, *(box[b, 2:] * cfg.instance_size)]), s, cfg.instance_size)
        assert torch.equal(label[b], lab)
        assert int((label[b] == 0).sum()) >= 1


def test_pair_sampler_scale_jitter_and_negatives(float_model, cfg):
    tc = TrainConfig(shift=0.25, scale=0.18, neg=1.0, num_sequences=2, seq_frames=6, synth=SYNTH, seed=5)
    z, x, label, box = PairSampler.for_model(float_model, tc).sample(4)
    assert (label == 1).all()  # negative pairs: no target cell
    assert ((box[:, :2] - 0.5).abs() <= 0.25 + 1e-6).all()
    assert not torch.allclose(box[:, :2], torch.full((4, 2), 0.5))


def test_train_two_steps(cfg):
    torch.manual_seed(7)
    model = TransT(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tc = TrainConfig(steps=2, batch_size=2, num_sequences=2, seq_frames=6, synth=SYNTH, lr=1e-3)
    logs = train(model, tc, progress=False)
    assert len(logs) == 2
    for log in logs:
        assert {"loss", "cls", "loc", "reg"} <= set(log)
        assert all(math.isfinite(log[k]) for k in ("loss", "cls", "loc"))
        assert log["cls"] > 0 and log["reg"] == 0.0
        assert log["loss"] == pytest.approx(log["cls"] + log["loc"], rel=1e-5)
    assert not model.training
    after = model.state_dict()
    assert not torch.equal(after["class_embed.layers.2.weight"], before["class_embed.layers.2.weight"])
    assert not torch.equal(after["featurefusion_network.encoder.layers.0.self_attn1.in_proj_weight"],
                           before["featurefusion_network.encoder.layers.0.self_attn1.in_proj_weight"])


# -- hybrid ---------------------------------------------------------------------------------------
def _plain_layers(model):
    return {n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}


def test_hybridize_scope_all(float_model, hybrid_model):
    mha = [n for n, m in float_model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(mha) == 4 * TINY["fusion_layers"] + 1
    expected = (_plain_layers(float_model) - {"backbone.conv1"}) | \
        {f"{n}.{p}_proj" for n in mha for p in ("q", "k", "v", "out")}
    hybrid_names = {n for n, m in hybrid_model.named_modules() if isinstance(m, (ho.HybridConv2d, ho.HybridLinear))}
    assert hybrid_names == expected
    assert _plain_layers(hybrid_model) == {"backbone.conv1"}
    assert not any(isinstance(m, nn.MultiheadAttention) for m in hybrid_model.modules())
    rewritten = {n: m for n, m in hybrid_model.named_modules() if isinstance(m, HybridMultiheadAttention)}
    assert sorted(rewritten) == sorted(mha)
    for n, m in rewritten.items():
        assert m.attention.quantized and m.attention.bits == 6, n
        assert m.attention.calibrated, n
    assert "class_embed.layers.2" in hybrid_names and "input_proj" in hybrid_names


def test_hybridize_scope_backbone(float_model, cfg):
    m = hybrid.clone(float_model)
    report = hybrid.hybridize_tracker(m, "hybrid", example_inputs=_inputs(cfg, 2), scope="backbone")
    names = {n for n, mod in m.named_modules() if isinstance(mod, (ho.HybridConv2d, ho.HybridLinear))}
    assert names == {n for n in _plain_layers(float_model) if n.startswith("backbone.") and n != "backbone.conv1"} \
        | {"class_embed.layers.2"}
    assert len(report.converted) == len(names)
    assert sum(isinstance(mod, nn.MultiheadAttention) for mod in m.modules()) == 4 * TINY["fusion_layers"] + 1


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_deploy_matches_hybrid(hybrid_model, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a torch.fx trace that fails and leaves the BatchNorms unfused
        deployed = hybrid.deploy(hybrid.clone(hybrid_model))
    assert isinstance(deployed.backbone.layer1[0].bn1, nn.Identity)  # fused into the integer conv
    ffn = deployed.featurefusion_network.encoder.layers[0]  # each FFN's ReLU moved into its first Linear
    assert ffn.linear11.relu and ffn.linear21.relu and isinstance(ffn.activation1, nn.Identity)
    assert deployed.featurefusion_network.decoder.layers[0].linear1.relu
    products = [m.attention for m in deployed.modules() if isinstance(m, HybridMultiheadAttention)]
    assert products and all(a.quantized and a.backend != "auto" for a in products)
    kinds = {type(m) for m in deployed.modules()}
    assert ho.DeployedConv2d in kinds and ho.DeployedLinear in kinds
    assert not any(isinstance(m, (ho.HybridConv2d, ho.HybridLinear)) for m in deployed.modules())
    assert isinstance(deployed.class_embed.layers[2], ho.DeployedLinear)
    z, x = _inputs(cfg, 2, seed=8)
    with torch.no_grad():
        ref, out = hybrid_model(z, x), deployed(z, x)
    for k in ("logits", "boxes"):
        assert _rel(out[k], ref[k]) < 1e-5, (k, _rel(out[k], ref[k]))
    deployed.template(z[:1])
    torch.testing.assert_close(deployed.track(x[:1])["logits"], out["logits"][:1], rtol=1e-5, atol=1e-5)


def test_hybrid_checkpoint_round_trip(hybrid_model, cfg, tmp_path):
    path = save_checkpoint(tmp_path / "h.pt", hybrid.clone(hybrid_model), "hybrid")
    raw = read_checkpoint(path)
    assert raw["arch"] == "transt" and raw["scope"] == "all" and raw["variant"] == "hybrid"
    assert raw["model_config"]["blocks"] == [1, 1, 1] and raw["model_config"]["heads"] == 4
    loaded = load_checkpoint(path)
    assert isinstance(loaded, TransT) and loaded.variant == "hybrid" and not loaded.training
    a, b = hybrid_model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
    z, x = _inputs(cfg, 2, seed=9)
    with torch.no_grad():
        ref, out = hybrid_model(z, x), loaded(z, x)
    assert torch.equal(out["logits"], ref["logits"]) and torch.equal(out["boxes"], ref["boxes"])
    dep = load_checkpoint(path, deploy=True)
    assert dep.deployed and isinstance(dep.class_embed.layers[2], ho.DeployedLinear)
    with torch.no_grad():
        d = dep(z, x)
    assert _rel(d["logits"], ref["logits"]) < 1e-5 and _rel(d["boxes"], ref["boxes"]) < 1e-5


# -- tracker --------------------------------------------------------------------------------------
def test_tracker_on_synthetic_sequence(float_model, frames):
    imgs, boxes = frames
    t = TransTTracker(float_model)
    t.init(imgs[0], boxes[0])
    H, W = imgs[0].shape[:2]
    for img in imgs[1:]:
        box, score = t.track(img)
        assert box.shape == (4,) and np.isfinite(box).all()
        assert box[2] >= t.params.min_size and box[3] >= t.params.min_size
        assert box[2] <= W and box[3] <= H
        cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
        assert 0 <= cx <= W and 0 <= cy <= H
        assert 0.0 <= score <= 1.0
    assert t.frame_index == len(imgs) - 1 and t.updates == 0
    assert all(v >= 0 for v in t.times.values()) and t.times["network"] > 0
    with pytest.raises(ValueError, match="positive size"):
        t.init(imgs[0], (10, 10, 0, 5))


def test_tracker_box_mapping(cfg, monkeypatch):
    """With window_influence 0 the best cell is the most confident one, and its box maps back to
    the frame as TransT does: centre relative to the crop (side ceil(s_x)) around the last centre."""
    torch.manual_seed(0)
    model = TransT(cfg).eval()
    hw = cfg.score_size ** 2
    preds = iter([(13, [0.6, 0.4, 0.25, 0.35]), (50, [0.55, 0.45, 0.02, 0.5])])
    seen = []

    def fake_track(x):
        seen.append(tuple(x.shape))
        cell, b = next(preds)
        logits = torch.zeros(1, hw, 2)
        logits[0, :, 1] = 1.0
        logits[0, cell] = torch.tensor([3.0, -1.0])
        logits[0, cell + 1] = torch.tensor([2.0, -1.0])  # second best
        boxes = torch.rand(1, hw, 4)
        boxes[0, cell] = torch.tensor(b)
        return {"logits": logits, "boxes": boxes, "cls_hidden": torch.zeros(1, hw, cfg.hidden_dim)}

    monkeypatch.setattr(model, "track", fake_track)
    t = TransTTracker(model, TransTParams(window_influence=0.0))
    img = np.random.default_rng(0).integers(0, 256, (200, 220, 3), dtype=np.uint8)
    t.init(img, (60.0, 70.0, 30.0, 20.0))
    center, size = np.array([75.0, 80.0]), np.array([30.0, 20.0])
    for cell, b in [(13, [0.6, 0.4, 0.25, 0.35]), (50, [0.55, 0.45, 0.02, 0.5])]:
        s_x = math.ceil(_search_side(*size))
        center = np.array([b[0] * s_x + center[0] - s_x / 2, b[1] * s_x + center[1] - s_x / 2])
        size = np.maximum(np.array([b[2] * s_x, b[3] * s_x]), 10.0)
        box, score = t.track(img)
        np.testing.assert_allclose(box, [*(center - size / 2), *size], rtol=0, atol=1e-4)
        assert score == pytest.approx(float(torch.softmax(torch.tensor([3.0, -1.0]), 0)[0]), rel=1e-6)
    assert seen == [(1, 3, cfg.instance_size, cfg.instance_size)] * 2
    assert size[0] == 10.0  # the second box was narrower than min_size


def test_online_update_changes_only_fp_branch_of_classifier(hybrid_model, frames):
    model = hybrid.clone(hybrid_model)
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    imgs, boxes = frames
    t = TransTTracker(model, online=ONLINE)
    t.init(imgs[0], boxes[0])
    out = np.array([t.track(f)[0] for f in imgs[1:]])
    assert t.updates == (len(imgs) - 1) // ONLINE.interval >= 1
    assert np.isfinite(out).all()
    after = model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert "class_embed.layers.2.pruned.weight" in changed, changed
    assert changed <= {"class_embed.layers.2.pruned.weight", "class_embed.layers.2.pruned.bias"}, changed
    t.check_frozen()  # what the tracker verified after every update
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("class_embed.layers.2.pruned.") for n in trainable)
    with torch.no_grad():
        model.class_embed.layers[0].quant.weight.add_(0.5)
    with pytest.raises(RuntimeError, match="class_embed.layers.0"):
        t.check_frozen()


def test_online_update_of_deployed_model(hybrid_model, frames):
    """Deployed: the packed integer weights stay bit-identical, the FP branch of the classifier's
    last layer moves."""
    model = hybrid.deploy(hybrid.clone(hybrid_model))
    last = model.class_embed.layers[2]
    assert isinstance(last, ho.DeployedLinear) and last.kept_channels
    packed = {n: m.w_packed.clone() for n, m in model.named_modules() if isinstance(m, (ho.DeployedLinear,
                                                                                           ho.DeployedConv2d))}
    fp = last.fp_weight.detach().clone()
    imgs, boxes = frames
    t = make_tracker(model, online=ONLINE)
    t.init(imgs[0], boxes[0])
    out = np.array([t.track(f)[0] for f in imgs[1:]])
    assert t.updates >= 1 and np.isfinite(out).all()
    assert not torch.equal(last.fp_weight, fp)
    for n, m in model.named_modules():
        if n in packed:
            assert torch.equal(m.w_packed, packed[n]), n


def test_online_needs_hybrid_and_make_tracker_types(float_model, cfg):
    with pytest.raises(ValueError, match="hybrid"):
        TransTTracker(hybrid.clone(float_model), online=ONLINE)
    with pytest.raises(ValueError, match="hybrid"):
        make_tracker(hybrid.clone(float_model), online=ONLINE)
    assert isinstance(make_tracker(float_model), TransTTracker)
    assert isinstance(make_tracker(float_model, TransTParams(window_influence=0.3)), TransTTracker)
    with pytest.raises(TypeError, match="TransTParams"):
        make_tracker(float_model, TrackParams())
    siam = SiamRPNPP(ModelConfig(width=0.125, blocks=(1, 1, 1, 1), neck_channels=16, exemplar_size=63,
                                 instance_size=127))
    with pytest.raises(TypeError, match="TrackParams"):
        make_tracker(siam, TransTParams())
    assert isinstance(make_tracker(siam), SiamRPNTracker)
    with pytest.raises(ValueError, match="window_influence"):
        TransTParams(window_influence=1.5)


# -- CLI end to end -------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_train_float_then_hybrid_and_evaluate_deployed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(TransTConfig, "small", classmethod(lambda cls, **kw: cls(**TINY)))
    synth = SynthConfig(frames=5, width=96, height=80, target_size=(14, 20))
    data = tmp_path / "data"
    for i in range(2):
        write_otb_sequence(data / f"s{i}", *synthetic_sequence(synth, seed=30 + i))
    common = ["--steps", "2", "--batch-size", "2", "--data", str(data), "--max-gap", "2", "--quiet",
              "--threads", "1"]
    f, h = tmp_path / "f.pt", tmp_path / "h.pt"
    assert cli.main(["train", "--arch", "transt", "--preset", "small", "--out", str(f), *common]) == 0
    raw = read_checkpoint(f)
    assert raw["arch"] == "transt" and raw["variant"] == "float" and raw["model_config"]["instance_size"] == 64
    assert cli.main(["train", "--variant", "hybrid", "--init", str(f), "--out", str(h), *common]) == 0
    raw = read_checkpoint(h)
    assert raw["arch"] == "transt" and raw["variant"] == "hybrid" and raw["scope"] == "all"
    capsys.readouterr()
    runs = tmp_path / "runs"
    assert cli.main(["evaluate", str(data), "--checkpoint", str(h), "--deploy", "--out", str(runs), "--quiet"]) == 0
    for s in ("s0", "s1"):
        pred = np.loadtxt(runs / "h-deployed" / f"{s}.txt", delimiter=",")
        assert pred.shape == (5, 4) and np.isfinite(pred).all() and (pred[:, 2:] > 0).all()
    assert "h-deployed" in (runs / "table.md").read_text()
    assert cli.main(["evaluate", str(data), "--checkpoint", str(h), "--online", "--online-interval", "2",
                     "--online-iterations", "1", "--out", str(runs), "--quiet"]) == 0
    info = json.loads((runs / "h-online" / "run_info.json").read_text())
    assert info["updates"] == {"s0": 2, "s1": 2}
    table = (runs / "table.md").read_text()
    assert "h-deployed" in table and "h-online" in table
    capsys.readouterr()
    assert cli.main(["train", "--arch", "siamrpn", "--init", str(f), "--out", str(tmp_path / "x.pt"), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --arch siamrpn") and "transt" in err[0]
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.slow
def test_cli_hybrid_from_released_transt_file(import_model, tmp_path):
    """train --variant hybrid --init transt.pth (an ltr file): the imported architecture (128 / 256
    crops, 8 heads) is hybridised and saved as a TransT checkpoint of ours."""
    ltr = _save_ltr_checkpoint(tmp_path / "transt.pth", ours_to_transt(import_model.state_dict()))
    out = tmp_path / "hyb.pt"
    assert cli.main(["train", "--variant", "hybrid", "--init", str(ltr), "--out", str(out), "--steps", "1",
                     "--batch-size", "1", "--num-sequences", "1", "--seq-frames", "3", "--quiet",
                     "--threads", "1"]) == 0
    raw = read_checkpoint(out)
    assert raw["arch"] == "transt" and raw["variant"] == "hybrid"
    assert {k: raw["model_config"][k] for k in IMPORT} == {k: list(v) if isinstance(v, tuple) else v
                                                            for k, v in IMPORT.items()}
    model = load_checkpoint(out)
    assert isinstance(model.featurefusion_network.decoder.layers[0].multihead_attn, HybridMultiheadAttention)


def test_online_tracker_reused_for_a_second_sequence_starts_from_the_offline_model(hybrid_model, frames):
    """The updates of one sequence do not carry over: the FP branch goes back to its offline values
    and the pseudo-label sampling restarts, so a second run repeats the first box for box."""
    model = hybrid.clone(hybrid_model)
    offline = model.class_embed.layers[2].pruned.weight.detach().clone()
    imgs, boxes = frames
    t = TransTTracker(model, online=ONLINE)
    runs = []
    for _ in range(2):
        t.init(imgs[0], boxes[0])
        runs.append(np.array([t.track(f)[0] for f in imgs[1:]]))
        assert t.updates >= 1
        assert not torch.equal(model.class_embed.layers[2].pruned.weight, offline)  # the updates trained it
    np.testing.assert_array_equal(runs[0], runs[1])


def test_table1_parts_bits_and_rc(float_model, hybrid_model):
    """The paper's Table 1 per part for one tracked frame: the float model is 1.0 everywhere with its
    attention products counted (through the float rewrite), the hybrid has the first conv at
    32/32, the attention products at 6/6 and 32/6 in ``att``, and the parts add up to the total."""
    rows = {r["part"]: r for r in hybrid.table1(float_model)}
    assert list(rows) == ["conv1", "layer1", "layer2", "layer3", "att", "pred", "total"]
    assert all(r["rc_hybrid"] == pytest.approx(1.0) and r["bits"] in ("32/32", "") for r in rows.values())
    report = hybrid.tracking_bops(float_model)
    assert any(r.name.endswith(".attention.qk") for r in report.layers)
    assert sum(r["share"] for p, r in rows.items() if p != "total") == pytest.approx(1.0)

    report = hybrid.tracking_bops(hybrid_model)
    rows = {r["part"]: r for r in hybrid.table1(hybrid_model, report)}
    assert rows["conv1"]["bits"] == "32/32" and rows["conv1"]["rc_hybrid"] == pytest.approx(1.0)
    assert set(rows["att"]["bits"].split(", ")) == {"4/4", "6/6", "32/6"}
    assert rows["layer3"]["bits"] == "4/4" and 0 < rows["layer3"]["rc_hybrid"] < 0.5
    assert rows["total"]["rc_hybrid"] == pytest.approx(report.rc)
    parts = [r for p, r in rows.items() if p != "total"]
    assert sum(r["share"] * r["rc_hybrid"] for r in parts) == pytest.approx(report.rc)
    assert sum(r["layers"] for r in parts) == len(report.layers)
    assert "| att | 32/6, 4/4, 6/6 |" in hybrid.table1_markdown(hybrid.table1(hybrid_model, report))


def test_cli_bops_writes_table1(hybrid_model, tmp_path, capsys):
    path = save_checkpoint(tmp_path / "h.pt", hybrid.clone(hybrid_model), "hybrid")
    assert cli.main(["bops", "--checkpoint", str(path), "--out", str(tmp_path / "t" / "bops.md")]) == 0
    text = (tmp_path / "t" / "bops.md").read_text()
    assert text == capsys.readouterr().out
    assert "(TransT, hybrid, search crop 64x64" in text and "| total |" in text and "| pred | 4/4 |" in text
