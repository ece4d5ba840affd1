"""hybridops: kernels and layers for hybrid low-bit networks.

A conv network becomes the sum of a 4/5-bit quantized network (QIL learnable intervals) and a
channel-pruned full-precision network (Gumbel-softmax channel gates), after Jung, Kim, Park, Han,
"Online Hybrid Lightweight Representations Learning: Its Application to Visual Tracking"
(IJCAI 2022). Importing this package touches no GPU and compiles nothing.
"""
from .backend import available_backends, get_backend, resolve_backend, set_backend, use_backend
from .bops import BopsReport, bops_report, count_bops, layer_bops
from .config import HybridConfig
from .convert import (ConversionReport, backends_in_use, calibrate_, deploy_, fp_parameters, freeze_quantized_,
                      hybridize_, prune_loss, quant_loss, regularization)
from .deployed import DeployedConv2d, DeployedLinear
from .layers import HybridConv2d, HybridLinear, PrunedConv2d, PrunedLinear, QuantConv2d, QuantLinear
from .network import HybridNetwork, find_pruned_producers, fold_batchnorm_
from .prune import ChannelGate
from .quant import IntervalQuantizer, fake_quantize, interval_hat, quantize_codes

__version__ = "0.1.0"

__all__ = [
    "HybridConfig", "hybridize_", "calibrate_", "regularization", "quant_loss", "prune_loss", "freeze_quantized_",
    "fp_parameters", "deploy_", "backends_in_use", "ConversionReport",
    "HybridConv2d", "HybridLinear", "QuantConv2d", "QuantLinear", "PrunedConv2d", "PrunedLinear",
    "DeployedConv2d", "DeployedLinear", "HybridNetwork", "fold_batchnorm_", "find_pruned_producers",
    "ChannelGate", "IntervalQuantizer", "fake_quantize", "interval_hat", "quantize_codes",
    "bops_report", "count_bops", "layer_bops", "BopsReport",
    "available_backends", "get_backend", "set_backend", "use_backend", "resolve_backend",
]
