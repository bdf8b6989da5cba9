"""Difficulty-aware prompt filtering: per-prompt pass-rate statistics, band admission and prompt selection.

The learning signal of a group scales with p (1 - p) for pass rate p, so prompts the current policy always or never
solves teach nothing. :class:`DifficultyTracker` keeps, per prompt, the number of attempts and successes, the latest
group's pass rate and a moving average, and classifies each prompt as ``unseen`` / ``too_easy`` / ``in_band`` /
``too_hard`` against the band [p_lo, p_hi] of :class:`~motif_jax.rl.config.DifficultyConfig`.
:meth:`DifficultyTracker.select` prefers in-band and unseen prompts and revisits retired ones with a small
probability; :func:`admit_group` decides whether one freshly generated group goes to training.

Prompt ids are strings (other hashables are converted with ``str``) so the state is plain JSON.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, Hashable, Literal

import numpy as np

from motif_jax.rl.config import DifficultyConfig

__all__ = ["BandStatus", "DifficultyTracker", "PromptStats", "admit_group", "band_of", "group_pass_rate",
           "is_binary"]

BandStatus = Literal["unseen", "too_easy", "in_band", "too_hard"]
BAND_STATUSES: tuple[BandStatus, ...] = ("unseen", "too_easy", "in_band", "too_hard")


def is_binary(rewards: np.ndarray, atol: float = 1e-6) -> bool:
    """True if every reward is (numerically) 0 or 1."""
    r = np.asarray(rewards, dtype=np.float64)
    return bool(np.all(np.isclose(r, 0.0, atol=atol) | np.isclose(r, 1.0, atol=atol)))


def group_pass_rate(rewards: Sequence[float] | np.ndarray, success_threshold: float = 0.5) -> float:
    """Fraction of a group's responses with reward >= ``success_threshold``. rewards: [G]."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if r.size == 0:
        raise ValueError("empty group")
    return float(np.mean(r >= success_threshold))


def band_of(pass_rate: float | None, p_lo: float, p_hi: float) -> BandStatus:
    """Band status of a pass rate (None: unseen); the band [p_lo, p_hi] is inclusive."""
    if pass_rate is None:
        return "unseen"
    if pass_rate > p_hi:
        return "too_easy"
    if pass_rate < p_lo:
        return "too_hard"
    return "in_band"


def admit_group(rewards: Sequence[float] | np.ndarray, config: DifficultyConfig) -> bool:
    """Whether a freshly generated group is used for training.

    rewards: [G] total rewards of the group. Binary rewards: admitted iff the group's pass rate is in [p_lo, p_hi].
    Non-binary rewards: admitted iff the reward std exceeds ``tau`` (a group with spread carries signal).
    """
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if r.size == 0:
        return False
    if is_binary(r):
        return band_of(group_pass_rate(r, config.success_threshold), config.p_lo, config.p_hi) == "in_band"
    return bool(np.std(r) > config.tau)


@dataclasses.dataclass
class PromptStats:
    """Running statistics of one prompt. Pass rates are None until the prompt has been attempted."""

    attempts: int = 0
    successes: int = 0
    last_pass_rate: float | None = None
    ema_pass_rate: float | None = None
    last_sampled_step: int = -1
    last_updated_step: int = -1

    @property
    def pass_rate(self) -> float | None:
        """Lifetime pass rate successes / attempts."""
        return self.successes / self.attempts if self.attempts else None


class DifficultyTracker:
    """Per-prompt pass-rate tracker with band classification and a difficulty-aware prompt selector."""

    def __init__(self, config: DifficultyConfig | None = None):
        self.config = config or DifficultyConfig()
        self._stats: dict[str, PromptStats] = {}

    # -- statistics ---------------------------------------------------------------------------------------------------
    def update(self, prompt_id: Hashable, rewards: Sequence[float] | np.ndarray, *, step: int) -> BandStatus:
        """Record one group of rewards ([G]) for ``prompt_id`` at ``step``; returns the prompt's new band status."""
        r = np.asarray(rewards, dtype=np.float64).reshape(-1)
        if r.size == 0:
            raise ValueError(f"empty reward group for prompt {prompt_id!r}")
        s = self._stats.setdefault(str(prompt_id), PromptStats())
        succ = int(np.sum(r >= self.config.success_threshold))
        p = succ / r.size
        s.attempts += int(r.size)
        s.successes += succ
        s.last_pass_rate = p
        a = self.config.ema_weight
        s.ema_pass_rate = p if s.ema_pass_rate is None else (1.0 - a) * s.ema_pass_rate + a * p
        s.last_updated_step = int(step)
        return self.band(prompt_id)

    def mark_sampled(self, prompt_ids: Iterable[Hashable], *, step: int) -> None:
        """Record that these prompts were sent to the sampler at ``step``."""
        for pid in prompt_ids:
            self._stats.setdefault(str(pid), PromptStats()).last_sampled_step = int(step)

    def stats(self, prompt_id: Hashable) -> PromptStats:
        """The statistics of a prompt (a fresh, unseen record if it has none)."""
        return self._stats.get(str(prompt_id), PromptStats())

    def pass_rate(self, prompt_id: Hashable) -> float | None:
        """The estimate that decides the band (``config.band_statistic``: EMA or latest group); None if unseen."""
        s = self._stats.get(str(prompt_id))
        if s is None or s.attempts == 0:
            return None
        return s.ema_pass_rate if self.config.band_statistic == "ema" else s.last_pass_rate

    def band(self, prompt_id: Hashable) -> BandStatus:
        """``unseen`` until ``min_attempts`` responses were scored, then the band of :meth:`pass_rate`."""
        s = self._stats.get(str(prompt_id))
        if s is None or s.attempts < self.config.min_attempts:
            return "unseen"
        return band_of(self.pass_rate(prompt_id), self.config.p_lo, self.config.p_hi)

    def band_counts(self, prompt_ids: Iterable[Hashable] | None = None) -> dict[str, int]:
        """Number of prompts per band status, over ``prompt_ids`` (default: every tracked prompt)."""
        ids = self._stats.keys() if prompt_ids is None else (str(p) for p in prompt_ids)
        counts = {b: 0 for b in BAND_STATUSES}
        for pid in ids:
            counts[self.band(pid)] += 1
        return counts

    def __len__(self) -> int:
        return len(self._stats)

    # -- selection ----------------------------------------------------------------------------------------------------
    def select(self, candidates: Sequence[Hashable], k: int, rng: np.random.Generator) -> list[Hashable]:
        """Pick ``k`` distinct prompts from ``candidates`` (fewer only if there are fewer candidates).

        Each slot goes to a retired prompt (too easy / too hard) with probability ``revisit_prob`` and otherwise to
        a preferred prompt (in band or unseen); when one pool runs out the other fills in. Uniform within a pool,
        deterministic for a given ``rng`` state and candidate order. Returns the candidates themselves (not strings).
        """
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        preferred, retired = [], []
        for i, c in enumerate(candidates):
            (preferred if self.band(c) in ("in_band", "unseen") else retired).append(i)
        k = min(k, len(preferred) + len(retired))
        n_retired = int(rng.binomial(k, self.config.revisit_prob)) if k else 0
        n_retired = min(n_retired, len(retired))
        n_pref = min(k - n_retired, len(preferred))
        n_retired = k - n_pref  # back-fill from the retired pool when preferred prompts run out
        picked: list[int] = []
        if n_pref:
            picked += [preferred[i] for i in rng.choice(len(preferred), size=n_pref, replace=False)]
        if n_retired:
            picked += [retired[i] for i in rng.choice(len(retired), size=n_retired, replace=False)]
        order = rng.permutation(len(picked))
        return [candidates[picked[i]] for i in order]

    # -- checkpointing ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state (dicts, lists, ints, floats, None)."""
        return {
            "version": 1,
            "prompts": {pid: dataclasses.asdict(s) for pid, s in self._stats.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state written by :meth:`state_dict` (replaces the current statistics)."""
        if state.get("version") != 1:
            raise ValueError(f"unsupported DifficultyTracker state version {state.get('version')!r}")
        self._stats = {str(pid): PromptStats(**fields) for pid, fields in state["prompts"].items()}
