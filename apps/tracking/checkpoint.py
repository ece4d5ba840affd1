"""Save and load tracker checkpoints (float or hybrid, optionally deployed at load time).

A checkpoint is a dict: ``arch`` (``"siamrpn"`` or ``"transt"``; files without it are SiamRPN++),
``model_config`` (:class:`ModelConfig` or :class:`~.transt.TransTConfig` fields), ``variant`` (a key of
:data:`~hybridops_tracking.hybrid.VARIANTS`), ``scope``, ``hybrid_overrides`` (extra
``HybridConfig`` fields), ``state_dict`` and free-form ``meta``. Loading
rebuilds the float model, converts it the same way and loads the state, so no pickled code is
needed (``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Optional, Union

import torch

from . import hybrid
from .model import ModelConfig, SiamRPNPP
from .transt import TransT, TransTConfig

# Each architecture a checkpoint can hold: its model class and config class.
ARCHS = {"siamrpn": (SiamRPNPP, ModelConfig), "transt": (TransT, TransTConfig)}


def arch_of(model: Union[SiamRPNPP, TransT]) -> str:
    return "transt" if isinstance(model, TransT) else "siamrpn"


def save_checkpoint(path: Union[str, Path], model: Union[SiamRPNPP, TransT], variant: str = "float",
                    scope: Optional[str] = None, hybrid_overrides: Optional[dict] = None,
                    meta: Optional[dict] = None) -> Path:
    """Write ``model`` (float or converted with :func:`hybrid.hybridize_tracker`, not deployed);
    ``scope`` None: the model's default (:func:`hybrid.default_scope`)."""
    if variant not in hybrid.VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {list(hybrid.VARIANTS)}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    torch.save({
        "arch": arch_of(model),
        "model_config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "variant": variant,
        "scope": scope or hybrid.default_scope(model),
        "hybrid_overrides": dict(hybrid_overrides or {}),
        "state_dict": model.state_dict(),
        "meta": dict(meta or {}),
    }, path)
    return path


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message is one sentence naming the file."""


class ForeignObject:
    """What a class or function of another code base pickled in a checkpoint (TransT's ``ltr``
    files pickle its constructor and settings objects next to the state_dict) is read as: it takes
    any construction arguments and state and keeps none of them, and cannot be pickled again (it
    names no importable class)."""

    def __init__(self, *args, **kwargs):
        """Takes the arguments a pickled call passes, and keeps none."""

    def __setstate__(self, state):
        """Takes the state a pickled object carries, and keeps none."""

    def __reduce__(self):
        raise TypeError("an object read from another framework's checkpoint cannot be pickled.")


# torch's weights-only refusal names the first global it met (builtins without their module); the
# zip format can also be listed up front (get_unsafe_globals_in_checkpoint), the legacy format
# (torch < 1.6's files, such as TransT's) only so.
_REFUSED = re.compile(r"GLOBAL (\S+) was not an allowed global")


def _load_weights(path: Path):
    """``torch.load(weights_only=True)``, the globals it refuses read as :class:`ForeignObject`,
    so no code they name is imported or run and the tensors load as usual."""
    try:
        refused = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # the legacy format: the refusals are learnt one load at a time
        refused = set()
    for _ in range(64):  # a training checkpoint pickles a handful of foreign classes, not more
        try:
            with torch.serialization.safe_globals([(ForeignObject, g) for g in sorted(refused)]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = _REFUSED.search(str(e))
            name = found.group(1) if found else None
            name = name if name is None or "." in name else f"builtins.{name}"
            if name is None or name in refused:
                raise
            refused.add(name)
    raise pickle.UnpicklingError("more than 64 globals of other code are pickled in it")


def check_plain(value, path, what: str) -> None:
    """:class:`CheckpointError` when ``value`` (a part of the checkpoint at ``path`` that is used)
    holds :class:`ForeignObject` (a foreign function) or an instance of it (a foreign object)
    anywhere: tensors and plain values only."""
    stack = [value]
    while stack:
        v = stack.pop()
        if v is ForeignObject or isinstance(v, ForeignObject):  # a pickled function is read as the class
            raise CheckpointError(f"{path}: its {what} holds an object of another framework, not tensors and plain "
                                  "values.")
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)


def read_checkpoint(path: Union[str, Path]) -> dict:
    """The raw checkpoint dict at ``path``; :class:`CheckpointError` when the file is missing or
    is not a torch file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    try:
        ckpt = _load_weights(path)
    except Exception as e:  # torch raises several unrelated types for a file that is not a checkpoint
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}).") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict.")
    return ckpt


def load_checkpoint(path: Union[str, Path], deploy: bool = False, backend: str = "auto",
                    device: Union[str, torch.device] = "cpu") -> Union[SiamRPNPP, TransT]:
    """Rebuild the model stored at ``path`` on ``device`` (in eval mode); ``deploy`` packs a
    hybrid one there (``backend="auto"`` picks the fastest kernels for that device).

    Reads this package's checkpoints, pysot's SiamRPN++ ones (``siamrpn_r50_l234_dwxcorr``
    layout, see :mod:`.pysot`) and TransT's (``transt.pth``, see :mod:`.transt_import`), the last
    two loaded as float. Raises :class:`CheckpointError` for a missing or unreadable file, a
    pysot or TransT file with parts this tracker lacks, and ``deploy`` of a float model
    (deploying packs the quantized branch a float model does not have)."""
    ckpt = read_checkpoint(path)
    if "model_config" not in ckpt:
        from .pysot import is_pysot_state_dict, load_pysot_state_dict
        from .transt_import import is_transt_state_dict, load_transt_state_dict
        if is_pysot_state_dict(ckpt):
            load = load_pysot_state_dict
        elif is_transt_state_dict(ckpt):
            load = load_transt_state_dict
        else:
            raise CheckpointError(f"{path} is neither a hybridops-track checkpoint (no 'model_config'), a pysot "
                                  "SiamRPN++ state_dict (no 'rpn_head.' keys) nor a TransT checkpoint (no "
                                  "'featurefusion_network.' keys).")
        try:
            model = load(ckpt)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        variant = "float"
    else:
        arch = ckpt.get("arch", "siamrpn")
        if arch not in ARCHS:
            raise CheckpointError(f"{path} holds a {arch!r} model; this version knows {sorted(ARCHS)}.")
        for key in ("model_config", "variant", "scope", "hybrid_overrides", "state_dict"):
            check_plain(ckpt.get(key), path, key)
        model_cls, config_cls = ARCHS[arch]
        model = model_cls(config_cls(**ckpt["model_config"]))
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
