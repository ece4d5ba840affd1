"""Anchor labels, regression targets and the RPN task loss (SiamRPN / pysot ``AnchorTarget``)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

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
