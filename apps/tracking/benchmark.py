"""Running trackers over sequences, OTB scoring, annotated strips and the variant comparison
(the analogue of the paper's Tables 2 and 6 on a synthetic benchmark)."""
from __future__ import annotations

import datetime
import json
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence as Seq, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from . import hybrid
from .data import Sequence, list_sequences, read_otb_sequence
from .metrics import plot_curves, precision_curve, success_curve, summarize
from .model import SiamRPNPP
from .tracker import OnlineConfig, SiamRPNTracker, TrackParams


def run_sequence(model: SiamRPNPP, seq: Sequence, params: Optional[TrackParams] = None,
                 online: Optional[OnlineConfig] = None, progress: bool = False) -> Dict:
    """One-pass evaluation of one sequence (initialised from its first box).

    Returns ``{"boxes": (N, 4), "scores": (N,), "fps": float, "updates": int}``; frame 0's box
    is the ground truth, as in OTB. FPS counts tracker time only (cropping, network,
    post-processing, online updates), not image decoding.
    """
    if online is not None:
        # The online update changes the FP branch: every sequence starts from the offline weights.
        model = hybrid.clone(model)
    tracker = SiamRPNTracker(model, params, online)
    boxes = np.zeros((len(seq), 4))
    scores = np.ones(len(seq))
    elapsed = 0.0
    for i in tqdm(range(len(seq)), desc=seq.name, disable=not progress, leave=False, dynamic_ncols=True):
        img = seq.image(i)
        t = time.perf_counter()
        if i == 0:
            tracker.init(img, seq.boxes[0])
            boxes[0] = seq.boxes[0]
        else:
            boxes[i], scores[i] = tracker.track(img)
        elapsed += time.perf_counter() - t
    return {"boxes": boxes, "scores": scores, "fps": len(seq) / max(elapsed, 1e-9), "updates": tracker.updates}


def evaluate(model: SiamRPNPP, seqs: Seq[Sequence], params: Optional[TrackParams] = None,
             online: Optional[OnlineConfig] = None, progress: bool = True, desc: str = "eval") -> Dict:
    """Track every sequence and score it.

    Returns ``{"per_sequence": {name: {precision, success_auc, mean_iou, fps}}, "precision",
    "success_auc", "fps", "curves": {"success": (21,), "precision": (51,)}, "boxes": {name: (N, 4)}}``
    with curves and scores averaged over sequences (OTB convention) and FPS over all frames.
    """
    per, succ, prec, boxes = {}, [], [], {}
    frames, seconds = 0, 0.0
    for seq in tqdm(seqs, desc=desc, disable=not progress, dynamic_ncols=True):
        r = run_sequence(model, seq, params, online)
        per[seq.name] = {**summarize(r["boxes"], seq.boxes), "fps": r["fps"], "updates": r["updates"]}
        succ.append(success_curve(r["boxes"], seq.boxes))
        prec.append(precision_curve(r["boxes"], seq.boxes))
        boxes[seq.name] = r["boxes"]
        frames += len(seq)
        seconds += len(seq) / r["fps"]
    s, p = np.mean(succ, axis=0), np.mean(prec, axis=0)
    return {"per_sequence": per, "precision": float(p[20]), "success_auc": float(s.mean()),
            "fps": frames / max(seconds, 1e-9), "curves": {"success": s, "precision": p}, "boxes": boxes}


def draw_strip(seq: Sequence, boxes: np.ndarray, path: Union[str, Path], num: int = 6, height: int = 160) -> Path:
    """Save ``num`` evenly spaced frames side by side, ground truth in green and the tracker's
    box in red, each scaled to ``height`` pixels."""
    from PIL import Image, ImageDraw

    idx = np.linspace(0, len(seq) - 1, min(num, len(seq))).round().astype(int)
    tiles = []
    for i in idx:
        im = Image.fromarray(seq.image(int(i)))
        k = height / im.height
        im = im.resize((max(1, round(im.width * k)), height), Image.BILINEAR)
        d = ImageDraw.Draw(im)
        for box, colour in ((seq.boxes[i], (0, 255, 0)), (boxes[i], (255, 0, 0))):
            x, y, w, h = (float(v) * k for v in box)
            d.rectangle([x, y, x + w, y + h], outline=colour, width=2)
        d.text((3, 2), f"#{i + 1}", fill=(255, 255, 255))
        tiles.append(im)
    strip = Image.new("RGB", (sum(t.width for t in tiles) + 2 * (len(tiles) - 1), height), (255, 255, 255))
    x = 0
    for t in tiles:
        strip.paste(t, (x, 0))
        x += t.width + 2
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)
    return path


def load_sequences(root: Union[str, Path]) -> List[Sequence]:
    """Read every sequence folder under ``root`` (see :func:`list_sequences`)."""
    return [read_otb_sequence(p) for p in list_sequences(root)]


def environment() -> Dict[str, str]:
    """Date, device and versions for result files."""
    cpu = platform.processor() or platform.machine()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": (torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({cpu})"),
        "threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def write_results(out_dir: Union[str, Path], rows: Dict[str, Dict], meta: Dict) -> Dict[str, Path]:
    """Write ``results.json``, ``table.md`` and the success/precision plots for ``rows``
    (``{variant: evaluate() output + extra columns}``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_curves({hybrid.LABELS.get(k, k): v["curves"] for k, v in rows.items()}, out_dir,
                        title=meta.get("plot_title", ""))
    js = {"meta": meta, "results": {}}
    for k, v in rows.items():
        js["results"][k] = {kk: vv for kk, vv in v.items() if kk not in ("curves", "boxes")}
        js["results"][k]["success_curve"] = [round(float(c), 4) for c in v["curves"]["success"]]
        js["results"][k]["precision_curve"] = [round(float(c), 4) for c in v["curves"]["precision"]]
    (out_dir / "results.json").write_text(json.dumps(js, indent=1, default=float) + "\n")
    lines = [f"# {meta.get('title', 'Tracking comparison')}", ""]
    lines += [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in meta.items()
              if k not in ("title", "plot_title")]
    lines += ["", "| variant | precision (20 px) | success AUC | FPS | backbone RC (BOPs) | online updates |",
              "|---|---|---|---|---|---|"]
    for k, v in rows.items():
        rc = v.get("rc")
        upd = sum(s.get("updates", 0) for s in v["per_sequence"].values())
        lines.append(f"| {hybrid.LABELS.get(k, k)} | {v['precision']:.3f} | {v['success_auc']:.3f} | {v['fps']:.1f} | "
                     f"{'%.3f' % rc if rc is not None else '-'} | {upd} |")
    lines += ["", f"![success]({plots['success'].name}) ![precision]({plots['precision'].name})", ""]
    (out_dir / "table.md").write_text("\n".join(lines))
    return {"json": out_dir / "results.json", "table": out_dir / "table.md", **plots}
