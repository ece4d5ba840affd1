"""Shared benchmark plumbing: timing, environment record, real layer shapes and small models."""
from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torchvision


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else (platform.processor() or platform.machine())


def environment() -> Dict[str, str]:
    """What every result file records beside its figures."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda or ""
        env["cudnn"] = str(torch.backends.cudnn.version())
    return env


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA, torch's
    ``Timer.blocked_autorange`` on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, return_mode="median"))
    from torch.utils.benchmark import Timer

    # Timer runs on one thread unless told: time with the threads the process was given
    return Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=0.2).median * 1e3


@dataclass(frozen=True)
class ConvShape:
    """One real conv layer: ``(N, C_in, H, W) -> C_out``, kernel, stride, padding, dilation, groups."""

    name: str
    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    k: int
    stride: int = 1
    pad: int = 0
    dil: int = 1
    groups: int = 1

    def with_batch(self, n: int) -> "ConvShape":
        return ConvShape(self.name, n, self.c_in, self.h, self.w, self.c_out, self.k, self.stride, self.pad,
                         self.dil, self.groups)

    def macs(self) -> int:
        ho = (self.h + 2 * self.pad - self.dil * (self.k - 1) - 1) // self.stride + 1
        wo = (self.w + 2 * self.pad - self.dil * (self.k - 1) - 1) // self.stride + 1
        return self.n * ho * wo * self.c_out * (self.c_in // self.groups) * self.k * self.k


# Real layers: ResNet-50 as SiamRPN++ uses it (layers 3-4 dilated), RT-MDNet conv1-3 and
# fc4-6 (a linear layer is a 1x1 conv on a 1x1 image), a MobileNetV2 inverted-residual block.
LAYER_SHAPES: List[ConvShape] = [
    ConvShape("resnet50.layer1.3x3", 1, 64, 56, 56, 64, 3, 1, 1),
    ConvShape("resnet50.layer2.3x3", 1, 128, 28, 28, 128, 3, 1, 1),
    ConvShape("resnet50.layer3.3x3.dil2", 1, 256, 31, 31, 256, 3, 1, 2, 2),
    ConvShape("resnet50.layer4.3x3.dil4", 1, 512, 31, 31, 512, 3, 1, 4, 4),
    ConvShape("resnet50.1x1.2048-512", 1, 2048, 7, 7, 512, 1),
    ConvShape("rtmdnet.conv1", 1, 3, 107, 107, 96, 7, 2),
    ConvShape("rtmdnet.conv2", 1, 96, 51, 51, 256, 5, 2),
    ConvShape("rtmdnet.conv3", 1, 256, 11, 11, 512, 3, 1, 3, 3),
    ConvShape("rtmdnet.fc4", 1, 4608, 1, 1, 512, 1),
    ConvShape("rtmdnet.fc5", 1, 512, 1, 1, 512, 1),
    ConvShape("rtmdnet.fc6", 1, 512, 1, 1, 2, 1),
    ConvShape("mobilenetv2.expand1x1", 1, 24, 56, 56, 144, 1),
    ConvShape("mobilenetv2.dw3x3", 1, 144, 56, 56, 144, 3, 1, 1, 1, 144),
    ConvShape("mobilenetv2.project1x1", 1, 144, 56, 56, 24, 1),
]


class RTMDNetShaped(nn.Module):
    """A network with RT-MDNet's layer shapes (conv1-3 on a 107x107 crop, fc4-6)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, 7, stride=2), nn.ReLU(inplace=True),
            nn.Conv2d(96, 256, 5, stride=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(256, 512, 3, padding=3, dilation=3), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(3))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4608, 512), nn.ReLU(inplace=True),
                                  nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, 2))

    def forward(self, x):
        return self.head(self.features(x))


def build_model(name: str) -> nn.Module:
    """Float models the report knows, with their natural input size."""
    if name == "resnet18":
        return torchvision.models.resnet18()
    if name == "resnet50":
        return torchvision.models.resnet50()
    if name == "siamrpn-resnet50":
        # SiamRPN++'s backbone: ResNet-50 with layers 3-4 at stride 8 through dilation.
        m = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
        return nn.Sequential(*list(m.children())[:-2])
    if name == "rtmdnet":
        return RTMDNetShaped()
    if name == "tiny":
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                             nn.ReLU(), nn.Conv2d(32, 32, 3, padding=2, dilation=2), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    raise ValueError(f"unknown model {name!r}; choose resnet18, resnet50, siamrpn-resnet50, rtmdnet or tiny.")


MODEL_INPUT = {"resnet18": 224, "resnet50": 224, "siamrpn-resnet50": 255, "rtmdnet": 107, "tiny": 32}


def write_json(path, payload) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
