"""The one-screen summary of a GPU suite run (``bench/gpu_suite.sh``), from what its stages left
in the run's folder: ``stages.tsv``, ``correctness-*.jsonl``, ``kernels.jsonl``,
``e2e-b*/report.json``, ``transformer.jsonl`` and the sanitizer logs. Works on a partial folder (a stage that timed out
or never ran shows as such), since the suite rewrites the summary after every stage.

    python bench/gpu/summarize.py bench/results/gpu-suite-<date>
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List


def _jsonl(paths) -> List[Dict]:
    rows = []
    for p in sorted(paths):
        for line in p.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a timeout
                pass
    return rows


def _env_line(work: Path) -> str:
    log = work / "env.log"
    if not log.exists():
        return "environment: not recorded"
    lines = [ln.strip() for ln in log.read_text().splitlines() if ln.strip()]
    gpu = next((ln for ln in lines if "," in ln and "nvidia-smi" not in ln and not ln.startswith("python")),
               "no GPU")
    ver = next((ln for ln in lines if ln.startswith("python")), "")
    return f"{gpu} | {ver}"


def correctness(work: Path) -> List[str]:
    rows = _jsonl(work.glob("correctness-*.jsonl"))
    if not rows:
        return ["correctness: no results"]
    by = defaultdict(lambda: [0, 0])
    for r in rows:
        by[r["backend"]][0 if r["ok"] else 1] += 1
    out = ["correctness: " + "; ".join(f"{b} {p} passed, {f} failed" for b, (p, f) in sorted(by.items()))]
    for r in [r for r in rows if not r["ok"]][:6]:
        out.append(f"  FAIL {r['backend']} {r['case'][:70]}: {(r['error'] or '')[:60]}")
    return out


def kernels(work: Path) -> List[str]:
    rows = _jsonl([work / "kernels.jsonl"] if (work / "kernels.jsonl").exists() else [])
    if not rows:
        return ["microbenchmarks: no results"]
    table: Dict[tuple, Dict[str, float]] = defaultdict(dict)
    for r in rows:
        table[(r["shape"], r["batch"])][r["provider"]] = r["ms"] * 1e3
    # sm90_best: hybridops' CUTLASS Hopper qconv2d (csrc/sm90/), best forced tile, beside stock CUTLASS's.
    provs = ["cudnn_bf16_cl", "cutlass_best", "sm90_best", "qconv_triton", "qconv_cuda", "hybrid_triton", "hybrid_cuda"]
    if not any("cudnn_bf16_cl" in v for v in table.values()):
        provs = ["torch_fp32_cpu"] + [p for p in provs[3:]] + ["qconv_torch", "hybrid_torch"]
    out = ["microbenchmarks (us; in brackets: speedup over the first column), bits 4/4, keep 0.1:",
           f"{'shape':<26}{'N':>3} " + " ".join(f"{p:>14}" for p in provs)]
    for (shape, n), v in table.items():
        cut = [t for p, t in v.items() if p.startswith("cutlass_s8")]
        if cut:
            v["cutlass_best"] = min(cut)
        ours = [t for p, t in v.items() if p in ("sm90_128x128", "sm90_64x128")]
        if ours:
            v["sm90_best"] = min(ours)
        base = v.get(provs[0])
        cells = []
        for p in provs:
            t = v.get(p)
            if t is None or t != t:
                cells.append(f"{'-':>14}")
            elif base and p != provs[0] and len(f"{t:.1f}({base / t:.2f})") <= 14:
                cells.append(f"{t:.1f}({base / t:.2f})".rjust(14))
            else:
                cells.append(f"{t:>14.1f}")
        out.append(f"{shape[:26]:<26}{n:>3} " + " ".join(cells))
    return out


def e2e(work: Path) -> List[str]:
    out = []
    for d in sorted(work.glob("e2e-b*")):
        p = d / "report.json"
        if not p.exists():
            out.append(f"{d.name}: no report")
            continue
        r = json.loads(p.read_text())
        e = r["end_to_end"]
        line = (f"{r['model']} b{r['input_shape'][0]} ({'/'.join(r['backends'])}): eager {e['float_eager_ms']:.3f} ms "
                f"float vs {e['hybrid_eager_ms']:.3f} ms hybrid = {e['float_eager_ms'] / e['hybrid_eager_ms']:.2f}x")
        if e.get("hybrid_graph_ms"):
            line += (f"; CUDA graph {e['float_graph_ms']:.3f} vs {e['hybrid_graph_ms']:.3f} ms = "
                     f"{e['float_graph_ms'] / e['hybrid_graph_ms']:.2f}x")
        else:
            line += "; CUDA graph: not run (no GPU)"
        out.append(line + f"; BOPs predict {r['bops']['predicted_speedup']:.2f}x")
    return out or ["end to end: no results"]


def transformer(work: Path) -> List[str]:
    """One line per row of bench/gpu/transformer.py: its check against the reference, and its
    time beside the float path where it was timed."""
    out = []
    for r in _jsonl(work.glob("transformer.jsonl")):
        check = "ok" if r["ok"] else "MISMATCH"
        if r["kind"] == "attention":
            line = f"attention {r['shape']} {r['dtype']}: {check} (max abs err {r['max_abs_err']:.2g})"
            if "triton_ms" in r:
                line += (f"; triton {r['triton_ms']:.3f} ms vs bf16 SDPA {r['sdpa_bf16_ms']:.3f} ms = "
                         f"{r['sdpa_bf16_ms'] / r['triton_ms']:.2f}x")
        else:
            line = f"linear {r['shape']} {r['backend']}: {check} (rel err {r['rel_err']:.2g})"
            if "hybrid_ms" in r:
                line += (f"; hybrid {r['hybrid_ms']:.3f} ms vs cuBLAS bf16 {r['cublas_bf16_ms']:.3f} ms = "
                         f"{r['cublas_bf16_ms'] / r['hybrid_ms']:.2f}x (torch._int_mm {r['int_mm_ms']:.3f} ms)")
        out.append(line)
    return out or ["transformers: no results"]


def sanitizers(work: Path) -> List[str]:
    """One line per tool: its processes' (shards') sanitizer summaries and case counts together."""
    out = []
    logs: Dict[str, List[str]] = defaultdict(list)
    for p in sorted(work.glob("sanitizer-*.log")):  # sanitizer-<tool>-<shard>.log
        logs[p.stem.split("-")[1]].append(p.read_text(errors="replace"))
    for tool, texts in logs.items():
        summ = [s[-1] for s in (re.findall(r"(?:ERROR|RACECHECK) SUMMARY: ([^\n]*)", t) for t in texts) if s]
        counts = [c[-1] for c in (re.findall(r"shard \S+: (\d+) passed, (\d+) failed", t) for t in texts) if c]
        shown = "; ".join(sorted(set(summ))) if summ else "no sanitizer summary"
        cases = (f"{sum(int(c[0]) for c in counts)} cases passed, {sum(int(c[1]) for c in counts)} failed"
                 if counts else "no result")
        out.append(f"sanitizer {tool}: {shown} ({len(summ)} of {len(texts)} processes finished); {cases}")
    dry = _jsonl(work.glob("sanitizer-dry-*.jsonl"))
    if dry:
        out.append(f"sanitizer subset without a sanitizer (dry run): {sum(r['ok'] for r in dry)} passed, "
                   f"{sum(not r['ok'] for r in dry)} failed")
    return out or ["sanitizers: no results"]


def summarize(work: Path) -> str:
    mode = (work / "mode").read_text().strip() if (work / "mode").exists() else "?"
    lines = [f"hybridops GPU suite ({mode}) | {_env_line(work)}"]
    st = work / "stages.tsv"
    lines.append(f"{'stage':<12} {'status':<10} {'s':>5} {'budget':>6}")
    for row in (st.read_text().splitlines() if st.exists() else []):
        name, status, secs, budget = row.split("\t")
        lines.append(f"{name:<12} {status:<10} {secs:>5} {budget:>6}")
    for part in (correctness, kernels, e2e, transformer, sanitizers):
        lines += part(work)
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
