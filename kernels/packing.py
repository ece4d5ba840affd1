"""The packed low-bit storage format shared by every backend.

Codes are small integers (eq 7 and eq 9 of the paper):

* signed codes (weights, and activations that can be negative) lie in
  ``[-(2^(b-1) - 1), 2^(b-1) - 1]``;
* unsigned codes (activations after ReLU) lie in ``[0, 2^b - 1]``.

Storage, along the innermost (channel / reduction) dimension:

* ``bits <= 4``: two codes per byte. Channel ``2j`` sits in the low nibble of byte ``j``,
  channel ``2j + 1`` in the high nibble; signed codes are stored as 4-bit two's complement.
  An odd channel count is padded with a zero code.
* ``5 <= bits <= 8``: one code per byte (signed codes as int8 bit patterns).

Packed tensors are always ``torch.uint8``. Activations are NHWC ``(N, H, W, packed(C))`` and
conv weights ``(C_out, KH, KW, packed(C_in / groups))``, so the reduction dimension is the
contiguous one (K-major operands, which Hopper's integer MMA needs).
"""
from __future__ import annotations

import torch

MIN_BITS = 2
MAX_BITS = 8


def check_bits(bits: int, what: str = "bits") -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}.")


def levels(bits: int, signed: bool) -> int:
    """Largest code magnitude: 2^(b-1) - 1 for signed codes (eq 7), 2^b - 1 unsigned (eq 9)."""
    return (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1


def packed_size(channels: int, bits: int) -> int:
    """Bytes per row of ``channels`` codes."""
    return (channels + 1) // 2 if bits <= 4 else channels


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``(..., C)`` (any integer dtype) into ``uint8 (..., packed_size(C))``."""
    check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"pack_codes expects an integer tensor, got {codes.dtype}.")
    c = codes.to(torch.int16)
    if bits > 4:
        return c.to(torch.int8).view(torch.uint8).contiguous()
    if c.shape[-1] % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    nib = c & 0xF  # two's complement nibble for negative codes
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, channels: int, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``uint8 (..., packed_size(C))`` -> ``int8 (..., C)``
    (``int16`` for unsigned 8-bit codes)."""
    check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be torch.uint8, got {packed.dtype}.")
    if packed.shape[-1] != packed_size(channels, bits):
        raise ValueError(
            f"packed codes have {packed.shape[-1]} bytes per row, expected "
            f"{packed_size(channels, bits)} for {channels} channels at {bits} bits."
        )
    if bits > 4:
        out = (packed.view(torch.int8) if signed else packed)[..., :channels].to(torch.int16)
    else:
        p = packed.to(torch.int16)
        lo, hi = p & 0xF, (p >> 4) & 0xF
        if signed:
            lo = torch.where(lo >= 8, lo - 16, lo)
            hi = torch.where(hi >= 8, hi - 16, hi)
        out = torch.stack((lo, hi), dim=-1).flatten(-2)[..., :channels]
    # Unsigned 8-bit codes reach 255, which int8 cannot hold.
    return out if (bits == 8 and not signed) else out.to(torch.int8)


def pack_weight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Conv weight codes ``(C_out, C_in/g, KH, KW)`` -> packed ``uint8 (C_out, KH, KW, packed)``."""
    if codes.dim() != 4:
        raise ValueError(f"conv weight codes must be 4-D (C_out, C_in/groups, KH, KW), got {tuple(codes.shape)}.")
    return pack_codes(codes.permute(0, 2, 3, 1), bits)


def unpack_weight(packed: torch.Tensor, bits: int, in_channels_per_group: int) -> torch.Tensor:
    """Packed ``(C_out, KH, KW, packed)`` -> int8 codes ``(C_out, C_in/g, KH, KW)``."""
    return unpack_codes(packed, bits, in_channels_per_group, signed=True).permute(0, 3, 1, 2).contiguous()
