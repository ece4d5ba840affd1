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

import hybridops as ho

from . import hybrid
from .attributes import describe as describe_attribute, label as attribute_label, score_groups
from .data import Sequence, SequenceError, list_sequences, parse_boxes, read_otb_sequence
from .metrics import curves, plot_curves, summarize
from .model import SiamRPNPP
from .tracker import OnlineConfig, SiamRPNTracker, TrackParams
from .transt import TransT
from .transt_tracker import TransTParams, TransTTracker

Model = Union[SiamRPNPP, TransT]
Params = Union[TrackParams, TransTParams]


def make_tracker(model: Model, params: Optional[Params] = None, online: Optional[OnlineConfig] = None):
    """The tracker of ``model``'s architecture: :class:`TransTTracker` for TransT,
    :class:`SiamRPNTracker` for SiamRPN++ (``params`` of the matching type, or None for defaults)."""
    tracker, expected = (TransTTracker, TransTParams) if isinstance(model, TransT) else (SiamRPNTracker, TrackParams)
    if params is not None and not isinstance(params, expected):
        raise TypeError(f"{type(model).__name__} tracks with {expected.__name__}, got {type(params).__name__}.")
    return tracker(model, params, online)


def run_sequence(model: Model, seq: Sequence, params: Optional[Params] = None,
                 online: Optional[OnlineConfig] = None, progress: bool = False) -> Dict:
    """One-pass evaluation of one sequence, initialised from its first valid box.

    Returns ``{"boxes": (N, 4), "scores": (N,), "fps": float, "updates": int, "times": {part: s}}``;
    the first valid frame's box is the ground truth, as in OTB; frames before it (target absent)
    get NaN boxes. FPS counts tracker time only (cropping, network, post-processing, online
    updates), not image decoding; ``times`` splits it (crop, network, post, update, init).
    """
    if online is not None:
        # The online update changes the FP branch: every sequence starts from the offline weights.
        model = hybrid.clone(model)
    tracker = make_tracker(model, params, online)
    valid = np.flatnonzero(seq.valid)
    if valid.size == 0:
        raise SequenceError(f"{seq.name}: no frame has a visible target to start from.")
    first = int(valid[0])
    boxes = np.full((len(seq), 4), np.nan)
    scores = np.zeros(len(seq))
    init_time = 0.0
    for i in tqdm(range(first, len(seq)), desc=seq.name, disable=not progress, leave=False, dynamic_ncols=True):
        img = seq.image(i)
        if i == first:
            t = time.perf_counter()
            tracker.init(img, seq.boxes[i])
            init_time = time.perf_counter() - t
            boxes[i], scores[i] = seq.boxes[i], 1.0
        else:
            boxes[i], scores[i] = tracker.track(img)
    times = {**tracker.times, "init": init_time}
    elapsed = sum(times.values())
    return {"boxes": boxes, "scores": scores, "fps": (len(seq) - first) / max(elapsed, 1e-9),
            "updates": tracker.updates, "times": times}


def evaluate(model: Model, seqs: Seq[Sequence], params: Optional[Params] = None,
             online: Optional[OnlineConfig] = None, progress: bool = True, desc: str = "eval",
             attributes: Optional[Dict[str, List[str]]] = None) -> Dict:
    """Track every sequence and score it.

    Returns ``{"per_sequence": {name: {precision, success_auc, norm_precision, mean_iou, fps}},
    "precision", "success_auc", "norm_precision", "fps", "ms_per_frame": {part: ms},
    "curves": {"success": (21,), "precision": (51,), "norm_precision": (51,)}, "boxes": {name: (N, 4)}}``
    with curves and scores averaged over sequences (OTB convention) and FPS over all frames;
    with ``attributes`` (``{attribute: [sequence, ...]}``, see :mod:`.attributes`) also
    ``"by_attribute"`` (:func:`score_results`); for a deployed model also ``"backends"``, the
    sorted hybridops backends its deployed layers ran on (:func:`hybridops.backends_in_use`).
    """
    per, boxes, frames, times = {}, {}, 0, {}
    for seq in tqdm(seqs, desc=desc, disable=not progress, dynamic_ncols=True):
        r = run_sequence(model, seq, params, online)
        per[seq.name] = {**summarize(r["boxes"], seq.boxes, seq.valid), "fps": r["fps"], "updates": r["updates"]}
        boxes[seq.name] = r["boxes"]
        frames += int(np.isfinite(r["boxes"]).all(axis=1).sum())
        for k, v in r["times"].items():
            times[k] = times.get(k, 0.0) + v
    out = score_results(boxes, seqs, attributes)
    out["per_sequence"] = {k: {**out["per_sequence"][k], **per[k]} for k in per}
    out["fps"] = frames / max(sum(times.values()), 1e-9)
    out["ms_per_frame"] = {k: 1000 * v / max(frames, 1) for k, v in times.items()}
    backends = sorted(set(ho.backends_in_use(model).values()))
    if backends:  # a deployed run's speed depends on which kernels ran ("auto" picks per device)
        out["backends"] = backends
    return out


def score_results(boxes: Dict[str, np.ndarray], seqs: Seq[Sequence],
                  attributes: Optional[Dict[str, List[str]]] = None) -> Dict:
    """Score predicted ``boxes {seq name: (N, 4)}`` against ``seqs`` (OTB averaging over
    sequences); the part of :func:`evaluate` that :func:`rescore` reuses on result files.

    ``attributes`` (``{attribute: [sequence, ...]}``, :func:`.attributes.attribute_groups`) adds
    ``"by_attribute": {attribute: {"sequences": n, "precision", "success_auc", "norm_precision",
    "curves"}}``, each averaged over that attribute's sequences."""
    per, seq_curves = {}, {}
    by_name = {s.name: s for s in seqs}
    for name, b in boxes.items():
        seq = by_name[name]
        if len(b) != len(seq):
            raise SequenceError(f"{name}: {len(b)} result boxes for {len(seq)} frames.")
        per[name] = summarize(b, seq.boxes, seq.valid)
        seq_curves[name] = curves(b, seq.boxes, seq.valid)
    cs = {k: np.mean([c[k] for c in seq_curves.values()], axis=0) for k in ("success", "precision", "norm_precision")}
    out = {"per_sequence": per, "precision": float(cs["precision"][20]), "success_auc": float(cs["success"].mean()),
           "norm_precision": float(cs["norm_precision"][20]), "curves": cs, "boxes": dict(boxes)}
    if attributes:
        out["by_attribute"] = score_groups(seq_curves, attributes)
    return out


def run_label(key: str, row: Dict) -> str:
    """Table and legend name of a result row: the variant's label (:data:`.hybrid.LABELS`) or the
    tracker name, with the hybridops backends of a deployed run, e.g. ``hyb-deployed (onednn)``."""
    label = hybrid.LABELS.get(key, key)
    return f"{label} ({', '.join(row['backends'])})" if row.get("backends") else label


def tracker_name(checkpoint: Union[str, Path], deployed: bool = False, online: bool = False) -> str:
    """Result-folder and legend name of a run: the checkpoint's stem, ``-deployed`` when its
    layers were packed, ``-online`` with the online update, so the runs never share a name."""
    return Path(checkpoint).stem + ("-deployed" if deployed else "") + ("-online" if online else "")


RUN_INFO = "run_info.json"
_RUN_KEYS = ("fps", "ms_per_frame", "rc", "backends")


def write_tracker_results(results_dir: Union[str, Path], tracker: str, boxes: Dict[str, np.ndarray],
                          run: Optional[Dict] = None) -> Path:
    """``results_dir/<tracker>/<seq>.txt``, one ``x,y,w,h`` line per frame (pysot / OTB toolkit
    layout; ``nan`` where the tracker did not run). ``run`` (an :func:`evaluate` output) adds
    ``run_info.json`` with its speed, the backends of a deployed run and per-sequence online
    updates, which boxes cannot carry, so that a merged table still shows them."""
    d = Path(results_dir) / tracker
    d.mkdir(parents=True, exist_ok=True)
    for name, b in boxes.items():
        np.savetxt(d / f"{name}.txt", np.asarray(b), fmt="%.4f", delimiter=",")
    if run is not None:
        info = {k: run[k] for k in _RUN_KEYS if k in run}
        info["updates"] = {k: v.get("updates", 0) for k, v in run.get("per_sequence", {}).items()}
        (d / RUN_INFO).write_text(json.dumps(info, indent=1, default=float) + "\n")
    return d


def _with_run_info(tracker_dir: Path, row: Dict) -> Dict:
    f = tracker_dir / RUN_INFO
    if f.is_file():
        info = json.loads(f.read_text())
        row.update({k: info[k] for k in _RUN_KEYS if k in info})
        for name, n in info.get("updates", {}).items():
            if name in row["per_sequence"]:
                row["per_sequence"][name]["updates"] = n
    return row


def read_tracker_results(tracker_dir: Union[str, Path], seqs: Seq[Sequence]) -> Dict[str, np.ndarray]:
    """Boxes of one tracker folder for the sequences in ``seqs`` (``<seq>.txt``; commas, tabs or
    spaces, as other toolkits write them); a missing file is a :class:`SequenceError`."""
    d = Path(tracker_dir)
    out = {}
    for seq in seqs:
        f = d / f"{seq.name}.txt"
        if not f.is_file():
            raise SequenceError(f"{d.name}: no result file {f} for sequence {seq.name}.")
        out[seq.name] = parse_boxes(f, f"{d.name}/{seq.name}")
    return out


def rescore(results_dir: Union[str, Path], seqs: Seq[Sequence], trackers: Optional[Seq[str]] = None,
            attributes: Optional[Dict[str, List[str]]] = None) -> Dict[str, Dict]:
    """Score every tracker folder of ``results_dir`` (or only ``trackers``) on ``seqs``:
    ``{tracker: score_results() output}`` (per attribute too, given ``attributes``), ready for
    :func:`write_results`."""
    root = Path(results_dir)
    if not root.is_dir():
        raise SequenceError(f"{root} is not a directory.")
    # A tracker folder holds result files of these sequences; other folders (overlays, logs) are not runs.
    names = list(trackers) if trackers else sorted(
        p.name for p in root.iterdir() if p.is_dir() and any((p / f"{q.name}.txt").is_file() for q in seqs))
    if not names:
        raise SequenceError(f"{root} holds no tracker result folders (<tracker>/<seq>.txt).")
    return {n: _with_run_info(root / n, score_results(read_tracker_results(root / n, seqs), seqs, attributes))
            for n in names}


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
    """Read every OTB-format sequence folder under ``root`` (see :func:`list_sequences`)."""
    return [read_otb_sequence(p) for p in list_sequences(root)]


def write_overlay(seq: Sequence, boxes: np.ndarray, path: Union[str, Path], max_side: int = 360,
                  step: int = 1, fps: float = 15.0) -> Path:
    """An animated GIF of the tracked sequence: ground truth green, tracker red, frame number
    and (where given) nothing else; frames scaled so the longer side is ``max_side``, every
    ``step``-th frame. GIF because Pillow (installed with matplotlib) writes it without ffmpeg."""
    from PIL import Image, ImageDraw

    tiles = []
    for i in range(0, len(seq), max(1, step)):
        im = Image.fromarray(seq.image(i))
        k = min(1.0, max_side / max(im.width, im.height))
        im = im.resize((max(1, round(im.width * k)), max(1, round(im.height * k))), Image.BILINEAR)
        d = ImageDraw.Draw(im)
        for box, colour in ((seq.boxes[i], (0, 255, 0)), (boxes[i], (255, 0, 0))):
            if np.isfinite(box).all():
                x, y, w, h = (float(v) * k for v in box)
                d.rectangle([x, y, x + w, y + h], outline=colour, width=2)
        d.text((3, 2), f"#{i + 1}", fill=(255, 255, 0))
        tiles.append(im.convert("P", palette=Image.ADAPTIVE))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tiles[0].save(path, save_all=True, append_images=tiles[1:], duration=int(1000 / fps), loop=0)
    return path


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


def _curves_json(cs: Dict[str, np.ndarray]) -> Dict[str, List[float]]:
    return {f"{k}_curve": [round(float(c), 4) for c in cs[k]] for k in ("success", "precision", "norm_precision")
            if k in cs}


ATTRIBUTE_DIR = "attributes"


def write_results(out_dir: Union[str, Path], rows: Dict[str, Dict], meta: Dict,
                  attributes: Optional[Dict[str, List[str]]] = None) -> Dict[str, Path]:
    """Write ``results.json``, ``table.md`` and the success/precision plots for ``rows``
    (``{variant: evaluate() output + extra columns}``).

    With ``attributes`` (``{attribute: [sequence, ...]}``, the groups the rows'
    ``by_attribute`` scores were computed on) also the per-attribute tables in ``table.md``,
    ``attributes`` in ``results.json`` and ``attributes/<ATTR>_{success,precision}_plot.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = {k: run_label(k, v) for k, v in rows.items()}
    colors = {labels[k]: f"C{i % 10}" for i, k in enumerate(rows)}  # one colour per tracker in every plot
    plots = plot_curves({labels[k]: v["curves"] for k, v in rows.items()}, out_dir,
                        title=meta.get("plot_title", ""), colors=colors)
    groups = {a: names for a, names in (attributes or {}).items()
              if any(a in v.get("by_attribute", {}) for v in rows.values())}
    attr_plots = _attribute_plots(out_dir / ATTRIBUTE_DIR, rows, groups, labels, colors, meta.get("plot_title", ""))
    js = {"meta": meta, "results": {}}
    if groups:
        js["attributes"] = {a: {"name": describe_attribute(a), "sequences": names} for a, names in groups.items()}
    for k, v in rows.items():
        js["results"][k] = {kk: vv for kk, vv in v.items() if kk not in ("curves", "boxes", "by_attribute")}
        js["results"][k].update(_curves_json(v["curves"]))
        if "by_attribute" in v:
            js["results"][k]["by_attribute"] = {
                a: {**{kk: vv for kk, vv in r.items() if kk != "curves"}, **_curves_json(r["curves"])}
                for a, r in v["by_attribute"].items()}
    (out_dir / "results.json").write_text(json.dumps(js, indent=1, default=float) + "\n")
    lines = [f"# {meta.get('title', 'Tracking comparison')}", ""]
    lines += [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in meta.items()
              if k not in ("title", "plot_title")]
    lines += ["", "| tracker | precision (20 px) | norm. precision (0.2) | success AUC | FPS | ms/frame crop / net / "
              "post / update | backbone RC (BOPs) | online updates |", "|---|---|---|---|---|---|---|---|"]
    for k, v in rows.items():
        rc = v.get("rc")
        upd = sum(s.get("updates", 0) for s in v["per_sequence"].values())
        ms = v.get("ms_per_frame")
        split = " / ".join(f"{ms.get(p, 0.0):.1f}" for p in ("crop", "network", "post", "update")) if ms else "-"
        fps = f"{v['fps']:.1f}" if "fps" in v else "-"
        lines.append(f"| {labels[k]} | {v['precision']:.3f} | {v.get('norm_precision', float('nan')):.3f} | "
                     f"{v['success_auc']:.3f} | {fps} | {split} | {'%.3f' % rc if rc is not None else '-'} | {upd} |")
    lines += ["", f"![success]({plots['success'].name}) ![precision]({plots['precision'].name})", ""]
    if groups:
        lines += _attribute_tables(rows, groups, labels, attr_plots)
    (out_dir / "table.md").write_text("\n".join(lines))
    return {"json": out_dir / "results.json", "table": out_dir / "table.md", **plots,
            **{f"{a}_{k}": p for a, ps in attr_plots.items() for k, p in ps.items()}}


def _attribute_plots(d: Path, rows, groups, labels, colors, title) -> Dict[str, Dict[str, Path]]:
    """Success and precision plots of every attribute in ``d``; plots of attributes that are no
    longer there (an earlier run of the folder) are removed so the folder matches the table."""
    out = {}
    for a, names in groups.items():
        res = {labels[k]: v["by_attribute"][a]["curves"] for k, v in rows.items() if a in v.get("by_attribute", {})}
        n = max(v["by_attribute"][a]["sequences"] for k, v in rows.items() if a in v.get("by_attribute", {}))
        d_ = describe_attribute(a)
        head = f"{a}{' (' + d_ + ')' if d_ else ''}, {n} sequence{'s' if n != 1 else ''}"
        out[a] = plot_curves(res, d, title=f"{title}\n{head}" if title else head, prefix=f"{a}_", colors=colors)
    if d.is_dir():
        keep = {p.name for ps in out.values() for p in ps.values()}
        for p in d.glob("*_plot.png"):
            if p.name not in keep and (p.name.endswith("_success_plot.png") or p.name.endswith("_precision_plot.png")):
                p.unlink()
    return out


def _attribute_tables(rows, groups, labels, plots) -> List[str]:
    """Markdown: success AUC and precision per attribute (rows) and tracker (columns), best in bold."""
    keys = list(rows)
    lines = ["## Per attribute", "",
             "Each attribute's scores are averaged over the sequences that have it (count in brackets; a sequence "
             "counts in every attribute it has).", ""]
    for metric, head in (("success_auc", "Success AUC"), ("precision", "Precision (20 px)")):
        lines += [f"### {head} by attribute", "", "| attribute | " + " | ".join(labels[k] for k in keys) + " |",
                  "|---" * (len(keys) + 1) + "|"]
        for a in groups:
            vals = [rows[k].get("by_attribute", {}).get(a, {}).get(metric) for k in keys]
            n = max(rows[k]["by_attribute"][a]["sequences"] for k in keys if a in rows[k].get("by_attribute", {}))
            shown = [f"{v:.3f}" for v in vals if v is not None]
            best = max(shown, key=float)
            tie = len(set(shown)) == 1  # nothing to point out when every tracker scores the same
            cells = ["-" if v is None else (f"**{v:.3f}**" if not tie and f"{v:.3f}" == best else f"{v:.3f}")
                     for v in vals]
            lines.append(f"| {attribute_label(a, n)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Plots per attribute:", ""]
    lines += [f"- {a}: [success]({ATTRIBUTE_DIR}/{ps['success'].name}), "
              f"[precision]({ATTRIBUTE_DIR}/{ps['precision'].name})" for a, ps in plots.items()]
    lines.append("")
    return lines
