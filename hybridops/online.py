"""The online update (Fig. 1 of the paper): only the full-precision branch learns at test time."""
from __future__ import annotations

from typing import List

import torch.nn as nn

from .deployed import DEPLOYED_LAYERS
from .layers import _PrunedBase


def fp_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The full-precision branch's weights (and biases): what the online update trains."""
    params = []
    for m in model.modules():
        if isinstance(m, _PrunedBase):
            params += [m.weight] + ([m.bias] if m.bias is not None else [])
        elif isinstance(m, DEPLOYED_LAYERS) and m.kept_channels:
            params += [m.fp_weight] + ([m.fp_bias] if m.fp_bias is not None else [])
    return params


def freeze_quantized_(model: nn.Module) -> List[nn.Parameter]:
    """Online-update mode (Fig. 1): every parameter stops requiring grad except the full-precision
    branches' weights; channel gates switch to their deterministic masks. Returns the trainable
    parameters (pass them to the optimizer)."""
    fp = fp_parameters(model)
    if not fp:
        raise ValueError("freeze_quantized_ found no full-precision branch in the model; convert it with "
                         "hybridize_(model, HybridConfig(...)) first.")
    keep = {id(p) for p in fp}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    for m in model.modules():
        if isinstance(m, _PrunedBase):
            m.gate.frozen = True
    return fp
