"""Build and install hybridops.

``pip install .`` works on a CPU-only machine. pyproject.toml declares the build's requirements;
the README installs them first and builds with ``--no-build-isolation`` so that the extensions are
compiled against the installed torch. The CPU extension (``csrc/cpu/``) is required; the CUDA one
(``csrc/``) is built when a CUDA toolkit is found. An extension that was asked for and cannot be
compiled ends the install with one sentence naming it and the switch that skips it; nothing is
dropped silently. bench/install_matrix.py checks the install across pip and setuptools versions.

Environment variables:
  HYBRIDOPS_BUILD_CPU=0|1    0 skips the CPU extension hybridops._C_cpu (default 1: required).
  HYBRIDOPS_BUILD_CUDA=0|1   0 skips the CUDA extension; 1 requires it (the build fails loudly
                             instead of silently skipping). Default: build if possible.
  HYBRIDOPS_CUDA_ARCHS       any of 8.0, 8.6, 8.9, 9.0, 9.0a separated by ";" (default "8.0;9.0", what
                             CI compiles: sm_80 SASS also runs on 8.6 / 8.9, so CI skips those two
                             and 9.0a). Passed as TORCH_CUDA_ARCH_LIST.
  MAX_JOBS                   parallel compile jobs of the ninja build (default: every CPU core).
  HYBRIDOPS_BUILD_SM90=0|1|only  hybridops._C_sm90, the CUTLASS Hopper qconv2d (csrc/sm90/): built
                             by default when the CUDA extension is, 9.0a is among the archs and
                             the CUTLASS headers are installed (nvidia-cutlass, the [bench] extra);
                             0 skips it, 1 requires it, "only" builds it alone (requiring it), e.g.
                             `python setup.py build_ext --inplace --build-temp build/sm90` beside a
                             main build, as bench/gpu_suite.sh does. CI's default archs leave it out.
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

# Absolute: a PEP 517 build may run setup.py by a relative path, and the compiler wrapper below
# is run from the build folder.
ROOT = Path(__file__).resolve().parent
# Architectures the CUDA extension may be built for (HYBRIDOPS_CUDA_ARCHS): Ampere, Ampere
# GA10x, Ada, Hopper, and Hopper with its architecture-specific features.
CUDA_ARCHS = ("8.0", "8.6", "8.9", "9.0", "9.0a")


def find_cuda_home():
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, else /usr/local/cuda, else the parent of the
    folder holding nvcc, whichever has the runtime headers. (torch's own guess takes the parent
    of the first nvcc on PATH, which is wrong when that nvcc is a wrapper script elsewhere, e.g.
    /usr/local/bin/nvcc.)"""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").exists() and (Path(c) / "bin" / "nvcc").exists():
            return c
    return None


def cuda_extension():
    """Return (ext_modules, cmdclass) for csrc/, or empty ones when it cannot or should not build."""
    want = os.environ.get("HYBRIDOPS_BUILD_CUDA", "auto").lower()
    if want in ("0", "false", "no", "off"):
        return [], {}
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.c*") if p.suffix in (".cu", ".cpp"))
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if want in ("1", "true", "yes", "on"):
            sys.exit("HYBRIDOPS_BUILD_CUDA=1 but torch is not importable; install torch first and "
                     "use pip install --no-build-isolation.")
        return [], {}
    if cuda_home is None or CUDA_HOME is None or not sources:
        if want in ("1", "true", "yes", "on"):
            sys.exit("HYBRIDOPS_BUILD_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME).")
        return [], {}
    archs = os.environ.get("HYBRIDOPS_CUDA_ARCHS", "8.0;9.0")
    arch_list = [a.strip() for a in archs.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    unknown = [a for a in arch_list if a not in CUDA_ARCHS]
    if unknown or not arch_list:
        sys.exit(f"HYBRIDOPS_CUDA_ARCHS={archs!r}: choose from {', '.join(CUDA_ARCHS)} (separated by ';').")
    archs = ";".join(arch_list)
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    # ninja compiles the sources in parallel (torch's BuildExtension reads MAX_JOBS); nvcc's
    # --threads compiles one source's architectures in parallel too.
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    ninja = shutil.which("ninja") is not None  # also the pip package's, which it puts on PATH
    if ninja and "PYTORCH_NVCC" not in os.environ:
        # nvcc through csrc/nvcc_ptxas_log.sh: ptxas's register / spill report of each source is
        # kept in build/ptxas/ (tests/test_cuda_kernels.py asserts that shipped kernels do not
        # spill). A PYTORCH_NVCC set by the user (ccache, say) is left alone.
        os.environ["HYBRIDOPS_NVCC"] = str(Path(cuda_home) / "bin" / "nvcc")
        os.environ.setdefault("HYBRIDOPS_PTXAS_LOG_DIR", str(ROOT / "build" / "ptxas"))
        os.environ["PYTORCH_NVCC"] = str(ROOT / "csrc" / "nvcc_ptxas_log.sh")
    how = f"ninja, MAX_JOBS={os.environ['MAX_JOBS']}" if ninja else "setuptools, one source at a time (no ninja found)"
    print(f"hybridops: CUDA extension hybridops._C for {archs}, built with {how}", file=sys.stderr)
    # The kernels use cp.async and mma.sync int8 (sm_80+). No --use_fast_math: the quantizer
    # and epilogue must round every fp32 operation exactly like the reference. No -std flag:
    # torch's BuildExtension adds the C++ standard its own headers need (C++20 for recent torch).
    ext = CUDAExtension(
        name="hybridops._C",
        sources=sources,
        extra_compile_args={
            "cxx": ["-O3", f'-DHYBRIDOPS_CUDA_ARCHS="{archs}"'],
            "nvcc": ["-O3", "-lineinfo", f"--threads={len(arch_list)}"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=ninja)}


def cutlass_include_dirs():
    """CUTLASS's and CuTe's headers from the installed nvidia-cutlass wheel (its cutlass_library
    package ships them under source/), without importing its Python modules; None if absent."""
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent / "source"
    dirs = [root / "include", root / "tools" / "util" / "include"]
    if not (dirs[0] / "cutlass" / "conv" / "collective" / "collective_builder.hpp").exists():
        return None
    return [str(d) for d in dirs]


def sm90_extension(cuda_ext_built: bool):
    """Return the ext_modules list for hybridops._C_sm90 (csrc/sm90/): CUTLASS 3's Hopper int8 conv
    mainloop with the hybrid epilogue, one kernel per source (CTA tile x output type), compiled
    for sm_90a only (wgmma and TMA im2col exist only there). Needs the CUDA extension (it
    dispatches here), 9.0a in HYBRIDOPS_CUDA_ARCHS and the nvidia-cutlass headers."""
    want = os.environ.get("HYBRIDOPS_BUILD_SM90", "auto").lower()
    if want in ("0", "false", "no", "off"):
        return []
    required = want in ("1", "true", "yes", "on", "only")
    archs = [a.strip() for a in os.environ.get("TORCH_CUDA_ARCH_LIST", "").split(";")]
    includes = cutlass_include_dirs()
    why = ("the CUDA extension is not built" if not cuda_ext_built else
           "9.0a is not in HYBRIDOPS_CUDA_ARCHS" if "9.0a" not in archs else
           "the CUTLASS headers are missing (pip install nvidia-cutlass==4.2.0.0)" if includes is None else None)
    if why:
        if required:
            sys.exit(f"HYBRIDOPS_BUILD_SM90=1 but {why}.")
        print(f"hybridops: skipping hybridops._C_sm90 (CUTLASS Hopper qconv2d): {why}", file=sys.stderr)
        return []
    from torch.utils.cpp_extension import CUDAExtension

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "sm90").glob("*.cu"))
    print(f"hybridops: CUTLASS Hopper qconv2d hybridops._C_sm90 ({len(sources)} sources, sm_90a)", file=sys.stderr)
    # An explicit -gencode makes torch skip TORCH_CUDA_ARCH_LIST for this extension. NDEBUG drops
    # CUTLASS's device-side asserts, as its release builds do. No --use_fast_math (see below).
    return [CUDAExtension(
        name="hybridops._C_sm90",
        sources=sources,
        include_dirs=includes,
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "-lineinfo", "-DNDEBUG", "-gencode=arch=compute_90a,code=sm_90a"]},
    )]


def cpu_extension():
    """Return (ext_modules, cmdclass) for csrc/cpu/ (hybridops._C_cpu, the onednn backend's own
    kernels), or empty ones when torch is not importable at build time. Plain C++ (no CUDA, no
    ISA flags beyond the compiler's default), so it builds on any machine with a C++ compiler.
    Required unless HYBRIDOPS_BUILD_CPU=0 skips it (the onednn backend then reports why it cannot
    load)."""
    if os.environ.get("HYBRIDOPS_BUILD_CPU", "1").lower() in ("0", "false", "no", "off"):
        return [], {}
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        # An isolated build without torch would drop the kernels silently and leave the package on
        # its 10x slower reference backend.
        sys.exit("hybridops: torch is not importable while building, so the CPU kernels cannot be "
                 "compiled: install torch first and add --no-build-isolation (or set HYBRIDOPS_BUILD_CPU=0 "
                 "to install without them).")
    # -ffp-contract=off: the quantizer must round every fp32 multiply and add separately, as the
    # reference does (a fused multiply-add would change codes at rounding boundaries).
    # -fno-trapping-math: lets the compiler turn float comparisons into selects and vectorise the
    # quantizer (results are unchanged: no code here reads floating-point exception flags).
    ext = CppExtension(name="hybridops._C_cpu", sources=sources,
                       extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=False)}


def check_wheel_command():
    """Building a wheel, editable or not, needs a ``bdist_wheel`` command: setuptools has its own
    from 70.1; older ones take it from the wheel package. Without one, setuptools fails with
    "invalid command 'bdist_wheel'"; say what to do instead."""
    if not {"bdist_wheel", "editable_wheel", "dist_info"} & set(sys.argv[1:]):  # dist_info runs bdist_wheel
        return
    from importlib.metadata import entry_points, version

    if not any(ep.name == "bdist_wheel" for ep in entry_points(group="distutils.commands")):
        sys.exit(f"hybridops: setuptools {version('setuptools')} cannot build wheels without the wheel package: "
                 f"pip install 'setuptools>=70.1' (the README's requirements.txt does) or pip install wheel.")


check_wheel_command()

# The switch that skips each extension, named when its build fails.
SKIP_SWITCH = {"hybridops._C": "HYBRIDOPS_BUILD_CUDA=0", "hybridops._C_sm90": "HYBRIDOPS_BUILD_SM90=0",
               "hybridops._C_cpu": "HYBRIDOPS_BUILD_CPU=0"}


def failing_loudly(build_ext):
    """``build_ext`` whose failure to compile an extension (or to run the compiler at all) ends the
    install with one sentence naming it, after the compiler's own output, instead of a traceback
    through setuptools."""
    class BuildExt(build_ext):
        def build_extensions(self):
            self.hybridops_building = None
            try:
                super().build_extensions()
            except Exception as e:  # CompileError, LinkError, a ninja or compiler-check failure
                names = [self.hybridops_building] if self.hybridops_building else [x.name for x in self.extensions]
                raise SystemExit(f"hybridops: could not compile {', '.join(names)} ({type(e).__name__}: {e}); "
                                 f"the compiler's output is above; fix it or set "
                                 f"{' and '.join(SKIP_SWITCH[n] for n in names)} to install without it.") from e

        def build_extension(self, ext):
            self.hybridops_building = ext.name
            super().build_extension(ext)
    return BuildExt


ext_modules, cmdclass = cuda_extension()
if os.environ.get("HYBRIDOPS_BUILD_SM90", "").lower() == "only":
    ext_modules = sm90_extension(bool(ext_modules))
else:
    ext_modules = ext_modules + sm90_extension(bool(ext_modules))
    _cpu_ext, _cpu_cmd = cpu_extension()
    ext_modules = ext_modules + _cpu_ext
    cmdclass = {**_cpu_cmd, **cmdclass}
if "build_ext" in cmdclass:
    cmdclass["build_ext"] = failing_loudly(cmdclass["build_ext"])

setup(
    name="hybridops",
    version="0.2.0",
    description="GPU kernels for hybrid low-bit networks (quantized + channel-pruned full-precision branches)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["hybridops", "hybridops.ops", "hybridops.kernels", "hybridops_tracking"],
    package_dir={"hybridops": "hybridops", "hybridops.kernels": "kernels", "hybridops_tracking": "apps/tracking"},
    # the core imports torch alone (Triton, when present, for the triton backend)
    install_requires=["torch>=2.11"],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "torchvision>=0.26"],
        "cupy": ["cupy-cuda13x"],
        # The benchmarks (bench/): progress bars, plots, torchvision models, and CUTLASS's C++
        # headers for the stock CUTLASS conv baseline in bench/cutlass_conv/ (built on demand by
        # bench/bench_kernels.py on Hopper GPUs); hybridops itself needs none of them.
        "bench": ["nvidia-cutlass==4.2.0.0", "tqdm==4.70.1", "matplotlib==3.11.2", "torchvision>=0.26"],
        # The tracking application (apps/tracking, imported as hybridops_tracking); the core needs none of these.
        "tracking": ["numpy==2.4.6", "tqdm==4.70.1", "matplotlib==3.11.2", "torchvision==0.29.1"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["hybridops-track=hybridops_tracking.launcher:main"]},
)
