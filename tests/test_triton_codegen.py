"""The Triton kernels compile for Hopper (sm_90) on a machine without a GPU, with the properties
the design relies on, checked in the generated PTX:

* no fused multiply-add anywhere: the quantizer and epilogue must round every fp32 operation like
  the reference so that codes are bitwise equal (docs/kernels.md, exactness rules);
* the integer conv runs on tensor cores: ``wgmma`` for the large tiles, ``mma.sync`` for the
  small-M (batch-1) tiles;
* every shipped tile of ``kernels/tiles.py`` compiles without register spills in every kernel
  variant (``ptxas -v`` on the PTX, the same ptxas Triton uses): a spilling tile is not shipped;
* with full K steps (``K_FULL``: C_in per group a multiple of the K step, the ResNet-50 and
  RT-MDNet layers) the packed 4-bit mainloop loads through ``cp.async`` with no single-byte
  global loads, i.e. it is software-pipelined (issue 11: without it, 24-160 predicated byte loads
  per thread per step and no pipelining), and splits packed codes with the SWAR PTX of
  ``kernels/_common.py``; the SASS size of that loop (the loop around the MMAs) is printed, a
  regression guard rather than a speed claim;
* the variants with the pruned branch fused into the kernel (``FP_FUSED``) are spill-free too.

The qconv kernel is compiled with the run-time specialisation the JIT applies to contiguous NHWC
codes of such layers: unit channel strides and 16-divisible pointers, row strides and sizes.

Compilation needs Triton's real compiler, not the interpreter that the rest of the CPU test run
uses, so it runs in a subprocess without TRITON_INTERPRET.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest


# Variant families of the qconv kernel (constexpr choices of kernels/qconv.py's launcher): packed /
# one-byte activation codes, signed or not, byte-aligned or mid-byte groups, and the three
# epilogues. Weights are always compute-ready int8.
SPILL_VARIANTS = {
    "nib_requant": (dict(A_NIB=True, A_ALIGNED=True, OUT_MODE=2), "*u8"),
    "nib_unaligned_bf16": (dict(A_NIB=True, A_ALIGNED=False, OUT_MODE=1), "*bf16"),
    "nib_int32": (dict(A_NIB=True, A_ALIGNED=True, OUT_MODE=0), "*i32"),
    "byte_int32": (dict(A_NIB=False, A_ALIGNED=True, OUT_MODE=0), "*i32"),
    "byte_requant": (dict(A_NIB=False, A_ALIGNED=True, OUT_MODE=2), "*u8"),
}
SPILL_VARIANTS = {k: (dict(v, K_FULL=False), d) for k, (v, d) in SPILL_VARIANTS.items()}
# Full K steps (C_in per group a multiple of the K step): masks only at the image border.
SPILL_VARIANTS.update({
    # split-K (batch-1 layers): int32 partial sums added atomically, the epilogue in its own kernel
    "nib_split_k": (dict(SPILL_VARIANTS["nib_int32"][0], K_FULL=True, SPLIT_K=4), "*i32"),
    "nib_requant_kfull": (dict(SPILL_VARIANTS["nib_requant"][0], K_FULL=True), "*u8"),
    "nib_signed_bf16_kfull": (dict(A_NIB=True, A_ALIGNED=True, A_SIGNED=True, OUT_MODE=1, K_FULL=True), "*bf16"),
    "byte_requant_kfull": (dict(SPILL_VARIANTS["byte_requant"][0], K_FULL=True), "*u8"),
    # the pruned branch fused into the kernel (hybrid_conv2d): a bf16 K loop into its own accumulator
    "fused_fp_requant": (dict(SPILL_VARIANTS["nib_requant"][0], K_FULL=True, FP_FUSED=True), "*u8"),
    "fused_fp_bf16": (dict(SPILL_VARIANTS["nib_requant"][0], OUT_MODE=1, K_FULL=True, FP_FUSED=True), "*bf16"),
})
# Variants whose main loop is checked for vector copies (no byte loads) and SWAR unpacking; and
# variants with a partial last K step, whose full steps must still load through cp.async (their
# per-tap tail step loads bytes).
PIPELINED = ("nib_split_k", "nib_requant_kfull", "nib_signed_bf16_kfull", "byte_requant_kfull")
WITH_TAIL = ("nib_requant", "byte_requant")


# Arguments of the qconv kernel that the JIT marks 16-divisible for a layer such as ResNet-50's
# layer3 3x3 (C_in = C_out = 256, 31x31, batch 32): pointers, channel counts, byte row strides.
QCONV_DIV16 = ("x_ptr", "w_ptr", "out_ptr", "scale_ptr", "bias_ptr", "fp_ptr", "slot_ptr", "rq_ptr", "M_BUCKET",
               "C_OUT", "CIN_G", "COUT_G", "OUT_ROW", "sxn", "sxh", "sxw", "swo", "swh", "sww")


def _ptxas() -> str:
    """The ptxas Triton compiles with (its bundled one), else the one on PATH."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            tool = get_ptxas(90)
        except TypeError:  # Triton versions whose get_ptxas takes no architecture
            tool = get_ptxas()
        return tool.path if hasattr(tool, "path") else tool[0]
    except (ImportError, AttributeError):
        return shutil.which("ptxas")


def ptxas_usage(ptx_src: str) -> int:
    """Spill-store bytes of one PTX kernel, from ``ptxas -v`` for sm_90a (Triton's own flags for
    Hopper: no FMA contraction, since the kernels are compiled with enable_fp_fusion=False)."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx_src)
        run = subprocess.run([_ptxas(), "-v", "--fmad=false", "--gpu-name=sm_90a", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True)
    m = re.search(r"(\d+) bytes spill stores", run.stderr)
    assert m, run.stderr
    return int(m.group(1))


def _triton_tool(name: str) -> str:
    """A CUDA binary utility bundled with Triton (nvdisasm), else the one on PATH."""
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return bundled if os.path.exists(bundled) else shutil.which(name)


def mainloop_sass_count(cubin: bytes) -> int:
    """SASS instructions of the innermost loop that holds the MMAs (a backward branch whose range
    contains an IGMMA / HGMMA / IMMA), or -1 when nvdisasm is missing: a regression guard, printed."""
    tool = _triton_tool("nvdisasm")
    if tool is None:
        return -1
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([tool, "-c", path], capture_output=True, text=True, check=True).stdout
    labels, instrs = {}, []  # label -> index of the next instruction; (text) per instruction
    for line in sass.splitlines():
        lab = re.match(r"\s*(\.L_x_\d+):", line)
        if lab:
            labels[lab.group(1)] = len(instrs)
        elif re.search(r"/\*[0-9a-f]{4,}\*/", line):
            instrs.append(line)
    loops = []
    for i, text in enumerate(instrs):
        target = re.search(r"BRA\s+(?:`\()?(\.L_x_\d+)", text)
        if target and labels.get(target.group(1), i + 1) <= i:
            body = instrs[labels[target.group(1)]:i + 1]
            if any(re.search(r"\b(HGMMA|IGMMA|IMMA)\b", t) for t in body):
                loops.append(len(body))
    return min(loops) if loops else 0


def _compile_all() -> list:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import hybridops.kernels.qconv as C
    import hybridops.kernels.quantize as Q
    import hybridops.kernels.tiles as T

    def compiled(jf, sig, consts, **opts):
        if jf is C._qconv_kernel:  # the JIT's specialisation for contiguous NHWC codes, one K split, on a GPU
            defaults = dict(SPLIT_K=1, SWAR=True, FP_FUSED=False, FP_IEEE=False, BLOCK_KF=C.FP_K_STEP)
            consts = dict(defaults, **consts, sxc=1)
        full = {n: ("constexpr" if n in consts else sig.get(n, "i32")) for n in jf.arg_names}
        attrs = {(jf.arg_names.index(n),): [["tt.divisibility", 16]] for n in QCONV_DIV16 if n in jf.arg_names
                 and n not in consts and jf is C._qconv_kernel}
        src = ASTSource(jf, full, constexprs=consts, attrs=attrs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(enable_fp_fusion=False, **opts)).asm

    def ptx(jf, sig, consts, **opts):
        return compiled(jf, sig, consts, **opts)["ptx"]

    out = []
    for dt in ("*fp32", "*bf16"):
        p = ptx(Q._fake_quantize_kernel, {"x_ptr": dt, "out_ptr": dt, "qp_ptr": "*fp32", "numel": "i64"},
                dict(LEVELS=15, INV_LEVELS=1 / 15, SIGNED=True, F64=False, BLOCK=1024), num_warps=4)
        out.append({"kernel": f"fake_quantize {dt}", "fma": len(re.findall(r"\bfma\.rn", p)), "mma": None})
    p = ptx(Q._quantize_activate_kernel,
            {"x_ptr": "*bf16", "codes_ptr": "*u8", "slice_ptr": "*bf16", "qp_ptr": "*fp32", "scale_ptr": "*fp32",
             "shift_ptr": "*fp32", "slot_ptr": "*i32", "keep_ptr": "*i64", "repeat_ptr": "*i8",
             "flag_ptr": "*i32"},
            dict(LEVELS=15, SIGNED=False, NIBBLE=True, HAS_SCALE=True, HAS_SHIFT=True, RELU=True, HAS_SLICE=True,
                 FLAG=True, BLOCK_P=16, BLOCK_C=64), num_warps=4)
    out.append({"kernel": "quantize_activate", "fma": len(re.findall(r"\bfma\.rn", p)), "mma": None})
    sig = {"x_ptr": "*u8", "w_ptr": "*i8", "scale_ptr": "*fp32", "bias_ptr": "*fp32", "fp_ptr": "*bf16",
           "slot_ptr": "*i32", "rq_ptr": "*fp32", "xf_ptr": "*bf16", "wf_ptr": "*bf16", "fb_ptr": "*fp32"}
    shipped = T.compiled_configs()
    for t in (shipped[0], shipped[-1]):  # the largest tile (wgmma) and the smallest-M one (mma.sync)
        for a_nib, mode, dst in ((True, 2, "*u8"), (True, 1, "*bf16"), (False, 0, "*i32")):
            consts = dict(A_NIB=a_nib, A_SIGNED=False, A_ALIGNED=True, OUT_MODE=mode, HAS_BIAS=True, HAS_FP=True,
                          RELU=True, RQ_LEVELS=15, RQ_SIGNED=False, RQ_NIB=True, K_FULL=False, **t.meta())
            p = ptx(C._qconv_kernel, dict(sig, out_ptr=dst), consts, num_warps=t.num_warps, num_stages=t.num_stages)
            mma = "wgmma" if "wgmma" in p else ("mma.sync" if "mma.sync" in p else "none")
            out.append({"kernel": f"qconv {t.name} nib={a_nib} mode={mode}", "block_m": t.block_m,
                        "fma": len(re.findall(r"\bfma\.rn", p)), "mma": mma})
    # Spills: every shipped tile in every variant family the launcher can specialise to.
    for t in shipped:
        for name, (v, dst) in SPILL_VARIANTS.items():
            consts = dict(dict(A_SIGNED=False), HAS_BIAS=v["OUT_MODE"] != 0, HAS_FP=v["OUT_MODE"] != 0,
                          RELU=v["OUT_MODE"] != 0, RQ_LEVELS=15, RQ_SIGNED=False, RQ_NIB=True, **v, **t.meta())
            stages = min(t.num_stages, C.SPLIT_K_STAGES) if v.get("SPLIT_K", 1) > 1 else t.num_stages  # as launched
            asm = compiled(C._qconv_kernel, dict(sig, out_ptr=dst), consts, num_warps=t.num_warps, num_stages=stages)
            p = asm["ptx"]
            out.append({"kernel": f"qconv {t.name} {name}", "spill": ptxas_usage(p)})
            if name in WITH_TAIL:
                out.append({"kernel": f"qconv {t.name} {name} tail", "cp_async": len(re.findall(r"cp\.async\.c", p))})
            if name in PIPELINED:
                out.append({"kernel": f"qconv {t.name} {name} loads", "a_nib": v["A_NIB"],
                            "cp_async": len(re.findall(r"cp\.async\.c", p)),
                            "byte_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.[ubs]8\b", p)),
                            "swar": len(re.findall(r"0x0F0F0F0F", p)), "mainloop_sass": mainloop_sass_count(asm["cubin"])})
        # the split-K epilogue kernel, in its heaviest mode (re-quantized nibble codes)
        ep_sig = {"acc_ptr": "*i32", "out_ptr": "*u8", "scale_ptr": "*fp32", "bias_ptr": "*fp32", "fp_ptr": "*bf16",
                  "slot_ptr": "*i32", "rq_ptr": "*fp32"}
        p = ptx(C._split_k_epilogue_kernel, ep_sig,
                dict(OUT_MODE=2, HAS_BIAS=True, HAS_FP=True, RELU=True, RQ_LEVELS=15, RQ_SIGNED=False, RQ_NIB=True,
                     BLOCK_M=t.block_m, BLOCK_N=t.block_n), num_warps=t.num_warps)
        out.append({"kernel": f"split-K epilogue {t.name}", "spill": ptxas_usage(p)})
    return out


@pytest.mark.slow
def test_triton_kernels_compile_for_hopper_without_fma_and_on_tensor_cores():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    from hybridops.kernels import tiles

    ptx_checks = [r for r in results if "fma" in r]
    spills = [r for r in results if "spill" in r]
    loads = [r for r in results if "cp_async" in r and "byte_loads" in r]
    tails = [r for r in results if "cp_async" in r and "byte_loads" not in r]
    assert len(tails) == len(WITH_TAIL) * len(tiles.compiled_configs())
    assert all(r["cp_async"] > 0 for r in tails), tails
    assert len(loads) == len(PIPELINED) * len(tiles.compiled_configs())
    for r in loads:  # full K steps: vector copies, no byte loads; packed codes split four bytes at a time
        print(r["kernel"], "main-loop SASS instructions:", r["mainloop_sass"])
        assert r["cp_async"] > 0 and r["byte_loads"] == 0, r
        assert (r["swar"] > 0) == r["a_nib"], r
        assert r["mainloop_sass"] != 0, r  # the loop holding the MMAs was found (-1: no nvdisasm)
    assert len(ptx_checks) == 9
    for r in ptx_checks:
        assert r["fma"] == 0, r
        if r["mma"] is not None:
            assert r["mma"] == ("wgmma" if r["block_m"] >= 64 else "mma.sync"), r
    assert len(spills) == len(tiles.compiled_configs()) * (len(SPILL_VARIANTS) + 1)  # + the split-K epilogue
    spilling = [r for r in spills if r["spill"] != 0]
    assert not spilling, f"shipped tiles that spill registers on sm_90 (drop them from kernels/tiles.py): {spilling}"


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
