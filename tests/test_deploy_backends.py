"""A deployed model gives the same result on every available backend (the Triton kernels run in
the interpreter on a CPU-only machine). Integer accumulation is exact on every backend and the
epilogue performs the same fp32 operations, so outputs agree to fp32 rounding."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import hybridops as ho
from hybridops.backend_selection import backend_unavailable_reason

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_BACKENDS = [b for b in ("triton", "cuda") if backend_unavailable_reason(b, DEVICE) is None]


def _small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 17, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(17, 17, 3, padding=2, dilation=2, groups=17), nn.ReLU(),
        nn.Conv2d(17, 8, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


@pytest.fixture(scope="module")
def hybrid_model():
    torch.manual_seed(0)
    model = _small_cnn().eval().to(DEVICE)
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    ho.hybridize_(model, ho.HybridConfig(bits_w=4, bits_a=4, keep=0.3), example_inputs=x)
    return model, x


@pytest.mark.skipif(not KERNEL_BACKENDS, reason="no kernel backend can run here (set TRITON_INTERPRET=1 or use a GPU)")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deployed_model_matches_reference_backend(hybrid_model, backend):
    model, x = hybrid_model
    ref = ho.deploy_(copy.deepcopy(model), "torch")
    fast = ho.deploy_(copy.deepcopy(model), backend)
    assert set(ho.backends_in_use(fast).values()) == {backend}
    assert all(f"backend={backend!r}" in repr(m) for m in fast.modules() if isinstance(m, ho.DeployedConv2d))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not KERNEL_BACKENDS, reason="no kernel backend can run here (set TRITON_INTERPRET=1 or use a GPU)")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_online_update_gradients_match_reference_backend(hybrid_model, backend):
    model, x = hybrid_model
    grads = {}
    for be in ("torch", backend):
        m = ho.deploy_(copy.deepcopy(model), be)
        params = ho.freeze_quantized_(m)
        m(x).square().sum().backward()
        grads[be] = [p.grad for p in params]
    for a, b in zip(grads["torch"], grads[backend]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_kernel_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="triton backend runs on CUDA tensors"):
        ho.resolve_backend("triton", "cpu")


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="needs the triton backend (TRITON_INTERPRET=1 or a GPU)")
def test_triton_fuses_the_pruned_branch_in_inference_and_training(hybrid_model, monkeypatch):
    """On the triton backend every ungrouped hybrid layer runs as one kernel, the pruned branch
    inside the integer conv, also while the branch trains: the forward is the layer op's, and its
    gradients come from the op's backward (hybridops/ops/layer_op.py), equal to the reference
    backend's."""
    from hybridops.kernels import qconv

    model, x = hybrid_model
    fast = ho.deploy_(copy.deepcopy(model), "triton")
    ref = ho.deploy_(copy.deepcopy(model), "torch")
    launches = []
    kernel = qconv._qconv_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs.get("FP_FUSED", False))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(qconv, "_qconv_kernel", Spy())
    hybrid = [m for m in fast.modules() if isinstance(m, ho.DeployedConv2d) and m.path == "hybrid"
              and m.groups == 1 and m.kept_channels > 0]
    assert hybrid
    with torch.no_grad():
        fast(x)
    assert sum(launches) == len(hybrid)
    launches.clear()
    grads = []
    for m in (fast, ref):
        params = ho.freeze_quantized_(m)
        m(x).sum().backward()
        grads.append([p.grad for p in params])
    assert sum(launches) == len(hybrid)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_auto_says_once_when_it_falls_back_to_the_reference(monkeypatch):
    """When the CPU's compiled kernels cannot load, "auto" runs the reference backend and warns
    once with the reason (the registry's sentence names the fix)."""
    from hybridops import backend_selection
    from hybridops.ops import registry

    monkeypatch.setattr(backend_selection, "_warned_reference", set())
    real = registry.unavailable_reason
    monkeypatch.setattr(backend_selection, "unavailable_reason",
                        lambda name, device: "the onednn backend failed to load (ImportError: no _C_cpu); reinstall"
                        if name == "onednn" else real(name, device))
    with pytest.warns(RuntimeWarning, match=r"runs the reference backend \(torch\) on cpu: the onednn backend failed"):
        assert ho.resolve_backend("auto", "cpu") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ho.resolve_backend("auto", "cpu") == "torch"  # once
