"""Epilogue fusion and code chaining at deploy time (docs/kernels.md).

A deployed conv followed by ``BatchNorm2d`` (eval mode) and ``ReLU`` becomes one layer (a deployed
Linear followed by ``ReLU`` too, as a transformer's FFN): the
BatchNorm folds into the integer conv's per-channel ``scale`` and ``bias`` and into the rows of
the pruned branch's weights, and the ReLU moves into the integer conv's epilogue (a float-input
layer, the network's first, folds the BatchNorm into the same scales and applies the ReLU after
its single float conv). The folded
modules are replaced by ``nn.Identity``, so no separate elementwise pass reads and writes the
activation after the layer. Only modules used once in the traced graph are replaced (torchvision's
ResNet blocks call one ``relu`` module several times: that ReLU stays a module of its own), and
only layers called once. Folding rescales the pruned branch's weights by the BatchNorm's
per-channel gain, so online-update SGD steps on them differ per channel from the unfused layer's.

Then chains: when a deployed integer conv's only consumer (through ``nn.Identity`` alone) is
another deployed conv that has no full-precision branch and reads zero-padded quantized input,
the producer (itself without a full-precision branch, whose online update needs float outputs)
re-quantizes in its epilogue to the consumer's input codes and the consumer takes packed codes: between the two no float activation is written, only packed low-bit codes (the
situation of the network-level quantized copy, and of quantized-only models).
"""
from __future__ import annotations

from collections import Counter
from typing import List

import torch
import torch.nn as nn

from .deployed import DeployedConv2d, DeployedLinear
from .graph import set_submodule, trace


@torch.no_grad()
def fold_batchnorm_into_(layer: DeployedConv2d, bn: nn.BatchNorm2d) -> None:
    """Absorb an eval-mode BatchNorm that follows ``layer``: ``bn(y) = y * g + shift`` with
    ``g = gamma / sqrt(var + eps)`` scales the integer epilogue's ``scale`` and ``bias`` and the
    pruned branch's rows."""
    if layer.path not in ("hybrid", "codes", "merged"):
        raise ValueError("only a layer with a quantized branch folds a BatchNorm into its scales.")
    if layer.relu or layer.out_qparams is not None:
        raise ValueError("a BatchNorm folds in before the epilogue's ReLU / re-quantization, which this layer "
                         "already has.")
    if bn.num_features != layer.out_channels:
        raise ValueError(f"the BatchNorm has {bn.num_features} channels, the layer {layer.out_channels}.")
    g = (bn.weight.float() if bn.affine else 1.0) / (bn.running_var.float() + bn.eps).sqrt()
    shift = (bn.bias.float() if bn.affine else 0.0) - bn.running_mean.float() * g
    layer.scale.mul_(g)
    if layer.bias is None:
        layer.bias = shift.clone()
    else:
        layer.bias.mul_(g).add_(shift)
    rows = g.index_select(0, layer.fp_out_idx)
    layer.fp_weight.mul_(rows.view(-1, 1, 1, 1).to(layer.fp_weight.dtype))
    if layer.fp_bias is not None:
        layer.fp_bias.mul_(rows.to(layer.fp_bias.dtype))


def fuse_epilogues_(model: nn.Module) -> List[str]:
    """Fold BatchNorm2d / ReLU that follow deployed integer convs into those convs (ReLU that
    follows a deployed Linear into that Linear), in place. Returns one ``"conv+bn+relu"``-style
    entry per fused layer."""
    gm = trace(model, "BatchNorm and ReLU stay separate passes after the deployed layers.")
    if gm is None:
        return []
    modules = dict(model.named_modules())
    uses = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")

    def sole_module_user(node, kind):
        """The single user of ``node`` if it is a once-used module of type ``kind`` fed by it."""
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        ok = (user.op == "call_module" and type(modules.get(user.target)) is kind and uses[user.target] == 1
              and len(user.args) == 1 and user.args[0] is node)
        return user if ok else None

    fused = []
    for node in gm.graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        # integer layers fold into their epilogue; a float-input (merged) layer folds into its weights
        if not (isinstance(layer, (DeployedConv2d, DeployedLinear)) and layer.path in ("hybrid", "merged")):
            continue
        if uses[node.target] != 1:
            continue  # a layer called twice would fold in the BatchNorm of each call
        parts, tail = [node.target], node
        bn_node = sole_module_user(node, nn.BatchNorm2d) if isinstance(layer, DeployedConv2d) else None
        if bn_node is not None:
            bn = modules[bn_node.target]
            if bn.training or bn.running_mean is None:
                continue  # batch statistics cannot be folded into constants
            fold_batchnorm_into_(layer, bn)
            set_submodule(model, bn_node.target, nn.Identity())
            layer.absorbed.append([bn_node.target, type(bn).__name__])
            parts.append(bn_node.target)
            tail = bn_node
        relu_node = sole_module_user(tail, nn.ReLU)
        if relu_node is not None:
            layer.relu = True
            set_submodule(model, relu_node.target, nn.Identity())
            layer.absorbed.append([relu_node.target, "ReLU"])
            parts.append(relu_node.target)
        if len(parts) > 1:
            fused.append("+".join(parts))
    return fused + chain_codes_(model)


def _integer_conv(m) -> bool:
    return isinstance(m, DeployedConv2d) and m.path in ("hybrid", "codes")


def chain_codes_(model: nn.Module) -> List[str]:
    """Let pairs of deployed integer convs pass packed codes (see the module docstring), in place.
    Returns one ``"producer->consumer"`` entry per chained pair."""
    gm = trace(model, "deployed quantized layers pass float activations to each other.")
    if gm is None:
        return []
    modules = dict(model.named_modules())
    uses = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    chained = []
    for node in gm.graph.nodes:
        producer = modules.get(node.target) if node.op == "call_module" else None
        # A producer with a full-precision branch keeps float outputs: codes carry no gradient,
        # and its branch must stay trainable for the online update.
        if (not _integer_conv(producer) or producer.out_qparams is not None or producer.kept_channels
                or uses[node.target] != 1):
            continue
        hop = node
        while len(hop.users) == 1:
            hop = next(iter(hop.users))
            consumer = modules.get(hop.target) if hop.op == "call_module" else None
            if not isinstance(consumer, nn.Identity):
                break
        else:
            continue
        if not (_integer_conv(consumer) and consumer.kept_channels == 0 and consumer.padding_mode == "zeros"
                and not consumer.codes_input and consumer.backend == producer.backend and len(hop.args) == 1
                and uses[hop.target] == 1):
            continue  # (the code format between the two is the backend's: both must run on the same one)
        producer.set_output_codes_(consumer.in_qparams, consumer.bits_a, consumer.a_signed)
        consumer.set_codes_input_()
        chained.append(f"{node.target}->{hop.target}")
    return chained
