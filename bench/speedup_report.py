"""The main job: BOP-predicted speedup (eq 17) next to measured speedup, per layer and end to end.

For one model: convert a copy with ``hybridize_`` (calibrated on a random batch), deploy it on
the chosen backend, and time every converted layer and the whole model against the float
original, in the same process on the same device. On a GPU the baseline is cuDNN bf16
channels_last (and the deployed model runs in bf16 channels_last). On the CPU the deployed model
runs fp32 channels_last on the backend ``auto`` resolves to (``onednn``: int8 convolutions through
oneDNN, whose ISA the report names), and end to end it is timed against every float path PyTorch
offers there — fp32 eager, fp32 / bf16 channels_last, fp32 / bf16 TorchScript-frozen, and with
``--compile`` ``torch.compile`` with freezing (minutes of compiling on 2 cores) — the fastest of
which is the baseline, and against torch.ao's x86 int8 model (the peer: int8 with no FP branch).
Per layer, the float figure is the same layer in fp32 channels_last eager.

Writes ``report.json``, ``layers.csv`` and ``speedup.png`` (predicted vs measured per layer)
into ``--out`` and prints a table. Example::

    python bench/speedup_report.py --model resnet18 --batch 1
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hybridops as ho  # noqa: E402
from common import MODEL_INPUT, build_model, environment, time_ms, write_json  # noqa: E402
import peers  # noqa: E402


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _capture_inputs(model: nn.Module, names: List[str], x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The input each named layer sees in one forward pass of ``model``."""
    seen: Dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, _n=n: seen.__setitem__(_n, args[0].detach().clone())) for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def _cuda_graph_ms(model: nn.Module, x: torch.Tensor) -> Optional[float]:
    """Median replay time of ``model(x)`` captured in a CUDA graph (batch-1 figures are bound by
    launch costs, which graphs remove)."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # warm up: autotuning and lazy allocation must happen before capture
            model(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        model(static_x)
    return time_ms(graph.replay, x.device)


def _peak_activation_bytes(model: nn.Module, x: torch.Tensor) -> Optional[int]:
    if x.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        model(x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _cpu_isa() -> str:
    """oneDNN's int8 convolution implementation on this CPU (AMX, VNNI, AVX2, ...)."""
    try:
        import hybridops.kernels.onednn as onednn
    except ImportError as e:  # the onednn backend's compiled kernels are missing: say so in the report
        return f"unknown ({e})"
    return onednn.isa()


def _bf16_conv_supported() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _jit_frozen(model: nn.Module, x: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, x).eval()))


def _torch_ao_int8(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """torch.ao's FX int8 model for the x86 engine, calibrated on ``x``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (x,))
    with torch.no_grad():
        prepared(x)
    return convert_fx(prepared)


def cpu_baselines(float_model: nn.Module, x32: torch.Tensor, compile_: bool = False) -> Dict[str, dict]:
    """End-to-end CPU timings of the paths a user would otherwise pick: ``{name: {"ms": ..} or
    {"skipped": why}}``. Float paths carry ``"float": True``; the fastest of them is the baseline."""
    out: Dict[str, dict] = {}
    cl = torch.channels_last
    xcl = x32.contiguous(memory_format=cl)
    bf16 = _bf16_conv_supported()
    no_bf16 = "this CPU has no bf16 convolution in oneDNN (needs AVX-512 BF16 / AMX, or AVX-512 BW/VL/DQ)"
    paths = [("fp32 eager", lambda: (float_model, x32)),
             ("fp32 channels_last", lambda: (copy.deepcopy(float_model).to(memory_format=cl), xcl)),
             ("bf16 channels_last", lambda: (copy.deepcopy(float_model).to(torch.bfloat16, memory_format=cl),
                                             xcl.to(torch.bfloat16)) if bf16 else no_bf16),
             ("fp32 TorchScript frozen", lambda: (_jit_frozen(copy.deepcopy(float_model).to(memory_format=cl), xcl),
                                                  xcl)),
             ("bf16 TorchScript frozen", lambda: (_jit_frozen(copy.deepcopy(float_model).to(torch.bfloat16,
                                                                                           memory_format=cl),
                                                              xcl.to(torch.bfloat16)), xcl.to(torch.bfloat16))
              if bf16 else no_bf16)]
    if compile_:
        for dt in (torch.float32, torch.bfloat16):
            name = f"{str(dt)[6:].replace('float32', 'fp32')} torch.compile (freezing)"
            if dt == torch.bfloat16 and not bf16:
                paths.append((name, lambda: no_bf16))
                continue
            paths.append((name, lambda dt=dt: (torch.compile(copy.deepcopy(float_model).to(dt, memory_format=cl),
                                                              options={"freezing": True}), xcl.to(dt))))
    for name, make in tqdm(paths, desc="CPU float baselines", leave=False):
        try:
            made = make()
            if isinstance(made, str):
                out[name] = {"float": True, "skipped": made}
                continue
            m, xin = made
            with torch.no_grad():
                out[name] = {"float": True, "ms": time_ms(lambda: m(xin), x32.device)}
        except Exception as e:  # a path PyTorch cannot build for this model is reported, not fatal
            out[name] = {"float": True, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    try:
        q = _torch_ao_int8(float_model, x32)
        with torch.no_grad():
            out["torch.ao int8 (x86)"] = {"float": False, "ms": time_ms(lambda: q(x32), x32.device)}
    except Exception as e:  # e.g. a model FX cannot trace
        out["torch.ao int8 (x86)"] = {"float": False, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    for name, (is_float, build) in tqdm(peers.build_all(float_model, x32).items(), desc="CPU peers", leave=False):
        try:
            run = build()
            with torch.no_grad():
                out[name] = {"float": is_float, "ms": time_ms(lambda: run(x32), x32.device)}
        except Exception as e:  # not installed, or failing on this model: reported with the reason
            out[name] = {"float": is_float, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    return out


def run(model_name: str, batch: int, size: Optional[int], config: ho.HybridConfig, backend: str,
        out_dir: Path, plot: bool = True, device: Optional[str] = None, compile_: bool = False) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    fmt = torch.channels_last
    size = size or MODEL_INPUT.get(model_name, 224)
    shape = (batch, 3, size, size)
    torch.manual_seed(0)

    float_model = build_model(model_name).eval().to(dev)
    x32 = torch.randn(shape, device=dev)
    with torch.no_grad():
        y_float32 = float_model(x32)
    hybrid = copy.deepcopy(float_model)
    conversion = ho.hybridize_(hybrid, config, example_inputs=x32)
    with torch.no_grad():
        y_hybrid32 = hybrid(x32)
    rel_err = float((y_hybrid32 - y_float32).norm() / y_float32.norm().clamp_min(1e-12))
    bops = ho.count_bops(hybrid, shape)
    ho.deploy_(hybrid, backend)
    backends = sorted(set(ho.backends_in_use(hybrid).values()))
    # the paper's network-level form (eq 5): a quantized copy plus a pruned copy whose pruning
    # compounds; deployed, its pruned half runs on its kept channels (hybridops/thin.py)
    network = ho.HybridNetwork(float_model, config, example_inputs=x32).eval().deploy_(backend)

    float_model = float_model.to(dtype=dtype, memory_format=fmt)
    hybrid = hybrid.to(dtype=dtype, memory_format=fmt)
    network = network.to(dtype=dtype, memory_format=fmt)
    x = x32.to(dtype=dtype).contiguous(memory_format=fmt)
    inputs = _capture_inputs(float_model, conversion.converted, x)

    rows = []
    by_name = {r.name: r for r in bops.layers}
    for name in tqdm(conversion.converted, desc=f"layers ({dev.type}, {'/'.join(backends)})", leave=False):
        xin = inputs[name]
        f_layer, h_layer = float_model.get_submodule(name), hybrid.get_submodule(name)
        hin = xin
        if getattr(h_layer, "codes_input", False):  # chained: its producer hands it packed codes
            _, hin = ho.ops.quantize_activate(xin, h_layer.in_qparams, h_layer.bits_a, h_layer.a_signed, None, None,
                                              False, None, None, h_layer.backend)
        with torch.no_grad():
            t_float = time_ms(lambda: f_layer(xin), dev)
            t_hybrid = time_ms(lambda: h_layer(hin), dev)
        r = by_name[name]
        rows.append({"layer": name, "kind": r.kind, "bits_a": r.bits_a, "bits_w": r.bits_w,
                     "kept": f"{r.pruned_c_out}/{r.c_out}", "rc_hybrid": r.rc_hybrid,
                     "predicted_speedup": 1.0 / r.rc_hybrid if r.rc_hybrid else None,
                     "float_ms": t_float, "hybrid_ms": t_hybrid, "measured_speedup": t_float / t_hybrid})

    with torch.no_grad():
        e2e = {"float_eager_ms": time_ms(lambda: float_model(x), dev),
               "hybrid_eager_ms": time_ms(lambda: hybrid(x), dev),
               "network_eager_ms": time_ms(lambda: network(x), dev)}
    if dev.type == "cpu":
        base = cpu_baselines(float_model.to(memory_format=torch.contiguous_format), x32, compile_)
        timed = {k: v["ms"] for k, v in base.items() if v["float"] and "ms" in v}
        best = min(timed, key=timed.get)
        e2e["cpu_baselines"] = base
        e2e["fastest_float"] = best
        e2e["fastest_float_ms"] = timed[best]
        e2e["speedup_vs_fastest_float"] = timed[best] / e2e["hybrid_eager_ms"]
        ao = base["torch.ao int8 (x86)"].get("ms")
        e2e["time_vs_torch_ao_int8"] = e2e["hybrid_eager_ms"] / ao if ao else None
    if dev.type == "cuda":
        e2e["float_graph_ms"] = _cuda_graph_ms(float_model, x)
        e2e["hybrid_graph_ms"] = _cuda_graph_ms(hybrid, x)
    result = {
        "environment": environment(),
        "model": model_name, "input_shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
        "baseline": "cuDNN bf16 channels_last" if dev.type == "cuda" else "PyTorch fp32 channels_last on the CPU",
        "cpu_isa": _cpu_isa() if dev.type == "cpu" else None,
        "backends": backends,
        "config": {k: getattr(config, k) for k in ("bits_w", "bits_a", "keep", "fp_first_input")},
        "untrained_conversion_rel_l2_error": rel_err,
        "bops": {"baseline": bops.baseline, "hybrid": bops.hybrid, "rc": bops.rc,
                 "predicted_speedup": 1.0 / bops.rc},
        "end_to_end": e2e,
        "memory": {"float_weight_bytes": _bytes(float_model), "hybrid_weight_bytes": _bytes(hybrid),
                   "float_peak_activation_bytes": _peak_activation_bytes(float_model, x),
                   "hybrid_peak_activation_bytes": _peak_activation_bytes(hybrid, x)},
        "layers": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "report.json", result)
    with open(out_dir / "layers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    if plot:
        _plot(result, out_dir / "speedup.png")
    return result


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["layers"]
    pred = [r["predicted_speedup"] for r in rows]
    meas = [r["measured_speedup"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(pred, meas, s=18)
    hi = max(max(pred), max(meas)) * 1.1
    ax.plot([0, hi], [0, hi], "k--", lw=0.8, label="measured = predicted")
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.set_xlabel("BOP-predicted speedup (1 / RC, eq 17)")
    ax.set_ylabel(f"measured speedup over {result['baseline']}")
    env = result["environment"]
    ax.set_title(f"{result['model']} {tuple(result['input_shape'])}, backend {'/'.join(result['backends'])}\n"
                 f"{env['device']}, {env['date'][:10]}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(result: dict) -> str:
    env = result["environment"]
    lines = [f"hybridops speedup vs BOPs: {result['model']} input {tuple(result['input_shape'])} {result['dtype']}",
             f"device {env['device']} | baseline {result['baseline']} | backend {'/'.join(result['backends'])} | "
             f"torch {env['torch']} | {env['date']}"]
    if env["device"] == "cpu":
        lines.append(f"oneDNN int8 ISA: {result['cpu_isa']}")
        if result["backends"] == ["torch"]:
            lines.append("NOTE: the deployed model runs on the reference backend (plain PyTorch): these timings check "
                         "the harness and are not kernel performance.")
    head = f"{'layer':<28} {'kind':<7} {'A/W':>6} {'kept':>9} {'pred x':>7} {'float ms':>9} {'hybrid ms':>10} {'meas x':>7}"
    lines += [head, "-" * len(head)]
    for r in result["layers"]:
        lines.append(f"{r['layer'][:28]:<28} {r['kind']:<7} {str(r['bits_a']) + '/' + str(r['bits_w']):>6} "
                     f"{r['kept']:>9} {r['predicted_speedup']:>7.2f} {r['float_ms']:>9.3f} {r['hybrid_ms']:>10.3f} "
                     f"{r['measured_speedup']:>7.2f}")
    e = result["end_to_end"]
    lines.append("-" * len(head))
    lines.append(f"end to end: predicted {result['bops']['predicted_speedup']:.2f}x (RC {result['bops']['rc']:.3f}); "
                 f"eager {e['float_eager_ms']:.3f} ms float vs {e['hybrid_eager_ms']:.3f} ms hybrid "
                 f"= {e['float_eager_ms'] / e['hybrid_eager_ms']:.2f}x; network-level hybrid (HybridNetwork) "
                 f"{e['network_eager_ms']:.3f} ms")
    if e.get("cpu_baselines"):
        lines.append("end to end on the CPU, same run (medians):")
        for name, b in e["cpu_baselines"].items():
            fig = f"{b['ms']:9.3f} ms" if "ms" in b else f"skipped: {b['skipped']}"
            lines.append(f"  {name:<34} {fig}")
        lines.append(f"  {'deployed hybrid (' + '/'.join(result['backends']) + ')':<34} {e['hybrid_eager_ms']:9.3f} ms")
        lines.append(f"  {'deployed network-level hybrid':<34} {e['network_eager_ms']:9.3f} ms")
        ao = e["time_vs_torch_ao_int8"]
        lines.append(f"deployed hybrid is {e['speedup_vs_fastest_float']:.2f}x the fastest float path "
                     f"({e['fastest_float']})" + (f" and takes {ao:.2f}x torch.ao int8's time" if ao else ""))
    if e.get("hybrid_graph_ms"):
        lines.append(f"CUDA graph: {e['float_graph_ms']:.3f} ms float vs {e['hybrid_graph_ms']:.3f} ms hybrid "
                     f"= {e['float_graph_ms'] / e['hybrid_graph_ms']:.2f}x")
    m = result["memory"]
    lines.append(f"weights: {m['float_weight_bytes'] / 2**20:.2f} MiB float vs {m['hybrid_weight_bytes'] / 2**20:.2f} MiB "
                 f"hybrid; untrained conversion rel. L2 error {result['untrained_conversion_rel_l2_error']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", help="resnet18, resnet50, siamrpn-resnet50, rtmdnet or tiny")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=None, help="input height = width (default: the model's own)")
    p.add_argument("--bits-w", type=int, default=4)
    p.add_argument("--bits-a", type=int, default=4)
    p.add_argument("--keep", type=float, default=0.1, help="FP-branch keep ratio (the paper: 0.05-0.5)")
    p.add_argument("--backend", default="auto", help="auto, torch, onednn, triton or cuda")
    p.add_argument("--compile", action="store_true",
                   help="CPU: also time torch.compile with freezing as a float baseline (minutes of compiling)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="output folder (default bench/results/<device>-<model>-b<batch>)")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    if a.batch < 1:
        p.error("--batch must be at least 1")
    cfg = ho.HybridConfig(bits_w=a.bits_w, bits_a=a.bits_a, keep=a.keep)
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tag = (torch.cuda.get_device_name().replace(" ", "-") if dev == "cuda" else "cpu")
    out = Path(a.out or os.path.join(Path(__file__).resolve().parent, "results", f"{tag}-{a.model}-b{a.batch}"))
    result = run(a.model, a.batch, a.size, cfg, a.backend, out, plot=not a.no_plot, device=dev, compile_=a.compile)
    print(format_table(result))
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
