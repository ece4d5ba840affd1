"""The CUTLASS Hopper qconv2d (``csrc/sm90/``, extension ``hybridops._C_sm90``).

Without a GPU: a CUTLASS kernel of it compiles for sm_90a with the mainloop it is meant to have
(TMA im2col loads, wgmma s8) and ptxas reports no spills (nvcc and the ``nvidia-cutlass`` headers
needed; about a minute on 2 cores, hence ``slow``); the ptxas reports of a setup.py build of all
its kernels show no spills either. With an sm_90 GPU and the extension: results equal the
reference (integers exact, floats to the last rounding) on both CTA tiles and every output kind,
and cuda_qconv2d dispatches to it.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from ptxas_report import resource_usage

ROOT = Path(__file__).resolve().parent.parent
SM90 = ROOT / "csrc" / "sm90"
PTXAS_LOG_DIR = Path(os.environ.get("HYBRIDOPS_PTXAS_LOG_DIR", ROOT / "build" / "ptxas"))


def _cutlass_include():
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent / "source"
    return [root / "include", root / "tools" / "util" / "include"] if (root / "include" / "cutlass").is_dir() else None


def _nvcc():
    for c in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if c and (Path(c) / "bin" / "nvcc").exists():
            return str(Path(c) / "bin" / "nvcc")
    return shutil.which("nvcc")


def ptxas_entries(text: str):
    """``ptxas -v`` output -> ``{mangled kernel: {regs, stack, spill_stores, spill_loads}}`` (sm_90a entries)."""
    return resource_usage(text, lambda mangled, arch: mangled if arch == "sm_90a" else None)


def test_ptxas_entries():
    log = """ptxas info    : Compiling entry function '_ZN7cutlass13device_kernelIXYZEEvNT_6ParamsE' for 'sm_90a'
ptxas info    : Function properties for _ZN7cutlass13device_kernelIXYZEEvNT_6ParamsE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 2 barriers
"""
    assert ptxas_entries(log) == {"_ZN7cutlass13device_kernelIXYZEEvNT_6ParamsE":
                                  dict(stack=0, spill_stores=0, spill_loads=0, regs=168)}


def _check_conv_kernels(entries, expected: int):
    convs = {k: v for k, v in entries.items() if "ConvUniversal" in k}
    assert len(convs) == expected, sorted(entries)
    for name, use in convs.items():
        # The mainloop CUTLASS's builders were asked for: TMA im2col activations, s8 wgmma, and
        # our epilogue tree in it.
        assert "SM90_TMA_LOAD_IM2COL" in name and "S32S8S8" in name and "Sm90FpBranchAdd" in name, name
        assert use["spill_stores"] == 0 and use["spill_loads"] == 0 and use["stack"] == 0, (name, use)


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set CUDA_HOME)")
@pytest.mark.skipif(_cutlass_include() is None, reason="the nvidia-cutlass headers are not installed "
                                                       "(pip install nvidia-cutlass==4.2.0.0 --no-deps)")
def test_sm90_kernel_compiles_without_spills(tmp_path):
    """The re-quantizing 128x128 kernel (the largest epilogue) with setup.py's flags for _C_sm90."""
    inc = _cutlass_include()
    cmd = [_nvcc(), "-std=c++20", "--expt-relaxed-constexpr", "-O3", "-DNDEBUG", "-lineinfo",
           "-gencode=arch=compute_90a,code=sm_90a", *(f"-I{d}" for d in inc), f"-I{ROOT / 'csrc'}", "-Xptxas=-v",
           "-c", str(SM90 / "qconv2d_sm90_t128_codes.cu"), "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    _check_conv_kernels(ptxas_entries(res.stdout + res.stderr), expected=1)


def test_built_sm90_kernels_do_not_spill():
    """Every kernel of a setup.py build of _C_sm90 (its nvcc wrapper keeps ptxas's reports)."""
    sources = sorted(SM90.glob("qconv2d_sm90_t*.cu"))
    logs = [PTXAS_LOG_DIR / f"{s.name}.ptxas.log" for s in sources]
    if not all(log.exists() for log in logs):
        pytest.skip(f"no ptxas reports of csrc/sm90/ in {PTXAS_LOG_DIR}: hybridops._C_sm90 was not built here "
                    "(it needs 9.0a in HYBRIDOPS_CUDA_ARCHS and the nvidia-cutlass headers)")
    stale = [s.name for s, log in zip(sources, logs) if s.stat().st_mtime > log.stat().st_mtime]
    if stale:
        pytest.skip(f"the ptxas reports of {', '.join(stale)} predate their sources; rebuild _C_sm90")
    entries = {}
    for log in logs:
        entries.update(ptxas_entries(log.read_text()))
    _check_conv_kernels(entries, expected=len(sources))


# ----------------------------------------------------------------------------- GPU
def _sm90_skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if torch.cuda.get_device_capability() != (9, 0):
        return "not an sm_90 GPU"
    from hybridops.ops import cuda_ext
    try:
        cuda_ext.load()
    except ImportError as e:
        return f"hybridops._C is not usable: {e}"
    if cuda_ext.sm90() is None:
        return "hybridops._C_sm90 was not built"
    return None


gpu = pytest.mark.gpu


def _case(bits_a, a_signed, bits_w, n=2, cin=64, h=9, w=10, cout=48, k=3, seed=0):
    from hybridops.kernels import packing

    g = torch.Generator().manual_seed(seed)
    la, lw = packing.levels(bits_a, a_signed), packing.levels(bits_w, True)
    a = torch.randint(-la if a_signed else 0, la + 1, (n, h, w, cin), generator=g)
    wq = torch.randint(-lw, lw + 1, (cout, cin, k, k), generator=g)
    scale = (torch.rand(cout, generator=g) * 0.02 + 0.005).cuda()
    bias = torch.randn(cout, generator=g).cuda()
    return (packing.pack_codes(a, bits_a).cuda(), packing.pack_weight(wq, bits_w).cuda(), cin, bits_a, a_signed,
            bits_w, scale, bias)


@gpu
@pytest.mark.parametrize("tile_m", [64, 128])
@pytest.mark.parametrize("out", ["float32", "bfloat16", "codes8s", "codes6"])
def test_sm90_matches_reference(tile_m, out):
    reason = _sm90_skip_reason()
    if reason:
        pytest.skip(reason)
    x, w, cin, ba, asg, bw, scale, bias = _case(7, False, 8)
    geo = ([2, 1], [1, 0, 2, 1], [1, 2], 1)  # stride 2x1, asymmetric padding, dilation 1x2
    ho, wo = (9 + 1 - 2 - 1) // 2 + 1, (10 + 3 - 4 - 1) // 1 + 1
    # The FP branch with a repeated channel (added twice, in index order) and a strided view.
    fp_out_idx = torch.tensor([47, 0, 5, 0], device="cuda")
    fp_out = torch.randn(2, ho, wo, 8, device="cuda")[..., ::2]
    if out.startswith("codes"):
        rq_bits, rq_signed = (8, True) if out == "codes8s" else (6, False)
        qp = torch.tensor([0.05, 0.0], device="cuda")
        tail = (bias, *geo, not rq_signed, fp_out, fp_out_idx, qp, rq_bits, rq_signed, torch.float32)
    else:
        tail = (bias, *geo, True, fp_out, fp_out_idx, None, 4, False, getattr(torch, out))
    from hybridops.ops import reference

    ops = torch.ops.hybridops
    got = ops.cuda_qconv2d_sm90(x, w, cin, ba, asg, bw, scale, *tail, tile_m)
    # The reference function itself: the op layer refuses repeated indices, the CUDA ops add
    # each column (as index_add does).
    ref = reference.qconv2d(x, w, cin, ba, asg, bw, scale, *tail)
    if got.dtype.is_floating_point:
        tol = dict(rtol=8e-3, atol=8e-3) if got.dtype == torch.bfloat16 else dict(rtol=1.3e-6, atol=1e-5)
        torch.testing.assert_close(got, ref, **tol)
    else:
        assert torch.equal(got, ref)
    # cuda_qconv2d takes this call to the same kernel (its own tile choice: the same results, as
    # tiles only regroup exact integer sums).
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        again = ops.cuda_qconv2d(x, w, cin, ba, asg, bw, scale, *tail)
        torch.cuda.synchronize()
    assert torch.equal(again, got)
    assert any("ConvUniversal" in e.name for e in prof.events()), sorted({e.name for e in prof.events()})
