"""Decoder building blocks in Flax NNX: RMSNorm, RoPE, projections, attention (GQA and grouped differential), MLPs.

Every parameter carries logical axis names in its ``out_sharding`` metadata (mapped to mesh axes by the rules table
in config, never here) and key activations are tagged with ``checkpoint_name`` for remat policies by name.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from motif_jax.config import ModelConfig, RopeScalingConfig
from motif_jax.model import remat
from motif_jax.model.attention import attend, cached_attention, resolve_impl
from motif_jax.model.context_attention import context_parallel_attention
from motif_jax.parallel.context import active_context_mesh
from motif_jax.parallel.rules import constrain

ACT = ("batch", "length", "embed")  # logical names of the residual stream


def param(rngs: nnx.Rngs, init, shape: Sequence[int], dtype, names: Sequence[str | None]) -> nnx.Param:
    """A parameter annotated with logical axis names (metadata only; placement happens at jit time)."""
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names), eager_sharding=False)


class Linear(nnx.Module):
    """y = x @ W with W: [in, out] (no bias). Matmul in the compute dtype, fp32 accumulation when it is low."""

    def __init__(self, din: int, dout: int, names: tuple[str, str], cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.kernel = param(rngs, nnx.initializers.normal(cfg.init_std), (din, dout), cfg.param_dtype, names)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class RMSNorm(nnx.Module):
    """x / rms(x) * w over the last axis, statistics in fp32."""

    def __init__(self, dim: int, cfg: ModelConfig, *, rngs: nnx.Rngs, eps: float | None = None):
        self.weight = param(rngs, nnx.initializers.ones, (dim,), cfg.param_dtype, ("norm",))
        self.eps = cfg.norm_eps if eps is None else eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScalingConfig = RopeScalingConfig()
                     ) -> tuple[np.ndarray, float]:
    """(inverse frequencies [head_dim / 2] float32, attention factor): plain RoPE, or the ``yarn`` / ``llama3``
    scaled frequencies as transformers computes them (so imported checkpoints keep their long-context behaviour)."""
    d = head_dim
    inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if scaling.type == "none":
        return inv_freq.astype(np.float32), 1.0
    factor, orig = scaling.factor, scaling.original_max_len
    if scaling.type == "llama3":
        low_wavelen, high_wavelen = orig / scaling.low_freq_factor, orig / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, blended, scaled).astype(np.float32), 1.0
    # yarn: interpolate the long wavelengths, keep the short ones, blend linearly in between
    attention = scaling.attention_factor
    if not attention:
        attention = (_yarn_mscale(factor, scaling.mscale) / _yarn_mscale(factor, scaling.mscale_all_dim)
                     if scaling.mscale and scaling.mscale_all_dim else _yarn_mscale(factor))

    def correction_dim(rotations: float) -> float:
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    high = high + 0.001 if low == high else high  # no division by zero
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: the original frequency (short wavelengths), 0: interpolated
    inv = (inv_freq / factor) * (1 - keep) + inv_freq * keep
    return inv.astype(np.float32), float(attention)


def rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, attention_factor: float = 1.0) -> jax.Array:
    """Rotate-half (NeoX) rotary embedding over the full head dim. x: [B, T, H, D]; positions: [B, T];
    inv_freq: [D / 2] from :func:`rope_frequencies` (cos and sin are scaled by ``attention_factor``)."""
    d = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    cos = (jnp.cos(angles) * attention_factor)[:, :, None, :]
    sin = (jnp.sin(angles) * attention_factor)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def lambda_init(layer_index: jax.Array) -> jax.Array:
    """Differential attention's per-layer constant: 0.8 - 0.6 exp(-0.3 (l - 1)) with a 0-based l (recipe.md)."""
    return 0.8 - 0.6 * jnp.exp(-0.3 * (layer_index.astype(jnp.float32) - 1.0))


class Attention(nnx.Module):
    """Grouped-query attention, or Motif's grouped differential attention (``cfg.attention == "differential"``).

    Projections keep the checkpoint layout: q [embed, num_heads * head_dim], k and v
    [embed, num_kv_heads * head_dim], o [attention_out_dim, embed]. For differential attention the query heads are
    ``num_query_groups`` groups of (``diff_ratio`` signal, 1 noise) and key/value heads alternate signal / noise.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(d, cfg.num_heads * hd, ("embed", "heads"), cfg, rngs=rngs)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg, rngs=rngs)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), cfg, rngs=rngs)
        self.o_proj = Linear(cfg.attention_out_dim, d, ("heads", "embed"), cfg, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg, rngs=rngs)
            self.k_norm = RMSNorm(hd, cfg, rngs=rngs)
        if cfg.attention == "differential":
            lam = nnx.initializers.normal(0.1)
            self.lambda_q1 = param(rngs, lam, (hd,), jnp.float32, ("norm",))
            self.lambda_k1 = param(rngs, lam, (hd,), jnp.float32, ("norm",))
            self.lambda_q2 = param(rngs, lam, (hd,), jnp.float32, ("norm",))
            self.lambda_k2 = param(rngs, lam, (hd,), jnp.float32, ("norm",))
            self.subln = RMSNorm(2 * hd, cfg, rngs=rngs, eps=cfg.attn_norm_eps or None)

    def __call__(self, x, segment_ids, positions, layer_index, kv_cache=None, cache_index=None):
        """x: [B, T, embed]; segment_ids, positions: [B, T] int32; layer_index: scalar int32.

        kv_cache: None, or a dict with head-major k [layers, B, Hk, S, D] and v [layers, B, Hv, S, Dv] (see
        ``init_kv_cache``; every layer's cache, carried whole so the write below is in place: no per-layer re-stack
        of the cache per decode step) and segment_ids, positions [B, S] (already holding this step's); this step's
        keys and values are written at (``layer_index``, ``cache_index``) and attention runs over this layer's
        buffer: decode steps (T = 1) and the xla impl with :func:`cached_attention`, longer prefills with the
        configured kernel. Returns (out [B, T, embed], updated (k, v) caches or None).
        """
        cfg = self.cfg
        b, t, _ = x.shape
        hd = cfg.head_dim
        q = checkpoint_name(self.q_proj(x), remat.QUERY_PROJ).reshape(b, t, cfg.num_heads, hd)
        k = checkpoint_name(self.k_proj(x), remat.KEY_PROJ).reshape(b, t, cfg.num_kv_heads, hd)
        v = checkpoint_name(self.v_proj(x), remat.VALUE_PROJ).reshape(b, t, cfg.num_kv_heads, hd)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq, attention_factor = rope_frequencies(hd, cfg.rope_theta, cfg.rope_scaling)
        q = rope(q, positions, inv_freq, attention_factor)
        k = rope(k, positions, inv_freq, attention_factor)

        new_kv = None
        kv_seg, kv_pos = segment_ids, positions
        if kv_cache is not None:  # head-major buffers: k [L, B, Hk, S, D], v [L, B, Hv, S, Dv] (init_kv_cache)
            hv, dv = kv_cache["v"].shape[2], kv_cache["v"].shape[4]
            new = (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v.reshape(b, t, hv, dv), 1, 2))  # [B, H, T, D]: small
            start = (layer_index, 0, 0, cache_index, 0)
            new_kv = tuple(jax.lax.dynamic_update_slice(kv_cache[n], x.astype(kv_cache[n].dtype)[None], start)
                           for n, x in zip(("k", "v"), new))
            # The barrier keeps XLA from fusing the layer read below into the write, a fusion that reads the old
            # buffer and so makes XLA:CPU copy the whole cache to update it (every layer and step).
            new_kv = jax.lax.optimization_barrier(new_kv)
            kv_seg, kv_pos = kv_cache["segment_ids"], kv_cache["positions"]
            k, v = (jax.lax.dynamic_index_in_dim(x, layer_index, keepdims=False).astype(q.dtype) for x in new_kv)
            if t == 1 or resolve_impl(cfg.attention_impl, q.dtype) == "xla":  # decode steps: [B, H, 1, S] logits
                return self._output(self._cached(q, k, v, kv_seg, kv_pos, segment_ids, positions, layer_index)), new_kv
            k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, S, H, D] for the fused kernels

        cp = kv_cache is None and active_context_mesh() is not None  # sequence sharded over `context`

        def sdpa(q_, k_, v_):
            if cp:
                return context_parallel_attention(
                    q_, k_, v_, segment_ids, kv_seg, positions, kv_pos,
                    impl=cfg.attention_impl, block_q=cfg.attention_block_q, block_kv=cfg.attention_block_kv,
                )
            return attend(
                q_, k_, v_, segment_ids, kv_seg, positions, kv_pos,
                impl=cfg.attention_impl, block_q=cfg.attention_block_q, block_kv=cfg.attention_block_kv,
            )

        if cfg.attention == "standard":
            return self._output(sdpa(q, k, v).reshape(b, t, cfg.num_heads * hd)), new_kv
        q_signal, q_noise = self._split_queries(q)
        s = k.shape[1]  # may exceed T with a KV cache
        k = k.reshape(b, s, cfg.num_kv_groups, 2, hd)
        v_both = v.reshape(b, s, cfg.num_kv_groups, 2 * hd)  # [B, S, nkv, 2 hd] = [V1 | V2]: a free reshape
        signal = sdpa(q_signal, k[:, :, :, 0], v_both)  # [B, T, ng r, 2 hd]
        noise = sdpa(q_noise, k[:, :, :, 1], v_both)  # [B, T, ng, 2 hd]
        return self._output(self._differential(signal, noise, layer_index)), new_kv

    def _output(self, out):
        """[B, T, attention_out_dim] -> o_proj -> [B, T, embed]."""
        out = checkpoint_name(out, remat.ATTENTION_OUT)
        return checkpoint_name(self.o_proj(out), remat.OUT_PROJ)

    def _split_queries(self, q):
        """q [B, T, heads, D] -> signal [B, T, ng r, D] (group-major: head g * r + i), noise [B, T, ng, D]."""
        b, t, _, hd = q.shape
        ng, r = self.cfg.num_query_groups, self.cfg.diff_ratio
        q = q.reshape(b, t, ng, r + 1, hd)
        return q[:, :, :, :r].reshape(b, t, ng * r, hd), q[:, :, :, r]

    def _cached(self, q, k, v, kv_seg, kv_pos, segment_ids, positions, layer_index):
        """Decoding attention over this layer's head-major cache (k [B, Hk, S, D], v [B, Hv, S, Dv]) with
        :func:`cached_attention`; differential attention batches its signal and noise keys as C = 2 key heads per
        [V1 | V2] value, the noise queries zero-padded to the signal heads' count. Returns [B, T, out_dim]."""
        cfg = self.cfg
        b, t, _, hd = q.shape
        args = (segment_ids, kv_seg, positions, kv_pos)
        if cfg.attention == "standard":
            hk = cfg.num_kv_heads
            out = cached_attention(q.reshape(b, t, hk, 1, cfg.num_heads // hk, hd), k, v, *args)
            return out.reshape(b, t, cfg.num_heads * hd).astype(q.dtype)
        nkv = cfg.num_kv_groups
        q_signal, q_noise = self._split_queries(q)
        gs, gn = q_signal.shape[2] // nkv, q_noise.shape[2] // nkv  # signal / noise query heads per pair
        q_noise = jnp.pad(q_noise.reshape(b, t, nkv, gn, hd), ((0, 0), (0, 0), (0, 0), (0, gs - gn), (0, 0)))
        q_both = jnp.stack([q_signal.reshape(b, t, nkv, gs, hd), q_noise], axis=3)  # [B, T, nkv, 2, gs, D]
        out = cached_attention(q_both, k, v, *args)  # [B, T, nkv, 2, gs, 2 D]
        signal = out[:, :, :, 0].reshape(b, t, nkv * gs, 2 * hd)
        noise = out[:, :, :, 1, :gn].reshape(b, t, nkv * gn, 2 * hd)
        return self._differential(signal, noise, layer_index)

    def _differential(self, signal, noise, layer_index):
        """Grouped differential attention (recipe.md): out_h = SubLN(S_h - lambda N_g) (1 - lambda_init).

        signal [B, T, ng r, 2 D], noise [B, T, ng, 2 D]: the signal and noise heads' attention over [V1 | V2].
        Returns [B, T, ng r 2 D] in the compute dtype."""
        cfg = self.cfg
        b, t, n, dv = signal.shape
        noise = jnp.repeat(noise.astype(jnp.float32), cfg.diff_ratio, axis=2)  # a noise head serves r signal heads
        lam_init = lambda_init(layer_index)
        lam = (
            jnp.exp(jnp.sum(self.lambda_q1[...] * self.lambda_k1[...]))
            - jnp.exp(jnp.sum(self.lambda_q2[...] * self.lambda_k2[...]))
            + lam_init
        )
        out = self.subln(signal.astype(jnp.float32) - lam * noise) * (1.0 - lam_init)  # SubLN statistics in fp32
        return out.reshape(b, t, n * dv).astype(cfg.dtype)


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)) with act = SiLU (SwiGLU) or PolyNorm (Motif-2)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f = cfg.hidden_size, cfg.mlp_dim
        self.gate_proj = Linear(d, f, ("embed", "mlp"), cfg, rngs=rngs)
        self.up_proj = Linear(d, f, ("embed", "mlp"), cfg, rngs=rngs)
        self.down_proj = Linear(f, d, ("mlp", "embed"), cfg, rngs=rngs)
        if cfg.mlp == "polynorm":
            self.poly_weight = param(rngs, nnx.initializers.constant(1.0 / 3.0), (3,), jnp.float32, (None,))
            self.poly_bias = param(rngs, nnx.initializers.zeros, (1,), jnp.float32, (None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = checkpoint_name(self.gate_proj(x), remat.MLP_GATE)
        up = checkpoint_name(self.up_proj(x), remat.MLP_UP)
        gate = constrain(gate, ("batch", "length", "mlp"))
        if self.cfg.mlp == "polynorm":
            h = (polynorm(gate, self.poly_weight[...], self.poly_bias[...]) * up.astype(jnp.float32)).astype(x.dtype)
        else:
            h = jax.nn.silu(gate) * up
        return checkpoint_name(self.down_proj(h), remat.MLP_OUT)


def polynorm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float = 1e-6) -> jax.Array:
    """w0 n(x^3) + w1 n(x^2) + w2 n(x) + b, n(z) = z / sqrt(mean(z^2) + eps) over the last axis; fp32 result.

    When the last (mlp) axis is sharded, XLA turns the means into all-reduces across shards.
    """
    xf = x.astype(jnp.float32)

    def n(z):
        return z * jax.lax.rsqrt(jnp.mean(z * z, axis=-1, keepdims=True) + eps)

    return weight[0] * n(xf**3) + weight[1] * n(xf**2) + weight[2] * n(xf) + bias[0]


class Block(nnx.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, segment_ids, positions, layer_index, kv_cache=None, cache_index=None):
        h, new_kv = self.attn(self.input_norm(x), segment_ids, positions, layer_index, kv_cache, cache_index)
        x = constrain(x + h, ACT)
        x = constrain(x + self.mlp(self.post_attention_norm(x)), ACT)
        return x, new_kv
