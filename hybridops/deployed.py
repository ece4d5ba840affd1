"""Deployed (inference / online-update) layers that run on the packed integer kernels.

A deployed layer is built from its geometry and its format alone — like ``nn.Conv2d`` from its
arguments — and holds, as buffers and parameters:

* the quantized branch: packed integer weights ``w_packed (C_out, KH, KW, packed C_in/g)``
  (:mod:`hybridops.ops.packing`), one fp32 ``scale`` per output channel
  (``out_scale / (levels_a * levels_w)``), the fp32 ``bias``, and the frozen input quantizer
  ``in_qparams = [alpha, beta]``;
* the pruned full-precision branch: only its kept output channels — ``fp_weight`` (``K_p`` rows),
  ``fp_bias``, and two index maps: ``fp_out_idx`` (the output channel each kept row adds into) and
  ``fp_in_idx`` (the input channels the branch reads, gathered by the quantize-activate pass;
  ``None`` when it reads the whole input).

:func:`hybridops.deploy_` fills them from a trained layer (:func:`hybridops.conversion.deploy_layer`);
:func:`hybridops.load_deployed_` rebuilds a deployed model from its ``state_dict`` alone.

The forward path is chosen when the format is set, not on every call:

* ``"hybrid"`` (quantized input): one fused quantize-activate pass writes the activation codes and
  the float slice the pruned branch reads; the pruned branch runs as a float conv on that slice;
  the integer conv adds its output into the kept channels in its epilogue. At inference on a
  backend with a fused kernel (``triton``; ungrouped layers) the two convs are one op,
  ``hybridops::hybrid_conv2d``, which computes the branch inside the integer conv's kernel where
  that pays (docs/kernels.md);
* ``"codes"``: the input is already codes, written by the producing layer's epilogue (a chain of
  quantized layers never writes float activations; see :mod:`hybridops.fusion`);
* ``"merged"`` (full-precision input, as the first layer of the paper's networks): both branches
  are float convs of the same input, merged into one with ``dequant(W_q) + scatter(W_p)``;
* ``"fp_only"``: no quantized branch.

Only ``fp_weight`` and ``fp_bias`` are trainable (the online update); the quantized branch is frozen
integer data with no straight-through path, so gradients reach a layer's input through its pruned
branch only (a layer that kept no channels passes none): put the layers to fine-tune after, not
before, such layers — as the paper's online update does with the last classification layer.
"""
from __future__ import annotations

import weakref

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from .ops import custom_ops
from .ops.packing import check_bits, levels, packed_size, unpack_weight
from .ops.reference import float_conv2d
from .ops.registry import code_bytes, inference_fp_conv, optional_implementation

FORMAT_VERSION = 1
PATHS = ("hybrid", "codes", "merged", "fp_only")


_DISPATCHED = {"quantize_activate": custom_ops.quantize_activate, "qconv2d": custom_ops.qconv2d,
               "hybrid_conv2d": custom_ops.hybrid_conv2d}
_DIRECT = {"quantize_activate": custom_ops.quantize_activate_inference, "qconv2d": custom_ops.qconv2d_inference,
           "hybrid_conv2d": custom_ops.hybrid_conv2d_inference}


def _op(name: str):
    """The op as a custom op (autograd, ``torch.compile``) when gradients or tracing need it, else
    the same checks and kernel called directly: in eager inference the dispatcher's cost is a
    sizeable part of a small layer's time on the CPU."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return _DISPATCHED[name]
    return _DIRECT[name]


class _DeployedBase(nn.Module):
    """State and behaviour shared by deployed conv and linear layers.

    Subclasses set the geometry, then call :meth:`_init_format`."""

    in_channels: int
    out_channels: int
    groups: int = 1

    def _init_format(self, kernel_numel: Tuple[int, int], bias: bool, bits_w: Optional[int], bits_a: Optional[int],
                     a_signed: bool, fp_out_channels: int, fp_in_channels: Optional[int], fp_bias: bool,
                     backend: str, device, dtype) -> None:
        if bits_w is not None:
            check_bits(bits_w, "bits_w")
        if bits_a is not None:
            check_bits(bits_a, "bits_a")
            if bits_w is None:
                raise ValueError("bits_a is the quantized branch's input format; a layer without a quantized branch "
                                 "(bits_w=None) takes bits_a=None.")
        if not 0 <= fp_out_channels <= self.out_channels:
            raise ValueError(f"fp_out_channels (kept channels of the pruned branch) must lie in [0, "
                             f"{self.out_channels}], got {fp_out_channels}.")
        if bits_w is None and fp_out_channels == 0:
            raise ValueError("a deployed layer needs a quantized branch (bits_w) or kept full-precision channels.")
        if fp_in_channels is not None and (self.groups != 1 or not 0 < fp_in_channels <= self.in_channels):
            raise ValueError(f"fp_in_channels (input channels read by the pruned branch) applies to ungrouped layers "
                             f"and must lie in [1, {self.in_channels}], got {fp_in_channels} with groups={self.groups}.")
        self.bits_w, self.bits_a, self.a_signed = bits_w, bits_a, bool(a_signed) if bits_a is not None else False
        self.backend = backend
        # the backend's prepacked float conv for the pruned branch at inference (None: F.conv2d)
        self._inference_fp_conv, self._inference_fp_dtypes = inference_fp_conv(backend)
        # a backend that can compute the pruned branch inside its qconv kernel (hybrid_conv2d)
        self._fuses_branch = optional_implementation(backend, "fused_hybrid_conv2d") is not None
        kh, kw = kernel_numel
        cin_g = self.in_channels // self.groups
        if bits_w is not None:
            self.register_buffer("w_packed", torch.zeros((self.out_channels, kh, kw, packed_size(cin_g, bits_w)),
                                                         dtype=torch.uint8, device=device))
            self.register_buffer("scale", torch.ones(self.out_channels, dtype=torch.float32, device=device))
            self.register_buffer("bias", torch.zeros(self.out_channels, dtype=torch.float32, device=device)
                                 if bias else None)
        else:
            self.register_buffer("w_packed", None)
            self.register_buffer("scale", None)
            self.register_buffer("bias", None)
        self.register_buffer("in_qparams", torch.tensor([1.0, 0.0], device=device) if bits_a is not None else None)
        k_p = fp_out_channels
        # The pruned branch of a grouped conv keeps arbitrary output channels, so it runs as a grouped
        # conv with one group per kept channel, over the input channels of that channel's group
        # (gathered by the quantize-activate pass); an ungrouped branch reads fp_in_channels channels.
        fp_cin = cin_g if self.groups > 1 else (fp_in_channels or self.in_channels)
        self.fp_weight = nn.Parameter(torch.zeros((k_p, fp_cin, kh, kw), device=device, dtype=dtype))
        self.fp_bias = nn.Parameter(torch.zeros(k_p, device=device, dtype=dtype)) if (fp_bias and k_p) else None
        self.register_buffer("fp_out_idx", torch.arange(k_p, device=device))
        if self.groups > 1 and k_p:
            # kept channel j (default: output channel j) reads the input channels of its group
            group = torch.div(torch.arange(k_p, device=device), self.out_channels // self.groups, rounding_mode="floor")
            fp_in_idx = (group.view(-1, 1) * cin_g + torch.arange(cin_g, device=device)).flatten()
        else:
            fp_in_idx = None if fp_in_channels is None else torch.arange(fp_in_channels, device=device)
        self.register_buffer("fp_in_idx", fp_in_idx)
        # The pruned branch reading every input channel from a non-NHWC input still goes through
        # the slice (the epilogue reads its output per pixel): the identity map, made once.
        self.register_buffer("_all_in_idx", torch.arange(self.in_channels, device=device), persistent=False)
        # Deploy-time fusion (hybridops.fusion) edits these: a ReLU moved into the epilogue, the
        # requantization of the output for a chained consumer, and the names of the model's modules
        # it replaced by nn.Identity, as [qualified name, type name] pairs (so that load_deployed_ can
        # rebuild the model's structure).
        self.relu = False
        self.register_buffer("out_qparams", None)
        self.out_bits: Optional[int] = None
        self.out_signed = False
        self.codes_input = False
        self.absorbed: List[List[str]] = []
        # dtype the pruned branch computes in (None: the input's); set_fp_dtype_
        self.fp_dtype: Optional[torch.dtype] = None
        # (source refs, versions, weight, bias) of the merged path's float conv at inference
        # (_merged_conv); derived state, never saved or copied
        self._merged_cache: Optional[tuple] = None
        self._select_path()

    # ------------------------------------------------------------------ format and state
    @property
    def has_quant(self) -> bool:
        return self.bits_w is not None

    @property
    def quantized_input(self) -> bool:
        return self.bits_a is not None

    @property
    def kept_channels(self) -> int:
        return int(self.fp_weight.shape[0])

    @property
    def fused_bn(self) -> bool:
        return any(kind.startswith("BatchNorm") for _, kind in self.absorbed)

    def _select_path(self) -> None:
        if not self.has_quant:
            self.path = "fp_only"
        elif not self.quantized_input:
            self.path = "merged"
        else:
            self.path = "codes" if self.codes_input else "hybrid"

    def set_codes_input_(self) -> None:
        """Take packed codes in this layer's input format instead of floats (the producer
        re-quantizes in its epilogue). Only for an integer layer without a pruned branch."""
        if self.path != "hybrid" or self.kept_channels:
            raise ValueError("only a quantized-input layer without a full-precision branch can take codes as input.")
        self.codes_input = True
        self._select_path()

    def set_output_codes_(self, qparams: torch.Tensor, bits: int, signed: bool) -> None:
        """Re-quantize the output in the epilogue to the codes of a chained consumer's input."""
        if self.path not in ("hybrid", "codes") or self.kept_channels:
            raise ValueError("only an integer layer without a full-precision branch can hand codes to its consumer "
                             "(a pruned branch must stay trainable, which needs float outputs).")
        check_bits(bits, "out_bits")
        self.out_qparams = qparams.detach().float().clone().to(self.scale.device)
        self.out_bits, self.out_signed = int(bits), bool(signed)

    def set_fp_dtype_(self, dtype: Optional[torch.dtype]) -> None:
        """Compute the pruned branch in ``dtype`` whatever the model's dtype: ``torch.bfloat16``
        runs it on a CPU's bf16 units (AVX-512 BF16, AMX) inside an fp32 model, at bf16 rounding of
        that branch's input and weights; None: in the input's dtype. The quantize pass writes the
        branch's input slice in ``dtype`` and the epilogue adds its output in fp32."""
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"the full-precision branch computes in float32, bfloat16 or float16 (or None: the "
                             f"input's dtype), got {dtype!r}.")
        if dtype is not None and self.backend == "onednn" and dtype not in self._inference_fp_dtypes:
            raise ValueError(f"the onednn backend on this CPU has no {dtype} convolution (bf16 needs AVX-512 BF16, "
                             f"AMX or AVX-512 BW/VL/DQ), so the pruned branch cannot run in it here: use fp_dtype=None.")
        self.fp_dtype = dtype

    def _branch_dtype(self, x: torch.Tensor) -> torch.dtype:
        return self.fp_dtype if self.fp_dtype is not None else x.dtype

    def format_state(self) -> dict:
        """Everything besides tensors that a saved deployed layer needs to be rebuilt (the
        constructor's arguments, the fusion state and the FP branch's compute dtype)."""
        return {"format_version": FORMAT_VERSION, "kind": self._kind, "init": self._init_args(), "relu": self.relu,
                "codes_input": self.codes_input, "out_bits": self.out_bits, "out_signed": self.out_signed,
                "absorbed": list(self.absorbed),
                "fp_dtype": None if self.fp_dtype is None else str(self.fp_dtype).split(".")[-1]}

    def get_extra_state(self) -> dict:
        return self.format_state()

    def set_extra_state(self, state: dict) -> None:
        if state.get("format_version") != FORMAT_VERSION or state.get("kind") != self._kind:
            raise ValueError(f"the saved layer is a {state.get('kind')!r} of format {state.get('format_version')}, "
                             f"not a {self._kind!r} of format {FORMAT_VERSION}: save and load with the same hybridops.")
        # Fusion edited the model around this layer (modules replaced by nn.Identity): loading into
        # an existing deployed model cannot redo or undo that, so its fusion must match.
        mine = self.format_state()
        for key in ("relu", "codes_input", "absorbed", "out_bits", "out_signed"):
            if state[key] != mine[key]:
                raise ValueError(f"the saved layer has {key}={state[key]!r} but this one has {mine[key]!r}: deploy_ "
                                 "both models with the same fuse setting, or rebuild the model from the checkpoint "
                                 "with hybridops.load_deployed_.")
        if state["init"] != mine["init"]:
            raise ValueError(f"the saved layer was built with {state['init']} but this one with {mine['init']}; "
                             "rebuild the model from the checkpoint with hybridops.load_deployed_.")
        self._load_fp_dtype(state)

    def _load_fp_dtype(self, state: dict) -> None:
        # (checkpoints written before the option have no "fp_dtype": the input's dtype)
        name = state.get("fp_dtype")
        self.set_fp_dtype_(None if name is None else getattr(torch, name))

    @classmethod
    def from_format_state(cls, state: dict, out_qparams: Optional[torch.Tensor] = None, backend: str = "torch",
                          device=None, dtype=None) -> "_DeployedBase":
        """An empty layer (values to be loaded) in the saved format, fusion state included.
        ``out_qparams``: the saved requantization parameters, for a layer that hands codes on."""
        layer = cls(**state["init"], backend=backend, device=device, dtype=dtype)
        layer.relu = bool(state["relu"])
        layer.absorbed = [list(pair) for pair in state["absorbed"]]
        if state["codes_input"]:
            layer.set_codes_input_()
        if out_qparams is not None:
            layer.set_output_codes_(out_qparams, state["out_bits"], state["out_signed"])
        layer._load_fp_dtype(state)
        return layer

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_merged_cache"] = None
        return state

    _FP32_BUFFERS = ("scale", "bias", "in_qparams", "out_qparams")

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must not round the epilogue scales or the frozen quantizer
        # parameters (the kernels read them in fp32), and model.to(memory_format=channels_last)
        # must not restride the packed weights (the kernels read them K-major). Device moves
        # still apply: a 1-element probe learns the target device without converting copies.
        keep = {n: self._buffers[n] for n in self._FP32_BUFFERS if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for n, t in keep.items():
            self._buffers[n] = t.to(fn(t.new_empty(1)).device)
        if self._buffers.get("w_packed") is not None:
            self._buffers["w_packed"] = self._buffers["w_packed"].contiguous()
        return self

    def _check_input(self, x: torch.Tensor) -> None:
        if not x.dtype.is_floating_point:
            raise ValueError(f"{type(self).__name__} expects a floating-point input, got {x.dtype}.")

    def dequantized_weight(self) -> torch.Tensor:
        """``codes * scale * levels_a``: the float weight of the quantized branch as it acts on the
        input's own scale (test and inspection helper; the kernels never materialise it)."""
        codes = unpack_weight(self.w_packed, self.bits_w, self.in_channels // self.groups).float()
        la = levels(self.bits_a, self.a_signed) if self.quantized_input else 1
        return codes * (self.scale * la).view(-1, 1, 1, 1)

    def _merged_weight_and_bias(self, dtype: torch.dtype):
        """For a full-precision input both branches are float ops on the same input, so they merge
        into one: ``dequant(W_q) + scatter(W_p)`` and ``bias + scatter(fp_bias)`` (differentiable
        in the pruned branch's parameters). 4-D weights, for linear layers too."""
        w = _DeployedBase.dequantized_weight(self).to(dtype)
        if self.kept_channels:
            fw = self.fp_weight.to(dtype)
            if self.fp_in_idx is not None and self.groups == 1:
                fw = fw.new_zeros((fw.shape[0], self.in_channels, *fw.shape[2:])).index_copy(1, self.fp_in_idx, fw)
            w = w.index_add(0, self.fp_out_idx, fw)
        b = None if self.bias is None else self.bias.to(dtype)
        if self.fp_bias is not None:
            b = (b if b is not None else w.new_zeros(self.out_channels)).index_add(0, self.fp_out_idx,
                                                                                  self.fp_bias.to(dtype))
        return w, b

    def _int_conv(self, codes: torch.Tensor, fp_out: Optional[torch.Tensor], stride, padding, dilation, groups,
                  out_dtype: torch.dtype) -> torch.Tensor:
        """NHWC: the float output, or codes when this layer feeds a chained consumer."""
        rq = self.out_qparams is not None
        return _op("qconv2d")(codes, self.w_packed, self.in_channels, self.bits_a, self.a_signed, self.bits_w,
                                  self.scale, self.bias, stride, padding, dilation, groups, self.relu,
                                  fp_out, self.fp_out_idx if fp_out is not None else None, self.out_qparams,
                                  # requant_bits / requant_signed are read only with requant_qparams
                                  self.out_bits if rq else 8, self.out_signed, out_dtype, self.backend)

    def extra_repr(self) -> str:
        q = {"hybrid": f"w{self.bits_w}, a{self.bits_a}{'s' if self.a_signed else 'u'}",
             "codes": f"w{self.bits_w}, a{self.bits_a}{'s' if self.a_signed else 'u'} codes in",
             "merged": f"w{self.bits_w}, a=fp", "fp_only": "fp only"}[self.path]
        fused = "+".join(name for name, on in (("bn", self.fused_bn), ("relu", self.relu),
                                               ("requant", self.out_qparams is not None)) if on)
        return (f"{self._geometry_repr()}, {q}, fp_kept={self.kept_channels}/{self.out_channels}"
                f"{', epilogue=' + fused if fused else ''}, backend={self.backend!r}")


class DeployedConv2d(_DeployedBase):
    """A deployed hybrid / quantized / pruned ``Conv2d``.

    Args (geometry as ``nn.Conv2d``; ``padding`` also as ``(top, bottom, left, right)``):
        bits_w: weight bits of the quantized branch, or None for a layer without one.
        bits_a: input activation bits, or None for a full-precision input (merged path).
        a_signed: signed activation codes (inputs that can be negative).
        fp_out_channels: kept output channels of the pruned branch (0: none).
        fp_in_channels: input channels the pruned branch reads when its producer was pruned too
            (None: all); ungrouped layers only.
        fp_bias: whether the pruned branch has a bias.
        backend: which kernels run the quantized branch (see :mod:`hybridops.backend`).

    Input and output are ``(N, C, H, W)``; the output has the memory format ``nn.Conv2d`` would
    give (channels_last in, channels_last out; contiguous in, contiguous out) and the input's dtype.
    """

    _kind = "conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1,
                 padding: Union[int, Sequence[int]] = 0, dilation=1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", *, bits_w: Optional[int] = 4, bits_a: Optional[int] = 4,
                 a_signed: bool = False, fp_out_channels: int = 0, fp_in_channels: Optional[int] = None,
                 fp_bias: bool = False, backend: str = "torch", device=None, dtype=None):
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}.")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular', got {padding_mode!r}.")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), list(_pair(stride)), list(_pair(dilation))
        pad = [padding] * 2 if isinstance(padding, int) else list(padding)
        self.padding = [pad[0], pad[0], pad[1], pad[1]] if len(pad) == 2 else pad
        if len(self.padding) != 4 or min(self.padding) < 0:
            raise ValueError(f"padding must be an int, (ph, pw) or (top, bottom, left, right), got {padding!r}.")
        self.padding_mode = padding_mode
        self._init_format(self.kernel_size, bias, bits_w, bits_a, a_signed, fp_out_channels, fp_in_channels, fp_bias,
                          backend, device, dtype)

    def _init_args(self) -> dict:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=list(self.kernel_size),
                    stride=list(self.stride), padding=list(self.padding), dilation=list(self.dilation),
                    groups=self.groups, bias=self.bias is not None, padding_mode=self.padding_mode,
                    bits_w=self.bits_w, bits_a=self.bits_a, a_signed=self.a_signed,
                    fp_out_channels=self.kept_channels,
                    fp_in_channels=None if (self.fp_in_idx is None or self.groups > 1) else int(self.fp_in_idx.numel()),
                    fp_bias=self.fp_bias is not None)

    @property
    def fp_groups(self) -> int:
        return 1 if self.groups == 1 else max(1, self.kept_channels)

    def _geometry_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, "
                f"stride={tuple(self.stride)}, padding={tuple(self.padding)}, dilation={tuple(self.dilation)}, "
                f"groups={self.groups}")

    def _pad_input(self, x: torch.Tensor) -> Tuple[torch.Tensor, list]:
        if self.padding_mode == "zeros":
            return x, self.padding
        top, bottom, left, right = self.padding
        return F.pad(x, (left, right, top, bottom), mode=self.padding_mode), [0, 0, 0, 0]

    def _float_conv(self, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], padding: list,
                    groups: int) -> torch.Tensor:
        return float_conv2d(x, w, b, self.stride, padding, self.dilation, groups)

    def _fp_conv(self, x_nchw: torch.Tensor, padding: list) -> torch.Tensor:
        """The pruned branch's conv, in ``x_nchw``'s dtype (the compute dtype, see _hybrid)."""
        dt = x_nchw.dtype
        fast = self._inference_fp_conv
        if fast is not None and dt in self._inference_fp_dtypes and not (torch.is_grad_enabled() and (
                x_nchw.requires_grad or self.fp_weight.requires_grad)):
            # inference: weights packed once per version (an online update's step re-packs them)
            return fast(x_nchw, self.fp_weight, self.fp_bias, self.stride, padding, self.dilation, self.fp_groups)
        return self._float_conv(x_nchw, self.fp_weight.to(dt), None if self.fp_bias is None else self.fp_bias.to(dt),
                                padding, self.fp_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path == "codes":
            return self._from_codes(x)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects input (N, {self.in_channels}, H, W), got {tuple(x.shape)}.")
        self._check_input(x)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        x, padding = self._pad_input(x)
        if self.path == "hybrid":
            y = self._hybrid(x, padding)
            if self.out_qparams is not None:
                return y  # NHWC codes for the chained quantized consumer
            y = y.permute(0, 3, 1, 2)
        elif self.path == "merged":
            y = self._merged_conv(x, padding)
            y = F.relu(y) if self.relu else y
        else:
            y = self._fp_only(x, padding)
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y.contiguous()

    def _merged_conv(self, x: torch.Tensor, padding: list) -> torch.Tensor:
        """Both branches as one float conv (a full-precision input). At inference on a backend with
        a prepacked float conv, the merged weight is built once per version of the tensors it comes
        from and packed once: measured on ResNet-18's 7x7 stem (224x224, 2 threads), 0.68 ms
        against 1.18 ms for F.conv2d plus 0.11 ms to rebuild the weight, with equal results."""
        fast = self._inference_fp_conv
        params = [t for t in (self.fp_weight, self.fp_bias) if t is not None and self.kept_channels]
        training = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params))
        if fast is None or x.dtype not in self._inference_fp_dtypes or training:
            return self._float_conv(x, *self._merged_weight_and_bias(x.dtype), padding, self.groups)
        sources = [t for t in (self.w_packed, self.scale, self.bias, self.fp_weight, self.fp_bias, self.fp_out_idx,
                               self.fp_in_idx) if t is not None]
        versions = (x.dtype,) + tuple(t._version for t in sources)
        cache = self._merged_cache
        # weak references confirm the sources are the same tensors (an id alone can be reused after
        # a device move frees the old ones); in-place updates bump their versions
        if (cache is None or cache[1] != versions or len(cache[0]) != len(sources)
                or any(r() is not t for r, t in zip(cache[0], sources))):
            with torch.no_grad():
                cache = self._merged_cache = ([weakref.ref(t) for t in sources], versions,
                                              *self._merged_weight_and_bias(x.dtype))
        return fast(x, cache[2], cache[3], self.stride, padding, self.dilation, self.groups)

    def _hybrid(self, x: torch.Tensor, padding: list) -> torch.Tensor:
        kept = self.kept_channels > 0
        # The quantize pass writes a float NHWC slice when the pruned branch reads a subset or a
        # regrouping of the input channels, or when x is not NHWC already (the epilogue reads the
        # branch's output per pixel); otherwise the branch reads x itself (a write and a read fewer).
        # A compute dtype other than x's is written by the same pass (the slice in that dtype).
        fp_dt = self._branch_dtype(x)
        sliced = kept and (self.fp_in_idx is not None or not x.is_contiguous(memory_format=torch.channels_last)
                           or fp_dt != x.dtype)
        read = self.fp_in_idx if self.fp_in_idx is not None else self._all_in_idx
        x_slice, codes = _op("quantize_activate")(x, self.in_qparams, self.bits_a, self.a_signed, None, None, False,
                                                      read if sliced else None, fp_dt, self.backend)
        fp_out = None
        if kept and self._fuses_branch and self.groups == 1 and not (torch.is_grad_enabled() and (
                x.requires_grad or any(t.requires_grad for t in (self.fp_weight, self.fp_bias) if t is not None))):
            # inference on a backend with a fused kernel: the op decides whether the branch runs
            # inside the qconv kernel (one launch) or as its own conv
            rq = self.out_qparams is not None
            return _op("hybrid_conv2d")(codes, self.w_packed, self.in_channels, self.bits_a, self.a_signed,
                                        self.bits_w, self.scale, self.bias, self.stride, padding, self.dilation,
                                        self.groups, self.relu, x_slice if sliced else x.permute(0, 2, 3, 1),
                                        self.fp_weight, self.fp_bias, self.fp_out_idx, self.out_qparams,
                                        self.out_bits if rq else 8, self.out_signed, x.dtype, self.backend)
        if kept:
            fp_out = self._fp_conv(x_slice.permute(0, 3, 1, 2) if sliced else x, padding).permute(0, 2, 3, 1)
        return self._int_conv(codes, fp_out, self.stride, padding, self.dilation, self.groups, x.dtype)

    def _from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Input already quantized by the producing layer's epilogue: NHWC codes in this layer's
        input format (packed as the backend's format says)."""
        width = code_bytes(self.in_channels, self.bits_a, self.backend)
        if codes.dtype != torch.uint8 or codes.dim() != 4 or codes.shape[3] != width:
            raise ValueError(f"{type(self).__name__} is chained after a quantized layer and expects its codes "
                             f"(N, H, W, {width}) uint8, got {codes.dtype} {tuple(codes.shape)}.")
        y = self._int_conv(codes, None, self.stride, self.padding, self.dilation, self.groups, self.fp_weight.dtype)
        # The chain's original input layout is not known here: return the layout user code is most
        # likely to .view() (contiguous NCHW), in the model's float dtype.
        return y if self.out_qparams is not None else y.permute(0, 3, 1, 2).contiguous()

    def _fp_only(self, x: torch.Tensor, padding: list) -> torch.Tensor:
        xs = x.index_select(1, self.fp_in_idx) if self.fp_in_idx is not None else x
        fp = self._fp_conv(xs.to(self._branch_dtype(x)), padding).to(x.dtype)
        return fp.new_zeros((fp.shape[0], self.out_channels, *fp.shape[2:])).index_copy(1, self.fp_out_idx, fp)


class DeployedLinear(_DeployedBase):
    """A deployed hybrid / quantized / pruned ``Linear``: a 1x1 convolution on a 1x1 image, so it
    runs on the same integer kernels. Arguments as :class:`DeployedConv2d` without the conv
    geometry. Input ``(..., in_features)`` (the channel axis is the last one, as for
    ``nn.Linear``), output ``(..., out_features)``."""

    _kind = "linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits_w: Optional[int] = 4,
                 bits_a: Optional[int] = 4, a_signed: bool = False, fp_out_channels: int = 0,
                 fp_in_channels: Optional[int] = None, fp_bias: bool = False, backend: str = "torch", device=None,
                 dtype=None):
        super().__init__()
        self.in_channels, self.out_channels = in_features, out_features
        self._init_format((1, 1), bias, bits_w, bits_a, a_signed, fp_out_channels, fp_in_channels, fp_bias, backend,
                          device, dtype)

    @property
    def in_features(self) -> int:
        return self.in_channels

    @property
    def out_features(self) -> int:
        return self.out_channels

    def _init_args(self) -> dict:
        return dict(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None,
                    bits_w=self.bits_w, bits_a=self.bits_a, a_signed=self.a_signed,
                    fp_out_channels=self.kept_channels,
                    fp_in_channels=None if self.fp_in_idx is None else int(self.fp_in_idx.numel()),
                    fp_bias=self.fp_bias is not None)

    def _geometry_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def dequantized_weight(self) -> torch.Tensor:
        return super().dequantized_weight().flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects input (..., {self.in_features}), got {tuple(x.shape)}.")
        self._check_input(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        fp_dt = self._branch_dtype(x)
        fb = None if self.fp_bias is None else self.fp_bias.to(fp_dt)
        fw = self.fp_weight.flatten(1).to(fp_dt)
        if self.path == "fp_only":
            xs = x2 if self.fp_in_idx is None else x2.index_select(1, self.fp_in_idx)
            fp = F.linear(xs.to(fp_dt), fw, fb).to(x.dtype)
            y = fp.new_zeros((x2.shape[0], self.out_features)).index_copy(1, self.fp_out_idx, fp)
        elif self.path == "merged":
            w, b = self._merged_weight_and_bias(x.dtype)
            y = F.linear(x2, w.flatten(1), b)
        else:
            kept = self.kept_channels > 0
            sliced = kept and self.fp_in_idx is not None  # else the pruned branch reads x itself
            x_slice, codes = _op("quantize_activate")(
                x2.reshape(-1, self.in_features, 1, 1), self.in_qparams, self.bits_a, self.a_signed, None, None, False,
                self.fp_in_idx if sliced else None, fp_dt, self.backend)
            fp_out = None
            if kept:
                fp_in = x_slice.view(-1, self.fp_in_idx.numel()) if sliced else x2.to(fp_dt)
                fp_out = F.linear(fp_in, fw, fb).view(-1, 1, 1, self.kept_channels)
            y = self._int_conv(codes, fp_out, [1, 1], [0, 0, 0, 0], [1, 1], 1, x.dtype).view(-1, self.out_features)
        return y.reshape(*lead, self.out_features)


DEPLOYED_LAYERS = (DeployedConv2d, DeployedLinear)
