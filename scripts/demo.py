"""The built-in demo (``make demo``): SFT then RL of the tiny Motif-style model on 3-4 digit addition, on CPU.

1. SFT (configs/sft/tiny-arith.yaml), evaluated every ``--sft-eval-every`` steps and stopped at the first
   evaluation reaching ``--sft-target-accuracy`` (30%), so RL starts from a clearly imperfect policy. Stopping by
   accuracy, not at a fixed step, keeps that start the same on every machine: accuracy climbs steeply here
   (0 -> 95% between steps ~330 and ~560) and where exactly depends on the CPU's floating-point rounding
   (docs/benchmarks.md);
2. RL (configs/rl/tiny-arith.yaml) from that policy for the preset's rounds (``--rl-rounds`` to change), with
   verifiable rewards, the pass-rate band and trajectory reuse;
3. a table of held-out greedy exact-match accuracy after SFT and after RL.

Each stage writes its own run directory (``RUN_DIR/sft``, ``RUN_DIR/rl``: tensorboard, metrics.jsonl,
checkpoints, summary.json); re-running resumes each from its newest checkpoint. The full-length SFT recipe alone
(``scripts/sft.py --config configs/sft/tiny-arith.yaml``) is what reaches >= 95%.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from motif_jax import cli
from motif_jax.config import load_yaml, parse_cli, require
from motif_jax.rl.config import RLConfig
from motif_jax.train.config import SFTConfig


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    run_dir: str = "runs/demo"
    """The demo's runs go to RUN_DIR/sft and RUN_DIR/rl."""
    sft_config: str = "configs/sft/tiny-arith.yaml"
    """The SFT recipe (its first stage is run)."""
    rl_config: str = "configs/rl/tiny-arith.yaml"
    """The RL recipe."""
    sft_target_accuracy: float = 0.3
    """SFT stops at the first evaluation whose held-out accuracy reaches this (at the latest after the recipe)."""
    sft_eval_every: int = 10
    """SFT steps between those evaluations."""
    rl_rounds: int = 0
    """RL rounds (0: the RL recipe's)."""
    eval_records: int = 200
    """Held-out problems for both evaluations."""

    def __post_init__(self) -> None:
        require(0.0 < self.sft_target_accuracy <= 1.0, "sft-target-accuracy", "must be in (0, 1]")
        require(self.sft_eval_every >= 1, "sft-eval-every", "must be >= 1")
        require(self.rl_rounds >= 0, "rl-rounds", "must be >= 0 (0: the recipe's)")
        require(self.eval_records >= 1, "eval-records", "must be >= 1")


def sft_config(cfg: DemoConfig) -> SFTConfig:
    base = load_yaml(SFTConfig, cfg.sft_config)
    evaluation = dataclasses.replace(base.eval, num_records=cfg.eval_records, every=cfg.sft_eval_every,
                                     stop_at_accuracy=cfg.sft_target_accuracy)
    return dataclasses.replace(base, run_dir=str(Path(cfg.run_dir) / "sft"), eval=evaluation)


def rl_config(cfg: DemoConfig, policy_dir: str) -> RLConfig:
    base = load_yaml(RLConfig, cfg.rl_config)
    return dataclasses.replace(base, init_from=policy_dir, run_dir=str(Path(cfg.run_dir) / "rl"),
                               rounds=cfg.rl_rounds or base.rounds,
                               eval=dataclasses.replace(base.eval, num_records=cfg.eval_records))


def main() -> int:
    cfg = parse_cli(DemoConfig, description=__doc__)
    from motif_jax.rl.loop import train  # JAX loads after the flags parse: --help and flag errors are instant
    from motif_jax.train.sft import run_sft

    t0 = time.time()
    sft = run_sft(sft_config(cfg))
    if sft.get("status") not in ("finished", "target_accuracy"):
        print(f"SFT stopped early ({sft.get('status')}); re-run `make demo` to resume", flush=True)
        return 1
    rl = train(rl_config(cfg, sft["final_policy"]))
    if rl.get("accuracy_after") is None:
        print(f"RL stopped early ({rl.get('status')}); re-run `make demo` to resume", flush=True)
        return 1
    result = {
        "sft_steps": sft["steps"],
        "sft_accuracy": sft["accuracy_after"],
        "rl_accuracy_before": rl.get("accuracy_before"),
        "rl_accuracy_after": rl.get("accuracy_after"),
        "rl_rollouts": rl.get("rollouts_generated"),
        "rl_updates": rl.get("optimizer_steps"),
        "wall_time_s": round(time.time() - t0, 1),
    }
    sft_label = f"SFT ({result['sft_steps']} steps)"
    print(f"\n  {'stage':<18} held-out exact match")
    print(f"  {sft_label:<18} {result['sft_accuracy']:.3f}")
    print(f"  {'+ RL':<18} {result['rl_accuracy_after']:.3f}   "
          f"({result['rl_rollouts']} rollouts, {result['rl_updates']} updates)")
    print(f"  total {result['wall_time_s'] / 60:.1f} min; runs in {cfg.run_dir}/sft and {cfg.run_dir}/rl")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
