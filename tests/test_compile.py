"""torch.compile and the custom ops: a deployed torchvision ResNet-18 compiles with fullgraph=True
(no graph breaks: every hybridops op has a fake kernel) and matches eager exactly."""
import pytest
import torch
import torchvision

import hybridops as ho


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
