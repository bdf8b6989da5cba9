"""Alignment scoring: how well does each trace fit a model's own reasoning style? Score, then keep the ones that fit.

    python scripts/score_traces.py --policy runs/sft/final \
        --traces data/traces/addition-teacher-test.jsonl "synthetic:addition?style=aligned&n=200&split=test" \
        --out scored/kept.jsonl --keep-quantile 0.5

For the policy (a policy directory written by save_policy / scripts/convert_hf.py import, or a finished run
directory with final/) and each trace source (JSONL / Parquet / ArrayRecord file or a ``synthetic:...`` spec), every
record is templated exactly as SFT renders it and scored by its mean per-token NLL under the model over the trained
(assistant) tokens, plus format statistics: reasoning steps, lengths, answer line, answer correctness (when the
record has a reference answer).

The filter keeps a trace when it passes the format checks (an ``Answer:`` line, a correct answer where a reference
exists, ``--min-steps``/``--max-steps``) and then its NLL is at most ``--max-nll`` and/or within the lowest
``--keep-quantile`` fraction of the well-formed traces of its task (``--quantile-by all``: of all traces; neither
option given: format checks only). Outputs:

- ``--out``: the kept records (schema records, with ``scores[--score-key]`` set to the NLL, so SFT can filter
  again with ``--data.score-key nll --data.max-score X``);
- ``--scores-out`` (default: ``--out`` with ``.scores.jsonl``): one line per scored trace (input, id, task, style,
  nll, token counts, format stats, kept, reason);
- ``<out>.summary.json``; the console gets a table per (task, style), the ROC AUC of -NLL for the
  lowest-NLL style (or ``--positive-style``) against each other style of the same task, and a final JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Literal

from motif_jax import cli
from motif_jax.config import ConfigError, ModelConfig, parse_cli, require
from motif_jax.data.config import SourceConfig
from motif_jax.data.records import SkipReport, TraceFormatError, iter_valid, write_jsonl

# The model, the checkpoint and the data pipeline (JAX, Orbax, Grain) are imported where they are used: --help and a
# bad flag answer before they load.


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """Score traces under a policy and keep the ones that fit it."""

    policy: str = ""
    """A policy directory (model.yaml + params/) or a run directory with final/."""
    model: ModelConfig = ModelConfig()
    """Run-time fields of the policy's model (dtype, attention_impl, remat_policy, ...), as with --init-from."""
    traces: tuple[str, ...] = ()
    """Trace sources: JSONL / Parquet / ArrayRecord files or synthetic:<task>?style=...&n=... specs."""
    format: Literal["auto", "jsonl", "parquet", "arrayrecord"] = "auto"
    """File format of the trace files (auto: by extension)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Malformed records: raise (stop, naming file and line) or skip (counted and reported)."""
    out: str = "scored/kept.jsonl"
    """The kept traces (JSONL)."""
    scores_out: str = ""
    """Per-trace scores (JSONL; "" = --out with .scores.jsonl)."""
    score_key: str = "nll"
    """Key under which the NLL is stored in the kept records' ``scores``."""
    max_nll: float | None = None
    """Keep traces with NLL <= this (None: no threshold)."""
    keep_quantile: float | None = None
    """Keep the lowest-NLL fraction of the well-formed traces, in (0, 1] (None: no quantile)."""
    quantile_by: Literal["task", "all"] = "task"
    """Where the quantile is taken: within each task (NLL scales differ by task) or over all traces."""
    require_answer_line: bool = True
    """Format check: the trace ends with an answer line."""
    require_correct: bool = True
    """Format check: the answer is right (only records with a reference answer)."""
    min_steps: int = 0
    """Format check: at least this many reasoning steps."""
    max_steps: int = 0
    """Format check: at most this many reasoning steps (0 = no limit)."""
    max_tokens: int = 0
    """Records longer than this after the template (0 = the model's max_seq_len) are skipped and counted."""
    positive_style: str = ""
    """Style treated as "positive" for the ROC AUC report ("" = per task, the style with the lowest mean NLL)."""
    limit: int = 0
    """First N records of each source (0: all)."""
    batch_size: int = 32
    """Traces scored at once."""
    length_bucket: int = 64
    """Traces are padded to a multiple of this many tokens (few compiled shapes)."""

    def __post_init__(self) -> None:
        require(bool(self.policy), "policy", "give the model to score with (a policy or run directory)")
        require(bool(self.traces), "traces", "give at least one trace file or synthetic: spec")
        require(bool(self.out), "out", "give a path for the kept traces")
        require(bool(self.score_key), "score-key", "must not be empty")
        require(self.max_nll is None or self.max_nll >= 0, "max-nll", "must be >= 0")
        require(self.keep_quantile is None or 0 < self.keep_quantile <= 1, "keep-quantile", "must be in (0, 1]")
        require(self.min_steps >= 0, "min-steps", "must be >= 0")
        require(self.max_steps >= 0, "max-steps", "must be >= 0 (0: no limit)")
        require(self.max_steps == 0 or self.max_steps >= self.min_steps, "max-steps", "must be >= --min-steps")
        require(self.max_tokens >= 0, "max-tokens", "must be >= 0")
        require(self.limit >= 0, "limit", "must be >= 0")
        require(self.batch_size >= 1, "batch-size", "must be >= 1")
        require(self.length_bucket >= 1, "length-bucket", "must be >= 1")

    @property
    def scores_path(self) -> Path:
        if self.scores_out:
            return Path(self.scores_out)
        out = Path(self.out)
        stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
        return out.with_name(stem + ".scores.jsonl")


def load_traces(cfg: ScoreConfig) -> tuple[list[tuple[str, dict]], dict[str, SkipReport]]:
    """(input spec, validated record) for every source, and the skip report of each."""
    from motif_jax.data.pipeline import open_source

    items, reports = [], {}
    for spec in cfg.traces:
        try:
            reader = open_source(SourceConfig(path=spec, format=cfg.format))
        except ConfigError as e:
            raise ConfigError(str(e).replace("--data.sources", "--traces")) from None
        report = SkipReport()
        for n, (_, rec) in enumerate(iter_valid(reader, on_error=cfg.on_error, report=report)):
            if cfg.limit and n >= cfg.limit:
                break
            items.append((spec, rec))
        reports[spec] = report
    return items, reports


def score_traces(cfg: ScoreConfig) -> dict:
    from flax import nnx

    from motif_jax.data.scoring import render_records, score_records, select_traces, style_aucs, summarize
    from motif_jax.data.tokenizer import load_tokenizer
    from motif_jax.model.transformer import abstract_model
    from motif_jax.train.checkpoint import load_policy_params
    from motif_jax.train.state import resolve_model

    t0 = time.time()
    model_cfg, policy_dir, tok_spec = resolve_model(cfg.model, cfg.policy)
    params = load_policy_params(policy_dir, model_cfg)
    graphdef, _ = abstract_model(model_cfg)
    model = nnx.merge(graphdef, params)
    tokenizer = load_tokenizer(tok_spec)
    items, reports = load_traces(cfg)
    max_tokens = cfg.max_tokens or model_cfg.max_seq_len
    rendered_all = render_records([rec for _, rec in items], tokenizer)
    usable = []
    for (spec, rec), r in zip(items, rendered_all):
        if len(r[0]) > max_tokens:
            reports[spec].add("too_long", f"{spec}: record {rec['id']!r}: {len(r[0])} tokens after the template, "
                                          f"more than {max_tokens} (--max-tokens)")
            reports[spec].kept -= 1
        else:
            usable.append((spec, rec, r))
    if not usable:
        raise ConfigError("--traces: no record left to score (" +
                          "; ".join(f"{k}: {v.summary()}" for k, v in reports.items()) + ")")
    t_score = time.time()
    scores = score_records(model, tokenizer, [rec for _, rec, _ in usable], batch_size=cfg.batch_size,
                           length_bucket=cfg.length_bucket, rendered=[r for _, _, r in usable])
    score_s = time.time() - t_score
    reasons = select_traces(scores, max_nll=cfg.max_nll, keep_quantile=cfg.keep_quantile,
                            require_answer_line=cfg.require_answer_line, require_correct=cfg.require_correct,
                            min_steps=cfg.min_steps, max_steps=cfg.max_steps,
                            quantile_by=None if cfg.quantile_by == "all" else cfg.quantile_by)
    rows, kept_records = [], []
    for (spec, rec, _), s, reason in zip(usable, scores, reasons):
        rows.append({"input": spec, **s, "kept": reason is None, "reason": reason})
        if reason is None:
            kept_records.append({**rec, "scores": {**(rec.get("scores") or {}), cfg.score_key: s["nll"]}})
    write_jsonl(kept_records, cfg.out)
    write_jsonl(rows, cfg.scores_path)

    reason_counts: dict[str, int] = {}
    for r in reasons:
        if r is not None:
            reason_counts[r] = reason_counts.get(r, 0) + 1
    summary = {
        "policy": cfg.policy,
        "traces": list(cfg.traces),
        "scored": len(scores),
        "kept": len(kept_records),
        "dropped": reason_counts,
        "skipped": {k: v.to_dict() for k, v in reports.items() if v.skipped},
        "groups": summarize(rows, by=("task", "style")),
        "auc": style_aucs(scores, cfg.positive_style or None),
        "out": str(cfg.out),
        "scores_out": str(cfg.scores_path),
        "score_s": score_s,
        "tokens_per_s": sum(s["tokens"] for s in scores) / max(score_s, 1e-9),
        "wall_time_s": time.time() - t0,
    }
    Path(str(cfg.out) + ".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def print_summary(summary: dict) -> None:
    cols = ("task", "style", "count", "kept", "nll_mean", "nll_median", "steps_mean", "tokens_mean",
            "answer_line_rate", "correct_rate")
    table = [cols] + [tuple(_fmt(g.get(c)) for c in cols) for g in summary["groups"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths)))
    for a in summary["auc"]:
        print(f"ROC AUC {a['task']}: {a['positive']} vs {a['negative']} = {a['auc']:.3f} "
              f"(-NLL; {a['n_positive']} vs {a['n_negative']} traces)")
    for spec, rep in summary["skipped"].items():
        print(f"skipped in {spec}: {rep['counts']}")
    print(f"kept {summary['kept']} of {summary['scored']} traces -> {summary['out']} "
          f"(dropped: {summary['dropped'] or 'none'}); scores -> {summary['scores_out']}; "
          f"{summary['tokens_per_s']:.0f} tokens/s")
    print(json.dumps({k: summary[k] for k in ("scored", "kept", "dropped", "auc", "groups", "out", "scores_out",
                                              "wall_time_s")}))


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, or 2 after a one-line error."""
    return cli.run(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    cfg = parse_cli(ScoreConfig, argv, description=__doc__)
    from motif_jax.train.checkpoint import CheckpointNotFoundError

    try:
        summary = score_traces(cfg)
    except CheckpointNotFoundError as e:  # the shared messages name the trainers' flags; this script's differ
        raise CheckpointNotFoundError(str(e).replace("--init-from", "--policy")) from None
    except (ConfigError, TraceFormatError, FileNotFoundError) as e:
        raise type(e)(str(e).replace("check --data.sources", "check --traces")) from None
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
