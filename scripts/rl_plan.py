"""Back-of-envelope plan of RL at the recipe's scale: engine KV cache, weight-sync traffic, trainer meshes.

    python scripts/rl_plan.py                      # Motif-2-12.7B, G = 8 x 32K-token responses, 8 and 64 H100s

For each cluster size: the trainer mesh (the SFT memory plan's 64K recommendation, docs/parallel.md), the rollout
engine's tensor parallelism and replicas, the KV cache one replica needs for its share of a round's G x L-token
responses (bf16 K and V of every layer), and the bytes and time of one weight sync (bf16 parameters) over NVLink
(within a node) and InfiniBand (to engines on other nodes). Arithmetic from the model config, not a measurement;
prints a table, then one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from motif_jax.config import ModelConfig, load_yaml  # noqa: E402


@dataclasses.dataclass(frozen=True)
class PlanArgs:
    model: str = "configs/model/motif-2-12.7b.yaml"
    """Model preset."""
    group_size: int = 8
    """Responses per prompt (G)."""
    prompts_per_round: int = 64
    """Prompts per round."""
    response_len: int = 32768
    """Tokens per response (prompt included)."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU (H100 80 GB)."""
    nvlink_gb_s: float = 450.0
    """NVLink bandwidth per GPU and direction (H100: 900 GB/s both directions)."""
    ib_gb_s: float = 50.0
    """InfiniBand bandwidth per GPU (one 400 Gb/s NIC per GPU)."""
    engine_tp: int = 4
    """Tensor parallelism of one engine replica."""


def plan(args: PlanArgs, gpus: int) -> dict:
    cfg: ModelConfig = load_yaml(ModelConfig, ROOT / args.model)
    params = cfg.param_count()
    weights = 2 * params  # bf16
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # K and V, bf16
    replicas = gpus // args.engine_tp
    sequences = args.group_size * args.prompts_per_round
    per_replica = -(-sequences // replicas)
    kv = per_replica * args.response_len * kv_per_token
    per_gpu_free = args.gpu_memory_gb * 1e9 - weights / args.engine_tp
    concurrent = int(per_gpu_free * args.engine_tp // (args.response_len * kv_per_token))
    sync_nvlink = weights / args.engine_tp / (args.nvlink_gb_s * 1e9)  # each GPU receives its shard
    sync_ib = weights / args.engine_tp / (args.ib_gb_s * 1e9)
    trainer = {8: "fsdp 1 x context 8 (one node)", 64: "dcn_fsdp 8 x context 8 (8 nodes)"}.get(gpus, "-")
    return {"gpus": gpus, "trainer_mesh": trainer, "engine_tp": args.engine_tp, "engine_replicas": replicas,
            "params": params, "weights_gb": weights / 1e9, "kv_bytes_per_token": kv_per_token,
            "sequences_per_replica": per_replica, "kv_cache_gb_per_replica": kv / 1e9,
            "concurrent_sequences_per_replica": concurrent, "weight_sync_s_nvlink": sync_nvlink,
            "weight_sync_s_ib": sync_ib}


def main() -> int:
    args = tyro.cli(PlanArgs, description=__doc__.split("\n\n")[0])
    rows = [plan(args, g) for g in (8, 64)]
    print(f"{args.model}: G={args.group_size} x {args.prompts_per_round} prompts, {args.response_len}-token responses")
    print(f"{'GPUs':>5} {'trainer mesh':<34} {'TP x replicas':>13} {'KV/replica':>11} {'fits at once':>12} "
          f"{'sync NVLink':>11} {'sync IB':>8}")
    for r in rows:
        print(f"{r['gpus']:>5} {r['trainer_mesh']:<34} {r['engine_tp']:>6} x {r['engine_replicas']:<4} "
              f"{r['kv_cache_gb_per_replica']:>9.0f}GB {r['concurrent_sequences_per_replica']:>12} "
              f"{r['weight_sync_s_nvlink']:>10.2f}s {r['weight_sync_s_ib']:>7.2f}s")
    print(json.dumps({"args": dataclasses.asdict(args), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
