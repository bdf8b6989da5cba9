"""Rollouts: G sampled responses per prompt from the current policy, scored by the verifiers, as buffer groups.

A rollout engine (``motif_jax.rl.engines``) samples the responses; each keeps its behaviour log-probs (under
softmax(logits / temperature), exactly what the trainer recomputes), the policy version that sampled it and its
finish reason (``eos``: a stop token, ``length``: truncated at ``max_new_tokens``). :func:`score_groups` decodes the responses, runs the verifiers that
apply to each prompt record, combines them into the multi-task reward (``verifiers.score_response``), adds the
optional DAPO soft overlong penalty and returns :class:`~motif_jax.rl.buffer.Group` objects (advantages are set
later, only for admitted groups).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from motif_jax.data.template import prompt_messages, render_prompt, response_text
from motif_jax.data.tokenizer import Tokenizer
from motif_jax.model.generate import FINISH_LENGTH, Generation, SamplingConfig
from motif_jax.rl.buffer import Group, Trajectory
from motif_jax.rl.engines.base import RolloutEngine
from motif_jax.parallel.hosts import allgather_objects, process_slice
from motif_jax.rl.verifiers import CombinedReward, Verifier, overlong_penalty, score_response

__all__ = ["FINISH_NAMES", "RolloutStats", "measure_pass_rates", "prompt_tokens", "response_text", "score_groups"]

FINISH_NAMES = {0: "eos", FINISH_LENGTH: "length"}


def prompt_tokens(record: Mapping[str, Any], tokenizer: Tokenizer) -> list[int]:
    """The generation prompt of a record: its messages up to the last assistant turn, rendered as in training."""
    return render_prompt(prompt_messages(record["messages"]), tokenizer)


@dataclasses.dataclass
class RolloutStats:
    """Per-call counters (summed over a round by the loop)."""

    samples: int = 0
    truncated: int = 0
    length_sum: int = 0
    length_max: int = 0
    status: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, other: "RolloutStats") -> None:
        self.samples += other.samples
        self.truncated += other.truncated
        self.length_sum += other.length_sum
        self.length_max = max(self.length_max, other.length_max)
        for k, v in other.status.items():
            self.status[k] = self.status.get(k, 0) + v


def score_groups(
    records: Sequence[Mapping[str, Any]],
    prompts: Sequence[Sequence[int]],
    gen: Generation,
    *,
    group_size: int,
    tokenizer: Tokenizer,
    verifiers: Mapping[str, Verifier],
    version: int,
    group_ids: Sequence[str],
    reward_weights: Mapping[str, float] | None = None,
    overlong: tuple[int, int, float] | None = None,
    sampling_info: Mapping[str, Any] | None = None,
    workers: int = 1,
) -> tuple[list[Group], RolloutStats]:
    """Turns a generation of ``len(records) * G`` rows into scored groups (one per record, in order).

    ``overlong``: ``(max_len, buffer_len, factor)`` of the DAPO soft overlong penalty added to each total reward
    (None: off). ``workers`` > 1 verifies in a thread pool (useful for code tests, which wait on sandboxes). With
    several processes, each verifies its contiguous share of the rows and every process gets every result.
    A sample whose record has no applying verifier gets reward 0 and status ``no_verifier``.
    """
    n = len(records)
    if gen.tokens.shape[0] != n * group_size or len(prompts) != n or len(group_ids) != n:
        raise ValueError(f"{n} records x G={group_size} do not match {gen.tokens.shape[0]} generated rows")
    seqs = gen.sequences()
    texts = [response_text(s, tokenizer) for s in seqs]
    rows = [(i // group_size, i) for i in range(n * group_size)]

    def verify(item: tuple[int, int]):
        rec, row = item
        return score_response(records[rec], texts[row], verifiers, reward_weights)

    mine = rows[process_slice(len(rows))]  # with several processes each verifies its share, then all share all
    if workers > 1:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            scored = list(pool.map(verify, mine))
    else:
        scored = [verify(r) for r in mine]
    if jax.process_count() > 1:
        parts = allgather_objects([dataclasses.asdict(c) for c in scored])
        scored = [CombinedReward(**c) for part in parts for c in part]

    stats = RolloutStats()
    info = dict(sampling_info or {})
    groups = []
    for i, rec in enumerate(records):
        samples = []
        for j in range(group_size):
            row = i * group_size + j
            length = int(gen.lengths[row])
            finish = FINISH_NAMES.get(int(gen.finish_reason[row]), str(int(gen.finish_reason[row])))
            comb = scored[row]
            reward = float(comb.total)
            if overlong is not None:
                reward += float(overlong_penalty(length, overlong[0], overlong[1], overlong[2]))
            samples.append(
                Trajectory(
                    prompt_tokens=np.asarray(prompts[i], np.int32),
                    response_tokens=gen.tokens[row, :length],
                    loss_mask=np.ones((length,), bool),
                    behaviour_logp=gen.logprobs[row, :length],
                    reward=reward,
                    policy_version=version,
                    rewards=dict(comb.components),
                    verifier_status=comb.status,
                    finish_reason=finish,
                    sampling=info,
                )
            )
            stats.samples += 1
            stats.truncated += finish == "length"
            stats.length_sum += length
            stats.length_max = max(stats.length_max, length)
            stats.status[comb.status] = stats.status.get(comb.status, 0) + 1
        groups.append(Group(group_ids[i], str(rec["id"]), str(rec.get("task", "default")), samples))
    return groups, stats



def measure_pass_rates(
    engine: RolloutEngine,
    records: Sequence[Mapping[str, Any]],
    prompts: Sequence[Sequence[int]],
    *,
    samples: int,
    sampling: SamplingConfig,
    tokenizer: Tokenizer,
    verifiers: Mapping[str, Verifier],
    seed: int = 0,
    batch_prompts: int = 32,
    success_threshold: float = 0.5,
    reward_weights: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Offline difficulty measurement: ``samples`` responses per prompt, scored like rollouts.

    Returns one dict per record (same order): ``attempts``, ``successes`` (reward >= ``success_threshold``),
    ``pass_rate``, ``reward_mean``, ``truncated``. Prompts go in calls of ``batch_prompts`` (the last call is
    padded by repeating prompts, so one shape is compiled).
    """
    out: list[dict[str, Any]] = []
    for start in range(0, len(records), batch_prompts):
        recs = list(records[start:start + batch_prompts])
        toks = [list(p) for p in prompts[start:start + batch_prompts]]
        n = len(recs)
        recs += [recs[i % n] for i in range(batch_prompts - n)]
        toks += [toks[i % n] for i in range(batch_prompts - n)]
        gen = engine.generate(toks, samples, sampling, seed=seed + start)
        groups, _ = score_groups(recs, toks, gen, group_size=samples, tokenizer=tokenizer, verifiers=verifiers,
                                 version=0, group_ids=[str(i) for i in range(len(recs))],
                                 reward_weights=reward_weights)
        for g in groups[:n]:
            r = g.rewards
            succ = int(np.sum(r >= success_threshold))
            out.append({"attempts": int(r.size), "successes": succ, "pass_rate": succ / r.size,
                        "reward_mean": float(r.mean()),
                        "truncated": int(sum(s.finish_reason == "length" for s in g.samples))})
    return out
