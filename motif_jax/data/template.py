"""Chat template with thinking delimiters: token ids plus the loss mask, and the matching generation prompt.

One conversation renders as::

    <bos><|system|>S<|end|><|user|>U<|end|><|assistant|><think>R</think>C<|end|><eos>

(the system turn only when present). The loss mask is true on the tokens the model must learn to produce: for each
assistant turn ``<think>R</think>`` (only with ``train_on_reasoning``) and ``C<|end|>``, plus the final ``<eos>``
when the conversation ends with an assistant turn. ``<|assistant|>`` itself is prompt. An assistant turn without
reasoning still gets an empty ``<think></think>`` block when ``empty_think`` (the default), so every response has
the same shape and :func:`render_prompt` can end either at ``<|assistant|>`` or at ``<|assistant|><think>``.

Segments are tokenised one by one and special tokens are inserted by id, so the mask lines up exactly with the
tokens for any tokenizer (byte-level or BPE). The cost is that a BPE merge never spans a segment boundary, which is
the same convention at training and generation time, so it does not matter.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from motif_jax.data.tokenizer import (
    ASSISTANT,
    END,
    END_THINK,
    SYSTEM,
    THINK,
    USER,
    Tokenizer,
)

_ROLE_TOKEN = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


def _turn_segments(
    tok: Tokenizer, m: Mapping[str, Any], *, train_on_reasoning: bool, empty_think: bool
) -> list[tuple[list[int], bool]]:
    role = m["role"]
    if role not in _ROLE_TOKEN:
        raise ValueError(f"unknown role {role!r}; expected system, user or assistant")
    segs: list[tuple[list[int], bool]] = [([tok.token_id(_ROLE_TOKEN[role])], False)]
    if role != "assistant":
        segs.append((tok.encode(m["content"]) + [tok.token_id(END)], False))
        return segs
    reasoning = m.get("reasoning")
    if reasoning is not None or empty_think:
        body = tok.encode(reasoning) if reasoning else []
        segs.append(([tok.token_id(THINK)] + body + [tok.token_id(END_THINK)], train_on_reasoning))
    segs.append((tok.encode(m["content"]) + [tok.token_id(END)], True))
    return segs


def apply_template(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    *,
    train_on_reasoning: bool = True,
    empty_think: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Renders a conversation for training.

    Args:
      messages: ``[{"role", "content", "reasoning"?}, ...]`` as in the trace schema (motif_jax.data.records).
      tokenizer: any :class:`~motif_jax.data.tokenizer.Tokenizer`.
      train_on_reasoning: include ``<think>reasoning</think>`` in the loss (it is always in the input).
      empty_think: give assistant turns without reasoning an empty ``<think></think>`` block.

    Returns:
      ``(tokens, loss_mask)``: ``tokens`` int32 [n]; ``loss_mask`` bool [n], true where the token is one the model
      is trained to produce (the data pipeline turns it into the mask of next-token targets).
    """
    ids: list[int] = [tokenizer.bos_id]
    mask: list[bool] = [False]
    for m in messages:
        for seg, on in _turn_segments(tokenizer, m, train_on_reasoning=train_on_reasoning, empty_think=empty_think):
            ids.extend(seg)
            mask.extend([on] * len(seg))
    ends_with_assistant = bool(messages) and messages[-1]["role"] == "assistant"
    ids.append(tokenizer.eos_id)
    mask.append(ends_with_assistant)
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)


def prompt_messages(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The conversation up to (not including) its last assistant turn: what a model is prompted with."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return list(messages[:last])


def render_prompt(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    *,
    open_think: bool = False,
    empty_think: bool = True,
) -> list[int]:
    """Token ids that prompt the model for the next assistant turn, exactly as training rendered it.

    ``messages`` must end with a user (or system) turn (use :func:`prompt_messages` on a full record). The result
    ends with ``<|assistant|>``, or with ``<|assistant|><think>`` when ``open_think``. Earlier assistant turns are
    rendered as in training. Generation should stop at :func:`stop_token_ids`.
    """
    if messages and messages[-1]["role"] == "assistant":
        raise ValueError("render_prompt: the conversation ends with an assistant turn; pass prompt_messages(messages)")
    ids = [tokenizer.bos_id]
    for m in messages:
        for seg, _ in _turn_segments(tokenizer, m, train_on_reasoning=True, empty_think=empty_think):
            ids.extend(seg)
    ids.append(tokenizer.token_id(ASSISTANT))
    if open_think:
        ids.append(tokenizer.token_id(THINK))
    return ids


def stop_token_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Ids that end an assistant turn: ``<|end|>`` and ``<eos>``."""
    return (tokenizer.token_id(END), tokenizer.eos_id)


def chat_text(messages: Sequence[Mapping[str, Any]], *, empty_think: bool = True, add_eos: bool = True) -> str:
    """The template as a plain string (for reading and docs); ``ByteTokenizer().encode`` of it gives the same ids
    as :func:`apply_template` when the texts contain no special-token strings."""
    out = ["<bos>"]
    for m in messages:
        out.append(_ROLE_TOKEN[m["role"]])
        if m["role"] == "assistant" and (m.get("reasoning") is not None or empty_think):
            out.append(f"{THINK}{m.get('reasoning') or ''}{END_THINK}")
        out.append(m["content"] + END)
    if add_eos:
        out.append("<eos>")
    return "".join(out)


def split_response(text: str) -> tuple[str | None, str]:
    """Splits a generated assistant turn (decoded with specials) into ``(reasoning, content)``.

    Accepts text with or without the leading ``<think>`` (a prompt rendered with ``open_think`` already holds it);
    strips a trailing ``<|end|>`` / ``<eos>`` and anything after it. ``reasoning`` is None when there is no
    ``</think>``.
    """
    for stop in (END, "<eos>"):
        if stop in text:
            text = text.split(stop, 1)[0]
    if END_THINK not in text:
        return None, text
    head, content = text.split(END_THINK, 1)
    reasoning = head.split(THINK, 1)[1] if THINK in head else head
    return reasoning, content
