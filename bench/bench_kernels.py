"""Kernel microbenchmarks: every op and backend on real layer shapes, providers side by side.

Providers, all timed in one process on one device (medians of ``triton.testing.do_bench`` on a
GPU, ``torch.utils.benchmark`` on the CPU):

* ``cudnn_bf16_cl``   ``F.conv2d`` in bf16 channels_last (the baseline to beat on a GPU);
* ``cudnn_fp32``      ``F.conv2d`` in fp32 with TF32 off;
* on the CPU: ``torch_fp32_cpu`` (eager ``F.conv2d``), ``onednn_fp32_prepacked`` and
  ``onednn_bf16_prepacked`` (oneDNN with weights packed once; bf16 where the CPU has it): the
  fastest of them is the baseline there;
* ``naive_int8``      what a user would write: unfold + ``torch._int_mm`` + scale (CUDA only);
* ``qconv_<backend>`` our packed low-bit conv alone (codes in, bf16 out);
* ``hybrid_<backend>`` a whole deployed hybrid layer (quantize-activate, FP branch, int conv with
  the fused sliced add), float in, float out; for ``triton`` on ungrouped layers also
  ``hybrid_triton_fused`` / ``hybrid_triton_separate``, the pruned branch forced inside the qconv
  kernel or run as its own conv (``HYBRIDOPS_FUSE_BRANCH``), the two sides of the roofline that
  ``hybrid_triton`` follows;
* ``quantact_<backend>`` the fused quantize-activate pass, reported in GB/s;
* ``cutlass_s8_128x128`` / ``cutlass_s8_64x128`` stock CUTLASS 3's Hopper int8 implicit-GEMM
  conv (``cutlass_conv/``: TMA im2col + wgmma, per-channel scale, bf16 out) at two CTA tiles, on
  sm_90 GPUs for groups == 1 layers with C_in % 16 == 0 and C_out % 8 == 0, on the same int8
  codes as ``naive_int8``. It needs the ``nvidia-cutlass`` wheel (``pip install -e .[bench]``)
  and nvcc, and is compiled on first use (several minutes; ``--no-cutlass`` skips it). Its
  output is checked against ``naive_int8`` (int32 accumulators from ``torch._int_mm``) before
  timing; when it cannot be built or run, or the check fails, one ``cutlass_unavailable`` row
  per shape carries the reason instead.
* ``sm90_<tile>``     hybridops' own Hopper qconv2d (``hybridops._C_sm90``: the same CUTLASS
  mainloop with our epilogue tree; ``csrc/sm90/``) on the same codes, read as 7-bit activation
  and 8-bit weight codes one per byte, bf16 out, scale only, each CTA tile forced: the epilogue
  against stock CUTLASS's, like for like. ``sm90_hybrid`` is the whole hybrid epilogue at the
  tile the dispatch picks (bias, the sliced FP branch for ``--keep`` of the channels, ReLU,
  8-bit codes out). Checked against ``naive_int8`` first; sm_90 GPUs with the extension built
  (9.0a in ``HYBRIDOPS_CUDA_ARCHS`` and the ``nvidia-cutlass`` headers), else one
  ``sm90_unavailable`` row per shape says why; no rows for layers it does not take.

Each row records time, TOP/s (2 * MACs / time) or GB/s, the fraction of the measured H100
ceiling (docs/gpu.md, 2026-11-24: int8 1117 TOP/s, copy 3.0 TB/s) and the speedup over
``cudnn_bf16_cl`` (on the CPU: the fastest float row). Results go to ``--out`` as JSON and CSV with the environment, plus a plot.

    python bench/bench_kernels.py --batch 1 32 --bits 4 5 --keep 0.1
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hybridops as ho  # noqa: E402
from common import LAYER_SHAPES, ConvShape, environment, time_ms, write_json  # noqa: E402

INT8_CEILING_TOPS = 1117.0  # Triton int8 GEMM, K-major, H100 (docs/gpu.md)
COPY_CEILING_GBS = 3000.0   # device-to-device copy, H100 (docs/gpu.md)


def make_layer(s: ConvShape, bits_w: int, bits_a: int, keep: float, device):
    """A calibrated hybrid layer of shape ``s`` (deployed per backend by the caller), its float
    twin and an input."""
    conv = nn.Conv2d(s.c_in, s.c_out, s.k, s.stride, s.pad, s.dil, s.groups, bias=False).to(device)
    x = torch.relu(torch.randn(s.n, s.c_in, s.h, s.w, device=device))
    hyb = ho.HybridConv2d.from_float(conv, bits_w, bits_a, True, keep)
    hyb.calibrate(x)
    return conv, hyb.eval(), x


def cpu_float_rows(conv: nn.Conv2d, x: torch.Tensor, s: ConvShape):
    """The float conv on the CPU as a user would run it: eager fp32, and oneDNN with weights
    packed once (fp32, and bf16 where the CPU has bf16 convolutions): ``[(provider, ms)]``."""
    out = [("torch_fp32_cpu", time_ms(lambda: conv(x), x.device))]
    if ho.backend_unavailable_reason("onednn", "cpu") is not None:
        return out
    import hybridops.kernels.onednn as onednn  # present: the onednn backend loaded

    xcl = x.contiguous(memory_format=torch.channels_last)
    geo = ([s.stride] * 2, [s.pad] * 4, [s.dil] * 2, s.groups)
    out.append(("onednn_fp32_prepacked", time_ms(lambda: onednn.fp_conv2d(xcl, conv.weight, None, *geo), x.device)))
    if onednn.bf16_supported():
        xb = xcl.to(torch.bfloat16)
        out.append(("onednn_bf16_prepacked", time_ms(lambda: onednn.fp_conv2d(xb, conv.weight, None, *geo), x.device)))
    return out


def naive_int8(a_codes: torch.Tensor, w_codes: torch.Tensor, s: ConvShape, scale: torch.Tensor) -> torch.Tensor:
    """unfold + torch._int_mm: the int8 path a user would write without custom kernels."""
    cols = F.unfold(a_codes, s.k, s.dil, s.pad, s.stride)  # (N, C*K*K, L)
    n, kk, length = cols.shape
    a2 = cols.transpose(1, 2).reshape(n * length, kk).to(torch.int8).contiguous()
    m = a2.shape[0]
    if m <= 16:  # _int_mm needs more than 16 rows
        a2 = F.pad(a2, (0, 0, 0, 17 - m))
    acc = torch._int_mm(a2, w_codes.reshape(s.c_out, -1).t())[:m]
    return (acc.float() * scale).to(torch.bfloat16)


def cutlass_rows(s: ConvShape, codes: torch.Tensor, wcodes: torch.Tensor, scale: torch.Tensor,
                 row: Callable[..., Dict], ref_ms: float, device: torch.device) -> List[Dict]:
    """Stock CUTLASS int8 conv at each tile on the codes ``naive_int8`` uses (activations NCHW
    float holding small integers, weights KCRS int8), checked against ``naive_int8`` first.
    No rows for layers the kernel cannot take; one ``cutlass_unavailable`` row when it cannot
    build, run, or give the right answer here."""
    import cutlass_conv

    if not cutlass_conv.supports(s.c_in, s.c_out, s.groups):
        return []
    rows = []
    try:
        if not cutlass_conv.loaded():
            print("loading the CUTLASS conv extension (compiled on first use: several minutes)", file=sys.stderr)
        cutlass_conv.load(device)
        x = codes.to(torch.int8).permute(0, 2, 3, 1).contiguous()  # NCHW -> NHWC
        w = wcodes.permute(0, 2, 3, 1).contiguous()                 # KCRS -> KRSC
        ref = naive_int8(codes, wcodes, s, scale)                   # (N*P*Q, K), rows in (n, p, q) order
        for tile in cutlass_conv.TILES:
            def fn(tile=tile):
                return cutlass_conv.conv2d_s8(x, w, scale, (s.stride,) * 2, (s.pad,) * 2, (s.dil,) * 2, tile)

            out = fn().reshape(ref.shape)
            # Same fp32 product and round-to-nearest as the reference, so it should match exactly;
            # one bf16 ulp is allowed so that only real errors fail.
            bad = (~torch.isclose(out.float(), ref.float(), rtol=2 ** -7, atol=0)).sum().item()
            if bad:
                raise cutlass_conv.CutlassUnavailable(
                    f"cutlass_s8_{tile} gave wrong results ({bad} of {ref.numel()} outputs off by more than "
                    "one bf16 ulp from the int32 reference); not timed.")
            rows.append(row(f"cutlass_s8_{tile}", time_ms(fn, device), ref_ms))
    except cutlass_conv.CutlassUnavailable as e:
        print(f"cutlass_unavailable on {s.name}: {e}", file=sys.stderr)
        bad_row = row("cutlass_unavailable", float("nan"), None)
        bad_row["reason"] = str(e)
        rows.append(bad_row)
    return rows


def sm90_rows(s: ConvShape, codes: torch.Tensor, wcodes: torch.Tensor, scale: torch.Tensor, keep: float,
              row: Callable[..., Dict], ref_ms: float, device: torch.device) -> List[Dict]:
    """hybridops' CUTLASS Hopper qconv2d (cuda_qconv2d_sm90) on the codes ``naive_int8`` uses,
    checked against it first; see the module docstring."""
    from hybridops.ops import cuda_ext

    def unavailable(reason: str) -> List[Dict]:
        print(f"sm90_unavailable on {s.name}: {reason}", file=sys.stderr)
        r = row("sm90_unavailable", float("nan"), None)
        r["reason"] = reason
        return [r]

    if torch.cuda.get_device_capability(device) != (9, 0):
        return []
    try:
        cuda_ext.load()
    except ImportError as e:
        return unavailable(f"hybridops._C is not usable: {e}")
    if cuda_ext.sm90() is None:
        return unavailable("hybridops._C_sm90 was not built (9.0a in HYBRIDOPS_CUDA_ARCHS and the nvidia-cutlass "
                           "headers are needed)")
    op = torch.ops.hybridops.cuda_qconv2d_sm90
    x = codes.to(torch.uint8).permute(0, 2, 3, 1).contiguous()      # 7-bit unsigned codes, NHWC
    w = wcodes.view(torch.uint8).permute(0, 2, 3, 1).contiguous()    # 8-bit signed codes, KRSC
    geo = ([s.stride] * 2, [s.pad] * 4, [s.dil] * 2, s.groups)
    ref = naive_int8(codes, wcodes, s, scale)
    rows = []
    for tile in (128, 64):
        def fn(tile=tile):
            return op(x, w, s.c_in, 7, False, 8, scale, None, *geo, False, None, None, None, 4, False,
                      torch.bfloat16, tile)

        try:
            out = fn()
        except RuntimeError as e:
            if "not one the CUTLASS Hopper kernel takes" in str(e):
                return []  # this layer stays on the hand-written kernel
            return unavailable(f"sm90_{tile}x128 failed: {e}")
        out_shape = out.shape  # (N, Ho, Wo, C_out)
        bad = (~torch.isclose(out.reshape(ref.shape).float(), ref.float(), rtol=2 ** -7, atol=0)).sum().item()
        if bad:
            return rows + unavailable(f"sm90_{tile}x128 gave wrong results ({bad} of {ref.numel()} outputs off by "
                                      "more than one bf16 ulp from the int32 reference); not timed.")
        rows.append(row(f"sm90_{tile}x128", time_ms(fn, device), ref_ms))
    kept = max(1, int(round(keep * s.c_out)))
    fp_out_idx = torch.randperm(s.c_out, device=device)[:kept]
    fp_out = torch.randn(*out_shape[:3], kept, device=device, dtype=torch.bfloat16)
    bias = torch.randn(s.c_out, device=device)
    qp = torch.tensor([0.05, 0.0], device=device)
    rows.append(row("sm90_hybrid", time_ms(lambda: op(
        x, w, s.c_in, 7, False, 8, scale, bias, *geo, True, fp_out, fp_out_idx, qp, 8, True, torch.bfloat16, 0),
        device), ref_ms))
    return rows


@contextlib.contextmanager
def fuse_branch(mode: str):
    """Force the triton backend's fused-branch choice (HYBRIDOPS_FUSE_BRANCH) inside the block."""
    previous = os.environ.get("HYBRIDOPS_FUSE_BRANCH")
    os.environ["HYBRIDOPS_FUSE_BRANCH"] = mode
    try:
        yield
    finally:
        if previous is None:
            del os.environ["HYBRIDOPS_FUSE_BRANCH"]
        else:
            os.environ["HYBRIDOPS_FUSE_BRANCH"] = previous


def bench_shape(s: ConvShape, bits_w: int, bits_a: int, keep: float, device: torch.device,
                backends: List[str], cutlass: bool = True) -> List[Dict]:
    """All providers' rows for one layer shape; ``cutlass=False`` leaves out the CUTLASS rows
    (and their one-time build)."""
    rows = []
    macs = s.macs()

    def row(provider: str, ms: float, ref_ms: Optional[float], gbs: Optional[float] = None) -> Dict:
        r = {"shape": s.name, "batch": s.n, "bits_w": bits_w, "bits_a": bits_a, "keep": keep, "provider": provider,
             "ms": ms}
        if gbs is None:
            r["tops"] = 2 * macs / (ms * 1e-3) / 1e12
            r["frac_ceiling"] = r["tops"] / INT8_CEILING_TOPS if device.type == "cuda" else None
        else:
            r["gbs"] = gbs
            r["frac_ceiling"] = gbs / COPY_CEILING_GBS if device.type == "cuda" else None
        r["speedup_vs_bf16"] = (ref_ms / ms) if ref_ms else None
        return r

    conv, hyb, x = make_layer(s, bits_w, bits_a, keep, device)
    ref_ms = None
    with torch.no_grad():
        if device.type == "cuda":
            xb = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
            cb = conv.to(torch.bfloat16).to(memory_format=torch.channels_last)
            ref_ms = time_ms(lambda: cb(xb), device)
            rows.append(row("cudnn_bf16_cl", ref_ms, ref_ms))
            conv = conv.float()
            torch.backends.cudnn.allow_tf32 = False
            rows.append(row("cudnn_fp32", time_ms(lambda: conv(x), device), ref_ms))
            torch.backends.cudnn.allow_tf32 = True
            codes = torch.randint(0, 2 ** min(bits_a, 7), x.shape, device=device, dtype=torch.int8).float()
            wcodes = torch.randint(-7, 8, conv.weight.shape, device=device, dtype=torch.int8)
            if s.groups == 1:
                sc = torch.rand(s.c_out, device=device)
                rows.append(row("naive_int8", time_ms(lambda: naive_int8(codes, wcodes, s, sc), device), ref_ms))
                if cutlass:
                    rows += cutlass_rows(s, codes, wcodes, sc, row, ref_ms, device)
                rows += sm90_rows(s, codes, wcodes, sc, keep, row, ref_ms, device)
        else:
            floats = cpu_float_rows(conv, x, s)
            ref_ms = min(ms for _, ms in floats)  # the fastest float path is the baseline
            rows += [row(name, ms, ref_ms) for name, ms in floats]
        for be in backends:
            layer = ho.deploy_layer(hyb, be)
            xin = x.to(torch.bfloat16) if device.type == "cuda" else x
            xin = xin.contiguous(memory_format=torch.channels_last)
            layer_dt = layer.to(xin.dtype)
            rows.append(row(f"hybrid_{be}", time_ms(lambda: layer_dt(xin), device), ref_ms))
            if be == "triton" and s.groups == 1:
                # both sides of the fused-branch roofline (kernels/qconv.py, fuse_pruned_branch)
                for mode in ("always", "never"):
                    with fuse_branch(mode):
                        rows.append(row(f"hybrid_triton_{'fused' if mode == 'always' else 'separate'}",
                                        time_ms(lambda: layer_dt(xin), device), ref_ms))
            _, codes_p = ho.ops.quantize_activate(xin, layer.in_qparams, bits_a, layer.a_signed, None, None, False,
                                                  None, None, be)
            out_dt = xin.dtype
            rows.append(row(f"qconv_{be}", time_ms(lambda: ho.ops.qconv2d(
                codes_p, layer.w_packed, s.c_in, bits_a, layer.a_signed, bits_w, layer.scale, None, layer.stride,
                layer.padding, layer.dilation, layer.groups, False, None, None, None, 4, False, out_dt, be), device),
                ref_ms))
            moved = xin.numel() * xin.element_size() + codes_p.numel()
            qa_ms = time_ms(lambda: ho.ops.quantize_activate(xin, layer.in_qparams, bits_a, layer.a_signed, None,
                                                             None, True, None, None, be), device)
            rows.append(row(f"quantact_{be}", qa_ms, None, gbs=moved / (qa_ms * 1e-3) / 1e9))
    return rows


def format_rows(rows: List[Dict]) -> str:
    head = f"{'shape':<28} {'N':>3} {'W/A':>4} {'keep':>5} {'provider':<18} {'ms':>9} {'TOP/s|GB/s':>11} {'ceil':>6} {'vs bf16':>8}"
    out = [head, "-" * len(head)]
    for r in rows:
        rate = r.get("tops", r.get("gbs"))
        ceil = f"{r['frac_ceiling']:.2f}" if r["frac_ceiling"] is not None else "-"
        sp = f"{r['speedup_vs_bf16']:.2f}" if r["speedup_vs_bf16"] is not None else "-"
        out.append(f"{r['shape'][:28]:<28} {r['batch']:>3} {r['bits_w']}/{r['bits_a']:<2} {r['keep']:>5} "
                   f"{r['provider']:<18} {r['ms']:>9.4f} {rate:>11.2f} {ceil:>6} {sp:>8}")
    return "\n".join(out)


def plot(rows: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hyb = [r for r in rows if r["provider"].startswith(("hybrid_", "qconv_")) and r["speedup_vs_bf16"]]
    if not hyb:
        return
    labels = [f"{r['shape']} b{r['batch']} {r['provider']}" for r in hyb]
    fig, ax = plt.subplots(figsize=(8, 0.25 * len(hyb) + 1.5))
    ax.barh(range(len(hyb)), [r["speedup_vs_bf16"] for r in hyb])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(hyb)), labels, fontsize=6)
    ax.set_xlabel("speedup over the baseline (>1 is faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 5], help="bit widths (weights = activations)")
    p.add_argument("--keep", type=float, nargs="+", default=[0.1])
    p.add_argument("--shapes", nargs="*", default=None, help="substrings of shape names to keep")
    p.add_argument("--backends", nargs="*", default=None, help="default: every backend available on the device")
    p.add_argument("--no-cutlass", action="store_true", help="leave out the stock CUTLASS rows and their build")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--jsonl", default=None,
                   help="also append each row to this file as soon as its shape is done (the GPU suite reads "
                        "it, so a stage stopped by its timeout keeps the shapes that finished)")
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backends = a.backends or ho.available_backends(device)
    shapes = [s for s in LAYER_SHAPES if not a.shapes or any(k in s.name for k in a.shapes)]
    jobs = [(s.with_batch(n), b, k) for s in shapes for n in a.batch for b in a.bits for k in a.keep]
    rows = []
    for s, b, k in tqdm(jobs, desc=f"kernels on {device.type}"):
        new = bench_shape(s, b, b, k, device, backends, cutlass=not a.no_cutlass)
        rows += new
        if a.jsonl:
            with open(a.jsonl, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)
    tag = torch.cuda.get_device_name().replace(" ", "-") if device.type == "cuda" else "cpu"
    out = Path(a.out or Path(__file__).resolve().parent / "results" / f"{tag}-kernels")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "kernels.json", {"environment": environment(), "rows": rows})
    with open(out / "kernels.csv", "w", newline="") as f:
        keys = sorted({k for r in rows for k in r})
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    plot(rows, out / "kernels.png")
    print(format_rows(rows))
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
