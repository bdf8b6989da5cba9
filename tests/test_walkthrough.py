"""docs/hf_interop.md, "Fine-tune your own Hugging Face model", run as written on a tiny Qwen3-style model made here:
its own BPE tokenizer and jinja template (no role tokens of ours), SFT on JSONL chat data, RL with math-verify on a
task routed by --task-verifiers, export, then transformers' apply_chat_template + generate: the same tokens and the
same greedy accuracy as the project's own evaluation of the same policy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_chat_templates import make_model_dir
from test_sft import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _records(n: int, seed: int, *, with_answer_turn: bool) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(1, 9, 2))
        user = {"role": "user", "content": f"What is {a}+{b}?"}
        turn = {"role": "assistant", "content": f"Answer: {a + b}", "reasoning": f"{a}+{b}={a + b}"}
        out.append({"id": f"s{seed}-{i}", "task": "algebra", "answer": str(a + b),
                    "messages": [user, turn] if with_answer_turn else [user]})
    return out


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _run(args: list[str], cwd: Path) -> str:
    env = subprocess_env(1)  # one CPU device, as a user's run on a CPU has (not the suite's 8)
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (args, out.stdout[-3000:], out.stderr[-3000:])
    return out.stdout


def _hf_model(tmp_path: Path) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = make_model_dir(tmp_path, "qwen3", markers=False)
    (d.parent / "hf_model").mkdir()
    for f in d.iterdir():
        (d.parent / "hf_model" / f.name).write_bytes(f.read_bytes())
    d = d.parent / "hf_model"
    vocab = json.loads((d / "tokenizer.json").read_text())
    size = len(vocab["model"]["vocab"]) + len(vocab["added_tokens"])
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.1)
    transformers.Qwen3ForCausalLM(config).save_pretrained(d, safe_serialization=True)
    return d


def test_fine_tune_your_own_hf_model(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = _hf_model(tmp_path)
    _write_jsonl(tmp_path / "train.jsonl", _records(48, 0, with_answer_turn=True))
    test = _write_jsonl(tmp_path / "test.jsonl", _records(8, 1, with_answer_turn=True))
    _write_jsonl(tmp_path / "prompts.jsonl", _records(16, 2, with_answer_turn=False))
    (tmp_path / "my_sft.yaml").write_text(
        "data:\n  seq_len: 64\n  batch_size: 8\n  sources: [{path: train.jsonl}]\n  stages: [{name: main, steps: 3}]\n"
        "optim: {lr: 1.0e-3, warmup_steps: 1}\n"
        "eval: {heldout: test.jsonl, num_records: 8, max_new_tokens: 16}\n"
        "task_verifiers: {algebra: math}\n")
    _run([str(ROOT / "scripts/sft.py"), "--config", "my_sft.yaml", "--init-from", str(hf), "--run-dir", "runs/sft"],
         tmp_path)
    _run([str(ROOT / "scripts/rl.py"), "--init-from", "runs/sft", "--prompts", "prompts.jsonl", "--verifiers", "math",
          "--task-verifiers", "algebra", "math", "--eval.heldout", "test.jsonl", "--eval.num-records", "8",
          "--eval.max-new-tokens", "16", "--rollout.group-size", "4", "--rollout.max-new-tokens", "16",
          "--update.groups-per-round", "4", "--rounds", "2", "--run-dir", "runs/rl"], tmp_path)
    summary = json.loads((tmp_path / "runs/rl/summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds"] == 2
    rl_metrics = [json.loads(x) for x in (tmp_path / "runs/rl/metrics.jsonl").read_text().splitlines()]
    assert any("verifier_ok_frac" in r or "reward/algebra" in r for r in rl_metrics)  # math-verify scored rollouts
    _run([str(ROOT / "scripts/convert_hf.py"), "export", "--init-dir", "runs/rl/final", "--out-dir", "runs/hf_out"],
         tmp_path)

    # The project's own greedy generation of the final policy ...
    import jax

    from motif_jax.data.prompts import load_prompt_records
    from motif_jax.data.template import prompt_messages, render_prompt, response_text, split_response
    from motif_jax.data.tokenizer import load_tokenizer
    from motif_jax.model.generate import SamplingConfig, generate
    from motif_jax.model.transformer import abstract_model
    from motif_jax.rl.loop import make_checker
    from motif_jax.rl.verifiers import default_verifiers
    from motif_jax.train.checkpoint import load_policy

    cfg, params, tok_spec = load_policy(tmp_path / "runs/rl/final")
    ours_tok = load_tokenizer(tok_spec)
    graphdef, _ = abstract_model(cfg)
    from flax import nnx

    model = nnx.merge(graphdef, params)
    records = load_prompt_records(str(test), task_verifiers={"algebra": "math"})
    prompts = [render_prompt(prompt_messages(r["messages"]), ours_tok) for r in records]
    gen = generate(model, prompts, jax.random.key(0), SamplingConfig(max_new_tokens=16, greedy=True,
                                                                     stop_tokens=ours_tok.stop_ids),
                   pad_id=ours_tok.pad_id)
    ours = gen.sequences()

    # ... against transformers with the exported directory and the model's own template.
    tok = AutoTokenizer.from_pretrained(tmp_path / "runs/hf_out")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "runs/hf_out", dtype=torch.float32).eval()
    theirs = []
    for r, p in zip(records, prompts):
        ids = tok.apply_chat_template(prompt_messages(r["messages"]), add_generation_prompt=True, return_dict=True,
                                      return_tensors="pt")["input_ids"]
        assert ids[0].tolist() == p  # the same prompt tokens
        with torch.no_grad():
            out = hf_model.generate(ids, max_new_tokens=16, do_sample=False)
        theirs.append(out[0, ids.shape[1]:].tolist())
    checker = make_checker(default_verifiers(), 0.5)

    def correct(tokens, record):
        return checker(record, split_response(response_text(tokens, ours_tok))[1])

    for p, a, b in zip(prompts, ours, theirs):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if n is None:
            assert len(a) == len(b) or (a and a[-1] in ours_tok.stop_ids), (a, b)  # both stopped at the same token
            continue
        with torch.no_grad():  # a divergence is only allowed at a genuine near-tie of the two best logits
            logits = hf_model(torch.tensor([p + a[:n]])).logits[0, -1]
        top = torch.topk(logits, 2).values
        assert float(top[0] - top[1]) < 1e-3, (n, a, b)
    assert np.mean([correct(a, r) for a, r in zip(ours, records)]) == np.mean(
        [correct(b, r) for b, r in zip(theirs, records)])
