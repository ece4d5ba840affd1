"""Deploy changes nothing the model computes: an eval-mode trainable model runs the deployed
arithmetic (hybridops/layers.py, ``_DeployedArithmetic``), so on deep models the deployed outputs
equal the trainable model's eval outputs bit for bit where no BatchNorm is folded. Before, the
fake-quantized float arithmetic and the integer kernels rounded at different places and the
flipped codes compounded to 8-11% relative on ResNet-50."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

import hybridops as ho


@pytest.fixture(scope="module")
def resnet50_hybrid():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).eval()
    x = torch.randn(2, 3, 48, 48)
    ho.hybridize_(model, ho.HybridConfig(bits_w=5, bits_a=5, keep=0.25), example_inputs=x)
    return model, x


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_resnet50_deployed_equals_trainable_eval(resnet50_hybrid, backend):
    model, x = resnet50_hybrid
    with ho.use_backend(backend):  # the backend eval-mode forwards and deploy_ both default to
        with torch.no_grad():
            y_trainable = model(x)
        deployed = ho.deploy_(copy.deepcopy(model), backend=backend, fuse=False)
        with torch.no_grad():
            assert torch.equal(deployed(x), y_trainable)


def test_resnet50_fused_deploy_is_close(resnet50_hybrid):
    # folding BatchNorms rescales weights before rounding: equal up to the flips that causes
    model, x = resnet50_hybrid
    with torch.no_grad():
        y = model(x)
        y_fused = ho.deploy_(copy.deepcopy(model))(x)
    assert float((y_fused - y).norm() / y.norm()) < 0.2


def test_training_mode_keeps_the_training_arithmetic(resnet50_hybrid):
    model, x = resnet50_hybrid
    layer = copy.deepcopy(model.layer1[0].conv2)
    xin = torch.relu(torch.randn(2, 64, 12, 12))
    layer.train()
    layer.pruned.gate.frozen = True  # deterministic mask, so the two modes compare
    with torch.no_grad():
        y_train = layer(xin)
        layer.eval()
        y_eval = layer(xin)
    torch.testing.assert_close(y_eval, y_train, rtol=1e-4, atol=1e-4)  # same math, other rounding


def test_eval_with_gradients_straight_through(resnet50_hybrid):
    # eval-mode fine-tuning: the value is the deployed arithmetic's, the gradient the training
    # arithmetic's (to the FP branch, the intervals and the input)
    model, x = resnet50_hybrid
    layer = copy.deepcopy(model.layer1[0].conv2).eval()
    xin = torch.relu(torch.randn(2, 64, 12, 12)).requires_grad_()
    with torch.no_grad():
        y_ref = layer(xin)
    y = layer(xin)
    assert torch.equal(y.detach(), y_ref)
    F.mse_loss(y, torch.zeros_like(y)).backward()
    assert xin.grad is not None and xin.grad.abs().sum() > 0
    assert layer.pruned.weight.grad.abs().sum() > 0 and layer.quant.aq.c.grad is not None


def test_twin_follows_parameter_changes(resnet50_hybrid):
    model, _ = resnet50_hybrid
    layer = copy.deepcopy(model.layer1[0].conv2).eval()
    xin = torch.relu(torch.randn(1, 64, 8, 8))
    with torch.no_grad():
        y0 = layer(xin)
        layer.pruned.weight.mul_(2)  # an optimizer step bumps the version: the twin is rebuilt
        y1 = layer(xin)
        assert not torch.equal(y0, y1)
        assert torch.equal(y1, ho.deploy_layer(layer, ho.resolve_backend("auto", "cpu"))(xin))


def test_tracker_deployed_equals_trainable_eval():
    track = pytest.importorskip("hybridops_tracking")
    from hybridops_tracking import hybrid as H
    from hybridops_tracking.model import ModelConfig, SiamRPNPP

    torch.manual_seed(0)
    cfg = ModelConfig.small()
    model = SiamRPNPP(cfg).eval()
    z = torch.rand(1, 3, cfg.exemplar_size, cfg.exemplar_size) * 255
    x = torch.rand(1, 3, cfg.instance_size, cfg.instance_size) * 255
    H.hybridize_tracker(model, "hybrid", example_inputs=(z, x))
    with torch.no_grad():
        out = model(z, x)
    deployed = copy.deepcopy(model)
    ho.deploy_(deployed, fuse=False)
    with torch.no_grad():
        out_d = deployed(z, x)
    assert track is not None and set(out) == set(out_d)
    for k in out:
        torch.testing.assert_close(out_d[k], out[k], rtol=1e-5, atol=1e-5 * float(out[k].abs().max()))
