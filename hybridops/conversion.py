"""Model conversion: swap float layers for trainable hybrid ones (:func:`hybridize_`), calibrate
them (:func:`calibrate_`), turn trained layers into deployed ones (:func:`deploy_`), and rebuild a
deployed model from its saved state (:func:`load_deployed_`).

Every in-place swap goes through one module-tree walker (:func:`swap_modules_`); what a layer
becomes is decided by a handler per config type (:data:`CONVERTERS`).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .attention import (AttentionProducts, is_timm_attention, quantized_products_reason,
                        rewritable, rewrite as rewrite_attention, rewrite_reason)
from .backend_selection import resolve_backend
from .config import CONFIG_TYPES, HybridConfig, PruneConfig, QuantConfig, kept_count
from .deployed import DEPLOYED_LAYERS, DeployedConv2d, DeployedLinear
from .fusion import fuse_epilogues_, fuse_skip_connections_
from .layers import (HYBRID_LAYERS, QUANT_LAYERS, TRAINABLE_LAYERS, HybridConv2d, HybridLinear,
                     PrunedConv2d, PrunedLinear, QuantConv2d, QuantLinear, _PrunedBase, _QuantBase, deploy_layer)

FilterFn = Callable[[nn.Module, str], bool]
Config = Union[HybridConfig, QuantConfig, PruneConfig]
CONVERTED_LAYERS = TRAINABLE_LAYERS + DEPLOYED_LAYERS
_FLOAT_LAYERS = (nn.Conv2d, nn.Linear)
_UNSUPPORTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


# ----------------------------------------------------------------------------- the walker
_KEEP = object()  # visit() result: leave this child alone and do not descend into it


def swap_modules_(model: nn.Module, visit: Callable[[nn.Module, str], object]) -> None:
    """Walk ``model``'s module tree (``named_children``, depth first, in registration order) and
    replace children in place: ``visit(child, qualified_name)`` returns the replacement module,
    ``None`` to descend into the child, or :data:`_KEEP` to leave it whole."""

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            qual = f"{prefix}.{name}" if prefix else name
            new = visit(child, qual)
            if new is None:
                walk(child, qual)
            elif new is not _KEEP:
                # the replacement takes the replaced module's mode: a model put in eval mode
                # before conversion stays in eval mode (no sampled gates, no batch statistics)
                new.train(child.training)
                setattr(parent, name, new)

    walk(model, "")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for one pass, then every submodule's own mode back (a BatchNorm the user froze
    inside a training model stays frozen)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _run(model: nn.Module, example_inputs) -> None:
    model(*example_inputs) if isinstance(example_inputs, (tuple, list)) else model(example_inputs)


# ----------------------------------------------------------------------------- hybridize_
@dataclass
class ConversionReport:
    """What :func:`hybridize_` did: the config, converted layer names, and skipped ones with the reason."""

    config: Config
    converted: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"hybridize_ ({type(self.config).__name__}): converted {len(self.converted)} layers, "
                 f"skipped {len(self.skipped)}"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _gate_kwargs(config) -> dict:
    return dict(tau=config.tau, threshold=config.gate_threshold, init_logit=config.gate_init_logit)


def _set_regularisers(quant: _QuantBase, config: QuantConfig) -> None:
    quant.normalize = config.normalize
    quant.reg_targets = (config.mu0, config.sigma0)


def _convert_hybrid(module: nn.Module, config: HybridConfig, quantize_input: bool, is_output: bool) -> nn.Module:
    cls = HybridConv2d if isinstance(module, nn.Conv2d) else HybridLinear
    new = cls.from_float(module, config.bits_w, config.bits_a, quantize_input, config.keep, **_gate_kwargs(config))
    _set_regularisers(new.quant, config)
    return new


def _convert_quant(module: nn.Module, config: QuantConfig, quantize_input: bool, is_output: bool) -> nn.Module:
    cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
    new = cls.from_float(module, config.bits_w, config.bits_a, quantize_input)
    _set_regularisers(new, config)
    return new


def _convert_pruned(module: nn.Module, config: PruneConfig, quantize_input: bool, is_output: bool) -> nn.Module:
    n = module.weight.shape[0]
    kept_mask = torch.zeros(n, dtype=torch.bool)
    if is_output and config.keep_output_layer:
        kept_mask[:] = True
    else:
        # Importance: the channels with the largest L1 weight norm carry most of the output.
        kept_mask[torch.topk(module.weight.detach().abs().flatten(1).sum(1), kept_count(config.keep, n)).indices.cpu()] = True
    cls = PrunedConv2d if isinstance(module, nn.Conv2d) else PrunedLinear
    new = cls.from_float(module, kept_mask=kept_mask, **_gate_kwargs(config))
    new.gate.prunable = not (is_output and config.keep_output_layer)
    return new


# One handler per config type: (float layer, config, quantize its input?, is the output layer?) -> layer.
CONVERTERS: Dict[type, Callable[[nn.Module, Config, bool, bool], nn.Module]] = {
    HybridConfig: _convert_hybrid,
    QuantConfig: _convert_quant,
    PruneConfig: _convert_pruned,
}


@functools.lru_cache(maxsize=None)
def _children_read_directly(cls: type) -> FrozenSet[str]:
    """Names of the child modules whose ``weight`` or ``bias`` the forward of ``cls`` reads itself
    (torchvision's ShiftedWindowAttention hands ``self.qkv.weight`` to a function): a converted
    child has no such tensor, so the parent would fail or bypass it."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):  # built in, or no source file
        return frozenset()
    return frozenset(re.findall(r"self\.(\w+)\.(?:weight|bias)\b", source))


def _read_directly(model: nn.Module) -> Dict[str, str]:
    """``{qualified name: parent type}`` of the layers whose parent reads their weights itself."""
    return {f"{n}.{c}" if n else c: type(m).__name__ for n, m in model.named_modules()
            for c in _children_read_directly(type(m))}


def _skip_reason(module: nn.Module, name: str, config: Config, filter_fn: Optional[FilterFn],
                 read_directly: Mapping[str, str]) -> Optional[str]:
    """None if ``module`` is converted, "" if it is no layer at all (the walker descends into it),
    else why the layer is skipped."""
    if isinstance(module, CONVERTED_LAYERS):
        return "already converted"
    if type(module) not in _FLOAT_LAYERS:
        if isinstance(module, _UNSUPPORTED + _FLOAT_LAYERS):
            return f"{type(module).__name__} is not supported (only nn.Conv2d and nn.Linear are)"
        return ""
    if name in read_directly:
        return f"its parent {read_directly[name]} reads its weight directly, which a converted layer does not have"
    if type(module) is nn.Linear and not config.convert_linear:
        return "config.convert_linear is False"
    if filter_fn is not None and not filter_fn(module, name):
        return "excluded by filter_fn"
    return None


@torch.no_grad()
def _call_order(model: nn.Module, example_inputs) -> List[str]:
    """Qualified names of the conv / linear layers in the order a forward pass first calls them."""
    order: List[str] = []
    layers = _FLOAT_LAYERS + _UNSUPPORTED + CONVERTED_LAYERS
    hooks = [m.register_forward_pre_hook(lambda mod, args, _n=n: order.append(_n) if _n not in order else None)
             for n, m in model.named_modules() if isinstance(m, layers)]
    try:
        with _eval_mode(model):
            _run(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return order


def float_layer_order(model: nn.Module, example_inputs=None) -> List[str]:
    """Qualified names of ``model``'s float conv / linear layers in the order a forward pass on
    ``example_inputs`` calls them (registration order without inputs, or for layers never called):
    the first reads the model's input, the last writes its output."""
    float_layers = [n for n, m in model.named_modules() if isinstance(m, _FLOAT_LAYERS + _UNSUPPORTED)]
    if example_inputs is None:
        return float_layers
    known = set(float_layers)
    return [n for n in _call_order(model, example_inputs) if n in known] or float_layers


def _rewrite_attention_(model: nn.Module, config: Config, filter_fn: Optional[FilterFn],
                        report: "ConversionReport") -> None:
    """Every ``nn.MultiheadAttention`` and torchvision ``ShiftedWindowAttention`` becomes its
    rewrite in :mod:`.attention` (the same function, its projections called as ``nn.Linear``
    children), which the conversion then walks into like any module; one it cannot rewrite stays
    whole and the report says why."""
    if not getattr(config, "convert_linear", True):
        return

    bits = getattr(config, "bits_attention", None)

    def visit(child: nn.Module, qual: str):
        if not rewritable(child, bits):
            return None
        if filter_fn is not None and not filter_fn(child, qual):
            return _KEEP
        why = rewrite_reason(child)
        if why is not None:
            report.skipped.append((qual, why))
            return _KEEP
        no_codes = None if bits is None else quantized_products_reason(child)
        if no_codes is not None:
            report.skipped.append((qual + ".attention", no_codes))
            if is_timm_attention(child):
                return _KEEP  # rewritten only to quantize its products
            return rewrite_attention(child, None)
        return rewrite_attention(child, bits)

    swap_modules_(model, visit)


def hybridize_(model: nn.Module, config: Optional[Config] = None, filter_fn: Optional[FilterFn] = None,
               example_inputs=None) -> ConversionReport:
    """Swap every ``nn.Conv2d`` (and ``nn.Linear`` if ``config.convert_linear``) in ``model`` for
    its converted version, in place.

    Args:
        model: any module; walked with ``named_children``.
        config: :class:`HybridConfig` (quantized + pruned branches, eq 5; the default, 4/4 bits,
            keep 0.25), :class:`QuantConfig` (quantized only) or :class:`PruneConfig` (pruned only).
        filter_fn: ``filter_fn(module, qualified_name) -> bool``; False leaves the layer alone.
        example_inputs: a tensor (or tuple of positional inputs) of real data; if given, every
            converted layer is calibrated on it now (one forward pass in eval mode), and it shows
            which layer reads the raw input and which writes the output. Otherwise each layer
            calibrates on its first forward, and module order stands in for call order.

    The layer that reads the model's input keeps its input in full precision when
    ``config.fp_first_input``. Returns a :class:`ConversionReport`; raises if nothing was
    convertible.
    """
    config = config if config is not None else HybridConfig()
    handler = CONVERTERS.get(type(config))
    if handler is None:
        raise TypeError(f"config must be one of {[t.__name__ for t in CONFIG_TYPES]}, got {type(config).__name__}.")
    report = ConversionReport(config)
    _rewrite_attention_(model, config, filter_fn, report)
    read_directly = _read_directly(model)
    reasons = {n: _skip_reason(m, n, config, filter_fn, read_directly) for n, m in model.named_modules()}
    order = float_layer_order(model, example_inputs)
    # The first layer to see the raw input (converted or not) keeps it in full precision; the last
    # one called is the output layer (a head that filter_fn leaves in float included: then no
    # converted layer counts as the output layer).
    first_layer = order[0] if order else None
    output_layer = order[-1] if order else None

    def visit(child: nn.Module, qual: str):
        why = reasons[qual] if qual in reasons else _skip_reason(child, qual, config, filter_fn, read_directly)
        if why is None:
            quantize_input = not (qual == first_layer and getattr(config, "fp_first_input", False))
            report.converted.append(qual)
            return handler(child, config, quantize_input, qual == output_layer)
        if why:
            report.skipped.append((qual, why))
            return _KEEP
        return None

    swap_modules_(model, visit)
    if not report.converted:
        raise ValueError(f"hybridize_ found no convertible layer (nn.Conv2d or nn.Linear) in {type(model).__name__}"
                         + (f"; skipped: {report.skipped}" if report.skipped else "") + ".")
    if example_inputs is not None:
        calibrate_(model, example_inputs)
    return report


def quant_layers(model: nn.Module) -> List[_QuantBase]:
    return [m for m in model.modules() if isinstance(m, _QuantBase)]


def pruned_layers(model: nn.Module) -> List[_PrunedBase]:
    return [m for m in model.modules() if isinstance(m, _PrunedBase)]


def _untrained_training_batchnorms(model: nn.Module) -> List[nn.Module]:
    """BatchNorms in training mode that have never tracked a batch: the next forward normalises with
    batch statistics, and their running statistics are the defaults (mean 0, variance 1)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
            and m.track_running_stats and m.num_batches_tracked is not None and int(m.num_batches_tracked) == 0]


@contextlib.contextmanager
def _batch_statistics(batchnorms: List[nn.Module]):
    """``batchnorms`` normalise with batch statistics for one pass; their running buffers are restored."""
    saved = [(m, {k: v.clone() for k, v in m.named_buffers(recurse=False)}) for m in batchnorms]
    for m in batchnorms:
        m.train()
    try:
        yield
    finally:
        for m, buffers in saved:
            for k, v in buffers.items():
                getattr(m, k).copy_(v)


@torch.no_grad()
def calibrate_(model: nn.Module, example_inputs) -> nn.Module:
    """(Re)calibrate every converted layer on ``example_inputs`` (one eval-mode forward pass):
    input intervals, per-channel output scales and the pruned branches' residual start.

    A BatchNorm in training mode that has never tracked a batch (a freshly built model about to be
    trained) normalises with the batch's statistics in this pass, as the training forwards will; its
    running buffers stay unchanged. In eval mode its default running statistics would pass the
    activations through unnormalised: in a randomly initialised ResNet-50 they grow to ~100 by
    layer4 while training normalises them to ~1, so intervals fitted in eval mode map every training
    activation of the deep layers to code 0, those convs output a per-channel constant, and the
    training BatchNorm after them divides a zero variance by ``sqrt(eps)``: the gradient grows ~300x
    per such layer (NaN at the second SGD step at 64x64 input). Trained or eval-mode BatchNorms use
    their running statistics (what the deployed model computes)."""
    layers = quant_layers(model)
    attention = [m for m in model.modules() if isinstance(m, AttentionProducts)]
    if not layers and not attention:
        return model  # nothing to fit (a pruned-only model): no forward pass
    for m in layers:
        m.calibrated_flag.fill_(0.0)
        m._calibrated_cache = False
    for m in attention:
        m.reset_calibration_()
    fresh = _untrained_training_batchnorms(model)
    with _eval_mode(model), _batch_statistics(fresh):
        _run(model, example_inputs)
    missing = [type(m).__name__ for m in layers + attention if not m.calibrated]
    if missing:
        raise RuntimeError(f"{len(missing)} converted layers were not reached by the calibration forward pass; "
                           "pass inputs that run the whole model.")
    return model


# ----------------------------------------------------------------------------- deploy_
def deploy_(model: nn.Module, backend: Optional[str] = "auto",
            in_channel_map: Optional[Mapping[nn.Module, torch.Tensor]] = None, fuse: bool = True,
            fp_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace trainable hybrid / quantized / pruned layers by deployed ones, in place
    (:func:`deploy_layer`), computed by ``backend`` (``"auto"``: the fastest available on the layer's
    device; or a name from :func:`hybridops.available_backends`).

    A model that deploys itself (:class:`hybridops.HybridNetwork`, whose pruning compounds across
    layers) is handed to its own ``deploy_``. ``in_channel_map`` maps a pruned layer to the input
    channels it reads when its producer was pruned too (what that network passes).

    ``fuse``: fold an eval-mode BatchNorm2d and a ReLU that follow a deployed integer conv into its
    epilogue, and a skip connection's add and ReLU after it (the block whose code held them gets
    the rewritten code as its forward; save such a model with ``state_dict``), and chain integer
    convs through codes (:func:`hybridops.fusion.fuse_epilogues_`).
    Deploy an eval-mode model: BatchNorm layers still in training mode are left alone.

    ``fp_dtype``: what the pruned branches compute in; ``torch.bfloat16`` in an fp32 model runs
    them on the CPU's bf16 units (the onednn backend), at bf16 rounding of that branch. Measured on
    an AVX-512 BF16 CPU: each conv 1.6-1.7x faster than fp32, the whole model slower where the
    branch reads every input channel (the bf16 copy of the input costs more; docs/cpu_backend.md).
    Layers with a float input (both branches merged into one conv) compute in the input's dtype.
    None: the model's dtype.
    """
    own = getattr(model, "deploy_", None)
    if own is not None and in_channel_map is None:
        return own(backend=backend, fuse=fuse, fp_dtype=fp_dtype)
    in_channel_map = in_channel_map or {}
    uncalibrated = [n for n, m in model.named_modules()
                    if isinstance(m, HYBRID_LAYERS + QUANT_LAYERS + (AttentionProducts,)) and not m.calibrated]
    if uncalibrated:
        raise RuntimeError(f"deploy_ needs calibrated layers; {uncalibrated[:3]} are not: call "
                           "hybridops.calibrate_(model, example_inputs) or run a forward pass first.")
    count = [0]

    def visit(child: nn.Module, qual: str):
        if isinstance(child, AttentionProducts):  # its intervals stay; it runs the op on the backend
            child.backend = resolve_backend(backend, child.calibrated_flag.device)
            return _KEEP
        if not isinstance(child, TRAINABLE_LAYERS):
            return None
        count[0] += 1
        dev = next(child.parameters()).device
        return deploy_layer(child, resolve_backend(backend, dev), in_channel_map.get(child), fp_dtype)

    swap_modules_(model, visit)
    if count[0] == 0:
        raise ValueError("deploy_ found no hybrid, quantized or pruned layer; call hybridize_ first.")
    if fuse:
        fuse_epilogues_(model)
    return model


def backends_in_use(model: nn.Module) -> Dict[str, str]:
    """``{layer name: backend}`` for every deployed layer: which kernels actually run."""
    return {n: m.backend for n, m in model.named_modules() if isinstance(m, DEPLOYED_LAYERS)}


# ----------------------------------------------------------------------------- save / load
def load_deployed_(model: nn.Module, state_dict: Mapping[str, torch.Tensor], backend: Optional[str] = "auto",
                   strict: bool = True) -> nn.Module:
    """Rebuild a deployed model from the ``state_dict`` of one, in place, and load it.

    ``model`` is the float model the deployed one was made from (built fresh, e.g.
    ``torchvision.models.resnet50()``): every layer the checkpoint holds in deployed form is
    replaced by a deployed layer built from the saved format (no trainable layer, no calibration
    data), the modules deploy-time fusion absorbed become ``nn.Identity``, and the state is loaded
    (``strict`` as in ``load_state_dict``). The outputs equal the saved model's bit for bit on the
    same backend. ``backend`` as in :func:`deploy_`, per layer device.
    """
    records = {key[: -len("._extra_state")]: state for key, state in state_dict.items()
               if key.endswith("._extra_state") and isinstance(state, dict) and state.get("kind") in ("conv2d", "linear")
               and "init" in state}
    if not records:
        raise ValueError("the state_dict holds no deployed layer (save a model after hybridops.deploy_).")

    def attention(child: nn.Module, qual: str):
        # an attention module the conversion rewrote: its products are quantized, or its
        # projections hold deployed layers
        quantizer = state_dict.get(f"{qual}.attention.q_quant._extra_state")
        bits = None if quantizer is None else int(quantizer["bits"])
        if not rewritable(child, bits):
            return None
        if bits is None and not any(n.startswith(qual + ".") for n in records):
            return _KEEP
        return rewrite_attention(child, bits)

    swap_modules_(model, attention)
    absorbed = []
    for name, state in records.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the checkpoint has a deployed layer {name!r} that this model lacks; build the same "
                             "float model the deployed one was made from.") from None
        ref = next(iter(old.parameters()), None)
        dev = ref.device if ref is not None else torch.device("cpu")
        dtype = state_dict[f"{name}.fp_weight"].dtype
        cls = DeployedConv2d if state["kind"] == "conv2d" else DeployedLinear
        new = cls.from_format_state(state, state_dict.get(f"{name}.out_qparams"), resolve_backend(backend, dev), dev,
                                    dtype)
        _set_submodule(model, name, new)
        absorbed += [n for n, _ in state["absorbed"]]
    for name in absorbed:
        _set_submodule(model, name, nn.Identity())
    # skip connections and shared ReLUs that fusion moved into layers (their flags say which)
    fuse_skip_connections_(model, decide=False)
    model.load_state_dict(state_dict, strict=strict)
    for m in model.modules():
        if isinstance(m, AttentionProducts):
            m.backend = resolve_backend(backend, m.calibrated_flag.device)
    return model


def _set_submodule(model: nn.Module, qualname: str, module: nn.Module) -> None:
    parent_name, _, name = qualname.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, name, module)
