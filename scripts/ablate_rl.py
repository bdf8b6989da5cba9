"""Ablation of the RL recipe: the same rollout budget with / without the difficulty band and trajectory reuse.

    python scripts/ablate_rl.py --config configs/rl/tiny-arith.yaml --init-from SFT_RUN/final --run-dir DIR \
        [--budget-rollouts 6144] [--variants band+reuse,band,reuse,plain] [--target-accuracy 0.7] [any RL flag]

Variants (each a full RL run in ``DIR/<variant>/`` from the same policy, seed and prompt pool, stopped once it has
generated ``--budget-rollouts`` responses):

``band+reuse``  difficulty-aware selection and band admission (over-generation to fill the batch) + reuse
                (half of each round's groups replayed from the buffer, ``max_uses`` >= 2, 2 passes per round);
``band``        band only: every round trains once on fresh groups (1 pass, groups used once);
``reuse``       reuse only: uniform prompts, every group admitted (zero-spread groups kept: plain GRPO);
``plain``       neither.

The reuse settings come from the preset when it reuses data (``fresh_groups_per_round < groups_per_round``),
else half of the groups are replayed, ``max_uses`` 2 and 2 passes. Writes ``ablation.json``, ``ablation.md`` (a
table: final / best held-out accuracy, rollouts needed to reach the target accuracy, updates, wall time) and
``ablation.png`` (rollout reward and held-out accuracy against rollouts generated).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from motif_jax import cli
from motif_jax.config import parse_cli
from motif_jax.rl.config import RLConfig

VARIANTS = {"band+reuse": (True, True), "band": (True, False), "reuse": (False, True), "plain": (False, False)}


def variant_config(base: RLConfig, name: str, run_dir: Path, budget: int, eval_every: int) -> RLConfig:
    band, reuse = VARIANTS[name]
    n, up = base.update.groups_per_round, base.update
    if reuse:
        if base.fresh_groups < n:
            fresh, uses, passes = base.fresh_groups, base.buffer.max_uses, up.num_passes
        else:
            fresh, uses, passes = max(n // 2, 1), max(base.buffer.max_uses, 2), max(up.num_passes, 2)
    else:
        fresh, uses, passes = n, 1, 1
    objective = base.objective if band else dataclasses.replace(base.objective, drop_zero_std_groups=False)
    return dataclasses.replace(
        base,
        band_filter=band,
        update=dataclasses.replace(up, fresh_groups_per_round=fresh, num_passes=passes),
        # Band variants over-generate with the preset's call size; without the band every group is admitted, so a
        # call samples exactly the round's fresh groups (nothing generated is thrown away).
        rollout=dataclasses.replace(base.rollout, prompts_per_call=base.prompts_per_call if band else fresh),
        buffer=dataclasses.replace(base.buffer, max_uses=uses),
        objective=objective,
        run_dir=str(run_dir / name),
        rounds=max(base.rounds, 100_000),  # the rollout budget stops the run
        max_rollouts=budget,
        max_minutes=0.0,
        eval=dataclasses.replace(base.eval, every=eval_every),
    )


def _rollout_curve(run_dir: Path) -> list[dict[str, float]]:
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("split") == "rollout" and "reward_mean" in r:
            rows.append({"rollouts": r["rollouts"], "reward_mean": r["reward_mean"], "pass_rate": r["pass_rate"]})
    return rows


def _first_reach(history: list[dict[str, Any]], target: float) -> int | None:
    for h in history:
        if h["accuracy"] >= target - 1e-9:
            return int(h["rollouts"])
    return None


def write_report(run_dir: Path, results: dict[str, dict[str, Any]], target: float | None) -> dict[str, Any]:
    """ablation.json / ablation.md / ablation.png from the variants' summaries and metrics."""
    finals = {k: r["summary"].get("accuracy_after") for k, r in results.items()}
    if target is None:
        target = min(v for v in finals.values() if v is not None)
    rows = []
    for name, r in results.items():
        s = r["summary"]
        hist = s.get("eval_history", [])
        band, reuse = VARIANTS[name]
        rows.append({
            "variant": name, "band": band, "reuse": reuse,
            "rollouts": s["rollouts_generated"], "updates": s["optimizer_steps"], "rounds": s["rounds"],
            "accuracy_before": s.get("accuracy_before"), "accuracy_after": s.get("accuracy_after"),
            "best_accuracy": max((h["accuracy"] for h in hist), default=None),
            "rollouts_to_target": _first_reach(hist, target),
            "final_reward": r["curve"][-1]["reward_mean"] if r["curve"] else None,
            "wall_time_s": s.get("wall_time_s"),
        })
    report = {"target_accuracy": target, "variants": rows,
              "curves": {k: {"rollout": r["curve"], "eval": r["summary"].get("eval_history", [])}
                         for k, r in results.items()}}
    (run_dir / "ablation.json").write_text(json.dumps(report, indent=2) + "\n")

    def f(x: Any, fmt: str = "{:.3f}") -> str:
        return "-" if x is None else fmt.format(x)

    lines = [
        f"Held-out greedy accuracy; target accuracy {target:.3f} (rollouts generated when first reached; - = never).",
        "",
        "| variant | band | reuse | rollouts | updates | acc. before | acc. after | best acc. | rollouts to target "
        "| final reward | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {'yes' if r['band'] else 'no'} | {'yes' if r['reuse'] else 'no'} | {r['rollouts']} "
            f"| {r['updates']} | {f(r['accuracy_before'])} | {f(r['accuracy_after'])} | {f(r['best_accuracy'])} "
            f"| {f(r['rollouts_to_target'], '{}')} | {f(r['final_reward'])} | {f(r['wall_time_s'], '{:.0f}')} |"
        )
    (run_dir / "ablation.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        c = r["curve"]
        ax1.plot([p["rollouts"] for p in c], [p["reward_mean"] for p in c], label=name)
        h = r["summary"].get("eval_history", [])
        ax2.plot([p["rollouts"] for p in h], [p["accuracy"] for p in h], marker="o", label=name)
    ax1.set(xlabel="rollouts generated", ylabel="mean rollout reward", title="reward")
    ax2.axhline(target, color="gray", linestyle=":", linewidth=1)
    ax2.set(xlabel="rollouts generated", ylabel="held-out greedy accuracy", title="held-out accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "ablation.png", dpi=120)
    plt.close(fig)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     add_help=False)
    parser.add_argument("--budget-rollouts", type=int, default=0,
                        help="responses generated per variant (0: --max-rollouts of the preset, else 6144)")
    parser.add_argument("--variants", default="band+reuse,band,reuse,plain")
    parser.add_argument("--eval-every-ablation", type=int, default=0,
                        help="rounds between held-out evaluations (0: the preset's --eval.every, else 5)")
    parser.add_argument("--target-accuracy", type=float, default=None)
    own, rest = parser.parse_known_args()
    base = parse_cli(RLConfig, rest, description=__doc__)
    names = [v.strip() for v in own.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        print(f"error: --variants: unknown {bad}; choose from {sorted(VARIANTS)}", file=sys.stderr)
        return 2
    budget = own.budget_rollouts or base.max_rollouts or 6144
    eval_every = own.eval_every_ablation or base.eval.every or 5
    run_dir = Path(base.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    from motif_jax.rl.loop import RLTrainer  # JAX loads after the flags parse: --help and flag errors are instant

    results: dict[str, dict[str, Any]] = {}
    t0 = time.time()
    for name in names:
        cfg = variant_config(base, name, run_dir, budget, eval_every)
        print(f"=== {name}: band {cfg.band_filter}, fresh groups {cfg.fresh_groups}/{cfg.update.groups_per_round}, "
              f"passes {cfg.update.num_passes}, max uses {cfg.buffer.max_uses}, budget {budget} rollouts", flush=True)
        summary = RLTrainer(cfg).run()
        results[name] = {"summary": summary, "curve": _rollout_curve(Path(cfg.run_dir))}
    report = write_report(run_dir, results, own.target_accuracy)
    print((run_dir / "ablation.md").read_text())
    print(f"wrote {run_dir / 'ablation.md'}, ablation.json and ablation.png ({time.time() - t0:.0f} s)")
    return 0 if report else 1


if __name__ == "__main__":
    sys.exit(cli.run(main))
