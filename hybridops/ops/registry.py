"""The backend registry: which implementations of the ``hybridops::`` ops exist, where they run.

A backend is a namespace with three functions taking exactly the positional arguments of the
functions of the same names in :mod:`hybridops.ops.reference` — ``fake_quantize``,
``quantize_activate`` and ``qconv2d`` — plus the facts the op layer needs about it
(:class:`BackendSpec`), and optional ones the op layer looks up by name (the fused hybrid conv,
``qconv2d_residual``: ``qconv2d``'s arguments plus an NHWC residual its epilogue adds before the
ReLU, ``quantized_attention_finite`` for ``hybridops::quantized_attention``). The registrations, one
:func:`register_backend` call per backend, are at the end of this module; nothing else in the op
layer names a backend. A new backend adds its launcher module (``kernels/`` or ``csrc/``) and one
call there. Loading is deferred to first use so that importing hybridops never imports Triton or
the compiled extension.
"""
from __future__ import annotations

import functools
import importlib
import os
import types
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from ..kernels.packing import packed_size
from . import reference

OPS = ("fake_quantize", "quantize_activate", "qconv2d")


@dataclass(frozen=True)
class BackendSpec:
    """One backend.

    Attributes:
        name: what users pass as ``backend=``.
        load: returns the namespace with the three ops; may raise ImportError (an optional
            dependency is missing), which makes the backend unavailable with that reason.
        devices: device types it runs on (``"cpu"``, ``"cuda"``); ``None``: any device.
        auto_rank: order among the backends ``"auto"`` may pick on a device it runs on (lower
            first); ``None``: only used when asked for by name.
        nibble_codes: activation codes of <= 4 bits travel two per byte (the storage format of
            :mod:`hybridops.kernels.packing`); False: one code per byte, the compute format of int8
            units that consume one code per byte (the CPU's AMX / VNNI).
        unsigned8: accepts unsigned 8-bit activation codes (0..255); int8 tensor-core kernels
            cannot (their A operand is signed 8-bit).
        device_check: an extra ``device -> reason or None`` test (for example the Triton
            interpreter that lets a CUDA backend run on the CPU).
        hint: what to do when ``load`` fails (a sentence appended to the reason).
    """

    name: str
    load: Callable[[], object]
    devices: Optional[Tuple[str, ...]] = None
    auto_rank: Optional[int] = None
    nibble_codes: bool = True
    unsigned8: bool = False
    device_check: Optional[Callable[[torch.device], Optional[str]]] = None
    hint: str = ""


_REGISTRY: Dict[str, BackendSpec] = {}


def register_backend(spec: BackendSpec) -> None:
    """Add a backend (its name must be new)."""
    if spec.name in _REGISTRY or spec.name == "auto":
        raise ValueError(f"a backend named {spec.name!r} is already registered.")
    _REGISTRY[spec.name] = spec


def backend_names() -> Tuple[str, ...]:
    """Every registered backend, in registration order (the reference first)."""
    return tuple(_REGISTRY)


def backend_spec(name: str) -> BackendSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {backend_names()} or 'auto'.") from None


@functools.lru_cache(maxsize=None)
def _load(name: str):
    return backend_spec(name).load()


@functools.lru_cache(maxsize=None)
def _load_error(name: str) -> Optional[str]:
    try:
        _load(name)
    except Exception as e:  # any import-time failure makes the backend unavailable, with its reason
        return f"{type(e).__name__}: {e}"
    return None


def unavailable_reason(name: str, device) -> Optional[str]:
    """None when backend ``name`` can run on ``device``, else a sentence that says why not."""
    device = torch.device(device)
    if name not in _REGISTRY:
        return f"unknown backend {name!r}; choose one of {backend_names()} or 'auto'."
    spec = _REGISTRY[name]
    err = _load_error(name)
    if err:
        return f"the {name} backend failed to load ({err})" + (f"; {spec.hint}" if spec.hint else ".")
    if spec.device_check is not None:
        return spec.device_check(device)
    if spec.devices is not None and device.type not in spec.devices:
        where = " or ".join(d.upper() for d in spec.devices)
        return f"the {name} backend runs on {where} tensors, got a tensor on {device}."
    return None


def auto_candidates(device) -> Tuple[str, ...]:
    """Backends ``"auto"`` may pick on ``device``, best first (availability not yet checked)."""
    device = torch.device(device)
    ranked = [s for s in _REGISTRY.values() if s.auto_rank is not None
              and (s.devices is None or device.type in s.devices)]
    return tuple(s.name for s in sorted(ranked, key=lambda s: s.auto_rank))


def implementation(name: str, op: str):
    """Backend ``name``'s function for ``op`` (loading the backend on first use)."""
    backend_spec(name)  # an unknown name is a ValueError, like any bad argument
    reason = _load_error(name)
    if reason:
        raise RuntimeError(unavailable_reason(name, "cpu"))
    return getattr(_load(name), op)


@functools.lru_cache(maxsize=None)
def loaded(name: str):
    """Backend ``name``'s namespace, loaded on first use; ValueError for an unknown name,
    RuntimeError with the reason where it cannot load."""
    backend_spec(name)
    if _load_error(name):
        raise RuntimeError(unavailable_reason(name, "cpu"))
    return _load(name)


def optional_implementation(name: str, op: str) -> Optional[Callable]:
    """Backend ``name``'s function for an optional ``op`` (a fused kernel the op layer otherwise
    composes from other ops), or None where the backend has none or cannot load."""
    if _load_error(name):
        return None
    return getattr(_load(name), op, None)


def code_bytes(channels: int, bits: int, backend: str) -> int:
    """Bytes per pixel of ``channels`` activation codes in ``backend``'s code format."""
    return packed_size(channels, bits) if backend_spec(backend).nibble_codes else channels


# ----------------------------------------------------------------------------- the registrations
def _triton_ops():
    # Triton is an optional dependency: importing it here, on first use, keeps hybridops
    # importable without it.
    quantize = importlib.import_module("hybridops.kernels.quantize")
    qconv = importlib.import_module("hybridops.kernels.qconv")
    attention = importlib.import_module("hybridops.kernels.attention")
    return types.SimpleNamespace(fake_quantize=quantize.fake_quantize,
                                 quantize_activate=quantize.quantize_activate,
                                 quantize_activate_flagged=quantize.quantize_activate_flagged, qconv2d=qconv.qconv2d,
                                 fused_hybrid_conv2d=qconv.fused_hybrid_conv2d,
                                 fuse_pruned_branch=qconv.fuse_pruned_branch,
                                 quantized_attention_finite=attention.quantized_attention_finite)


def _cuda_ops():
    # The compiled extension is optional (CPU-only installs have none).
    importlib.import_module("hybridops.ops.cuda_ext").load()
    ops = torch.ops.hybridops
    return types.SimpleNamespace(fake_quantize=ops.cuda_fake_quantize, quantize_activate=ops.cuda_quantize_activate,
                                 quantize_activate_flagged=ops.cuda_quantize_activate_flagged,
                                 qconv2d=ops.cuda_qconv2d)


def triton_interpreter() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_device(device: torch.device):
    if device.type != "cuda" and not triton_interpreter():
        return (f"the triton backend runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1), "
                f"got a tensor on {device}.")
    return None


def _onednn_ops():
    # needs the compiled CPU kernels (hybridops._C_cpu), which an install without a C++ compiler lacks
    onednn = importlib.import_module("hybridops.kernels.onednn")
    attention = importlib.import_module("hybridops.kernels.onednn_attention")

    def fake_quantize(x, qparams, bits, signed):
        # float64 stays in float64: the reference computes in it, the C++ kernel in fp32
        impl = reference.fake_quantize if x.dtype == torch.float64 else onednn.fake_quantize
        return impl(x, qparams, bits, signed)

    def quantized_attention_finite(q, *args):
        # float64 likewise (gradcheck's dtype); the int8 path quantizes in fp32
        impl = reference.quantized_attention_finite if q.dtype == torch.float64 \
            else attention.quantized_attention_finite
        return impl(q, *args)

    return types.SimpleNamespace(fake_quantize=fake_quantize, quantize_activate=onednn.quantize_activate,
                                 quantize_activate_flagged=onednn.quantize_activate_flagged,
                                 qconv2d=onednn.qconv2d, qconv2d_residual=onednn.qconv2d,
                                 fp_conv2d=onednn.fp_conv2d, fp_linear=onednn.fp_linear,
                                 quantized_attention_finite=quantized_attention_finite,
                                 fp_conv_dtypes=(torch.float32, torch.bfloat16) if onednn.bf16_supported()
                                 else (torch.float32,))


register_backend(BackendSpec("torch", load=lambda: reference, unsigned8=True))
register_backend(BackendSpec("triton", load=_triton_ops, devices=("cuda",), auto_rank=1, device_check=_triton_device,
                             hint="the triton backend needs Triton (pip install triton)."))
register_backend(BackendSpec("cuda", load=_cuda_ops, devices=("cuda",), auto_rank=0,
                             hint="the cuda backend needs the compiled extension hybridops._C; reinstall with a CUDA "
                                  "toolkit: pip install --no-build-isolation -e ."))
register_backend(BackendSpec("onednn", load=_onednn_ops, devices=("cpu",), auto_rank=0, nibble_codes=False,
                             unsigned8=True))
