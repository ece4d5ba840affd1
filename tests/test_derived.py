"""The package's one cache of derived tensors (kernels/derived.py): built once per source version,
rebuilt when a source changes, dropped with any source, bounded per source, thread-safe."""
import gc

import pytest
import torch

from hybridops.kernels import derived

from concurrency import run_in_threads


@pytest.fixture(autouse=True)
def _own_table(monkeypatch):
    monkeypatch.setattr(derived, "_entries", {})  # this test's entries only


def test_built_once_per_version_and_freed_with_the_source():
    calls = []

    def double(t, k):
        calls.append(k)
        return t * k

    w = torch.arange(4)
    first = derived.cached("double", (w,), 2, lambda: double(w, 2))
    assert derived.cached("double", (w,), 2, lambda: double(w, 2)) is first and calls == [2]
    assert derived.peek("double", (w,), 2) is first
    w.add_(1)  # in place: a new version
    assert derived.peek("double", (w,), 2) is None
    assert torch.equal(derived.cached("double", (w,), 2, lambda: double(w, 2)), (torch.arange(4) + 1) * 2)
    assert calls == [2, 2]
    w.data = torch.zeros(4, dtype=torch.long)  # new storage, same tensor object and version (module.to does this)
    assert torch.equal(derived.cached("double", (w,), 2, lambda: double(w, 2)), torch.zeros(4, dtype=torch.long))
    assert calls == [2] * 3 and derived.size("double") == 1  # rebuilt in place, not a new entry
    del w
    gc.collect()
    assert derived.size() == 0


def test_any_source_changed_or_freed():
    w, b = torch.arange(3), torch.ones(3, dtype=torch.long)
    assert torch.equal(derived.cached("shift", (w, b, None), 2, lambda: w * 2 + b), torch.tensor([1, 3, 5]))
    b.add_(1)  # a change in another source rebuilds too
    assert torch.equal(derived.cached("shift", (w, b, None), 2, lambda: w * 2 + b), torch.tensor([2, 4, 6]))
    assert derived.size() == 1
    del b
    gc.collect()
    assert derived.size() == 0  # any source freed: the entry goes


def test_entries_per_source_are_bounded():
    w = torch.ones(2)
    for k in range(3 * derived.PER_SOURCES):
        derived.cached("shape", (w,), k, lambda: w * k)
    assert derived.size("shape") == derived.PER_SOURCES
    assert derived.peek("shape", (w,), 3 * derived.PER_SOURCES - 1) is not None  # the latest stay


def test_threads_share_the_table():
    """Eight threads building and reading entries of shared and own sources: every value is the
    one its key asks for, and the table ends with exactly the live entries."""
    shared = [torch.full((4,), float(i)) for i in range(16)]

    def work(seed):
        own = torch.full((4,), float(seed))
        for r in range(300):
            i = (seed * 7 + r) % 16
            v = derived.cached("t", (shared[i],), r % 3, lambda: shared[i] + r % 3)
            assert torch.equal(v, shared[i] + r % 3)
            assert torch.equal(derived.cached("own", (own,), 0, lambda: own * 2), own * 2)

    errors = run_in_threads(work, 8)
    gc.collect()
    assert not errors
    assert derived.size("t") == 16 * 3 and derived.size("own") == 0
