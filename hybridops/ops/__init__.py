"""Custom ops (``torch.library``, namespace ``hybridops``), their reference implementations and
the packed storage format."""
from . import packing, reference
from .custom_ops import fake_quantize, hybrid_conv2d, qconv2d, quantize_activate

__all__ = ["packing", "reference", "fake_quantize", "hybrid_conv2d", "qconv2d", "quantize_activate"]
