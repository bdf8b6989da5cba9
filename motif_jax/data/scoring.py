"""Trace-alignment scoring: how well does each trace fit the target model's own reasoning style?

The recipe's central SFT finding is that synthetic traces help only when their structure matches the student's
style. The measurable proxy used here is the target model's mean per-token negative log-likelihood of the trace's
trained tokens (the assistant turn, reasoning included), plus format statistics (reasoning steps, length, answer
line, answer correctness). Low NLL = the model already "speaks" that way. ``select_traces`` keeps the traces that
fit (format checks, then an NLL threshold and/or quantile) and says why each other one was dropped;
``filter_by_score`` is its NLL-only form; ``summarize`` gives a table per group (default (source, style));
``roc_auc`` measures how well NLL separates two styles. ``scripts/score_traces.py`` is the command line.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from motif_kernels import linear_log_probs
from motif_jax.data.answers import answer_check, answer_correct
from motif_jax.data.synthetic import extract_answer
from motif_jax.data.template import apply_template
from motif_jax.data.tokenizer import Tokenizer
from motif_jax.model.transformer import Decoder


def _token_logprobs(model: Decoder, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    """[B, L] tokens / next-token targets -> [B, L] log p(target) via the fused LM-head (no [B*L, V] logits)."""
    hidden, _ = model(tokens)
    b, l, d = hidden.shape
    logp, _ = linear_log_probs(hidden.reshape(b * l, d), model.output_projection(), targets.reshape(b * l))
    return logp.reshape(b, l)


@jax.jit
def _batch_nll(graphdef, state, tokens, targets, mask):
    model = nnx.merge(graphdef, state)
    logp = _token_logprobs(model, tokens, targets)
    return -jnp.sum(logp * mask, axis=1), jnp.sum(mask, axis=1)


def format_stats(record: Mapping[str, Any]) -> dict[str, Any]:
    """Structure of the (last) assistant turn: reasoning steps (non-empty lines), characters, answer line, and
    ``answer_correct`` (the answer line checked against the record's reference ``answer``; None without one)."""
    turn = next((m for m in reversed(record["messages"]) if m["role"] == "assistant"), {})
    reasoning = turn.get("reasoning") or ""
    content = turn.get("content", "")
    return {
        "steps": sum(1 for line in reasoning.splitlines() if line.strip()),
        "reasoning_chars": len(reasoning),
        "content_chars": len(content),
        "has_answer_line": extract_answer(content) is not None,
        # the evaluation's verdict (data.answers), so a kept trace is one the trainers would score as right
        "answer_correct": None if answer_check(record) is None else answer_correct(record, content),
    }


def render_records(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids, loss mask) of each record, templated exactly as SFT renders it (reasoning in the loss)."""
    return [apply_template(r["messages"], tokenizer) for r in records]


def score_records(
    model: Decoder,
    tokenizer: Tokenizer,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 32,
    length_bucket: int = 64,
    rendered: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
) -> list[dict[str, Any]]:
    """Per record (in input order): id, source, style, task, mean token NLL of its trained tokens (``nll``), their
    count (``trained_tokens``), the templated length (``tokens``) and :func:`format_stats`.

    Records are templated exactly as SFT renders them (``rendered`` may pass :func:`render_records`' output to
    avoid doing it twice), sorted by length so a batch holds similar lengths, right-padded to a multiple of
    ``length_bucket`` and scored ``batch_size`` rows at a time (short batches padded with empty rows, so each
    length bucket compiles once); padding never enters a sum. The model runs on the default device.
    """
    if batch_size < 1 or length_bucket < 1:
        raise ValueError(f"batch_size and length_bucket must be >= 1, got {batch_size}, {length_bucket}")
    graphdef, state = nnx.split(model)
    rendered = list(rendered) if rendered is not None else render_records(records, tokenizer)
    if len(rendered) != len(records):
        raise ValueError(f"{len(rendered)} rendered records for {len(records)} records")
    order = sorted(range(len(records)), key=lambda i: len(rendered[i][0]))
    nll = np.zeros(len(records), np.float64)
    trained = np.zeros(len(records), np.int64)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        length = -(-max(len(rendered[i][0]) for i in idx) // length_bucket) * length_bucket
        tokens = np.full((batch_size, length), tokenizer.pad_id, np.int32)
        targets = np.zeros_like(tokens)
        mask = np.zeros(tokens.shape, np.float32)
        for row, i in enumerate(idx):
            ids, in_loss = rendered[i]
            n = len(ids)
            tokens[row, :n] = ids
            targets[row, : n - 1] = ids[1:]
            mask[row, : n - 1] = in_loss[1:]  # the mask of next-token targets
        nll_sum, count = jax.device_get(_batch_nll(graphdef, state, tokens, targets, mask))
        for row, i in enumerate(idx):
            nll[i] = nll_sum[row] / max(count[row], 1.0)
            trained[i] = int(count[row])
    out: list[dict[str, Any]] = []
    for i, rec in enumerate(records):
        prov = rec.get("provenance") or {}
        out.append({
            "id": rec.get("id"),
            "task": rec.get("task"),
            "source": prov.get("source"),
            "style": prov.get("style"),
            "nll": float(nll[i]),
            "trained_tokens": int(trained[i]),
            "tokens": int(len(rendered[i][0])),
            **format_stats(rec),
        })
    return out


def format_reject_reason(
    score: Mapping[str, Any], *, require_answer_line: bool = True, require_correct: bool = True,
    min_steps: int = 0, max_steps: int = 0,
) -> str | None:
    """Why a scored trace fails the format checks (None: it passes).

    Reasons: ``no_answer_line``; ``wrong_answer`` (only when the record had a reference answer); ``too_few_steps``
    / ``too_many_steps`` (reasoning lines outside ``[min_steps, max_steps]``; ``max_steps`` 0 = no limit).
    """
    if require_answer_line and not score["has_answer_line"]:
        return "no_answer_line"
    if require_correct and score.get("answer_correct") is False:
        return "wrong_answer"
    if score["steps"] < min_steps:
        return "too_few_steps"
    if max_steps and score["steps"] > max_steps:
        return "too_many_steps"
    return None


def select_traces(
    scores: Sequence[Mapping[str, Any]], *, max_nll: float | None = None, keep_quantile: float | None = None,
    require_answer_line: bool = True, require_correct: bool = True, min_steps: int = 0, max_steps: int = 0,
    quantile_by: str | None = None,
) -> list[str | None]:
    """Per score, None (kept) or the reason it was dropped: first the format checks (:func:`format_reject_reason`),
    then ``nll_above_max`` (NLL > ``max_nll``) and ``nll_above_quantile`` (NLL above the ``keep_quantile`` quantile
    of the traces that passed the format checks). With neither ``max_nll`` nor ``keep_quantile`` only the format
    checks apply. ``quantile_by`` (e.g. "task"): the quantile is taken within each value of that key, so a task
    whose traces are harder for the model is not dropped wholesale by a cut made on another task's scale.
    """
    if keep_quantile is not None and not 0 < keep_quantile <= 1:
        raise ValueError(f"keep_quantile must be in (0, 1], got {keep_quantile}")
    reasons = [format_reject_reason(s, require_answer_line=require_answer_line, require_correct=require_correct,
                                    min_steps=min_steps, max_steps=max_steps) for s in scores]
    cutoffs: dict[Any, float] = {}
    if keep_quantile is not None:
        well_formed: dict[Any, list[float]] = defaultdict(list)
        for s, r in zip(scores, reasons):
            if r is None:
                well_formed[s.get(quantile_by) if quantile_by else None].append(s["nll"])
        cutoffs = {k: float(np.quantile(v, keep_quantile)) for k, v in well_formed.items()}
    for i, s in enumerate(scores):
        if reasons[i] is None:
            if max_nll is not None and s["nll"] > max_nll:
                reasons[i] = "nll_above_max"
            elif s["nll"] > cutoffs.get(s.get(quantile_by) if quantile_by else None, math.inf):
                reasons[i] = "nll_above_quantile"
    return reasons


def filter_by_score(
    scores: Sequence[Mapping[str, Any]], *, max_nll: float | None = None, keep_quantile: float | None = None
) -> list[Mapping[str, Any]]:
    """Keeps the traces that fit: NLL <= ``max_nll``, and/or the ``keep_quantile`` fraction with the lowest NLL
    (no format checks; see :func:`select_traces` for those)."""
    if max_nll is None and keep_quantile is None:
        raise ValueError("give max_nll (a threshold) or keep_quantile (a fraction in (0, 1]) to filter by")
    reasons = select_traces(scores, max_nll=max_nll, keep_quantile=keep_quantile, require_answer_line=False,
                            require_correct=False)
    return [s for s, r in zip(scores, reasons) if r is None]


def summarize(scores: Iterable[Mapping[str, Any]], by: Sequence[str] = ("source", "style")) -> list[dict[str, Any]]:
    """One row per group (the values of the ``by`` keys, default (source, style)): count, mean / median NLL, mean
    steps, trained tokens, answer-line rate, correct-answer rate (over records with a reference; None if none) and,
    when the scores carry a ``kept`` flag, the kept count."""
    groups: dict[tuple, list] = defaultdict(list)
    for s in scores:
        groups[tuple(s.get(k) for k in by)].append(s)
    rows = []
    for key, items in sorted(groups.items(), key=lambda kv: str(kv[0])):
        nll = np.array([s["nll"] for s in items])
        checked = [s["answer_correct"] for s in items if s.get("answer_correct") is not None]
        row = dict(zip(by, key))
        row.update({
            "count": len(items),
            "nll_mean": float(nll.mean()),
            "nll_median": float(np.median(nll)),
            "steps_mean": float(np.mean([s["steps"] for s in items])),
            "tokens_mean": float(np.mean([s["trained_tokens"] for s in items])),
            "answer_line_rate": float(np.mean([s["has_answer_line"] for s in items])),
            "correct_rate": float(np.mean(checked)) if checked else None,
        })
        if any("kept" in s for s in items):
            row["kept"] = int(sum(bool(s.get("kept")) for s in items))
        rows.append(row)
    return rows


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counted half (Mann-Whitney U).

    Computed from average ranks, O((n+m) log(n+m)); NaN when either side is empty. To ask "does NLL pick out
    style A?", pass negated NLLs (lower NLL = higher score).
    """
    pos, neg = np.asarray(positive, np.float64).ravel(), np.asarray(negative, np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        return math.nan
    both = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    # average 1-based rank of each distinct value: ties share the mean of the ranks they span
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = avg_rank[inverse[: pos.size]].sum()
    u = rank_sum - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def style_aucs(scores: Sequence[Mapping[str, Any]], positive_style: str | None = None) -> list[dict[str, Any]]:
    """Per task, how well low NLL picks out ``positive_style`` against each other style present (ROC AUC of -NLL).

    ``positive_style`` None: per task, the style with the lowest mean NLL. Tasks with fewer than two styles (or
    without the positive one) give no rows.
    """
    by_task: dict[Any, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in scores:
        by_task[s.get("task")][s.get("style")].append(s["nll"])
    rows = []
    for task, styles in sorted(by_task.items(), key=lambda kv: str(kv[0])):
        if len(styles) < 2:
            continue
        pos = positive_style if positive_style is not None else min(styles, key=lambda k: np.mean(styles[k]))
        if pos not in styles:
            continue
        for neg, values in sorted(styles.items(), key=lambda kv: str(kv[0])):
            if neg == pos:
                continue
            rows.append({"task": task, "positive": pos, "negative": neg,
                         "auc": roc_auc([-x for x in styles[pos]], [-x for x in values]),
                         "n_positive": len(styles[pos]), "n_negative": len(values)})
    return rows
