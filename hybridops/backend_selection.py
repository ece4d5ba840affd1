"""Backend selection: one switch for which kernels deployed layers run on.

The registered backends (:mod:`hybridops.ops.registry`): ``torch`` (the plain-PyTorch reference,
exact, any device), ``onednn`` (the CPU's int8 units through PyTorch's oneDNN), ``triton`` and
``cuda`` (``csrc/``) on CUDA devices. One switch picks the backend (:func:`set_backend`, the
:func:`use_backend` context manager, or ``backend=`` of :func:`hybridops.deploy_`); ``"auto"``
resolves per device to the best available backend there, else the reference. Nothing here
touches a GPU at import time. A backend asked for by name that cannot run raises with the
reason; nothing silently falls back to another one.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional

import torch

from .ops.registry import auto_candidates, backend_names, triton_interpreter, unavailable_reason

_default = "auto"
# device types for which "auto" has said that it falls back to the reference backend
_warned_reference: set = set()

__all__ = ["available_backends", "backend_unavailable_reason", "get_backend", "resolve_backend", "set_backend",
           "triton_interpreter", "use_backend"]


def backend_unavailable_reason(backend: str, device) -> Optional[str]:
    """None when ``backend`` can run on ``device``, else a sentence that says why not."""
    return unavailable_reason(backend, device)


def available_backends(device="cpu") -> list:
    """Backends that can run on ``device``, reference first."""
    return [b for b in backend_names() if unavailable_reason(b, device) is None]


def set_backend(name: str) -> None:
    """Set the process-wide default backend (``"auto"`` restores per-device selection)."""
    global _default
    if name != "auto" and name not in backend_names():
        raise ValueError(f"unknown backend {name!r}; choose one of {backend_names()} or 'auto'.")
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
        reasons = []
        for candidate in auto_candidates(device):
            reason = unavailable_reason(candidate, device)
            if reason is None:
                return candidate
            reasons.append(reason)
        if reasons and device.type not in _warned_reference:
            # a fast backend exists for this device but cannot run: say so once, not silently 10x slower
            _warned_reference.add(device.type)
            warnings.warn(f"backend='auto' runs the reference backend (torch) on {device.type}: {reasons[0]}",
                          RuntimeWarning, stacklevel=2)
        return "torch"
    reason = unavailable_reason(name, device)
    if reason:
        raise RuntimeError(reason)
    return name
