"""Difficulty tracker, trajectory buffer, collation and the RL config dataclasses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from motif_jax.rl.buffer import Group, Trajectory, TrajectoryBuffer, collate
from motif_jax.rl.config import BufferConfig, ConfigError, DifficultyConfig, RLObjectiveConfig, SandboxConfig
from motif_jax.rl.difficulty import DifficultyTracker, admit_group, band_of, is_binary
from motif_jax.rl.objective import group_advantages

# ---------------------------------------------------------------------------------------------------------------------
# difficulty


def test_band_admission_binary_and_non_binary():
    cfg = DifficultyConfig(p_lo=0.1, p_hi=0.9, tau=0.05)
    assert admit_group([1, 0, 0, 0], cfg)
    assert admit_group([1, 1, 1, 0], cfg)
    assert not admit_group([1, 1, 1, 1], cfg)  # too easy
    assert not admit_group([0, 0, 0, 0], cfg)  # too hard
    assert not admit_group([1] * 19 + [0], cfg)  # 0.95 > p_hi
    assert admit_group([1] * 9 + [0], cfg)  # 0.9 is inside the inclusive band
    assert is_binary(np.array([0.0, 1.0])) and not is_binary(np.array([0.0, 0.5]))
    assert admit_group([0.2, 0.6, 0.3, 0.9], cfg)  # non-binary: std > tau
    assert not admit_group([0.5, 0.52, 0.51, 0.5], cfg)
    assert band_of(None, 0.1, 0.9) == "unseen" and band_of(0.5, 0.1, 0.9) == "in_band"


def test_tracker_statistics_and_bands():
    tr = DifficultyTracker(DifficultyConfig(ema_weight=0.5, band_statistic="ema"))
    assert tr.band("p0") == "unseen"
    assert tr.update("p0", [1, 1, 1, 1], step=0) == "too_easy"
    assert tr.update("p0", [0, 0, 0, 0], step=1) == "in_band"  # EMA 0.5
    s = tr.stats("p0")
    assert (s.attempts, s.successes, s.last_pass_rate, s.ema_pass_rate) == (8, 4, 0.0, 0.5)
    assert s.pass_rate == 0.5
    tr.update("p1", [0, 0, 0, 0], step=1)
    assert tr.band("p1") == "too_hard"
    latest = DifficultyTracker(DifficultyConfig(band_statistic="latest"))
    latest.update(7, [1, 1, 0, 0], step=0)
    latest.update(7, [1, 1, 1, 1], step=1)
    assert latest.band("7") == "too_easy" and latest.band(7) == "too_easy"  # ids are strings
    assert tr.band_counts(["p0", "p1", "p2"]) == {"unseen": 1, "too_easy": 0, "in_band": 1, "too_hard": 1}


def test_selector_prefers_band_and_revisits_retired_deterministically():
    cfg = DifficultyConfig(revisit_prob=0.1)
    tr = DifficultyTracker(cfg)
    ids = [f"p{i}" for i in range(40)]
    for i, pid in enumerate(ids[:30]):  # 10 too easy, 10 in band, 10 too hard, 10 unseen
        tr.update(pid, [1, 1, 1, 1] if i < 10 else ([1, 0, 1, 0] if i < 20 else [0, 0, 0, 0]), step=0)
    picks = [tr.select(ids, 10, np.random.default_rng(s)) for s in range(200)]
    assert tr.select(ids, 10, np.random.default_rng(3)) == picks[3]  # deterministic for a seed
    flat = [p for pick in picks for p in pick]
    assert all(len(set(p)) == 10 for p in picks)
    retired = sum(tr.band(p) in ("too_easy", "too_hard") for p in flat) / len(flat)
    assert 0.05 < retired < 0.15  # ~ revisit_prob
    # when preferred prompts run out, retired ones fill the batch
    assert len(tr.select(ids, 35, np.random.default_rng(0))) == 35
    assert len(tr.select(ids, 100, np.random.default_rng(0))) == 40


def test_tracker_state_round_trip_through_json():
    tr = DifficultyTracker()
    tr.update("a", [1, 0, 1, 1], step=3)
    tr.update("b", [0.2, 0.9], step=4)
    tr.mark_sampled(["a", "c"], step=5)
    state = json.loads(json.dumps(tr.state_dict()))
    tr2 = DifficultyTracker()
    tr2.load_state_dict(state)
    assert tr2.state_dict() == tr.state_dict()
    assert tr2.band("a") == tr.band("a") and tr2.stats("c").last_sampled_step == 5


# ---------------------------------------------------------------------------------------------------------------------
# buffer


def _group(gid: str, version: int, g: int = 4, seed: int = 0, prompt_len: int = 3) -> Group:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(g):
        r = int(rng.integers(1, 6))
        samples.append(Trajectory(
            prompt_tokens=np.arange(prompt_len) + 10,
            response_tokens=rng.integers(0, 100, r),
            loss_mask=np.ones(r, bool),
            behaviour_logp=rng.normal(-1, 0.3, r),
            reward=float(i % 2),
            policy_version=version,
            rewards={"exact": float(i % 2)},
            verifier_status="ok",
            finish_reason="eos" if i else "length",
            sampling={"temperature": 1.0},
        ))
    group = Group(gid, f"prompt-{gid}", "arith", samples)
    for s, a in zip(samples, group_advantages(group.rewards[None])[0]):
        s.advantage = float(a)
    return group


def test_staleness_and_use_count_eviction():
    buf = TrajectoryBuffer(BufferConfig(max_staleness=2, max_uses=2))
    for v in range(4):
        buf.add(_group(f"g{v}", version=v), step=v)
    assert buf.evict(version_now=3) == {"stale": 1, "used": 0}  # g0: 3 - 0 > 2; g1: 3 - 1 = 2 is kept
    assert [g.group_id for g in buf.groups] == ["g1", "g2", "g3"]
    rng = np.random.default_rng(0)
    mb1 = buf.sample_minibatch(3, version_now=3, rng=rng)
    assert mb1.num_fresh == 3 and mb1.replay_fraction == 0.0
    assert mb1.staleness_histogram == {0: 1, 1: 1, 2: 1}
    mb2 = buf.sample_minibatch(3, version_now=3, rng=rng)
    assert mb2.num_replay == 3 and mb2.replay_fraction == 1.0
    assert len(buf) == 0  # every group reached max_uses=2
    assert buf.dropped == {"stale": 1, "used": 3, "capacity": 0}
    buf.add(_group("g9", version=3), step=5)
    assert buf.sample_minibatch(1, version_now=6, rng=rng).groups == []  # stale by the time it is sampled


def test_minibatch_mixes_fresh_and_replay_and_keeps_groups_intact():
    buf = TrajectoryBuffer(BufferConfig(max_staleness=10, max_uses=5))
    for i in range(6):
        buf.add(_group(f"old{i}", version=0, seed=i), step=0)
    buf.sample_minibatch(6, version_now=1, rng=np.random.default_rng(0))  # all used once
    for i in range(6):
        buf.add(_group(f"new{i}", version=1, seed=10 + i), step=1)
    mb = buf.sample_minibatch(4, version_now=1, rng=np.random.default_rng(1), fresh_fraction=0.5)
    assert (mb.num_fresh, mb.num_replay, mb.replay_fraction) == (2, 2, 0.5)
    assert [g.group_id for g in mb.groups[:2]] == ["new0", "new1"]  # fresh: oldest first
    assert all(g.group_id.startswith("old") for g in mb.groups[2:])
    assert all(g.size == 4 for g in mb.groups)  # whole groups only
    # default (None): all fresh first, replay fills the rest
    mb = buf.sample_minibatch(6, version_now=1, rng=np.random.default_rng(2))
    assert (mb.num_fresh, mb.num_replay) == (4, 2)
    # advantages are the stored ones, not re-normalised
    assert np.array_equal(mb.groups[0].advantages, _group("new2", 1, seed=12).advantages)
    with pytest.raises(ValueError, match="group-size"):
        TrajectoryBuffer(BufferConfig(group_size=8)).add(_group("x", 0), step=0)


def test_capacity_drops_oldest():
    buf = TrajectoryBuffer(BufferConfig(capacity_groups=2))
    for i in range(3):
        buf.add(_group(f"g{i}", 0), step=i)
    assert [g.group_id for g in buf.groups] == ["g1", "g2"] and buf.dropped["capacity"] == 1


def test_buffer_state_round_trip_is_exact(tmp_path):
    buf = TrajectoryBuffer(BufferConfig(max_staleness=5, max_uses=3))
    for i in range(3):
        buf.add(_group(f"g{i}", version=i, seed=i), step=10 + i)
    buf.sample_minibatch(1, version_now=2, rng=np.random.default_rng(0))
    state = buf.state_dict()
    np.savez(tmp_path / "buf.npz", **state)  # plain numpy: what a checkpointer stores
    loaded = dict(np.load(tmp_path / "buf.npz"))
    buf2 = TrajectoryBuffer(buf.config)
    buf2.load_state_dict(loaded)
    s2 = buf2.state_dict()
    assert s2["meta_json"] == state["meta_json"]
    for k in state:
        if k != "meta_json":
            assert s2[k].dtype == state[k].dtype and np.array_equal(s2[k], state[k]), k
    # the restored buffer behaves identically
    a = buf.sample_minibatch(2, version_now=3, rng=np.random.default_rng(5))
    b = buf2.sample_minibatch(2, version_now=3, rng=np.random.default_rng(5))
    assert [g.group_id for g in a.groups] == [g.group_id for g in b.groups]
    assert buf.state_dict()["meta_json"] == buf2.state_dict()["meta_json"]
    empty = TrajectoryBuffer()
    empty.load_state_dict(TrajectoryBuffer().state_dict())
    assert len(empty) == 0


def test_buffer_checkpoint_schema_round_trips_through_orbax(tmp_path):
    """checkpoint_arrays -> an Orbax checkpoint -> abstract_checkpoint_arrays targets -> load_checkpoint, for a
    full and an empty buffer (each array carries one extra element, so none is zero-length)."""
    import jax
    import orbax.checkpoint as ocp

    full = TrajectoryBuffer()
    for i in range(2):
        full.add(_group(f"g{i}", version=i, seed=i), step=i)
    for name, buf in (("full", full), ("empty", TrajectoryBuffer())):
        arrays, meta = buf.checkpoint_arrays()
        assert all(a.shape[0] >= 1 for a in arrays.values())
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp_path / name, arrays)
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = TrajectoryBuffer.abstract_checkpoint_arrays(json.loads(json.dumps(meta)), sharding)
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(tmp_path / name, target)
        back = TrajectoryBuffer()
        back.load_checkpoint(restored, meta)
        assert back.state_dict()["meta_json"] == buf.state_dict()["meta_json"] and len(back) == len(buf)


def test_collate_alignment_and_padding():
    s = Trajectory(prompt_tokens=[5, 6, 7], response_tokens=[8, 9], loss_mask=[True, False],
                   behaviour_logp=[-0.5, -0.25], reward=1.0, policy_version=3, advantage=0.7)
    g = Group("g", "p", "arith", [s, s])
    out = collate([g], max_len=8, pad_id=0, batch_size=3)
    assert out["tokens"].shape == (3, 8) and out["tokens"].dtype == np.int32
    np.testing.assert_array_equal(out["tokens"][0], [5, 6, 7, 8, 9, 0, 0, 0])
    np.testing.assert_array_equal(out["targets"][0], [6, 7, 8, 9, 0, 0, 0, 0])
    # log-prob of response token j sits at position P - 1 + j (aligned with targets)
    np.testing.assert_array_equal(out["loss_mask"][0], [0, 0, 1, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(out["behaviour_logp"][0], [0, 0, -0.5, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["positions"][0], [0, 1, 2, 3, 4, 0, 0, 0])
    np.testing.assert_array_equal(out["segment_ids"][0], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(out["sample_valid"], [True, True, False])
    np.testing.assert_array_equal(out["group_index"], [0, 0, -1])
    assert out["advantages"].tolist() == pytest.approx([0.7, 0.7, 0.0])
    assert out["loss_mask"][2].sum() == 0 and out["prompt_lengths"].tolist() == [3, 3, 0]
    with pytest.raises(ValueError, match="max_len"):
        collate([g], max_len=4, pad_id=0)
    with pytest.raises(ValueError, match="batch_size"):
        collate([g], max_len=8, pad_id=0, batch_size=1)


# ---------------------------------------------------------------------------------------------------------------------
# config


def test_config_defaults_and_flag_names():
    o = RLObjectiveConfig()
    assert (o.eps_low, o.eps_high, o.dual_clip, o.aggregation, o.kl_coef, o.entropy_coef) == (
        0.2, 0.28, 3.0, "token_mean", 0.0, 0.0)
    assert (o.is_cap, o.is_level) == (2.0, "token")
    assert BufferConfig().max_staleness == 2
    d = DifficultyConfig()
    assert (d.p_lo, d.p_hi) == (0.1, 0.9)
    for make, flag in [
        (lambda: RLObjectiveConfig(eps_high=-0.1), "--objective.eps-high"),
        (lambda: RLObjectiveConfig(dual_clip=0.5), "--objective.dual-clip"),
        (lambda: RLObjectiveConfig(is_cap=0.5), "--objective.is-cap"),
        (lambda: RLObjectiveConfig(aggregation="mean"), "--objective.aggregation"),
        (lambda: RLObjectiveConfig(overlong_buffer=100), "--objective.overlong-buffer"),
        (lambda: DifficultyConfig(p_lo=0.8, p_hi=0.2), "--difficulty.p-lo"),
        (lambda: DifficultyConfig(revisit_prob=2.0), "--difficulty.revisit-prob"),
        (lambda: BufferConfig(max_uses=0), "--buffer.max-uses"),
        (lambda: BufferConfig(fresh_fraction=1.5), "--buffer.fresh-fraction"),
        (lambda: SandboxConfig(uid_base=0), "--sandbox.uid-base"),
    ]:
        with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
            make()
