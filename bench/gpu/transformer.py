"""The GPU suite's transformer stage: the quantized-attention op and the hybrid ``Linear`` on the
GPU, each checked against the reference and timed beside what a user would otherwise run
(bf16 ``F.scaled_dot_product_attention``; cuBLAS bf16 ``F.linear``, ``torch._int_mm``).
Rows go to ``<out>/transformer.jsonl``; ``bench/gpu/summarize.py`` prints them.

    python bench/gpu/transformer.py --out DIR          # on a GPU
    python bench/gpu/transformer.py --out DIR --dry    # the wiring on the CPU (TRITON_INTERPRET=1, tiny shapes)
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from common import time_ms

import hybridops as ho
from hybridops.ops import reference as R
from hybridops.quant import qparams

# (name, heads, Lq, Lk, head_dim): ViT-B/16 at 224 px; TransT's search-to-template, template-to-
# search and search self-attention
ATTENTION = [("vit_b", 12, 197, 197, 64), ("transt_s2t", 8, 1024, 256, 32), ("transt_t2s", 8, 256, 1024, 32),
             ("transt_self", 8, 1024, 1024, 32)]
# ViT-B's Linear layers at 197 tokens per image: (in, out)
LINEAR = [(768, 768), (768, 3072), (3072, 768)]


def _emit(out: Path, row: dict) -> None:
    with open(out / "transformer.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(row, flush=True)


def attention_rows(out: Path, dev: torch.device, dry: bool) -> None:
    # the interpreter's bf16 is not exact; fp32 there checks the wiring
    dt = torch.float32 if dry else torch.bfloat16
    shapes = [("tiny", 2, 16, 24, 32)] if dry else ATTENTION
    qp = qparams(torch.tensor(0.5), torch.tensor(0.5)).to(dev)
    clip = torch.tensor(1.0, device=dev)
    for name, h, lq, lk, d in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(1, h, n, d, generator=g, device=dev).to(dt) for n in (lq, lk, lk))
        args = (q, k, v, qp, qp, qp, clip, clip, clip, 6, None, False, None)
        got = torch.ops.hybridops.quantized_attention(*args, "triton")
        ref = R.quantized_attention(*args)
        err = float((got.float() - ref.float()).abs().max())
        row = dict(kind="attention", shape=f"{name} {h}x{lq}x{lk}x{d}", dtype=str(dt)[6:], max_abs_err=err,
                   ok=err <= (1e-4 if dt == torch.float32 else 3e-2))
        if not dry:
            row["triton_ms"] = time_ms(lambda: torch.ops.hybridops.quantized_attention(*args, "triton"), dev)
            row["sdpa_bf16_ms"] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), dev)
        _emit(out, row)


def linear_rows(out: Path, dev: torch.device, dry: bool) -> None:
    shapes = [(64, 48)] if dry else LINEAR
    batches = [1] if dry else [1, 16]
    backends = [b for b in ("triton", "cuda") if b in ho.available_backends(dev)]
    for c_in, c_out in shapes:
        for batch in batches:
            torch.manual_seed(0)
            rows = 8 if dry else 197
            x = torch.randn(batch, rows, c_in, device=dev)
            float_model = nn.Sequential(nn.Linear(c_in, c_out)).to(dev)
            trained = nn.Sequential(nn.Linear(c_in, c_out)).to(dev)
            trained.load_state_dict(float_model.state_dict())
            ho.hybridize_(trained, ho.HybridConfig(bits_w=4, bits_a=4, keep=0.1, fp_first_input=False),
                          example_inputs=x)
            trained.eval()
            with torch.no_grad():
                ref = trained(x)
            for backend in backends:
                dep = ho.deploy_(copy.deepcopy(trained), backend=backend)
                with torch.no_grad():
                    y = dep(x)
                    err = float(((y - ref).abs().max() / ref.abs().max().clamp_min(1e-6)))
                    row = dict(kind="linear", shape=f"{batch}x{rows}x{c_in}->{c_out}", backend=backend,
                               rel_err=err, ok=err <= 1e-4)
                    if not dry:
                        xb, wb = x.to(torch.bfloat16), float_model[0].weight.to(torch.bfloat16)
                        a8 = torch.randint(-7, 8, (batch * rows, c_in), dtype=torch.int8, device=dev)
                        b8 = torch.randint(-7, 8, (c_in, c_out), dtype=torch.int8, device=dev)
                        row["hybrid_ms"] = time_ms(lambda: dep(x), dev)
                        row["cublas_bf16_ms"] = time_ms(lambda: F.linear(xb, wb), dev)
                        row["int_mm_ms"] = time_ms(lambda: torch._int_mm(a8, b8), dev)
                _emit(out, row)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu" if a.dry else "cuda")
    attention_rows(a.out, dev, a.dry)
    linear_rows(a.out, dev, a.dry)
    rows = [json.loads(ln) for ln in (a.out / "transformer.jsonl").read_text().splitlines()]
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
