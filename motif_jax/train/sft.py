"""The SFT trainer: config → mesh → Grain pipeline → sharded train state → compiled step → loop → final policy.

``run_sft(cfg)`` is what ``scripts/sft.py`` calls. The same code runs on one CPU and on a multi-host GPU cluster:
every process runs it, process 0 alone writes logs, and Orbax coordinates checkpoints.

Exact resume: the train state (params, optimizer state, step), the Grain iterator position (per host) and the
curriculum position are saved in one checkpoint step; a restarted run continues from the newest complete step and
produces the same batches, losses and parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx

from motif_jax.config import ConfigError, DistributedConfig, MeshConfig, ModelConfig, _require, to_dict
from motif_jax.data.config import DataConfig, SourceConfig
from motif_jax.data.pipeline import make_data_iterator, open_source, to_global_array
from motif_jax.data.records import iter_valid
from motif_jax.data.tokenizer import load_tokenizer
from motif_jax.parallel import distributed
from motif_jax.parallel import mesh as mesh_lib
from motif_jax.parallel.context import load_balance_batch
from motif_jax.train.checkpoint import CheckpointConfig, Checkpointer, PreemptionFlag, load_policy, save_policy
from motif_jax.train.config import OptimConfig, StepConfig
from motif_jax.train.evaluate import exact_match
from motif_jax.train.metrics import MetricsWriter, write_json
from motif_jax.train.optim import make_optimizer, make_schedule
from motif_jax.train.state import TrainState, create_train_state
from motif_jax.train.step import BATCH_KEYS, abstract_batch, compile_train_step, loss_fn


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: masked CE on held-out traces and greedy exact-match accuracy on verifiable ones."""

    # a trace source (file or ``synthetic:...?split=test`` spec); empty = no evaluation
    heldout: str = ""
    every: int = 0  # steps between evaluations (0: only at the end)
    num_records: int = 200  # records used for exact match (and loss)
    max_new_tokens: int = 96
    batch_size: int = 64

    def __post_init__(self) -> None:
        _require(self.every >= 0, "eval.every", "must be >= 0")
        _require(self.num_records >= 1, "eval.num-records", "must be >= 1")
        _require(self.max_new_tokens >= 1, "eval.max-new-tokens", "must be >= 1")
        _require(self.batch_size >= 1, "eval.batch-size", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """One SFT run. ``data.stages`` is the curriculum: each stage has its sources and weights, sequence length,
    batch size, number of steps and (optionally) its own peak learning rate."""

    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: StepConfig = StepConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    run_dir: str = "runs/sft"
    # a policy directory (scripts/convert_hf.py import, or a finished run) to start from; model shape comes from it
    init_from: str = ""
    seed: int = 0
    log_every: int = 10
    # this many non-finite steps in a row stop the run
    max_bad_steps: int = 5
    # save (train state + data iterator) and exit with status "stopped" after this many steps of this invocation
    # (0: run to the end); re-running the same command resumes. The schedule still spans all steps. For time-boxed
    # cluster jobs (run K steps per job) and resume tests.
    stop_after_steps: int = 0
    # peak dense bf16 FLOP/s of one device for the MFU estimate (0: known GPUs detected, else not reported)
    peak_flops_per_device: float = 0.0

    def __post_init__(self) -> None:
        _require(self.log_every >= 1, "log-every", "must be >= 1")
        _require(self.max_bad_steps >= 1, "max-bad-steps", "must be >= 1")
        _require(self.stop_after_steps >= 0, "stop-after-steps", "must be >= 0 (0: run to the end)")
        _require(bool(self.run_dir), "run-dir", "give a directory for logs and checkpoints")
        for i, st in enumerate(self.data.resolved_stages()):
            flag = f"data.stages[{i}].steps" if self.data.stages else "data.stages"
            _require(st.steps > 0, flag, "every SFT stage needs a positive number of steps (the run length)")
            _require(st.seq_len <= self.model.max_seq_len or bool(self.init_from), "model.max-seq-len",
                     f"stage {st.name!r} packs {st.seq_len} tokens, more than max_seq_len={self.model.max_seq_len}")
        _require(self.data.batch_size % self.train.num_microbatches == 0, "train.num-microbatches",
                 f"must divide the batch size {self.data.batch_size}")

    @property
    def total_steps(self) -> int:
        return sum(st.steps for st in self.data.resolved_stages())


# ---------------------------------------------------------------------------------------------------------------------


def curriculum_schedule(cfg: SFTConfig) -> optax.Schedule:
    """Each stage gets warm-up + decay over its own steps with its own peak (``stage.lr`` or ``--optim.lr``)."""
    stages = cfg.data.resolved_stages()
    parts = [make_schedule(cfg.optim, st.steps, peak=st.lr or cfg.optim.lr) for st in stages]
    if len(parts) == 1:
        return parts[0]
    boundaries = list(np.cumsum([st.steps for st in stages])[:-1])
    return optax.join_schedules(parts, boundaries)


def flops_per_token(model_cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters) + causal attention (6 x layers x seq x q-width)."""
    embed = model_cfg.vocab_size * model_cfg.hidden_size
    dense = model_cfg.param_count() - embed * (1 if model_cfg.tie_embeddings else 2)
    matmul = dense + embed  # the LM head is a matmul; the embedding lookup is not
    attn_width = model_cfg.num_heads * model_cfg.head_dim * (2 if model_cfg.attention == "differential" else 1)
    return 6.0 * matmul + 6.0 * model_cfg.num_layers * seq_len * attn_width


_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def _peak_flops(cfg: SFTConfig) -> float:
    if cfg.peak_flops_per_device:
        return cfg.peak_flops_per_device
    kind = jax.devices()[0].device_kind
    return next((v for k, v in _PEAK_BF16.items() if k in kind), 0.0)


def heldout_records(cfg: EvalConfig) -> list[dict]:
    if not cfg.heldout:
        return []
    records = [r for _, r in iter_valid(open_source(SourceConfig(path=cfg.heldout)))]
    return records[: cfg.num_records]


def _resolve_model(cfg: SFTConfig) -> tuple[ModelConfig, Any, str]:
    """(model config, initial params or None, tokenizer spec); --init-from fixes the shape, flags keep the
    run-time knobs (dtype, attention backend, remat, block sizes)."""
    if not cfg.init_from:
        return cfg.model, None, cfg.data.tokenizer
    loaded_cfg, params, tok = load_policy(cfg.init_from)
    runtime = {k: getattr(cfg.model, k) for k in ("dtype", "attention_impl", "attention_block_q",
                                                  "attention_block_kv", "remat_policy", "scan_layers")}
    return dataclasses.replace(loaded_cfg, **runtime), params, tok


class NonFiniteError(RuntimeError):
    pass


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    distributed.initialize(cfg.distributed)
    run_dir = Path(cfg.run_dir).absolute()
    model_cfg, init_params, tok_spec = _resolve_model(cfg)
    tokenizer = load_tokenizer(tok_spec)
    _require(tokenizer.vocab_size <= model_cfg.vocab_size, "model.vocab-size",
             f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model_cfg.vocab_size}")
    data_cfg = dataclasses.replace(cfg.data, tokenizer=tok_spec)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    for i, st in enumerate(data_cfg.resolved_stages()):
        flag = f"data.stages[{i}]" if cfg.data.stages else "data"
        mesh_lib.validate_mesh(cfg.mesh, model_cfg, num_devices=jax.device_count(), seq_len=st.seq_len,
                               global_batch=st.batch_size, num_microbatches=cfg.train.num_microbatches,
                               seq_flag=f"{flag}.seq-len", batch_flag=f"{flag}.batch-size")
    context = mesh.shape.get("context", 1)
    is_main = jax.process_index() == 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        print(f"mesh {mesh_lib.describe(mesh)} | {model_cfg.param_count() / 1e6:.2f}M params | "
              f"{cfg.total_steps} steps | run dir {run_dir}", flush=True)

    total = cfg.total_steps
    schedule = curriculum_schedule(cfg)
    tx = make_optimizer(cfg.optim, total, schedule=schedule)
    rules = cfg.mesh.logical_rules
    state, graphdef, shardings = create_train_state(model_cfg, cfg.optim, mesh, rules, cfg.seed, total_steps=total)
    data_iter = make_data_iterator(data_cfg, tokenizer=tokenizer)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    start = 0
    if ckpt.latest_step() is not None:
        state, extra = ckpt.restore(state, data_iterator=data_iter, with_extra=True)
        start = int(extra["step"])
        if is_main:
            print(f"resumed from step {start} ({run_dir / 'checkpoints'})", flush=True)
    elif init_params is not None:
        params = jax.tree.map(lambda p, s: jax.device_put(p, s), init_params, shardings.params)
        state = TrainState(step=state.step, params=params, opt_state=state.opt_state)

    batch_sharding = mesh_lib.batch_sharding(mesh, rules)
    compiled: dict[tuple[int, int], Any] = {}

    def step_fn(rows: int, length: int):
        if (rows, length) not in compiled:
            compiled[(rows, length)] = compile_train_step(
                shardings, batch_sharding, state, abstract_batch(rows, length), graphdef=graphdef, tx=tx,
                mesh=mesh, mesh_cfg=cfg.mesh, step_cfg=cfg.train, schedule=schedule, verbose=is_main)
        return compiled[(rows, length)]

    records = heldout_records(cfg.eval)
    eval_loss = _make_eval_loss(graphdef, cfg, mesh, data_cfg, tokenizer)
    writer = MetricsWriter(run_dir, total_steps=total)
    preempt = PreemptionFlag()
    bad_in_row, skipped_total, pending = 0, 0, None
    t_start = time.time()
    t_last, tokens_since = t_start, 0.0
    peak = _peak_flops(cfg)
    step = start
    final_eval: dict[str, Any] = {}

    def evaluate(at_step: int) -> dict[str, Any]:
        if not records:
            return {}
        model = nnx.merge(graphdef, state.params)
        with mesh_lib.activate(mesh, cfg.mesh):
            result = exact_match(model, tokenizer, records, max_new_tokens=cfg.eval.max_new_tokens,
                                 batch_size=cfg.eval.batch_size)
        result["loss"] = eval_loss(state.params)
        writer.write(at_step, {"accuracy": result["accuracy"], "loss": result["loss"],
                               "truncated_fraction": result["truncated_fraction"]}, prefix="eval")
        if is_main:
            print(f"[eval step {at_step}] accuracy={result['accuracy']:.3f} loss={result['loss']:.4f}", flush=True)
        return result

    def consume(metrics: dict, at_step: int, rows: int, length: int) -> None:
        """Host side of a finished step (read one step late so the device is never idle waiting for Python)."""
        nonlocal bad_in_row, skipped_total, t_last, tokens_since
        skipped = float(metrics["skipped"])
        skipped_total += int(skipped)
        bad_in_row = bad_in_row + 1 if skipped else 0
        if bad_in_row >= cfg.max_bad_steps:
            raise NonFiniteError(
                f"{bad_in_row} steps in a row had a non-finite loss or gradient (last at step {at_step}); "
                "lower --optim.lr, check the data, or raise --max-bad-steps")
        tokens_since += rows * length
        if at_step % cfg.log_every == 0 or at_step == total:
            now = time.time()
            values = dict(metrics)
            values["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
            if peak:
                values["mfu"] = values["tokens_per_s"] * flops_per_token(model_cfg, length) / (peak * jax.device_count())
            values["skipped_total"] = skipped_total
            values = writer.write(at_step, values)
            writer.progress(at_step, values, keys=("loss", "grad_norm", "learning_rate", "tokens_per_s", "mfu"))
            t_last, tokens_since = now, 0.0

    try:
        while step < total:
            stage = data_iter.stage
            batch = next(data_iter)
            rows, length = batch["tokens"].shape
            rows *= jax.process_count()
            if context > 1 and cfg.mesh.context_load_balance:
                batch = load_balance_batch(batch, context)
            batch = to_global_array({k: batch[k] for k in BATCH_KEYS}, mesh, batch_sharding.spec)
            fn = step_fn(rows, length)
            state, metrics = fn(state, batch)
            step += 1
            if pending is not None:
                consume(*pending)
            pending = (metrics, step, rows, length)
            if cfg.eval.every and step % cfg.eval.every == 0 and step < total:
                consume(*pending)
                pending = None
                evaluate(step)
            preempted = preempt.requested  # one collective per step (agreed by all processes)
            stop = preempted or (cfg.stop_after_steps > 0 and step - start >= cfg.stop_after_steps and step < total)
            if ckpt.should_save(step) or stop:
                ckpt.save(step, state, data_iterator=data_iter, extra={"step": step, "stage": stage}, force=stop)
            if stop:
                if pending is not None:  # log the last step now: the resumed run starts after it
                    consume(*pending)
                    pending = None
                status = "preempted" if preempted else "stopped"
                if is_main:
                    why = "stop requested" if preempted else f"--stop-after-steps {cfg.stop_after_steps}"
                    print(f"{why}: saved step {step}, exiting (re-run to resume)", flush=True)
                return {"status": status, "step": step}  # `finally` waits for the save and closes everything
        if pending is not None:
            consume(*pending)
        if ckpt.latest_step() != step:
            ckpt.save(step, state, data_iterator=data_iter, extra={"step": step, "stage": data_iter.stage},
                      force=True)
        ckpt.wait()
        final_eval = evaluate(step)
        save_policy(run_dir / "final", model_cfg, state.params, tok_spec, source=f"sft step {step}")
    finally:
        ckpt.close()
        writer.close()
        preempt.restore_handlers()
        data_iter.close()

    summary = {
        "status": "finished",
        "steps": step,
        "wall_time_s": time.time() - t_start,
        "skipped_steps": skipped_total,
        "final_policy": str(run_dir / "final"),
        "final_eval": {k: v for k, v in final_eval.items() if k != "examples"},
        "data_report": data_iter.report.to_dict() if hasattr(data_iter, "report") else {},
    }
    write_json(run_dir / "summary.json", summary)
    return summary


def _make_eval_loss(graphdef, cfg: SFTConfig, mesh, data_cfg: DataConfig, tokenizer):
    """Held-out masked CE (token-weighted mean) over one pass of the held-out source, packed like training.

    The batches are built once (every process holds all of them, replicated) and reused at each evaluation.
    """
    if not cfg.eval.heldout:
        return lambda params: float("nan")
    stage = data_cfg.resolved_stages()[-1]
    heldout_cfg = dataclasses.replace(
        data_cfg, sources=(SourceConfig(path=cfg.eval.heldout),), stages=(), seq_len=stage.seq_len,
        batch_size=max(1, min(cfg.eval.batch_size, stage.batch_size)), num_epochs=1, prefetch_workers=0)
    it = make_data_iterator(heldout_cfg, tokenizer=tokenizer, shard_index=0, shard_count=1)
    batches = []  # placed on the mesh once, here, not at every evaluation
    for batch in it:
        batches.append(to_global_array({k: batch[k] for k in BATCH_KEYS}, mesh, jax.sharding.PartitionSpec()))
        if len(batches) >= 16:
            break
    it.close()
    jitted = jax.jit(lambda p, b: loss_fn(p, graphdef, b, loss=cfg.train.loss, loss_impl=cfg.train.loss_impl))

    def eval_loss(params) -> float:
        num = den = 0.0
        with mesh_lib.activate(mesh, cfg.mesh):
            for batch in batches:
                n, (d, _) = jitted(params, batch)
                num, den = num + n, den + d  # summed on the device, read once
        return float(num) / max(float(den), 1.0)

    return eval_loss
