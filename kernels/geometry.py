"""Convolution geometry shared by the reference, the Triton launchers and the CUDA wrappers."""
from __future__ import annotations

from typing import Sequence, Tuple


def conv_out_size(size: int, k: int, stride: int, pad_total: int, dilation: int) -> int:
    """Output length of a convolution along one axis (``pad_total``: both sides together)."""
    return (size + pad_total - dilation * (k - 1) - 1) // stride + 1


def conv_out_hw(h: int, w: int, kh: int, kw: int, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int]) -> Tuple[int, int]:
    """``(Ho, Wo)`` for ``padding = (top, bottom, left, right)``."""
    return (conv_out_size(h, kh, stride[0], padding[0] + padding[1], dilation[0]),
            conv_out_size(w, kw, stride[1], padding[2] + padding[3], dilation[1]))
