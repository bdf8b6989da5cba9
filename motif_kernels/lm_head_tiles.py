"""Tiles of the LM-head forward kernels (pallas, triton) and the merge of vocab-split partial statistics.

A kernel program owns ``block_t`` tokens and a contiguous slice of the vocabulary (``vocab_splits`` slices in all):
it folds its [block_t, block_v] logit tiles (built over ``block_d``-deep steps) into partial (m, l, s, t), and
:func:`merge_splits` combines the slices afterwards exactly as the vocab-parallel path combines shards. Splitting
the vocabulary gives a grid of ``ceil(T / block_t) x vocab_splits`` programs, so a GPU's SMs are busy even when
the token axis alone gives fewer programs than SMs (T = 4,096 in 64-token blocks: 64 programs for 132 SMs).

:func:`choose_tiles` reads a small table keyed by the target's device class and the problem's size. The GPU
entries are starting points, not measurements (no GPU was available when they were written):
``scripts/gpu_check.py`` sweeps them on a lent GPU and prints the best, which is how the table gets updated.
This module imports jax only.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

__all__ = ["KernelTiles", "TILE_TABLE", "choose_tiles", "merge_splits"]


@dataclasses.dataclass(frozen=True)
class KernelTiles:
    """Static tile configuration of one kernel call (hashable: part of the custom_vjp's plan)."""

    block_t: int = 64
    block_v: int = 128
    block_d: int = 64
    vocab_splits: int = 1  # programs along the vocabulary; 1: one program walks the whole vocabulary
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_t", "block_v", "block_d", "vocab_splits", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"KernelTiles.{name} must be a positive int, got {value!r}")


# (device class, minimum tokens) -> tiles; the last matching row (largest minimum <= T) wins.
# Hopper: 128 x 256 output tiles over 64-deep steps do 2*128*256*64 FLOP per (128*64 + 64*256)*2 bytes loaded,
# 85 FLOP/byte against 43 for 64 x 128 (H100's balance point is ~295 with operands from HBM, less from L2).
TILE_TABLE: dict[str, tuple[tuple[int, KernelTiles], ...]] = {
    "hopper": (
        (0, KernelTiles(64, 128, 64, 1, 4, 3)),
        (2048, KernelTiles(128, 256, 64, 1, 8, 3)),
    ),
    "ampere": (
        (0, KernelTiles(64, 128, 64, 1, 4, 3)),
        (2048, KernelTiles(128, 128, 64, 1, 4, 3)),
    ),
    "cpu": ((0, KernelTiles(64, 128, 64, 1, 1, 1)),),  # interpret mode: tiles only change the grid length
}
# Streaming multiprocessors per device class: the grid should offer at least two programs per SM.
_SMS = {"hopper": 132, "ampere": 108}


def device_class(platform: str, compute_capability: tuple[int, int] | None) -> str:
    if platform != "gpu":
        return "cpu"
    return "hopper" if compute_capability is not None and compute_capability >= (9, 0) else "ampere"


def choose_tiles(t_len: int, v_len: int, platform: str, compute_capability: tuple[int, int] | None = None,
                 *, block_t: int | None = None, block_v: int | None = None) -> KernelTiles:
    """Tiles for T tokens and V vocabulary columns on the target; ``block_t`` / ``block_v`` override the table.

    The vocabulary is split when the token blocks alone give fewer than two programs per SM, into as many
    slices as fill the SMs twice (each slice keeps at least 8 vocab blocks, so the merge stays negligible).
    """
    cls = device_class(platform, compute_capability)
    tiles = TILE_TABLE[cls][0][1]
    for minimum, row in TILE_TABLE[cls]:
        if t_len >= minimum:
            tiles = row
    tiles = dataclasses.replace(tiles, block_t=block_t or tiles.block_t, block_v=block_v or tiles.block_v)
    sms = _SMS.get(cls)
    if sms:
        programs = math.ceil(t_len / tiles.block_t)
        want = math.ceil(2 * sms / programs) if programs < 2 * sms else 1
        most = max(1, v_len // (8 * tiles.block_v))
        tiles = dataclasses.replace(tiles, vocab_splits=max(1, min(want, most)))
    return tiles


def split_bounds(v_len: int, block_v: int, splits: int) -> tuple[int, int]:
    """(vocab blocks per split, columns per split) so that ``splits`` slices of whole blocks cover V."""
    blocks = math.ceil(v_len / block_v)
    per_split = math.ceil(blocks / splits)
    return per_split, per_split * block_v


def merge_splits(m, l, s, t, with_entropy: bool):
    """[S, T] partial statistics of S vocab slices -> [T] each, exactly as the vocab-parallel combine:
    the max is a shift, l and s are rescaled to it, target logits add (each target lies in one slice)."""
    if m.shape[0] == 1:
        return m[0], l[0], s[0], t[0]
    m_all = jnp.max(m, axis=0)
    alpha = jnp.exp(m - m_all[None])
    l_all = jnp.sum(alpha * l, axis=0)
    s_all = jnp.sum(alpha * (s + (m - m_all[None]) * l), axis=0) if with_entropy else s[0]
    return m_all, l_all, s_all, jnp.sum(t, axis=0)
