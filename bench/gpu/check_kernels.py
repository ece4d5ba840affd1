"""Correctness stage of the GPU suite (``bench/gpu_suite.sh`` stage b, and the subset that stage e
runs under compute-sanitizer): every kernel variant of each kernel backend against the ``torch``
reference on a fixed short list of shapes.

Variants: each backend (``triton``, ``cuda``), bit-width pairs (4/5/8-bit and the odd ones),
signed and unsigned activations, every output mode (int32 accumulators, float with bias, ReLU
and the sliced FP-branch add, re-quantized packed codes), aligned and unaligned channel counts
(odd C_in, groups starting mid-byte, depthwise), and for Triton every shipped tile config of
``kernels/tiles.py`` (forced one at a time). For the cuda backend, every template of its
hand-written qconv2d kernel (each tile ``mma_128x128``, ``mma_128x64``, ``mma_64x64``, ``mma_32x64``
and ``direct`` forced through ``cuda_ext.forced_plan``, times each operand variant: activations
packed unsigned / packed signed / one byte, against packed or one-byte weights; ``TEMPLATE_BITS``)
on an aligned (cp.async) and two unaligned (gathered) shapes, and every output mode per tile; on
a compute capability 8.x GPU (Ampere / Ada) also the same tiles on the 4-bit tensor cores
(``mma_s4_*``, u4 and s4 activations, plus a K tail inside the second k-step). On
an sm_90 GPU, the CUTLASS Hopper kernel (``hybridops._C_sm90``, which the cuda backend's one-byte
cases above reach through its dispatch) is also called directly, each CTA tile forced, for every
output kind it has (fp32, bf16, signed 8-bit and unsigned 6-bit codes) on an aligned and a
strided, asymmetrically padded shape. For Triton, the pruned branch fused into the qconv kernel
(``hybrid_conv2d`` with ``HYBRIDOPS_FUSE_BRANCH=always``) on three shapes, float and
re-quantized outputs.

Integers (accumulators, packed codes) must be equal; floats within one unit in the last place of
the final rounding. Outputs are poisoned first (the caching allocator's free blocks filled with
0xFF on a GPU; ``torch.empty`` results filled with NaN / 0xAB on the CPU), so unwritten elements
fail. Results go to ``<out>/correctness-<shard>.jsonl`` one line per case as it finishes (a
timeout keeps what ran). The exit code is 1 when any case failed.

    python bench/gpu/check_kernels.py --subset full --shard 0/4 --out DIR
    TRITON_INTERPRET=1 python bench/gpu/check_kernels.py --subset dry --shard 0/1 --out DIR   # CPU
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

import hybridops  # noqa: F401  (registers the hybridops:: ops)
from hybridops.backend_selection import backend_unavailable_reason
from hybridops.kernels import packing

ops = torch.ops.hybridops
GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")

# Same tolerances as tests/test_kernels.py: fp32 equal in practice, fp16/bf16 one final ulp.
TOL = {torch.float32: dict(rtol=1.3e-6, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
       torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}

# (name, N, C_in, H, W, C_out, kernel, stride, padding (t, b, l, r), dilation, groups, gpu_only).
# Short on purpose: each distinct Triton specialisation costs a compile on a cold machine.
SHAPES = {
    "3x3_c64": (2, 64, 6, 6, 64, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, False),      # aligned, tensor cores
    "3x3_c17_dil2": (1, 17, 7, 6, 33, 3, (1, 1), (2, 2, 2, 2), (2, 2), 1, False),  # odd C_in / C_out
    "g2_c34": (1, 34, 5, 6, 34, 3, (1, 1), (1, 1, 1, 1), (1, 1), 2, False),       # group 1 starts mid-byte
    "dw_c16": (1, 16, 5, 5, 16, 3, (1, 1), (1, 1, 1, 1), (1, 1), 16, False),      # depthwise (cuda: direct)
    "1x1_s2": (1, 32, 8, 9, 24, 1, (2, 2), (0, 1, 1, 0), (1, 1), 1, False),       # strided 1x1, asym. pad
    "stem_c3": (1, 3, 9, 9, 8, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1, False),        # C_in 3 (cuda: direct)
    "m6272_dil2": (2, 64, 56, 56, 128, 3, (1, 1), (2, 2, 2, 2), (2, 2), 1, True),  # cuda: mma_64x64
    "m18432": (8, 64, 48, 48, 256, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, True),     # cuda: mma_128x128
}
# Shapes only the CUTLASS Hopper kernel is checked on (kept out of SHAPES: each shape there costs
# the Triton backend a compile).
SM90_SHAPES = {
    "s2_c32_asym": (2, 32, 9, 10, 48, 3, (2, 1), (1, 0, 2, 1), (1, 2), 1, True),  # stride 2x1, pads, dilation 1x2
}
# (bits_a, a_signed, bits_w): the deploy default first, then the one-byte and mixed pairs.
BITS = [(4, False, 4), (4, True, 4), (5, False, 5), (8, True, 8), (8, True, 4), (4, False, 8), (2, False, 2),
        (7, False, 4)]
MODES = ["int32", "float", "half", "requant4", "requant8s"]
# The hand-written CUDA qconv2d's kernels (build_info()["qconv2d_kernels"]) and one bit pair per
# operand variant of its tensor-core template: A packed unsigned / signed, A one byte, each with
# packed and one-byte weights ((4, True, 8) is the one pair BITS lacks).
CUDA_PLANS = ["mma_128x128", "mma_128x64", "mma_64x64", "mma_32x64", "direct"]
TEMPLATE_BITS = [(4, False, 4), (4, True, 4), (4, False, 8), (4, True, 8), (8, True, 4), (8, True, 8)]
# The same tiles on the 4-bit tensor cores (qconv_mma_s4_kernel), which exist only on compute
# capability 8.x (Hopper would emulate them, so qconv2d refuses them there): both operands packed,
# unsigned (u4) and signed (s4) activations. One more shape for them only: 224 input channels,
# a K tail inside the second m16n8k64 k-step (3x3_c64 has a half chunk, whose k-step 1 is skipped).
S4_GPU = GPU and torch.cuda.get_device_capability()[0] == 8
S4_PLANS = ["mma_s4_128x128", "mma_s4_128x64", "mma_s4_64x64", "mma_s4_32x64"]
S4_BITS = [(4, False, 4), (4, True, 4)]
S4_SHAPES = {
    "3x3_c224": (1, 224, 6, 5, 40, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, True),
}
# The CUTLASS Hopper kernel (cuda_qconv2d_sm90): its CTA tiles, output kinds and one-byte bit pairs.
SM90_TILES = (64, 128)
SM90_MODES = ["float", "half", "requant8s", "requant6"]
SM90_BITS = [(8, True, 8), (5, False, 7)]


def _case(kind: str, **kw) -> Dict:
    kw["kind"] = kind
    kw["id"] = kind + ":" + ",".join(f"{k}={v}" for k, v in kw.items() if k not in ("kind",))
    return kw


def cases(subset: str) -> List[Dict]:
    """The case list of a subset: ``full`` (the GPU stage), ``quick`` (fewer bit pairs and modes),
    ``dry`` (tiny, the CPU interpreter), ``sanitizer`` (one case per CUDA kernel template)."""
    from hybridops.kernels import tiles

    out: List[Dict] = []
    if subset == "sanitizer":
        return sanitizer_cases()
    dry = subset == "dry"
    shapes = [s for s, v in SHAPES.items() if GPU or not v[-1]]
    if dry:
        shapes = ["3x3_c17_dil2", "g2_c34", "1x1_s2", "dw_c16"]
    bits = BITS if subset == "full" else BITS[:4] + BITS[6:7]
    modes = MODES if subset == "full" else ["int32", "float", "requant4"]
    for dt in (["float32", "bfloat16"] if GPU else ["float32"]):
        out.append(_case("fake_quantize", dtype=dt, bits=4, signed=True))
    for b, sg in ((4, False), (5, True), (8, True)):
        for layout in ("nchw", "channels_last"):
            out.append(_case("quantize_activate", bits=b, signed=sg, layout=layout))
    # Every bit pair on every shape, integers exact (the accumulators).
    for s in shapes:
        for bp in bits:
            out.append(_case("qconv", shape=s, bits=bp, mode="int32", tile=None))
    # Every output mode on the aligned and unaligned shapes, deploy-default and one-byte codes.
    for s in (["3x3_c17_dil2", "g2_c34"] if dry else ["3x3_c64", "3x3_c17_dil2", "g2_c34", "dw_c16"]):
        for bp in ((4, False, 4), (8, True, 8)):
            for m in modes:
                out.append(_case("qconv", shape=s, bits=bp, mode=m, tile=None))
    # Every shipped Triton tile config, forced, on an aligned and an unaligned shape, packed codes
    # in and out (the deploy default) and one-byte codes with float out.
    for name in tiles.shipped_names():
        for s in ("3x3_c17_dil2", "g2_c34"):
            out.append(_case("qconv", shape=s, bits=(4, False, 4), mode="requant4", tile=name, only="triton"))
        if not dry:
            out.append(_case("qconv", shape="3x3_c64", bits=(8, True, 8), mode="float", tile=name, only="triton"))
    # The pruned branch fused into the Triton qconv kernel (hybrid_conv2d, forced on): aligned,
    # K-tail and strided shapes, float and re-quantized outputs.
    for s in (["3x3_c17_dil2"] if dry else ["3x3_c64", "3x3_c17_dil2", "1x1_s2"]):
        for m in ("float", "requant4"):
            out.append(_case("hybrid", shape=s, bits=(4, False, 4), mode=m, tile=None, only="triton"))
    if not dry:
        out += cuda_template_cases(subset)
    if GPU and subset != "dry":
        modes90 = SM90_MODES if subset == "full" else ["half", "requant8s"]
        for s in ("3x3_c64", "s2_c32_asym"):
            for bp in SM90_BITS:
                for m in modes90:
                    for t in SM90_TILES:
                        out.append(_case("qconv_sm90", shape=s, bits=bp, mode=m, tile=t, only="cuda"))
    # The loops overlap (int32 on the mode shapes): each distinct case once, first place kept.
    return list({c["id"]: c for c in out}.values())


def cuda_template_cases(subset: str) -> List[Dict]:
    """The cuda backend's hand-written qconv2d, every template: each kernel forced, times each
    operand variant, integers exact, on the aligned shape (cp.async), odd C_in (gathered codes,
    33 output channels: a scalar epilogue tail) and mid-byte groups (``full`` only); then, on
    ``full``, every output mode of each kernel on the aligned and the odd shape (the epilogue's
    vector and scalar stores). On a compute capability 8.x GPU the 4-bit tensor-core tiles
    (``S4_PLANS``) the same way, on their packed bit pairs and also on ``3x3_c224``."""
    out = []
    shapes = ["3x3_c64", "3x3_c17_dil2", "g2_c34"] if subset == "full" else ["3x3_c64"]
    for plan in CUDA_PLANS:
        for s in shapes:
            for bp in TEMPLATE_BITS:
                out.append(_case("qconv", shape=s, bits=bp, mode="int32", tile=None, plan=plan, only="cuda"))
        if subset == "full":
            for s, bp in (("3x3_c64", (4, False, 4)), ("3x3_c17_dil2", (8, True, 8))):
                for m in MODES:
                    out.append(_case("qconv", shape=s, bits=bp, mode=m, tile=None, plan=plan, only="cuda"))
    for plan in S4_PLANS if S4_GPU else []:
        for s in shapes + ["3x3_c224"]:
            for bp in S4_BITS:
                out.append(_case("qconv", shape=s, bits=bp, mode="int32", tile=None, plan=plan, only="cuda"))
        if subset == "full":
            for m in MODES:
                out.append(_case("qconv", shape="3x3_c64", bits=(4, False, 4), mode=m, tile=None, plan=plan,
                                 only="cuda"))
    return out


def sanitizer_cases() -> List[Dict]:
    """One case per CUDA kernel template (the sanitizer stage runs them under memcheck, racecheck
    and synccheck), small shapes: fake_quantize per dtype, vectorised and unaligned; quantize_activate
    per dtype; qconv2d per forced kernel and operand variant (aligned, output modes in turn) plus the
    gathered path of each kernel with packed and with one-byte codes; on compute capability 8.x the
    4-bit tensor-core kernels per tile and activation signedness, and gathered; the CUTLASS Hopper
    kernel per tile and output type. On the CPU (dry run) the cuda-only ones are skipped and a few cases any
    backend runs check the wiring."""
    out = [_case("fake_quantize", dtype="float32", bits=4, signed=True),
           _case("quantize_activate", bits=4, signed=False, layout="channels_last"),
           _case("quantize_activate", bits=5, signed=True, layout="nchw"),
           _case("qconv", shape="3x3_c17_dil2", bits=(4, False, 4), mode="requant4", tile=None),
           _case("qconv", shape="3x3_c64", bits=(8, True, 8), mode="float", tile=None)]
    for dt in ("float32", "float64", "float16", "bfloat16"):
        for offset in (0, 1):  # 16-byte aligned (vector loads) or one element off (scalar template)
            out.append(_case("fake_quantize", dtype=dt, bits=4, signed=True, offset=offset, only="cuda"))
        out.append(_case("quantize_activate", bits=4, signed=False, layout="channels_last", dtype=dt, only="cuda"))
    for plan in CUDA_PLANS:
        for i, bp in enumerate(TEMPLATE_BITS):
            out.append(_case("qconv", shape="3x3_c64", bits=bp, mode=MODES[i % len(MODES)], tile=None, plan=plan,
                             only="cuda"))
        out.append(_case("qconv", shape="3x3_c17_dil2", bits=(4, False, 4), mode="requant4", tile=None, plan=plan,
                         only="cuda"))
        out.append(_case("qconv", shape="g2_c34", bits=(8, True, 8), mode="float", tile=None, plan=plan, only="cuda"))
    for plan in S4_PLANS if S4_GPU else []:
        for i, bp in enumerate(S4_BITS):
            out.append(_case("qconv", shape="3x3_c64", bits=bp, mode=MODES[i], tile=None, plan=plan, only="cuda"))
        out.append(_case("qconv", shape="3x3_c17_dil2", bits=(4, False, 4), mode="requant4", tile=None, plan=plan,
                         only="cuda"))
    if GPU:
        for t in SM90_TILES:
            for m in ("float", "half", "requant8s"):  # fp32, bf16 and code outputs: one source each
                out.append(_case("qconv_sm90", shape="3x3_c64", bits=(8, True, 8), mode=m, tile=t, only="cuda"))
    return list({c["id"]: c for c in out}.values())


# ----------------------------------------------------------------------------- poisoning
def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_floating_point:
        t.fill_(math.nan)
    elif t.dtype != torch.bool:
        t.fill_(0xAB if t.dtype == torch.uint8 else -0x55)
    return t


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Fresh outputs hold garbage that cannot pass as a result (see the module docstring)."""
    if GPU:
        blocks = [torch.full((n,), 0xFF, dtype=torch.uint8, device=DEVICE)
                  for n in [512] * 16 + [32 << 10] * 8 + [1 << 20] * 2 + [16 << 20]]
        del blocks
        yield
        return
    empty, empty_like = torch.empty, torch.empty_like
    torch.empty = lambda *a, **k: _poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: _poison(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def same(got, ref) -> Optional[str]:
    """None when ``got`` matches ``ref`` (integers equal, floats within TOL), else why not."""
    if isinstance(ref, (tuple, list)):
        for g, r in zip(got, ref):
            err = same(g, r)
            if err:
                return err
        return None
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return f"shape/dtype {tuple(got.shape)} {got.dtype} vs {tuple(ref.shape)} {ref.dtype}"
    if got.dtype.is_floating_point:
        if got.isnan().any() and not ref.isnan().any():
            return "unwritten (NaN-poisoned) output elements"
        try:
            torch.testing.assert_close(got, ref, **TOL.get(got.dtype, TOL[torch.float32]))
        except AssertionError as e:
            return str(e).splitlines()[0] + " " + " ".join(str(e).splitlines()[1:3])
        return None
    bad = (got != ref).sum().item()
    return f"{bad} of {got.numel()} elements differ" if bad else None


# ----------------------------------------------------------------------------- one case
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codes(shape, bits, signed, gen):
    lv = packing.levels(bits, signed)
    return torch.randint(-lv if signed else 0, lv + 1, shape, generator=gen)


def run_case(c: Dict, backend: str) -> Optional[str]:
    """Run case ``c`` on ``backend`` and the reference; None when they agree, else the reason."""
    from hybridops.kernels import tiles

    gen = _gen(zlib.crc32(c["id"].encode()))
    if c["kind"] == "fake_quantize":
        dt = getattr(torch, c["dtype"])
        off = c.get("offset", 0)
        x = (torch.randn(3 * 5 * 7 * 9 + off, generator=gen) * 2).to(DEVICE, dt)[off:].view(3, 5, 7, 9)
        qp = torch.tensor([1 / 3.0, 0.0], device=DEVICE)
        args = (x, qp, c["bits"], c["signed"])
        with poisoned():
            got = ops.fake_quantize(*args, backend)
        return same(got, ops.fake_quantize(*args, "torch"))
    if c["kind"] == "quantize_activate":
        x = (torch.randn(2, 33, 5, 7, generator=gen) * 1.5).to(DEVICE, getattr(torch, c.get("dtype", "float32")))
        if c["layout"] == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        lo = 0.0 if not c["signed"] else -2.0
        qp = torch.tensor([1 / (2.5 - lo), -lo / (2.5 - lo)] if not c["signed"] else [1 / 2.5, 0.0], device=DEVICE)
        keep = torch.tensor([7, 0, 3, 32, 3], device=DEVICE)
        args = (x, qp, c["bits"], c["signed"], torch.rand(33, generator=gen).to(DEVICE) + 0.5, None, not c["signed"],
                keep, None)
        with poisoned():
            got = ops.quantize_activate(*args, backend)
        return same(got, ops.quantize_activate(*args, "torch"))
    n, cin, h, w, cout, k, stride, pad, dil, groups, _ = {**SHAPES, **SM90_SHAPES, **S4_SHAPES}[c["shape"]]
    ba, asg, bw = c["bits"]
    x_codes = packing.pack_codes(_codes((n, h, w, cin), ba, asg, gen), ba).to(DEVICE)
    w_packed = packing.pack_weight(_codes((cout, cin // groups, k, k), bw, True, gen), bw).to(DEVICE)
    ho = (h + pad[0] + pad[1] - dil[0] * (k - 1) - 1) // stride[0] + 1
    wo = (w + pad[2] + pad[3] - dil[1] * (k - 1) - 1) // stride[1] + 1
    scale = ((torch.rand(cout, generator=gen) * 0.02 + 0.01) * 9 / (cin // groups * k * k) ** 0.5).to(DEVICE)
    bias = (torch.randn(cout, generator=gen) * 0.5).to(DEVICE)
    kept = sorted({cout - 1, 0, cout // 2, cout // 3})
    fp_out = torch.randn(n, ho, wo, 2 * len(kept), generator=gen).to(DEVICE)[..., ::2]  # a strided NHWC view
    fp_out_idx = torch.tensor(kept[::-1], device=DEVICE)
    base = (x_codes, w_packed, cin, ba, asg, bw, scale)
    geo = ([stride[0], stride[1]], list(pad), [dil[0], dil[1]], groups)
    mode = c["mode"]
    if mode == "int32":
        tail = (None, *geo, False, None, None, None, 4, False, torch.int32)
    elif mode in ("float", "half"):
        dt = torch.float32 if mode == "float" else (torch.bfloat16 if GPU else torch.float16)
        tail = (bias, *geo, True, fp_out, fp_out_idx, None, 4, False, dt)
    else:
        rq_bits, rq_signed = {"requant4": (4, False), "requant8s": (8, True), "requant6": (6, False)}[mode]
        y = ops.qconv2d(*base, bias, *geo, not rq_signed, fp_out, fp_out_idx, None, 4, False, torch.float32, "torch")
        hi = y.abs().max().item() or 1.0
        qp = torch.tensor([1 / hi, 0.0], device=DEVICE)
        tail = (bias, *geo, not rq_signed, fp_out, fp_out_idx, qp, rq_bits, rq_signed, torch.float32)
    if c["kind"] == "hybrid":
        return _hybrid_case(c, base, geo, bias, kept, n, h, w, k, gen)
    if c["kind"] == "qconv_sm90":
        from hybridops.ops import cuda_ext

        if cuda_ext.sm90() is None:
            return "hybridops._C_sm90 was not built (9.0a in HYBRIDOPS_CUDA_ARCHS and the nvidia-cutlass headers)"
        with poisoned():
            got = ops.cuda_qconv2d_sm90(*base, *tail, c["tile"])
        return same(got, ops.qconv2d(*base, *tail, "torch"))
    if c["tile"]:
        ctx = tiles.forced(c["tile"])
    elif c.get("plan"):
        from hybridops.ops import cuda_ext

        ctx = cuda_ext.forced_plan(c["plan"])
    else:
        ctx = contextlib.nullcontext()
    with ctx, poisoned():
        got = ops.qconv2d(*base, *tail, backend)
    return same(got, ops.qconv2d(*base, *tail, "torch"))


def _hybrid_case(c, base, geo, bias, kept, n, h, w, k, gen) -> Optional[str]:
    """The fused pruned branch (HYBRIDOPS_FUSE_BRANCH=always) against the reference with the
    branch summed in fp32 from the same rounded operands (what the fused loop computes): floats
    within fp32 reassociation, re-quantized codes within one level in under 1% of the elements."""
    from hybridops.ops import reference

    dt = torch.bfloat16 if GPU else torch.float32
    c_f = 12
    fp_in = torch.randn(n, h, w, c_f, generator=gen).to(DEVICE, dt)
    fp_weight = (torch.randn(len(kept), c_f, k, k, generator=gen) * 0.2).to(DEVICE)
    fp_bias = torch.randn(len(kept), generator=gen).to(DEVICE)
    fp_out_idx = torch.tensor(kept[::-1], device=DEVICE)
    fp_ref = reference.pruned_branch_conv(fp_in.float(), fp_weight.to(dt).float(), fp_bias, *geo[:3])
    requant = c["mode"] == "requant4"
    qp = None
    if requant:
        y = ops.qconv2d(*base, bias, *geo, True, fp_ref, fp_out_idx, None, 4, False, torch.float32, "torch")
        qp = torch.tensor([1 / (y.abs().max().item() or 1.0), 0.0], device=DEVICE)
    tail = (bias, *geo, True)
    os.environ["HYBRIDOPS_FUSE_BRANCH"] = "always"
    try:
        with poisoned():
            got = ops.hybrid_conv2d(*base, *tail, fp_in, fp_weight, fp_bias, fp_out_idx, qp, 4, False, torch.float32,
                                    "triton")
    finally:
        del os.environ["HYBRIDOPS_FUSE_BRANCH"]
    ref = ops.qconv2d(*base, *tail, fp_ref, fp_out_idx, qp, 4, False, torch.float32, "torch")
    if not requant:
        return "unwritten (NaN-poisoned) output elements" if got.isnan().any() else _close(got, ref)
    cout = base[1].shape[0]
    diff = (packing.unpack_codes(got, 4, cout, False).int() - packing.unpack_codes(ref, 4, cout, False).int()).abs()
    if diff.max() > 1 or (diff > 0).float().mean() >= 0.01:
        return f"codes differ by up to {diff.max().item()} in {(diff > 0).float().mean().item():.2%} of the elements"
    return None


def _close(got, ref) -> Optional[str]:
    try:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    except AssertionError as e:
        return str(e).splitlines()[0]
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subset", choices=["full", "quick", "dry", "sanitizer"], default="full")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th case starting at i")
    p.add_argument("--backends", nargs="*", default=None, help="default: triton and cuda where they can run")
    p.add_argument("--out", default=".")
    p.add_argument("--tag", default="correctness", help="result file prefix (the sanitizer runs use their tool)")
    p.add_argument("--dry-run-sanitizer", action="store_true",
                   help="the sanitizer subset without a sanitizer (CPU dry run: checks the wiring)")
    a = p.parse_args(argv)
    if a.dry_run_sanitizer:
        a.tag = "sanitizer-dry"
    i, n = map(int, a.shard.split("/"))
    wanted = a.backends or (["cuda"] if a.subset == "sanitizer" and GPU else ["triton", "cuda"])
    backends = []
    for b in wanted:
        reason = backend_unavailable_reason(b, DEVICE)
        if reason is None:
            backends.append(b)
        else:
            print(f"skipped backend {b}: {reason}")
    if a.subset == "sanitizer" and not GPU:
        backends = [b for b in ("triton",) if backend_unavailable_reason(b, DEVICE) is None]
    todo = cases(a.subset)[i::n]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{a.tag}-{i}.jsonl"
    failed = passed = 0
    with open(path, "w") as f:
        for c in todo:
            for b in backends:
                if c.get("only") not in (None, b):
                    continue
                t = time.time()
                try:
                    err = run_case(c, b)
                except Exception as e:  # an exception is a failed case, recorded with its reason
                    err = f"{type(e).__name__}: {e}"
                    traceback.print_exc()
                ok = err is None
                passed += ok
                failed += not ok
                f.write(json.dumps({"case": c["id"], "backend": b, "ok": ok, "error": err,
                                    "s": round(time.time() - t, 3)}) + "\n")
                f.flush()
                if not ok:
                    print(f"FAIL {b} {c['id']}: {err}")
    print(f"shard {a.shard}: {passed} passed, {failed} failed ({', '.join(backends) or 'no backend'}) -> {path}")
    return 1 if failed or not backends else 0


if __name__ == "__main__":
    sys.exit(main())
