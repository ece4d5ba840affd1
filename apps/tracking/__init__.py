"""Visual tracking with hybrid representations (the paper's section 4): SiamRPN++ with a
ResNet-50 backbone, buildable float, hybrid (:func:`hybridops.hybridize_`) or deployed, with the
OnHybSiamRPN++ online update of the classification head's full-precision branch.

Modules: :mod:`.model` (network), :mod:`.boxes` (anchors, box coding), :mod:`.tracker`
(post-processing, online update), :mod:`.data` (OTB, GOT-10k, LaSOT, VOT, UAV123 readers; synthetic sequences), :mod:`.pysot` (pysot
SiamRPN++ checkpoints), :mod:`.train`
(offline training with L_hyb), :mod:`.metrics` (OTB precision/success), :mod:`.attributes`
(per-attribute results from OTB / pysot attribute files), :mod:`.benchmark` and
:mod:`.compare` (evaluation, the variant table), :mod:`.cli` (``hybridops-track``).
"""
from .attributes import OTB_ATTRIBUTES, attribute_groups, load_attributes, read_attribute_file
from .boxes import center_iou, decode, encode, generate_anchors
from .benchmark import evaluate, rescore, run_sequence, write_overlay, write_tracker_results
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import (FORMATS, Sequence, SequenceError, SynthConfig, detect_format, list_sequences, load_dataset,
                   make_synthetic_benchmark, read_got10k_sequence, read_lasot_sequence, read_otb_sequence,
                   read_uav123_sequence, read_vot_sequence, synthetic_sequence, write_otb_sequence)
from .hybrid import VARIANTS, hybridize_tracker, online_parameters
from .metrics import center_error, norm_precision_curve, overlap, precision_curve, success_curve, summarize
from .model import ModelConfig, SiamRPNPP, xcorr_depthwise
from .tracker import OnlineConfig, SiamRPNTracker, TrackParams
from .train import PairSampler, TrainConfig, train

__all__ = [
    "ModelConfig", "SiamRPNPP", "xcorr_depthwise", "generate_anchors", "encode", "decode", "center_iou",
    "TrackParams", "OnlineConfig", "SiamRPNTracker", "Sequence", "SequenceError", "SynthConfig",
    "read_otb_sequence", "write_otb_sequence", "list_sequences", "synthetic_sequence", "make_synthetic_benchmark",
    "overlap", "center_error", "precision_curve", "success_curve", "summarize", "TrainConfig", "PairSampler",
    "train", "VARIANTS", "hybridize_tracker", "online_parameters", "save_checkpoint", "load_checkpoint",
    "CheckpointError", "FORMATS", "detect_format", "load_dataset", "read_got10k_sequence", "read_lasot_sequence", "read_vot_sequence",
    "read_uav123_sequence", "norm_precision_curve", "evaluate", "rescore", "run_sequence", "write_overlay",
    "write_tracker_results", "OTB_ATTRIBUTES", "attribute_groups", "load_attributes", "read_attribute_file",
]
