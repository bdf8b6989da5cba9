"""Ahead-of-time memory plan of the full train step (forward, backward, optimizer update) on a simulated mesh.

    python scripts/memory_plan.py --config motif-2-12.7b --devices 8 --mesh.fsdp 8 --seq-len 65536 \
        --remat full --device-memory-gb 80

Builds the abstract train state (ShapeDtypeStructs with shardings) and compiles the train step for ``--devices``
simulated CPU devices with ``compiled.memory_analysis()``: nothing is allocated at full size. Prints a table and,
as the last line, one JSON object: params, per_device_bytes {arguments, temporaries, outputs, aliased, total},
device_memory_bytes, fits, plus the settings. The numbers are XLA's buffer assignment for the CPU backend of the
same SPMD program; a GPU build differs somewhat (fusion decisions, cuDNN workspaces), so keep ~10% headroom.

``--layers K`` compiles K and 2K layers and extrapolates every component linearly to the model's depth (for
quick estimates; the scan makes the full-depth compile about as fast, so the default is the real depth).
"""

from __future__ import annotations

import os
import sys


def _preparse_devices(argv: list[str]) -> int:
    for i, a in enumerate(argv):
        if a == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--devices="):
            return int(a.split("=", 1)[1])
    return 8


# Before anything imports jax: a CPU backend with N simulated devices.
_N = _preparse_devices(sys.argv[1:])
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    + [f"--xla_force_host_platform_device_count={_N}"]
)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Literal  # noqa: E402

from motif_jax.config import ConfigError, MeshConfig, ModelConfig, load_yaml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class PlanArgs:
    """Memory plan of one training configuration."""

    config: str = "tiny"
    """model preset name (configs/model/NAME.yaml) or a path to a model YAML"""
    devices: int = 8
    """number of (simulated) devices"""
    mesh: MeshConfig = MeshConfig()
    seq_len: int = 65536
    """tokens per sequence"""
    batch: int = 0
    """global batch in sequences per step (0: one sequence per data x fsdp rank per micro-batch)"""
    microbatches: int = 1
    """gradient-accumulation micro-batches per step"""
    device_memory_gb: float = 80.0
    """device memory in GB (1e9 bytes) to compare the per-device total with"""
    remat: str = ""
    """remat policy (default: the preset's); see motif_jax.model.remat"""
    loss: Literal["fused", "naive"] = "fused"
    """fused: LM-head loss kernel without logits; naive: log_softmax(x @ w)"""
    attention_impl: str = ""
    """attention implementation (default: the preset's; cudnn becomes blockwise on this CPU planner)"""
    optimizer: Literal["adamw", "muon"] = "adamw"
    layers: int = 0
    """compile K and 2K layers and extrapolate linearly to the model depth (0: compile the real depth)"""


def _model_cfg(args: PlanArgs, num_layers: int | None = None) -> ModelConfig:
    path = Path(args.config)
    if path.suffix not in (".yaml", ".yml"):
        path = ROOT / "configs" / "model" / f"{args.config}.yaml"
    cfg = load_yaml(ModelConfig, path)
    impl = args.attention_impl or cfg.attention_impl
    if impl == "cudnn":
        impl = "blockwise"  # cuDNN flash attention cannot compile on CPU; blockwise keeps the same O(T) residuals
    changes = dict(attention_impl=impl, max_seq_len=max(cfg.max_seq_len, args.seq_len))
    if args.remat:
        changes["remat_policy"] = args.remat
    if num_layers is not None:
        changes["num_layers"] = num_layers
    return dataclasses.replace(cfg, **changes)


def plan_once(args: PlanArgs, num_layers: int | None = None) -> dict:
    """Compiles the train step for one depth; returns the memory stats and timings."""
    import jax

    from motif_jax.model.transformer import count_params
    from motif_jax.parallel.mesh import make_mesh, mesh_shape, validate_mesh
    from motif_jax.train.config import OptimConfig, StepConfig
    from motif_jax.train.optim import make_optimizer, make_schedule
    from motif_jax.train.state import abstract_train_state
    from motif_jax.train.step import abstract_batch, compile_train_step, lm_loss

    model_cfg = _model_cfg(args, num_layers)
    shape = mesh_shape(args.mesh, args.devices)
    dp = shape["data"] * shape["fsdp"]
    batch = args.batch or dp * args.microbatches
    validate_mesh(args.mesh, model_cfg, num_devices=args.devices, seq_len=args.seq_len, global_batch=batch,
                  num_microbatches=args.microbatches, seq_flag="seq-len", batch_flag="batch")
    mesh = make_mesh(args.mesh, jax.devices()[: args.devices])
    optim_cfg = OptimConfig(name=args.optimizer)
    t0 = time.time()
    tx = make_optimizer(optim_cfg, 1000)
    state, graphdef, shardings = abstract_train_state(model_cfg, tx, mesh, args.mesh.logical_rules)
    compiled = compile_train_step(
        lm_loss(graphdef, StepConfig(loss=args.loss, loss_impl="xla")), tx, mesh=mesh, state_shardings=shardings,
        abstract_state=state, batch=abstract_batch(batch, args.seq_len), mesh_cfg=args.mesh,
        num_microbatches=args.microbatches, schedule=make_schedule(optim_cfg, 1000), verbose=False,
    )
    return {
        "model": model_cfg,
        "mesh_shape": shape,
        "batch": batch,
        "params": count_params(state.params),
        "memory": compiled.memory.as_dict(),
        "compile_seconds": round(time.time() - t0, 1),
    }


def plan(args: PlanArgs) -> dict:
    if args.layers:
        a, b = plan_once(args, args.layers), plan_once(args, 2 * args.layers)
        depth = _model_cfg(args).num_layers
        scale = (depth - args.layers) / args.layers
        mem = {k: int(round(a["memory"][k] + (b["memory"][k] - a["memory"][k]) * scale)) for k in a["memory"]}
        params = int(round(a["params"] + (b["params"] - a["params"]) * scale))
        out = dict(b, memory=mem, params=params, model=_model_cfg(args),
                   compile_seconds=a["compile_seconds"] + b["compile_seconds"],
                   extrapolated_from_layers=[args.layers, 2 * args.layers])
        return out
    return plan_once(args)


def report(args: PlanArgs, result: dict) -> dict:
    mem = result["memory"]
    limit = int(args.device_memory_gb * 1e9)
    cfg: ModelConfig = result["model"]
    out = {
        "config": args.config,
        "params": result["params"],
        "devices": args.devices,
        "mesh": result["mesh_shape"],
        "context_strategy": args.mesh.context_strategy,
        "seq_len": args.seq_len,
        "batch": result["batch"],
        "microbatches": args.microbatches,
        "remat": cfg.remat_policy,
        "loss": args.loss,
        "attention_impl": cfg.attention_impl,
        "optimizer": args.optimizer,
        "per_device_bytes": {k: mem[k] for k in ("arguments", "temporaries", "outputs", "aliased", "total")},
        "device_memory_bytes": limit,
        "fits": mem["total"] <= limit,
        "compile_seconds": result["compile_seconds"],
    }
    if "extrapolated_from_layers" in result:
        out["extrapolated_from_layers"] = result["extrapolated_from_layers"]
    return out


def _table(out: dict) -> str:
    gb = lambda b: f"{b / 1e9:9.2f} GB"
    rows = [
        ("model", f"{out['config']} ({out['params'] / 1e9:.2f}B parameters)"),
        ("mesh", " x ".join(f"{k}={v}" for k, v in out["mesh"].items()) + f"  ({out['devices']} devices, "
                 f"context strategy {out['context_strategy']})"),
        ("batch", f"{out['batch']} x {out['seq_len']} tokens, {out['microbatches']} micro-batch(es)"),
        ("remat / loss", f"{out['remat']} / {out['loss']} (attention {out['attention_impl']}, {out['optimizer']})"),
        ("arguments", gb(out["per_device_bytes"]["arguments"])),
        ("temporaries", gb(out["per_device_bytes"]["temporaries"])),
        ("outputs", gb(out["per_device_bytes"]["outputs"])),
        ("aliased (donated)", gb(out["per_device_bytes"]["aliased"])),
        ("total per device", gb(out["per_device_bytes"]["total"])),
        ("device memory", gb(out["device_memory_bytes"])),
        ("fits", "yes" if out["fits"] else "NO"),
        ("compile", f"{out['compile_seconds']} s"
                    + (f" (extrapolated from {out['extrapolated_from_layers']} layers)"
                       if "extrapolated_from_layers" in out else "")),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> dict:
    import tyro

    try:
        args = tyro.cli(PlanArgs, args=argv, description=__doc__.split("\n\n")[0])
        if args.devices != _N and argv is None:
            raise ConfigError(f"--devices: {args.devices} but the process was started with {_N} devices")
        out = report(args, plan(args))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(_table(out))
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
