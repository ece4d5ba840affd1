"""Anchors, box encoding/decoding and overlaps for the SiamRPN++ tracker.

Conventions used throughout :mod:`hybridops_tracking`:

* An image box is ``(x, y, w, h)`` in continuous pixel coordinates: the box covers
  ``[x, x + w) x [y, y + h)`` and its centre is ``(x + w/2, y + h/2)``. OTB ground truth is
  1-based (MATLAB); we keep the numbers exactly as the file has them, because the tracker is
  initialised from the same file and is scored against it, so the offset cancels.
* A centre box is ``(cx, cy, w, h)``.
* Anchors live in *search-crop* coordinates relative to the crop centre (as in pysot): the
  anchor at score-map cell ``(i, j)`` is centred at ``((j - S//2) * stride, (i - S//2) * stride)``.
  Anchor tensors are laid out ``(4, A, S, S)`` with channel order ``cx, cy, w, h``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def generate_anchors(stride: int, ratios: Sequence[float], scales: Sequence[float], score_size: int) -> torch.Tensor:
    """Anchor grid for a ``score_size x score_size`` response map.

    Each base anchor has area ``(stride * scale)^2`` and aspect ``h / w = ratio``; sizes are
    rounded to whole pixels as in SiamRPN/pysot so that the anchors match published ones.

    Returns:
        ``(4, A, S, S)`` float32 tensor, ``A = len(ratios) * len(scales)``, channels ``cx, cy, w, h``.
    """
    if score_size < 1:
        raise ValueError(f"score_size must be >= 1, got {score_size}.")
    base = []
    area = stride * stride
    for r in ratios:
        ws = int(math.sqrt(area / r))
        hs = int(ws * r)
        for s in scales:
            base.append((ws * s, hs * s))
    wh = torch.tensor(base, dtype=torch.float32)  # (A, 2)
    ori = -(score_size // 2) * stride
    pos = ori + stride * torch.arange(score_size, dtype=torch.float32)
    cy, cx = torch.meshgrid(pos, pos, indexing="ij")  # (S, S)
    a = wh.shape[0]
    anchors = torch.empty(4, a, score_size, score_size)
    anchors[0] = cx.expand(a, -1, -1)
    anchors[1] = cy.expand(a, -1, -1)
    anchors[2] = wh[:, 0, None, None].expand(-1, score_size, score_size)
    anchors[3] = wh[:, 1, None, None].expand(-1, score_size, score_size)
    return anchors


def encode(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Regression targets of centre boxes w.r.t. anchors (SiamRPN parameterisation).

    ``dx = (cx - acx) / aw``, ``dy = (cy - acy) / ah``, ``dw = log(w / aw)``, ``dh = log(h / ah)``.

    Args:
        boxes: centre boxes ``(4, ...)`` broadcastable against ``anchors``.
        anchors: ``(4, ...)``.
    Returns:
        deltas ``(4, ...)``.
    """
    return torch.stack([
        (boxes[0] - anchors[0]) / anchors[2],
        (boxes[1] - anchors[1]) / anchors[3],
        torch.log(boxes[2] / anchors[2]),
        torch.log(boxes[3] / anchors[3]),
    ])


def decode(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode`: ``(4, ...)`` deltas -> ``(4, ...)`` centre boxes."""
    return torch.stack([
        deltas[0] * anchors[2] + anchors[0],
        deltas[1] * anchors[3] + anchors[1],
        torch.exp(deltas[2]) * anchors[2],
        torch.exp(deltas[3]) * anchors[3],
    ])


def center_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of centre boxes ``a (4, ...)`` and ``b (4, ...)`` (broadcast); returns ``(...)``."""
    ax0, ax1 = a[0] - a[2] / 2, a[0] + a[2] / 2
    ay0, ay1 = a[1] - a[3] / 2, a[1] + a[3] / 2
    bx0, bx1 = b[0] - b[2] / 2, b[0] + b[2] / 2
    by0, by1 = b[1] - b[3] / 2, b[1] + b[3] / 2
    iw = (torch.minimum(ax1, bx1) - torch.maximum(ax0, bx0)).clamp(min=0)
    ih = (torch.minimum(ay1, by1) - torch.maximum(ay0, by0)).clamp(min=0)
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union.clamp(min=1e-12)


def xywh_to_center(box) -> np.ndarray:
    """``(x, y, w, h)`` -> ``(cx, cy, w, h)``; works on ``(4,)`` or ``(N, 4)`` arrays."""
    b = np.asarray(box, dtype=np.float64)
    return np.concatenate([b[..., :2] + b[..., 2:] / 2, b[..., 2:]], axis=-1)


def center_to_xywh(box) -> np.ndarray:
    """``(cx, cy, w, h)`` -> ``(x, y, w, h)``; works on ``(4,)`` or ``(N, 4)`` arrays."""
    b = np.asarray(box, dtype=np.float64)
    return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., 2:]], axis=-1)
