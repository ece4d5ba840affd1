"""Deployed (inference / online-update) layers that run on the packed integer kernels.

A deployed layer is built from its geometry and its format alone — like ``nn.Conv2d`` from its
arguments — and holds, as buffers and parameters:

* the quantized branch: packed integer weights ``w_packed (C_out, KH, KW, packed C_in/g)``
  (:mod:`hybridops.kernels.packing`), one fp32 ``scale`` per output channel
  (``out_scale / (levels_a * levels_w)``), the fp32 ``bias``, and the frozen input quantizer
  ``in_qparams = [alpha, beta]``;
* the pruned full-precision branch: only its kept output channels — ``fp_weight`` (``K_p`` rows),
  ``fp_bias``, and two index maps: ``fp_out_idx`` (the output channel each kept row adds into) and
  ``fp_in_idx`` (the input channels the branch reads, gathered by the quantize-activate pass;
  ``None`` when it reads the whole input).

:func:`hybridops.deploy_` fills them from a trained layer (:func:`hybridops.layers.deploy_layer`);
:func:`hybridops.load_deployed_` rebuilds a deployed model from its ``state_dict`` alone.

What a layer computes besides its tensors — geometry, bit widths, epilogue, input and output
modes — is one :class:`~hybridops.ops.spec.LayerSpec` (``layer.spec``), validated when the layer is
built or its fusion state changes; its tensors are validated when it is deployed or loaded
(:meth:`validate`). A forward is one call of the op layer, the ``hybridops::hybrid_layer`` op
(:mod:`hybridops.ops.layer_op`), on the layer's backend; how the backend carries the layer out is
the op's business. ``layer.path`` names what the spec describes:

* ``"hybrid"`` (quantized input): quantize-activate writes the activation codes and the float
  slice the pruned branch reads; the integer conv adds the branch's output into the kept channels
  in its epilogue (on ``triton`` the branch runs inside the integer conv where that pays);
* ``"codes"``: the input is already codes, written by the producing layer's epilogue (a chain of
  quantized layers never writes float activations; see :mod:`hybridops.fusion`);
* ``"merged"`` (full-precision input, as the first layer of the paper's networks): both branches
  are one float conv with ``dequant(W_q) + scatter(W_p)``;
* ``"fp_only"``: no quantized branch.

Only ``fp_weight`` and ``fp_bias`` are trainable (the online update); the quantized branch is frozen
integer data with no straight-through path, so gradients reach a layer's input through its pruned
branch only (a layer that kept no channels passes none): put the layers to fine-tune after, not
before, such layers — as the paper's online update does with the last classification layer.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from .kernels.geometry import conv_out_hw
from .kernels.packing import packed_size
from .ops import layer_op
from .ops.spec import PATHS, LayerSpec

FORMAT_VERSION = 1
__all__ = ["DeployedConv2d", "DeployedLinear", "DEPLOYED_LAYERS", "FORMAT_VERSION", "PATHS"]


class _DeployedBase(nn.Module):
    """State and behaviour shared by deployed conv and linear layers.

    Subclasses set the geometry, then call :meth:`_init_format`."""

    in_channels: int
    out_channels: int
    groups: int = 1

    def _init_format(self, kernel_size: Tuple[int, int], stride, padding, dilation, padding_mode: str, bias: bool,
                     bits_w: Optional[int], bits_a: Optional[int], a_signed: bool, fp_out_channels: int,
                     fp_in_channels: Optional[int], fp_bias: bool, backend: str, device, dtype) -> None:
        # geometry and format are validated once, here (LayerSpec), not per call
        self._spec = LayerSpec(self._kind, self.in_channels, self.out_channels, tuple(kernel_size), tuple(stride),
                               tuple(padding), tuple(dilation), self.groups, padding_mode, bits_w, bits_a,
                               bool(a_signed) if bits_a is not None else False)
        if not 0 <= fp_out_channels <= self.out_channels:
            raise ValueError(f"fp_out_channels (kept channels of the pruned branch) must lie in [0, "
                             f"{self.out_channels}], got {fp_out_channels}.")
        if bits_w is None and fp_out_channels == 0:
            raise ValueError("a deployed layer needs a quantized branch (bits_w) or kept full-precision channels.")
        if fp_in_channels is not None and (self.groups != 1 or not 0 < fp_in_channels <= self.in_channels):
            raise ValueError(f"fp_in_channels (input channels read by the pruned branch) applies to ungrouped layers "
                             f"and must lie in [1, {self.in_channels}], got {fp_in_channels} with groups={self.groups}.")
        self.backend = backend
        kh, kw = kernel_size
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
        # Deploy-time fusion (hybridops.fusion) edits the epilogue through relu, set_output_codes_
        # and set_codes_input_, and records the names of the model's modules it replaced by
        # nn.Identity, as [qualified name, type name] pairs (so that load_deployed_ can rebuild the
        # model's structure).
        self.register_buffer("out_qparams", None)
        self.absorbed: List[List[str]] = []
        # dtype the pruned branch computes in (None: the input's); set_fp_dtype_
        self.fp_dtype: Optional[torch.dtype] = None
        self._set_spec()
        self.validate()

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

    @property
    def spec(self) -> LayerSpec:
        """What this layer computes besides its tensors (geometry, formats, epilogue)."""
        return self._spec

    @property
    def path(self) -> str:
        """``"hybrid"``, ``"codes"``, ``"merged"`` or ``"fp_only"`` (see the module docstring)."""
        return self._spec.path

    @property
    def bits_w(self) -> Optional[int]:
        return self._spec.bits_w

    @property
    def bits_a(self) -> Optional[int]:
        return self._spec.bits_a

    @property
    def a_signed(self) -> bool:
        return self._spec.a_signed

    @property
    def relu(self) -> bool:
        return self._spec.relu

    @relu.setter
    def relu(self, on: bool) -> None:
        self._set_spec(relu=bool(on))

    @property
    def codes_input(self) -> bool:
        return self._spec.codes_input

    @property
    def out_bits(self) -> Optional[int]:
        return self._spec.out_bits

    @property
    def residual(self) -> bool:
        """Whether the epilogue adds a residual input (``layer(x, residual)``) before its ReLU."""
        return self._spec.residual

    @property
    def out_signed(self) -> bool:
        return self._spec.out_signed

    def _set_spec(self, **changes) -> None:
        spec = self._spec
        if changes:
            spec = dataclasses.replace(spec, **changes)
        self._spec, self._spec_ints = spec, spec.to_ints()
        # the layer without its residual and ReLU: for a residual the epilogue cannot take (another
        # shape or dtype, broadcast by the unfused model's add), which is then added as torch adds
        plain = dataclasses.replace(spec, residual=False, relu=False) if spec.residual else None
        self._plain = (plain, plain.to_ints()) if plain is not None else None

    def set_residual_(self) -> None:
        """Add a residual input in the epilogue, before the ReLU: the layer becomes
        ``relu(layer(x) + residual)``, called as ``layer(x, residual)`` (deploy-time fusion of a
        skip connection, :mod:`hybridops.fusion`). Only for a layer with a quantized input that
        writes floats."""
        if self.path not in ("hybrid", "codes") or self.out_qparams is not None:
            raise ValueError("only an integer layer (quantized input) that writes floats adds a residual in its "
                             "epilogue.")
        self._set_spec(residual=True)

    def set_codes_input_(self) -> None:
        """Take packed codes in this layer's input format instead of floats (the producer
        re-quantizes in its epilogue). Only for an integer layer without a pruned branch."""
        if self.path != "hybrid" or self.kept_channels:
            raise ValueError("only a quantized-input layer without a full-precision branch can take codes as input.")
        self._set_spec(codes_input=True)

    def set_output_codes_(self, qparams: torch.Tensor, bits: int, signed: bool) -> None:
        """Re-quantize the output in the epilogue to the codes of a chained consumer's input."""
        if self.path not in ("hybrid", "codes") or self.kept_channels:
            raise ValueError("only an integer layer without a full-precision branch can hand codes to its consumer "
                             "(a pruned branch must stay trainable, which needs float outputs).")
        self._set_spec(out_bits=int(bits), out_signed=bool(signed))
        self.out_qparams = qparams.detach().float().clone().to(self.scale.device)
        self.validate()

    def set_fp_dtype_(self, dtype: Optional[torch.dtype]) -> None:
        """Compute the pruned branch in ``dtype`` whatever the model's dtype: ``torch.bfloat16``
        runs it on a CPU's bf16 units (AVX-512 BF16, AMX) inside an fp32 model, at bf16 rounding of
        that branch's input and weights; None: in the input's dtype. The quantize pass writes the
        branch's input slice in ``dtype`` and the epilogue adds its output in fp32."""
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"the full-precision branch computes in float32, bfloat16 or float16 (or None: the "
                             f"input's dtype), got {dtype!r}.")
        if dtype is not None:
            layer_op.check_fp_dtype(self.backend, dtype)
        self.fp_dtype = dtype

    def format_state(self) -> dict:
        """Everything besides tensors that a saved deployed layer needs to be rebuilt (the
        constructor's arguments, the fusion state and the FP branch's compute dtype)."""
        return {"format_version": FORMAT_VERSION, "kind": self._kind, "init": self._init_args(), "relu": self.relu,
                "codes_input": self.codes_input, "out_bits": self.out_bits, "out_signed": self.out_signed,
                "residual": self.residual, "absorbed": list(self.absorbed),
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
        state = {"residual": False, **state}  # (checkpoints written before residual layers have none)
        for key in ("relu", "codes_input", "absorbed", "out_bits", "out_signed", "residual"):
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
        if state.get("residual", False):
            layer.set_residual_()
        if out_qparams is not None:
            layer.set_output_codes_(out_qparams, state["out_bits"], state["out_signed"])
        layer._load_fp_dtype(state)
        return layer

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
        self.validate()  # new tensors: checked now (and the old ones no longer held)
        return self

    def _tensors(self) -> tuple:
        """The op's tensor arguments, in its order. Read from the module's dicts directly:
        ``nn.Module.__getattr__`` per tensor is a sizeable part of a forward's host budget."""
        b, p = self._buffers, self._parameters
        return (b["w_packed"], b["scale"], b["bias"], b["in_qparams"], p["fp_weight"], p.get("fp_bias"), b["fp_in_idx"],
                b["fp_out_idx"], b["out_qparams"])

    def validate(self) -> None:
        """Check every tensor against the layer's spec (shapes, dtypes, devices, index ranges).
        Done when the layer is deployed or loaded, so that a forward checks only its input; call it
        after editing a deployed layer's tensors by hand."""
        tensors = self._tensors()
        layer_op.check_layer_tensors(self._spec, *tensors, self.backend)
        self._validated = self._index_versions(tensors)

    @staticmethod
    def _index_versions(tensors: tuple) -> tuple:
        in_idx, out_idx = tensors[6], tensors[7]
        return out_idx._version, None if in_idx is None else in_idx._version

    _TENSOR_NAMES = frozenset(("w_packed", "scale", "bias", "in_qparams", "fp_weight", "fp_bias", "fp_in_idx",
                               "fp_out_idx", "out_qparams"))

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in self._TENSOR_NAMES:
            # a tensor replaced (layer.fp_out_idx = ...): checked before the next forward uses it
            self.__dict__["_validated"] = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.validate()

    def dequantized_weight(self) -> torch.Tensor:
        """``codes * scale * levels_a``: the float weight of the quantized branch as it acts on the
        input's own scale (test and inspection helper; the kernels never materialise it)."""
        return layer_op.dequantized_weight(self._spec, self.w_packed, self.scale)

    def _forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, plain: bool = False) -> torch.Tensor:
        """The whole layer: one call of the op layer (:mod:`hybridops.ops.layer_op`); ``plain``:
        without the residual and the ReLU of a residual layer."""
        t = self._tensors()
        if not torch.compiler.is_compiling() and self._validated != self._index_versions(t):
            # a tensor replaced, or an index buffer edited in place, since the layer was checked:
            # check again before a kernel writes through it (compiled graphs check in the op)
            self.validate()
        spec, ints = self._plain if plain else (self._spec, self._spec_ints)
        return layer_op.hybrid_layer(spec, ints, x, *t, residual, self.fp_dtype, self.backend)

    def _residual_fits(self, x: torch.Tensor, residual: torch.Tensor, out_shape: Tuple[int, ...]) -> bool:
        """Whether the epilogue can take ``residual``: the output's shape and dtype."""
        if self._plain is None:
            raise ValueError(f"this {type(self).__name__} adds no residual in its epilogue: call it without one.")
        return tuple(residual.shape) == tuple(out_shape) and \
            residual.dtype == layer_op.output_dtype(self._spec, x, self.fp_weight)

    def _unfused_residual(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The unfused model's add (broadcasting, promoting) and ReLU after the plain layer."""
        y = y + residual
        return F.relu(y) if self.relu else y

    def thin_forward(self, x: torch.Tensor, columns: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The pruned branch alone on the kept channels (``fp_only`` layers, ungrouped): ``x`` holds
        the input channels ``fp_in_idx`` (all when None) in that order, or, with ``columns``, only
        those of them at positions ``columns`` (the others being zero, their weight columns are
        skipped); the result holds the output channels ``fp_out_idx``, without the scatter into the
        full width (hybridops/thin.py chains these). Differentiable in the branch's weights
        (online updates: plain torch ops); at inference the backend's prepacked float conv where it
        has one."""
        if self.path != "fp_only" or self.groups != 1:
            raise ValueError(f"thin_forward runs ungrouped layers without a quantized branch, got path {self.path!r} "
                             f"and groups={self.groups}.")
        reads = self.in_channels if self.fp_in_idx is None else int(self.fp_in_idx.numel())
        if columns is not None:
            reads = int(columns.numel())
        if x.shape[1 if self._kind == "conv2d" else -1] != reads:
            raise ValueError(f"{type(self).__name__}.thin_forward expects the {reads} channels its branch reads, "
                             f"got input {tuple(x.shape)}.")
        dt = self.fp_dtype or x.dtype
        trains = torch.is_grad_enabled() and (x.requires_grad or self.fp_weight.requires_grad or (
            self.fp_bias is not None and self.fp_bias.requires_grad))
        if not trains and not torch.compiler.is_compiling() and self._spec.padding_mode == "zeros" \
                and self.fp_weight.dtype == dt and (self.fp_bias is None or self.fp_bias.dtype == dt):
            # inference: the backend's prepacked float conv, where it has one (measured on the thin
            # ResNet-18's small convs: 42-67 us against 54-123 us for F.conv2d)
            y = layer_op.pruned_branch_inference(self._spec, x.to(dt), self.fp_weight, self.fp_bias, columns,
                                                 self.relu, self.backend)
            if y is not None:
                return y.to(x.dtype)
        w = (self.fp_weight if columns is None else self.fp_weight.index_select(1, columns)).to(dt)
        b = self.fp_bias.to(dt) if self.fp_bias is not None else None
        if self._kind == "linear":
            y = F.linear(x.to(dt), w.flatten(1), b)
        else:
            top, bottom, left, right = self.padding
            if self.padding_mode != "zeros" or top != bottom or left != right:
                x = F.pad(x, (left, right, top, bottom), mode=self.padding_mode if self.padding_mode != "zeros"
                          else "constant")
                top = left = 0
            y = F.conv2d(x.to(dt), w, b, self.stride, (top, left), self.dilation)
        y = F.relu(y) if self.relu else y
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        q = {"hybrid": f"w{self.bits_w}, a{self.bits_a}{'s' if self.a_signed else 'u'}",
             "codes": f"w{self.bits_w}, a{self.bits_a}{'s' if self.a_signed else 'u'} codes in",
             "merged": f"w{self.bits_w}, a=fp", "fp_only": "fp only"}[self.path]
        fused = "+".join(name for name, on in (("bn", self.fused_bn), ("add", self.residual), ("relu", self.relu),
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
        backend: which kernels run the quantized branch (see :mod:`hybridops.backend_selection`).

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
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), list(_pair(stride)), list(_pair(dilation))
        pad = [padding] * 2 if isinstance(padding, int) else list(padding)
        self.padding = [pad[0], pad[0], pad[1], pad[1]] if len(pad) == 2 else pad
        if len(self.padding) != 4 or min(self.padding) < 0:
            raise ValueError(f"padding must be an int, (ph, pw) or (top, bottom, left, right), got {padding!r}.")
        self.padding_mode = padding_mode
        self._init_format(self.kernel_size, self.stride, self.padding, self.dilation, padding_mode, bias, bits_w,
                          bits_a, a_signed, fp_out_channels, fp_in_channels, fp_bias, backend, device, dtype)

    def _init_args(self) -> dict:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=list(self.kernel_size),
                    stride=list(self.stride), padding=list(self.padding), dilation=list(self.dilation),
                    groups=self.groups, bias=self.bias is not None, padding_mode=self.padding_mode,
                    bits_w=self.bits_w, bits_a=self.bits_a, a_signed=self.a_signed,
                    fp_out_channels=self.kept_channels,
                    fp_in_channels=None if (self.fp_in_idx is None or self.groups > 1) else int(self.fp_in_idx.numel()),
                    fp_bias=self.fp_bias is not None)

    def _geometry_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, "
                f"stride={tuple(self.stride)}, padding={tuple(self.padding)}, dilation={tuple(self.dilation)}, "
                f"groups={self.groups}")

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``layer(x)``; a layer that adds a residual (:attr:`residual`) is called as
        ``layer(x, residual)``."""
        if residual is None:
            return self._forward(x)
        h, w = (x.shape[1], x.shape[2]) if self.codes_input else (x.shape[-2], x.shape[-1])
        out_shape = (x.shape[0], self.out_channels, *conv_out_hw(h, w, *self.kernel_size, self.stride, self.padding,
                                                                  self.dilation))
        if self._residual_fits(x, residual, out_shape):
            return self._forward(x, residual)
        return self._unfused_residual(self._forward(x, plain=True), residual)


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
        self._init_format((1, 1), (1, 1), (0, 0, 0, 0), (1, 1), "zeros", bias, bits_w, bits_a, a_signed,
                          fp_out_channels, fp_in_channels, fp_bias, backend, device, dtype)

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

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``layer(x)``; a layer that adds a residual (:attr:`residual`) is called as
        ``layer(x, residual)``."""
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects input (..., {self.in_features}), got {tuple(x.shape)}.")
        lead = x.shape[:-1]
        x4 = x.reshape(-1, self.in_features, 1, 1)
        if residual is not None:
            out_shape = (*lead, self.out_features)
            if not self._residual_fits(x, residual, out_shape):
                return self._unfused_residual(self._forward(x4, plain=True).reshape(out_shape), residual)
            return self._forward(x4, residual.reshape(x4.shape[0], self.out_features, 1, 1)).reshape(out_shape)
        if x.dim() == 2:
            return self._forward(x4).view(x.shape[0], self.out_features)
        return self._forward(x4).reshape(*lead, self.out_features)


DEPLOYED_LAYERS = (DeployedConv2d, DeployedLinear)
