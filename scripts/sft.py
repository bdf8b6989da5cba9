"""Supervised fine-tuning: ``python scripts/sft.py --config configs/sft/tiny-arith.yaml [--flag value ...]``.

Every field of motif_jax.train.sft.SFTConfig is a flag (``--optim.lr 1e-3``, ``--data.batch-size 32``,
``--mesh.fsdp -1``, ``--distributed.coordinator-address host:port`` ...). The run directory holds config.yaml,
tensorboard/, metrics.jsonl, checkpoints/, final/ (the policy, for --init-from) and summary.json. Re-running the
same command resumes from the newest complete checkpoint. ``--stop-after-steps K`` saves and exits after K steps of
this invocation (time-boxed jobs: submit the same command again); SIGTERM saves and exits at the next step.
"""

import sys

from motif_jax import cli
from motif_jax.config import parse_cli
from motif_jax.train.config import SFTConfig


def main() -> int:
    cfg = parse_cli(SFTConfig, description=__doc__)
    from motif_jax.parallel import distributed  # JAX loads after the flags parse: --help and flag errors are instant
    from motif_jax.train.sft import run_sft

    distributed.initialize(cfg.distributed)
    summary = run_sft(cfg)
    ev = summary.get("final_eval") or {}
    if "accuracy" in ev:
        print(f"final held-out accuracy {ev['accuracy']:.3f}, loss {ev['loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
