"""Offline difficulty pre-filtering of a prompt pool by measured pass rate.

    python scripts/prefilter_prompts.py --policy SFT_RUN/final --prompts "synthetic:addition?..." \
        --out pool.jsonl --samples 8 --p-lo 0.1 --p-hi 0.9

Samples ``--samples`` responses per prompt from the policy (temperature / top-p / max-new-tokens as in RL), scores
them with the verifiers, and writes the prompts whose pass rate lies in [p_lo, p_hi] to a JSONL file: each line is
the prompt record plus ``"prefilter": {attempts, successes, pass_rate, reward_mean, truncated}``. Use the file as
``--prompts`` of scripts/rl.py: the RL loop seeds its pass-rate tracker from these counts, so selection starts with
the prompts already sorted into bands. A pass-rate histogram and the band counts go to the console and to
``<out>.summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from motif_jax import cli
from motif_jax.config import ConfigError, ModelConfig, parse_cli, require
from motif_jax.rl.config import SandboxConfig

# JAX and the engine are imported in prefilter(): --help and a bad flag answer before they load.


@dataclasses.dataclass(frozen=True)
class PrefilterConfig:
    policy: str = ""
    """Policy directory, or a run directory with final/."""
    model: ModelConfig = ModelConfig()
    """Run-time fields of the policy's model (dtype, attention_impl, remat_policy, ...), as with --init-from."""
    prompts: str = "synthetic:addition?style=aligned&n=2000&min_digits=3&max_digits=4&split=train"
    """Prompt records: a synthetic:... spec or a JSONL file."""
    out: str = "prefiltered.jsonl"
    """The kept prompts, each with its measured pass rate under "prefilter"."""
    samples: int = 8
    """Responses sampled per prompt."""
    p_lo: float = 0.0
    """Keep prompts with p_lo <= pass rate <= p_hi."""
    p_hi: float = 1.0
    """Upper edge of the kept pass rates."""
    success_threshold: float = 0.5
    """A response with reward >= this counts as a success."""
    limit: int = 0
    """First N prompts only (0: all)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int = 64
    """Response budget in tokens."""
    max_prompt_len: int = 64
    """Longer prompts are skipped."""
    batch_prompts: int = 32
    """Prompts per generation call."""
    verifiers: tuple[str, ...] = ("exact", "math", "code", "format")
    """Verifiers of the reward."""
    sandbox: SandboxConfig = dataclasses.field(default_factory=SandboxConfig)
    seed: int = 0
    """Seed of the sampling."""

    def __post_init__(self) -> None:
        require(bool(self.policy), "policy", "give the policy to measure (a policy or run directory)")
        require(self.samples >= 1, "samples", "must be >= 1")
        require(0.0 <= self.p_lo <= self.p_hi <= 1.0, "p-lo", "need 0 <= p_lo <= p_hi <= 1")
        require(self.batch_prompts >= 1, "batch-prompts", "must be >= 1")
        require(self.temperature > 0, "temperature", "must be > 0")
        require(self.limit >= 0, "limit", "must be >= 0")


def prefilter(cfg: PrefilterConfig) -> dict:
    from motif_jax.data.prompts import load_prompt_records
    from motif_jax.data.template import stop_token_ids
    from motif_jax.data.tokenizer import load_tokenizer
    from motif_jax.model.generate import SamplingConfig
    from motif_jax.model.transformer import abstract_model
    from motif_jax.rl.engines.jax_engine import JaxEngine
    from motif_jax.rl.rollout import measure_pass_rates, prompt_tokens
    from motif_jax.rl.verifiers import default_verifiers
    from motif_jax.train.checkpoint import load_policy_params
    from motif_jax.train.state import resolve_model

    t0 = time.time()
    model_cfg, policy_dir, tok_spec = resolve_model(cfg.model, cfg.policy)
    params = load_policy_params(policy_dir, model_cfg)
    graphdef, _ = abstract_model(model_cfg)
    tok = load_tokenizer(tok_spec)
    records = load_prompt_records(cfg.prompts, limit=cfg.limit or None)
    kept_recs, prompts = [], []
    for r in records:
        t = prompt_tokens(r, tok)
        if len(t) <= cfg.max_prompt_len:
            kept_recs.append(r)
            prompts.append(t)
    if not kept_recs:
        raise ConfigError(f"--max-prompt-len: no prompt fits in {cfg.max_prompt_len} tokens")
    require(max(len(p) for p in prompts) + cfg.max_new_tokens <= model_cfg.max_seq_len, "max-new-tokens",
             f"prompts + {cfg.max_new_tokens} new tokens exceed the policy's max_seq_len {model_cfg.max_seq_len}")
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              stop_tokens=stop_token_ids(tok), prompt_bucket=cfg.max_prompt_len)
    verifiers = {k: v for k, v in default_verifiers(cfg.sandbox).items() if k in cfg.verifiers}
    engine = JaxEngine(graphdef=graphdef, params=params, pad_id=tok.pad_id)
    stats = measure_pass_rates(engine, kept_recs, prompts, samples=cfg.samples, sampling=sampling,
                               tokenizer=tok, verifiers=verifiers, seed=cfg.seed,
                               batch_prompts=min(cfg.batch_prompts, len(kept_recs)),
                               success_threshold=cfg.success_threshold)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rates = np.array([s["pass_rate"] for s in stats])
    kept = 0
    with out.open("w") as f:
        for rec, s in zip(kept_recs, stats):
            if cfg.p_lo <= s["pass_rate"] <= cfg.p_hi:
                f.write(json.dumps({**rec, "prefilter": s}) + "\n")
                kept += 1
    hist, edges = np.histogram(rates, bins=np.linspace(0.0, 1.0, 11))
    summary = {
        "policy": cfg.policy, "prompts": cfg.prompts, "measured": len(stats), "kept": kept,
        "band": [cfg.p_lo, cfg.p_hi], "samples_per_prompt": cfg.samples,
        "mean_pass_rate": float(rates.mean()), "never_solved": int((rates == 0).sum()),
        "always_solved": int((rates == 1).sum()),
        "histogram": {f"{edges[i]:.1f}-{edges[i + 1]:.1f}": int(h) for i, h in enumerate(hist)},
        "wall_time_s": time.time() - t0,
    }
    Path(str(out) + ".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> int:
    cfg = parse_cli(PrefilterConfig, description=__doc__)
    summary = prefilter(cfg)
    print(f"measured {summary['measured']} prompts x {cfg.samples} samples: mean pass rate "
          f"{summary['mean_pass_rate']:.3f}, never solved {summary['never_solved']}, always solved "
          f"{summary['always_solved']}; kept {summary['kept']} in [{cfg.p_lo}, {cfg.p_hi}] -> {cfg.out}")
    for k, v in summary["histogram"].items():
        print(f"  pass rate {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
