"""Python side of the compiled CUDA extension ``hybridops._C`` (``csrc/``).

Importing ``hybridops._C`` registers the ``torch.ops.hybridops.cuda_*`` ops (schemas and CUDA
kernels, in C++). This module loads it on demand and adds the fake (shape-only) implementations
that ``torch.compile``, CUDA graphs and ``torch.library.opcheck`` need. Importing this module
never fails: :func:`load` raises only when the extension is actually asked for.

Op signatures are those of :mod:`hybridops.ops.reference` (without ``backend``):

* ``cuda_fake_quantize(x, qparams, bits, signed) -> Tensor`` (dtype and layout of ``x``);
* ``cuda_quantize_activate(x, qparams, bits, signed, bn_scale, bn_shift, relu, fp_in_idx,
  slice_dtype) -> (x_slice (N, H, W, K) or (0,), codes uint8 (N, H, W, packed(C)))``;
* ``cuda_quantize_activate_flagged(...)``: the same arguments, and a third output ``int32 (1,)``,
  1 when an activated value was NaN or infinite (found in the same pass; the layer reads it);
* ``cuda_qconv2d(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride,
  padding, dilation, groups, relu, fp_out, fp_out_idx, requant_qparams, requant_bits,
  requant_signed, out_dtype) -> NHWC output``.

The optional extension ``hybridops._C_sm90`` (``csrc/sm90/``, built when the CUTLASS headers are
installed and 9.0a is among the archs) is imported with it when present: it registers
``cuda_qconv2d_sm90`` (the same arguments plus ``tile_m``), CUTLASS 3's Hopper int8 conv
mainloop with the hybrid epilogue, which ``cuda_qconv2d`` then runs on sm_90 GPUs for the calls
it takes (one-byte codes, groups 1, C_in and C_out multiples of 16; ``csrc/sm90/eligible.h``).
"""
from __future__ import annotations

import contextlib
import functools
import importlib

import torch

from ..kernels.packing import packed_size
from ..kernels.geometry import conv_out_size

# Must equal hybridops::kOpsVersion in csrc/ops.h: a build from older sources is refused as stale
# instead of failing later with a schema mismatch.
OPS_VERSION = 3

_fakes_registered = False


@functools.lru_cache(maxsize=None)
def load():
    """Import ``hybridops._C`` once, check it matches these sources, register the fake kernels.

    Returns the extension module; raises ImportError (missing or stale build) otherwise."""
    ext = importlib.import_module("hybridops._C")
    info = ext.build_info()
    if info.get("ops_version") != OPS_VERSION:
        raise ImportError(f"hybridops._C is stale: built with ops version {info.get('ops_version')}, these sources "
                          f"need {OPS_VERSION}.")
    hopper = sm90()
    if hopper is not None and hopper.ops_version != OPS_VERSION:
        raise ImportError(f"hybridops._C_sm90 is stale: built with ops version {hopper.ops_version}, these sources "
                          f"need {OPS_VERSION}.")
    global _fakes_registered
    if not _fakes_registered:  # load() may run again after cache_clear(); fakes register once
        _register_fakes()
        _fakes_registered = True
    return ext


@functools.lru_cache(maxsize=None)
def sm90():
    """The CUTLASS Hopper extension ``hybridops._C_sm90`` once imported (which registers its op for
    ``cuda_qconv2d`` to dispatch to), or None where it was not built."""
    try:
        return importlib.import_module("hybridops._C_sm90")
    except ImportError:
        return None


def build_info() -> dict:
    """What the extension was built for (CUDA archs, CUDA runtime and torch versions)."""
    return load().build_info()


@contextlib.contextmanager
def forced_plan(plan: str):
    """Inside the block, ``cuda_qconv2d`` runs the hand-written kernel ``plan`` (a name of
    ``build_info()["qconv2d_kernels"]``) wherever a tensor-core tile may run, and never the CUTLASS
    Hopper kernel: how tests and the GPU suite reach every kernel template on small shapes.
    Process-wide, like ``kernels/tiles.py``'s ``forced``."""
    ext = load()
    ext.set_qconv2d_plan_override(plan)
    try:
        yield
    finally:
        ext.set_qconv2d_plan_override("")


def _register_fakes() -> None:
    @torch.library.register_fake("hybridops::cuda_fake_quantize")
    def _(x, qparams, bits, signed):
        # The kernel keeps a dense layout (contiguous, channels_last, ...) and makes others
        # contiguous, which is what empty_like's preserve_format does.
        return torch.empty_like(x)

    @torch.library.register_fake("hybridops::cuda_quantize_activate")
    def _(x, qparams, bits, signed, bn_scale, bn_shift, relu, fp_in_idx, slice_dtype):
        return _quantize_activate_fake(x, bits, fp_in_idx, slice_dtype)

    @torch.library.register_fake("hybridops::cuda_quantize_activate_flagged")
    def _(x, qparams, bits, signed, bn_scale, bn_shift, relu, fp_in_idx, slice_dtype):
        return (*_quantize_activate_fake(x, bits, fp_in_idx, slice_dtype), x.new_empty((1,), dtype=torch.int32))

    @torch.library.register_fake("hybridops::cuda_qconv2d")
    def _(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding, dilation, groups,
          relu, fp_out, fp_out_idx, requant_qparams, requant_bits, requant_signed, out_dtype):
        return _qconv_fake(x_codes, w_packed, stride, padding, requant_qparams, requant_bits, out_dtype, dilation)

    if sm90() is not None:
        @torch.library.register_fake("hybridops::cuda_qconv2d_sm90")
        def _(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding, dilation,
              groups, relu, fp_out, fp_out_idx, requant_qparams, requant_bits, requant_signed, out_dtype, tile_m):
            # One code per byte: packed_size is the channel count at 5-8 bits, all this op takes.
            return _qconv_fake(x_codes, w_packed, stride, padding, requant_qparams, requant_bits, out_dtype, dilation)


def _quantize_activate_fake(x, bits, fp_in_idx, slice_dtype):
    """The (x_slice, codes) of cuda_quantize_activate for these arguments, shape and dtype only."""
    n, c, h, w = x.shape
    sdt = slice_dtype or x.dtype
    codes = x.new_empty((n, h, w, packed_size(c, bits)), dtype=torch.uint8)
    if fp_in_idx is None:
        return x.new_empty((0,), dtype=sdt), codes
    return x.new_empty((n, h, w, fp_in_idx.shape[0]), dtype=sdt), codes


def _qconv_fake(x_codes, w_packed, stride, padding, requant_qparams, requant_bits, out_dtype, dilation):
    """The output of cuda_qconv2d (and cuda_qconv2d_sm90) for these arguments, shape and dtype only."""
    n, h, w, _ = x_codes.shape
    c_out, kh, kw, _ = w_packed.shape
    ho = conv_out_size(h, kh, stride[0], padding[0] + padding[1], dilation[0])
    wo = conv_out_size(w, kw, stride[1], padding[2] + padding[3], dilation[1])
    if requant_qparams is not None:
        return x_codes.new_empty((n, ho, wo, packed_size(c_out, requant_bits)), dtype=torch.uint8)
    return x_codes.new_empty((n, ho, wo, c_out), dtype=out_dtype)
