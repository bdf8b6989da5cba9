"""Pallas forward kernel of the LM-head loss (see motif_kernels/lm_head.py for the API and the math).

The grid is (token blocks of ``bt``, vocab slices): each program loops over the vocab blocks of ``bv`` columns
of its slice; each logit tile [bt, bv] is built by a loop over depth blocks of ``bk`` (f32 accumulation) and
folded at once into the running (max, sum exp, entropy sum, target logit): the logits never leave the kernel.
Outputs are per-slice partial statistics (m, l, s, t), merged like vocab shards, so finalisation, vocab
sharding and the (xla) backward are shared with the xla path. Tiles come from ``motif_kernels.lm_head_tiles``.

On CPU it runs in interpret mode (a scan over the grid, ~1 ms a step: tiny shapes only). On GPU it lowers
through Pallas's Triton lowering (deprecated since JAX 0.11, still the lowering of a plain pallas_call in
0.12; lowered for sm_90 from a CPU host by the tests, never run on a GPU here). Block sizes are powers of two
(Triton's rule; interpret mode does not check it). Why not Mosaic GPU yet: docs/kernels.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from motif_kernels.lm_head_tiles import KernelTiles, merge_splits

_MASK_VALUE = -1e30
_F32 = jnp.float32


def _pow2_at_most(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def _fit_block(n: int, block: int, floor: int = 16) -> int:
    """A power-of-two block for an axis of n: at most ``block`` (and not much above n); the largest one
    >= ``floor`` that divides n when there is one (no padding copy), else ``block`` itself."""
    block = min(_pow2_at_most(block), max(pl.next_power_of_2(n), floor))
    b = block
    while b >= floor:
        if n % b == 0:
            return b
        b //= 2
    return block


def _kernel(x_ref, w_ref, y_ref, bias_ref, m_ref, l_ref, s_ref, t_ref, *, bv, bk, nv, nk, with_entropy):
    """One (token block i, vocab slice j) program: x [bt, D], w [D, nv * bv] (slice j), y [bt], bias [nv * bv];
    writes the slice's partial (m, l, s, t) [1, bt]."""
    bt = x_ref.shape[0]
    y = y_ref[...]
    col0 = pl.program_id(1) * (nv * bv)  # global index of the slice's first column (targets are global ids)

    def vocab_step(j, carry):
        m, l, s, t = carry
        v0 = pl.multiple_of(j * bv, bv)

        def depth_step(k, acc):
            k0 = pl.multiple_of(k * bk, bk)
            xk = x_ref[:, pl.ds(k0, bk)]
            wk = w_ref[pl.ds(k0, bk), pl.ds(v0, bv)]
            return acc + lax.dot_general(xk, wk, (((1,), (0,)), ((), ())), preferred_element_type=_F32)

        z = lax.fori_loop(0, nk, depth_step, jnp.zeros((bt, bv), _F32))
        z = z + bias_ref[pl.ds(v0, bv)][None, :]  # 0 for real columns, -1e30 for padding
        cols = col0 + v0 + lax.broadcasted_iota(jnp.int32, (bt, bv), 1)
        t = t + jnp.sum(jnp.where(cols == y[:, None], z, 0.0), axis=1)
        m_new = jnp.maximum(m, jnp.max(z, axis=1))
        alpha = jnp.exp(m - m_new)
        d = z - m_new[:, None]
        e = jnp.exp(d)
        if with_entropy:
            s = alpha * (s + (m - m_new) * l) + jnp.sum(d * e, axis=1)
        l = alpha * l + jnp.sum(e, axis=1)
        return m_new, l, s, t

    zeros = jnp.zeros((bt,), _F32)
    m, l, s, t = lax.fori_loop(0, nv, vocab_step, (zeros + _MASK_VALUE, zeros, zeros, zeros))
    m_ref[...] = m[None]
    l_ref[...] = l[None]
    s_ref[...] = s[None]
    t_ref[...] = t[None]


def _pad_to(a, axis: int, size: int):
    if a.shape[axis] == size:
        return a
    pads = [(0, 0)] * a.ndim
    pads[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, pads)


def _fit_splits(num_blocks: int, splits: int) -> int:
    """The largest divisor of the vocab block count that is <= splits: whole slices, no padding for them."""
    for d in range(min(splits, num_blocks), 0, -1):
        if num_blocks % d == 0:
            return d
    return 1


def stats(x, w, y, valid, *, tiles: KernelTiles, interpret: bool, with_entropy: bool = True):
    """Per-token (m, l, s, t) [T] f32 over the columns of w.

    x [T, D], w [D, V], y [T] int32 (ids relative to w's first column; others never match), valid: number
    of real columns of w (int, traced scalar, or None for all). The grid is (token blocks, vocab slices); the
    slices' partial statistics are merged afterwards (``lm_head_tiles.merge_splits``). Axes are zero-padded to
    block multiples when the chosen power-of-two blocks do not divide them (a copy; none for the usual
    power-of-two-rich shapes).
    """
    t_len, d = x.shape
    v_len = w.shape[1]
    bt = _fit_block(t_len, tiles.block_t, floor=16)
    bv = _fit_block(v_len, tiles.block_v, floor=16)
    bk = _fit_block(d, tiles.block_d, floor=16)
    tp, vp, dp = (pl.cdiv(n, b) * b for n, b in ((t_len, bt), (v_len, bv), (d, bk)))
    splits = _fit_splits(vp // bv, tiles.vocab_splits)
    nv = vp // bv // splits  # vocab blocks per slice
    xp = _pad_to(_pad_to(x, 0, tp), 1, dp)
    wp = _pad_to(_pad_to(w, 0, dp), 1, vp)
    yp = _pad_to(y.astype(jnp.int32), 0, tp)
    limit = v_len if valid is None else jnp.minimum(valid, v_len)
    bias = jnp.where(jnp.arange(vp) < limit, 0.0, _MASK_VALUE).astype(_F32)

    kernel = functools.partial(_kernel, bv=bv, bk=bk, nv=nv, nk=dp // bk, with_entropy=with_entropy)
    part_spec = pl.BlockSpec((1, bt), lambda i, j: (j, i))
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        compiler_params = plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    out = pl.pallas_call(
        kernel,
        grid=(tp // bt, splits),
        in_specs=[
            pl.BlockSpec((bt, dp), lambda i, j: (i, 0)),
            pl.BlockSpec((dp, nv * bv), lambda i, j: (0, j)),
            pl.BlockSpec((bt,), lambda i, j: (i,)),
            pl.BlockSpec((nv * bv,), lambda i, j: (j,)),
        ],
        out_specs=[part_spec] * 4,
        out_shape=[jax.ShapeDtypeStruct((splits, tp), _F32)] * 4,
        interpret=interpret,
        compiler_params=compiler_params,
        name="lm_head_stats",
    )(xp, wp, yp, bias)
    m, l, s, t = merge_splits(*(o[:, :t_len] for o in out), with_entropy)
    return m, l, s, t
