"""SiamRPN++ (Li et al., CVPR 2019) written for :mod:`hybridops`: ResNet-50 backbone with the
stride-8 dilation changes, per-level adjust layers and depthwise cross-correlation RPN heads
over layers 2-4, fused with learned weights.

Geometry (defaults, ``exemplar 127 / instance 255``): backbone features 15x15 / 31x31, the
template's are centre-cropped to 7x7 (SiamRPN++'s "adjust" crop), the heads' 3x3 valid convs give
5x5 / 29x29 and the depthwise correlation a 25x25 response map. The small CPU preset
(``63 / 127``) gives 7x7 / 15x15 features and a 9x9 map.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import Bottleneck

from .boxes import generate_anchors


INPUT_FORMATS = ("rgb_normalized", "bgr255")


@dataclass
class ModelConfig:
    """Architecture and crop geometry of the tracker.

    Attributes:
        width: channel multiplier of the ResNet-50 (1.0 = torchvision's 64/256/512/1024/2048).
        blocks: bottleneck blocks per stage (ResNet-50: ``(3, 4, 6, 3)``); fewer blocks give the
            "truncated" ResNet-50 used on CPU.
        neck_channels: channels after each adjust layer (SiamRPN++: 256).
        exemplar_size / instance_size: template / search crop sides in pixels (127 / 255).
        template_crop: template feature maps wider than this are centre-cropped to it (7).
        stride: total backbone stride (8 after the dilation changes).
        anchor_ratios: aspect ratios ``h / w`` of the anchors.
        input_format: what the backbone expects (crops always arrive RGB 0-255):
            ``"rgb_normalized"`` (ours: ``(x - 114) / 58``) or ``"bgr255"`` (pysot's weights: BGR,
            0-255, no normalisation).
        anchor_scales: anchor scales; ``None`` picks ``round(exemplar / (2 * stride))`` so that
            anchors match a target of typical size in the crop (8 for 127, 4 for 63).
    """

    width: float = 1.0
    blocks: Tuple[int, int, int, int] = (3, 4, 6, 3)
    neck_channels: int = 256
    exemplar_size: int = 127
    instance_size: int = 255
    template_crop: int = 7
    stride: int = 8
    anchor_ratios: Tuple[float, ...] = (0.33, 0.5, 1.0, 2.0, 3.0)
    anchor_scales: Optional[Tuple[float, ...]] = None
    input_format: str = "rgb_normalized"

    def __post_init__(self):
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {self.input_format!r}.")
        self.blocks = tuple(int(b) for b in self.blocks)
        self.anchor_ratios = tuple(float(r) for r in self.anchor_ratios)
        if len(self.blocks) != 4 or min(self.blocks) < 1:
            raise ValueError(f"blocks must be four positive counts like (3, 4, 6, 3), got {self.blocks}.")
        if self.width <= 0 or int(round(64 * self.width)) < 4:
            raise ValueError(f"width {self.width} leaves fewer than 4 stem channels; use width >= 1/16.")
        if self.exemplar_size >= self.instance_size:
            raise ValueError("exemplar_size must be smaller than instance_size "
                             f"(got {self.exemplar_size} >= {self.instance_size}).")
        if feature_size(self.exemplar_size) < 3:
            raise ValueError(f"exemplar_size {self.exemplar_size} is too small: the backbone needs >= 39 px.")
        if self.anchor_scales is None:
            self.anchor_scales = (float(max(1, round(self.exemplar_size / (2 * self.stride)))),)
        self.anchor_scales = tuple(float(s) for s in self.anchor_scales)

    @classmethod
    def small(cls, **overrides) -> "ModelConfig":
        """CPU preset: width 1/4, one block per stage, neck 64, crops 63 / 127 (9x9 response)."""
        kw = dict(width=0.25, blocks=(1, 1, 1, 1), neck_channels=64, exemplar_size=63, instance_size=127)
        kw.update(overrides)
        return cls(**kw)

    @property
    def anchor_num(self) -> int:
        return len(self.anchor_ratios) * len(self.anchor_scales)

    @property
    def score_size(self) -> int:
        """Side of the response map: search features minus (cropped) template features, both
        shrunk by 2 by the heads' 3x3 valid convs, plus one."""
        zf = min(feature_size(self.exemplar_size), self.template_crop)
        return feature_size(self.instance_size) - zf + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def feature_size(image_size: int) -> int:
    """Side of the layer2/3/4 feature maps for a square input (conv1 and layer2's first 3x3 are
    unpadded as in SiamRPN++; layers 3-4 keep the size)."""
    s = (image_size - 7) // 2 + 1          # conv1 7x7 s2 p0
    s = (s + 2 - 3) // 2 + 1               # maxpool 3x3 s2 p1
    return (s - 3) // 2 + 1                # layer2 3x3 s2 p0


class ResNet50Atrous(nn.Module):
    """torchvision's ResNet-50 (``Bottleneck`` blocks) with SiamRPN++'s changes.

    * ``conv1`` has no padding and layer2's strided 3x3 conv (and its 3x3 downsample) are unpadded,
      so feature cells align with the crop centre;
    * layer3 and layer4 have stride 1 with dilation 2 and 4 (total stride 8), the first block of
      each using half the dilation, as pysot's ``resnet_atrous`` does;
    * ``width`` scales every stage, ``blocks`` truncates the stages.

    ``forward(x: (N, 3, H, W)) -> [layer2, layer3, layer4]`` with ``512w, 1024w, 2048w`` channels.
    """

    def __init__(self, width: float = 1.0, blocks: Sequence[int] = (3, 4, 6, 3)):
        super().__init__()
        base = int(round(64 * width))
        self.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=0, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inplanes = base
        self.layer1 = self._make_layer(base, blocks[0], stride=1, dilation=1)
        self.layer2 = self._make_layer(base * 2, blocks[1], stride=2, dilation=1)
        self.layer3 = self._make_layer(base * 4, blocks[2], stride=1, dilation=2)
        self.layer4 = self._make_layer(base * 8, blocks[3], stride=1, dilation=4)
        self.out_channels = [base * 2 * 4, base * 4 * 4, base * 8 * 4]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each block (torchvision's zero_init_residual) so that a short
        # training run starts from near-identity blocks.
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        downsample = None
        first_dilation = dilation // 2 if dilation > 1 else 1
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            if stride == 1 and dilation == 1:
                conv = nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False)
            else:
                # pysot: 3x3 downsample, unpadded when strided, dilated (d/2) when atrous.
                pad = first_dilation if dilation > 1 else 0
                conv = nn.Conv2d(self.inplanes, planes * 4, 3, stride=stride, padding=pad,
                                 dilation=first_dilation, bias=False)
            downsample = nn.Sequential(conv, nn.BatchNorm2d(planes * 4))
        first = Bottleneck(self.inplanes, planes, stride, downsample, dilation=first_dilation)
        if stride == 2:
            first.conv2.padding = (0, 0)  # SiamRPN++: padding = 2 - stride
        layers = [first]
        self.inplanes = planes * 4
        for _ in range(1, blocks):
            layers.append(Bottleneck(self.inplanes, planes, dilation=dilation))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x1 = self.layer1(x)
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x4 = self.layer4(x3)
        return [x2, x3, x4]


class AdjustLayer(nn.Module):
    """1x1 conv + BN to ``out_channels``; template maps wider than ``crop`` are centre-cropped.

    ``forward(x: (N, C_in, H, W)) -> (N, C_out, H', W')``.
    """

    def __init__(self, in_channels: int, out_channels: int, crop: int = 7, template_size: Optional[int] = None):
        super().__init__()
        self.downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), nn.BatchNorm2d(out_channels))
        self.crop = crop
        # The template's feature size is fixed by the config, so the crop is decided here, not
        # from x.size() in forward: a size test there is control flow torch.fx cannot trace,
        # and hybridops.deploy_ needs a traced graph to fuse BatchNorm/ReLU into the kernels.
        self.template_size = template_size

    def forward(self, x: torch.Tensor, is_template: bool = False) -> torch.Tensor:
        x = self.downsample(x)
        if is_template:
            size = self.template_size if self.template_size is not None else x.size(3)
            if size > self.crop:
                l = (size - self.crop) // 2
                x = x[:, :, l:l + self.crop, l:l + self.crop]
        return x


def xcorr_depthwise(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise cross-correlation of each search map with its own template map.

    Args:
        x: search features ``(B, C, Hx, Wx)``.
        kernel: template features ``(B, C, Hz, Wz)``.
    Returns:
        ``(B, C, Hx - Hz + 1, Wx - Wz + 1)``: ``out[b, c] = x[b, c] (*) kernel[b, c]`` (valid,
        correlation, no flip).
    """
    b, c = kernel.size(0), kernel.size(1)
    # The check is skipped while torch.fx traces (sizes are symbolic there, and a Python `if` on
    # them cannot be traced); eager calls, which see real shapes, always run it.
    if not isinstance(x, torch.fx.Proxy) and x.shape[:2] != kernel.shape[:2]:
        raise ValueError(f"xcorr_depthwise: search {tuple(x.shape)} and kernel {tuple(kernel.shape)} "
                         "need the same batch and channel sizes.")
    # Fold the batch into channels so one grouped conv does all B*C correlations.
    out = F.conv2d(x.reshape(1, b * c, x.size(2), x.size(3)),
                   kernel.reshape(b * c, 1, kernel.size(2), kernel.size(3)), groups=b * c)
    return out.reshape(b, c, out.size(2), out.size(3))


class DepthwiseXCorr(nn.Module):
    """pysot's ``DepthwiseXCorr``: 3x3 conv+BN+ReLU on each input, depthwise correlation, then a
    head ``1x1 conv+BN+ReLU -> 1x1 conv`` to ``out_channels``. The head's last 1x1 conv is the
    layer the online update fine-tunes (its FP branch once hybridized).
    """

    def __init__(self, in_channels: int, hidden: int, out_channels: int):
        super().__init__()
        self.conv_kernel = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, bias=False),
                                         nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))
        self.conv_search = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, bias=False),
                                         nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Conv2d(hidden, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                  nn.ReLU(inplace=True), nn.Conv2d(hidden, out_channels, 1))

    @property
    def last(self) -> nn.Module:
        """The final 1x1 conv of the head."""
        return self.head[-1]

    def forward(self, kernel: torch.Tensor, search: torch.Tensor, return_hidden: bool = False):
        """``kernel (B, C, Hz, Wz)``, ``search (B, C, Hx, Wx)`` -> ``(B, out, S, S)``; with
        ``return_hidden`` also the input of the last layer ``(B, hidden, S, S)``."""
        k = self.conv_kernel(kernel)
        s = self.conv_search(search)
        hidden = xcorr_depthwise(s, k)
        for layer in list(self.head)[:-1]:  # not self.head[:-1]: a new Sequential torch.fx cannot trace
            hidden = layer(hidden)
        out = self.last(hidden)
        return (out, hidden) if return_hidden else out


class DepthwiseRPN(nn.Module):
    """Classification (``2A`` channels) and regression (``4A``) branches for one level."""

    def __init__(self, anchor_num: int, in_channels: int, hidden: int):
        super().__init__()
        self.cls = DepthwiseXCorr(in_channels, hidden, 2 * anchor_num)
        self.loc = DepthwiseXCorr(in_channels, hidden, 4 * anchor_num)


class SiamRPNPP(nn.Module):
    """SiamRPN++ with a ResNet-50 backbone and RPN heads on layers 2-4.

    Training: ``forward(z, x) -> {"cls": (B, 2, A, S, S), "loc": (B, 4, A, S, S)}`` for template
    crops ``z (B, 3, Ez, Ez)`` and search crops ``x (B, 3, Ex, Ex)`` (RGB floats in [0, 255]; the
    model normalises them).

    Tracking: ``template(z)`` caches the template features; ``track(x)`` returns the same dict
    for ``x (1, 3, Ex, Ex)`` plus ``"cls_hidden"``, the per-level inputs of the last cls layers
    (what the online update trains on, since everything before them is frozen).
    """

    def __init__(self, config: Optional[ModelConfig] = None):
        super().__init__()
        self.config = config or ModelConfig()
        c = self.config
        self.backbone = ResNet50Atrous(c.width, c.blocks)
        zf = feature_size(c.exemplar_size)
        self.neck = nn.ModuleList(AdjustLayer(ch, c.neck_channels, c.template_crop, zf) for ch in self.backbone.out_channels)
        self.rpn = nn.ModuleList(DepthwiseRPN(c.anchor_num, c.neck_channels, c.neck_channels)
                                 for _ in self.backbone.out_channels)
        # Learned fusion of the three levels (pysot MultiRPN weighted=True), softmax-normalised.
        self.cls_weight = nn.Parameter(torch.ones(len(self.rpn)))
        self.loc_weight = nn.Parameter(torch.ones(len(self.rpn)))
        self.register_buffer("anchors", generate_anchors(c.stride, c.anchor_ratios, c.anchor_scales, c.score_size),
                             persistent=False)
        self.zf: Optional[List[torch.Tensor]] = None

    # -- feature extraction -------------------------------------------------------------------
    def features(self, img: torch.Tensor, is_template: bool) -> List[torch.Tensor]:
        """``img (B, 3, H, W)`` in [0, 255] -> per-level adjusted features ``[(B, neck, h, w)] * 3``."""
        # Fixed input normalisation (ImageNet-like mean/std in 0-255 units) keeps the first conv's
        # activations O(1), which short training runs and activation calibration both need.
        if self.config.input_format == "bgr255":
            img = img.flip(1)  # pysot was trained on OpenCV's BGR 0-255 images
        else:
            img = (img - 114.0) / 58.0
        return [adj(f, is_template) for adj, f in zip(self.neck, self.backbone(img))]

    def last_cls_layers(self) -> List[nn.Module]:
        """The final 1x1 conv of every level's classification branch (online-update targets)."""
        return [r.cls.last for r in self.rpn]

    def _heads(self, zf, xf, return_hidden: bool) -> Dict[str, torch.Tensor]:
        cls_w = F.softmax(self.cls_weight, 0)
        loc_w = F.softmax(self.loc_weight, 0)
        cls, loc, hidden = 0, 0, []
        for i, (rpn, z, x) in enumerate(zip(self.rpn, zf, xf)):
            c, h = rpn.cls(z, x, return_hidden=True)
            cls = cls + cls_w[i] * c
            loc = loc + loc_w[i] * rpn.loc(z, x)
            hidden.append(h)
        b, s, a = cls.size(0), cls.size(2), self.config.anchor_num  # size() calls: traceable by torch.fx
        out = {"cls": cls.reshape(b, 2, a, s, s), "loc": loc.reshape(b, 4, a, s, s)}
        if return_hidden:
            out["cls_hidden"] = hidden
        return out

    def cls_from_hidden(self, hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        """Classification logits ``(B, 2, A, S, S)`` from cached last-layer inputs."""
        cls_w = F.softmax(self.cls_weight, 0)
        cls = sum(cls_w[i] * layer(h) for i, (layer, h) in enumerate(zip(self.last_cls_layers(), hidden)))
        b, _, s, _ = cls.shape
        return cls.reshape(b, 2, self.config.anchor_num, s, s)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self._heads(self.features(z, True), self.features(x, False), return_hidden=False)

    # -- tracking API -------------------------------------------------------------------------
    def tracking_step(self, z: torch.Tensor) -> "SiamRPNStep":
        """One tracked frame against template ``z`` as a one-input module (:class:`SiamRPNStep`)."""
        return SiamRPNStep(self, z)

    @torch.no_grad()
    def template(self, z: torch.Tensor) -> None:
        """Cache template features for ``z (1, 3, Ez, Ez)``."""
        self.zf = self.features(z, True)

    @torch.no_grad()
    def track(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Score search crop ``x (1, 3, Ex, Ex)`` against the cached template."""
        if self.zf is None:
            raise RuntimeError("call template(z) before track(x).")
        return self._heads(self.zf, self.features(x, False), return_hidden=True)


class SiamRPNStep(nn.Module):
    """One tracked frame of a :class:`SiamRPNPP` as a one-input module: ``forward(x (1, 3, Ex, Ex))
    -> (1, 6A, S, S)``, the classification and regression maps of :meth:`SiamRPNPP.track` stacked
    along the channels, against template features computed once at construction (from ``z``). It
    is what the tracker runs per frame, in the form BOP counting and one-input inference engines
    take (:meth:`SiamRPNPP.tracking_step` builds it; ``transt.TransTStep`` is TransT's)."""

    def __init__(self, model: SiamRPNPP, z: torch.Tensor):
        super().__init__()
        self.model = model
        with torch.no_grad():
            for i, f in enumerate(model.features(z, True)):
                self.register_buffer(f"zf{i}", f)
        self.levels = len(model.neck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zf = [getattr(self, f"zf{i}") for i in range(self.levels)]
        out = self.model._heads(zf, self.model.features(x, False), return_hidden=False)
        b, s = out["cls"].size(0), out["cls"].size(3)
        return torch.cat([out["cls"].reshape(b, -1, s, s), out["loc"].reshape(b, -1, s, s)], dim=1)
