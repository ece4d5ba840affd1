"""Hybridisation of the tracker through the public :mod:`hybridops` API.

Variants (the paper's Tables 2 and 6):

==============  ======================================================================
``float``       the float SiamRPN++ (baseline)
``hybrid``      Q+N+P: quantized + pruned-FP branches, normalisation regularisers on
``hybrid_qp``   Q+P: hybrid without the eq 10-12 normalisation (``normalize=False``)
``quant_qn``    Q+N: quantized-only (``hybridize_`` with a ``QuantConfig``)
==============  ======================================================================

"Hybrid + online update" is the ``hybrid`` model tracked with an ``OnlineConfig``.

Scope of the conversion (``scope``), SiamRPN++:

* ``"backbone"`` (default, the paper's HybSiamRPN++): every conv of the ResNet-50 backbone, plus
  the last 1x1 conv of each classification head, so that the online update has an FP branch to
  train (paper Fig. 1). Adjust layers and the rest of the RPN heads stay float.
* ``"all"``: every conv of the tracker. The heads' first 3x3 convs read the adjust layers' BN
  output, which is signed; hybridops calibrates a signed activation quantizer for them.

The backbone's first conv keeps its image input in full precision (``fp_first_input``).

TransT (:class:`~.transt.TransT`, the paper's HybTransT):

* ``"all"`` (default): every conv of the backbone but the first, which stays float as in the
  paper, the input projection, every Linear of the fusion network (the attention projections,
  ``nn.MultiheadAttention`` rewritten by hybridops, and the FFNs) and of both heads, with the
  attention products' Q, K and V quantized to 6 bits (``bits_attention``, the
  ``hybridops::quantized_attention`` op once deployed).
* ``"backbone"``: the backbone (first conv float) and the classifier's last Linear.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import hybridops as ho

from .transt import TransT

# Each hybrid variant: the config type hybridops.hybridize_ dispatches on, and eq 10-12 on/off.
VARIANTS: Dict[str, Optional[dict]] = {
    "float": None,
    "hybrid": {"normalize": True, "config": ho.HybridConfig},
    "hybrid_qp": {"normalize": False, "config": ho.HybridConfig},
    "quant_qn": {"normalize": True, "config": ho.QuantConfig},
}

LABELS = {
    "float": "float",
    "hybrid": "hybrid Q+N+P",
    "hybrid_qp": "hybrid Q+P (no normalisation)",
    "quant_qn": "quantized-only Q+N",
    "hybrid_online": "hybrid Q+N+P + online update",
}

SCOPES = ("backbone", "all")


# The paper's HybTransT quantizes the activations of every attention product to 6 bits.
TRANST_BITS_ATTENTION = 6


def is_transt(model: nn.Module) -> bool:
    return isinstance(model, TransT)


def default_scope(model: nn.Module) -> str:
    """``"all"`` for TransT (HybTransT), ``"backbone"`` for SiamRPN++ (HybSiamRPN++)."""
    return "all" if is_transt(model) else "backbone"


def filter_for(scope: str, transt: bool = False) -> Callable[[nn.Module, str], bool]:
    """``filter_fn(module, name)`` for :func:`hybridops.hybridize_` that selects ``scope`` of a
    SiamRPN++ or (``transt``) a TransT model."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}.")
    if transt:
        if scope == "all":
            return lambda module, name: name != "backbone.conv1"
        return lambda module, name: (name.startswith("backbone.") and name != "backbone.conv1") or \
            name == "class_embed.layers.2"
    if scope == "all":
        return lambda module, name: True
    return lambda module, name: name.startswith("backbone.") or (".cls.head." in name and name.endswith(".3"))


def hybrid_config(variant: str, transt: bool = False, **overrides):
    """The conversion config of ``variant``: :class:`hybridops.HybridConfig` (4-bit W/A, keep
    0.25 by default) or, for ``quant_qn``, :class:`hybridops.QuantConfig` (4-bit W/A). For TransT
    (``transt``) also 6-bit attention products, and no full-precision first input (its first conv
    is not converted at all)."""
    if VARIANTS.get(variant) is None:
        raise ValueError(f"variant {variant!r} is not hybrid; choose one of "
                         f"{[k for k, v in VARIANTS.items() if v]}.")
    spec = VARIANTS[variant]
    kw = {"bits_w": 4, "bits_a": 4, "normalize": spec["normalize"]}
    if transt:
        kw.update(bits_attention=TRANST_BITS_ATTENTION, fp_first_input=False)
    if spec["config"] is ho.HybridConfig:
        kw["keep"] = 0.25
    kw.update(overrides)
    return spec["config"](**kw)


def hybridize_tracker(model: nn.Module, variant: str, example_inputs: Optional[Tuple[torch.Tensor, ...]] = None,
                      scope: Optional[str] = None, **config_overrides):
    """Convert ``model`` (SiamRPN++ or TransT) in place to ``variant``; returns hybridize_'s
    ``ConversionReport``. ``scope`` None: :func:`default_scope`.

    ``example_inputs = (z, x)`` template/search batches calibrate the quantizers now; without
    them each layer calibrates on its first forward (or a checkpoint's state is loaded later).
    """
    transt = is_transt(model)
    cfg = hybrid_config(variant, transt=transt, **config_overrides)
    scope = scope or default_scope(model)
    return ho.hybridize_(model, cfg, filter_fn=filter_for(scope, transt), example_inputs=example_inputs)


def regularization(model: nn.Module, lambda_quant: float, lambda_prune: float) -> torch.Tensor:
    """``lambda_1 L_quant + lambda_2 L_prune`` of a hybrid model (eq 16 minus the task loss)."""
    return ho.regularization(model, lambda_quant=lambda_quant, lambda_prune=lambda_prune)


def deploy(model: nn.Module, backend: str = "auto", fp_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Pack integer weights and slice pruned channels in place (:func:`hybridops.deploy_`, its
    ``fp_dtype`` for the FP branches), with the deploy-time BatchNorm/ReLU fusion in the backbone.

    The backbone is deployed on its own first: the Siamese ``forward(z, x)`` calls every backbone
    layer twice (template and search), and deploy_ fuses only layers called once, so deploying
    the whole model would leave every BatchNorm as a separate pass. The second call deploys the
    rest (SiamRPN++'s converted head layers; TransT's input projection, fusion network and heads)
    and skips what is already deployed."""
    ho.deploy_(model.backbone, backend=backend, fp_dtype=fp_dtype)
    ho.deploy_(model, backend=backend, fp_dtype=fp_dtype)
    return model


def online_parameters(model: nn.Module) -> List[nn.Parameter]:
    """FP-branch parameters of the classifier's last layers (``model.last_cls_layers()``: the last
    1x1 conv of every SiamRPN++ classification head, TransT's last classifier Linear).

    Freezes the whole model first (:func:`hybridops.freeze_quantized_` for the quantized parts,
    then everything else) so that exactly these parameters require grad.
    """
    layers = model.last_cls_layers()
    plain = [l for l in layers if type(l) in (nn.Conv2d, nn.Linear)]
    if plain:
        raise ValueError("online update needs a hybrid model: the last classification layers are plain "
                         f"{type(plain[0]).__name__} (hybridize the tracker first).")
    ho.freeze_quantized_(model)
    params = [p for l in layers for p in ho.fp_parameters(l)]
    if not params:
        raise ValueError("the last classification layers have no full-precision parameters to update.")
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return params


def clone(model: nn.Module) -> nn.Module:
    """Deep copy of a (possibly trained hybrid) tracker model, without its template cache (the
    model itself keeps its own)."""
    zf, model.zf = model.zf, None
    try:
        return copy.deepcopy(model)
    finally:
        model.zf = zf


# The paper's Table 1 parts: (column, the layer-name prefixes it sums). TransT's fusion network
# and input projection are its "att" column, the two MLP heads "pred".
TABLE1_PARTS = {
    "transt": (("conv1", ("backbone.conv1",)), ("layer1", ("backbone.layer1",)), ("layer2", ("backbone.layer2",)),
               ("layer3", ("backbone.layer3",)), ("att", ("input_proj", "featurefusion_network")),
               ("pred", ("class_embed", "bbox_embed"))),
    "siamrpn": (("conv1", ("backbone.conv1",)), ("layer1", ("backbone.layer1",)), ("layer2", ("backbone.layer2",)),
                ("layer3", ("backbone.layer3",)), ("layer4", ("backbone.layer4",)), ("neck", ("neck",)),
                ("rpn", ("rpn",))),
}


def tracking_bops(model: nn.Module) -> ho.BopsReport:
    """BOPs (eq 17) of one tracked frame, as :func:`hybridops.bops_report` counts them: the search
    crop's backbone and everything after it, the template's features cached (computed from a random
    template before counting)."""
    cfg = model.config
    model = clone(model).eval()  # the template's forward must not touch the model's BN statistics
    device = next(model.parameters()).device
    z = torch.rand(1, 3, cfg.exemplar_size, cfg.exemplar_size, device=device) * 255
    return ho.bops_report(model.tracking_step(z), (1, 3, cfg.instance_size, cfg.instance_size))


def table1(model: nn.Module, report: Optional[ho.BopsReport] = None) -> List[dict]:
    """The paper's Table 1 for one tracker: one row per part (:data:`TABLE1_PARTS`) with the
    activation/weight bits it uses (``a/w``; the attention products' ``b/b`` for Q K^T and
    ``32/b`` for P V, as rows of the report), its share of the baseline BOPs and ``rc_prune``,
    ``rc_quant``, ``rc_hybrid`` (each part's own BOPs over its own baseline), then a ``total``
    row. ``report`` defaults to :func:`tracking_bops`."""
    report = report or tracking_bops(model)
    parts = TABLE1_PARTS["transt" if is_transt(model) else "siamrpn"]
    strip = lambda n: n.split(".", 1)[1] if n.startswith("model.") else n
    rows, total = [], report.baseline or 1.0
    for column, prefixes in parts:
        layers = [r for r in report.layers if strip(r.name).startswith(prefixes)]
        base = sum(r.baseline for r in layers) or 1.0
        bits = sorted({f"{r.bits_a if r.bits_a is not None else 32}/{r.bits_w if r.bits_w is not None else 32}"
                       for r in layers if r.quant or r.kind == "float"})
        rows.append({"part": column, "bits": ", ".join(bits), "share": sum(r.baseline for r in layers) / total,
                     "rc_prune": sum(r.pruned for r in layers) / base, "rc_quant": sum(r.quant for r in layers) / base,
                     "rc_hybrid": sum(r.hybrid for r in layers) / base, "layers": len(layers)})
    rows.append({"part": "total", "bits": "", "share": 1.0, "rc_prune": report.pruned / total,
                 "rc_quant": report.quant / total, "rc_hybrid": report.rc, "layers": len(report.layers)})
    return rows


def table1_markdown(rows: List[dict]) -> str:
    """:func:`table1` as a markdown table."""
    lines = ["| part | A/W bits | share of baseline BOPs | RC_prune | RC_quant | RC_hybrid |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['part']} | {r['bits']} | {r['share']:.3f} | {r['rc_prune']:.3f} | {r['rc_quant']:.3f} | "
              f"{r['rc_hybrid']:.3f} |" for r in rows]
    return "\n".join(lines)


def backbone_bops(model: nn.Module, image_size: int) -> dict:
    """BOPs (eq 17) of the backbone on one ``image_size`` search crop: ``{"baseline", "hybrid",
    "rc"}`` (RC = hybrid / full-precision BOPs), via :func:`hybridops.bops_report`."""
    r = ho.bops_report(model.backbone, (1, 3, image_size, image_size))
    return {"baseline": float(r.baseline), "hybrid": float(r.hybrid), "rc": float(r.rc)}
