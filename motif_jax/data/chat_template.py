"""Jinja chat templates rendered the way transformers' ``apply_chat_template`` renders them, and the character
spans of the assistant turns (where the loss mask goes). See :mod:`motif_jax.data.template` for how a tokenizer's
template turns a conversation into token ids and a loss mask.

Rendering: a sandboxed jinja2 environment with ``trim_blocks`` and ``lstrip_blocks``, the special tokens
(``bos_token``, ``eos_token`` ...) and ``add_generation_prompt`` as variables, ``tojson``, ``raise_exception`` and
``strftime_now`` available, and transformers' ``{% generation %}`` block. A message's ``reasoning`` is passed as
``reasoning_content`` (the name Qwen3-style templates read), so the template writes the ``<think>`` block its own way.
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox

__all__ = ["BUILTIN_TEMPLATE", "BUILTIN_TOKENS", "ChatTemplate", "TemplateError"]

# The project's own format (the byte tokenizer's template). ``empty_think`` gives assistant turns without reasoning
# an empty <think></think> block, so every response has the same shape.
BUILTIN_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m.role == 'system' %}<|system|>{{ m.content }}<|end|>"
    "{% elif m.role == 'user' %}<|user|>{{ m.content }}<|end|>"
    "{% elif m.role == 'assistant' %}<|assistant|>"
    "{% if m.reasoning_content is not none or empty_think %}<think>{{ m.reasoning_content or '' }}</think>{% endif %}"
    "{{ m.content }}<|end|>"
    "{% else %}{{ raise_exception('unknown role ' ~ m.role ~ '; expected system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% else %}{{ eos_token }}{% endif %}"
)
BUILTIN_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

_GEN_OPEN, _GEN_CLOSE = "\ue000", "\ue001"  # private-use marks around {% generation %} output, removed after


class TemplateError(ValueError):
    """A chat template that cannot render a conversation or give its loss mask; the message names the flag."""


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' marker of assistant tokens): the body is emitted
    between two private-use characters, from which :meth:`ChatTemplate.render` reads the spans."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
        return _GEN_OPEN + caller() + _GEN_CLOSE


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                   ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


class ChatTemplate:
    """A jinja chat template with the special-token strings it is rendered with (picklable: the compiled template
    is looked up from a cache by its source, so a Grain worker process recompiles it once).

    ``source``: the template text; ``variables``: ``bos_token``, ``eos_token``, ... (missing ones render as '');
    ``name``: where it came from (for messages); ``flag``: the flag that sets it (named in errors).
    """

    def __init__(self, source: str, variables: Mapping[str, str] | None = None, *, name: str = "",
                 flag: str = "data.chat-template"):
        self.source = source
        self.variables = dict(variables or {})
        self.name = name or "chat template"
        self.flag = flag
        try:
            _compile(source)  # compiled (and cached) once here so a bad template fails at start-up
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise TemplateError(f"--{flag}: {self.name} is not a valid jinja template: {e.message} (line "
                                f"{e.lineno})") from None

    @property
    def is_builtin(self) -> bool:
        return self.source == BUILTIN_TEMPLATE

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
               **kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
        """(text, the character spans of its ``{% generation %}`` blocks). Messages use the trace schema
        (``reasoning`` is passed on as ``reasoning_content``)."""
        msgs = [{**{k: v for k, v in m.items() if k != "reasoning"},
                 **({"reasoning_content": m["reasoning"]} if m.get("reasoning") is not None else {})}
                for m in messages]
        variables = {"empty_think": True, **self.variables, **kwargs}
        try:
            text = _compile(self.source).render(messages=msgs, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:
            raise TemplateError(f"--{self.flag}: {self.name} cannot render this conversation: {e}") from None
        spans, out, pos = [], [], 0
        for piece in text.split(_GEN_OPEN):
            if _GEN_CLOSE in piece:
                inside, rest = piece.split(_GEN_CLOSE, 1)
                spans.append((pos, pos + len(inside)))
                out.append(inside + rest)
                pos += len(inside) + len(rest)
            else:
                out.append(piece)
                pos += len(piece)
        return "".join(out), spans

    def assistant_spans(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
        """(rendered conversation, character spans of its assistant turns); see the module docstring."""
        full, marked = self.render(messages, **kwargs)
        spans = marked or self._prefix_spans(full, messages, **kwargs)
        for i, (a, b) in zip([i for i, m in enumerate(messages) if m["role"] == "assistant"], spans):
            reasoning = (messages[i].get("reasoning") or "").strip()
            if reasoning and reasoning not in full[a:b]:
                raise TemplateError(
                    f"--{self.flag}: {self.name} does not render the reasoning of assistant turn {i} "
                    "(reasoning_content) where that turn is trained; give a template that writes it, or train on "
                    "records without reasoning")
        return full, spans

    def _prefix_spans(self, full: str, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> list[tuple[int, int]]:
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix, _ = self.render(messages[:i], add_generation_prompt=True, **kwargs)
            if not full.startswith(prefix):
                raise TemplateError(
                    f"--{self.flag}: {self.name} renders the prompt of assistant turn {i} differently from the whole "
                    "conversation, so the loss mask cannot be found by rendering prefixes; give a template with "
                    "{% generation %} markers or train on conversations with one assistant turn")
            if i == len(messages) - 1:
                end = len(full)
            else:
                through, _ = self.render(messages[: i + 1], **kwargs)
                end = len(_common_prefix(full, through))
            if m["content"] and m["content"] not in full[len(prefix):end]:
                raise TemplateError(
                    f"--{self.flag}: {self.name} renders assistant turn {i} differently inside the whole conversation "
                    "(e.g. it drops the reasoning of earlier turns), so its loss mask cannot be found by rendering "
                    "prefixes; give a template with {% generation %} markers or train on one assistant turn")
            spans.append((len(prefix), end))
        return spans


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]
