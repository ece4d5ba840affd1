"""Reading ``ptxas -v`` output, for the tests that hold compiled CUDA kernels to their resource
budget (``test_cuda_kernels.py``, ``test_sm90_cutlass.py``)."""
from __future__ import annotations

import re
from typing import Callable, Dict, Hashable, Optional


def resource_usage(text: str, key: Callable[[str, str], Optional[Hashable]]) -> Dict[Hashable, Dict[str, int]]:
    """``{key(mangled name, arch): {regs, stack, spill_stores, spill_loads}}`` for each entry
    function ptxas reports; entries whose key is None are skipped."""
    out: Dict[Hashable, Dict[str, int]] = {}
    cur = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            k = key(*m.groups())
            cur = None if k is None else out.setdefault(k, {})
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
    return out
