"""Training throughput of the SFT step, next to PyTorch (transformers' Llama) of the same shape on the same machine.

    python scripts/bench_sft.py                                   # the tiny-arith recipe's model, 24 x 160 tokens
    python scripts/bench_sft.py --model configs/model/small.yaml --batch 8 --seq-len 1024 --no-torch
    python scripts/bench_sft.py --model llama3-1b.yaml --seq-len 8192 --batch 1 --peak-tflops 989   # MFU on a GPU

Rows:
- ``jax <preset>``: our compiled train step (fused LM-head loss, AdamW, the preset's attention and MLP);
- ``jax llama-shape``: the same sizes with standard attention (the signal heads of differential attention) +
  SwiGLU: what transformers' Llama computes;
- ``torch llama-shape``: ``LlamaForCausalLM`` of those sizes, AdamW, eager fwd + bwd + step in fp32 on the CPU
  with the same number of threads.
Each row: median seconds per step over ``--steps`` timed steps after ``--warmup`` (compilation excluded), training
tokens per second, and MFU where ``--peak-tflops`` (per device) is given. Prints a table, then one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

from motif_jax.config import MeshConfig, ModelConfig, load_yaml
from motif_jax.parallel import mesh as mesh_lib
from motif_jax.train.config import OptimConfig
from motif_jax.train.optim import make_optimizer
from motif_jax.train.sft import flops_per_token
from motif_jax.train.state import init_train_state
from motif_jax.train.step import abstract_batch, compile_train_step, lm_loss


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    model: str = "configs/sft/tiny-arith.yaml"
    """A model preset, or an SFT recipe (its model section is used)."""
    batch: int = 24
    seq_len: int = 160
    steps: int = 10
    warmup: int = 3
    segments: int = 2
    """Records per packed row (segments), so attention masks are those of real packed data."""
    torch: bool = True
    peak_tflops: float = 0.0
    """Peak dense FLOP/s of one device in TFLOP/s for MFU (0: not reported)."""


def _batch(cfg: BenchConfig, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    b, t = cfg.batch, cfg.seq_len
    seg_len = t // cfg.segments
    seg = np.minimum(np.arange(t) // seg_len, cfg.segments - 1) + 1
    pos = np.arange(t) - (seg - 1) * seg_len
    return {
        "tokens": rng.integers(0, vocab, (b, t), dtype=np.int32),
        "targets": rng.integers(0, vocab, (b, t), dtype=np.int32),
        "loss_mask": np.ones((b, t), np.float32),
        "segment_ids": np.broadcast_to(seg, (b, t)).astype(np.int32),
        "positions": np.broadcast_to(pos, (b, t)).astype(np.int32),
    }


def _time(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_jax(cfg: BenchConfig, model_cfg: ModelConfig) -> float:
    mesh_cfg = MeshConfig(data=1, fsdp=-1)
    mesh = mesh_lib.make_mesh(mesh_cfg)
    tx = make_optimizer(OptimConfig(), 100)
    state, graphdef, shardings = init_train_state(model_cfg, tx, mesh, mesh_cfg.logical_rules)
    batch_sharding = mesh_lib.batch_sharding(mesh, mesh_cfg.logical_rules)
    compiled = compile_train_step(lm_loss(graphdef), tx, mesh=mesh, state_shardings=shardings, abstract_state=state,
                                  batch=abstract_batch(cfg.batch, cfg.seq_len), mesh_cfg=mesh_cfg, verbose=False)
    batch = {k: jax.device_put(v, batch_sharding) for k, v in _batch(cfg, model_cfg.vocab_size).items()}
    box = [state]

    def step():
        box[0], metrics = compiled(box[0], batch)
        jax.block_until_ready(metrics)

    return _time(step, cfg.warmup, cfg.steps)


def load_model(path: str) -> ModelConfig:
    import yaml

    from motif_jax.train.sft import SFTConfig

    data = yaml.safe_load(Path(path).read_text()) or {}
    return load_yaml(SFTConfig, path).model if "model" in data else load_yaml(ModelConfig, path)


def signal_heads(m: ModelConfig) -> int:
    """Query heads of the equal-size standard-attention model: differential attention's signal heads."""
    return m.num_heads - m.num_heads // (m.diff_ratio + 1) if m.attention == "differential" else m.num_heads


def bench_torch(cfg: BenchConfig, m: ModelConfig) -> float:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.mlp_dim,
                     num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                     num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim, max_position_embeddings=m.max_seq_len,
                     rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
                     attn_implementation="sdpa")
    model = LlamaForCausalLM(hf).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = _batch(cfg, m.vocab_size)
    tokens = torch.from_numpy(data["tokens"]).long()
    positions = torch.from_numpy(np.ascontiguousarray(data["positions"])).long()
    labels = torch.from_numpy(data["targets"]).long()
    # block-diagonal causal mask of the packed segments, as our attention computes
    seg = torch.from_numpy(np.ascontiguousarray(data["segment_ids"]))
    allowed = (seg[:, :, None] == seg[:, None, :]) & torch.tril(torch.ones(cfg.seq_len, cfg.seq_len, dtype=torch.bool))
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
    mask = mask[:, None]

    def step():
        logits = model(input_ids=tokens, position_ids=positions, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, m.vocab_size), labels.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time(step, cfg.warmup, cfg.steps)


def main() -> int:
    import tyro

    cfg = tyro.cli(BenchConfig, description=__doc__)
    model_cfg = load_model(cfg.model)
    llama_shape = dataclasses.replace(model_cfg, attention="standard", mlp="swiglu", qk_norm=False,
                                      num_heads=signal_heads(model_cfg))
    tokens = cfg.batch * cfg.seq_len
    rows = []

    def add(name: str, mc: ModelConfig, seconds: float) -> None:
        flops = flops_per_token(mc, cfg.seq_len) * tokens
        row = {"name": name, "s_per_step": seconds, "tokens_per_s": tokens / seconds,
               "params": mc.param_count()}
        if cfg.peak_tflops:
            row["mfu"] = flops / seconds / (cfg.peak_tflops * 1e12 * jax.device_count())
        rows.append(row)
        print(f"{name:28s} {seconds * 1e3:9.1f} ms/step {tokens / seconds:10.0f} tok/s"
              + (f"  MFU {row['mfu']:.3f}" if "mfu" in row else ""), flush=True)

    name = os.path.splitext(os.path.basename(cfg.model))[0]
    add(f"jax {name}", model_cfg, bench_jax(cfg, model_cfg))
    add("jax llama-shape", llama_shape, bench_jax(cfg, llama_shape))
    if cfg.torch:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        add("torch llama-shape", llama_shape, bench_torch(cfg, llama_shape))
    print(json.dumps({"bench": "sft_step", "device": jax.devices()[0].device_kind, "machine": platform.machine(),
                      "cpus": os.cpu_count(), "batch": cfg.batch, "seq_len": cfg.seq_len, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
