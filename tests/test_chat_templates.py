"""A model's own chat template: the token ids and the loss mask we train on equal transformers'
``apply_chat_template`` for a Qwen3-style template with <think> and a Llama-3-style one; the mask found by
rendering prefixes equals transformers' ``{% generation %}`` assistant mask; templates that cannot give a mask, or
drop the reasoning, are refused naming the flag."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from motif_jax.data.chat_template import TemplateError
from motif_jax.data.template import apply_template, prompt_messages, render_prompt, response_text, split_response
from motif_jax.data.tokenizer import HFTokenizer

# Written for these tests in the style of the public templates (whitespace control through string literals).
QWEN3_STYLE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{%- if message.reasoning_content and loop.last %}"
    "{{- '<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- message.content + '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_STYLE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}"
    "{%- if message.role == 'assistant' %}"
    "{%- generation %}{{- message.content + '<|eot_id|>' }}{%- endgeneration %}"
    "{%- else %}{{- message.content + '<|eot_id|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
STYLES = {
    "qwen3": dict(template=QWEN3_STYLE, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
                  config={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None},
                  generation={"eos_token_id": None}),
    "llama3": dict(template=LLAMA3_STYLE,
                   specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"],
                   config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, generation={}),
}
TEXTS = ["What is 17+25?", "Answer: 42", "7+5+0=12\n1+2+1=04", "Be brief.", "And 1+1?", "Answer: 2", "system user"]
SINGLE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 17+25?"},
    {"role": "assistant", "content": "Answer: 42", "reasoning": "7+5+0=12\n1+2+1=04"},
]
MULTI = [
    {"role": "user", "content": "What is 17+25?"},
    {"role": "assistant", "content": "Answer: 42"},
    {"role": "user", "content": "And 1+1?"},
    {"role": "assistant", "content": "Answer: 2"},
]


def make_model_dir(root: Path, style: str, *, markers: bool) -> Path:
    """A tokenizer directory as a Hugging Face model ships it: BPE tokenizer.json, tokenizer_config.json with the
    chat template and special tokens, generation_config.json with the stop token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    spec = STYLES[style]
    d = root / f"{style}{'-marked' if markers else ''}"
    d.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 20, trainer=trainers.BpeTrainer(
        vocab_size=420, special_tokens=spec["specials"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    template = spec["template"]
    if not markers:
        template = template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    config = {**spec["config"], "chat_template": template, "tokenizer_class": "PreTrainedTokenizerFast"}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    generation = dict(spec["generation"])
    if "eos_token_id" in generation:
        generation["eos_token_id"] = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    (d / "generation_config.json").write_text(json.dumps(generation))
    return d


def _hf_messages(messages):
    return [{**{k: v for k, v in m.items() if k != "reasoning"},
             **({"reasoning_content": m["reasoning"]} if "reasoning" in m else {})} for m in messages]


@pytest.mark.parametrize("style, messages", [("qwen3", SINGLE), ("qwen3", MULTI), ("llama3", MULTI)])
def test_ids_and_mask_equal_transformers(tmp_path, style, messages):
    from transformers import AutoTokenizer

    ours = HFTokenizer(make_model_dir(tmp_path, style, markers=False))
    theirs = AutoTokenizer.from_pretrained(make_model_dir(tmp_path, style, markers=True))
    ids, mask = apply_template(messages, ours)
    out = theirs.apply_chat_template(_hf_messages(messages), tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    assert ids.tolist() == list(out["input_ids"])
    assert mask.tolist() == [bool(x) for x in out["assistant_masks"]]  # prefix rendering == generation markers
    # the marked template gives the same mask through our own {% generation %} support
    _, mask_marked = apply_template(messages, HFTokenizer(tmp_path / f"{style}-marked"))
    assert mask_marked.tolist() == mask.tolist()
    # the generation prompt is transformers' add_generation_prompt, and a prefix of the training tokens
    prompt = render_prompt(prompt_messages(messages), ours)
    assert prompt == list(theirs.apply_chat_template(_hf_messages(prompt_messages(messages)), tokenize=True,
                                                     add_generation_prompt=True, return_dict=True)["input_ids"])
    assert ids[: len(prompt)].tolist() == prompt and mask[len(prompt)]  # the completion starts the trained span
    # what the model must learn after the prompt, decoded, splits back into reasoning and content
    completion = response_text(ids[len(prompt):].tolist(), ours)
    reasoning, content = split_response(completion)
    assert content == messages[-1]["content"] and reasoning == messages[-1].get("reasoning")


def test_stop_tokens_and_no_bos_come_from_the_model(tmp_path):
    t = HFTokenizer(make_model_dir(tmp_path, "qwen3", markers=False))
    im_end, eot = t.token_id("<|im_end|>"), t.token_id("<|endoftext|>")
    assert t.stop_ids == (im_end, eot) and t.pad_id == eot
    ids, mask = apply_template(SINGLE, t)
    assert ids[0] == t.token_id("<|im_start|>")  # Qwen3 has no BOS: none is added
    assert ids[mask][-1] == im_end  # the model learns to end its turn; the newline after it is not trained
    assert t.decode(ids[mask], skip_special=False) == "<think>\n7+5+0=12\n1+2+1=04\n</think>\n\nAnswer: 42<|im_end|>"
    _, no_reasoning = apply_template(SINGLE, t, train_on_reasoning=False)
    assert t.decode(ids[no_reasoning], skip_special=False) == "\n\nAnswer: 42<|im_end|>"


def test_templates_that_cannot_give_a_mask_or_drop_reasoning_are_refused(tmp_path):
    t = HFTokenizer(make_model_dir(tmp_path, "qwen3", markers=False))
    earlier_reasoning = [SINGLE[1], SINGLE[2], {"role": "user", "content": "And 1+1?"},
                         {"role": "assistant", "content": "Answer: 2"}]
    with pytest.raises(TemplateError, match=r"--data\.chat-template: .*reasoning"):
        apply_template(earlier_reasoning, t)  # the template drops turn 1's reasoning inside the conversation
    llama = HFTokenizer(make_model_dir(tmp_path, "llama3", markers=False))
    with pytest.raises(TemplateError, match=r"--data\.chat-template: .*does not render the reasoning"):
        apply_template(SINGLE, llama)
    np.testing.assert_array_equal(apply_template(SINGLE[:2] + [{"role": "assistant", "content": "x"}], llama)[0],
                                  llama.encode(llama.chat_template.render(SINGLE[:2] + [
                                      {"role": "assistant", "content": "x"}])[0]))


def test_tokenizer_problems_are_one_line_errors_in_every_script(tmp_path):
    """A tokenizer without a chat template (and without the built-in format's tokens) or naming a token that is not
    in its vocabulary: scripts/sft.py, scripts/rl.py and scripts/score_traces.py exit 2 with one line, no traceback."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    plain = make_model_dir(tmp_path, "qwen3", markers=False)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    (plain / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "chat_template"}))
    policy = tmp_path / "policy"  # a policy directory whose tokenizer names an EOS its vocabulary lacks
    from motif_jax.config import ModelConfig
    from motif_jax.model.transformer import create_model
    from motif_jax.train.checkpoint import save_policy

    from flax import nnx

    save_policy(policy, ModelConfig(vocab_size=512), nnx.split(create_model(ModelConfig(vocab_size=512)))[1], "byte")
    src = make_model_dir(tmp_path / "src", "qwen3", markers=False)
    for f in ("tokenizer.json", "generation_config.json"):
        (policy / f).write_bytes((src / f).read_bytes())
    (policy / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_nothing|>", "chat_template": "x"}))
    (policy / "policy.json").write_text(json.dumps({"tokenizer": "tokenizer.json"}))
    cases = [
        (["scripts/sft.py", "--config", "configs/sft/tiny-arith.yaml", "--data.tokenizer", str(plain),
          "--model.vocab-size", "512", "--run-dir", str(tmp_path / "a")], "has no chat template"),
        (["scripts/rl.py", "--init-from", str(policy), "--run-dir", str(tmp_path / "b")], "is not a token"),
        (["scripts/score_traces.py", "--policy", str(policy), "--traces", "synthetic:addition?n=4",
          "--out", str(tmp_path / "k.jsonl")], "is not a token"),
    ]
    env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}
    for args, words in cases:
        out = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert out.returncode == 2 and "Traceback" not in out.stderr, (args, out.stderr[-2000:])
        assert lines[-1].startswith("error: ") and words in lines[-1], (args, lines[-1])
