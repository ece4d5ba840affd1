"""Host cost of a deployed layer, and compiled against eager deployed models (CPU).

    python bench/bench_overhead.py host               # per-layer host time, kernels stubbed
    python bench/bench_overhead.py compile --threads 2 # eager vs torch.compile, deployed ResNet-18/50

``host``: every kernel of the layer's backend (quantize-activate, the integer conv, the float conv)
is replaced by a stub that returns the output the real kernel gave on the same call, so what is
timed is everything a deployed layer does outside its kernels: the module call, the one call
into the op layer, the per-call checks and the composition of the kernels. Medians of 7 x 2000
calls, one thread. The registered op's path (taken when gradients are needed or a tracer runs)
is timed beside it, with the dispatcher's own cost in it.

``compile``: deployed ResNet-18 and ResNet-50 (4/4 bits, keep 0.1, onednn), batch 1, 224x224:
eager against ``torch.compile(fullgraph=True)`` (Inductor), interleaved rounds in one process.

Writes markdown tables and JSON to bench/results/overhead/ (oneDNN's ISA named in each).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import types
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from common import environment

import hybridops as ho
from hybridops.ops import layer_op, registry

OUT = Path(__file__).parent / "results" / "overhead"
TARGET_US = 10.0
KERNELS = ("quantize_activate", "quantize_activate_flagged", "qconv2d", "qconv2d_residual", "fp_conv2d")


def _isa(backend: str) -> str:
    if backend != "onednn":
        return "n/a (reference backend)"
    import hybridops.kernels.onednn as O

    return O.isa()


class _Stubs:
    """The backend's kernels replaced by replays of their outputs: the first call of each kernel
    (per call site, by order within one forward) runs the real kernel and records its result. A
    linear layer's float branch runs as ``F.linear`` (a GEMM, kernel work): stubbed the same way."""

    def __init__(self, ns):
        self.ns, self.real, self.recorded, self.pos = ns, {}, {}, 0

    def __enter__(self):
        for name in KERNELS:
            fn = getattr(self.ns, name, None)
            if fn is not None:
                self.real[name] = fn
                setattr(self.ns, name, self._stub(name, fn))
        functional = layer_op.F
        self.real["F"] = functional
        layer_op.F = types.SimpleNamespace(linear=self._stub("linear", functional.linear), pad=functional.pad,
                                           relu=functional.relu)
        return self

    def _stub(self, name, fn):
        recorded = self.recorded

        def stub(*args, **kwargs):
            key = (name, self.pos)
            self.pos += 1
            out = recorded.get(key)
            if out is None:
                out = recorded[key] = fn(*args, **kwargs)
            return out

        return stub

    def rewind(self):
        self.pos = 0

    def __exit__(self, *exc):
        layer_op.F = self.real.pop("F")
        for name, fn in self.real.items():
            setattr(self.ns, name, fn)


def _layers(backend: str):
    """(name, deployed layer, input) for each path a deployed layer takes, at ResNet shapes."""
    torch.manual_seed(0)
    x56 = torch.randn(1, 64, 56, 56).contiguous(memory_format=torch.channels_last)
    cases = []

    def deploy(model, x, config, fuse=False):
        ho.hybridize_(model.eval(), config, example_inputs=x)
        return ho.deploy_(model, backend, fuse=fuse)

    m = deploy(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1)), x56,
               ho.HybridConfig(bits_w=4, bits_a=4, keep=0.1, fp_first_input=False))
    cases.append(("hybrid 3x3, 64->64, 56x56", m[0], x56))
    m = deploy(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1)), x56, ho.QuantConfig(fp_first_input=False))
    cases.append(("quantized 3x3, 64->64, 56x56", m[0], x56))
    x3 = torch.randn(1, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    m = deploy(nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3)), x3, ho.HybridConfig(keep=0.1))
    cases.append(("merged stem 7x7, 3->64, 224x224", m[0], x3))
    chain = deploy(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)), x56,
                   ho.QuantConfig(fp_first_input=False), fuse=True)
    with torch.no_grad():
        codes = chain[0](x56)
    if chain[2].codes_input:
        cases.append(("codes in 3x3, 64->64, 56x56", chain[2], codes))
    xf = torch.randn(1, 512)
    m = deploy(nn.Sequential(nn.Linear(512, 1000)), xf, ho.HybridConfig(keep=0.1, fp_first_input=False))
    cases.append(("hybrid linear 512->1000", m[0], xf))
    return cases


def _per_call_us(fn, calls=2000, repeats=7, best=False) -> float:
    """Microseconds per call of ``fn``: the median of ``repeats`` timed loops of ``calls`` calls,
    or their minimum with ``best`` (timeit's rule for a fixed cost: noise only adds time)."""
    for _ in range(min(200, 4 * calls)):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        ts.append((time.perf_counter() - t0) / calls)
    return (min(ts) if best else statistics.median(ts)) * 1e6


def host(backend: str) -> dict:
    torch.set_num_threads(1)
    ns = registry.loaded(backend)
    rows = []
    for name, layer, x in _layers(backend):
        with _Stubs(ns) as stubs:
            def eager():
                stubs.rewind()
                with torch.no_grad():
                    layer(x)

            def dispatched():
                stubs.rewind()
                layer(x)

            eager_us = _per_call_us(eager, best=True)
            layer.fp_weight.requires_grad_(True)  # gradients needed: the registered op (and autograd)
            op_us = _per_call_us(dispatched, calls=500, best=True)
            layer.fp_weight.requires_grad_(False)
            with torch.no_grad():
                empty_us = _per_call_us(lambda: None, best=True)  # the loop and the no_grad context alone
        rows.append({"layer": name, "host_us": eager_us - empty_us, "registered_op_us": op_us})
    # the machine's own pace in the same run: one call of an empty module and one small torch op
    ident, t = nn.Identity(), torch.ones(4)
    with torch.no_grad():
        pace = {"nn.Identity()(x)": _per_call_us(lambda: ident(t), best=True),
                "torch.add(x, x)": _per_call_us(lambda: torch.add(t, t), best=True)}
    return {"env": {**environment(), "onednn_isa": _isa(backend), "threads": 1,
                    "backend": backend}, "target_us": TARGET_US, "rows": rows, "pace_us": pace}


def compile_table(backend: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    rows = []
    for name, ctor in (("resnet18", torchvision.models.resnet18), ("resnet50", torchvision.models.resnet50)):
        torch.manual_seed(0)
        model = ctor().eval()
        x = torch.randn(1, 3, 224, 224).contiguous(memory_format=torch.channels_last)
        ho.hybridize_(model, ho.HybridConfig(bits_w=4, bits_a=4, keep=0.1), example_inputs=torch.randn(2, 3, 224, 224))
        ho.deploy_(model, backend)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            t0 = time.perf_counter()
            ok = torch.equal(compiled(x), model(x))
            compile_s = time.perf_counter() - t0
            # interleaved rounds: a shared machine's drift hits both sides alike
            rounds = [(_per_call_us(lambda: model(x), calls=5, repeats=3),
                       _per_call_us(lambda: compiled(x), calls=5, repeats=3)) for _ in range(5)]
            eager_ms = statistics.median(r[0] for r in rounds) / 1e3
            compiled_ms = statistics.median(r[1] for r in rounds) / 1e3
        rows.append({"model": name, "eager_ms": eager_ms, "compiled_ms": compiled_ms,
                     "speedup": eager_ms / compiled_ms, "equal": ok, "compile_s": compile_s})
    return {"env": {**environment(), "onednn_isa": _isa(backend), "threads": threads,
                    "backend": backend}, "rows": rows}


def _env_lines(env: dict) -> str:
    return (f"{env['date']}, {env['cpu']}, oneDNN ISA `{env['onednn_isa']}`, torch {env['torch']}, "
            f"{env['threads']} thread(s), backend `{env['backend']}`")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("host", "compile"))
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    backend = ho.resolve_backend(a.backend, "cpu")
    OUT.mkdir(parents=True, exist_ok=True)
    if a.what == "host":
        res = host(backend)
        lines = [f"# Host time per deployed layer, kernels stubbed ({_env_lines(res['env'])})", "",
                 f"Target: <= {TARGET_US:.0f} us per layer outside the kernels (eager inference).", "",
                 "| layer | host time, eager inference (us) | target | registered op + autograd (us) |",
                 "| --- | --- | --- | --- |"]
        for r in res["rows"]:
            ok = "met" if r["host_us"] <= TARGET_US else f"missed by {r['host_us'] - TARGET_US:.1f} us"
            lines.append(f"| {r['layer']} | {r['host_us']:.1f} | {ok} | {r['registered_op_us']:.1f} |")
        lines += ["", "This machine's pace in the same run (shared machines drift by 2x between runs): " +
                  ", ".join(f"`{k}` {v:.2f} us" for k, v in res["pace_us"].items()) + "."]
    else:
        res = compile_table(backend, a.threads)
        lines = [f"# Deployed models, eager vs torch.compile(fullgraph=True) ({_env_lines(res['env'])})", "",
                 "Batch 1, 224x224 channels_last, 4/4 bits, keep 0.1; medians of 5 interleaved rounds of 3 x 5 forwards "
                 "each. `equal`: bit-equal to eager (Inductor reorders the average pool's sum).", "",
                 "| model | eager (ms) | compiled (ms) | compiled speedup | equal | compile time (s) |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for r in res["rows"]:
            lines.append(f"| {r['model']} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | {r['speedup']:.2f}x | "
                         f"{r['equal']} | {r['compile_s']:.0f} |")
    (OUT / f"{a.what}.json").write_text(json.dumps(res, indent=1))
    (OUT / f"{a.what}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
