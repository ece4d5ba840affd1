"""Load pysot's SiamRPN++ checkpoints (``siamrpn_r50_l234_dwxcorr``) into :class:`SiamRPNPP`.

pysot's ``ModelBuilder`` (STVIR/pysot, ``pysot/models/model_builder.py``) holds ``backbone``
(``resnet_atrous.ResNet`` with torchvision-style ``Bottleneck`` names, the same as our
:class:`~.model.ResNet50Atrous`), ``neck`` (``AdjustAllLayer`` with children ``downsample2..4``,
each an ``AdjustLayer`` whose ``downsample`` is ``Sequential(conv1x1, BN)``) and ``rpn_head``
(``MultiRPN`` with children ``rpn2..4``, each a ``DepthwiseRPN`` with ``cls`` / ``loc``
``DepthwiseXCorr`` heads named ``conv_kernel``, ``conv_search``, ``head`` like ours, plus the
``cls_weight`` / ``loc_weight`` fusion parameters when ``weighted``). So the mapping is a rename:

* ``neck.downsample{i+2}.*``      -> ``neck.{i}.*``
* ``rpn_head.rpn{i+2}.*``         -> ``rpn.{i}.*``
* ``rpn_head.{cls,loc}_weight``   -> ``{cls,loc}_weight``
* ``backbone.*``                  -> ``backbone.*``

pysot feeds crops as OpenCV images: BGR, 0-255, no mean/std. The loaded model gets
``ModelConfig(input_format="bgr255")``, so it still takes our RGB 0-255 crops and reorders the
channels itself; the rest of the tracker is unchanged. Released pysot files are either a bare
state_dict or ``{"state_dict": ...}``, possibly with ``module.`` prefixes from DataParallel.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping

import torch

from .checkpoint import CheckpointError
from .model import ModelConfig, SiamRPNPP

_RULES = [
    (re.compile(r"^neck\.downsample(\d)\."), lambda m: f"neck.{int(m.group(1)) - 2}."),
    (re.compile(r"^rpn_head\.rpn(\d)\."), lambda m: f"rpn.{int(m.group(1)) - 2}."),
    (re.compile(r"^rpn_head\.(cls_weight|loc_weight)$"), lambda m: m.group(1)),
    (re.compile(r"^backbone\."), lambda m: "backbone."),
]


def _unwrap(ckpt: Mapping) -> Dict[str, torch.Tensor]:
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else ckpt
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def is_pysot_state_dict(ckpt: Mapping) -> bool:
    """True when ``ckpt`` looks like a pysot SiamRPN++ model (``rpn_head.`` and ``backbone.`` keys)."""
    try:
        keys = _unwrap(ckpt).keys()
    except AttributeError:
        return False
    return any(k.startswith("rpn_head.") for k in keys) and any(k.startswith("backbone.") for k in keys)


def pysot_to_ours(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a pysot SiamRPN++ state_dict to :class:`SiamRPNPP` keys; raises
    :class:`~.checkpoint.CheckpointError` naming the first key that belongs to no part we have
    (a mask/refine head, an UP-channel RPN)."""
    out = {}
    for k, v in _unwrap(state_dict).items():
        if not torch.is_tensor(v):
            raise CheckpointError(f"pysot key {k!r} holds a {type(v).__name__}, not a tensor.")
        for pat, repl in _RULES:
            m = pat.match(k)
            if m:
                out[repl(m) + k[m.end():]] = v
                break
        else:
            raise CheckpointError(f"pysot key {k!r} has no counterpart in this tracker (only the ResNet-50 l234 "
                                  "depthwise-xcorr SiamRPN++ is supported).")
    return out


def ours_to_pysot(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`pysot_to_ours` (used to export a float tracker for pysot's tools)."""
    out = {}
    for k, v in state_dict.items():
        k2 = re.sub(r"^neck\.(\d)\.", lambda m: f"neck.downsample{int(m.group(1)) + 2}.", k)
        k2 = re.sub(r"^rpn\.(\d)\.", lambda m: f"rpn_head.rpn{int(m.group(1)) + 2}.", k2)
        k2 = re.sub(r"^(cls_weight|loc_weight)$", r"rpn_head.\1", k2)
        out[k2] = v
    return out


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> ModelConfig:
    """The :class:`ModelConfig` a (renamed) state_dict was built with, read from its shapes:
    width from ``conv1``, blocks per stage from the layer indices, neck channels from the adjust
    layers; crops 127 / 255 and BGR 0-255 input as in pysot's ``siamrpn_r50_l234_dwxcorr``."""
    needed = ["backbone.conv1.weight", "neck.0.downsample.0.weight", "rpn.0.cls.head.3.weight",
              *(f"backbone.layer{i}.0.conv1.weight" for i in range(1, 5))]
    absent = [k for k in needed if k not in sd]
    if absent:
        raise CheckpointError(f"the pysot state_dict has no {next(iter(ours_to_pysot({absent[0]: None})))!r}, so it "
                              "is not a complete siamrpn_r50_l234_dwxcorr model.")
    width = sd["backbone.conv1.weight"].shape[0] / 64
    blocks = tuple(1 + max(int(k.split(".")[2]) for k in sd if k.startswith(f"backbone.layer{i}."))
                   for i in range(1, 5))
    neck = sd["neck.0.downsample.0.weight"].shape[0]
    anchors = sd["rpn.0.cls.head.3.weight"].shape[0] // 2
    if anchors != 5:
        raise CheckpointError(f"the classification heads predict {anchors} anchors; pysot's SiamRPN++ uses 5 "
                              "(ratios 0.33, 0.5, 1, 2, 3).")
    return ModelConfig(width=width, blocks=blocks, neck_channels=neck, input_format="bgr255")


def load_pysot_state_dict(ckpt: Mapping, config: ModelConfig = None) -> SiamRPNPP:
    """A float :class:`SiamRPNPP` with pysot's weights (crops 127 / 255, BGR 0-255 input; the
    architecture read from the tensors, see :func:`config_from_state_dict`, unless ``config``
    is given). Every tensor of the model must be present, except BN's ``num_batches_tracked``
    counters, which older pysot files lack and which no forward uses."""
    sd = pysot_to_ours(ckpt)
    config = config or config_from_state_dict(sd)
    model = SiamRPNPP(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(f"the pysot state_dict does not fit the tracker: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}.")
    return model.eval()
