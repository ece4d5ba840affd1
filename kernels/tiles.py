"""The shipped tile table of the Triton qconv2d kernel: one config per shape, no autotuning.

A cold process compiles one kernel per layer (per specialisation), not one per candidate tile:
autotuning 11 configs per new shape cost roughly 200-350 compiles for a cold ResNet-50, more
than the GPU time a verification run has (issue 11, docs/gpu.md). :func:`pick` chooses from
:data:`SHIPPED` by the problem's size; ``HYBRIDOPS_AUTOTUNE=1`` in the environment makes the
launcher time all of :data:`SHIPPED` instead (``kernels/qconv.py``), which is refused inside a
CUDA-graph capture for a shape not tuned before it.

Every shipped config compiles for sm_90 with **zero register spills** in every kernel variant
(packed / one-byte activation codes, signed or not, groups starting mid-byte, int32 / float / re-quantizing epilogues),
checked with ``ptxas -v`` on Triton's PTX by ``tests/test_triton_codegen.py``. Tried and not
shipped (Triton 3.8, sm_90): 128x64 and 64x128 tiles on 4 warps spilled 144-356 bytes, mostly in
the re-quantizing epilogue (per-element pointers and the nibble packing fill the 255 registers),
and 128x128 even on 8 warps (8-360 bytes), so the wide tile runs on 8 warps; 32x64 on 4 warps
spilled 8-16 bytes in the full-K packed mainloop, so it runs on 2 warps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

# H100 and H200 both have 132 SMs; the table is written for them (the GPUs of docs/gpu.md).
SM_COUNT = 132


@dataclass(frozen=True)
class Tile:
    """One launch config of the qconv2d kernel."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"m{self.block_m}n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}"

    def meta(self) -> Dict[str, int]:
        """The constexpr block sizes, as the kernel takes them."""
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k}


# Largest first. BLOCK_K (channels per K step, one tl.dot) >= 32 because int8 MMA consumes K in
# multiples of 32; BLOCK_M >= 64 runs on wgmma, smaller BLOCK_M on mma.sync (checked by the
# codegen test).
SHIPPED: Tuple[Tile, ...] = (
    Tile(64, 128, 64, 8, 4),  # batched layers with >= 128 output channels: half the A unpacking of 64-wide N
    Tile(64, 64, 64, 4, 4),   # batched layers
    Tile(32, 64, 64, 2, 4),   # batch 1: M = Ho * Wo of a few hundred to a few thousand pixels (4 warps spilled)
    Tile(16, 64, 64, 4, 3),   # the smallest M (1x1 images, late layers; 4 stages spilled with the fused branch)
)

# A K step that does not divide C_in per group keeps the activation loads masked (no vector
# copies): a layer whose C_in per group is a multiple of this but not of the tile's step (RT-MDNet
# conv2: 96 channels) runs the same tile with K steps this narrow instead.
NARROW_K = 32

# Compute-ready weights pad C_in per group with zero codes to a multiple of this, so that no K
# step of any tile (each BLOCK_K divides it) reads past a weight row: the B tile needs no mask.
K_PAD = 64

# The tile of the CPU interpreter, whatever the shape: its cost is per program and per op, so a
# medium tile runs the test suite fastest; and one config means nothing is tuned there.
INTERPRETER_TILE = Tile(32, 32, 32, 4, 1)

_forced: Optional[Tile] = None


def compiled_configs() -> Tuple[Tile, ...]:
    """Every config :func:`pick` can return on a GPU: the shipped tiles and their narrow-K forms."""
    return SHIPPED + tuple(dataclasses.replace(t, block_k=NARROW_K) for t in SHIPPED if t.block_k != NARROW_K)


def shipped_names() -> Tuple[str, ...]:
    """Names of :func:`compiled_configs` (what the GPU suite's correctness stage forces one by one)."""
    return tuple(t.name for t in compiled_configs())


def by_name(name: str) -> Tile:
    for t in compiled_configs() + (INTERPRETER_TILE,):
        if t.name == name:
            return t
    raise ValueError(f"unknown tile {name!r}; shipped: {', '.join(shipped_names())}.")


@contextlib.contextmanager
def forced(name: str) -> Iterator[Tile]:
    """Run every qconv2d launch inside the block on tile ``name`` (the correctness stage of the
    GPU suite and the tests run each shipped tile this way)."""
    global _forced
    previous, _forced = _forced, by_name(name)
    try:
        yield _forced
    finally:
        _forced = previous


def autotune_requested() -> bool:
    """``HYBRIDOPS_AUTOTUNE=1``: time the shipped tiles per shape instead of using :func:`pick`.
    Read at each launch so that it can be switched in a running process."""
    return os.environ.get("HYBRIDOPS_AUTOTUNE", "0") == "1"


def pick(m: int, c_out: int, interpret: bool = False, cin_g: Optional[int] = None) -> Tile:
    """The tile for an implicit GEMM of ``m`` output pixels, ``c_out`` output channels and
    ``cin_g`` input channels per group.

    The largest shipped tile no wider than ``c_out`` that still gives at least two CTAs per SM
    (so every SM has work and a second CTA hides the first one's latency); when none does
    (batch-1 layers), the one with the most CTAs, i.e. the smallest; with :data:`NARROW_K` steps where those divide ``cin_g``
    and the tile's do not. A tile forced by :func:`forced` wins.
    """
    if _forced is not None:
        return _forced
    if interpret:
        return INTERPRETER_TILE
    chosen = SHIPPED[-1]
    for t in SHIPPED:
        if t.block_n > max(c_out, 64):
            continue  # more than half of the tile's columns would multiply zeros
        if -(-m // t.block_m) * -(-c_out // t.block_n) >= 2 * SM_COUNT:
            chosen = t
            break
    if cin_g is not None and cin_g % chosen.block_k and cin_g % NARROW_K == 0:
        return dataclasses.replace(chosen, block_k=NARROW_K)
    return chosen
