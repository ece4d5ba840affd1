"""Custom ops (``torch.library``, namespace ``hybridops``) and their reference implementations.
The packed storage format they read is :mod:`hybridops.kernels.packing`."""
from . import reference
from .attention import quantized_attention
from .custom_ops import fake_quantize, hybrid_conv2d, qconv2d, quantize_activate

__all__ = ["reference", "fake_quantize", "hybrid_conv2d", "qconv2d", "quantize_activate",
           "quantized_attention"]
