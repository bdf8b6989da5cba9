"""Grain SFT pipeline: packing invariants over 2 simulated hosts, exact resume, mixtures, curriculum, global arrays."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from motif_jax.config import ConfigError
from motif_jax.data.config import DataConfig, SourceConfig, StageConfig
from motif_jax.data.pipeline import BATCH_DTYPES, BATCH_KEYS, DataPipeline, packing_stats, to_global_array
from motif_jax.data.records import read_records, write_jsonl
from motif_jax.data.synthetic import Difficulty, generate_problems, make_record
from motif_jax.data.template import apply_template
from motif_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Records of very different lengths (aligned, teacher and answer-only traces of two tasks)."""
    d = tmp_path_factory.mktemp("corpus")
    recs = []
    for task, n in (("addition", 60), ("linear", 30)):
        for p in generate_problems(task, n, seed=3, difficulty=Difficulty(1, 3, 2)):
            recs.append(make_record(p, ("aligned", "teacher", "none")[len(recs) % 3]))
    path = d / "mixed.jsonl"
    write_jsonl(recs, path)
    small = d / "small.jsonl"
    write_jsonl([make_record(p, "aligned") for p in generate_problems("addition", 40, seed=4)], small)
    return path, small


def _segments(batch):
    """Yields (row, segment id, slice) for every packed record of a batch."""
    for r in range(batch["segment_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            yield r, s, where


def test_one_epoch_two_hosts_every_token_exactly_once(corpus):
    path, _ = corpus
    seq_len = 384
    cfg = DataConfig(sources=(SourceConfig(str(path)),), seq_len=seq_len, batch_size=4, num_epochs=1, seed=7)
    recs = read_records(path)
    expected = collections.Counter()
    masks = {}
    for r in recs:
        ids, m = apply_template(r["messages"], TOK)
        assert len(ids) <= seq_len
        expected[tuple(ids.tolist())] += 1
        masks[tuple(ids.tolist())] = m
    got = collections.Counter()
    for host in (0, 1):
        pl = DataPipeline(cfg, shard_index=host, shard_count=2)
        n_batches = 0
        for batch in pl:
            n_batches += 1
            assert set(batch) == set(BATCH_KEYS)
            for k in BATCH_KEYS:
                assert batch[k].shape == (2, seq_len) and batch[k].dtype == BATCH_DTYPES[k], k
            pad = batch["segment_ids"] == 0
            assert (batch["tokens"][pad] == TOK.pad_id).all() and (batch["loss_mask"][pad] == 0).all()
            assert (batch["positions"][pad] == 0).all()
            for r, s, where in _segments(batch):
                # A segment is one contiguous run inside its row, positions restart at 0.
                assert (np.diff(where) == 1).all()
                assert (batch["positions"][r, where] == np.arange(len(where))).all()
                toks = batch["tokens"][r, where]
                key = tuple(toks.tolist())
                got[key] += 1
                # Targets: the next token of the same segment; the last token's target is masked.
                assert (batch["targets"][r, where[:-1]] == toks[1:]).all()
                assert batch["targets"][r, where[-1]] == TOK.pad_id and batch["loss_mask"][r, where[-1]] == 0
                # The loss mask is the template's mask of the targets: assistant output only.
                assert (batch["loss_mask"][r, where[:-1]] == masks[key][1:]).all()
        assert n_batches > 0
    assert got == expected


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])


def test_resume_is_exact_across_mixture_and_stages(corpus):
    path, small = corpus
    cfg = DataConfig(
        sources=(SourceConfig(str(path), weight=2.0), SourceConfig(str(small), weight=1.0)),
        batch_size=4, seed=1, packing_bins=6,
        stages=(StageConfig(name="short", seq_len=256, steps=4),
                StageConfig(name="long", seq_len=512, batch_size=2, sources=(SourceConfig(str(small)),))),
    )
    pl = DataPipeline(cfg, shard_index=1, shard_count=2)
    reference = _take(iter(pl), 10)
    assert [b["tokens"].shape for b in reference] == [(2, 256)] * 4 + [(1, 512)] * 6
    for k in (1, 3, 4, 7):  # mid packed-batch, stage boundary, inside stage 2
        it = iter(pl)
        _take(it, k)
        state = json.loads(json.dumps(it.get_state()))  # what Grain's Orbax handler writes
        it.close()
        fresh = iter(DataPipeline(cfg, shard_index=1, shard_count=2))
        fresh.set_state(state)
        assert fresh.stage == (0 if k <= 4 else 1)  # a stage is left on the next call
        _same(_take(fresh, 10 - k), reference[k:])
    with pytest.raises(ValueError, match="not a DataIterator state"):
        iter(pl).set_state({"stage": 5})


def test_mixture_weights_and_infinite_repeat(corpus):
    path, small = corpus
    cfg = DataConfig(sources=(SourceConfig(str(path), weight=3.0), SourceConfig(str(small), weight=1.0)),
                     seq_len=256, batch_size=2, seed=0)
    small_ids = {tuple(apply_template(r["messages"], TOK)[0].tolist()) for r in read_records(small)}
    it = iter(DataPipeline(cfg, shard_index=0, shard_count=1))
    n_small = n_all = 0
    for batch in _take(it, 40):  # far more than one epoch of the small source: repeats forever
        for r, _, where in _segments(batch):
            n_all += 1
            n_small += tuple(batch["tokens"][r, where].tolist()) in small_ids
    assert 0.15 < n_small / n_all < 0.35  # weight 1/4
    assert packing_stats(batch)["fill"] > 0.5


def test_config_errors_name_flags(corpus):
    path, _ = corpus
    src = (SourceConfig(str(path)),)
    with pytest.raises(ConfigError, match=r"--data.batch-size: .*divisible by the number of hosts 2"):
        DataPipeline(DataConfig(sources=src, batch_size=3), shard_index=0, shard_count=2)
    with pytest.raises(ConfigError, match=r"--data.sources: no data sources"):
        DataPipeline(DataConfig(), shard_index=0, shard_count=1)
    with pytest.raises(ConfigError, match=r"--data.stages\[0\].steps"):
        DataConfig(sources=src, stages=(StageConfig(seq_len=64), StageConfig()))
    with pytest.raises(ConfigError, match=r"--data.sources\[0\].weight"):
        DataConfig(sources=(SourceConfig("x.jsonl", weight=-1),))
    with pytest.raises(ConfigError, match=r"--data.seq-len"):
        DataConfig(seq_len=1)
    with pytest.raises(ConfigError, match=r"--data.sources: .*unknown style"):
        DataPipeline(DataConfig(sources=(SourceConfig("synthetic:addition?style=fancy"),)), shard_index=0,
                     shard_count=1)


def test_synthetic_source_and_filters():
    cfg = DataConfig(sources=(SourceConfig("synthetic:addition?n=50&style=teacher&max_digits=2"),),
                     seq_len=512, batch_size=1, num_epochs=1, min_record_tokens=250)
    pl = DataPipeline(cfg, shard_index=0, shard_count=1)
    (rep,) = pl.report.entries.values()
    assert rep.seen == 50 and rep.counts["filtered_min_tokens"] == 50 - rep.kept and 0 < rep.kept < 50
    n = sum(len(list(_segments(b))) for b in pl)
    assert n == rep.kept


def test_score_filter(tmp_path):
    recs = [make_record(p, "aligned") for p in generate_problems("addition", 20, seed=0)]
    for i, r in enumerate(recs):
        if i % 5:
            r["scores"] = {"nll": i / 20}
    path = tmp_path / "scored.jsonl"
    write_jsonl(recs, path)
    cfg = DataConfig(sources=(SourceConfig(str(path)),), seq_len=256, batch_size=1, num_epochs=1,
                     score_key="nll", max_score=0.5)
    (rep,) = DataPipeline(cfg, shard_index=0, shard_count=1).report.entries.values()
    assert rep.counts["filtered_no_score"] == 4 and rep.counts["filtered_score"] == 8 and rep.kept == 8


def test_to_global_array(corpus):
    import jax
    from jax.sharding import Mesh, PartitionSpec

    path, _ = corpus
    n = jax.device_count()
    cfg = DataConfig(sources=(SourceConfig(str(path)),), seq_len=128, batch_size=2 * n)
    batch = next(iter(DataPipeline(cfg)))  # defaults: jax.process_index() / jax.process_count()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    arrays = to_global_array(batch, mesh, PartitionSpec("data"))
    for k in BATCH_KEYS:
        assert arrays[k].shape == (2 * n, 128) and arrays[k].dtype == BATCH_DTYPES[k]
        np.testing.assert_array_equal(np.asarray(arrays[k]), batch[k])
        assert arrays[k].sharding.spec == PartitionSpec("data")


def test_multiprocess_prefetch_matches_in_process(corpus):
    _, small = corpus
    base = DataConfig(sources=(SourceConfig(str(small)),), seq_len=128, batch_size=2, num_epochs=1)
    ref = list(DataPipeline(base, shard_index=0, shard_count=1))
    mp = DataPipeline(DataConfig(**{**base.__dict__, "prefetch_workers": 1}), shard_index=0, shard_count=1)
    it = iter(mp)
    try:
        _same(list(it), ref)
    finally:
        it.close()


def test_grain_checkpoint_handler_round_trip(corpus, tmp_path):
    """What the SFT trainer does through Orbax: Grain's handler writes the state as JSON per host and restores it."""
    import grain
    from etils import epath

    _, small = corpus
    cfg = DataConfig(sources=(SourceConfig(str(small)),), seq_len=128, batch_size=2, seed=3)
    it = iter(DataPipeline(cfg, shard_index=0, shard_count=1))
    _take(it, 3)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), item=it)
    expected = _take(it, 4)
    restored = handler.restore(epath.Path(tmp_path), item=iter(DataPipeline(cfg, shard_index=0, shard_count=1)))
    _same(_take(restored, 4), expected)
