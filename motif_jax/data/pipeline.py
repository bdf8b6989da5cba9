"""SFT data pipeline on Grain: trace sources -> packed, host-sharded numpy batches -> global jax.Arrays.

Per stage of the curriculum (``DataConfig.stages``, or the top level as the only stage)::

    scan every source once (parse + validate + template length; bad records raise or are counted)
      -> per source: grain.MapDataset.range(n).shuffle(seed)[shard_index::shard_count].repeat(num_epochs)
         .map(read + validate + chat template + tokenize)        (length / score filters applied by index)
      -> grain.MapDataset.mix(sources, weights)                  (when there are several sources)
      -> .to_iter_dataset()
      -> grain.experimental.FirstFitPackIterDataset (or BestFit) to seq_len
      -> .batch(batch_size // shard_count, pad the last partial batch with empty rows)
      -> .map(finalize) -> optional .mp_prefetch(workers)

Each batch is a dict of numpy arrays of shape ``[batch_per_host, seq_len]``:

  ``tokens``      int32   input ids (``pad_id`` on padding)
  ``targets``     int32   next token of the same segment (``pad_id`` where there is none: padding and the last
                          token of every segment, so no target ever crosses a segment boundary)
  ``loss_mask``   float32 1.0 where ``targets`` is a token the model is trained to produce (assistant output), else 0
  ``segment_ids`` int32   0 on padding, 1..k for the k records packed in the row
  ``positions``   int32   position inside the segment (restarts at 0; 0 on padding)

The iterator (:class:`DataIterator`) is a ``grain.DatasetIterator``: ``get_state()`` / ``set_state()`` restore it
exactly (stage, step in stage, Grain state), so the SFT trainer checkpoints it with Orbax next to the parameters
via Grain's handler (``grain.checkpoint.CheckpointSave(iterator)`` / ``CheckpointRestore(iterator)`` in an
``ocp.args.Composite``); the state is per host (``process_<i>-of-<n>.json``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Mapping

import grain
import numpy as np

from motif_jax.config import ConfigError, require
from motif_jax.data.config import DataConfig, SourceConfig, StageConfig
from motif_jax.data.records import (
    MemoryReader,
    RecordReader,
    SkipReport,
    TraceFormatError,
    iter_valid,
    open_reader,
)
from motif_jax.data.synthetic import is_synthetic_spec, synthetic_records
from motif_jax.data.template import apply_template
from motif_jax.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer

log = logging.getLogger(__name__)

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
BATCH_DTYPES = {"tokens": np.int32, "targets": np.int32, "loss_mask": np.float32, "segment_ids": np.int32,
                "positions": np.int32}


# ---------------------------------------------------------------------------------------------------------------------
# Scanning: one validation + length pass per source, shared by all stages.
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SourceIndex:
    """The valid records of one source: raw indices, template lengths and (optional) scores."""

    name: str
    reader: RecordReader
    indices: np.ndarray  # [n] int64: raw record index in the reader
    lengths: np.ndarray  # [n] int32: tokens after the chat template
    scores: np.ndarray  # [n] float64: value of DataConfig.score_key (nan when absent or no key)
    report: SkipReport


def open_source(src: SourceConfig) -> RecordReader:
    """The reader of one configured source (a file, or generated records for a ``synthetic:`` spec)."""
    if is_synthetic_spec(src.path):
        try:
            return MemoryReader(synthetic_records(src.path), name=src.path)
        except ValueError as e:
            raise ConfigError(f"--data.sources: {e}") from None
    return open_reader(src.path, src.format)


def scan_source(src: SourceConfig, tokenizer: Tokenizer, cfg: DataConfig) -> SourceIndex:
    """Reads every record of ``src`` once: validation (``cfg.on_error``) and token count after the template."""
    reader = open_source(src)
    report = SkipReport()
    idx, lens, scores = [], [], []
    first_seen: dict[str, str] = {}  # record id -> where it first appeared

    def bad(err: TraceFormatError) -> None:
        if cfg.on_error == "raise":
            raise err
        report.kept -= 1
        report.add_error(err)

    for i, rec in iter_valid(reader, on_error=cfg.on_error, report=report):
        where = reader.location(i)
        if rec["id"] in first_seen:
            bad(TraceFormatError(f"duplicate record id {rec['id']!r} (first at {first_seen[rec['id']]}); ids must be "
                                 "unique within a source", path=reader.path, location=where, field="id",
                                 reason="duplicate_id"))
            continue
        first_seen[rec["id"]] = where
        try:
            toks, _ = apply_template(rec["messages"], tokenizer, train_on_reasoning=cfg.train_on_reasoning,
                                     empty_think=cfg.empty_think)
        except TokenizerError:
            raise  # the tokenizer itself does not fit the template: one error for the run, not one per record
        except Exception as e:  # noqa: BLE001 - any failure to render or tokenize this record is the record's
            bad(TraceFormatError(f"cannot be rendered and tokenized: {type(e).__name__}: {e}", path=reader.path,
                                 location=where, field="messages", reason="tokenizer"))
            continue
        idx.append(i)
        lens.append(len(toks))
        scores.append(rec.get("scores", {}).get(cfg.score_key, math.nan) if cfg.score_key else math.nan)
    return SourceIndex(src.path, reader, np.asarray(idx, np.int64), np.asarray(lens, np.int32),
                       np.asarray(scores, np.float64), report)


@dataclasses.dataclass
class DataReport:
    """Per stage and source: what was read, kept, skipped (errors) and filtered, with examples."""

    entries: dict[str, SkipReport] = dataclasses.field(default_factory=dict)  # key "stage:source"

    @property
    def skipped(self) -> int:
        return sum(r.skipped for r in self.entries.values())

    def to_dict(self) -> dict[str, Any]:
        return {k: r.to_dict() for k, r in self.entries.items()}

    def summary(self) -> str:
        return "\n".join(f"[{k}] {r.summary()}" for k, r in self.entries.items())


def _select(sidx: SourceIndex, cfg: DataConfig, stage: StageConfig, report: SkipReport) -> np.ndarray:
    """Positions (into ``sidx``) of the records a stage uses; too-long and filtered records are counted."""
    limit = cfg.record_limit(stage.seq_len)
    keep = np.ones(len(sidx.indices), dtype=bool)
    too_long = sidx.lengths > limit
    if too_long.any() and cfg.too_long != "truncate":
        for j in np.flatnonzero(too_long):
            err = TraceFormatError(
                f"{int(sidx.lengths[j])} tokens after the chat template, more than the limit {limit} "
                "(--data.seq-len / --data.max-record-tokens)"
                + ("; set --data.too-long skip or truncate to go on" if cfg.too_long == "raise" else ""),
                path=sidx.name, location=sidx.reader.location(int(sidx.indices[j])), reason="too_long")
            if cfg.too_long == "raise":
                raise err
            report.add_error(err)
        keep &= ~too_long
    if cfg.min_record_tokens:
        short = keep & (sidx.lengths < cfg.min_record_tokens)
        for j in np.flatnonzero(short)[: report.max_examples]:
            report.examples.setdefault("filtered_min_tokens", []).append(
                f"{sidx.name}:{sidx.reader.location(int(sidx.indices[j]))}: {int(sidx.lengths[j])} tokens")
        report.counts["filtered_min_tokens"] += int(short.sum())
        keep &= ~short
    if cfg.score_key and (cfg.min_score is not None or cfg.max_score is not None):
        s = sidx.scores
        lo = -np.inf if cfg.min_score is None else cfg.min_score
        hi = np.inf if cfg.max_score is None else cfg.max_score
        missing = keep & np.isnan(s)
        out = keep & ~np.isnan(s) & ((s < lo) | (s > hi))
        report.counts["filtered_no_score"] += int(missing.sum())
        report.counts["filtered_score"] += int(out.sum())
        keep &= ~(missing | out)
        for k in ("filtered_no_score", "filtered_score"):
            if report.counts[k] == 0:
                del report.counts[k]
    report.kept = int(keep.sum())
    return np.flatnonzero(keep)


# ---------------------------------------------------------------------------------------------------------------------
# Per-record and per-batch transforms (picklable: they run in prefetch worker processes).
# ---------------------------------------------------------------------------------------------------------------------


class RenderRecord:
    """Index -> ``{"packed": int32 [n, 3]}`` with columns (token, next-token target, target-in-loss)."""

    def __init__(self, reader: RecordReader, raw_indices: np.ndarray, tokenizer: Tokenizer, *, limit: int,
                 train_on_reasoning: bool, empty_think: bool) -> None:
        self.reader, self.raw_indices, self.tokenizer = reader, raw_indices, tokenizer
        self.limit, self.train_on_reasoning, self.empty_think = limit, train_on_reasoning, empty_think

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        raw_i = int(self.raw_indices[i])
        rec = self.reader.record(raw_i)  # validated again: cheap, and safe if the file changed since the scan
        tokens, mask = apply_template(rec["messages"], self.tokenizer, train_on_reasoning=self.train_on_reasoning,
                                      empty_think=self.empty_think)
        tokens, mask = tokens[: self.limit], mask[: self.limit]  # only "truncate" lets longer records through
        out = np.empty((len(tokens), 3), dtype=np.int32)
        out[:, 0] = tokens
        out[:-1, 1] = tokens[1:]
        out[-1, 1] = self.tokenizer.pad_id  # the segment's last token has no target inside the segment
        out[:-1, 2] = mask[1:]
        out[-1, 2] = 0
        return {"packed": out}


def finalize_batch(batch: Mapping[str, np.ndarray], *, pad_id: int) -> dict[str, np.ndarray]:
    """Packed ``{"packed": [B, L, 3], "packed_segment_ids", "packed_positions"}`` -> the batch dict (BATCH_KEYS)."""
    p, seg = batch["packed"], batch["packed_segment_ids"].astype(np.int32)
    pad = seg == 0
    return {
        "tokens": np.where(pad, pad_id, p[..., 0]).astype(np.int32),
        "targets": np.where(pad, pad_id, p[..., 1]).astype(np.int32),
        "loss_mask": np.where(pad, 0, p[..., 2]).astype(np.float32),
        "segment_ids": seg,
        "positions": np.where(pad, 0, batch["packed_positions"]).astype(np.int32),
    }


def _ensure_absl_flags_parsed() -> None:
    """Grain's multiprocess prefetch reads absl flags; our entry points use tyro, so mark absl's (default) flags as
    parsed instead of failing with UnparsedFlagAccessError."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline and iterator
# ---------------------------------------------------------------------------------------------------------------------


class DataPipeline:
    """Builds the Grain datasets of every stage of ``cfg`` for one host.

    Args:
      cfg: the data configuration.
      tokenizer: a tokenizer; default ``load_tokenizer(cfg.tokenizer)``.
      shard_index / shard_count: this host's shard; default ``jax.process_index()`` / ``jax.process_count()``.

    Construction scans every source once (see :func:`scan_source`); errors surface here, before training starts.
    ``iter(pipeline)`` gives a checkpointable :class:`DataIterator`; :attr:`report` says what was skipped.
    """

    def __init__(self, cfg: DataConfig, *, tokenizer: Tokenizer | None = None, shard_index: int | None = None,
                 shard_count: int | None = None) -> None:
        if shard_index is None or shard_count is None:
            import jax

            shard_index = jax.process_index() if shard_index is None else shard_index
            shard_count = jax.process_count() if shard_count is None else shard_count
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(
            cfg.tokenizer, chat_template=cfg.chat_template, special_tokens=cfg.special_tokens)
        self.shard_index, self.shard_count = shard_index, shard_count
        self.stages = cfg.resolved_stages()
        for i, st in enumerate(self.stages):
            own = cfg.stages[i] if cfg.stages else StageConfig()
            require(bool(st.sources), f"data.stages[{i}].sources" if cfg.stages else "data.sources",
                     "no data sources: give at least one {path, weight}")
            require(st.batch_size % shard_count == 0,
                     f"data.stages[{i}].batch-size" if own.batch_size else "data.batch-size",
                     f"the global batch size {st.batch_size} must be divisible by the number of hosts {shard_count}")
        self._scans: dict[tuple[str, str], SourceIndex] = {}
        for st in self.stages:
            for src in st.sources:
                key = (src.path, src.format)
                if key not in self._scans:
                    self._scans[key] = scan_source(src, self.tokenizer, cfg)
        self.report = DataReport()
        self._selected: list[list[np.ndarray]] = []
        for st in self.stages:
            sel = []
            for src in st.sources:
                sidx = self._scans[(src.path, src.format)]
                rep = SkipReport()
                rep.merge(sidx.report)
                chosen = _select(sidx, cfg, st, rep)
                self.report.entries[f"{st.name}:{src.path}"] = rep
                if len(chosen) < shard_count:
                    raise TraceFormatError(
                        f"only {len(chosen)} usable records for {shard_count} host(s) in stage {st.name!r}:\n"
                        + rep.summary(), path=src.path, reason="empty_source")
                sel.append(chosen)
            self._selected.append(sel)
        if shard_index == 0:
            (log.warning if self.report.skipped else log.info)("data pipeline:\n%s", self.report.summary())

    def batch_size_per_host(self, stage: int = 0) -> int:
        return self.stages[stage].batch_size // self.shard_count

    def num_records(self, stage: int = 0) -> int:
        """Usable records in a stage over all hosts (one epoch)."""
        return int(sum(len(s) for s in self._selected[stage]))

    def stage_dataset(self, stage: int) -> grain.IterDataset:
        """The Grain dataset of batches for one stage on this host."""
        cfg, st = self.cfg, self.stages[stage]
        limit = cfg.record_limit(st.seq_len)
        per_source = []
        for j, src in enumerate(st.sources):
            sidx = self._scans[(src.path, src.format)]
            raw = sidx.indices[self._selected[stage][j]]
            ds = grain.MapDataset.range(len(raw)).shuffle(seed=_seed(cfg.seed, stage, j))
            ds = ds[self.shard_index :: self.shard_count]
            ds = ds.repeat(cfg.num_epochs)
            ds = ds.map(RenderRecord(sidx.reader, raw, self.tokenizer, limit=limit,
                                     train_on_reasoning=cfg.train_on_reasoning, empty_think=cfg.empty_think))
            per_source.append(ds)
        if len(per_source) == 1:
            mixed = per_source[0]
        else:
            mixed = grain.MapDataset.mix(per_source, [s.weight for s in st.sources])
        read = (grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer)
                if cfg.read_threads else grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        it_ds = mixed.to_iter_dataset(read)
        bph = self.batch_size_per_host(stage)
        pack_cls = (grain.experimental.FirstFitPackIterDataset if cfg.packing == "first_fit"
                    else grain.experimental.BestFitPackIterDataset)
        it_ds = pack_cls(it_ds, length_struct={"packed": st.seq_len},
                         num_packing_bins=cfg.packing_bins or max(8, bph), seed=_seed(cfg.seed, stage, 1 << 20),
                         shuffle_bins=True)
        it_ds = it_ds.batch(bph, batch_fn=functools.partial(grain.experimental.batch_and_pad, batch_size=bph))
        it_ds = it_ds.map(functools.partial(finalize_batch, pad_id=self.tokenizer.pad_id))
        if cfg.prefetch_workers > 0:
            _ensure_absl_flags_parsed()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.prefetch_workers,
                                                                   per_worker_buffer_size=cfg.prefetch_buffer))
        return it_ds

    def __iter__(self) -> "DataIterator":
        return DataIterator(self)


class DataIterator(grain.DatasetIterator):
    """Batches of all stages in order; checkpointable with ``get_state`` / ``set_state`` (JSON-serialisable).

    A stage ends after its ``steps`` batches, or when its data runs out (finite ``num_epochs``); the iterator stops
    after the last stage. ``seq_len`` / ``batch_size_per_host`` / ``stage_name`` describe the next batch's stage.
    """

    def __init__(self, pipeline: DataPipeline) -> None:
        super().__init__()
        self._pipeline = pipeline
        self._stage, self._step = 0, 0
        self._it: grain.DatasetIterator | None = None

    @property
    def report(self) -> DataReport:
        return self._pipeline.report

    @property
    def stage(self) -> int:
        return self._stage

    @property
    def stage_name(self) -> str:
        return self._pipeline.stages[self._stage].name

    @property
    def seq_len(self) -> int:
        return self._pipeline.stages[self._stage].seq_len

    @property
    def batch_size_per_host(self) -> int:
        return self._pipeline.batch_size_per_host(self._stage)

    def _inner(self) -> grain.DatasetIterator:
        if self._it is None:
            self._it = iter(self._pipeline.stage_dataset(self._stage))
        return self._it

    def _advance(self) -> None:
        if self._it is not None:
            self._it.close()
        self._it = None
        self._stage += 1
        self._step = 0

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        stages = self._pipeline.stages
        while True:
            if self._stage >= len(stages):
                raise StopIteration
            steps = stages[self._stage].steps
            if steps and self._step >= steps:
                self._advance()
                continue
            try:
                batch = next(self._inner())
            except StopIteration:
                self._advance()
                continue
            self._step += 1
            return batch

    def get_state(self) -> dict[str, Any]:
        inner = self._inner().get_state() if self._stage < len(self._pipeline.stages) else None
        return {"stage": self._stage, "step": self._step, "inner": inner}

    def set_state(self, state: dict[str, Any]) -> None:
        n = len(self._pipeline.stages)
        if not (isinstance(state, dict) and {"stage", "step", "inner"} <= set(state) and 0 <= state["stage"] <= n):
            raise ValueError(f"not a DataIterator state for a {n}-stage pipeline: {str(state)[:200]}")
        if self._it is not None:
            self._it.close()
            self._it = None
        self._stage, self._step = int(state["stage"]), int(state["step"])
        if self._stage < n and state["inner"] is not None:
            self._inner().set_state(state["inner"])

    def start_prefetch(self) -> None:
        if self._stage < len(self._pipeline.stages):
            self._inner().start_prefetch()

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None
        self._closed = True


def make_data_iterator(cfg: DataConfig, *, tokenizer: Tokenizer | None = None, shard_index: int | None = None,
                       shard_count: int | None = None) -> DataIterator:
    """``iter(DataPipeline(cfg, ...))``."""
    return iter(DataPipeline(cfg, tokenizer=tokenizer, shard_index=shard_index, shard_count=shard_count))


def to_global_array(batch: Mapping[str, np.ndarray], mesh: Any, partition_spec: Any) -> dict[str, Any]:
    """Per-host numpy batch ``[B_per_host, L]`` -> global ``jax.Array``s ``[B_per_host * hosts, L]``.

    Uses ``jax.make_array_from_process_local_data`` with ``NamedSharding(mesh, partition_spec)`` (typically
    ``PartitionSpec(("data", "fsdp"), "context")`` or the logical-axis rules' spec for ``(batch, length)``); each
    host passes the rows it loaded, which must be its share of the batch axis under that sharding.
    """
    import jax

    sharding = jax.sharding.NamedSharding(mesh, partition_spec)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def packing_stats(batch: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Real tokens, loss tokens, segments and fill ratio of one batch."""
    seg = batch["segment_ids"]
    real = int((seg > 0).sum())
    segments = int(sum(len(np.unique(r[r > 0])) for r in seg))
    return {"tokens": real, "loss_tokens": float(batch["loss_mask"].sum()), "segments": segments,
            "fill": real / seg.size}
