"""The SFT trainer: the loop skeleton (``motif_jax.train.loop``) with one unit = one compiled step of the fused
cross-entropy on a packed Grain batch.

``run_sft(cfg)`` is what ``scripts/sft.py`` calls. The same code runs on one CPU and on a multi-host GPU cluster:
every process runs it, process 0 alone writes logs, and Orbax coordinates checkpoints. What is SFT's own: the
curriculum (stages with their sources, shapes and peak learning rates; one compiled step per batch shape), the
Grain iterator (saved in every checkpoint, so a resumed run produces the same batches, losses and parameters as an
uninterrupted one), the held-out loss, and throughput / MFU in the logs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from motif_jax.config import require
from motif_jax.data.answers import answer_check
from motif_jax.data.config import SourceConfig
from motif_jax.data.pipeline import make_data_iterator, to_global_array
from motif_jax.data.prompts import load_prompt_records
from motif_jax.data.tokenizer import load_tokenizer
from motif_jax.model.lm_head import cross_entropy_sums
from motif_jax.parallel import mesh as mesh_lib
from motif_jax.parallel.context import load_balance_batch
from motif_jax.train.config import SFTConfig
from motif_jax.train.loop import NonFiniteError, Trainer
from motif_jax.train.optim import make_optimizer, make_schedule
from motif_jax.train.state import resolve_model
from motif_jax.train.step import BATCH_KEYS, CompiledStep, abstract_batch, batch_shardings, compile_train_step, lm_loss

__all__ = ["NonFiniteError", "SFTConfig", "SFTTrainer", "curriculum_schedule", "flops_per_token", "run_sft"]


def curriculum_schedule(cfg: SFTConfig) -> optax.Schedule:
    """Each stage gets warm-up + decay over its own steps with its own peak (``stage.lr`` or ``--optim.lr``)."""
    stages = cfg.data.resolved_stages()
    parts = [make_schedule(cfg.optim, st.steps, peak=st.lr or cfg.optim.lr) for st in stages]
    if len(parts) == 1:
        return parts[0]
    boundaries = list(np.cumsum([st.steps for st in stages])[:-1])
    return optax.join_schedules(parts, boundaries)


def flops_per_token(model_cfg: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters) + causal attention (6 x layers x seq x q-width)."""
    embed = model_cfg.vocab_size * model_cfg.hidden_size
    dense = model_cfg.param_count() - embed * (1 if model_cfg.tie_embeddings else 2)
    matmul = dense + embed  # the LM head is a matmul; the embedding lookup is not
    attn_width = model_cfg.num_heads * model_cfg.head_dim * (2 if model_cfg.attention == "differential" else 1)
    return 6.0 * matmul + 6.0 * model_cfg.num_layers * seq_len * attn_width


_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


class SFTTrainer(Trainer):
    unit = "step"
    progress_keys = ("loss", "grad_norm", "learning_rate", "tokens_per_s", "mfu")

    def __init__(self, cfg: SFTConfig):
        super().__init__(cfg, cfg.total_steps)
        self.model_cfg, policy_dir, policy_tokenizer = resolve_model(cfg.model, cfg.init_from)
        require(not (cfg.init_from and cfg.data.tokenizer not in ("byte", policy_tokenizer)), "data.tokenizer",
                f"--init-from {cfg.init_from} brings its own tokenizer ({policy_tokenizer}); drop --data.tokenizer")
        self.tokenizer_spec = policy_tokenizer or cfg.data.tokenizer
        self.policy_source = str(policy_dir) if policy_dir else f"random init (seed {cfg.seed})"
        self.tokenizer = load_tokenizer(self.tokenizer_spec, chat_template=cfg.data.chat_template,
                                        special_tokens=cfg.data.special_tokens)
        require(self.tokenizer.vocab_size <= self.model_cfg.vocab_size, "model.vocab-size",
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model only {self.model_cfg.vocab_size}")
        self.data_cfg = dataclasses.replace(cfg.data, tokenizer=self.tokenizer_spec)
        for i, st in enumerate(self.data_cfg.resolved_stages()):
            flag = f"data.stages[{i}]" if cfg.data.stages else "data"
            mesh_lib.validate_mesh(cfg.mesh, self.model_cfg, num_devices=jax.device_count(), seq_len=st.seq_len,
                                   global_batch=st.batch_size, num_microbatches=cfg.train.num_microbatches,
                                   seq_flag=f"{flag}.seq-len", batch_flag=f"{flag}.batch-size")
        self.log(f"mesh {mesh_lib.describe(self.mesh)} | {self.model_cfg.param_count() / 1e6:.2f}M params | "
                 f"{self.total} steps | run dir {self.run_dir}")
        self.schedule = curriculum_schedule(cfg)
        self.tx = make_optimizer(cfg.optim, self.total, schedule=self.schedule)
        self.data_iterator = make_data_iterator(self.data_cfg, tokenizer=self.tokenizer)
        self.state = self.restore_or_init(self.tx, policy_dir)
        self.loss = lm_loss(self.graphdef, cfg.train)
        self._compiled: dict[tuple[int, int], CompiledStep] = {}
        if cfg.eval.heldout:
            self.eval_records = load_prompt_records(cfg.eval.heldout, limit=cfg.eval.num_records, flag="eval.heldout",
                                                    task_verifiers=cfg.task_verifiers)
            unchecked = [r["id"] for r in self.eval_records if answer_check(r) is None]
            require(not unchecked, "eval.heldout", f"records {unchecked[:3]} have no answer to check (an 'answer' "
                    "field, routed to exact, steps or math by --task-verifiers)")
        self._eval_batches = self._heldout_batches()
        self._context = self.mesh.shape.get("context", 1)
        self._peak = cfg.peak_flops_per_device or next(
            (v for k, v in _PEAK_BF16.items() if k in jax.devices()[0].device_kind), 0.0)
        self._batch_tokens: dict[int, int] = {}  # step -> tokens of its batch, until the step is logged
        self._t_last = self.elapsed()

    def compiled_step(self, rows: int, length: int) -> CompiledStep:
        """The step compiled for [rows, length] batches (once per stage shape, before its first step)."""
        if (rows, length) not in self._compiled:
            self._compiled[(rows, length)] = compile_train_step(
                self.loss, self.tx, mesh=self.mesh, state_shardings=self.shardings, abstract_state=self.state,
                batch=abstract_batch(rows, length), mesh_cfg=self.cfg.mesh,
                num_microbatches=self.cfg.train.num_microbatches, schedule=self.schedule, verbose=self.is_main)
        return self._compiled[(rows, length)]

    def run_unit(self, index: int) -> dict[str, Any]:
        batch = next(self.data_iterator)
        batch = {k: batch[k] for k in BATCH_KEYS}
        rows, length = batch["tokens"].shape
        rows *= jax.process_count()
        if self._context > 1 and self.cfg.mesh.context_load_balance:
            batch = load_balance_batch(batch, self._context)
        step = self.compiled_step(rows, length)
        spec = batch_shardings(self.mesh, abstract_batch(rows, length), self.cfg.mesh.logical_rules)["tokens"].spec
        self.state, metrics = step(self.state, to_global_array(batch, self.mesh, spec))
        self._batch_tokens[index + 1] = rows * length  # read when step index + 1 is logged
        return {**metrics, "seq_len": length}

    def log_values(self, values: dict[str, float], index: int) -> dict[str, float]:
        now = self.elapsed()
        out = {k: v for k, v in values.items() if k not in ("seq_len", "nll_sum", "denominator")}
        out["nll"] = values["nll_sum"] / max(values["denominator"], 1.0)
        out["tokens"] = values["denominator"]
        tokens = sum(self._batch_tokens.pop(i) for i in [i for i in self._batch_tokens if i <= index])
        out["tokens_per_s"] = tokens / max(now - self._t_last, 1e-9)
        if self._peak:
            fpt = flops_per_token(self.model_cfg, int(values["seq_len"]))
            out["mfu"] = out["tokens_per_s"] * fpt / (self._peak * jax.device_count())
        self._t_last = now
        return out

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"stage": self.data_iterator.stage}

    def extra_eval(self) -> dict[str, float]:
        return {"loss": self._heldout_loss()} if self._eval_batches else {}

    def summary_extra(self) -> dict[str, Any]:
        report = getattr(self.data_iterator, "report", None)
        self.data_iterator.close()
        return {"data_report": report.to_dict() if report is not None else {}}

    # -- held-out loss --------------------------------------------------------------------------------------------------
    def _heldout_batches(self) -> list[dict[str, jax.Array]]:
        """Up to 16 packed batches of the held-out source (like training's last stage), placed on the mesh once;
        every process holds all of them, replicated."""
        if not self.cfg.eval.heldout:
            return []
        stage = self.data_cfg.resolved_stages()[-1]
        heldout_cfg = dataclasses.replace(
            self.data_cfg, sources=(SourceConfig(path=self.cfg.eval.heldout),), stages=(), seq_len=stage.seq_len,
            batch_size=max(1, min(self.cfg.eval.batch_size, stage.batch_size)), num_epochs=1, prefetch_workers=0)
        it = make_data_iterator(heldout_cfg, tokenizer=self.tokenizer, shard_index=0, shard_count=1)
        batches = []
        for batch in it:
            batches.append(to_global_array({k: batch[k] for k in BATCH_KEYS}, self.mesh, jax.sharding.PartitionSpec()))
            if len(batches) >= 16:
                break
        it.close()
        step_cfg = self.cfg.train
        self._eval_loss = jax.jit(lambda p, b: cross_entropy_sums(
            nnx.merge(self.graphdef, p), b, impl=step_cfg.loss_impl, head=step_cfg.loss)[:2])
        return batches

    def _heldout_loss(self) -> float:
        num = den = 0.0
        with mesh_lib.activate(self.mesh, self.cfg.mesh):
            for batch in self._eval_batches:
                n, d = self._eval_loss(self.state.params, batch)
                num, den = num + n, den + d  # summed on the device, read once
        return float(num) / max(float(den), 1.0)


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Runs (or resumes) the SFT run of ``cfg``; returns its summary (also written to ``run_dir/summary.json``)."""
    return SFTTrainer(cfg).run()
