"""The SiamRPN++ tracking loop (pysot ``SiamRPNTracker``) and the paper's online update.

Post-processing defaults are pysot's for ``siamrpn_r50_l234_dwxcorr`` on OTB: scale/ratio change
penalty ``k = 0.05``, cosine-window influence ``0.42``, size learning rate ``0.38``, context
amount ``0.5``.

Online update (OnHybSiamRPN++, paper Fig. 1): every ``interval`` (10) frames, ``iterations`` (15)
SGD steps on samples from the latest ``window`` (20) frames, training only the full-precision
branch of the last 1x1 conv of each classification head. Everything upstream of that layer is
frozen, so its inputs are cached per frame and the update never re-runs the backbone. After
every update the tracker checks that every other tensor of the model (quantized weights/codes,
quantizer intervals, BN statistics, all other layers) is bit-identical to its state at ``init``.
"""
from __future__ import annotations

import abc
import copy
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional

import numpy as np
import torch

from . import hybrid
from .boxes import decode
from .crop import crop_and_resize, to_tensor
from .model import SiamRPNPP
from .targets import anchor_targets, cls_loss


@dataclass
class TrackParams:
    """Post-processing hyper-parameters (pysot OTB defaults for SiamRPN++ ResNet-50).

    Attributes:
        penalty_k: strength of the penalty on scale and aspect-ratio change between frames.
        window_influence: weight of the cosine (Hanning) window that favours small motion.
        lr: how fast the box size follows the prediction (scaled by the penalised score).
        context_amount: context margin added around the target for the template crop.
        min_size: smallest box side in pixels the tracker will output.
    """

    penalty_k: float = 0.05
    window_influence: float = 0.42
    lr: float = 0.38
    context_amount: float = 0.5
    min_size: float = 10.0

    def __post_init__(self):
        if not 0 <= self.window_influence <= 1:
            raise ValueError(f"window_influence must be in [0, 1], got {self.window_influence}.")
        if not 0 <= self.lr <= 1:
            raise ValueError(f"lr must be in [0, 1], got {self.lr}.")


@dataclass
class OnlineConfig:
    """Online update schedule (paper: every 10 frames, 15 iterations, latest 20 frames).

    Attributes:
        interval: update after every ``interval`` tracked frames.
        iterations: SGD steps per update.
        window: number of most recent frames whose samples are used.
        lr / momentum: SGD settings for the FP-branch parameters.
        pos_iou / neg_iou / num_pos / num_total: pseudo-label sampling per frame (anchors versus
            the tracker's own box, as in training).
        verify_frozen: after each update, assert that no tensor outside the trained FP branch
            changed (costs one state copy at ``init``).
    """

    interval: int = 10
    iterations: int = 15
    window: int = 20
    lr: float = 1e-3
    momentum: float = 0.9
    pos_iou: float = 0.6
    neg_iou: float = 0.3
    num_pos: int = 16
    num_total: int = 64
    verify_frozen: bool = True

    def __post_init__(self):
        for name in ("interval", "iterations", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"OnlineConfig.{name} must be >= 1, got {getattr(self, name)}.")


def _copy_state(v):
    # state_dict values are tensors or, for quantizers, an extra-state dict of plain values.
    return v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)


def _same_state(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _change(r: torch.Tensor) -> torch.Tensor:
    return torch.maximum(r, 1.0 / r)


def _sz(w, h):
    pad = (w + h) * 0.5
    return torch.sqrt((w + pad) * (h + pad)) if torch.is_tensor(w) else math.sqrt((w + pad) * (h + pad))


class SiameseTracker(abc.ABC):
    """What every tracker of this package shares: the model on its device, per-part timing, the
    search window sent to the device, and the online update of the full-precision branch of the
    model's last classification layers (``model.last_cls_layers()``), trained on per-frame cached
    inputs of those layers with pseudo-labels from the tracker's own boxes.

    Subclasses implement ``init`` / ``track`` and the online loss ``_online_loss(hidden, label)``.
    With ``online`` the model is modified in place: every parameter stops requiring grad except
    the FP branch of the last classification layers, which the updates change. Pass a copy
    (:func:`hybridops_tracking.hybrid.clone`) to keep the offline model, as ``run_sequence`` does.
    """

    def __init__(self, model: torch.nn.Module, online: Optional[OnlineConfig] = None, seed: int = 0):
        self.model = model.eval()
        self.online = online
        # The network runs on the model's device; the small post-processing stays on the CPU.
        self.device = next(model.parameters()).device
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)
        self.updates = 0
        self._online_params: List[torch.nn.Parameter] = []
        self._snapshot: Dict[str, torch.Tensor] = {}
        if online is not None:
            self._online_params = hybrid.online_parameters(model)
        # every sequence starts from these offline values: an earlier sequence's updates do not carry over
        self._offline_values = [p.detach().clone() for p in self._online_params]

    def _start(self, img: np.ndarray, box) -> torch.Tensor:
        """Reset the state for a new target ``box = (x, y, w, h)`` (with online updates: the trained
        FP branch back to its offline values, the sampling seed restarted); returns the frame on
        the device."""
        x, y, w, h = (float(v) for v in box)
        if w <= 0 or h <= 0:
            raise ValueError(f"initial box must have positive size, got {tuple(box)}.")
        self.center = np.array([x + w / 2, y + h / 2])
        self.size = np.array([w, h])
        self.frame_index = 0
        self.times = {"crop": 0.0, "network": 0.0, "post": 0.0, "update": 0.0}
        img_t = to_tensor(img).to(self.device)
        # The padding colour is the whole first frame's mean (as pysot); later frames only send
        # the window around the target to the device (see _window).
        self.avg = img_t.mean(dim=(2, 3))
        if self.online is not None:
            self.samples: Deque[dict] = deque(maxlen=self.online.window)
            self.updates = 0
            self._gen.manual_seed(self.seed)
            with torch.no_grad():
                for p, v in zip(self._online_params, self._offline_values):
                    p.copy_(v)
            if self.online.verify_frozen:
                trained = {id(p) for p in self._online_params}
                names = {n for n, p in self.model.named_parameters() if id(p) in trained}
                self._snapshot = {k: _copy_state(v) for k, v in self.model.state_dict().items() if k not in names}
        return img_t

    def _tick(self, part: str, t0: float) -> float:
        """Add the time since ``t0`` to ``self.times[part]``; returns now. On CUDA the device is
        synchronised first, otherwise asynchronous kernels would be billed to the next part."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[part] += now - t0
        return now

    def _window(self, img: np.ndarray, center, side: float):
        """The part of ``img`` a crop of ``side`` pixels around ``center`` can sample, as a
        ``(1, 3, h, w)`` tensor on the device, and the centre in its coordinates. Converting and
        sending only this window keeps the per-frame cost independent of the frame size (a
        1280x720 frame cost 10x a 360x240 one when the whole frame was converted)."""
        H, W = img.shape[:2]
        r = side / 2 + 2  # +2: bilinear sampling reads one pixel beyond the crop's edge
        x0, y0 = max(int(math.floor(center[0] - r)), 0), max(int(math.floor(center[1] - r)), 0)
        x1, y1 = min(int(math.ceil(center[0] + r)), W), min(int(math.ceil(center[1] + r)), H)
        if x1 <= x0 or y1 <= y0:  # crop entirely outside the frame: a 1-pixel window, all padding
            x0, y0, x1, y1 = 0, 0, 1, 1
        win = to_tensor(img[y0:y1, x0:x1]).to(self.device)
        return win, np.asarray(center, np.float64) - (x0, y0)

    # -- online update ------------------------------------------------------------------------
    def _add_sample(self, hidden: List[torch.Tensor], label: torch.Tensor) -> None:
        """Store one frame's cached last-layer inputs with its pseudo-label."""
        self.samples.append({"hidden": [h.detach() for h in hidden], "label": label.to(self.device)})

    @abc.abstractmethod
    def init(self, img: np.ndarray, box) -> None:
        """Start tracking ``box = (x, y, w, h)`` in ``img (H, W, 3) uint8``."""

    @abc.abstractmethod
    def track(self, img: np.ndarray):
        """Track one frame; returns ``(box (x, y, w, h) float64 array, confidence float)``."""

    @abc.abstractmethod
    def _online_loss(self, hidden: List[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        """The classification loss of the stacked samples (``label``: their pseudo-labels)."""

    def update(self) -> float:
        """One online update on the stored samples; returns the final loss."""
        o = self.online
        if o is None:
            raise RuntimeError("this tracker was built without an OnlineConfig.")
        levels = len(self.samples[0]["hidden"])
        hidden = [torch.cat([s["hidden"][i] for s in self.samples]) for i in range(levels)]
        label = torch.stack([s["label"] for s in self.samples])
        opt = torch.optim.SGD(self._online_params, lr=o.lr, momentum=o.momentum)
        loss = torch.zeros(())
        with torch.enable_grad():
            for _ in range(o.iterations):
                opt.zero_grad(set_to_none=True)
                loss = self._online_loss(hidden, label)
                loss.backward()
                opt.step()
        self.updates += 1
        if o.verify_frozen:
            self.check_frozen()
        return float(loss.detach())

    def check_frozen(self) -> None:
        """Raise if any tensor outside the online-trained FP branch differs from its value at
        ``init`` (quantized weights and codes, quantizer intervals, every other layer)."""
        state = self.model.state_dict()
        changed = [k for k, v in self._snapshot.items() if not _same_state(state[k], v)]
        if changed:
            raise RuntimeError(f"online update modified frozen tensors: {changed[:5]}"
                               f"{' ...' if len(changed) > 5 else ''}")


class SiamRPNTracker(SiameseTracker):
    """Single-object tracker around a :class:`SiamRPNPP` model (float, hybrid or deployed).

    Usage::

        t = SiamRPNTracker(model, online=OnlineConfig())   # online=None: no update
        t.init(frame0, box0)                                 # frame: (H, W, 3) uint8, box: (x, y, w, h)
        for frame in frames[1:]:
            box, score = t.track(frame)
    """

    def __init__(self, model: SiamRPNPP, params: Optional[TrackParams] = None,
                 online: Optional[OnlineConfig] = None, seed: int = 0):
        super().__init__(model, online, seed)
        self.params = params or TrackParams()
        cfg = model.config
        s = cfg.score_size
        hann = torch.from_numpy(np.outer(np.hanning(s), np.hanning(s))).float()
        self.window = hann.expand(cfg.anchor_num, s, s).reshape(-1)
        self.anchors_grid = model.anchors.detach().cpu()
        self.anchors = self.anchors_grid.reshape(4, -1)

    # -- geometry -----------------------------------------------------------------------------
    def _s_z(self) -> float:
        w, h = self.size
        ca = self.params.context_amount * (w + h)
        return round(math.sqrt((w + ca) * (h + ca)))

    def init(self, img: np.ndarray, box) -> None:
        """Start tracking ``box = (x, y, w, h)`` in ``img (H, W, 3) uint8``."""
        img_t = self._start(img, box)
        cfg = self.model.config
        z = crop_and_resize(img_t, self.center, self._s_z(), cfg.exemplar_size, self.avg)
        self.model.template(z)
        if self.online is not None:
            # The first frame, where the box is known exactly, is the first online sample.
            scale_z = cfg.exemplar_size / self._s_z()
            xc = crop_and_resize(img_t, self.center, self._s_z() * cfg.instance_size / cfg.exemplar_size,
                                 cfg.instance_size, self.avg)
            out = self.model.track(xc)
            self._label_sample(out["cls_hidden"], np.zeros(2), self.size * scale_z)

    def track(self, img: np.ndarray):
        """Track one frame; returns ``(box (x, y, w, h) float64 array, confidence float)``.
        Seconds spent per part accumulate in ``self.times`` (crop, network, post, update)."""
        p, cfg = self.params, self.model.config
        t = time.perf_counter()
        s_z = self._s_z()
        scale_z = cfg.exemplar_size / s_z
        s_x = s_z * cfg.instance_size / cfg.exemplar_size
        x = crop_and_resize(*self._window(img, self.center, s_x), s_x, cfg.instance_size, self.avg)
        t = self._tick("crop", t)
        out = self.model.track(x)
        t = self._tick("network", t)
        score = torch.softmax(out["cls"].float().cpu(), dim=1)[0, 1].reshape(-1)
        pred = decode(out["loc"][0].float().cpu().reshape(4, -1), self.anchors)
        # Penalise changes of scale and aspect ratio relative to the previous box (in crop pixels).
        tw, th = self.size * scale_z
        s_c = _change(_sz(pred[2], pred[3]) / _sz(float(tw), float(th)))
        r_c = _change((tw / th) / (pred[2] / pred[3]))
        penalty = torch.exp(-(r_c * s_c - 1) * p.penalty_k)
        pscore = penalty * score
        pscore = pscore * (1 - p.window_influence) + self.window * p.window_influence
        best = int(pscore.argmax())
        bbox = pred[:, best].numpy().astype(np.float64) / scale_z
        lr = float(penalty[best] * score[best]) * p.lr
        cx = bbox[0] + self.center[0]
        cy = bbox[1] + self.center[1]
        w = self.size[0] * (1 - lr) + bbox[2] * lr
        h = self.size[1] * (1 - lr) + bbox[3] * lr
        H, W = img.shape[:2]
        prev_center = self.center.copy()
        self.center = np.array([min(max(cx, 0.0), W), min(max(cy, 0.0), H)])
        self.size = np.array([min(max(w, p.min_size), W), min(max(h, p.min_size), H)])
        self.frame_index += 1
        t = self._tick("post", t)
        if self.online is not None:
            self._label_sample(out["cls_hidden"], (self.center - prev_center) * scale_z, self.size * scale_z)
            if self.frame_index % self.online.interval == 0:
                self.update()
            self._tick("update", t)
        box = np.array([self.center[0] - self.size[0] / 2, self.center[1] - self.size[1] / 2, *self.size])
        return box, float(score[best])

    # -- online update ------------------------------------------------------------------------
    def _label_sample(self, hidden, offset, size) -> None:
        """Store one frame's cached last-layer inputs with pseudo-labels from the tracked box
        (``offset``/``size`` in search-crop pixels relative to the crop centre)."""
        o = self.online
        gt = torch.tensor([offset[0], offset[1], size[0], size[1]], dtype=torch.float32)
        label, _, _ = anchor_targets(self.anchors_grid, gt, o.pos_iou, o.neg_iou, o.num_pos, o.num_total,
                                     generator=self._gen)
        self._add_sample(hidden, label)

    def _online_loss(self, hidden: List[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        return cls_loss(self.model.cls_from_hidden(hidden), label)
