"""Tokenizers: a built-in byte-level tokenizer and a Hugging Face tokenizer directory, each with its chat template.

Both satisfy :class:`Tokenizer`. A Hugging Face tokenizer brings what the model brings: its vocabulary
(``tokenizer.json``), its special tokens (``bos_token`` / ``eos_token`` / ``pad_token`` of ``tokenizer_config.json``;
a model may have no BOS at all, as Qwen3), its chat template (``tokenizer_config.json`` or ``chat_template.jinja``)
and its stop tokens (``eos_token_id`` of ``generation_config.json`` plus the EOS token: a Qwen-style end-of-turn
token stops generation). Nothing is guessed: a value that is missing and needed is a one-line
:class:`TokenizerError` naming what to set (``--data.special-tokens``, ``--data.chat-template``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from motif_jax.data.chat_template import BUILTIN_TEMPLATE, BUILTIN_TOKENS, ChatTemplate

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
THINK, END_THINK = "<think>", "</think>"

# Special tokens of the byte tokenizer, in id order.
CANONICAL_SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END, THINK, END_THINK)
# The template variables a tokenizer_config.json may name (as transformers' special_tokens_map does).
TEMPLATE_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


class TokenizerError(ValueError):
    """A tokenizer file or a special token that cannot be used; the message says what to change."""


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, the template, generation and the verifiers need from a tokenizer.

    ``pad_id`` fills batches (never trained on, never attended); ``stop_ids`` end a generated turn;
    ``chat_template`` renders conversations (:mod:`motif_jax.data.template`).
    """

    vocab_size: int
    pad_id: int
    stop_ids: tuple[int, ...]
    special_tokens: dict[str, int]
    chat_template: ChatTemplate

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings inside ``text`` become their special ids."""
        ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` and each token's (start, end) character offsets in it."""
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
        self.stop_ids = (self.special_tokens[END], self.eos_id)
        self.chat_template = ChatTemplate(BUILTIN_TEMPLATE, {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD},
                                          name="the built-in template")
        # Longest first so that e.g. "</think>" is not cut into "<" + "/think>" by a shorter match.
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(s) for s in alternatives))

    def __repr__(self) -> str:
        return "ByteTokenizer()"

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        pos = 0
        for m in [*self._special_re.finditer(text), None]:
            stop = len(text) if m is None else m.start()
            for i, ch in enumerate(text[pos:stop], start=pos):  # every byte of a character points at it
                b = ch.encode("utf-8")
                ids.extend(x + _BYTE_OFFSET for x in b)
                offsets.extend([(i, i + 1)] * len(b))
            if m is not None:
                ids.append(self.special_tokens[m.group(0)])
                offsets.append((m.start(), m.end()))
                pos = m.end()
        return ids, offsets

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

    def save(self, directory: str | Path) -> None:
        """Nothing to write: a policy directory names this tokenizer as ``byte``."""

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

class HFTokenizer:
    """A Hugging Face tokenizer directory (``tokenizer.json`` and its neighbours), or a ``tokenizer.json`` file.

    ``chat_template``: a jinja template (text, or a path to a ``.jinja`` file) replacing the directory's own;
    ``special_tokens``: ``{"eos_token": "<|im_end|>", ...}`` replacing what ``tokenizer_config.json`` says. The
    template is the directory's; without one the built-in template is used if the vocabulary has its role tokens,
    else a :class:`TokenizerError` asks for ``--data.chat-template``.
    """

    def __init__(self, path: str | Path, *, chat_template: str = "", special_tokens: Mapping[str, str] | None = None):
        import tokenizers  # deferred: importing the data package must stay cheap

        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise TokenizerError(
                f"tokenizer file not found: {file} (give --data.tokenizer 'byte' or a path to a tokenizer.json or to a "
                "directory containing one)"
            )
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust library raises plain Exceptions
            raise TokenizerError(f"cannot load tokenizer {file}: {e}") from None
        self.path, self.directory = str(file), file.parent
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.special_tokens = {t.content: int(i) for i, t in self._tok.get_added_tokens_decoder().items()}
        config = _read_json(self.directory / "tokenizer_config.json")
        names = {k: _token_text(config.get(k)) for k in TEMPLATE_TOKENS if _token_text(config.get(k))}
        names.update({k: v for k, v in (special_tokens or {}).items() if v})
        for key, text in names.items():
            if self._tok.token_to_id(text) is None:
                raise TokenizerError(f"{self.directory}: {key} {text!r} is not a token of this vocabulary; fix "
                                     "tokenizer_config.json or --data.special-tokens")
        self.token_names = names  # template variable -> token text
        self.chat_template = self._template(chat_template, config, names)
        self.stop_ids = self._stop_ids(names)
        if "pad_token" in names:
            self.pad_id = self._tok.token_to_id(names["pad_token"])
        else:  # padding is never trained on nor attended: any id serves; transformers users set pad = eos too
            self.pad_id = self.stop_ids[0]

    def _template(self, override: str, config: Mapping, names: Mapping[str, str]) -> ChatTemplate:
        flag = "data.chat-template"
        if override:
            path = Path(override)
            if path.suffix == ".jinja" or path.is_file():
                if not path.is_file():
                    raise TokenizerError(f"--{flag}: no such file {override}")
                return ChatTemplate(path.read_text(), names, name=str(path), flag=flag)
            return ChatTemplate(override, names, name="the template given with --data.chat-template", flag=flag)
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        jinja_file = self.directory / "chat_template.jinja"
        if not source and jinja_file.is_file():
            source = jinja_file.read_text()
        if source:
            return ChatTemplate(source, names, name=f"the chat template of {self.directory}", flag=flag)
        missing = [t for t in BUILTIN_TOKENS if self._tok.token_to_id(t) is None]
        if missing:
            raise TokenizerError(
                f"--{flag}: {self.directory} has no chat template (tokenizer_config.json 'chat_template' or "
                f"chat_template.jinja) and lacks the built-in format's tokens {missing}; give the model's template "
                "with --data.chat-template FILE.jinja")
        return ChatTemplate(BUILTIN_TEMPLATE, names, name="the built-in template", flag=flag)

    def _stop_ids(self, names: Mapping[str, str]) -> tuple[int, ...]:
        ids: list[int] = []
        if self.chat_template.is_builtin:
            ids.append(self._tok.token_to_id(END))
        generation = _read_json(self.directory / "generation_config.json").get("eos_token_id")
        ids.extend(generation if isinstance(generation, list) else [generation] if generation is not None else [])
        if "eos_token" in names:
            ids.append(self._tok.token_to_id(names["eos_token"]))
        ids = list(dict.fromkeys(int(i) for i in ids if i is not None))
        if not ids:
            raise TokenizerError(
                f"{self.directory}: no stop token (neither tokenizer_config.json 'eos_token' nor generation_config.json "
                "'eos_token_id'); set --data.special-tokens '{\"eos_token\": \"<your end-of-turn token>\"}'")
        return tuple(ids)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"

    @property
    def eos_id(self) -> int:
        return self.stop_ids[-1]

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < self.vocab_size]
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{self.path}: no token {token!r} in this vocabulary")
        return int(i)

    def config_token_ids(self) -> dict[str, int | list[int] | None]:
        """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` for a Hugging Face ``config.json``: what this
        tokenizer renders and stops on (several stop tokens give a list, as Llama-3.1 and Qwen3 configs do)."""
        bos = self.token_names.get("bos_token")
        return {"bos_token_id": None if bos is None else self._tok.token_to_id(bos),
                "eos_token_id": self.stop_ids[0] if len(self.stop_ids) == 1 else list(self.stop_ids),
                "pad_token_id": self.pad_id}

    def save(self, directory: str | Path) -> None:
        """Writes the tokenizer as it is used here (vocabulary, special tokens, chat template) to ``directory``, so
        a policy directory, an export and every later stage render and stop exactly the same way."""
        import shutil

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if Path(self.path).resolve() != (out / "tokenizer.json").resolve():
            shutil.copyfile(self.path, out / "tokenizer.json")
        config = _read_json(self.directory / "tokenizer_config.json")
        config.update({k: v for k, v in self.token_names.items()})
        config["chat_template"] = self.chat_template.source
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (out / "chat_template.jinja").write_text(self.chat_template.source)
        generation = _read_json(self.directory / "generation_config.json")
        generation["eos_token_id"] = list(self.stop_ids)
        generation["pad_token_id"] = self.pad_id
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str | None:
    """A tokenizer_config.json special token: a string or an AddedToken dict ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def load_tokenizer(spec: str, *, chat_template: str = "", special_tokens: Mapping[str, str] | None = None) -> Tokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; anything else is a Hugging Face tokenizer directory or ``tokenizer.json``
    (see :class:`HFTokenizer` for ``chat_template`` and ``special_tokens``)."""
    if spec == "byte":
        if chat_template or special_tokens:
            raise TokenizerError("--data.chat-template / --data.special-tokens: the byte tokenizer has its own "
                                 "fixed format; they apply to a Hugging Face tokenizer")
        return ByteTokenizer()
    return HFTokenizer(spec, chat_template=chat_template, special_tokens=special_tokens)
