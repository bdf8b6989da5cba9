"""The recipe's findings in miniature, each with several seeds: aligned traces, the difficulty band, reuse, RL vs SFT.

    python scripts/findings.py                    # every finding, 3 seeds (~1h45 on a 2-core CPU)
    python scripts/findings.py --smoke            # every arm end to end at toy sizes (a test runs it)

The task (all generated, nothing downloaded): addition with aligned step-by-step traces. SFT data covers 1-4 digit
operands only; the RL pool and the "harder" evaluation go up to 6 digits, where a verifier exists but no trace does
(the regime in which RL can add what SFT cannot). Held-out problems come from the test split of every difficulty.

1. ``aligned_traces``: SFT on aligned / teacher-style / answer-only traces of the same problems (packed rows: equal
   steps are equal training tokens), and a 50/50 aligned + teacher pool filtered by the alignment scorer (lowest
   NLL half under a briefly trained target-style model); held-out accuracy on 3-4 digits.
2. ``band``: from one imperfect SFT policy per seed, RL with and without the difficulty band on the 1-6 digit pool,
   at equal rollouts (and at equal wall time, read off both runs' evaluation curves).
3. ``reuse``: RL with and without trajectory reuse (half of each round's groups replayed), at equal rollouts.
4. ``rl_vs_sft``: from the same SFT policy, RL against continued SFT on the SFT data for the same wall time,
   evaluated on the SFT range (1-4 digits) and on the harder range (5-6 digits).
Writes docs/findings.md (tables of mean ± std with 95% intervals, the command, date, machine, wall time) and one PNG
per finding under docs/img/, and prints as its last line one JSON object with one entry per finding, each holding
per-arm ``mean``, ``std`` and ``seeds``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from motif_jax import cli  # noqa: E402
from motif_jax.config import from_dict, load_yaml, parse_cli, require  # noqa: E402

FINDINGS = ("aligned_traces", "band", "reuse", "rl_vs_sft")


@dataclasses.dataclass(frozen=True)
class FindingsArgs:
    out_dir: str = "runs/findings"
    """Run directories of every arm and seed."""
    seeds: int | None = None
    """Seeds per arm (default: 3; 1 with --smoke)."""
    findings: tuple[str, ...] = FINDINGS
    """Which findings to run."""
    smoke: bool = False
    """Toy sizes: every arm end to end in about a minute per seed."""
    docs: str = ""
    """The report (default: docs/findings.md; with --smoke: OUT_DIR/findings.md), its plots in img/ beside it."""

    def __post_init__(self) -> None:
        require(self.seeds is None or self.seeds >= 1, "seeds", "must be >= 1")
        bad = [f for f in self.findings if f not in FINDINGS]
        require(not bad, "findings", f"unknown {bad}; choose from {FINDINGS}")

    @property
    def num_seeds(self) -> int:
        return self.seeds if self.seeds is not None else (1 if self.smoke else 3)


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of every run (full: what docs/findings.md reports; smoke: toy)."""

    model: dict
    sft_steps: int  # finding 1's arms
    sft_records: int
    target_steps: int  # the alignment scorer's target-style model
    start_accuracy: float  # the imperfect SFT start of findings 2-4
    start_max_steps: int
    rl_rollouts: int  # the RL arms' budget
    eval_records: int
    eval_every: int  # RL rounds between evaluations
    rl_groups: int  # groups trained per round
    rl_prompts: int = 20000  # the RL prompt pool (each run renders and tokenizes all of it)
    more_sft_steps: int = 100_000  # continued SFT's step cap; it ends at RL's wall time (smoke: at the cap first)
    seq_len: int = 384  # teacher-style traces of 4-digit sums run to ~330 byte tokens
    batch: int = 10  # 3,840 tokens per step, as the tiny-arith recipe's 24 x 160


FULL = Scale(model={"base": "configs/model/tiny.yaml", "num_heads": 5, "num_kv_heads": 2, "scan_layers": False,
                    "max_seq_len": 512},
             sft_steps=250, sft_records=20000, target_steps=120, start_accuracy=0.3, start_max_steps=700,
             rl_rollouts=10240, eval_records=200, eval_every=5, rl_groups=64)
SMOKE = Scale(model={"base": "configs/model/tiny.yaml", "num_layers": 1, "hidden_size": 32, "num_heads": 5,
                     "num_kv_heads": 2, "head_dim": 8, "mlp_dim": 64, "scan_layers": False, "max_seq_len": 512},
              sft_steps=4, sft_records=200, target_steps=4, start_accuracy=1.0, start_max_steps=4,
              rl_rollouts=128, eval_records=8, eval_every=1, rl_groups=8, rl_prompts=500, more_sft_steps=4,
              batch=8)


def spec(style: str, n: int, lo: int, hi: int, split: str, seed: int = 0) -> str:
    return f"synthetic:addition?style={style}&n={n}&min_digits={lo}&max_digits={hi}&split={split}&seed={seed}"


def _sft(run_dir: Path, scale: Scale, seed: int, sources: list[str], steps: int, *, init_from: str = "",
         eval_spec: str = "", stop_at: float = 0.0, max_minutes: float = 0.0, eval_every: int = 0) -> dict:
    from motif_jax.train.sft import SFTConfig, run_sft

    base = load_yaml(SFTConfig, ROOT / "configs/sft/tiny-arith.yaml")
    cfg = from_dict(SFTConfig, {
        "model": scale.model, "mesh": {"data": 1, "fsdp": -1}, "seed": seed, "run_dir": str(run_dir),
        "init_from": init_from, "max_minutes": max_minutes, "log_every": 50,
        "data": {"tokenizer": "byte", "seq_len": scale.seq_len, "batch_size": scale.batch,
                 "sources": [{"path": s} for s in sources], "stages": [{"name": "main", "steps": steps}]},
        "optim": dataclasses.asdict(base.optim) | {"warmup_steps": min(base.optim.warmup_steps, steps - 1)},
        "eval": {"heldout": eval_spec, "num_records": scale.eval_records, "max_new_tokens": 80,
                 "every": eval_every, "stop_at_accuracy": stop_at},
        "checkpoint": {"save_every": 0, "async_save": False},
    }, base_dir=ROOT)
    return run_sft(cfg)


def _rl(run_dir: Path, scale: Scale, seed: int, init_from: str, *, band: bool, reuse: bool) -> dict:
    from motif_jax.rl.config import RLConfig
    from motif_jax.rl.loop import RLTrainer

    base = load_yaml(RLConfig, ROOT / "configs/rl/tiny-arith.yaml")
    groups = scale.rl_groups
    cfg = from_dict(RLConfig, {
        **{k: v for k, v in dataclasses.asdict(base).items() if k in ("objective", "difficulty", "optim")},
        "init_from": init_from, "run_dir": str(run_dir), "seed": seed, "rounds": 100_000,
        "max_rollouts": scale.rl_rollouts, "band_filter": band, "verifiers": ["steps"],
        "prompts": spec("aligned", scale.rl_prompts, 1, 6, "train", seed),
        "eval": {"heldout": spec("aligned", scale.eval_records, 1, 6, "test"), "num_records": scale.eval_records,
                 "every": scale.eval_every, "max_new_tokens": 80, "batch_size": scale.eval_records},
        "rollout": dataclasses.asdict(base.rollout) | {"max_new_tokens": 80, "max_prompt_len": 32,
                                                       "prompts_per_call": groups if band else groups // 2},
        "update": {"groups_per_round": groups, "fresh_groups_per_round": groups // 2 if reuse else groups},
        "buffer": {"max_uses": 2 if reuse else 1, "max_staleness": 2},
        "train": {"num_microbatches": max(1, groups * base.rollout.group_size // 64)},
        "checkpoint": {"save_every": 0, "async_save": False},
    }, base_dir=ROOT)
    if not band:
        cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, drop_zero_std_groups=False))
    return RLTrainer(cfg).run()


def accuracy(policy: str, eval_spec: str, n: int) -> float:
    """Greedy exact-match accuracy of a policy directory on ``n`` records of ``eval_spec``."""
    from flax import nnx

    from motif_jax.data.prompts import load_prompt_records
    from motif_jax.data.tokenizer import load_tokenizer
    from motif_jax.model.transformer import abstract_model
    from motif_jax.train.checkpoint import load_policy
    from motif_jax.train.evaluate import exact_match

    cfg, params, tok = load_policy(policy)
    graphdef, _ = abstract_model(cfg)
    records = load_prompt_records(eval_spec, limit=n)
    return float(exact_match(nnx.merge(graphdef, params), load_tokenizer(tok), records, max_new_tokens=96,
                             batch_size=min(len(records), 200))["accuracy"])


def _filtered_mix(out: Path, scale: Scale, seed: int, target_policy: str) -> str:
    """Aligned + teacher traces of the same problems, the lower-NLL half under the target-style model kept."""
    from flax import nnx

    from motif_jax.data.records import write_jsonl
    from motif_jax.data.scoring import score_records, select_traces
    from motif_jax.data.synthetic import synthetic_records
    from motif_jax.data.tokenizer import load_tokenizer
    from motif_jax.model.transformer import abstract_model
    from motif_jax.train.checkpoint import load_policy

    n = scale.sft_records // 2
    pool = synthetic_records(spec("aligned", n, 1, 4, "train", seed)) + synthetic_records(
        spec("teacher", n, 1, 4, "train", seed + 500))
    cfg, params, tok = load_policy(target_policy)
    graphdef, _ = abstract_model(cfg)
    scores = score_records(nnx.merge(graphdef, params), load_tokenizer(tok), pool, batch_size=64)
    reasons = select_traces(scores, keep_quantile=0.5, require_answer_line=True, require_correct=True,
                            quantile_by=None)
    kept = [r for r, why in zip(pool, reasons) if why is None]
    path = out / "mix_filtered.jsonl"
    write_jsonl(kept, path)
    styles = [r["provenance"]["style"] for r in kept]
    print(f"[findings] filtered mix: kept {len(kept)} of {len(pool)} ({styles.count('aligned')} aligned, "
          f"{styles.count('teacher')} teacher)", flush=True)
    return str(path)


def finding_aligned(out: Path, scale: Scale, seed: int) -> dict[str, float]:
    test = spec("aligned", scale.eval_records, 3, 4, "test")
    arms = {"aligned": [spec("aligned", scale.sft_records, 1, 4, "train", seed)],
            "teacher": [spec("teacher", scale.sft_records, 1, 4, "train", seed)],
            "answer_only": [spec("none", scale.sft_records, 1, 4, "train", seed)]}
    target = _sft(out / "target", scale, seed, [spec("aligned", 2000, 1, 4, "train", seed + 1000)],
                  scale.target_steps)
    arms["mix_filtered"] = [_filtered_mix(out, scale, seed, target["final_policy"])]
    result = {}
    for arm, sources in arms.items():
        summary = _sft(out / arm, scale, seed, sources, scale.sft_steps)
        result[arm] = accuracy(summary["final_policy"], test, scale.eval_records)
    return result


def _at_wall(history: list[dict], t: float) -> float:
    """The last evaluated accuracy at or before wall time ``t``."""
    before = [h for h in history if h["wall_s"] <= t + 1e-9]
    return float(before[-1]["accuracy"]) if before else float(history[0]["accuracy"])


def finding_rl(out: Path, scale: Scale, seed: int, which: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Findings 2-4 from one SFT start per seed (the arms share it)."""
    start = _sft(out / "start", scale, seed, [spec("aligned", scale.sft_records, 1, 4, "train", seed)],
                 scale.start_max_steps, eval_spec=spec("aligned", scale.eval_records, 3, 4, "test"),
                 stop_at=scale.start_accuracy, eval_every=10)["final_policy"]
    easy, hard = spec("aligned", scale.eval_records, 1, 4, "test"), spec("aligned", scale.eval_records, 5, 6, "test")
    runs = {"band+reuse": _rl(out / "band+reuse", scale, seed, start, band=True, reuse=True)}
    if "band" in which:
        runs["no_band"] = _rl(out / "no_band", scale, seed, start, band=False, reuse=True)
    if "reuse" in which:
        runs["no_reuse"] = _rl(out / "no_reuse", scale, seed, start, band=True, reuse=False)
    result: dict[str, dict[str, float]] = {}
    if "band" in which:
        t = min(runs["band+reuse"]["wall_time_s"], runs["no_band"]["wall_time_s"])
        result["band"] = {"band": runs["band+reuse"]["accuracy_after"], "no_band": runs["no_band"]["accuracy_after"],
                          "band@equal_wall": _at_wall(runs["band+reuse"]["eval_history"], t),
                          "no_band@equal_wall": _at_wall(runs["no_band"]["eval_history"], t)}
    if "reuse" in which:
        result["reuse"] = {"reuse": runs["band+reuse"]["accuracy_after"],
                           "no_reuse": runs["no_reuse"]["accuracy_after"]}
    if "rl_vs_sft" in which:
        rl = runs["band+reuse"]
        sft = _sft(out / "more_sft", scale, seed, [spec("aligned", scale.sft_records, 1, 4, "train", seed + 7)],
                   scale.more_sft_steps, init_from=start, max_minutes=rl["wall_time_s"] / 60)
        result["rl_vs_sft"] = {"start@1-4": accuracy(start, easy, scale.eval_records),
                               "start@5-6": accuracy(start, hard, scale.eval_records),
                               "rl@1-4": accuracy(rl["final_policy"], easy, scale.eval_records),
                               "rl@5-6": accuracy(rl["final_policy"], hard, scale.eval_records),
                               "sft@1-4": accuracy(sft["final_policy"], easy, scale.eval_records),
                               "sft@5-6": accuracy(sft["final_policy"], hard, scale.eval_records)}
    return result


def summarize(per_seed: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """arm -> mean, std (sample), 95% interval half-width (t distribution), per-seed values."""
    from scipy import stats

    out = {}
    for arm in per_seed[0]:
        vals = np.asarray([s[arm] for s in per_seed], np.float64)
        std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        half = float(stats.t.ppf(0.975, len(vals) - 1) * std / math.sqrt(len(vals))) if len(vals) > 1 else 0.0
        out[arm] = {"mean": float(vals.mean()), "std": std, "ci95": half, "seeds": vals.tolist()}
    return out


TITLES = {"aligned_traces": "SFT data style (held-out accuracy, 3-4 digits)",
          "band": "RL with / without the difficulty band (accuracy, 1-6 digits)",
          "reuse": "RL with / without trajectory reuse (accuracy, 1-6 digits, equal rollouts)",
          "rl_vs_sft": "RL vs continued SFT at equal wall time (accuracy by range)"}


def plot(name: str, summary: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary)
    fig, ax = plt.subplots(figsize=(1.6 * len(arms) + 2, 3.6))
    means = [summary[a]["mean"] for a in arms]
    ax.bar(range(len(arms)), means, yerr=[summary[a]["ci95"] for a in arms], capsize=4, color="#8fb3d9")
    for i, a in enumerate(arms):  # each seed as a dot
        ax.scatter([i] * len(summary[a]["seeds"]), summary[a]["seeds"], color="black", s=12, zorder=3)
    ax.set_xticks(range(len(arms)), arms, rotation=20, ha="right")
    ax.set_ylabel("held-out greedy accuracy (fraction)")
    ax.set_ylim(0, 1)
    ax.set_title(TITLES[name] + "\nbars: mean with 95% interval; dots: seeds", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(path: Path, results: dict, args: FindingsArgs, wall_s: float, command: str) -> None:
    lines = ["# The recipe's findings, in miniature", "",
             f"Produced by `{command}` on {datetime.date.today().isoformat()}, {platform.machine()} "
             f"{platform.processor() or 'CPU'} ({__import__('os').cpu_count()} cores), {wall_s / 60:.0f} min, "
             f"{args.num_seeds} seed(s) per arm. Every number is held-out greedy exact-match accuracy (a fraction); "
             "`mean ± std [95% interval]` over seeds, the seeds' values after it. scripts/findings.py says how each "
             "arm is built.", ""]
    for name, summary in results.items():
        lines += [f"## {TITLES[name]}", "", "| arm | mean ± std | 95% interval | seeds |", "|---|---|---|---|"]
        for arm, s in summary.items():
            lines.append(f"| {arm} | {s['mean']:.3f} ± {s['std']:.3f} | ± {s['ci95']:.3f} | "
                         f"{', '.join(f'{v:.3f}' for v in s['seeds'])} |")
        lines += ["", f"![{name}](img/findings_{name}.png)", ""]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    args = parse_cli(FindingsArgs, description=__doc__.split("\n\n")[0])
    from jax.experimental.compilation_cache import compilation_cache as cc

    import jax

    out = Path(args.out_dir)
    if not jax.config.jax_compilation_cache_dir:  # the seeds' and arms' runs share programs (a set cache is kept)
        jax.config.update("jax_compilation_cache_dir", str(out / "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        cc.reset_cache()
    scale = SMOKE if args.smoke else FULL
    t0 = time.time()
    per_seed: dict[str, list[dict[str, float]]] = {f: [] for f in args.findings}
    for seed in range(args.num_seeds):
        seed_dir = out / f"seed{seed}"
        if "aligned_traces" in args.findings:
            per_seed["aligned_traces"].append(finding_aligned(seed_dir / "aligned_traces", scale, seed))
        rl_findings = tuple(f for f in args.findings if f != "aligned_traces")
        if rl_findings:
            for name, result in finding_rl(seed_dir / "rl", scale, seed, rl_findings).items():
                per_seed[name].append(result)
    results = {name: summarize(vals) for name, vals in per_seed.items() if vals}
    docs = Path(args.docs) if args.docs else (out / "findings.md" if args.smoke else ROOT / "docs/findings.md")
    for name, summary in results.items():
        plot(name, summary, docs.parent / "img" / f"findings_{name}.png")
    write_docs(docs, results, args, time.time() - t0, "python scripts/findings.py " + " ".join(sys.argv[1:]))
    print(json.dumps({name: {arm: {k: s[k] for k in ("mean", "std", "seeds")} for arm, s in summary.items()}
                      for name, summary in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
