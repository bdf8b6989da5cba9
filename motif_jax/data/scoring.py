"""Trace-alignment scoring: how well does each trace fit the target model's own reasoning style?

The recipe's central SFT finding is that synthetic traces help only when their structure matches the student's
style. The measurable proxy used here is the target model's mean per-token negative log-likelihood of the trace's
trained tokens (the assistant turn, reasoning included), plus format statistics (reasoning steps, length, answer
line). Low NLL = the model already "speaks" that way. ``filter_by_score`` keeps the traces that fit, by a threshold
or a quantile; ``summarize`` gives a table per (source, style).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels import linear_log_probs
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
    """Structure of the (last) assistant turn: reasoning steps (non-empty lines), characters, answer line."""
    turn = next((m for m in reversed(record["messages"]) if m["role"] == "assistant"), {})
    reasoning = turn.get("reasoning") or ""
    content = turn.get("content", "")
    return {
        "steps": sum(1 for line in reasoning.splitlines() if line.strip()),
        "reasoning_chars": len(reasoning),
        "content_chars": len(content),
        "has_answer_line": extract_answer(content) is not None,
    }


def score_records(
    model: Decoder,
    tokenizer: Tokenizer,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 32,
    length_bucket: int = 64,
) -> list[dict[str, Any]]:
    """Per record: id, source, style, task, mean token NLL of its trained tokens, token count and format stats.

    Records are templated exactly as SFT renders them (reasoning in the loss), padded to a multiple of
    ``length_bucket`` and scored in batches; padding never enters a sum.
    """
    graphdef, state = nnx.split(model)
    rendered = [apply_template(r["messages"], tokenizer) for r in records]
    out: list[dict[str, Any]] = []
    for start in range(0, len(records), batch_size):
        chunk = rendered[start : start + batch_size]
        length = -(-max(len(t) for t, _ in chunk) // length_bucket) * length_bucket
        tokens = np.full((len(chunk), length), tokenizer.pad_id, np.int32)
        targets = np.zeros_like(tokens)
        mask = np.zeros(tokens.shape, np.float32)
        for i, (ids, trained) in enumerate(chunk):
            n = len(ids)
            tokens[i, :n] = ids
            targets[i, : n - 1] = ids[1:]
            mask[i, : n - 1] = trained[1:]  # the mask of next-token targets
        nll_sum, count = jax.device_get(_batch_nll(graphdef, state, tokens, targets, mask))
        for j, (s, c) in enumerate(zip(nll_sum, count)):
            rec = records[start + j]
            prov = rec.get("provenance") or {}
            out.append({
                "id": rec.get("id"),
                "task": rec.get("task"),
                "source": prov.get("source"),
                "style": prov.get("style"),
                "nll": float(s / max(c, 1.0)),
                "trained_tokens": int(c),
                **format_stats(rec),
            })
    return out


def filter_by_score(
    scores: Sequence[Mapping[str, Any]], *, max_nll: float | None = None, keep_quantile: float | None = None
) -> list[Mapping[str, Any]]:
    """Keeps the traces that fit: NLL <= ``max_nll``, and/or the ``keep_quantile`` fraction with the lowest NLL."""
    if max_nll is None and keep_quantile is None:
        raise ValueError("give max_nll (a threshold) or keep_quantile (a fraction in (0, 1]) to filter by")
    kept = [s for s in scores if max_nll is None or s["nll"] <= max_nll]
    if keep_quantile is not None:
        if not 0 < keep_quantile <= 1:
            raise ValueError(f"keep_quantile must be in (0, 1], got {keep_quantile}")
        cutoff = np.quantile([s["nll"] for s in scores], keep_quantile)
        kept = [s for s in kept if s["nll"] <= cutoff]
    return kept


def summarize(scores: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (source, style): count, mean / median NLL, mean steps, tokens and answer-line rate."""
    groups: dict[tuple, list] = defaultdict(list)
    for s in scores:
        groups[(s.get("source"), s.get("style"))].append(s)
    rows = []
    for (source, style), items in sorted(groups.items(), key=lambda kv: str(kv[0])):
        nll = np.array([s["nll"] for s in items])
        rows.append({
            "source": source,
            "style": style,
            "count": len(items),
            "nll_mean": float(nll.mean()),
            "nll_median": float(np.median(nll)),
            "steps_mean": float(np.mean([s["steps"] for s in items])),
            "tokens_mean": float(np.mean([s["trained_tokens"] for s in items])),
            "answer_line_rate": float(np.mean([s["has_answer_line"] for s in items])),
        })
    return rows


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counted half (Mann-Whitney U)."""
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if pos.size == 0 or neg.size == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))
