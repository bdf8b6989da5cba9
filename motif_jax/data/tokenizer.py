"""Tokenizers: a built-in byte-level tokenizer and a wrapper around Hugging Face ``tokenizer.json`` files.

Both satisfy :class:`Tokenizer`. Special tokens are addressed by their canonical names (``<pad>``, ``<bos>``,
``<eos>``, ``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>``, ``<think>``, ``</think>``) so the chat
template (``motif_jax.data.template``) works with either.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
THINK, END_THINK = "<think>", "</think>"

# Names the chat template uses, in id order for the byte tokenizer.
CANONICAL_SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END, THINK, END_THINK)


class TokenizerError(ValueError):
    """A tokenizer file or a special token that cannot be used; the message says what to change."""


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, the template, generation and the verifiers need from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    special_tokens: dict[str, int]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings inside ``text`` become their special ids."""
        ...

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped when ``skip_special``."""
        ...

    def token_id(self, special: str) -> int:
        """Id of a special token by name (e.g. ``"<think>"``); raises :class:`TokenizerError` if absent."""
        ...


# ---------------------------------------------------------------------------------------------------------------------
# Byte-level tokenizer
# ---------------------------------------------------------------------------------------------------------------------

_BYTE_OFFSET = 16


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..15 are special tokens, id ``16 + b`` is byte ``b``; vocab_size 272.

    ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<|system|>``=3, ``<|user|>``=4, ``<|assistant|>``=5, ``<|end|>``=6,
    ``<think>``=7, ``</think>``=8, ``<|reserved_9|>`` ... ``<|reserved_15|>``. Special-token strings inside a text are
    encoded as their ids, so templates can be written as plain strings. Invalid UTF-8 decodes with ``errors="replace"``
    and ids outside the vocabulary (a model vocabulary padded for sharding) decode as U+FFFD.
    """

    vocab_size: int = 256 + _BYTE_OFFSET

    def __init__(self) -> None:
        names = list(CANONICAL_SPECIALS) + [f"<|reserved_{i}|>" for i in range(len(CANONICAL_SPECIALS), _BYTE_OFFSET)]
        self.special_tokens: dict[str, int] = {name: i for i, name in enumerate(names)}
        self._id_to_special = {i: name for name, i in self.special_tokens.items()}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        # Longest first so that e.g. "</think>" is not cut into "<" + "/think>" by a shorter match.
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(s) for s in alternatives))

    def __repr__(self) -> str:
        return "ByteTokenizer()"

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                out.extend(self._encode_plain(text[pos : m.start()]))
            out.append(self.special_tokens[m.group(0)])
            pos = m.end()
        if pos < len(text):
            out.extend(self._encode_plain(text[pos:]))
        return out

    @staticmethod
    def _encode_plain(text: str) -> list[int]:
        return (np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + _BYTE_OFFSET).tolist()

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        parts: list[str] = []
        buf = bytearray()
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if _BYTE_OFFSET <= i < self.vocab_size:
                buf.append(i - _BYTE_OFFSET)
                continue
            if buf:
                parts.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            if 0 <= i < _BYTE_OFFSET:
                if not skip_special:
                    parts.append(self._id_to_special[i])
            else:
                parts.append("\ufffd")
        if buf:
            parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def token_id(self, special: str) -> int:
        try:
            return self.special_tokens[special]
        except KeyError:
            raise TokenizerError(
                f"ByteTokenizer has no special token {special!r}; known: {', '.join(self.special_tokens)}"
            ) from None


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# ---------------------------------------------------------------------------------------------------------------------

# Canonical name -> spellings tried in order in a Hugging Face vocabulary.
HF_ALIASES: dict[str, tuple[str, ...]] = {
    PAD: ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>"),
    BOS: ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]", "<|endoftext|>"),
    EOS: ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "[SEP]"),
    SYSTEM: ("<|system|>",),
    USER: ("<|user|>",),
    ASSISTANT: ("<|assistant|>",),
    END: ("<|end|>",),
    THINK: ("<think>",),
    END_THINK: ("</think>",),
}


class HFTokenizer:
    """Wraps ``tokenizers.Tokenizer.from_file`` (a ``tokenizer.json`` or a directory holding one).

    Canonical special names are looked up with :data:`HF_ALIASES` (``special_map`` overrides: canonical name ->
    token string of this vocabulary, e.g. ``{"<|end|>": "<|im_end|>"}``). ``<bos>`` and ``<eos>`` must resolve; a
    missing ``<pad>`` falls back to ``<eos>``. Role and thinking tokens may be missing: :meth:`token_id` then raises a
    :class:`TokenizerError` naming the token, i.e. only when the chat template actually needs it.
    """

    def __init__(self, path: str | Path, special_map: Mapping[str, str] | None = None) -> None:
        import tokenizers  # deferred: importing the data package must stay cheap

        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise TokenizerError(
                f"tokenizer file not found: {p} (give --data.tokenizer 'byte' or a path to a tokenizer.json or to a "
                "directory containing one)"
            )
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(p))
        except Exception as e:  # the Rust library raises plain Exceptions
            raise TokenizerError(f"cannot load tokenizer {p}: {e}") from e
        self.path = str(p)
        self._special_map = dict(special_map or {})
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.special_tokens: dict[str, int] = {}
        for name, aliases in HF_ALIASES.items():
            override = (special_map or {}).get(name)
            candidates = ((override,) if override else ()) + aliases
            for s in candidates:
                i = self._tok.token_to_id(s)
                if i is not None:
                    self.special_tokens[name] = int(i)
                    break
        if special_map:
            for name, s in special_map.items():
                if self._tok.token_to_id(s) is None:
                    raise TokenizerError(f"{p}: special_map[{name!r}] = {s!r} is not a token of this vocabulary")
        for name in (BOS, EOS):
            if name not in self.special_tokens:
                raise TokenizerError(
                    f"{p}: no {name} token found (tried {', '.join(HF_ALIASES[name])}); add one to the tokenizer or "
                    f"pass special_map={{'{name}': '<your token>'}}"
                )
        self.special_tokens.setdefault(PAD, self.special_tokens[EOS])
        self.pad_id = self.special_tokens[PAD]
        self.bos_id = self.special_tokens[BOS]
        self.eos_id = self.special_tokens[EOS]

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < self.vocab_size]
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def token_id(self, special: str) -> int:
        i = self.special_tokens.get(special)
        if i is None:
            i = self._tok.token_to_id(self._special_map.get(special, special))
        if i is None:
            raise TokenizerError(
                f"{self.path}: the chat template needs the special token {special!r}, which this tokenizer lacks; "
                f"add it (tokenizer.add_special_tokens) or map it with special_map={{'{special}': '<existing token>'}}"
            )
        return int(i)


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; anything else is a path to a ``tokenizer.json`` (or its directory)."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)
