"""cuDNN flash attention through XLA's cuDNN fMHA custom call: causal and packed, without a dense mask.

The model's rule (query i sees key j iff same segment and ``position[i] >= position[j]``) is what cuDNN computes
with its *causal* mask when the row is in natural order (``motif_kernels.attention_layout``: each segment a contiguous
run whose positions count 0, 1, 2, ..., what packing produces). :func:`layout` checks that at run time and
describes the runs; the caller (``motif_jax.model.attention``) uses this kernel only when the check holds and the
exact blockwise kernel otherwise, so no layout is ever computed wrongly. Three calls are possible:

- ``single``: every row is one segment (plus trailing padding): ``PADDING_CAUSAL`` with per-row lengths; a value
  head wider than the key head (differential attention's ``[V1|V2]``, 256 vs 128) runs in one call on Hopper
  (cuDNN >= 9.10 "MLA").
- ``packed``: rows hold several segments: cuDNN's ragged (THD) layout, one virtual sequence per run (padding runs
  included, so every row is written), ``PADDING_CAUSAL`` inside each. JAX derives the ragged offsets of O and V
  from the query / key head width, so a wider value head is computed as equal-width calls (exact) rather than
  trusted to offsets nobody could check without a GPU (``scripts/gpu_check.py`` probes it).
- ``bias``: queries and keys of different lengths (a KV cache): an additive ``[B, 1, T, S]`` bias, ``NO_MASK``
  (generation only, where T is a prompt bucket or 1).

The custom calls are bound directly (JAX's private ``fused_attention_stablehlo`` primitives, pinned by
``jax<0.12.1``), not through ``jax.nn.dot_product_attention``: the public path checks cuDNN's version and the
device's compute capability on the *host*, so it cannot be lowered for an H100 from a CPU machine. The checks
that matter are done here against the lowering target (``motif_kernels.target``). Memory: operands and results are
O(T) per head (the softmax statistics are [B * runs, heads, T] f32); nothing is O(T^2).
This module imports jax only.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from motif_kernels import target as target_lib
from motif_kernels.attention_layout import natural_runs

__all__ = ["MAX_SEGMENTS", "Layout", "attention", "bias_attention", "layout", "unsupported_reason"]

# Static bound on segments (runs, padding included) per row for the packed call: its softmax statistics are
# [B * MAX_SEGMENTS, heads, T] f32 (16 runs, 32 heads at T = 8K: 67 MB). Rows with more use the blockwise kernel.
MAX_SEGMENTS = 16


def _fa():
    from jax._src.cudnn import fused_attention_stablehlo

    return fused_attention_stablehlo


class Layout(NamedTuple):
    """What :func:`layout` found: ``natural`` (bool []), ``single`` (bool []: every row one segment + padding),
    per-row run lengths and starts ``[B, M]`` (-1 past the last run) and the first run's length ``[B]``."""

    natural: jax.Array
    single: jax.Array
    lengths: jax.Array
    starts: jax.Array
    first_length: jax.Array


def layout(segment_ids: jax.Array, positions: jax.Array, max_segments: int = MAX_SEGMENTS) -> Layout:
    """[B, T] (segment ids, positions) -> :class:`Layout`: natural order (``motif_kernels.attention_layout``) with at
    most ``max_segments`` runs a row (padding runs count), and the runs' lengths and starts for the packed call."""
    runs = natural_runs(segment_ids, positions)
    t = segment_ids.shape[1]
    natural = runs.natural & jnp.all(runs.n_runs <= max_segments)
    counts = jax.vmap(lambda r: jax.ops.segment_sum(jnp.ones((t,), jnp.int32), r, num_segments=max_segments))(
        runs.run)
    starts = jnp.cumsum(counts, axis=1) - counts
    used = jnp.arange(max_segments)[None, :] < runs.n_runs[:, None]
    # single: the row is one real run from token 0, then (optionally) one padding run
    last_is_padding = ~runs.real[:, -1]
    single = jnp.all(runs.real[:, 0] & ((runs.n_runs == 1) | ((runs.n_runs == 2) & last_is_padding)))
    return Layout(natural, single, jnp.where(used, counts, -1), jnp.where(used, starts, -1), counts[:, 0])


def unsupported_reason(q_shape, k_shape, v_shape, dtype, target: target_lib.Target | None = None) -> str | None:
    """Why cuDNN fMHA cannot run these shapes for the target (None when it can). q [B, T, Hq, D],
    k [B, S, Hk, D], v [B, S, Hk, Dv]."""
    target = target or target_lib.current_target()
    if target.platform != "gpu":
        return f"it needs a CUDA GPU target and the program is lowered for {target.platform!r}"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN flash attention takes bfloat16 or float16 inputs, got {jnp.dtype(dtype)} (--model.dtype)"
    hopper = (target.compute_capability or (0, 0)) >= (9, 0)
    limit = 256 if hopper else 128
    d, dv = q_shape[-1], v_shape[-1]
    if d % 8 or d > limit:
        return f"head_dim {d} must be a multiple of 8 and <= {limit} on this GPU"
    if dv != d and (dv % d or dv // d * d != dv):
        return f"value width {dv} must equal head_dim {d} or be a multiple of it"
    if q_shape[2] % k_shape[2]:
        return f"query heads {q_shape[2]} must be a multiple of key/value heads {k_shape[2]}"
    return None


def _wide_value_ok(d: int, dv: int, target: target_lib.Target) -> bool:
    """One call with a value head wider than the key head: Hopper or newer (cuDNN >= 9.10), widths <= 256."""
    return dv != d and dv <= 256 and (target.compute_capability or (0, 0)) >= (9, 0)


# ---------------------------------------------------------------------------------------------------------------------
# The custom calls (forward / backward primitives) and a custom_vjp around them
# ---------------------------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _fmha(q, k, v, bias, q_len, kv_len, offsets, scale, mask):
    out = _call_fwd(q, k, v, bias, q_len, kv_len, offsets, scale, mask, training=False)[0]
    return _mask_rows(out, q_len, offsets)


def _params(scale, mask, has_bias):
    fa = _fa()
    return dict(scale=scale, seed=0, dropout_rate=0.0, variadic_args=(has_bias, False),
                mask_type=getattr(fa.MaskType, mask), layout=fa.AttentionLayout.BTNH.value,
                sliding_window_length=None, score_mod=None)


def _operands(q, bias, q_len, kv_len, offsets):
    empty = jnp.zeros((0,), q.dtype)  # JAX's placeholder for an absent operand
    opt = lambda a: empty if a is None else a
    q_off, kv_off = (None, None) if offsets is None else offsets
    return opt(bias), opt(q_len), opt(kv_len), opt(q_off), opt(kv_off), empty, empty


def _mask_rows(x, lengths, offsets):
    """Zeros rows t >= lengths[b] of x [B, T, H, D] in the single (per-row length) call: cuDNN does not write
    rows past a sequence's length, and an unwritten buffer may hold anything (NaN included)."""
    if lengths is None or offsets is not None:
        return x
    keep = jnp.arange(x.shape[1])[None, :] < lengths[:, None]
    return jnp.where(keep[:, :, None, None], x, jnp.zeros((), x.dtype))


def _call_fwd(q, k, v, bias, q_len, kv_len, offsets, scale, mask, training):
    return _fa()._dot_product_attention_fwd_p_wrapper.bind(
        q, k, v, *_operands(q, bias, q_len, kv_len, offsets), is_training=training,
        **_params(scale, mask, bias is not None))


def _fmha_fwd(q, k, v, bias, q_len, kv_len, offsets, scale, mask):
    out, stats = _call_fwd(q, k, v, bias, q_len, kv_len, offsets, scale, mask, training=True)
    out = _mask_rows(out, q_len, offsets)
    return out, (q, k, v, bias, q_len, kv_len, offsets, out, stats)


def _fmha_bwd(scale, mask, res, d_out):
    q, k, v, bias, q_len, kv_len, offsets, out, stats = res
    d_out = _mask_rows(d_out.astype(out.dtype), q_len, offsets)
    dq, dk, dv = _fa()._dot_product_attention_bwd_p_wrapper.bind(
        q, k, v, *_operands(q, bias, q_len, kv_len, offsets), stats, out, d_out,
        **_params(scale, mask, bias is not None))[:3]
    dq = _mask_rows(dq, q_len, offsets)
    dk, dv = _mask_rows(dk, kv_len, offsets), _mask_rows(dv, kv_len, offsets)
    return dq, dk, dv, None, None, None, None  # nothing flows into the mask, lengths or offsets


_fmha.defvjp(_fmha_fwd, _fmha_bwd)


def _split_value(fn, q, k, v):
    """fn(q, k, v_part) over equal-width value parts (exact: attention is linear in V)."""
    d, dv = q.shape[-1], v.shape[-1]
    parts = [fn(q, k, v[..., i:i + d]) for i in range(0, dv, d)]
    return jnp.concatenate(parts, axis=-1)


def attention(q, k, v, lay: Layout, *, scale: float, packed: bool) -> jax.Array:
    """Causal self-attention of natural-order rows. q [B, T, Hq, D], k [B, T, Hk, D], v [B, T, Hk, Dv] (bf16 or
    fp16); ``lay`` from :func:`layout`; ``packed`` selects the ragged call (else every row must be ``single``).
    Returns [B, T, Hq, Dv]; rows that are padding are unspecified (zero in the single call)."""
    target = target_lib.current_target()
    d, dv = q.shape[-1], v.shape[-1]
    if not packed:
        n = lay.first_length.astype(jnp.int32)
        one = lambda q_, k_, v_: _fmha(q_, k_, v_, None, n, n, None, scale, "PADDING_CAUSAL")
        return one(q, k, v) if dv == d or _wide_value_ok(d, dv, target) else _split_value(one, q, k, v)
    # ragged: run lengths [B, M] and offsets [B, M + 1] (-1 where unused); JAX flattens them per cuDNN's layout
    lengths = lay.lengths.astype(jnp.int32)
    offsets = jnp.concatenate([lay.starts, jnp.full((lay.starts.shape[0], 1), -1, jnp.int32)], axis=1)
    ragged = lambda q_, k_, v_: _fmha(q_, k_, v_, None, lengths, lengths, (offsets, offsets), scale,
                                      "PADDING_CAUSAL")
    return ragged(q, k, v) if dv == d else _split_value(ragged, q, k, v)


def bias_attention(q, k, v, allowed: jax.Array, *, scale: float) -> jax.Array:
    """Attention under an explicit [B, T, S] boolean mask, as a [B, 1, T, S] additive bias (KV-cache decoding:
    T != S). q [B, T, Hq, D], k [B, S, Hk, D], v [B, S, Hk, Dv] -> [B, T, Hq, Dv]."""
    # the bias of a masked pair: JAX's large finite negative for the dtype (-1e30 would be -inf in fp16, and a
    # fully masked row would then be NaN)
    bias = jnp.where(allowed, jnp.zeros((), q.dtype), _fa().get_large_negative_number(q.dtype))[:, None]
    one = lambda q_, k_, v_: _fmha(q_, k_, v_, bias, None, None, None, scale, "NO_MASK")
    d, dv = q.shape[-1], v.shape[-1]
    return one(q, k, v) if dv == d or _wide_value_ok(d, dv, target_lib.current_target()) else \
        _split_value(one, q, k, v)
