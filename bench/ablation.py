"""The paper's ablations (Tables 2-5) on a small task that trains on 2 CPU cores, no download.

Task: 10-way classification of generated 3x24x24 images (:func:`make_data`). Each class owns a few
smooth random templates; a sample is one of them, shifted by up to 3 pixels, overlaid with a
weaker template of another class and Gaussian noise. Small enough to train in seconds, hard
enough that a 2-3 bit conversion alone loses accuracy.

Net: RT-MDNet-shaped (:func:`make_net`): three conv layers (BN, ReLU, max-pool) and three fully
connected layers, as RT-MDNet's. Protocol per seed: train the float net, then for every row
convert a copy (one call: :class:`hybridops.HybridNetwork` with the row's branch configs),
fine-tune it (the float row: a copy of the float net) for the same number of steps with :func:`hybridops.param_groups` and eq 16's
regulariser, and measure test accuracy (eval mode) and RC (eq 17, :func:`hybridops.bops_report`).
Differences are paired: row minus its reference row on the same seed, mean and spread over seeds.

Rows (``--bits`` is the bit width of Tables 2-4; the paper's is 4-5; on this task a fine-tuned
3-bit Q+N network loses about a point to the float one, so the default is 2, where it loses ~5):

* Table 2, components: Q, Q+N, Q+N+P (the hybrid);
* Table 3, two branches: QQ, PP (keep 0.5 each), against Q+N+P;
* Table 4, pruning: Q+N+P at several channel-budget targets (``target_keep``) and lambda_p;
* Table 5, bit widths: Q+N and Q+N+P at 2, 3, 4, 5 and 8 bits.

    python bench/ablation.py                      # 3 seeds, writes bench/results/ablation/
    python bench/ablation.py --seeds 1 --steps 20 # a smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hybridops as ho  # noqa: E402

IMAGE = 24
CLASSES = 10


# ----------------------------------------------------------------------------- task
def _smooth_field(n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` smooth random 3xIMAGExIMAGE fields (upsampled 6x6 noise), unit std."""
    low = torch.randn(n, 3, 6, 6, generator=g)
    field = F.interpolate(low, size=(IMAGE, IMAGE), mode="bicubic", align_corners=False)
    return field / field.flatten(1).std(dim=1).view(-1, 1, 1, 1)


def make_data(n: int, seed: int, templates: Optional[torch.Tensor] = None, per_class: int = 3,
              noise: float = 1.4) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(images, labels, templates)``: ``n`` samples of the task (see the module docstring).
    Pass the training set's ``templates`` to draw a test set of the same classes."""
    g = torch.Generator().manual_seed(seed)
    if templates is None:
        templates = _smooth_field(CLASSES * per_class, g).view(CLASSES, per_class, 3, IMAGE, IMAGE)
    per_class = templates.shape[1]
    labels = torch.randint(CLASSES, (n,), generator=g)
    which = torch.randint(per_class, (n,), generator=g)
    other = (labels + torch.randint(1, CLASSES, (n,), generator=g)) % CLASSES
    x = templates[labels, which] + 0.8 * templates[other, torch.randint(per_class, (n,), generator=g)]
    shifts = torch.randint(-3, 4, (n, 2), generator=g)
    x = torch.stack([torch.roll(img, (int(dy), int(dx)), dims=(1, 2)) for img, (dy, dx) in zip(x, shifts)])
    x = x + noise * torch.randn(x.shape, generator=g)
    return x, labels, templates


def make_net() -> nn.Sequential:
    """RT-MDNet-shaped: conv1-3 (BN, ReLU, max-pool after the first two), fc4-6."""
    def block(c_in, c_out, pool):
        layers = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        return layers + ([nn.MaxPool2d(2)] if pool else [])

    return nn.Sequential(*block(3, 16, True), *block(16, 32, True), *block(32, 32, False), nn.Flatten(),
                         nn.Linear(32 * 6 * 6, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, CLASSES))


# ----------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    """One ablation row: the branch configs and the regulariser weights."""

    table: str
    name: str
    reference: Optional[str]  # the row its paired difference is taken against
    branches: Tuple = ()  # () is the float net
    lambda_quant: float = 0.0
    lambda_prune: float = 0.0
    target_keep: Optional[float] = None


def rows(bits: int, targets: Sequence[float], lambdas: Sequence[float]) -> List[Row]:
    def q(b=bits, normalize=True):
        return ho.QuantConfig(bits_w=b, bits_a=b, normalize=normalize)

    def p(keep=0.25):
        return ho.PruneConfig(keep=keep)

    lq = 1e-2
    out = [Row("2", "FP", None),
           Row("2", "Q", "FP", (q(normalize=False),)),
           Row("2", "Q+N", "Q", (q(),), lambda_quant=lq),
           Row("2", "Q+N+P", "Q+N", (q(), p()), lambda_quant=lq),
           Row("3", "QQ", "Q+N+P", (q(), q()), lambda_quant=lq),
           Row("3", "PP", "Q+N+P", (p(0.5), p(0.5)))]
    for t in targets:
        out.append(Row("4", f"Q+N+P target {t:g}", "Q+N+P", (q(), p(0.5)), lambda_quant=lq, lambda_prune=1.0,
                       target_keep=t))
    for lp in lambdas:
        out.append(Row("4", f"Q+N+P lambda_p {lp:g}", "Q+N+P", (q(), p(0.5)), lambda_quant=lq, lambda_prune=lp))
    for b in (2, 3, 4, 5, 8):
        if b != bits:
            out.append(Row("5", f"Q+N {b}-bit", "FP", (q(b),), lambda_quant=lq))
            out.append(Row("5", f"Q+N+P {b}-bit", f"Q+N {b}-bit", (q(b), p()), lambda_quant=lq))
    return out


# ----------------------------------------------------------------------------- training
def _batches(x, y, batch: int, steps: int, g: torch.Generator):
    for _ in range(steps):
        idx = torch.randint(x.shape[0], (batch,), generator=g)
        yield x[idx], y[idx]


def train(net: nn.Module, data, steps: int, lr: float, seed: int, row: Optional[Row] = None) -> None:
    """``steps`` of SGD (momentum 0.9, cosine lr) on ``data``; eq 16 with the row's lambdas."""
    x, y = data
    opt = torch.optim.SGD(ho.param_groups(net, lr, weight_decay=5e-4, gate_lr_mult=10.0), momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    net.train()
    g = torch.Generator().manual_seed(seed)
    for xb, yb in _batches(x, y, 64, steps, g):
        loss = F.cross_entropy(net(xb), yb)
        if row is not None and (row.lambda_quant or row.lambda_prune):
            loss = loss + ho.regularization(net, row.lambda_quant, row.lambda_prune, target_keep=row.target_keep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the loss became {float(loss)} while training {row.name if row else 'FP'}.")


@torch.no_grad()
def accuracy(net: nn.Module, data) -> float:
    net.eval()
    x, y = data
    correct = sum(int((net(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(500), y.split(500)))
    return 100.0 * correct / x.shape[0]


def kept_fraction(net: nn.Module) -> Optional[float]:
    """Kept channels over prunable gated channels (output layers keep every class and are not
    prunable); None for a net without gates."""
    gates = [m.gate for m in net.modules() if isinstance(m, ho.layers.PRUNED_LAYERS) and m.gate.prunable]
    if not gates:
        return None
    return sum(int(gt.kept_mask().sum()) for gt in gates) / sum(gt.channels for gt in gates)


def run_row(row: Row, float_net: nn.Module, train_data, test_data, steps: int, lr: float, seed: int) -> Dict:
    torch.manual_seed(seed)
    if not row.branches:  # the float net fine-tuned as long as every converted row, for a fair reference
        net = copy.deepcopy(float_net)
    else:
        net = ho.HybridNetwork(float_net.eval(), branches=row.branches, example_inputs=train_data[0][:256])
    train(net, train_data, steps, lr, seed + 1, row)
    rc = ho.bops_report(net, (1, 3, IMAGE, IMAGE)).rc
    return dict(acc=accuracy(net, test_data), rc=rc, kept=kept_fraction(net))


# ----------------------------------------------------------------------------- report
def summarise(results: Dict[str, List[Dict]], table_rows: List[Row]) -> List[Dict]:
    out = []
    for row in table_rows:
        runs = results[row.name]
        accs = [r["acc"] for r in runs]
        entry = dict(table=row.table, row=row.name, reference=row.reference, acc=statistics.mean(accs),
                     acc_sd=statistics.stdev(accs) if len(accs) > 1 else 0.0, rc=statistics.mean(r["rc"] for r in runs),
                     kept=(statistics.mean(r["kept"] for r in runs) if runs[0]["kept"] is not None else None))
        if row.reference is not None:
            diffs = [a["acc"] - b["acc"] for a, b in zip(runs, results[row.reference])]
            entry.update(diff=statistics.mean(diffs), diff_sd=statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                         wins=sum(d > 0 for d in diffs), seeds=len(diffs))
        out.append(entry)
    return out


def markdown(summary: List[Dict], meta: Dict) -> str:
    lines = [f"# Ablations (bench/ablation.py) — {meta['seeds']} seeds, {meta['steps']} fine-tune steps, "
             f"{meta['bits']}-bit rows in Tables 2-4", "",
             f"{meta['date']}, torch {meta['torch']}, {meta['threads']} threads, {meta['minutes']:.1f} min. "
             "Accuracy: test top-1 (%), mean (sd) over seeds; diff: paired difference against the reference "
             "row on the same seed, mean (sd), and on how many seeds it is positive; kept: kept fraction of "
             "the hidden full-precision channels.", ""]
    for table in sorted({s["table"] for s in summary}):
        lines += [f"## Table {table}", "", "| row | accuracy | RC | kept | vs | diff | positive on |",
                  "|---|---|---|---|---|---|---|"]
        for s in (s for s in summary if s["table"] == table):
            kept = f"{s['kept']:.2f}" if s["kept"] is not None else "-"
            diff = f"{s['diff']:+.2f} ({s['diff_sd']:.2f})" if "diff" in s else "-"
            wins = f"{s['wins']}/{s['seeds']}" if "diff" in s else "-"
            lines.append(f"| {s['row']} | {s['acc']:.2f} ({s['acc_sd']:.2f}) | {s['rc']:.3f} | {kept} | "
                         f"{s['reference'] or '-'} | {diff} | {wins} |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: List[Dict], bits: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for s in summary:
        if s["row"] == "FP" or s["table"] not in ("2", "3", "4"):
            continue
        ax1.errorbar(s["rc"], s["acc"], yerr=s["acc_sd"], fmt="o")
        ax1.annotate(s["row"], (s["rc"], s["acc"]), fontsize=7)
    fp = next(s for s in summary if s["row"] == "FP")
    ax1.axhline(fp["acc"], color="gray", ls="--", label="float")
    ax1.set(xlabel="RC (hybrid BOPs / float BOPs)", ylabel="test accuracy (%)", title="Tables 2-4")
    ax1.legend()
    for kind in ("Q+N", "Q+N+P"):
        pts = sorted((int(s["row"].split()[-1].split("-")[0]), s["acc"], s["acc_sd"]) for s in summary
                     if s["table"] == "5" and s["row"].startswith(kind + " "))
        pts += [(bits, s["acc"], s["acc_sd"]) for s in summary if s["table"] == "2" and s["row"] == kind]
        pts.sort()
        ax2.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", label=kind)
    ax2.axhline(fp["acc"], color="gray", ls="--", label="float")
    ax2.set(xlabel="bits (weights and activations)", ylabel="test accuracy (%)", title="Table 5")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300, help="fine-tune steps per row (float pre-training: 2x)")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--train-size", type=int, default=6000)
    ap.add_argument("--targets", type=float, nargs="*", default=[0.1, 0.25, 0.4])
    ap.add_argument("--lambdas", type=float, nargs="*", default=[0.03, 0.1, 0.3])
    ap.add_argument("--tables", nargs="*", default=["2", "3", "4", "5"])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "ablation")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        ap.error("--seeds and --steps must be positive.")
    every = rows(args.bits, args.targets, args.lambdas)
    by_name = {r.name: r for r in every}
    names = {r.name for r in every if r.table in args.tables}
    while True:  # the rows asked for and every reference row their differences need, transitively
        needed = {by_name[n].reference for n in names if by_name[n].reference is not None} - names
        if not needed:
            break
        names |= needed
    table_rows = [r for r in every if r.name in names]
    start = time.time()
    results: Dict[str, List[Dict]] = {r.name: [] for r in table_rows}
    bar = tqdm(total=args.seeds * len(table_rows), desc="ablation rows")
    for seed in range(args.seeds):
        x, y, templates = make_data(args.train_size, seed)
        test = make_data(2000, 1000 + seed, templates)[:2]
        torch.manual_seed(seed)
        float_net = make_net()
        train(float_net, (x, y), 2 * args.steps, args.lr, seed)
        float_net.eval()
        for row in table_rows:
            results[row.name].append(run_row(row, float_net, (x, y), test, args.steps, args.lr, seed))
            bar.set_postfix_str(f"{row.name}: {results[row.name][-1]['acc']:.1f}%")
            bar.update()
    bar.close()
    summary = summarise(results, table_rows)
    meta = dict(seeds=args.seeds, steps=args.steps, bits=args.bits, minutes=(time.time() - start) / 60,
                threads=torch.get_num_threads(), torch=torch.__version__,
                date=time.strftime("%Y-%m-%d", time.gmtime()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(dict(meta=meta, summary=summary, runs=results), indent=1))
    (args.out / "table.md").write_text(markdown(summary, meta))
    plot(summary, args.bits, args.out / "ablation.png")
    print(markdown(summary, meta))
    return dict(meta=meta, summary=summary)


if __name__ == "__main__":
    main()
