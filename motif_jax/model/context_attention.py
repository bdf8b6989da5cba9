"""Context-parallel attention: the length axis is sharded over the ``context`` mesh axis (see
:mod:`motif_jax.parallel.context` for the strategy selector and the load-balanced layout).

Everything in the decoder except attention works token by token, so with the sequence split over ``context`` only
attention needs keys and values from other shards. Two strategies (``--mesh.context-strategy``):

``all_gather``
    Each shard all-gathers K, V and their segment ids / positions over ``context`` and attends with its local
    queries (``xla`` or ``blockwise``). K/V memory per device is that of the full sequence (small next to
    the activations at 64K: [T, kv_heads, head_dim]); the backward's transpose is a reduce-scatter of dK/dV.
    With ``cudnn`` or ``splash``, which mask by token index and need whole natural-order sequences, the shards
    exchange heads instead (all-to-all of q, k, v and the output; :func:`_heads_local`).

``ring``
    K/V blocks travel around the ring of ``context`` devices with ``ppermute``; each step computes one block of
    flash attention and merges it with an online softmax (log-sum-exp weights). Only one remote K/V block is held
    at a time. A ``custom_vjp`` runs the backward as a second ring in which dK/dV accumulators travel with their
    blocks and return to their owner, so gradients are exact and no [T, S] residual is kept.

Masks come from (segment id, position) pairs (see :mod:`motif_jax.model.attention`), so both strategies support
packed sequences, GQA and differential attention (value width 2 x head_dim) unchanged, and any token order.
The model routes here (``Attention.__call__``) when the active mesh has a ``context`` axis larger than 1 and there
is no KV cache.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from motif_kernels.attention_layout import natural_runs
from motif_jax.config import DEFAULT_LOGICAL_RULES
from motif_jax.model import attention as attn_lib
from motif_jax.parallel import rules as rules_lib
from motif_jax.parallel.context import (
    CONTEXT_AXIS,
    STRATEGIES,
    active_strategy,
    inverse_permutation,
    load_balance_permutation,
)

__all__ = ["context_parallel_attention"]


# ---------------------------------------------------------------------------------------------------------------------
# Strategies (bodies run inside shard_map: every array is the local shard)
# ---------------------------------------------------------------------------------------------------------------------


def _all_gather_local(q, k, v, qs, ks, qp, kp, *, impl, scale, block_q, block_kv):
    gather = functools.partial(lax.all_gather, axis_name=CONTEXT_AXIS, axis=1, tiled=True)
    k, v, ks, kp = gather(k), gather(v), gather(ks), gather(kp)
    return attn_lib.attend(q, k, v, qs, ks, qp, kp, impl=impl, scale=scale, block_q=block_q, block_kv=block_kv)


def _heads_local(q, k, v, qs, ks, qp, kp, *, n, impl, scale, block_q, block_kv):
    """all_gather strategy for kernels that mask by token index (cudnn, splash): exchange heads, not K/V.

    An all-to-all over ``context`` turns the [B, T/C, H, D] shards into [B, T, H/C, D] (every device holds the whole
    sequence for 1/C of the heads, Ulysses-style), the load-balanced layout is undone when the rows are in it (the
    kernels need natural order; any other layout is left as is and the kernel's own check sends it to blockwise),
    the kernel runs as ordinary self-attention, and a second all-to-all brings [B, T/C, H, Dv] back. Per device
    this holds q, k, v and the output at their local size, never the full-sequence K/V of the gather.
    """
    hq, hk = q.shape[2], k.shape[2]
    if hk % n and n % hk == 0 and hq % n == 0:
        # fewer key/value heads than devices: each one serves n / hk devices' query heads (GQA keeps the pairing:
        # query head h still meets key/value head h // (hq / hk)); the repeat's transpose sums their gradients
        k, v = jnp.repeat(k, n // hk, axis=2), jnp.repeat(v, n // hk, axis=2)
    elif hq % n or hk % n:
        raise attn_lib.AttentionBackendError(
            f"attention_impl={impl!r} under context parallelism exchanges heads between the {n} context devices: "
            f"the query heads ({hq}) and key/value heads ({hk}) each device holds must be divisible by "
            f"--mesh.context {n} (change --mesh.context or --mesh.tensor, or use --model.attention-impl blockwise)"
        )
    to_heads = functools.partial(lax.all_to_all, axis_name=CONTEXT_AXIS, split_axis=2, concat_axis=1, tiled=True)
    gather = functools.partial(lax.all_gather, axis_name=CONTEXT_AXIS, axis=1, tiled=True)
    q, k, v = to_heads(q), to_heads(k), to_heads(v)
    seg, pos = gather(qs), gather(qp)
    del ks, kp  # self-attention: the keys' rows are the queries' rows
    t = seg.shape[1]
    to_bal = None
    if t % (2 * n) == 0:
        perm = load_balance_permutation(t, n)
        inv = inverse_permutation(perm)
        balanced = natural_runs(seg[:, inv], pos[:, inv]).natural & ~natural_runs(seg, pos).natural
        ident = jnp.arange(t, dtype=jnp.int32)
        to_nat, to_bal = jnp.where(balanced, inv, ident), jnp.where(balanced, perm, ident)
        take = lambda x: jnp.take(x, to_nat, axis=1)
        q, k, v, seg, pos = take(q), take(k), take(v), take(seg), take(pos)
    out = attn_lib.attend(q, k, v, seg, seg, pos, pos, impl=impl, scale=scale, block_q=block_q, block_kv=block_kv)
    if to_bal is not None:
        out = jnp.take(out, to_bal, axis=1)
    return lax.all_to_all(out, CONTEXT_AXIS, split_axis=1, concat_axis=2, tiled=True)


# Kernels that mask by token index: under context parallelism they run on whole, natural-order sequences.
_INDEX_MASKED = ("cudnn", "splash")


def _ring_perm(n: int) -> list[tuple[int, int]]:
    return [(j, (j + 1) % n) for j in range(n)]


def _merge(o, lse, ob, lseb):
    """Online-softmax merge of normalised partial outputs o [B,T,Hk,G,Dv] with log-sum-exps lse [B,Hk,G,T]."""
    lse_new = jnp.logaddexp(lse, lseb)
    w_old = jnp.moveaxis(jnp.exp(lse - lse_new), 3, 1)[..., None]
    w_new = jnp.moveaxis(jnp.exp(lseb - lse_new), 3, 1)[..., None]
    return o * w_old + ob * w_new, lse_new


def _ring_forward(q, k, v, qs, ks, qp, kp, n, scale, bq, bk):
    """Grouped, padded local shards -> (out [B,T,Hk,G,Dv] f32 normalised, lse [B,Hk,G,T] f32)."""
    perm = _ring_perm(n)
    o, lse = attn_lib._flash_forward(q, k, v, qs, ks, qp, kp, scale, bq, bk)  # the local block first

    def step(carry, _):
        o, lse, kv = carry
        nxt = tuple(lax.ppermute(x, CONTEXT_AXIS, perm) for x in kv)  # issued before the compute: overlappable
        ob, lseb = attn_lib._flash_forward(q, *nxt[:2], qs, nxt[2], qp, nxt[3], scale, bq, bk)
        o, lse = _merge(o, lse, ob, lseb)
        return (o, lse, nxt), None

    (o, lse, _), _ = lax.scan(step, (o, lse, (k, v, ks, kp)), None, length=n - 1)
    return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _ring(q, k, v, qs, ks, qp, kp, n, scale, bq, bk):
    return _ring_forward(q, k, v, qs, ks, qp, kp, n, scale, bq, bk)[0]


def _ring_fwd(q, k, v, qs, ks, qp, kp, n, scale, bq, bk):
    out, lse = _ring_forward(q, k, v, qs, ks, qp, kp, n, scale, bq, bk)
    return out, (q, k, v, qs, ks, qp, kp, out, lse)


def _ring_bwd(n, scale, bq, bk, res, d_out):
    """Second ring: each K/V block travels with its dK/dV accumulator; after n hops both are home again.

    With the final log-sum-exp and output, p = exp(s - lse) of every block is its exact share of the softmax, so
    the blockwise backward of each (local queries, visiting block) pair gives that block's exact contributions.
    """
    q, k, v, qs, ks, qp, kp, out, lse = res
    f32 = jnp.float32
    qf, do = q.astype(f32), d_out.astype(f32)
    perm = _ring_perm(n)

    def block_grads(kv):
        kb, vb, ksb, kpb = kv
        dq, dk, dv = attn_lib._flash_bwd(scale, bq, bk, (qf, kb.astype(f32), vb.astype(f32), qs, ksb, qp, kpb,
                                                          out, lse), do)[:3]
        return dq, dk, dv

    def step(carry, _):
        dq, kv, dkv = carry
        dq_b, dk_b, dv_b = block_grads(kv)
        dkv = (dkv[0] + dk_b, dkv[1] + dv_b)
        kv = tuple(lax.ppermute(x, CONTEXT_AXIS, perm) for x in kv)
        dkv = tuple(lax.ppermute(x, CONTEXT_AXIS, perm) for x in dkv)
        return (dq + dq_b, kv, dkv), None

    dkv0 = (jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
    (dq, kv, dkv), _ = lax.scan(step, (jnp.zeros(q.shape, f32), (k, v, ks, kp), dkv0), None, length=n - 1)
    dq_b, dk_b, dv_b = block_grads(kv)  # the last visiting block: its gradients take the final hop home
    dk = lax.ppermute(dkv[0] + dk_b, CONTEXT_AXIS, perm)
    dv = lax.ppermute(dkv[1] + dv_b, CONTEXT_AXIS, perm)
    return (dq + dq_b).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _ring_local(q, k, v, qs, ks, qp, kp, *, n, scale, block_q, block_kv):
    b, t, hq, _ = q.shape
    hk, dv = k.shape[2], v.shape[-1]
    bq, bk = min(block_q, t), min(block_kv, t)
    tp, sp = -(-t // bq) * bq, -(-t // bk) * bk
    pad = attn_lib._pad_to
    out = _ring(
        pad(attn_lib._group(q, hk), tp, 1, 0),
        pad(k, sp, 1, 0),
        pad(v, sp, 1, 0),
        pad(qs, tp, 1, -2),  # padded queries / keys match nothing real (as in blockwise_attention)
        pad(ks, sp, 1, -1),
        pad(qp, tp, 1, 0),
        pad(kp, sp, 1, 0),
        n,
        scale,
        bq,
        bk,
    )
    return out[:, :t].reshape(b, t, hq, dv).astype(q.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


def _axes_for(name: str, rules, mesh, exclude: set[str]) -> tuple[str, ...]:
    spec = rules_lib.logical_to_spec((name,), rules, mesh.axis_names)[0]
    axes = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
    return tuple(a for a in axes if a not in exclude)


def _size(mesh, axes) -> int:
    shape = dict(mesh.shape)
    return math.prod(shape[a] for a in axes)


def context_parallel_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    *,
    strategy: str | None = None,
    impl: str = "xla",
    scale: float | None = None,
    block_q: int = 512,
    block_kv: int = 512,
    mesh: Any = None,
) -> jax.Array:
    """Attention with the length axis sharded over ``context``; same contract as ``model.attention.attend``.

    q: [B, T, Hq, D]; k: [B, T, Hk, D]; v: [B, T, Hk, Dv]; segment ids / positions [B, T] (global arrays, self
    attention: queries and keys share the length axis). ``strategy``: "all_gather" or "ring" (default: the one
    selected with :func:`context_strategy`). ``mesh``: default the active mesh. Batch stays split over the
    ``batch`` rule's axes and heads over the ``heads`` rule's axes (where they divide); the shard_map is manual
    over every mesh axis, so nothing inside is left to the partitioner.
    """
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or CONTEXT_AXIS not in mesh.axis_names:
        raise ValueError("context_parallel_attention needs an active mesh with a 'context' axis (jax.set_mesh)")
    strategy = strategy or active_strategy()
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown context strategy {strategy!r}; choose one of {STRATEGIES}")
    n = dict(mesh.shape)[CONTEXT_AXIS]
    b, t, hq, d = q.shape
    hk = k.shape[2]
    if k.shape[1] != t:
        raise ValueError(f"context parallelism needs self-attention (same length for q and k); got {t} vs {k.shape[1]}")
    if t % n:
        raise ValueError(f"sequence length {t} is not divisible by the context axis ({n}); change --mesh.context")
    scale = 1.0 / math.sqrt(d) if scale is None else scale

    rules = rules_lib.active_rules() or DEFAULT_LOGICAL_RULES
    batch_axes = _axes_for("batch", rules, mesh, {CONTEXT_AXIS})
    head_axes = _axes_for("heads", rules, mesh, {CONTEXT_AXIS, *batch_axes})
    while batch_axes and b % _size(mesh, batch_axes):
        batch_axes = batch_axes[:-1]
    while head_axes and (hq % _size(mesh, head_axes) or hk % _size(mesh, head_axes)):
        head_axes = head_axes[:-1]
    bspec = batch_axes or None
    hspec = head_axes or None
    heads = P(bspec, CONTEXT_AXIS, hspec, None)
    tokens = P(bspec, CONTEXT_AXIS)

    impl = attn_lib.resolve_impl(impl, q.dtype)
    if strategy == "all_gather" and impl in _INDEX_MASKED:
        body = functools.partial(_heads_local, n=n, impl=impl, scale=scale, block_q=block_q, block_kv=block_kv)
    elif strategy == "all_gather":
        body = functools.partial(_all_gather_local, impl=impl, scale=scale, block_q=block_q, block_kv=block_kv)
    else:
        body = functools.partial(_ring_local, n=n, scale=scale, block_q=block_q, block_kv=block_kv)
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(heads, heads, heads, tokens, tokens, tokens, tokens),
        out_specs=heads,
        # The blockwise kernels' scans start from fresh (device-invariant) zeros; varying-axis tracking would reject
        # those carries. Every input is split over the axes it varies on, so the transpose needs no psum.
        check_vma=False,
    )
    return fn(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)


