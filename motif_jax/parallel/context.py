"""Context (sequence) parallelism: the length axis of activations is sharded over the ``context`` mesh axis.

This module holds what the model, the data pipeline and the step need to agree on: the strategy selected for
tracing (:func:`context_strategy`, ``--mesh.context-strategy``), the active context mesh, and the load-balanced
causal layout (:func:`load_balance_permutation`), which reorders each sequence once at batch time so shard ``i``
holds chunks ``i`` and ``2C-1-i`` (the loss is a sum over tokens and does not care about order). The attention
itself, all-gather or ring, is :mod:`motif_jax.model.context_attention` (model -> parallel, never back).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

CONTEXT_AXIS = "context"
STRATEGIES = ("all_gather", "ring")

_STRATEGY: contextvars.ContextVar[str] = contextvars.ContextVar("motif_jax_context_strategy", default="all_gather")

__all__ = [
    "CONTEXT_AXIS",
    "STRATEGIES",
    "active_context_mesh",
    "active_strategy",
    "context_strategy",
    "inverse_permutation",
    "load_balance_batch",
    "load_balance_permutation",
]


@contextlib.contextmanager
def context_strategy(name: str) -> Iterator[None]:
    """Selects the context-parallel strategy used while tracing inside this context."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown context strategy {name!r}; choose one of {STRATEGIES} (--mesh.context-strategy)")
    token = _STRATEGY.set(name)
    try:
        yield
    finally:
        _STRATEGY.reset(token)


def active_strategy() -> str:
    return _STRATEGY.get()


def active_context_mesh() -> Any | None:
    """The active (abstract) mesh when its ``context`` axis is larger than 1, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or CONTEXT_AXIS not in mesh.axis_names:
        return None
    return mesh if dict(mesh.shape)[CONTEXT_AXIS] > 1 else None


# ---------------------------------------------------------------------------------------------------------------------
# Load-balanced causal layout
# ---------------------------------------------------------------------------------------------------------------------


def load_balance_permutation(seq_len: int, context: int) -> np.ndarray:
    """Index array ``perm`` [seq_len]: the balanced row is ``row[perm]``.

    The sequence is cut into 2C equal chunks; context shard ``i`` (the i-th contiguous 1/C of the permuted row)
    gets chunks ``i`` and ``2C-1-i``, so under a causal mask every shard has the same amount of unmasked work.
    """
    if context < 1 or seq_len % (2 * context):
        raise ValueError(
            f"sequence length {seq_len} must be divisible by 2 x context = {2 * context} for the load-balanced "
            "layout (change --data.seq-len or --mesh.context)"
        )
    chunk = seq_len // (2 * context)
    order = [c for i in range(context) for c in (i, 2 * context - 1 - i)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in order]).astype(np.int32)


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm), dtype=perm.dtype)
    return inv


def load_balance_batch(batch: Mapping[str, Any], context: int, *, axis: int = 1) -> dict[str, Any]:
    """Applies :func:`load_balance_permutation` along ``axis`` to every array of the batch (host numpy or jax).

    Use on tokens / targets / loss_mask / segment_ids / positions together, once, when the batch is built: targets
    are the next token of the original order and travel with their token, and attention masks come from
    (segment id, position), so nothing else changes. ``context == 1`` returns the batch unchanged.
    """
    if context == 1:
        return dict(batch)
    lengths = {k: np.shape(v)[axis] for k, v in batch.items() if np.ndim(v) > axis}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"batch arrays disagree on the length axis: {lengths}")
    out = dict(batch)
    if not lengths:
        return out
    perm = load_balance_permutation(next(iter(lengths.values())), context)
    for k in lengths:
        v = batch[k]
        out[k] = np.take(v, perm, axis=axis) if isinstance(v, np.ndarray) else jnp.take(v, perm, axis=axis)
    return out
