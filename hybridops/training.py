"""Optimizer parameter groups for training a converted model (eq 16).

Stability comes from two places, chosen by measurement (docs/design.md, "Training"): the untrained
ResNet-50 of the README, hybridized and trained with SGD lr 1e-3 momentum 0.9 at 64x64 input,
reached NaN at step 2.

* Calibration (:func:`hybridops.calibrate_`): an untrained model's BatchNorms in training mode
  calibrate on batch statistics; on eval-mode statistics the deep layers' intervals were ~100x too
  wide, their codes all 0, and the training BatchNorm after them amplified the gradient ~300x per
  layer. This alone fixed the NaN; the regulariser still grew 120-250x in 20 steps (3 seeds).
* LSQ gradient scaling inside :class:`~hybridops.quant.IntervalQuantizer`: the task gradient of
  ``c`` and ``log d`` is multiplied by ``1 / sqrt(N * levels)``. With it the regulariser stays within
  1.4x of its first value and the task loss behaves like the float model's. An lr multiplier on the
  interval group does about as well at one value (0.01 gave 1.3x) but one factor cannot fit layers
  whose gradient sums over 10^3 to 10^6 elements, and the scaling also protects a plain
  ``model.parameters()`` optimizer; so the interval multiplier defaults to 1.

:func:`param_groups` still separates the kinds, so that weight decay reaches only the weights and
the gates, whose gradient is tiny, can get their own learning rate.
"""
from __future__ import annotations

from typing import Dict, List

import torch.nn as nn

from .prune import ChannelGate
from .quant import IntervalQuantizer


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, interval_lr_mult: float = 1.0,
                 gate_lr_mult: float = 1.0) -> List[Dict]:
    """Optimizer parameter groups for ``model``: pass the result to any ``torch.optim`` optimizer.

    Groups (each a dict with ``params``, ``lr``, ``weight_decay`` and a ``name``; empty ones are left
    out, and so are parameters that do not require grad, e.g. after
    :func:`hybridops.freeze_quantized_`):

    * ``"weights"``: every parameter with two or more dimensions not below, at ``lr`` with
      ``weight_decay``;
    * ``"other"``: biases, BatchNorm affines, output scales, at ``lr``, no weight decay;
    * ``"intervals"``: the quantizers' ``c`` and ``log_d``, at ``lr * interval_lr_mult``, no decay;
    * ``"gates"``: the channel gates' logits, at ``lr * gate_lr_mult``, no decay.
    """
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}.")
    if not (weight_decay >= 0 and interval_lr_mult > 0 and gate_lr_mult > 0):
        raise ValueError(f"weight_decay must be non-negative and the lr multipliers positive, got weight_decay="
                         f"{weight_decay!r}, interval_lr_mult={interval_lr_mult!r}, gate_lr_mult={gate_lr_mult!r}.")
    special = {}
    for m in model.modules():
        if isinstance(m, IntervalQuantizer):
            special.update({id(m.c): "intervals", id(m.log_d): "intervals"})
        elif isinstance(m, ChannelGate):
            special[id(m.logits)] = "gates"
    groups = {"weights": dict(lr=lr, weight_decay=weight_decay), "other": dict(lr=lr, weight_decay=0.0),
              "intervals": dict(lr=lr * interval_lr_mult, weight_decay=0.0),
              "gates": dict(lr=lr * gate_lr_mult, weight_decay=0.0)}
    members: Dict[str, list] = {k: [] for k in groups}
    for p in model.parameters():
        if p.requires_grad:
            members[special.get(id(p), "weights" if p.dim() > 1 else "other")].append(p)
    return [dict(name=k, params=members[k], **groups[k]) for k in groups if members[k]]
