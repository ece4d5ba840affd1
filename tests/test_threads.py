"""One deployed model served from several Python threads (the kernels release the GIL): every
output equals the single-threaded one, bit for bit, whatever the other threads' input shapes."""
import pytest
import torch
import torchvision

import hybridops as ho
from hybridops.backend_selection import backend_unavailable_reason

from concurrency import run_in_threads

BACKENDS = [b for b in ("torch", "onednn") if backend_unavailable_reason(b, "cpu") is None]


@pytest.mark.parametrize("backend", BACKENDS)
def test_four_threads_with_different_shapes_match_one_thread(backend):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    ho.hybridize_(model, ho.HybridConfig(keep=0.25), example_inputs=torch.randn(2, 3, 48, 48))
    ho.deploy_(model, backend)
    g = torch.Generator().manual_seed(1)
    # each thread its own shapes (batch, side, memory format): different prepacked weights and slices
    inputs = [[torch.randn(1 + (t + k) % 2, 3, 32 + 8 * ((t + k) % 4), 40, generator=g) for k in range(3)]
              for t in range(4)]
    inputs[3] = [x.contiguous(memory_format=torch.channels_last) for x in inputs[3]]
    with torch.no_grad():
        expect = [[model(x) for x in xs] for xs in inputs]
    got = [[None] * 3 for _ in range(4)]

    def serve(t):
        with torch.no_grad():
            for _ in range(4):
                for k, x in enumerate(inputs[t]):
                    y = model(x)
                    assert torch.equal(y, expect[t][k]), f"thread {t}, input {k}: differs"
                    got[t][k] = y

    errors = run_in_threads(serve, 4)
    assert not errors, errors[0]
    assert all(y is not None for ys in got for y in ys)
