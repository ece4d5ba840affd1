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


def load_checkpoint(path: Union[str, Path], deploy: bool = False, backend: str = "auto",
                    device: Union[str, torch.device] = "cpu") -> SiamRPNPP:
    """Rebuild the model stored at ``path`` on ``device`` (in eval mode); ``deploy`` packs a
    hybrid one there (``backend="auto"`` picks the fastest kernels for that device)."""
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    model = SiamRPNPP(ModelConfig(**ckpt["model_config"]))
    variant = ckpt["variant"]
    if variant != "float":
        hybrid.hybridize_tracker(model, variant, scope=ckpt["scope"], **ckpt["hybrid_overrides"])
    model.load_state_dict(ckpt["state_dict"])
    model.to(device).eval()
    model.variant = variant
    if deploy:
        if variant == "float":
            raise ValueError("deploy=True needs a hybrid checkpoint; this one is float.")
        hybrid.deploy(model, backend)
    return model
