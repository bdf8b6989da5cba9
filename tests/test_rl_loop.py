"""The RL loop: config validation, the jitted update, rollout log-probs, a smoke run, resume, and learning."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from motif_jax.config import ConfigError, ModelConfig
from motif_jax.data.tokenizer import ByteTokenizer
from motif_jax.model.generate import SamplingConfig
from motif_jax.model.transformer import create_model
from motif_jax.rl.buffer import Group, collate
from motif_jax.rl.config import BufferConfig, DifficultyConfig, RLConfig, RLObjectiveConfig
from motif_jax.rl.rollout import sample_groups, score_groups
from motif_jax.rl.step import BATCH_KEYS, make_update_fn, token_logprobs
from motif_jax.rl.verifiers import VerifierResult, default_verifiers
from motif_jax.train.checkpoint import CheckpointConfig
from motif_jax.train.config import OptimConfig

TINY = ModelConfig(vocab_size=272, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                   mlp_dim=64, max_seq_len=64)


@dataclasses.dataclass(frozen=True)
class DigitVerifier:
    """A trivially learnable reward: the fraction of response characters that are digits."""

    name: str = "digits"

    def applies(self, record) -> bool:
        return True

    def __call__(self, record, response: str) -> VerifierResult:
        text = response.replace("<think>", "").replace("</think>", "")
        return VerifierResult(sum(c.isdigit() for c in text) / max(len(text), 1), "ok", name=self.name)


def _cfg(run_dir, **kw) -> RLConfig:
    base = dict(
        model=TINY,
        prompts="synthetic:addition?split=train&n=64&max_digits=1",
        eval_prompts="synthetic:addition?split=test&n=4&max_digits=2",
        eval_size=0, group_size=4, prompts_per_round=4, num_minibatches=2, num_passes=2, micro_batch_size=8,
        max_new_tokens=12, max_prompt_len=32, rounds=2, run_dir=str(run_dir), band_filter=False,
        difficulty=DifficultyConfig(tau=0.0, oversample_factor=1.0),
        objective=RLObjectiveConfig(drop_zero_std_groups=False),
        optim=OptimConfig(lr=3e-3, warmup_steps=0, decay="constant", weight_decay=0.0),
        checkpoint=CheckpointConfig(save_every=1, keep=5, async_save=False),
    )
    base.update(kw)
    return RLConfig(**base)


# ---------------------------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("kw, flag", [
    (dict(group_size=1), "--group-size"),
    (dict(prompts_per_round=6, num_minibatches=4), "--num-minibatches"),
    (dict(group_size=8, micro_batch_size=4), "--micro-batch-size"),  # smaller than a group
    (dict(group_size=4, micro_batch_size=6), "--micro-batch-size"),  # not whole groups
    (dict(group_size=4, prompts_per_round=6, num_minibatches=1, micro_batch_size=16), "--micro-batch-size"),
    (dict(fresh_groups_per_round=8, prompts_per_round=4), "--fresh-groups-per-round"),
    (dict(fresh_groups_per_round=2, prompts_per_round=4, buffer=BufferConfig(max_uses=1)), "--buffer.max-uses"),
    (dict(buffer=BufferConfig(group_size=8)), "--buffer.group-size"),
    (dict(temperature=0.0), "--temperature"),
    (dict(top_p=0.0), "--top-p"),
    (dict(verifiers=("exact", "vibes")), "--verifiers"),
    (dict(reward_weights={"code": 1.0}, verifiers=("exact",)), "--reward-weights"),
    (dict(max_new_tokens=60), "--max-new-tokens"),  # 32 + 60 > max_seq_len 64
    (dict(objective=RLObjectiveConfig(max_response_len=8)), "--objective.max-response-len"),
])
def test_config_refuses_impossible_combinations(tmp_path, kw, flag):
    with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
        _cfg(tmp_path, **kw)


def test_config_derived_sizes_and_yaml(tmp_path):
    from motif_jax.config import load_yaml

    c = _cfg(tmp_path, group_size=4, prompts_per_round=8, num_minibatches=2, micro_batch_size=8)
    assert (c.groups_per_minibatch, c.samples_per_minibatch, c.micro_batch, c.num_microbatches) == (4, 16, 8, 2)
    assert c.steps_per_round == 4 and c.seq_len == 44 and c.fresh_groups == 8
    preset = load_yaml(RLConfig, "configs/rl/tiny-arith.yaml")
    assert preset.prompts_per_round % preset.num_minibatches == 0


# ---------------------------------------------------------------------------------------------------------------------
# update step and log-probs


def _random_groups(rng, n_groups, g, prompt_len=5, resp_len=(3, 9)):
    from motif_jax.rl.buffer import Trajectory, assign_advantages

    groups = []
    for gi in range(n_groups):
        prompt = rng.integers(16, 200, prompt_len)
        samples = []
        for _ in range(g):
            r = int(rng.integers(*resp_len))
            samples.append(Trajectory(prompt, rng.integers(16, 200, r), np.ones(r, bool),
                                      rng.normal(-3.0, 0.5, r), float(rng.integers(0, 2)), 0))
        groups.append(assign_advantages(Group(f"g{gi}", f"p{gi}", "t", samples)))
    return groups


# ---------------------------------------------------------------------------------------------------------------------
# the loop


HEALTH = [
    "clip_frac_high", "clip_frac_low", "dual_clip_frac", "prox_behaviour_absdiff_mean", "prox_behaviour_absdiff_max",
    "is_weight_mean", "is_weight_max", "is_truncated_frac", "approx_kl", "entropy_mean", "grad_norm",
]
ROLLOUT = [
    "response_length_mean", "truncation_rate", "zero_std_group_frac", "reward/addition", "pass_rate/addition",
    "staleness_0", "replay_fraction", "prompts_in_band", "prompts_unseen", "rollouts", "version",
]


def _read_metrics(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {split: [r for r in lines if r["split"] == split] for split in ("update", "rollout", "eval")}


# One configuration for every loop test, so the programs compile once per test process: 4 prompts per round, 2 of
# them new (the other 2 groups replayed), 8 responses each, 2 mini-batches x 2 passes; a reward that a random tiny
# policy can learn quickly (digits).
LOOP = dict(rounds=20, eval_size=4, group_size=8, prompts_per_round=4, fresh_groups_per_round=2, rollout_prompts=4,
            num_minibatches=2, num_passes=2, micro_batch_size=8, band_filter=True, temperature=0.8,
            difficulty=DifficultyConfig(tau=0.0, oversample_factor=1.0),
            buffer=BufferConfig(max_uses=2, max_staleness=2), objective=RLObjectiveConfig(),
            optim=OptimConfig(lr=1e-2, warmup_steps=0, decay="constant", weight_decay=0.0),
            checkpoint=CheckpointConfig(save_every=0, async_save=False))
VERIFIERS = {"digits": DigitVerifier()}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    from motif_jax.rl.loop import RLTrainer

    run = tmp_path_factory.mktemp("rl") / "straight"
    trainer = RLTrainer(_cfg(run, **LOOP), verifiers=VERIFIERS)
    return trainer, trainer.run(), run


def test_loop_learns_logs_health_metrics_and_writes_summary(straight_run):
    trainer, summary, run = straight_run
    assert summary["rounds"] == 20 and summary["version"] == 20 and summary["optimizer_steps"] == 80
    assert summary["rollouts_generated"] == 20 * 4 * 8  # one generation call of 4 prompts x 8 per round
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
    assert json.loads((run / "summary.json").read_text())["accuracy_after"] == summary["accuracy_after"]
    m = _read_metrics(run)
    assert len(m["update"]) == 80 and len(m["rollout"]) == 20 and len(m["eval"]) == 2
    for key in HEALTH:
        assert key in m["update"][0], key
    for key in ROLLOUT:
        assert key in m["rollout"][1], key
    first = m["update"][0]
    # First step of a round: the proximal policy is the sampler's, so |lp - lb| is numerical noise and the
    # ratio is exactly 1 (no clipping).
    assert first["prox_behaviour_absdiff_max"] < 1e-3 and first["clip_frac_high"] == 0.0
    assert m["rollout"][1]["replay_fraction"] == 0.5  # 2 fresh + 2 replayed groups
    assert m["rollout"][1]["staleness_1"] == 2
    assert (run / "final" / "model.yaml").is_file() and (run / "tensorboard").is_dir()
    rewards = [r["reward_mean"] for r in m["rollout"]]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1, rewards  # reward goes up


def test_killed_run_resumes_with_the_same_buffer_tracker_and_version(tmp_path, straight_run):
    """SIGTERM after round 2: the run checkpoints and stops; a restart restores the same buffer, pass-rate
    statistics, policy version and parameters, and finishes exactly like the uninterrupted run."""
    from motif_jax.rl.loop import RLTrainer

    killed = RLTrainer(_cfg(tmp_path / "a", **LOOP), verifiers=VERIFIERS)
    real_round = killed.round

    def round_then_sigterm(r):
        out = real_round(r)
        if r == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the loop's PreemptionFlag
        return out

    killed.round = round_then_sigterm
    s = killed.run()
    assert s["stopped"] == "preempted" and s["rounds"] == 2 and s["version"] == 2
    saved_buffer = killed.buffer.state_dict()
    saved_tracker = killed.tracker.state_dict()
    saved_params = jax.tree.map(np.asarray, killed.state.params)
    assert len(killed.buffer) > 0

    resumed = RLTrainer(_cfg(tmp_path / "a", **LOOP), verifiers=VERIFIERS)
    assert resumed.restore()
    assert (resumed.round_index, resumed.version, resumed.rollouts) == (2, 2, killed.rollouts)
    assert resumed.tracker.state_dict() == saved_tracker
    got = resumed.buffer.state_dict()
    assert got["meta_json"] == saved_buffer["meta_json"]
    for k in saved_buffer:
        if k != "meta_json":
            np.testing.assert_array_equal(got[k], saved_buffer[k])
    for a, b in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(saved_params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    s2 = resumed.run()  # restores again from the directory and finishes
    straight, s3, _ = straight_run
    assert (s2["rounds"], s2["version"], s2["rollouts_generated"]) == (20, 20, s3["rollouts_generated"])
    assert s2["accuracy_before"] == s3["accuracy_before"]
    assert resumed.tracker.state_dict() == straight.tracker.state_dict()
    assert resumed.buffer.state_dict()["meta_json"] == straight.buffer.state_dict()["meta_json"]
    for a, b in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_update_is_the_same_whole_or_in_micro_batches(straight_run):
    """(numerator, denominator) summed over micro-batches and divided once == the whole mini-batch's loss: the
    loop's update (2 micro-batches of 8, sharded over 8 devices) against an unsharded update of one batch of 16."""
    from motif_jax.train.optim import make_optimizer

    trainer = straight_run[0]
    rng = np.random.default_rng(0)
    rows = collate(_random_groups(rng, 2, 8), trainer.cfg.seq_len, 0)
    # A proximal policy != behaviour policy so clipping, dual clip and IS weights are exercised.
    prox = (rows["behaviour_logp"] + rng.normal(0, 0.5, rows["behaviour_logp"].shape) * rows["loss_mask"])
    prox = prox.astype(np.float32)
    params = jax.tree.map(np.asarray, trainer.state.params)
    tx = make_optimizer(trainer.cfg.optim, trainer.total_steps)
    kwargs = trainer.cfg.objective.loss_kwargs()
    kwargs["max_response_len"] = trainer.cfg.max_new_tokens
    whole = make_update_fn(trainer.graphdef, tx, loss_kwargs=kwargs, temperature=trainer.cfg.temperature)
    outs = []
    for fn, m in ((whole, 1), (trainer.update_fn, 2)):
        batch = {k: rows[k].reshape((m, -1) + rows[k].shape[1:]) for k in BATCH_KEYS}
        p0 = jax.tree.map(jnp.asarray, params)
        new, _, metrics = fn(p0, tx.init(p0), batch, prox.reshape(m, -1, prox.shape[-1]), None)
        outs.append((jax.tree.map(np.asarray, new), {k: float(v) for k, v in metrics.items()}))
    (p1, m1), (p2, m2) = outs
    assert m1["tokens"] == m2["tokens"] == float(rows["loss_mask"].sum())
    assert m1["clip_high_sum"] + m1["clip_low_sum"] > 0 and m1["is_truncated_sum"] > 0
    for key in ("loss", "grad_norm", "denominator", "clip_high_sum", "is_weight_sum", "approx_kl_sum"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=2e-4, atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_update_skips_micro_batches_without_a_policy_gradient(straight_run):
    """Successes only (negative_weight 0): a micro-batch of failures adds its tokens to the denominator and nothing
    else, so skipping its passes gives the same update as computing it; a mini-batch of failures changes nothing."""
    from motif_jax.train.optim import make_optimizer

    trainer = straight_run[0]
    rng = np.random.default_rng(1)
    rows = collate(_random_groups(rng, 2, 8), trainer.cfg.seq_len, 0)
    adv = rows["advantages"].copy()
    adv[8:] = -np.abs(adv[8:])  # the second micro-batch: failures only
    assert (adv[:8] > 0).any()
    tx = make_optimizer(trainer.cfg.optim, trainer.total_steps)
    kwargs = dataclasses.replace(trainer.cfg.objective, negative_weight=0.0, entropy_coef=0.0).loss_kwargs()
    kwargs["max_response_len"] = trainer.cfg.max_new_tokens
    fns = {skip: make_update_fn(trainer.graphdef, tx, loss_kwargs=kwargs, temperature=trainer.cfg.temperature,
                                skip_inert=skip) for skip in (True, False)}
    params = jax.tree.map(np.asarray, trainer.state.params)

    def run(skip, advantages):
        batch = {k: rows[k].reshape((2, 8) + rows[k].shape[1:]) for k in BATCH_KEYS}
        batch["advantages"] = advantages.reshape(2, 8)
        p0 = jax.tree.map(jnp.asarray, params)
        new, _, metrics = fns[skip](p0, tx.init(p0), batch, batch["behaviour_logp"], None)
        return jax.tree.map(np.asarray, new), {k: float(v) for k, v in metrics.items()}

    (p_skip, m_skip), (p_full, m_full) = run(True, adv), run(False, adv)
    total_tokens = float(rows["loss_mask"].sum())
    assert m_skip["denominator"] == m_full["denominator"] == total_tokens
    assert m_skip["tokens"] == float(rows["loss_mask"][:8].sum()) < m_full["tokens"] == total_tokens
    np.testing.assert_allclose(m_skip["loss"], m_full["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_skip["grad_norm"], m_full["grad_norm"], rtol=1e-5)
    assert m_skip["grad_norm"] > 0
    for a, b in zip(jax.tree.leaves(p_skip), jax.tree.leaves(p_full)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    p_none, m_none = run(True, -np.abs(adv))
    assert m_none["denominator"] == total_tokens and m_none["grad_norm"] == 0.0 and m_none["tokens"] == 0.0
    for a, b in zip(jax.tree.leaves(p_none), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_trainer_log_probs_match_the_samplers_at_temperature(straight_run):
    """Behaviour log-probs from generate() == the trainer's fused-kernel log-probs of the same tokens under
    softmax(z / tau) (tau = 0.8 here): |lp - lb| is numerical noise for a policy that has not moved."""
    trainer = straight_run[0]
    gen = sample_groups(trainer.graphdef, trainer.state.params, trainer.pool_tokens[:4], 8, jax.random.key(7),
                        trainer.sampling, trainer.tokenizer.pad_id)
    groups, stats = score_groups(trainer.pool[:4], trainer.pool_tokens[:4], gen, group_size=8,
                                 tokenizer=trainer.tokenizer, verifiers={"exact": default_verifiers()["exact"]},
                                 version=3,
                                 group_ids=list("abcd"))
    assert stats.samples == 32 and [g.prompt_id for g in groups] == [r["id"] for r in trainer.pool[:4]]
    assert all(s.policy_version == 3 and s.finish_reason in ("eos", "length") for g in groups for s in g.samples)
    assert all(s.verifier_status in ("ok", "parse_error") and s.rewards == {"exact": s.reward}
               for g in groups for s in g.samples)
    rows, _ = trainer._rows(groups)
    prox = trainer._proximal(rows)
    m = rows["loss_mask"] > 0
    assert m.sum() == stats.length_sum
    np.testing.assert_allclose(prox[m], rows["behaviour_logp"][m], atol=2e-4)


def test_prefilter_measures_pass_rates_and_seeds_the_tracker(tmp_path, straight_run):
    from motif_jax.rl.loop import RLTrainer, load_prompt_records
    from motif_jax.rl.rollout import measure_pass_rates

    trainer = straight_run[0]
    recs, toks = trainer.pool[:5], trainer.pool_tokens[:5]
    stats = measure_pass_rates(trainer.graphdef, trainer.state.params, recs, toks, samples=8,
                               sampling=trainer.sampling, tokenizer=trainer.tokenizer, verifiers=VERIFIERS,
                               key=jax.random.key(0), batch_prompts=4, success_threshold=0.05)
    assert len(stats) == 5 and all(s["attempts"] == 8 and 0 <= s["successes"] <= 8 for s in stats)
    assert all(s["pass_rate"] == s["successes"] / 8 for s in stats)
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps({**r, "prefilter": s}) + "\n" for r, s in zip(recs, stats)))
    assert [r["id"] for r in load_prompt_records(str(path))] == [r["id"] for r in recs]
    seeded = RLTrainer(_cfg(tmp_path / "run", prompts=str(path), difficulty=DifficultyConfig(success_threshold=0.05)),
                       verifiers=VERIFIERS)
    for r, s in zip(recs, stats):
        st = seeded.tracker.stats(r["id"])
        assert (st.attempts, st.successes) == (8, s["successes"])
    seeded.close()
    (tmp_path / "bad.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(ConfigError, match="--prompts"):
        load_prompt_records(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ConfigError, match="--prompts"):
        load_prompt_records(str(tmp_path / "missing.jsonl"))


def test_ablation_report_writes_table_json_and_plot(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ablate_rl", "scripts/ablate_rl.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    base = _cfg(tmp_path, **LOOP)
    cfgs = {v: mod.variant_config(base, v, tmp_path, 1000, 2) for v in mod.VARIANTS}
    assert cfgs["band+reuse"].fresh_groups == 2 and cfgs["band+reuse"].buffer.max_uses == 2
    assert cfgs["band"].fresh_groups == 4 and cfgs["band"].num_passes == 1 and cfgs["band"].buffer.max_uses == 1
    assert not cfgs["plain"].band_filter and not cfgs["plain"].objective.drop_zero_std_groups
    assert all(c.max_rollouts == 1000 for c in cfgs.values())
    # band variants over-generate with the preset's call size; without the band a call samples the fresh groups
    assert {v: c.rollout_prompts for v, c in cfgs.items()} == {"band+reuse": 4, "band": 4, "reuse": 2, "plain": 4}
    results = {}
    for i, v in enumerate(mod.VARIANTS):
        hist = [{"rollouts": 0, "accuracy": 0.5}, {"rollouts": 500, "accuracy": 0.6 + 0.05 * i},
                {"rollouts": 1000, "accuracy": 0.7}]
        results[v] = {"summary": {"rollouts_generated": 1000, "optimizer_steps": 10, "rounds": 5,
                                  "accuracy_before": 0.5, "accuracy_after": 0.7, "eval_history": hist,
                                  "wall_time_s": 1.0},
                      "curve": [{"rollouts": 200 * k, "reward_mean": 0.1 * k, "pass_rate": 0.1} for k in range(5)]}
    report = mod.write_report(tmp_path, results, 0.65)
    assert [r["rollouts_to_target"] for r in report["variants"]] == [1000, 500, 500, 500]
    assert "| band+reuse | yes | yes |" in (tmp_path / "ablation.md").read_text()
    assert (tmp_path / "ablation.png").stat().st_size > 1000
    assert json.loads((tmp_path / "ablation.json").read_text())["target_accuracy"] == 0.65
