"""The RL trainer: rounds of select -> generate -> verify -> filter -> buffer -> E x K updates -> version + 1.

One round (``RLTrainer.round``):

1. **Rollouts.** Pick ``rollout_prompts`` prompts (difficulty-aware: in-band and unseen prompts first, retired ones
   revisited with a small probability; uniform without ``band_filter``), sample ``group_size`` responses each with
   the current policy (behaviour log-probs at the sampling temperature), verify them (multi-task reward), update
   every prompt's pass-rate statistics, and admit the groups whose pass rate is in the band (zero-spread groups are
   dropped). Repeat until ``fresh_groups_per_round`` new groups are admitted or ``oversample_factor`` x that many
   prompts have been tried (DAPO's dynamic sampling, capped); extra admitted groups of the last call are dropped.
2. **Buffer.** Admitted groups get their group-normalised advantages once and enter the trajectory buffer; the
   round's training set is ``prompts_per_round`` groups: the fresh ones, then replayed groups (older policy versions,
   within ``max_staleness`` and ``max_uses``) fill the rest.
3. **Updates.** The proximal log-probs (parameters at the start of the round, "decoupled") are computed once for the
   round's samples, or taken from the behaviour log-probs ("bypass"). Then ``num_passes`` passes over
   ``num_minibatches`` shuffled mini-batches of whole groups (fresh and replayed mixed), each one jitted update that
   accumulates the objective's (numerator, denominator) over micro-batches and divides once. Rows with a policy
   gradient are put first, so that micro-batches of rows without one (advantage 0) cost nothing but their count.
4. Version + 1, metrics (every health metric of reference/rl-objective.md), periodic held-out evaluation and
   checkpoints (parameters, optimizer and buffer arrays in ``state``; pass-rate tracker, buffer metadata, policy
   version, counters in ``extra``).

Every compiled program has a fixed shape (generation: ``rollout_prompts x group_size`` rows with prompts padded to
``max_prompt_len``; update: ``[micro-batches, micro_batch_size, max_prompt_len + max_new_tokens]``), so each compiles
once per run. Randomness is derived from ``(seed, round)``, so a resumed run draws exactly what an uninterrupted one
would have.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from motif_jax.config import ConfigError, ModelConfig, load_yaml, to_dict
from motif_jax.data.synthetic import TASKS, check_answer, is_synthetic_spec, synthetic_records
from motif_jax.data.tokenizer import Tokenizer, load_tokenizer
from motif_jax.data.template import stop_token_ids
from motif_jax.model.generate import SamplingConfig
from motif_jax.parallel import mesh as mesh_lib
from motif_jax.rl.buffer import Group, TrajectoryBuffer, assign_advantages, collate
from motif_jax.rl.config import RLConfig
from motif_jax.rl.difficulty import BAND_STATUSES, DifficultyTracker, admit_group, group_pass_rate
from motif_jax.rl.objective import finalize_metrics, has_policy_gradient
from motif_jax.rl.rollout import RolloutStats, prompt_tokens, sample_groups, score_groups
from motif_jax.rl.step import BATCH_KEYS, make_logprob_fn, make_update_fn, stacked_shardings
from motif_jax.rl.verifiers import Verifier, default_verifiers, score_response
from motif_jax.train.checkpoint import Checkpointer, PreemptionFlag, load_policy, resolve_policy_dir, save_policy
from motif_jax.train.evaluate import exact_match
from motif_jax.train.metrics import MetricsWriter, write_json
from motif_jax.train.optim import make_optimizer, make_schedule
from motif_jax.model.transformer import create_model
from motif_jax.train.state import TrainState, abstract_train_state

__all__ = ["RLTrainer", "load_prompt_records", "train"]

_BUFFER_ARRAYS = ("prompt_tokens", "response_tokens", "loss_mask", "behaviour_logp", "prompt_lengths",
                  "response_lengths")


# ---------------------------------------------------------------------------------------------------------------------
# Prompt records
# ---------------------------------------------------------------------------------------------------------------------


def load_prompt_records(spec: str, *, limit: int | None = None, flag: str = "prompts") -> list[dict[str, Any]]:
    """Prompt records from a ``synthetic:...`` spec or a JSONL file.

    A JSONL line is a record with ``messages`` (the conversation up to the answer; a trailing assistant turn is the
    reference and is dropped when prompting), or a ``prompt`` / ``question`` string (one user turn); ``id``
    (default ``<file>:<line>``), ``task`` and the verifier fields (``answer``, ``tests``, ``constraints``, ...)
    pass through. Raises ConfigError naming ``--<flag>`` for a missing file or a malformed line.
    """
    if is_synthetic_spec(spec):
        try:
            records = synthetic_records(spec)
        except ValueError as e:
            raise ConfigError(f"--{flag}: {e}") from None
        return records[:limit] if limit else records
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--{flag}: no such file {spec!r} (give a JSONL file or a synthetic:<task>?... spec)")
    records = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--{flag}: {path}:{lineno}: not JSON ({e})") from None
            if "messages" not in rec:
                text = rec.get("prompt", rec.get("question"))
                if not isinstance(text, str):
                    raise ConfigError(f"--{flag}: {path}:{lineno}: needs 'messages' or a 'prompt' string")
                rec["messages"] = [{"role": "user", "content": text}]
            rec.setdefault("id", f"{path.name}:{lineno}")
            records.append(rec)
            if limit and len(records) >= limit:
                break
    if not records:
        raise ConfigError(f"--{flag}: {path} holds no records")
    return records


def make_checker(verifiers: Mapping[str, Verifier], success_threshold: float) -> Callable[[Mapping[str, Any], str], bool]:
    """Evaluation checker: the synthetic tasks' own answer check, else the verifiers' reward >= the threshold."""

    def checker(record: Mapping[str, Any], content: str) -> bool:
        if record.get("task") in TASKS and "answer" in record:
            return check_answer(record["task"], content, record["answer"])
        return score_response(record, content, verifiers).total >= success_threshold

    return checker


# ---------------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------------


def _histogram_metrics(prefix: str, hist: Mapping[int, int]) -> dict[str, float]:
    return {f"{prefix}_{k}": float(v) for k, v in hist.items()}


class RLTrainer:
    """Holds everything of one RL run; :meth:`run` trains to ``cfg.rounds`` (resuming from the run directory)."""

    def __init__(self, cfg: RLConfig, *, verifiers: Mapping[str, Verifier] | None = None,
                 log: Callable[[str], None] | None = None):
        """``verifiers``: custom reward functions (name -> Verifier) used instead of ``cfg.verifiers``."""
        self.cfg = cfg
        self.log = log or (lambda s: print(s, flush=True) if jax.process_index() == 0 else None)
        self.run_dir = Path(cfg.run_dir).absolute()
        self._t_start = time.time()

        # -- mesh, model, train state ---------------------------------------------------------------------------------
        if jax.process_count() > 1:
            raise ConfigError("--distributed.num-processes: the RL loop runs on one process (any number of local "
                              "devices); multi-host rollouts are not supported yet")
        self.mesh = mesh_lib.make_mesh(cfg.mesh)
        rules = cfg.mesh.logical_rules
        if self.mesh.shape["context"] != 1:
            raise ConfigError("--mesh.context: RL updates do not shard the sequence; use data / fsdp / tensor axes")
        if cfg.init_from:
            policy_dir = resolve_policy_dir(cfg.init_from)
            self.model_cfg = load_yaml(ModelConfig, policy_dir / "model.yaml")
        else:
            policy_dir = None
            self.model_cfg = cfg.model
        mesh_lib.validate_mesh(cfg.mesh, self.model_cfg, num_devices=self.mesh.size, global_batch=cfg.micro_batch,
                               batch_flag="micro-batch-size")
        if self.model_cfg.max_seq_len < cfg.seq_len:
            raise ConfigError(
                f"--max-new-tokens: prompt budget {cfg.max_prompt_len} + {cfg.max_new_tokens} new tokens exceeds the "
                f"policy's max_seq_len {self.model_cfg.max_seq_len}"
            )
        self.total_steps = max(cfg.rounds * cfg.steps_per_round, 1)
        self.tx = make_optimizer(cfg.optim, self.total_steps)
        self.schedule = make_schedule(cfg.optim, self.total_steps)
        # Parameters and optimizer state are built eagerly and placed into their shardings: no initialiser is
        # compiled (it costs more than a tiny policy's whole RL round on a CPU).
        _, self.graphdef, self.shardings = abstract_train_state(
            self.model_cfg, cfg.optim, self.mesh, rules, total_steps=self.total_steps)
        if policy_dir is not None:
            _, params, tok_spec = load_policy(policy_dir, shardings=self.shardings.params)
            self.policy_source = str(policy_dir)
        else:
            _, params = nnx.split(create_model(self.model_cfg, cfg.seed))
            params = jax.device_put(params, self.shardings.params)
            tok_spec = "byte"
            self.policy_source = f"random init (seed {cfg.seed})"
        self.state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), self.shardings.step), params=params,
                                opt_state=jax.device_put(self.tx.init(params), self.shardings.opt_state))
        self.tokenizer_spec = tok_spec
        self.tokenizer: Tokenizer = load_tokenizer(tok_spec)
        if self.tokenizer.vocab_size > self.model_cfg.vocab_size:
            raise ConfigError(f"--init-from: tokenizer has {self.tokenizer.vocab_size} tokens but the model "
                              f"{self.model_cfg.vocab_size}")
        self.ref_params = (jax.tree.map(jnp.copy, self.state.params) if cfg.objective.kl_coef > 0 else None)

        # -- prompts -----------------------------------------------------------------------------------------------
        self.pool, self.pool_tokens = self._tokenize(load_prompt_records(cfg.prompts), "prompts")
        self.pool_ids = [str(r["id"]) for r in self.pool]
        self.by_id = {pid: i for i, pid in enumerate(self.pool_ids)}
        if len(self.by_id) != len(self.pool_ids):
            raise ConfigError("--prompts: prompt ids are not unique")
        self.eval_records: list[dict[str, Any]] = []
        if cfg.eval_size and cfg.eval_prompts:
            self.eval_records, _ = self._tokenize(
                load_prompt_records(cfg.eval_prompts, limit=cfg.eval_size, flag="eval-prompts"), "eval-prompts")

        # -- RL state ------------------------------------------------------------------------------------------------
        self.tracker = DifficultyTracker(cfg.difficulty)
        for rec in self.pool:  # pass rates measured offline (scripts/prefilter_prompts.py)
            pre = rec.get("prefilter")
            if isinstance(pre, Mapping) and pre.get("attempts"):
                s, a = int(pre["successes"]), int(pre["attempts"])
                self.tracker.update(rec["id"], [1.0] * s + [0.0] * (a - s), step=-1)
        self.buffer = TrajectoryBuffer(cfg.buffer)
        self.verifiers = dict(verifiers) if verifiers is not None else {
            k: v for k, v in default_verifiers(cfg.sandbox).items() if k in cfg.verifiers}
        self.checker = make_checker(self.verifiers, cfg.difficulty.success_threshold)
        self.round_index = 0
        self.version = 0
        self.opt_steps = 0
        self.rollouts = 0
        self.wall_before = 0.0  # wall time of earlier runs of this run directory (resume)
        self.accuracy_before: float | None = None
        self.eval_history: list[dict[str, Any]] = []

        # -- compiled functions ----------------------------------------------------------------------------------------
        stops = stop_token_ids(self.tokenizer)
        self.sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                       top_p=cfg.top_p, stop_tokens=stops, prompt_bucket=cfg.max_prompt_len)
        batch_axes = mesh_lib.batch_spec(self.mesh, rules)[0]
        self.stacked_sh, self.adv_sh, self.rows_sh = stacked_shardings(self.mesh, batch_axes)
        kwargs = cfg.objective.loss_kwargs()
        if kwargs["max_response_len"] is None:
            kwargs["max_response_len"] = cfg.max_new_tokens
        self.update_fn, self.logprob_fn = _compiled_fns(
            self.graphdef, cfg.optim, self.total_steps, tuple(sorted(kwargs.items())), cfg.temperature, cfg.loss_impl,
            _hashable_tree(self.shardings.params), _hashable_tree(self.shardings.opt_state), self.stacked_sh,
            self.adv_sh, self.rows_sh, mesh_lib.replicated(self.mesh))
        ob = cfg.objective
        self.overlong = ((ob.max_response_len or cfg.max_new_tokens, ob.overlong_buffer, ob.overlong_factor)
                         if ob.overlong_buffer > 0 else None)
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint)
        self.writer = MetricsWriter(self.run_dir, total_steps=cfg.rounds, print_every_s=cfg.print_every_s)

    # -- helpers ------------------------------------------------------------------------------------------------------
    def _tokenize(self, records: list[dict[str, Any]], flag: str) -> tuple[list[dict[str, Any]], list[list[int]]]:
        kept, toks, dropped = [], [], 0
        for rec in records:
            t = prompt_tokens(rec, self.tokenizer)
            if len(t) > self.cfg.max_prompt_len:
                dropped += 1
                continue
            kept.append(rec)
            toks.append(t)
        if dropped:
            self.log(f"[rl] {dropped} of {len(records)} --{flag} records are longer than --max-prompt-len "
                     f"{self.cfg.max_prompt_len} tokens and were skipped")
        if not kept:
            raise ConfigError(f"--max-prompt-len: no --{flag} record fits in {self.cfg.max_prompt_len} tokens")
        return kept, toks

    @property
    def params(self) -> Any:
        return self.state.params

    def model(self) -> Any:
        return nnx.merge(self.graphdef, self.state.params)

    def elapsed(self) -> float:
        return self.wall_before + time.time() - self._t_start

    def evaluate(self) -> dict[str, Any]:
        """Greedy exact-match accuracy on the held-out records (``eval_size`` of ``eval_prompts``)."""
        if not self.eval_records:
            return {"accuracy": float("nan"), "num_records": 0}
        with mesh_lib.activate(self.mesh, self.cfg.mesh):
            return exact_match(self.model(), self.tokenizer, self.eval_records,
                               max_new_tokens=self.cfg.max_new_tokens, batch_size=min(len(self.eval_records), 256),
                               checker=self.checker)

    # -- rollouts -----------------------------------------------------------------------------------------------------
    def _select(self, k: int, rng: np.random.Generator) -> list[str]:
        if self.cfg.band_filter:
            ids = [str(i) for i in self.tracker.select(self.pool_ids, k, rng)]
        else:
            ids = [self.pool_ids[i] for i in rng.choice(len(self.pool_ids), size=min(k, len(self.pool_ids)),
                                                        replace=False)]
        while len(ids) < k:  # a pool smaller than a generation call: repeat prompts (fixed compiled shape)
            ids.append(ids[len(ids) % max(len(ids), 1)])
        return ids

    def _admit(self, g: Group) -> bool:
        r = g.rewards
        if self.cfg.objective.drop_zero_std_groups and float(np.ptp(r)) <= 1e-8:
            return False
        return admit_group(r, self.cfg.difficulty) if self.cfg.band_filter else True

    def generate_round(self, r: int, rng: np.random.Generator, key: jax.Array) -> dict[str, float]:
        """Rollouts until ``fresh_groups`` new groups are admitted (or the over-generation cap); returns metrics."""
        cfg = self.cfg
        self.buffer.evict(self.version)
        fresh_now = sum(1 for g in self.buffer.groups if g.use_count == 0)
        need = max(cfg.fresh_groups - fresh_now, 0)
        cap = max(math.ceil(cfg.difficulty.oversample_factor * cfg.fresh_groups), cfg.prompts_per_call)
        k = cfg.prompts_per_call
        stats = RolloutStats()
        generated: list[Group] = []
        admitted = overflow = calls = prompts_tried = 0
        t_gen = t_ver = 0.0
        info = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens}
        with mesh_lib.activate(self.mesh, cfg.mesh):
            while need > 0 and prompts_tried < cap:
                ids = self._select(k, rng)
                self.tracker.mark_sampled(ids, step=r)
                recs = [self.pool[self.by_id[i]] for i in ids]
                toks = [self.pool_tokens[self.by_id[i]] for i in ids]
                t0 = time.time()
                gen = sample_groups(self.graphdef, self.state.params, toks, cfg.group_size,
                                    jax.random.fold_in(key, calls), self.sampling, self.tokenizer.pad_id)
                t1 = time.time()
                groups, st = score_groups(
                    recs, toks, gen, group_size=cfg.group_size, tokenizer=self.tokenizer, verifiers=self.verifiers,
                    version=self.version, group_ids=[f"r{r}c{calls}g{i}" for i in range(k)],
                    reward_weights=cfg.reward_weights, overlong=self.overlong, sampling_info=info,
                )
                t_gen += t1 - t0
                t_ver += time.time() - t1
                stats.add(st)
                calls += 1
                prompts_tried += k
                for g in groups:
                    self.tracker.update(g.prompt_id, g.rewards, step=r)
                    generated.append(g)
                    if not self._admit(g):
                        continue
                    if need <= 0:
                        overflow += 1
                        continue
                    assign_advantages(g, normalize_std=cfg.objective.normalize_std, eps=cfg.objective.adv_eps)
                    self.buffer.add(g, step=r)
                    admitted += 1
                    need -= 1
        n_samples = max(stats.samples, 1)
        self.rollouts += stats.samples
        thr = cfg.difficulty.success_threshold
        m: dict[str, float] = {
            "rollouts": float(self.rollouts),
            "rollouts_round": float(stats.samples),
            "generation_calls": float(calls),
            "groups_generated": float(len(generated)),
            "groups_admitted": float(admitted),
            "groups_overflow": float(overflow),
            "admit_rate": admitted / max(len(generated), 1),
            "batch_filled": float(need <= 0),
            "reward_mean": float(np.mean([s.reward for g in generated for s in g.samples])) if generated else 0.0,
            "pass_rate": float(np.mean([group_pass_rate(g.rewards, thr) for g in generated])) if generated else 0.0,
            "response_length_mean": stats.length_sum / n_samples,
            "response_length_max": float(stats.length_max),
            "truncation_rate": stats.truncated / n_samples,
            "zero_std_group_frac": (float(np.mean([np.ptp(g.rewards) <= 1e-8 for g in generated]))
                                    if generated else 0.0),
            "time_generate_s": t_gen,
            "time_verify_s": t_ver,
        }
        for status, n in stats.status.items():
            m[f"verifier_{status}_frac"] = n / n_samples
        by_task: dict[str, list[Group]] = {}
        for g in generated:
            by_task.setdefault(g.task, []).append(g)
        for task, gs in by_task.items():
            m[f"reward/{task}"] = float(np.mean([s.reward for g in gs for s in g.samples]))
            m[f"pass_rate/{task}"] = float(np.mean([group_pass_rate(g.rewards, thr) for g in gs]))
        for band, n in self.tracker.band_counts(self.pool_ids).items():
            m[f"prompts_{band}"] = float(n)
        return m

    # -- updates ------------------------------------------------------------------------------------------------------
    def _rows(self, groups: Sequence[Group]) -> tuple[dict[str, np.ndarray], int]:
        """Collates the round's groups into [R, T] rows (R a multiple of the micro-batch, >= 1 padding row)."""
        n = sum(g.size for g in groups)
        mb = self.cfg.micro_batch
        rows = -(-(n + 1) // mb) * mb
        return collate(groups, self.cfg.seq_len, self.tokenizer.pad_id, batch_size=rows), n

    def _proximal(self, rows: Mapping[str, np.ndarray]) -> np.ndarray:
        """[R, T] proximal log-probs: the parameters at the start of the round (decoupled) or the behaviour ones."""
        if self.cfg.objective.proximal == "bypass":
            return rows["behaviour_logp"]
        mb = self.cfg.micro_batch
        out = []
        keys = ("inputs", "targets", "positions", "segment_ids")
        with mesh_lib.activate(self.mesh, self.cfg.mesh):
            for s in range(0, rows["inputs"].shape[0], mb):
                chunk = {k: jax.device_put(rows[k][s:s + mb], self.rows_sh) for k in keys}
                out.append(np.asarray(self.logprob_fn(self.state.params, chunk)))
        return np.concatenate(out) * rows["loss_mask"]

    def update_round(self, rng: np.random.Generator) -> tuple[dict[str, float], list[dict[str, float]]]:
        """E passes x K mini-batches over the round's groups (fresh + replayed); returns (round metrics, per step)."""
        cfg = self.cfg
        t0 = time.time()
        mbatch = self.buffer.sample_minibatch(cfg.prompts_per_round, version_now=self.version, rng=rng,
                                              fresh_fraction=None)
        groups = mbatch.groups
        m: dict[str, float] = {
            "train_groups": float(len(groups)),
            "replay_fraction": mbatch.replay_fraction,
            **_histogram_metrics("staleness", mbatch.staleness_histogram),
        }
        steps: list[dict[str, float]] = []
        if not groups:
            m["time_update_s"] = time.time() - t0
            return m, steps
        rows, _ = self._rows(groups)
        prox = self._proximal(rows)
        t_prox = time.time() - t0
        g_size, spm, mb = cfg.group_size, cfg.samples_per_minibatch, cfg.micro_batch
        m_count = cfg.num_microbatches
        pad_row = rows["inputs"].shape[0] - 1  # collate leaves trailing rows empty; the last one always is
        # Rows with a policy gradient go first in each mini-batch: the update skips micro-batches without any.
        inert = ~np.asarray(has_policy_gradient(rows["advantages"], rows["loss_mask"],
                                                negative_weight=cfg.objective.negative_weight))
        with mesh_lib.activate(self.mesh, cfg.mesh):
            for _ in range(cfg.num_passes):
                order = rng.permutation(len(groups))
                for part in np.array_split(order, cfg.num_minibatches):
                    if len(part) == 0:
                        continue
                    idx = np.concatenate([np.arange(gi * g_size, gi * g_size + g_size) for gi in part])
                    idx = np.concatenate([idx, np.full(spm - idx.size, pad_row)])
                    idx = idx[np.argsort(inert[idx], kind="stable")]
                    batch = {}
                    for k in BATCH_KEYS:
                        a = rows[k][idx]
                        batch[k] = jax.device_put(a.reshape((m_count, mb) + a.shape[1:]),
                                                  self.adv_sh if k == "advantages" else self.stacked_sh)
                    p = jax.device_put(prox[idx].reshape(m_count, mb, -1), self.stacked_sh)
                    lr = float(self.schedule(self.opt_steps))
                    params, opt_state, metrics = self.update_fn(
                        self.state.params, self.state.opt_state, batch, p, self.ref_params)
                    self.opt_steps += 1
                    self.state = TrainState(step=self.state.step + 1, params=params, opt_state=opt_state)
                    vals = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    fin = finalize_metrics({k: v for k, v in vals.items()
                                            if k not in ("loss", "denominator", "grad_norm", "update_norm")})
                    fin.update(loss=vals["loss"], grad_norm=vals["grad_norm"], update_norm=vals["update_norm"], lr=lr)
                    steps.append(fin)
        # Round means of the step metrics (maxima by max).
        for key in steps[0]:
            vals = [s[key] for s in steps]
            m[key] = float(np.max(vals)) if key.endswith("_max") else float(np.mean(vals))
        m["optimizer_steps"] = float(len(steps))
        m["time_proximal_s"] = t_prox
        m["time_update_s"] = time.time() - t0
        return m, steps

    # -- one round ----------------------------------------------------------------------------------------------------
    def round(self, r: int) -> dict[str, float]:
        t0 = time.time()
        rng = np.random.default_rng([self.cfg.seed, r])
        key = jax.random.fold_in(jax.random.key(self.cfg.seed), r)
        m = self.generate_round(r, rng, key)
        um, steps = self.update_round(rng)
        m.update(um)
        for i, s in enumerate(steps):
            self.writer.write(self.opt_steps - len(steps) + i + 1, s, prefix="update")
        if steps:
            self.version += 1
        bs = self.buffer.stats(self.version)
        m.update({
            "version": float(self.version),
            "buffer_groups": float(bs["groups"]),
            "buffer_fresh_groups": float(bs["fresh_groups"]),
            **{f"buffer_dropped_{k}": float(v) for k, v in bs["dropped"].items()},
            "time_round_s": time.time() - t0,
            "wall_s": self.elapsed(),
        })
        return m

    # -- checkpoints --------------------------------------------------------------------------------------------------
    def _extra(self) -> dict[str, Any]:
        bstate = self.buffer.state_dict()
        return {
            "round": self.round_index,
            "version": self.version,
            "opt_steps": self.opt_steps,
            "rollouts": self.rollouts,
            "wall_s": self.elapsed(),
            "seed": self.cfg.seed,
            "accuracy_before": self.accuracy_before,
            "eval_history": self.eval_history,
            "tracker": self.tracker.state_dict(),
            "buffer_meta_json": bstate["meta_json"],
            "buffer_sizes": {k: int(bstate[k].shape[0]) for k in _BUFFER_ARRAYS},
        }

    def save(self, force: bool = False) -> None:
        """Checkpoint at step ``round_index`` (the number of finished rounds)."""
        bstate = self.buffer.state_dict()
        # One extra element per array: zero-length arrays do not round-trip through every storage backend.
        arrays = {k: np.concatenate([bstate[k], np.zeros((1,), bstate[k].dtype)]) for k in _BUFFER_ARRAYS}
        self.ckpt.save(self.round_index, {"train": self.state, "buffer": arrays}, extra=self._extra(), force=force)

    def restore(self) -> bool:
        """Continue from the newest complete checkpoint in the run directory; False if there is none."""
        step = self.ckpt.latest_step()
        if step is None:
            return False
        extra = _read_extra(self.ckpt.directory, step)
        rep = mesh_lib.replicated(self.mesh)
        dtypes = {"prompt_tokens": np.int32, "response_tokens": np.int32, "loss_mask": np.bool_,
                  "behaviour_logp": np.float32, "prompt_lengths": np.int64, "response_lengths": np.int64}
        abstract = {
            "train": jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  self.state, self.shardings),
            "buffer": {k: jax.ShapeDtypeStruct((extra["buffer_sizes"][k] + 1,), dtypes[k], sharding=rep)
                       for k in _BUFFER_ARRAYS},
        }
        restored, _ = self.ckpt.restore(abstract, step=step)
        self.state = restored["train"]
        arrays = {k: np.asarray(v)[:-1] for k, v in restored["buffer"].items()}
        self.buffer.load_state_dict({"meta_json": extra["buffer_meta_json"], **arrays})
        self.tracker.load_state_dict(extra["tracker"])
        self.round_index = int(extra["round"])
        self.version = int(extra["version"])
        self.opt_steps = int(extra["opt_steps"])
        self.rollouts = int(extra["rollouts"])
        self.wall_before = float(extra["wall_s"])
        self._t_start = time.time()
        self.accuracy_before = extra.get("accuracy_before")
        self.eval_history = list(extra.get("eval_history", []))
        self.log(f"[rl] resumed from {self.ckpt.directory}/{step}: round {self.round_index}, version "
                 f"{self.version}, {len(self.buffer)} buffered groups, {len(self.tracker)} tracked prompts")
        return True

    # -- the run ------------------------------------------------------------------------------------------------------
    def _record_eval(self, result: Mapping[str, Any], reward: float | None) -> None:
        entry = {"round": self.round_index, "version": self.version, "rollouts": self.rollouts,
                 "accuracy": float(result["accuracy"]), "wall_s": self.elapsed()}
        if reward is not None:
            entry["reward_mean"] = reward
        self.eval_history.append(entry)
        self.writer.write(self.round_index, {"accuracy": entry["accuracy"],
                                             "truncated_fraction": result.get("truncated_fraction", 0.0),
                                             "rollouts": float(self.rollouts)}, prefix="eval")

    def run(self) -> dict[str, Any]:
        """Trains until ``cfg.rounds`` rounds are done (or ``max_minutes`` / SIGTERM), then evaluates and saves."""
        cfg = self.cfg
        if jax.process_index() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        resumed = self.restore()
        self.log(f"[rl] policy: {self.policy_source}; pool {len(self.pool)} prompts, eval {len(self.eval_records)}; "
                 f"mesh {mesh_lib.describe(self.mesh)}; {cfg.steps_per_round} optimizer steps per round")
        if not resumed and self.eval_records:
            res = self.evaluate()
            self.accuracy_before = float(res["accuracy"])
            self._record_eval(res, None)
            self.log(f"[rl] held-out accuracy before RL: {self.accuracy_before:.3f} ({len(self.eval_records)} records)")
        flag = PreemptionFlag()
        stopped = ""
        last_saved = self.round_index if resumed else -1
        try:
            while self.round_index < cfg.rounds:
                if cfg.max_minutes and self.elapsed() > cfg.max_minutes * 60:
                    stopped = "max_minutes"
                    break
                if cfg.max_rollouts and self.rollouts >= cfg.max_rollouts:
                    stopped = "max_rollouts"
                    break
                m = self.round(self.round_index)
                self.round_index += 1
                self.writer.write(self.round_index, m, prefix="rollout")
                self.writer.progress(self.round_index, {**m, "round": self.round_index}, force=cfg.print_every_s == 0,
                                     keys=("version", "rollouts", "reward_mean", "pass_rate", "groups_admitted",
                                           "admit_rate", "response_length_mean", "truncation_rate", "replay_fraction",
                                           "clip_frac_high", "is_weight_mean", "approx_kl", "entropy_mean",
                                           "grad_norm", "time_round_s"))
                if cfg.eval_every and self.round_index % cfg.eval_every == 0 and self.round_index < cfg.rounds:
                    res = self.evaluate()
                    self._record_eval(res, m.get("reward_mean"))
                    self.log(f"[rl] round {self.round_index}: held-out accuracy {res['accuracy']:.3f}")
                if self.ckpt.should_save(self.round_index):
                    self.save()
                    last_saved = self.round_index
                if flag.requested:
                    stopped = "preempted"
                    break
        finally:
            flag.restore_handlers()
        if last_saved != self.round_index:
            self.save(force=True)
        self.ckpt.wait()
        summary: dict[str, Any] = {
            "accuracy_before": self.accuracy_before,
            "rounds": self.round_index,
            "version": self.version,
            "optimizer_steps": self.opt_steps,
            "rollouts_generated": self.rollouts,
            "stopped": stopped or "done",
            "policy": self.policy_source,
        }
        if stopped == "preempted":
            summary["wall_time_s"] = self.elapsed()
            self.close()
            return summary
        if self.eval_records:
            res = self.evaluate()
            self._record_eval(res, None)
            summary["accuracy_after"] = float(res["accuracy"])
            summary["eval_examples"] = res.get("examples", [])
            self.log(f"[rl] held-out accuracy: before {self.accuracy_before:.3f} -> after {res['accuracy']:.3f}")
        final = save_policy(self.run_dir / "final", self.model_cfg, self.state.params, tokenizer=self.tokenizer_spec,
                            source=f"rl:{self.run_dir}")
        summary.update(wall_time_s=self.elapsed(), eval_history=self.eval_history, final_policy=str(final))
        write_json(self.run_dir / "summary.json", summary)
        self.close()
        return summary

    def close(self) -> None:
        self.ckpt.close()
        self.writer.close()


def _hashable_tree(tree: Any) -> tuple[Any, tuple[Any, ...]]:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)


@functools.lru_cache(maxsize=8)
def _compiled_fns(graphdef, optim_cfg, total_steps, loss_items, temperature, impl, param_sh, opt_sh, stacked_sh,
                  adv_sh, rows_sh, rep):
    """The jitted update and log-prob functions, shared by trainers with the same settings in one process (a resumed
    or repeated run in the same process compiles nothing again)."""
    param_sharding = param_sh[0].unflatten(param_sh[1])
    update = make_update_fn(
        graphdef, make_optimizer(optim_cfg, total_steps), loss_kwargs=dict(loss_items), temperature=temperature,
        impl=impl, param_sharding=param_sharding, opt_sharding=opt_sh[0].unflatten(opt_sh[1]),
        stacked_sharding=stacked_sh, adv_sharding=adv_sh, replicated=rep,
    )
    logprobs = make_logprob_fn(graphdef, temperature=temperature, impl=impl, param_sharding=param_sharding,
                               batch_sharding=rows_sh)
    return update, logprobs


def _read_extra(directory: Path, step: int) -> dict[str, Any]:
    """The ``extra`` item of a checkpoint step alone (it sizes the buffer arrays before the full restore)."""
    from absl import logging as absl_logging  # noqa: PLC0415 - only to quiet orbax's read-only notices

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        with ocp.CheckpointManager(directory, options=options,
                                   item_handlers={"extra": ocp.JsonCheckpointHandler()}) as mgr:
            out = mgr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
    finally:
        absl_logging.set_verbosity(verbosity)
    return dict(out["extra"])


def train(cfg: RLConfig) -> dict[str, Any]:
    """Runs (or resumes) the RL run of ``cfg``; returns the summary written to ``run_dir/summary.json``."""
    return RLTrainer(cfg).run()


__all__ += ["make_checker"]
