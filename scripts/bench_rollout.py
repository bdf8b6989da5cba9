"""Rollout throughput: one RL round's generation (``--prompts`` prompts x G samples) by every engine, side by side.

    python scripts/bench_rollout.py                                   # the demo's SFT policy (make demo), its round
    python scripts/bench_rollout.py --policy runs/llama/final         # any policy directory (or an HF directory)

Rows (each: the same policy, prompts and sampling settings; a warm-up call, then the median of ``--calls``):
- ``static``: the sampler this project had before the rollout engines (``--baseline-rev``, run from a git worktree
  of that revision): every prompt repeated G times, one static batch, the KV cache copied at every decode step;
- ``jax``: the in-process JAX engine (``--rollout.engine jax``): one prefill per prompt shared by its G samples, the
  cache written in place;
- ``vllm``: the vLLM engine, run in ``.venv-vllm`` when it exists (``make vllm-venv``);
- ``transformers``: ``generate`` of the policy exported to Hugging Face (Llama / Qwen3 shapes only: transformers
  has no Motif-2 model), ``num_return_sequences=G``.
``tokens_per_s`` counts generated tokens (stop tokens included, padding after a stop excluded); ``round_s`` is the
time to generate one round. Prints a table, then as its last line one JSON object
``{"engines": {NAME: {"tokens_per_s": x, "round_s": y}, ...}, "baseline": "static"}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class BenchArgs:
    policy: str = "runs/demo/sft/final"
    """A policy directory (ours or Hugging Face); the demo's SFT policy by default."""
    prompts: str = "synthetic:addition?style=aligned&n=64&min_digits=3&max_digits=4&split=train"
    """The round's prompts (the demo's RL pool)."""
    group_size: int = 8
    """Samples per prompt."""
    max_new_tokens: int = 64
    temperature: float = 0.7
    calls: int = 3
    """Timed calls per engine (after one warm-up call)."""
    engines: tuple[str, ...] = ("static", "jax", "vllm", "transformers")
    baseline_rev: str = "30e8bee"
    """The revision whose sampler is the ``static`` row."""
    only: str = ""
    """Run one engine and print its JSON (used for the vllm row inside .venv-vllm)."""


def _setup(args: BenchArgs):
    from motif_jax.data.prompts import load_prompt_records
    from motif_jax.data.template import stop_token_ids
    from motif_jax.data.tokenizer import load_tokenizer
    from motif_jax.model.generate import SamplingConfig
    from motif_jax.rl.rollout import prompt_tokens
    from motif_jax.train.checkpoint import load_policy

    model_cfg, params, tok_spec = load_policy(args.policy)
    tokenizer = load_tokenizer(tok_spec)
    prompts = [prompt_tokens(r, tokenizer) for r in load_prompt_records(args.prompts)]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              stop_tokens=stop_token_ids(tokenizer), prompt_bucket=32)
    return model_cfg, params, tokenizer, prompts, sampling


def _timed(fn, calls: int) -> dict[str, float]:
    fn(0)  # compilation / start-up
    times, tokens = [], 0
    for i in range(calls):
        t0 = time.perf_counter()
        tokens = fn(i + 1)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"tokens_per_s": tokens / t, "round_s": t, "tokens": tokens}


def bench_jax(args: BenchArgs) -> dict[str, float]:
    from motif_jax.model.transformer import abstract_model
    from motif_jax.rl.engines.jax_engine import JaxEngine

    model_cfg, params, tokenizer, prompts, sampling = _setup(args)
    graphdef, _ = abstract_model(model_cfg)
    engine = JaxEngine(graphdef=graphdef, params=params, pad_id=tokenizer.pad_id)
    return _timed(lambda seed: engine.generate(prompts, args.group_size, sampling, seed).generated_tokens, args.calls)


def bench_vllm(args: BenchArgs) -> dict[str, float]:
    import jax

    from motif_jax.config import MeshConfig
    from motif_jax.model.transformer import abstract_model
    from motif_jax.parallel import mesh as mesh_lib
    from motif_jax.rl.config import RolloutConfig
    from motif_jax.rl.engines import make_engine

    model_cfg, params, tokenizer, prompts, sampling = _setup(args)
    graphdef, _ = abstract_model(model_cfg)
    mesh_cfg = MeshConfig(data=1, fsdp=-1)
    with tempfile.TemporaryDirectory() as run_dir:
        engine = make_engine("vllm", model_cfg=model_cfg, graphdef=graphdef, params=params, tokenizer=tokenizer,
                             pad_id=tokenizer.pad_id, mesh=mesh_lib.make_mesh(mesh_cfg, jax.devices()[:1]),
                             mesh_cfg=mesh_cfg, rollout=RolloutConfig(engine="vllm"), run_dir=Path(run_dir))
        try:
            engine.sync_weights(params, 0)
            return _timed(lambda seed: engine.generate(prompts, args.group_size, sampling, seed).generated_tokens,
                          args.calls)
        finally:
            engine.close()


def bench_transformers(args: BenchArgs) -> dict[str, float]:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from motif_jax.convert import export_hf

    model_cfg, params, tokenizer, prompts, sampling = _setup(args)
    if model_cfg.attention != "standard":
        raise RuntimeError("transformers has no Motif-2 (differential attention) model")
    with tempfile.TemporaryDirectory() as d:
        export_hf(params, model_cfg, d)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    stops = set(sampling.stop_tokens)

    def run(seed: int) -> int:
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=args.temperature, top_k=0,
                                 max_new_tokens=args.max_new_tokens, num_return_sequences=args.group_size,
                                 eos_token_id=list(stops), pad_token_id=tokenizer.pad_id)
        new = out[:, width:].numpy()
        ended = np.isin(new, list(stops))
        lengths = np.where(ended.any(1), ended.argmax(1) + 1, new.shape[1])
        return int(lengths.sum())

    return _timed(run, args.calls)


# The sampler of the baseline revision, run from a git worktree of it (its own imports, the same parameters).
STATIC = textwrap.dedent("""
    import json, sys, time, statistics
    sys.path.insert(0, {src!r})
    import jax, orbax.checkpoint as ocp
    from flax import nnx
    from motif_jax.config import ModelConfig
    from motif_jax.model.generate import SamplingConfig, generate
    from motif_jax.model.transformer import abstract_model
    spec = json.loads({spec!r})
    cfg = ModelConfig(**spec["model"])
    graphdef, abstract = abstract_model(cfg)
    with ocp.StandardCheckpointer() as c:
        restored = c.restore(spec["params"], nnx.to_pure_dict(abstract))
    nnx.replace_by_pure_dict(abstract, restored)
    model = nnx.merge(graphdef, abstract)
    rows = [p for p in spec["prompts"] for _ in range(spec["g"])]
    s = SamplingConfig(max_new_tokens=spec["n"], temperature=spec["t"], stop_tokens=tuple(spec["stops"]),
                       prompt_bucket=32)
    def run(seed):
        return int(generate(model, rows, jax.random.key(seed), s, pad_id=spec["pad"]).lengths.sum())
    run(0)
    times = []
    for i in range(spec["calls"]):
        t0 = time.perf_counter(); tokens = run(i + 1); times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    print(json.dumps({{"tokens_per_s": tokens / t, "round_s": t, "tokens": tokens}}))
""")


def bench_static(args: BenchArgs) -> dict[str, float]:
    from motif_jax.train.checkpoint import resolve_policy_dir

    model_cfg, _, tokenizer, prompts, sampling = _setup(args)
    old_fields = {f: v for f, v in dataclasses.asdict(model_cfg).items() if f not in ("rope_scaling", "attn_norm_eps")}
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", d, args.baseline_rev], check=True,
                       capture_output=True)
        try:
            spec = {"model": old_fields, "params": str(resolve_policy_dir(args.policy) / "params"), "prompts": prompts,
                    "g": args.group_size, "n": args.max_new_tokens, "t": args.temperature, "calls": args.calls,
                    "stops": list(sampling.stop_tokens), "pad": tokenizer.pad_id}
            out = subprocess.run([sys.executable, "-c", STATIC.format(src=d, spec=json.dumps(spec))],
                                 capture_output=True, text=True, check=True)
            return json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", d], capture_output=True)


def _in_vllm_venv(args: BenchArgs) -> dict[str, float]:
    python = ROOT / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        raise RuntimeError("no .venv-vllm (make vllm-venv)")
    out = subprocess.run([str(python), __file__, "--only", "vllm", "--policy", args.policy, "--prompts", args.prompts,
                          "--group-size", str(args.group_size), "--max-new-tokens", str(args.max_new_tokens),
                          "--temperature", str(args.temperature), "--calls", str(args.calls)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


BENCHES = {"static": bench_static, "jax": bench_jax, "vllm": _in_vllm_venv, "transformers": bench_transformers}


def main() -> int:
    import tyro

    args = tyro.cli(BenchArgs, description=__doc__.split("\n\n")[0])
    if args.only:
        print(json.dumps({"jax": bench_jax, "vllm": bench_vllm}[args.only](args)))
        return 0
    results, skipped = {}, {}
    for name in args.engines:
        try:
            results[name] = BENCHES[name](args)
        except Exception as e:  # noqa: BLE001 - a row that cannot run here is reported, the others still run
            skipped[name] = f"{type(e).__name__}: {e}"
    base = results.get("static", {}).get("tokens_per_s")
    print(f"policy {args.policy}; {args.prompts}; G={args.group_size}, up to {args.max_new_tokens} new tokens, "
          f"T={args.temperature}; median of {args.calls} calls")
    print(f"{'engine':<14}{'tokens/s':>12}{'round s':>10}{'tokens':>9}{'vs static':>11}")
    for name, r in results.items():
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"{name:<14}{r['tokens_per_s']:>12.0f}{r['round_s']:>10.2f}{r['tokens']:>9}{ratio:>11}")
    for name, why in skipped.items():
        print(f"{name:<14}  not run: {why}")
    print(json.dumps({"engines": {k: {"tokens_per_s": round(v["tokens_per_s"], 1), "round_s": round(v["round_s"], 3)}
                                  for k, v in results.items()}, "baseline": "static", "skipped": skipped}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
