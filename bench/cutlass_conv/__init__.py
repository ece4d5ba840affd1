"""Stock CUTLASS 3 int8 conv fprop for Hopper, built on demand: the benchmarks' CUTLASS baseline.

``cutlass_conv.cu`` instantiates CUTLASS's own implicit-GEMM conv (collective builders, TMA
im2col + wgmma, int32 accumulation, per-channel fp32 scale, bf16 output) for two CTA tiles,
128x128x128 and 64x128x128, through the assembly hybridops' own Hopper kernel uses
(``csrc/sm90/conv_sm90.cuh``: same mainloop, CUTLASS's plain scale epilogue instead of ours). Nothing in hybridops imports this: it is compiled the first time a
benchmark asks for it (several minutes; nvcc on one .cu) into ``build/`` beside this file, or
into ``$HYBRIDOPS_CUTLASS_BUILD_DIR``, and reused while the sources and flags are unchanged.

Needs the ``nvidia-cutlass`` wheel (``pip install -e .[bench]``; only the CUTLASS and CuTe C++
headers it ships are used, so on a machine without network ``pip install --no-deps --no-index
nvidia_cutlass-4.2.0.0-py3-none-any.whl`` from a carried file is enough), a CUDA toolkit with
nvcc (``$CUDA_HOME``), and an sm_90 GPU to run on.

    import cutlass_conv                                   # with bench/ on sys.path
    y = cutlass_conv.conv2d_s8(x_nhwc, w_krsc, scale, (1, 1), (1, 1), (1, 1), tile="128x128")
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Sequence

import torch

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "cutlass_conv.cu"
# csrc/: the kernel assembly shared with hybridops' own Hopper qconv2d (csrc/sm90/conv_sm90.cuh).
CSRC = HERE.parent.parent / "csrc"
TILES = {"128x128": 128, "64x128": 64}  # provider suffix -> CTA tile M; tile N and K are 128 for both

# sm_90a, not sm_90: wgmma and TMA im2col are architecture-specific features that CUTLASS
# enables only under the "a" target. NDEBUG drops device-side asserts, as CUTLASS's release
# builds do. torch adds --expt-relaxed-constexpr (CuTe needs it) and the C++ standard its own
# headers need.
NVCC_FLAGS = ["-O3", "-gencode=arch=compute_90a,code=sm_90a", "-DNDEBUG"]

_module = None
_build_error: str | None = None  # a failed build is not retried in the same process (minutes each)


class CutlassUnavailable(RuntimeError):
    """The extension cannot be built or run here; the message says why."""


def include_dirs() -> list[str]:
    """CUTLASS's and CuTe's headers from the installed ``nvidia-cutlass`` wheel, without importing
    its Python generator modules."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or spec.origin is None:
        raise CutlassUnavailable("the nvidia-cutlass wheel is not installed (pip install -e .[bench]); "
                                 "it provides CUTLASS's C++ headers.")
    root = Path(spec.origin).parent / "source"
    dirs = [root / "include", root / "tools" / "util" / "include"]
    if not (dirs[0] / "cutlass" / "conv" / "collective" / "collective_builder.hpp").exists():
        raise CutlassUnavailable(f"the nvidia-cutlass wheel at {root.parent} has no CUTLASS 3 conv headers; "
                                 "install nvidia-cutlass==4.2.0.0.")
    return [str(d) for d in dirs]


def build_dir() -> Path:
    d = Path(os.environ.get("HYBRIDOPS_CUTLASS_BUILD_DIR", HERE / "build"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def loaded() -> bool:
    """Whether this process already holds the compiled extension."""
    return _module is not None


def build(verbose: bool = False):
    """Compile (or reuse) and import the extension. Needs nvcc, not a GPU, so a CPU machine can
    check that the CUDA code builds."""
    global _module, _build_error
    if _module is not None:
        return _module
    if _build_error is not None:
        raise CutlassUnavailable(_build_error)
    from torch.utils import cpp_extension

    includes = include_dirs()
    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None or not (Path(cuda_home) / "bin" / "nvcc").exists():
        raise CutlassUnavailable("no CUDA toolkit with nvcc was found; set CUDA_HOME to its root "
                                 "(e.g. /usr/local/cuda) before starting Python.")
    try:
        _module = cpp_extension.load(name="hybridops_bench_cutlass_conv", sources=[str(SOURCE)],
                                     extra_include_paths=includes + [str(CSRC)], extra_cuda_cflags=NVCC_FLAGS,
                                     build_directory=str(build_dir()), verbose=verbose)
    except (RuntimeError, OSError, ImportError) as e:  # compiler errors surface as RuntimeError
        _build_error = f"building the CUTLASS conv extension failed: {e}"
        raise CutlassUnavailable(_build_error) from e
    return _module


def load(device: torch.device | str | None = None, verbose: bool = False):
    """The extension, after checking that ``device`` (default: the current GPU) is an sm_90 part
    (H100/H200): the kernels are compiled for sm_90a only."""
    if not torch.cuda.is_available():
        raise CutlassUnavailable("no CUDA GPU is visible; the CUTLASS conv runs on sm_90 (Hopper) only.")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        raise CutlassUnavailable(f"the GPU is sm_{major}{minor}; the CUTLASS conv is built for sm_90a "
                                 "(H100/H200) only.")
    return build(verbose)


def supports(c_in: int, c_out: int, groups: int) -> bool:
    """Whether the kernel can take a layer: groups == 1, and 16-byte TMA rows, i.e. C_in a
    multiple of 16 int8 and C_out a multiple of 8 bf16."""
    return groups == 1 and c_in % 16 == 0 and c_out % 8 == 0


def conv2d_s8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, stride: Sequence[int], pad: Sequence[int],
              dilation: Sequence[int], tile: str = "128x128") -> torch.Tensor:
    """``bf16(scale[k] * sum_{r,s,c} x[n, p*sh + r*dh - ph, q*sw + s*dw - pw, c] * w[k, r, s, c])``.

    x: (N, H, W, C) int8 contiguous; w: (K, R, S, C) int8 contiguous; scale: (K,) float32;
    stride, pad (symmetric), dilation: (h, w); tile: a key of ``TILES``.
    Returns (N, P, Q, K) bf16 contiguous (NHWC).
    """
    if tile not in TILES:
        raise ValueError(f"tile must be one of {sorted(TILES)}, got {tile!r}")
    mod = _module if _module is not None else load(x.device)  # checks the GPU once, not per call
    return mod.conv2d_s8(x, w, scale, list(stride), list(pad), list(dilation), TILES[tile])
