"""Visual tracking with hybrid representations (the paper's section 4): SiamRPN++ with a
ResNet-50 backbone and TransT (HybTransT, docs/transt.md), buildable float, hybrid
(:func:`hybridops.hybridize_`) or deployed, with the online update of the classification head's
full-precision branch.

Modules: :mod:`.model` (SiamRPN++), :mod:`.transt` (TransT), :mod:`.boxes` (anchors, box coding),
:mod:`.tracker` and :mod:`.transt_tracker` (post-processing, online update), :mod:`.data` (OTB,
GOT-10k, LaSOT, VOT, UAV123 readers; synthetic sequences), :mod:`.pysot` (pysot SiamRPN++
checkpoints), :mod:`.transt_import` (TransT checkpoints), :mod:`.train`
(offline training with L_hyb), :mod:`.metrics` (OTB precision/success), :mod:`.attributes`
(per-attribute results from OTB / pysot attribute files), :mod:`.benchmark` and
:mod:`.compare` (evaluation, the variant table), :mod:`.cli` (``hybridops-track``).
"""
import importlib

# Each public name and the module that defines it, imported on first use: the modules need the
# [tracking] extra (numpy, tqdm, matplotlib, torchvision), and the console script's launcher
# (.launcher) must be importable without them to say so in one line. The training loop is
# ``hybridops_tracking.train.train``: a lazy package attribute of that name would be the function or
# the submodule depending on import order.
_EXPORTS = {
    "OTB_ATTRIBUTES": "attributes", "attribute_groups": "attributes", "load_attributes": "attributes",
    "read_attribute_file": "attributes",
    "center_iou": "boxes", "decode": "boxes", "encode": "boxes", "generate_anchors": "boxes",
    "evaluate": "benchmark", "make_tracker": "benchmark", "rescore": "benchmark", "run_sequence": "benchmark", "write_overlay":
    "benchmark", "write_tracker_results": "benchmark",
    "CheckpointError": "checkpoint", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "FORMATS": "data", "Sequence": "data", "SequenceError": "data", "SynthConfig": "data",
    "detect_format": "data", "list_sequences": "data", "load_dataset": "data",
    "make_synthetic_benchmark": "data", "read_got10k_sequence": "data", "read_lasot_sequence": "data",
    "read_otb_sequence": "data", "read_uav123_sequence": "data", "read_vot_sequence": "data",
    "synthetic_sequence": "data", "write_otb_sequence": "data",
    "VARIANTS": "hybrid", "hybridize_tracker": "hybrid", "online_parameters": "hybrid", "table1": "hybrid",
    "tracking_bops": "hybrid",
    "center_error": "metrics", "norm_precision_curve": "metrics", "overlap": "metrics",
    "precision_curve": "metrics", "success_curve": "metrics", "summarize": "metrics",
    "ModelConfig": "model", "SiamRPNPP": "model", "SiamRPNStep": "model", "xcorr_depthwise": "model",
    "OnlineConfig": "tracker", "SiamRPNTracker": "tracker", "SiameseTracker": "tracker", "TrackParams": "tracker",
    "TransTStep": "transt", "TransT": "transt", "TransTConfig": "transt",
    "load_transt_state_dict": "transt_import",
    "TransTParams": "transt_tracker", "TransTTracker": "transt_tracker",
    "PairSampler": "train", "TrainConfig": "train",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
