"""Configuration of the RL building blocks: objective, difficulty filter, trajectory buffer, code sandbox.

Frozen dataclasses that validate themselves in ``__post_init__`` and raise :class:`motif_jax.config.ConfigError`
naming the command-line flag to change (``--objective.eps-high`` ...). Defaults are the ones peers use (DAPO
clip-higher 0.2 / 0.28, dual clip 3, token-mean aggregation, no KL, no entropy bonus, token-level truncated IS with
cap 2, staleness <= 2 versions, pass-rate band [0.1, 0.9]); the Motif paper's own values are not public.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from motif_jax.config import ConfigError, check_choices, require
from motif_jax.train.config import CheckpointConfig, EvalConfig, OptimConfig, RunConfig, require_finite

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
    "RolloutConfig",
    "SandboxConfig",
    "UpdateConfig",
    "VERIFIER_NAMES",
    "VLLMConfig",
]

Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_sum_norm"]
RatioLevel = Literal["token", "sequence"]
ISLevel = Literal["token", "sequence", "none"]
Proximal = Literal["decoupled", "bypass"]
BandStatistic = Literal["ema", "latest"]
Isolation = Literal["auto", "namespaces", "process"]

@dataclasses.dataclass(frozen=True)
class RLObjectiveConfig:
    """Policy objective (see ``motif_jax.rl.objective.policy_loss_terms``)."""

    FLAG_PREFIX: ClassVar[str] = "objective."

    eps_low: float = 0.2
    """Lower clip range: the ratio is clipped at 1 - eps_low."""
    eps_high: float = 0.28
    """Upper clip range (clip-higher): the ratio is clipped at 1 + eps_high."""
    dual_clip: float | None = 3.0
    """Dual clip c > 1: bounds a negative-advantage token's loss by -c * A (None: off)."""
    ratio_level: RatioLevel = "token"
    """Importance ratio per token (PPO / GRPO) or per sequence (GSPO)."""
    is_level: ISLevel = "token"
    """Off-policy correction min(exp(lp - lb), C) per token, per sequence, or none."""
    is_cap: float | None = 2.0
    """Truncation C of the off-policy weight (None: untruncated)."""
    proximal: Proximal = "decoupled"
    """Proximal log-probs lp: recomputed with the parameters at the start of the round (decoupled), or the
    behaviour log-probs (bypass: no extra forward pass)."""
    kl_coef: float = 0.0
    """Weight of the k3 KL penalty to the starting policy (0: no reference model)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    aggregation: Aggregation = "token_mean"
    """token_mean (DAPO), seq_mean_token_mean (GRPO paper) or seq_sum_norm (Dr. GRPO, over max_response_len)."""
    max_response_len: int | None = None
    """L_max of seq_sum_norm and of the overlong penalty (None: --rollout.max-new-tokens)."""
    normalize_std: bool = True
    """Divide group advantages by the group's reward std (GRPO); False: centred only (Dr. GRPO)."""
    adv_std_ddof: int = 1
    """Delta degrees of freedom of that std: 1 = sample std (TRL, verl), 0 = population std."""
    adv_eps: float = 1e-6
    """Added to the std before dividing."""
    drop_zero_std_groups: bool = True
    """Drop groups whose rewards are all equal (no learning signal; DAPO's dynamic sampling)."""
    overlong_buffer: int = 0
    """DAPO soft overlong penalty over the last this-many tokens of max_response_len (0: off)."""
    overlong_factor: float = 1.0
    """Largest overlong penalty (reached at max_response_len)."""
    negative_weight: float = 1.0
    """Scale of negative advantages (1: GRPO; 0.1: W-REINFORCE; 0: successes only)."""

    def __post_init__(self) -> None:
        p = self.FLAG_PREFIX
        check_choices(self)
        require_finite(self, "eps_low", "eps_high", "dual_clip", "is_cap", "kl_coef", "entropy_coef", "adv_eps",
                       "overlong_factor", "negative_weight")
        require(0.0 <= self.negative_weight <= 1.0, p + "negative-weight",
                f"must be in [0, 1], got {self.negative_weight}")
        require(0.0 <= self.eps_low < 1.0, p + "eps-low", f"must be in [0, 1), got {self.eps_low}")
        require(self.eps_high >= 0.0, p + "eps-high", f"must be >= 0, got {self.eps_high}")
        require(self.dual_clip is None or self.dual_clip > 1.0, p + "dual-clip",
                f"must be > 1 (or None to disable), got {self.dual_clip}")
        require(self.is_cap is None or self.is_cap >= 1.0, p + "is-cap",
                f"the truncation cap C must be >= 1 (or None for no truncation), got {self.is_cap}")
        require(self.kl_coef >= 0.0, p + "kl-coef", f"must be >= 0, got {self.kl_coef}")
        require(self.max_response_len is None or self.max_response_len > 0, p + "max-response-len",
                "must be positive (or None for the padded length)")
        require(self.adv_std_ddof in (0, 1), p + "adv-std-ddof", "must be 0 (population) or 1 (sample std)")
        require(self.adv_eps > 0.0, p + "adv-eps", "must be > 0")
        require(self.overlong_buffer >= 0, p + "overlong-buffer", "must be >= 0 (0 disables the penalty)")
        if self.overlong_buffer > 0:
            require(self.max_response_len is not None and self.overlong_buffer < self.max_response_len,
                    p + "overlong-buffer",
                    "the soft overlong penalty needs --objective.max-response-len larger than the buffer")
        require(self.overlong_factor >= 0.0, p + "overlong-factor", "must be >= 0")

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
    """Difficulty-aware filtering (see ``motif_jax.rl.difficulty``): prompts whose pass rate lies in the band
    [p_lo, p_hi] are selected first and their groups admitted to training."""

    FLAG_PREFIX: ClassVar[str] = "difficulty."

    p_lo: float = 0.1
    """Lower edge of the pass-rate band (inclusive)."""
    p_hi: float = 0.9
    """Upper edge of the pass-rate band (inclusive)."""
    tau: float = 0.05
    """Non-binary rewards: a group is admitted when its reward std exceeds this."""
    success_threshold: float = 0.5
    """A response with reward >= this counts as a success."""
    ema_weight: float = 0.3
    """Weight of the newest group in a prompt's moving-average pass rate."""
    band_statistic: BandStatistic = "ema"
    """Which estimate decides a prompt's band: the moving average or the latest group."""
    revisit_prob: float = 0.05
    """Probability per selected slot of revisiting a retired (too easy / too hard) prompt."""
    min_attempts: int = 1
    """Groups seen before a prompt's band is trusted."""
    oversample_factor: float = 3.0
    """Over-generation cap when filling a round: at most this x fresh groups' prompts are tried (DAPO: 3)."""

    def __post_init__(self) -> None:
        p = self.FLAG_PREFIX
        check_choices(self)
        require_finite(self, "p_lo", "p_hi", "tau", "success_threshold", "ema_weight", "revisit_prob",
                       "oversample_factor")
        require(0.0 <= self.p_lo <= 1.0, p + "p-lo", f"must be in [0, 1], got {self.p_lo}")
        require(0.0 <= self.p_hi <= 1.0, p + "p-hi", f"must be in [0, 1], got {self.p_hi}")
        require(self.p_lo <= self.p_hi, p + "p-lo", f"band is empty: p_lo={self.p_lo} > p_hi={self.p_hi}")
        require(self.tau >= 0.0, p + "tau", "must be >= 0")
        require(0.0 < self.ema_weight <= 1.0, p + "ema-weight", f"must be in (0, 1], got {self.ema_weight}")
        require(0.0 <= self.revisit_prob <= 1.0, p + "revisit-prob", f"must be in [0, 1], got {self.revisit_prob}")
        require(self.min_attempts >= 1, p + "min-attempts", "must be >= 1")
        require(self.oversample_factor >= 1.0, p + "oversample-factor", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class BufferConfig:
    """Trajectory buffer of whole groups (see ``motif_jax.rl.buffer``)."""

    FLAG_PREFIX: ClassVar[str] = "buffer."

    max_staleness: int = 2
    """Drop a group once the policy is more than this many versions newer than the group's sampler."""
    max_uses: int = 2
    """Drop a group once it has been trained on this many times."""
    capacity_groups: int = 4096
    """Most groups held (the oldest are dropped first)."""
    fresh_fraction: float | None = None
    """Share of each mini-batch taken from never-used groups (None: all fresh groups first, replay fills the rest)."""
    group_size: int | None = None
    """If set, checked against every inserted group."""

    def __post_init__(self) -> None:
        p = self.FLAG_PREFIX
        require(self.max_staleness >= 0, p + "max-staleness", "must be >= 0 (0: only the current version)")
        require(self.max_uses >= 1, p + "max-uses", "must be >= 1")
        require(self.capacity_groups >= 1, p + "capacity-groups", "must be >= 1")
        require(self.fresh_fraction is None or 0.0 <= self.fresh_fraction <= 1.0, p + "fresh-fraction",
                f"must be in [0, 1] (or None: fresh first, then replay), got {self.fresh_fraction}")
        require(self.group_size is None or self.group_size >= 1, p + "group-size", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation of the code sandbox (``motif_jax.rl.sandbox`` lists what each mode guarantees).

    ``isolation``: ``namespaces`` (root + util-linux ``unshare``/``setpriv``/``pivot_root``: network, IPC, mount, UTS
    and PID namespaces, a dedicated unprivileged uid, a root file system holding only ``visible_paths`` read-only and
    a private tmpfs working directory), ``process`` (weaker: resource limits, a supervisor that kills every
    descendant, Python-level guards; the code runs as the caller and sees its file system), or ``auto`` (the
    strongest available). Namespaced runs use uids ``uid_base .. uid_base + uid_count - 1``, one per concurrent run,
    so the per-uid process limit applies to each run separately.
    """

    FLAG_PREFIX: ClassVar[str] = "sandbox."

    timeout_s: float = 10.0
    """Wall-clock limit of one run (every process of the run is killed at it)."""
    cpu_time_s: int = 10
    """CPU-time limit per process (RLIMIT_CPU)."""
    memory_mb: int = 1024
    """Address-space limit per process (RLIMIT_AS)."""
    max_processes: int = 16
    """Processes + threads of a namespaced run (RLIMIT_NPROC of its uid)."""
    max_file_mb: int = 16
    """Largest file the code may write, stdout/stderr included (RLIMIT_FSIZE)."""
    max_open_files: int = 64
    """RLIMIT_NOFILE."""
    work_dir_mb: int = 64
    """Size of the working directory (namespaces: its tmpfs; process: disk usage checked every 0.1 s)."""
    max_output_bytes: int = 65536
    """stdout/stderr kept per run (the rest is dropped and the result marked truncated)."""
    isolation: Isolation = "auto"
    """auto | namespaces | process."""
    allow_subprocess: bool = False
    """Let the code start processes (they run without the Python layer: contained only in namespaces mode)."""
    python: str = ""
    """Interpreter for the code; "" = the base interpreter of the Python running motif_jax (sys._base_executable:
    same version, standard library only), falling back to /usr/bin/python3 when namespaces cannot run it."""
    uid_base: int = 200_000
    """First sandbox uid (namespaces mode)."""
    uid_count: int = 4096
    """Number of sandbox uids, i.e. of concurrent namespaced runs."""
    visible_paths: tuple[str, ...] = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                                      "/etc/ld.so.cache", "/etc/localtime")
    """Host paths the code can read in namespaces mode (read-only; plus the interpreter's prefix). Keep data and
    reference outputs out of them."""
    temp_dir: str = ""
    """Private directory for the runs' temporary files ("" = $TMPDIR/motif_jax_sandbox); runs left by a killed
    process are removed by the next process that starts a sandbox there."""

    def __post_init__(self) -> None:
        p = self.FLAG_PREFIX
        require(self.timeout_s > 0, p + "timeout-s", "must be > 0")
        require(self.cpu_time_s >= 1, p + "cpu-time-s", "must be >= 1 second")
        require(self.memory_mb >= 64, p + "memory-mb", "must be >= 64 (the interpreter itself needs ~30 MB)")
        require(self.max_processes >= 1, p + "max-processes", "must be >= 1")
        require(self.max_file_mb >= 1, p + "max-file-mb", "must be >= 1")
        require(self.max_open_files >= 16, p + "max-open-files", "must be >= 16 (the interpreter needs some)")
        require(self.work_dir_mb >= 1, p + "work-dir-mb", "must be >= 1")
        require(self.max_output_bytes >= 0, p + "max-output-bytes", "must be >= 0")
        require(
            self.isolation in ("auto", "namespaces", "process"),
            p + "isolation",
            "choose 'auto', 'namespaces' or 'process'",
        )
        require(self.uid_base >= 1000, p + "uid-base", "must be an unprivileged uid (>= 1000)")
        require(self.uid_count >= 1, p + "uid-count", "must be >= 1")
        require(self.uid_base + self.uid_count < 2**31, p + "uid-count", "uid range overflows")
        require(all(v.startswith("/") and "\n" not in v for v in self.visible_paths), p + "visible-paths",
                f"must be absolute paths, got {self.visible_paths}")
        require(not self.temp_dir or self.temp_dir.startswith("/"), p + "temp-dir",
                f"must be an absolute path (or empty), got {self.temp_dir!r}")


# ---------------------------------------------------------------------------------------------------------------------
# The whole RL run
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VLLMConfig:
    """vLLM as the rollout engine (``--rollout.engine vllm``; the ``vllm`` extra, or ``make vllm-venv`` on a CPU
    machine; see docs/rl.md). ``colocated`` runs ``vllm.LLM`` inside the trainer's process and pushes the parameters
    as tensors after every update; ``server`` starts vLLM's OpenAI-compatible server on ``host`` as a subprocess of
    ``python`` (which may be another environment's interpreter), pushes the parameters as safetensors files through
    its weight-reload route and stops it when the engine closes or anything fails."""

    FLAG_PREFIX: ClassVar[str] = "rollout.vllm."

    mode: Literal["colocated", "server"] = "colocated"
    """colocated (vllm.LLM in this process) or server (vLLM's OpenAI-compatible server as a subprocess)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of vLLM's weights and activations (auto: the policy's parameter dtype)."""
    kv_cache_gib: float = 1.0
    """Memory of vLLM's KV cache in GiB (host memory on a CPU, device memory on a GPU)."""
    max_num_seqs: int = 256
    """Most sequences vLLM decodes at once."""
    tensor_parallel_size: int = 1
    """Devices per vLLM engine (tensor parallelism)."""
    enforce_eager: bool = True
    """Run the model eagerly (no torch.compile or CUDA graphs): a fast start; false is faster on a GPU."""
    python: str = ""
    """Server mode: the interpreter that runs the server, with vLLM installed ("" = this one; e.g.
    .venv-vllm/bin/python)."""
    host: str = "127.0.0.1"
    """Server mode: the address the server listens on."""
    port: int = 0
    """Server mode: its port (0: a free port)."""
    startup_timeout_s: float = 600.0
    """Server mode: longest wait for the server to answer /health."""
    request_timeout_s: float = 3600.0
    """Server mode: longest wait for one generation or weight-sync request."""

    def __post_init__(self) -> None:
        p = self.FLAG_PREFIX
        check_choices(self)
        require_finite(self, "kv_cache_gib", "startup_timeout_s", "request_timeout_s")
        require(self.kv_cache_gib > 0, p + "kv-cache-gib", f"must be > 0, got {self.kv_cache_gib}")
        require(self.max_num_seqs >= 1, p + "max-num-seqs", "must be >= 1")
        require(self.tensor_parallel_size >= 1, p + "tensor-parallel-size", "must be >= 1")
        require(bool(self.host), p + "host", "must name an address (e.g. 127.0.0.1)")
        require(0 <= self.port < 65536, p + "port", f"must be in [0, 65535] (0: a free port), got {self.port}")
        require(self.startup_timeout_s > 0, p + "startup-timeout-s", "must be > 0")
        require(self.request_timeout_s > 0, p + "request-timeout-s", "must be > 0")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Generation of each round: ``group_size`` sampled responses per prompt with behaviour log-probs under
    softmax(logits / temperature); prompts are left-padded to ``max_prompt_len`` (one compiled shape)."""

    FLAG_PREFIX: ClassVar[str] = "rollout."

    engine: Literal["jax", "vllm"] = "jax"
    """Rollout engine: jax (in-process, the trainer's parameters) or vllm (the vllm extra)."""
    group_size: int = 8
    """Responses sampled per prompt (the group of group-relative advantages)."""
    prompts_per_call: int = 0
    """Prompts per generation call (0: --update.fresh-groups-per-round); the sampler's batch is this x group_size."""
    temperature: float = 1.0
    """Sampling temperature (the behaviour and recomputed log-probs use it too)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int = 64
    """Response budget in tokens (a longer response is truncated, finish reason 'length')."""
    max_prompt_len: int = 64
    """Prompt budget in tokens; longer prompts are skipped with a warning."""
    vllm: VLLMConfig = VLLMConfig()
    """Settings of the vLLM engine (used with --rollout.engine vllm)."""

    def __post_init__(self) -> None:
        p = self.FLAG_PREFIX
        check_choices(self)
        require_finite(self, "temperature", "top_p")
        require(self.group_size >= 2, p + "group-size",
                f"group-relative advantages need >= 2 responses per prompt, got {self.group_size}")
        require(self.prompts_per_call >= 0, p + "prompts-per-call", "must be >= 0 (0: fresh groups per round)")
        require(self.temperature > 0, p + "temperature", "must be > 0 (RL samples; behaviour log-probs use it)")
        require(0.0 < self.top_p <= 1.0, p + "top-p", "must be in (0, 1]")
        require(self.max_new_tokens >= 1, p + "max-new-tokens", "must be >= 1")
        require(self.max_prompt_len >= 1, p + "max-prompt-len", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """What a round trains on: ``groups_per_round`` groups from the buffer (the new ones first, replayed ones fill
    the rest) in ``num_minibatches`` mini-batches of whole groups, ``num_passes`` times: ``num_passes x
    num_minibatches`` optimizer steps per round, each accumulated over ``--train.num-microbatches`` micro-batches."""

    FLAG_PREFIX: ClassVar[str] = "update."

    groups_per_round: int = 16
    """Groups trained on per round."""
    fresh_groups_per_round: int = 0
    """New groups admitted per round (0: groups_per_round); fewer leaves room for replayed groups."""
    num_minibatches: int = 1
    """Optimizer steps per pass over the round's groups."""
    num_passes: int = 1
    """Passes over the round's groups."""
    overlap: bool = False
    """Generate round r + 1 while round r's update runs (rollouts one policy version stale, corrected by the
    importance weights; needs --buffer.max-staleness >= 1; one process)."""

    def __post_init__(self) -> None:
        p = self.FLAG_PREFIX
        require(self.groups_per_round >= 1, p + "groups-per-round", "must be >= 1")
        require(self.num_minibatches >= 1, p + "num-minibatches", "must be >= 1")
        require(self.num_passes >= 1, p + "num-passes", "must be >= 1")
        require(self.groups_per_round % self.num_minibatches == 0, p + "num-minibatches",
                f"--update.groups-per-round {self.groups_per_round} groups cannot be split into "
                f"{self.num_minibatches} equal mini-batches of whole groups; choose a divisor")
        require(self.fresh_groups_per_round >= 0, p + "fresh-groups-per-round", "must be >= 0 (0: groups-per-round)")
        require(self.fresh_groups_per_round <= self.groups_per_round, p + "fresh-groups-per-round",
                f"{self.fresh_groups_per_round} new groups do not fit in a round of --update.groups-per-round "
                f"{self.groups_per_round}")


def _default_optim() -> OptimConfig:
    # RL fine-tuning: small constant learning rate, no warm-up, no weight decay (the policy starts trained).
    return OptimConfig(lr=1e-5, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=1.0)


VERIFIER_NAMES = ("exact", "steps", "math", "code", "format")


@dataclasses.dataclass(frozen=True)
class RLConfig(RunConfig):
    """One RL fine-tuning run (``scripts/rl.py --config configs/rl/tiny-arith.yaml --init-from DIR``).

    Each round: pick prompts (difficulty band), sample ``rollout.group_size`` responses per prompt, verify, keep the
    groups in the band until ``update.fresh_groups_per_round`` new groups are in the buffer (over-generating up to
    ``difficulty.oversample_factor`` x that many prompts), then train on ``update.groups_per_round`` groups from the
    buffer (see :class:`UpdateConfig`). The policy version goes up by one per round. One unit of the loop skeleton
    is one round: ``--eval.every``, ``--checkpoint.save-every``, ``--log-every`` and ``--stop-after-steps`` count
    rounds.

    ``model`` is only used without ``init_from`` (a randomly initialised policy, for tests). ``prompts`` /
    ``eval.heldout``: a ``synthetic:...`` spec or a JSONL file of prompt records (``motif_jax.data.prompts``;
    ``scripts/prefilter_prompts.py`` writes such files with measured pass rates).
    """

    FLAG_PREFIX: ClassVar[str] = ""

    optim: OptimConfig = dataclasses.field(default_factory=_default_optim)
    eval: EvalConfig = EvalConfig(heldout="synthetic:addition?split=test&n=200&min_digits=1&max_digits=4",
                                  max_new_tokens=64, batch_size=200)
    checkpoint: CheckpointConfig = CheckpointConfig(save_every=10, keep=2)
    run_dir: str = "runs/rl"
    log_every: int = 1
    objective: RLObjectiveConfig = RLObjectiveConfig()
    difficulty: DifficultyConfig = DifficultyConfig()
    buffer: BufferConfig = BufferConfig()
    sandbox: SandboxConfig = SandboxConfig()
    rollout: RolloutConfig = RolloutConfig()
    update: UpdateConfig = UpdateConfig()
    prompts: str = "synthetic:addition?split=train&n=4000&min_digits=1&max_digits=4"
    """The prompt pool: a synthetic:... spec or a JSONL file of prompt records."""
    verifiers: tuple[str, ...] = ("exact", "math", "code", "format")
    """Verifiers of the reward (motif_jax.rl.verifiers.default_verifiers names)."""
    reward_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    """Weight of each verifier's reward (default 1)."""
    band_filter: bool = True
    """Difficulty-aware prompt selection and band admission (False: uniform prompts, every group admitted)."""
    rounds: int = 50
    """Rounds of the run (the loop's unit)."""
    max_rollouts: int = 0
    """Finish once this many responses were generated (0: no limit)."""

    # -- derived ------------------------------------------------------------------------------------------------------
    @property
    def fresh_groups(self) -> int:
        return self.update.fresh_groups_per_round or self.update.groups_per_round

    @property
    def prompts_per_call(self) -> int:
        return self.rollout.prompts_per_call or self.fresh_groups

    @property
    def samples_per_minibatch(self) -> int:
        return self.update.groups_per_round // self.update.num_minibatches * self.rollout.group_size

    @property
    def micro_batch(self) -> int:
        """Samples per micro-batch."""
        return self.samples_per_minibatch // self.train.num_microbatches

    @property
    def seq_len(self) -> int:
        """Training sequence length: prompt budget + response budget."""
        return self.rollout.max_prompt_len + self.rollout.max_new_tokens

    @property
    def steps_per_round(self) -> int:
        return self.update.num_passes * self.update.num_minibatches

    def __post_init__(self) -> None:
        super().__post_init__()
        g, per = self.rollout.group_size, self.samples_per_minibatch
        require(per % self.train.num_microbatches == 0, "train.num-microbatches",
                f"a mini-batch holds {per} samples ({self.update.groups_per_round // self.update.num_minibatches} "
                f"groups x {g}), not a multiple of {self.train.num_microbatches} micro-batches; choose a divisor")
        if self.fresh_groups < self.update.groups_per_round:
            require(self.buffer.max_uses >= 2, "buffer.max-uses",
                    f"only {self.fresh_groups} of {self.update.groups_per_round} groups per round are new, so the rest "
                    "must be replayed: set --buffer.max-uses >= 2 (or --update.fresh-groups-per-round to "
                    "--update.groups-per-round)")
        require(not self.update.overlap or self.buffer.max_staleness >= 1, "buffer.max-staleness",
                "--update.overlap trains on rollouts one version stale: set it >= 1")
        require(not self.update.overlap or self.distributed.num_processes == 1, "update.overlap",
                "runs on one process (its generation and the update would issue collectives concurrently)")
        require(self.buffer.group_size is None or self.buffer.group_size == g, "buffer.group-size",
                f"is {self.buffer.group_size} but --rollout.group-size is {g}")
        require(self.buffer.capacity_groups >= self.update.groups_per_round, "buffer.capacity-groups",
                f"must hold at least one round ({self.update.groups_per_round} groups)")
        new = self.rollout.max_new_tokens
        if self.objective.max_response_len is not None:
            require(self.objective.max_response_len >= new, "objective.max-response-len",
                    f"is below --rollout.max-new-tokens {new}; responses could exceed L_max")
        if self.objective.overlong_buffer:
            require(self.objective.overlong_buffer < new, "objective.overlong-buffer",
                    f"must be smaller than --rollout.max-new-tokens {new}")
        require(self.rounds >= 0, "rounds", "must be >= 0")
        require(self.optim.warmup_steps < max(self.rounds * self.steps_per_round, 1), "optim.warmup-steps",
                f"{self.optim.warmup_steps} warm-up steps are longer than the run ({self.rounds} rounds x "
                f"{self.steps_per_round} optimizer steps); lower it or raise --rounds")
        require(self.max_rollouts >= 0, "max-rollouts", "must be >= 0 (0: no limit)")
        require(bool(self.prompts), "prompts", "needs a prompt source (synthetic:... spec or JSONL path)")
        bad = [v for v in self.verifiers if v not in VERIFIER_NAMES]
        require(not bad and bool(self.verifiers), "verifiers", f"unknown {bad}; choose from {VERIFIER_NAMES}")
        bad_w = [k for k, w in self.reward_weights.items() if k not in self.verifiers or not w >= 0]
        require(not bad_w, "reward-weights", f"{bad_w}: weights must be >= 0 and name a verifier in --verifiers")
        require(self.model.max_seq_len >= self.seq_len or bool(self.init_from), "rollout.max-new-tokens",
                f"--rollout.max-prompt-len + --rollout.max-new-tokens = {self.seq_len} exceeds --model.max-seq-len "
                f"{self.model.max_seq_len}")
