"""Load the public TransT checkpoints (``transt.pth``, trained by TransT's ``ltr`` framework) into
:class:`~.transt.TransT`.

Those files are ``ltr`` training checkpoints: a dict whose ``net`` entry is the network's
state_dict, next to pickled training objects (``constructor``, ``settings``, optimizer state) of
classes from the ``ltr`` package. :func:`~.checkpoint.read_checkpoint` reads them without
importing or running any of that code (the classes are replaced by inert placeholders), so only
the tensors are used. The network's keys are ours except the backbone's:

* ``backbone.0.body.*``  -> ``backbone.*`` (``Joiner(Backbone, PositionEmbeddingSine)``; the sine
  encoding has no parameters);
* ``featurefusion_network.*``, ``input_proj.*``, ``class_embed.*``, ``bbox_embed.*`` unchanged.

Files holding a bare state_dict or ``{"state_dict": ...}`` / ``{"model": ...}``, possibly with
``module.`` prefixes from DataParallel, are read too.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping

import torch

from .checkpoint import CheckpointError
from .transt import TransT, TransTConfig

_BACKBONE = re.compile(r"^backbone\.0\.body\.")
_OURS = ("featurefusion_network.", "input_proj.", "class_embed.", "bbox_embed.")


def _unwrap(ckpt: Mapping) -> Dict[str, torch.Tensor]:
    sd = ckpt
    for key in ("net", "state_dict", "model"):
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def is_transt_state_dict(ckpt) -> bool:
    """True when ``ckpt`` looks like a TransT network (``featurefusion_network.`` and
    ``backbone.0.body.`` keys)."""
    try:
        keys = _unwrap(ckpt).keys()
    except AttributeError:
        return False
    return any(k.startswith("featurefusion_network.") for k in keys) and any(_BACKBONE.match(k) for k in keys)


def transt_to_ours(ckpt: Mapping) -> Dict[str, torch.Tensor]:
    """Rename a TransT state_dict (or ``ltr`` checkpoint) to :class:`~.transt.TransT` keys;
    :class:`~.checkpoint.CheckpointError` names the first key that belongs to no part we have."""
    out = {}
    for k, v in _unwrap(ckpt).items():
        if not torch.is_tensor(v):
            raise CheckpointError(f"TransT key {k!r} holds a {type(v).__name__}, not a tensor.")
        if _BACKBONE.match(k):
            out["backbone." + k[_BACKBONE.match(k).end():]] = v
        elif k.startswith(_OURS):
            out[k] = v
        else:
            raise CheckpointError(f"TransT key {k!r} has no counterpart in this tracker (only the ResNet-50 TransT "
                                  "with sine position encodings is supported).")
    return out


def ours_to_transt(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`transt_to_ours` (a float model's state_dict in TransT's keys)."""
    return {re.sub(r"^backbone\.", "backbone.0.body.", k): v for k, v in state_dict.items()}


def config_from_state_dict(sd: Mapping[str, torch.Tensor], heads: int = 8) -> TransTConfig:
    """The :class:`~.transt.TransTConfig` a (renamed) state_dict was built with, read from its
    shapes: width from ``conv1``, blocks per stage and fusion layers from the indices, hidden and
    FFN widths from the projection and the first FFN. The head count is not in the tensors
    (``in_proj_weight`` is ``3C x C`` for any), so it is ``heads`` (TransT: 8); crops 128 / 256."""
    needed = ["backbone.conv1.weight", "input_proj.weight", "featurefusion_network.encoder.layers.0.linear11.weight",
              "class_embed.layers.2.weight", *(f"backbone.layer{i}.0.conv1.weight" for i in range(1, 4))]
    absent = [k for k in needed if k not in sd]
    if absent:
        raise CheckpointError(f"the TransT state_dict has no {next(iter(ours_to_transt({absent[0]: None})))!r}, so it "
                              "is not a complete TransT model.")
    count = lambda prefix, pos: 1 + max(int(k.split(".")[pos]) for k in sd if k.startswith(prefix))
    hidden = sd["input_proj.weight"].shape[0]
    if sd["class_embed.layers.2.weight"].shape[0] != 2:
        raise CheckpointError(f"the classifier predicts {sd['class_embed.layers.2.weight'].shape[0]} classes; "
                              "TransT's predicts 2 (target, no target).")
    return TransTConfig(width=sd["backbone.conv1.weight"].shape[0] / 64,
                        blocks=tuple(count(f"backbone.layer{i}.", 2) for i in range(1, 4)),
                        hidden_dim=hidden, heads=heads,
                        fusion_layers=count("featurefusion_network.encoder.layers.", 3),
                        dim_feedforward=sd["featurefusion_network.encoder.layers.0.linear11.weight"].shape[0])


def load_transt_state_dict(ckpt: Mapping, config: TransTConfig = None) -> TransT:
    """A float :class:`~.transt.TransT` with TransT's weights (the architecture read from the
    tensors, see :func:`config_from_state_dict`, unless ``config`` is given). Every tensor of
    the model must be present, except BN's ``num_batches_tracked`` counters."""
    sd = transt_to_ours(ckpt)
    config = config or config_from_state_dict(sd)
    model = TransT(config)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a tensor of another shape than the config's
        raise CheckpointError(f"the TransT state_dict does not fit {config}: {str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(f"the TransT state_dict does not fit the tracker: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}.")
    return model.eval()
