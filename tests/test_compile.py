"""torch.compile and the custom ops: deployed models compile with fullgraph=True (no graph breaks:
a deployed layer is one hybridops op with a fake kernel) and match eager."""
import pytest
import torch
import torch.nn as nn
import torchvision

import hybridops as ho
from hybridops.backend_selection import backend_unavailable_reason


@pytest.fixture(scope="module")
def deployed_resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    ho.hybridize_(model, ho.HybridConfig(keep=0.25), example_inputs=x)
    ho.deploy_(model, "torch")
    return model, x


def test_compile_fullgraph_deployed_resnet18_matches_eager(deployed_resnet18):
    model, x = deployed_resnet18
    torch._dynamo.reset()
    # aot_eager traces the ops through their fake kernels and autograd registrations exactly as
    # inductor does, without spending minutes compiling C++ on a 2-core CI machine.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager, got = model(x), compiled(x)
    assert torch.equal(got, eager)


def test_compiled_online_update_gradients_match_eager(deployed_resnet18):
    model, x = deployed_resnet18
    params = ho.freeze_quantized_(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (model, compiled):
        for p in params:
            p.grad = None
        fn(x).square().mean().backward()
        grads.append([p.grad.clone() for p in params])
    assert all(g is not None for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(backend_unavailable_reason("triton", "cuda" if torch.cuda.is_available() else "cpu") is not None,
                    reason="needs the triton backend (TRITON_INTERPRET=1 or a GPU)")
def test_compile_fullgraph_through_the_fused_hybrid_op():
    """On the triton backend, inference runs hybrid layers as hybridops::hybrid_conv2d (the pruned
    branch fused into the integer conv): it traces with fullgraph=True and gives eager's result."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 8, 1)).eval().to(device)
    x = torch.randn(1, 3, 8, 8, device=device)
    ho.hybridize_(model, ho.HybridConfig(bits_w=4, bits_a=4, keep=0.3), example_inputs=x)
    ho.deploy_(model, "triton")
    with torch.no_grad():
        ref = model(x)
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(got, ref)


# ----------------------------------------------------------------------------- Inductor, fullgraph
_CPU_BACKEND = "onednn" if backend_unavailable_reason("onednn", "cpu") is None else "torch"


def _deployed(model: nn.Module):
    x = torch.randn(1, 3, 64, 64)
    ho.hybridize_(model.eval(), ho.HybridConfig(keep=0.25), example_inputs=x)
    return ho.deploy_(model, _CPU_BACKEND), (x,)


class _Scores(nn.Module):
    """The tracker's Siamese forward as one tensor (its dict of cls / loc maps, flattened)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, z, x):
        out = self.model(z, x)
        return torch.cat([out["cls"].flatten(), out["loc"].flatten()])


def _tracker():
    from apps.tracking import ModelConfig, SiamRPNPP
    from apps.tracking.hybrid import deploy, hybridize_tracker

    model = SiamRPNPP(ModelConfig.small()).eval()
    z, x = torch.rand(1, 3, 63, 63) * 255, torch.rand(1, 3, 127, 127) * 255
    hybridize_tracker(model, "hybrid", example_inputs=(z, x))
    deploy(model, _CPU_BACKEND)
    return _Scores(model).eval(), (z, x)


MODELS = {
    "resnet18": lambda: _deployed(torchvision.models.resnet18(num_classes=10)),
    "resnet50": lambda: _deployed(torchvision.models.resnet50(num_classes=10)),
    "convnext_tiny": lambda: _deployed(torchvision.models.convnext_tiny(num_classes=10)),
    "tracker": _tracker,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_inductor_fullgraph_deployed_model(name):
    """torch.compile(fullgraph=True) with Inductor (the default backend) on the CPU: no graph
    break, no recompilation on new inputs of the same shapes or after an online update of a pruned
    branch (prepacked weights live inside the op, not in traced code), and eager's result (bit for
    bit on the ResNets; ConvNeXt's LayerNorm / GELU and the tracker's weighted head sums are fused
    and reordered by Inductor, so rtol 1e-5 there)."""
    torch.manual_seed(0)
    model, args = MODELS[name]()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager, got = model(*args), compiled(*args)
        if name.startswith("resnet"):
            assert torch.equal(got, eager)
        else:
            torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            args2 = tuple(torch.rand_like(a) * a.max() for a in args)
            torch.testing.assert_close(compiled(*args2), model(*args2), rtol=1e-5, atol=1e-5)
            dep = next(m for m in model.modules() if isinstance(m, ho.DeployedConv2d) and m.kept_channels)
            dep.fp_weight.mul_(1.5)
            torch.testing.assert_close(compiled(*args2), model(*args2), rtol=1e-5, atol=1e-5)
