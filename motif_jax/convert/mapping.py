"""Hugging Face <-> motif_jax: architectures, config fields and parameter names.

One table per architecture says which Hugging Face tensor holds each of our parameters, and whether it is a
``torch.nn.Linear`` weight (stored ``[out, in]``, ours ``[in, out]``: transposed on the way in and out). Stacked
layer parameters (``layers/...``, leading ``[num_layers]`` axis) map to one Hugging Face tensor per layer through a
``{i}`` template. Llama and Qwen3 RoPE is rotate-half like ours, and Motif keeps its checkpoint head layout in our
model (see ``docs/hf_interop.md``), so no tensor is permuted: conversion is a transpose and a dtype cast.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from motif_jax.config import ConfigError, ModelConfig, RopeScalingConfig


class ConversionError(ValueError):
    """A checkpoint or configuration that cannot be converted; the message names the file, tensor or field."""


LLAMA = "LlamaForCausalLM"
QWEN3 = "Qwen3ForCausalLM"
MOTIF = "MotifForCausalLM"
SUPPORTED_ARCHITECTURES = (LLAMA, QWEN3, MOTIF)
MODEL_TYPES = {LLAMA: "llama", QWEN3: "qwen3", MOTIF: "Motif"}

# Hugging Face tensors that carry no parameter (recomputed buffers) and are skipped on import.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class ParamMap:
    """Our parameter ``path`` (a key path in the nnx.State) <-> the Hugging Face tensor ``hf_name``.

    ``hf_name`` contains ``{i}`` for stacked layer parameters (one HF tensor per layer, our leading axis).
    ``transpose``: an ``nn.Linear`` weight, HF ``[out, in]`` vs ours ``[in, out]``.
    """

    path: tuple[str, ...]
    hf_name: str
    transpose: bool = False

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name

    def hf_names(self, num_layers: int) -> list[str]:
        return [self.hf_name.format(i=i) for i in range(num_layers)] if self.stacked else [self.hf_name]


def param_maps(cfg: ModelConfig) -> list[ParamMap]:
    """Every parameter of ``Decoder(cfg)`` with its Hugging Face name (the naming is shared by the three
    architectures; which entries exist depends on qk_norm / attention / mlp / tie_embeddings)."""
    layer = "model.layers.{i}."
    maps = [ParamMap(("embed",), "model.embed_tokens.weight")]
    maps += [
        ParamMap(("layers", "input_norm", "weight"), layer + "input_layernorm.weight"),
        ParamMap(("layers", "post_attention_norm", "weight"), layer + "post_attention_layernorm.weight"),
    ]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        maps.append(ParamMap(("layers", "attn", proj, "kernel"), layer + f"self_attn.{proj}.weight", True))
    if cfg.qk_norm:
        maps += [
            ParamMap(("layers", "attn", "q_norm", "weight"), layer + "self_attn.q_norm.weight"),
            ParamMap(("layers", "attn", "k_norm", "weight"), layer + "self_attn.k_norm.weight"),
        ]
    if cfg.attention == "differential":
        for lam in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            maps.append(ParamMap(("layers", "attn", lam), layer + f"self_attn.{lam}"))
        maps.append(ParamMap(("layers", "attn", "subln", "weight"), layer + "self_attn.subln.weight"))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        maps.append(ParamMap(("layers", "mlp", proj, "kernel"), layer + f"mlp.{proj}.weight", True))
    if cfg.mlp == "polynorm":
        maps += [
            ParamMap(("layers", "mlp", "poly_weight"), layer + "mlp.act_fn.weight"),
            ParamMap(("layers", "mlp", "poly_bias"), layer + "mlp.act_fn.bias"),
        ]
    maps.append(ParamMap(("final_norm", "weight"), "model.norm.weight"))
    if not cfg.tie_embeddings:
        maps.append(ParamMap(("lm_head",), "lm_head.weight", True))
    return maps


def hf_shape(m: ParamMap, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Hugging Face tensor shape for our parameter shape (layer axis dropped, Linear weights transposed)."""
    shape = tuple(our_shape[1:]) if m.stacked else tuple(our_shape)
    return shape[::-1] if m.transpose else shape


# ---------------------------------------------------------------------------------------------------------------------
# Config translation
# ---------------------------------------------------------------------------------------------------------------------


def _get(hf: dict, key: str, arch: str, default: Any = ...) -> Any:
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is ...:
        raise ConversionError(f"config.json ({arch}): required field {key!r} is missing")
    return default


_ROPE_KEYS = {  # Hugging Face rope parameter -> RopeScalingConfig field
    "factor": "factor", "original_max_position_embeddings": "original_max_len", "beta_fast": "beta_fast",
    "beta_slow": "beta_slow", "attention_factor": "attention_factor", "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim", "truncate": "truncate", "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor",
}


def _rope(hf: dict, arch: str, drop_rope_scaling: bool) -> tuple[float, RopeScalingConfig]:
    """(RoPE base, scaling) from ``rope_parameters`` (transformers >= 5) or ``rope_theta`` + ``rope_scaling``.

    ``yarn`` and ``llama3`` are imported exactly (frequencies and, for YaRN, the attention factor); other types
    are refused naming the type, unless ``drop_rope_scaling`` says the scaling is only an inference-time extension.
    """
    params = hf.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    legacy = dict(hf.get("rope_scaling") or {})
    kind_of = lambda t: t.get("rope_type", t.get("type", "default")) or "default"
    # the scaled one of the two tables wins (transformers >= 5 writes rope_parameters, older files rope_scaling)
    table = legacy | params if kind_of(params) != "default" or not legacy else params | legacy
    kind = kind_of(table)
    if kind == "default" or drop_rope_scaling:
        if kind != "default":
            warnings.warn(f"config.json ({arch}): rope type {kind!r} dropped (drop_rope_scaling=True): the model "
                          "uses unscaled RoPE", stacklevel=3)
        return theta, RopeScalingConfig()
    if kind not in ("yarn", "llama3"):
        raise ConversionError(
            f"config.json ({arch}): rope type {kind!r} is not supported (motif_jax implements plain, yarn and llama3 "
            "RoPE); if the scaling is only an inference-time context extension, import with --drop-rope-scaling")
    fields = {ours: table[theirs] for theirs, ours in _ROPE_KEYS.items() if table.get(theirs) is not None}
    if "factor" not in fields and fields.get("original_max_len") and hf.get("max_position_embeddings"):
        fields["factor"] = hf["max_position_embeddings"] / fields["original_max_len"]  # as transformers does
    try:
        return theta, RopeScalingConfig(type=kind, **fields)
    except (ConfigError, TypeError) as e:
        raise ConversionError(f"config.json ({arch}): rope scaling {table}: {e}") from None


def _rope_to_hf(theta: float, scaling: RopeScalingConfig) -> dict[str, Any]:
    """``rope_parameters`` / ``rope_scaling`` of config.json (both: transformers >= 5 reads the first, vLLM and
    Motif's inference code the second)."""
    if scaling.type == "none":
        return {"rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    keys = [k for k in _ROPE_KEYS if k not in (("low_freq_factor", "high_freq_factor") if scaling.type == "yarn"
                                              else ("beta_fast", "beta_slow", "attention_factor", "mscale",
                                                    "mscale_all_dim", "truncate"))]
    table = {k: getattr(scaling, _ROPE_KEYS[k]) for k in keys}
    table = {k: v for k, v in table.items() if not (k in ("attention_factor", "mscale", "mscale_all_dim") and not v)}
    return {"rope_scaling": {"rope_type": scaling.type, **table},
            "rope_parameters": {"rope_type": scaling.type, "rope_theta": theta, **table}}


def _refuse(hf: dict, arch: str, field: str, ok) -> None:
    value = hf.get(field)
    if value is not None and not ok(value):
        raise ConversionError(f"config.json ({arch}): {field}={value!r} is not supported by motif_jax")


def architecture_of(hf: dict) -> str:
    archs = hf.get("architectures") or []
    by_type = {t.lower(): a for a, t in MODEL_TYPES.items()}
    if not archs and str(hf.get("model_type", "")).lower() in by_type:
        archs = [by_type[str(hf["model_type"]).lower()]]
    if not archs:
        raise ConversionError(
            f"config.json has no 'architectures' field; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"config.json: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def config_from_hf(
    hf: dict,
    *,
    param_dtype: str = "float32",
    overrides: dict[str, Any] | None = None,
    drop_rope_scaling: bool = False,
) -> tuple[ModelConfig, str]:
    """Hugging Face ``config.json`` (as a dict) -> (our ModelConfig, architecture name).

    ``overrides`` sets fields Hugging Face does not describe (``dtype``, ``attention_impl``, ``remat_policy``...);
    they may not change the architecture.
    """
    arch = architecture_of(hf)
    rope_theta, rope_scaling = _rope(hf, arch, drop_rope_scaling)
    hidden = int(_get(hf, "hidden_size", arch))
    heads = int(_get(hf, "num_attention_heads", arch))
    fields: dict[str, Any] = dict(
        vocab_size=int(_get(hf, "vocab_size", arch)),
        hidden_size=hidden,
        num_layers=int(_get(hf, "num_hidden_layers", arch)),
        num_heads=heads,
        num_kv_heads=int(_get(hf, "num_key_value_heads", arch, heads)),
        head_dim=int(_get(hf, "head_dim", arch, hidden // heads)),
        mlp_dim=int(_get(hf, "intermediate_size", arch)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        norm_eps=float(_get(hf, "rms_norm_eps", arch, 1e-6)),
        max_seq_len=int(hf.get("max_position_embeddings") or 4096),
        param_dtype=param_dtype,
    )
    _refuse(hf, arch, "attention_bias", lambda v: not v)
    _refuse(hf, arch, "mlp_bias", lambda v: not v)
    _refuse(hf, arch, "use_bias", lambda v: not v)
    _refuse(hf, arch, "qkv_bias", lambda v: not v)
    _refuse(hf, arch, "partial_rotary_factor", lambda v: v == 1)
    if arch in (LLAMA, QWEN3):
        _refuse(hf, arch, "hidden_act", lambda v: v == "silu")
        fields.update(attention="standard", mlp="swiglu", qk_norm=arch == QWEN3)
    if arch == QWEN3:
        _refuse(hf, arch, "use_sliding_window", lambda v: not v)
        _refuse(hf, arch, "layer_types", lambda v: all(t == "full_attention" for t in v))
    if arch == MOTIF:
        _refuse(hf, arch, "hidden_act", lambda v: v in ("poly_norm", "silu"))
        _refuse(hf, arch, "k_ratio", lambda v: v == 1)
        noise = hf.get("num_noise_heads")
        if noise is None:  # Motif-2.6B: plain differential attention, heads used as adjacent (signal, noise) pairs
            ratio = 1
        else:
            noise = int(noise)
            if noise <= 0 or (heads - noise) % noise:
                raise ConversionError(
                    f"config.json ({arch}): num_noise_heads={noise} must divide num_attention_heads - num_noise_heads "
                    f"= {heads - noise}"
                )
            ratio = (heads - noise) // noise
        attn_eps = hf.get("attn_rms_norm_eps")
        if attn_eps is not None and float(attn_eps) != fields["norm_eps"]:
            fields["attn_norm_eps"] = float(attn_eps)  # differential attention's SubLN has its own epsilon
        fields.update(
            attention="differential",
            diff_ratio=ratio,
            mlp="polynorm" if hf.get("hidden_act", "poly_norm") == "poly_norm" else "swiglu",
            qk_norm=False,
        )
    arch_fields = set(fields) - {"param_dtype", "max_seq_len"}
    for key in overrides or {}:
        if key in arch_fields:
            raise ConversionError(f"override {key!r} would change the architecture read from config.json; drop it")
    fields.update(overrides or {})
    try:
        return ModelConfig(**fields), arch
    except ConfigError as e:
        raise ConversionError(f"config.json ({arch}) gives an impossible motif_jax model: {e}") from None
    except TypeError as e:
        raise ConversionError(f"bad override: {e}") from None


def default_architecture(cfg: ModelConfig) -> str:
    if cfg.attention == "differential":
        return MOTIF
    return QWEN3 if cfg.qk_norm else LLAMA


def config_to_hf(cfg: ModelConfig, arch: str | None = None, dtype: str = "float32",
                 base: dict | None = None, token_ids: dict | None = None) -> dict:
    """Our ModelConfig -> Hugging Face ``config.json`` dict for ``arch`` (default: from the model's features).

    ``token_ids`` (``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of the tokenizer the model was trained
    with) are written as given; without them ``base`` (an imported model's original config.json) contributes its
    token ids.
    """
    arch = arch or default_architecture(cfg)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"cannot export to {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    problems = []
    if arch in (LLAMA, QWEN3):
        if cfg.attention != "standard":
            problems.append(f"attention={cfg.attention!r} (needs 'standard'; export as {MOTIF})")
        if cfg.mlp != "swiglu":
            problems.append(f"mlp={cfg.mlp!r} (needs 'swiglu')")
    if arch == LLAMA and cfg.qk_norm:
        problems.append(f"qk_norm=True ({LLAMA} has no QK-norm; export as {QWEN3})")
    if arch == QWEN3 and not cfg.qk_norm:
        problems.append(f"qk_norm=False ({QWEN3} always has QK-norm; export as {LLAMA})")
    if arch == MOTIF:
        if cfg.attention != "differential":
            problems.append("attention='standard' (MotifForCausalLM uses grouped differential attention)")
        if cfg.qk_norm:
            problems.append("qk_norm=True (MotifForCausalLM has no QK-norm)")
    if problems:
        raise ConversionError(f"cannot export this model as {arch}: " + "; ".join(problems))

    hf: dict[str, Any] = {
        "architectures": [arch],
        "model_type": MODEL_TYPES[arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        **_rope_to_hf(cfg.rope_theta, cfg.rope_scaling),
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if arch == LLAMA:
        hf.update(mlp_bias=False, pretraining_tp=1)
    if arch == QWEN3:
        hf.update(
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=cfg.num_layers,
            layer_types=["full_attention"] * cfg.num_layers,
        )
    if arch == MOTIF:
        hf.update(
            num_noise_heads=cfg.num_query_groups,
            k_ratio=1,
            attn_rms_norm_eps=cfg.attn_norm_eps or cfg.norm_eps,
            hidden_act="poly_norm" if cfg.mlp == "polynorm" else "silu",
            use_bias=False,
            auto_map={
                "AutoConfig": "configuration_motif.MotifConfig",
                "AutoModelForCausalLM": "modeling_motif.MotifForCausalLM",
            },
        )
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if token_ids is not None:
            hf[key] = token_ids.get(key)
        elif base and base.get(key) is not None:
            hf[key] = base[key]
    return hf
