"""The update phase of an RL round, host side (pure numpy): the round's rows, each optimizer step's mini-batch in
the step engine's micro-batch layout, and the round's summary of the per-step metrics.

The device side (proximal log-probs, the compiled steps) is ``RLTrainer.update_round`` in ``motif_jax.rl.loop``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from motif_jax.rl.buffer import Group, collate
from motif_jax.rl.objective import has_policy_gradient

__all__ = ["minibatch_rows", "round_rows", "summarize_steps"]


def round_rows(groups: Sequence[Group], *, seq_len: int, pad_id: int, multiple: int) -> dict[str, np.ndarray]:
    """The round's groups collated into [R, seq_len] rows, R a multiple of ``multiple`` with at least one padding
    row (the row that fills a mini-batch short of whole groups)."""
    n = sum(g.size for g in groups)
    rows = -(-(n + 1) // multiple) * multiple
    return collate(groups, seq_len, pad_id, batch_size=rows)


def minibatch_rows(
    rows: Mapping[str, np.ndarray],
    *,
    num_groups: int,
    group_size: int,
    rows_per_minibatch: int,
    num_microbatches: int,
    num_minibatches: int,
    num_passes: int,
    negative_weight: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Row indices of every optimizer step of the round: ``num_passes`` shuffled passes over the groups (rows
    ``g * group_size ..`` of ``rows``), each split into ``num_minibatches`` mini-batches of whole groups, padded
    with the last (empty) row to ``rows_per_minibatch``.

    Within a mini-batch the rows with a policy gradient come first, so whole micro-batches of rows without one can
    be skipped by the engine; the order is then laid out for the engine's split (micro-batch i = rows i, i + M, ...
    of the step's batch), so micro-batch i holds the i-th contiguous chunk.
    """
    inert = ~np.asarray(has_policy_gradient(rows["advantages"], rows["loss_mask"], negative_weight=negative_weight))
    pad_row = rows["tokens"].shape[0] - 1
    out = []
    for _ in range(num_passes):
        order = rng.permutation(num_groups)
        for part in np.array_split(order, num_minibatches):
            if len(part) == 0:
                continue
            idx = np.concatenate([np.arange(g * group_size, (g + 1) * group_size) for g in part])
            idx = np.concatenate([idx, np.full(rows_per_minibatch - idx.size, pad_row)])
            idx = idx[np.argsort(inert[idx], kind="stable")]
            out.append(idx.reshape(num_microbatches, -1).T.reshape(-1))
    return out


def summarize_steps(steps: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The round's value of each per-step metric: the maximum of ``*_max`` metrics, the mean of the rest."""
    if not steps:
        return {}
    return {k: float(np.max([s[k] for s in steps]) if k.endswith("_max") else np.mean([s[k] for s in steps]))
            for k in steps[0]}
