"""``hybridops::hybrid_layer``: a whole deployed layer in one op.

A deployed layer (:mod:`hybridops.deployed`) makes exactly one call per forward,
:func:`hybrid_layer`, with its buffers and its :class:`~hybridops.ops.spec.LayerSpec`. The op
carries out the whole layer on the layer's backend: the fused quantize-activate pass (codes and
the pruned branch's float slice), the integer conv, the pruned branch (inside the integer
conv's kernel where the backend's roofline says that pays: :func:`~.custom_ops.fused_branch`,
else as its own conv, on the backend's prepacked float conv where it has one), the epilogue
(bias, the branch's sum into its kept channels, a residual input, ReLU) and the optional
re-quantization of the output; or the float paths (both branches merged into one conv for a full-precision input; the
pruned branch alone). How a backend carries a layer out is decided here and in the backend, never
in the layer.

Output layout: ``(N, C_out, Ho, Wo)`` in the input's memory format (channels_last in,
channels_last out; otherwise contiguous) and dtype; NHWC codes ``(N, Ho, Wo, bytes)`` when the
layer re-quantizes for a chained consumer; channels_last NCHW in the model's float dtype (that of
``fp_weight``) for a codes input.

Two entry points, one implementation (:func:`run_layer`):

* the registered custom op (fake kernel, autograd, opcheck): used whenever gradients are
  needed, under ``torch.compile`` / export tracing and under a dispatch mode. It checks the input
  on every call and the layer's tensors against the spec once per version of each;
* eager inference (no gradient needed, nothing tracing) calls :func:`run_layer` directly: the
  dispatcher's own cost (11-16 us per call measured on the project's 2-core CI machine, more than
  the whole host budget of a layer) would be paid for nothing there. The layer validated its
  tensors when it was built or loaded (:func:`check_layer_tensors`); per call only what a wrong
  input can reach is checked (:func:`check_input`); the layer checks its tensors again when one is
  replaced or an index buffer changes.

Gradients (online updates train the pruned branch): only ``x``, ``fp_weight``, ``fp_bias`` and the
``residual`` are differentiable; the quantized branch is frozen integer data, so the gradient reaches ``x``
through the pruned branch only (and through the merged conv for a full-precision input).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from ..kernels import derived
from ..kernels.geometry import conv_out_hw
from ..kernels.packing import levels, packed_size, unpack_weight
from . import reference, registry
from .custom_ops import _FLOAT_DTYPES, _check, check_channel_index, check_qparams, check_unsigned8, fused_branch
from .spec import LayerSpec, spec_from_ints

_TENSOR_NAMES = ("w_packed", "scale", "bias", "in_qparams", "fp_weight", "fp_bias", "fp_in_idx", "fp_out_idx",
                 "out_qparams")


# ----------------------------------------------------------------------------- checks
def check_input(spec: LayerSpec, x: torch.Tensor, like: torch.Tensor, backend: str,
                residual: Optional[torch.Tensor] = None) -> None:
    """The per-call checks: what a wrong input can reach (rank, channel count or code width,
    dtype, device, a size the kernel does not fit, the residual's shape). Plain branches: this
    runs on every call."""
    if spec.codes_input:
        width = registry.code_bytes(spec.in_channels, spec.bits_a, backend)
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[3] != width:
            raise ValueError(f"this {spec.kind} layer is chained after a quantized layer and expects its codes "
                             f"(N, H, W, {width}) uint8, got {x.dtype} {tuple(x.shape)}.")
        h, w = x.shape[1], x.shape[2]
    else:
        if x.dim() != 4 or x.shape[1] != spec.in_channels:
            raise ValueError(f"this {spec.kind} layer expects input (N, {spec.in_channels}, H, W), got "
                             f"{tuple(x.shape)}.")
        if not x.dtype.is_floating_point:
            raise ValueError(f"this {spec.kind} layer expects a floating-point input, got {x.dtype}.")
        h, w = x.shape[2], x.shape[3]
    if x.device != like.device:
        raise ValueError(f"the input is on {x.device} but the layer's weights are on {like.device}: move one of "
                         f"them.")
    min_h, min_w = spec.min_input_hw
    if h < min_h or w < min_w:
        raise ValueError(_empty_output_sentence(spec, h, w))
    if spec.residual or residual is not None:
        _check_residual(spec, x, like, residual, h, w)


def output_dtype(spec: LayerSpec, x: torch.Tensor, fp_weight: torch.Tensor) -> torch.dtype:
    """The dtype of a float output: the input's, or the model's (``fp_weight``'s) for codes in."""
    return fp_weight.dtype if spec.codes_input else x.dtype


def _check_residual(spec: LayerSpec, x, like, residual, h: int, w: int) -> None:
    if not spec.residual:
        raise ValueError(f"this {spec.kind} layer adds no residual (its spec has residual=False): call it without "
                         f"one.")
    if residual is None:
        raise ValueError(f"this {spec.kind} layer adds a residual in its epilogue (deploy-time fusion folded the "
                         f"model's skip connection into it): call it with the residual as well.")
    shape = (x.shape[0], spec.out_channels, *conv_out_hw(h, w, *spec.kernel_size, spec.stride, spec.padding,
                                                          spec.dilation))
    dt = output_dtype(spec, x, like)
    if tuple(residual.shape) != shape or residual.dtype != dt or residual.device != like.device:
        raise ValueError(f"the residual must be the layer's output shape {shape} in {dt} on {like.device}, got "
                         f"{residual.dtype} {tuple(residual.shape)} on {residual.device}.")


def _empty_output_sentence(spec: LayerSpec, h: int, w: int) -> str:
    ho, wo = conv_out_hw(h, w, *spec.kernel_size, spec.stride, spec.padding, spec.dilation)
    return (f"the convolution has an empty output ({ho}x{wo}): input {h}x{w} is smaller than the dilated kernel "
            f"{tuple(spec.kernel_size)} after padding.")


def check_layer_tensors(spec: LayerSpec, w_packed, scale, bias, in_qparams, fp_weight, fp_bias, fp_in_idx, fp_out_idx,
                        out_qparams, backend: str) -> None:
    """Every tensor of a layer against its spec (shapes, dtypes, devices, index ranges): run once
    where a deployed layer is built or loaded, and by the custom op on every call."""
    registry.backend_spec(backend)
    kh, kw = spec.kernel_size
    cin_g, dev = spec.in_channels // spec.groups, fp_weight.device
    has_q = spec.bits_w is not None
    for name, t in zip(_TENSOR_NAMES, (w_packed, scale, bias, in_qparams, fp_weight, fp_bias, fp_in_idx, fp_out_idx,
                                       out_qparams)):
        _check(t is None or t.device == dev,
               lambda: f"{name} is on {t.device} but fp_weight is on {dev}: a layer's tensors share one device.")
    _check((w_packed is not None) == has_q and (scale is not None) == has_q,
           "w_packed and scale are given exactly when the layer has a quantized branch (bits_w).")
    _check((in_qparams is not None) == (spec.bits_a is not None),
           "in_qparams is given exactly when the layer quantizes its input (bits_a).")
    _check((out_qparams is not None) == (spec.out_bits is not None),
           "out_qparams is given exactly when the layer re-quantizes its output (out_bits).")
    if has_q:
        shape = (spec.out_channels, kh, kw, packed_size(cin_g, spec.bits_w))
        _check(w_packed.dtype == torch.uint8 and tuple(w_packed.shape) == shape,
               lambda: f"w_packed must be uint8 {shape}, got {w_packed.dtype} {tuple(w_packed.shape)}.")
        for name, t in (("scale", scale), ("bias", bias)):
            _check(t is None or (t.dtype == torch.float32 and tuple(t.shape) == (spec.out_channels,)),
                   lambda: f"{name} must be float32 ({spec.out_channels},), got {t.dtype} {tuple(t.shape)}.")
    _check(bias is None or has_q, "bias belongs to the quantized branch (the pruned branch has fp_bias).")
    for name, q in (("in_qparams", in_qparams), ("out_qparams", out_qparams)):
        if q is not None:
            check_qparams(q, fp_weight, name)
    k = fp_weight.shape[0]
    fp_cin = cin_g if spec.groups > 1 else (spec.in_channels if fp_in_idx is None else fp_in_idx.shape[0])
    _check(fp_weight.dtype in _FLOAT_DTYPES and tuple(fp_weight.shape) == (k, fp_cin, kh, kw),
           lambda: f"fp_weight must be float (K, {fp_cin}, {kh}, {kw}), got {fp_weight.dtype} "
                   f"{tuple(fp_weight.shape)}.")
    _check(has_q or k > 0, "a layer needs a quantized branch (bits_w) or kept full-precision channels.")
    _check(fp_bias is None or (fp_bias.dtype in _FLOAT_DTYPES and tuple(fp_bias.shape) == (k,)),
           lambda: f"fp_bias must be float ({k},), got {fp_bias.dtype} {tuple(fp_bias.shape)}.")
    _check(fp_out_idx.dtype in (torch.int32, torch.int64) and tuple(fp_out_idx.shape) == (k,),
           lambda: f"fp_out_idx must be int32/int64 ({k},), got {fp_out_idx.dtype} {tuple(fp_out_idx.shape)}.")
    check_channel_index(fp_out_idx, "fp_out_idx", spec.out_channels)
    if fp_in_idx is not None:
        _check(fp_in_idx.dim() == 1 and fp_in_idx.dtype in (torch.int32, torch.int64),
               lambda: f"fp_in_idx must be a 1-D int32/int64 index tensor, got {fp_in_idx.dtype} "
                       f"{tuple(fp_in_idx.shape)}.")
        if spec.groups == 1:
            check_channel_index(fp_in_idx, "fp_in_idx", spec.in_channels)
        else:
            _check(fp_in_idx.shape[0] == k * cin_g, lambda: f"a grouped layer's fp_in_idx lists the {cin_g} input "
                                                            f"channels of each of the {k} kept channels' groups.")
            if fp_in_idx.numel() and not is_fake(fp_in_idx) and fp_in_idx.device.type != "meta":
                lo, hi = int(fp_in_idx.min()), int(fp_in_idx.max())  # (repeats are expected here)
                _check(0 <= lo and hi < spec.in_channels, lambda: f"fp_in_idx must index channels in [0, "
                                                                  f"{spec.in_channels}), got values in [{lo}, {hi}].")
    if spec.bits_a is not None:
        check_unsigned8(spec.bits_a, spec.a_signed, backend)


def check_fp_dtype(backend: str, dtype: torch.dtype) -> None:
    """The pruned branch can compute in ``dtype`` on ``backend`` here: a backend with its own
    float conv (``fp_conv2d``) lists the dtypes it runs on this machine (``fp_conv_dtypes``)."""
    ns = registry.loaded(backend)
    _check(getattr(ns, "fp_conv2d", None) is None or dtype in ns.fp_conv_dtypes,
           lambda: f"the {backend} backend has no {dtype} convolution on this machine (bf16 needs AVX-512 BF16, AMX "
                   f"or AVX-512 BW/VL/DQ on the CPU), so the pruned branch cannot run in it here: use fp_dtype=None.")


# ----------------------------------------------------------------------------- pieces
def dequantized_weight(spec: LayerSpec, w_packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes * scale * levels_a``: the quantized branch's float weight (C_out, C_in/g, KH, KW)
    as it acts on the input's own scale (a float input is not rescaled)."""
    codes = unpack_weight(w_packed, spec.bits_w, spec.in_channels // spec.groups).float()
    la = levels(spec.bits_a, spec.a_signed) if spec.bits_a is not None else 1
    return codes * (scale * la).view(-1, 1, 1, 1)


def merged_weight_and_bias(spec: LayerSpec, w_packed, scale, bias, fp_weight, fp_bias, fp_in_idx, fp_out_idx,
                           dtype: torch.dtype):
    """For a full-precision input both branches are float ops on the same input, so they merge
    into one: ``dequant(W_q) + scatter(W_p)`` and ``bias + scatter(fp_bias)``. 4-D weights."""
    w = dequantized_weight(spec, w_packed, scale).to(dtype)
    if fp_weight.shape[0]:
        fw = fp_weight.to(dtype)
        if fp_in_idx is not None and spec.groups == 1:
            fw = fw.new_zeros((fw.shape[0], spec.in_channels, *fw.shape[2:])).index_copy(1, fp_in_idx, fw)
        w = w.index_add(0, fp_out_idx, fw)
    b = None if bias is None else bias.to(dtype)
    if fp_bias is not None:
        b = (b if b is not None else w.new_zeros(spec.out_channels)).index_add(0, fp_out_idx, fp_bias.to(dtype))
    return w, b


def _fp_groups(spec: LayerSpec, kept: int) -> int:
    # The pruned branch of a grouped conv keeps arbitrary output channels, so it runs as a grouped
    # conv with one group per kept channel, over the input channels of that channel's group.
    return 1 if spec.groups == 1 else max(1, kept)


def _float_conv(ns, spec: LayerSpec, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                padding, groups: int, relu: bool = False) -> torch.Tensor:
    """A float conv (or linear) in ``x``'s dtype, on the backend's prepacked conv where it has one
    for that dtype: ``(N, K, Ho, Wo)``, then ``relu`` in place on that fresh output (torch's ReLU,
    which keeps a NaN: oneDNN's ReLU post-op makes it 0, and NaN inputs must propagate)."""
    dt = x.dtype
    if spec.kind == "linear":
        n, c, k = x.shape[0], x.shape[1], weight.shape[0]
        fast_linear = getattr(ns, "fp_linear", None)
        if fast_linear is not None and dt in ns.fp_conv_dtypes:
            y = fast_linear(x.reshape(n, c), weight, bias).view(n, k, 1, 1)
        else:
            w = weight.view(k, c) if weight.dtype == dt else weight.view(k, c).to(dt)
            b = bias if (bias is None or bias.dtype == dt) else bias.to(dt)
            y = F.linear(x.view(n, c), w, b).view(n, k, 1, 1)
        return y.relu_() if relu else y
    fast = getattr(ns, "fp_conv2d", None)
    if fast is not None and dt in ns.fp_conv_dtypes:
        y = fast(x, weight, bias, spec.stride, padding, spec.dilation, groups)
    else:
        y = reference.float_conv2d(x, weight.to(dt), None if bias is None else bias.to(dt), spec.stride, padding,
                                   spec.dilation, groups)
    return y.relu_() if relu else y


def pruned_branch_inference(spec: LayerSpec, x: torch.Tensor, fp_weight: torch.Tensor, fp_bias: Optional[torch.Tensor],
                            columns: Optional[torch.Tensor], relu: bool, backend: str) -> Optional[torch.Tensor]:
    """The pruned branch of an ungrouped layer on its kept channels, for inference (the thin
    network of :mod:`hybridops.thin`): ``x`` holds the input channels the branch reads (or, with
    ``columns``, those of them at positions ``columns``) in the compute dtype; zero padding of any
    shape. Runs on the backend's prepacked float conv / linear, with the
    column-sliced weight made once per weight version; returns None where the backend has none for
    ``x``'s dtype (the caller then runs plain torch ops). ``relu``: then torch's ReLU, in place."""
    ns = registry.loaded(backend)
    fast = getattr(ns, "fp_linear" if spec.kind == "linear" else "fp_conv2d", None)
    if fast is None or x.dtype not in ns.fp_conv_dtypes:
        return None
    w = fp_weight if columns is None else derived.cached("thin_weight_columns", (fp_weight, columns), (),
                                                         lambda: fp_weight.index_select(1, columns))
    if spec.kind == "linear":  # (..., K): the rows of any leading shape
        y = _float_conv(ns, spec, x.reshape(-1, x.shape[-1], 1, 1), w, fp_bias, (0, 0, 0, 0), 1, relu)
        return y.reshape(*x.shape[:-1], w.shape[0])
    return _float_conv(ns, spec, x, w, fp_bias, spec.padding, 1, relu)


def _identity_index(c: int, device: torch.device) -> torch.Tensor:
    """``arange(c)``: the slice index of a pruned branch that reads every input channel (a
    constant, made once per size and device)."""
    return derived.cached("identity_index", (), (c, device), lambda: torch.arange(c, device=device))


def _mode_pad_index(n: int, before: int, after: int, mode: str, device) -> torch.Tensor:
    """Source row of each padded row under ``mode``: ``F.pad``'s reflect / replicate / circular
    padding is this gather (used to send gradients back through it)."""
    i = torch.arange(-before, n + after, device=device)
    if mode == "reflect":
        i = i.abs()
        return torch.where(i > n - 1, 2 * (n - 1) - i, i)
    if mode == "replicate":
        return i.clamp(0, n - 1)
    return i.remainder(n)


def _output(y_nhwc: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """NCHW of the kernels' NHWC output: as it is (channels_last) or a contiguous copy."""
    y = y_nhwc.permute(0, 3, 1, 2)
    if channels_last and y_nhwc.is_contiguous():
        return y
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y.contiguous()


def _unviewed(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor of its own over the same memory (no copy): autograd forbids in-place ops
    on a view made inside a custom op, and ``ReLU(inplace=True)`` after a layer is one (the op's
    output is often a view: ``_output``'s permute, or ``contiguous()`` with nothing to do, e.g. a
    1x1 output). The eager path, which calls run_layer directly, needs none of this."""
    if t._base is None:
        return t
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


# ----------------------------------------------------------------------------- the layer
def run_layer(spec: LayerSpec, x, w_packed, scale, bias, in_qparams, fp_weight, fp_bias, fp_in_idx, fp_out_idx,
              out_qparams, residual, fp_dtype: Optional[torch.dtype], backend: str) -> torch.Tensor:
    """The whole layer on ``backend`` (no autograd; arguments already validated)."""
    ns = registry.loaded(backend)
    path = spec.path
    if path == "codes":
        y = _qconv(ns, spec, x, w_packed, scale, bias, spec.padding, None, None, out_qparams, fp_weight.dtype,
                   residual)
        # NHWC written by the kernel: an NCHW view of it is channels_last, as nn.Conv2d gives for
        # channels_last input (the chain's first layer read the model's input)
        return y if out_qparams is not None else _output(y, True)
    nhwc = x.is_contiguous(memory_format=torch.channels_last)
    channels_last = nhwc and not x.is_contiguous()
    if spec.padding_mode != "zeros":
        top, bottom, left, right = spec.padding
        x = F.pad(x, (left, right, top, bottom), mode=spec.padding_mode)
        nhwc = x.is_contiguous(memory_format=torch.channels_last)
    padding = spec.zero_padding
    kept = fp_weight.shape[0]
    fp_dt = fp_dtype or x.dtype
    if path == "merged":
        y = _merged(ns, spec, x, w_packed, scale, bias, fp_weight, fp_bias, fp_in_idx, fp_out_idx, padding)
        return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if path == "fp_only":
        xs = x.index_select(1, fp_in_idx) if fp_in_idx is not None else x
        fp = _float_conv(ns, spec, xs.to(fp_dt), fp_weight, fp_bias, padding, _fp_groups(spec, kept)).to(x.dtype)
        y = fp.new_zeros((fp.shape[0], fp.shape[2], fp.shape[3], spec.out_channels))
        y.index_copy_(3, fp_out_idx, fp.permute(0, 2, 3, 1))
        return _output(F.relu(y) if spec.relu else y, channels_last)
    # hybrid. The quantize pass writes a float NHWC slice when the pruned branch reads a subset or
    # a regrouping of the input channels, when x is not NHWC already (the epilogue reads the
    # branch's output per pixel), or when the branch computes in another dtype; otherwise the
    # branch reads x itself (a write and a read fewer).
    sliced = kept > 0 and (fp_in_idx is not None or fp_dt != x.dtype or not nhwc)
    read = (fp_in_idx if fp_in_idx is not None else _identity_index(spec.in_channels, x.device)) if sliced else None
    flagged = getattr(ns, "quantize_activate_flagged", None)
    if flagged is not None:  # the pass also says whether x held a NaN or an infinity
        x_slice, codes, flag = flagged(x, in_qparams, spec.bits_a, spec.a_signed, None, None, False, read, fp_dt)
        nonfinite = _flag_set(flag)
    else:
        x_slice, codes = ns.quantize_activate(x, in_qparams, spec.bits_a, spec.a_signed, None, None, False, read,
                                              fp_dt)
        nonfinite = False
    y = _hybrid(ns, spec, x, codes, x_slice, sliced, w_packed, scale, bias, fp_weight, fp_bias, fp_out_idx,
                out_qparams, residual, padding, kept, backend, channels_last)
    if nonfinite:
        if out_qparams is not None:
            raise ValueError("the input holds a NaN or an infinity, which the codes this layer hands to the next "
                             "one cannot carry: deploy with fuse=False to propagate it, or clean the input.")
        y = y.masked_fill(_nonfinite_outputs(spec, x, padding), float("nan"))
    return y


def _flag_set(flag) -> bool:
    """Whether the quantize pass saw a NaN or an infinity: a bool from the CPU kernels; an int32
    (1,) tensor on the GPU, read back (a 4-byte copy that waits for the pass). While a CUDA graph
    is captured no read can happen: a captured layer does not propagate non-finite inputs
    (docs/layer_op.md)."""
    if isinstance(flag, bool):
        return flag
    if flag.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return bool(flag.item())


def _nonfinite_outputs(spec: LayerSpec, x: torch.Tensor, padding) -> torch.Tensor:
    """``(N, C_out, Ho, Wo)`` bool: the outputs whose window reads a NaN or an infinity of ``x``
    (any channel of their group), which float PyTorch's conv makes NaN (or infinite): a code
    cannot carry them, so the integer conv's outputs there are replaced by NaN."""
    n, c, h, w = x.shape
    g = spec.groups
    bad = (~torch.isfinite(x)).view(n, g, c // g, h, w).any(2).to(torch.float32)
    ones = bad.new_ones((g, 1, *spec.kernel_size))
    hits = reference.float_conv2d(bad, ones, None, spec.stride, padding, spec.dilation, g) > 0
    return hits.repeat_interleave(spec.out_channels // g, dim=1)


def _residual_sum(y: torch.Tensor, residual: torch.Tensor, relu: bool) -> torch.Tensor:
    """``relu(y + residual)`` in place on the kernel's fresh NHWC output ``y``, in its dtype: the
    unfused model's add and ReLU, for backends whose epilogue does not read a residual."""
    y.add_(residual.permute(0, 2, 3, 1))
    return y.relu_() if relu else y


def _qconv(ns, spec: LayerSpec, codes, w_packed, scale, bias, padding, fp_out, fp_out_idx, out_qparams,
           out_dtype: torch.dtype, residual: Optional[torch.Tensor]) -> torch.Tensor:
    """The backend's integer conv with the layer's epilogue, the residual included (in the
    backend's epilogue where it has ``qconv2d_residual``, else added after it)."""
    args = (codes, w_packed, spec.in_channels, spec.bits_a, spec.a_signed, spec.bits_w, scale, bias, spec.stride,
            padding, spec.dilation, spec.groups)
    rq = (out_qparams, spec.out_bits or 8, spec.out_signed)  # (bits read only with out_qparams)
    if residual is None:
        return ns.qconv2d(*args, spec.relu, fp_out, fp_out_idx, *rq, out_dtype)
    fused = getattr(ns, "qconv2d_residual", None)
    if fused is not None:
        return fused(*args, spec.relu, fp_out, fp_out_idx, *rq, out_dtype, residual.permute(0, 2, 3, 1))
    return _residual_sum(ns.qconv2d(*args, False, fp_out, fp_out_idx, *rq, out_dtype), residual, spec.relu)


def _hybrid(ns, spec: LayerSpec, x, codes, x_slice, sliced: bool, w_packed, scale, bias, fp_weight, fp_bias,
            fp_out_idx, out_qparams, residual, padding, kept: int, backend: str, channels_last: bool) -> torch.Tensor:
    """The integer conv with the pruned branch (fused into it where the backend says so)."""
    fp_out = None
    rq_bits = spec.out_bits or 8  # read only with out_qparams
    if kept:
        fused = None
        if spec.kind == "conv2d" and getattr(ns, "fused_hybrid_conv2d", None) is not None:
            fp_in = x_slice if sliced else x.permute(0, 2, 3, 1)
            n, (ho, wo) = x.shape[0], conv_out_hw(x.shape[2], x.shape[3], *spec.kernel_size, spec.stride, padding,
                                                  spec.dilation)
            fused = fused_branch(backend, n * ho * wo, spec.out_channels, spec.in_channels // spec.groups, kept,
                                 spec.kernel_size[0] * spec.kernel_size[1], fp_in.shape[3], fp_in.dtype, spec.groups,
                                 x.device)
        if fused is not None:
            relu = spec.relu and residual is None  # (with a residual, the ReLU follows the sum)
            y = fused(codes, w_packed, spec.in_channels, spec.bits_a, spec.a_signed, spec.bits_w, scale, bias,
                      spec.stride, padding, spec.dilation, spec.groups, relu, fp_in, fp_weight, fp_bias,
                      fp_out_idx, out_qparams, rq_bits, spec.out_signed, x.dtype)
            if residual is not None:
                y = _residual_sum(y, residual, spec.relu)
            return y if out_qparams is not None else _output(y, channels_last)
        fp_out = _float_conv(ns, spec, x_slice.permute(0, 3, 1, 2) if sliced else x, fp_weight, fp_bias, padding,
                             _fp_groups(spec, kept)).permute(0, 2, 3, 1)
    y = _qconv(ns, spec, codes, w_packed, scale, bias, padding, fp_out, fp_out_idx if fp_out is not None else None,
               out_qparams, x.dtype, residual)
    return y if out_qparams is not None else _output(y, channels_last)


def _merged(ns, spec: LayerSpec, x, w_packed, scale, bias, fp_weight, fp_bias, fp_in_idx, fp_out_idx, padding):
    """Both branches as one float conv, its ReLU included. On a backend with a prepacked float conv the merged weight
    is built once per version of the tensors it comes from (then packed once): measured on
    ResNet-18's 7x7 stem (224x224, 2 threads), 0.68 ms against 1.18 ms for F.conv2d plus 0.11 ms
    to rebuild the weight, with equal results."""
    args = (spec, w_packed, scale, bias, fp_weight, fp_bias, fp_in_idx, fp_out_idx, x.dtype)
    if getattr(ns, "fp_conv2d", None) is not None and x.dtype in ns.fp_conv_dtypes and spec.kind == "conv2d":
        w, b = derived.cached("merged_weight", (w_packed, scale, bias, fp_weight, fp_bias, fp_in_idx, fp_out_idx),
                              (spec, x.dtype), lambda: merged_weight_and_bias(*args))
    else:
        w, b = merged_weight_and_bias(*args)
    return _float_conv(ns, spec, x, w, b, padding, spec.groups, spec.relu)


# ----------------------------------------------------------------------------- the custom op
# Registered with torch.library's low-level API rather than the custom_op decorator: the same
# schema, fake kernel, autograd and opcheck, without the decorator's per-call wrapper (an output
# aliasing check and an extra Python frame: 16 against 8 us per call measured on the CI machine).
# The outputs are always fresh tensors (run_layer never returns an input; a view of its own
# result is made a tensor of its own, _unviewed).
_LIB = torch.library.Library("hybridops", "FRAGMENT")
_LIB.define("hybrid_layer(Tensor x, Tensor? w_packed, Tensor? scale, Tensor? bias, Tensor? in_qparams, "
            "Tensor fp_weight, Tensor? fp_bias, Tensor? fp_in_idx, Tensor fp_out_idx, Tensor? out_qparams, "
            "Tensor? residual, int[] spec, ScalarType? fp_dtype, str backend) -> Tensor")


def _hybrid_layer_impl(x, w_packed, scale, bias, in_qparams, fp_weight, fp_bias, fp_in_idx, fp_out_idx, out_qparams,
                       residual, spec, fp_dtype, backend):
    """A whole deployed layer (see the module docstring); ``spec`` is :meth:`LayerSpec.to_ints`.
    Every argument is checked: the tensors against the spec once per version of each (the one
    cache, kernels/derived.py), the input on every call."""
    s = spec_from_ints(spec)
    tensors = (w_packed, scale, bias, in_qparams, fp_weight, fp_bias, fp_in_idx, fp_out_idx, out_qparams)
    derived.cached("checked_layer", tensors, (s, backend), lambda: check_layer_tensors(s, *tensors, backend) or True)
    check_input(s, x, fp_weight, backend, residual)
    with torch.no_grad():
        return _unviewed(run_layer(s, x, *tensors, residual, fp_dtype, backend))


_LIB.impl("hybrid_layer", _hybrid_layer_impl, "CompositeExplicitAutograd")
hybrid_layer_op = torch.ops.hybridops.hybrid_layer.default


@torch.library.register_fake("hybridops::hybrid_layer")
def _(x, w_packed, scale, bias, in_qparams, fp_weight, fp_bias, fp_in_idx, fp_out_idx, out_qparams, residual, spec,
      fp_dtype, backend):
    s = spec_from_ints(spec)
    check_input(s, x, fp_weight, backend, residual)
    top, bottom, left, right = s.padding
    h, w = (x.shape[1], x.shape[2]) if s.codes_input else (x.shape[2], x.shape[3])
    ho, wo = conv_out_hw(h, w, *s.kernel_size, s.stride, (top, bottom, left, right), s.dilation)
    n = x.shape[0]
    if s.out_bits is not None:
        return x.new_empty((n, ho, wo, registry.code_bytes(s.out_channels, s.out_bits, backend)), dtype=torch.uint8)
    fmt = torch.channels_last if (s.codes_input or _is_channels_last(x)) else torch.contiguous_format
    if s.codes_input:
        return torch.empty((n, s.out_channels, ho, wo), dtype=fp_weight.dtype, device=x.device, memory_format=fmt)
    return torch.empty((n, s.out_channels, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)


def _setup(ctx, inputs, output):
    x, w_packed, scale, bias, in_qparams, fp_weight, fp_bias, fp_in_idx, fp_out_idx, out_qparams, residual, spec, \
        fp_dtype, backend = inputs
    s = spec_from_ints(spec)
    ctx.spec, ctx.fp_dtype, ctx.has_fp_bias, ctx.codes_out = s, fp_dtype, fp_bias is not None, out_qparams is not None
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.save_for_backward(x if not s.codes_input else None, w_packed if s.path == "merged" else None,
                          scale if s.path == "merged" else None, bias if s.path == "merged" else None, fp_weight,
                          fp_in_idx, fp_out_idx, output if s.relu else None)


def _backward(ctx, grad):
    s: LayerSpec = ctx.spec
    x, w_packed, scale, bias, fp_weight, fp_in_idx, fp_out_idx, out = ctx.saved_tensors
    grads = [None] * 14
    if grad is None:
        return tuple(grads)
    if ctx.residual_dtype is not None and ctx.needs_input_grad[10]:
        # relu(y + residual): the residual's gradient is the output's, through the ReLU
        g_out = torch.where(out > 0, grad, torch.zeros_like(grad)) if s.relu else grad
        grads[10] = g_out.to(ctx.residual_dtype)
    if s.codes_input:
        return tuple(grads)
    if ctx.codes_out:
        raise RuntimeError("hybrid_layer cannot backpropagate through re-quantized (integer) outputs; deploy without "
                           "chaining codes into a layer whose pruned branch trains.")
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[5], ctx.needs_input_grad[6]
    g = grad.to(torch.promote_types(grad.dtype, torch.float32))
    if s.relu:
        g = torch.where(out > 0, g, torch.zeros_like(g))
    # grad with respect to x padded by the padding mode (then sent back through that gather)
    top, bottom, left, right = s.padding
    mode = s.padding_mode
    xp = x if mode == "zeros" else F.pad(x, (left, right, top, bottom), mode=mode)
    padding = s.zero_padding
    kept = fp_weight.shape[0]
    if s.path == "merged":
        w, _ = merged_weight_and_bias(s, w_packed, scale, bias, fp_weight, None, fp_in_idx, fp_out_idx, x.dtype)
        gx, gw, gb = _conv_backward(s, g.to(x.dtype), xp, w, padding, s.groups, need_x)
        if gw is not None:
            gw = gw.index_select(0, fp_out_idx)
            if fp_in_idx is not None and s.groups == 1:
                gw = gw.index_select(1, fp_in_idx)
            gb = gb.index_select(0, fp_out_idx)
    elif kept == 0:  # a quantized-only layer: nothing in it is differentiable
        gx = torch.zeros(xp.shape, dtype=torch.float32, device=xp.device) if need_x else None
        gw, gb = torch.zeros_like(fp_weight), None
    else:  # hybrid and fp_only: the pruned branch alone is differentiable
        dt = ctx.fp_dtype or x.dtype
        gk = g.index_select(1, fp_out_idx).to(dt)
        xs = (xp.index_select(1, fp_in_idx) if fp_in_idx is not None else xp).to(dt)
        gxs, gw, gb = _conv_backward(s, gk, xs, fp_weight.to(dt), padding, _fp_groups(s, kept), need_x)
        gx = None
        if gxs is not None:
            acc_dt = torch.promote_types(gxs.dtype, torch.float32)
            gx = torch.zeros(xp.shape, dtype=acc_dt, device=xp.device)
            if fp_in_idx is not None:  # a grouped branch may read a channel twice: the copies add up
                gx.index_add_(1, fp_in_idx.long(), gxs.to(acc_dt))
            else:
                gx += gxs.to(acc_dt)
    if gx is not None and mode != "zeros":
        h, w_ = x.shape[2], x.shape[3]
        back = torch.zeros((gx.shape[0], gx.shape[1], h, gx.shape[3]), dtype=gx.dtype, device=gx.device)
        back.index_add_(2, _mode_pad_index(h, top, bottom, mode, gx.device), gx)
        gx = torch.zeros((gx.shape[0], gx.shape[1], h, w_), dtype=gx.dtype, device=gx.device).index_add_(
            3, _mode_pad_index(w_, left, right, mode, gx.device), back)
    grads[0] = gx.to(x.dtype) if (gx is not None and need_x) else None
    grads[5] = gw.to(fp_weight.dtype) if (gw is not None and need_w) else None
    grads[6] = gb.to(fp_weight.dtype) if (gb is not None and need_b and ctx.has_fp_bias) else None
    return tuple(grads)


def _conv_backward(spec: LayerSpec, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, padding, groups: int,
                   need_x: bool):
    """Gradients of ``conv(x, w) + b`` (``(N, K, Ho, Wo)`` output gradient ``g``) with respect to
    x, w and b; the padding ``(top, bottom, left, right)`` is applied explicitly (it may be
    asymmetric)."""
    if spec.kind == "linear":
        n = x.shape[0]
        g2, x2 = g.reshape(n, g.shape[1]), x.reshape(n, x.shape[1])
        gx = (g2 @ w.flatten(1)).view(x.shape) if need_x else None
        return gx, (g2.t() @ x2).view(w.shape), g2.sum(0)
    top, bottom, left, right = padding
    xp = F.pad(x, (left, right, top, bottom)) if any(padding) else x
    gx, gw, gb = torch.ops.aten.convolution_backward(g, xp, w, [w.shape[0]], list(spec.stride), [0, 0],
                                                     list(spec.dilation), False, [0, 0], groups, [need_x, True, True])
    if gx is not None and any(padding):
        gx = gx[:, :, top: top + x.shape[2], left: left + x.shape[3]]
    return gx, gw, gb


torch.library.register_autograd("hybridops::hybrid_layer", _backward, setup_context=_setup)


# ----------------------------------------------------------------------------- the entry point
def hybrid_layer(spec: LayerSpec, spec_ints: List[int], x: torch.Tensor, w_packed, scale, bias, in_qparams,
                 fp_weight, fp_bias, fp_in_idx, fp_out_idx, out_qparams, residual: Optional[torch.Tensor],
                 fp_dtype: Optional[torch.dtype], backend: str) -> torch.Tensor:
    """A deployed layer's forward: the registered op where autograd, tracing or a dispatch mode
    needs it, else :func:`run_layer` directly (see the module docstring). ``spec_ints`` is
    ``spec.to_ints()``, made once by the layer."""
    if (torch.is_grad_enabled() and (x.requires_grad or fp_weight.requires_grad
                                     or (fp_bias is not None and fp_bias.requires_grad)
                                     or (residual is not None and residual.requires_grad))) \
            or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return hybrid_layer_op(x, w_packed, scale, bias, in_qparams, fp_weight, fp_bias, fp_in_idx, fp_out_idx,
                               out_qparams, residual, spec_ints, fp_dtype, backend)
    check_input(spec, x, fp_weight, backend, residual)
    return run_layer(spec, x, w_packed, scale, bias, in_qparams, fp_weight, fp_bias, fp_in_idx, fp_out_idx,
                     out_qparams, residual, fp_dtype, backend)
