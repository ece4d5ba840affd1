"""torch.compile and the custom ops: a deployed torchvision ResNet-18 compiles with fullgraph=True
(no graph breaks: every hybridops op has a fake kernel) and matches eager exactly."""
import pytest
import torch
import torch.nn as nn
import torchvision

import hybridops as ho
from hybridops.backend import backend_unavailable_reason


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
