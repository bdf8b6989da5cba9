"""Splash attention (the Pallas TPU kernel shipped with JAX) for natural-order rows: causal + segment ids.

Splash attention skips the blocks its (static) mask says are empty, so a causal mask costs half the FLOPs of a
dense one, and takes packed segments as ``SegmentIds``. It masks by token index, which equals the model's rule
(same segment and ``position[i] >= position[j]``) exactly when the row is in natural order
(``motif_kernels.attention_layout``); the caller checks that and uses the blockwise kernel otherwise.

GQA: one MQA kernel (``G`` query heads sharing a key/value head) is vmapped over batch rows and key/value heads.
A value head wider than the key head (differential attention's ``[V1|V2]``) is passed as is. On a CPU target the
kernel runs through the Pallas interpreter (tests, tiny shapes); on TPU it is the Mosaic kernel; other targets are
refused. The sequence is padded to a multiple of the block (padding keys and queries get segment id -1: they only
see each other, never a real token). This module imports jax only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from motif_kernels import target as target_lib

__all__ = ["attention", "block_size", "unsupported_reason"]


def unsupported_reason(q_shape, k_shape, target: target_lib.Target | None = None) -> str | None:
    """Why splash attention cannot run for the target (None when it can)."""
    target = target or target_lib.current_target()
    if target.platform not in ("tpu", "cpu"):
        return (f"splash attention is a TPU kernel (interpreted on CPU for tests); the program is lowered for "
                f"{target.platform!r}")
    if q_shape[2] % k_shape[2]:
        return f"query heads {q_shape[2]} must be a multiple of key/value heads {k_shape[2]}"
    return None


def block_size(t_len: int) -> int:
    """Query and key block: 512 (MaxText's choice for long sequences on v5p) or less for short sequences, a
    multiple of 128 (the TPU lane width)."""
    return min(512, -(-t_len // 128) * 128)


def _kernel(t_len: int, heads: int, block: int, interpret: bool):
    """The MQA splash kernel for a causal [t_len, t_len] mask over ``heads`` query heads. Built per trace (it holds
    arrays; caching it across traces would leak tracers); the numpy mask analysis inside is cached by JAX."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([sa.CausalMask((t_len, t_len)) for _ in range(heads)])
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sa.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def attention(q, k, v, segment_ids, *, scale: float) -> jax.Array:
    """Causal self-attention with packed segments for natural-order rows.

    q [B, T, Hq, D], k [B, T, Hk, D], v [B, T, Hk, Dv], segment_ids [B, T] int32 -> [B, T, Hq, Dv] in q's dtype.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, hq, d = q.shape
    hk = k.shape[2]
    g = hq // hk
    block = block_size(t)
    tp = -(-t // block) * block
    pad = lambda a, value=0: a if tp == t else jnp.pad(a, [(0, 0), (0, tp - t)] + [(0, 0)] * (a.ndim - 2),
                                                       constant_values=value)
    seg = pad(segment_ids.astype(jnp.int32), -1)
    # [B, T, Hq, D] -> [B, Hk, G, T, D]: query head h uses key/value head h // G (as in every backend)
    qg = jnp.moveaxis(pad(q * jnp.asarray(scale, q.dtype)).reshape(b, tp, hk, g, d), 1, 3)
    kh, vh = jnp.moveaxis(pad(k), 1, 2), jnp.moveaxis(pad(v), 1, 2)  # [B, Hk, T, D]
    kernel = _kernel(tp, g, block, target_lib.current_target().interpret)

    def one(q_, k_, v_, s_):  # q_ [G, T, D], k_ [T, D], v_ [T, Dv], s_ [T]
        return kernel(q_, k_, v_, segment_ids=sa.SegmentIds(q=s_, kv=s_))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_head, in_axes=(0, 0, 0, 0))(qg, kh, vh, seg)  # [B, Hk, G, T, Dv]
    out = jnp.moveaxis(out, 3, 1).reshape(b, tp, hq, v.shape[-1])
    return out[:, :t].astype(q.dtype)
