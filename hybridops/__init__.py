"""hybridops: kernels and layers for hybrid low-bit networks.

A conv network becomes the sum of a 4/5-bit quantized network (QIL learnable intervals) and a
channel-pruned full-precision network (Gumbel-softmax channel gates), after Jung, Kim, Park, Han,
"Online Hybrid Lightweight Representations Learning: Its Application to Visual Tracking"
(IJCAI 2022). Importing this package touches no GPU and compiles nothing.

The package's layers and the direction of its imports: docs/design.md, section 2.
"""
from .attention import AttentionProducts, HybridMultiheadAttention, HybridTimmAttention, HybridWindowAttention
from .backend_selection import available_backends, backend_unavailable_reason, get_backend, resolve_backend, set_backend, use_backend
from .bops import BopsReport, bops_report, count_bops, layer_bops
from .config import HybridConfig, PruneConfig, QuantConfig
from .conversion import (ConversionReport, backends_in_use, calibrate_, deploy_, hybridize_,
                         load_deployed_)
from .deployed import DeployedConv2d, DeployedLinear
from .layers import HybridConv2d, HybridLinear, PrunedConv2d, PrunedLinear, QuantConv2d, QuantLinear, deploy_layer
from .losses import prune_loss, quant_loss, regularization
from .network import HybridNetwork, find_pruned_producers, fold_batchnorm_
from .online import fp_parameters, freeze_quantized_
from .prune import ChannelGate
from .quant import IntervalQuantizer, fake_quantize, interval_hat, quantize_codes
from .training import param_groups

__version__ = "0.2.0"

__all__ = [
    "HybridConfig", "QuantConfig", "PruneConfig", "hybridize_", "calibrate_", "regularization", "quant_loss",
    "prune_loss", "param_groups", "freeze_quantized_", "fp_parameters", "deploy_", "deploy_layer", "load_deployed_",
    "backends_in_use", "ConversionReport",
    "HybridConv2d", "HybridLinear", "QuantConv2d", "QuantLinear", "PrunedConv2d", "PrunedLinear",
    "DeployedConv2d", "DeployedLinear", "HybridMultiheadAttention", "HybridWindowAttention", "HybridTimmAttention",
    "AttentionProducts", "HybridNetwork", "fold_batchnorm_", "find_pruned_producers",
    "ChannelGate", "IntervalQuantizer", "fake_quantize", "interval_hat", "quantize_codes",
    "bops_report", "count_bops", "layer_bops", "BopsReport",
    "available_backends", "backend_unavailable_reason", "get_backend", "set_backend", "use_backend",
    "resolve_backend",
]
