"""Multi-head attention whose projections are layers of their own, so that they convert.

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
module in float and reports why.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def rewrite_reason(mha: nn.MultiheadAttention) -> Optional[str]:
    """None if ``mha`` can be rewritten as a :class:`HybridMultiheadAttention`, else why not."""
    if mha.bias_k is not None:
        return "nn.MultiheadAttention with add_bias_kv=True is not supported"
    if mha.add_zero_attn:
        return "nn.MultiheadAttention with add_zero_attn=True is not supported"
    return None


class HybridMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with its projections as ``nn.Linear`` children (see the module
    docstring). Build it with :meth:`from_float`; :func:`hybridops.hybridize_` does so for every
    ``nn.MultiheadAttention`` it converts."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, batch_first: bool = False,
                 device=None, dtype=None):
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

    @classmethod
    @torch.no_grad()
    def from_float(cls, mha: nn.MultiheadAttention) -> "HybridMultiheadAttention":
        why = rewrite_reason(mha)
        if why is not None:
            raise ValueError(why + ".")
        w = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.kdim, mha.vdim,
                  mha.batch_first, device=w.device, dtype=w.dtype)
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
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
            if mask is not None:
                scores = scores + mask
            probs = torch.softmax(scores, dim=-1)
            weights = probs.mean(1) if average_attn_weights else probs
            out = F.dropout(probs, p_drop, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        out = self.out_proj(out.transpose(1, 2).reshape(n, lq, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
