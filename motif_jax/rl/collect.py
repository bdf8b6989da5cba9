"""Rollout collection of one RL round: select prompts -> generate G responses each -> verify -> track pass rates ->
admit groups in the band -> group advantages -> into the buffer, until the round's fresh groups are in.

:class:`RolloutCollector` holds the prompt pool (records and their tokens), the difficulty tracker and the
verifiers; :meth:`RolloutCollector.collect` runs one round's generation calls (each one compiled shape:
``prompts_per_call x group_size`` rows, prompts left-padded to ``max_prompt_len``) and returns a
:class:`RoundRollouts`; :func:`rollout_metrics` turns that into the round's metrics (a pure function).

Selection is difficulty-aware and happens before generation: prompts in the band and unseen ones first, prompts
whose tracked pass rate says too easy or too hard only as rare revisits (``difficulty.revisit_prob``), so known
out-of-band prompts cost no rollouts; uniform without ``band_filter``. Calls repeat until ``fresh_groups`` new groups
are in the buffer or ``oversample_factor`` x that many prompts were tried (DAPO's dynamic sampling, capped). Groups
the band admits beyond the round's quota are not thrown away: they enter the buffer as fresh groups and count
toward the next round's quota ("carried over").
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from motif_jax.data.tokenizer import Tokenizer
from motif_jax.model.generate import SamplingConfig
from motif_jax.rl.buffer import Group, TrajectoryBuffer
from motif_jax.rl.config import RLConfig
from motif_jax.rl.difficulty import DifficultyTracker, admit_group, group_pass_rate
from motif_jax.rl.objective import group_advantages, zero_std_groups
from motif_jax.rl.engines import RolloutEngine
from motif_jax.rl.engines.jax_engine import call_seed
from motif_jax.rl.rollout import RolloutStats, score_groups
from motif_jax.rl.verifiers import Verifier

__all__ = ["RolloutCollector", "RoundRollouts", "rollout_metrics"]


@dataclasses.dataclass
class RoundRollouts:
    """What one round's generation produced: every scored group, and how many were admitted / dropped."""

    generated: list[Group] = dataclasses.field(default_factory=list)
    admitted: int = 0
    carried_over: int = 0  # admitted after the round's quota was full: kept fresh for the next round
    selected: dict[str, int] = dataclasses.field(default_factory=dict)  # selected prompts by band before generation
    calls: int = 0
    filled: bool = False  # the round's fresh groups were all admitted
    stats: RolloutStats = dataclasses.field(default_factory=RolloutStats)
    time_generate_s: float = 0.0
    time_verify_s: float = 0.0


class RolloutCollector:
    """Prompt pool + difficulty tracker + verifiers of a run; see the module docstring."""

    def __init__(self, cfg: RLConfig, pool: Sequence[Mapping[str, Any]], pool_tokens: Sequence[Sequence[int]],
                 tokenizer: Tokenizer, verifiers: Mapping[str, Verifier], sampling: SamplingConfig):
        self.cfg = cfg
        self.pool = list(pool)
        self.pool_tokens = list(pool_tokens)
        self.pool_ids = [str(r["id"]) for r in self.pool]
        self.by_id = {pid: i for i, pid in enumerate(self.pool_ids)}
        self.tokenizer = tokenizer
        self.verifiers = dict(verifiers)
        self.sampling = sampling
        self.tracker = DifficultyTracker(cfg.difficulty)
        for rec in self.pool:  # pass rates measured offline (scripts/prefilter_prompts.py)
            pre = rec.get("prefilter")
            if isinstance(pre, Mapping) and pre.get("attempts"):
                s, a = int(pre["successes"]), int(pre["attempts"])
                self.tracker.update(rec["id"], [1.0] * s + [0.0] * (a - s), step=-1)
        ob = cfg.objective
        self.overlong = ((ob.max_response_len or cfg.rollout.max_new_tokens, ob.overlong_buffer, ob.overlong_factor)
                         if ob.overlong_buffer > 0 else None)

    def select(self, k: int, rng: np.random.Generator) -> list[str]:
        """``k`` prompt ids: by difficulty (``band_filter``) or uniformly; repeated when the pool is smaller."""
        if self.cfg.band_filter:
            ids = [str(i) for i in self.tracker.select(self.pool_ids, k, rng)]
        else:
            n = min(k, len(self.pool_ids))
            ids = [self.pool_ids[i] for i in rng.choice(len(self.pool_ids), size=n, replace=False)]
        while len(ids) < k:  # a pool smaller than a generation call: repeat prompts (fixed compiled shape)
            ids.append(ids[len(ids) % max(len(ids), 1)])
        return ids

    def admit(self, group: Group) -> bool:
        """Zero-spread groups carry no signal (dropped); with the band filter, the group's pass rate must be in it."""
        if self.cfg.objective.drop_zero_std_groups and bool(zero_std_groups(group.rewards[None])[0]):
            return False
        return admit_group(group.rewards, self.cfg.difficulty) if self.cfg.band_filter else True

    def collect(self, engine: RolloutEngine, buffer: TrajectoryBuffer, *, round_index: int, version: int,
                rng: np.random.Generator) -> RoundRollouts:
        """Generation calls of ``engine`` until the round's fresh groups are admitted (or the over-generation cap);
        admitted groups get their advantages and enter ``buffer``."""
        cfg, ob = self.cfg, self.cfg.objective
        buffer.evict(version)
        fresh_now = sum(1 for g in buffer.groups if g.use_count == 0)
        need = max(cfg.fresh_groups - fresh_now, 0)
        k = cfg.prompts_per_call
        cap = max(math.ceil(cfg.difficulty.oversample_factor * cfg.fresh_groups), k)
        out = RoundRollouts()
        info = {"temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p,
                "max_new_tokens": cfg.rollout.max_new_tokens}
        tried = 0
        while need > 0 and tried < cap:
            ids = self.select(k, rng)
            for band in (self.tracker.band(i) for i in ids):
                out.selected[band] = out.selected.get(band, 0) + 1
            self.tracker.mark_sampled(ids, step=round_index)
            recs = [self.pool[self.by_id[i]] for i in ids]
            toks = [self.pool_tokens[self.by_id[i]] for i in ids]
            t0 = time.time()
            gen = engine.generate(toks, cfg.rollout.group_size, self.sampling,
                                  seed=call_seed(cfg.seed, round_index, out.calls))
            t1 = time.time()
            groups, stats = score_groups(
                recs, toks, gen, group_size=cfg.rollout.group_size, tokenizer=self.tokenizer,
                verifiers=self.verifiers, version=version,
                group_ids=[f"r{round_index}c{out.calls}g{i}" for i in range(k)],
                reward_weights=cfg.reward_weights, overlong=self.overlong, sampling_info=info)
            out.time_generate_s += t1 - t0
            out.time_verify_s += time.time() - t1
            out.stats.add(stats)
            out.calls += 1
            tried += k
            for g in groups:
                self.tracker.update(g.prompt_id, g.rewards, step=round_index)
                out.generated.append(g)
                if not self.admit(g):
                    continue
                if need <= 0:
                    out.carried_over += 1
                adv = group_advantages(g.rewards[None], normalize_std=ob.normalize_std, eps=ob.adv_eps,
                                       ddof=ob.adv_std_ddof)[0]
                for sample, a in zip(g.samples, adv):
                    sample.advantage = float(a)
                buffer.add(g, step=round_index)
                out.admitted += 1
                need -= 1
        out.filled = need <= 0
        return out


def rollout_metrics(r: RoundRollouts, *, success_threshold: float,
                    band_counts: Mapping[str, int]) -> dict[str, float]:
    """The round's rollout metrics: counts, admission, rewards and pass rates (overall and per task), response
    lengths, truncation, verifier statuses, zero-spread groups, timings, and the pool's prompts per band."""
    gen, n = r.generated, max(r.stats.samples, 1)
    m: dict[str, float] = {
        "rollouts_round": float(r.stats.samples),
        "generation_calls": float(r.calls),
        "groups_generated": float(len(gen)),
        "groups_admitted": float(r.admitted),
        "groups_carried_over": float(r.carried_over),
        "rollouts_per_admitted_group": r.stats.samples / r.admitted if r.admitted else float(r.stats.samples),
        "batch_filled": float(r.filled),
        "time_generate_s": r.time_generate_s,
        "time_verify_s": r.time_verify_s,
    }
    if gen:  # a round whose fresh quota was met by carried-over groups generates nothing: no sample statistics
        m |= {
            "admit_rate": r.admitted / len(gen),
            "reward_mean": float(np.mean([s.reward for g in gen for s in g.samples])),
            "pass_rate": float(np.mean([group_pass_rate(g.rewards, success_threshold) for g in gen])),
            "response_length_mean": r.stats.length_sum / n,
            "response_length_max": float(r.stats.length_max),
            "truncation_rate": r.stats.truncated / n,
            "zero_std_group_frac": float(np.mean(zero_std_groups(np.stack([g.rewards for g in gen])))),
        }
    for status, count in r.stats.status.items():
        m[f"verifier_{status}_frac"] = count / n
    by_task: dict[str, list[Group]] = {}
    for g in gen:
        by_task.setdefault(g.task, []).append(g)
    for task, gs in by_task.items():
        m[f"reward/{task}"] = float(np.mean([s.reward for g in gs for s in g.samples]))
        m[f"pass_rate/{task}"] = float(np.mean([group_pass_rate(g.rewards, success_threshold) for g in gs]))
    for band, count in band_counts.items():
        m[f"prompts_{band}"] = float(count)
    for band, count in r.selected.items():  # out-of-band prompts generated (revisits), next to the ones chosen
        m[f"selected_{band}"] = float(count)
    return m
