"""Configuration: frozen dataclasses for every knob, YAML presets and tyro overrides.

One configuration object per run: a YAML preset (``--config configs/sft/tiny-arith.yaml``) gives the defaults and
tyro flags override single fields (``--model.num-layers 4``). Every dataclass validates itself in
``__post_init__`` and raises :class:`ConfigError` naming the flag to change, so an impossible run fails at start-up.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence, TypeVar

import yaml


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the flag to change."""


def require(cond: bool, flag: str, msg: str) -> None:
    """Raises ConfigError("--<flag>: <msg>") unless ``cond``: the one way configs say what to change."""
    if not cond:
        raise ConfigError(f"--{flag}: {msg}")


@functools.cache
def _literal_fields(cls: type) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """(field name, allowed values) of every ``Literal[...]`` (or ``Literal[...] | None``) field of ``cls``."""
    out = []
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        allowed = tuple(v for a in args if typing.get_origin(a) is Literal for v in typing.get_args(a))
        if allowed:
            out.append((name, allowed + ((None,) if type(None) in args else ())))
    return tuple(out)


def check_choices(cfg: Any) -> None:
    """Checks every ``Literal`` field of the dataclass ``cfg`` against its type hint (tyro checks flags, but YAML
    presets and ``dataclasses.replace`` do not go through tyro); the flag is ``cfg.FLAG_PREFIX`` + the field."""
    prefix = getattr(cfg, "FLAG_PREFIX", "")
    for name, allowed in _literal_fields(type(cfg)):
        value = getattr(cfg, name)
        shown = ", ".join(repr(a) if a is None else str(a) for a in allowed)
        require(value in allowed, prefix + name.replace("_", "-"), f"unknown value {value!r}; choose one of {shown}")


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------

AttentionKind = Literal["standard", "differential"]
AttentionImpl = Literal["xla", "blockwise", "cudnn", "splash", "auto"]
MlpKind = Literal["swiglu", "polynorm"]
DType = Literal["float32", "bfloat16", "float16"]
# Names of motif_jax.model.remat.REMAT_POLICIES (that module checks it defines exactly these).
RematPolicy = Literal["none", "full", "save_projections", "save_attention_out", "save_qkv_attention_out",
                      "offload_projections", "offload_attention_out"]


RopeScalingType = Literal["none", "yarn", "llama3"]


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
    """Scaled RoPE frequencies, as transformers computes them for ``rope_scaling`` (and Motif's inference code for
    YaRN): ``yarn`` blends interpolated (/ factor) and original frequencies over the wavelengths between the
    ``beta_fast`` and ``beta_slow`` rotation counts of the original context and scales cos and sin (so the attention
    logits) by the attention factor; ``llama3`` divides the low frequencies by ``factor`` with a smooth band between
    ``low_freq_factor`` and ``high_freq_factor``."""

    FLAG_PREFIX: ClassVar[str] = "model.rope-scaling."

    type: RopeScalingType = "none"
    """none (plain RoPE), yarn, or llama3."""
    factor: float = 1.0
    """Context extension factor."""
    original_max_len: int = 0
    """original_max_position_embeddings: the context the model was pretrained with."""
    beta_fast: float = 32.0
    """YaRN: rotations at which frequencies are kept."""
    beta_slow: float = 1.0
    """YaRN: rotations at which frequencies are fully interpolated."""
    attention_factor: float = 0.0
    """YaRN: scale of cos and sin (0: derived from factor, mscale and mscale_all_dim as transformers does)."""
    mscale: float = 0.0
    """YaRN (DeepSeek style): mscale of the attention factor (0: unused)."""
    mscale_all_dim: float = 0.0
    """YaRN (DeepSeek style): mscale_all_dim of the attention factor (0: unused)."""
    truncate: bool = True
    """YaRN: round the correction range to whole dimensions."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max_len / low_freq_factor are scaled by 1 / factor."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max_len / high_freq_factor are kept."""

    def __post_init__(self) -> None:
        p = self.FLAG_PREFIX
        check_choices(self)
        for name in ("factor", "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim",
                     "low_freq_factor", "high_freq_factor"):
            require(math.isfinite(getattr(self, name)), p + name.replace("_", "-"), "must be finite")
        if self.type != "none":
            require(self.factor >= 1.0, p + "factor", f"must be >= 1 for {self.type} scaling, got {self.factor}")
            require(self.original_max_len > 0, p + "original-max-len",
                    f"{self.type} scaling needs the original context length (original_max_position_embeddings)")
        if self.type == "llama3":
            require(self.high_freq_factor > self.low_freq_factor, p + "high-freq-factor",
                    "must be larger than --model.rope-scaling.low-freq-factor")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer.

    Attention ``standard`` is grouped-query attention (Llama/Qwen). ``differential`` is Motif's grouped
    differential attention: ``num_heads`` query heads form groups of ``diff_ratio`` signal heads + 1 noise head, and
    the ``num_kv_heads`` key/value heads alternate signal (even) / noise (odd) pathways, so there are
    ``num_kv_heads // 2`` key/value groups. ``diff_ratio = 1`` is plain differential attention.
    """

    FLAG_PREFIX: ClassVar[str] = "model."

    vocab_size: int = 272
    """Rows of the embedding and columns of the LM head (>= the tokenizer's vocabulary)."""
    hidden_size: int = 128
    """Width of the residual stream."""
    num_layers: int = 2
    """Decoder blocks."""
    num_heads: int = 4
    """Query heads (differential: groups of diff_ratio signal heads + 1 noise head)."""
    num_kv_heads: int = 2
    """Key/value heads (differential: signal/noise pairs)."""
    head_dim: int = 32
    """Width of one attention head."""
    mlp_dim: int = 512
    """Hidden width of the MLP."""
    attention: AttentionKind = "standard"
    """standard (grouped-query) or differential (Motif's grouped differential attention)."""
    diff_ratio: int = 4
    """Signal heads per noise head of differential attention."""
    mlp: MlpKind = "swiglu"
    """MLP kind: swiglu, or polynorm (Motif)."""
    qk_norm: bool = False
    """RMS-normalise queries and keys per head (Qwen3)."""
    tie_embeddings: bool = False
    """The LM head is the transposed embedding."""
    rope_theta: float = 10_000.0
    """RoPE base frequency."""
    rope_scaling: RopeScalingConfig = RopeScalingConfig()
    norm_eps: float = 1e-6
    """Epsilon of the RMS norms."""
    attn_norm_eps: float = 0.0
    """Epsilon of differential attention's SubLN (Motif's attn_rms_norm_eps; 0: --model.norm-eps)."""
    max_seq_len: int = 4096
    """Longest sequence the model is used with (packing and generation budgets are checked against it)."""
    dtype: DType = "float32"
    """Dtype of matmul inputs and activations; parameters are kept in param_dtype (fp32 master weights)."""
    param_dtype: DType = "float32"
    """Dtype of the stored parameters."""
    attention_impl: AttentionImpl = "xla"
    """Attention backend: xla (dense), blockwise (flash-style, O(T) memory, portable), cudnn (GPU), splash (TPU)
    or auto (cudnn on GPU, splash on TPU, blockwise elsewhere)."""
    attention_block_q: int = 512
    """Query block of the blockwise attention (memory O(block_q * block_kv) per head)."""
    attention_block_kv: int = 512
    """Key/value block of the blockwise attention."""
    scan_layers: bool = True
    """Stack layers with lax.scan (compile time independent of depth); off only for debugging."""
    remat_policy: RematPolicy = "none"
    """Names of tensors to keep for the backward pass; see motif_jax.model.remat.REMAT_POLICIES."""
    init_std: float = 0.02
    """Standard deviation of the random initialisation."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
            require(getattr(self, name) > 0, f"model.{name.replace('_', '-')}", "must be positive")
        if self.attention == "standard":
            require(
                self.num_heads % self.num_kv_heads == 0,
                "model.num-kv-heads",
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}",
            )
        else:
            require(self.diff_ratio >= 1, "model.diff-ratio", "must be >= 1")
            require(
                self.num_heads % (self.diff_ratio + 1) == 0,
                "model.num-heads",
                f"differential attention needs num_heads divisible by diff_ratio + 1 = {self.diff_ratio + 1} "
                f"(groups of {self.diff_ratio} signal heads and 1 noise head); got {self.num_heads}",
            )
            require(
                self.num_kv_heads % 2 == 0,
                "model.num-kv-heads",
                "differential attention needs an even number of key/value heads (signal/noise pairs)",
            )
            require(
                self.num_query_groups % self.num_kv_groups == 0,
                "model.num-kv-heads",
                f"{self.num_query_groups} query groups must be a multiple of {self.num_kv_groups} key/value pairs",
            )
        require(self.head_dim % 2 == 0, "model.head-dim", "RoPE needs an even head_dim")
        require(self.rope_theta > 0, "model.rope-theta", "must be positive")
        require(self.attention_block_q > 0 and self.attention_block_kv > 0, "model.attention-block-q", "must be > 0")
        check_choices(self)

    # Differential-attention geometry -------------------------------------------------------------------------------
    @property
    def num_query_groups(self) -> int:
        """Groups of (diff_ratio signal + 1 noise) query heads."""
        return self.num_heads // (self.diff_ratio + 1)

    @property
    def num_kv_groups(self) -> int:
        """Key/value pairs (K1/V1 signal, K2/V2 noise) for differential attention."""
        return self.num_kv_heads // 2

    @property
    def num_signal_heads(self) -> int:
        return self.num_query_groups * self.diff_ratio

    @property
    def attention_out_dim(self) -> int:
        """Width of the o_proj input."""
        if self.attention == "differential":
            return self.num_signal_heads * 2 * self.head_dim
        return self.num_heads * self.head_dim

    def param_count(self) -> int:
        """Exact parameter count from the formulas (tests compare it with the abstract model)."""
        d, hd = self.hidden_size, self.head_dim
        attn = d * self.num_heads * hd + 2 * d * self.num_kv_heads * hd + self.attention_out_dim * d
        if self.qk_norm:
            attn += 2 * hd
        if self.attention == "differential":
            attn += 4 * hd + 2 * hd  # lambda vectors + SubLN weight
        mlp = 3 * d * self.mlp_dim + (4 if self.mlp == "polynorm" else 0)
        block = attn + mlp + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * block + embed + d


# ---------------------------------------------------------------------------------------------------------------------
# Parallelism
# ---------------------------------------------------------------------------------------------------------------------

MESH_AXES = ("data", "fsdp", "tensor", "context")

# Logical axis name -> mesh axes. One table for the whole model; changing a strategy is an edit here (or a flag).
DEFAULT_LOGICAL_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", ("context",)),
    # weights are also sharded over `context` (its devices hold different tokens, so it acts as more FSDP for the
    # weights); activations keep `embed` replicated because batch/length already use fsdp/context.
    ("embed", ("fsdp", "context")),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("layers", ()),
    ("norm", ()),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: each axis has an intra-node (ICI) and a cross-node (DCN) size; one ICI size may be -1 (fill)."""

    FLAG_PREFIX: ClassVar[str] = "mesh."

    data: int = 1
    """Data-parallel devices per node (replicated parameters)."""
    fsdp: int = -1
    """Fully-sharded data-parallel devices per node (-1: the remaining devices)."""
    tensor: int = 1
    """Tensor-parallel devices per node (heads, MLP and vocabulary split)."""
    context: int = 1
    """Context-parallel devices per node (the sequence split)."""
    dcn_data: int = 1
    """Data-parallel factor across nodes."""
    dcn_fsdp: int = 1
    """FSDP factor across nodes."""
    dcn_tensor: int = 1
    """Tensor-parallel factor across nodes."""
    dcn_context: int = 1
    """Context-parallel factor across nodes."""
    context_strategy: Literal["all_gather", "ring"] = "all_gather"
    """all_gather (K/V gathered, load-balanced causal layout) or ring (ppermute + online softmax)."""
    context_load_balance: bool = True
    """Reorder each sequence once at batch time so every context shard holds chunks i and 2C-1-i (balanced causal
    work); see motif_jax.parallel.context.load_balance_batch."""
    logical_rules: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_LOGICAL_RULES
    """Logical axis name -> mesh axes (one table for the whole model)."""

    def __post_init__(self) -> None:
        check_choices(self)
        ici = [self.data, self.fsdp, self.tensor, self.context]
        require(sum(1 for s in ici if s == -1) <= 1, "mesh", "at most one of data/fsdp/tensor/context may be -1")
        for name in MESH_AXES:
            v = getattr(self, name)
            require(v == -1 or v >= 1, f"mesh.{name}", "must be >= 1 or -1 (fill with the remaining devices)")
            require(getattr(self, f"dcn_{name}") >= 1, f"mesh.dcn-{name}", "must be >= 1")

    def ici_shape(self, devices_per_slice: int) -> dict[str, int]:
        """ICI axis sizes with -1 filled so that their product is ``devices_per_slice``."""
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        known = math.prod(s for s in sizes.values() if s != -1)
        if -1 in sizes.values():
            require(
                devices_per_slice % known == 0,
                "mesh",
                f"{devices_per_slice} devices per node cannot be split with fixed axes of product {known}",
            )
            sizes = {a: (devices_per_slice // known if s == -1 else s) for a, s in sizes.items()}
        require(
            math.prod(sizes.values()) == devices_per_slice,
            "mesh",
            f"axis sizes {sizes} multiply to {math.prod(sizes.values())}, but there are {devices_per_slice} "
            "devices per node; set one axis to -1 or fix the sizes",
        )
        return sizes

    def dcn_shape(self) -> dict[str, int]:
        return {a: getattr(self, f"dcn_{a}") for a in MESH_AXES}


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host start-up. Empty coordinator = single process, unless SLURM variables say otherwise."""

    FLAG_PREFIX: ClassVar[str] = "distributed."

    coordinator_address: str = ""
    """host:port of process 0's coordinator ('' = single process, or SLURM's)."""
    num_processes: int = 1
    """Processes of the job."""
    process_id: int = 0
    """This process's rank."""
    local_device_ids: str = ""
    """Comma-separated local device ids for this process ("" = all visible / derived from CUDA_VISIBLE_DEVICES)."""
    use_slurm: bool = True
    """Read SLURM_* variables when no coordinator is given."""
    coordinator_port: int = 0
    """Coordinator port when the address comes from SLURM (0: derived from SLURM_JOB_ID, as JAX does)."""
    process_per: Literal["auto", "node", "gpu"] = "auto"
    """auto (from SLURM's tasks per node), node (one process drives all GPUs of its node) or gpu (one each)."""

    def __post_init__(self) -> None:
        require(self.num_processes >= 1, "distributed.num-processes", "must be >= 1")
        require(
            0 <= self.process_id < self.num_processes,
            "distributed.process-id",
            f"must be in [0, {self.num_processes})",
        )
        require(
            self.num_processes == 1 or bool(self.coordinator_address),
            "distributed.coordinator-address",
            "is required when --distributed.num-processes > 1 (e.g. 10.0.0.1:1234)",
        )
        require(0 <= self.coordinator_port < 65536, "distributed.coordinator-port", "must be in [0, 65535]")
        check_choices(self)


# ---------------------------------------------------------------------------------------------------------------------
# YAML + tyro
# ---------------------------------------------------------------------------------------------------------------------

T = TypeVar("T")


def _tupleize(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupleize(v) for v in value)
    return value


def _find_preset(ref: str, base_dir: Path | None) -> Path:
    """A preset named inside another YAML: relative to the working directory, else to the including file's folder
    or one of its parents (so ``model: configs/model/tiny.yaml`` works from any preset in the repository)."""
    path = Path(ref)
    candidates = [path] + ([d / path for d in (base_dir, *base_dir.parents)] if base_dir else [])
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"--config: preset {ref!r} not found (looked in the working directory and above {base_dir})")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"--config: no such file {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of fields, not a {type(data).__name__}")
    return data


def from_dict(cls: type[T], data: dict[str, Any], where: str = "", base_dir: Path | None = None) -> T:
    """Builds (nested) frozen dataclass ``cls`` from a plain dict; unknown keys are errors naming the key.

    A section may name another YAML preset, whole (``model: configs/model/tiny.yaml``) or as the base that its
    other keys override (``model: {base: configs/model/tiny.yaml, num_heads: 5}``).
    """
    if isinstance(data, str) and dataclasses.is_dataclass(cls):
        data = {"base": data}
    if isinstance(data, dict) and "base" in data:
        rest = {k: v for k, v in data.items() if k != "base"}
        base_path = _find_preset(str(data["base"]), base_dir)
        data = {**_read_yaml(base_path), **rest}
    if not isinstance(data, dict):
        raise ConfigError(f"--{where.rstrip('.') or cls.__name__}: expected a mapping of fields, got "
                          f"{type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ConfigError(f"--{where}{key}: unknown field of {cls.__name__}; known: {sorted(fields)}")
        hint = hints[name]
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value or {}, f"{where}{key}.", base_dir)
        elif origin in (tuple, Sequence) and typing.get_args(hint) and dataclasses.is_dataclass(
            typing.get_args(hint)[0]
        ):
            item_cls = typing.get_args(hint)[0]
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"--{where}{key}: expected a list of {item_cls.__name__} mappings, got {value!r}")
            kwargs[name] = tuple(
                from_dict(item_cls, v, f"{where}{key}[{i}].", base_dir) for i, v in enumerate(value)
            )
        else:
            kwargs[name] = _typed(hint, _tupleize(value), f"{where}{key}".replace("_", "-"))
    return cls(**kwargs)


def _typed(hint: Any, value: Any, flag: str) -> Any:
    """``value`` of a YAML preset checked against the field's type ``hint`` (tyro checks flags, not presets).

    A float field takes what YAML 1.1 leaves as a string (``3e-3`` has no dot, so PyYAML reads a str) when it parses
    as a number; ints are not silently truncated; containers are checked element by element.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _typed(a, value, flag)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"--{flag}: {value!r} fits none of {hint}")
    if origin is Literal:
        return value  # check_choices names the allowed values
    if origin is tuple:
        if not isinstance(value, tuple):
            raise ConfigError(f"--{flag}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(args[0], v, flag) for v in value)
        if args and len(args) != len(value):
            raise ConfigError(f"--{flag}: expected {len(args)} items, got {value!r}")
        return tuple(_typed(a, v, flag) for a, v in zip(args, value)) if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"--{flag}: expected a mapping, got {value!r}")
        return {_typed(args[0], k, flag): _typed(args[1], v, flag) for k, v in value.items()} if args else value
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"--{flag}: expected a number, got {value!r}")
        return float(value)
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"--{flag}: expected an integer, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"--{flag}: expected true or false, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"--{flag}: expected a string, got {value!r} (quote it in the YAML)")
    return value


def load_yaml(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    return from_dict(cls, _read_yaml(path), base_dir=path.absolute().parent)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_cli(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """``--config PRESET.yaml`` gives the defaults, every other flag is a tyro override of one field.

    A ConfigError raised while building the config (bad value, impossible combination) is printed as one line and
    exits with status 2, never as a traceback.
    """
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    default = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise SystemExit("error: --config needs a path to a YAML preset")
        try:
            default = load_yaml(cls, argv[i + 1])
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None
        argv = argv[:i] + argv[i + 2 :]
    try:
        return tyro.cli(cls, args=argv, default=default, description=description)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
