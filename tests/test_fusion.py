"""Epilogue fusion at deploy: BatchNorm2d folds into the integer conv's scale/bias and the pruned
branch's rows, ReLU moves into the epilogue; results equal the unfused deployed model up to fp32
rounding of the folded constants."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import hybridops as ho
from hybridops.backend_selection import backend_unavailable_reason
from hybridops import fusion
from hybridops.fusion import fuse_epilogues_

BACKENDS = ["torch"] + [b for b in ("triton", "cuda") if backend_unavailable_reason(b, "cpu") is None]


def _randomize_bn_(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.6 - 0.3)
    return model


def _cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16),
        nn.Conv2d(16, 4, 1), nn.ReLU())


@pytest.fixture(scope="module")
def hybrid_cnn():
    torch.manual_seed(0)
    model = _randomize_bn_(_cnn()).eval()
    x = torch.randn(2, 3, 12, 12)
    ho.hybridize_(model, ho.HybridConfig(keep=0.3), example_inputs=x)
    return model, x


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_equals_unfused(hybrid_cnn, backend):
    model, x = hybrid_cnn
    plain = ho.deploy_(copy.deepcopy(model), backend, fuse=False)
    fused = ho.deploy_(copy.deepcopy(model), backend)
    # The first conv keeps its image input in full precision (one float conv) and folds its
    # BatchNorm into its weights, its ReLU after the conv; the others fold into their epilogues.
    assert [type(m).__name__ for m in fused] == [
        "DeployedConv2d", "Identity", "Identity", "DeployedConv2d", "Identity", "Identity",
        "DeployedConv2d", "Identity", "DeployedConv2d", "Identity"]
    assert fused[0].path == "merged" and fused[0].fused_bn and fused[0].relu
    assert (fused[3].fused_bn, fused[3].relu, fused[6].fused_bn, fused[6].relu, fused[8].relu) == (
        True, True, True, False, True)
    assert "epilogue=bn+relu" in repr(fused[3])
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS + [b for b in ("onednn",) if backend_unavailable_reason(b, "cpu") is None])
def test_relu_after_a_deployed_linear_moves_into_its_epilogue(backend):
    """A transformer FFN's ``Linear -> ReLU -> Linear``: the ReLU module folds into the first
    deployed Linear (hybrid, with a pruned FP branch: the ReLU acts on the sum of both branches);
    the output equals the unfused deployed model's."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(5, 7, 16)
    ho.hybridize_(model, ho.HybridConfig(keep=0.3), example_inputs=x)
    plain = ho.deploy_(copy.deepcopy(model), backend, fuse=False)
    fused = ho.deploy_(copy.deepcopy(model), backend)
    assert [type(m).__name__ for m in fused] == ["DeployedLinear", "Identity", "DeployedLinear"]
    assert fused[0].relu and fused[0].kept_channels and not plain[0].relu
    assert "epilogue=relu" in repr(fused[0])
    with torch.no_grad():
        out = fused(x)
        torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-5)
        assert not torch.equal(out, fused[2](plain[0](x)))  # the check would see a missing ReLU


def test_fused_state_dict_round_trip(hybrid_cnn):
    model, x = hybrid_cnn
    fused = ho.deploy_(copy.deepcopy(model), "torch")
    same = ho.deploy_(copy.deepcopy(model), "torch")
    for m in same.modules():  # make the copy's numbers differ, so that loading must restore them
        if isinstance(m, ho.DeployedConv2d):
            m.scale.mul_(2)
    same.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert torch.equal(same(x), fused(x))
    # Fusion replaced modules by nn.Identity: a checkpoint of another fusion layout is refused
    # rather than loaded into a model that silently lacks its ReLU.
    unfused = ho.deploy_(copy.deepcopy(model), "torch", fuse=False)
    with pytest.raises(ValueError, match="same fuse setting"):
        unfused.load_state_dict(fused.state_dict())


def test_online_update_through_fused_epilogue(hybrid_cnn):
    model, x = hybrid_cnn
    fused = ho.deploy_(copy.deepcopy(model), "torch")
    params = ho.freeze_quantized_(fused)
    before = {k: v.clone() for k, v in fused.state_dict().items() if torch.is_tensor(v)}
    opt = torch.optim.SGD(params, lr=0.1)
    fused(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    opt.step()
    fp_names = {n for n, p in fused.named_parameters() if any(p is q for q in params)}
    changed = {k for k, v in fused.state_dict().items() if k in before and not torch.equal(v, before[k])}
    assert changed and changed <= fp_names


def test_training_mode_batchnorm_is_not_fused_and_the_block_end_is():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    _randomize_bn_(model)
    x = torch.randn(1, 3, 32, 32)
    ho.hybridize_(model, ho.HybridConfig(), example_inputs=x)
    ref = ho.deploy_(copy.deepcopy(model), "torch", fuse=False)
    model.layer1[0].bn1.train()
    fused = ho.deploy_(model, "torch")
    assert isinstance(fused.layer1[0].bn1, nn.BatchNorm2d)  # training-mode statistics: kept
    assert isinstance(fused.layer1[0].bn2, nn.Identity) and fused.layer1[0].conv2.fused_bn
    # the skip connection's add and the block's second call of its one ReLU module fold into conv2;
    # conv1's output goes through the unfused BatchNorm, so its ReLU (the first call) stays
    block = fused.layer1[0]
    assert block.conv2.residual and block.conv2.relu and not block.conv1.relu
    assert type(block) is torchvision.models.resnet.BasicBlock and "forward" in vars(block)  # its code, rewritten
    assert isinstance(block.relu, nn.ReLU) and "epilogue=bn+add+relu" in repr(block.conv2)
    calls = []
    block.relu.register_forward_hook(lambda *a: calls.append(1))
    fused.layer1[0].bn1.eval()
    with torch.no_grad():
        fused(x)
    assert len(calls) == 1  # the block calls its ReLU module once now (after bn1)
    fused.layer1[0].bn1.train()
    fused.layer1[0].bn1.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_chain_passes_codes_and_matches(backend):
    """In a quantized-only network, consecutive integer convs pass packed codes (the producer
    re-quantizes in its epilogue); the result equals the unchained model exactly, since the codes
    are the same fp32 computation either way."""
    torch.manual_seed(0)
    model = _randomize_bn_(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1))).eval()
    x = torch.randn(2, 3, 12, 12)
    ho.hybridize_(model, ho.QuantConfig(bits_a=5), example_inputs=x)
    plain = ho.deploy_(copy.deepcopy(model), backend, fuse=False)
    chained = ho.deploy_(copy.deepcopy(model), backend)
    assert chained[3].out_qparams is not None and chained[6].codes_input and chained[8].codes_input
    assert "requant" in repr(chained[6]) and "codes in" in repr(chained[8])
    with torch.no_grad():
        y = chained(x)
        torch.testing.assert_close(y, plain(x), rtol=0, atol=0)
    # the last layer reads codes: its NHWC output is returned as written (channels_last, no copy)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == x.dtype
    with pytest.raises(ValueError, match="expects its codes"):
        chained[8](torch.randn(2, 16, 5, 5))


def test_layer_with_full_precision_branch_is_not_fed_codes(hybrid_cnn):
    model, x = hybrid_cnn
    fused = ho.deploy_(copy.deepcopy(model), "torch")
    assert not any(m.codes_input for m in fused.modules() if isinstance(m, ho.DeployedConv2d))


class _Shared(nn.Module):
    """One conv called twice, one consumer called from two places."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 1)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        y = self.relu1(self.bn1(self.a(x)))
        z = self.relu2(self.bn2(self.a(x)))
        return self.b(y) + self.b(z)


def _quantized_plain_and_fused(model: nn.Module, x: torch.Tensor, backend: str = "torch"):
    """``model`` quantized throughout (no float first layer), deployed unfused and fused."""
    torch.manual_seed(0)
    model = _randomize_bn_(model).eval()
    ho.hybridize_(model, ho.QuantConfig(fp_first_input=False), example_inputs=x)
    return ho.deploy_(copy.deepcopy(model), backend, fuse=False), ho.deploy_(copy.deepcopy(model), backend)


def test_layers_called_twice_are_neither_fused_nor_chained():
    x = torch.randn(2, 3, 8, 8)
    plain, fused = _quantized_plain_and_fused(_Shared(), x)
    assert not fused.a.fused_bn and not fused.a.relu and fused.a.out_qparams is None and not fused.b.codes_input
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)


def test_producer_with_full_precision_branch_keeps_float_output():
    """Codes carry no gradient: a producer whose pruned branch trains online is not chained."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 10, 10)
    ho.hybridize_(model, ho.HybridConfig(), example_inputs=x, filter_fn=lambda m, n: n != "4")
    ho.hybridize_(model, ho.QuantConfig(fp_first_input=False), example_inputs=x)
    fused = ho.deploy_(model, "torch")
    assert fused[2].kept_channels > 0 and fused[2].out_qparams is None and not fused[4].codes_input
    params = ho.freeze_quantized_(fused)
    y = fused[:4](x)  # the producer's output: float, and differentiable in its pruned branch
    assert y.dtype == torch.float32 and y.requires_grad
    y.sum().backward()
    assert all(p.grad is not None for p in params)


# ----------------------------------------------------------------------------- skip connections
CPU_BACKENDS = [b for b in ("torch", "onednn") if backend_unavailable_reason(b, "cpu") is None]


def _without_skip_fusion(monkeypatch):
    """Deploy as before skip connections were fused: the reference the fused models must equal."""
    monkeypatch.setattr(fusion, "fuse_skip_connections_", lambda model, decide=True: [])


def _deploy_both(model, backend, monkeypatch):
    with monkeypatch.context() as m:
        _without_skip_fusion(m)
        unfused = ho.deploy_(copy.deepcopy(model), backend)
    return ho.deploy_(copy.deepcopy(model), backend), unfused


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_resnet_block_ends_fold_into_their_last_conv(backend, monkeypatch):
    """Per-layer hybrid ResNet-18: each block's add and second ReLU run in conv2's epilogue and
    its first ReLU (the same module, called twice) in conv1's; the model equals the one deployed
    without these folds bit for bit, and the block keeps its class, submodules and state (only its
    forward is the rewritten code)."""
    torch.manual_seed(0)
    model = _randomize_bn_(torchvision.models.resnet18(num_classes=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    ho.hybridize_(model, ho.HybridConfig(keep=0.25), example_inputs=x)
    fused, unfused = _deploy_both(model, backend, monkeypatch)
    blocks = [b for layer in (fused.layer1, fused.layer2, fused.layer3, fused.layer4) for b in layer]
    assert all(type(b) is torchvision.models.resnet.BasicBlock and "forward" in vars(b) for b in blocks)
    assert all(b.conv1.relu and not b.conv1.residual and b.conv2.relu and b.conv2.residual for b in blocks)
    assert all(not b.conv1.codes_input and b.conv1.kept_channels for b in blocks)  # (FP branches: no codes)
    assert list(fused.state_dict()) == list(unfused.state_dict())
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in unfused.named_parameters()]
    assert isinstance(fused.layer2[0].downsample[0], ho.DeployedConv2d) and isinstance(fused.layer2[0].relu, nn.ReLU)
    with torch.no_grad():
        y = fused(x)
        assert torch.equal(y, unfused(x))
        xc = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(fused(xc), unfused(xc))
    # plain copies of the deployed model keep the folds
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(fused)(x), y)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_network_level_quantized_half_is_an_integer_chain(backend, monkeypatch):
    """The network-level hybrid's quantized copy of a Bottleneck ResNet: inside each block the
    convs pass codes (conv1 -> conv2 -> conv3), conv3 adds the skip connection and applies the
    block's ReLU in its epilogue; the network equals the one without these folds exactly."""
    from torchvision.models.resnet import Bottleneck, ResNet
    torch.manual_seed(0)
    backbone = _randomize_bn_(ResNet(Bottleneck, [1, 2, 1, 1], num_classes=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    net = ho.HybridNetwork(backbone, ho.HybridConfig(keep=0.25), example_inputs=x).eval()
    with monkeypatch.context() as m:
        _without_skip_fusion(m)
        unfused = copy.deepcopy(net).deploy_(backend)
    net.deploy_(backend)
    q = net.quant_net
    for block in (q.layer1[0], q.layer2[0], q.layer2[1], q.layer4[0]):
        assert block.conv1.out_qparams is not None and block.conv2.codes_input and block.conv2.out_qparams is not None
        assert block.conv3.codes_input and block.conv3.residual and block.conv3.relu
    # the quantized copy of every block's first conv reads floats (the block input is also the skip)
    assert not q.layer2[1].conv1.codes_input
    with torch.no_grad():
        assert torch.equal(net(x), unfused(x))


class _Skips(nn.Module):
    """The forms a skip connection takes in model code, and one that must not fold;
    ``relu_after_skip=False``: the first skip connection without its ReLU."""

    def __init__(self, relu_after_skip: bool = True):
        super().__init__()
        self.relu_after_skip = relu_after_skip
        self.c1, self.c2, self.c3, self.c4 = (nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                                              nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1))
        self.bn1, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.relu(self.bn1(self.c1(x)))
        y = y + self.bn2(self.c2(y))  # the conv second
        if self.relu_after_skip:
            y = torch.relu(y)  # a functional ReLU
        z = self.c3(y)
        z += y  # in place into the conv's output, no ReLU
        u = self.c4(z)
        s = z.add_(u)  # in place into z, which is read again below: must stay as it is
        return s * 2 + z


class _NoSkips(_Skips):
    def forward(self, x):
        return self.c4(self.c3(self.bn2(self.c2(self.relu(self.bn1(self.c1(x)))))))


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _Skips()

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_skip_connection_forms(backend, monkeypatch):
    torch.manual_seed(0)
    model = _randomize_bn_(_Outer()).eval()
    x = torch.randn(2, 3, 6, 6)
    ho.hybridize_(model, ho.QuantConfig(fp_first_input=False), example_inputs=x)
    plain = ho.deploy_(copy.deepcopy(model), backend, fuse=False)
    fused, unfused = _deploy_both(model, backend, monkeypatch)
    body = fused.body
    assert (body.c1.relu, body.c2.residual, body.c2.relu, body.c3.residual, body.c3.relu) == (True,) * 4 + (False,)
    assert not body.c4.residual and not body.c4.relu
    with torch.no_grad():
        y = fused(x)
        assert torch.equal(y, unfused(x))
        torch.testing.assert_close(y, plain(x), rtol=1e-4, atol=1e-4)  # (BatchNorms folded)


def test_load_deployed_refolds_skip_connections():
    """A checkpoint of a model whose skip connections were fused rebuilds into the same code."""
    torch.manual_seed(0)
    model = _randomize_bn_(_Outer()).eval()
    x = torch.randn(2, 3, 6, 6)
    ho.hybridize_(model, ho.QuantConfig(fp_first_input=False), example_inputs=x)
    ho.deploy_(model, "torch")
    fresh = _Outer()
    ho.load_deployed_(fresh, model.state_dict(), backend="torch")
    fresh.eval()
    assert "forward" in vars(fresh.body) and fresh.body.c2.residual
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # a model without the skip connections the checkpoint's layers add is refused
    other = _Outer()
    other.body = _NoSkips()
    with pytest.raises(ValueError, match="adds a residual in its epilogue, but this model's code adds none"):
        ho.load_deployed_(other, model.state_dict(), backend="torch")
    other.body = _Skips(relu_after_skip=False)
    with pytest.raises(ValueError, match="applies a ReLU after its residual, but this model's code has none"):
        ho.load_deployed_(other, model.state_dict(), backend="torch")


def test_online_update_through_a_residual_epilogue(monkeypatch):
    """Gradients through fused skip connections equal those of the unfused deployed model."""
    torch.manual_seed(0)
    model = _randomize_bn_(torchvision.models.resnet18(num_classes=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    ho.hybridize_(model, ho.HybridConfig(keep=0.25), example_inputs=x)
    grads = []
    for m in _deploy_both(model, "torch", monkeypatch):
        params = ho.freeze_quantized_(m)
        m(x).square().mean().backward()
        grads.append([p.grad for p in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads[0])


class _MutatesBetween(nn.Module):
    """The layer's input is written in place between the layer and the add: moving the layer to
    the add would make it read the written tensor, so this is not folded."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        h = self.c0(x)
        y = self.c1(h)
        h.mul_(2)
        return self.relu(y + h)


class _DefaultedSkip(nn.Module):
    """A forward with a defaulted second argument: traced alone, ``skip is None`` would be fixed."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x, skip=None):
        if skip is None:
            skip = x
        return self.relu(self.c1(x) + skip)


class _Wrap(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("make", [_MutatesBetween, _DefaultedSkip])
def test_skip_connections_that_must_not_fold(make):
    x = torch.randn(1, 3, 6, 6)
    plain, fused = _quantized_plain_and_fused(_Wrap(make()), x)
    assert not any(m.residual for m in fused.modules() if isinstance(m, ho.DeployedConv2d))
    with torch.no_grad():
        assert torch.equal(fused(x), plain(x))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_load_refolds_the_relu_of_a_chained_producer(backend):
    """A network-level quantized copy rebuilt from its checkpoint has the same code as deployed:
    conv1's ReLU (a shared module) folded although conv1 already hands codes on."""
    torch.manual_seed(0)
    backbone = _randomize_bn_(torchvision.models.resnet18(num_classes=4)).eval()
    x = torch.randn(1, 3, 32, 32)
    net = ho.HybridNetwork(backbone, ho.HybridConfig(keep=0.25), example_inputs=x).eval().deploy_(backend)
    fresh = _randomize_bn_(torchvision.models.resnet18(num_classes=4)).eval()
    ho.load_deployed_(fresh, net.quant_net.state_dict(), backend=backend)
    calls = []
    fresh.layer1[0].relu.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        assert torch.equal(fresh(x), net.quant_net(x))
    assert calls == []  # both of the block's ReLU calls run inside its convs
