"""What only the Triton backend (``hybridops.kernels``) has: the interpreter. The kernels' results
against the reference are tested, for every kernel backend, by ``test_kernels.py``.
"""
from __future__ import annotations

import pytest
import torch

from hybridops.backend import backend_unavailable_reason


@pytest.mark.skipif(backend_unavailable_reason("triton", "cpu") is not None,
                    reason="checks the CPU-tensor error of a GPU run; needs Triton and TRITON_INTERPRET=1")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    from hybridops.kernels import _common

    monkeypatch.setattr(_common, "INTERPRET", False)
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="CUDA device, got cpu"):
        torch.ops.hybridops.fake_quantize(x, torch.tensor([1.0, 0.0]), 4, False, "triton")
