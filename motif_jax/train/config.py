"""Configuration shared by every trainer: optimizer, the step engine, evaluation, checkpoints and the run itself.

:class:`RunConfig` holds what SFT (:class:`SFTConfig`, below) and RL (``motif_jax.rl.config.RLConfig``)
have in common, with one name and one unit each (``--train.num-microbatches``, ``--eval.every``, ``--log-every``,
``--max-minutes`` ...); both subclass it and add their own sections.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

from motif_jax.config import DistributedConfig, MeshConfig, ModelConfig, check_choices, require
from motif_jax.data.config import DataConfig

OptimizerName = Literal["adamw", "muon"]
DecayName = Literal["cosine", "linear", "constant"]
LossName = Literal["fused", "naive"]
LossImpl = Literal["auto", "xla", "pallas", "triton"]
MuDType = Literal["", "float32", "bfloat16"]


def require_finite(cfg: object, *names: str) -> None:
    """Refuses inf / nan in the named float fields (``--optim.lr inf`` would otherwise train on garbage)."""
    prefix = getattr(cfg, "FLAG_PREFIX", "")
    for name in names:
        value = getattr(cfg, name)
        require(value is None or math.isfinite(value), prefix + name.replace("_", "-"), f"must be finite, got {value}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW (or Muon for 2-D weight matrices) with linear warm-up, then cosine / linear decay, and clipping.

    The learning rate rises linearly from 0 to ``lr`` over ``warmup_steps``, then decays to ``lr * min_lr_ratio``
    at ``total_steps`` (given to ``make_optimizer``). Weight decay applies to weight matrices and embeddings only
    (never to norms, biases, differential-attention lambdas, PolyNorm coefficients or other 1-D parameters).
    """

    FLAG_PREFIX: ClassVar[str] = "optim."

    name: OptimizerName = "adamw"
    """Optimizer: adamw, or muon for the hidden weight matrices (AdamW for the rest)."""
    lr: float = 3e-4
    """Peak learning rate."""
    warmup_steps: int = 100
    """Optimizer steps of linear warm-up from 0 to --optim.lr."""
    decay: DecayName = "cosine"
    """Shape of the decay after warm-up."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of --optim.lr."""
    b1: float = 0.9
    """Adam first-moment decay."""
    b2: float = 0.95
    """Adam second-moment decay."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay of weight matrices and embeddings."""
    grad_clip: float = 1.0
    """Clip gradients to this global L2 norm (0: no clipping)."""
    muon_lr: float = 0.0
    """Muon learning rate of the matrices (0: --optim.lr)."""
    muon_beta: float = 0.95
    """Muon momentum."""
    muon_ns_steps: int = 5
    """Muon Newton-Schulz iterations."""
    mu_dtype: MuDType = ""
    """Dtype of the first moment ('' = the parameter dtype, fp32)."""

    def __post_init__(self) -> None:
        p = self.FLAG_PREFIX
        check_choices(self)
        require_finite(self, "lr", "min_lr_ratio", "b1", "b2", "eps", "weight_decay", "grad_clip", "muon_lr")
        require(self.lr > 0, p + "lr", "must be > 0")
        require(self.warmup_steps >= 0, p + "warmup-steps", "must be >= 0")
        require(0.0 <= self.min_lr_ratio <= 1.0, p + "min-lr-ratio", "must be in [0, 1]")
        require(0.0 <= self.b1 < 1.0, p + "b1", "must be in [0, 1)")
        require(0.0 <= self.b2 < 1.0, p + "b2", "must be in [0, 1)")
        require(self.eps > 0, p + "eps", "must be > 0")
        require(self.weight_decay >= 0, p + "weight-decay", "must be >= 0")
        require(self.grad_clip >= 0, p + "grad-clip", "must be >= 0 (0 disables clipping)")
        require(self.muon_lr >= 0, p + "muon-lr", "must be >= 0 (0: use --optim.lr)")
        require(0.0 <= self.muon_beta < 1.0, p + "muon-beta", "must be in [0, 1)")
        require(self.muon_ns_steps >= 1, p + "muon-ns-steps", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The step engine (``motif_jax.train.step``): gradient accumulation and the LM-head loss.

    Each optimizer step's batch is split into ``num_microbatches`` micro-batches run one after another
    (``lax.scan``); the loss is normalised once by the step's global denominator (target tokens for SFT).
    """

    FLAG_PREFIX: ClassVar[str] = "train."

    num_microbatches: int = 1
    """Micro-batches per optimizer step (gradient accumulation); must divide the step's batch."""
    loss: LossName = "fused"
    """LM head: fused (motif_kernels.lm_head, never [tokens, vocab] logits) or naive (materialised logits, a
    baseline)."""
    loss_impl: LossImpl = "auto"
    """Backend of the fused LM-head kernel."""
    z_loss: float = 0.0
    """Weight of the z-loss (mean squared log-sum-exp) added to SFT's cross-entropy."""

    def __post_init__(self) -> None:
        check_choices(self)
        require_finite(self, "z_loss")
        require(self.num_microbatches >= 1, "train.num-microbatches", "must be >= 1")
        require(self.z_loss >= 0, "train.z-loss", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: greedy exact-match accuracy (and, for SFT traces, the masked cross-entropy)."""

    FLAG_PREFIX: ClassVar[str] = "eval."

    heldout: str = ""
    """Held-out records: a trace / prompt file or a synthetic:...?split=test spec ('' = no evaluation)."""
    every: int = 0
    """Steps (SFT) or rounds (RL) between evaluations (0: only at the end, and before RL)."""
    num_records: int = 200
    """Held-out records evaluated."""
    max_new_tokens: int = 96
    """Generation budget of each greedy answer."""
    batch_size: int = 64
    """Records generated at once."""
    stop_at_accuracy: float = 0.0
    """Finish the run (final checkpoint, evaluation and policy) at the first evaluation whose accuracy reaches this
    (0: never)."""

    def __post_init__(self) -> None:
        require(0.0 <= self.stop_at_accuracy <= 1.0, "eval.stop-at-accuracy", "must be in [0, 1] (0: never)")
        require(self.every >= 0, "eval.every", "must be >= 0")
        require(self.num_records >= 1, "eval.num-records", "must be >= 1")
        require(self.max_new_tokens >= 1, "eval.max-new-tokens", "must be >= 1")
        require(self.batch_size >= 1, "eval.batch-size", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints of the run directory (``motif_jax.train.checkpoint``)."""

    save_every: int = 100
    """Steps (SFT) or rounds (RL) between saves (0: only the final / stop / SIGTERM save)."""
    keep: int = 3
    """Newest complete checkpoints kept."""
    async_save: bool = True
    """Write checkpoints in the background while training continues."""

    def __post_init__(self) -> None:
        require(self.save_every >= 0, "checkpoint.save-every", "must be >= 0")
        require(self.keep >= 1, "checkpoint.keep", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What every run has: the model, mesh and optimizer, the step engine, evaluation, checkpoints, the loop."""

    model: ModelConfig = ModelConfig()
    """The model (with --init-from: only the run-time fields dtype, attention_impl, attention blocks, remat_policy
    and scan_layers apply; the architecture comes from the policy directory)."""
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    optim: OptimConfig = OptimConfig()
    train: StepConfig = StepConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    run_dir: str = "runs/run"
    """Directory of config.yaml, metrics.jsonl, tensorboard/, checkpoints/, final/ and summary.json."""
    init_from: str = ""
    """Policy to start from: a policy directory (scripts/convert_hf.py import, or a finished run) or a Hugging Face
    model directory; the architecture and tokenizer come from it."""
    seed: int = 0
    """Seed of the initialisation, the data order and the sampling."""
    log_every: int = 10
    """Steps (SFT) or rounds (RL) between metric records and console lines."""
    max_bad_steps: int = 5
    """This many optimizer steps in a row with a non-finite loss or gradient stop the run."""
    stop_after_steps: int = 0
    """Save and exit (status 'stopped') after this many steps / rounds of this invocation (0: run to the end);
    re-running the same command resumes. For time-boxed cluster jobs and resume tests."""
    max_minutes: float = 0.0
    """Wall-clock budget of the whole run, resumes included: save, evaluate and finish once spent (0: no limit)."""
    task_verifiers: dict[str, str] = dataclasses.field(default_factory=dict)
    """Verifier (exact, steps, math, code, format) that checks the answers of each task name, for evaluation and
    RL rewards alike, e.g. {algebra: math}; records that name their own 'verifiers' keep them (default: a record's
    answer_type, else math for task 'math', else exact)."""

    def __post_init__(self) -> None:
        require(bool(self.run_dir), "run-dir", "give a directory for logs and checkpoints")
        require(self.log_every >= 1, "log-every", "must be >= 1")
        require(self.max_bad_steps >= 1, "max-bad-steps", "must be >= 1")
        require(self.stop_after_steps >= 0, "stop-after-steps", "must be >= 0 (0: run to the end)")
        require(math.isfinite(self.max_minutes) and self.max_minutes >= 0, "max-minutes",
                "must be a finite number >= 0 (0: no limit)")
        known = ("exact", "steps", "math", "code", "format")
        bad = {t: v for t, v in self.task_verifiers.items() if v not in known}
        require(not bad, "task-verifiers", f"{bad}: choose verifiers from {known}")


@dataclasses.dataclass(frozen=True)
class SFTConfig(RunConfig):
    """One SFT run. ``data.stages`` is the curriculum: each stage has its sources and weights, sequence length,
    batch size, number of steps and (optionally) its own peak learning rate."""

    FLAG_PREFIX: ClassVar[str] = ""

    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    run_dir: str = "runs/sft"
    peak_flops_per_device: float = 0.0
    """Peak dense bf16 FLOP/s of one device for the MFU estimate (0: known GPUs detected, else not reported)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for i, st in enumerate(self.data.resolved_stages()):
            flag = f"data.stages[{i}].steps" if self.data.stages else "data.stages"
            require(st.steps > 0, flag, "every SFT stage needs a positive number of steps (the run length)")
            require(st.seq_len <= self.model.max_seq_len or bool(self.init_from), "model.max-seq-len",
                    f"stage {st.name!r} packs {st.seq_len} tokens, more than max_seq_len={self.model.max_seq_len}")
            require(self.optim.warmup_steps < st.steps, "optim.warmup-steps",
                    f"{self.optim.warmup_steps} warm-up steps do not fit in stage {st.name!r} of {st.steps} steps "
                    "(each stage warms up again); lower it or lengthen the stage")
        require(self.data.batch_size % self.train.num_microbatches == 0, "train.num-microbatches",
                f"must divide the batch size {self.data.batch_size}")

    @property
    def total_steps(self) -> int:
        return sum(st.steps for st in self.data.resolved_stages())
