"""The ``hybridops::`` custom ops: argument checks, backend dispatch, fake (meta) kernels, autograd.

Every op takes a ``backend`` string (a name from the registry, :mod:`hybridops.ops.registry`:
``torch``, ``triton``, ``cuda``, ``onednn``) already resolved by the caller (:func:`hybridops.backend_selection.resolve_backend`), so the backend that ran is never a guess.
The fake implementations compute output shapes only, so ``torch.compile`` and CUDA graphs can
trace through the ops.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake

from ..kernels import derived
from . import reference, registry
from ..kernels.geometry import conv_out_hw
from ..kernels.packing import check_bits, packed_size

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _impl(op: str, backend: str):
    return registry.implementation(backend, op)


def _check(cond: bool, msg) -> None:
    """Raise ValueError(msg) unless cond; ``msg`` may be a callable building the sentence, so
    that the per-call checks of a deployed layer format nothing when they pass."""
    if not cond:
        raise ValueError(msg() if callable(msg) else msg)


def check_qparams(qparams: torch.Tensor, like: torch.Tensor, name: str = "qparams") -> None:
    _check(qparams.dtype == torch.float32 and qparams.shape == (2,),
           lambda: f"{name} must be a float32 tensor [alpha, beta] of shape (2,), got {qparams.dtype} "
                   f"{tuple(qparams.shape)}.")
    _check(qparams.device == like.device, lambda: f"{name} is on {qparams.device} but the input is on {like.device}.")


def _check_channel_vec(t: Optional[torch.Tensor], n: int, like: torch.Tensor, name: str) -> None:
    if t is None:
        return
    _check(t.dim() == 1 and t.shape[0] == n, lambda: f"{name} must have shape ({n},), got {tuple(t.shape)}.")
    _check(t.dtype.is_floating_point, lambda: f"{name} must be floating point, got {t.dtype}.")
    _check(t.device == like.device, lambda: f"{name} is on {t.device} but the input is on {like.device}.")


def check_channel_index(idx: torch.Tensor, name: str, channels: int) -> None:
    """``idx`` holds distinct channel indices in ``[0, channels)``: kernels write through it, so a
    bad index would be an out-of-bounds write, and a repeat would be added once or twice
    depending on the backend. Deployed layers pass the same buffer on every call, so the
    (synchronising) check runs once per buffer version (:mod:`hybridops.kernels.derived`)."""
    if idx.numel() == 0 or is_fake(idx) or idx.device.type == "meta":
        return  # no values to read (a layer built or traced under fake tensors)
    if idx.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # no synchronisation is allowed inside a CUDA graph capture (warm up first)

    def check():
        lo, hi = int(idx.min()), int(idx.max())
        _check(0 <= lo and hi < channels,
               lambda: f"{name} must index channels in [0, {channels}), got values in [{lo}, {hi}].")
        _check(torch.unique(idx).numel() == idx.numel(),
               lambda: f"{name} must hold distinct channel indices (each kept channel is added once), got repeats.")
        return True

    derived.cached("checked_index", (idx,), (name, channels), check)


def check_unsigned8(bits: int, signed: bool, backend: str) -> None:
    _check(not (bits == 8 and not signed and not registry.backend_spec(backend).unsigned8),
           lambda: f"unsigned 8-bit activation codes (0..255) do not fit the {backend} backend's int8 kernels (their "
                   f"activation operand is signed 8-bit); use bits <= 7, or the torch or onednn backend.")


# ----------------------------------------------------------------------------- fake_quantize
@torch.library.custom_op("hybridops::fake_quantize", mutates_args=())
def fake_quantize(x: torch.Tensor, qparams: torch.Tensor, bits: int, signed: bool, backend: str) -> torch.Tensor:
    """Fake-quantized ``x`` (eq 6-7 if ``signed``, else eq 8-9): ``code / levels``, dtype of x."""
    check_bits(bits)
    _check(x.dtype in _FLOAT_DTYPES, lambda: f"fake_quantize expects a floating-point tensor, got {x.dtype}.")
    check_qparams(qparams, x)
    return _impl("fake_quantize", backend)(x, qparams, bits, signed)


@fake_quantize.register_fake
def _(x, qparams, bits, signed, backend):
    return torch.empty_like(x)


def _fake_quantize_setup(ctx, inputs, output):
    x, qparams, bits, signed, backend = inputs
    ctx.save_for_backward(x, qparams)
    ctx.signed = signed


def _fake_quantize_backward(ctx, grad):
    # Straight-through estimator: inside the interval (0 < u < 1) the rounding is treated as
    # identity, so d out / d x = alpha, d out / d alpha = x and d out / d beta = sign(x)
    # (1 for unsigned codes). The chain to (c, d) runs through qparams in autograd.
    x, qparams = ctx.saved_tensors
    xf, g = x.float(), grad.float()
    alpha, beta = qparams[0], qparams[1]
    mag = xf.abs() if ctx.signed else xf
    u = mag * alpha + beta
    inside = (u > 0) & (u < 1)
    gi = torch.where(inside, g, torch.zeros_like(g))
    s = torch.sign(xf) if ctx.signed else torch.ones_like(xf)
    grad_x = (gi * alpha).to(x.dtype)
    grad_q = torch.stack(((gi * xf).sum(), (gi * s).sum()))
    return grad_x, grad_q, None, None, None


fake_quantize.register_autograd(_fake_quantize_backward, setup_context=_fake_quantize_setup)


# ----------------------------------------------------------------------------- quantize_activate
def _quantize_activate_impl(x, qparams, bits, signed, bn_scale, bn_shift, relu, fp_in_idx, slice_dtype, backend):
    """The body of :func:`quantize_activate`: its checks, then the backend's kernel."""
    check_bits(bits)
    _check(x.dim() == 4, lambda: f"quantize_activate expects x of shape (N, C, H, W), got {tuple(x.shape)}.")
    _check(x.dtype in _FLOAT_DTYPES, lambda: f"quantize_activate expects a floating-point x, got {x.dtype}.")
    check_qparams(qparams, x)
    c = x.shape[1]
    _check_channel_vec(bn_scale, c, x, "bn_scale")
    _check_channel_vec(bn_shift, c, x, "bn_shift")
    if fp_in_idx is not None:
        _check(fp_in_idx.dim() == 1 and fp_in_idx.dtype in (torch.int32, torch.int64),
               lambda: f"fp_in_idx must be a 1-D int32/int64 index tensor, got {fp_in_idx.dtype} "
                       f"{tuple(fp_in_idx.shape)}.")
        _check(fp_in_idx.device == x.device, lambda: f"fp_in_idx is on {fp_in_idx.device} but x is on {x.device}.")
    check_unsigned8(bits, signed, backend)
    return _impl("quantize_activate", backend)(x, qparams, bits, signed, bn_scale, bn_shift, relu, fp_in_idx, slice_dtype)


@torch.library.custom_op("hybridops::quantize_activate", mutates_args=())
def quantize_activate(
    x: torch.Tensor,
    qparams: torch.Tensor,
    bits: int,
    signed: bool,
    bn_scale: Optional[torch.Tensor],
    bn_shift: Optional[torch.Tensor],
    relu: bool,
    fp_in_idx: Optional[torch.Tensor],
    slice_dtype: Optional[torch.dtype],
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused quantize-activate; see :func:`hybridops.ops.reference.quantize_activate`."""
    return _quantize_activate_impl(x, qparams, bits, signed, bn_scale, bn_shift, relu, fp_in_idx, slice_dtype,
                                       backend)


@quantize_activate.register_fake
def _(x, qparams, bits, signed, bn_scale, bn_shift, relu, fp_in_idx, slice_dtype, backend):
    n, c, h, w = x.shape
    codes = x.new_empty((n, h, w, registry.code_bytes(c, bits, backend)), dtype=torch.uint8)
    if fp_in_idx is None:
        return x.new_empty((0,), dtype=slice_dtype or x.dtype), codes
    return x.new_empty((n, h, w, fp_in_idx.shape[0]), dtype=slice_dtype or x.dtype), codes


def _qa_setup(ctx, inputs, output):
    x, qparams, bits, signed, bn_scale, bn_shift, relu, fp_in_idx, slice_dtype, backend = inputs
    ctx.save_for_backward(x, bn_scale, bn_shift, fp_in_idx)
    ctx.relu = relu


def _qa_backward(ctx, grad_slice, grad_codes):
    # Codes are integers and carry no gradient (the quantized branch is frozen in deployed
    # mode); the input receives the gradient of the float slice read by the pruned branch.
    x, bn_scale, bn_shift, fp_in_idx = ctx.saved_tensors
    if fp_in_idx is None or grad_slice is None or grad_slice.numel() == 0:
        return (torch.zeros_like(x),) + (None,) * 9
    idx = fp_in_idx.to(torch.long)
    xs = x.index_select(1, idx).permute(0, 2, 3, 1).float()
    g = grad_slice.float()
    sc = bn_scale.float().index_select(0, idx) if bn_scale is not None else None
    if ctx.relu:
        t = xs * sc if sc is not None else xs
        if bn_shift is not None:
            t = t + bn_shift.float().index_select(0, idx)
        g = torch.where(t > 0, g, torch.zeros_like(g))
    if sc is not None:
        g = g * sc
    grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    # fp_in_idx may repeat a channel (a grouped conv's kept outputs that share a group read the
    # same input channels): the gradients of the copies add up.
    grad_x.index_add_(1, idx, g.permute(0, 3, 1, 2))
    return (grad_x.to(x.dtype),) + (None,) * 9


quantize_activate.register_autograd(_qa_backward, setup_context=_qa_setup)


# ----------------------------------------------------------------------------- qconv2d
def qconv2d_out_shape(x_codes, w_packed, stride, padding, dilation) -> Tuple[int, int, int, int]:
    n, h, w, _ = x_codes.shape
    c_out, kh, kw, _ = w_packed.shape
    ho, wo = conv_out_hw(h, w, kh, kw, stride, padding, dilation)
    return n, ho, wo, c_out


def _qconv2d_impl(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding,
                      dilation, groups, relu, fp_out, fp_out_idx, requant_qparams, requant_bits, requant_signed, out_dtype,
                      backend):
    """The body of :func:`qconv2d`: its checks, then the backend's kernel."""
    _check_qconv_args(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding,
                      dilation, groups, relu, fp_out, fp_out_idx, requant_qparams, requant_bits, out_dtype, backend)
    return _impl("qconv2d", backend)(
        x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding, dilation, groups,
        relu, fp_out, fp_out_idx, requant_qparams, requant_bits, requant_signed, out_dtype)


@torch.library.custom_op("hybridops::qconv2d", mutates_args=())
def qconv2d(
    x_codes: torch.Tensor,
    w_packed: torch.Tensor,
    in_channels: int,
    bits_a: int,
    a_signed: bool,
    bits_w: int,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    relu: bool,
    fp_out: Optional[torch.Tensor],
    fp_out_idx: Optional[torch.Tensor],
    requant_qparams: Optional[torch.Tensor],
    requant_bits: int,
    requant_signed: bool,
    out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    """Packed low-bit implicit-GEMM convolution with the hybrid epilogue; see
    :func:`hybridops.ops.reference.qconv2d` for the exact semantics."""
    return _qconv2d_impl(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding,
                             dilation, groups, relu, fp_out, fp_out_idx, requant_qparams, requant_bits, requant_signed,
                             out_dtype, backend)


def _check_qconv_args(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding,
                      dilation, groups, relu, fp_out, fp_out_idx, requant_qparams, requant_bits, out_dtype, backend):
    check_bits(bits_a, "bits_a")
    check_bits(bits_w, "bits_w")
    _check(x_codes.dtype == torch.uint8 and x_codes.dim() == 4,
           lambda: f"x_codes must be packed uint8 codes (N, H, W, packed C), got {x_codes.dtype} "
                   f"{tuple(x_codes.shape)}.")
    _check(w_packed.dtype == torch.uint8 and w_packed.dim() == 4,
           lambda: f"w_packed must be packed uint8 weights (C_out, KH, KW, packed C_in/groups), got {w_packed.dtype} "
                   f"{tuple(w_packed.shape)}.")
    _check(w_packed.device == x_codes.device,
           lambda: f"w_packed is on {w_packed.device} but x_codes is on {x_codes.device}.")
    _check(groups >= 1 and in_channels % groups == 0 and w_packed.shape[0] % groups == 0,
           lambda: f"groups={groups} must divide in_channels={in_channels} and C_out={w_packed.shape[0]}.")
    code_bytes = registry.code_bytes(in_channels, bits_a, backend)
    _check(x_codes.shape[3] == code_bytes,
           lambda: f"x_codes has {x_codes.shape[3]} bytes per pixel, expected {code_bytes} for "
                   f"in_channels={in_channels} at {bits_a} bits (NHWC packed layout).")
    _check(w_packed.shape[3] == packed_size(in_channels // groups, bits_w),
           lambda: f"w_packed has {w_packed.shape[3]} bytes per tap, expected "
                   f"{packed_size(in_channels // groups, bits_w)} for {in_channels // groups} input channels per group at {bits_w} bits.")
    _check(len(stride) == 2 and min(stride) >= 1, lambda: f"stride must be two positive ints, got {list(stride)}.")
    _check(len(dilation) == 2 and min(dilation) >= 1,
           lambda: f"dilation must be two positive ints, got {list(dilation)}.")
    _check(len(padding) == 4 and min(padding) >= 0,
           lambda: f"padding must be four non-negative ints (top, bottom, left, right), got {list(padding)}.")
    _, ho, wo, _ = qconv2d_out_shape(x_codes, w_packed, stride, padding, dilation)
    _check(ho >= 1 and wo >= 1,
           lambda: f"the convolution has an empty output ({ho}x{wo}): input {x_codes.shape[1]}x{x_codes.shape[2]} is "
                   f"smaller than the dilated kernel after padding.")
    check_unsigned8(bits_a, a_signed, backend)
    c_out = w_packed.shape[0]
    if out_dtype == torch.int32:
        _check(bias is None and not relu and fp_out is None and requant_qparams is None,
               "out_dtype=torch.int32 returns raw accumulators; bias, relu, fp_out and requantization need a "
               "float out_dtype.")
    else:
        _check(out_dtype in _FLOAT_DTYPES, lambda: f"out_dtype must be int32 or a float dtype, got {out_dtype}.")
    _check_channel_vec(scale, c_out, x_codes, "scale")
    _check_channel_vec(bias, c_out, x_codes, "bias")
    _check((fp_out is None) == (fp_out_idx is None), "fp_out and fp_out_idx must be given together.")
    if fp_out is not None:
        n, ho_, wo_, _ = qconv2d_out_shape(x_codes, w_packed, stride, padding, dilation)
        _check(fp_out_idx.dim() == 1 and fp_out_idx.dtype in (torch.int32, torch.int64),
               lambda: f"fp_out_idx must be a 1-D int32/int64 index tensor, got {fp_out_idx.dtype} {tuple(fp_out_idx.shape)}.")
        _check(tuple(fp_out.shape) == (n, ho_, wo_, fp_out_idx.shape[0]),
               lambda: f"fp_out must have shape {(n, ho_, wo_, fp_out_idx.shape[0])} (NHWC, kept channels), got "
               f"{tuple(fp_out.shape)}.")
        _check(fp_out.dtype in _FLOAT_DTYPES, lambda: f"fp_out must be floating point, got {fp_out.dtype}.")
        _check(fp_out.device == x_codes.device and fp_out_idx.device == x_codes.device,
               "fp_out and fp_out_idx must be on the same device as x_codes.")
        check_channel_index(fp_out_idx, "fp_out_idx", c_out)
    if requant_qparams is not None:
        check_bits(requant_bits, "requant_bits")
        check_qparams(requant_qparams, x_codes, "requant_qparams")


@qconv2d.register_fake
def _(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding, dilation, groups, relu,
      fp_out, fp_out_idx, requant_qparams, requant_bits, requant_signed, out_dtype, backend):
    n, ho, wo, c_out = qconv2d_out_shape(x_codes, w_packed, stride, padding, dilation)
    if requant_qparams is not None:
        return x_codes.new_empty((n, ho, wo, registry.code_bytes(c_out, requant_bits, backend)), dtype=torch.uint8)
    return x_codes.new_empty((n, ho, wo, c_out), dtype=out_dtype)


def _qconv_setup(ctx, inputs, output):
    fp_out, fp_out_idx, requant_qparams, relu = inputs[13], inputs[14], inputs[15], inputs[12]
    ctx.has_fp = fp_out is not None
    ctx.relu = relu
    ctx.requant = requant_qparams is not None
    ctx.fp_dtype = fp_out.dtype if fp_out is not None else None
    ctx.save_for_backward(fp_out_idx, output if (relu and fp_out is not None) else None)


def _qconv_backward(ctx, grad):
    # Only the pruned branch's output is differentiable: the quantized branch is frozen
    # integer arithmetic (the online update trains the full-precision branch alone).
    grads = [None] * 20
    if ctx.has_fp:
        if ctx.requant:
            raise RuntimeError("qconv2d cannot backpropagate through re-quantized (integer) outputs; "
                               "use a float out_dtype when the pruned branch is being trained.")
        fp_out_idx, out = ctx.saved_tensors
        g = grad.float()
        if ctx.relu:
            g = torch.where(out > 0, g, torch.zeros_like(g))
        grads[13] = g.index_select(-1, fp_out_idx.to(torch.long)).to(ctx.fp_dtype)
    return tuple(grads)


qconv2d.register_autograd(_qconv_backward, setup_context=_qconv_setup)


# ----------------------------------------------------------------------------- hybrid_conv2d
def fused_branch(backend: str, m: int, c_out: int, cin_g: int, kept: int, taps: int, slice_channels: int,
                 slice_dtype: torch.dtype, groups: int, device: torch.device):
    """The backend's fused kernel (``fused_hybrid_conv2d``: the pruned branch computed inside the
    integer conv) when it has one and its own roofline (``fuse_pruned_branch``) says fusing pays
    for this layer, else None: the one place where that decision is made."""
    fused = registry.optional_implementation(backend, "fused_hybrid_conv2d")
    pays = registry.optional_implementation(backend, "fuse_pruned_branch")
    if fused is None or pays is None:
        return None
    return fused if pays(m, c_out, cin_g, kept, taps, slice_channels, slice_dtype, groups, device) else None


def _hybrid_conv2d_impl(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding,
                            dilation, groups, relu, fp_in, fp_weight, fp_bias, fp_out_idx, requant_qparams, requant_bits,
                            requant_signed, out_dtype, backend):
    """The body of :func:`hybrid_conv2d`: its checks, then the fused kernel or the composition."""
    _check(out_dtype != torch.int32, "hybrid_conv2d adds the pruned branch in the float epilogue: out_dtype must be "
                                     "a float dtype (or use qconv2d for raw accumulators).")
    _check_qconv_args(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding,
                      dilation, groups, relu, None, None, requant_qparams, requant_bits, out_dtype, backend)
    n, ho, wo, c_out = qconv2d_out_shape(x_codes, w_packed, stride, padding, dilation)
    _check(fp_in.dim() == 4 and tuple(fp_in.shape[:3]) == tuple(x_codes.shape[:3]) and fp_in.dtype in _FLOAT_DTYPES,
           lambda: f"fp_in must be the NHWC float slice {tuple(x_codes.shape[:3])} + (C_f,) of the codes' pixels, "
                   f"got {fp_in.dtype} {tuple(fp_in.shape)}.")
    _check(fp_weight.dim() == 4 and fp_weight.shape[1] == fp_in.shape[3]
           and tuple(fp_weight.shape[2:]) == tuple(w_packed.shape[1:3]) and fp_weight.dtype in _FLOAT_DTYPES,
           lambda: f"fp_weight must be float (K_p, {fp_in.shape[3]}, {w_packed.shape[1]}, {w_packed.shape[2]}) "
                   f"(kept rows, slice channels, the conv's kernel), got {fp_weight.dtype} {tuple(fp_weight.shape)}.")
    _check(fp_out_idx.dim() == 1 and fp_out_idx.shape[0] == fp_weight.shape[0],
           lambda: f"fp_out_idx must hold one output channel per kept row ({fp_weight.shape[0]}), got "
                   f"{tuple(fp_out_idx.shape)}.")
    _check(fp_bias is None or (tuple(fp_bias.shape) == (fp_weight.shape[0],) and fp_bias.dtype in _FLOAT_DTYPES),
           lambda: f"fp_bias must be float ({fp_weight.shape[0]},), got {fp_bias.dtype} {tuple(fp_bias.shape)}.")
    _check(all(t.device == x_codes.device for t in (fp_in, fp_weight) + ((fp_bias,) if fp_bias is not None else ())),
           "fp_in, fp_weight and fp_bias must be on the same device as x_codes.")
    _check(fp_out_idx.dtype in (torch.int32, torch.int64) and fp_out_idx.device == x_codes.device,
           lambda: f"fp_out_idx must be an int32/int64 index tensor on {x_codes.device}, got {fp_out_idx.dtype} on "
                   f"{fp_out_idx.device}.")
    check_channel_index(fp_out_idx, "fp_out_idx", c_out)
    fused = fused_branch(backend, n * ho * wo, c_out, in_channels // groups, fp_weight.shape[0],
                         w_packed.shape[1] * w_packed.shape[2], fp_in.shape[3], fp_in.dtype, groups, x_codes.device)
    if fused is not None:
        return fused(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding, dilation,
                     groups, relu, fp_in, fp_weight, fp_bias, fp_out_idx, requant_qparams, requant_bits, requant_signed,
                     out_dtype)
    fp_out = reference.pruned_branch_conv(fp_in, fp_weight, fp_bias, stride, padding, dilation)
    return _impl("qconv2d", backend)(
        x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding, dilation, groups,
        relu, fp_out, fp_out_idx, requant_qparams, requant_bits, requant_signed, out_dtype)


@torch.library.custom_op("hybridops::hybrid_conv2d", mutates_args=())
def hybrid_conv2d(
    x_codes: torch.Tensor,
    w_packed: torch.Tensor,
    in_channels: int,
    bits_a: int,
    a_signed: bool,
    bits_w: int,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    relu: bool,
    fp_in: torch.Tensor,
    fp_weight: torch.Tensor,
    fp_bias: Optional[torch.Tensor],
    fp_out_idx: torch.Tensor,
    requant_qparams: Optional[torch.Tensor],
    requant_bits: int,
    requant_signed: bool,
    out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    """A deployed hybrid layer at inference, from its input codes and float slice: the quantized
    branch's packed conv plus the pruned branch's conv (ungrouped) in one op; see
    :func:`hybridops.ops.reference.hybrid_conv2d`. A backend with a fused kernel (``triton``)
    computes the branch inside the qconv kernel where its roofline says that pays; every other
    case runs the branch as its own conv. Not differentiable: training goes through
    :func:`qconv2d` with ``fp_out``."""
    return _hybrid_conv2d_impl(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride,
                                   padding, dilation, groups, relu, fp_in, fp_weight, fp_bias, fp_out_idx, requant_qparams,
                                   requant_bits, requant_signed, out_dtype, backend)


@hybrid_conv2d.register_fake
def _(x_codes, w_packed, in_channels, bits_a, a_signed, bits_w, scale, bias, stride, padding, dilation, groups, relu,
      fp_in, fp_weight, fp_bias, fp_out_idx, requant_qparams, requant_bits, requant_signed, out_dtype, backend):
    n, ho, wo, c_out = qconv2d_out_shape(x_codes, w_packed, stride, padding, dilation)
    if requant_qparams is not None:
        return x_codes.new_empty((n, ho, wo, registry.code_bytes(c_out, requant_bits, backend)), dtype=torch.uint8)
    return x_codes.new_empty((n, ho, wo, c_out), dtype=out_dtype)
