"""Configuration of the SFT data pipeline (``--data.*`` flags); see motif_jax.data.pipeline and docs/data.md."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from motif_jax.config import ConfigError, require  # noqa: F401  (ConfigError re-exported for callers)

SourceFormat = Literal["auto", "jsonl", "parquet", "arrayrecord"]
OnError = Literal["raise", "skip"]
TooLong = Literal["raise", "skip", "truncate"]
Packing = Literal["first_fit", "best_fit"]


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One trace source: a JSONL / Parquet / ArrayRecord file, or generated traces
    (``synthetic:addition?style=aligned&n=20000&min_digits=3&max_digits=4``, see motif_jax.data.synthetic).
    ``weight`` is its share of records in a mixture (weights are normalised)."""

    path: str = ""
    weight: float = 1.0
    format: SourceFormat = "auto"


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One stage of a context-length / mixture curriculum. Zero or empty fields inherit the top-level value.
    ``steps``: batches produced in this stage (0 = until its data is exhausted; only the last stage may use 0)."""

    name: str = ""
    sources: tuple[SourceConfig, ...] = ()
    seq_len: int = 0
    batch_size: int = 0
    steps: int = 0
    lr: float = 0.0
    """Peak learning rate of this stage (0 = --optim.lr); used by the SFT trainer's schedule, not by the pipeline."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """SFT data: sources -> shuffle -> host shard -> validate -> chat template -> filters -> packing -> batches.

    ``batch_size`` is global (packed rows of ``seq_len`` tokens per step, over all hosts); each host gets
    ``batch_size // process_count`` rows. ``stages`` (optional) is a curriculum: each stage may change the sources
    and weights, the sequence length and the batch size, for ``steps`` batches; without stages the top-level fields
    form the only stage.
    """

    sources: tuple[SourceConfig, ...] = ()
    """Trace sources ({path, weight, format}); weights are mixture proportions."""
    seq_len: int = 512
    """Packed row length in tokens."""
    batch_size: int = 8
    """Global batch size in packed rows (each host gets batch_size // process_count)."""
    tokenizer: str = "byte"
    """'byte' or a Hugging Face tokenizer directory (or its tokenizer.json); with --init-from the policy's own."""
    chat_template: str = ""
    """A jinja chat template (file or text) replacing the tokenizer's own ('' = the model's template)."""
    special_tokens: dict[str, str] = dataclasses.field(default_factory=dict)
    """Special tokens replacing tokenizer_config.json's, e.g. '{"eos_token": "<|im_end|>"}'."""
    train_on_reasoning: bool = True
    """Put <think>reasoning</think> in the loss (it is always in the input)."""
    empty_think: bool = True
    """Give assistant turns without reasoning an empty <think></think> block."""
    on_error: OnError = "raise"
    """Malformed records: raise a TraceFormatError naming file, line and field, or skip and count them."""
    too_long: TooLong = "skip"
    """Records longer than min(seq_len, max_record_tokens) tokens: raise, skip (counted) or truncate."""
    max_record_tokens: int = 0
    """Longest record in template tokens (0 = seq_len)."""
    min_record_tokens: int = 0
    """Filter: drop (and count) records shorter than this."""
    score_key: str = ""
    """Filter: name of a records' 'scores' entry that min_score / max_score apply to."""
    min_score: float | None = None
    max_score: float | None = None
    seed: int = 0
    """Shuffle and packing seed."""
    num_epochs: int | None = None
    """None: repeat forever (the trainer stops by steps); k: k passes (a mixture stops when its first source runs
    out, Grain's mix semantics)."""
    packing: Packing = "first_fit"
    """Grain packing algorithm."""
    packing_bins: int = 0
    """Rows packed at once (more bins, denser packing); 0 = max(8, per-host batch size)."""
    read_threads: int = 0
    """Grain reader threads per process (0: read and render in the iterating thread, fastest for local files since
    the work holds the GIL; raise it for remote storage)."""
    read_buffer: int = 64
    """Records read ahead per process when read_threads > 0."""
    prefetch_workers: int = 0
    """Grain multiprocess prefetch workers (0 = in-process)."""
    prefetch_buffer: int = 4
    """Batches buffered per prefetch worker."""
    stages: tuple[StageConfig, ...] = ()
    """Curriculum stages (sources, seq_len, batch_size, steps); empty = one stage from the fields above."""

    def __post_init__(self) -> None:
        require(self.seq_len >= 2, "data.seq-len", f"must be >= 2, got {self.seq_len}")
        require(self.batch_size >= 1, "data.batch-size", f"must be >= 1, got {self.batch_size}")
        _check_sources(self.sources, "data.sources")
        require(bool(self.tokenizer), "data.tokenizer", "give 'byte' or a path to a tokenizer.json")
        require(self.on_error in ("raise", "skip"), "data.on-error", f"must be raise or skip, got {self.on_error!r}")
        require(self.too_long in ("raise", "skip", "truncate"), "data.too-long",
                 f"must be raise, skip or truncate, got {self.too_long!r}")
        require(self.max_record_tokens >= 0, "data.max-record-tokens", "must be >= 0 (0 = seq_len)")
        require(self.min_record_tokens >= 0, "data.min-record-tokens", "must be >= 0")
        require(self.max_record_tokens == 0 or self.min_record_tokens <= self.max_record_tokens,
                 "data.min-record-tokens", "must not exceed --data.max-record-tokens")
        if self.min_score is not None or self.max_score is not None:
            require(bool(self.score_key), "data.score-key", "set the score name that --data.min-score/max-score "
                     "filter on (a key of the records' 'scores' object)")
        if self.min_score is not None and self.max_score is not None:
            require(self.min_score <= self.max_score, "data.min-score", "must be <= --data.max-score")
        require(self.num_epochs is None or self.num_epochs >= 1, "data.num-epochs", "must be >= 1 or None (forever)")
        require(self.packing in ("first_fit", "best_fit"), "data.packing", "must be first_fit or best_fit")
        require(self.packing_bins >= 0, "data.packing-bins", "must be >= 0 (0 = auto)")
        require(self.read_threads >= 0, "data.read-threads", "must be >= 0")
        require(self.read_buffer >= 1, "data.read-buffer", "must be >= 1")
        require(self.prefetch_workers >= 0, "data.prefetch-workers", "must be >= 0")
        require(self.prefetch_buffer >= 1, "data.prefetch-buffer", "must be >= 1")
        for i, st in enumerate(self.stages):
            flag = f"data.stages[{i}]"
            _check_sources(st.sources, f"{flag}.sources")
            require(st.seq_len == 0 or st.seq_len >= 2, f"{flag}.seq-len", "must be >= 2 (or 0: inherit)")
            require(st.batch_size >= 0, f"{flag}.batch-size", "must be >= 0 (0: inherit)")
            require(st.steps >= 0, f"{flag}.steps", "must be >= 0")
            require(st.steps > 0 or i == len(self.stages) - 1, f"{flag}.steps",
                     "every stage but the last needs a positive number of steps")

    def resolved_stages(self) -> tuple[StageConfig, ...]:
        """The stages with inherited fields filled in (one stage built from the top level if none are given)."""
        stages = self.stages or (StageConfig(name="main"),)
        return tuple(
            dataclasses.replace(
                st,
                name=st.name or f"stage{i}",
                sources=st.sources or self.sources,
                seq_len=st.seq_len or self.seq_len,
                batch_size=st.batch_size or self.batch_size,
            )
            for i, st in enumerate(stages)
        )

    def record_limit(self, seq_len: int) -> int:
        """Longest record (template tokens) a stage of ``seq_len`` accepts before the ``too_long`` policy."""
        return min(seq_len, self.max_record_tokens) if self.max_record_tokens else seq_len


def _check_sources(sources: tuple[SourceConfig, ...], flag: str) -> None:
    for j, s in enumerate(sources):
        require(isinstance(s, SourceConfig), flag, f"entry {j} must be a mapping with path/weight/format")
        require(bool(s.path), f"{flag}[{j}].path", "must not be empty")
        require(math.isfinite(s.weight) and s.weight > 0, f"{flag}[{j}].weight", f"must be > 0, got {s.weight}")
        require(s.format in ("auto", "jsonl", "parquet", "arrayrecord"), f"{flag}[{j}].format",
                 "must be auto, jsonl, parquet or arrayrecord")
