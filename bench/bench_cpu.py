"""CPU microbenchmarks of the onednn backend and end-to-end CPU timings (docs/cpu_backend.md).

    python bench/bench_cpu.py layers            # ResNet-50 3x3 layers, batch 1, 1 thread
    python bench/bench_cpu.py models --threads 2 # ResNet-18/50 deployed hybrid vs float / torch.ao int8

Medians of many runs, every path measured in the same process (the machines are shared and
noisy: compare ratios, not absolute times across runs). Writes markdown tables to
bench/results/cpu/.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

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


def bench_layers(reps):
    from hybridops.ops.packing import pack_weight
    import hybridops.kernels.onednn as O

    torch.set_num_threads(1)
    rows = []
    for c, hw, s in R50_3X3:
        g = torch.Generator().manual_seed(c)
        ho = (hw + 2 - 3) // s + 1
        codes = torch.randint(0, 16, (1, hw, hw, c), dtype=torch.uint8, generator=g)
        wp = pack_weight(torch.randint(-7, 8, (c, c, 3, 3), dtype=torch.int8, generator=g), 4)
        scale, bias = torch.rand(c) * 1e-3, torch.randn(c)
        geo = ([s, s], [1, 1, 1, 1], [1, 1], 1)
        kept = torch.randperm(c, generator=g)[: max(1, c // 10)]
        x = torch.randn(1, c, hw, hw).contiguous(memory_format=torch.channels_last)
        qp = torch.tensor([0.5, 0.0])
        fpw = torch.randn(kept.numel(), c, 3, 3)
        w = torch.randn(c, c, 3, 3)
        xb = x.to(torch.bfloat16)
        with torch.no_grad():
            t_int = median_ms(lambda: O.qconv2d(codes, wp, c, 4, False, 4, scale, bias, *geo, True), reps)
            fp = torch.randn(1, ho, ho, kept.numel())

            def hybrid():  # the whole hybrid layer: quantize-activate, FP branch (bf16), int conv + epilogue
                xs, cd = O.quantize_activate(x, qp, 4, False, None, None, False, None, None)
                f = O.fp_conv2d(x, fpw, None, [s, s], [1, 1, 1, 1], [1, 1], 1, torch.bfloat16).permute(0, 2, 3, 1)
                return O.qconv2d(cd, wp, c, 4, False, 4, scale, bias, *geo, True, f, kept)
            t_hyb = median_ms(hybrid, reps)
            t_bf = median_ms(lambda: O.fp_conv2d(xb, w, bias, [s, s], [1, 1, 1, 1], [1, 1], 1), reps)
            t_fp = median_ms(lambda: O.fp_conv2d(x, w, bias, [s, s], [1, 1, 1, 1], [1, 1], 1), max(10, reps // 3))
        rows.append((c, hw, s, t_int, t_hyb, t_bf, t_fp))
        print(rows[-1], flush=True)
    lines = [f"# ResNet-50 3x3 convs, batch 1, 1 thread, medians ({datetime.date.today()}, torch {torch.__version__}, "
             f"oneDNN ISA {O.isa()})", "",
             "Command: `python bench/bench_cpu.py layers`. int8 = onednn qconv2d 4/4 bits (bias+ReLU post-ops, fp32 out); "
             "hybrid = quantize-activate + FP branch keep 0.1 (bf16, prepacked) + int conv + our epilogue; "
             "bf16 / fp32 = oneDNN conv with prepacked weights (`fp_conv2d`). Wall time per call from Python.", "",
             "| C | HxW | stride | int8 ms | hybrid layer ms | bf16 ms | fp32 ms | bf16 / int8 | bf16 / hybrid | target 1.8x |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c, hw, s, ti, th, tb, tf in rows:
        r = tb / ti
        lines.append(f"| {c} | {hw} | {s} | {ti:.3f} | {th:.3f} | {tb:.3f} | {tf:.3f} | {r:.2f}x | {tb / th:.2f}x | "
                     f"{'met' if r >= 1.8 else f'missed by {1.8 / r:.2f}x'} |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "layers_r50_3x3.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def bench_models(names, threads, reps):
    import torchvision

    import hybridops as ho
    torch.set_num_threads(threads)
    lines = [f"# End to end, batch 1, {threads} threads, medians ({datetime.date.today()}, torch {torch.__version__})", "",
             f"Command: `python bench/bench_cpu.py models --threads {threads}`. Deployed hybrid: 4/4 bits, keep 0.1, "
             "backend onednn, built as the README does. 224x224 input.", "",
             "| model | path | ms | deployed speedup |", "| --- | --- | --- | --- |"]
    for name in names:
        torch.manual_seed(0)
        base = getattr(torchvision.models, name)().eval()
        x = torch.randn(1, 3, 224, 224)
        times = {}
        with torch.no_grad():
            times["fp32 eager"] = median_ms(lambda: base(x), reps)
            cl = copy.deepcopy(base).to(memory_format=torch.channels_last).to(torch.bfloat16)
            xb = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
            times["bf16 channels_last eager"] = median_ms(lambda: cl(xb), reps)
            for dt in (torch.float32, torch.bfloat16):
                m = copy.deepcopy(base).to(dt).to(memory_format=torch.channels_last)
                xi = x.to(dt).contiguous(memory_format=torch.channels_last)
                fr = torch.jit.freeze(torch.jit.trace(m, xi))
                times[f"{str(dt)[6:]} jit-frozen"] = median_ms(lambda: fr(xi), reps)
        try:
            from torch.ao.quantization import get_default_qconfig_mapping
            from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
            torch.backends.quantized.engine = "x86"
            q = prepare_fx(copy.deepcopy(base), get_default_qconfig_mapping("x86"), (x,))
            with torch.no_grad():
                q(x)
                q = convert_fx(q)
                times["torch.ao FX int8 (x86)"] = median_ms(lambda: q(x), reps)
        except Exception as e:  # reported, not hidden
            print("torch.ao int8 failed:", e)
        model = copy.deepcopy(base)
        ho.hybridize_(model, ho.HybridConfig(bits_w=4, bits_a=4, keep=0.1), example_inputs=x)
        model.eval()
        ho.deploy_(model, backend="onednn")
        xcl = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            times["deployed hybrid onednn (fp32 in, NCHW)"] = median_ms(lambda: model(x), reps)
            times["deployed hybrid onednn (fp32 in, channels_last)"] = median_ms(lambda: model(xcl), reps)
        dep = min(v for k, v in times.items() if k.startswith("deployed"))
        for k, v in times.items():
            lines.append(f"| {name} | {k} | {v:.2f} | {v / dep:.2f}x |")
            print(name, k, f"{v:.2f}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"models_{threads}t.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["layers", "models"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--models", default="resnet18,resnet50")
    a = ap.parse_args()
    if a.what == "layers":
        bench_layers(a.reps)
    else:
        bench_models(a.models.split(","), a.threads, a.reps)


if __name__ == "__main__":
    main()
