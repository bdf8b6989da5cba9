"""The RL trainer: the loop skeleton (``motif_jax.train.loop``) with one unit = one round of
select -> generate -> verify -> filter -> buffer -> E x K updates -> version + 1.

1. **Rollouts** (``motif_jax.rl.collect``): difficulty-aware prompts, ``group_size`` sampled responses each with
   behaviour log-probs, verified, pass rates tracked, groups in the band admitted with their advantages until the
   round's fresh groups are in the buffer.
2. **Buffer**: the round trains on ``update.groups_per_round`` groups, the fresh ones first, replayed groups (older
   policy versions, within ``max_staleness`` and ``max_uses``) filling the rest.
3. **Updates**: the proximal log-probs (the round's starting parameters, "decoupled"; or the behaviour ones,
   "bypass") once for the round's rows, then ``num_passes x num_minibatches`` optimizer steps of the shared step
   engine (``motif_jax.train.step``) with the policy objective (``motif_jax.rl.step.policy_loss``), compiled
   before round 1 with its memory report; non-finite steps are skipped and counted like SFT's.
4. Version + 1 and metrics (every health metric of the RL objective), evaluation, checkpoints (parameters,
   optimizer and buffer arrays; pass-rate tracker, buffer metadata, policy version and counters as JSON).

Every compiled program has a fixed shape (generation: ``prompts_per_call x group_size`` rows with prompts padded to
``max_prompt_len``; update: ``[groups_per_round / num_minibatches x group_size, max_prompt_len + max_new_tokens]``),
so each compiles once per run. Randomness is derived from ``(seed, round)``, so a resumed run draws exactly what an
uninterrupted one would have.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from motif_jax.config import ConfigError
from motif_jax.data.prompts import load_prompt_records
from motif_jax.data.answers import answer_check
from motif_jax.data.template import stop_token_ids
from motif_jax.data.tokenizer import load_tokenizer
from motif_jax.model.generate import SamplingConfig
from motif_jax.parallel import mesh as mesh_lib
from motif_jax.parallel.hosts import global_array, host_array
from motif_jax.rl.buffer import TrajectoryBuffer
from motif_jax.rl.collect import RolloutCollector, rollout_metrics
from motif_jax.rl.engines import check_available, make_engine
from motif_jax.rl.config import RLConfig
from motif_jax.rl.objective import finalize_metrics
from motif_jax.rl.rollout import prompt_tokens
from motif_jax.rl.step import RL_BATCH_KEYS, make_logprob_fn, policy_loss
from motif_jax.rl.update import minibatch_rows, round_rows, summarize_steps
from motif_jax.rl.verifiers import Verifier, default_verifiers, score_response
from motif_jax.train.evaluate import default_checker
from motif_jax.train.loop import Trainer
from motif_jax.train.metrics import to_python
from motif_jax.train.optim import make_optimizer, make_schedule
from motif_jax.train.state import resolve_model
from motif_jax.train.step import abstract_batch, batch_shardings, compile_train_step

__all__ = ["RLTrainer", "make_checker", "train"]

# per-step engine metrics reported as they are (the objective's sums become means through finalize_metrics)
_ENGINE_KEYS = ("loss", "grad_norm", "update_norm", "learning_rate", "skipped")


def make_checker(verifiers: Mapping[str, Verifier], success_threshold: float) -> Callable[[Mapping[str, Any], str], bool]:
    """Evaluation checker: a record with an answer check (``data.answers.answer_check``) gets exactly SFT's verdict
    (``train.evaluate.default_checker``); others (code tests, format checks) pass when the verifiers' reward >= the
    threshold."""

    def checker(record: Mapping[str, Any], content: str) -> bool:
        if answer_check(record) is not None:
            return default_checker(record, content)
        return score_response(record, content, verifiers).total >= success_threshold

    return checker


class RLTrainer(Trainer):
    """Holds everything of one RL run; :meth:`run` trains ``cfg.rounds`` rounds (resuming from the run directory)."""

    unit = "round"
    evaluate_before = True
    metrics_prefix = "rollout"
    progress_keys = ("version", "rollouts", "reward_mean", "pass_rate", "groups_admitted", "admit_rate",
                     "response_length_mean", "truncation_rate", "replay_fraction", "clip_frac_high",
                     "is_weight_mean", "approx_kl", "entropy_mean", "grad_norm", "time_round_s")

    def __init__(self, cfg: RLConfig, *, verifiers: Mapping[str, Verifier] | None = None):
        """``verifiers``: custom reward functions (name -> Verifier) used instead of ``cfg.verifiers``."""
        super().__init__(cfg, cfg.rounds)
        self.cfg: RLConfig = cfg
        if self.mesh.shape["context"] != 1:
            raise ConfigError("--mesh.context: RL updates do not shard the sequence; use data / fsdp / tensor axes")
        self.model_cfg, policy_dir, policy_tokenizer = resolve_model(cfg.model, cfg.init_from)
        self.policy_source = str(policy_dir) if policy_dir else f"random init (seed {cfg.seed})"
        mesh_lib.validate_mesh(cfg.mesh, self.model_cfg, num_devices=self.mesh.size, global_batch=cfg.micro_batch,
                               batch_flag="train.num-microbatches")
        if self.model_cfg.max_seq_len < cfg.seq_len:
            raise ConfigError(
                f"--rollout.max-new-tokens: prompt budget {cfg.rollout.max_prompt_len} + "
                f"{cfg.rollout.max_new_tokens} new tokens exceeds the policy's max_seq_len {self.model_cfg.max_seq_len}")
        self.tokenizer_spec = policy_tokenizer or "byte"
        self.tokenizer = load_tokenizer(self.tokenizer_spec)
        if self.tokenizer.vocab_size > self.model_cfg.vocab_size:
            raise ConfigError(f"--init-from: tokenizer has {self.tokenizer.vocab_size} tokens but the model "
                              f"{self.model_cfg.vocab_size}")
        total_steps = max(cfg.rounds * cfg.steps_per_round, 1)
        self.schedule = make_schedule(cfg.optim, total_steps)
        self.tx = make_optimizer(cfg.optim, total_steps, schedule=self.schedule)

        check_available(cfg.rollout)

        # -- prompts, verifiers, RL state ------------------------------------------------------------------------------
        pool, pool_tokens = self._fit_prompts(load_prompt_records(cfg.prompts, task_verifiers=cfg.task_verifiers),
                                              "prompts")
        if len({str(r["id"]) for r in pool}) != len(pool):
            raise ConfigError("--prompts: prompt ids are not unique")
        if cfg.eval.heldout:
            records = load_prompt_records(cfg.eval.heldout, limit=cfg.eval.num_records, flag="eval.heldout",
                                          task_verifiers=cfg.task_verifiers)
            self.eval_records, _ = self._fit_prompts(records, "eval.heldout")
        self.verifiers = dict(verifiers) if verifiers is not None else {
            k: v for k, v in default_verifiers(cfg.sandbox).items() if k in cfg.verifiers}
        self.checker = make_checker(self.verifiers, cfg.difficulty.success_threshold)
        sampling = SamplingConfig(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                  top_p=cfg.rollout.top_p, stop_tokens=stop_token_ids(self.tokenizer),
                                  prompt_bucket=cfg.rollout.max_prompt_len)
        self.collector = RolloutCollector(cfg, pool, pool_tokens, self.tokenizer, self.verifiers, sampling)
        self.buffer = TrajectoryBuffer(cfg.buffer)
        self.version = self.opt_steps = self.rollouts = 0
        self._prefetched: dict[int, dict[str, float]] = {}  # round -> metrics of rollouts already in the buffer

        # -- train state and compiled programs (before round 1) --------------------------------------------------------
        self.state = self.restore_or_init(self.tx, policy_dir)
        self.ref_params = jax.tree.map(jnp.copy, self.state.params) if cfg.objective.kl_coef > 0 else None
        kwargs = cfg.objective.loss_kwargs()
        kwargs["max_response_len"] = kwargs["max_response_len"] or cfg.rollout.max_new_tokens
        batch = abstract_batch(cfg.samples_per_minibatch, cfg.seq_len, keys=RL_BATCH_KEYS,
                               float_keys=("loss_mask", "behaviour_logp", "prox_logp"))
        batch["advantages"] = jax.ShapeDtypeStruct((cfg.samples_per_minibatch,), jnp.float32)
        self.batch_shardings = batch_shardings(self.mesh, batch, cfg.mesh.logical_rules)
        self.update_step = compile_train_step(
            policy_loss(self.graphdef, kwargs, temperature=cfg.rollout.temperature, step_cfg=cfg.train), self.tx,
            mesh=self.mesh, state_shardings=self.shardings, abstract_state=self.state, batch=batch,
            mesh_cfg=cfg.mesh, num_microbatches=cfg.train.num_microbatches, schedule=self.schedule,
            frozen=self.ref_params, frozen_shardings=self.shardings.params if self.ref_params is not None else None,
            verbose=self.is_main, label="RL update")
        self.logprob_fn = make_logprob_fn(self.graphdef, temperature=cfg.rollout.temperature, step_cfg=cfg.train,
                                          param_sharding=self.shardings.params,
                                          batch_sharding=self.batch_shardings["tokens"])
        self.engine = make_engine(cfg.rollout.engine, model_cfg=self.model_cfg, graphdef=self.graphdef,
                                  params=self.state.params, tokenizer=self.tokenizer, pad_id=self.tokenizer.pad_id,
                                  mesh=self.mesh, mesh_cfg=cfg.mesh, rollout=cfg.rollout, run_dir=self.run_dir)
        self.engine.sync_weights(self.state.params, self.version)

    def _fit_prompts(self, records: list[dict[str, Any]], flag: str) -> tuple[list[dict[str, Any]], list[list[int]]]:
        """The records whose prompt fits in ``--rollout.max-prompt-len`` tokens, with their prompt tokens."""
        limit = self.cfg.rollout.max_prompt_len
        toks = [prompt_tokens(rec, self.tokenizer) for rec in records]
        kept = [(rec, t) for rec, t in zip(records, toks) if len(t) <= limit]
        if len(kept) < len(records):
            self.log(f"[rl] {len(records) - len(kept)} of {len(records)} --{flag} records are longer than "
                     f"--rollout.max-prompt-len {limit} tokens and were skipped")
        if not kept:
            raise ConfigError(f"--rollout.max-prompt-len: no --{flag} record fits in {limit} tokens")
        return [r for r, _ in kept], [t for _, t in kept]

    # -- one round --------------------------------------------------------------------------------------------------------
    def collect(self, index: int) -> dict[str, float]:
        """Round ``index``'s rollouts into the buffer with the engine's current policy; returns their metrics."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, index, 0])  # selection: its own stream (it may run beside an update)
        with mesh_lib.activate(self.mesh, cfg.mesh):
            rollouts = self.collector.collect(self.engine, self.buffer, round_index=index, version=self.engine.version,
                                              rng=rng)
        m = rollout_metrics(rollouts, success_threshold=cfg.difficulty.success_threshold,
                            band_counts=self.collector.tracker.band_counts(self.collector.pool_ids))
        m["rollouts_generated_version"] = float(self.engine.version)
        return m

    def run_unit(self, index: int) -> dict[str, float]:
        t0 = time.time()
        cfg = self.cfg
        m = self._prefetched.pop(index, None)  # generated during the previous round's update (--update.overlap)
        m = self.collect(index) if m is None else m
        self.rollouts += int(m["rollouts_round"])
        m["rollouts"] = float(self.rollouts)
        overlap = cfg.update.overlap and index + 1 < self.total
        m.update(self.update_round(np.random.default_rng([cfg.seed, index, 1]), prefetch=index + 1 if overlap else None))
        bs = self.buffer.stats(self.version)
        m.update({"version": float(self.version), "buffer_groups": float(bs["groups"]),
                  "buffer_fresh_groups": float(bs["fresh_groups"]),
                  **{f"buffer_dropped_{k}": float(v) for k, v in bs["dropped"].items()},
                  "time_round_s": time.time() - t0, "wall_s": self.elapsed()})
        return m

    def update_round(self, rng: np.random.Generator, prefetch: int | None = None) -> dict[str, float]:
        """E passes x K mini-batches over the round's groups (fresh + replayed); version + 1 if any step ran.

        ``prefetch``: generate that round in a background thread meanwhile, with the policy before this update (one
        version stale when it is trained on; the truncated importance weights correct for it).
        """
        cfg = self.cfg
        t0 = time.time()
        # exactly the configured share of fresh groups (oldest first); fresh groups carried over from a round that
        # admitted more than its quota wait for the next one
        mbatch = self.buffer.sample_minibatch(cfg.update.groups_per_round, version_now=self.version, rng=rng,
                                              fresh_fraction=cfg.fresh_groups / cfg.update.groups_per_round)
        m: dict[str, float] = {"train_groups": float(len(mbatch.groups)), "replay_fraction": mbatch.replay_fraction,
                               **{f"staleness_{k}": float(v) for k, v in mbatch.staleness_histogram.items()}}
        if not mbatch.groups:
            return {**m, "time_update_s": time.time() - t0}
        rows = round_rows(mbatch.groups, seq_len=cfg.seq_len, pad_id=self.tokenizer.pad_id, multiple=cfg.micro_batch)
        rows["prox_logp"] = self.proximal_logprobs(rows)
        m.update(self.engine_gap(rows))
        t_prox = time.time() - t0
        background = None
        if prefetch is not None:
            # the update donates the parameters it replaces: the engine samples from its own copy meanwhile
            self.engine.sync_weights(jax.tree.map(jnp.copy, self.state.params), self.version)
            background = threading.Thread(target=lambda: self._prefetched.update({prefetch: self.collect(prefetch)}))
            background.start()
        steps = []
        for idx in minibatch_rows(rows, num_groups=len(mbatch.groups), group_size=cfg.rollout.group_size,
                                  rows_per_minibatch=cfg.samples_per_minibatch,
                                  num_microbatches=cfg.train.num_microbatches,
                                  num_minibatches=cfg.update.num_minibatches, num_passes=cfg.update.num_passes,
                                  negative_weight=cfg.objective.negative_weight, rng=rng):
            batch = {k: global_array(rows[k][idx], self.batch_shardings[k]) for k in RL_BATCH_KEYS}
            self.state, metrics = self.update_step(self.state, batch, self.ref_params)
            self.opt_steps += 1
            values = to_python(metrics)
            self.guard.observe(values["skipped"] > 0, self.opt_steps)
            step = finalize_metrics({k: v for k, v in values.items() if k not in (*_ENGINE_KEYS, "denominator")})
            step.update({k: values[k] for k in _ENGINE_KEYS})
            self.writer.write(self.opt_steps, step, prefix="update")
            steps.append(step)
        if background is not None:
            background.join()
        self.version += 1
        self.engine.sync_weights(self.state.params, self.version)  # the old buffers were donated to the update
        summary = summarize_steps(steps)
        summary.pop("skipped")  # the guard has seen every step; the round reports their count
        return {**m, **summary, "skipped_steps": float(sum(s["skipped"] for s in steps)),
                "optimizer_steps": float(len(steps)), "time_proximal_s": t_prox, "time_update_s": time.time() - t0}

    def engine_gap(self, rows: Mapping[str, np.ndarray]) -> dict[str, float]:
        """|trainer log-prob - engine log-prob| on the round's newest rows (sampled by the current policy): what
        the engine and the trainer disagree on, for every engine (0 up to rounding for the JAX engine)."""
        mb = self.cfg.micro_batch
        newest = np.flatnonzero(rows["sample_valid"] & (rows["policy_versions"] == self.version))[:mb]
        if newest.size == 0:
            return {}
        take = np.concatenate([newest, np.full(mb - newest.size, rows["tokens"].shape[0] - 1)])
        sub = {k: v[take] for k, v in rows.items() if k in ("tokens", "targets", "positions", "segment_ids")}
        with mesh_lib.activate(self.mesh, self.cfg.mesh):
            ours = host_array(self.logprob_fn(self.state.params, {k: global_array(v, self.batch_shardings[k])
                                                                   for k, v in sub.items()}))
        mask = rows["loss_mask"][take] > 0
        gap = np.abs(ours - rows["behaviour_logp"][take])[mask]
        return {"engine_logprob_gap_mean": float(gap.mean()), "engine_logprob_gap_max": float(gap.max())}

    def proximal_logprobs(self, rows: Mapping[str, np.ndarray]) -> np.ndarray:
        """[R, T] proximal log-probs: the parameters at the start of the round (decoupled) or the behaviour ones."""
        if self.cfg.objective.proximal == "bypass":
            return rows["behaviour_logp"]
        mb, out = self.cfg.micro_batch, []
        keys = ("tokens", "targets", "positions", "segment_ids")
        with mesh_lib.activate(self.mesh, self.cfg.mesh):
            for s in range(0, rows["tokens"].shape[0], mb):
                chunk = {k: global_array(rows[k][s:s + mb], self.batch_shardings[k]) for k in keys}
                out.append(host_array(self.logprob_fn(self.state.params, chunk)))
        return np.concatenate(out) * rows["loss_mask"]

    # -- loop hooks -------------------------------------------------------------------------------------------------------
    def should_stop(self) -> str:
        return "max_rollouts" if self.cfg.max_rollouts and self.rollouts >= self.cfg.max_rollouts else ""

    def eval_context(self) -> dict[str, float]:
        return {"rollouts": float(self.rollouts), "version": float(self.version)}

    def checkpoint_items(self) -> dict[str, Any]:
        arrays, self._buffer_meta = self.buffer.checkpoint_arrays()
        return {"buffer": arrays}

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"version": self.version, "opt_steps": self.opt_steps, "rollouts": self.rollouts,
                "seed": self.cfg.seed, "tracker": self.collector.tracker.state_dict(), "buffer": self._buffer_meta,
                "prefetched": {str(k): v for k, v in self._prefetched.items()}}

    def abstract_checkpoint_items(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        return {"buffer": TrajectoryBuffer.abstract_checkpoint_arrays(extra["buffer"],
                                                                      mesh_lib.replicated(self.mesh))}

    def close(self) -> None:
        super().close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    def load_checkpoint(self, items: Mapping[str, Any], extra: Mapping[str, Any]) -> None:
        self.buffer.load_checkpoint(items["buffer"], extra["buffer"])
        self.collector.tracker.load_state_dict(extra["tracker"])
        self.version, self.opt_steps = int(extra["version"]), int(extra["opt_steps"])
        self.rollouts = int(extra["rollouts"])
        self._prefetched = {int(k): v for k, v in extra.get("prefetched", {}).items()}
        self.log(f"[rl] resumed: version {self.version}, {len(self.buffer)} buffered groups, "
                 f"{len(self.collector.tracker)} tracked prompts")

    def summary_extra(self) -> dict[str, Any]:
        return {"version": self.version, "optimizer_steps": self.opt_steps, "rollouts_generated": self.rollouts}


def train(cfg: RLConfig) -> dict[str, Any]:
    """Runs (or resumes) the RL run of ``cfg``; returns the summary written to ``run_dir/summary.json``."""
    return RLTrainer(cfg).run()
