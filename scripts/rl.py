"""RL fine-tuning: ``python scripts/rl.py --config configs/rl/tiny-arith.yaml --init-from SFT_RUN/final --run-dir DIR``.

Every field of motif_jax.rl.config.RLConfig is a flag (``--rollout.group-size 16``, ``--objective.eps-high 0.28``,
``--difficulty.p-lo 0.2``, ``--buffer.max-uses 1``, ``--optim.lr 1e-5``, ``--train.num-microbatches 4`` ...). The run directory holds config.yaml,
tensorboard/, metrics.jsonl (split ``rollout`` per round, ``update`` per optimizer step, ``eval``), checkpoints/,
final/ (the policy, for --init-from) and summary.json (``accuracy_before``, ``accuracy_after``, rollouts generated,
wall time). Re-running the same command resumes from the newest complete checkpoint.
"""

import sys

from motif_jax import cli
from motif_jax.config import parse_cli
from motif_jax.rl.config import RLConfig


def main() -> int:
    cfg = parse_cli(RLConfig, description=__doc__)
    from motif_jax.parallel import distributed  # JAX loads after the flags parse: --help and flag errors are instant
    from motif_jax.rl.loop import train

    distributed.initialize(cfg.distributed)
    summary = train(cfg)
    before, after = summary.get("accuracy_before"), summary.get("accuracy_after")
    if before is not None and after is not None:
        print(f"held-out accuracy before RL {before:.3f} -> after {after:.3f} "
              f"({summary['rollouts_generated']} rollouts, {summary['optimizer_steps']} updates, "
              f"{summary.get('wall_time_s', 0.0):.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
