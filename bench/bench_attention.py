"""``hybridops::quantized_attention`` on the CPU (onednn backend) against
``F.scaled_dot_product_attention``, batch 1, at ViT-B and TransT shapes (docs/attention.md).

    python bench/bench_attention.py            # 1 and 2 threads, fp32 and bf16, every shape
    python bench/bench_attention.py --quick    # 2 threads, ViT-B only

Rows: SDPA in the input dtype (fp32 and bf16), the op with V quantized (the issue's op: 4-bit
Q, K, V codes) and with V float, each through ``torch.ops.hybridops`` as a module would call it,
and the onednn path split into its passes (codes, integer scores, scale + softmax, P @ V), each
timed on one cache-sized group of heads as the op runs them. Every
path is timed in the same process after a check that the op equals the reference: the best of
``ROUNDS`` medians (``torch.utils.benchmark``), because a second process on a 2-core machine
multiplies a 2-thread time by up to 100 (OpenMP barriers waiting on a descheduled thread), and
more for the op's many small parallel regions than for SDPA's one. Writes
``bench/results/attention/attention_<isa>.md``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hybridops  # noqa: E402,F401  (registers the ops)
import hybridops.kernels.onednn as O  # noqa: E402
import hybridops.kernels.onednn_attention as OA  # noqa: E402
from common import cpu_model, environment, time_ms  # noqa: E402
from hybridops.ops import reference as R  # noqa: E402
from hybridops.quant import qparams  # noqa: E402

OUT = Path(__file__).parent / "results" / "attention"
# (name, heads, Lq, Lk, head dim): ViT-B/16 at 224 px; TransT's fusion (8 heads x 32): the
# cross-attention of the 1024 search tokens on the 256 template tokens and back, and the
# self-attention of the search tokens
SHAPES = [("vit_b", 12, 197, 197, 64), ("transt_cross_s2t", 8, 1024, 256, 32),
          ("transt_cross_t2s", 8, 256, 1024, 32), ("transt_self_s", 8, 1024, 1024, 32)]
BITS = 4
ROUNDS = 5


def _best_ms(fn, device) -> float:
    return min(time_ms(fn, device) for _ in range(ROUNDS))


def _inputs(h, lq, lk, d, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, generator=g).to(dtype) for n in (lq, lk, lk))
    qp = qparams(torch.tensor(1.0), torch.tensor(1.0))
    return q, k, v, qp, torch.tensor(2.0)


def _passes(q, k, v, qp, clip):
    """The onednn path's passes at these shapes (V has Q's head dim, so the flash path of
    kernels/onednn_attention.py), each timed alone: ``[(pass, fn)]``."""
    s_qk, step_v = R.attention_scales(clip, clip, clip, BITS, None, q.shape[-1], torch.float32)
    dt = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
    cq, ck, cv = (OA.codes(t, qp, BITS).to(dt) for t in (q, k, v))
    return [("codes of q, k, v (and their cast)", lambda: [OA.codes(t, qp, BITS).to(dt) for t in (q, k, v)]),
            (f"flash attention kernel on the codes ({str(dt)[6:]})", lambda: OA._flash(cq, ck, cv, s_qk, None, False)),
            ("times step_v", lambda: torch.mul(OA._flash(cq, ck, cv, s_qk, None, False), step_v))]


def bench(threads: List[int], dtypes, shapes) -> List[str]:
    ops = torch.ops.hybridops
    env = environment()
    lines = [f"# Quantized attention on the CPU, batch 1, best of {ROUNDS} medians ({env['date'][:10]}, "
             f"torch {env['torch']}, {cpu_model()}, oneDNN ISA {O.isa()})", "",
             "Command: `python bench/bench_attention.py`. The op: `torch.ops.hybridops.quantized_attention(..., "
             f"backend='onednn')`, {BITS}-bit codes, no mask. `torch._int_mm` exact on this CPU: "
             f"{OA.int_mm_exact()}.", "",
             "| shape (heads x Lq x Lk x D) | dtype | threads | SDPA ms | op, V codes ms | op, V float ms | "
             "SDPA / op (V codes) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    breakdown = ["", f"Where the op's time goes on its flash path (Lq * Lk >= {OA.FLASH_MIN_SCORES}; shorter sequences "
                     f"take the grouped path): its passes timed alone ('times step_v' includes the kernel it "
                     f"scales), {threads[-1]} threads:", "",
                 "| shape | dtype | pass | ms |", "| --- | --- | --- | --- |"]
    for name, h, lq, lk, d in shapes:
        for dtype in dtypes:
            q, k, v, qp, clip = _inputs(h, lq, lk, d, dtype)
            codes_args = (q, k, v, qp, qp, qp, clip, clip, clip, BITS, None, False, None)
            float_args = (q, k, v, qp, qp, None, clip, clip, None, BITS, None, False, None)
            torch.testing.assert_close(ops.quantized_attention(*codes_args, "onednn").float(),
                                       R.quantized_attention(*codes_args).float(), rtol=2e-2, atol=2e-2)
            for t in threads:
                torch.set_num_threads(t)
                sdpa = _best_ms(lambda: F.scaled_dot_product_attention(q, k, v), q.device)
                op_codes = _best_ms(lambda: ops.quantized_attention(*codes_args, "onednn"), q.device)
                op_float = _best_ms(lambda: ops.quantized_attention(*float_args, "onednn"), q.device)
                lines.append(f"| {name} ({h}x{lq}x{lk}x{d}) | {str(dtype)[6:]} | {t} | {sdpa:.3f} | {op_codes:.3f} | "
                             f"{op_float:.3f} | {sdpa / op_codes:.2f}x |")
            if lq * lk < OA.FLASH_MIN_SCORES:  # the grouped path: no breakdown of its passes here
                continue
            for what, fn in _passes(q, k, v, qp, clip):
                breakdown.append(f"| {name} | {str(dtype)[6:]} | {what} | {_best_ms(fn, q.device):.3f} |")
    return lines + breakdown


def main(argv: Optional[List[str]] = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 threads, ViT-B only")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    threads = [2] if a.quick else [1, 2]
    shapes = SHAPES[:1] if a.quick else SHAPES
    lines = bench(threads, (torch.float32, torch.bfloat16), shapes)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"attention_{O.isa().split(':')[-1].split()[0]}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


if __name__ == "__main__":
    main()
