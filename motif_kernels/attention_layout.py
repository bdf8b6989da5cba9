"""Is a row of (segment ids, positions) in natural order? The condition under which index-based causal kernels
(cuDNN's causal mask, splash attention's CausalMask + segment ids) compute the model's masking rule exactly.

The model's rule: query i sees key j iff ``segment[i] == segment[j]`` and ``position[i] >= position[j]``. With
every real segment one contiguous run whose positions count 0, 1, 2, ... from its first token, and every segment
id larger than all ids before it (so a segment never reappears after another), that is "same segment and
``i >= j``". Padding (segment id 0) may sit anywhere; its outputs are unspecified in every backend. Packing and
single sequences produce this order; the load-balanced context-parallel layout and arbitrary permutations do not
(the context-parallel path restores it first; anything else takes the exact blockwise kernel).
This module imports jax only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["Runs", "natural_runs"]


class Runs(NamedTuple):
    """natural (bool []): every row in natural order; run [B, T] int32: run index of each token (a run is a
    maximal stretch of one segment id, padding included); n_runs [B] int32; real [B, T] bool (segment id > 0)."""

    natural: jax.Array
    run: jax.Array
    n_runs: jax.Array
    real: jax.Array


def natural_runs(segment_ids: jax.Array, positions: jax.Array) -> Runs:
    """[B, T] segment ids and positions -> :class:`Runs` (O(B * T) work, no [T, T] intermediate)."""
    seg, pos = segment_ids.astype(jnp.int32), positions.astype(jnp.int32)
    b = seg.shape[0]
    new = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    real = seg > 0
    prev_pos = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), pos[:, :-1]], axis=1)
    pos_ok = jnp.where(real, pos == jnp.where(new, 0, prev_pos + 1), True)
    prev_max = lax.cummax(jnp.concatenate([jnp.zeros((b, 1), jnp.int32), seg[:, :-1]], axis=1), axis=1)
    id_ok = jnp.where(real & new, seg > prev_max, True)
    run = jnp.cumsum(new.astype(jnp.int32), axis=1) - 1
    natural = jnp.all(pos_ok) & jnp.all(id_ok) & jnp.all(seg >= 0)
    return Runs(natural, run, run[:, -1] + 1, real)
