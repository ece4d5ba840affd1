"""Backend selection: ``torch`` (reference, exact, any device), ``triton``, ``cuda`` (csrc/).

One switch picks the backend (:func:`set_backend`, or the :func:`use_backend` context manager,
or an explicit ``backend=`` argument to :func:`hybridops.deploy_`). ``"auto"`` resolves per
device: CUDA tensors get the fastest kernel backend that is installed, CPU tensors get
``torch``. Nothing here touches a GPU at import time. A backend that was asked for by name and
cannot run raises; it never silently falls back to another one.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
from typing import Iterator, Optional

import torch

BACKENDS = ("torch", "triton", "cuda")
_default = "auto"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        importlib.import_module("triton")
        importlib.import_module("hybridops.kernels")
    except Exception as e:  # any import-time failure makes the backend unavailable
        return f"{type(e).__name__}: {e}"
    return None


@functools.lru_cache(maxsize=None)
def _cuda_ext_import_error() -> Optional[str]:
    try:
        importlib.import_module("hybridops.ops.cuda_ext").load()  # imports _C, registers its fake kernels
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def triton_interpreter() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """None when ``backend`` can run on ``device``, else a sentence that says why not."""
    device = torch.device(device)
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'."
    if backend == "torch":
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return f"the triton backend needs Triton, which failed to import ({err})."
        if device.type != "cuda" and not triton_interpreter():
            return (f"the triton backend runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1), "
                    f"got a tensor on {device}.")
        return None
    err = _cuda_ext_import_error()
    if err:
        return ("the cuda backend needs the compiled extension hybridops._C, which is missing or stale "
                f"({err}); reinstall with a CUDA toolkit: pip install --no-build-isolation -e .")
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got a tensor on {device}."
    return None


def available_backends(device="cpu") -> list:
    """Backends that can run on ``device``, reference first."""
    return [b for b in BACKENDS if backend_unavailable_reason(b, device) is None]


def set_backend(name: str) -> None:
    """Set the process-wide default backend (``"auto"`` restores per-device selection)."""
    global _default
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS} or 'auto'.")
    _default = name


def get_backend() -> str:
    """The process-wide default (``"auto"`` unless changed)."""
    return _default


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily change the default backend."""
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def resolve_backend(name: Optional[str], device) -> str:
    """Turn ``name`` (None or "auto" means the default) into a concrete backend for ``device``,
    raising a clear error if it cannot run there."""
    device = torch.device(device)
    name = name or _default
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        for candidate in ("cuda", "triton"):
            if backend_unavailable_reason(candidate, device) is None:
                return candidate
        return "torch"
    reason = backend_unavailable_reason(name, device)
    if reason:
        raise RuntimeError(reason)
    return name
