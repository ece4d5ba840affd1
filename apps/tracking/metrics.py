"""OTB one-pass evaluation: precision (centre error) and success (overlap) curves, and plots.

Definitions follow the OTB toolkit (Wu et al., 2013/2015) as pysot implements them:

* centre error: Euclidean distance between box centres, in pixels;
* precision curve: fraction of frames with centre error <= t for t = 0..50 px; the reported
  **precision** is the value at 20 px;
* overlap: IoU of the ``(x, y, w, h)`` boxes (continuous coordinates);
* success curve: fraction of frames with overlap > t for t in ``linspace(0, 1, 21)``; the
  reported **success AUC** is the mean of that curve;
* normalised precision (LaSOT / TrackingNet): the centre error measured in units of the ground
  truth's width and height, curve over t = 0, 0.01, ..., 0.5; reported at 0.2 (pysot's
  convention), so that it does not depend on the image resolution.

Frames whose ground truth is absent (NaN rows, zero size, a data set's absence flags) are left out
of every curve, as the GOT-10k / LaSOT toolkits do; pass ``valid`` for the flags.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np

PRECISION_THRESHOLDS = np.arange(0, 51, dtype=np.float64)
SUCCESS_THRESHOLDS = np.linspace(0, 1, 21)
NORM_PRECISION_THRESHOLDS = np.arange(0, 51, dtype=np.float64) / 100


def normalized_center_error(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Centre distance with x divided by the ground truth's width and y by its height, ``(N,)``."""
    pred, gt = np.asarray(pred, np.float64).reshape(-1, 4), np.asarray(gt, np.float64).reshape(-1, 4)
    d = (pred[:, :2] + pred[:, 2:] / 2 - gt[:, :2] - gt[:, 2:] / 2) / np.maximum(gt[:, 2:], 1e-12)
    return np.linalg.norm(d, axis=1)


def norm_precision_curve(pred, gt) -> np.ndarray:
    """``(51,)`` fraction of frames with normalised centre error <= 0, 0.01, ..., 0.5."""
    e = normalized_center_error(pred, gt)
    return (e[None, :] <= NORM_PRECISION_THRESHOLDS[:, None]).mean(axis=1)


def valid_frames(gt, valid=None) -> np.ndarray:
    """``(N,)`` bool: ground-truth rows that are finite with positive size (and ``valid``)."""
    gt = np.asarray(gt, np.float64).reshape(-1, 4)
    ok = np.isfinite(gt).all(axis=1) & (np.nan_to_num(gt[:, 2:]) > 0).all(axis=1)
    return ok if valid is None else ok & np.asarray(valid, bool)


def overlap(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of ``(N, 4)`` ``(x, y, w, h)`` boxes row by row; ``(N,)``."""
    pred, gt = np.asarray(pred, np.float64).reshape(-1, 4), np.asarray(gt, np.float64).reshape(-1, 4)
    x0 = np.maximum(pred[:, 0], gt[:, 0])
    y0 = np.maximum(pred[:, 1], gt[:, 1])
    x1 = np.minimum(pred[:, 0] + pred[:, 2], gt[:, 0] + gt[:, 2])
    y1 = np.minimum(pred[:, 1] + pred[:, 3], gt[:, 1] + gt[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = pred[:, 2] * pred[:, 3] + gt[:, 2] * gt[:, 3] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def center_error(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Distance between box centres, ``(N,)`` pixels."""
    pred, gt = np.asarray(pred, np.float64).reshape(-1, 4), np.asarray(gt, np.float64).reshape(-1, 4)
    pc = pred[:, :2] + pred[:, 2:] / 2
    gc = gt[:, :2] + gt[:, 2:] / 2
    return np.linalg.norm(pc - gc, axis=1)


def precision_curve(pred, gt) -> np.ndarray:
    """``(51,)`` fraction of frames with centre error <= 0, 1, ..., 50 px."""
    e = center_error(pred, gt)
    return (e[None, :] <= PRECISION_THRESHOLDS[:, None]).mean(axis=1)


def success_curve(pred, gt) -> np.ndarray:
    """``(21,)`` fraction of frames with overlap > 0, 0.05, ..., 1."""
    o = overlap(pred, gt)
    return (o[None, :] > SUCCESS_THRESHOLDS[:, None]).mean(axis=1)


def curves(pred, gt, valid=None) -> Dict[str, np.ndarray]:
    """``{"success", "precision", "norm_precision"}`` curves of one sequence over its valid frames."""
    m = valid_frames(gt, valid)
    pred, gt = np.asarray(pred, np.float64).reshape(-1, 4)[m], np.asarray(gt, np.float64).reshape(-1, 4)[m]
    return {"success": success_curve(pred, gt), "precision": precision_curve(pred, gt),
            "norm_precision": norm_precision_curve(pred, gt)}


def summarize(pred, gt, valid=None) -> Dict[str, float]:
    """``{"precision": P@20px, "success_auc": AUC, "norm_precision": P_norm@0.2, "mean_iou": ..}``
    for one sequence or a concatenation of sequences (frames weighted equally, as OTB does per
    sequence), over the frames with a valid ground truth."""
    m = valid_frames(gt, valid)
    pred, gt = np.asarray(pred, np.float64).reshape(-1, 4)[m], np.asarray(gt, np.float64).reshape(-1, 4)[m]
    return {
        "precision": float(precision_curve(pred, gt)[20]),
        "success_auc": float(success_curve(pred, gt).mean()),
        "norm_precision": float(norm_precision_curve(pred, gt)[20]),
        "mean_iou": float(overlap(pred, gt).mean()),
    }


def plot_curves(results: Dict[str, Dict[str, np.ndarray]], out_dir: Union[str, Path], title: str = "",
                prefix: str = "", colors: Optional[Dict[str, str]] = None) -> Dict[str, Path]:
    """Draw success and precision plots (``title``: the data set, shown in both titles).

    Args:
        results: ``{label: {"success": (21,), "precision": (51,)}}`` curves averaged over
            sequences.
        out_dir: folder for ``<prefix>success_plot.png`` and ``<prefix>precision_plot.png``.
        title: the data set (and, for a per-attribute plot, the attribute); may hold a newline.
        prefix: file name prefix (``"IV_"`` for the per-attribute plots).
        colors: ``{label: matplotlib colour}``, so that a tracker keeps its colour across the
            overall and the per-attribute plots (default: matplotlib's cycle in score order).
    Returns:
        the two paths.
    """
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    specs = [
        ("success", SUCCESS_THRESHOLDS, "Overlap threshold", "Success rate", lambda c: c.mean(), "AUC"),
        ("precision", PRECISION_THRESHOLDS, "Location error threshold (px)", "Precision", lambda c: c[20], "P@20"),
    ]
    for key, xs, xlabel, ylabel, score, name in specs:
        fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
        order = sorted(results, key=lambda k: -score(results[k][key]))
        for label in order:
            c = results[label][key]
            ax.plot(xs, c, lw=1.8, label=f"{label} [{name} {score(c):.3f}]",
                    **({"color": colors[label]} if colors and label in colors else {}))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xlim(xs[0], xs[-1])
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"{'Success' if key == 'success' else 'Precision'} plots of OPE{' - ' + title if title else ''}",
                     fontsize=9)
        # Outside the axes: with several runs an inside legend hides the curves' interesting part.
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
        paths[key] = out_dir / f"{prefix}{key}_plot.png"
        fig.savefig(paths[key], bbox_inches="tight")
        plt.close(fig)
    return paths
