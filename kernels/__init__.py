"""Triton kernels and their launchers (installed as ``hybridops.kernels``).

Each launcher takes exactly the positional arguments of the function of the same name in
:mod:`hybridops.ops.reference` and returns the same thing; the ``hybridops::`` custom ops call
them with ``backend="triton"`` after validating the arguments.
"""
from .qconv import qconv2d
from .quantize import fake_quantize, quantize_activate

__all__ = ["fake_quantize", "quantize_activate", "qconv2d"]
