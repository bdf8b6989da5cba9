"""Scaled dot-product attention kernels behind one switch: ``xla``, ``blockwise``, ``cudnn``, ``splash``, ``auto``.

All take the same arguments and compute the same function: grouped-query attention where a query may attend to a
key iff both lie in the same segment and the key's position is not later than the query's. Masking by
(segment id, position) rather than by index covers causal attention, packed rows, left-padded generation prompts,
a KV cache and permuted (load-balanced) context-parallel layouts with one rule. Segment id 0 marks padding: it only
ever matches other padding, so no real token sees it.

``cudnn`` (CUDA) and ``splash`` (TPU) mask by token index (causal) and segment: they are used for rows in
natural order (``motif_kernels.attention_layout``) and fall back to ``blockwise`` at run time otherwise, so every
backend computes the same function. Which kernel ``auto`` means, and whether a kernel can run, follows the lowering
target (``motif_kernels.target``), never the host's default backend.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from motif_kernels import attention_cudnn, attention_splash
from motif_kernels import target as target_lib
from motif_kernels.attention_layout import natural_runs
from motif_jax.config import DEFAULT_LOGICAL_RULES
from motif_jax.parallel import rules as rules_lib

_MASKED = -1e30  # finite: a fully masked block must not turn the online softmax into NaN


class AttentionBackendError(RuntimeError):
    """The requested attention implementation cannot run on this platform."""


def _mask(q_seg, kv_seg, q_pos, kv_pos):
    """[B, T], [B, S] -> [B, 1, 1, T, S] boolean (broadcast over kv heads and groups)."""
    allowed = (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_pos[:, :, None] >= kv_pos[:, None, :])
    return allowed[:, None, None]


def _group(q, num_kv_heads):
    b, t, h, d = q.shape
    return q.reshape(b, t, num_kv_heads, h // num_kv_heads, d)


def xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, scale=None):
    """Reference attention, materialising [B, Hq, T, S] logits.

    q: [B, T, Hq, D]; k: [B, S, Hk, D]; v: [B, S, Hk, Dv] (Dv may differ from D); segment ids / positions:
    [B, T] and [B, S] int32. Returns [B, T, Hq, Dv] in q's dtype. Softmax statistics in fp32.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qg = _group(q, k.shape[2])
    s = jnp.einsum("bthgd,bshd->bhgts", qg, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions), s, _MASKED)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgts,bshd->bthgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    b, t, hk, g, dv = o.shape
    return o.reshape(b, t, hk * g, dv).astype(q.dtype)


def cached_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, scale=None):
    """Attention over a head-major KV cache, as decoding reads it: no transpose or copy of the cache per step.

    q: [B, T, Hv, C, G, D]: G query heads for each of the Hv * C key heads, C key heads per value head (1 for
    GQA; 2 for differential attention, whose signal and noise keys share one [V1 | V2] value); k: [B, Hv * C, S, D];
    v: [B, Hv, S, Dv]; segment ids / positions as in :func:`xla_attention`. Returns [B, T, Hv, C, G, Dv] in fp32.
    Both einsums keep the cache's (batch, head) dimensions leading, so XLA feeds the cache buffers to the dots as
    they are (a [B, S, H, D] cache is transposed whole per layer and step: most of a decode step's time on CPU).
    """
    b, t, hv, c, g, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = k.reshape(b, hv, c, k.shape[2], d)  # free: heads are major
    # Each dot in XLA's own order (batch, lhs rows, contracting / rhs columns): a different output order makes XLA:CPU
    # transpose the operands instead; only the small query and output are moved.
    qm = jnp.transpose(q, (0, 2, 3, 4, 1, 5)).reshape(b, hv, c, g * t, d)
    s = jnp.einsum("bvcmd,bvcsd->bvcms", qm, k, preferred_element_type=jnp.float32) * scale
    s = s.reshape(b, hv, c, g, t, k.shape[3])
    s = jnp.where(_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions)[:, None], s, _MASKED)
    p = jax.nn.softmax(s, axis=-1).reshape(b, hv, c * g * t, k.shape[3])
    o = jnp.einsum("bvms,bvse->bvme", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return jnp.transpose(o.reshape(b, hv, c, g, t, v.shape[3]), (0, 4, 1, 2, 3, 5))


# ---------------------------------------------------------------------------------------------------------------------
# Blockwise (flash-style) attention in pure JAX: memory O(block_q * block_kv) per head, exact gradients through a
# custom VJP that recomputes each block's probabilities from the saved log-sum-exp (no [T, S] residuals).
# ---------------------------------------------------------------------------------------------------------------------


def _pad_to(x, length, axis, value):
    pad = length - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(x, block, axis=1):
    """Splits axis 1 into [num_blocks, ..., block, ...] with the block index leading (for scan/map)."""
    n = x.shape[axis] // block
    x = x.reshape(x.shape[:axis] + (n, block) + x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _unblocks(x, axis=1):
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :])


def _block_logits(qb, kb, qs, ks, qp, kp, scale):
    """qb [B, bq, Hk, G, D], kb [B, bk, Hk, D] -> masked fp32 logits [B, Hk, G, bq, bk] and the mask."""
    s = jnp.einsum("bthgd,bshd->bhgts", qb, kb, preferred_element_type=jnp.float32) * scale
    m = _mask(qs, ks, qp, kp)
    return jnp.where(m, s, _MASKED), m


def _tie(*xs):
    """Makes the segment ids / positions depend on q for JAX's tracing.

    Inside the scanned layer stack the masks depend only on the (layer-invariant) segment ids and positions, so
    JAX's scan partial evaluation would hoist them out of the layer loop and precompute the mask of every
    (query block, key block) pair at once: [T/bq, T/bk, B, H, bq, bk] booleans (128 GiB at 64K). The barrier ties
    them to q, which changes per layer, so each mask stays a per-block temporary.
    """
    return jax.lax.optimization_barrier(xs)


def _flash_forward(q, k, v, qs, ks, qp, kp, scale, block_q, block_kv):
    """Padded, grouped inputs -> (out [B, T, Hk, G, Dv] f32, lse [B, Hk, G, T] f32)."""
    qs, ks, qp, kp, q = _tie(qs, ks, qp, kp, q)
    kb_all, vb_all = _blocks(k, block_kv), _blocks(v, block_kv)
    ksb, kpb = _blocks(ks, block_kv), _blocks(kp, block_kv)

    def one_q_block(args):
        qb, qsb, qpb = args
        b, bq, hk, g, _ = qb.shape
        dv = v.shape[-1]

        def step(carry, kv):
            m, l, acc = carry
            kb, vb, ksb_, kpb_ = kv
            s, mask = _block_logits(qb, kb, qsb, ksb_, qpb, kpb_, scale)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            l = l * alpha + p.sum(-1)
            pv = jnp.einsum("bhgts,bshd->bhgtd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
            acc = acc * alpha[..., None] + pv
            return (m_new, l, acc), None

        init = (
            jnp.full((b, hk, g, bq), _MASKED, jnp.float32),
            jnp.zeros((b, hk, g, bq), jnp.float32),
            jnp.zeros((b, hk, g, bq, dv), jnp.float32),
        )
        (m, l, acc), _ = jax.lax.scan(step, init, (kb_all, vb_all, ksb, kpb))
        l = jnp.maximum(l, 1e-30)  # only padding rows can see nothing
        out = acc / l[..., None]
        return jnp.moveaxis(out, 3, 1), m + jnp.log(l)  # [B, bq, Hk, G, Dv], [B, Hk, G, bq]

    outs, lses = jax.lax.map(one_q_block, (_blocks(q, block_q), _blocks(qs, block_q), _blocks(qp, block_q)))
    return _unblocks(outs), _unblocks(lses, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _flash(q, k, v, qs, ks, qp, kp, scale, block_q, block_kv):
    out, _ = _flash_forward(q, k, v, qs, ks, qp, kp, scale, block_q, block_kv)
    return out


def _flash_fwd(q, k, v, qs, ks, qp, kp, scale, block_q, block_kv):
    out, lse = _flash_forward(q, k, v, qs, ks, qp, kp, scale, block_q, block_kv)
    return out, (q, k, v, qs, ks, qp, kp, out, lse)


def _flash_bwd(scale, block_q, block_kv, res, d_out):
    q, k, v, qs, ks, qp, kp, out, lse = res
    qs, ks, qp, kp, q = _tie(qs, ks, qp, kp, q)
    delta = jnp.einsum("bthgd,bthgd->bhgt", d_out, out)  # rowsum(dO * O) [B, Hk, G, T]
    qb_all, dob_all = _blocks(q, block_q), _blocks(d_out, block_q)
    qsb, qpb = _blocks(qs, block_q), _blocks(qp, block_q)
    lseb, deltab = _blocks(lse, block_q, axis=3), _blocks(delta, block_q, axis=3)

    def one_kv_block(dq, kv):
        kb, vb, ksb_, kpb_ = kv

        def step(carry, qblk):
            dk, dv = carry
            qb, dob, qsb_, qpb_, lse_b, delta_b = qblk
            s, mask = _block_logits(qb, kb, qsb_, ksb_, qpb_, kpb_, scale)
            p = jnp.where(mask, jnp.exp(s - lse_b[..., None]), 0.0)  # [B, Hk, G, bq, bk]
            dv = dv + jnp.einsum("bhgts,bthgd->bshd", p, dob)
            dp = jnp.einsum("bthgd,bshd->bhgts", dob, vb.astype(jnp.float32))
            ds = p * (dp - delta_b[..., None]) * scale
            dk = dk + jnp.einsum("bhgts,bthgd->bshd", ds, qb.astype(jnp.float32))
            dq_blk = jnp.einsum("bhgts,bshd->bthgd", ds, kb.astype(jnp.float32))
            return (dk, dv), dq_blk

        init = (jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape, jnp.float32))
        (dk, dv), dq_blocks = jax.lax.scan(step, init, (qb_all, dob_all, qsb, qpb, lseb, deltab))
        return dq + _unblocks(dq_blocks), (dk, dv)

    kv = (_blocks(k, block_kv), _blocks(v, block_kv), _blocks(ks, block_kv), _blocks(kp, block_kv))
    dq, (dk, dv) = jax.lax.scan(one_kv_block, jnp.zeros(q.shape, jnp.float32), kv)
    return (
        dq.astype(q.dtype),
        _unblocks(dk).astype(k.dtype),
        _unblocks(dv).astype(v.dtype),
        None,
        None,
        None,
        None,
    )


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(
    q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, scale=None, block_q=512, block_kv=512
):
    """Flash-style attention in pure JAX (any platform, differentiable); same contract as :func:`xla_attention`.

    Memory is O(block_q * block_kv) per head for the logits instead of O(T * S). Every block is visited (no
    causal block skipping: masks come from positions, which may be permuted), so compute equals the dense version.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    b, t, hq, _ = q.shape
    s = k.shape[1]
    bq, bk = min(block_q, t), min(block_kv, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    # Padded queries get segment -2 and padded keys -1: they match nothing real and are sliced off / never seen.
    qg = _pad_to(_group(q, k.shape[2]), tp, 1, 0)
    out = _flash(
        qg,
        _pad_to(k, sp, 1, 0),
        _pad_to(v, sp, 1, 0),
        _pad_to(q_segment_ids, tp, 1, -2),
        _pad_to(kv_segment_ids, sp, 1, -1),
        _pad_to(q_positions, tp, 1, 0),
        _pad_to(kv_positions, sp, 1, 0),
        scale,
        bq,
        bk,
    )
    return out[:, :t].reshape(b, t, hq, v.shape[-1]).astype(q.dtype)


def _same_rows(q_segment_ids, kv_segment_ids, q_positions, kv_positions):
    """Self-attention: queries and keys carry the same (segment id, position) rows."""
    if q_segment_ids.shape != kv_segment_ids.shape:
        return jnp.asarray(False)
    return jnp.all(q_segment_ids == kv_segment_ids) & jnp.all(q_positions == kv_positions)


def cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, scale=None,
                    block_q=512, block_kv=512, max_segments=attention_cudnn.MAX_SEGMENTS):
    """cuDNN flash attention (``motif_kernels.attention_cudnn``) for a CUDA target; same contract as
    :func:`xla_attention`.

    Self-attention rows in natural order (``motif_kernels.attention_layout``: what packing produces) take cuDNN's causal
    mask, per-row lengths or its ragged packed layout (at most ``max_segments`` runs a row): no [T, S] mask or bias
    exists and the masked half of the causal square is skipped. Any other layout (permuted rows, more runs) takes
    the blockwise kernel, chosen at run time, so the result is always exact. Queries and keys of different lengths
    (a KV cache) use an additive [B, 1, T, S] bias (generation, where T is small).
    """
    reason = attention_cudnn.unsupported_reason(q.shape, k.shape, v.shape, q.dtype)
    if reason is not None:
        raise AttentionBackendError(
            f"attention_impl='cudnn' cannot run: {reason}. Use --model.attention-impl blockwise (any platform), "
            "splash (TPU) or auto."
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.shape[1] != k.shape[1]:
        allowed = _mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions)[:, 0, 0]  # [B, T, S]
        return attention_cudnn.bias_attention(q, k, v, allowed, scale=scale)
    lay = attention_cudnn.layout(q_segment_ids, q_positions, max_segments)
    fast = lay.natural & _same_rows(q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    args = (q, k, v)
    branches = [
        lambda q, k, v: blockwise_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                                            scale=scale, block_q=block_q, block_kv=block_kv),
        lambda q, k, v: attention_cudnn.attention(q, k, v, lay, scale=scale, packed=True),
        lambda q, k, v: attention_cudnn.attention(q, k, v, lay, scale=scale, packed=False),
    ]
    index = jnp.where(fast, jnp.where(lay.single, 2, 1), 0)
    return jax.lax.switch(index, branches, *args)


def splash_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, scale=None,
                     block_q=512, block_kv=512):
    """Splash attention (``motif_kernels.attention_splash``) for a TPU target (interpreted on CPU); same contract as
    :func:`xla_attention`. Natural-order self-attention rows take the causal, segment-aware splash kernel; any other
    layout (or a KV cache) takes the blockwise kernel, so the result is always exact."""
    reason = attention_splash.unsupported_reason(q.shape, k.shape)
    if reason is not None:
        raise AttentionBackendError(
            f"attention_impl='splash' cannot run: {reason}. Use --model.attention-impl blockwise, cudnn (GPU) or auto."
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    blockwise = functools.partial(blockwise_attention, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                  q_positions=q_positions, kv_positions=kv_positions, scale=scale, block_q=block_q,
                                  block_kv=block_kv)
    if q.shape[1] != k.shape[1]:
        return blockwise(q, k, v)
    fast = natural_runs(q_segment_ids, q_positions).natural & _same_rows(
        q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    kernel = lambda q, k, v, seg: attention_splash.attention(q, k, v, seg, scale=scale)
    return jax.lax.cond(fast, lambda q, k, v: _per_device(kernel, q, k, v, q_segment_ids),
                        lambda q, k, v: blockwise(q, k, v), q, k, v)


def _per_device(kernel, q, k, v, segment_ids):
    """Runs ``kernel(q, k, v, segment_ids)`` on each device's rows and heads: Pallas TPU kernels are not partitioned
    automatically, so under an (auto-sharded) mesh the call goes in a shard_map over the ``batch`` and ``heads``
    rules' axes (where they divide); inside a shard_map (context parallelism) or without a mesh it runs as is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh._any_axis_manual:
        return kernel(q, k, v, segment_ids)
    rules = rules_lib.active_rules() or DEFAULT_LOGICAL_RULES
    sizes = dict(mesh.shape)

    def axes(name, taken, divides):
        spec = rules_lib.logical_to_spec((name,), rules, mesh.axis_names)[0]
        out = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
        out = tuple(a for a in out if a not in taken)
        while out and any(n % math.prod(sizes[a] for a in out) for n in divides):
            out = out[:-1]
        return out

    batch = axes("batch", set(), (q.shape[0],))
    heads = axes("heads", set(batch), (q.shape[2], k.shape[2]))
    spec = P(batch or None, None, heads or None, None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec, P(batch or None, None)), out_specs=spec,
                         check_vma=False)(q, k, v, segment_ids)


IMPLS = ("xla", "blockwise", "cudnn", "splash", "auto")


def resolve_impl(impl: str, dtype) -> str:
    """``auto`` -> the kernel for the lowering target (``motif_kernels.target``): cudnn on a CUDA GPU (bf16/fp16
    inputs), splash on TPU, blockwise elsewhere; other names are returned unchanged."""
    if impl != "auto":
        return impl
    platform = target_lib.current_target().platform
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return "splash" if platform == "tpu" else "blockwise"


def attend(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, impl="xla", scale=None,
           block_q=512, block_kv=512):
    """Dispatches to the implementation named by ``impl`` (``--model.attention-impl``; ``auto`` per target)."""
    args = (q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    impl = resolve_impl(impl, q.dtype)
    if impl == "xla":
        return xla_attention(*args, scale=scale)
    if impl == "blockwise":
        return blockwise_attention(*args, scale=scale, block_q=block_q, block_kv=block_kv)
    if impl == "cudnn":
        return cudnn_attention(*args, scale=scale, block_q=block_q, block_kv=block_kv)
    if impl == "splash":
        return splash_attention(*args, scale=scale, block_q=block_q, block_kv=block_kv)
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLS}")
