"""Save and load tracker checkpoints (float or hybrid, optionally deployed at load time).

A checkpoint is a dict: ``model_config`` (:class:`ModelConfig` fields), ``variant`` (a key of
:data:`~hybridops_tracking.hybrid.VARIANTS`), ``scope``, ``hybrid_overrides`` (extra
``HybridConfig`` fields), ``state_dict`` and free-form ``meta``. Loading
rebuilds the float model, converts it the same way and loads the state, so no pickled code is
needed (``torch.load(weights_only=True)``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from . import hybrid
from .model import ModelConfig, SiamRPNPP


def save_checkpoint(path: Union[str, Path], model: SiamRPNPP, variant: str = "float", scope: str = "backbone",
                    hybrid_overrides: Optional[dict] = None, meta: Optional[dict] = None) -> Path:
    """Write ``model`` (float or converted with :func:`hybrid.hybridize_tracker`, not deployed)."""
    if variant not in hybrid.VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {list(hybrid.VARIANTS)}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    torch.save({
        "model_config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "variant": variant,
        "scope": scope,
        "hybrid_overrides": dict(hybrid_overrides or {}),
        "state_dict": model.state_dict(),
        "meta": dict(meta or {}),
    }, path)
    return path


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message is one sentence naming the file."""


def read_checkpoint(path: Union[str, Path]) -> dict:
    """The raw checkpoint dict at ``path``; :class:`CheckpointError` when the file is missing or
    is not a torch file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for a file that is not a checkpoint
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}).") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict.")
    return ckpt


def load_checkpoint(path: Union[str, Path], deploy: bool = False, backend: str = "auto",
                    device: Union[str, torch.device] = "cpu") -> SiamRPNPP:
    """Rebuild the model stored at ``path`` on ``device`` (in eval mode); ``deploy`` packs a
    hybrid one there (``backend="auto"`` picks the fastest kernels for that device).

    Reads this package's checkpoints and pysot's SiamRPN++ ones (``siamrpn_r50_l234_dwxcorr``
    layout, see :mod:`.pysot`; loaded as float). Raises :class:`CheckpointError` for a missing or
    unreadable file, a pysot file with parts this tracker lacks, and ``deploy`` of a float model
    (deploying packs the quantized branch a float model does not have)."""
    ckpt = read_checkpoint(path)
    if "model_config" not in ckpt:
        from .pysot import is_pysot_state_dict, load_pysot_state_dict
        if not is_pysot_state_dict(ckpt):
            raise CheckpointError(f"{path} is neither a hybridops-track checkpoint (no 'model_config') nor a "
                                  "pysot SiamRPN++ state_dict (no 'rpn_head.' keys).")
        try:
            model = load_pysot_state_dict(ckpt)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        variant = "float"
    else:
        model = SiamRPNPP(ModelConfig(**ckpt["model_config"]))
        variant = ckpt["variant"]
        if variant != "float":
            hybrid.hybridize_tracker(model, variant, scope=ckpt["scope"], **ckpt["hybrid_overrides"])
        model.load_state_dict(ckpt["state_dict"])
    model.to(device).eval()
    model.variant = variant
    if deploy:
        if variant == "float":
            raise CheckpointError(f"{path} is a float checkpoint; deploying packs the quantized branch of a hybrid "
                                  "model (train one with --variant hybrid --init this checkpoint).")
        hybrid.deploy(model, backend)
    model.deployed = bool(deploy)  # results name deployed runs apart from the hybrid model they came from
    return model
