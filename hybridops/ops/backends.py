"""The registered backends: one :func:`~hybridops.ops.registry.register_backend` call each.

A new backend adds its launcher module (``kernels/`` or ``csrc/``) and one call here.
"""
from __future__ import annotations

import importlib
import os
import types

import torch

from . import reference
from .registry import BackendSpec, register_backend


def _triton_ops():
    # Triton is an optional dependency: importing it here, on first use, keeps hybridops
    # importable without it.
    quantize = importlib.import_module("hybridops.kernels.quantize")
    qconv = importlib.import_module("hybridops.kernels.qconv")
    return types.SimpleNamespace(fake_quantize=quantize.fake_quantize,
                                 quantize_activate=quantize.quantize_activate, qconv2d=qconv.qconv2d,
                                 fused_hybrid_conv2d=qconv.fused_hybrid_conv2d,
                                 fuse_pruned_branch=qconv.fuse_pruned_branch)


def _cuda_ops():
    # The compiled extension is optional (CPU-only installs have none).
    importlib.import_module("hybridops.ops.cuda_ext").load()
    ops = torch.ops.hybridops
    return types.SimpleNamespace(fake_quantize=ops.cuda_fake_quantize, quantize_activate=ops.cuda_quantize_activate,
                                 qconv2d=ops.cuda_qconv2d)


def triton_interpreter() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_device(device: torch.device):
    if device.type != "cuda" and not triton_interpreter():
        return (f"the triton backend runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1), "
                f"got a tensor on {device}.")
    return None


def _onednn_ops():
    # needs the compiled CPU kernels (hybridops._C_cpu), which an install without a C++ compiler lacks
    onednn = importlib.import_module("hybridops.kernels.onednn")

    def fake_quantize(x, qparams, bits, signed):
        # float64 stays in float64: the reference computes in it, the C++ kernel in fp32
        impl = reference.fake_quantize if x.dtype == torch.float64 else onednn.fake_quantize
        return impl(x, qparams, bits, signed)

    return types.SimpleNamespace(fake_quantize=fake_quantize, quantize_activate=onednn.quantize_activate,
                                 qconv2d=onednn.qconv2d, fp_conv2d=onednn.fp_conv2d,
                                 fp_conv_dtypes=(torch.float32, torch.bfloat16) if onednn.bf16_supported()
                                 else (torch.float32,))


register_backend(BackendSpec("torch", load=lambda: reference, unsigned8=True))
register_backend(BackendSpec("triton", load=_triton_ops, devices=("cuda",), auto_rank=1, device_check=_triton_device,
                             hint="the triton backend needs Triton (pip install triton)."))
register_backend(BackendSpec("cuda", load=_cuda_ops, devices=("cuda",), auto_rank=0,
                             hint="the cuda backend needs the compiled extension hybridops._C; reinstall with a CUDA "
                                  "toolkit: pip install --no-build-isolation -e ."))
register_backend(BackendSpec("onednn", load=_onednn_ops, devices=("cpu",), auto_rank=0, nibble_codes=False,
                             unsigned8=True))
