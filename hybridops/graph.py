"""``torch.fx`` tracing that keeps hybridops layers whole, shared by the graph passes
(compounding pruning in :mod:`hybridops.network`, epilogue fusion in :mod:`hybridops.fusion`)."""
from __future__ import annotations

import warnings
from typing import Optional

import torch.fx as fx
import torch.nn as nn

from .attention import HybridMultiheadAttention, HybridTimmAttention, HybridWindowAttention
from .deployed import DEPLOYED_LAYERS
from .layers import TRAINABLE_LAYERS

# The attention rewrites are leaves as the nn.MultiheadAttention they replace is: their forward
# branches on its arguments (masks, is_causal), which torch.fx cannot trace, and no graph pass
# fuses anything into their projections.
LEAF_LAYERS = TRAINABLE_LAYERS + DEPLOYED_LAYERS + (HybridMultiheadAttention, HybridWindowAttention,
                                                    HybridTimmAttention)


class LayerTracer(fx.Tracer):
    """Keeps hybridops layers (and the attention modules hybridops rewrites) as ``call_module``
    nodes: the default tracer treats only ``torch.nn`` modules as leaves and would trace through
    a hybridops layer, leaving no node for it."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LEAF_LAYERS) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, consequence: str) -> Optional[fx.GraphModule]:
    """The traced graph of ``model``, or None (with a warning that ends in ``consequence``) when
    ``torch.fx`` cannot trace it (data-dependent control flow): graph passes are optimisations,
    and the model stays correct without them."""
    try:
        return fx.GraphModule(model, LayerTracer().trace(model))
    except Exception as e:
        warnings.warn(f"torch.fx could not trace {type(model).__name__} ({e}); {consequence}")
        return None


def set_submodule(model: nn.Module, qualname: str, module: nn.Module) -> None:
    parent_name, _, name = qualname.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, name, module)
