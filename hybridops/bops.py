"""Bit operations (eq 17) per layer and in total, counted from real output shapes.

For one layer and one output position::

    BOPs = C_in * C_out * K^2 * (b_a * b_w + b_a + b_w + log2(C_in * K^2))

with ``C_in`` the input channels one output reads (``C_in / groups``), full precision counted
as 32 bits. A layer's total multiplies by its output positions (``N * H_out * W_out`` for a
conv; the number of rows for a linear layer), taken from a real forward pass. A hybrid layer
costs its quantized branch plus its pruned branch with the pruned branch's real (kept) ``C_in``
and ``C_out``. ``RC = hybrid BOPs / baseline BOPs``, the baseline being the same layer at 32/32
bits with every channel.

The two products of an attention module the conversion rewrote (:class:`hybridops.attention.
AttentionProducts`) count as two rows, ``<name>.qk`` and ``<name>.pv``, by the same formula: per
query row and head, ``Q K^T`` reads ``head_dim`` inputs for each of ``L_k`` outputs (``b x b``
bits when quantized) and ``P V`` reads ``L_k`` probabilities (32 bits) for each of ``head_dim``
outputs against V (``b`` bits when quantized). Float ones run in full precision (like a float
layer); a float ``nn.MultiheadAttention`` is counted through its float rewrite (its projections
as four linear layers and its two products). docs/attention.md compares this with the paper's "att 6/32".
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .attention import AttentionProducts, HybridMultiheadAttention, rewrite_reason
from .deployed import DeployedConv2d, DeployedLinear
from .thin import full_width_
from .layers import HYBRID_LAYERS, LINEAR_LAYERS, PRUNED_LAYERS, QUANT_LAYERS

FP_BITS = 32


def layer_bops(c_in: int, c_out: int, k2: int, bits_a: int, bits_w: int) -> float:
    """eq 17 for one output position; 0 when either channel count is 0."""
    if c_in <= 0 or c_out <= 0:
        return 0.0
    return c_in * c_out * k2 * (bits_a * bits_w + bits_a + bits_w + math.log2(c_in * k2))


@dataclass
class LayerBops:
    """One row of :class:`BopsReport`. BOPs are totals over the forward pass. ``pruned_c_in`` /
    ``pruned_c_out``: channels the full-precision branch reads / keeps; for a network of several
    pruned copies (PP) the kept channels are summed over the copies (so they can exceed ``c_out``)
    and ``pruned_c_in`` is the widest copy's."""

    name: str
    kind: str
    bits_a: Optional[int]
    bits_w: Optional[int]
    c_in: int
    c_out: int
    k2: int
    positions: int
    pruned_c_in: int
    pruned_c_out: int
    baseline: float
    quant: float
    pruned: float

    @property
    def hybrid(self) -> float:
        return self.quant + self.pruned

    @property
    def rc_quant(self) -> float:
        return self.quant / self.baseline if self.baseline else 0.0

    @property
    def rc_prune(self) -> float:
        return self.pruned / self.baseline if self.baseline else 0.0

    @property
    def rc_hybrid(self) -> float:
        return self.hybrid / self.baseline if self.baseline else 0.0


@dataclass
class BopsReport:
    """Per-layer and total BOPs; ``str()`` is a table in the style of the paper's Table 1."""

    input_shape: Sequence[int]
    layers: List[LayerBops]

    @property
    def baseline(self) -> float:
        return sum(r.baseline for r in self.layers)

    @property
    def quant(self) -> float:
        return sum(r.quant for r in self.layers)

    @property
    def pruned(self) -> float:
        return sum(r.pruned for r in self.layers)

    @property
    def hybrid(self) -> float:
        return sum(r.hybrid for r in self.layers)

    @property
    def rc(self) -> float:
        """Total RC: hybrid BOPs / baseline BOPs."""
        return self.hybrid / self.baseline if self.baseline else 0.0

    def to_dict(self) -> Dict:
        return {"input_shape": list(self.input_shape), "baseline_bops": self.baseline, "hybrid_bops": self.hybrid,
                "rc": self.rc,
                "layers": [dict(asdict(r), hybrid=r.hybrid, rc_quant=r.rc_quant, rc_prune=r.rc_prune,
                                rc_hybrid=r.rc_hybrid) for r in self.layers]}

    def __str__(self) -> str:
        head = f"{'layer':<34} {'kind':<8} {'bits A/W':>8} {'ratio':>7} {'RC_prune':>9} {'RC_quant':>9} {'RC_hybrid':>10}"
        lines = [f"BOPs (eq 17) for input {tuple(self.input_shape)}", head, "-" * len(head)]
        base = self.baseline or 1.0
        for r in self.layers:
            bits = f"{r.bits_a if r.bits_a is not None else '-'}/{r.bits_w if r.bits_w is not None else '-'}"
            lines.append(f"{r.name[:34]:<34} {r.kind:<8} {bits:>8} {r.baseline / base:>7.3f} {r.rc_prune:>9.3f} "
                         f"{r.rc_quant:>9.3f} {r.rc_hybrid:>10.3f}")
        lines.append("-" * len(head))
        lines.append(f"total: baseline {self.baseline:.4g} BOPs, hybrid {self.hybrid:.4g} BOPs "
                     f"(quantized {self.quant:.4g}, pruned {self.pruned:.4g}), RC = {self.rc:.3f}")
        return "\n".join(lines)


def _describe(m: nn.Module):
    """(kind, c_in/g, c_out, k2, quant bits (a, w) or None, pruned (c_in, c_out) or None), or None
    for modules that are not counted."""
    if isinstance(m, HYBRID_LAYERS):
        q, p = m.quant, m.pruned
        geo = _geometry(q)
        kept = int(p.gate.kept_mask().sum())
        return ("hybrid",) + geo + ((q.aq.bits if q.aq is not None else FP_BITS, q.wq.bits), (geo[0], kept))
    if isinstance(m, QUANT_LAYERS):
        return ("quant",) + _geometry(m) + ((m.aq.bits if m.aq is not None else FP_BITS, m.wq.bits), None)
    if isinstance(m, PRUNED_LAYERS):
        geo = _geometry(m)
        gate = getattr(m, "input_gate", None)  # set by HybridNetwork where pruning compounds
        c_in = int(gate.kept_mask().sum()) if gate is not None else geo[0]
        return ("pruned",) + geo + (None, (c_in, int(m.gate.kept_mask().sum())))
    if isinstance(m, (DeployedConv2d, DeployedLinear)):
        conv = isinstance(m, DeployedConv2d)
        g = m.groups if conv else 1
        k2 = m.kernel_size[0] * m.kernel_size[1] if conv else 1
        c_in_g = m.in_channels // g
        quant = None
        if m.has_quant:
            quant = (m.bits_a if m.quantized_input else FP_BITS, m.bits_w)
        p_in = int(m.fp_in_idx.numel()) if (m.fp_in_idx is not None and g == 1) else c_in_g
        kind = "hybrid" if (m.has_quant and m.kept_channels) else ("quant" if m.has_quant else "pruned")
        return (kind, c_in_g, m.out_channels, k2, quant, (p_in, m.kept_channels))
    if type(m) is nn.Conv2d:
        return ("float", m.in_channels // m.groups, m.out_channels, m.kernel_size[0] * m.kernel_size[1], None, None)
    if type(m) is nn.Linear:
        return ("float", m.in_features, m.out_features, 1, None, None)
    return None


def _geometry(m):
    if hasattr(m, "kernel_size"):
        return (m.in_channels // m.groups, m.out_channels, m.kernel_size[0] * m.kernel_size[1])
    return (m.in_features, m.out_features, 1)




def _float_attention_as_layers_(model: nn.Module) -> None:
    """Replace each float ``nn.MultiheadAttention`` by its float rewrite (the same computation with
    its projections as ``nn.Linear`` and its products in :class:`AttentionProducts`), so that a
    float model's projections and products are counted as its converted form's are: the fused
    ``in_proj_weight`` is no layer and ``out_proj`` is not a plain ``nn.Linear``."""
    for name, m in list(model.named_modules()):
        if type(m) is nn.MultiheadAttention and rewrite_reason(m) is None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, HybridMultiheadAttention.from_float(m))


def count_bops(model: nn.Module, input_shape: Sequence[int], device=None, dtype=torch.float32) -> BopsReport:
    """Run ``model`` once on a random input of ``input_shape`` (on a copy, so lazy calibration
    and gate state of ``model`` are untouched) and count every conv / linear layer's BOPs, and the
    attention products (a float ``nn.MultiheadAttention`` counted through its float rewrite).

    Layers of a :class:`hybridops.HybridNetwork` are merged by name: ``branches.0.X`` and
    ``branches.1.X`` become one row ``X`` whose BOPs are the sum of both copies' (so a QQ or PP
    network's RC counts both branches against one baseline).
    """
    probe = copy.deepcopy(model).eval()
    full_width_(probe)  # the layers' hooks below count; a thin pruned network's forward skips them
    _float_attention_as_layers_(probe)
    if device is None:
        p = next(probe.parameters(), None)
        device = p.device if p is not None else "cpu"
    rows: Dict[str, LayerBops] = {}
    order: List[str] = []
    hooks = []

    def hook_for(name: str, desc, linear: bool):
        def hook(mod, inp, out):
            kind, c_in, c_out, k2, qbits, pruned = desc
            # A conv's output channels are NCHW's axis 1; a linear layer's are the last axis, whatever
            # the rank (a Linear on channels-last (N, H, W, C) input has N*H*W positions).
            positions = out.numel() // max(1, out.shape[-1] if linear else out.shape[1])
            key = name
            for prefix in branch_prefixes:
                m = prefix.match(name)
                if m:
                    key = name[:m.start(1)] + name[m.end(1):]
                    break
            base = layer_bops(c_in, c_out, k2, FP_BITS, FP_BITS) * positions
            q = layer_bops(c_in, c_out, k2, qbits[0], qbits[1]) * positions if qbits else 0.0
            pr = layer_bops(pruned[0], pruned[1], k2, FP_BITS, FP_BITS) * positions if pruned else 0.0
            if kind == "float":
                pr = base  # an unconverted layer runs in full precision with every channel
            if key in rows:  # the other half of a network-level pair
                r = rows[key]
                r.quant, r.pruned = r.quant + q, r.pruned + pr
                r.kind = "hybrid" if (r.quant and r.pruned) else r.kind
                r.bits_a = r.bits_a if r.bits_a is not None else (qbits[0] if qbits else None)
                r.bits_w = r.bits_w if r.bits_w is not None else (qbits[1] if qbits else None)
                if pruned:  # a second pruned copy (PP): its kept channels add to the row's
                    r.pruned_c_in, r.pruned_c_out = max(r.pruned_c_in, pruned[0]), r.pruned_c_out + pruned[1]
                return
            rows[key] = LayerBops(key, kind, qbits[0] if qbits else (FP_BITS if kind == "float" else None),
                                  qbits[1] if qbits else (FP_BITS if kind == "float" else None), c_in, c_out, k2,
                                  positions, pruned[0] if pruned else 0, pruned[1] if pruned else 0, base, q, pr)
            order.append(key)
        return hook

    # Modules that sum copies of one backbone (hybridops.HybridNetwork, marked by sums_branches)
    # hold them in ``branches``: "<net>.branches.<i>.<layer>" rows merge into "<net>.<layer>".
    branch_prefixes = [re.compile("^" + re.escape(n + "." if n else "") + r"(branches\.\d+\.)")
                       for n, m in probe.named_modules() if getattr(m, "sums_branches", False)]
    inside_hybrid = set()
    for name, m in probe.named_modules():
        if id(m) in inside_hybrid:
            continue
        if isinstance(m, HYBRID_LAYERS):
            inside_hybrid.update(id(sub) for sub in m.modules() if sub is not m)
        desc = _describe(m)
        if desc is not None:
            linear = isinstance(m, (nn.Linear, DeployedLinear) + LINEAR_LAYERS)
            hooks.append(m.register_forward_hook(hook_for(name, desc, linear)))
    def attention_hook(name: str):
        def hook(mod, inp, out):
            q, k, v = inp[:3]
            positions = q.numel() // q.shape[-1]  # one per query row and head
            d, lk, dv = q.shape[-1], k.shape[-2], v.shape[-1]
            # Q K^T: a query row against every key (b x b bits when quantized); P V: the row's
            # probabilities (32 bits) against V (b bits when V is quantized)
            for suffix, c_in, c_out, bits in ((".qk", d, lk, (mod.bits, mod.bits) if mod.quantized else None),
                                              (".pv", lk, dv, (FP_BITS, mod.bits) if mod.quantized else None)):
                base = layer_bops(c_in, c_out, 1, FP_BITS, FP_BITS) * positions
                q_bops = layer_bops(c_in, c_out, 1, *bits) * positions if bits else 0.0
                key = name + suffix
                if key in rows:  # called again in the same forward (weights shared): add up
                    r = rows[key]
                    r.positions += positions
                    r.baseline, r.quant = r.baseline + base, r.quant + q_bops
                    r.pruned += 0.0 if bits else base
                    continue
                rows[key] = LayerBops(key, "att" if bits else "float", bits[0] if bits else FP_BITS,
                                      bits[1] if bits else FP_BITS, c_in, c_out, 1, positions, 0, 0, base, q_bops,
                                      0.0 if bits else base)
                order.append(key)
        return hook

    for name, m in probe.named_modules():
        if isinstance(m, AttentionProducts):
            hooks.append(m.register_forward_hook(attention_hook(name)))
    with torch.no_grad():
        probe(torch.randn(*input_shape, device=device, dtype=dtype))
    for h in hooks:
        h.remove()
    return BopsReport(tuple(input_shape), [rows[k] for k in order])


def bops_report(model: nn.Module, input_shape: Sequence[int] = (1, 3, 224, 224), **kwargs) -> BopsReport:
    """:func:`count_bops`; print the result for the Table-1-style table."""
    return count_bops(model, input_shape, **kwargs)
