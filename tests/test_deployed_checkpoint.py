"""Deployed layers stand alone: built from geometry and format, filled by ``load_state_dict``; a
deployed model saved with ``torch.save(model.state_dict())`` loads in a fresh process into the
float model it was made from (``hybridops.load_deployed_``) and gives the same outputs bit for bit,
with no calibration data and no trainable layer built."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

import hybridops as ho
from hybridops.layers import TRAINABLE_LAYERS

ROOT = Path(__file__).resolve().parents[1]


def _deployed_conv(backend="torch", **kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1, **kw)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), conv)
    x = torch.randn(2, 3, 9, 7)
    ho.hybridize_(model, ho.HybridConfig(keep=0.5), example_inputs=x)
    ho.deploy_(model.eval(), backend=backend, fuse=False)
    return model[2], model[1](model[0](x))


@pytest.mark.parametrize("groups", [1, 2])
def test_deployed_conv_from_geometry_then_load_state_dict(groups):
    layer, x = _deployed_conv(groups=groups)
    built = ho.DeployedConv2d(6, 8, 3, padding=1, groups=groups, bits_w=layer.bits_w, bits_a=layer.bits_a,
                              a_signed=layer.a_signed, fp_out_channels=layer.kept_channels, backend="torch")
    assert built.path == layer.path == "hybrid"
    with torch.no_grad():
        y_empty = built(x)
    assert not torch.equal(y_empty, layer(x))  # zero-filled buffers compute something else
    built.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(built(x), layer(x))


def test_deployed_linear_from_geometry_then_load_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    x = torch.randn(4, 12)
    ho.hybridize_(model, ho.HybridConfig(keep=0.5, convert_linear=True), example_inputs=x)
    ho.deploy_(model.eval(), backend="torch", fuse=False)
    layer = model[2]
    built = ho.DeployedLinear(16, 5, bits_w=layer.bits_w, bits_a=layer.bits_a, a_signed=layer.a_signed,
                              fp_out_channels=layer.kept_channels, backend="torch")
    built.load_state_dict(layer.state_dict())
    h = model[1](model[0](x))
    with torch.no_grad():
        assert torch.equal(built(h), layer(h))


def test_load_deployed_rebuilds_fused_small_cnn_in_process():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    fresh = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    ho.hybridize_(model, ho.HybridConfig(keep=0.25), example_inputs=x)
    ho.deploy_(model, backend="torch")  # fuses BatchNorms and ReLUs, chains integer convs
    assert any(m.absorbed for m in model.modules() if isinstance(m, ho.DeployedConv2d))
    with torch.no_grad():
        y = model(x)
    ho.load_deployed_(fresh, model.state_dict(), backend="torch")
    fresh.eval()
    assert not any(isinstance(m, TRAINABLE_LAYERS + (nn.BatchNorm2d,)) for m in fresh.modules())
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


def test_load_deployed_errors():
    plain = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(ValueError, match="holds no deployed layer"):
        ho.load_deployed_(plain, plain.state_dict())
    layer, _ = _deployed_conv()
    other = nn.Sequential(nn.Conv2d(6, 8, 3))
    sd = {f"9.{k}": v for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="this model lacks"):
        ho.load_deployed_(other, sd, backend="torch")


LOADER = textwrap.dedent("""
    import sys, torch, torchvision, hybridops as ho
    ckpt, x_path, out_path = sys.argv[1:4]
    model = torchvision.models.resnet50(num_classes=10)
    ho.load_deployed_(model, torch.load(ckpt), backend=sys.argv[4])
    model.eval()
    with torch.no_grad():
        torch.save(model(torch.load(x_path)), out_path)
    print(sorted(set(ho.backends_in_use(model).values())))
""")


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_resnet50_deployed_saved_and_loaded_in_a_fresh_process(tmp_path, backend):
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).eval()
    x = torch.randn(2, 3, 48, 48)
    ho.hybridize_(model, ho.HybridConfig(keep=0.1), example_inputs=x)
    ho.deploy_(model, backend=backend)
    with torch.no_grad():
        y = model(x)
    torch.save(model.state_dict(), tmp_path / "deployed.pt")
    torch.save(x, tmp_path / "x.pt")
    out = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "deployed.pt"), str(tmp_path / "x.pt"),
                          str(tmp_path / "y.pt"), backend], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    used = sorted(set(ho.backends_in_use(model).values()))
    assert out.stdout.strip().splitlines()[-1] == str(used)
    assert torch.equal(torch.load(tmp_path / "y.pt"), y)
