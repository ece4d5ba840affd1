"""The thin pruned network (hybridops/thin.py): a deployed HybridNetwork's pruned half runs on its
kept channels and gives what the full-width deployed layers give; same layers, parameters, state
dict, indexing; online updates train the same tensors; BOPs count as before."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import hybridops as ho
from hybridops.backend_selection import backend_unavailable_reason
from hybridops.thin import full_width_, thin_network_

BACKENDS = [b for b in ("torch", "onednn") if backend_unavailable_reason(b, "cpu") is None]


def _network(model: nn.Module, x: torch.Tensor, keep: float = 0.2) -> ho.HybridNetwork:
    torch.manual_seed(0)
    net = ho.HybridNetwork(model, ho.HybridConfig(keep=keep), example_inputs=x).eval()
    with torch.no_grad():  # the pruned half's output layer starts at zero: give it weights
        for m in net.pruned_net.modules():
            w = getattr(m, "weight", None)
            if isinstance(w, nn.Parameter) and bool((w == 0).all()):
                w.normal_(0, 0.1)
    return net


def _full_width_twin(net: ho.HybridNetwork) -> ho.HybridNetwork:
    ref = copy.deepcopy(net)
    for i, branch in enumerate(ref.branches):
        ho.deploy_(branch, "torch", ref.in_channel_map(i))
    return ref


class _CatNet(nn.Module):
    """Residual joins of different channel sets, a concatenation (not zero-preserving: runs at
    full width) and a 1x1-pooled linear head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(32, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        a = torch.relu(self.a(x))
        b = torch.relu(self.b(a)) + a
        c = torch.relu(self.c(torch.cat([a, b], 1)))
        return self.fc(torch.flatten(self.pool(c), 1))


@pytest.mark.parametrize("make", [lambda: torchvision.models.resnet18(num_classes=10),
                                  lambda: torchvision.models.resnet50(num_classes=10), _CatNet],
                         ids=["resnet18", "resnet50", "cat"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_thin_pruned_half_equals_full_width(make, layout, backend):
    """On onednn the thin layers run on its prepacked float convs (ReLU as their post-op), on
    torch as plain torch ops."""
    x = torch.randn(2, 3, 32, 32)
    net = _network(make().eval(), x)
    ref = _full_width_twin(net)
    net.deploy_(backend)
    pruned = net.pruned_net
    assert getattr(pruned.forward, "hybridops_thin", False)  # the thin forward is installed
    assert not getattr(ref.pruned_net.forward, "hybridops_thin", False)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y, y_ref = pruned(x), ref.pruned_net(x)
        whole, whole_ref = net(x), ref(x)
    assert y.shape == y_ref.shape and y_ref.abs().max() > 0
    # the same convolutions on the same channels; only the summation order inside oneDNN's conv
    # may differ (a layer that skips zero input channels, another conv algorithm)
    tol = 1e-5 if backend == "torch" else 1e-4
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(whole, whole_ref, rtol=tol, atol=tol)
    assert sorted(pruned.state_dict()) == sorted(ref.pruned_net.state_dict())


def test_thin_network_keeps_structure_state_dict_and_reloads():
    x = torch.randn(1, 3, 32, 32)
    net = _network(torchvision.models.resnet18(num_classes=10).eval(), x)
    dep = copy.deepcopy(net).deploy_("torch")
    assert isinstance(dep.pruned_net.layer1[0].conv1, ho.DeployedConv2d)  # indexing as before
    assert not any(k.startswith("thin_index") for k in dep.state_dict())  # channel sets are not saved
    fresh = copy.deepcopy(net).deploy_("torch")
    with torch.no_grad():
        for p in fresh.pruned_net.parameters():
            p.zero_()
    fresh.load_state_dict(dep.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), dep(x), rtol=0, atol=0)
    clone = copy.deepcopy(dep)  # a deep copy keeps the thin forward, bound to the copy
    assert clone.pruned_net.forward.__self__ is clone.pruned_net
    with torch.no_grad():
        torch.testing.assert_close(clone(x), dep(x), rtol=0, atol=0)


def test_online_update_through_the_thin_network_trains_the_layers():
    x = torch.randn(2, 3, 32, 32)
    net = _network(torchvision.models.resnet18(num_classes=10).eval(), x)
    ref = _full_width_twin(net)
    net.deploy_("torch")
    layer, ref_layer = net.pruned_net.layer2[0].conv2, ref.pruned_net.layer2[0].conv2
    for model in (net, ref):
        model(x).square().sum().backward()
    assert layer.fp_weight.grad is not None and layer.fp_weight.grad.abs().sum() > 0
    torch.testing.assert_close(layer.fp_weight.grad, ref_layer.fp_weight.grad, rtol=1e-4, atol=1e-5)


def test_bops_count_the_thin_network_as_the_full_width_one():
    x = torch.randn(1, 3, 32, 32)
    net = _network(torchvision.models.resnet18(num_classes=10).eval(), x)
    ref = _full_width_twin(net)
    net.deploy_("torch")
    assert ho.count_bops(net, (1, 3, 32, 32)).rc == pytest.approx(ho.count_bops(ref, (1, 3, 32, 32)).rc)
    assert full_width_(copy.deepcopy(net)) == 1


def test_a_network_without_pruned_layers_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert thin_network_(model) is False and "forward" not in model.__dict__


def test_thin_forward_refuses_what_it_cannot_run():
    x = torch.randn(1, 3, 16, 16)
    net = _network(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)), x)
    dep = net.deploy_("torch")
    layer = dep.pruned_net[2]
    with pytest.raises(ValueError, match="expects the .* channels its branch reads"):
        layer.thin_forward(torch.randn(1, 8 + 1, 4, 4))
    quant = dep.quant_net[0]
    with pytest.raises(ValueError, match="without a quantized branch"):
        quant.thin_forward(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_thin_linear_takes_any_leading_shape_at_inference_and_in_training(backend):
    """A thin Linear's rows may carry leading dimensions: the prepacked path (inference) and the
    plain one (gradients needed) give the same result."""
    layer = ho.DeployedLinear(10, 6, bits_w=None, bits_a=None, fp_out_channels=4, fp_bias=True, backend=backend)
    with torch.no_grad():
        layer.fp_weight.normal_()
        layer.fp_bias.normal_()
    layer.relu = True
    x = torch.randn(2, 3, 10)
    with torch.no_grad():
        fast = layer.thin_forward(x)
    layer.fp_weight.requires_grad_(True)
    slow = layer.thin_forward(x)
    assert fast.shape == slow.shape == (2, 3, 4)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)
    assert (fast >= 0).all()
