"""The training losses of the method besides the task loss (eq 10-12, 15, 16)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .config import kept_count
from .layers import _PrunedBase, _QuantBase


def quant_loss(model: nn.Module) -> torch.Tensor:
    """``L_quant = L_qW + L_qA`` (eq 10-12) over the quantized layers with normalisation enabled.

    eq 11, per layer: ``(avg(v) - mu_0)^2 + (std(v) - sigma_0)^2`` with
    ``v = alpha_W |W| + beta_W`` (un-clamped normalised weights). The targets are
    :class:`hybridops.QuantConfig`'s ``mu0, sigma0``; by default those of the layer's own weights
    at calibration, so eq 11 holds the distribution where calibration put it instead of pushing it
    to fixed values (the paper's form; docs/design.md §4 has the measurement).
    A layer whose targets await calibration is left out.

    eq 12, per layer with a quantized input, from the input's mean and std in the latest training
    forward (the tensor the activation quantizer receives stands for ``A_bn``):
    ``[avg + 2 std - (c_A + d_A)]_+ + [sigma_i - std]_+ + [mu_i - avg]_+`` where the paper's
    "mu_i, sigma_i determined by (c_A, d_A)" are defined here as ``mu_i = c_A - d_A`` (the lower
    end of the interval: the mean should not fall into the pruned range) and ``sigma_i = d_A / 2``
    (the spread should cover at least a quarter of the interval's width ``2 d_A``).
    """
    total = None
    for m in model.modules():
        targets = m.norm_targets() if (isinstance(m, _QuantBase) and m.normalize) else None
        if targets is None:
            continue
        mu0, sigma0 = targets
        mean, std = m.norm_stats()
        term = (mean - mu0) ** 2 + (std - sigma0) ** 2
        if m.aq is not None and m.act_stats is not None:
            avg, std = m.act_stats
            c, d = m.aq.c, m.aq.d
            term = term + torch.relu(avg + 2 * std - (c + d)) + torch.relu(d / 2 - std) + torch.relu((c - d) - avg)
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def prune_loss(model: nn.Module, target_keep: Optional[float] = None) -> torch.Tensor:
    """``L_prune = sum_l ||M_bar_l||_1`` (eq 15) over the prunable gates.

    ``target_keep``: a channel budget instead of eq 15's uniform pressure. Each layer keeps its
    ``ceil(target_keep * C_l)`` channels of largest gate logit free of charge and pays eq 15's
    ``M_bar`` for every other channel; the task loss moves the logits, so it decides *which*
    channels are inside the budget, and the budget *how many* survive (a channel the task
    promotes into the top ``k`` stops paying, the one it pushes out starts). Trained long enough
    (``lambda_prune`` ~1, a gate learning rate ~0.1), each layer ends at its budget or below.
    With eq 15 alone, ``lambda_prune`` trades the kept fraction against the task gradient on the
    gates, which is small while the pruned network's last layer is near its zero start
    (docs/design.md §5)."""
    if target_keep is not None and not (isinstance(target_keep, (int, float)) and 0.0 <= target_keep <= 1.0):
        raise ValueError(f"target_keep is a fraction of each layer's channels and must lie in [0, 1], got {target_keep!r}.")
    terms = []
    for m in model.modules():
        if not (isinstance(m, _PrunedBase) and m.gate.prunable):
            continue
        soft = m.gate.relaxed_mask()
        if target_keep is not None:
            free = torch.topk(m.gate.logits.detach(), kept_count(target_keep, m.gate.channels) if target_keep > 0 else 0).indices
            soft = soft.index_fill(0, free, 0.0)
        terms.append(soft.sum())
    return torch.stack(terms).sum() if terms else torch.zeros(())


def regularization(model: nn.Module, lambda_quant: float = 1e-2, lambda_prune: float = 1e-4,
                   target_keep: Optional[float] = None) -> torch.Tensor:
    """``lambda_1 * L_quant + lambda_2 * L_prune``: eq 16 without the task loss (``target_keep``:
    see :func:`prune_loss`). Call it after the forward pass whose statistics it should use, before
    or after the task loss's ``backward()``: before it (added to the task loss), eq 12's gradient
    also reaches the layers that produced the activations; once a backward has passed a layer's
    input, its activation statistics are used detached (that graph is freed), which drops a part
    measured at ~0.1% of the task gradient on ResNet-50. The gates' ``M_bar`` is rebuilt from their
    logits either way."""
    return lambda_quant * quant_loss(model) + lambda_prune * prune_loss(model, target_keep)
