"""pytest-benchmark suite at small sizes (any device) and checks of the benchmark harness.

On a CPU-only machine (CI) this runs the reference backend, so CI exercises the report and the
microbenchmark code paths; on a GPU the same tests time every available backend. Correctness is
asserted on every benchmarked result; performance goals live in the scripts' tables, not here.
"""
from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F

import hybridops as ho
from bench_kernels import bench_shape
from common import ConvShape, build_model
from hybridops.ops.packing import pack_codes, pack_weight
from speedup_report import format_table, run

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [b for b in ho.available_backends(DEVICE) if DEVICE.type == "cuda" or b == "torch"]
SMALL = [ConvShape("3x3", 2, 16, 12, 12, 24, 3, 1, 1), ConvShape("5x5s2", 1, 17, 15, 15, 8, 5, 2, 2),
         ConvShape("dw3x3", 1, 16, 10, 10, 16, 3, 1, 1, 1, 16)]


def _int_conv_oracle(a: torch.Tensor, w: torch.Tensor, s: ConvShape) -> torch.Tensor:
    """int64 convolution by unfold: an independent check of the accumulators (NHWC)."""
    g = s.groups
    cols = F.unfold(a.double(), s.k, s.dil, s.pad, s.stride).round().long()  # (N, C*K*K, L)
    n, _, length = cols.shape
    cols = cols.view(n, g, (s.c_in // g) * s.k * s.k, length)
    wg = w.long().view(g, s.c_out // g, -1)
    acc = torch.einsum("gok,ngkl->ngol", wg, cols).reshape(n, s.c_out, length)
    ho_ = (s.h + 2 * s.pad - s.dil * (s.k - 1) - 1) // s.stride + 1
    return acc.view(n, s.c_out, ho_, -1).permute(0, 2, 3, 1).to(torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SMALL, ids=lambda s: s.name)
def test_bench_qconv_accumulators(benchmark, shape, backend):
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 16, (shape.n, shape.c_in, shape.h, shape.w), generator=gen)
    w = torch.randint(-7, 8, (shape.c_out, shape.c_in // shape.groups, shape.k, shape.k), generator=gen)
    codes = pack_codes(a.permute(0, 2, 3, 1), 4).to(DEVICE)
    wp = pack_weight(w, 4).to(DEVICE)
    p = shape.pad
    acc = benchmark(lambda: ho.ops.qconv2d(codes, wp, shape.c_in, 4, False, 4, torch.ones(shape.c_out, device=DEVICE),
                                           None, [shape.stride] * 2, [p] * 4, [shape.dil] * 2, shape.groups, False,
                                           None, None, None, 4, False, torch.int32, backend))
    assert torch.equal(acc.cpu(), _int_conv_oracle(a, w, shape))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_quantize_activate(benchmark, backend):
    x = torch.randn(2, 33, 9, 11, device=DEVICE)
    qp = torch.tensor([0.4, 0.05], device=DEVICE)
    xs, codes = benchmark(lambda: ho.ops.quantize_activate(x, qp, 4, False, None, None, True,
                                                           torch.tensor([3, 0, 7], device=DEVICE), None, backend))
    ref_xs, ref_codes = ho.ops.reference.quantize_activate(x, qp, 4, False, relu=True,
                                                           keep_idx=torch.tensor([3, 0, 7], device=DEVICE))
    assert codes.shape == (2, 9, 11, 17) and torch.equal(codes, ref_codes)
    torch.testing.assert_close(xs, ref_xs, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_deployed_hybrid_layer(benchmark, backend):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 32, 3, padding=1).to(DEVICE)
    x = torch.relu(torch.randn(2, 16, 14, 14, device=DEVICE))
    hyb = ho.HybridConv2d.from_float(conv, keep=0.25)
    hyb.calibrate(x)
    hyb.eval()
    layer = ho.deploy_layer(hyb, backend)
    with torch.no_grad():
        y = benchmark(lambda: layer(x))
        expected = hyb(x)
    # Same arithmetic up to fp32 rounding of the scale folding (per-layer differences seen: <1e-6).
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_kernel_microbenchmark_rows_are_well_formed():
    rows = bench_shape(ConvShape("tiny", 1, 8, 8, 8, 8, 3, 1, 1), 4, 4, 0.25, torch.device("cpu"), ["torch"])
    providers = [r["provider"] for r in rows]
    assert providers == ["torch_fp32_cpu", "hybrid_torch", "qconv_torch", "quantact_torch"]
    for r in rows:
        assert r["ms"] > 0 and (r.get("tops", 0) > 0 or r.get("gbs", 0) > 0)
    assert rows[0]["speedup_vs_bf16"] == pytest.approx(1.0)


def test_speedup_report_on_cpu(tmp_path):
    cfg = ho.HybridConfig(keep=0.25)
    result = run("tiny", 1, 16, cfg, "torch", tmp_path, plot=True, device="cpu")
    n_layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in build_model("tiny").modules())
    assert len(result["layers"]) == n_layers
    assert result["backends"] == ["torch"] and result["baseline"] == "PyTorch fp32 on the CPU"
    assert 0 < result["bops"]["rc"] < 1
    for r in result["layers"]:
        assert r["float_ms"] > 0 and r["hybrid_ms"] > 0
        assert r["predicted_speedup"] == pytest.approx(1 / r["rc_hybrid"])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["environment"]["device"] == "cpu" and saved["layers"] == result["layers"]
    with open(tmp_path / "layers.csv") as f:
        assert len(list(csv.DictReader(f))) == n_layers
    assert (tmp_path / "speedup.png").stat().st_size > 1000
    table = format_table(result)
    assert "reference backend" in table and "end to end" in table
