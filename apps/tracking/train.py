"""Short offline training on synthetic template/search pairs.

Pairs follow SiamRPN++/pysot: the template is the target with context (``s_z``) from frame i,
the search crop is ``instance/exemplar`` times larger around the target in frame j (|i-j| <=
``max_gap``), shifted by up to ``shift`` of the crop and rescaled by up to ``exp(+-scale)``, so
the target is not always at the centre. Targets are anchor labels and deltas
(:func:`~hybridops_tracking.targets.anchor_targets`). The loss is eq 16,

    L_hyb = L_track + lambda_1 L_quant + lambda_2 L_prune,

where the regulariser term comes from :func:`hybridops.regularization` for hybrid models and is
absent for the float one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .crop import crop_and_resize, to_tensor
from .data import SynthConfig, synthetic_sequence
from .model import ModelConfig, SiamRPNPP
from .targets import anchor_targets, track_loss


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
    seed: int = 0
    synth: SynthConfig = field(default_factory=SynthConfig)

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {self.steps}, {self.batch_size}.")
        if isinstance(self.synth, dict):
            self.synth = SynthConfig(**self.synth)


class PairSampler:
    """Draws training batches from a pool of synthetic sequences.

    ``sample(batch_size)`` returns ``z (B, 3, Ez, Ez)``, ``x (B, 3, Ex, Ex)`` float crops in
    [0, 255], ``label (B, A, S, S)``, ``delta (B, 4, A, S, S)`` and ``weight (B, A, S, S)``.
    """

    def __init__(self, model_config: ModelConfig, anchors: torch.Tensor, config: TrainConfig):
        self.mc, self.tc, self.anchors = model_config, config, anchors
        synth = SynthConfig(**{**asdict(config.synth), "frames": config.seq_frames})
        self.seqs = []
        for i in range(config.num_sequences):
            frames, boxes = synthetic_sequence(synth, config.seed + i)
            self.seqs.append(([to_tensor(f) for f in frames], boxes))
        self.rng = np.random.default_rng(config.seed)
        self.gen = torch.Generator().manual_seed(config.seed)

    def reseed(self, seed: int) -> None:
        """Restart the pair stream, so that several models train on the same batches."""
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def _s_z(self, box) -> float:
        w, h = box[2], box[3]
        ca = self.tc.context_amount * (w + h)
        return math.sqrt((w + ca) * (h + ca))

    def sample(self, batch_size: int):
        mc, tc, rng = self.mc, self.tc, self.rng
        zs, xs, labels, deltas, weights = [], [], [], [], []
        for _ in range(batch_size):
            frames, boxes = self.seqs[rng.integers(len(self.seqs))]
            i = int(rng.integers(len(frames)))
            j = int(np.clip(i + rng.integers(-tc.max_gap, tc.max_gap + 1), 0, len(frames) - 1))
            bz, bx = boxes[i], boxes[j]
            # Template: small jitter (pysot: 4 px shift, 5 % scale) so the net does not overfit centring.
            s_z = self._s_z(bz) * math.exp(rng.uniform(-0.05, 0.05))
            cz = bz[:2] + bz[2:] / 2 + rng.uniform(-4, 4, 2) * s_z / mc.exemplar_size
            zs.append(crop_and_resize(frames[i], cz, s_z, mc.exemplar_size))
            s_x = self._s_z(bx) * mc.instance_size / mc.exemplar_size * math.exp(rng.uniform(-tc.scale, tc.scale))
            cx_target = bx[:2] + bx[2:] / 2
            crop_center = cx_target + rng.uniform(-tc.shift, tc.shift, 2) * s_x
            xs.append(crop_and_resize(frames[j], crop_center, s_x, mc.instance_size))
            k = mc.instance_size / s_x
            gt = torch.tensor([*(cx_target - crop_center) * k, bx[2] * k, bx[3] * k], dtype=torch.float32)
            label, delta, weight = anchor_targets(self.anchors, gt, generator=self.gen)
            labels.append(label)
            deltas.append(delta)
            weights.append(weight)
        return (torch.cat(zs), torch.cat(xs), torch.stack(labels), torch.stack(deltas), torch.stack(weights))


def train(model: SiamRPNPP, config: Optional[TrainConfig] = None,
          regularizer: Optional[Callable[[torch.nn.Module], torch.Tensor]] = None,
          sampler: Optional[PairSampler] = None, progress: bool = True, desc: str = "train") -> List[Dict[str, float]]:
    """Train ``model`` in place on synthetic pairs; returns per-step logs
    ``[{"loss", "cls", "loc", "reg"}]``.

    ``regularizer(model)`` adds ``lambda_1 L_quant + lambda_2 L_prune`` for hybrid models.
    """
    tc = config or TrainConfig()
    sampler = sampler or PairSampler(model.config, model.anchors.cpu(), tc)
    # Pairs are cut on the CPU (cheap at these sizes) and moved to the model's device.
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, tc.steps // 20)) * 0.5 * (1 + math.cos(math.pi * s / max(1, tc.steps))))
    model.train()
    logs = []
    bar = tqdm(range(tc.steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for _ in bar:
        z, x, label, delta, weight = (t.to(device, non_blocking=True) for t in sampler.sample(tc.batch_size))
        out = model(z, x)
        loss, parts = track_loss(out, label, delta, weight)
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
