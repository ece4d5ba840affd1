"""What only the CUDA C++ backend (``csrc/``, extension ``hybridops._C``) has: the extension's
loading and build info, the qconv2d kernel selection (``qconv2d_plan``), devices and streams, and
the raw ``torch.ops.hybridops.cuda_*`` ops. The kernels' results against the reference are tested,
for every kernel backend, by ``test_kernels.py``.

GPU tests are marked ``gpu`` and skipped when the extension or a GPU is missing.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from ptxas_report import resource_usage
from test_kernels import (CONV_CASES, assert_same, conv_case_id, conv_cases, conv_inputs, epilogue_inputs,
                          make_qparams, poison_cuda_allocator, run_qconv)

from hybridops.backend_selection import backend_unavailable_reason
from hybridops.ops import cuda_ext, registry

ops = torch.ops.hybridops
_EXT_REASON = backend_unavailable_reason("cuda", "cpu")  # None once the extension imports
_EXT_MISSING = _EXT_REASON is not None and "hybridops._C" in _EXT_REASON


def _gpu_skip_reason():
    if not torch.cuda.is_available():
        return "the cuda kernels need a CUDA GPU."
    return backend_unavailable_reason("cuda", "cuda")


def gpu(fn):
    """Mark a test as needing the extension and a GPU."""
    reason = _gpu_skip_reason() if not _EXT_MISSING else _EXT_REASON
    return pytest.mark.gpu(pytest.mark.skipif(reason is not None, reason=str(reason))(fn))


needs_ext = pytest.mark.skipif(_EXT_MISSING, reason=str(_EXT_REASON))


# ----------------------------------------------------------------------------- without a GPU
@pytest.mark.skipif(not _EXT_MISSING, reason="the extension is installed; this checks the error without it")
def test_missing_extension_message():
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=r"hybridops\._C.*pip install --no-build-isolation"):
        torch.ops.hybridops.fake_quantize(x, torch.tensor([1.0, 0.0]), 4, False, "cuda")


@needs_ext
def test_stale_extension_message(monkeypatch):
    """A build whose op schemas predate the sources is refused with a sentence saying so."""
    monkeypatch.setattr(cuda_ext, "OPS_VERSION", cuda_ext.OPS_VERSION + 1)
    cuda_ext.load.cache_clear()
    registry._load_error.cache_clear()
    registry._load.cache_clear()
    try:
        reason = backend_unavailable_reason("cuda", "cuda")
        assert reason is not None and "stale" in reason and "pip install" in reason
    finally:
        monkeypatch.undo()
        cuda_ext.load.cache_clear()
        registry._load_error.cache_clear()
        registry._load.cache_clear()
    assert backend_unavailable_reason("cuda", "cpu") == "the cuda backend runs on CUDA tensors, got a tensor on cpu."


@needs_ext
def test_build_info():
    info = cuda_ext.build_info()
    assert info["ops_version"] == cuda_ext.OPS_VERSION
    assert info["cuda_archs"] and info["cuda_runtime"] > 0
    assert set(info["qconv2d_kernels"]) == {"mma_128x128", "mma_128x64", "mma_64x64", "mma_32x64", "mma_s4_128x128",
                                            "mma_s4_128x64", "mma_s4_64x64", "mma_s4_32x64", "direct"}


@needs_ext
@pytest.mark.parametrize("case", conv_cases(), ids=conv_case_id)
def test_qconv2d_plan(case):
    """The kernel each shared CONV_CASES shape runs on an H100 (132 SMs)."""
    (n, cin, h, w, cout, k, stride, pad, dil, groups, *_), plan = case
    ho = (h + pad[0] + pad[1] - dil[0] * (k - 1) - 1) // stride[0] + 1
    wo = (w + pad[2] + pad[3] - dil[1] * (k - 1) - 1) // stride[1] + 1
    ext = cuda_ext.load()
    assert ext.qconv2d_plan(n * ho * wo, cin // groups, cout // groups, groups, False, 132) == plan
    # Packed requantization of an odd per-group channel count needs one writer per byte.
    assert ext.qconv2d_plan(n * ho * wo, 17, 17, 2, True, 132) == "direct"


@needs_ext
def test_conv_cases_run_shipped_kernels():
    """CONV_CASES name kernels that exist; every kernel template, whichever shapes reach it, runs in
    test_every_qconv2d_template (forced plans)."""
    assert {plan for _, plan in conv_cases()} <= set(cuda_ext.build_info()["qconv2d_kernels"])
    assert len(CONV_CASES) == len(conv_cases())


@needs_ext
@pytest.mark.parametrize("m,cout,plan", [
    (32 * 56 * 56, 64, "mma_128x64"),     # ResNet-50 layer1 3x3, batch 32: never a 128-wide N tile at C_out 64
    (32 * 31 * 31, 256, "mma_128x128"),   # layer3 3x3 dilated, batch 32
    (32 * 28 * 28, 128, "mma_128x64"),    # 196 CTAs of 128x128 would not fill 132 SMs twice
    (32 * 14 * 14, 256, "mma_64x64"),
    (31 * 31, 256, "mma_32x64"),          # batch 1
    (7 * 7, 512, "mma_32x64"),
])
def test_qconv2d_plan_by_m_and_cout(m, cout, plan):
    """Tiles by M and C_out on 132 SMs: the largest that fills the GPU (twice for the 128-row ones)."""
    ext = cuda_ext.load()
    assert ext.qconv2d_plan(m, cout, cout, 1, False, 132) == plan
    # a 128-wide N tile only where a group has more than 64 output channels
    for c in (16, 33, 64):
        assert ext.qconv2d_plan(1 << 24, 64, c, 1, False, 132) == "mma_128x64"


@needs_ext
def test_qconv2d_plan_s4():
    """Both operands packed on a GPU with 4-bit tensor cores (sm_8x): the same tiles on them; the
    direct kernel stays where it was."""
    ext = cuda_ext.load()
    for m, cout in [(32 * 56 * 56, 64), (32 * 31 * 31, 256), (32 * 14 * 14, 256), (7 * 7, 512)]:
        plan = ext.qconv2d_plan(m, cout, cout, 1, False, 108)
        assert ext.qconv2d_plan(m, cout, cout, 1, False, 108, s4=True) == plan.replace("mma_", "mma_s4_")
    assert ext.qconv2d_plan(4096, 8, 64, 1, False, 108, s4=True) == "direct"
    assert ext.qconv2d_plan(4096, 1, 1, 64, False, 108, s4=True) == "direct"  # depthwise


@needs_ext
def test_plan_override_names():
    ext = cuda_ext.load()
    with pytest.raises(RuntimeError, match=r"unknown kernel 'mma_16x16'.*mma_128x64.*direct"):
        ext.set_qconv2d_plan_override("mma_16x16")
    assert not ext.qconv2d_plan_forced()
    with cuda_ext.forced_plan("direct"):
        assert ext.qconv2d_plan_forced()
    assert not ext.qconv2d_plan_forced()
    with pytest.raises(ValueError, match="inside"), cuda_ext.forced_plan("mma_32x64"):
        raise ValueError("inside")
    assert not ext.qconv2d_plan_forced()  # restored after an error in the block too


# ----------------------------------------------------------------------------- ptxas resource usage
ROOT = Path(__file__).resolve().parent.parent
PTXAS_LOG_DIR = Path(os.environ.get("HYBRIDOPS_PTXAS_LOG_DIR", ROOT / "build" / "ptxas"))



def parse_ptxas_log(text: str):
    """``ptxas -v`` output -> ``{(kernel, template args, arch): {regs, stack, spill_stores, spill_loads}}``.

    Kernel names are the demangled base names of csrc's kernels; template arguments are read
    from the Itanium mangling (``ILi128ELi128E...Lb1ELb0EE``) as a comma-separated string."""
    def key(mangled: str, arch: str):
        name = re.search(r"(qconv_\w+?_kernel|fake_quantize_kernel|quantize_activate_kernel)", mangled)
        targs = re.search(r"_kernelI(.*?)EEv", mangled)
        args = []
        if targs:
            for kind, val in re.findall(r"L([ib])(\d+)E", targs.group(1)):
                args.append(("true" if val == "1" else "false") if kind == "b" else val)
            # Type arguments (float, c10::Half, ...) stay mangled after the values, so that
            # each instantiation keeps its own key.
            types = re.sub(r"L[ib]\d+E", "", targs.group(1))
            if types:
                args.append(types)
        return (name.group(1) if name else mangled, ",".join(args), arch)

    return resource_usage(text, key)


def test_parse_ptxas_log():
    log = """ptxas info    : Compiling entry function '_ZN9hybridops43_GLOBAL__N__7d4bd6ec_10_qconv2d_cu_df5db2d416qconv_mma_kernelILi128ELi128ELi2ELi4ELb0ELb1EEEvNS0_9ConvShapeENS0_8EpilogueEb' for 'sm_90'
ptxas info    : Function properties for _ZN9hybridops...
    64 bytes stack frame, 48 bytes spill stores, 136 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 64 bytes cumulative stack size, 1024 bytes smem
ptxas info    : Compiling entry function '_ZN9hybridops43_GLOBAL__N__7d4bd6ec_10_qconv2d_cu_df5db2d419qconv_direct_kernelENS0_9ConvShapeENS0_8EpilogueE' for 'sm_80'
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 45 registers, used 1 barriers, 512 bytes smem
ptxas info    : Compiling entry function '_ZN9hybridops12_GLOBAL__N_120fake_quantize_kernelIN3c104HalfELi4EEEvPKT_PS4_PKfl' for 'sm_90'
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 0 bytes smem
"""
    got = parse_ptxas_log(log)
    assert got == {("qconv_mma_kernel", "128,128,2,4,false,true", "sm_90"):
                   dict(stack=64, spill_stores=48, spill_loads=136, regs=128),
                   ("qconv_direct_kernel", "", "sm_80"): dict(stack=0, spill_stores=0, spill_loads=0, regs=45),
                   ("fake_quantize_kernel", "4,N3c104HalfE", "sm_90"): dict(stack=0, spill_stores=0, spill_loads=0,
                                                                           regs=32)}


def _ptxas_reports():
    sources = sorted((ROOT / "csrc").glob("*.cu"))
    logs = {src: PTXAS_LOG_DIR / f"{src.name}.ptxas.log" for src in sources}
    missing = [src.name for src, log in logs.items() if not log.exists()]
    if missing:
        pytest.skip(f"no ptxas report of {', '.join(missing)} in {PTXAS_LOG_DIR}: the CUDA extension was not built "
                    "here with setup.py's ninja build (pip install --no-build-isolation -e . with nvcc present)")
    stale = [src.name for src, log in logs.items() if src.stat().st_mtime > log.stat().st_mtime]
    if stale:
        pytest.skip(f"the ptxas reports of {', '.join(stale)} predate their sources; rebuild the extension")
    return {src.name: parse_ptxas_log(log.read_text()) for src, log in logs.items()}


def local_memory_users(kernels):
    """Kernels with a stack frame or register spills: local memory, which the kernels must not
    touch (a spill is a round trip through L1 in the mainloop; a stack frame is usually an array
    indexed at run time)."""
    return sorted(k for k, v in kernels.items() if v["stack"] or v["spill_stores"] or v["spill_loads"])


def test_local_memory_users():
    clean = dict(stack=0, spill_stores=0, spill_loads=0, regs=64)
    kernels = {("qconv_direct_kernel", "", "sm_80"): clean,
               ("qconv_mma_kernel", "32,64,1,4,4,false,4", "sm_90"): dict(clean, stack=16),
               ("qconv_mma_kernel", "128,64,2,2,8,false,4", "sm_90"): dict(clean, spill_loads=4)}
    assert local_memory_users(kernels) == [("qconv_mma_kernel", "128,64,2,2,8,false,4", "sm_90"),
                                           ("qconv_mma_kernel", "32,64,1,4,4,false,4", "sm_90")]


# The qconv_mma_kernel instantiations of a build: 4 tiles x (A 4-bit unsigned / signed / one-byte)
# x (W 4-bit / one-byte); template arguments as parse_ptxas_log writes them. qconv_mma_s4_kernel:
# the 4 tiles x A unsigned / signed (4-bit tensor cores; a trapping stub in sm_90 code).
MMA_TILES = ("128,128,2,4", "128,64,2,2", "64,64,2,2", "32,64,1,4")
MMA_OPERANDS = ("4,false,4", "4,true,4", "4,false,8", "4,true,8", "8,false,4", "8,false,8")
S4_OPERANDS = ("false", "true")


def test_built_kernels_keep_to_registers():
    """Reads the resource usage ptxas reported for every kernel of the build (setup.py's nvcc
    wrapper keeps it) and asserts that none has a stack frame or spills, on every architecture
    built, and that every qconv2d template was built."""
    reports = _ptxas_reports()
    kernels = {k: v for rep in reports.values() for k, v in rep.items()}
    names = {k[0] for k in kernels}
    assert {"qconv_mma_kernel", "qconv_direct_kernel", "quantize_activate_kernel"} <= names, names
    assert all("spill_stores" in v and "stack" in v and "regs" in v for v in kernels.values()), kernels
    archs = {k[2] for k in kernels}
    built = {(k[1], k[2]) for k in kernels if k[0] == "qconv_mma_kernel"}
    assert built == {(f"{t},{o}", a) for t in MMA_TILES for o in MMA_OPERANDS for a in archs}, sorted(built)
    s4 = {k: v for k, v in kernels.items() if k[0] == "qconv_mma_s4_kernel"}
    assert {(k[1], k[2]) for k in s4} == {(f"{t},{o}", a) for t in MMA_TILES for o in S4_OPERANDS for a in archs}
    # The 4-bit tensor-core kernels are whole kernels in sm_8x code (held to the same 128
    # registers) and a trap in sm_90 code, where 4-bit MMAs would run emulated.
    for (_, _, arch), v in s4.items():
        assert (64 <= v["regs"] <= 128) if arch < "sm_90" else v["regs"] < 16, (arch, v)
    bad = local_memory_users(kernels)
    assert not bad, f"kernels with a stack frame or spills: {[(k, kernels[k]) for k in bad]}"


def _cuobjdump():
    """cuobjdump from the CUDA toolkit, else the copy the triton wheel ships, else None."""
    import shutil

    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


@needs_ext
def test_s4_mma_only_in_sm8x_code():
    """The built SASS: 4-bit MMAs (IMMA.16864) in the sm_8x code only, none in sm_90 code (Hopper
    would run them emulated, ~20x slower than int8); in sm_8x code they take u4 and s4
    activations against s4 weights."""
    import importlib.util
    import subprocess

    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or the triton wheel)")
    so = importlib.util.find_spec("hybridops._C").origin
    archs = re.findall(r"\.(sm_\d+a?)\.cubin", subprocess.run([tool, "-lelf", so], capture_output=True, text=True,
                                                               check=True).stdout)
    assert archs
    for arch in sorted(set(archs)):
        sass = subprocess.run([tool, "-sass", "-arch", arch, so], capture_output=True, text=True, check=True).stdout
        kinds = set(re.findall(r"IMMA\.16864\.(\w+\.\w+)", sass))
        if arch < "sm_90":
            assert kinds == {"U4.S4", "S4.S4"}, (arch, kinds)
        else:
            assert not kinds, (arch, kinds)


# ----------------------------------------------------------------------------- GPU
# (bits_a, a_signed, bits_w) reaching each operand variant of the tensor-core kernel: A packed
# unsigned / signed, A one byte, each against packed and one-byte weights.
TEMPLATE_BITS = [(4, False, 4), (3, True, 4), (2, False, 8), (4, True, 8), (6, False, 4), (8, True, 8)]


@gpu
@pytest.mark.parametrize("plan", ["mma_128x128", "mma_128x64", "mma_64x64", "mma_32x64", "direct"])
@pytest.mark.parametrize("bits", TEMPLATE_BITS, ids=lambda b: f"a{b[0]}{'s' if b[1] else 'u'}w{b[2]}")
@pytest.mark.parametrize("cin,cout,groups", [(64, 64, 1), (34, 40, 2)], ids=["cp.async", "gathered"])
def test_every_qconv2d_template(plan, bits, cin, cout, groups):
    """Every kernel template (tile forced, small shapes) against the reference: raw accumulators,
    and the float epilogue (bias, FP branch, ReLU) re-quantized to packed codes. The second shape
    gathers rows code by code (17 channels per group, group 1 starting mid-byte) and ends its
    groups mid vector (20 channels: scalar epilogue stores)."""
    _check_template(plan, bits, cin, cout, groups)


S4_PLANS = ["mma_s4_128x128", "mma_s4_128x64", "mma_s4_64x64", "mma_s4_32x64"]


def _int4_tensor_cores():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 8


@gpu
@pytest.mark.parametrize("plan", S4_PLANS)
@pytest.mark.parametrize("bits", [(4, False, 4), (3, True, 4), (2, False, 2)], ids=["a4uw4", "a3sw4", "a2uw2"])
@pytest.mark.parametrize("cin,cout,groups", [(64, 64, 1), (34, 40, 2), (224, 24, 1), (200, 16, 1)],
                         ids=["half-chunk", "gathered", "k-tail", "gathered-tail"])
def test_every_s4_template(plan, bits, cin, cout, groups):
    """The 4-bit tensor-core kernels (sm_80 / 86 / 89 only), forced: u4 and s4 activations, a last
    chunk of <= 64 channels (k-step 1 skipped), gathered rows, a K tail inside k-step 1 (224)."""
    if not _int4_tensor_cores():
        pytest.skip("4-bit tensor cores: compute capability 8.x only")
    _check_template(plan, bits, cin, cout, groups)


@gpu
def test_s4_kernels_where_the_hardware_has_them():
    """A 4/4-bit layer runs qconv_mma_s4_kernel on compute capability 8.x and never elsewhere
    (Hopper emulates 4-bit MMAs); forcing it where it cannot run is refused with a reason."""
    x_codes, w_packed, _ = conv_inputs(2, 64, 9, 9, 64, 3, 1, 4, False, 4)
    args = (x_codes, w_packed, 64, 4, False, 4, torch.ones(64, device="cuda"), None, [1, 1], [1, 1, 1, 1], [1, 1], 1)
    ref = run_qconv("torch", *args, out_dtype=torch.int32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        got = run_qconv("cuda", *args, out_dtype=torch.int32)
        torch.cuda.synchronize()
    assert_same(got, ref)
    names = sorted({e.name for e in prof.events()})
    assert any("qconv_mma_s4_kernel" in n for n in names) == _int4_tensor_cores(), names
    if not _int4_tensor_cores():
        with cuda_ext.forced_plan("mma_s4_32x64"), pytest.raises(RuntimeError, match="needs 4-bit tensor cores"):
            run_qconv("cuda", *args, out_dtype=torch.int32)
    x8, w8, _ = conv_inputs(2, 64, 9, 9, 64, 3, 1, 8, True, 4)
    with cuda_ext.forced_plan("mma_s4_32x64"), pytest.raises(RuntimeError, match="8-bit activations, 4-bit weights"):
        run_qconv("cuda", x8, w8, *args[2:3], 8, True, *args[5:], out_dtype=torch.int32)


def _check_template(plan, bits, cin, cout, groups):
    bits_a, a_signed, bits_w = bits
    x_codes, w_packed, gen = conv_inputs(2, cin, 7, 6, cout, 3, groups, bits_a, a_signed, bits_w, seed=cin + bits_a)
    scale, bias, fp_out, fp_out_idx = epilogue_inputs(cout, 7, 6, 2, gen, [cout - 1, 0, 5, 5], torch.float32)
    geo = (x_codes, w_packed, cin, bits_a, a_signed, bits_w, scale, None, [1, 1], [1, 1, 1, 1], [1, 1], groups)
    ref = run_qconv("torch", *geo, out_dtype=torch.int32)
    with cuda_ext.forced_plan(plan):
        poison_cuda_allocator(x_codes.device)
        assert_same(run_qconv("cuda", *geo, out_dtype=torch.int32), ref)
    geo = geo[:7] + (bias,) + geo[8:]
    rq = make_qparams(0.0, 4.0, False)
    ref = run_qconv("torch", *geo, relu=True, fp_out=fp_out, fp_out_idx=fp_out_idx, rq=rq, rq_bits=4)
    with cuda_ext.forced_plan(plan):
        poison_cuda_allocator(x_codes.device)
        assert_same(run_qconv("cuda", *geo, relu=True, fp_out=fp_out, fp_out_idx=fp_out_idx, rq=rq, rq_bits=4), ref)

@gpu
def test_qconv2d_other_device_and_stream():
    """Kernels run on the input's device and the current stream (no device 0 or default stream)."""
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    x_codes, w_packed, _ = conv_inputs(1, 32, 6, 6, 32, 3, 1, 4, False, 4)
    x_codes, w_packed = x_codes.to(dev), w_packed.to(dev)
    args = (x_codes, w_packed, 32, 4, False, 4, torch.ones(32, device=dev), None, [1, 1], [1, 1, 1, 1], [1, 1], 1)
    ref = run_qconv("torch", *args, out_dtype=torch.int32)
    poison_cuda_allocator(dev)
    stream = torch.cuda.Stream(device=dev)
    with torch.cuda.stream(stream):
        got = run_qconv("cuda", *args, out_dtype=torch.int32)
    stream.synchronize()
    assert_same(got, ref)


@gpu
def test_qconv2d_argument_errors():
    x_codes, w_packed, _ = conv_inputs(1, 8, 4, 4, 4, 3, 1, 4, False, 4)
    scale = torch.ones(4, device="cuda")
    tail = (None, [1, 1], [1, 1, 1, 1], [1, 1], 1, False, None, None, None, 4, False, torch.float32)
    with pytest.raises(RuntimeError, match=r"x_codes must be contiguous packed codes.*NHWC.*strides"):
        ops.cuda_qconv2d(x_codes.transpose(1, 2), w_packed, 8, 4, False, 4, scale, *tail)
    with pytest.raises(RuntimeError, match=r"w_packed has 2 bytes per tap, expected 4"):
        ops.cuda_qconv2d(x_codes, w_packed[..., :2].contiguous(), 8, 4, False, 4, scale, *tail)
    with pytest.raises(RuntimeError, match=r"scale must have shape \[4\], got \[5\]"):
        ops.cuda_qconv2d(x_codes, w_packed, 8, 4, False, 4, torch.ones(5, device="cuda"), *tail)
    with pytest.raises(RuntimeError, match=r"x_codes must have dtype Byte, got Float"):
        ops.cuda_qconv2d(x_codes.float(), w_packed, 8, 4, False, 4, scale, *tail)
    with pytest.raises(RuntimeError, match=r"w_packed must be a CUDA tensor on cuda.*got a tensor on cpu"):
        ops.cuda_qconv2d(x_codes, w_packed.cpu(), 8, 4, False, 4, scale, *tail)
    with pytest.raises(RuntimeError, match="unsigned 8-bit"):
        ops.cuda_quantize_activate(torch.randn(1, 2, 3, 3, device="cuda"), make_qparams(0.0, 1.0, False), 8, False,
                                   None, None, False, None, None)


@gpu
def test_opcheck_cuda_ops():
    x = torch.randn(2, 5, 3, 4, device="cuda")
    qp = make_qparams(-1.0, 1.0, False)
    torch.library.opcheck(ops.cuda_fake_quantize, (x, qp, 4, False))
    keep = torch.tensor([3, 1], device="cuda")
    torch.library.opcheck(ops.cuda_quantize_activate, (x, qp, 4, False, None, None, True, keep, None))
    torch.library.opcheck(ops.cuda_quantize_activate, (x.to(memory_format=torch.channels_last), qp, 5, True,
                                                       torch.rand(5, device="cuda"), None, False, None,
                                                       torch.float16))
    torch.library.opcheck(ops.cuda_quantize_activate_flagged, (x, qp, 4, False, None, None, True, keep, None))
    for cin, cout in [(6, 5), (32, 24)]:
        x_codes, w_packed, gen = conv_inputs(1, cin, 4, 4, cout, 3, 1, 4, False, 4)
        scale, bias, fp_out, fp_out_idx = epilogue_inputs(cout, 4, 4, 1, gen, [4, 1], torch.float32)
        torch.library.opcheck(ops.cuda_qconv2d, (x_codes, w_packed, cin, 4, False, 4, scale, bias, [1, 1],
                                                 [1, 1, 1, 1], [1, 1], 1, True, fp_out.contiguous(), fp_out_idx, None, 4,
                                                 False, torch.float32))
        torch.library.opcheck(ops.cuda_qconv2d, (x_codes, w_packed, cin, 4, False, 4, scale, None, [1, 1],
                                                 [1, 1, 1, 1], [1, 1], 1, False, None, None, qp, 4, False,
                                                 torch.float32))
        torch.library.opcheck(ops.cuda_qconv2d, (x_codes, w_packed, cin, 4, False, 4, scale, None, [2, 1],
                                                 [0, 1, 2, 0], [1, 1], 1, False, None, None, None, 4, False,
                                                 torch.int32))


@gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_quantize_activate_flags_nonfinite_inputs(layout):
    x = torch.randn(2, 13, 5, 6, device="cuda")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    qp = make_qparams(-1.0, 1.0, True)
    keep = torch.tensor([3, 1, 12], device="cuda")
    s, codes, flag = ops.cuda_quantize_activate_flagged(x, qp, 4, True, None, None, False, keep, None)
    rs, rcodes = ops.cuda_quantize_activate(x, qp, 4, True, None, None, False, keep, None)
    assert flag.dtype == torch.int32 and flag.tolist() == [0]
    assert torch.equal(codes, rcodes) and torch.equal(s, rs)
    for value in (float("nan"), float("inf"), float("-inf")):
        bad = x.clone()
        bad[1, 12, 4, 5] = value  # the last channel of the last pixel: the tail of the last tile
        assert ops.cuda_quantize_activate_flagged(bad, qp, 4, True, None, None, False, keep, None)[2].tolist() == [1]
    # a ReLU maps -inf to 0, which is finite: the flag follows the activated value, as float PyTorch would
    bad = x.clone()
    bad[0, 0, 0, 0] = float("-inf")
    assert ops.cuda_quantize_activate_flagged(bad, qp, 4, True, None, None, True, keep, None)[2].tolist() == [0]
