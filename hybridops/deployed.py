"""Deployed (inference / online-update) layers that run on the packed integer kernels.

:func:`hybridops.deploy_` replaces every trainable hybrid, quantized or pruned layer by a
:class:`DeployedConv2d` or :class:`DeployedLinear`:

* the quantized branch becomes packed integer weights ``(C_out, KH, KW, packed C_in/g)``, one
  fp32 ``scale`` per output channel (``out_scale / (levels_a * levels_w)``) and the bias; its
  input quantizer becomes frozen ``qparams = [alpha, beta]``;
* the pruned branch keeps only its kept output channels (``fp_weight`` of ``K_p`` rows and their
  index map ``fp_idx``), and only the input channels it reads (``fp_in_idx``): the dropped
  channels cost nothing.

Forward for a quantized input: one fused quantize-activate pass writes the packed codes and the
float slice the pruned branch reads, the pruned branch runs as a float conv on that slice, and
the integer conv adds its output into the right channels in its epilogue. Only ``fp_weight`` and
``fp_bias`` are trainable (the online update); the quantized branch is frozen integer data with no
straight-through path, so gradients reach a layer's input through its pruned branch only (a
layer that kept no channels passes none): put the layers to fine-tune after, not before, such
layers — as the paper's online update does with the last classification layer.
When the first layer keeps its input in full precision, both branches are float convolutions of
the same input and are merged into one convolution with ``dequant(W_q) + scatter(W_p)``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import custom_ops
from .ops.packing import levels, pack_weight, unpack_weight


class _DeployedBase(nn.Module):
    """State shared by deployed conv and linear layers."""

    def _init_from(self, quant, pruned, backend: str, in_idx: Optional[torch.Tensor]):
        ref = quant if quant is not None else pruned
        w = ref.weight.detach()
        self.out_channels = w.shape[0]
        self.backend = backend
        self.has_quant = quant is not None
        self.quantized_input = quant is not None and quant.aq is not None
        dev = w.device
        if quant is not None:
            codes = quant.wq.codes(quant.weight)[0].to(torch.int8)
            w4 = codes if codes.dim() == 4 else codes.view(*codes.shape, 1, 1)
            self.bits_w = quant.wq.bits
            self.register_buffer("w_packed", pack_weight(w4, self.bits_w))
            lw = levels(self.bits_w, True)
            if self.quantized_input:
                self.bits_a, self.a_signed = quant.aq.bits, quant.aq.signed
                self.register_buffer("in_qparams", quant.aq.qparams().detach().clone())
                la = quant.aq.levels
                self.register_buffer("scale", (quant.out_scale.detach().float() / (la * lw)).contiguous())
            else:
                # Full-precision input: the quantized branch is dequant(W_q) = codes * out_scale / lw.
                self.bits_a, self.a_signed = 0, False
                self.register_buffer("scale", (quant.out_scale.detach().float() / lw).contiguous())
            self.register_buffer("bias", None if quant.bias is None else quant.bias.detach().float().clone())
        else:
            self.register_buffer("bias", None)
        fp_bias = None
        if pruned is not None:
            idx = pruned.gate.kept_indices().to(dev)
            fw = pruned.weight.detach().index_select(0, idx)
            if pruned.bias is not None:
                fp_bias = pruned.bias.detach().index_select(0, idx)
        else:
            idx = torch.zeros(0, dtype=torch.long, device=dev)
            fw = w.new_zeros((0, *w.shape[1:]))
        self.register_buffer("fp_idx", idx)
        self.fp_weight = nn.Parameter(fw.clone())
        self.fp_bias = None if fp_bias is None else nn.Parameter(fp_bias.clone())
        # Input channels the pruned branch reads (all, unless its producer was pruned too).
        self.register_buffer("fp_in_idx", in_idx)
        # Set by hybridops.fusion when a following BatchNorm / ReLU moves into the epilogue, and
        # when this layer and a quantized consumer pass packed codes instead of floats.
        self.fused_bn = False
        self.relu = False
        self.codes_input = False
        self.register_buffer("out_qparams", None)
        self.out_bits, self.out_signed = 4, False

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

    def _merged_weight_and_bias(self, dtype: torch.dtype):
        """For a full-precision input both branches are float ops on the same input, so they merge
        into one: ``dequant(W_q) + scatter(W_p)`` and ``bias + scatter(fp_bias)`` (differentiable
        in the FP branch's parameters)."""
        w = self.dequantized_weight().to(dtype)
        if self.kept_channels:
            fw = self.fp_weight.to(dtype)
            if self.fp_in_idx is not None and getattr(self, "groups", 1) == 1:
                fw = fw.new_zeros((fw.shape[0], self.in_channels, *fw.shape[2:])).index_copy(1, self.fp_in_idx, fw)
            w = w.index_add(0, self.fp_idx, fw)
        b = None if self.bias is None else self.bias.to(dtype)
        if self.fp_bias is not None:
            b = (b if b is not None else w.new_zeros(self.out_channels)).index_add(0, self.fp_idx, self.fp_bias.to(dtype))
        return w, b

    # The code format is state: a model deployed from a differently calibrated copy (say, one
    # whose input was unsigned) must take the saved format along with the saved codes.
    def get_extra_state(self) -> dict:
        return {"bits_w": getattr(self, "bits_w", 0), "bits_a": self.bits_a if self.has_quant else 0,
                "a_signed": self.a_signed if self.has_quant else False, "fused_bn": self.fused_bn, "relu": self.relu,
                "codes_input": self.codes_input, "out_bits": self.out_bits, "out_signed": self.out_signed}

    def set_extra_state(self, state: dict) -> None:
        if self.has_quant:
            if int(state["bits_w"]) != self.bits_w:
                raise ValueError(f"the saved layer has {state['bits_w']}-bit weights but this one has "
                                 f"{self.bits_w}; deploy a model built with the same HybridConfig before loading.")
            self.bits_a, self.a_signed = int(state["bits_a"]), bool(state["a_signed"])
        # Fusion edited the model around this layer (modules replaced by nn.Identity): loading
        # cannot redo or undo that, so a checkpoint must come from a model fused the same way.
        for flag in ("fused_bn", "relu", "codes_input"):
            if flag in state and bool(state[flag]) != getattr(self, flag):
                raise ValueError(f"the saved layer has {flag}={bool(state[flag])} but this one has "
                                 f"{getattr(self, flag)}: deploy_ both models with the same fuse setting.")
        self.out_bits = int(state.get("out_bits", self.out_bits))
        self.out_signed = bool(state.get("out_signed", self.out_signed))

    @property
    def kept_channels(self) -> int:
        return int(self.fp_idx.numel())

    def dequantized_weight(self) -> torch.Tensor:
        """``codes * scale * levels_a``: the float weight of the quantized branch as it acts on the
        input's own scale (test and inspection helper; the kernels never materialise it)."""
        cin_g = self._in_per_group()
        codes = unpack_weight(self.w_packed, self.bits_w, cin_g).float()
        la = levels(self.bits_a, self.a_signed) if self.quantized_input else 1
        return codes * (self.scale * la).view(-1, 1, 1, 1)

    def extra_repr(self) -> str:
        q = (f"w{self.bits_w}, a{self.bits_a}{'s' if self.a_signed else 'u'}" if self.quantized_input
             else ("w%d, a=fp" % self.bits_w if self.has_quant else "fp only"))
        fused = "+".join(name for name, on in (("bn", self.fused_bn), ("relu", self.relu),
                                               ("requant", self.out_qparams is not None)) if on)
        return (f"{self._geometry_repr()}, {q}, fp_kept={self.kept_channels}/{self.out_channels}"
                f"{', epilogue=' + fused if fused else ''}{', codes in' if self.codes_input else ''}, "
                f"backend={self.backend!r}")


class DeployedConv2d(_DeployedBase):
    """A deployed hybrid / quantized / pruned ``Conv2d``. Input and output are ``(N, C, H, W)``;
    the output has the memory format ``nn.Conv2d`` would give (channels_last in, channels_last
    out; contiguous in, contiguous out), and the input's dtype."""

    def __init__(self, layer, backend: str, in_idx: Optional[torch.Tensor] = None):
        super().__init__()
        from .layers import HybridConv2d, PrunedConv2d, QuantConv2d

        quant = layer.quant if isinstance(layer, HybridConv2d) else (layer if isinstance(layer, QuantConv2d) else None)
        pruned = layer.pruned if isinstance(layer, HybridConv2d) else (layer if isinstance(layer, PrunedConv2d) else None)
        self.in_channels, self.kernel_size = layer.in_channels, layer.kernel_size
        self.stride, self.dilation, self.groups = list(layer.stride), list(layer.dilation), layer.groups
        self.padding = list(layer.explicit_padding())
        self.padding_mode = layer.padding_mode
        self._init_from(quant, pruned, backend, in_idx)
        self._init_fp_groups()

    def _in_per_group(self) -> int:
        return self.in_channels // self.groups

    def _init_fp_groups(self) -> None:
        """The pruned branch of a grouped conv keeps arbitrary output channels, so it runs as a
        grouped conv with one group per kept channel over the input channels of that channel's
        original group (gathered by the quantize-activate pass); an ungrouped conv reads
        ``fp_in_idx`` (all channels unless pruned upstream)."""
        if self.groups == 1:
            if self.fp_in_idx is not None:
                self.fp_weight.data = self.fp_weight.data.index_select(1, self.fp_in_idx)
            read = self.fp_in_idx if self.fp_in_idx is not None else torch.arange(self.in_channels, device=self.fp_idx.device)
        else:
            cin_g, cout_g = self._in_per_group(), self.out_channels // self.groups
            grp = torch.div(self.fp_idx, cout_g, rounding_mode="floor")
            read = (grp.view(-1, 1) * cin_g + torch.arange(cin_g, device=grp.device).view(1, -1)).flatten()
        self.register_buffer("fp_read_idx", read)

    @property
    def fp_groups(self) -> int:
        return 1 if self.groups == 1 else max(1, self.kept_channels)

    @torch.no_grad()
    def fold_batchnorm_(self, bn: nn.BatchNorm2d) -> None:
        """Absorb an eval-mode BatchNorm that follows this layer: ``bn(y) = y * g + shift`` with
        ``g = gamma / sqrt(var + eps)`` scales the integer epilogue and the pruned branch's rows."""
        if not (self.has_quant and self.quantized_input):
            raise ValueError("only a layer with an integer (quantized-input) branch folds a BatchNorm into its epilogue.")
        if self.relu or self.out_qparams is not None:
            raise ValueError("a BatchNorm folds in before the epilogue's ReLU / re-quantization, which this layer "
                             "already has.")
        if bn.num_features != self.out_channels:
            raise ValueError(f"the BatchNorm has {bn.num_features} channels, this layer {self.out_channels}.")
        g = (bn.weight.float() if bn.affine else 1.0) / (bn.running_var.float() + bn.eps).sqrt()
        shift = (bn.bias.float() if bn.affine else 0.0) - bn.running_mean.float() * g
        self.scale = self.scale * g
        self.bias = shift + (self.bias * g if self.bias is not None else 0.0)
        rows = g.index_select(0, self.fp_idx)
        self.fp_weight.mul_(rows.view(-1, 1, 1, 1).to(self.fp_weight.dtype))
        if self.fp_bias is not None:
            self.fp_bias.mul_(rows.to(self.fp_bias.dtype))
        self.fused_bn = True

    def _geometry_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, "
                f"stride={tuple(self.stride)}, padding={tuple(self.padding)}, dilation={tuple(self.dilation)}, "
                f"groups={self.groups}")

    def _pad_input(self, x: torch.Tensor) -> Tuple[torch.Tensor, list]:
        if self.padding_mode == "zeros":
            return x, self.padding
        top, bottom, left, right = self.padding
        return F.pad(x, (left, right, top, bottom), mode=self.padding_mode), [0, 0, 0, 0]

    def _fp_conv(self, x_nchw: torch.Tensor, padding: list) -> torch.Tensor:
        top, bottom, left, right = padding
        if top != bottom or left != right:
            x_nchw = F.pad(x_nchw, (left, right, top, bottom))
            top = left = 0
        return F.conv2d(x_nchw, self.fp_weight.to(x_nchw.dtype),
                        None if self.fp_bias is None else self.fp_bias.to(x_nchw.dtype),
                        self.stride, (top, left), self.dilation, self.fp_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.codes_input:
            return self._from_codes(x)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects input (N, {self.in_channels}, H, W), got {tuple(x.shape)}.")
        self._check_input(x)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        x, padding = self._pad_input(x)
        if not self.has_quant:
            y = self._fp_only(x, padding)
        elif not self.quantized_input:
            y = self._merged_float(x, padding)
        else:
            y = self._hybrid(x, padding)
            if self.out_qparams is not None:
                return y  # packed NHWC codes for the chained quantized consumer
            y = y.permute(0, 3, 1, 2)
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y.contiguous()

    def _hybrid(self, x: torch.Tensor, padding: list) -> torch.Tensor:
        kept = self.kept_channels > 0
        # The quantize pass writes a float NHWC slice when the pruned branch reads a subset or a
        # regrouping of the input channels, or when x is not NHWC already (the epilogue reads the
        # branch's output per pixel); otherwise the branch reads x itself (a write and a read fewer).
        sliced = kept and (self.groups > 1 or self.fp_in_idx is not None
                           or not x.is_contiguous(memory_format=torch.channels_last))
        x_slice, codes = custom_ops.quantize_activate(
            x, self.in_qparams, self.bits_a, self.a_signed, None, None, False,
            self.fp_read_idx if sliced else None, x.dtype, self.backend)
        fp_out = None
        if kept:
            fp_out = self._fp_conv(x_slice.permute(0, 3, 1, 2) if sliced else x, padding).permute(0, 2, 3, 1)
        return self._int_conv(codes, fp_out, padding, x.dtype)

    def _int_conv(self, codes: torch.Tensor, fp_out: Optional[torch.Tensor], padding: list,
                  out_dtype: torch.dtype) -> torch.Tensor:
        """NHWC: the float output, or packed codes when this layer feeds a chained consumer."""
        rq = self.out_qparams is not None
        return custom_ops.qconv2d(codes, self.w_packed, self.in_channels, self.bits_a, self.a_signed, self.bits_w,
                                  self.scale, self.bias, self.stride, padding, self.dilation, self.groups, self.relu,
                                  fp_out, self.fp_idx if fp_out is not None else None, self.out_qparams,
                                  self.out_bits if rq else 4, self.out_signed if rq else False, out_dtype, self.backend)

    def _from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Input already quantized by the producing layer's epilogue (a chain of quantized layers
        never writes float activations): packed NHWC codes in this layer's input format."""
        from .ops.packing import packed_size

        if codes.dtype != torch.uint8 or codes.dim() != 4 or codes.shape[3] != packed_size(self.in_channels, self.bits_a):
            raise ValueError(f"{type(self).__name__} is chained after a quantized layer and expects its packed codes "
                             f"(N, H, W, {packed_size(self.in_channels, self.bits_a)}) uint8, got {codes.dtype} "
                             f"{tuple(codes.shape)}.")
        y = self._int_conv(codes, None, self.padding, self.fp_weight.dtype)
        # The chain's original input layout is not known here: return the layout user code is most
        # likely to .view() (contiguous NCHW), in the model's float dtype.
        return y if self.out_qparams is not None else y.permute(0, 3, 1, 2).contiguous()

    def _scatter_fp(self, fp: torch.Tensor, n_out: int) -> torch.Tensor:
        out = fp.new_zeros((fp.shape[0], n_out, *fp.shape[2:]))
        return out.index_copy(1, self.fp_idx, fp)

    def _fp_only(self, x: torch.Tensor, padding: list) -> torch.Tensor:
        xs = x.index_select(1, self.fp_read_idx) if (self.fp_in_idx is not None or self.groups > 1) else x
        return self._scatter_fp(self._fp_conv(xs, padding), self.out_channels)

    def _merged_float(self, x: torch.Tensor, padding: list) -> torch.Tensor:
        w, b = self._merged_weight_and_bias(x.dtype)
        top, bottom, left, right = padding
        if top != bottom or left != right:
            x = F.pad(x, (left, right, top, bottom))
            top = left = 0
        return F.conv2d(x, w, b, self.stride, (top, left), self.dilation, self.groups)


class DeployedLinear(_DeployedBase):
    """A deployed hybrid / quantized / pruned ``Linear``: a 1x1 convolution on a 1x1 image, so it
    runs on the same integer kernels. Input ``(..., in_features)``, output ``(..., out_features)``."""

    def __init__(self, layer, backend: str, in_idx: Optional[torch.Tensor] = None):
        super().__init__()
        from .layers import HybridLinear, PrunedLinear, QuantLinear

        quant = layer.quant if isinstance(layer, HybridLinear) else (layer if isinstance(layer, QuantLinear) else None)
        pruned = layer.pruned if isinstance(layer, HybridLinear) else (layer if isinstance(layer, PrunedLinear) else None)
        self.in_features = self.in_channels = layer.in_features
        self._init_from(quant, pruned, backend, in_idx)
        if in_idx is not None:
            self.fp_weight.data = self.fp_weight.data.index_select(1, in_idx)
        self.register_buffer("fp_read_idx", in_idx if in_idx is not None
                             else torch.arange(self.in_features, device=self.fp_idx.device))

    @property
    def out_features(self) -> int:
        return self.out_channels

    def _in_per_group(self) -> int:
        return self.in_features

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
        kept = self.kept_channels > 0
        fb = None if self.fp_bias is None else self.fp_bias.to(x.dtype)
        if not self.has_quant:
            xs = x2 if self.fp_in_idx is None else x2.index_select(1, self.fp_in_idx)
            fp = F.linear(xs, self.fp_weight.to(x.dtype), fb)
            y = fp.new_zeros((x2.shape[0], self.out_features)).index_copy(1, self.fp_idx, fp)
        elif not self.quantized_input:
            y = F.linear(x2, *self._merged_weight_and_bias(x.dtype))
        else:
            read = self.fp_read_idx
            sliced = kept and self.fp_in_idx is not None  # else the pruned branch reads x itself
            x_slice, codes = custom_ops.quantize_activate(
                x2.reshape(-1, self.in_features, 1, 1), self.in_qparams, self.bits_a, self.a_signed, None, None, False,
                read if sliced else None, x.dtype, self.backend)
            fp_out = None
            if kept:
                fp_in = x_slice.view(-1, read.numel()) if sliced else x2
                fp_out = F.linear(fp_in, self.fp_weight.to(x.dtype), fb).view(-1, 1, 1, self.kept_channels)
            y = custom_ops.qconv2d(codes, self.w_packed, self.in_features, self.bits_a, self.a_signed, self.bits_w,
                                   self.scale, self.bias, [1, 1], [0, 0, 0, 0], [1, 1], 1, False, fp_out,
                                   self.fp_idx if kept else None, None, 4, False, x.dtype, self.backend)
            y = y.view(-1, self.out_features)
        return y.reshape(*lead, self.out_features)
