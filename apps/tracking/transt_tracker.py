"""The TransT tracking loop (TransT's ``pytracking`` tracker) and its online update.

Per frame: a search crop of side ``s_x`` (``TransTConfig.crop_sides``: the target with
``search_factor`` context, rounded up as TransT does) around the previous centre, resized to
``instance_size``; the target probability of every cell (softmax, class 0) blended with a Hanning
window (``window_influence`` 0.49, TransT's OTB setting); the best cell's box, mapped back to the
frame, becomes the new box as it is (TransT has no scale penalty and no size smoothing).

Online update (the OnHybSiamRPN++ schedule of :class:`~.tracker.OnlineConfig`, applied to TransT):
the full-precision branch of the classifier's last Linear trains on the cached inputs of that
layer, with the cells inside the tracked box as target (TransT's matcher rule,
:func:`~.targets.transt_positions`) and TransT's weighted cross-entropy.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from .crop import crop_and_resize
from .targets import transt_cls_loss, transt_targets
from .tracker import OnlineConfig, SiameseTracker
from .transt import TransT


@dataclass
class TransTParams:
    """Post-processing of TransT (its OTB settings).

    Attributes:
        window_influence: weight of the Hanning window that favours small motion (0.49).
        min_size: smallest box side in pixels the tracker will output (10).
    """

    window_influence: float = 0.49
    min_size: float = 10.0

    def __post_init__(self):
        if not 0 <= self.window_influence <= 1:
            raise ValueError(f"window_influence must be in [0, 1], got {self.window_influence}.")


class TransTTracker(SiameseTracker):
    """Single-object tracker around a :class:`~.transt.TransT` model (float, hybrid or deployed);
    the same interface as :class:`~.tracker.SiamRPNTracker` (``init``, ``track``, ``times``,
    ``updates``)."""

    def __init__(self, model: TransT, params: Optional[TransTParams] = None,
                 online: Optional[OnlineConfig] = None, seed: int = 0):
        super().__init__(model, online, seed)
        self.params = params or TransTParams()
        s = model.config.score_size
        self.window = torch.from_numpy(np.outer(np.hanning(s), np.hanning(s))).float().reshape(-1)

    def _sides(self):
        """TransT's template and search crop sides for the current size (rounded up)."""
        return tuple(math.ceil(v) for v in self.model.config.crop_sides(*self.size))

    def init(self, img: np.ndarray, box) -> None:
        img_t = self._start(img, box)
        cfg = self.model.config
        s_z, s_x = self._sides()
        self.model.template(crop_and_resize(img_t, self.center, s_z, cfg.exemplar_size, self.avg))
        if self.online is not None:
            # The first frame, where the box is known exactly, is the first online sample.
            out = self.model.track(crop_and_resize(img_t, self.center, s_x, cfg.instance_size, self.avg))
            self._label_sample(out["cls_hidden"], np.zeros(2), self.size, s_x)

    def track(self, img: np.ndarray):
        """Track one frame; returns ``(box (x, y, w, h) float64 array, confidence float)``.
        Seconds spent per part accumulate in ``self.times`` (crop, network, post, update)."""
        p, cfg = self.params, self.model.config
        t = time.perf_counter()
        _, s_x = self._sides()
        x = crop_and_resize(*self._window(img, self.center, s_x), s_x, cfg.instance_size, self.avg)
        t = self._tick("crop", t)
        out = self.model.track(x)
        t = self._tick("network", t)
        score = torch.softmax(out["logits"][0].float().cpu(), dim=1)[:, 0]
        pscore = score * (1 - p.window_influence) + self.window * p.window_influence
        best = int(pscore.argmax())
        bbox = out["boxes"][0, best].float().cpu().numpy().astype(np.float64) * s_x
        H, W = img.shape[:2]
        prev_center = self.center.copy()
        cx = bbox[0] + self.center[0] - s_x / 2
        cy = bbox[1] + self.center[1] - s_x / 2
        self.center = np.array([min(max(cx, 0.0), W), min(max(cy, 0.0), H)])
        self.size = np.array([min(max(bbox[2], p.min_size), W), min(max(bbox[3], p.min_size), H)])
        self.frame_index += 1
        t = self._tick("post", t)
        if self.online is not None:
            self._label_sample(out["cls_hidden"], self.center - prev_center, self.size, s_x)
            if self.frame_index % self.online.interval == 0:
                self.update()
            self._tick("update", t)
        box = np.array([self.center[0] - self.size[0] / 2, self.center[1] - self.size[1] / 2, *self.size])
        return box, float(score[best])

    # -- online update ------------------------------------------------------------------------
    def _label_sample(self, hidden: torch.Tensor, offset, size, s_x: float) -> None:
        """Store one frame's classifier input with the cells of the tracked box (``offset`` from
        the crop centre and ``size``, frame pixels; the crop had side ``s_x``) as target."""
        cfg = self.model.config
        f = cfg.instance_size / s_x
        gt = torch.tensor([offset[0] * f, offset[1] * f, size[0] * f, size[1] * f], dtype=torch.float32)
        label, _ = transt_targets(gt, cfg.score_size, cfg.instance_size)
        self._add_sample([hidden], label)

    def _online_loss(self, hidden: List[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        return transt_cls_loss(self.model.cls_from_hidden(hidden), label)
