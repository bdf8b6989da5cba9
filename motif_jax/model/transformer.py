"""The decoder: embedding, a scanned stack of layers, final norm; the output projection exposed separately.

``Decoder.__call__`` returns final hidden states, not logits: training feeds them with ``output_projection()`` to
the fused LM-head loss in ``motif_kernels/`` so the [tokens, vocab] logits are never held. ``logits()`` is for
generation, where only the last position is projected.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from motif_jax.config import ModelConfig
from motif_jax.model.layers import ACT, Block, RMSNorm, param
from motif_jax.model.remat import apply_remat
from motif_jax.parallel.rules import constrain

KVCache = dict[str, jax.Array]


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(
            rngs, nnx.initializers.normal(cfg.init_std), (cfg.vocab_size, cfg.hidden_size), cfg.param_dtype,
            ("vocab", "embed"),
        )

        # Layers are created with a vmap so their parameters are stacked on a leading "layers" axis for lax.scan.
        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(
                rngs, nnx.initializers.normal(cfg.init_std), (cfg.hidden_size, cfg.vocab_size), cfg.param_dtype,
                ("embed", "vocab"),
            )

    def __call__(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        kv_cache: KVCache | None = None,
        cache_index: jax.Array | int | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """tokens: [B, T] int32; segment_ids (0 = padding), positions: [B, T] int32 (default: one segment, 0..T-1).

        With ``kv_cache`` (see :func:`init_kv_cache`), this step's keys/values, segment ids and positions are
        written at ``cache_index`` and every token attends over the cache. Returns (hidden [B, T, embed] in the
        compute dtype, updated cache or None).
        """
        cfg = self.cfg
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = jnp.take(self.embed[...], tokens, axis=0).astype(cfg.dtype)
        x = constrain(x, ACT)

        if kv_cache is not None:
            kv_cache = dict(kv_cache)
            for name, new in (("segment_ids", segment_ids), ("positions", positions)):
                kv_cache[name] = jax.lax.dynamic_update_slice_in_dim(kv_cache[name], new, cache_index, 1)
            shared = {"segment_ids": kv_cache["segment_ids"], "positions": kv_cache["positions"]}

        graphdef, layer_state = nnx.split(self.layers)

        # The whole [layers, ...] cache travels in the carry, each layer writing its slice in place.
        def layer(carry, xs):
            x, caches = carry
            state, index = xs
            block = nnx.merge(graphdef, state)
            cache = None if caches is None else {"k": caches[0], "v": caches[1], **shared}
            x, new_kv = block(x, segment_ids, positions, index, cache, cache_index)
            return (x, new_kv), None

        layer = apply_remat(layer, cfg.remat_policy)
        indices = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        carry = (x, None if kv_cache is None else (kv_cache["k"], kv_cache["v"]))
        if cfg.scan_layers:
            carry, _ = jax.lax.scan(layer, carry, (layer_state, indices))
        else:  # an unrolled loop (faster on small CPUs, compile time grows with depth); same results
            for i in range(cfg.num_layers):
                carry, _ = layer(carry, jax.tree.map(lambda a: a[i], (layer_state, indices)))
        x, new_kv = carry

        x = self.final_norm(x)
        if kv_cache is not None:
            kv_cache["k"], kv_cache["v"] = new_kv
        return x, kv_cache

    def output_projection(self) -> jax.Array:
        """The LM head as [embed, vocab] (the tied embedding transposed), in the compute dtype."""
        w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        return w.astype(self.cfg.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: [..., embed] -> fp32 logits [..., vocab]. Only for few positions (generation, tests)."""
        return jnp.dot(hidden, self.output_projection(), preferred_element_type=jnp.float32)


def init_kv_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache, head-major so decoding's dots read it in place: k [layers, B, kv_heads, max_len, head_dim];
    v [layers, B, Hv, max_len, Dv], (Hv, Dv) = (kv_heads, head_dim), or for differential attention (key/value
    pairs, 2 head_dim): each pair's [V1 | V2], which its signal and noise heads both weight; segment_ids (0 = empty)
    and positions [B, S]."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    hv, dv = cfg.num_kv_heads, cfg.head_dim
    if cfg.attention == "differential":
        hv, dv = cfg.num_kv_groups, 2 * cfg.head_dim
    return {
        "k": jnp.zeros((cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim), dtype),
        "v": jnp.zeros((cfg.num_layers, batch, hv, max_len, dv), dtype),
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
        "positions": jnp.zeros((batch, max_len), jnp.int32),
    }


def create_model(cfg: ModelConfig, seed: int = 0) -> Decoder:
    return Decoder(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """GraphDef + parameter State of ShapeDtypeStructs: nothing allocated (used for parameter counts and planning)."""
    return nnx.split(nnx.eval_shape(lambda: create_model(cfg)))


def count_params(state: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(state))
