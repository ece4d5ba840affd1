"""Trainable hybrid layers: quantized, channel-pruned full-precision, and their sum (eq 5).

``QuantConv2d`` / ``QuantLinear``: QIL-quantized weights (eq 6-7) and input activations
(eq 8-9, or signed eq 6-7 style when calibration sees negative inputs); output
``out_scale[co] * op(hat_q(x), hat_q(W)) + bias``. The integer kernels compute exactly this after
:func:`hybridops.deploy_` (``scale = out_scale / (levels_a * levels_w)``).

``PrunedConv2d`` / ``PrunedLinear``: a full-precision layer whose output channels are gated by a
:class:`~hybridops.prune.ChannelGate` (eq 13-14).

``HybridConv2d`` / ``HybridLinear``: ``QuantConv(x) + PrunedConv(x)`` (eq 5 at layer level), a
drop-in replacement for one ``nn.Conv2d`` / ``nn.Linear``. Converted from a float layer, the
quantized branch starts from the float weights and the pruned branch from the quantization
residual ``W - dequant(W_q)`` on the channels where that residual is largest, so an untrained
conversion already approximates the float layer.

Calibration (interval of the input quantizer, per-channel output scale, residual) needs one batch
of real inputs: pass ``example_inputs`` to :func:`hybridops.hybridize_`, call
:func:`hybridops.calibrate_`, or let the first forward pass calibrate (lazily; under
``torch.distributed`` the result is broadcast from rank 0 so replicas stay identical).
"""
from __future__ import annotations

import functools
import math
import weakref
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from .backend_selection import resolve_backend
from .deployed import DeployedConv2d, DeployedLinear
from .kernels import derived
from .kernels.packing import levels, pack_weight
from .config import kept_count
from .prune import ChannelGate
from .quant import IntervalQuantizer, qparams

_size_2 = Union[int, Tuple[int, int]]


# ----------------------------------------------------------------------------- shared op specs
class _ConvSpec:
    """The geometry of a 2-d convolution, as ``nn.Conv2d`` takes it."""

    def _init_conv(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode):
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}.")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular', got {padding_mode!r}.")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid' or integers, got {padding!r}.")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError("padding='same' is not supported for strided convolutions (as in nn.Conv2d).")
            self.padding = padding
        else:
            self.padding = _pair(padding)
        self.groups, self.padding_mode = groups, padding_mode
        self._weight_shape = (out_channels, in_channels // groups, *self.kernel_size)

    def explicit_padding(self) -> Tuple[int, int, int, int]:
        """``(top, bottom, left, right)``, resolving ``'same'`` the way ``F.conv2d`` does
        (the extra pixel of an odd total goes to the bottom/right)."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            pads = []
            for k, dil in zip(self.kernel_size, self.dilation):
                total = dil * (k - 1)
                pads += [total // 2, total - total // 2]
            return tuple(pads)
        ph, pw = self.padding
        return (ph, ph, pw, pw)

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
        if self.padding_mode != "zeros":
            top, bottom, left, right = self.explicit_padding()
            x = F.pad(x, (left, right, top, bottom), mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    # The channel axis of the input and output: NCHW's axis 1 (a conv's input is NCHW whatever its
    # memory format).
    channel_dim = 1
    _channel_shape = (-1, 1, 1)
    _float_type = nn.Conv2d

    def _conv_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s

    @staticmethod
    def _float_kwargs(conv: nn.Conv2d) -> dict:
        return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                    stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)


class _LinearSpec:
    """The geometry of a linear layer."""

    def _init_linear(self, in_features, out_features):
        self.in_features, self.out_features = in_features, out_features
        self._weight_shape = (out_features, in_features)

    def _op(self, x, w, b):
        return F.linear(x, w, b)

    # The last axis, as nn.Linear reads it: (N, C), (N, L, C) or channels-last (N, H, W, C) input.
    channel_dim = -1
    _channel_shape = (-1,)
    _float_type = nn.Linear

    def _conv_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    @staticmethod
    def _float_kwargs(lin: nn.Linear) -> dict:
        return dict(in_features=lin.in_features, out_features=lin.out_features, bias=lin.bias is not None)


def _check_float_source(cls, layer) -> None:
    if not isinstance(layer, cls._float_type):
        raise TypeError(f"{cls.__name__}.from_float expects a torch.nn.{cls._float_type.__name__}, "
                        f"got {type(layer).__name__}.")


def _broadcast_from_rank0(tensors) -> None:
    """Keep replicas identical when lazy calibration happens inside a distributed job."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for t in tensors:
            torch.distributed.broadcast(t.data, src=0)


# ----------------------------------------------------------------------------- eval = deployed
class _DeployedArithmetic(nn.Module):
    """Eval-mode forwards compute what the deployed layer computes.

    The fake-quantized training arithmetic (float convolutions of ``code / levels``) and the
    deployed kernels (exact integer accumulators times one fp32 scale) agree to float rounding in
    one layer, but an activation that lands on a rounding boundary gets another code, and deep
    networks compound those flips (8-11% relative on an untrained ResNet-50). So in eval mode a
    layer runs its deployed twin — built by :func:`hybridops.deploy_layer` on the backend
    ``deploy_`` picks by default for the input's device, cached until a parameter or buffer
    changes — and ``deploy_`` changes nothing the model computes (bit for bit on that backend
    where no BatchNorm is folded). With gradients needed the value is the twin's and the gradient
    the training arithmetic's (straight-through), so eval-mode fine-tuning keeps working.
    Training-mode forwards and ``torch.compile`` tracing use the training arithmetic."""

    def _deployed_twin(self, x: torch.Tensor) -> Optional[nn.Module]:
        backend = resolve_backend(None, x.device)

        def build():
            try:
                return deploy_layer(self, backend).eval()
            except ValueError:
                return None  # nothing to deploy (a pruned layer with no kept channel): zeros either way

        # rebuilt when a parameter or buffer changes (the package's one cache, hybridops/kernels/derived.py)
        return derived.cached("deployed_twin", tuple(self.parameters()) + tuple(self.buffers()), (backend, x.device),
                              build)

    def _eval_or_train(self, x: torch.Tensor, train_forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.training or torch.compiler.is_compiling() or x.numel() == 0:
            return train_forward(x)
        twin = self._deployed_twin(x)
        if twin is None:
            return train_forward(x)
        y = twin(x)
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            y_train = train_forward(x)
            return y.detach() + (y_train - y_train.detach())
        return y


# ----------------------------------------------------------------------------- quantized branch
def _detach_act_stats(layer_ref, forward: int, grad: torch.Tensor) -> None:
    """Tensor hook on a quantized layer's input: a backward reached it, so the graph its eq 12
    statistics hang from is freed; keep their values only. A weak reference and a forward count
    (not the statistics themselves) keep the hook from holding the graph alive or touching the
    statistics of a later forward."""
    layer = layer_ref()
    if layer is not None and layer._act_stats_forward == forward and layer.act_stats is not None:
        layer.act_stats = tuple(s.detach() for s in layer.act_stats)


def _norm_stats(weight: torch.Tensor, wq_params: torch.Tensor) -> torch.Tensor:
    """Mean and (Bessel-corrected) std of eq 11's ``v = alpha_W |W| + beta_W``, differentiable."""
    v = wq_params[0] * weight.abs().float() + wq_params[1]
    return torch.stack([v.mean(), v.std() if v.numel() > 1 else v.new_zeros(())])


class _QuantBase(_DeployedArithmetic):
    def _init_quant(self, bias, bits_w, bits_a, quantize_input, device, dtype):
        self.weight = nn.Parameter(torch.empty(self._weight_shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(self._weight_shape[0], device=device, dtype=dtype)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.wq = IntervalQuantizer(bits_w, signed=True, device=device)
        self.aq = IntervalQuantizer(bits_a, signed=False, device=device, batched=True) if quantize_input else None
        self.out_scale = nn.Parameter(torch.ones(self._weight_shape[0], device=device))
        # eq 10-12 normalisation (set by hybridize_ from QuantConfig.normalize, mu0, sigma0); a
        # target of None is the calibrated weights' own value (norm_targets()).
        self.normalize = False
        self.reg_targets: Tuple[Optional[float], Optional[float]] = (None, None)
        # mean and std of eq 11's alpha_W |W| + beta_W as calibrated (NaN before calibration)
        self.register_buffer("calibrated_norm_stats", torch.full((2,), float("nan"), device=device))
        self.act_stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._act_stats_forward = 0  # counts the forwards that recorded act_stats
        self.backend = "torch"
        # A float flag (not bool) so every distributed backend can broadcast it with the buffers.
        self.register_buffer("calibrated_flag", torch.zeros((), device=device))
        self._calibrated_cache = False
        self._calibrate_weight()

    def __getstate__(self):
        # act_stats hold the latest training forward's graph (non-leaf tensors): they are not
        # state, and keeping them would make copy.deepcopy / pickling fail after a training step.
        state = super().__getstate__()
        state["act_stats"] = None
        return state

    @torch.no_grad()
    def _calibrate_weight(self) -> None:
        s_w = self.wq.calibrate(self.weight)
        self.out_scale.fill_(s_w)

    @property
    def calibrated(self) -> bool:
        # The buffer is read once (a device sync) and the answer cached, so a calibrated layer's
        # forward has no data-dependent branch.
        if not self._calibrated_cache:
            self._calibrated_cache = bool(self.calibrated_flag)
        return self._calibrated_cache

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Fit the input interval to ``x`` and the per-channel output scale to the float layer
        (least squares of ``op(hat_q(x), hat_q(W))`` against ``op(x, W)``, per channel)."""
        s_w = self.wq.calibrate(self.weight)
        self.calibrated_norm_stats.copy_(self.norm_stats())
        s_a = 1.0
        if self.aq is not None:
            s_a = self.aq.calibrate(x, signed=bool((x < 0).any()))
        y_f = self._op(x, self.weight, None)
        y_q = self._op(self._quant_input(x), self.wq(self.weight), None)
        if self.aq is not None:
            # y_q is a sum of code products on the grid 1 / (levels_a * levels_w); snap it there so
            # that float cancellation (1e-9 instead of an exact 0) cannot pass for a real signal and
            # blow the least-squares scale up by orders of magnitude.
            grid = float(self.aq.levels * self.wq.levels)
            y_q = torch.round(y_q * grid) / grid
        dims = [d for d in range(y_f.dim()) if d != self.channel_dim % y_f.dim()]
        num, den = (y_f * y_q).sum(dims), (y_q * y_q).sum(dims)
        fallback = torch.full_like(num, s_a * s_w)
        scale = torch.where(den > 0, num / den.clamp_min(1e-30), fallback)
        # A degenerate fit (a dead channel) would zero the channel for good: keep the
        # interval-derived scale there.
        scale = torch.where(scale > 0, scale, fallback)
        # A fit on very few output positions (a 1x1 map late in a network) can overfit wildly;
        # it refines the interval-derived scale, so keep it within a factor 4 of it.
        scale = torch.minimum(torch.maximum(scale, fallback / 4), fallback * 4)
        self.out_scale.copy_(scale)
        self.calibrated_flag.fill_(1.0)
        _broadcast_from_rank0([self.out_scale, self.wq.c, self.wq.log_d] +
                              ([self.aq.c, self.aq.log_d] if self.aq is not None else []))
        if self.aq is not None:
            self.aq.signed = bool(self._sync_flag(self.aq.signed, x.device))

    @staticmethod
    def _sync_flag(flag: bool, device) -> bool:
        t = torch.tensor(float(flag), device=device)
        _broadcast_from_rank0([t])
        return bool(t.item())

    @classmethod
    def from_float(cls, layer: nn.Module, bits_w: int = 4, bits_a: int = 4, quantize_input: bool = True):
        """A quantized copy of a float ``nn.Conv2d`` / ``nn.Linear`` (weights copied, weight
        interval calibrated; the input interval calibrates on the first data it sees)."""
        _check_float_source(cls, layer)
        new = cls(**cls._float_kwargs(layer), bits_w=bits_w, bits_a=bits_a, quantize_input=quantize_input,
                  device=layer.weight.device, dtype=layer.weight.dtype)
        return _copy_float(new, layer)

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.aq is None else self.aq(x, self.backend)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints saved before eq 11's calibrated targets existed: recompute them from the saved
        # weight and interval (what calibration would have recorded, up to later training).
        key = prefix + "calibrated_norm_stats"
        if key not in state_dict and prefix + "weight" in state_dict and prefix + "wq.c" in state_dict:
            calibrated = float(state_dict.get(prefix + "calibrated_flag", torch.ones(()))) > 0
            stats = (_norm_stats(state_dict[prefix + "weight"], qparams(state_dict[prefix + "wq.c"],
                                                                        state_dict[prefix + "wq.log_d"].exp()))
                     if calibrated else torch.full((2,), float("nan")))
            state_dict[key] = stats.to(self.calibrated_norm_stats.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def norm_stats(self) -> torch.Tensor:
        """``[mean, std]`` of eq 11's normalised weights now (differentiable: :func:`hybridops.quant_loss`)."""
        return _norm_stats(self.weight, self.wq.qparams())

    def norm_targets(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """eq 11's ``(mu_0, sigma_0)``: :attr:`reg_targets`, where one is None the calibrated
        weights' own value; None while such a layer is not calibrated."""
        mu0, sigma0 = self.reg_targets
        if (mu0 is None or sigma0 is None) and not self.calibrated:
            return None
        stats = self.calibrated_norm_stats
        return (stats[0] if mu0 is None else stats.new_tensor(mu0), stats[1] if sigma0 is None else stats.new_tensor(sigma0))

    def effective_weight(self) -> torch.Tensor:
        """The float weight the quantized branch acts as on ``x``:
        ``hat_q(W) * out_scale[co] / s_a`` with ``s_a = 2 d_A`` what the activation range
        ``[0, 1]`` of ``hat_q(x)`` is worth. Exact only while ``c_A = d_A`` (``beta_A = 0``), which
        calibration sets: a calibration-time helper for the pruned branch's residual start."""
        s_a = float(2 * self.aq.d.detach()) if self.aq is not None else 1.0
        return self.wq(self.weight).detach() * (self.out_scale.detach() / s_a).view(-1, *([1] * (self.weight.dim() - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:
            self.calibrate(x)
        # eq 12 statistics of this forward only: a stale pair would make regularization()
        # backpropagate through a finished step's graph.
        self.act_stats = None
        if self.normalize and self.training and self.aq is not None:
            self.act_stats = (x.mean(), x.std())
            self._act_stats_forward += 1
            if x.requires_grad:
                # They hang from the network's graph through x, and a backward through x frees it:
                # from then on regularization() reads them detached, so it works both before the
                # backward (eq 12's gradient also reaches the layers below) and after it.
                x.register_hook(functools.partial(_detach_act_stats, weakref.ref(self), self._act_stats_forward))
        return self._eval_or_train(x, self._train_forward)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._op(self._quant_input(x), self.wq(self.weight, self.backend), None)
        y = y * self.out_scale.view(self._channel_shape).to(y.dtype)
        return y if self.bias is None else y + self.bias.view(self._channel_shape)

    def extra_repr(self) -> str:
        a = f"a{self.aq.bits}{'s' if self.aq.signed else 'u'}" if self.aq is not None else "a=fp"
        return f"{self._conv_repr()}, w{self.wq.bits}, {a}, bias={self.bias is not None}"


class QuantConv2d(_ConvSpec, _QuantBase):
    """Conv2d with QIL-quantized weights and input activations. Arguments as ``nn.Conv2d`` plus
    ``bits_w``, ``bits_a`` and ``quantize_input`` (False keeps the input in full precision)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _size_2, stride: _size_2 = 1,
                 padding: Union[str, _size_2] = 0, dilation: _size_2 = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", bits_w: int = 4, bits_a: int = 4, quantize_input: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self._init_conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        self._init_quant(bias, bits_w, bits_a, quantize_input, device, dtype)


class QuantLinear(_LinearSpec, _QuantBase):
    """Linear layer with QIL-quantized weights and input activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits_w: int = 4, bits_a: int = 4,
                 quantize_input: bool = True, device=None, dtype=None):
        super().__init__()
        self._init_linear(in_features, out_features)
        self._init_quant(bias, bits_w, bits_a, quantize_input, device, dtype)


@torch.no_grad()
def _copy_float(layer, src):
    layer.weight.copy_(src.weight)
    if layer.bias is not None:
        layer.bias.copy_(src.bias)
    if isinstance(layer, _QuantBase):
        layer._calibrate_weight()
    return layer


# ----------------------------------------------------------------------------- pruned branch
class _PrunedBase(_DeployedArithmetic):
    def _init_pruned(self, bias, tau, threshold, kept_mask, init_logit, device, dtype):
        self.weight = nn.Parameter(torch.empty(self._weight_shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(self._weight_shape[0], device=device, dtype=dtype)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.gate = ChannelGate(self._weight_shape[0], tau=tau, threshold=threshold, kept_mask=kept_mask,
                                init_logit=init_logit)
        self.gate.to(device)

    @classmethod
    def from_float(cls, layer: nn.Module, **gate_kwargs):
        """A gated copy of a float ``nn.Conv2d`` / ``nn.Linear``; ``gate_kwargs`` go to the gate."""
        _check_float_source(cls, layer)
        new = cls(**cls._float_kwargs(layer), **gate_kwargs, device=layer.weight.device, dtype=layer.weight.dtype)
        return _copy_float(new, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._eval_or_train(x, self._train_forward)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        # eq 14: masking the pre-activation equals masking relu(.) because M is 0/1.
        y = self._op(x, self.weight, self.bias)
        return y * self.gate().view(self._channel_shape).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self._conv_repr()}, bias={self.bias is not None}"


class PrunedConv2d(_ConvSpec, _PrunedBase):
    """Full-precision Conv2d whose output channels are gated (eq 13-14). Arguments as
    ``nn.Conv2d`` plus the gate's ``tau``, ``threshold``, initial ``kept_mask`` and ``init_logit``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _size_2, stride: _size_2 = 1,
                 padding: Union[str, _size_2] = 0, dilation: _size_2 = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", tau: float = 1.0, threshold: float = 0.5,
                 kept_mask: Optional[torch.Tensor] = None, init_logit: float = 3.0, device=None, dtype=None):
        super().__init__()
        self._init_conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        self._init_pruned(bias, tau, threshold, kept_mask, init_logit, device, dtype)


class PrunedLinear(_LinearSpec, _PrunedBase):
    """Full-precision linear layer whose output features are gated (eq 13-14)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, tau: float = 1.0,
                 threshold: float = 0.5, kept_mask: Optional[torch.Tensor] = None, init_logit: float = 3.0,
                 device=None, dtype=None):
        super().__init__()
        self._init_linear(in_features, out_features)
        self._init_pruned(bias, tau, threshold, kept_mask, init_logit, device, dtype)


# ----------------------------------------------------------------------------- hybrid = sum
class _HybridBase(_DeployedArithmetic):
    """``quant(x) + pruned(x)``; subclasses set the two branches."""

    quant: _QuantBase
    pruned: _PrunedBase

    def _init_hybrid(self, keep: float):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must lie in (0, 1], got {keep!r}.")
        self.keep = float(keep)

    @property
    def calibrated(self) -> bool:
        return self.quant.calibrated

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Calibrate the quantized branch on ``x``, then start the pruned branch as the residual
        ``W - effective_weight`` on the ``ceil(keep * C_out)`` channels with the largest residual."""
        self.quant.calibrate(x)
        residual = self.quant.weight - self.quant.effective_weight()
        n_keep = kept_count(self.keep, residual.shape[0])
        norms = residual.flatten(1).norm(dim=1)
        kept = torch.zeros(residual.shape[0], dtype=torch.bool, device=residual.device)
        kept[torch.topk(norms, n_keep).indices] = True
        self.pruned.weight.copy_(residual)
        self.pruned.gate.reset(kept)
        _broadcast_from_rank0([self.pruned.weight, self.pruned.gate.logits])

    @classmethod
    def from_float(cls, layer: nn.Module, bits_w: int = 4, bits_a: int = 4, quantize_input: bool = True,
                   keep: float = 0.25, tau: float = 1.0, threshold: float = 0.5, init_logit: float = 3.0):
        """A hybrid copy of a float ``nn.Conv2d`` / ``nn.Linear``: the quantized branch starts from
        its weights; the pruned branch gets the quantization residual at calibration."""
        _check_float_source(cls, layer)
        new = cls(**cls._float_kwargs(layer), bits_w=bits_w, bits_a=bits_a, quantize_input=quantize_input,
                  keep=keep, tau=tau, threshold=threshold, init_logit=init_logit,
                  device=layer.weight.device, dtype=layer.weight.dtype)
        _copy_float(new.quant, layer)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:
            self.calibrate(x)
        if not self.quant.training:
            self.quant.act_stats = None  # eq 12 statistics belong to training forwards only
        return self._eval_or_train(x, self._train_forward)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        # branches in training mode go through their forward (eq 12 statistics, sampled gates)
        q = self.quant(x) if self.quant.training else self.quant._train_forward(x)
        p = self.pruned(x) if self.pruned.training else self.pruned._train_forward(x)
        return q + p

    def extra_repr(self) -> str:
        return f"{self._conv_repr()}, keep={self.keep}"


class HybridConv2d(_ConvSpec, _HybridBase):
    """Drop-in hybrid replacement for ``nn.Conv2d``: ``QuantConv2d(x) + PrunedConv2d(x)`` (eq 5)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _size_2, stride: _size_2 = 1,
                 padding: Union[str, _size_2] = 0, dilation: _size_2 = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", bits_w: int = 4, bits_a: int = 4, quantize_input: bool = True,
                 keep: float = 0.25, tau: float = 1.0, threshold: float = 0.5, init_logit: float = 3.0,
                 device=None, dtype=None):
        super().__init__()
        self._init_conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        geo = dict(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride,
                   padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode,
                   device=device, dtype=dtype)
        self.quant = QuantConv2d(**geo, bias=bias, bits_w=bits_w, bits_a=bits_a, quantize_input=quantize_input)
        self.pruned = PrunedConv2d(**geo, bias=False, tau=tau, threshold=threshold, init_logit=init_logit)
        self._init_hybrid(keep)


class HybridLinear(_LinearSpec, _HybridBase):
    """Drop-in hybrid replacement for ``nn.Linear``: ``QuantLinear(x) + PrunedLinear(x)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits_w: int = 4, bits_a: int = 4,
                 quantize_input: bool = True, keep: float = 0.25, tau: float = 1.0, threshold: float = 0.5,
                 init_logit: float = 3.0, device=None, dtype=None):
        super().__init__()
        self._init_linear(in_features, out_features)
        geo = dict(in_features=in_features, out_features=out_features, device=device, dtype=dtype)
        self.quant = QuantLinear(**geo, bias=bias, bits_w=bits_w, bits_a=bits_a, quantize_input=quantize_input)
        self.pruned = PrunedLinear(**geo, bias=False, tau=tau, threshold=threshold, init_logit=init_logit)
        self._init_hybrid(keep)


QUANT_LAYERS = (QuantConv2d, QuantLinear)
PRUNED_LAYERS = (PrunedConv2d, PrunedLinear)
HYBRID_LAYERS = (HybridConv2d, HybridLinear)
TRAINABLE_LAYERS = HYBRID_LAYERS + QUANT_LAYERS + PRUNED_LAYERS
LINEAR_LAYERS = (HybridLinear, QuantLinear, PrunedLinear)


@torch.no_grad()
def deploy_layer(layer: nn.Module, backend: str = "torch", fp_in_idx: Optional[torch.Tensor] = None,
                 fp_dtype: Optional[torch.dtype] = None):
    """The deployed version of one trained hybrid / quantized / pruned layer: builds a
    :class:`DeployedConv2d` / :class:`DeployedLinear` of the same geometry and packs into it the
    integer weights and frozen input interval of the quantized branch and the kept rows (and, with
    ``fp_in_idx``, the read input columns) of the pruned branch.

    ``fp_in_idx``: the input channels the pruned branch reads, when its producer was pruned too
    (:class:`hybridops.HybridNetwork` compounds pruning); None: all of them. ``fp_dtype``: what the
    pruned branch computes in (:meth:`DeployedConv2d.set_fp_dtype_`)."""
    if isinstance(layer, HYBRID_LAYERS):
        quant, pruned = layer.quant, layer.pruned
    elif isinstance(layer, QUANT_LAYERS):
        quant, pruned = layer, None
    elif isinstance(layer, PRUNED_LAYERS):
        quant, pruned = None, layer
    else:
        raise TypeError(f"deploy_layer takes a hybrid, quantized or pruned layer, got {type(layer).__name__}.")
    if quant is not None and not quant.calibrated:
        raise RuntimeError("deploy_layer needs a calibrated layer: run hybridops.calibrate_ or a forward pass first.")
    ref = quant if quant is not None else pruned
    conv = isinstance(layer, (HybridConv2d, QuantConv2d, PrunedConv2d))
    kept = pruned.gate.kept_indices() if pruned is not None else None
    groups = layer.groups if conv else 1
    fmt = dict(bits_w=quant.wq.bits if quant is not None else None,
               bits_a=quant.aq.bits if (quant is not None and quant.aq is not None) else None,
               a_signed=bool(quant.aq.signed) if (quant is not None and quant.aq is not None) else False,
               fp_out_channels=0 if kept is None else int(kept.numel()),
               fp_in_channels=None if (fp_in_idx is None or groups > 1) else int(fp_in_idx.numel()),
               fp_bias=pruned is not None and pruned.bias is not None,
               backend=backend, device=ref.weight.device, dtype=ref.weight.dtype)
    has_bias = quant is not None and quant.bias is not None  # a pruned-only layer's bias is fp_bias
    if conv:
        new = DeployedConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                             list(layer.explicit_padding()), layer.dilation, groups, has_bias, layer.padding_mode, **fmt)
    else:
        new = DeployedLinear(layer.in_features, layer.out_features, has_bias, **fmt)
    if quant is not None:
        codes = quant.wq.codes(quant.weight)[0].to(torch.int8)
        new.w_packed.copy_(pack_weight(codes if codes.dim() == 4 else codes.view(*codes.shape, 1, 1), quant.wq.bits))
        lw = levels(quant.wq.bits, True)
        la = quant.aq.levels if quant.aq is not None else 1  # a float input is not rescaled
        new.scale.copy_(quant.out_scale.detach().float() / (la * lw))
        if new.bias is not None:
            new.bias.copy_(quant.bias.detach().float())
        if quant.aq is not None:
            new.in_qparams.copy_(quant.aq.qparams().detach())
    if kept is not None and kept.numel():
        w = pruned.weight.detach().index_select(0, kept)
        w = w if w.dim() == 4 else w.view(*w.shape, 1, 1)
        new.fp_out_idx.copy_(kept)
        if groups > 1:
            cin_g, cout_g = layer.in_channels // groups, layer.out_channels // groups
            grp = torch.div(kept, cout_g, rounding_mode="floor")
            new.fp_in_idx.copy_((grp.view(-1, 1) * cin_g + torch.arange(cin_g, device=kept.device)).flatten())
        elif fp_in_idx is not None:
            w = w.index_select(1, fp_in_idx.to(w.device))
            new.fp_in_idx.copy_(fp_in_idx)
        new.fp_weight.copy_(w)
        if new.fp_bias is not None:
            new.fp_bias.copy_(pruned.bias.detach().index_select(0, kept))
    new.set_fp_dtype_(fp_dtype)
    new.validate()
    new.train(layer.training)
    return new
