"""Motif-2 for vLLM: grouped differential attention, SubLN and PolyNorm in torch, on vLLM's model API.

The same function as ``motif_jax.model`` (``layers.Attention._differential``, ``layers.polynorm``), on the
Hugging Face parameter names that ``motif_jax.convert.mapping.param_maps`` gives (so the checkpoint and the trainer's
weight push load unchanged). Registered by :mod:`motif_jax.rl.engines.vllm_plugin`; imported only inside vLLM
processes (it needs torch and vLLM).

Geometry (``config.json``): ``H = num_attention_heads`` query heads in ``ng = num_noise_heads`` groups of ``r``
signal heads + 1 noise head (``r = (H - ng) / ng``), ``2 G = num_key_value_heads`` key/value heads alternating
signal (K1/V1) and noise (K2/V2), head width ``hd``. Per group g (key/value pair ``g // (ng / G)``)::

    S_h = softmax(q_h k1^T / sqrt(hd)) [V1 | V2]          (each signal head h of the group, [2 hd])
    N_g = softmax(qn_g k2^T / sqrt(hd)) [V1 | V2]         (the group's noise head)
    out_h = SubLN(S_h - lambda N_g) (1 - lambda_init)     lambda = exp(lq1.lk1) - exp(lq2.lk2) + lambda_init

vLLM's paged attention stores one head width for keys and values, so each layer runs two ``Attention`` layers
(signal heads over K1, noise heads over K2) whose queries and keys are zero-padded from ``hd`` to ``2 hd``: the
scores are unchanged (the scale is set to 1 / sqrt(hd) explicitly) and the values are ``[V1 | V2]`` as they are.
The price is KV-cache memory: 8 G hd numbers per token and layer instead of the checkpoint's 4 G hd (a backend with
a separate value width would remove it), and noise queries are not repeated (each noise head runs once and serves
the r signal heads of its group).

Tensor parallelism splits query groups and key/value pairs contiguously (both must divide by the TP size), which
keeps each group with its pair; PolyNorm's means over the MLP width are all-reduced across TP ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import extract_layer_index, maybe_prefix
from vllm.sequence import IntermediateTensors

__all__ = ["MotifForCausalLM"]

POLYNORM_EPS = 1e-6  # motif_jax.model.layers.polynorm's epsilon (not rms_norm_eps)


def lambda_init(layer_index: int) -> float:
    """0.8 - 0.6 exp(-0.3 (l - 1)) with a 0-based l, as ``motif_jax.model.layers.lambda_init``."""
    return 0.8 - 0.6 * math.exp(-0.3 * (layer_index - 1.0))


def geometry(config) -> tuple[int, int, int, int]:
    """(query groups ng, signal heads per group r, key/value pairs G, head width hd) of a Motif config."""
    heads = config.num_attention_heads
    ng = config.num_noise_heads or heads // 2  # Motif-2.6B: adjacent (signal, noise) pairs
    r = (heads - ng) // ng
    kv = config.num_key_value_heads
    if ng * (r + 1) != heads or kv % 2 or ng % (kv // 2):
        raise ValueError(f"MotifForCausalLM: {heads} heads with {ng} noise heads and {kv} key/value heads do not "
                         "form groups of (signal..., noise) heads over (K1/V1, K2/V2) pairs")
    return ng, r, kv // 2, config.head_dim


class SubLN(nn.Module):
    """RMS norm of each head's [2 hd] output, statistics and result in fp32 (as ``motif_jax.model.layers.RMSNorm``
    on fp32 input)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()


class MotifAttention(nn.Module):
    """x [T, hidden] -> [T, hidden]: grouped differential attention (module docstring) over vLLM's KV cache."""

    def __init__(self, config, *, cache_config, quant_config, prefix: str):
        super().__init__()
        ng, r, g, hd = geometry(config)
        tp = get_tensor_model_parallel_world_size()
        if ng % tp or g % tp:
            raise ValueError(f"MotifForCausalLM: tensor parallelism {tp} must divide the {ng} query groups and the "
                             f"{g} key/value pairs")
        self.ng, self.r, self.g, self.hd = ng // tp, r, g // tp, hd
        d = config.hidden_size
        self.q_proj = ColumnParallelLinear(d, ng * (r + 1) * hd, bias=False, quant_config=quant_config,
                                           prefix=f"{prefix}.q_proj")
        self.k_proj = ColumnParallelLinear(d, 2 * g * hd, bias=False, quant_config=quant_config,
                                           prefix=f"{prefix}.k_proj")
        self.v_proj = ColumnParallelLinear(d, 2 * g * hd, bias=False, quant_config=quant_config,
                                           prefix=f"{prefix}.v_proj")
        self.o_proj = RowParallelLinear(ng * r * 2 * hd, d, bias=False, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        # The lambda vectors stay fp32 whatever the model dtype (as in the trainer).
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, nn.Parameter(torch.zeros(hd, dtype=torch.float32), requires_grad=False))
        self.subln = SubLN(2 * hd, eps=config.attn_rms_norm_eps)
        self.lambda_init = lambda_init(extract_layer_index(prefix))
        self.rotary_emb = get_rope(hd, max_position=config.max_position_embeddings,
                                   rope_parameters=config.rope_parameters, is_neox_style=True)
        scale = hd ** -0.5  # the unpadded width: padding with zeros leaves q.k unchanged
        self.attn_signal = Attention(self.ng * r, 2 * hd, scale, num_kv_heads=self.g, cache_config=cache_config,
                                     quant_config=quant_config, prefix=f"{prefix}.attn_signal")
        self.attn_noise = Attention(self.ng, 2 * hd, scale, num_kv_heads=self.g, cache_config=cache_config,
                                    quant_config=quant_config, prefix=f"{prefix}.attn_noise")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t, ng, r, g, hd = x.shape[0], self.ng, self.r, self.g, self.hd
        q, _ = self.q_proj(x)
        k, _ = self.k_proj(x)
        v, _ = self.v_proj(x)
        q, k = self.rotary_emb(positions, q, k)
        q = q.view(t, ng, r + 1, hd)  # group-major: (signal x r, noise) per group
        k = k.view(t, g, 2, hd)  # (K1, K2) per pair
        pad = (0, hd)
        q_signal = F.pad(q[:, :, :r], pad).reshape(t, ng * r * 2 * hd)
        q_noise = F.pad(q[:, :, r], pad).reshape(t, ng * 2 * hd)
        k_signal = F.pad(k[:, :, 0], pad).reshape(t, g * 2 * hd)
        k_noise = F.pad(k[:, :, 1], pad).reshape(t, g * 2 * hd)
        v = v.reshape(t, g * 2 * hd)  # each pair's [V1 | V2]
        signal = self.attn_signal(q_signal, k_signal, v).view(t, ng, r, 2 * hd).float()
        noise = self.attn_noise(q_noise, k_noise, v).view(t, ng, 1, 2 * hd).float()
        lam = (torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
               - torch.exp(torch.dot(self.lambda_q2, self.lambda_k2)) + self.lambda_init)
        diff = signal - lam * noise  # [T, ng, r, 2 hd] fp32; each noise head serves its group's r signal heads
        out = self.subln(diff) * (1.0 - self.lambda_init)
        out, _ = self.o_proj(out.reshape(t, ng * r * 2 * hd).to(x.dtype))
        return out


class PolyNorm(nn.Module):
    """w0 n(x^3) + w1 n(x^2) + w2 n(x) + b with n(z) = z / sqrt(mean(z^2) + eps) over the (TP-sharded) last axis;
    fp32 result (``motif_jax.model.layers.polynorm``)."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width  # the full MLP width (the mean's denominator under TP)
        self.weight = nn.Parameter(torch.full((3,), 1.0 / 3.0, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(1, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        powers = torch.stack([xf**3, xf**2, xf])  # [3, T, f / tp]
        sq = powers.square().sum(-1, keepdim=True)
        if get_tensor_model_parallel_world_size() > 1:
            sq = tensor_model_parallel_all_reduce(sq)
        normed = powers * torch.rsqrt(sq / self.width + POLYNORM_EPS)
        return torch.einsum("p,p...->...", self.weight, normed) + self.bias[0]


class MotifMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with act = PolyNorm (``hidden_act: poly_norm``) or SiLU."""

    def __init__(self, config, *, quant_config, prefix: str):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = ColumnParallelLinear(d, f, bias=False, quant_config=quant_config,
                                              prefix=f"{prefix}.gate_proj")
        self.up_proj = ColumnParallelLinear(d, f, bias=False, quant_config=quant_config, prefix=f"{prefix}.up_proj")
        self.down_proj = RowParallelLinear(f, d, bias=False, quant_config=quant_config, prefix=f"{prefix}.down_proj")
        if config.hidden_act == "poly_norm":
            self.act_fn = PolyNorm(f)
        elif config.hidden_act == "silu":
            self.act_fn = None
        else:
            raise ValueError(f"MotifForCausalLM: hidden_act {config.hidden_act!r} is not poly_norm or silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, _ = self.gate_proj(x)
        up, _ = self.up_proj(x)
        if self.act_fn is None:
            h = F.silu(gate) * up
        else:
            h = (self.act_fn(gate) * up.float()).to(x.dtype)
        out, _ = self.down_proj(h)
        return out


class MotifDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config, *, cache_config, quant_config, prefix: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = MotifAttention(config, cache_config=cache_config, quant_config=quant_config,
                                        prefix=f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MotifMLP(config, quant_config=quant_config, prefix=f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class MotifModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        cache, quant = vllm_config.cache_config, vllm_config.quant_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config=quant,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            MotifDecoderLayer(config, cache_config=cache, quant_config=quant, prefix=f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            x = layer(positions, x)
        return self.norm(x)


class MotifForCausalLM(nn.Module):
    """vLLM's text-generation interface (``forward`` -> hidden states [T, hidden], ``compute_logits`` -> [T, vocab],
    ``load_weights`` from (Hugging Face name, tensor) pairs). No pipeline parallelism."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = MotifModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint names are the module paths (no fused projections), so each tensor goes to its parameter's
        own loader (which takes this TP rank's slice)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # the head is the embedding
            if name not in params:
                raise ValueError(f"MotifForCausalLM: checkpoint tensor {name!r} has no parameter")
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded
