"""Tokenizers (byte-level and Hugging Face tokenizer.json) and the chat template's loss masks."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from motif_jax.data.chat_template import TemplateError
from motif_jax.data.template import (
    apply_template,
    chat_text,
    prompt_messages,
    render_prompt,
    split_response,
    stop_token_ids,
)
from motif_jax.data.tokenizer import (
    CANONICAL_SPECIALS,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
)

SPECIALS = ["<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<think>", "</think>"]
TEXTS = ["What is 17+25?", "Answer: 42", "7+5+0=12\n1+2+1=04", "The sum of 17 and 25 is 42.", "Solve for x: 3*x+4=19"]

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 17+25?"},
    {"role": "assistant", "content": "Answer: 42", "reasoning": "7+5+0=12\n1+2+1=04"},
]


def make_hf_tokenizer(tmp_path, specials=SPECIALS, config: dict | None = None) -> str:
    """A small byte-level BPE trained on a few strings, with the given special tokens, saved as tokenizer.json
    (plus a tokenizer_config.json naming bos/eos/pad when they are among them, unless ``config`` is given)."""
    import json

    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer=trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    if config is None:
        config = {k: v for k, v in (("bos_token", "<bos>"), ("eos_token", "<eos>"), ("pad_token", "<pad>"))
                  if v in specials}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture()
def hf_path(tmp_path):
    return make_hf_tokenizer(tmp_path)


def test_byte_tokenizer_layout_and_round_trip():
    t = ByteTokenizer()
    assert isinstance(t, Tokenizer)
    assert t.vocab_size == 272 and (t.pad_id, t.bos_id, t.eos_id) == (0, 1, 2)
    assert [t.token_id(s) for s in CANONICAL_SPECIALS] == list(range(9))
    assert len(t.special_tokens) == 16 and max(t.special_tokens.values()) == 15
    for text in TEXTS + ["naïve café ✓ 日本", ""]:
        ids = t.encode(text)
        assert all(16 <= i < 272 for i in ids)
        assert t.decode(ids) == text
    assert t.encode("A") == [16 + 65]
    # Special-token strings inside a text become their ids; "</think>" is not split into "<" + "/think>".
    ids = t.encode("<bos><|user|>hi<|end|><think>r</think>")
    assert ids == [1, 4, 16 + ord("h"), 16 + ord("i"), 6, 7, 16 + ord("r"), 8]
    assert t.decode(ids) == "hir"
    assert t.decode(ids, skip_special=False) == "<bos><|user|>hi<|end|><think>r</think>"
    # Undecodable bytes and ids past the vocabulary decode as replacement characters, never raise.
    assert t.decode([16 + 0xFF, 16 + ord("a"), 300]) == "\ufffda\ufffd"
    with pytest.raises(TokenizerError, match="no special token"):
        t.token_id("<|tool|>")
    assert pickle.loads(pickle.dumps(t)).encode("x<eos>") == [16 + ord("x"), 2]
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_hf_tokenizer_round_trip_and_specials(hf_path, tmp_path):
    t = HFTokenizer(hf_path)
    assert isinstance(t, Tokenizer)
    assert t.token_names == {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    assert t.pad_id == t.token_id("<pad>") and t.stop_ids == (t.token_id("<|end|>"), t.token_id("<eos>"))
    assert t.chat_template.is_builtin  # no template of its own, but the built-in format's tokens
    for text in TEXTS:
        assert t.decode(t.encode(text)) == text
    # Directory form and load_tokenizer.
    assert isinstance(load_tokenizer(str(tmp_path)), HFTokenizer)
    assert load_tokenizer(hf_path).encode(TEXTS[0]) == t.encode(TEXTS[0])
    assert pickle.loads(pickle.dumps(t)).encode(TEXTS[1]) == t.encode(TEXTS[1])


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer file not found"):
        HFTokenizer(tmp_path / "nope")
    bad = tmp_path / "broken" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load tokenizer"):
        HFTokenizer(bad)
    # Neither a template nor the built-in format's role tokens: one error asking for the model's template.
    d = tmp_path / "plain"
    d.mkdir()
    path = make_hf_tokenizer(d, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                             config={"eos_token": "<|im_end|>"})
    with pytest.raises(TokenizerError, match=r"--data\.chat-template: .* has no chat template"):
        HFTokenizer(path)
    t = HFTokenizer(path, chat_template="{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")
    assert t.stop_ids == (t.token_id("<|im_end|>"),) and t.pad_id == t.token_id("<|im_end|>")
    # A special token that is not in the vocabulary, and no stop token at all, are named.
    with pytest.raises(TokenizerError, match="eos_token '<nothing>' is not a token"):
        HFTokenizer(path, chat_template="x", special_tokens={"eos_token": "<nothing>"})
    e = tmp_path / "noeos"
    e.mkdir()
    with pytest.raises(TokenizerError, match="no stop token"):
        HFTokenizer(make_hf_tokenizer(e, config={}), chat_template="x")
    with pytest.raises(TemplateError, match=r"--data\.chat-template: the template given .* not a valid jinja"):
        HFTokenizer(path, chat_template="{% for m in messages %}")


@pytest.mark.parametrize("kind", ["byte", "hf"])
@pytest.mark.parametrize("train_on_reasoning", [True, False])
def test_template_loss_mask_lines_up(kind, train_on_reasoning, tmp_path):
    t = ByteTokenizer() if kind == "byte" else HFTokenizer(make_hf_tokenizer(tmp_path))
    msgs = MESSAGES + [{"role": "user", "content": "And 1+1?"}, {"role": "assistant", "content": "Answer: 2"}]
    ids, mask = apply_template(msgs, t, train_on_reasoning=train_on_reasoning)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
    assert ids[0] == t.token_id("<bos>") and ids[-1] == t.token_id("<eos>") and mask[-1] and not mask[0]
    learned = t.decode(ids[mask], skip_special=False)
    think1 = "<think>7+5+0=12\n1+2+1=04</think>" if train_on_reasoning else ""
    think2 = "<think></think>" if train_on_reasoning else ""
    assert learned == f"{think1}Answer: 42<|end|>{think2}Answer: 2<|end|><eos>"
    # Everything else (system, users, role tokens) is prompt.
    prompt = t.decode(ids[~mask], skip_special=False)
    assert "<|assistant|>" in prompt and "What is 17+25?" in prompt and "Answer" not in prompt
    assert ids.tolist() == t.encode(chat_text(msgs, t))


@pytest.mark.parametrize("kind", ["byte", "hf"])
def test_render_prompt_matches_training_prefix(kind, tmp_path):
    t = ByteTokenizer() if kind == "byte" else HFTokenizer(make_hf_tokenizer(tmp_path))
    ids, _ = apply_template(MESSAGES, t)
    p = render_prompt(prompt_messages(MESSAGES), t)
    assert p[-1] == t.token_id("<|assistant|>") and ids[: len(p)].tolist() == p
    p2 = render_prompt(prompt_messages(MESSAGES), t, open_think=True)
    assert p2[-1] == t.token_id("<think>") and ids[: len(p2)].tolist() == p2
    with pytest.raises(ValueError, match="ends with an assistant turn"):
        render_prompt(MESSAGES, t)
    assert stop_token_ids(t) == (t.token_id("<|end|>"), t.token_id("<eos>"))
    # What a model generates after the prompt splits back into (reasoning, content).
    gen = t.decode(ids[len(p):], skip_special=False)
    assert split_response(gen) == ("7+5+0=12\n1+2+1=04", "Answer: 42")
    assert split_response("7+5+0=12</think>Answer: 42<|end|>junk") == ("7+5+0=12", "Answer: 42")
    assert split_response("Answer: 42") == (None, "Answer: 42")
