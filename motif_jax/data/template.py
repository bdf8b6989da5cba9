"""Chat templates as data: conversations render through the model's own jinja template, as transformers renders it,
and the loss mask comes from the rendering.

Every tokenizer carries a :class:`ChatTemplate` (``tokenizer.chat_template``): a Hugging Face tokenizer the one in
its ``tokenizer_config.json`` / ``chat_template.jinja`` (or ``--data.chat-template``), the byte tokenizer (and a
model without a template whose vocabulary has the built-in role tokens) :data:`BUILTIN_TEMPLATE`::

    <bos><|system|>S<|end|><|user|>U<|end|><|assistant|><think>R</think>C<|end|><eos>

Rendering follows transformers' ``apply_chat_template``: a sandboxed jinja2 environment with ``trim_blocks`` and
``lstrip_blocks``, the special tokens (``bos_token``, ``eos_token`` ...) and ``add_generation_prompt`` as variables,
``tojson`` and ``raise_exception`` available. A message's ``reasoning`` is passed as ``reasoning_content`` (the name
Qwen3-style templates read), so the template writes the ``<think>`` block its own way. The rendered text is
tokenised whole (as transformers does), so ids equal ``apply_chat_template(..., tokenize=True)``.

The loss mask is true on the characters of each assistant turn: the text a template emits inside
``{% generation %}...{% endgeneration %}`` where it has such markers, else the span between the rendering of the
conversation before the turn with ``add_generation_prompt=True`` and the rendering through the turn (for the last
turn: the end of the text, which takes in an end-of-conversation token such as ``<eos>``). A token is in the mask
when it starts inside such a span; with ``train_on_reasoning=False`` the ``<think>...</think>`` part is left out. A
template whose earlier turns do not render as a prefix of the whole conversation (e.g. one that drops the reasoning
of earlier turns) cannot give a mask that way and is refused naming the flag.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from motif_jax.data.chat_template import BUILTIN_TEMPLATE, ChatTemplate, TemplateError
from motif_jax.data.tokenizer import END_THINK, THINK, Tokenizer

__all__ = [
    "BUILTIN_TEMPLATE",
    "ChatTemplate",
    "TemplateError",
    "apply_template",
    "chat_text",
    "prompt_messages",
    "render_prompt",
    "response_text",
    "split_response",
    "stop_token_ids",
]

def _through_last_stop(text: str, spans: list[tuple[int, int]], stops: Sequence[str]) -> list[tuple[int, int]]:
    """Each span ends right after the last stop token in it: the model learns to stop, not the separator a
    template writes after the stop token (``<|im_end|>\n``), as transformers' ``{% generation %}`` spans do."""
    out = []
    for a, b in spans:
        ends = [text.rfind(s, a, b) + len(s) for s in stops if s and text.rfind(s, a, b) >= 0]
        out.append((a, max(ends) if ends else b))
    return out


def _without_reasoning(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The spans with every ``<think>...</think>`` block inside them cut out."""
    out = []
    for start, end in spans:
        pos = start
        while True:
            a = text.find(THINK, pos, end)
            b = text.find(END_THINK, a, end) if a >= 0 else -1
            if a < 0 or b < 0:
                break
            out.append((pos, a))
            pos = b + len(END_THINK)
        out.append((pos, end))
    return [(a, b) for a, b in out if b > a]


def apply_template(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    *,
    train_on_reasoning: bool = True,
    empty_think: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Renders a conversation for training with the tokenizer's chat template.

    Args:
      messages: ``[{"role", "content", "reasoning"?}, ...]`` as in the trace schema (motif_jax.data.records).
      tokenizer: any :class:`~motif_jax.data.tokenizer.Tokenizer` (its ``chat_template`` is used).
      train_on_reasoning: include the ``<think>...</think>`` block in the loss (it is always in the input).
      empty_think: the built-in template gives assistant turns without reasoning an empty ``<think></think>``.

    Returns:
      ``(tokens, loss_mask)``: ``tokens`` int32 [n]; ``loss_mask`` bool [n], true where the token is one the model
      is trained to produce (the data pipeline turns it into the mask of next-token targets).
    """
    text, spans = tokenizer.chat_template.assistant_spans(messages, empty_think=empty_think)
    spans = _through_last_stop(text, spans, [tokenizer.decode([i], skip_special=False) for i in tokenizer.stop_ids])
    if not train_on_reasoning:
        spans = _without_reasoning(text, spans)
    ids, offsets = tokenizer.encode_with_offsets(text)
    starts = np.asarray([o[0] for o in offsets], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        mask |= (starts >= a) & (starts < b)
    return np.asarray(ids, dtype=np.int32), mask


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
    """Token ids that prompt the model for the next assistant turn: the template with ``add_generation_prompt``.

    ``messages`` must end with a user (or system) turn (use :func:`prompt_messages` on a full record). With
    ``open_think`` the prompt also opens the reasoning block (``<think>``). Generation should stop at
    :func:`stop_token_ids`.
    """
    if messages and messages[-1]["role"] == "assistant":
        raise ValueError("render_prompt: the conversation ends with an assistant turn; pass prompt_messages(messages)")
    text, _ = tokenizer.chat_template.render(messages, add_generation_prompt=True, empty_think=empty_think)
    return tokenizer.encode(text + (THINK if open_think else ""))


def stop_token_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Ids that end an assistant turn (the tokenizer's: ``<|end|>`` / ``<eos>``, or a model's end-of-turn tokens)."""
    return tuple(tokenizer.stop_ids)


def response_text(tokens: Sequence[int], tokenizer: Tokenizer) -> str:
    """A generated turn as text: cut before the first stop token, decoded with special tokens kept (``<think>``)."""
    stops = set(tokenizer.stop_ids)
    cut = next((i for i, t in enumerate(tokens) if int(t) in stops), len(tokens))
    return tokenizer.decode(list(tokens[:cut]), skip_special=False)


def chat_text(messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer | None = None, *,
              add_generation_prompt: bool = False) -> str:
    """The rendered conversation as text (for reading and docs); the built-in format without a tokenizer."""
    from motif_jax.data.tokenizer import ByteTokenizer

    tok = tokenizer or ByteTokenizer()
    return tok.chat_template.render(messages, add_generation_prompt=add_generation_prompt)[0]


def split_response(text: str) -> tuple[str | None, str]:
    """Splits a generated assistant turn (decoded with specials) into ``(reasoning, content)``.

    Accepts text with or without the leading ``<think>`` (a prompt rendered with ``open_think`` already holds it);
    strips a trailing ``<|end|>`` / ``<eos>`` and anything after it (text cut by :func:`response_text` has none).
    ``reasoning`` is None when there is no ``</think>``; whitespace the template puts around the block is stripped.
    """
    for stop in ("<|end|>", "<eos>"):
        if stop in text:
            text = text.split(stop, 1)[0]
    if END_THINK not in text:
        return None, text
    head, content = text.split(END_THINK, 1)
    reasoning = head.split(THINK, 1)[1] if THINK in head else head
    if reasoning.startswith("\n") or content.startswith("\n"):  # a template that writes <think>\nR\n</think>\n\n
        reasoning, content = reasoning.strip("\n"), content.lstrip("\n")
    return reasoning, content
