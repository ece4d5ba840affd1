"""TransT (Chen et al., CVPR 2021) written for :mod:`hybridops`: a ResNet-50 truncated after
layer3 (stride 8: layer3 has stride 1, its first block dilation 2), a 1x1 input projection to ``hidden_dim``,
the feature-fusion network (``fusion_layers`` layers, each two ego-context augment modules, i.e.
self-attention on the template and on the search features, and two cross-feature augment modules,
cross-attention both ways, then a final cross-attention decoder with the search features as the
queries), sine position encodings, and MLP heads that classify and regress a box at every
search-feature position.

The module and parameter names are those of the public TransT code
(chenxin-dlut/TransT)
except the backbone, which is ``backbone.*`` here instead of ``backbone.0.body.*``; :mod:`.transt_import`
renames a released checkpoint's keys. The attention modules are ``nn.MultiheadAttention`` with the
sequence first, as there, so :func:`hybridops.hybridize_` rewrites them into
:class:`hybridops.attention.HybridMultiheadAttention` (Linear projections it converts, and
quantized attention products with ``bits_attention``).

Geometry (defaults, template 128 / search 256 as TransT): features 16x16 / 32x32, 1024 predictions
per frame. ``TransTConfig.small()`` is the CPU preset (64 / 128 crops, 8x8 / 16x16 features).

Outputs: ``{"logits": (B, HW, 2), "boxes": (B, HW, 4)}``; class 0 is the target and class 1
"no target" (TransT's order), boxes are ``(cx, cy, w, h)`` in ``[0, 1]`` relative to the search crop.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import Bottleneck

# ImageNet statistics in 0-255 units: TransT normalises crops with them (its tracker divides by 255
# and applies torchvision's normalize with these mean / std).
_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass
class TransTConfig:
    """Architecture and crop geometry of TransT.

    Attributes:
        width: channel multiplier of the ResNet-50 (1.0: 64 stem channels, 1024 after layer3).
        blocks: bottleneck blocks of layer1-3 (ResNet-50: ``(3, 4, 6)``).
        hidden_dim: channels of the fusion network (TransT: 256).
        heads: attention heads (8).
        fusion_layers: feature-fusion layers (4).
        dim_feedforward: hidden width of every fusion FFN (2048).
        dropout: dropout inside the fusion network while training (0.1).
        exemplar_size / instance_size: template / search crop sides in pixels (128 / 256); both
            multiples of the stride 8.
        template_factor / search_factor: crop sides relative to the target, in TransT's tracker
            form ``sqrt((w + (f - 1) p) (h + (f - 1) p))`` with ``p = (w + h) / 2`` (2 and 4).
    """

    width: float = 1.0
    blocks: Tuple[int, int, int] = (3, 4, 6)
    hidden_dim: int = 256
    heads: int = 8
    fusion_layers: int = 4
    dim_feedforward: int = 2048
    dropout: float = 0.1
    exemplar_size: int = 128
    instance_size: int = 256
    template_factor: float = 2.0
    search_factor: float = 4.0

    stride = 8  # not a field: the truncated, dilated ResNet-50 fixes it

    def __post_init__(self):
        self.blocks = tuple(int(b) for b in self.blocks)
        if len(self.blocks) != 3 or min(self.blocks) < 1:
            raise ValueError(f"blocks must be three positive counts like (3, 4, 6), got {self.blocks}.")
        if self.width <= 0 or int(round(64 * self.width)) < 4:
            raise ValueError(f"width {self.width} leaves fewer than 4 stem channels; use width >= 1/16.")
        if self.hidden_dim % self.heads or self.hidden_dim % 4:
            # the sine encoding gives each axis hidden_dim / 2 channels in sin / cos pairs
            raise ValueError(f"hidden_dim {self.hidden_dim} must be a multiple of 4 and divisible by heads "
                             f"{self.heads}.")
        if self.fusion_layers < 1 or self.dim_feedforward < 1:
            raise ValueError(f"fusion_layers and dim_feedforward must be >= 1, got {self.fusion_layers}, "
                             f"{self.dim_feedforward}.")
        for name in ("exemplar_size", "instance_size"):
            v = getattr(self, name)
            if v < 16 or v % self.stride:
                raise ValueError(f"{name} must be a multiple of {self.stride} of at least 16, got {v}.")
        if self.exemplar_size >= self.instance_size:
            raise ValueError("exemplar_size must be smaller than instance_size "
                             f"(got {self.exemplar_size} >= {self.instance_size}).")
        if not 1.0 <= self.template_factor < self.search_factor:
            raise ValueError(f"template_factor must be >= 1 and below search_factor, got {self.template_factor}, "
                             f"{self.search_factor}.")

    @classmethod
    def small(cls, **overrides) -> "TransTConfig":
        """CPU preset: width 1/4, one block per stage, hidden 64 in 8 heads of 8, 2 fusion layers,
        FFN 256, crops 64 / 128 (8x8 / 16x16 features)."""
        kw = dict(width=0.25, blocks=(1, 1, 1), hidden_dim=64, heads=8, fusion_layers=2, dim_feedforward=256,
                  exemplar_size=64, instance_size=128)
        kw.update(overrides)
        return cls(**kw)

    @property
    def template_feature(self) -> int:
        return self.exemplar_size // self.stride

    @property
    def score_size(self) -> int:
        """Side of the prediction grid: the search features."""
        return self.instance_size // self.stride

    @property
    def backbone_channels(self) -> int:
        return int(round(64 * self.width)) * 4 * 4

    def crop_sides(self, w: float, h: float) -> Tuple[float, float]:
        """Template and search crop sides (pixels of the frame) around a ``w x h`` target."""
        p = (w + h) / 2
        side = lambda f: math.sqrt((w + (f - 1) * p) * (h + (f - 1) * p))
        return side(self.template_factor), side(self.search_factor)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["blocks"] = list(d["blocks"])
        return d


class ResNet50Layer3(nn.Module):
    """torchvision's ResNet-50 up to layer3, with TransT's changes: layer3 has stride 1 and its
    first block's 3x3 conv dilation 2 (the downsample is a stride-1 1x1 conv; the later blocks are
    undilated, as in the public TransT code), so the output has stride 8.
    ``forward(x (N, 3, H, W)) -> (N, 1024 * width, H / 8, W / 8)``."""

    def __init__(self, width: float = 1.0, blocks=(3, 4, 6)):
        super().__init__()
        base = int(round(64 * width))
        self.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inplanes = base
        self.layer1 = self._make_layer(base, blocks[0], stride=1, dilation=1)
        self.layer2 = self._make_layer(base * 2, blocks[1], stride=2, dilation=1)
        self.layer3 = self._make_layer(base * 4, blocks[2], stride=1, dilation=2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, dilation=dilation)]
        self.inplanes = planes * 4
        # TransT's ResNet dilates only the first block of a stage (its later blocks have dilation 1).
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


def sine_position_encoding(size: int, channels: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised sine encoding of a ``size x size`` map with no padding, as TransT's
    ``PositionEmbeddingSine(channels / 2, normalize=True)``: ``(channels, size, size)``, the first
    half encoding rows, the second columns, each alternating sin / cos per frequency."""
    half = channels // 2
    eps, scale = 1e-6, 2 * math.pi
    embed = torch.arange(1, size + 1, dtype=torch.float32)
    embed = embed / (embed[-1] + eps) * scale
    dim_t = temperature ** (2 * torch.div(torch.arange(half), 2, rounding_mode="floor") / half)
    pos = embed[:, None] / dim_t                                   # (size, half)
    pos = torch.stack((pos[:, 0::2].sin(), pos[:, 1::2].cos()), dim=2).flatten(1)
    pos_y = pos[:, None, :].expand(size, size, half)
    pos_x = pos[None, :, :].expand(size, size, half)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1).contiguous()


def _with_pos(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return x + pos


class FeatureFusionLayer(nn.Module):
    """One fusion layer: ECA (self-attention + residual + LayerNorm) on each branch, then CFA
    (cross-attention + residual + LayerNorm, FFN + residual + LayerNorm) each way. Sequences are
    ``(L, B, C)``; the position encodings are added to the queries and keys, not the values."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        mha = lambda: nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.self_attn1, self.self_attn2 = mha(), mha()
        self.multihead_attn1, self.multihead_attn2 = mha(), mha()
        self.linear11, self.linear12 = nn.Linear(d_model, dim_feedforward), nn.Linear(dim_feedforward, d_model)
        self.linear21, self.linear22 = nn.Linear(d_model, dim_feedforward), nn.Linear(dim_feedforward, d_model)
        for name in ("11", "12", "13", "21", "22", "23"):
            setattr(self, f"norm{name}", nn.LayerNorm(d_model))
            setattr(self, f"dropout{name}", nn.Dropout(dropout))
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        # ReLU modules (TransT's activation1/2 are functions; these hold no state): deploy_ folds a
        # ReLU module that follows a deployed Linear into its epilogue, saving a pass over the FFN's
        # hidden activation.
        self.activation1, self.activation2 = nn.ReLU(), nn.ReLU()

    def forward(self, src1, src2, pos1, pos2):
        q1 = _with_pos(src1, pos1)
        src1 = self.norm11(src1 + self.dropout11(self.self_attn1(q1, q1, src1, need_weights=False)[0]))
        q2 = _with_pos(src2, pos2)
        src2 = self.norm21(src2 + self.dropout21(self.self_attn2(q2, q2, src2, need_weights=False)[0]))
        q1, q2 = _with_pos(src1, pos1), _with_pos(src2, pos2)
        cross1 = self.multihead_attn1(q1, q2, src2, need_weights=False)[0]
        cross2 = self.multihead_attn2(q2, q1, src1, need_weights=False)[0]
        src1 = self.norm12(src1 + self.dropout12(cross1))
        src1 = self.norm13(src1 + self.dropout13(self.linear12(self.dropout1(self.activation1(self.linear11(src1))))))
        src2 = self.norm22(src2 + self.dropout22(cross2))
        src2 = self.norm23(src2 + self.dropout23(self.linear22(self.dropout2(self.activation2(self.linear21(src2))))))
        return src1, src2


class DecoderCFALayer(nn.Module):
    """The final CFA: search queries attend to the template, then the FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(d_model, dim_feedforward), nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.activation = nn.ReLU()  # a module, as FeatureFusionLayer's

    def forward(self, tgt, memory, pos_memory, pos_tgt):
        att = self.multihead_attn(_with_pos(tgt, pos_tgt), _with_pos(memory, pos_memory), memory,
                                  need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(att))
        return self.norm2(tgt + self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(tgt))))))


class _Encoder(nn.Module):
    def __init__(self, layers: List[FeatureFusionLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class _Decoder(nn.Module):
    def __init__(self, layer: DecoderCFALayer, d_model: int):
        super().__init__()
        self.layers = nn.ModuleList([layer])
        self.norm = nn.LayerNorm(d_model)


class FeatureFusionNetwork(nn.Module):
    """``encoder.layers`` (the fusion layers) and ``decoder`` (one CFA layer and a LayerNorm).
    ``forward(temp (Lz, B, C), search (Lx, B, C), pos_temp (Lz, 1, C), pos_search (Lx, 1, C))
    -> (B, Lx, C)``."""

    def __init__(self, d_model: int, nhead: int, layers: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.encoder = _Encoder([FeatureFusionLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(layers)])
        self.decoder = _Decoder(DecoderCFALayer(d_model, nhead, dim_feedforward, dropout), d_model)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, temp, search, pos_temp, pos_search):
        for layer in self.encoder.layers:
            temp, search = layer(temp, search, pos_temp, pos_search)
        for layer in self.decoder.layers:
            search = layer(search, temp, pos_temp, pos_search)
        return self.decoder.norm(search).transpose(0, 1)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (TransT's heads)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim]))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the last layer."""
        for i in range(len(self.layers) - 1):  # not self.layers[:-1]: a new ModuleList torch.fx cannot trace
            x = F.relu(self.layers[i](x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[-1](self.hidden(x))


class TransT(nn.Module):
    """TransT. Training: ``forward(z (B, 3, Ez, Ez), x (B, 3, Ex, Ex))`` with RGB crops in
    [0, 255] (the model normalises them) -> ``{"logits", "boxes"}`` (module docstring).

    Tracking: ``template(z)`` caches the projected template features; ``track(x)`` returns the same
    dict for ``x (1, 3, Ex, Ex)`` plus ``"cls_hidden"``, the input of the classifier's last layer
    ``(1, HW, hidden)`` (what the online update trains on)."""

    def __init__(self, config: Optional[TransTConfig] = None):
        super().__init__()
        self.config = c = config or TransTConfig()
        self.backbone = ResNet50Layer3(c.width, c.blocks)
        self.input_proj = nn.Conv2d(c.backbone_channels, c.hidden_dim, kernel_size=1)
        self.featurefusion_network = FeatureFusionNetwork(c.hidden_dim, c.heads, c.fusion_layers,
                                                          c.dim_feedforward, c.dropout)
        self.class_embed = MLP(c.hidden_dim, c.hidden_dim, 2, 3)
        self.bbox_embed = MLP(c.hidden_dim, c.hidden_dim, 4, 3)
        # The crops have fixed sizes and no padding, so the encodings are constants: (L, 1, C).
        for name, size in (("pos_template", c.template_feature), ("pos_search", c.score_size)):
            pos = sine_position_encoding(size, c.hidden_dim).flatten(1).t().unsqueeze(1)
            self.register_buffer(name, pos, persistent=False)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        self.zf: Optional[torch.Tensor] = None

    def features(self, img: torch.Tensor) -> torch.Tensor:
        """``img (B, 3, H, W)`` in [0, 255] -> projected features as a sequence ``(HW/64, B, hidden)``."""
        f = self.input_proj(self.backbone((img - self.mean) / self.std))
        return f.flatten(2).permute(2, 0, 1)

    def _heads(self, zf: torch.Tensor, xf: torch.Tensor, return_hidden: bool) -> Dict[str, torch.Tensor]:
        hs = self.featurefusion_network(zf, xf, self.pos_template, self.pos_search)
        hidden = self.class_embed.hidden(hs)
        out = {"logits": self.class_embed.layers[-1](hidden), "boxes": self.bbox_embed(hs).sigmoid()}
        if return_hidden:
            out["cls_hidden"] = hidden
        return out

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self._heads(self.features(z), self.features(x), return_hidden=False)

    def tracking_step(self, z: torch.Tensor) -> "TransTStep":
        """One tracked frame against template ``z`` as a one-input module (:class:`TransTStep`)."""
        return TransTStep(self, z)

    def last_cls_layers(self) -> List[nn.Module]:
        """The classifier's last Linear (the online update's target)."""
        return [self.class_embed.layers[-1]]

    def cls_from_hidden(self, hidden: List[torch.Tensor]) -> torch.Tensor:
        """Classification logits ``(B, HW, 2)`` from cached last-layer inputs ``[(B, HW, hidden)]``."""
        return self.class_embed.layers[-1](hidden[0])

    @torch.no_grad()
    def template(self, z: torch.Tensor) -> None:
        """Cache the template features of ``z (1, 3, Ez, Ez)``."""
        self.zf = self.features(z)

    @torch.no_grad()
    def track(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Predict on search crop ``x (1, 3, Ex, Ex)`` against the cached template."""
        if self.zf is None:
            raise RuntimeError("call template(z) before track(x).")
        return self._heads(self.zf, self.features(x), return_hidden=True)


class TransTStep(nn.Module):
    """One tracked frame of a :class:`TransT` as a one-input module: ``forward(x (1, 3, Ex, Ex))
    -> (1, HW, 6)``, the logits and boxes of :meth:`TransT.track` side by side, against template
    features computed once at construction (from ``z``) and kept as a buffer. It is what the
    tracker runs per frame, in the form BOP counting and one-input inference engines take."""

    def __init__(self, model: TransT, z: torch.Tensor):
        super().__init__()
        self.model = model
        with torch.no_grad():
            self.register_buffer("zf", model.features(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model._heads(self.zf, self.model.features(x), return_hidden=False)
        return torch.cat([out["logits"], out["boxes"]], dim=-1)
