"""Soak: resident memory of a deployed model over many calls at many input shapes (CPU).

    python bench/bench_soak.py [--calls 10000] [--shapes 50] [--threads 2]

A deployed ResNet-18 (4/4 bits, keep 0.25, the CPU's default backend) is called ``--calls`` times,
cycling over ``--shapes`` input shapes (batch 1-2, sides 32-128), so its derived tensors (oneDNN
weights packed per input shape, kernels/derived.py) are made, evicted and made again the whole
time. Resident memory (``/proc/self/statm``) is sampled every 500 calls; once the caches are warm
(after the first two passes over the shapes) it must stay flat. Writes
bench/results/soak/soak.md and soak.json.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torchvision
from common import environment
from tqdm import tqdm

import hybridops as ho
from hybridops.kernels import derived

OUT = Path(__file__).parent / "results" / "soak"


def rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=10000)
    ap.add_argument("--shapes", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    backend = ho.resolve_backend("auto", "cpu")
    model = torchvision.models.resnet18(num_classes=10).eval()
    ho.hybridize_(model, ho.HybridConfig(keep=0.25), example_inputs=torch.randn(2, 3, 64, 64))
    ho.deploy_(model, backend)
    shapes = [(1 + i % 2, 3, 32 + 2 * (i % 49), 32 + 4 * (i % 25)) for i in range(a.shapes)]
    inputs = [torch.randn(*s) for s in shapes]
    warm = 2 * a.shapes
    samples = []
    with torch.no_grad():
        for i in tqdm(range(a.calls), desc="soak", mininterval=5):
            model(inputs[i % a.shapes])
            if (i + 1) % 500 == 0 or i + 1 in (warm, a.calls):
                samples.append({"calls": i + 1, "rss_mib": rss_mib(), "cache_entries": derived.size()})
    after_warm = [s for s in samples if s["calls"] >= warm]
    first, last = after_warm[0], after_warm[-1]
    peak = max(s["rss_mib"] for s in after_warm)
    res = {"env": {**environment(), "backend": backend, "threads": a.threads}, "calls": a.calls, "shapes": a.shapes,
           "samples": samples, "rss_after_warm_mib": first["rss_mib"], "rss_end_mib": last["rss_mib"],
           "rss_peak_after_warm_mib": peak}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "soak.json").write_text(json.dumps(res, indent=1))
    lines = [f"# Soak: deployed ResNet-18, {a.calls} calls over {a.shapes} input shapes ({res['env']['date']}, "
             f"backend `{backend}`, {a.threads} threads, torch {res['env']['torch']})", "",
             f"Resident memory once the caches are warm (after {warm} calls): {first['rss_mib']:.0f} MiB; "
             f"at the end: {last['rss_mib']:.0f} MiB ({last['rss_mib'] - first['rss_mib']:+.1f} MiB); peak after "
             f"warm-up: {peak:.0f} MiB.", "",
             "| calls | RSS (MiB) | derived-cache entries |", "| --- | --- | --- |"]
    lines += [f"| {s['calls']} | {s['rss_mib']:.1f} | {s['cache_entries']} |" for s in samples]
    (OUT / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:3]))


if __name__ == "__main__":
    main()
