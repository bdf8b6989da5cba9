"""Configuration of the RL building blocks: objective, difficulty filter, trajectory buffer, code sandbox.

Frozen dataclasses that validate themselves in ``__post_init__`` and raise :class:`motif_jax.config.ConfigError`
naming the command-line flag to change (``--objective.eps-high`` ...). Defaults are the ones peers use (DAPO
clip-higher 0.2 / 0.28, dual clip 3, token-mean aggregation, no KL, no entropy bonus, token-level truncated IS with
cap 2, staleness <= 2 versions, pass-rate band [0.1, 0.9]); the Motif paper's own values are not public.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from motif_jax.config import ConfigError, DistributedConfig, MeshConfig, ModelConfig, _require
from motif_jax.train.checkpoint import CheckpointConfig
from motif_jax.train.config import OptimConfig

__all__ = [
    "Aggregation",
    "BandStatistic",
    "BufferConfig",
    "ConfigError",
    "DifficultyConfig",
    "ISLevel",
    "Isolation",
    "Proximal",
    "RLConfig",
    "RLObjectiveConfig",
    "RatioLevel",
    "SandboxConfig",
]

Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_sum_norm"]
RatioLevel = Literal["token", "sequence"]
ISLevel = Literal["token", "sequence", "none"]
Proximal = Literal["decoupled", "bypass"]
BandStatistic = Literal["ema", "latest"]
Isolation = Literal["auto", "namespaces", "process"]

_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_sum_norm")


@dataclasses.dataclass(frozen=True)
class RLObjectiveConfig:
    """Policy objective (see ``motif_jax.rl.objective.policy_loss_terms``).

    ``proximal`` chooses the detached proximal log-probs lp: ``decoupled`` recomputes them with the parameters at the
    start of the update round, ``bypass`` reuses the behaviour log-probs (lp := lb, cheaper). ``is_cap`` is the
    truncation C of the off-policy weight min(exp(lp - lb), C); ``None`` leaves it untruncated. ``max_response_len``
    is L_max of the Dr. GRPO ``seq_sum_norm`` aggregation (None: the padded length of the batch).
    ``overlong_buffer`` > 0 turns on DAPO's soft overlong penalty over the last ``overlong_buffer`` tokens of the
    ``max_response_len`` budget.
    """

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = 3.0
    ratio_level: RatioLevel = "token"
    is_level: ISLevel = "token"
    is_cap: float | None = 2.0
    proximal: Proximal = "decoupled"
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    aggregation: Aggregation = "token_mean"
    max_response_len: int | None = None
    normalize_std: bool = True
    adv_eps: float = 1e-6
    drop_zero_std_groups: bool = True
    overlong_buffer: int = 0
    overlong_factor: float = 1.0
    # scale of negative advantages (1: GRPO; 0.1: W-REINFORCE; 0: successes only), see objective.policy_loss_terms
    negative_weight: float = 1.0

    def __post_init__(self) -> None:
        p = "objective."
        _require(0.0 <= self.negative_weight <= 1.0, p + "negative-weight",
                 f"must be in [0, 1], got {self.negative_weight}")
        _require(0.0 <= self.eps_low < 1.0, p + "eps-low", f"must be in [0, 1), got {self.eps_low}")
        _require(self.eps_high >= 0.0, p + "eps-high", f"must be >= 0, got {self.eps_high}")
        _require(
            self.dual_clip is None or self.dual_clip > 1.0,
            p + "dual-clip",
            f"must be > 1 (or None to disable), got {self.dual_clip}",
        )
        _require(self.ratio_level in ("token", "sequence"), p + "ratio-level", "choose 'token' or 'sequence'")
        _require(self.is_level in ("token", "sequence", "none"), p + "is-level", "choose 'token', 'sequence' or 'none'")
        _require(
            self.is_cap is None or self.is_cap >= 1.0,
            p + "is-cap",
            f"the truncation cap C must be >= 1 (or None for no truncation), got {self.is_cap}",
        )
        _require(self.proximal in ("decoupled", "bypass"), p + "proximal", "choose 'decoupled' or 'bypass'")
        _require(self.kl_coef >= 0.0, p + "kl-coef", f"must be >= 0, got {self.kl_coef}")
        _require(self.aggregation in _AGGREGATIONS, p + "aggregation", f"choose one of {_AGGREGATIONS}")
        _require(
            self.max_response_len is None or self.max_response_len > 0,
            p + "max-response-len",
            "must be positive (or None for the padded length)",
        )
        _require(self.adv_eps > 0.0, p + "adv-eps", "must be > 0")
        _require(self.overlong_buffer >= 0, p + "overlong-buffer", "must be >= 0 (0 disables the penalty)")
        if self.overlong_buffer > 0:
            _require(
                self.max_response_len is not None and self.overlong_buffer < self.max_response_len,
                p + "overlong-buffer",
                "the soft overlong penalty needs --objective.max-response-len larger than the buffer",
            )
        _require(self.overlong_factor >= 0.0, p + "overlong-factor", "must be >= 0")

    def loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``objective.policy_loss_terms`` (all static Python values)."""
        return dict(
            eps_low=self.eps_low,
            eps_high=self.eps_high,
            dual_clip=self.dual_clip,
            ratio_level=self.ratio_level,
            is_level=self.is_level,
            is_cap=self.is_cap,
            kl_coef=self.kl_coef,
            entropy_coef=self.entropy_coef,
            aggregation=self.aggregation,
            max_response_len=self.max_response_len,
            negative_weight=self.negative_weight,
        )


@dataclasses.dataclass(frozen=True)
class DifficultyConfig:
    """Difficulty-aware filtering (see ``motif_jax.rl.difficulty``).

    A prompt is *in band* when its pass rate lies in [p_lo, p_hi] (inclusive); a group is admitted to training when
    its own pass rate is in the band (binary rewards) or its reward std exceeds ``tau`` (non-binary rewards). A
    response counts as a success when its reward >= ``success_threshold``. ``band_statistic`` picks which estimate
    decides a prompt's band: the moving average (``ema``, newest group weighted ``ema_weight``) or the latest group.
    Retired prompts (too easy / too hard) are revisited with probability ``revisit_prob`` per selected slot.
    ``oversample_factor`` caps over-generation when filling a batch (DAPO: up to 3x).
    """

    p_lo: float = 0.1
    p_hi: float = 0.9
    tau: float = 0.05
    success_threshold: float = 0.5
    ema_weight: float = 0.3
    band_statistic: BandStatistic = "ema"
    revisit_prob: float = 0.05
    min_attempts: int = 1
    oversample_factor: float = 3.0

    def __post_init__(self) -> None:
        p = "difficulty."
        _require(0.0 <= self.p_lo <= 1.0, p + "p-lo", f"must be in [0, 1], got {self.p_lo}")
        _require(0.0 <= self.p_hi <= 1.0, p + "p-hi", f"must be in [0, 1], got {self.p_hi}")
        _require(self.p_lo <= self.p_hi, p + "p-lo", f"band is empty: p_lo={self.p_lo} > p_hi={self.p_hi}")
        _require(self.tau >= 0.0, p + "tau", "must be >= 0")
        _require(0.0 < self.ema_weight <= 1.0, p + "ema-weight", f"must be in (0, 1], got {self.ema_weight}")
        _require(self.band_statistic in ("ema", "latest"), p + "band-statistic", "choose 'ema' or 'latest'")
        _require(0.0 <= self.revisit_prob <= 1.0, p + "revisit-prob", f"must be in [0, 1], got {self.revisit_prob}")
        _require(self.min_attempts >= 1, p + "min-attempts", "must be >= 1")
        _require(self.oversample_factor >= 1.0, p + "oversample-factor", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class BufferConfig:
    """Trajectory buffer (see ``motif_jax.rl.buffer``).

    A group is dropped when ``version_now - version > max_staleness`` or once it has been used ``max_uses`` times.
    ``capacity_groups`` bounds memory (oldest groups are dropped first). ``fresh_fraction`` is the share of each
    mini-batch taken from never-used groups; ``None`` means all fresh groups first, replayed groups fill the rest.
    ``group_size`` (if set) is checked on every inserted group.
    """

    max_staleness: int = 2
    max_uses: int = 2
    capacity_groups: int = 4096
    fresh_fraction: float | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        p = "buffer."
        _require(self.max_staleness >= 0, p + "max-staleness", "must be >= 0 (0: only the current version)")
        _require(self.max_uses >= 1, p + "max-uses", "must be >= 1")
        _require(self.capacity_groups >= 1, p + "capacity-groups", "must be >= 1")
        _require(
            self.fresh_fraction is None or 0.0 <= self.fresh_fraction <= 1.0,
            p + "fresh-fraction",
            f"must be in [0, 1] (or None: fresh first, then replay), got {self.fresh_fraction}",
        )
        _require(self.group_size is None or self.group_size >= 1, p + "group-size", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits of the code sandbox (see ``motif_jax.rl.sandbox``).

    ``isolation``: ``namespaces`` (root + util-linux ``unshare``/``setpriv``: network, mount and PID namespaces, a
    dedicated unprivileged uid, read-only file system except a private tmpfs working directory), ``process``
    (resource limits, a new session and Python-level guards only), or ``auto`` (the strongest available).
    ``python`` is the interpreter for the untrusted code ("" = auto: the current one if the sandbox uid can run it,
    else a system ``python3``). Namespaced runs use uids ``uid_base .. uid_base + uid_count - 1``, one per
    concurrent run, so the per-uid process limit applies to each run separately.
    """

    timeout_s: float = 10.0
    cpu_time_s: int = 10
    memory_mb: int = 1024
    max_processes: int = 16
    max_file_mb: int = 16
    max_open_files: int = 64
    work_dir_mb: int = 64
    max_output_bytes: int = 65536
    isolation: Isolation = "auto"
    allow_subprocess: bool = False
    python: str = ""
    uid_base: int = 200_000
    uid_count: int = 4096

    def __post_init__(self) -> None:
        p = "sandbox."
        _require(self.timeout_s > 0, p + "timeout-s", "must be > 0")
        _require(self.cpu_time_s >= 1, p + "cpu-time-s", "must be >= 1 second")
        _require(self.memory_mb >= 64, p + "memory-mb", "must be >= 64 (the interpreter itself needs ~30 MB)")
        _require(self.max_processes >= 1, p + "max-processes", "must be >= 1")
        _require(self.max_file_mb >= 1, p + "max-file-mb", "must be >= 1")
        _require(self.max_open_files >= 16, p + "max-open-files", "must be >= 16 (the interpreter needs some)")
        _require(self.work_dir_mb >= 1, p + "work-dir-mb", "must be >= 1")
        _require(self.max_output_bytes >= 0, p + "max-output-bytes", "must be >= 0")
        _require(
            self.isolation in ("auto", "namespaces", "process"),
            p + "isolation",
            "choose 'auto', 'namespaces' or 'process'",
        )
        _require(self.uid_base >= 1000, p + "uid-base", "must be an unprivileged uid (>= 1000)")
        _require(self.uid_count >= 1, p + "uid-count", "must be >= 1")
        _require(self.uid_base + self.uid_count < 2**31, p + "uid-count", "uid range overflows")


# ---------------------------------------------------------------------------------------------------------------------
# The whole RL run
# ---------------------------------------------------------------------------------------------------------------------


def _default_optim() -> OptimConfig:
    # RL fine-tuning: small constant learning rate, no warm-up, no weight decay (the policy starts trained).
    return OptimConfig(lr=1e-5, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=1.0)


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """One RL fine-tuning run (``scripts/rl.py --config configs/rl/tiny-arith.yaml --init-from DIR``).

    Each round: pick prompts (difficulty band), sample ``group_size`` responses per prompt, verify, keep the groups in
    the band until ``fresh_groups_per_round`` new groups are in the buffer (over-generating up to
    ``difficulty.oversample_factor`` x that many prompts), then train on ``prompts_per_round`` groups from the buffer
    (fresh first, replayed groups fill the rest), split into ``num_minibatches`` mini-batches and ``num_passes``
    passes: ``num_passes * num_minibatches`` optimizer steps per round, each accumulating over micro-batches of
    ``micro_batch_size`` samples. The policy version goes up by one per round.

    ``model`` is only used without ``init_from`` (a randomly initialised policy, for tests); with ``init_from`` the
    model comes from the policy directory. ``prompts`` / ``eval_prompts``: a ``synthetic:...`` spec
    (``motif_jax.data.synthetic.synthetic_records``) or a JSONL file of prompt records (``messages`` ending with a user
    turn, plus ``task`` and ``answer`` / ``tests`` / ``constraints`` for the verifiers; ``scripts/prefilter_prompts.py``
    writes such files with measured pass rates).
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    optim: OptimConfig = dataclasses.field(default_factory=_default_optim)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=lambda: CheckpointConfig(save_every=10, keep=2))
    objective: RLObjectiveConfig = dataclasses.field(default_factory=RLObjectiveConfig)
    difficulty: DifficultyConfig = dataclasses.field(default_factory=DifficultyConfig)
    buffer: BufferConfig = dataclasses.field(default_factory=BufferConfig)
    sandbox: SandboxConfig = dataclasses.field(default_factory=SandboxConfig)

    # prompts and evaluation
    prompts: str = "synthetic:addition?split=train&n=4000&min_digits=1&max_digits=4"
    eval_prompts: str = "synthetic:addition?split=test&n=200&min_digits=1&max_digits=4"
    # held-out records evaluated (greedy exact match) before, every ``eval_every`` rounds and after (0: no eval)
    eval_size: int = 200
    eval_every: int = 0
    # verifiers used for the reward (motif_jax.rl.verifiers.default_verifiers names) and their weights (default 1)
    verifiers: tuple[str, ...] = ("exact", "math", "code", "format")
    reward_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    # difficulty-aware selection and band admission (False: uniform prompts, every group admitted)
    band_filter: bool = True

    # rollouts
    group_size: int = 8
    prompts_per_round: int = 16
    # new groups admitted per round (0: prompts_per_round); fewer than prompts_per_round leaves room for replay
    fresh_groups_per_round: int = 0
    # prompts per generation call (0: fresh_groups_per_round); the sampler's batch is this x group_size
    rollout_prompts: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    # prompts are left-padded to this length (one compiled shape); longer prompts are skipped
    max_prompt_len: int = 64

    # updates
    num_minibatches: int = 1
    num_passes: int = 1
    # samples per micro-batch (0: the whole mini-batch); a multiple of group_size
    micro_batch_size: int = 0
    # backend of the fused LM-head log-prob kernel: auto | xla | pallas | triton
    loss_impl: str = "auto"

    # run
    run_dir: str = "runs/rl"
    init_from: str = ""
    seed: int = 0
    rounds: int = 50
    # stop (checkpoint, final eval) once this many minutes have passed / rollouts were generated (0: no limit)
    max_minutes: float = 0.0
    max_rollouts: int = 0
    # seconds between console lines (every round is logged to metrics.jsonl / TensorBoard)
    print_every_s: float = 0.0

    # -- derived ------------------------------------------------------------------------------------------------------
    @property
    def fresh_groups(self) -> int:
        return self.fresh_groups_per_round or self.prompts_per_round

    @property
    def prompts_per_call(self) -> int:
        return self.rollout_prompts or self.fresh_groups

    @property
    def groups_per_minibatch(self) -> int:
        return self.prompts_per_round // self.num_minibatches

    @property
    def samples_per_minibatch(self) -> int:
        return self.groups_per_minibatch * self.group_size

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.samples_per_minibatch

    @property
    def num_microbatches(self) -> int:
        return self.samples_per_minibatch // self.micro_batch

    @property
    def seq_len(self) -> int:
        """Training sequence length: prompt budget + response budget."""
        return self.max_prompt_len + self.max_new_tokens

    @property
    def steps_per_round(self) -> int:
        return self.num_passes * self.num_minibatches

    def __post_init__(self) -> None:
        g = self.group_size
        _require(g >= 2, "group-size", f"group-relative advantages need >= 2 responses per prompt, got {g}")
        _require(self.prompts_per_round >= 1, "prompts-per-round", "must be >= 1")
        _require(self.num_minibatches >= 1, "num-minibatches", "must be >= 1")
        _require(self.num_passes >= 1, "num-passes", "must be >= 1")
        _require(
            self.prompts_per_round % self.num_minibatches == 0,
            "num-minibatches",
            f"--prompts-per-round {self.prompts_per_round} groups cannot be split into {self.num_minibatches} "
            "equal mini-batches of whole groups; choose a divisor",
        )
        _require(self.micro_batch_size >= 0, "micro-batch-size", "must be >= 0 (0: the whole mini-batch)")
        if self.micro_batch_size:
            mb, per = self.micro_batch_size, self.samples_per_minibatch
            _require(
                mb >= g,
                "micro-batch-size",
                f"a micro-batch of {mb} samples is smaller than a group ({g}); groups must not be split across "
                "micro-batches (raise it to a multiple of --group-size)",
            )
            _require(mb % g == 0, "micro-batch-size", f"{mb} is not a multiple of --group-size {g}")
            _require(
                per % mb == 0,
                "micro-batch-size",
                f"a mini-batch holds {per} samples ({self.groups_per_minibatch} groups x {g}), not a multiple of "
                f"{mb}; choose a divisor of {per}",
            )
        _require(self.fresh_groups_per_round >= 0, "fresh-groups-per-round", "must be >= 0 (0: prompts-per-round)")
        _require(
            self.fresh_groups <= self.prompts_per_round,
            "fresh-groups-per-round",
            f"{self.fresh_groups} new groups do not fit in a round of --prompts-per-round {self.prompts_per_round}",
        )
        if self.fresh_groups < self.prompts_per_round:
            _require(
                self.buffer.max_uses >= 2,
                "buffer.max-uses",
                f"only {self.fresh_groups} of {self.prompts_per_round} groups per round are new, so the rest must be "
                "replayed: set --buffer.max-uses >= 2 (or --fresh-groups-per-round to --prompts-per-round)",
            )
        _require(self.rollout_prompts >= 0, "rollout-prompts", "must be >= 0 (0: fresh-groups-per-round)")
        _require(
            self.buffer.group_size is None or self.buffer.group_size == g,
            "buffer.group-size",
            f"is {self.buffer.group_size} but --group-size is {g}",
        )
        _require(
            self.buffer.capacity_groups >= self.prompts_per_round,
            "buffer.capacity-groups",
            f"must hold at least one round ({self.prompts_per_round} groups)",
        )
        _require(self.temperature > 0, "temperature", "must be > 0 (RL samples; behaviour log-probs use it)")
        _require(0.0 < self.top_p <= 1.0, "top-p", "must be in (0, 1]")
        _require(self.max_new_tokens >= 1, "max-new-tokens", "must be >= 1")
        _require(self.max_prompt_len >= 1, "max-prompt-len", "must be >= 1")
        if self.objective.max_response_len is not None:
            _require(
                self.objective.max_response_len >= self.max_new_tokens,
                "objective.max-response-len",
                f"is below --max-new-tokens {self.max_new_tokens}; responses could exceed L_max",
            )
        if self.objective.overlong_buffer:
            _require(
                self.objective.overlong_buffer < self.max_new_tokens,
                "objective.overlong-buffer",
                f"must be smaller than --max-new-tokens {self.max_new_tokens}",
            )
        _require(self.eval_size >= 0, "eval-size", "must be >= 0 (0: no evaluation)")
        _require(self.eval_every >= 0, "eval-every", "must be >= 0 (0: only before and after)")
        _require(self.rounds >= 0, "rounds", "must be >= 0")
        _require(self.max_minutes >= 0, "max-minutes", "must be >= 0 (0: no limit)")
        _require(self.max_rollouts >= 0, "max-rollouts", "must be >= 0 (0: no limit)")
        _require(bool(self.prompts), "prompts", "needs a prompt source (synthetic:... spec or JSONL path)")
        _require(bool(self.run_dir), "run-dir", "needs a directory")
        known = ("exact", "steps", "math", "code", "format")
        bad = [v for v in self.verifiers if v not in known]
        _require(not bad and bool(self.verifiers), "verifiers", f"unknown {bad}; choose from {known}")
        bad_w = [k for k, w in self.reward_weights.items() if k not in self.verifiers or w < 0]
        _require(not bad_w, "reward-weights", f"{bad_w}: weights must be >= 0 and name a verifier in --verifiers")
        _require(
            self.loss_impl in ("auto", "xla", "pallas", "triton"),
            "loss-impl",
            f"unknown backend {self.loss_impl!r}; choose auto, xla, pallas or triton",
        )
        _require(
            self.model.max_seq_len >= self.seq_len or bool(self.init_from),
            "max-new-tokens",
            f"--max-prompt-len + --max-new-tokens = {self.seq_len} exceeds --model.max-seq-len {self.model.max_seq_len}",
        )
