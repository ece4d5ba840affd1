"""Learned channel gates for the full-precision branch (eq 13-15).

Each gated layer owns selection probabilities ``b = sigmoid(logits)`` over its output channels.
In training a hard mask is sampled with the Gumbel-softmax straight-through trick at
temperature ``tau`` (eq 13): with Gumbel noise ``g, g'``,

    M_bar = softmax((g + log b) / tau, (g' + log(1 - b)) / tau)[keep]
          = sigmoid((logit(b) + g - g') / tau)
    M     = round(M_bar)          (forward),   dM / dM_bar = 1   (backward)

In eval mode the mask is deterministic: ``M = [b >= threshold]``, and :func:`hybridops.deploy_`
removes the dropped channels physically. ``L_prune = sum_l ||M_bar_l||_1`` (eq 15).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


class ChannelGate(nn.Module):
    """Gumbel-softmax gate over ``channels`` output channels.

    Args:
        channels: number of gated channels.
        tau: Gumbel-softmax temperature (> 0).
        threshold: eval/deploy keeps channel i iff ``b[i] >= threshold``.
        kept_mask: optional initial mask of kept channels (bool, ``(channels,)``); kept channels start at
            ``b = sigmoid(init_logit)``, the others at ``sigmoid(-init_logit)``.
    """

    def __init__(self, channels: int, tau: float = 1.0, threshold: float = 0.5,
                 kept_mask: Optional[torch.Tensor] = None, init_logit: float = 3.0):
        super().__init__()
        if channels < 1:
            raise ValueError(f"a channel gate needs at least one channel, got {channels}.")
        if not tau > 0:
            raise ValueError(f"the Gumbel-softmax temperature tau must be positive, got {tau}.")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"the gate threshold must lie in (0, 1), got {threshold}.")
        self.tau = float(tau)
        self.threshold = float(threshold)
        self.init_logit = float(init_logit)
        if kept_mask is None:
            kept_mask = torch.ones(channels, dtype=torch.bool)
        self.logits = nn.Parameter(torch.zeros(channels))
        self.reset(kept_mask)
        # logistic noise g - g' of the latest training forward (None: no sampled mask):
        # relaxed_mask() rebuilds that forward's M_bar from the logits with it
        self.noise: Optional[torch.Tensor] = None
        self.frozen = False  # set by freeze_quantized_: the mask stops being sampled
        # False for a classifier's output layer (PruneConfig.keep_output_layer): its channels are the
        # classes, so every one is kept and L_prune leaves it out.
        self.prunable = True

    def __getstate__(self):
        # noise belongs to the latest training forward, not to the gate's state.
        state = dict(super().__getstate__())
        state["noise"] = None
        return state

    @torch.no_grad()
    def reset(self, kept_mask: torch.Tensor) -> None:
        """Start kept channels at ``b = sigmoid(init_logit)`` and the others at its complement."""
        self.logits.copy_(torch.where(kept_mask.to(self.logits.device), self.init_logit, -self.init_logit))

    @property
    def channels(self) -> int:
        return self.logits.numel()

    def probs(self) -> torch.Tensor:
        """Selection probabilities ``b``."""
        return torch.sigmoid(self.logits)

    def kept_mask(self) -> torch.Tensor:
        """Deterministic eval/deploy mask ``b >= threshold`` (bool); all True for a gate that is not prunable."""
        if not self.prunable:
            return torch.ones(self.channels, dtype=torch.bool, device=self.logits.device)
        return self.probs() >= self.threshold

    def kept_indices(self) -> torch.Tensor:
        return torch.nonzero(self.kept_mask(), as_tuple=False).flatten()

    def forward(self) -> torch.Tensor:
        """The mask ``M`` (float, ``(channels,)``) for this step."""
        if not self.training or self.frozen or not self.prunable:
            self.noise = None
            return self.kept_mask().to(self.logits.dtype)
        u = torch.rand(2, self.channels, device=self.logits.device).clamp_(1e-10, 1.0 - 1e-7)
        g = -torch.log(-torch.log(u))  # two independent Gumbel(0, 1) draws
        self.noise = g[0] - g[1]
        m_bar = self._relaxed()
        return m_bar + (torch.round(m_bar) - m_bar).detach()

    def _relaxed(self) -> torch.Tensor:
        # log b - log(1 - b) is the logit itself, so eq 13's two-way softmax is one sigmoid.
        return torch.sigmoid((self.logits + self.noise) / self.tau)

    def relaxed_mask(self) -> torch.Tensor:
        """``M_bar`` of the latest training forward, per channel; ``b`` (the noise-free value of the
        relaxation's keep probability) before any training forward or in eval mode.

        ``M_bar`` is rebuilt from the logits and that forward's noise (the same value, with a graph
        of its own), so a loss on it can be taken before or after the
        task loss's ``backward()``, which frees the forward's graph (:func:`hybridops.prune_loss`)."""
        return self._relaxed() if self.noise is not None else self.probs()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints saved before gates had state: every gate was prunable (only where this gate
        # was saved at all: a partial load leaves a gate it does not hold alone)
        if prefix + "logits" in state_dict:
            state_dict.setdefault(prefix + "_extra_state", {"prunable": True})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # prunable is state: a saved output layer's gate must stay whole when loaded.
    def get_extra_state(self) -> dict:
        return {"prunable": bool(self.prunable)}

    def set_extra_state(self, state: dict) -> None:
        self.prunable = bool(state["prunable"])

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kept={int(self.kept_mask().sum())}, tau={self.tau}, threshold={self.threshold}"
