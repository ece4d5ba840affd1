"""``hybridops::quantized_attention`` (hybridops/ops/attention.py, docs/attention.md): the
reference's exact integer scores, every backend against the reference, masks, non-finite inputs,
argument checks, ``opcheck`` and gradients.

Backends: ``torch`` (the reference), ``onednn`` (CPU: ``kernels/onednn_attention.py``) and
``triton`` (``kernels/attention.py``; on a CPU-only machine under ``TRITON_INTERPRET=1`` at small
shapes, float32 and float16 only: the interpreter converts to bf16 by truncation, docs/gpu.md). A
backend that cannot run here is skipped with its reason.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from hybridops.backend_selection import backend_unavailable_reason
from hybridops.kernels.packing import levels
from hybridops.ops.attention import check_attention_args
from hybridops.ops import reference as R
from hybridops.quant import interval_hat, qparams

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ops = torch.ops.hybridops
INTERPRETED = DEVICE.type == "cpu"

# Tolerances against the reference. fp32: the scores are bitwise equal, the softmax and P @ V sum
# in another order (the triton kernel's online softmax rescales partial sums): a few fp32 ulps.
# fp16: the output's final rounding (2^-11 relative) on each side. bf16 (onednn, and triton on a
# GPU): P is rounded to bf16 before P @ V (2^-9 of |V|), and quantized V's product is rounded to
# bf16 before the step multiply; with the reference's own final rounding, about 3 bf16 ulps of
# |out| plus 2^-9 of max |V|. atol is relative to max |V_hat| (the scale of every output).
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _backends():
    out = []
    for name in ("torch", "onednn", "triton"):
        reason = backend_unavailable_reason(name, DEVICE)
        out.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return out


def _case(b, h, lq, lk, d, dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, h, lq, d, generator=g), torch.randn(b, h, lk, d, generator=g)
    v = torch.randn(b, h, lk, dv, generator=g)
    return [t.to(dtype).to(DEVICE) for t in (q, k, v)]


def _qp(c: float, d: float) -> torch.Tensor:
    return qparams(torch.tensor(c), torch.tensor(d)).to(DEVICE)


def _clip(x: float) -> torch.Tensor:
    return torch.tensor(x, device=DEVICE)


def _args(q, k, v, bits=4, v_quantized=True, attn_mask=None, is_causal=False, sm_scale=None):
    """The op's arguments: intervals [0, 2] for q and k (c = d = 1), [0, 2.5] for v; clip = c + d."""
    qp, vqp = _qp(1.0, 1.0), _qp(1.25, 1.25)
    return (q, k, v, qp, qp, vqp if v_quantized else None, _clip(2.0), _clip(2.0),
            _clip(2.5) if v_quantized else None, bits, attn_mask, is_causal, sm_scale)


def _skip_interpreter_dtype(backend, dtype):
    if backend == "triton" and INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("bf16 is wrong in the Triton interpreter")


def _assert_close_to_reference(out, ref, v_scale, dtype):
    rtol, atol = TOL[dtype]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol * v_scale)


# ----------------------------------------------------------------------------- integer scores
def test_reference_int_scores_are_exact_at_8_bits():
    """Every code at +-127 and D = 128 (|S_int| = 2,064,512 > 2^16): against an int64 product."""
    q, k, _ = _case(2, 2, 9, 11, 128, 8)
    q[0, 0, :3] = 50.0  # far past the clip: code 127
    k[0, 0, :2] = -50.0
    qp = _qp(1.0, 1.0)
    s = R.attention_int_scores(q.cpu(), k.cpu(), qp.cpu(), qp.cpu(), 8)
    cq = R.codes_from_qparams(q.cpu(), qp.cpu(), 8, True).long()
    ck = R.codes_from_qparams(k.cpu(), qp.cpu(), 8, True).long()
    assert s.dtype == torch.int32
    assert torch.equal(s.long(), torch.einsum("bhid,bhjd->bhij", cq, ck))
    assert int(s[0, 0, 0, 0]) == -128 * 127 * 127


@pytest.mark.skipif(backend_unavailable_reason("onednn", "cpu") is not None, reason="needs the onednn backend")
@pytest.mark.parametrize("exact_int_mm,small", [(True, False), (True, True), (False, False)],
                         ids=["int_mm", "small_batched_float", "float_fallback"])
def test_onednn_codes_and_int_scores_equal_the_reference(exact_int_mm, small, monkeypatch):
    """The onednn path's int8 codes and its integer product (torch._int_mm per head; one batched
    float product of the codes for small heads, or where the CPU's int8 GEMM is not exact) equal
    the reference exactly."""
    from hybridops.kernels import onednn_attention as oa

    if exact_int_mm and not oa.int_mm_exact():
        pytest.skip("torch._int_mm is not exact on this CPU (the float fallback is tested)")
    monkeypatch.setattr(oa, "int_mm_exact", lambda: exact_int_mm)
    monkeypatch.setattr(oa, "SMALL_PRODUCT", 1 << 40 if small else 0)
    q, k, _ = _case(1, 3, 33, 20, 64, 8, seed=1)
    q = q.cpu() * 3
    k = k.cpu() * 3
    qp = _qp(1.0, 1.0).cpu()
    for bits in (4, 8):
        cq, ck = oa.codes(q, qp, bits), oa.codes(k, qp, bits)
        assert cq.dtype == torch.int8 and torch.equal(cq.to(torch.int16), R.attention_codes(q, qp, bits))
        s = oa.int_scores(cq.flatten(0, 1), ck.transpose(-1, -2).flatten(0, 1).contiguous())
        assert torch.equal(s.view(1, 3, 33, 20), R.attention_int_scores(q, k, qp, qp, bits))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("bits,d", [(4, 32), (6, 64)])
def test_integer_scores_through_the_output(backend, bits, d):
    """With V = identity (float), the output row is P, and ``log P_ij - log P_i0 = (S_ij - S_i0) *
    s_qk``: rounding recovers the integer score differences, which must equal the reference's
    exactly (an integer product off by one anywhere shows)."""
    lk = 24
    q, k, _ = _case(1, 2, 20, lk, d, lk, seed=2)
    v = torch.eye(lk, device=DEVICE).expand(1, 2, lk, lk).contiguous()
    args = _args(q, k, v, bits=bits, v_quantized=False, sm_scale=0.5 / d)
    p = ops.quantized_attention(*args, backend).double()
    s_qk, _ = R.attention_scales(args[6], args[7], None, bits, args[12], d, torch.float32)
    diff = torch.round((p.log() - p[..., :1].log()) / float(s_qk)).long()
    s = R.attention_int_scores(q.cpu(), k.cpu(), args[3].cpu(), args[4].cpu(), bits).long()
    assert torch.equal(diff.cpu(), s - s[..., :1])
    assert s.abs().max() > 100  # the check had integers to get wrong


# ----------------------------------------------------------------------------- against the reference
MASKS = ["none", "causal", "bool", "bool_2d", "float", "float_b1"]


def _mask(kind, b, h, lq, lk, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    if kind in ("none", "causal"):
        return None
    if kind == "bool":
        return (torch.rand(b, h, lq, lk, generator=g) > 0.3).to(DEVICE)
    if kind == "bool_2d":
        return (torch.rand(lq, lk, generator=g) > 0.5).to(DEVICE)
    m = torch.randn(b, h if kind == "float" else 1, lq if kind == "float" else 1, lk, generator=g)
    m[..., ::5] = float("-inf")
    return m.to(dtype).to(DEVICE)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("v_quantized", [True, False], ids=["v_codes", "v_float"])
def test_matches_reference(backend, dtype, mask, v_quantized):
    _skip_interpreter_dtype(backend, dtype)
    b, h, lq, lk, d, dv = 2, 2, 37, 45, 32, 24
    q, k, v = _case(b, h, lq, lk, d, dv, dtype)
    args = _args(q, k, v, bits=5, v_quantized=v_quantized, attn_mask=_mask(mask, b, h, lq, lk, dtype),
                 is_causal=mask == "causal")
    out = ops.quantized_attention(*args, backend)
    _assert_close_to_reference(out, R.quantized_attention(*args), 2.5 if v_quantized else 4.0, dtype)


@pytest.mark.skipif(backend_unavailable_reason("onednn", "cpu") is not None, reason="needs the onednn backend")
@pytest.mark.parametrize("mask", ["causal", "bool", "float_b1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("small", [False, True], ids=["int_mm", "small_batched_float"])
def test_onednn_head_groups(mask, dtype, small, monkeypatch):
    """The onednn path runs the batch's heads (2 x 7, as one axis) in groups that fit its score
    buffer: groups of 3 that straddle the batch elements (the last one partial), each mask kind
    read per group, with either integer product."""
    from hybridops.kernels import onednn_attention as oa

    b, h, lq, lk = 2, 7, 20, 28
    monkeypatch.setattr(oa, "SCORE_BYTES", 3 * 4 * lq * lk)
    monkeypatch.setattr(oa, "SMALL_PRODUCT", 1 << 40 if small else 0)
    assert oa.heads_per_group(lq, lk, h) == 3
    q, k, v = _case(b, h, lq, lk, 32, 16, dtype, seed=12)
    args = _args(q, k, v, attn_mask=_mask(mask, b, h, lq, lk, dtype), is_causal=mask == "causal")
    _assert_close_to_reference(ops.quantized_attention(*args, "onednn"), R.quantized_attention(*args), 2.5, dtype)


@pytest.mark.skipif(backend_unavailable_reason("onednn", "cpu") is not None, reason="needs the onednn backend")
@pytest.mark.parametrize("mask", MASKS + ["float_learned", "bool_3d", "dead_rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bits", [4, 8])
def test_onednn_flash_path_matches_reference(mask, dtype, bits, monkeypatch):
    """For long sequences where V has Q's head dim, the onednn backend runs PyTorch's CPU flash
    attention kernel on the codes (kernels/onednn_attention.py; the length threshold lowered here):
    every mask form the op takes (bool and additive, 2-D to 4-D, a learned bias that requires
    grad, rows that attend no key: 0), causal, each dtype."""
    from hybridops.kernels import onednn_attention as oa

    calls = []
    flash = oa._flash
    monkeypatch.setattr(oa, "_flash", lambda *a: calls.append(1) or flash(*a))
    monkeypatch.setattr(oa, "FLASH_MIN_SCORES", 0)
    b, h, lq, lk, d = 2, 3, 37, 45, 32
    q, k, v = _case(b, h, lq, lk, d, d, dtype, seed=21)
    if mask == "float_learned":
        m = torch.randn(1, h, lq, lk, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    elif mask == "bool_3d":
        m = torch.rand(h, lq, lk, generator=torch.Generator().manual_seed(2)) > 0.3
    elif mask == "dead_rows":
        m = torch.rand(b, h, lq, lk, generator=torch.Generator().manual_seed(3)) > 0.3
        m[0, 1, 4] = False
        m[1, 2, 30] = False
    else:
        m = _mask(mask, b, h, lq, lk, dtype)
    args = _args(q, k, v, bits=bits, attn_mask=m, is_causal=mask == "causal")
    out = ops.quantized_attention(*args, "onednn")
    assert calls, "the flash path was not taken"
    _assert_close_to_reference(out, R.quantized_attention(*args), 2.5, dtype)
    if mask == "dead_rows":
        assert torch.equal(out[0, 1, 4], torch.zeros(d, dtype=dtype)) and torch.equal(out[1, 2, 30], out[0, 1, 4])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("shape", [(1, 2, 19, 70, 64, 64), (1, 1, 70, 19, 128, 128), (2, 1, 8, 8, 8, 8),
                                   (1, 2, 40, 33, 96, 40)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_head_dims_and_lengths(backend, shape, is_causal):
    """Head dims 8 (padded to the int8 K of 32), 64, 128 (unpadded) and 96 / 40 (padded to a power
    of two); more queries than keys and fewer, causal or not; 8-bit codes."""
    q, k, v = _case(*shape, seed=4)
    args = _args(q, k, v, bits=8, is_causal=is_causal)
    _assert_close_to_reference(ops.quantized_attention(*args, backend), R.quantized_attention(*args), 2.5,
                               torch.float32)


def test_close_to_float_attention_at_8_bits():
    """With 8-bit codes and clips at max |x| the op is float attention up to quantization error;
    causal is aligned top-left like F.scaled_dot_product_attention (Lq > Lk and Lq < Lk)."""
    for lq, lk in ((30, 12), (12, 30)):
        q, k, v = _case(1, 2, lq, lk, 32, 16, seed=5)
        qp = lambda t: _qp(t.abs().max().item() / 2, t.abs().max().item() / 2)  # noqa: E731
        args = (q, k, v, qp(q), qp(k), qp(v), q.abs().max(), k.abs().max(), v.abs().max(), 8, None, True, None)
        out = ops.quantized_attention(*args, "torch")
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert (out - sdpa).abs().max() < 0.05
        flipped = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(lq, lk, dtype=torch.bool).triu())
        assert (out - flipped).abs().max() > 0.1  # the test tells alignments apart


@pytest.mark.parametrize("backend", _backends())
def test_fully_masked_rows_are_zero_like_sdpa(backend):
    q, k, v = _case(1, 2, 6, 9, 16, 8, seed=6)
    keep = torch.rand(1, 2, 6, 9, generator=torch.Generator().manual_seed(0)) > 0.4
    keep[0, 1, 2] = False
    keep[0, 0, 5] = False
    add = torch.zeros(1, 2, 6, 9).masked_fill(~keep, float("-inf"))
    for m in (keep, add):
        m = m.to(DEVICE)
        out = ops.quantized_attention(*_args(q, k, v, attn_mask=m), backend)
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        for bh, row in ((1, 2), (0, 5)):
            assert torch.equal(out[0, bh, row], torch.zeros(8, device=DEVICE))
            assert torch.equal(sdpa[0, bh, row], torch.zeros(8, device=DEVICE))  # torch's own rule, documented
        assert bool(torch.isfinite(out).all()) and out.abs().sum() > 0


# ----------------------------------------------------------------------------- non-finite, empty
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("v_quantized", [True, False], ids=["v_codes", "v_float"])
def test_nonfinite_inputs_reach_what_they_reach(backend, v_quantized):
    """Causal: a NaN in q's row 3 makes output row 3 NaN; +inf in k's row 5 makes rows >= 5 NaN;
    NaN in v[7, 2] makes column 2 of rows >= 7 NaN; the rest equals the clean computation."""
    lq = lk = 12
    q, k, v = _case(1, 1, lq, lk, 16, 8, seed=7)
    clean = ops.quantized_attention(*_args(q, k, v, v_quantized=v_quantized, is_causal=True), backend)
    q[0, 0, 3, 4] = float("nan")
    k[0, 0, 5, 1] = float("inf")
    v[0, 0, 7, 2] = float("nan")
    out = ops.quantized_attention(*_args(q, k, v, v_quantized=v_quantized, is_causal=True), backend)
    expect = torch.zeros(lq, 8, dtype=torch.bool)
    expect[3] = True
    expect[5:] = True
    expect[7:, 2] = True
    assert torch.equal(torch.isnan(out[0, 0]).cpu(), expect)
    rows = torch.tensor([0, 1, 2, 4])
    # the rows no bad value reaches read none of the changed codes: bitwise the clean result
    torch.testing.assert_close(out[0, 0, rows], clean[0, 0, rows], rtol=0, atol=0)


@pytest.mark.parametrize("backend", _backends())
def test_empty_inputs(backend):
    q, k, v = _case(0, 2, 5, 7, 16, 8)
    out = ops.quantized_attention(*_args(q, k, v), backend)
    assert out.shape == (0, 2, 5, 8) and out.dtype == q.dtype
    q, k, v = _case(1, 2, 5, 0, 16, 8)
    out = ops.quantized_attention(*_args(q, k, v), backend)
    assert torch.equal(out, torch.zeros(1, 2, 5, 8, device=DEVICE))
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


# ----------------------------------------------------------------------------- argument checks
def _bad(change):
    q, k, v = _case(1, 2, 4, 5, 16, 8)
    args = list(_args(q, k, v))
    change(args)
    return args


BAD = [
    (lambda a: a.__setitem__(0, a[0].to(torch.int32)), "expects float32, bfloat16, float16 or float64 inputs"),
    (lambda a: a.__setitem__(1, a[1].double()), "must share one dtype"),
    (lambda a: a.__setitem__(0, a[0][0]), r"expects q of shape \(B, H, L, D\)"),
    (lambda a: a.__setitem__(0, a[0][..., :12]), "k's head dim must equal q's"),
    (lambda a: [a.__setitem__(i, a[i][..., :12]) for i in (0, 1)], "multiples of 8"),
    (lambda a: a.__setitem__(1, a[1][:, :1]), "same batch and head counts"),
    (lambda a: a.__setitem__(2, a[2][:, :, :3]), "one row per key"),
    (lambda a: a.__setitem__(10, torch.ones(3, 5, dtype=torch.bool)), "does not broadcast"),
    (lambda a: a.__setitem__(10, torch.ones(4, 5, dtype=torch.int32)), "must be bool"),
    (lambda a: (a.__setitem__(10, torch.ones(4, 5, dtype=torch.bool)), a.__setitem__(11, True)), "not both"),
    (lambda a: a.__setitem__(9, 9), r"bits must be an integer in \[2, 8\]"),
    (lambda a: a.__setitem__(9, 1), r"bits must be an integer in \[2, 8\]"),
    (lambda a: a.__setitem__(3, a[3].double()), "q_qparams must be a float32 tensor"),
    (lambda a: a.__setitem__(6, torch.tensor([2.0])), "q_clip must be a 0-d float32 tensor"),
    (lambda a: a.__setitem__(5, None), "v_qparams and v_clip must be given together"),
    (lambda a: a.__setitem__(12, float("nan")), "sm_scale must be a finite float"),
]


@pytest.mark.parametrize("change,match", BAD, ids=[m[:24] for _, m in BAD])
def test_bad_arguments_raise_one_sentence(change, match):
    with pytest.raises(ValueError, match=match) as info:
        ops.quantized_attention(*_bad(change), "torch")
    msg = str(info.value)
    assert msg.endswith(".") and msg.count(". ") == 0, msg


def test_mixed_devices_raise_one_sentence():
    """Checked on the argument checker itself: a meta tensor among CPU ones dispatches the op to its
    fake kernel, and a second real device needs a GPU."""
    args = _bad(lambda a: a.__setitem__(1, a[1].to("meta")))
    with pytest.raises(ValueError, match="must be on one device"):
        check_attention_args(*args)


def test_backend_without_the_kernel_says_so():
    q, k, v = _case(1, 1, 4, 4, 16, 8)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ops.quantized_attention(*_args(q, k, v), "nope")
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        ops.quantized_attention(*_args(q, k, v), "cuda")


@pytest.mark.skipif(backend_unavailable_reason("triton", DEVICE) is not None, reason="needs the triton backend")
def test_triton_refuses_float64():
    q, k, v = _case(1, 1, 4, 4, 16, 8, torch.float64)
    with pytest.raises(ValueError, match="use backend='torch' for float64"):
        ops.quantized_attention(*_args(q, k, v), "triton")


# ----------------------------------------------------------------------------- opcheck, gradients
@pytest.mark.parametrize("v_quantized,mask", [(True, "bool"), (False, "float")])
def test_opcheck(v_quantized, mask):
    q, k, v = [t.requires_grad_() for t in _case(1, 2, 5, 6, 16, 8, seed=8)]
    args = list(_args(q, k, v, v_quantized=v_quantized, attn_mask=_mask(mask, 1, 2, 5, 6, torch.float32)))
    args[6] = args[6].clone().requires_grad_()
    torch.library.opcheck(ops.quantized_attention.default, (*args, "torch"))


def test_gradcheck_clips_and_float_v():
    """The output is smooth in the clips and in a float V (codes do not move with them):
    gradcheck them in float64, with a mask that leaves a row empty (its gradients are 0)."""
    q, k, v = _case(1, 2, 5, 6, 16, 8, torch.float64, seed=9)
    mask = (torch.rand(1, 2, 5, 6, generator=torch.Generator().manual_seed(1)) > 0.3)
    mask[0, 0, 1] = False
    qp = _qp(1.0, 1.0)
    clips = [torch.tensor(c, dtype=torch.float64, requires_grad=True) for c in (2.0, 1.5, 2.5)]
    v = v.requires_grad_()

    def v_float(v, qc, kc):
        return ops.quantized_attention(q, k, v, qp, qp, None, qc, kc, None, 4, mask, False, 0.3, "torch")

    def v_codes(qc, kc, vc):
        return ops.quantized_attention(q, k, v.detach(), qp, qp, qp, qc, kc, vc, 6, None, True, None, "torch")

    assert torch.autograd.gradcheck(v_float, (v, clips[0], clips[1]))
    assert torch.autograd.gradcheck(v_codes, tuple(clips))


def test_straight_through_gradients():
    """Gradients to q, k, v and to each quantizer's (c, d) equal those of the same attention
    written with the package's differentiable quantizer, ``interval_hat``, as a straight-through
    estimator (value: the codes; gradient: hat's), in float64."""
    bits, sm = 5, 0.25
    lv = levels(bits, True)
    q, k, v = [t.requires_grad_() for t in _case(1, 2, 7, 9, 16, 8, torch.float64, seed=10)]
    cds = [(torch.tensor(c, dtype=torch.float64, requires_grad=True),
            torch.tensor(d, dtype=torch.float64, requires_grad=True)) for c, d in ((0.8, 1.0), (0.5, 1.2), (1.0, 1.1))]
    clips = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (1.8, 1.7, 2.1)]
    w = torch.randn(1, 2, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    leaves = [q, k, v, *[t for cd in cds for t in cd], *clips]

    qps = [qparams(c, d) for c, d in cds]
    out = ops.quantized_attention(q, k, v, *qps, *clips, bits, None, True, sm, "torch")
    got = torch.autograd.grad((out * w).sum(), leaves)

    def ste(x, cd, qp, clip):
        hat = interval_hat(x, *cd, signed=True)
        codes = R.attention_codes(x.detach(), qp.detach(), bits).to(x.dtype) / lv
        return (hat + (codes - hat).detach()) * clip

    qd, kd, vd = (ste(x, cd, qp, clip) for x, cd, qp, clip in zip((q, k, v), cds, qps, clips))
    s = (qd @ kd.transpose(-1, -2)) * sm
    s = s.masked_fill(~torch.ones(7, 9, dtype=torch.bool).tril(), float("-inf"))
    want = torch.autograd.grad(((s.softmax(-1) @ vd) * w).sum(), leaves)
    for name, a, b in zip("q k v cq dq ck dk cv dv clip_q clip_k clip_v".split(), got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
        assert b.abs().sum() > 0, name


def test_bf16_gradients_reach_every_input():
    q, k, v = [t.requires_grad_() for t in _case(1, 2, 6, 6, 16, 8, torch.bfloat16, seed=11)]
    out = ops.quantized_attention(*_args(q, k, v), "torch")
    out.float().sum().backward()
    for t in (q, k, v):
        assert t.grad.dtype == torch.bfloat16 and t.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- triton codegen
def _compile_attention_variants() -> list:
    """PTX facts of the flash kernel compiled for sm_90 (no GPU needed): one row per variant."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import hybridops.kernels.attention as A
    from test_triton_codegen import ptxas_usage

    rows = []
    variants = [(dt, d, 2, True) for dt in ("*fp32", "*bf16") for d in (32, 64, 128)]
    variants += [("*bf16", 64, 1, False), ("*fp16", 32, 0, True)]  # float V, bool mask; fp16 causal
    for out_dt, d, mask, v_codes in variants:
        sig = {"qc_ptr": "*i8", "kc_ptr": "*i8", "v_ptr": "*i8" if v_codes else out_dt, "out_ptr": out_dt,
               "mask_ptr": "*u8" if mask == 1 else "*fp32", "scal_ptr": "*fp32"}
        consts = dict(CAUSAL=mask == 0, MASK=mask, V_CODES=v_codes, P_BF16=out_dt == "*bf16", BLOCK_M=A._BLOCK_M,
                      BLOCK_N=A._BLOCK_N, BLOCK_D=d, BLOCK_DV=d)
        full = {n: ("constexpr" if n in consts else sig.get(n, "i32")) for n in A._attention_kernel.arg_names}
        ptx = triton.compile(ASTSource(A._attention_kernel, full, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                             options=dict(num_warps=A._NUM_WARPS, **A.LAUNCH_OPTS)).asm["ptx"]
        rows.append({"variant": f"{out_dt} D={d} mask={mask} v_codes={v_codes}", "spill": ptxas_usage(ptx),
                     "mma": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(\S+);?", ptx)))})
    return rows


@pytest.mark.slow
def test_triton_attention_compiles_for_hopper_on_int8_tensor_cores():
    """Compiled (Triton's real compiler, in a subprocess without TRITON_INTERPRET): Q K^T is an
    int8 wgmma with int32 accumulators at every head dim, bf16 P @ V a bf16 wgmma, and no variant
    spills registers."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_quantized_attention as t; "
            "print(json.dumps(t._compile_attention_variants()))")
    run = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(rows) == 8
    for r in rows:
        assert r["spill"] == 0, r
        assert any(m.endswith(".s32.s8.s8") for m in r["mma"]), r
        assert any(m.endswith(".f32.bf16.bf16") for m in r["mma"]) == ("*bf16" in r["variant"]), r
