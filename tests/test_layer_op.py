"""hybridops::hybrid_layer: one op per deployed layer, its spec, fake kernel, opcheck and gradients.

Every deployed layer forward is one call of the op layer; gradients of the pruned branch (and of
a merged layer's input) equal plain-PyTorch autograd of the same float branch.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

import hybridops as ho
from hybridops.backend_selection import backend_unavailable_reason
from hybridops.kernels import derived
from hybridops.kernels.packing import levels, pack_weight
from hybridops.ops import layer_op
from hybridops.ops.spec import SPEC_INTS, LayerSpec, spec_from_ints

BACKENDS = [b for b in ("torch", "onednn") if backend_unavailable_reason(b, "cpu") is None]


class _CountOps(TorchDispatchMode):
    """Records every op that reaches the dispatcher's Python key."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _fill(layer: nn.Module, seed: int) -> nn.Module:
    """Random but valid tensors in a deployed layer (codes, scales, kept rows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if layer.w_packed is not None:
            lw = levels(layer.bits_w, True)
            c_out, kh, kw, _ = layer.w_packed.shape
            codes = torch.randint(-lw, lw + 1, (c_out, layer.in_channels // layer.groups, kh, kw), generator=g)
            layer.w_packed.copy_(pack_weight(codes.to(torch.int8), layer.bits_w))
            layer.scale.copy_(torch.rand(layer.scale.shape, generator=g) * 0.01 + 0.001)
            if layer.bias is not None:
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.1)
        if layer.in_qparams is not None:
            layer.in_qparams.copy_(torch.tensor([0.25, 0.1]))
        layer.fp_weight.copy_(torch.randn(layer.fp_weight.shape, generator=g) * 0.2)
        if layer.fp_bias is not None:
            layer.fp_bias.copy_(torch.randn(layer.fp_bias.shape, generator=g) * 0.1)
        k = layer.kept_channels
        if k:
            layer.fp_out_idx.copy_(torch.randperm(layer.out_channels, generator=g)[:k].sort().values)
        if layer.fp_in_idx is not None and layer.groups == 1:
            layer.fp_in_idx.copy_(torch.randperm(layer.in_channels, generator=g)[: layer.fp_in_idx.numel()])
    layer.validate()
    return layer


# (name, constructor kwargs, input shape) -- every path and the geometry cases the op handles itself
CASES = {
    "hybrid": (dict(in_channels=12, out_channels=16, kernel_size=3, padding=1, fp_out_channels=5, fp_bias=True),
               (2, 12, 7, 6)),
    "hybrid_sliced_in": (dict(in_channels=12, out_channels=10, kernel_size=3, stride=2, padding=(1, 0, 2, 1),
                              fp_out_channels=4, fp_in_channels=5), (1, 12, 9, 8)),
    "hybrid_grouped": (dict(in_channels=12, out_channels=12, kernel_size=3, padding=1, groups=3, fp_out_channels=4),
                       (2, 12, 5, 5)),
    "hybrid_reflect": (dict(in_channels=6, out_channels=8, kernel_size=3, padding=1, padding_mode="reflect",
                            fp_out_channels=3, fp_bias=True), (1, 6, 5, 7)),
    "hybrid_signed": (dict(in_channels=8, out_channels=8, kernel_size=1, a_signed=True, bits_a=5, bits_w=5,
                           fp_out_channels=2), (3, 8, 4, 4)),
    "merged": (dict(in_channels=3, out_channels=8, kernel_size=5, stride=2, padding=2, bits_a=None,
                    fp_out_channels=3, fp_bias=True), (1, 3, 11, 11)),
    "fp_only": (dict(in_channels=6, out_channels=9, kernel_size=3, padding=(0, 1, 1, 0), bits_w=None, bits_a=None,
                     fp_out_channels=4, fp_bias=True), (2, 6, 6, 5)),
    "quant_only": (dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, dilation=2), (1, 8, 6, 6)),
}
LINEAR_CASES = {
    "linear_hybrid": (dict(in_features=20, out_features=7, fp_out_channels=3, fp_bias=True), (4, 20)),
    "linear_fp_only": (dict(in_features=10, out_features=6, bits_w=None, bits_a=None, fp_out_channels=2), (3, 10)),
}


def _layer(name: str, backend: str, seed: int = 0):
    if name in CASES:
        kw, shape = CASES[name]
        kw = dict(kw)
        layer = ho.DeployedConv2d(kw.pop("in_channels"), kw.pop("out_channels"), kw.pop("kernel_size"),
                                  **kw, backend=backend)
    else:
        kw, shape = LINEAR_CASES[name]
        layer = ho.DeployedLinear(**kw, backend=backend)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
    return _fill(layer, seed).eval(), x


ALL = list(CASES) + list(LINEAR_CASES)


# ----------------------------------------------------------------------------- one op per layer
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ALL)
def test_one_custom_op_per_deployed_layer_forward(name, backend, monkeypatch):
    layer, x = _layer(name, backend)
    with torch.no_grad():
        expect = layer(x)
    # under a dispatch mode (and so under every tracer) the layer is one hybridops op
    with torch.no_grad(), _CountOps() as counter:
        y = layer(x)
    ours = [op for op in counter.ops if op.startswith("hybridops.")]
    assert ours == ["hybridops.hybrid_layer.default"]
    assert torch.equal(y, expect)
    # in eager inference it is one call of the op layer, which runs the implementation directly
    calls = []
    real = layer_op.hybrid_layer
    monkeypatch.setattr(layer_op, "hybrid_layer", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        assert torch.equal(layer(x), expect)
    assert len(calls) == 1
    # with gradients needed, the registered op: same value
    layer.fp_weight.requires_grad_(True)
    with _CountOps() as counter:
        y = layer(x)
    assert [op for op in counter.ops if op.startswith("hybridops.")] == ["hybridops.hybrid_layer.default"]
    assert torch.equal(y.detach(), expect)


def test_chained_codes_layer_is_one_op():
    """A quantized chain: the producer writes codes (its output is uint8 NHWC), the consumer
    reads them; each is one op."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    ho.hybridize_(model, ho.QuantConfig(), example_inputs=x)
    ho.deploy_(model, "torch")
    layers = [m for m in model.modules() if isinstance(m, ho.DeployedConv2d)]
    assert any(m.codes_input for m in layers) and any(m.out_bits is not None for m in layers)
    with torch.no_grad(), _CountOps() as counter:
        model(x)
    assert [op for op in counter.ops if op.startswith("hybridops.")] == ["hybridops.hybrid_layer.default"] * len(layers)


def test_compiled_graph_holds_one_op_per_deployed_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 10)).eval()
    x = torch.randn(2, 3, 6, 6)
    ho.hybridize_(model, ho.HybridConfig(keep=0.3), example_inputs=x)
    ho.deploy_(model, "torch")
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        expect = model(x)
        got = torch.compile(model, fullgraph=True, backend=capture)(x)
    assert torch.equal(got, expect)
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    n_layers = sum(isinstance(m, (ho.DeployedConv2d, ho.DeployedLinear)) for m in model.modules())
    assert sum("hybridops" in t for t in targets) == n_layers
    assert all(t.endswith("hybrid_layer.default") for t in targets if "hybridops" in t)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_backends_trace_with_fake_tensors(backend):
    """The GPU backends' layers trace on fake CUDA tensors (no GPU needed): one op, the fake
    kernel's shape."""
    with FakeTensorMode():
        layer = ho.DeployedConv2d(16, 32, 3, stride=2, padding=1, fp_out_channels=5, backend=backend, device="cuda")
        x = torch.randn(2, 16, 9, 8, device="cuda").contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            gm = make_fx(layer)(x)
            y = layer(x)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert calls == [torch.ops.hybridops.hybrid_layer.default]
    assert y.shape == (2, 32, 5, 4) and y.device.type == "cuda"
    assert y.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- opcheck and gradients
def _op_args(layer, x, residual=None):
    return (x, layer.w_packed, layer.scale, layer.bias, layer.in_qparams, layer.fp_weight, layer.fp_bias,
            layer.fp_in_idx, layer.fp_out_idx, layer.out_qparams, residual, layer.spec.to_ints(), layer.fp_dtype,
            layer.backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ALL)
def test_opcheck(name, backend):
    layer, x = _layer(name, backend)
    x4 = x.reshape(-1, x.shape[-1], 1, 1) if name in LINEAR_CASES else x
    layer.fp_weight.requires_grad_(True)
    torch.library.opcheck(torch.ops.hybridops.hybrid_layer.default, _op_args(layer, x4.requires_grad_(True)))


def _branch_reference(layer, x):
    """The differentiable part of a deployed layer in plain PyTorch autograd: the pruned branch
    (or, for a merged layer, the whole merged conv), scattered into the output channels."""
    s = layer.spec
    top, bottom, left, right = s.padding
    lin = s.kind == "linear"
    xx = x.reshape(-1, x.shape[-1], 1, 1) if lin else x
    if s.padding_mode != "zeros":
        xx = F.pad(xx, (left, right, top, bottom), mode=s.padding_mode)
        top = bottom = left = right = 0
    xx = F.pad(xx, (left, right, top, bottom))
    if s.path == "merged":
        w, b = layer_op.merged_weight_and_bias(s, layer.w_packed, layer.scale, layer.bias, layer.fp_weight,
                                               layer.fp_bias, layer.fp_in_idx, layer.fp_out_idx, x.dtype)
        return F.conv2d(xx, w, b, s.stride, 0, s.dilation, s.groups)
    xs = xx.index_select(1, layer.fp_in_idx) if layer.fp_in_idx is not None else xx
    k = layer.kept_channels
    fp = F.conv2d(xs, layer.fp_weight, layer.fp_bias, s.stride, 0, s.dilation, 1 if s.groups == 1 else k)
    out = fp.new_zeros((fp.shape[0], s.out_channels, *fp.shape[2:]))
    return out.index_add(1, layer.fp_out_idx, fp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_gradients_equal_autograd_of_the_float_branch(name, backend, relu):
    layer, x = _layer(name, backend)
    if relu and layer.path in ("hybrid", "merged"):
        layer.relu = True
    elif relu:
        pytest.skip("fusion sets relu only on integer and merged layers")
    layer.fp_weight.requires_grad_(True)
    x.requires_grad_(True)
    y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    params = [p for p in (x, layer.fp_weight, layer.fp_bias) if p is not None]
    got = torch.autograd.grad(y, params, g, allow_unused=True)
    if layer.kept_channels == 0 and layer.path != "merged":  # integer arithmetic only: no gradient
        assert all(a is None or not a.any() for a in got)
        return
    ref_out = _branch_reference(layer, x)
    gmask = g.reshape(ref_out.shape) * ((y > 0).reshape(ref_out.shape) if layer.relu else 1)
    expect = torch.autograd.grad(ref_out, params, gmask, allow_unused=True)
    for a, b in zip(got, expect):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_branch_gradients_follow_the_branch_dtype():
    layer, x = _layer("hybrid", "torch")
    layer.set_fp_dtype_(torch.bfloat16)
    layer.fp_weight.requires_grad_(True)
    y = layer(x)
    (gw,) = torch.autograd.grad(y.sum(), [layer.fp_weight])
    layer.set_fp_dtype_(None)
    (gw32,) = torch.autograd.grad(layer(x).sum(), [layer.fp_weight])
    assert gw.dtype == torch.float32
    torch.testing.assert_close(gw, gw32, rtol=2e-2, atol=2e-2)  # bf16 rounding of the branch input


# ----------------------------------------------------------------------------- spec and checks
def test_spec_round_trip_and_bad_specs():
    layer, _ = _layer("hybrid_reflect", "torch")
    ints = layer.spec.to_ints()
    assert len(ints) == SPEC_INTS and spec_from_ints(ints) == layer.spec
    base = dict(kind="conv2d", in_channels=8, out_channels=8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1),
                dilation=(1, 1), groups=1, padding_mode="zeros", bits_w=4, bits_a=4, a_signed=False)
    for change, match in ((dict(groups=3), "groups=3 must divide"), (dict(bits_w=9), "bits_w"),
                          (dict(bits_w=None), "bits_a is the quantized branch's input format"),
                          (dict(padding=(1, -1, 0, 0)), "padding must be four non-negative"),
                          (dict(kind="conv1d"), "kind must be one of"),
                          (dict(padding_mode="mirror"), "padding_mode must be one of"),
                          (dict(kind="linear"), "a linear layer is a 1x1"),
                          (dict(bits_a=None, out_bits=4), "only an integer layer"),
                          (dict(codes_input=True, padding_mode="reflect"), "codes as input"),
                          (dict(residual=True, bits_a=None), "adds a residual in its epilogue"),
                          (dict(residual=True, out_bits=4), "cannot also re-quantize")):
        with pytest.raises(ValueError, match=match):
            LayerSpec(**{**base, **change})
    with pytest.raises(ValueError, match="23 ints"):
        spec_from_ints(ints[:-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_call_input_errors(backend):
    layer, x = _layer("hybrid", backend)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"expects input \(N, 12, H, W\), got \(2, 11, 7, 6\)"):
            layer(x[:, :11])
        with pytest.raises(ValueError, match="expects a floating-point input, got torch.int64"):
            layer(x.long())
        with pytest.raises(ValueError, match=r"expects input \(N, 12, H, W\)"):
            layer(x[0])
        assert layer(x[:0]).shape == (0, 16, 7, 6)  # an empty batch is an empty result


def test_load_validates_the_tensors():
    layer, _ = _layer("hybrid", "torch")
    state = layer.state_dict()
    state["fp_out_idx"] = torch.tensor([0, 1, 2, 3, 99])
    fresh, _ = _layer("hybrid", "torch")
    with pytest.raises(ValueError, match=r"fp_out_idx must index channels in \[0, 16\)"):
        fresh.load_state_dict(state)
    state["fp_out_idx"] = torch.tensor([0, 1, 2, 3, 3])
    with pytest.raises(ValueError, match="distinct"):
        fresh.load_state_dict(state)


def test_an_index_edited_in_place_is_checked_before_the_kernels_read_it():
    layer, x = _layer("hybrid", "torch")
    with torch.no_grad():
        layer.fp_out_idx[0] = 40
        with pytest.raises(ValueError, match=r"fp_out_idx must index channels in \[0, 16\)"):
            layer(x)


def test_the_op_validates_every_argument():
    layer, x = _layer("hybrid", "torch")
    args = list(_op_args(layer, x))
    args[2] = torch.ones(15)
    with pytest.raises(ValueError, match=r"scale must be float32 \(16,\)"):
        torch.ops.hybridops.hybrid_layer(*args)
    args = list(_op_args(layer, x))
    args[1] = args[1][:, :, :, :-1]
    with pytest.raises(ValueError, match="w_packed must be uint8"):
        torch.ops.hybridops.hybrid_layer(*args)


def test_a_replaced_tensor_is_checked_before_the_kernels_read_it():
    layer, x = _layer("hybrid", BACKENDS[-1])
    layer.fp_out_idx = torch.tensor([0, 1, 2, 3, 6000000])
    with torch.no_grad(), pytest.raises(ValueError, match=r"fp_out_idx must index channels in \[0, 16\)"):
        layer(x)
    layer, x = _layer("hybrid", BACKENDS[-1])
    layer.fp_weight = nn.Parameter(torch.zeros(4, 12, 3, 3))
    with torch.no_grad(), pytest.raises(ValueError, match=r"fp_bias must be float \(4,\), got torch.float32 \(5,\)"):
        layer(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_only_the_branch_bias(backend):
    layer, x = _layer("hybrid", backend)
    layer.fp_weight.requires_grad_(False)
    layer.fp_bias.requires_grad_(True)
    (gb,) = torch.autograd.grad(layer(x).sum(), [layer.fp_bias])
    # d sum / d fp_bias[j] = number of output positions (no ReLU)
    torch.testing.assert_close(gb, torch.full_like(gb, 2 * 7 * 6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_smaller_than_the_kernel_is_one_sentence(backend):
    layer, _ = _layer("hybrid_sliced_in", backend)  # 3x3, stride 2, padding (1, 0, 2, 1)
    with torch.no_grad(), pytest.raises(ValueError, match=r"empty output \(0x.*\): input 1x5 is smaller"):
        layer(torch.randn(1, 12, 1, 5))


def test_identity_indices_are_constants_not_evicted():
    for c in range(1, 3 * derived.PER_SOURCES):
        layer_op._identity_index(c, torch.device("cpu"))
    first = layer_op._identity_index(1, torch.device("cpu"))
    assert first is layer_op._identity_index(1, torch.device("cpu")) and torch.equal(first, torch.arange(1))


def test_clearing_the_cache_while_entries_free_each_other():
    """Dropping a trainable layer's deployed twin frees its tensors, whose callbacks drop the
    entries derived from them: clearing the cache then must not trip over them."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    x = torch.randn(1, 3, 8, 8)
    ho.hybridize_(conv, ho.HybridConfig(keep=0.5), example_inputs=x)
    with torch.no_grad():
        conv.eval()(x)
    assert derived.size("deployed_twin") >= 1
    derived.clear()
    assert derived.size() == 0


@pytest.mark.parametrize("hw,layout", [(1, "nchw"), (6, "channels_last"), (1, "channels_last")])
def test_inplace_relu_after_a_layer_in_grad_mode(hw, layout):
    # the op's output may be a view of its NHWC result (a permute; a 1x1 output's contiguous());
    # autograd forbids in-place ops on a view made inside a custom op, which ReLU(inplace=True) is
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(inplace=True)).eval()
    x = torch.randn(2, 8, hw, hw)
    ho.hybridize_(model, ho.HybridConfig(keep=0.5, fp_first_input=False), example_inputs=x)
    ho.deploy_(model, "torch", fuse=False)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y = model(x)
    y.sum().backward()
    assert model[0].fp_weight.grad is not None and torch.equal(y, y.clamp_min(0))


# ----------------------------------------------------------------------------- residual layers
RESIDUAL_CASES = ["hybrid", "hybrid_sliced_in", "hybrid_grouped", "hybrid_signed", "quant_only", "linear_hybrid"]


def _residual_layer(name, backend, dtype=torch.float32, channels_last=False):
    """A layer with ``relu(layer(x) + residual)`` in its epilogue, its input, a residual of its
    output's shape, and the unfused result (the plain layer, then torch's add and ReLU)."""
    layer, x = _layer(name, backend)
    layer = layer.to(dtype)
    x = x.to(dtype)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        plain = layer(x)
    r = torch.randn(plain.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    if channels_last and r.dim() == 4:
        r = r.contiguous(memory_format=torch.channels_last)
    layer.set_residual_()
    layer.relu = True
    return layer, x, r, torch.relu(plain + r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", RESIDUAL_CASES)
def test_residual_epilogue_equals_the_unfused_add_and_relu(name, backend, dtype, channels_last):
    """``layer(x, r)`` is the unfused model's ``relu(layer(x) + r)`` bit for bit, in fp32 and in
    bf16 (the layer's output rounded to bf16 before the add, as the unfused add sees it)."""
    layer, x, r, expect = _residual_layer(name, backend, dtype, channels_last)
    with torch.no_grad():
        y = layer(x, r)
    assert y.dtype == dtype and y.shape == expect.shape
    assert torch.equal(y, expect)
    if channels_last and y.dim() == 4:
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert "epilogue=add+relu" in repr(layer)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_of_another_shape_or_dtype_is_added_as_torch_adds(backend):
    """A skip connection that broadcasts or promotes (the fusion pass cannot see shapes) still
    computes what the unfused model does: the plain layer, then torch's add and ReLU."""
    layer, x, r, _ = _residual_layer("hybrid", backend)
    with torch.no_grad():
        plain = layer._forward(x, plain=True)
        for other in (r[:, :, :1], r[:1], r.double(), torch.tensor(0.5)):
            assert torch.equal(layer(x, other), torch.relu(plain + other))
    lin, xl, rl, _ = _residual_layer("linear_hybrid", backend)
    with torch.no_grad():
        plain = lin._forward(xl.reshape(-1, 20, 1, 1), plain=True).reshape(4, 7)
        assert torch.equal(lin(xl, rl[:1]), torch.relu(plain + rl[:1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_errors(backend):
    layer, x, r, _ = _residual_layer("hybrid", backend)
    with torch.no_grad():
        with pytest.raises(ValueError, match="adds a residual in its epilogue .* call it with the residual"):
            layer(x)
        plain, _ = _layer("hybrid", backend)
        with pytest.raises(ValueError, match="adds no residual in its epilogue: call it without one"):
            plain(x, r)
    args = list(_op_args(layer, x, r[:, :3]))
    with pytest.raises(ValueError, match=r"the residual must be the layer's output shape \(2, 16, 7, 6\)"):
        torch.ops.hybridops.hybrid_layer(*args)
    quant, _, _, _ = _residual_layer("quant_only", backend)
    with pytest.raises(ValueError, match="cannot also re-quantize"):
        quant.set_output_codes_(torch.tensor([0.5, 0.0]), 4, False)
    merged, _ = _layer("merged", backend)
    with pytest.raises(ValueError, match="only an integer layer"):
        merged.set_residual_()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["hybrid", "quant_only"])
def test_residual_opcheck_and_gradients(name, backend):
    layer, x, r, _ = _residual_layer(name, backend)
    layer.fp_weight.requires_grad_(True)
    torch.library.opcheck(torch.ops.hybridops.hybrid_layer.default,
                          _op_args(layer, x.clone().requires_grad_(True), r.clone().requires_grad_(True)))
    # gradients: the residual's is the output's through the ReLU; the rest as without a residual
    x.requires_grad_(True)
    r.requires_grad_(True)
    y = layer(x, r)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    params = [p for p in (x, r, layer.fp_weight) if p is not None]
    gx, gr, gw = torch.autograd.grad(y, params, g, allow_unused=True)
    torch.testing.assert_close(gr, g * (y > 0), rtol=0, atol=0)
    if layer.kept_channels:
        ref_out = _branch_reference(layer, x)
        ex, ew = torch.autograd.grad(ref_out, [x, layer.fp_weight], g * (y > 0))
        torch.testing.assert_close(gx, ex, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gw, ew, rtol=1e-5, atol=1e-5)
    else:
        assert gx is None or not gx.any()


@pytest.mark.skipif("onednn" not in BACKENDS, reason="the onednn backend is not available here")
@pytest.mark.parametrize("name", ["quant_only", "hybrid_signed"])
def test_residual_epilogue_on_onednn_equals_the_reference(name):
    """The onednn backend adds the residual in its C++ epilogue, the reference after its conv:
    integer accumulators exact, the same fp32 operations in the same order, so the same bits
    (a layer without a pruned branch; a pruned branch's float conv sums in another order)."""
    layer, x, r, _ = _residual_layer(name, "onednn")
    ref, _, _, _ = _residual_layer(name, "torch")
    with torch.no_grad():
        if layer.kept_channels:
            ref.fp_weight.zero_()
            layer.fp_weight.zero_()
        assert torch.equal(layer(x, r), ref(x, r))
