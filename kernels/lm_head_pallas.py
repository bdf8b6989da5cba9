"""Pallas forward kernel of the LM-head loss (see kernels/lm_head.py for the API and the math).

One program per block of ``bt`` tokens. It loops over vocab blocks of ``bv`` columns; each logit tile
[bt, bv] is built by a loop over depth blocks of ``bk`` (f32 accumulation) and folded at once into the running
(max, sum exp, entropy sum, target logit): the logits never leave the kernel. Outputs are the per-token
statistics (m, l, s, t), the same as the xla path, so finalisation, vocab sharding and the (xla) backward
are shared.

On CPU it runs in interpret mode (a scan over the grid, ~1 ms a step: tiny shapes only). On GPU it lowers
through Pallas's Triton lowering (deprecated since JAX 0.11, still the lowering of a plain pallas_call in
0.12); that lowering is untested here. Block sizes are powers of two (Triton's rule; interpret mode does
not check it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

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
    bt = x_ref.shape[0]
    y = y_ref[...]

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
        cols = v0 + lax.broadcasted_iota(jnp.int32, (bt, bv), 1)
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
    m_ref[...] = m
    l_ref[...] = l
    s_ref[...] = s
    t_ref[...] = t


def _pad_to(a, axis: int, size: int):
    if a.shape[axis] == size:
        return a
    pads = [(0, 0)] * a.ndim
    pads[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, pads)


def stats(x, w, y, valid, *, blocks, interpret: bool, with_entropy: bool = True):
    """Per-token (m, l, s, t) [T] f32 over the columns of w.

    x [T, D], w [D, V], y [T] int32 (ids relative to w's first column; others never match), valid: number
    of real columns of w (int, traced scalar, or None for all). Axes are zero-padded to block multiples when
    the chosen power-of-two blocks do not divide them (a copy; none for the usual power-of-two-rich shapes).
    """
    t_len, d = x.shape
    v_len = w.shape[1]
    bt = _fit_block(t_len, blocks[0], floor=16)
    bv = _fit_block(v_len, blocks[1], floor=16)
    bk = _fit_block(d, blocks[2], floor=16)
    tp, vp, dp = (pl.cdiv(n, b) * b for n, b in ((t_len, bt), (v_len, bv), (d, bk)))
    xp = _pad_to(_pad_to(x, 0, tp), 1, dp)
    wp = _pad_to(_pad_to(w, 0, dp), 1, vp)
    yp = _pad_to(y.astype(jnp.int32), 0, tp)
    limit = v_len if valid is None else jnp.minimum(valid, v_len)
    bias = jnp.where(jnp.arange(vp) < limit, 0.0, _MASK_VALUE).astype(_F32)

    kernel = functools.partial(_kernel, bv=bv, bk=bk, nv=vp // bv, nk=dp // bk, with_entropy=with_entropy)
    tok_spec = pl.BlockSpec((bt,), lambda i: (i,))
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        compiler_params = plgpu.CompilerParams(num_warps=4, num_stages=3)
    out = pl.pallas_call(
        kernel,
        grid=(tp // bt,),
        in_specs=[
            pl.BlockSpec((bt, dp), lambda i: (i, 0)),
            pl.BlockSpec((dp, vp), lambda i: (0, 0)),
            tok_spec,
            pl.BlockSpec((vp,), lambda i: (0,)),
        ],
        out_specs=[tok_spec] * 4,
        out_shape=[jax.ShapeDtypeStruct((tp,), _F32)] * 4,
        interpret=interpret,
        compiler_params=compiler_params,
        name="lm_head_stats",
    )(xp, wp, yp, bias)
    return tuple(o[:t_len] for o in out)
