"""Evaluation shared by SFT and RL: exact-match accuracy of greedy generations on verifiable records.

A record (schema in docs/data.md) is prompted exactly as training rendered it (``render_prompt`` of its messages
up to the last assistant turn); the generated turn's content (after ``</think>``) is checked by the record's answer
check (``motif_jax.data.answers``: routed by its ``verifiers`` / ``answer_type`` / ``task``), the same verdict RL's
evaluation gives the record.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from motif_jax.data.answers import answer_correct
from motif_jax.data.template import prompt_messages, render_prompt, response_text, split_response, stop_token_ids
from motif_jax.data.tokenizer import Tokenizer
from motif_jax.model.generate import Generation, SamplingConfig, generate
from motif_jax.model.transformer import Decoder

Checker = Callable[[Mapping[str, Any], str], bool]


def default_checker(record: Mapping[str, Any], content: str) -> bool:
    """The record's answer check on ``content`` (``data.answers.answer_correct``). Raises ValueError for a record
    without one (code tests and format checks need RL's verifiers: ``rl.loop.make_checker``)."""
    return answer_correct(record, content)


def prompts_for(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer) -> list[list[int]]:
    return [render_prompt(prompt_messages(r["messages"]), tokenizer) for r in records]


def decode_responses(gen: Generation, tokenizer: Tokenizer) -> list[str]:
    """Generated turns as text (cut at the stop token, special tokens kept, so ``split_response`` finds ``</think>``)."""
    return [response_text(seq, tokenizer) for seq in gen.sequences()]


def exact_match(
    model: Decoder,
    tokenizer: Tokenizer,
    records: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    checker: Checker = default_checker,
    num_examples: int = 3,
) -> dict[str, Any]:
    """Greedy exact-match accuracy over ``records``. Returns accuracy, count and a few (prompt, response) examples."""
    if not records:
        raise ValueError("exact_match: no evaluation records")
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, greedy=True, stop_tokens=stop_token_ids(tokenizer))
    correct, examples, truncated = 0, [], 0
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        gen = generate(model, prompts_for(chunk, tokenizer), jax.random.key(0), sampling, pad_id=tokenizer.pad_id)
        truncated += int(np.sum(gen.finish_reason == 1))
        for record, text in zip(chunk, decode_responses(gen, tokenizer)):
            ok = checker(record, split_response(text)[1])
            correct += ok
            if len(examples) < num_examples:
                examples.append({"question": record["messages"][0]["content"], "response": text, "correct": ok})
    return {
        "accuracy": correct / len(records),
        "num_records": len(records),
        "truncated_fraction": truncated / len(records),
        "examples": examples,
    }
