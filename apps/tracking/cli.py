"""``hybridops-track``: synthesize, train, track, evaluate and compare SiamRPN++ and TransT variants.

Examples::

    hybridops-track synth data/synth --num 4 --frames 60
    hybridops-track train --out float.pt --steps 400
    hybridops-track train --out hybrid.pt --variant hybrid --init float.pt --steps 60
    hybridops-track train --arch transt --out transt.pt --steps 400
    hybridops-track train --out hybtranst.pt --variant hybrid --init transt.pth --data /data/GOT-10k --steps 60
    hybridops-track track data/synth/synth_000 --checkpoint hybrid.pt --online --out runs/s0
    hybridops-track evaluate data/synth --checkpoint hybrid.pt --out runs/eval
    hybridops-track evaluate /data/LaSOT --checkpoint model.pth --out runs/lasot --skip-bad
    hybridops-track rescore runs/eval --data data/synth
    hybridops-track rescore runs/otb --data /data/OTB100 --attrs /data/OTB100/OTB100.json
    hybridops-track bops --checkpoint hybtranst.pt
    hybridops-track compare --out bench/results/tracking
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch


def _model_config(args):
    from .model import ModelConfig
    from .transt import TransTConfig
    config = TransTConfig if getattr(args, "arch", "siamrpn") == "transt" else ModelConfig
    return config.small() if args.preset == "small" else config()


def _online(args, model=None):
    from .tracker import OnlineConfig
    if not getattr(args, "online", False):
        return None
    variant = getattr(model, "variant", "hybrid")
    if variant not in ("hybrid", "hybrid_qp"):
        raise SystemExit(f"error: --online trains the full-precision branch, so it needs a hybrid checkpoint "
                         f"(variant hybrid or hybrid_qp); {args.checkpoint} is {variant}.")
    return OnlineConfig(interval=args.online_interval, iterations=args.online_iterations,
                        window=args.online_window, lr=args.online_lr)


def _device(args) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def _probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability in [0, 1]")
    return v


def _add_device(p):
    p.add_argument("--device", default="cpu",
                   help="where the network runs: cpu (default), cuda, cuda:1, or auto (cuda if available)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); small models on a shared CPU often run "
                        "faster with 1")


def _add_data(p):
    from .data import FORMATS
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="data set layout (default: detected from the folder's files; this overrides it)")
    p.add_argument("--start-frame", type=int, default=None, metavar="N",
                   help="number of the first annotated frame, for one OTB or UAV123 sequence whose range its files "
                        "do not give (the reader says when)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out sequences that cannot be read (each is reported) instead of stopping")


def _add_attrs(p):
    p.add_argument("--attrs", metavar="FILE",
                   help="per-attribute results from this file: pysot's data set JSON (OTB100.json, its 'attr' "
                        "lists) or an OTB toolkit attr_list.txt ('Name<TAB>IV, SV, ...'); default: each "
                        "sequence's attrs.txt, then such a JSON or attr_list.txt in the data folder")
    p.add_argument("--no-attrs", action="store_true", help="no per-attribute results even where attributes exist")


def _add_online(p):
    p.add_argument("--online", action="store_true", help="online update of the FP branch (hybrid checkpoints)")
    p.add_argument("--online-interval", type=int, default=10, help="frames between updates (10)")
    p.add_argument("--online-iterations", type=int, default=15, help="SGD iterations per update (15)")
    p.add_argument("--online-window", type=int, default=20, help="latest frames used per update (20)")
    p.add_argument("--online-lr", type=float, default=1e-3, help="SGD learning rate of the update")


def cmd_synth(args) -> int:
    from .data import SynthConfig, make_synthetic_benchmark
    paths = make_synthetic_benchmark(args.out, args.num, SynthConfig(frames=args.frames), seed=args.seed, ext=args.ext)
    print(f"wrote {len(paths)} sequences under {args.out}")
    return 0


def cmd_train(args) -> int:
    from . import hybrid
    from .checkpoint import ARCHS, CheckpointError, arch_of, load_checkpoint, save_checkpoint
    from .train import PairSampler, TrainConfig, train

    torch.manual_seed(args.seed)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     lambda_quant=args.lambda_quant, lambda_prune=args.lambda_prune,
                     num_sequences=args.num_sequences, seq_frames=args.seq_frames,
                     shift=args.shift, scale=args.scale, blur=args.blur, flip=args.flip, neg=args.neg,
                     color=args.color, max_gap=args.max_gap)
    if args.init:
        model = load_checkpoint(args.init)
        if getattr(model, "variant", "float") != "float":
            raise CheckpointError(f"--init must be a float checkpoint; {args.init} is {model.variant}.")
        if args.arch is not None and arch_of(model) != args.arch:
            raise CheckpointError(f"--arch {args.arch} does not match --init {args.init}, a {arch_of(model)} model.")
    else:
        model = ARCHS[args.arch or "siamrpn"][0](_model_config(args))
    model.to(_device(args))
    real = _sequences(args, args.data) if args.data else None
    if real is not None:
        print(f"training on {len(real)} sequence(s) from {args.data} ({args.format}, "
              f"{sum(int(q.valid.sum()) for q in real)} frames with a visible target)")
    sampler = PairSampler.for_model(model, tc, sequences=real)
    if tc.neg > 0 and sampler.neg == 0:
        print("one training sequence: every pair is positive (--neg draws the search crop from another sequence)")
    reg = None
    if args.variant != "float":
        example = tuple(t.to(_device(args)) for t in sampler.sample(8)[:2])
        scope = args.scope or hybrid.default_scope(model)
        report = hybrid.hybridize_tracker(model, args.variant, example_inputs=example, scope=scope)
        print(f"converted {len(report.converted)} layers ({args.variant}, scope {scope})")
        reg = lambda m: hybrid.regularization(m, tc.lambda_quant, tc.lambda_prune)
    logs = train(model, tc, regularizer=reg, sampler=sampler, progress=not args.quiet)
    save_checkpoint(args.out, model, args.variant, scope=args.scope,
                    meta={"steps": tc.steps, "final_loss": logs[-1]["loss"] if logs else None})
    print(f"saved {args.out}" + (f" (final loss {logs[-1]['loss']:.4f})" if logs else ""))
    return 0


def _sequences(args, root):
    from .data import detect_format, load_dataset
    skipped = []
    args.format = args.format or detect_format(root)  # named in the reports
    seqs = load_dataset(root, args.format, skip_bad=args.skip_bad, skipped=skipped, start_frame=args.start_frame)
    for name, why in skipped:
        print(f"skipped {name}: {why}", file=sys.stderr)
    return seqs


def _load_model(args):
    from .checkpoint import load_checkpoint
    return load_checkpoint(args.checkpoint, deploy=args.deploy, device=_device(args))


def _split(ms: dict) -> str:
    return ", ".join(f"{k} {ms[k]:.1f}" for k in ("crop", "network", "post", "update") if k in ms) + " ms/frame"


def cmd_track(args) -> int:
    from .benchmark import draw_strip, run_sequence, write_overlay
    from .metrics import summarize

    seqs = _sequences(args, args.sequence)
    model = _load_model(args)
    online = _online(args, model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seq in seqs:
        r = run_sequence(model, seq, online=online, progress=not args.quiet)
        np.savetxt(out / f"{seq.name}_boxes.txt", r["boxes"], fmt="%.2f", delimiter=",")
        draw_strip(seq, r["boxes"], out / f"{seq.name}_strip.png")
        if args.overlay:
            write_overlay(seq, r["boxes"], out / f"{seq.name}_overlay.gif", step=args.overlay_step)
        s = summarize(r["boxes"], seq.boxes, seq.valid)
        n = int(np.isfinite(r["boxes"]).all(axis=1).sum())
        ms = {k: 1000 * v / max(n, 1) for k, v in r["times"].items()}
        print(f"{seq.name}: {len(seq)} frames, {r['fps']:.1f} FPS ({_split(ms)}), precision {s['precision']:.3f}, "
              f"success AUC {s['success_auc']:.3f}, online updates {r['updates']}; wrote {out}")
    return 0


def _attributes(args, root, seqs):
    """``(groups, meta line)``: the sequences of each attribute (``--attrs`` or files found with
    the data), or ``({}, None)`` when there are none."""
    from .attributes import attribute_groups, load_attributes
    if getattr(args, "no_attrs", False):
        return {}, None
    sources = []
    tags = load_attributes(seqs, root, args.attrs, sources=sources)
    groups = attribute_groups(tags, [s.name for s in seqs])
    if not groups:
        return {}, None
    line = (f"{len(groups)} attributes for {len(tags)} of {len(seqs)} sequences, from {', '.join(sources)}: "
            + ", ".join(f"{a} {len(n)}" for a, n in groups.items()))
    print(f"attributes: {line}")
    return groups, line


def _report(out, rows, meta, quiet=False, attributes=None):
    from .benchmark import run_label, write_results
    write_results(out, rows, meta, attributes=attributes)
    for key, r in rows.items():
        fps = f"  {r['fps']:.1f} FPS ({_split(r['ms_per_frame'])})" if "fps" in r else ""
        print(f"{run_label(key, r):28s} precision {r['precision']:.3f}  norm. precision {r['norm_precision']:.3f}  "
              f"success AUC {r['success_auc']:.3f}{fps}")
    if attributes:
        print(f"per-attribute tables ({len(attributes)} attributes) in {Path(out) / 'table.md'}, plots in "
              f"{Path(out) / 'attributes'}")


def cmd_evaluate(args) -> int:
    from .benchmark import environment, evaluate, rescore, tracker_name, write_tracker_results

    seqs = _sequences(args, args.root)
    groups, attr_line = _attributes(args, args.root, seqs)  # before tracking: a bad --attrs fails at once
    model = _load_model(args)
    online = _online(args, model)
    r = evaluate(model, seqs, online=online, progress=not args.quiet, attributes=groups)
    key = args.name or tracker_name(args.checkpoint, deployed=args.deploy, online=online is not None)
    write_tracker_results(args.out, key, r["boxes"], run=r)
    if not args.quiet:
        for name, s in r["per_sequence"].items():
            print(f"{name:20s} precision {s['precision']:.3f}  success AUC {s['success_auc']:.3f}  {s['fps']:.1f} FPS")
    # Merge with the other runs already in --out that cover the same sequences (one table/plot).
    others = [p.name for p in sorted(Path(args.out).iterdir()) if p.is_dir() and p.name != key
              and all((p / f"{q.name}.txt").is_file() for q in seqs)]
    rows = {**rescore(args.out, seqs, others, attributes=groups), key: r} if others else {key: r}
    dataset = f"{Path(args.root).name} ({args.format}, {len(seqs)} sequences)"
    meta = {"title": f"Evaluation on {dataset}", "plot_title": dataset, "command": _command(), **environment(),
            **({"attributes": attr_line} if attr_line else {})}
    _report(args.out, rows, meta, attributes=groups)
    return 0


def cmd_rescore(args) -> int:
    from .benchmark import environment, rescore

    seqs = _sequences(args, args.data)
    groups, attr_line = _attributes(args, args.data, seqs)
    rows = rescore(args.results, seqs, args.trackers, attributes=groups)
    dataset = f"{Path(args.data).name} ({args.format}, {len(seqs)} sequences)"
    meta = {"title": f"Re-scored {args.results} on {dataset}", "plot_title": dataset, "command": _command(),
            **environment(), **({"attributes": attr_line} if attr_line else {})}
    _report(args.out or args.results, rows, meta, attributes=groups)
    return 0


def cmd_bops(args) -> int:
    from . import hybrid
    from .checkpoint import load_checkpoint
    model = load_checkpoint(args.checkpoint)
    rows = hybrid.table1(model)
    cfg = model.config
    text = (f"# BOPs (eq 17) of one tracked frame: {Path(args.checkpoint).name} ({type(model).__name__}, "
            f"{getattr(model, 'variant', 'float')}, search crop {cfg.instance_size}x{cfg.instance_size}, template "
            f"cached)\n\n{hybrid.table1_markdown(rows)}\n")
    print(text, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


def cmd_compare(args) -> int:
    from .compare import run_comparison
    from .train import TrainConfig

    rows = run_comparison(
        args.out, data_dir=args.data, num_sequences=args.num_sequences, frames=args.frames,
        model_config=_model_config(args),
        # the synthetic benchmark trains on positive pairs only, as its committed table was made
        float_train=TrainConfig(steps=args.float_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                neg=0.0),
        hybrid_train=TrainConfig(steps=args.hybrid_steps, batch_size=args.batch_size, lr=args.hybrid_lr,
                                 seed=args.seed, lambda_quant=args.lambda_quant, lambda_prune=args.lambda_prune,
                                 neg=0.0),
        online=_online(argparse.Namespace(**{**vars(args), "online": True})),
        scope=args.scope, seed=args.seed, command=_command(), progress=not args.quiet,
        checkpoint_dir=args.checkpoints, device=_device(args))
    print((Path(args.out) / "table.md").read_text())
    return 0


def _command() -> str:
    """The command line as it was typed (console script or ``python -m``)."""
    prog = "hybridops-track" if Path(sys.argv[0]).name == "hybridops-track" else "python -m hybridops_tracking.cli"
    return prog + " " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hybridops-track", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic OTB-format sequences")
    p.add_argument("out")
    p.add_argument("--num", type=int, default=4)
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--ext", choices=("jpg", "png"), default="jpg")
    p.set_defaults(fn=cmd_synth)

    p = sub.add_parser("train", help="offline training on synthetic or real pairs (L_hyb for hybrid variants)")
    p.add_argument("--out", required=True, help="checkpoint path")
    p.add_argument("--variant", default="float", choices=("float", "hybrid", "hybrid_qp", "quant_qn"))
    p.add_argument("--arch", choices=("siamrpn", "transt"), default=None,
                   help="tracker to build without --init: siamrpn (SiamRPN++, default) or transt (TransT); with --init "
                        "the checkpoint's")
    p.add_argument("--init", help="float checkpoint to start from (e.g. to derive a hybrid variant): ours, pysot's "
                                  "SiamRPN++ model.pth or TransT's transt.pth")
    p.add_argument("--preset", choices=("small", "full"), default="small",
                   help="small: width 1/4, 1 block/stage, crops 63/127 (TransT: 64/128, hidden 64, 2 fusion layers); "
                        "full: ResNet-50, 127/255 (TransT: 128/256, hidden 256, 4 fusion layers)")
    p.add_argument("--scope", choices=("backbone", "all"), default=None,
                   help="layers to convert (default: backbone for SiamRPN++, all for TransT; see hybridops_tracking.hybrid)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lambda-quant", type=float, default=1e-3)
    p.add_argument("--lambda-prune", type=float, default=1e-5)
    p.add_argument("--data", help="train on the real sequences of this data set (default: synthetic sequences)")
    _add_data(p)
    p.add_argument("--shift", type=float, default=0.25, help="max search-crop shift, fraction of the crop")
    p.add_argument("--scale", type=float, default=0.18, help="max log-scale jitter of the search crop")
    p.add_argument("--blur", type=_probability, default=0.0,
                   help="probability of blurring the search crop (pysot: 0.2)")
    p.add_argument("--flip", type=_probability, default=0.0, help="probability of mirroring a pair")
    p.add_argument("--neg", type=_probability, default=0.2,
                   help="probability of a negative pair: search crop from another sequence, labelled background "
                        "(pysot: 0.2; needs two or more sequences)")
    p.add_argument("--color", type=_probability, default=0.0,
                   help="probability of pysot's PCA colour augmentation of each crop (pysot: 1.0)")
    p.add_argument("--max-gap", type=int, default=20, help="largest template/search frame distance")
    p.add_argument("--num-sequences", type=int, default=24, help="synthetic training sequences")
    p.add_argument("--seq-frames", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    _add_device(p)
    p.set_defaults(fn=cmd_train)

    for name, hlp in (("track", "track the sequence(s) of a folder"), ("evaluate", "evaluate a data set")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("sequence" if name == "track" else "root")
        p.add_argument("--checkpoint", required=True,
                       help="hybridops-track checkpoint, pysot SiamRPN++ model.pth or TransT transt.pth")
        p.add_argument("--deploy", action="store_true", help="pack the hybrid model (hybridops.deploy_) first")
        p.add_argument("--out", default=f"runs/{name}")
        p.add_argument("--quiet", action="store_true")
        _add_data(p)
        _add_online(p)
        _add_device(p)
        if name == "track":
            p.add_argument("--overlay", action="store_true", help="also write <seq>_overlay.gif (ground truth green, "
                                                                  "tracker red)")
            p.add_argument("--overlay-step", type=int, default=1, help="GIF keeps every n-th frame")
        else:
            p.add_argument("--name", help="tracker name for the result folder <out>/<name>/ (default: checkpoint "
                                          "stem, plus -deployed / -online)")
            _add_attrs(p)
        p.set_defaults(fn=cmd_track if name == "track" else cmd_evaluate)

    p = sub.add_parser("rescore", help="score existing result folders <results>/<tracker>/<seq>.txt (ours or any "
                                       "toolkit's) and merge them in one table and plot")
    p.add_argument("results")
    p.add_argument("--data", required=True, help="the data set the results are for")
    p.add_argument("--trackers", nargs="+", help="only these tracker folders (default: all)")
    p.add_argument("--out", help="where table.md, results.json and plots go (default: the results folder)")
    _add_data(p)
    _add_attrs(p)
    p.set_defaults(fn=cmd_rescore)

    p = sub.add_parser("bops", help="the paper's Table 1 for a checkpoint: per-part bits and RC (BOPs, eq 17) of one "
                                    "tracked frame")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", help="also write the table (markdown) here")
    p.set_defaults(fn=cmd_bops)

    p = sub.add_parser("compare", help="float vs hybrid variants vs online update on a synthetic benchmark")
    p.add_argument("--out", default="bench/results/tracking")
    p.add_argument("--data", help="keep the generated benchmark here (default: a temporary folder)")
    p.add_argument("--checkpoints", help="save the trained models here")
    p.add_argument("--preset", choices=("small", "full"), default="small")
    p.add_argument("--scope", choices=("backbone", "all"), default="backbone")
    p.add_argument("--num-sequences", type=int, default=4)
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--float-steps", type=int, default=400)
    p.add_argument("--hybrid-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hybrid-lr", type=float, default=5e-4)
    p.add_argument("--lambda-quant", type=float, default=1e-3)
    p.add_argument("--lambda-prune", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    _add_online(p)
    _add_device(p)
    p.set_defaults(fn=cmd_compare)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    from .checkpoint import CheckpointError
    from .data import SequenceError

    args = build_parser().parse_args(argv)
    # Flush denormals to zero: the hybrid layers' small residual weights and masked channels
    # produce subnormal floats, which x86 CPUs handle in microcode, making the hybrid tracker
    # ~5-10x slower on CPU; zero instead of 1e-40 changes no result that matters.
    torch.set_flush_denormal(True)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    try:
        return args.fn(args)
    except (SequenceError, CheckpointError) as e:
        # A bad folder or checkpoint is the user's input, not a bug: one line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
