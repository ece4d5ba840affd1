"""The int8 and float engines a CPU user would pick instead of hybridops, built from the same
float model: OpenVINO (fp32, bf16, and int8 by NNCF post-training quantization) and torchao's
PT2E int8 (X86InductorQuantizer, then torch.compile with freezing).

Each builder returns a callable running one batch, or raises; ``bench/speedup_report.py``'s
``cpu_baselines`` times them beside PyTorch's own paths in the same process and reports a peer
that cannot run (not installed, or failing on the model) with the reason. The packages are pinned
in ``requirements-peers.txt``, which the README's main-job command installs; the tests need none.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List

import torch
import torch.nn as nn

INSTALL = "pip install -r requirements-peers.txt"


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeError(f"{module} is not installed ({INSTALL})") from e


def _calibration(x: torch.Tensor, samples: int) -> List[torch.Tensor]:
    """``samples`` inputs shaped like ``x`` (random: the timings do not depend on the values; the
    accuracy of a peer's int8 model is not what is compared here)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(x.shape, generator=g) for _ in range(samples)]


def _openvino_compiled(ov_model, precision: str):
    ov = _need("openvino")
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": torch.get_num_threads(),
              "PERFORMANCE_HINT": "LATENCY"}
    compiled = ov.Core().compile_model(ov_model, "CPU", config)
    request = compiled.create_infer_request()

    def run(x: torch.Tensor):
        # share_inputs: no copy of the input; the output is read back as OpenVINO's own tensor
        return request.infer({0: x.numpy()}, share_inputs=True)

    return run


def _openvino_model(model: nn.Module, x: torch.Tensor):
    """``ov.convert_model`` of ``model``: through TorchScript tracing, or, where tracing fails (the
    frontend's trace of torchvision's ViT does), through a ``torch.export`` program."""
    ov = _need("openvino")
    model = copy.deepcopy(model).eval()
    try:
        return ov.convert_model(model, example_input=x)
    except RuntimeError:
        return ov.convert_model(torch.export.export(model, (x,)))


def openvino_float(model: nn.Module, x: torch.Tensor, precision: str) -> Callable:
    """OpenVINO's CPU plugin on ``ov.convert_model(model)``, ``precision`` "f32" or "bf16"."""
    return _openvino_compiled(_openvino_model(model, x), precision)


def openvino_int8(model: nn.Module, x: torch.Tensor, samples: int = 8) -> Callable:
    """NNCF's default post-training int8 quantization of the OpenVINO model, run by OpenVINO."""
    nncf = _need("nncf")
    ov_model = _openvino_model(model, x)
    data = nncf.Dataset([c.numpy() for c in _calibration(x, samples)])
    quantized = nncf.quantize(ov_model, data, subset_size=samples)
    # f32 hint: int8 where NNCF put quantizers, fp32 (not bf16) elsewhere, the default int8 setup
    return _openvino_compiled(quantized, "f32")


def _basic_block_forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu_out(self.bn2(self.conv2(out)) + identity)


def _bottleneck_forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu_mid(self.bn2(self.conv2(out)))
    return self.relu_out(self.bn3(self.conv3(out)) + identity)


def _one_relu_per_call(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose torchvision ResNet blocks call a separate ReLU module at each
    place (torchvision's call one ReLU two or three times): X86InductorQuantizer groups nodes by
    source module and refuses a group with several outputs ("Input partition has more than one
    output node"). Other modules are left as they are."""
    import types

    from torchvision.models.resnet import BasicBlock, Bottleneck

    model = copy.deepcopy(model).eval()
    for block in model.modules():
        if isinstance(block, (BasicBlock, Bottleneck)):
            block.relu_out = copy.deepcopy(block.relu)
            if isinstance(block, Bottleneck):
                block.relu_mid = copy.deepcopy(block.relu)
            forward = _bottleneck_forward if isinstance(block, Bottleneck) else _basic_block_forward
            block.forward = types.MethodType(forward, block)
    return model


def torchao_pt2e_int8(model: nn.Module, x: torch.Tensor, samples: int = 4) -> Callable:
    """torchao's PT2E flow: export, X86InductorQuantizer's default static int8 config, calibrate,
    convert, then torch.compile with freezing (Inductor lowers the q/dq pattern to oneDNN int8)."""
    _need("torchao")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    exported = torch.export.export(_one_relu_per_call(model), (x,)).module()
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for c in _calibration(x, samples):
            prepared(c)
    converted = convert_pt2e(prepared)
    import torch._inductor.config as inductor_config

    # The global flag, as torchao's docs set it (options={"freezing": True} fails here: Inductor
    # then meets onednn.qconv_prepack in fake mode); restored once this model is compiled.
    old = inductor_config.freezing
    inductor_config.freezing = True
    try:
        compiled = torch.compile(converted)
        with torch.no_grad():
            compiled(x)  # compiles here, not in the timed loop
    finally:
        inductor_config.freezing = old
    return compiled


def build_all(model: nn.Module, x: torch.Tensor) -> Dict[str, tuple]:
    """``{path name: (is_float, builder)}`` for every peer; a builder raises when its peer cannot
    run. (OpenVINO's bf16 hint falls back to fp32 on a CPU without bf16 units.)"""
    return {
        "OpenVINO fp32": (True, lambda: openvino_float(model, x, "f32")),
        "OpenVINO bf16": (True, lambda: openvino_float(model, x, "bf16")),
        "OpenVINO int8 (NNCF)": (False, lambda: openvino_int8(model, x)),
        "torchao PT2E int8 + compile": (False, lambda: torchao_pt2e_int8(model, x)),
    }
