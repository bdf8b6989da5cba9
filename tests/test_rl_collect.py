"""The rollout phase's band: choose prompts before generation by their tracked pass rate, and never throw away a
group the band admits while the buffer has room (groups past the round's quota are carried over as fresh)."""

from __future__ import annotations

import dataclasses

import numpy as np

from motif_jax.data.prompts import load_prompt_records
from motif_jax.data.tokenizer import ByteTokenizer
from motif_jax.model.generate import SamplingConfig
from motif_jax.rl.buffer import TrajectoryBuffer
from motif_jax.rl.collect import RolloutCollector, rollout_metrics
from motif_jax.rl.config import BufferConfig, DifficultyConfig, RLConfig, RolloutConfig, UpdateConfig
from motif_jax.rl.engines.base import Rollouts
from motif_jax.rl.rollout import prompt_tokens
from motif_jax.rl.verifiers import VerifierResult


@dataclasses.dataclass(frozen=True)
class EvenRowsSucceed:
    """Reward 1 for responses that say "yes": the fake engine below answers "yes" on even rows."""

    name: str = "yes"

    def applies(self, record) -> bool:
        return True

    def __call__(self, record, response: str) -> VerifierResult:
        return VerifierResult(float("yes" in response), "ok", name=self.name)


class FakeEngine:
    """Answers "yes" on even rows and "no" on odd ones, except for prompts listed in ``always_fail``."""

    name, version = "fake", 0

    def __init__(self, tokenizer, always_fail=()):
        self.tok, self.always_fail, self.calls = tokenizer, set(always_fail), []

    def generate(self, prompts, n, sampling, seed):
        self.calls.append([tuple(p) for p in prompts])
        rows = []
        for p in prompts:
            for j in range(n):
                text = "no" if tuple(p) in self.always_fail or j % 2 else "yes"
                rows.append(self.tok.encode(text) + [self.tok.stop_ids[0]])
        width = sampling.max_new_tokens
        tokens = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
        lengths = np.asarray([len(r) for r in rows], np.int32)
        return Rollouts(tokens, np.full(tokens.shape, -0.5, np.float32), lengths, np.zeros(len(rows), np.int32),
                        version=self.version)


def _collector(fresh: int, prompts_per_call: int, **difficulty):
    cfg = RLConfig(prompts="synthetic:addition?split=train&n=40&max_digits=1", verifiers=("exact",),
                   rollout=RolloutConfig(group_size=4, prompts_per_call=prompts_per_call, max_new_tokens=8),
                   update=UpdateConfig(groups_per_round=fresh, fresh_groups_per_round=fresh),
                   buffer=BufferConfig(capacity_groups=64), difficulty=DifficultyConfig(**difficulty))
    tok = ByteTokenizer()
    pool = load_prompt_records(cfg.prompts)
    toks = [prompt_tokens(r, tok) for r in pool]
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, stop_tokens=tok.stop_ids)
    return cfg, RolloutCollector(cfg, pool, toks, tok, {"yes": EvenRowsSucceed()}, sampling), tok, toks


def test_admitted_groups_past_the_quota_are_carried_over_not_dropped():
    cfg, col, tok, _ = _collector(fresh=2, prompts_per_call=6)
    buffer, engine = TrajectoryBuffer(cfg.buffer), FakeEngine(tok)
    r = col.collect(engine, buffer, round_index=0, version=0, rng=np.random.default_rng(0))
    assert r.admitted == 6 and r.carried_over == 4 and len(buffer) == 6  # every admitted group is kept
    assert all(g.use_count == 0 for g in buffer.groups)
    m = rollout_metrics(r, success_threshold=0.5, band_counts={})
    assert m["groups_carried_over"] == 4 and m["rollouts_per_admitted_group"] == 24 / 6
    # the next round's quota is already met by the carried-over groups: nothing is generated for it
    r2 = col.collect(engine, buffer, round_index=1, version=0, rng=np.random.default_rng(1))
    assert r2.calls == 0 and len(engine.calls) == 1
    m2 = rollout_metrics(r2, success_threshold=0.5, band_counts={})
    assert m2["rollouts_round"] == 0 and "reward_mean" not in m2 and "pass_rate" not in m2  # not a reward of 0


def test_prompts_known_to_be_out_of_band_are_not_generated_again():
    """A prompt whose group failed everywhere is 'too hard'; with no revisits it is never selected again."""
    cfg, col, tok, toks = _collector(fresh=4, prompts_per_call=4, revisit_prob=0.0, oversample_factor=1.0)
    hopeless = {tuple(t) for t in toks[:20]}
    buffer, engine = TrajectoryBuffer(cfg.buffer), FakeEngine(tok, always_fail=hopeless)
    for round_index in range(8):
        col.collect(engine, buffer, round_index=round_index, version=0, rng=np.random.default_rng(round_index))
        buffer.sample_minibatch(4, version_now=0, rng=np.random.default_rng(0))  # train on them (uses them up)
    seen_hopeless = [p for call in engine.calls for p in call if p in hopeless]
    assert seen_hopeless and len(seen_hopeless) == len(set(seen_hopeless))  # tried once, then skipped before generation
    assert col.tracker.band_counts(col.pool_ids)["too_hard"] == len(set(seen_hopeless))
