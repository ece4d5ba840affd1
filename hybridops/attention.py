"""Attention modules whose projections are layers of their own, so that they convert, and whose
attention products may run on quantized activations (:class:`AttentionProducts`).

``nn.MultiheadAttention`` keeps its input projection as one parameter (``in_proj_weight``) and
hands ``out_proj.weight`` to ``F.multi_head_attention_forward`` itself: neither is a layer that
:func:`hybridops.hybridize_` can swap. :class:`HybridMultiheadAttention` computes the same function
with four ``nn.Linear`` children (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) that the
conversion then treats like any other ``Linear`` (hybrid, quantized or pruned; deployed onto the
integer matmul). The rewrite itself is float-exact up to summation order: a query projection is
the first third of ``in_proj_weight``, and so on. Self-attention quantizes its input three times
(once per projection, each with its own interval); the projections' products dominate.

Call signature and results are ``nn.MultiheadAttention``'s (``batch_first``, unbatched input,
``key_padding_mask``, ``attn_mask`` with ``True`` = not allowed or additive, ``need_weights``
with head-averaged weights, dropout on the weights in training). What it does not rewrite
(``add_bias_kv``, ``add_zero_attn``) :func:`rewrite_reason` names; conversion then leaves the
module in float and reports why. torchvision's Swin (v1) window attention gets the same treatment
(:class:`HybridWindowAttention`); timm's ``Attention`` calls its ``qkv`` and ``proj`` layers
itself and converts as it is, and is rewritten (:class:`HybridTimmAttention`) only to quantize its
attention products.

With ``bits_attention`` (``HybridConfig(bits_attention=6)``: the paper's HybTransT) a rewritten
module's attention products run through :class:`AttentionProducts`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backend_selection import resolve_backend
from .kernels import derived
from .ops.attention import quantized_attention
from .quant import IntervalQuantizer


class AttentionProducts(nn.Module):
    """The two products of one attention module, ``softmax(Q K^T * scale + mask) V``: float, or
    on quantized activations (``bits``; the paper's HybTransT "att" part). Its own module so that
    :func:`hybridops.count_bops` sees the products' shapes.

    Quantized: Q, K and V become signed ``bits``-bit codes, each through its own learnable QIL
    interval (``c``, ``d``; the top code is worth ``c + d``), and ``Q K^T`` is an exact integer
    product (``hybridops::quantized_attention``, docs/attention.md). Training mode computes the
    same function on fake-quantized values (``code / levels * (c + d)``, straight-through
    gradients to the inputs and the intervals, LSQ gradient scaling as every
    :class:`IntervalQuantizer`) with ``F.scaled_dot_product_attention``, which also applies
    attention dropout. Eval mode runs the op (its own straight-through autograd) on ``backend``
    (set by :func:`hybridops.deploy_`; ``"auto"``: the default backend of the device). The
    intervals calibrate on the first inputs they see, or in :func:`hybridops.calibrate_`'s pass."""

    def __init__(self, bits: Optional[int] = None, device=None):
        super().__init__()
        self.bits = bits
        quantizer = (lambda: IntervalQuantizer(bits, True, device=device, batched=True)) if bits is not None else None
        self.q_quant = quantizer() if quantizer else None
        self.k_quant = quantizer() if quantizer else None
        self.v_quant = quantizer() if quantizer else None
        # a float flag (not bool) so that distributed backends can broadcast it with the buffers
        self.register_buffer("calibrated_flag", torch.zeros((), device=device))
        self._calibrated_cache = False
        self.backend = "auto"

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def calibrated(self) -> bool:
        if not self.quantized:
            return True
        if not self._calibrated_cache:
            self._calibrated_cache = bool(self.calibrated_flag)
        return self._calibrated_cache

    def reset_calibration_(self) -> None:
        self.calibrated_flag.fill_(0.0)
        self._calibrated_cache = False

    @torch.no_grad()
    def calibrate(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """MSE-optimal clips of q, k and v (signed codes)."""
        for quantizer, t in ((self.q_quant, q), (self.k_quant, k), (self.v_quant, v)):
            quantizer.calibrate(t, signed=True)
        self.calibrated_flag.fill_(1.0)

    @staticmethod
    def _clip(quantizer: IntervalQuantizer) -> torch.Tensor:
        return (quantizer.c + quantizer.d).float()

    def dequantized(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """``(code / levels * (c + d))`` of q, k and v, with
        straight-through gradients: the values whose float products the op computes exactly
        (calibrate first)."""
        qh = self.q_quant(q) * self._clip(self.q_quant).to(q.dtype)
        kh = self.k_quant(k) * self._clip(self.k_quant).to(k.dtype)
        vh = self.v_quant(v) * self._clip(self.v_quant).to(v.dtype)
        return qh, kh, vh

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                dropout_p: float = 0.0) -> torch.Tensor:
        """``(B, H, Lq, D)``, ``(B, H, Lk, D)``, ``(B, H, Lk, Dv)`` -> ``(B, H, Lq, Dv)``;
        ``attn_mask`` additive float or bool (True: attend), broadcastable to the scores;
        ``dropout_p`` applies in training mode only."""
        dropout_p = dropout_p if self.training else 0.0
        if not self.quantized:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        if not self.calibrated:
            self.calibrate(q, k, v)
        if self.training:
            return F.scaled_dot_product_attention(*self.dequantized(q, k, v), attn_mask=attn_mask,
                                                  dropout_p=dropout_p)
        quantizers = (self.q_quant, self.k_quant, self.v_quant)
        return quantized_attention(q, k, v, *(m.qparams() for m in quantizers), *(self._clip(m) for m in quantizers),
                                   self.bits, attn_mask, False, None, resolve_backend(self.backend, q.device))

    def extra_repr(self) -> str:
        if not self.quantized:
            return "float"
        return f"bits={self.bits}, backend={self.backend!r}"


def is_torchvision_window_attention(module: nn.Module) -> bool:
    """torchvision's Swin (v1) window attention, recognised without importing torchvision."""
    cls = type(module)
    return cls.__name__ == "ShiftedWindowAttention" and cls.__module__.startswith("torchvision.")


def is_timm_attention(module: nn.Module) -> bool:
    """timm's ViT ``Attention`` (``timm.layers.attention``), recognised without importing timm."""
    cls = type(module)
    return cls.__name__ == "Attention" and cls.__module__ == "timm.layers.attention"


def rewritable(module: nn.Module, bits_attention: Optional[int]) -> bool:
    """Whether the conversion rewrites ``module``: ``nn.MultiheadAttention`` and torchvision's
    window attention always (their projections cannot convert otherwise), timm's ``Attention``
    only to quantize its products (its projections convert as they are)."""
    return (type(module) is nn.MultiheadAttention or is_torchvision_window_attention(module)
            or (bits_attention is not None and is_timm_attention(module)))


def rewrite_reason(module: nn.Module) -> Optional[str]:
    """None if ``module`` (an ``nn.MultiheadAttention`` or torchvision's ``ShiftedWindowAttention``)
    can be rewritten with its projections as layers, else why not."""
    if isinstance(module, nn.MultiheadAttention):
        if module.bias_k is not None:
            return "nn.MultiheadAttention with add_bias_kv=True is not supported"
        if module.add_zero_attn:
            return "nn.MultiheadAttention with add_zero_attn=True is not supported"
    if is_timm_attention(module) and not math.isclose(module.scale, module.head_dim ** -0.5):
        return "timm Attention with a scale other than head_dim ** -0.5 is not supported"
    return None


def quantized_products_reason(module: nn.Module) -> Optional[str]:
    """None if the attention products of ``module`` (a rewritable attention module) can run on
    quantized codes, else why not: the op's head dimension must be a multiple of 8."""
    if isinstance(module, nn.MultiheadAttention):
        d = module.embed_dim // module.num_heads
    elif is_timm_attention(module):
        d = module.head_dim
    else:
        d = module.proj.in_features // module.num_heads
    if d % 8:
        return f"its attention products stay float: head_dim {d} is not a multiple of 8 (the int8 units' K step)"
    return None


def rewrite(module: nn.Module, bits_attention: Optional[int] = None) -> nn.Module:
    """The module that computes what ``module`` does with its projections as ``nn.Linear``
    children (see :func:`rewrite_reason`), its attention products quantized to
    ``bits_attention`` bits (:class:`AttentionProducts`) unless None."""
    if isinstance(module, nn.MultiheadAttention):
        return HybridMultiheadAttention.from_float(module, bits_attention)
    if is_torchvision_window_attention(module):
        return HybridWindowAttention.from_float(module, bits_attention)
    if is_timm_attention(module):
        return HybridTimmAttention.from_float(module, bits_attention)
    raise TypeError(f"no attention rewrite for {type(module).__name__}.")


class HybridMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with its projections as ``nn.Linear`` children (see the module
    docstring). Build it with :meth:`from_float`; :func:`hybridops.hybridize_` does so for every
    ``nn.MultiheadAttention`` it converts."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, batch_first: bool = False,
                 bits_attention: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}.")
        kw = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.attention = AttentionProducts(bits_attention, device=device)

    @classmethod
    @torch.no_grad()
    def from_float(cls, mha: nn.MultiheadAttention, bits_attention: Optional[int] = None) -> "HybridMultiheadAttention":
        why = rewrite_reason(mha)
        if why is not None:
            raise ValueError(why + ".")
        w = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.kdim, mha.vdim,
                  mha.batch_first, bits_attention, device=w.device, dtype=w.dtype)
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.split(e)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.split(e) if mha.in_proj_bias is not None else (None,) * 3
        for lin, wt, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
            lin.weight.copy_(wt)
            if b is not None:
                lin.bias.copy_(b)
        new.out_proj.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def _mask(self, attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], n: int, lq: int,
              lk: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """One additive float mask ``(N, H, Lq, Lk)`` (or broadcastable) from MHA's two masks, whose
        ``True`` means "not allowed"; None when neither is given."""
        def additive(m: torch.Tensor) -> torch.Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
            if not m.is_floating_point():
                raise TypeError(f"attention masks must be bool or float, got {m.dtype}.")
            return m.to(dtype)

        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (lq, lk):
                    raise ValueError(f"a 2-D attn_mask must be ({lq}, {lk}), got {tuple(attn_mask.shape)}.")
                mask = additive(attn_mask).view(1, 1, lq, lk)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (n * self.num_heads, lq, lk):
                    raise ValueError(f"a 3-D attn_mask must be ({n * self.num_heads}, {lq}, {lk}), "
                                     f"got {tuple(attn_mask.shape)}.")
                mask = additive(attn_mask).view(n, self.num_heads, lq, lk)
            else:
                raise ValueError(f"attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D.")
        if key_padding_mask is not None:
            if key_padding_mask.shape != (n, lk):
                raise ValueError(f"key_padding_mask must be ({n}, {lk}), got {tuple(key_padding_mask.shape)}.")
            pad = additive(key_padding_mask).view(n, 1, 1, lk)
            mask = pad if mask is None else mask + pad
        return mask

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if is_causal and attn_mask is None:
            # nn.MultiheadAttention's rule: is_causal is a hint about attn_mask, not a mask
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        batched = query.dim() == 3
        if not batched:
            if query.dim() != 2:
                raise ValueError(f"query must be (L, E) or batched 3-D, got {query.dim()}-D.")
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, lq, lk = query.shape[0], query.shape[1], key.shape[1]
        if key.shape[1] != value.shape[1] or key.shape[0] != n or value.shape[0] != n:
            raise ValueError(f"key and value must share batch and length with each other and the batch of query; "
                             f"got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}.")
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(n, lq, h, d).transpose(1, 2)
        k = self.k_proj(key).view(n, lk, h, d).transpose(1, 2)
        v = self.v_proj(value).view(n, lk, h, d).transpose(1, 2)
        mask = self._mask(attn_mask, key_padding_mask, n, lq, lk, q.dtype)
        p_drop = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            # the probabilities are returned: computed here, in plain PyTorch, on the values the
            # attention products would quantize (pass need_weights=False for the kernel)
            att = self.attention
            if att.quantized:
                if not att.calibrated:
                    att.calibrate(q, k, v)
                q, k, v = att.dequantized(q, k, v)
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
            if mask is not None:
                scores = scores + mask
            probs = torch.softmax(scores, dim=-1)
            weights = probs.mean(1) if average_attn_weights else probs
            out = F.dropout(probs, p_drop, self.training) @ v
        else:
            out = self.attention(q, k, v, mask, p_drop)
        out = self.out_proj(out.transpose(1, 2).reshape(n, lq, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


class HybridWindowAttention(nn.Module):
    """torchvision's Swin (v1) ``ShiftedWindowAttention`` with its projections called as modules.

    torchvision's forward passes ``self.qkv.weight`` and ``self.proj.weight`` to
    ``shifted_window_attention``; this one computes the same windows (pad to whole windows, cyclic
    shift, per-window attention with the relative position bias and the shifted-window mask,
    projection, reverse) through ``self.qkv(x)`` and ``self.proj(x)``, so both convert. Its
    state dict is the original's. Build it with :meth:`from_float`."""

    def __init__(self, dim: int, window_size, shift_size, num_heads: int, qkv_bias: bool = True,
                 proj_bias: bool = True, attention_dropout: float = 0.0, dropout: float = 0.0,
                 bits_attention: Optional[int] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}.")
        self.window_size, self.shift_size = list(window_size), list(shift_size)
        self.num_heads, self.attention_dropout, self.dropout = num_heads, attention_dropout, dropout
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        # the table row of each (query, key) pair of a window: their offset along h and w, from 0
        ch, cw = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
        coords = torch.stack((ch.flatten(), cw.flatten()))
        rel = coords[:, :, None] - coords[:, None, :]
        index = (rel[0] + wh - 1) * (2 * ww - 1) + rel[1] + ww - 1
        self.register_buffer("relative_position_index", index.flatten())
        self.attention = AttentionProducts(bits_attention)

    @classmethod
    @torch.no_grad()
    def from_float(cls, module: nn.Module, bits_attention: Optional[int] = None) -> "HybridWindowAttention":
        dim = module.proj.in_features
        new = cls(dim, module.window_size, module.shift_size, module.num_heads, module.qkv.bias is not None,
                  module.proj.bias is not None, module.attention_dropout, module.dropout, bits_attention)
        missing, unexpected = new.load_state_dict(module.state_dict(), strict=False)
        if unexpected or any(not key.startswith("attention.") for key in missing):  # (the quantizers are new)
            raise ValueError(f"{type(module).__name__} does not have torchvision's layout "
                             f"(missing {missing}, unexpected {unexpected}).")
        new.to(module.proj.weight.device, module.proj.weight.dtype)
        new.train(module.training)
        return new

    def _bias(self) -> torch.Tensor:
        length = self.window_size[0] * self.window_size[1]
        table = self.relative_position_bias_table[self.relative_position_index]
        return table.view(length, length, self.num_heads).permute(2, 0, 1).unsqueeze(0)  # (1, heads, L, L)

    @staticmethod
    def _shift_mask(pad_h: int, pad_w: int, window, shift, device) -> torch.Tensor:
        """(windows, L, L): -100 between tokens that the cyclic shift brought together from
        different regions (torchvision's value), 0 elsewhere."""
        region = torch.zeros((pad_h, pad_w), device=device)
        bounds = [((0, -window[i]), (-window[i], -shift[i]), (-shift[i], None)) for i in range(2)]
        count = 0
        for h0, h1 in bounds[0]:
            for w0, w1 in bounds[1]:
                region[h0:h1, w0:w1] = count
                count += 1
        region = region.view(pad_h // window[0], window[0], pad_w // window[1], window[1]).permute(0, 2, 1, 3)
        region = region.reshape(-1, window[0] * window[1])
        diff = region.unsqueeze(1) - region.unsqueeze(2)
        return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects (N, H, W, C), got {tuple(x.shape)}.")
        b, h, w, c = x.shape
        win = self.window_size
        pad_b, pad_r = (win[0] - h % win[0]) % win[0], (win[1] - w % win[1]) % win[1]
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        pad_h, pad_w = x.shape[1], x.shape[2]
        # a window as large as the (padded) map: nothing to shift along that axis
        shift = [0 if win[i] >= (pad_h, pad_w)[i] else self.shift_size[i] for i in range(2)]
        if sum(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        nh, nw = pad_h // win[0], pad_w // win[1]
        length = win[0] * win[1]
        x = x.view(b, nh, win[0], nw, win[1], c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, length, c)
        heads, d = self.num_heads, c // self.num_heads
        q, k, v = self.qkv(x).reshape(x.shape[0], length, 3, heads, d).permute(2, 0, 3, 1, 4)
        mask = self._bias()
        if sum(shift):
            # a constant of the geometry: made once (the package's one cache), not every forward
            shifted = derived.cached("window_shift_mask", (), (pad_h, pad_w, tuple(win), tuple(shift), x.device),
                                     lambda: self._shift_mask(pad_h, pad_w, win, shift, x.device)).to(mask.dtype)
            mask = (mask + shifted.unsqueeze(1).unsqueeze(0).expand(b, -1, -1, -1, -1).reshape(
                b * nh * nw, 1, length, length))
        x = self.attention(q, k, v, mask.to(q.dtype), self.attention_dropout)
        x = self.proj(x.transpose(1, 2).reshape(b * nh * nw, length, c))
        x = F.dropout(x, p=self.dropout, training=self.training)
        x = x.view(b, nh, nw, win[0], win[1], c).permute(0, 1, 3, 2, 4, 5).reshape(b, pad_h, pad_w, c)
        if sum(shift):
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :h, :w, :].contiguous()

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift_size={self.shift_size}, num_heads={self.num_heads}"


class HybridTimmAttention(nn.Module):
    """timm's ViT ``Attention`` with its products through :class:`AttentionProducts`: the same
    children (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate``, ``proj``, dropouts) and the same
    forward as timm 1.0's, so its state dict is the original's plus ``attention.*``. Build it with
    :meth:`from_float`."""

    def __init__(self, module: nn.Module, bits_attention: Optional[int]):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = module.num_heads, module.head_dim, module.attn_dim
        self.qkv, self.q_norm, self.k_norm = module.qkv, module.q_norm, module.k_norm
        self.attn_drop, self.norm, self.gate = module.attn_drop, module.norm, module.gate
        self.proj, self.proj_drop = module.proj, module.proj_drop
        self.attention = AttentionProducts(bits_attention, device=module.qkv.weight.device)

    @classmethod
    def from_float(cls, module: nn.Module, bits_attention: Optional[int] = None) -> "HybridTimmAttention":
        why = rewrite_reason(module)
        if why is not None:
            raise ValueError(why + ".")
        new = cls(module, bits_attention)
        new.train(module.training)
        return new

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if is_causal:
            if attn_mask is not None:
                raise ValueError("pass either attn_mask or is_causal=True, not both.")
            attn_mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        x = self.attention(q, k, v, attn_mask, self.attn_drop.p)
        x = self.norm(x.transpose(1, 2).reshape(b, n, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))
