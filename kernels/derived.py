"""The package's one cache: values derived from tensors (prepacked weights, slot maps, validated
indices, merged weights, a trainable layer's deployed twin), kept while their source tensors are
alive and unchanged.

Deployed layers pass the same buffers on every call, so work that depends only on them (a
oneDNN weight reorder, a compute-ready Triton weight, the check that an index buffer holds
distinct channels) is done once per buffer instead of once per call; at batch 1 that work is a
large part of a layer's time. An entry is rebuilt when a source changes in place (its
``_version``), when its storage, device, dtype or shape is replaced (``module.to``,
``param.data = ...``), and goes when any source is freed (weak references; tensors cannot be
weak dict keys, whose lookups compare keys with ``==``). Writes through ``tensor.data`` bypass
the version counter and are not seen.

Only kernels and op implementations consult it, on real tensors: never code that
``torch.compile`` traces (a lookup keyed by identity would be guarded on and recompile). It is
safe to use from several Python threads (the kernels release the GIL): the table is guarded by
a lock, a value may be built twice by racing threads, and the last one stays.
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable, Dict, Hashable, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")

# Entries per (tag, sources): a source used with many extra keys (input shapes) keeps only the
# latest few (the oldest is dropped and rebuilt if met again). Entries without sources (constants
# such as an identity index per size) are not bounded.
PER_SOURCES = 8

# reentrant: dropping an entry can free a tensor whose weakref callback drops another entry
_lock = threading.RLock()
_entries: Dict[tuple, tuple] = {}


def fingerprint(t: Optional[torch.Tensor]):
    """What identifies a tensor's contents short of reading them: in-place updates bump
    ``_version``; ``param.data = ...`` and device moves replace the storage (its address)."""
    if t is None:
        return None
    return t._version, t.data_ptr(), t.device, t.dtype, t.shape


def _capturing(sources) -> bool:
    """A CUDA graph capture is under way (for a CUDA source; with none, on any initialised GPU)."""
    cuda = [t for t in sources if t is not None and t.is_cuda]
    if cuda or (not sources and torch.cuda.is_initialized()):
        return torch.cuda.is_current_stream_capturing()
    return False


def cached(tag: str, sources: Sequence[Optional[torch.Tensor]], key: Hashable, build: Callable[[], T]) -> T:
    """``build()``, cached under ``(tag, key)`` while every tensor of ``sources`` (None allowed)
    is alive and unchanged. A CUDA graph capture reads an entry made before it but adds none,
    since its allocations belong to the graph (capture again after changing a source)."""
    ids = tuple(id(t) for t in sources)
    full = (tag, key, ids)
    state = tuple(fingerprint(t) for t in sources)
    hit = _entries.get(full)
    if hit is not None and hit[1] == state and all(r() is t for r, t in zip(hit[0], sources)):
        return hit[2]
    if _capturing(sources):
        return build()
    value = build()

    def drop(_ref, k=full, lock=_lock, entries=_entries):
        # (bound as defaults: the callback can run at interpreter exit, after module globals are gone)
        with lock:
            entries.pop(k, None)

    refs = tuple((lambda: None) if t is None else weakref.ref(t, drop) for t in sources)
    with _lock:
        # (entries without sources are constants, one per key: never evicted)
        same = [k for k in list(_entries) if ids and k[0] == tag and k[2] == ids and k != full]
        # dropped values are released after the lock: freeing one can run other entries' callbacks
        dropped = [_entries.pop(k, None) for k in same[: max(0, len(same) + 1 - PER_SOURCES)]]
        _entries[full] = (refs, state, value)
    del dropped
    return value


def peek(tag: str, sources: Sequence[Optional[torch.Tensor]], key: Hashable):
    """The live entry :func:`cached` would return, or None (builds nothing): for tests."""
    hit = _entries.get((tag, key, tuple(id(t) for t in sources)))
    if hit is not None and hit[1] == tuple(fingerprint(t) for t in sources) and \
            all(r() is t for r, t in zip(hit[0], sources)):
        return hit[2]
    return None


def clear(tag: Optional[str] = None) -> None:
    """Drop every entry (or those of one ``tag``); they are rebuilt on next use."""
    with _lock:
        dropped = [_entries.pop(k, None) for k in list(_entries) if tag is None or k[0] == tag]
    del dropped  # released after the lock (see cached)


def size(tag: Optional[str] = None) -> int:
    """How many entries are held (of one ``tag``): for tests and the soak benchmark."""
    with _lock:
        return sum(1 for k in list(_entries) if tag is None or k[0] == tag)
