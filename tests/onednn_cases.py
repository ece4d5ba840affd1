"""The onednn backend's integer conv against the reference: the case generator and the check,
shared by tests/test_onednn.py and bench/fuzz_onednn.py (imported by name: pytest puts this
folder on sys.path, the script adds it)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import hybridops.kernels.onednn as O
from hybridops.kernels.geometry import conv_out_hw
from hybridops.kernels.packing import levels, pack_codes, pack_weight, unpack_weight
from hybridops.ops import reference as R

# Limits around the geometry of the one mismatch an earlier 4,500-shape sweep saw once (signed
# codes, C_in=1, 2x3 kernel, stride (1, 3), padding (3, 2, 0, 2), 3x2 input): tiny inputs,
# strides and paddings up to its largest (3), kernels one wider, so nearly every case takes one of
# the geometry rewrites of kernels/onednn.py (one output along a strided dimension, padding past
# the kernel's reach or asymmetric, an input smaller than the kernel).
NEAR_RESIDUAL = dict(cin_g=3, kernel=(3, 4), stride=3, pad=3, hw=5)


def qparams(lo: float, hi: float, signed: bool) -> torch.Tensor:
    # eq 6 / 8: alpha = 0.5 / d, beta = 0.5 - c * alpha (a random interval [c - d, c + d]).
    c, d = (lo + hi) / 2, max((hi - lo) / 2, 1e-3)
    alpha = 0.5 / d
    return torch.tensor([alpha, 0.5 - c * alpha], dtype=torch.float32)


def ref_codes_of(codes_u8: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """onednn's one-code-per-byte u8 codes -> the reference's packed storage format."""
    return pack_codes(O.codes_to_int(codes_u8, bits, signed), bits)


@st.composite
def conv_cases(draw, cin_g=5, kernel=(3, 3), stride=2, dil=2, pad=2, hw=7):
    """One qconv2d case; the keywords are the largest input channels per group, kernel (KH, KW),
    stride, dilation and padding per side, and input height and width."""
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin_per_group, cout_per_group = draw(st.integers(1, cin_g)), draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, kernel[0])), draw(st.integers(1, kernel[1]))
    strides = [draw(st.integers(1, stride)), draw(st.integers(1, stride))]
    dils = [draw(st.integers(1, dil)), draw(st.integers(1, dil))]
    pads = [draw(st.integers(0, pad)) for _ in range(4)]  # (top, bottom, left, right)
    h, w = draw(st.integers(1, hw)), draw(st.integers(1, hw))
    ho, wo = conv_out_hw(h, w, kh, kw, strides, pads, dils)
    if ho < 1 or wo < 1:
        h, w = h + (kh - 1) * dils[0], w + (kw - 1) * dils[1]
    return dict(n=draw(st.integers(1, 2)), groups=groups, cin=cin_per_group * groups, cout=cout_per_group * groups,
                kh=kh, kw=kw, stride=strides, dil=dils, pad=pads, h=h, w=w, bits_a=draw(st.integers(2, 8)),
                a_signed=draw(st.booleans()), bits_w=draw(st.integers(2, 8)), relu=draw(st.booleans()),
                seed=draw(st.integers(0, 999)), rq_bits=draw(st.integers(2, 8)), rq_signed=draw(st.booleans()),
                fp_dt=draw(st.sampled_from([torch.float32, torch.bfloat16])))


def conv_inputs(k):
    """Codes in both formats (onednn's u8, the reference's packed), packed weights, scale, bias,
    and the generator that made them (for the rest of the case's random draws)."""
    g = torch.Generator().manual_seed(k["seed"])
    la, lw = levels(k["bits_a"], k["a_signed"]), levels(k["bits_w"], True)
    lo = -la if k["a_signed"] else 0
    a = torch.randint(lo, la + 1, (k["n"], k["h"], k["w"], k["cin"]), generator=g)
    wq = torch.randint(-lw, lw + 1, (k["cout"], k["cin"] // k["groups"], k["kh"], k["kw"]), generator=g)
    u8 = O.codes_from_int(a, k["bits_a"], k["a_signed"])
    ref = pack_codes(a, k["bits_a"])
    wp = pack_weight(wq.to(torch.int8), k["bits_w"])
    scale = (torch.rand(k["cout"], generator=g) + 0.1) / (la * lw)
    bias = torch.randn(k["cout"], generator=g)
    return u8, ref, wp, scale, bias, g


def float64_accumulators(k, u8: torch.Tensor, wp: torch.Tensor) -> torch.Tensor:
    """Case ``k``'s int32 accumulators (NHWC) by a float64 convolution: exact, and PyTorch runs
    float64 convolutions outside oneDNN, so this also checks the reference, whose fp32 CPU
    convolutions run on oneDNN."""
    a = O.codes_to_int(u8, k["bits_a"], k["a_signed"]).permute(0, 3, 1, 2).double()
    w = unpack_weight(wp, k["bits_w"], k["cin"] // k["groups"]).double()
    top, bottom, left, right = k["pad"]
    acc = F.conv2d(F.pad(a, (left, right, top, bottom)), w, None, k["stride"], 0, k["dil"], k["groups"])
    return acc.permute(0, 2, 3, 1).to(torch.int32)


def check_qconv2d(k) -> None:
    """O.qconv2d equals R.qconv2d on case ``k`` in every output form: int32 accumulators (both
    equal to a float64 convolution's), the fp32 / bf16 epilogue outputs and re-quantized codes
    exactly, the plain float output within the tolerance kernels/onednn.py states. Raises
    AssertionError naming the form, and for the accumulators the side, that differs."""
    u8, ref, wp, scale, bias, g = conv_inputs(k)
    geo = (k["stride"], k["pad"], k["dil"], k["groups"])
    common = (k["cin"], k["bits_a"], k["a_signed"], k["bits_w"])
    acc = O.qconv2d(u8, wp, *common, scale, None, *geo, out_dtype=torch.int32)
    racc = R.qconv2d(ref, wp, *common, scale, None, *geo, out_dtype=torch.int32)
    exact = float64_accumulators(k, u8, wp)
    assert torch.equal(racc, exact), "the reference's int32 accumulators differ from a float64 convolution's"
    assert acc.dtype == torch.int32 and torch.equal(acc, exact), \
        "onednn's int32 accumulators differ from a float64 convolution's"
    n, ho, wo, cout = racc.shape
    kept = torch.randperm(cout, generator=g)[: max(1, cout // 3)]
    fp = torch.randn(n, ho, wo, kept.numel(), generator=g).to(k["fp_dt"])
    # our epilogue (FP branch summed into kept channels, ReLU): bitwise in fp32 and bf16
    for dt in (torch.float32, torch.bfloat16):
        y = O.qconv2d(u8, wp, *common, scale, bias, *geo, k["relu"], fp, kept, out_dtype=dt)
        ry = R.qconv2d(ref, wp, *common, scale, bias, *geo, k["relu"], fp, kept, out_dtype=dt)
        assert y.dtype == dt and torch.equal(y, ry), f"{dt} epilogue output differs"
    # re-quantized codes for the next layer: exact, in the next layer's zero-point format
    qp = qparams(-1.0 if k["rq_signed"] else 0.0, 1.5, k["rq_signed"])
    for fpo, idx in ((fp, kept), (None, None)):
        c = O.qconv2d(u8, wp, *common, scale, bias, *geo, k["relu"], fpo, idx, qp, k["rq_bits"], k["rq_signed"])
        rc = R.qconv2d(ref, wp, *common, scale, bias, *geo, k["relu"], fpo, idx, qp, k["rq_bits"], k["rq_signed"])
        assert c.shape == (n, ho, wo, cout), "re-quantized codes' shape differs"
        assert torch.equal(ref_codes_of(c, k["rq_bits"], k["rq_signed"]), rc), \
            f"re-quantized codes differ ({'with' if fpo is not None else 'without'} the FP branch)"
    # plain float output: bias and ReLU as oneDNN post-ops (stated tolerance: 1 ulp per add)
    y = O.qconv2d(u8, wp, *common, scale, bias, *geo, k["relu"])
    ry = R.qconv2d(ref, wp, *common, scale, bias, *geo, k["relu"])
    torch.testing.assert_close(y, ry, rtol=1e-6, atol=1e-6, msg=lambda m: f"plain float output differs: {m}")
