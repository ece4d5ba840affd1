"""CPU microbenchmarks of the onednn backend and end-to-end CPU timings (docs/cpu_backend.md).

    python bench/bench_cpu.py layers            # ResNet-50 3x3 layers, batch 1, 1 thread
    python bench/bench_cpu.py linear            # ViT-B Linear layers, batch 1 / 16, 1 / 2 threads
    python bench/bench_cpu.py models --threads 2 # ResNet-18/50 (or --models vit_b_16,swin_t) vs every peer
    python bench/bench_cpu.py tracker --threads 2 [--arch transt] # a tracker per frame: peers, hybrid, deployed
    python bench/bench_cpu.py passes --threads 2  # a deployed model's forward split into its passes

Medians of many runs, every path measured in the same process (the machines are shared and
noisy: compare ratios, not absolute times across runs). Writes markdown tables to
bench/results/cpu/.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from speedup_report import cpu_baselines

import hybridops as ho
import hybridops.kernels.onednn as O
from hybridops import fusion
from hybridops.kernels.packing import pack_weight

OUT = Path(__file__).parent / "results" / "cpu"


def median_ms(fn, reps=50, warmup=5):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


# ResNet-50's 3x3 convs at 224x224 input: (C, H=W, stride)
R50_3X3 = [(64, 56, 1), (128, 56, 2), (128, 28, 1), (256, 28, 2), (256, 14, 1), (512, 14, 2), (512, 7, 1)]


def _verdict(ratio: float, target: float) -> str:
    return "met" if ratio >= target else f"missed by {target / ratio:.2f}x"


def _write_table(name: str, lines) -> None:
    """``bench/results/cpu/<name>_<ISA>.md``, and the table on stdout."""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}_{_isa_tag()}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _isa_tag() -> str:
    """File-name tag of the oneDNN int8 ISA (``avx2``, ``avx10_1_512_amx``, ...): results of
    different machines sit side by side."""
    return O.isa().split(":")[-1].split()[0]


def bench_layers(reps):
    """ResNet-50's 3x3 layers, 1 thread: the int8 conv, the whole hybrid layer, and the float conv
    with weights packed once (fp32; bf16 where the CPU has bf16 convolutions)."""
    torch.set_num_threads(1)
    bf16 = O.bf16_supported()
    fdt = torch.bfloat16 if bf16 else torch.float32  # the FP branch's compute dtype
    rows = []
    for c, hw, s in R50_3X3:
        g = torch.Generator().manual_seed(c)
        codes = torch.randint(0, 16, (1, hw, hw, c), dtype=torch.uint8, generator=g)
        wp = pack_weight(torch.randint(-7, 8, (c, c, 3, 3), dtype=torch.int8, generator=g), 4)
        scale, bias = torch.rand(c) * 1e-3, torch.randn(c)
        geo = ([s, s], [1, 1, 1, 1], [1, 1], 1)
        kept = torch.randperm(c, generator=g)[: max(1, c // 10)]
        x = torch.randn(1, c, hw, hw).contiguous(memory_format=torch.channels_last)
        qp = torch.tensor([0.5, 0.0])
        fpw = torch.randn(kept.numel(), c, 3, 3)
        w = torch.randn(c, c, 3, 3)
        with torch.no_grad():
            t_int = median_ms(lambda: O.qconv2d(codes, wp, c, 4, False, 4, scale, bias, *geo, True), reps)

            def hybrid():  # the whole hybrid layer: quantize-activate, FP branch, int conv + epilogue
                xs, cd = O.quantize_activate(x, qp, 4, False, None, None, False, None, None)
                f = O.fp_conv2d(x, fpw, None, [s, s], [1, 1, 1, 1], [1, 1], 1, fdt).permute(0, 2, 3, 1)
                return O.qconv2d(cd, wp, c, 4, False, 4, scale, bias, *geo, True, f, kept)
            t_hyb = median_ms(hybrid, reps)
            t_bf = median_ms(lambda: O.fp_conv2d(x.to(torch.bfloat16), w, bias, [s, s], [1, 1, 1, 1], [1, 1], 1),
                             reps) if bf16 else None
            t_fp = median_ms(lambda: O.fp_conv2d(x, w, bias, [s, s], [1, 1, 1, 1], [1, 1], 1), max(10, reps // 3))
        rows.append((c, hw, s, t_int, t_hyb, t_bf, t_fp))
        print(rows[-1], flush=True)
    lines = [f"# ResNet-50 3x3 convs, batch 1, 1 thread, medians ({datetime.date.today()}, torch {torch.__version__}, "
             f"oneDNN ISA {O.isa()})", "",
             "Command: `python bench/bench_cpu.py layers`. int8 = onednn qconv2d 4/4 bits (bias+ReLU post-ops, fp32 out); "
             f"hybrid = quantize-activate + FP branch keep 0.1 ({str(fdt)[6:]}, prepacked) + int conv + our epilogue; "
             "bf16 / fp32 = oneDNN conv with prepacked weights (`fp_conv2d`; bf16 only where the CPU has it). "
             "Wall time per call from Python. Target (issue): int8 >= 1.8x the fastest float conv.", "",
             "| C | HxW | stride | int8 ms | hybrid layer ms | bf16 ms | fp32 ms | float / int8 | float / hybrid | target 1.8x |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c, hw, s, ti, th, tb, tf in rows:
        best = min(t for t in (tb, tf) if t is not None)
        r = best / ti
        lines.append(f"| {c} | {hw} | {s} | {ti:.3f} | {th:.3f} | {'n/a' if tb is None else f'{tb:.3f}'} | {tf:.3f} | "
                     f"{r:.2f}x | {best / th:.2f}x | {_verdict(r, 1.8)} |")
    _write_table("layers_r50_3x3", lines)


# ViT-B's Linear layers (in, out) at 197 tokens per image
VIT_B_LINEAR = [(768, 768), (768, 3072), (3072, 768)]


def bench_linear(reps):
    """ViT-B's Linear layers, batch 1 and 16 (197 tokens per image), 1 and 2 threads: the deployed
    hybrid Linear (4/4 bits, keep 0.1, onednn; FP branch bf16 where the CPU has it) against
    the bf16 Linear with weights prepacked once (oneDNN, ``torch.ops.mkldnn._linear_pointwise``)
    and fp32 ``F.linear``. Target (issue 21): hybrid >= 1.6x the bf16 Linear."""
    bf16 = O.bf16_supported()
    fdt = torch.bfloat16 if bf16 else None
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for batch in (1, 16):
            for c_in, c_out in VIT_B_LINEAR:
                torch.manual_seed(0)
                lin = torch.nn.Sequential(torch.nn.Linear(c_in, c_out))
                x = torch.randn(batch, 197, c_in)
                ho.hybridize_(lin, ho.HybridConfig(bits_w=4, bits_a=4, keep=0.1, fp_first_input=False),
                              example_inputs=x)
                ho.deploy_(lin.eval(), backend="onednn", fp_dtype=fdt)
                w = lin[0].dequantized_weight()
                with torch.no_grad():
                    t_hyb = median_ms(lambda: lin(x), reps)
                    t_fp = median_ms(lambda: torch.nn.functional.linear(x, w), max(10, reps // 3))
                    t_bf = None
                    if bf16:
                        wm, xb = w.to(torch.bfloat16).to_mkldnn(), x.to(torch.bfloat16).view(-1, c_in)
                        t_bf = median_ms(lambda: torch.ops.mkldnn._linear_pointwise(xb, wm, None, "none", [], ""), reps)
                rows.append((threads, batch, c_in, c_out, t_hyb, t_bf, t_fp))
                print(rows[-1], flush=True)
    lines = [f"# ViT-B Linear layers, 197 tokens per image, medians ({datetime.date.today()}, torch {torch.__version__}, "
             f"oneDNN ISA {O.isa()})", "",
             "Command: `python bench/bench_cpu.py linear`. hybrid = a deployed `Linear` (4/4 bits, keep 0.1, onednn: "
             f"quantize pass, int8 matmul, {'bf16' if bf16 else 'fp32'} FP branch on the prepacked float matmul, "
             "epilogue); bf16 = oneDNN's bf16 matmul with the weight prepacked once (what `torch.compile` with "
             "freezing runs); fp32 = `F.linear`. Target (issue 21): hybrid >= 1.6x the bf16 Linear.", "",
             "| threads | batch | in -> out | hybrid ms | bf16 ms | fp32 ms | bf16 / hybrid | target 1.6x |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for th, b, ci, co, t_h, t_b, t_f in rows:
        best = min(t for t in (t_b, t_f) if t is not None)
        r = best / t_h
        lines.append(f"| {th} | {b} | {ci} -> {co} | {t_h:.3f} | {'n/a' if t_b is None else f'{t_b:.3f}'} | "
                     f"{t_f:.3f} | {r:.2f}x | {_verdict(r, 1.6)} |")
    _write_table("linear_vit_b", lines)


def bench_models(names, threads, reps, batch=1):
    """torchvision models end to end (ResNet-18 / -50; ViT-B/16, Swin-T): every CPU baseline of the
    speedup report (same code, the peers of bench/peers.py included) and the deployed hybrid model
    (4/4 bits, keep 0.1, onednn; transformers also with 6-bit attention products), one table."""
    torch.set_num_threads(threads)
    lines = [f"# End to end, batch {batch}, {threads} threads, medians ({datetime.date.today()}, "
             f"torch {torch.__version__}, oneDNN ISA {O.isa()})", "",
             f"Command: `python bench/bench_cpu.py models --threads {threads} --batch {batch} --models "
             f"{','.join(names)}`. Deployed hybrid: 4/4 bits, keep 0.1, backend onednn, fp32 channels_last, built as "
             "the README does; 224x224 input. Baselines: `bench/speedup_report.py`'s CPU baselines and the peers "
             "of `bench/peers.py`, timed in the same process.", "",
             "| model | path | ms | best deployed hybrid's speedup over it |", "| --- | --- | --- | --- |"]
    summary = []
    for name in names:
        torch.manual_seed(0)
        base = getattr(torchvision.models, name)().eval()
        x = torch.randn(batch, 3, 224, 224)
        transformer = name.startswith(("vit", "swin"))
        # transformers also with their attention products on 6-bit codes (the paper's HybTransT)
        variants = [(None, None)] + ([(torch.bfloat16, None)] if O.bf16_supported() else [])
        if transformer:
            variants.append((variants[-1][0], 6))
        xcl = x.contiguous(memory_format=torch.channels_last)
        deployed = {}
        for fp_dtype, bits_att in variants:
            model = copy.deepcopy(base)
            ho.hybridize_(model, ho.HybridConfig(bits_w=4, bits_a=4, keep=0.1, bits_attention=bits_att),
                          example_inputs=x)
            model = ho.deploy_(model.eval(), backend="onednn", fp_dtype=fp_dtype)
            model = model.to(memory_format=torch.channels_last)
            with torch.no_grad():
                deployed[(fp_dtype, bits_att)] = median_ms(lambda: model(xcl), reps)
        dep = min(deployed.values())
        # the paper's network-level form (eq 5), its pruned half thin (hybridops/thin.py)
        try:
            network = ho.HybridNetwork(base, ho.HybridConfig(bits_w=4, bits_a=4, keep=0.1), example_inputs=x).eval()
            network = network.deploy_(backend="onednn").to(memory_format=torch.channels_last)
            with torch.no_grad():
                network_ms = median_ms(lambda: network(xcl), reps)
        except Exception as e:  # reported in the table, not fatal
            network_ms = f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        baselines = cpu_baselines(base, x, compile_=True)
        for path, b in baselines.items():
            if "ms" in b:
                lines.append(f"| {name} | {path} | {b['ms']:.2f} | {b['ms'] / dep:.2f}x |")
            else:
                lines.append(f"| {name} | {path} | skipped: {b['skipped']} | |")
        for (fp_dtype, bits_att), ms in deployed.items():
            label = "fp32 FP branch" if fp_dtype is None else "bf16 FP branch (`fp_dtype=torch.bfloat16`)"
            label += "" if bits_att is None else f", attention products on {bits_att}-bit codes (`bits_attention`)"
            lines.append(f"| {name} | **deployed hybrid (onednn), {label}** | {ms:.2f} | {ms / dep:.2f}x |")
        network_cell = f"{network_ms:.2f} | {network_ms / dep:.2f}x" if isinstance(network_ms, float) \
            else f"{network_ms} |"
        lines.append(f"| {name} | **deployed network-level hybrid (`HybridNetwork`, onednn)** | {network_cell} |")
        fastest = min((b["ms"], p) for p, b in baselines.items() if "ms" in b and b.get("float"))
        verdict = [f"{name}: best deployed {dep:.2f} ms is {fastest[0] / dep:.2f}x the fastest float path "
                   f"({fastest[1]}, target 2x: " + ("met" if fastest[0] / dep >= 2 else
                                                     f"missed by {2 * dep / fastest[0]:.2f}x") + ")"]
        # the best int8 engine measured (OpenVINO + NNCF where installed, else torch.ao's)
        int8 = min(((b["ms"], p) for p, b in baselines.items() if "ms" in b and not b.get("float")), default=None)
        if int8 is not None:
            verdict.append(f"takes {dep / int8[0]:.2f}x the time of {int8[1]} (target <= 1.25x: " +
                           ("met" if dep <= 1.25 * int8[0] else f"missed by {dep / (1.25 * int8[0]):.2f}x") + ")")
        summary.append("; ".join(verdict) + ".")
        print("\n".join(lines[-10:] + summary[-1:]), flush=True)
    lines += [""] + summary
    _write_table(f"models_{'-'.join(names)}_b{batch}_{threads}t", lines)


def bench_tracker(arch, threads, reps):
    """One tracked frame of a tracker of apps/tracking at full size (``model.tracking_step``: the
    search crop's network against the cached template), on every float and int8 path of the speedup
    report's CPU baselines and peers, the hybrid model before deployment, and deployed on onednn
    with fp32 and bf16 FP branches in both memory layouts.

    ``siamrpn``: SiamRPN++ (ResNet-50, 127 / 255 crops), hybrid as the tracker's default (4/4 bits,
    keep 0.25, backbone and the last classification convs). ``transt``: TransT (ResNet-50 to
    layer3, hidden 256, 4 fusion layers, 128 / 256 crops), HybTransT (4/4 bits, keep 0.25, first
    conv float, every other conv and Linear hybrid, attention products on 6-bit codes)."""
    # the tracking application is an optional part of the install ([tracking] extra)
    import hybridops_tracking.hybrid as H
    from hybridops_tracking.model import ModelConfig, SiamRPNPP
    from hybridops_tracking.transt import TransT, TransTConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    float_model = (TransT(TransTConfig()) if arch == "transt" else SiamRPNPP(ModelConfig())).eval()
    cfg = float_model.config
    z = torch.rand(1, 3, cfg.exemplar_size, cfg.exemplar_size) * 255
    x = torch.rand(1, 3, cfg.instance_size, cfg.instance_size) * 255
    hybrid = H.clone(float_model)
    H.hybridize_tracker(hybrid, "hybrid", example_inputs=(z, x))
    hybrid.eval()
    step = hybrid.tracking_step(z)
    with torch.no_grad():
        rows = [("**hybrid, not deployed** (the training form: both branches in float)", median_ms(lambda: step(x), reps))]
    print(rows[-1], flush=True)
    for fp_dtype in (None,) + ((torch.bfloat16,) if O.bf16_supported() else ()):
        d = H.deploy(H.clone(hybrid), backend="onednn", fp_dtype=fp_dtype)
        for fmt in (torch.contiguous_format, torch.channels_last):
            dstep = d.to(memory_format=fmt).tracking_step(z.contiguous(memory_format=fmt))
            xi = x.contiguous(memory_format=fmt)
            with torch.no_grad():
                rows.append((f"**deployed hybrid (onednn), {'fp32' if fp_dtype is None else 'bf16'} FP branch, "
                             f"{'channels_last' if fmt == torch.channels_last else 'NCHW'}**",
                             median_ms(lambda: dstep(xi), reps)))
            print(rows[-1], flush=True)
    best_dep = min(ms for label, ms in rows if label.startswith("**deployed"))
    baselines = cpu_baselines(float_model.tracking_step(z), x, compile_=True)
    what = ("TransT as `apps/tracking/transt.py` builds it (ResNet-50 to layer3, hidden 256, 8 heads, 4 fusion layers, "
            "FFN 2048; 256x256 search crop). HybTransT: `hybridize_tracker(model, \"hybrid\")` (4/4 bits, keep 0.25, "
            "first conv float, every other conv and Linear hybrid, attention products on 6-bit codes)"
            if arch == "transt" else
            "SiamRPN++ as `apps/tracking/model.py` builds it (ResNet-50, 255x255 search crop). Hybrid: "
            "`hybridize_tracker(model, \"hybrid\")` (4/4 bits, keep 0.25, backbone and the last classification convs)")
    lines = [f"# {type(float_model).__name__} per tracked frame, batch 1, {threads} threads, medians "
             f"({datetime.date.today()}, torch {torch.__version__}, oneDNN ISA {O.isa()})", "",
             f"Command: `python bench/bench_cpu.py tracker --arch {arch} --threads {threads} --reps {reps}`. {what}, "
             "then `deploy_` on onednn. One tracked frame (`model.tracking_step(z)`, template features cached). Float and "
             "int8 paths: `bench/speedup_report.py`'s CPU baselines and `bench/peers.py`'s peers on the float "
             "model, same process.", "",
             "| path | ms per frame | fps | best deployed hybrid's speedup over it |", "| --- | --- | --- | --- |"]
    for path, b in baselines.items():
        if "ms" in b:
            lines.append(f"| {path} | {b['ms']:.1f} | {1e3 / b['ms']:.1f} | {b['ms'] / best_dep:.2f}x |")
        else:
            lines.append(f"| {path} | skipped: {b['skipped']} | | |")
    lines += [f"| {label} | {ms:.1f} | {1e3 / ms:.1f} | {ms / best_dep:.2f}x |" for label, ms in rows]
    fastest = min((b["ms"], p) for p, b in baselines.items() if "ms" in b and b.get("float"))
    r = fastest[0] / best_dep
    lines += ["", f"Best deployed hybrid: {best_dep:.1f} ms per frame, {r:.2f}x the fps of the fastest float path "
                  f"({fastest[1]}, {fastest[0]:.1f} ms)"]
    if arch == "siamrpn":
        lines[-1] += " (target of issue 20: 1.5x, " + ("met" if r >= 1.5 else f"missed by {1.5 / r:.2f}x") + ")"
    int8 = min(((b["ms"], p) for p, b in baselines.items() if "ms" in b and not b.get("float")), default=None)
    lines[-1] += "." + ("" if int8 is None else
                        f" The fastest int8 path ({int8[1]}) takes {int8[0]:.1f} ms ({int8[0] / best_dep:.2f}x).")
    _write_table(f"{'transt' if arch == 'transt' else 'tracker'}_{threads}t", lines)


class _TimedKernels:
    """Wraps the onednn backend's kernel entry points (our C++ quantize and epilogue passes,
    oneDNN's int8 and float convolutions) with wall-clock timers, so a forward splits into passes;
    what is left of the forward's time is Python, dispatch and the unconverted modules."""

    PASSES = {"quantize_activate": "quantize-activate (ours)", "epilogue": "epilogue (ours)",
              "_qconv": "int8 conv (oneDNN)", "_qlinear": "int8 matmul: 1x1 convs and Linear (oneDNN)",
              "_fconv": "float conv (oneDNN, prepacked): FP branches, the merged stem, the thin copy's layers",
              "conv2d": "float conv (F.conv2d)"}

    def __init__(self):
        self.ms = dict.fromkeys(self.PASSES.values(), 0.0)
        self.calls = dict.fromkeys(self.PASSES.values(), 0)

    def _wrap(self, fn, label):
        def timed(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            self.ms[label] += (time.perf_counter() - t0) * 1e3
            self.calls[label] += 1
            return out
        return timed

    def __enter__(self):
        self._saved = {name: getattr(O, name) for name in ("_C", "_qconv", "_qlinear", "_fconv")}
        self._conv2d = F.conv2d
        ext = O._C
        wrapped = {name: self._wrap(getattr(ext, name), self.PASSES[name]) for name in ("quantize_activate", "epilogue")}
        # a stand-in for the extension module: the two timed passes, everything else as it is
        O._C = type("TimedExtension", (), {"__getattr__": lambda _s, n: wrapped.get(n, getattr(ext, n))})()
        for name in ("_qconv", "_qlinear", "_fconv"):
            setattr(O, name, self._wrap(getattr(O, name), self.PASSES[name]))
        F.conv2d = self._wrap(F.conv2d, self.PASSES["conv2d"])
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(O, name, fn)
        F.conv2d = self._conv2d


def _split_into_passes(model, xcl, reps):
    """``(median forward ms, {pass: median ms}, {pass: calls per forward})`` of ``model(xcl)``."""
    per_pass = {label: [] for label in _TimedKernels.PASSES.values()}
    totals, calls = [], {}
    with torch.no_grad():
        for _ in range(5):
            model(xcl)
        for _ in range(reps):
            with _TimedKernels() as t:
                t0 = time.perf_counter()
                model(xcl)
                totals.append((time.perf_counter() - t0) * 1e3)
            for label, ms in t.ms.items():
                per_pass[label].append(ms)
            calls = t.calls
    return statistics.median(totals), {label: statistics.median(v) for label, v in per_pass.items()}, calls


def _alternating_ms(models, x, reps):
    """``{name: median ms}`` of ``models`` called in turn, ``reps`` rounds (one drift for all)."""
    times = {name: [] for name in models}
    with torch.no_grad():
        for m in models.values():
            m(x)
        for _ in range(reps):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


@contextlib.contextmanager
def _skip_folds_off():
    """Deploy as before skip connections were folded into the layers (for comparison)."""
    saved = fusion.fuse_skip_connections_
    fusion.fuse_skip_connections_ = lambda model, decide=True: []
    try:
        yield
    finally:
        fusion.fuse_skip_connections_ = saved


def bench_passes(names, threads, reps):
    """Where a deployed model's time goes: the forward split into its passes (evidence for the
    docs' account of what limits the end-to-end speed), for the per-layer hybrid and for the two
    halves of the network-level hybrid (the quantized copy with its integer chain: codes between
    the convs of a block, the skip connection in the last conv's epilogue; the thin pruned copy),
    the network-level hybrid also as deployed without the skip-connection folds, for comparison."""
    torch.set_num_threads(threads)
    lines = [f"# Deployed hybrid forward split into passes, batch 1, {threads} threads ({datetime.date.today()}, "
             f"torch {torch.__version__}, oneDNN ISA {O.isa()})", "",
             f"Command: `python bench/bench_cpu.py passes --threads {threads}`. 4/4 bits, keep 0.1, onednn, fp32 "
             "channels_last, 224x224. Per pass: milliseconds per forward summed over the layers (medians over "
             f"{reps} forwards, wall clock around each kernel call) and calls per forward; 'rest' is the forward's "
             "median minus the passes: Python, dispatch, pooling, residual adds and other unconverted modules.", "",
             "| model | pass | ms per forward | share | calls |", "| --- | --- | --- | --- | --- |"]
    notes = []
    for name in names:
        torch.manual_seed(0)
        base = getattr(torchvision.models, name)().eval()
        x = torch.randn(1, 3, 224, 224)
        xcl = x.contiguous(memory_format=torch.channels_last)
        model = copy.deepcopy(base)
        ho.hybridize_(model, ho.HybridConfig(bits_w=4, bits_a=4, keep=0.1), example_inputs=x)
        ho.deploy_(model.eval(), backend="onednn")
        network = ho.HybridNetwork(base, ho.HybridConfig(bits_w=4, bits_a=4, keep=0.1), example_inputs=x).eval()
        with _skip_folds_off():
            unfolded = copy.deepcopy(network).deploy_(backend="onednn").to(memory_format=torch.channels_last)
        network.deploy_(backend="onednn").to(memory_format=torch.channels_last)
        parts = [("per-layer hybrid", model.to(memory_format=torch.channels_last)),
                 ("network-level: quantized copy (integer chain)", network.quant_net),
                 ("network-level: quantized copy without the skip-connection folds", unfolded.quant_net),
                 ("network-level: thin pruned copy", network.pruned_net)]
        for part, m in parts:
            first = len(lines)
            total, medians, calls = _split_into_passes(m, xcl, reps)
            for label, ms in medians.items():
                if calls[label]:
                    lines.append(f"| {name}, {part} | {label} | {ms:.2f} | {ms / total:.0%} | {calls[label]} |")
            rest = total - sum(medians.values())
            lines.append(f"| {name}, {part} | rest | {rest:.2f} | {rest / total:.0%} | |")
            lines.append(f"| {name}, {part} | **forward** | {total:.2f} | 100% | |")
            print("\n".join(lines[first:]), flush=True)
        # the folds' effect, free of the machine's drift between the rows above: alternating calls
        ab = _alternating_ms({"with": network.quant_net, "without": unfolded.quant_net}, xcl, reps)
        with torch.no_grad():
            same = torch.equal(network.quant_net(xcl), unfolded.quant_net(xcl))
        notes.append(f"{name}: the network-level quantized copy with the skip-connection folds and the integer chain "
                     f"{ab['with']:.2f} ms, without them {ab['without']:.2f} ms (medians of {reps} alternating "
                     f"forwards; outputs {'bit for bit equal' if same else 'DIFFERENT'}).")
    lines += [""] + notes
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"passes_{threads}t_{_isa_tag()}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["layers", "linear", "models", "tracker", "passes"])
    ap.add_argument("--arch", choices=["siamrpn", "transt"], default="siamrpn", help="the tracker of `tracker`")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    if a.what == "layers":
        bench_layers(a.reps)
    elif a.what == "linear":
        bench_linear(a.reps)
    elif a.what == "models":
        bench_models(a.models.split(","), a.threads, a.reps, a.batch)
    elif a.what == "passes":
        bench_passes(a.models.split(","), a.threads, a.reps)
    else:
        bench_tracker(a.arch, a.threads, a.reps)


if __name__ == "__main__":
    main()
