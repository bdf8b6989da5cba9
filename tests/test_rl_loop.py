"""The RL loop on the shared engine: config validation, the update as an engine loss (whole = micro-batched =
sharded with vocab-parallel log-probs), skipping micro-batches without a gradient, the non-finite guard, rollout
log-probs, a learning run, resume, prefiltering and the ablation report."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from motif_jax.config import ConfigError, MeshConfig, ModelConfig
from motif_jax.data.prompts import load_prompt_records
from motif_jax.model.lm_head import vocab_parallel_axes
from motif_jax.parallel import mesh as mesh_lib
from motif_jax.rl.buffer import Group, Trajectory, collate
from motif_jax.rl.config import (BufferConfig, DifficultyConfig, RLConfig, RLObjectiveConfig, RolloutConfig,
                                 UpdateConfig)
from motif_jax.rl.objective import group_advantages, policy_loss_terms
from motif_jax.rl.rollout import score_groups
from motif_jax.rl.step import RL_BATCH_KEYS, policy_loss
from motif_jax.rl.update import minibatch_rows, round_rows
from motif_jax.rl.verifiers import VerifierResult, default_verifiers
from motif_jax.train.config import CheckpointConfig, EvalConfig, OptimConfig, StepConfig
from motif_jax.train.step import make_grad_fn

TINY = ModelConfig(vocab_size=272, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
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


def _cfg(run_dir, *, rollout=None, update=None, train=None, **kw) -> RLConfig:
    base = dict(
        model=TINY,
        prompts="synthetic:addition?split=train&n=64&max_digits=1",
        eval=EvalConfig(heldout="", num_records=4, max_new_tokens=12, batch_size=4),
        rollout=RolloutConfig(**{"group_size": 4, "max_new_tokens": 12, "max_prompt_len": 32, **(rollout or {})}),
        update=UpdateConfig(**{"groups_per_round": 4, "num_minibatches": 2, "num_passes": 2, **(update or {})}),
        train=StepConfig(**{"num_microbatches": 1, **(train or {})}),
        rounds=2, run_dir=str(run_dir), band_filter=False,
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
    (dict(rollout=dict(group_size=1)), "--rollout.group-size"),
    (dict(update=dict(groups_per_round=6, num_minibatches=4)), "--update.num-minibatches"),
    (dict(rollout=dict(group_size=4), update=dict(groups_per_round=6, num_minibatches=1),
          train=dict(num_microbatches=5)), "--train.num-microbatches"),  # 24 samples, not a multiple of 5
    (dict(update=dict(fresh_groups_per_round=8, groups_per_round=4)), "--update.fresh-groups-per-round"),
    (dict(update=dict(fresh_groups_per_round=2, groups_per_round=4), buffer=BufferConfig(max_uses=1)),
     "--buffer.max-uses"),
    (dict(buffer=BufferConfig(group_size=8)), "--buffer.group-size"),
    (dict(rollout=dict(temperature=0.0)), "--rollout.temperature"),
    (dict(rollout=dict(top_p=0.0)), "--rollout.top-p"),
    (dict(rollout=dict(temperature=float("nan"))), "--rollout.temperature"),
    (dict(verifiers=("exact", "vibes")), "--verifiers"),
    (dict(reward_weights={"code": 1.0}, verifiers=("exact",)), "--reward-weights"),
    (dict(rollout=dict(max_new_tokens=60)), "--rollout.max-new-tokens"),  # 32 + 60 > max_seq_len 64
    (dict(objective=RLObjectiveConfig(max_response_len=8)), "--objective.max-response-len"),
])
def test_config_refuses_impossible_combinations(tmp_path, kw, flag):
    with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
        _cfg(tmp_path, **kw)


def test_literal_fields_are_checked_outside_tyro_too():
    with pytest.raises(ConfigError, match=r"--objective\.aggregation: unknown value 'mean'"):
        dataclasses.replace(RLObjectiveConfig(), aggregation="mean")
    with pytest.raises(ConfigError, match=r"--train\.loss-impl"):
        StepConfig(loss_impl="cuda")
    with pytest.raises(ConfigError, match=r"--model\.remat-policy"):
        dataclasses.replace(TINY, remat_policy="some")


def test_config_derived_sizes_and_yaml(tmp_path):
    from motif_jax.config import load_yaml

    c = _cfg(tmp_path, rollout=dict(group_size=4), update=dict(groups_per_round=8, num_minibatches=2),
             train=dict(num_microbatches=2))
    assert (c.samples_per_minibatch, c.micro_batch) == (16, 8)
    assert c.steps_per_round == 4 and c.seq_len == 44 and c.fresh_groups == 8
    preset = load_yaml(RLConfig, "configs/rl/tiny-arith.yaml")
    assert preset.micro_batch == 64 and preset.steps_per_round == 1 and preset.eval.every == 10


# ---------------------------------------------------------------------------------------------------------------------
# the update is an engine loss


def _random_groups(rng, n_groups, g, prompt_len=5, resp_len=(3, 9)):
    groups = []
    for gi in range(n_groups):
        prompt = rng.integers(16, 200, prompt_len)
        samples = []
        for _ in range(g):
            r = int(rng.integers(*resp_len))
            samples.append(Trajectory(prompt, rng.integers(16, 200, r), np.ones(r, bool),
                                      rng.normal(-3.0, 0.5, r), float(rng.integers(0, 2)), 0))
        adv = group_advantages(np.array([s.reward for s in samples])[None])[0]
        for s, a in zip(samples, adv):
            s.advantage = float(a)
        groups.append(Group(f"g{gi}", f"p{gi}", "t", samples))
    return groups


def _update_rows(rng, seq_len=20):
    rows = collate(_random_groups(rng, 2, 8), seq_len, 0)
    # A proximal policy != behaviour policy so clipping, dual clip and IS weights are exercised.
    prox = rows["behaviour_logp"] + rng.normal(0, 0.5, rows["behaviour_logp"].shape) * rows["loss_mask"]
    rows["prox_logp"] = prox.astype(np.float32)
    return {k: rows[k] for k in RL_BATCH_KEYS}


KWARGS = dict(RLObjectiveConfig().loss_kwargs(), max_response_len=12)
TEMPERATURE = 0.8


def _reference_loss(graphdef, params, batch):
    """The objective computed by hand, SFT-style: materialised logits / T, log-softmax, gather, one division."""
    model = nnx.merge(graphdef, params)
    hidden, _ = model(batch["tokens"], batch["segment_ids"], batch["positions"])
    logz = jax.nn.log_softmax(model.logits(hidden).astype(jnp.float32) / TEMPERATURE, axis=-1)
    logp = jnp.take_along_axis(logz, batch["targets"][..., None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logz) * logz, axis=-1)
    num, den, _ = policy_loss_terms(logp, batch["prox_logp"], batch["behaviour_logp"], batch["advantages"],
                                    batch["loss_mask"], entropy=ent, **KWARGS)
    return num / den


def test_rl_update_equals_the_reference_whole_micro_batched_and_sharded_vocab_parallel():
    """One objective, four computations, the same loss and gradient (1e-5, f32): by hand with materialised logits;
    the engine on the whole batch; the engine in 2 micro-batches; the engine in 2 micro-batches sharded over 8
    devices (fsdp 4 x tensor 2), where the LM head runs vocab-parallel over ``tensor``."""
    from motif_jax.model.transformer import create_model

    graphdef, params = nnx.split(create_model(TINY, 0))
    batch = {k: jnp.asarray(v) for k, v in _update_rows(np.random.default_rng(0)).items()}
    ref_loss, ref_grads = jax.value_and_grad(_reference_loss, argnums=1)(graphdef, params, batch)
    loss = policy_loss(graphdef, KWARGS, temperature=TEMPERATURE, skip_inert=False)

    results = {}
    for m in (1, 2):
        grads, value, _, aux = jax.jit(make_grad_fn(loss, num_microbatches=m))(params, batch)
        results[f"micro{m}"] = (value, grads, aux)
    mesh_cfg = MeshConfig(data=1, fsdp=4, tensor=2)
    mesh = mesh_lib.make_mesh(mesh_cfg)
    p_sh = mesh_lib.param_shardings(params, mesh, mesh_cfg.logical_rules)
    b_sh = {k: NamedSharding(mesh, P(("data", "fsdp"), *([None] * (v.ndim - 1)))) for k, v in batch.items()}
    with mesh_lib.activate(mesh, mesh_cfg):
        assert vocab_parallel_axes()["vocab_axis"] == "tensor"
        fn = jax.jit(make_grad_fn(loss, num_microbatches=2, param_shardings=p_sh), in_shardings=(p_sh, b_sh))
        grads, value, _, aux = fn(jax.device_put(params, p_sh), jax.device_put(batch, b_sh))
    results["sharded"] = (value, grads, aux)

    assert results["micro1"][2]["clip_high_sum"] + results["micro1"][2]["clip_low_sum"] > 0
    assert results["micro1"][2]["is_truncated_sum"] > 0
    for name, (value, grads, aux) in results.items():
        np.testing.assert_allclose(float(value), float(ref_loss), rtol=1e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=name)
        assert float(aux["tokens"]) == float(batch["loss_mask"].sum())


def test_micro_batches_without_a_policy_gradient_are_skipped_exactly():
    """Successes only (negative_weight 0): a micro-batch of failures adds its tokens to the denominator and nothing
    else, so skipping its passes gives the same loss and gradient as computing it; all failures give 0."""
    from motif_jax.model.transformer import create_model

    graphdef, params = nnx.split(create_model(TINY, 0))
    rows = _update_rows(np.random.default_rng(1))
    rows["advantages"][8:] = -np.abs(rows["advantages"][8:])  # rows 8..15: failures only
    assert (rows["advantages"][:8] > 0).any()
    kwargs = dict(KWARGS, negative_weight=0.0)
    # the engine's micro-batch i holds rows i, i + M, ...: lay rows 0..7 / 8..15 out as micro-batches 0 / 1
    order = np.arange(16).reshape(2, 8).T.reshape(-1)
    batch = {k: jnp.asarray(v[order]) for k, v in rows.items()}

    def run(skip, advantages=None):
        b = dict(batch) if advantages is None else {**batch, "advantages": jnp.asarray(advantages)}
        loss = policy_loss(graphdef, kwargs, temperature=TEMPERATURE, skip_inert=skip)
        grads, value, den, aux = jax.jit(make_grad_fn(loss, num_microbatches=2))(params, b)
        return grads, float(value), float(den), {k: float(v) for k, v in aux.items()}

    (g_skip, l_skip, d_skip, a_skip), (g_full, l_full, d_full, a_full) = run(True), run(False)
    total_tokens = float(rows["loss_mask"].sum())
    assert d_skip == d_full == total_tokens
    assert a_skip["tokens"] == float(rows["loss_mask"][:8].sum()) < a_full["tokens"] == total_tokens  # skipped
    np.testing.assert_allclose(l_skip, l_full, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_skip), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_skip)) > 0
    g_none, l_none, d_none, a_none = run(True, -np.abs(np.asarray(batch["advantages"])))
    assert d_none == total_tokens and l_none == 0.0 and a_none["tokens"] == 0.0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_none))


def test_minibatch_rows_put_rows_with_a_gradient_in_the_first_micro_batches():
    rng = np.random.default_rng(0)
    groups = _random_groups(rng, 4, 4)
    for i, g in enumerate(groups):  # groups 0, 1 succeed; 2, 3: no gradient with negative_weight 0
        for s in g.samples:
            s.advantage = abs(s.advantage) + 1.0 if i < 2 else -abs(s.advantage) - 1.0
    rows = round_rows(groups, seq_len=20, pad_id=0, multiple=4)
    assert rows["tokens"].shape[0] == 20 and not rows["sample_valid"][16:].any()  # >= 1 padding row
    steps = minibatch_rows(rows, num_groups=4, group_size=4, rows_per_minibatch=16, num_microbatches=4,
                           num_minibatches=1, num_passes=2, negative_weight=0.0, rng=np.random.default_rng(3))
    assert len(steps) == 2
    for idx in steps:
        assert sorted(idx.tolist()) == list(range(16))  # every row of every group once
        micro = idx.reshape(-1, 4).T  # the engine's split: micro-batch i = rows i, i + 4, ...
        assert all((rows["advantages"][m] > 0).all() for m in micro[:2])
        assert all((rows["advantages"][m] < 0).all() for m in micro[2:])


# ---------------------------------------------------------------------------------------------------------------------
# the loop


HEALTH = [
    "clip_frac_high", "clip_frac_low", "dual_clip_frac", "prox_behaviour_absdiff_mean", "prox_behaviour_absdiff_max",
    "is_weight_mean", "is_weight_max", "is_truncated_frac", "approx_kl", "entropy_mean", "grad_norm", "skipped",
]
ROLLOUT = [
    "response_length_mean", "truncation_rate", "zero_std_group_frac", "reward/addition", "pass_rate/addition",
    "staleness_0", "replay_fraction", "prompts_in_band", "prompts_unseen", "rollouts", "version", "skipped_steps",
]


def _read_metrics(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {split: [r for r in lines if r["split"] == split] for split in ("update", "rollout", "eval")}


# One configuration for every loop test: 4 prompts per round, 2 of them new (the other 2 groups replayed), 8
# responses each, 2 mini-batches x 2 passes of 2 micro-batches; a reward a random tiny policy learns quickly.
LOOP = dict(rounds=20, rollout=dict(group_size=8, prompts_per_call=4, temperature=0.8),
            update=dict(groups_per_round=4, fresh_groups_per_round=2, num_minibatches=2, num_passes=2),
            train=dict(num_microbatches=2), band_filter=True,
            eval=EvalConfig(heldout="synthetic:addition?split=test&n=4&max_digits=2", num_records=4,
                            max_new_tokens=12, batch_size=4),
            difficulty=DifficultyConfig(tau=0.0, oversample_factor=1.0),
            buffer=BufferConfig(max_uses=2, max_staleness=2), objective=RLObjectiveConfig(),
            optim=OptimConfig(lr=1e-2, warmup_steps=0, decay="constant", weight_decay=0.0),
            checkpoint=CheckpointConfig(save_every=0, async_save=False))
VERIFIERS = {"digits": DigitVerifier()}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    import contextlib
    import io

    from motif_jax.rl.loop import RLTrainer

    run = tmp_path_factory.mktemp("rl") / "straight"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer = RLTrainer(_cfg(run, **LOOP), verifiers=VERIFIERS)
        summary = trainer.run()
    return trainer, summary, run, out.getvalue()


def test_loop_compiles_first_learns_logs_health_metrics_and_writes_summary(straight_run):
    trainer, summary, run, printed = straight_run
    lines = printed.splitlines()
    compiled_at = next(i for i, line in enumerate(lines) if line.startswith("RL update: per-device memory"))
    assert compiled_at < next(i for i, line in enumerate(lines) if line.startswith("[round 1"))  # before round 1
    m = _read_metrics(run)
    # A round updates (version + 1) when its buffer holds groups: 2 mini-batches x 2 passes over a full round of 4
    # groups, fewer steps over fewer. Once the task is learned every prompt leaves the pass-rate band, so a late round
    # may find little or nothing to train and leave the version alone.
    trained = [r for r in m["rollout"] if r["train_groups"] > 0]
    assert all(r["optimizer_steps"] == 4 for r in trained if r["train_groups"] == 4) and len(trained) >= 15
    assert summary["rounds"] == 20 and summary["version"] == len(trained)
    assert summary["optimizer_steps"] == sum(r["optimizer_steps"] for r in trained) == len(m["update"])
    assert summary["status"] == "finished" and summary["skipped_steps"] == 0
    # at most one generation call of 4 prompts x 8 per round: groups admitted past a round's quota of 2 are carried
    # over, so some rounds need no generation at all
    assert summary["rollouts_generated"] < 20 * 4 * 8
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
    assert json.loads((run / "summary.json").read_text())["accuracy_after"] == summary["accuracy_after"]
    assert len(m["rollout"]) == 20 and len(m["eval"]) == 2
    assert summary["rollouts_generated"] == sum(r["rollouts_round"] for r in m["rollout"])
    assert sum(r["groups_carried_over"] for r in m["rollout"]) > 0
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
    rewards = [r["reward_mean"] for r in m["rollout"] if "reward_mean" in r]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1, rewards  # reward goes up


def test_non_finite_updates_are_skipped_and_counted(tmp_path, straight_run):
    """A NaN in the round's behaviour log-probs makes every update of the round non-finite: the engine keeps the
    parameters, the guard counts each step, the round reports them; max_bad_steps in a row stop the run."""
    from motif_jax.rl.loop import RLTrainer
    from motif_jax.train.loop import NonFiniteError

    trainer = RLTrainer(_cfg(tmp_path / "nan", **{**LOOP, "max_bad_steps": 6}), verifiers=VERIFIERS)
    trainer.run_unit(0)  # a normal round fills the buffer
    before = jax.tree.map(np.asarray, trainer.state.params)
    groups = trainer.buffer.groups
    for g in groups:
        g.samples[0].behaviour_logp = np.full_like(g.samples[0].behaviour_logp, np.nan)
    m = trainer.update_round(np.random.default_rng(0))
    assert m["skipped_steps"] == m["optimizer_steps"] == 4 and trainer.guard.total == 4
    for a, b in zip(jax.tree.leaves(trainer.state.params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    for g in groups:  # the poisoned groups, fresh again
        trainer.buffer.add(dataclasses.replace(g, group_id=g.group_id + "'"), step=1)
    with pytest.raises(NonFiniteError, match="--max-bad-steps"):
        trainer.update_round(np.random.default_rng(1))  # the 6th bad step in a row
    trainer.close()


def test_killed_run_resumes_with_the_same_buffer_tracker_and_version(tmp_path, straight_run):
    """SIGTERM after round 2: the run checkpoints and stops; a restart restores the same buffer, pass-rate
    statistics, policy version and parameters, and then logs exactly the updates of the uninterrupted run."""
    from motif_jax.rl.loop import RLTrainer

    killed = RLTrainer(_cfg(tmp_path / "a", **LOOP), verifiers=VERIFIERS)
    real_round = killed.run_unit

    def round_then_sigterm(r):
        out = real_round(r)
        if r == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the loop's PreemptionFlag
        return out

    killed.run_unit = round_then_sigterm
    s = killed.run()
    assert s == {"status": "preempted", "rounds": 2}
    assert killed.version == 2 and len(killed.buffer) > 0
    saved_buffer = killed.buffer.state_dict()
    saved_tracker = killed.collector.tracker.state_dict()
    saved_params = jax.tree.map(np.asarray, killed.state.params)

    resumed = RLTrainer(_cfg(tmp_path / "a", **LOOP), verifiers=VERIFIERS)
    assert (resumed.index, resumed.version, resumed.rollouts) == (2, 2, killed.rollouts)
    assert resumed.collector.tracker.state_dict() == saved_tracker
    got = resumed.buffer.state_dict()
    assert got["meta_json"] == saved_buffer["meta_json"]
    for k in saved_buffer:
        if k != "meta_json":
            np.testing.assert_array_equal(got[k], saved_buffer[k])
    for a, b in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(saved_params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    s2 = resumed.run()
    straight, s3, straight_dir, _ = straight_run
    assert (s2["rounds"], s2["version"], s2["rollouts_generated"]) == (20, s3["version"], s3["rollouts_generated"])
    assert s2["accuracy_before"] == s3["accuracy_before"]
    assert resumed.collector.tracker.state_dict() == straight.collector.tracker.state_dict()
    assert resumed.buffer.state_dict()["meta_json"] == straight.buffer.state_dict()["meta_json"]
    a, b = _read_metrics(tmp_path / "a")["update"], _read_metrics(straight_dir)["update"]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in a] == [(r["step"], r["loss"], r["grad_norm"]) for r in b]


def test_trainer_log_probs_match_the_samplers_at_temperature(straight_run):
    """Behaviour log-probs from generate() == the trainer's fused-kernel log-probs of the same tokens under
    softmax(z / tau) (tau = 0.8 here): |lp - lb| is numerical noise for a policy that has not moved."""
    trainer = straight_run[0]
    col = trainer.collector
    gen = trainer.engine.generate(col.pool_tokens[:4], 8, col.sampling, seed=7)
    groups, stats = score_groups(col.pool[:4], col.pool_tokens[:4], gen, group_size=8, tokenizer=trainer.tokenizer,
                                 verifiers={"exact": default_verifiers()["exact"]}, version=3,
                                 group_ids=list("abcd"))
    assert stats.samples == 32 and [g.prompt_id for g in groups] == [r["id"] for r in col.pool[:4]]
    assert all(s.policy_version == 3 and s.finish_reason in ("eos", "length") for g in groups for s in g.samples)
    assert all(s.verifier_status in ("ok", "parse_error") and s.rewards == {"exact": s.reward}
               for g in groups for s in g.samples)
    rows = round_rows(groups, seq_len=trainer.cfg.seq_len, pad_id=trainer.tokenizer.pad_id,
                      multiple=trainer.cfg.micro_batch)
    prox = trainer.proximal_logprobs(rows)
    m = rows["loss_mask"] > 0
    assert m.sum() == stats.length_sum
    np.testing.assert_allclose(prox[m], rows["behaviour_logp"][m], atol=2e-4)


def test_prefilter_measures_pass_rates_and_seeds_the_tracker(tmp_path, straight_run):
    from motif_jax.rl.loop import RLTrainer
    from motif_jax.rl.rollout import measure_pass_rates

    trainer = straight_run[0]
    col = trainer.collector
    recs, toks = col.pool[:5], col.pool_tokens[:5]
    stats = measure_pass_rates(trainer.engine, recs, toks, samples=8,
                               sampling=col.sampling, tokenizer=trainer.tokenizer, verifiers=VERIFIERS,
                               seed=0, batch_prompts=4, success_threshold=0.05)
    assert len(stats) == 5 and all(s["attempts"] == 8 and 0 <= s["successes"] <= 8 for s in stats)
    assert all(s["pass_rate"] == s["successes"] / 8 for s in stats)
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps({**r, "prefilter": s}) + "\n" for r, s in zip(recs, stats)))
    assert [r["id"] for r in load_prompt_records(str(path))] == [r["id"] for r in recs]
    seeded = RLTrainer(_cfg(tmp_path / "run", prompts=str(path), difficulty=DifficultyConfig(success_threshold=0.05)),
                       verifiers=VERIFIERS)
    for r, s in zip(recs, stats):
        st = seeded.collector.tracker.stats(r["id"])
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
    assert cfgs["band"].fresh_groups == 4 and cfgs["band"].update.num_passes == 1
    assert cfgs["band"].buffer.max_uses == 1
    assert not cfgs["plain"].band_filter and not cfgs["plain"].objective.drop_zero_std_groups
    assert all(c.max_rollouts == 1000 for c in cfgs.values())
    # band variants over-generate with the preset's call size; without the band a call samples the fresh groups
    assert {v: c.prompts_per_call for v, c in cfgs.items()} == {"band+reuse": 4, "band": 4, "reuse": 2, "plain": 4}
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


def test_overlapped_rounds_are_one_version_stale_and_resume_exactly(tmp_path, straight_run):
    """--update.overlap: round r + 1 is generated during round r's update, by the policy before that update. Every
    fresh group is trained one version after the policy that sampled it; stopped after round 2 and resumed (the
    prefetched round is in the checkpoint), the run logs the updates of an uninterrupted one."""
    from motif_jax.rl.loop import RLTrainer

    overlap = {**LOOP, "rounds": 6, "update": {**LOOP["update"], "overlap": True}}
    straight = RLTrainer(_cfg(tmp_path / "straight", **overlap), verifiers=VERIFIERS)
    s = straight.run()
    assert s["status"] == "finished" and s["version"] == 6
    rollout = _read_metrics(tmp_path / "straight")["rollout"]
    assert [r["rollouts_generated_version"] for r in rollout] == [0, 0, 1, 2, 3, 4]  # round r+1 sampled by version r
    assert all(r.get("staleness_0", 0) == 0 for r in rollout[1:])  # no group is trained by the policy that sampled it

    killed = RLTrainer(_cfg(tmp_path / "split", **{**overlap, "stop_after_steps": 2}), verifiers=VERIFIERS)
    assert killed.run() == {"status": "stopped", "rounds": 2}
    resumed = RLTrainer(_cfg(tmp_path / "split", **overlap), verifiers=VERIFIERS)
    assert sorted(resumed._prefetched) == [2] and resumed.run()["status"] == "finished"
    a, b = _read_metrics(tmp_path / "split")["update"], _read_metrics(tmp_path / "straight")["update"]
    assert [(r["step"], r["loss"]) for r in a] == [(r["step"], r["loss"]) for r in b]
