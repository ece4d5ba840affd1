"""Short offline training on template/search pairs from synthetic or real sequences.

Pairs follow SiamRPN++/pysot: the template is the target with context (``s_z``) from frame i,
the search crop is ``instance/exemplar`` times larger around the target in frame j (|i-j| <=
``max_gap``), shifted by up to ``shift`` of the crop and rescaled by up to ``exp(+-scale)``, so
the target is not always at the centre. A fraction ``neg`` of the pairs are negative (template
and search from different sequences, pysot's ``DATASET.NEG``). Targets are anchor labels and
deltas (:func:`~hybridops_tracking.targets.anchor_targets`,
:func:`~hybridops_tracking.targets.negative_targets`). TransT models take the same pairs with
TransT's crop sides (template and search factors 2 and 4) and its per-cell targets and
CE + L1 + GIoU loss (:func:`~hybridops_tracking.targets.transt_loss`). The loss is eq 16,

    L_hyb = L_track + lambda_1 L_quant + lambda_2 L_prune,

where the regulariser term comes from :func:`hybridops.regularization` for hybrid models and is
absent for the float one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

import hybridops as ho

from .crop import crop_and_resize, to_tensor
from .data import Sequence, SynthConfig, synthetic_sequence
from .model import ModelConfig, SiamRPNPP
from .targets import anchor_targets, negative_targets, track_loss, transt_loss, transt_targets
from .transt import TransT, TransTConfig


@dataclass
class TrainConfig:
    """Offline training settings.

    Attributes:
        steps / batch_size / lr / weight_decay: Adam with a cosine schedule.
        lambda_quant / lambda_prune: eq 16 weights (ignored for the float model).
        num_sequences / seq_frames: size of the in-memory synthetic training pool; seeds
            ``seed .. seed + num_sequences - 1`` (the benchmark uses seeds from 1000).
        max_gap: largest frame distance between template and search.
        shift: maximal search-crop shift as a fraction of the crop side (pysot: 64/255).
        scale: maximal log-scale jitter of the search crop (pysot: 0.18).
        context_amount: context around the target for the crop size.
        blur: probability of blurring the search crop (pysot: 0.2 for ResNet-50 SiamRPN++), a
            Gaussian of random width up to 2 px, for motion blur in real video.
        flip: probability of mirroring a pair horizontally (template and search together).
        neg: probability of a negative pair (pysot: 0.2, after DaSiamRPN): the template from one
            sequence, the search crop around the target of another, labelled background near
            that object and nowhere positive, with no regression loss
            (:func:`~.targets.negative_targets`). It needs two or more sequences; with one,
            every pair is positive. 0 gives exactly the pairs of a sampler without negatives.
        color: probability of pysot's PCA colour augmentation of each crop (template and search
            drawn separately; pysot: 1.0): a per-crop colour offset along the three principal
            components of natural-image RGB (:func:`_pca_color`), a few grey levels, mostly
            brightness.
    """

    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    lambda_quant: float = 1e-3
    lambda_prune: float = 1e-5
    num_sequences: int = 24
    seq_frames: int = 40
    max_gap: int = 20
    shift: float = 0.25
    scale: float = 0.18
    context_amount: float = 0.5
    blur: float = 0.0
    flip: float = 0.0
    neg: float = 0.2
    color: float = 0.0
    seed: int = 0
    synth: SynthConfig = field(default_factory=SynthConfig)

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {self.steps}, {self.batch_size}.")
        for name in ("blur", "flip", "neg", "color"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}.")
        if isinstance(self.synth, dict):
            self.synth = SynthConfig(**self.synth)


class _LazyFrames:
    """Frames of a real :class:`~.data.Sequence`, decoded on first use and then kept (as uint8,
    a quarter of float32's memory), so that training reads each image from disk once."""

    def __init__(self, seq: Sequence):
        self.seq, self.cache = seq, {}

    def __len__(self) -> int:
        return len(self.seq)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i not in self.cache:
            self.cache[i] = torch.from_numpy(np.array(self.seq.image(i), copy=True)).permute(2, 0, 1).unsqueeze(0)
        return self.cache[i].float()


class PairSampler:
    """Draws training batches from a pool of sequences: synthetic ones by default, or the real
    ``sequences`` given (:func:`~.data.load_dataset`), using only frames with a visible target.

    ``sample(batch_size)`` returns ``z (B, 3, Ez, Ez)``, ``x (B, 3, Ex, Ex)`` float crops in
    [0, 255] and the targets of the model the config describes: for SiamRPN++ (``ModelConfig``,
    with its ``anchors``) ``label (B, A, S, S)``, ``delta (B, 4, A, S, S)`` and
    ``weight (B, A, S, S)``; for TransT (``TransTConfig``, ``anchors`` None) ``label (B, S*S)``
    and ``box (B, 4)`` (:func:`~.targets.transt_targets`).
    """

    def __init__(self, model_config: Union[ModelConfig, TransTConfig], anchors: Optional[torch.Tensor],
                 config: TrainConfig,
                 sequences: Optional[List[Sequence]] = None):
        self.mc, self.tc, self.anchors = model_config, config, anchors
        self.seqs = []
        if sequences is not None:
            for seq in sequences:
                if seq.valid.sum() >= 2:
                    self.seqs.append((_LazyFrames(seq), seq.boxes, np.flatnonzero(seq.valid)))
            if not self.seqs:
                raise ValueError("no training sequence has two frames with a visible target.")
        else:
            synth = SynthConfig(**{**asdict(config.synth), "frames": config.seq_frames})
            for i in range(config.num_sequences):
                frames, boxes = synthetic_sequence(synth, config.seed + i)
                self.seqs.append(([to_tensor(f) for f in frames], boxes, np.arange(len(frames))))
        # A negative pair needs a second sequence: one sequence's other frames show the same target.
        self.neg = config.neg if len(self.seqs) > 1 else 0.0
        self.rng = np.random.default_rng(config.seed)
        self.gen = torch.Generator().manual_seed(config.seed)

    @classmethod
    def for_model(cls, model: Union[SiamRPNPP, TransT], config: TrainConfig,
                  sequences: Optional[List[Sequence]] = None) -> "PairSampler":
        """The sampler of ``model``'s geometry and targets."""
        anchors = getattr(model, "anchors", None)
        return cls(model.config, anchors.cpu() if anchors is not None else None, config, sequences)

    def reseed(self, seed: int) -> None:
        """Restart the pair stream, so that several models train on the same batches."""
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def _crop_sides(self, box):
        """Template and search crop sides around ``box``: SiamRPN++'s context (``context_amount``)
        and ``instance / exemplar`` times that, or TransT's factors (:meth:`TransTConfig.crop_sides`)."""
        w, h = box[2], box[3]
        if isinstance(self.mc, TransTConfig):
            return self.mc.crop_sides(w, h)
        ca = self.tc.context_amount * (w + h)
        s_z = math.sqrt((w + ca) * (h + ca))
        return s_z, s_z * self.mc.instance_size / self.mc.exemplar_size

    def _targets(self, gt: torch.Tensor, neg: bool):
        if isinstance(self.mc, TransTConfig):
            return transt_targets(gt, self.mc.score_size, self.mc.instance_size, negative=neg)
        return (negative_targets if neg else anchor_targets)(self.anchors, gt, generator=self.gen)

    def sample(self, batch_size: int):
        mc, tc, rng = self.mc, self.tc, self.rng
        zs, xs, targets = [], [], []
        for _ in range(batch_size):
            # Every extra draw sits behind "probability > 0", so neg = color = 0 keeps the stream
            # of pairs of a sampler without them.
            k = int(rng.integers(len(self.seqs)))
            neg = self.neg > 0 and rng.random() < self.neg
            frames, boxes, valid = self.seqs[k]
            a = int(rng.integers(len(valid)))
            i = int(valid[a])
            if neg:
                other = int(rng.integers(len(self.seqs) - 1))
                frames_x, boxes_x, valid_x = self.seqs[other + (other >= k)]
                j = int(valid_x[rng.integers(len(valid_x))])
            else:
                # Template and search from visible frames at most max_gap apart (indices into valid).
                lo = np.searchsorted(valid, valid[a] - tc.max_gap)
                hi = np.searchsorted(valid, valid[a] + tc.max_gap, "right")
                frames_x, boxes_x, j = frames, boxes, int(valid[rng.integers(lo, hi)])
            bz, bx = boxes[i], boxes_x[j]
            # Template: small jitter (pysot: 4 px shift, 5 % scale) so the net does not overfit centring.
            s_z = self._crop_sides(bz)[0] * math.exp(rng.uniform(-0.05, 0.05))
            cz = bz[:2] + bz[2:] / 2 + rng.uniform(-4, 4, 2) * s_z / mc.exemplar_size
            zs.append(crop_and_resize(frames[i], cz, s_z, mc.exemplar_size))
            s_x = self._crop_sides(bx)[1] * math.exp(rng.uniform(-tc.scale, tc.scale))
            cx_target = bx[:2] + bx[2:] / 2
            crop_center = cx_target + rng.uniform(-tc.shift, tc.shift, 2) * s_x
            xs.append(crop_and_resize(frames_x[j], crop_center, s_x, mc.instance_size))
            f = mc.instance_size / s_x
            gt = torch.tensor([*(cx_target - crop_center) * f, bx[2] * f, bx[3] * f], dtype=torch.float32)
            if tc.color > 0 and rng.random() < tc.color:
                zs[-1] = _pca_color(zs[-1], rng)
            if tc.color > 0 and rng.random() < tc.color:
                xs[-1] = _pca_color(xs[-1], rng)
            if tc.blur > 0 and rng.random() < tc.blur:
                xs[-1] = _gaussian_blur(xs[-1], rng.uniform(0.5, 2.0))
            if tc.flip > 0 and rng.random() < tc.flip:
                zs[-1], xs[-1] = zs[-1].flip(3), xs[-1].flip(3)
                gt[0] = -gt[0]  # crop coordinates are relative to the centre: mirroring negates x
            targets.append(self._targets(gt, neg))
        return (torch.cat(zs), torch.cat(xs), *(torch.stack(t) for t in zip(*targets)))


# Principal components of natural-image RGB, each scaled by its standard deviation, in grey
# levels (0-255): pysot's table (STVIR/pysot, pysot/datasets/augmentation.py, Augmentation.rgbVar)
# read as one component per row, the usual PCA jitter, whose largest component (last row) is
# brightness. pysot's own code multiplies the table by the coefficients (rgbVar @ a), which puts
# that component on one channel; rows are used here so that brightness moves all three.
_PCA_RGB = torch.tensor([[-0.55919361, 0.98062831, -0.41940627],
                         [1.72091413, 0.19879334, -1.82968581],
                         [4.64467907, 4.73710203, 4.88324118]])


def _pca_color(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """``img (1, 3, H, W)`` in [0, 255] shifted by ``sum_k a_k PC_k`` with ``a_k ~ N(0, 1)``
    (AlexNet-style PCA colour augmentation, as pysot applies it to every training crop)."""
    offset = torch.from_numpy(rng.standard_normal(3)).float() @ _PCA_RGB
    return (img - offset.view(1, 3, 1, 1).to(img)).clamp(0, 255)


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(1, 3, H, W)`` with std ``sigma`` px (replicate borders)."""
    r = max(1, int(math.ceil(2 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(img)
    x = torch.nn.functional.pad(img, (r, r, r, r), mode="replicate")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)


def train(model: Union[SiamRPNPP, TransT], config: Optional[TrainConfig] = None,
          regularizer: Optional[Callable[[torch.nn.Module], torch.Tensor]] = None,
          sampler: Optional[PairSampler] = None, progress: bool = True, desc: str = "train") -> List[Dict[str, float]]:
    """Train ``model`` in place on synthetic pairs (or the ``sampler``'s); returns per-step logs
    ``[{"loss", "cls", "loc", "reg"}]``.

    ``regularizer(model)`` adds ``lambda_1 L_quant + lambda_2 L_prune`` for hybrid models.
    """
    tc = config or TrainConfig()
    task_loss = transt_loss if isinstance(model, TransT) else track_loss
    sampler = sampler or PairSampler.for_model(model, tc)
    # Pairs are cut on the CPU (cheap at these sizes) and moved to the model's device.
    device = next(model.parameters()).device
    # ho.param_groups: weight decay on weights only, the package's groups for intervals and gates
    opt = torch.optim.Adam(ho.param_groups(model, tc.lr, tc.weight_decay))
    params = [p for group in opt.param_groups for p in group["params"]]  # what gets clipped
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, tc.steps // 20)) * 0.5 * (1 + math.cos(math.pi * s / max(1, tc.steps))))
    model.train()
    logs = []
    bar = tqdm(range(tc.steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for _ in bar:
        z, x, *targets = (t.to(device, non_blocking=True) for t in sampler.sample(tc.batch_size))
        out = model(z, x)
        loss, parts = task_loss(out, *targets)
        reg = regularizer(model) if regularizer is not None else None
        total = loss + reg if reg is not None else loss
        if not torch.isfinite(total):
            raise FloatingPointError(f"training loss became {float(total)} (track {parts}); lower the lr.")
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        sched.step()
        logs.append({"loss": float(total.detach()), **parts, "reg": float(reg.detach()) if reg is not None else 0.0})
        bar.set_postfix(loss=f"{logs[-1]['loss']:.3f}", cls=f"{parts['cls']:.3f}", loc=f"{parts['loc']:.3f}")
    model.eval()
    return logs
