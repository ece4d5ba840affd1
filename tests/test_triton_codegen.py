"""The Triton kernels compile for Hopper (sm_90) on a machine without a GPU, with the properties
the design relies on, checked in the generated PTX:

* no fused multiply-add anywhere: the quantizer and epilogue must round every fp32 operation like
  the reference so that codes are bitwise equal (docs/kernels.md, exactness rules);
* the integer conv runs on tensor cores: ``wgmma`` for the large tiles, ``mma.sync`` for the
  small-M (batch-1) tiles.

Compilation needs Triton's real compiler, not the interpreter that the rest of the CPU test run
uses, so it runs in a subprocess without TRITON_INTERPRET.
"""
import json
import os
import re
import subprocess
import sys

import pytest


def _compile_all() -> list:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import hybridops.kernels.qconv as C
    import hybridops.kernels.quantize as Q

    def ptx(jf, sig, consts, **opts):
        full = {n: ("constexpr" if n in consts else sig.get(n, "i32")) for n in jf.arg_names}
        src = ASTSource(jf, full, constexprs=consts)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(enable_fp_fusion=False, **opts)).asm["ptx"]

    out = []
    for dt in ("*fp32", "*bf16"):
        p = ptx(Q._fake_quantize_kernel, {"x_ptr": dt, "out_ptr": dt, "qp_ptr": "*fp32", "numel": "i64"},
                dict(LEVELS=15, INV_LEVELS=1 / 15, SIGNED=True, F64=False, BLOCK=1024), num_warps=4)
        out.append({"kernel": f"fake_quantize {dt}", "fma": len(re.findall(r"\bfma\.rn", p)), "mma": None})
    p = ptx(Q._quantize_activate_kernel,
            {"x_ptr": "*bf16", "codes_ptr": "*u8", "slice_ptr": "*bf16", "qp_ptr": "*fp32", "scale_ptr": "*fp32",
             "shift_ptr": "*fp32", "slot_ptr": "*i32", "keep_ptr": "*i64", "repeat_ptr": "*i8"},
            dict(LEVELS=15, SIGNED=False, NIBBLE=True, HAS_SCALE=True, HAS_SHIFT=True, RELU=True, HAS_SLICE=True,
                 BLOCK_P=16, BLOCK_C=64), num_warps=4)
    out.append({"kernel": "quantize_activate", "fma": len(re.findall(r"\bfma\.rn", p)), "mma": None})
    sig = {"x_ptr": "*u8", "w_ptr": "*u8", "scale_ptr": "*fp32", "bias_ptr": "*fp32", "fp_ptr": "*bf16",
           "slot_ptr": "*i32", "rq_ptr": "*fp32"}
    configs = C._configs()
    for cfg in (configs[0], configs[-3]):  # a large tile and a small-M tile
        for a_nib, w_nib, mode, dst in ((True, True, 2, "*u8"), (True, True, 1, "*bf16"), (False, False, 0, "*i32")):
            consts = dict(A_NIB=a_nib, A_SIGNED=False, A_ALIGNED=True, W_NIB=w_nib, PLANES=2 if a_nib else 1,
                          OUT_MODE=mode, HAS_BIAS=True, HAS_FP=True, RELU=True, RQ_LEVELS=15, RQ_SIGNED=False,
                          RQ_NIB=True, **cfg.kwargs)
            p = ptx(C._qconv_kernel.fn, dict(sig, out_ptr=dst), consts, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages)
            mma = "wgmma" if "wgmma" in p else ("mma.sync" if "mma.sync" in p else "none")
            out.append({"kernel": f"qconv {cfg.kwargs} nib={a_nib} mode={mode}", "block_m": cfg.kwargs["BLOCK_M"],
                        "fma": len(re.findall(r"\bfma\.rn", p)), "mma": mma})
    return out


@pytest.mark.slow
def test_triton_kernels_compile_for_hopper_without_fma_and_on_tensor_cores():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 9
    for r in results:
        assert r["fma"] == 0, r
        if r["mma"] is not None:
            assert r["mma"] == ("wgmma" if r["block_m"] >= 64 else "mma.sync"), r


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
