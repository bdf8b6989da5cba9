"""Trajectory buffer of whole groups for mixed-policy reuse, and collation into fixed-shape training arrays.

A :class:`Group` holds the G responses to one prompt with everything the update needs later: tokens, loss mask,
behaviour log-probs (fp32, the sampler's, temperature applied), the policy version that produced them, rewards,
verifier statuses and the advantage computed once when the group was complete. Groups stay intact: they are
inserted, sampled, counted and dropped as units, and their stored advantages are reused (never re-normalised over a
subset).

:class:`TrajectoryBuffer` drops a group when ``version_now - version > max_staleness`` or once it has been used
``max_uses`` times, samples mini-batches that mix fresh (never used) and replayed groups, and checkpoints to numpy
arrays + JSON metadata. :func:`collate` pads a list of groups to the fixed [B, T] arrays of a jitted update.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from motif_jax.rl.config import BufferConfig

__all__ = ["Group", "MiniBatch", "Trajectory", "TrajectoryBuffer", "collate"]

_STATE_VERSION = 1
# dtype of every array of the checkpoint schema (state_dict / checkpoint_arrays)
ARRAY_DTYPES = {"prompt_tokens": np.int32, "response_tokens": np.int32, "loss_mask": np.bool_,
                "behaviour_logp": np.float32, "prompt_lengths": np.int64, "response_lengths": np.int64}


@dataclasses.dataclass
class Trajectory:
    """One sampled response. Arrays are converted on construction (int32 tokens, bool mask, float32 log-probs).

    prompt_tokens: [P] int32. response_tokens: [R] int32. loss_mask: [R] bool, True on generated tokens that get a
    loss (False e.g. on tool outputs inserted into the response). behaviour_logp: [R] float32, log mu(response_t).
    ``policy_version``: the policy version that sampled it. ``finish_reason``: "eos", "length" (truncated), ...
    ``rewards``: reward per verifier (component), ``reward``: the total, ``verifier_status``: e.g. "ok",
    "timeout", "parse_error". ``sampling``: sampler settings (temperature, top_p, ...).
    """

    prompt_tokens: np.ndarray
    response_tokens: np.ndarray
    loss_mask: np.ndarray
    behaviour_logp: np.ndarray
    reward: float
    policy_version: int
    rewards: dict[str, float] = dataclasses.field(default_factory=dict)
    verifier_status: str = "ok"
    finish_reason: str = "eos"
    advantage: float = 0.0
    sampling: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prompt_tokens = np.asarray(self.prompt_tokens, dtype=np.int32).reshape(-1)
        self.response_tokens = np.asarray(self.response_tokens, dtype=np.int32).reshape(-1)
        self.loss_mask = np.asarray(self.loss_mask, dtype=bool).reshape(-1)
        self.behaviour_logp = np.asarray(self.behaviour_logp, dtype=np.float32).reshape(-1)
        r = self.response_tokens.shape[0]
        if self.loss_mask.shape[0] != r or self.behaviour_logp.shape[0] != r:
            raise ValueError(
                f"response_tokens, loss_mask and behaviour_logp must have the same length; got {r}, "
                f"{self.loss_mask.shape[0]}, {self.behaviour_logp.shape[0]}"
            )
        self.reward = float(self.reward)
        self.advantage = float(self.advantage)
        self.policy_version = int(self.policy_version)


@dataclasses.dataclass
class Group:
    """The G trajectories sampled for one prompt; the unit of insertion, sampling, use counting and eviction.

    ``insert_step`` and ``use_count`` are set by the buffer (each sample's insert step / use count is its group's).
    """

    group_id: str
    prompt_id: str
    task: str
    samples: list[Trajectory]
    insert_step: int = -1
    use_count: int = 0

    @property
    def policy_version(self) -> int:
        """The oldest policy version among the samples (staleness is measured from it)."""
        return min(s.policy_version for s in self.samples)

    @property
    def size(self) -> int:
        return len(self.samples)

    @property
    def rewards(self) -> np.ndarray:
        """[G] total rewards."""
        return np.array([s.reward for s in self.samples], dtype=np.float64)

    @property
    def advantages(self) -> np.ndarray:
        """[G] stored advantages."""
        return np.array([s.advantage for s in self.samples], dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class MiniBatch:
    """A sampled mini-batch of whole groups.

    ``staleness_histogram``: {version_now - group version: number of groups}. ``replay_fraction``: share of groups
    that had been used before (0 when empty).
    """

    groups: list[Group]
    num_fresh: int
    num_replay: int
    replay_fraction: float
    staleness_histogram: dict[int, int]

    @property
    def num_samples(self) -> int:
        return sum(g.size for g in self.groups)


class TrajectoryBuffer:
    """Buffer of whole groups with staleness / use-count eviction and fresh + replay mini-batch sampling."""

    def __init__(self, config: BufferConfig | None = None):
        self.config = config or BufferConfig()
        self._groups: list[Group] = []  # insertion order, oldest first
        self.dropped: dict[str, int] = {"stale": 0, "used": 0, "capacity": 0}

    # -- insertion / eviction -----------------------------------------------------------------------------------------
    def add(self, group: Group, *, step: int) -> None:
        """Insert a complete group at ``step`` (use count 0). Drops the oldest groups beyond ``capacity_groups``."""
        if not group.samples:
            raise ValueError(f"group {group.group_id!r} has no samples")
        if self.config.group_size is not None and group.size != self.config.group_size:
            raise ValueError(
                f"group {group.group_id!r} has {group.size} samples but --buffer.group-size is "
                f"{self.config.group_size}; the buffer only takes complete groups"
            )
        if any(g.group_id == group.group_id for g in self._groups):
            raise ValueError(f"group id {group.group_id!r} is already in the buffer")
        group.insert_step = int(step)
        group.use_count = 0
        self._groups.append(group)
        while len(self._groups) > self.config.capacity_groups:
            self._groups.pop(0)
            self.dropped["capacity"] += 1

    def evict(self, version_now: int) -> dict[str, int]:
        """Drop groups older than ``max_staleness`` versions or used ``max_uses`` times; returns counts by reason."""
        stale = used = 0
        keep = []
        for g in self._groups:
            if version_now - g.policy_version > self.config.max_staleness:
                stale += 1
            elif g.use_count >= self.config.max_uses:
                used += 1
            else:
                keep.append(g)
        self._groups = keep
        self.dropped["stale"] += stale
        self.dropped["used"] += used
        return {"stale": stale, "used": used}

    # -- sampling -----------------------------------------------------------------------------------------------------
    def sample_minibatch(
        self,
        num_groups: int,
        *,
        version_now: int,
        rng: np.random.Generator,
        fresh_fraction: float | None | str = "config",
    ) -> MiniBatch:
        """Take up to ``num_groups`` groups, mixing fresh (never used) and replayed ones; increments their use counts.

        Stale groups are evicted first. ``fresh_fraction``: share of fresh groups (rounded; the other pool
        back-fills when one runs short); ``None``: all fresh groups first (oldest first), replayed ones fill the
        rest; default: ``config.fresh_fraction``. Replayed groups are drawn uniformly with ``rng``. Groups that reach
        ``max_uses`` are dropped after being handed out. Returns fewer groups only if the buffer holds fewer.
        """
        if num_groups < 0:
            raise ValueError(f"num_groups must be >= 0, got {num_groups}")
        frac = self.config.fresh_fraction if fresh_fraction == "config" else fresh_fraction
        self.evict(version_now)
        fresh = [g for g in self._groups if g.use_count == 0]
        replay = [g for g in self._groups if g.use_count > 0]
        n = min(num_groups, len(fresh) + len(replay))
        n_fresh = min(n, len(fresh)) if frac is None else min(int(round(float(frac) * n)), len(fresh))  # type: ignore
        n_replay = min(n - n_fresh, len(replay))
        n_fresh = n - n_replay  # back-fill with fresh groups when replay runs short
        chosen = fresh[:n_fresh]
        if n_replay:
            chosen += [replay[i] for i in sorted(rng.choice(len(replay), size=n_replay, replace=False))]
        hist: dict[int, int] = {}
        for g in chosen:
            s = version_now - g.policy_version
            hist[s] = hist.get(s, 0) + 1
            g.use_count += 1
        self.evict(version_now)  # groups that just reached max_uses
        return MiniBatch(
            groups=chosen,
            num_fresh=n_fresh,
            num_replay=n_replay,
            replay_fraction=n_replay / n if n else 0.0,
            staleness_histogram=dict(sorted(hist.items())),
        )

    # -- inspection ---------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._groups)

    @property
    def groups(self) -> list[Group]:
        """The buffered groups, oldest first (do not mutate)."""
        return list(self._groups)

    @property
    def num_samples(self) -> int:
        return sum(g.size for g in self._groups)

    def stats(self, version_now: int) -> dict[str, Any]:
        """Buffer health: groups, samples, fresh groups, staleness and use-count histograms, drop counters."""
        stale_hist: dict[int, int] = {}
        use_hist: dict[int, int] = {}
        for g in self._groups:
            s = version_now - g.policy_version
            stale_hist[s] = stale_hist.get(s, 0) + 1
            use_hist[g.use_count] = use_hist.get(g.use_count, 0) + 1
        return {
            "groups": len(self._groups),
            "samples": self.num_samples,
            "fresh_groups": sum(1 for g in self._groups if g.use_count == 0),
            "staleness_histogram": dict(sorted(stale_hist.items())),
            "use_count_histogram": dict(sorted(use_hist.items())),
            "dropped": dict(self.dropped),
        }

    # -- checkpointing ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Exact state as flat numpy arrays plus a JSON string of metadata (Orbax/np.savez friendly).

        Arrays: ``prompt_tokens`` / ``response_tokens`` (int32, concatenated over samples), ``loss_mask`` (bool),
        ``behaviour_logp`` (float32), ``prompt_lengths`` / ``response_lengths`` (int64, one per sample).
        ``meta_json``: groups (ids, task, insert step, use count, per-sample scalars), drop counters.
        """
        samples = [s for g in self._groups for s in g.samples]

        def cat(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
            return np.concatenate(arrays).astype(dtype) if arrays else np.zeros((0,), dtype)

        meta = {
            "version": _STATE_VERSION,
            "dropped": self.dropped,
            "groups": [
                {
                    "group_id": g.group_id,
                    "prompt_id": g.prompt_id,
                    "task": g.task,
                    "insert_step": g.insert_step,
                    "use_count": g.use_count,
                    "samples": [
                        {
                            "reward": s.reward,
                            "policy_version": s.policy_version,
                            "rewards": s.rewards,
                            "verifier_status": s.verifier_status,
                            "finish_reason": s.finish_reason,
                            "advantage": s.advantage,
                            "sampling": s.sampling,
                        }
                        for s in g.samples
                    ],
                }
                for g in self._groups
            ],
        }
        return {
            "meta_json": json.dumps(meta),
            "prompt_tokens": cat([s.prompt_tokens for s in samples], np.int32),
            "response_tokens": cat([s.response_tokens for s in samples], np.int32),
            "loss_mask": cat([s.loss_mask for s in samples], bool),
            "behaviour_logp": cat([s.behaviour_logp for s in samples], np.float32),
            "prompt_lengths": np.array([s.prompt_tokens.shape[0] for s in samples], dtype=np.int64),
            "response_lengths": np.array([s.response_tokens.shape[0] for s in samples], dtype=np.int64),
        }

    # Orbax checkpoints: arrays in the "state" item, metadata and sizes in the JSON "extra" item. Each array gets one
    # trailing element: zero-length arrays do not round-trip through every storage backend.
    def checkpoint_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays for the checkpoint's array item, JSON metadata for its extra item)."""
        state = self.state_dict()
        arrays = {k: np.concatenate([state[k], np.zeros((1,), dt)]) for k, dt in ARRAY_DTYPES.items()}
        return arrays, {"meta_json": state["meta_json"], "sizes": {k: int(state[k].shape[0]) for k in ARRAY_DTYPES}}

    @staticmethod
    def abstract_checkpoint_arrays(meta: dict[str, Any], sharding: Any) -> dict[str, Any]:
        """Restore targets (ShapeDtypeStructs placed by ``sharding``) of the arrays :meth:`checkpoint_arrays` saved."""
        import jax

        return {k: jax.ShapeDtypeStruct((meta["sizes"][k] + 1,), dt, sharding=sharding)
                for k, dt in ARRAY_DTYPES.items()}

    def load_checkpoint(self, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
        self.load_state_dict({"meta_json": meta["meta_json"], **{k: np.asarray(v)[:-1] for k, v in arrays.items()}})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state written by :meth:`state_dict` (replaces the buffer's contents)."""
        meta_raw = state["meta_json"]
        if isinstance(meta_raw, np.ndarray):
            meta_raw = meta_raw.item()
        if isinstance(meta_raw, bytes):
            meta_raw = meta_raw.decode("utf-8")
        meta = json.loads(meta_raw)
        if meta.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported TrajectoryBuffer state version {meta.get('version')!r}")
        p_len = np.asarray(state["prompt_lengths"], dtype=np.int64)
        r_len = np.asarray(state["response_lengths"], dtype=np.int64)
        p_off = np.concatenate([[0], np.cumsum(p_len)])
        r_off = np.concatenate([[0], np.cumsum(r_len)])
        arrays = {k: np.asarray(state[k]) for k in ("prompt_tokens", "response_tokens", "loss_mask", "behaviour_logp")}
        groups: list[Group] = []
        i = 0
        for gm in meta["groups"]:
            samples = []
            for sm in gm["samples"]:
                rs, re_ = r_off[i], r_off[i + 1]
                samples.append(
                    Trajectory(
                        prompt_tokens=arrays["prompt_tokens"][p_off[i] : p_off[i + 1]].copy(),
                        response_tokens=arrays["response_tokens"][rs:re_].copy(),
                        loss_mask=arrays["loss_mask"][rs:re_].copy(),
                        behaviour_logp=arrays["behaviour_logp"][rs:re_].copy(),
                        reward=sm["reward"],
                        policy_version=sm["policy_version"],
                        rewards=dict(sm["rewards"]),
                        verifier_status=sm["verifier_status"],
                        finish_reason=sm["finish_reason"],
                        advantage=sm["advantage"],
                        sampling=dict(sm["sampling"]),
                    )
                )
                i += 1
            groups.append(Group(gm["group_id"], gm["prompt_id"], gm["task"], samples, gm["insert_step"],
                                gm["use_count"]))
        if i != len(p_len):
            raise ValueError(f"buffer state is inconsistent: {len(p_len)} samples in arrays, {i} in metadata")
        self._groups = groups
        self.dropped = {k: int(v) for k, v in meta["dropped"].items()}


def collate(
    groups: Sequence[Group],
    max_len: int,
    pad_id: int,
    *,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Pad whole groups into fixed-shape arrays for a jitted update (next-token convention).

    Each sample becomes one row ``tokens = prompt + response`` (right-padded with ``pad_id`` to ``max_len`` = T).
    Per-token arrays are aligned with ``targets`` (``targets[t] = tokens[t + 1]``), i.e. with the logits the model
    produces at position t: the log-prob of response token j sits at position ``P - 1 + j``. ``batch_size`` pads the
    batch with empty rows (all-zero mask, ``sample_valid`` False) to a fixed B; default B = number of samples.

    Returns (B = rows, T = max_len):
      tokens [B, T] int32, targets [B, T] int32, positions [B, T] int32 (0..len-1, 0 on padding),
      segment_ids [B, T] int32 (1 on real tokens, 0 on padding), loss_mask [B, T] float32 (aligned with targets),
      behaviour_logp [B, T] float32 (aligned with targets, 0 where masked out), advantages [B] float32,
      rewards [B] float32, prompt_lengths / response_lengths [B] int32, policy_versions [B] int32,
      group_index [B] int32 (index of the group in ``groups``, -1 on padding rows), sample_valid [B] bool.
    Raises ValueError if a sequence does not fit in ``max_len`` or ``batch_size`` is too small.
    """
    samples = [(gi, s) for gi, g in enumerate(groups) for s in g.samples]
    b = len(samples) if batch_size is None else batch_size
    if b < len(samples):
        raise ValueError(f"batch_size={batch_size} is smaller than the {len(samples)} samples of the groups")
    t = max_len
    out = {
        "tokens": np.full((b, t), pad_id, np.int32),
        "targets": np.full((b, t), pad_id, np.int32),
        "positions": np.zeros((b, t), np.int32),
        "segment_ids": np.zeros((b, t), np.int32),
        "loss_mask": np.zeros((b, t), np.float32),
        "behaviour_logp": np.zeros((b, t), np.float32),
        "advantages": np.zeros((b,), np.float32),
        "rewards": np.zeros((b,), np.float32),
        "prompt_lengths": np.zeros((b,), np.int32),
        "response_lengths": np.zeros((b,), np.int32),
        "policy_versions": np.zeros((b,), np.int32),
        "group_index": np.full((b,), -1, np.int32),
        "sample_valid": np.zeros((b,), bool),
    }
    for row, (gi, s) in enumerate(samples):
        p, r = s.prompt_tokens.shape[0], s.response_tokens.shape[0]
        if p == 0:
            raise ValueError(f"group {groups[gi].group_id!r} has a sample with an empty prompt")
        n = p + r
        if n > t:
            raise ValueError(
                f"a sample of group {groups[gi].group_id!r} has {p} prompt + {r} response tokens > max_len={t}; "
                "raise max_len (prompt budget + response budget)"
            )
        seq = np.concatenate([s.prompt_tokens, s.response_tokens])
        out["tokens"][row, :n] = seq
        out["targets"][row, : n - 1] = seq[1:]
        out["positions"][row, :n] = np.arange(n, dtype=np.int32)
        out["segment_ids"][row, :n] = 1
        out["loss_mask"][row, p - 1 : n - 1] = s.loss_mask
        out["behaviour_logp"][row, p - 1 : n - 1] = np.where(s.loss_mask, s.behaviour_logp, 0.0)
        out["advantages"][row] = s.advantage
        out["rewards"][row] = s.reward
        out["prompt_lengths"][row] = p
        out["response_lengths"][row] = r
        out["policy_versions"][row] = s.policy_version
        out["group_index"][row] = gi
        out["sample_valid"][row] = True
    return out
