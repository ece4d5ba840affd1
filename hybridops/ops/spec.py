"""One deployed layer's description: geometry, bit widths, signedness, epilogue and input/output
modes, as the kernels' argument structs hold them (``ConvShape`` and ``Epilogue`` in
``csrc/qconv2d.cu``).

A deployed layer builds one :class:`LayerSpec`, validated once when the layer is built or its
fusion state changes, and hands it to :func:`hybridops.ops.layer_op.hybrid_layer` on every call;
:meth:`LayerSpec.to_ints` flattens it to the ``int[]`` argument of the ``hybridops::hybrid_layer``
custom op, in one place, and :func:`spec_from_ints` reads it back.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ..kernels.packing import check_bits

KINDS = ("conv2d", "linear")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# what a deployed layer computes (see hybridops/deployed.py):
#   hybrid   float input, quantize-activate, integer conv, pruned branch added in the epilogue
#   codes    input already codes (written by the producing layer's epilogue), integer conv
#   merged   float input, no input quantizer: both branches as one float conv
#   fp_only  no quantized branch: the pruned branch alone, scattered into the kept channels
PATHS = ("hybrid", "codes", "merged", "fp_only")


@dataclass(frozen=True)
class LayerSpec:
    """What a deployed layer computes, besides its tensors.

    Attributes:
        kind: ``"conv2d"`` or ``"linear"`` (a 1x1 conv on a 1x1 image whose float parts run as
            ``F.linear``).
        in_channels, out_channels, kernel_size, stride, dilation, groups: as ``nn.Conv2d``.
        padding: ``(top, bottom, left, right)``.
        padding_mode: ``"zeros"`` (the kernels' code-0 border) or ``"reflect"`` / ``"replicate"``
            / ``"circular"`` (padded explicitly before the conv).
        bits_w: weight bits of the quantized branch, None without one.
        bits_a: input activation bits, None for a full-precision input.
        a_signed: signed input codes.
        codes_input: the input is codes in this layer's input format, not floats.
        relu: ReLU in the epilogue (after the residual, when there is one).
        residual: the epilogue adds a residual input of the output's shape before the ReLU (a
            ResNet block's skip connection): the layer computes ``relu(layer(x) + residual)``,
            with ``layer(x)`` rounded to the output dtype first, as the unfused model does.
        out_bits, out_signed: re-quantize the output to these codes (a chained consumer's input
            format); None: float output.
    """

    kind: str
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int, int, int]
    dilation: Tuple[int, int]
    groups: int
    padding_mode: str
    bits_w: Optional[int]
    bits_a: Optional[int]
    a_signed: bool
    codes_input: bool = False
    relu: bool = False
    out_bits: Optional[int] = None
    out_signed: bool = False
    residual: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}.")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}.")
        if min(self.in_channels, self.out_channels, self.groups) < 1 or self.in_channels % self.groups \
                or self.out_channels % self.groups:
            raise ValueError(f"groups={self.groups} must divide in_channels={self.in_channels} and "
                             f"out_channels={self.out_channels} (all positive).")
        if len(self.kernel_size) != 2 or min(self.kernel_size) < 1:
            raise ValueError(f"kernel_size must be two positive ints, got {self.kernel_size}.")
        if len(self.stride) != 2 or min(self.stride) < 1:
            raise ValueError(f"stride must be two positive ints, got {self.stride}.")
        if len(self.dilation) != 2 or min(self.dilation) < 1:
            raise ValueError(f"dilation must be two positive ints, got {self.dilation}.")
        if len(self.padding) != 4 or min(self.padding) < 0:
            raise ValueError(f"padding must be four non-negative ints (top, bottom, left, right), got {self.padding}.")
        if self.kind == "linear" and (self.kernel_size != (1, 1) or self.stride != (1, 1) or any(self.padding)
                                      or self.dilation != (1, 1) or self.groups != 1):
            raise ValueError("a linear layer is a 1x1 ungrouped conv without padding, stride or dilation.")
        if self.bits_w is not None:
            check_bits(self.bits_w, "bits_w")
        if self.bits_a is not None:
            check_bits(self.bits_a, "bits_a")
            if self.bits_w is None:
                raise ValueError("bits_a is the quantized branch's input format; a layer without a quantized branch "
                                 "(bits_w=None) takes bits_a=None.")
        if self.codes_input and (self.bits_a is None or self.padding_mode != "zeros"):
            raise ValueError("only a quantized-input layer with zero padding can take codes as input.")
        if self.out_bits is not None:
            check_bits(self.out_bits, "out_bits")
            if self.bits_a is None:
                raise ValueError("only an integer layer (quantized input) can re-quantize its output to codes.")
        if self.residual:
            if self.bits_a is None:
                raise ValueError("only an integer layer (quantized input) adds a residual in its epilogue.")
            if self.out_bits is not None:
                # a NaN the residual carries could not survive the codes, and no pass would see it
                raise ValueError("a layer that adds a residual writes floats; it cannot also re-quantize its output.")

    @functools.cached_property
    def path(self) -> str:
        if self.bits_w is None:
            return "fp_only"
        if self.bits_a is None:
            return "merged"
        return "codes" if self.codes_input else "hybrid"

    @functools.cached_property
    def zero_padding(self) -> Tuple[int, int, int, int]:
        """The padding the conv itself applies (the border of other modes is made explicitly)."""
        return self.padding if self.padding_mode == "zeros" else (0, 0, 0, 0)

    @functools.cached_property
    def min_input_hw(self) -> Tuple[int, int]:
        """The smallest input height and width with a non-empty output (padding counted)."""
        (kh, kw), (dh, dw), (t, b, l, r) = self.kernel_size, self.dilation, self.padding
        return dh * (kh - 1) + 1 - t - b, dw * (kw - 1) + 1 - l - r

    def to_ints(self) -> List[int]:
        """The ``int[]`` argument of ``hybridops::hybrid_layer`` (read back by :func:`spec_from_ints`)."""
        return [KINDS.index(self.kind), self.in_channels, self.out_channels, *self.kernel_size, *self.stride,
                *self.padding, *self.dilation, self.groups, PADDING_MODES.index(self.padding_mode),
                self.bits_w or 0, self.bits_a or 0, int(self.a_signed), int(self.codes_input), int(self.relu),
                self.out_bits or 0, int(self.out_signed), int(self.residual)]


SPEC_INTS = 23  # len(LayerSpec.to_ints())


@functools.lru_cache(maxsize=1024)
def _from_tuple(v: Tuple[int, ...]) -> LayerSpec:
    return LayerSpec(kind=KINDS[v[0]], in_channels=v[1], out_channels=v[2], kernel_size=(v[3], v[4]),
                     stride=(v[5], v[6]), padding=(v[7], v[8], v[9], v[10]), dilation=(v[11], v[12]), groups=v[13],
                     padding_mode=PADDING_MODES[v[14]], bits_w=v[15] or None, bits_a=v[16] or None,
                     a_signed=bool(v[17]), codes_input=bool(v[18]), relu=bool(v[19]), out_bits=v[20] or None,
                     out_signed=bool(v[21]), residual=bool(v[22]))


def spec_from_ints(v: Sequence[int]) -> LayerSpec:
    """The :class:`LayerSpec` that :meth:`LayerSpec.to_ints` flattened (validated again)."""
    if len(v) != SPEC_INTS:
        raise ValueError(f"a layer spec has {SPEC_INTS} ints, got {len(v)}.")
    t = tuple(v)
    if not (0 <= t[0] < len(KINDS) and 0 <= t[14] < len(PADDING_MODES)):
        raise ValueError(f"a layer spec's kind and padding mode must be indices into {KINDS} and {PADDING_MODES}.")
    return _from_tuple(t)
