"""Memory-efficient LM-head loss: per-token log p(y), entropy and cross-entropy from hidden states.

The logits z = x @ w ([T, V]) are never held in memory. Every backend computes, per token, the online
log-sum-exp statistics over vocab blocks; the backward pass recomputes each logit tile. Design notes and
measurements: docs/kernels.md and docs/benchmarks.md ("LM-head loss").

Shapes: x [T, D] hidden states (flatten batch dims first), w [D, V] output projection, targets [T] int.

Backends (``impl``):
  xla     pure JAX (scan over token chunks x vocab blocks); portable, and the oracle for the others.
  pallas  Pallas forward kernel (interpreted on CPU, Triton lowering on GPU) + the xla backward.
  triton  Triton forward kernel through jax-triton (CUDA/ROCm only) + the xla backward.
  auto    xla everywhere until a GPU measurement shows a kernel beats it (see docs/kernels.md).

Every choice (backend, tiles, interpret mode) follows the platform the program is lowered for
(``motif_kernels.target.current_target``), not the host's default backend, so lowering for CUDA or TPU from a CPU
host gives the program that platform runs.

This module imports jax only (never motif_jax).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from motif_kernels import target as target_lib
from motif_kernels.lm_head_tiles import KernelTiles, choose_tiles

__all__ = [
    "BackendUnavailableError",
    "IMPLS",
    "default_blocks",
    "linear_cross_entropy",
    "linear_cross_entropy_sums",
    "linear_log_probs",
    "resolve_impl",
    "sharded_linear_log_probs",
]

IMPLS = ("auto", "xla", "pallas", "triton")

# Logit given to padded vocab columns. exp(_MASK_VALUE - anything finite) is exactly 0 in f32, so padded
# columns get probability 0 exactly as with -inf, but (z - m) * exp(z - m) and the online rescaling stay
# finite (no inf - inf = nan) even when a whole block or a whole vocab shard is padding.
_MASK_VALUE = -1e30
_F32 = jnp.float32

# Tile sizes of the xla path per platform: (token_chunk, vocab_block). CPU: tuned on a 2-core EPYC
# (scripts/bench_loss.py); GPU/TPU: untested guesses sized so one f32 tile is 128 MiB / 64 MiB.
_XLA_BLOCKS = {"cpu": (1024, 4096), "gpu": (4096, 8192), "tpu": (2048, 8192)}


class BackendUnavailableError(RuntimeError):
    """The requested ``impl`` cannot run in this process; the message says why and what to use instead."""


# --------------------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static configuration of one call (hashable: it is a nondiff argument of the custom_vjp)."""

    impl: str  # resolved backend of the forward: "xla" | "pallas" | "triton"
    token_chunk: int  # xla tiles (forward for xla, backward for every impl)
    vocab_block: int
    kernel_tiles: KernelTiles  # tiles of the pallas/triton forward (motif_kernels.lm_head_tiles)
    valid_vocab: int | None  # global count of real vocab columns; None: every column is real
    with_entropy: bool
    interpret: bool  # pallas interpret mode (CPU)
    mesh: Mesh | None = None
    token_axes: tuple[str, ...] = ()
    vocab_axis: str | None = None


def _platform() -> str:
    """The platform of the program being traced (explicit target, else the mesh's devices, else this process's)."""
    return target_lib.current_target().platform


def default_blocks(platform: str | None = None) -> tuple[int, int]:
    """Default (token_chunk, vocab_block) of the xla path on ``platform`` (default: the current target's)."""
    return _XLA_BLOCKS.get(platform or _platform(), _XLA_BLOCKS["cpu"])


def resolve_impl(impl: str = "auto") -> str:
    """The backend ``impl`` runs on for the current target; raises BackendUnavailableError if it cannot run there.

    ``auto`` is ``xla`` on every platform: on GPU the xla path's matmuls are cuBLAS GEMMs and neither kernel has
    been measured against it on a GPU yet (scripts/gpu_check.py does; docs/kernels.md)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    platform = _platform()
    if impl == "auto":
        return "xla"
    if impl == "pallas" and platform not in ("cpu", "gpu"):
        raise BackendUnavailableError(
            f"impl='pallas' supports CPU (interpret mode) and GPU (Triton lowering); the program is lowered for "
            f"{platform!r}, where this kernel has no Mosaic lowering. Use impl='xla' (or 'auto')."
        )
    if impl == "triton":
        from motif_kernels import lm_head_triton

        reason = lm_head_triton.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(
                f"impl='triton' cannot run here: {reason}. Use impl='xla' (portable, the default of "
                f"impl='auto' off GPU) or impl='pallas' (interpreted on CPU, Pallas Triton lowering on GPU)."
            )
    return impl


def _check_inputs(x, w, targets, valid_vocab, token_chunk, vocab_block) -> None:
    if getattr(x, "ndim", None) != 2:
        raise ValueError(
            f"x must be [T, D] hidden states (flatten batch dims with x.reshape(-1, D)); got shape "
            f"{getattr(x, 'shape', None)}"
        )
    if getattr(w, "ndim", None) != 2:
        raise ValueError(f"w must be the [D, V] output projection; got shape {getattr(w, 'shape', None)}")
    if x.shape[1] != w.shape[0]:
        raise ValueError(
            f"x and w disagree on the hidden size D: x is [T, D] = {tuple(x.shape)} but w is [D, V] = "
            f"{tuple(w.shape)} (an embedding table [V, D] must be transposed: pass w.T)"
        )
    for name, arr in (("x", x), ("w", w)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got dtype {arr.dtype}")
    if getattr(targets, "shape", None) != (x.shape[0],):
        raise ValueError(
            f"targets must have shape [T] = ({x.shape[0]},) matching x, got {getattr(targets, 'shape', None)}"
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if x.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"x and w must be non-empty, got x {tuple(x.shape)}, w {tuple(w.shape)}")
    if valid_vocab is not None and not (isinstance(valid_vocab, int) and 1 <= valid_vocab <= w.shape[1]):
        raise ValueError(f"valid_vocab must be an int in [1, V={w.shape[1]}], got {valid_vocab!r}")
    for name, val in (("token_chunk", token_chunk), ("vocab_block", vocab_block)):
        if val is not None and not (isinstance(val, int) and val > 0):
            raise ValueError(f"{name} must be a positive int or None, got {val!r}")


def _make_plan(x, w, targets, *, with_entropy, impl, token_chunk, vocab_block, valid_vocab,
               mesh=None, token_axes=(), vocab_axis=None, kernel_tiles=None) -> _Plan:
    _check_inputs(x, w, targets, valid_vocab, token_chunk, vocab_block)
    resolved = resolve_impl(impl)
    target = target_lib.current_target()
    chunk, block = default_blocks(target.platform)
    tiles = kernel_tiles
    if resolved == "xla":
        chunk, block = token_chunk or chunk, vocab_block or block
    elif tiles is None:  # the sizes given apply to the kernel's tiles; its backward keeps the xla defaults
        t_local, v_local = x.shape[0], w.shape[1]
        if mesh is not None:  # the kernel sees one device's tokens and vocabulary slice
            t_local //= math.prod(mesh.shape[a] for a in token_axes)
            v_local //= mesh.shape[vocab_axis]
        tiles = choose_tiles(t_local, v_local, target.platform, target.compute_capability,
                             block_t=token_chunk, block_v=vocab_block)
    if valid_vocab is not None and valid_vocab >= w.shape[1]:
        valid_vocab = None
    return _Plan(
        impl=resolved, token_chunk=chunk, vocab_block=block, kernel_tiles=tiles or KernelTiles(),
        valid_vocab=valid_vocab, with_entropy=bool(with_entropy),
        interpret=target.interpret, mesh=mesh, token_axes=tuple(token_axes), vocab_axis=vocab_axis,
    )


# --------------------------------------------------------------------------------------------------------
# the xla path


def _for_blocks(n: int, block: int, body, carry):
    """Runs ``carry = body(carry, start, width)`` over [0, n) in blocks: full blocks under lax.scan (start
    traced), the remainder once with a static start, so nothing is padded (no copy of x or w)."""
    block = min(block, n)
    nfull, rem = divmod(n, block)
    if nfull == 1:
        carry = body(carry, 0, block)
    elif nfull > 1:
        carry, _ = lax.scan(lambda c, i: (body(c, i * block, block), None), carry,
                            jnp.arange(nfull, dtype=jnp.int32))
    if rem:
        carry = body(carry, nfull * block, rem)
    return carry


def _logits(xc, wj):
    """[C, D] @ [D, B] -> [C, B] f32: matmul inputs stay in the model dtype, accumulation in f32."""
    return lax.dot_general(xc, wj, (((1,), (0,)), ((), ())), preferred_element_type=_F32)


def _mask_padding(z, vstart, valid):
    """Masks columns vstart + j >= valid (``valid`` static, traced, or None for no padding)."""
    if valid is None:
        return z
    cols = vstart + lax.broadcasted_iota(jnp.int32, z.shape, 1)
    return jnp.where(cols < valid, z, _MASK_VALUE)


def _target_logit(xc, w, yc):
    """z[t, y_t] for the targets that fall in this (local) w; 0 for the others. A [C, D] gather."""
    v = w.shape[1]
    inside = (yc >= 0) & (yc < v)
    wy = jnp.take(w, jnp.clip(yc, 0, v - 1), axis=1)  # [D, C]
    t = jnp.einsum("cd,dc->c", xc, wy, preferred_element_type=_F32)
    return jnp.where(inside, t, 0.0)


def _online_update(state, z, with_entropy):
    """Folds one logit tile z [C, B] into the running (m, l, s): m the max, l = sum exp(z - m),
    s = sum (z - m) exp(z - m). Keeping s relative to m makes H = log l - s / l cancellation-free."""
    m, l, s = state
    m_new = jnp.maximum(m, jnp.max(z, axis=1))
    alpha = jnp.exp(m - m_new)
    d = z - m_new[:, None]
    e = jnp.exp(d)
    if with_entropy:
        s = alpha * (s + (m - m_new) * l) + jnp.sum(d * e, axis=1)
    l = alpha * l + jnp.sum(e, axis=1)
    return m_new, l, s


def _xla_stats(x, w, y, valid, plan: _Plan):
    """Per-token (m, l, s, t) [T] f32 over the columns of this w: scan over token chunks, inner loop over
    vocab blocks with an online log-sum-exp. Peak extra memory: a few [token_chunk, vocab_block] f32 tiles."""
    t_len, v_len = x.shape[0], w.shape[1]

    def chunk(carry, start, width):
        xc = lax.dynamic_slice_in_dim(x, start, width, 0)
        yc = lax.dynamic_slice_in_dim(y, start, width, 0)

        def block(state, vstart, vwidth):
            wj = lax.dynamic_slice_in_dim(w, vstart, vwidth, 1)
            z = _mask_padding(_logits(xc, wj), vstart, valid)
            return _online_update(state, z, plan.with_entropy)

        init = (jnp.full((width,), _MASK_VALUE, _F32), jnp.zeros((width,), _F32), jnp.zeros((width,), _F32))
        m, l, s = _for_blocks(v_len, plan.vocab_block, block, init)
        t = _target_logit(xc, w, yc)
        return tuple(lax.dynamic_update_slice_in_dim(acc, val, start, 0)
                     for acc, val in zip(carry, (m, l, s, t)))

    init = tuple(jnp.zeros((t_len,), _F32) for _ in range(4))
    return _for_blocks(t_len, plan.token_chunk, chunk, init)


def _xla_bwd(x, w, y, valid, lse, c0, cb, g_lp, plan: _Plan, dx_dtype):
    """dX [T, D] (dx_dtype) and dW [D, V] (w.dtype) for dz = g_lp * onehot(y) - p * (c0 + cb * z).

    Recomputes each logit tile. The loop order carries the smaller f32 accumulator: vocab blocks outer
    (each dW block finished and written once, dX accumulated in f32) when T <= V, else token chunks outer
    (each dX chunk written once, dW accumulated in f32)."""
    t_len, d = x.shape
    v_len = w.shape[1]
    in_dtype = x.dtype

    def tile(xc, wj, vstart, yc, lsec, c0c, cbc, glc):
        z = _mask_padding(_logits(xc, wj), vstart, valid)
        p = jnp.exp(z - lsec[:, None])
        coef = c0c[:, None] if cbc is None else c0c[:, None] + cbc[:, None] * z
        hit = lax.broadcasted_iota(jnp.int32, z.shape, 1) == (yc - vstart)[:, None]
        dz = jnp.where(hit, glc[:, None], 0.0) - p * coef
        return dz.astype(in_dtype)

    def tok_slices(start, width):
        sl = lambda a: None if a is None else lax.dynamic_slice_in_dim(a, start, width, 0)
        return sl(x), sl(y), sl(lse), sl(c0), sl(cb), sl(g_lp)

    def dx_part(dz, wj):  # [C, B] x [D, B] -> [C, D]
        return lax.dot_general(dz, wj, (((1,), (1,)), ((), ())), preferred_element_type=_F32)

    def dw_part(xc, dz):  # [C, D] x [C, B] -> [D, B]
        return lax.dot_general(xc, dz, (((0,), (0,)), ((), ())), preferred_element_type=_F32)

    if t_len <= v_len:
        def vblock(carry, vstart, vwidth):
            dx_acc, dw_out = carry
            wj = lax.dynamic_slice_in_dim(w, vstart, vwidth, 1)

            def tchunk(c, start, width):
                dx_acc, dwj = c
                xc, yc, lsec, c0c, cbc, glc = tok_slices(start, width)
                dz = tile(xc, wj, vstart, yc, lsec, c0c, cbc, glc)
                dxc = lax.dynamic_slice_in_dim(dx_acc, start, width, 0) + dx_part(dz, wj)
                return lax.dynamic_update_slice_in_dim(dx_acc, dxc, start, 0), dwj + dw_part(xc, dz)

            dx_acc, dwj = _for_blocks(t_len, plan.token_chunk, tchunk, (dx_acc, jnp.zeros((d, vwidth), _F32)))
            return dx_acc, lax.dynamic_update_slice_in_dim(dw_out, dwj.astype(w.dtype), vstart, 1)

        dx, dw = _for_blocks(v_len, plan.vocab_block, vblock,
                             (jnp.zeros((t_len, d), _F32), jnp.zeros((d, v_len), w.dtype)))
        return dx.astype(dx_dtype), dw

    def tchunk(carry, start, width):
        dw_acc, dx_out = carry
        xc, yc, lsec, c0c, cbc, glc = tok_slices(start, width)

        def vblock(c, vstart, vwidth):
            dw_acc, dxc = c
            wj = lax.dynamic_slice_in_dim(w, vstart, vwidth, 1)
            dz = tile(xc, wj, vstart, yc, lsec, c0c, cbc, glc)
            dwj = lax.dynamic_slice_in_dim(dw_acc, vstart, vwidth, 1) + dw_part(xc, dz)
            return lax.dynamic_update_slice_in_dim(dw_acc, dwj, vstart, 1), dxc + dx_part(dz, wj)

        dw_acc, dxc = _for_blocks(v_len, plan.vocab_block, vblock, (dw_acc, jnp.zeros((width, d), _F32)))
        return dw_acc, lax.dynamic_update_slice_in_dim(dx_out, dxc.astype(dx_dtype), start, 0)

    dw, dx = _for_blocks(t_len, plan.token_chunk, tchunk,
                         (jnp.zeros((d, v_len), _F32), jnp.zeros((t_len, d), dx_dtype)))
    return dx, dw.astype(w.dtype)


# --------------------------------------------------------------------------------------------------------
# backend dispatch and the custom_vjp


def _local_stats(x, w, y, valid, plan: _Plan):
    """(m, l, s, t) over this w's columns with the forward backend of the plan."""
    if plan.impl == "pallas":
        from motif_kernels import lm_head_pallas

        return lm_head_pallas.stats(x, w, y, valid, tiles=plan.kernel_tiles, interpret=plan.interpret,
                                    with_entropy=plan.with_entropy)
    if plan.impl == "triton":
        from motif_kernels import lm_head_triton

        return lm_head_triton.stats(x, w, y, valid, tiles=plan.kernel_tiles, with_entropy=plan.with_entropy)
    return _xla_stats(x, w, y, valid, plan)


def _finalize(m, l, s, t, with_entropy):
    """lse, E[z], log p(y), H from the statistics (s is relative to m)."""
    log_l = jnp.log(l)
    lse = m + log_l
    logp = t - lse
    if not with_entropy:
        return lse, None, logp, None
    mean_shift = s / l  # E[z] - m
    return lse, m + mean_shift, logp, log_l - mean_shift


def _bwd_coefficients(plan, ez, g_lp, g_h, g_lse):
    """dz = g_lp * onehot - p * (a + b (z - E[z])), a = g_lp - g_lse, b = g_H, as c0 + cb * z."""
    a = g_lp - g_lse
    if not plan.with_entropy:
        return a, None
    return a - g_h * ez, g_h


def _shard_offset_and_valid(plan: _Plan, v_local: int):
    """Global index of this shard's first vocab column and its count of real columns (None: all)."""
    offset = lax.axis_index(plan.vocab_axis) * v_local
    valid = None if plan.valid_vocab is None else jnp.clip(plan.valid_vocab - offset, 0, v_local)
    return offset, valid


def _sharded_forward(x, w, y, plan: _Plan):
    def local(x, w, y):
        v_local = w.shape[1]
        offset, valid = _shard_offset_and_valid(plan, v_local)
        m, l, s, t = _local_stats(x, w, y - offset, valid, plan)
        # Combine the per-shard statistics: the max is a constant shift, so pmax needs no derivative.
        m_all = lax.pmax(m, plan.vocab_axis)
        alpha = jnp.exp(m - m_all)
        l_all = lax.psum(alpha * l, plan.vocab_axis)
        s_all = lax.psum(alpha * (s + (m - m_all) * l), plan.vocab_axis) if plan.with_entropy else s
        t_all = lax.psum(t, plan.vocab_axis)
        return _finalize(m_all, l_all, s_all, t_all, plan.with_entropy)

    tok = P(plan.token_axes)
    ent_spec = tok if plan.with_entropy else None
    # check_vma=False: the collectives are explicit here and nothing differentiates through this shard_map
    # (the custom_vjp sits outside it), so the loop carries need no varying-axis annotations.
    return jax.shard_map(
        local, mesh=plan.mesh, check_vma=False,
        in_specs=(P(plan.token_axes, None), P(None, plan.vocab_axis), tok),
        out_specs=(tok, ent_spec, tok, ent_spec),
    )(x, w, y)


def _sharded_backward(x, w, y, lse, c0, cb, g_lp, plan: _Plan):
    def local(x, w, y, lse, c0, cb, g_lp):
        offset, valid = _shard_offset_and_valid(plan, w.shape[1])
        dx, dw = _xla_bwd(x, w, y - offset, valid, lse, c0, cb, g_lp, plan, _F32)
        dx = lax.psum(dx, plan.vocab_axis).astype(x.dtype)  # dX partials over the vocab shards
        if plan.token_axes:
            dw = lax.psum(dw.astype(_F32), plan.token_axes).astype(w.dtype)  # tokens are split there
        return dx, dw

    tok = P(plan.token_axes)
    cb_spec = None if cb is None else tok
    return jax.shard_map(
        local, mesh=plan.mesh, check_vma=False,
        in_specs=(P(plan.token_axes, None), P(None, plan.vocab_axis), tok, tok, tok, cb_spec, tok),
        out_specs=(P(plan.token_axes, None), P(None, plan.vocab_axis)),
    )(x, w, y, lse, c0, cb, g_lp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(x, w, y, plan: _Plan):
    """(log p(y) [T], entropy [T] or None, lse [T]), all f32; differentiable in x and w."""
    return _fused_fwd(x, w, y, plan)[0]


def _fused_fwd(x, w, y, plan: _Plan):
    if plan.mesh is not None:
        lse, ez, logp, ent = _sharded_forward(x, w, y, plan)
    else:
        m, l, s, t = _local_stats(x, w, y, plan.valid_vocab, plan)
        lse, ez, logp, ent = _finalize(m, l, s, t, plan.with_entropy)
    return (logp, ent, lse), (x, w, y, lse, ez)


def _fused_bwd(plan: _Plan, res, cts):
    x, w, y, lse, ez = res
    g_lp, g_h, g_lse = cts
    c0, cb = _bwd_coefficients(plan, ez, g_lp, g_h, g_lse)
    if plan.mesh is not None:
        dx, dw = _sharded_backward(x, w, y, lse, c0, cb, g_lp, plan)
    else:
        dx, dw = _xla_bwd(x, w, y, plan.valid_vocab, lse, c0, cb, g_lp, plan, x.dtype)
    return dx, dw, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _prepare(x, w, targets, plan: _Plan):
    dtype = jnp.result_type(x.dtype, w.dtype)
    x, w, targets = x.astype(dtype), w.astype(dtype), targets.astype(jnp.int32)
    if plan.mesh is None:
        return x, w, targets, plan
    # On a mesh with Explicit axes shard_map requires inputs already laid out as its in_specs; reshard
    # here, outside the custom_vjp, so autodiff moves the cotangents back to the caller's layout.
    explicit = {n for n, t in zip(plan.mesh.axis_names, plan.mesh.axis_types) if t == AxisType.Explicit}
    if explicit:
        keep = lambda names: tuple(n for n in names if n in explicit) or None
        tok, voc = keep(plan.token_axes), keep((plan.vocab_axis,))
        put = lambda a, *spec: jax.reshard(a, NamedSharding(plan.mesh, P(*spec)))
        x, w, targets = put(x, tok, None), put(w, None, voc), put(targets, tok)
    return x, w, targets, plan


# --------------------------------------------------------------------------------------------------------
# public API


def linear_log_probs(
    x: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    *,
    with_entropy: bool = False,
    impl: str = "auto",
    token_chunk: int | None = None,
    vocab_block: int | None = None,
    valid_vocab: int | None = None,
    kernel_tiles: KernelTiles | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Per-token log p(targets) and (optionally) entropy of softmax(x @ w), without materialising [T, V].

    Args:
      x: [T, D] hidden states (float; flatten batch dims first).
      w: [D, V] output projection (same or promotable dtype).
      targets: [T] int token ids in [0, valid_vocab).
      with_entropy: also return the entropy H = lse - E[z] of each token's distribution.
      impl: "auto" | "xla" | "pallas" | "triton" (see the module docstring).
      token_chunk, vocab_block: tile sizes (None: per-platform defaults). For pallas/triton they are the
        kernel's token and vocab tiles (powers of two on GPU), the rest from ``motif_kernels.lm_head_tiles``.
      kernel_tiles: the pallas/triton kernel's whole tile configuration (overrides the table and the two
        sizes above; vocab slices included).
      valid_vocab: columns >= valid_vocab of w are padding (vocab padded for sharding) and get probability 0.

    Returns:
      (logp [T] f32, entropy [T] f32 or None). Differentiable in x and w (custom_vjp); cotangents may flow
      into both outputs at once.
    """
    plan = _make_plan(x, w, targets, with_entropy=with_entropy, impl=impl, token_chunk=token_chunk,
                      vocab_block=vocab_block, valid_vocab=valid_vocab, kernel_tiles=kernel_tiles)
    logp, ent, _ = _fused(*_prepare(x, w, targets, plan))
    return logp, ent


def sharded_linear_log_probs(
    x: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    *,
    mesh: Mesh,
    token_axes: str | tuple[str, ...] = ("data",),
    vocab_axis: str = "tensor",
    with_entropy: bool = False,
    impl: str = "auto",
    token_chunk: int | None = None,
    vocab_block: int | None = None,
    valid_vocab: int | None = None,
    kernel_tiles: KernelTiles | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """`linear_log_probs` with w split over the vocab (``vocab_axis``) and tokens over ``token_axes``.

    Call it on global arrays (inside or outside jit). Each device computes (max, sum exp, entropy sum,
    target logit) for its vocab slice; pmax/psum over the vocab axis combine them (4 floats a token). The
    backward keeps dW local to its vocab shard (summed over the token axes) and sums the dX partials over
    the vocab axis. Values and gradients equal the unsharded ones. ``valid_vocab`` counts global columns.
    """
    token_axes = (token_axes,) if isinstance(token_axes, str) else tuple(token_axes)
    plan = _make_plan(x, w, targets, with_entropy=with_entropy, impl=impl, token_chunk=token_chunk,
                      vocab_block=vocab_block, valid_vocab=valid_vocab, mesh=mesh,
                      token_axes=token_axes, vocab_axis=vocab_axis, kernel_tiles=kernel_tiles)
    _check_mesh(plan, x.shape[0], w.shape[1])
    logp, ent, _ = _fused(*_prepare(x, w, targets, plan))
    return logp, ent


def _check_mesh(plan: _Plan, t_len: int, v_len: int) -> None:
    names = plan.mesh.shape
    for axis in (*plan.token_axes, plan.vocab_axis):
        if axis not in names:
            raise ValueError(f"mesh has no axis {axis!r}; its axes are {tuple(names)}")
    if plan.vocab_axis in plan.token_axes:
        raise ValueError(f"vocab_axis {plan.vocab_axis!r} cannot also be a token axis")
    n_tok = 1
    for axis in plan.token_axes:
        n_tok *= names[axis]
    if t_len % n_tok:
        raise ValueError(f"T={t_len} tokens must be divisible by the token axes {plan.token_axes} ({n_tok})")
    if v_len % names[plan.vocab_axis]:
        raise ValueError(
            f"V={v_len} must be divisible by the {plan.vocab_axis!r} axis size {names[plan.vocab_axis]}: pad "
            f"w with zero columns and pass valid_vocab={v_len}"
        )


def linear_cross_entropy_sums(
    x: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None,
    *,
    z_loss: float = 0.0,
    impl: str = "auto",
    token_chunk: int | None = None,
    vocab_block: int | None = None,
    valid_vocab: int | None = None,
    mesh: Mesh | None = None,
    token_axes: str | tuple[str, ...] = ("data",),
    vocab_axis: str = "tensor",
    kernel_tiles: KernelTiles | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Un-normalised masked cross-entropy: (numerator, denominator, aux).

    numerator = sum_t mask_t * (-log p(y_t) + z_loss * lse_t^2), denominator = sum_t mask_t (f32). Sum both
    over micro-batches (or hosts) and divide once to normalise by the global token count. Tokens with
    mask 0 contribute nothing to the value or the gradients (their targets may be anything, e.g. -1).
    With ``mesh`` given, w is split over ``vocab_axis`` as in `sharded_linear_log_probs`.
    aux: nll_sum, z_sum (sum of mask * lse^2), lse_sum, num_tokens, lse_max (f32 scalars, no gradient).
    """
    if mask is None:
        mask = jnp.ones(getattr(targets, "shape", ()), _F32)
    if getattr(mask, "shape", None) != getattr(targets, "shape", None):
        raise ValueError(f"mask must have the shape of targets {getattr(targets, 'shape', None)}, got "
                         f"{getattr(mask, 'shape', None)}")
    mask = mask.astype(_F32)
    kw = dict(with_entropy=False, impl=impl, token_chunk=token_chunk, vocab_block=vocab_block,
              valid_vocab=valid_vocab, kernel_tiles=kernel_tiles)
    if mesh is not None:
        token_axes = (token_axes,) if isinstance(token_axes, str) else tuple(token_axes)
        plan = _make_plan(x, w, targets, **kw, mesh=mesh, token_axes=token_axes, vocab_axis=vocab_axis)
        _check_mesh(plan, x.shape[0], w.shape[1])
    else:
        plan = _make_plan(x, w, targets, **kw)
    # Masked tokens: any id (e.g. -100) becomes 0 so they are ordinary, finite rows with zero weight.
    safe_targets = jnp.where(mask > 0, targets, 0)
    logp, _, lse = _fused(*_prepare(x, w, safe_targets, plan))
    nll_sum = -jnp.sum(mask * logp)
    z_sum = jnp.sum(mask * jnp.square(lse))
    numerator = nll_sum + z_loss * z_sum if z_loss else nll_sum
    aux = {
        "nll_sum": lax.stop_gradient(nll_sum),
        "z_sum": lax.stop_gradient(z_sum),
        "lse_sum": lax.stop_gradient(jnp.sum(mask * lse)),
        "num_tokens": jnp.sum(mask),
        "lse_max": lax.stop_gradient(jnp.max(jnp.where(mask > 0, lse, -jnp.inf))),
    }
    return numerator, jnp.sum(mask), aux


def linear_cross_entropy(
    x: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    z_loss: float = 0.0,
    impl: str = "auto",
    token_chunk: int | None = None,
    vocab_block: int | None = None,
    valid_vocab: int | None = None,
    mesh: Mesh | None = None,
    token_axes: str | tuple[str, ...] = ("data",),
    vocab_axis: str = "tensor",
    kernel_tiles: KernelTiles | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
    """Masked mean cross-entropy of softmax(x @ w) against targets, plus z_loss * mean(lse^2).

    Returns (loss, aux): loss = (sum mask*nll + z_loss * sum mask*lse^2) / max(sum mask, 1);
    aux: nll (mean NLL), nll_sum, num_tokens, z_loss (z_loss * mean lse^2), lse_mean, lse_max.
    See `linear_cross_entropy_sums` for the un-normalised sums (global token-count normalisation).
    """
    num, den, aux = linear_cross_entropy_sums(
        x, w, targets, mask, z_loss=z_loss, impl=impl, token_chunk=token_chunk, vocab_block=vocab_block,
        valid_vocab=valid_vocab, mesh=mesh, token_axes=token_axes, vocab_axis=vocab_axis,
        kernel_tiles=kernel_tiles)
    n = jnp.maximum(den, 1.0)
    loss = num / n
    out = {
        "nll": aux["nll_sum"] / n,
        "nll_sum": aux["nll_sum"],
        "num_tokens": aux["num_tokens"],
        "z_loss": z_loss * aux["z_sum"] / n,
        "lse_mean": aux["lse_sum"] / n,
        "lse_max": aux["lse_max"],
    }
    return loss, out
