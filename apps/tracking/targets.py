"""Training targets and task losses: anchor labels, regression targets and the RPN loss
(SiamRPN / pysot ``AnchorTarget``), and TransT's per-cell labels and its CE + L1 + GIoU loss."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou_loss

from .boxes import center_iou, encode


def anchor_targets(anchors: torch.Tensor, gt: torch.Tensor, pos_iou: float = 0.6, neg_iou: float = 0.3,
                   num_pos: int = 16, num_total: int = 64,
                   generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels and regression targets of one search crop.

    Anchors with IoU > ``pos_iou`` with the target are positives, IoU < ``neg_iou`` negatives;
    at most ``num_pos`` positives and ``num_total - #pos`` negatives are kept (random subset),
    the rest are ignored, so that the many easy background anchors do not swamp the loss.

    Args:
        anchors: ``(4, A, S, S)`` centre-form anchors in crop coordinates (centre at 0).
        gt: ``(4,)`` centre-form target box in the same coordinates.
    Returns:
        ``label (A, S, S)`` int64 in {-1 ignore, 0 negative, 1 positive},
        ``delta (4, A, S, S)`` float regression targets,
        ``delta_weight (A, S, S)``: ``1 / #pos`` on positives, 0 elsewhere.
    """
    gt = gt.reshape(4, 1, 1, 1).to(anchors)
    iou = center_iou(anchors, gt)
    delta = encode(gt.expand_as(anchors), anchors)
    label = torch.full(iou.shape, -1, dtype=torch.long)
    pos = torch.nonzero((iou > pos_iou).flatten()).flatten()
    if pos.numel() == 0:
        # A target between anchor shapes can miss 0.6 everywhere; its best anchor still is positive.
        pos = iou.flatten().argmax().reshape(1)
    neg = torch.nonzero((iou < neg_iou).flatten()).flatten()
    pos = pos[torch.randperm(pos.numel(), generator=generator)[:num_pos]]
    neg = neg[torch.randperm(neg.numel(), generator=generator)[:max(0, num_total - pos.numel())]]
    flat = label.view(-1)
    flat[neg] = 0
    flat[pos] = 1
    weight = torch.zeros(iou.shape)
    weight.view(-1)[pos] = 1.0 / pos.numel()
    return label, delta, weight


def negative_targets(anchors: torch.Tensor, gt: torch.Tensor, radius: int = 3, num_neg: int = 16,
                     generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels of a negative pair, whose search crop shows another sequence's target (pysot's
    ``AnchorTarget`` with ``neg``, after DaSiamRPN): up to ``num_neg`` random anchors of the
    score-map cells within ``radius`` cells of that object's centre ``gt`` are negatives, all
    others are ignored, so that an object is not scored as the target merely for being an object.
    With no positive anchor there is no regression loss (zero deltas and weights).

    ``anchors``, ``gt`` and the returns as in :func:`anchor_targets`.
    """
    gt = gt.to(anchors)
    col = int((anchors[0, 0, 0] - gt[0]).abs().argmin())  # the cell nearest the object's centre
    row = int((anchors[1, 0, :, 0] - gt[1]).abs().argmin())
    a, s = anchors.shape[1], anchors.shape[2]
    near = torch.zeros(a, s, s, dtype=torch.bool)
    near[:, max(0, row - radius):row + radius + 1, max(0, col - radius):col + radius + 1] = True
    neg = torch.nonzero(near.flatten()).flatten()
    neg = neg[torch.randperm(neg.numel(), generator=generator)[:num_neg]]
    label = torch.full((a, s, s), -1, dtype=torch.long)
    label.view(-1)[neg] = 0
    return label, torch.zeros(anchors.shape), torch.zeros(a, s, s)


def cls_loss(cls: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Balanced cross-entropy: ``0.5 * NLL(positives) + 0.5 * NLL(negatives)``.

    Args:
        cls: ``(B, 2, A, S, S)`` logits (background, target).
        label: ``(B, A, S, S)`` in {-1, 0, 1}.
    """
    logp = F.log_softmax(cls, dim=1)
    loss = cls.new_zeros(())
    for value in (0, 1):
        m = label == value
        if m.any():
            loss = loss + 0.5 * -(logp[:, value][m]).mean()
    return loss


def loc_loss(loc: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted L1 over the four deltas: ``sum(|loc - delta| * weight) / B``.

    ``loc, delta: (B, 4, A, S, S)``, ``weight: (B, A, S, S)``.
    """
    diff = (loc - delta).abs().sum(dim=1)
    return (diff * weight).sum() / loc.shape[0]


def track_loss(out: dict, label: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
               cls_weight: float = 1.0, loc_weight: float = 1.2) -> Tuple[torch.Tensor, dict]:
    """``L_track = cls_weight * L_cls + loc_weight * L_loc`` (pysot's 1.0 / 1.2).

    Returns the loss and a dict of its float parts for logging.
    """
    lc = cls_loss(out["cls"], label)
    ll = loc_loss(out["loc"], delta, weight)
    total = cls_weight * lc + loc_weight * ll
    return total, {"cls": float(lc.detach()), "loc": float(ll.detach())}


# -- TransT -------------------------------------------------------------------------------------
# TransT's loss weights (cross-entropy, L1, GIoU) and the weight of the "no target" class.
TRANST_WEIGHTS = (8.334, 5.0, 2.0)
TRANST_EOS = 0.0625


def transt_positions(box: torch.Tensor, size: int) -> torch.Tensor:
    """Flat indices into the ``size x size`` prediction grid of the cells TransT's matcher calls
    the target: those whose cell lies inside ``box`` (``(cx, cy, w, h)`` in [0, 1] of the search
    crop), with TransT's rounding: columns ``ceil(x0 * size) .. ceil(x1 * size) - 1``, at least one
    row and column; clipped to the grid, so a box partly outside the crop keeps its visible cells."""
    cx, cy, w, h = (float(v) for v in box)
    lo_x, hi_x = math.ceil((cx - w / 2) * size), math.ceil((cx + w / 2) * size)
    lo_y, hi_y = math.ceil((cy - h / 2) * size), math.ceil((cy + h / 2) * size)
    hi_x, hi_y = max(hi_x, lo_x + 1), max(hi_y, lo_y + 1)
    lo_x, lo_y = min(max(lo_x, 0), size - 1), min(max(lo_y, 0), size - 1)
    hi_x, hi_y = min(max(hi_x, lo_x + 1), size), min(max(hi_y, lo_y + 1), size)
    rows = torch.arange(lo_y, hi_y)
    cols = torch.arange(lo_x, hi_x)
    return (rows[:, None] * size + cols[None, :]).reshape(-1)


def transt_targets(gt: torch.Tensor, size: int, instance_size: int,
                   negative: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Targets of one TransT search crop.

    Args:
        gt: ``(4,)`` centre-form target box in crop pixels relative to the crop centre (as
            :func:`anchor_targets` takes it).
        size: side of the prediction grid; instance_size: the crop side in pixels.
        negative: the search crop shows another sequence's object: every cell is "no target" and
            there is no box loss.
    Returns:
        ``label (size * size,)`` int64, 0 (target) on :func:`transt_positions` and 1 elsewhere;
        ``box (4,)`` the target box ``(cx, cy, w, h)`` in [0, 1] of the crop.
    """
    box = torch.stack([gt[0] / instance_size + 0.5, gt[1] / instance_size + 0.5,
                       gt[2] / instance_size, gt[3] / instance_size]).float()
    label = torch.ones(size * size, dtype=torch.long)
    if not negative:
        label[transt_positions(box, size)] = 0
    return label, box


def transt_cls_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """TransT's classification loss: cross-entropy over every cell, the "no target" class
    weighted :data:`TRANST_EOS`. ``logits (B, HW, 2)``, ``label (B, HW)``."""
    return F.cross_entropy(logits.transpose(1, 2), label, weight=logits.new_tensor([1.0, TRANST_EOS]))


def transt_loss(out: dict, label: torch.Tensor, box: torch.Tensor) -> Tuple[torch.Tensor, dict]:
    """TransT's loss: ``8.334 CE + 5 L1 + 2 GIoU``, the box terms summed over the target cells
    (label 0) and divided by their number.

    ``out``: the model's ``{"logits": (B, HW, 2), "boxes": (B, HW, 4)}``; ``label (B, HW)``;
    ``box (B, 4)`` ``(cx, cy, w, h)`` in [0, 1]. Returns the loss and its float parts
    (``cls``: the weighted CE, ``loc``: the weighted box terms).
    """
    w_ce, w_l1, w_giou = TRANST_WEIGHTS
    ce = transt_cls_loss(out["logits"], label)
    b, cell = torch.nonzero(label == 0, as_tuple=True)
    num = max(int(b.numel()), 1)
    pred, target = out["boxes"][b, cell], box[b]
    l1 = (pred - target).abs().sum() / num
    giou = generalized_box_iou_loss(box_convert(pred, "cxcywh", "xyxy"), box_convert(target, "cxcywh", "xyxy"),
                                    reduction="sum") / num
    loc = w_l1 * l1 + w_giou * giou
    return w_ce * ce + loc, {"cls": float(w_ce * ce.detach()), "loc": float(loc.detach())}
