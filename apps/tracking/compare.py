"""The variant comparison on a synthetic benchmark (analogue of the paper's Tables 2 and 6).

One run: generate the benchmark, train the float tracker, derive each hybrid variant from it
(convert with calibration, then fine-tune with ``L_hyb``, all on the same stream of pairs), track
every sequence with every variant (plus the hybrid one with the online update) and write the
table, JSON and plots.
"""
from __future__ import annotations

import dataclasses
import re
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from . import hybrid
from .benchmark import environment, evaluate, write_results
from .checkpoint import save_checkpoint
from .data import SequenceError, SynthConfig, make_synthetic_benchmark, read_otb_sequence
from .model import ModelConfig, SiamRPNPP
from .tracker import OnlineConfig, TrackParams
from .train import PairSampler, TrainConfig, train

HYBRID_VARIANTS = ("hybrid", "hybrid_qp", "quant_qn")


_SYNTH_ENTRY = re.compile(r"^(synth_\d{3}|synth_config\.txt)$")


def _check_synthetic_folder(path: Path) -> None:
    """``compare --data`` writes its synthetic benchmark into ``path``: refuse a folder that holds
    anything else (a real data set), so synthetic sequences never land among real ones."""
    if path.exists() and not path.is_dir():
        raise SequenceError(f"{path} is not a directory.")
    other = sorted(p.name for p in path.iterdir() if not _SYNTH_ENTRY.match(p.name)) if path.is_dir() else []
    if other:
        raise SequenceError(f"{path} holds other files ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}); "
                            "compare --data writes its synthetic benchmark there, so give it an empty or new folder "
                            "(evaluate real sequences with 'hybridops-track evaluate').")


def run_comparison(out_dir: Union[str, Path], data_dir: Optional[Union[str, Path]] = None,
                   num_sequences: int = 4, frames: int = 50, model_config: Optional[ModelConfig] = None,
                   float_train: Optional[TrainConfig] = None, hybrid_train: Optional[TrainConfig] = None,
                   online: Optional[OnlineConfig] = None, params: Optional[TrackParams] = None,
                   scope: str = "backbone", seed: int = 0, command: str = "", progress: bool = True,
                   checkpoint_dir: Optional[Union[str, Path]] = None, device: str = "cpu") -> Dict[str, Dict]:
    """Run the whole comparison and write ``out_dir/{table.md, results.json, *_plot.png}``.

    Returns ``{variant: evaluate() output}`` for ``float``, ``hybrid``, ``hybrid_qp``,
    ``quant_qn`` and ``hybrid_online``. ``device`` runs training and tracking there (pairs and
    crops are prepared on the CPU).
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    mc = model_config or ModelConfig.small()
    # positive pairs only (neg=0), as the committed synthetic table was made
    ft = float_train or TrainConfig(steps=400, batch_size=8, seed=seed, neg=0.0)
    ht = hybrid_train or TrainConfig(steps=60, batch_size=8, lr=5e-4, seed=seed, neg=0.0)
    online = online or OnlineConfig()
    synth = SynthConfig(frames=frames)
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="hybridops_track_")
        data_dir = tmp.name
    else:
        _check_synthetic_folder(Path(data_dir))
    try:
        # Score exactly the sequences generated now, never whatever else the folder holds.
        paths = make_synthetic_benchmark(data_dir, num_sequences, synth, seed=1000 + seed)
        seqs = [read_otb_sequence(p) for p in paths]
        model = SiamRPNPP(mc).to(device)
        sampler = PairSampler(mc, model.anchors.cpu(), ft)
        timings = {}
        t = time.perf_counter()
        train(model, ft, sampler=sampler, progress=progress, desc="train float")
        timings["train float"] = time.perf_counter() - t
        example = tuple(t.to(device) for t in sampler.sample(8)[:2])
        base = hybrid.clone(model)  # every variant starts from the same offline float weights
        # The float row gets the same extra fine-tuning steps on the same pairs as the hybrid
        # variants, so that differences come from the representation, not from training length.
        sampler.reseed(ht.seed + 1)
        t = time.perf_counter()
        train(model, ht, sampler=sampler, progress=progress, desc="fine-tune float")
        timings["fine-tune float"] = time.perf_counter() - t
        rows = {}
        rows["float"] = evaluate(model, seqs, params, progress=progress, desc="eval float")
        rows["float"]["rc"] = 1.0
        models = {}
        for v in HYBRID_VARIANTS:
            m = hybrid.clone(base)
            hybrid.hybridize_tracker(m, v, example_inputs=example, scope=scope)
            sampler.reseed(ht.seed + 1)  # every variant fine-tunes on the same pairs
            t = time.perf_counter()
            train(m, ht, sampler=sampler, progress=progress, desc=f"train {v}",
                  regularizer=lambda mm: hybrid.regularization(mm, ht.lambda_quant, ht.lambda_prune))
            timings[f"train {v}"] = time.perf_counter() - t
            rows[v] = evaluate(m, seqs, params, progress=progress, desc=f"eval {v}")
            rows[v]["rc"] = hybrid.backbone_bops(hybrid.clone(m).cpu(), mc.instance_size)["rc"]
            models[v] = m
        rows["hybrid_online"] = evaluate(models["hybrid"], seqs, params, online, progress=progress,
                                         desc="eval hybrid+online")
        rows["hybrid_online"]["rc"] = rows["hybrid"]["rc"]
        if checkpoint_dir is not None:
            save_checkpoint(Path(checkpoint_dir) / "float.pt", model, "float")
            for v, m in models.items():
                save_checkpoint(Path(checkpoint_dir) / f"{v}.pt", m, v, scope=scope)
        meta = {
            "title": "SiamRPN++ variants on the synthetic OTB-format benchmark",
            "plot_title": f"synthetic, {num_sequences} x {frames} frames",
            "command": command,
            **environment(),
            "benchmark": f"{num_sequences} synthetic sequences x {frames} frames "
                         f"({synth.width}x{synth.height}, seeds {1000 + seed}..{1000 + seed + num_sequences - 1})",
            "model": f"width {mc.width}, blocks {mc.blocks}, neck {mc.neck_channels}, "
                     f"crops {mc.exemplar_size}/{mc.instance_size}, response {mc.score_size}x{mc.score_size}",
            "hybrid": f"4-bit W/A, keep 0.25, scope '{scope}'",
            "float training": f"{ft.steps} steps x batch {ft.batch_size}, Adam lr {ft.lr} "
                              f"(pool of {ft.num_sequences} synthetic training sequences, seeds {ft.seed}..)",
            "fine-tuning (every variant, same pairs)": f"{ht.steps} steps x batch {ht.batch_size}, Adam lr {ht.lr}; "
                                                       f"hybrid variants add lambda_quant {ht.lambda_quant} L_quant + "
                                                       f"lambda_prune {ht.lambda_prune} L_prune",
            "online update": f"every {online.interval} frames, {online.iterations} SGD iterations (lr {online.lr}) "
                             f"on the latest {online.window} frames, FP branch of the last cls layers only",
            "post-processing": str(dataclasses.asdict(params or TrackParams())),
            "timings (s)": {k: round(v, 1) for k, v in timings.items()},
            "total wall time (s)": round(time.perf_counter() - t0, 1),
        }
        write_results(out_dir, rows, meta)
        return rows
    finally:
        if tmp is not None:
            tmp.cleanup()
