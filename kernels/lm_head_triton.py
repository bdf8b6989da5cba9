"""Triton forward kernel of the LM-head loss through jax-triton (CUDA/ROCm GPUs only).

Same contract as `kernels.lm_head_pallas.stats`: per-token (m, l, s, t) over w's columns; the backward is
the shared xla one. jax-triton is an optional GPU extra (``pip install 'motif-jax[gpu]'``) and is imported
lazily: this module imports on any machine. `unavailable_reason` says why the kernel cannot run here.

Untested: no GPU was available where this was written (see docs/kernels.md).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import re

import jax
import jax.numpy as jnp

_MASK_VALUE = -1e30

# jax-triton releases known not to work with a jax release: (jax_triton <= this, jax >= that): why.
_KNOWN_INCOMPATIBLE = [
    ((0, 4, 1), (0, 12, 0),
     "jax-triton {jt} pairs with jax 0.11.x; with jax {jax} every triton_call fails while tracing "
     "(_triton_kernel_call_dce_rule() takes 2 positional arguments but 3 were given). Install jax 0.11.x "
     "with it, or a jax-triton release made for jax {jax}"),
]


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def _installed_version(dist: str) -> str | None:
    """The installed version of a distribution, or None (monkeypatched by the tests)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _backend() -> str:
    return jax.default_backend()


def unavailable_reason() -> str | None:
    """Why the Triton kernel cannot run in this process (all the reasons, '; '-joined), or None."""
    reasons = []
    backend = _backend()
    if backend not in ("gpu", "cuda", "rocm"):
        reasons.append(f"it needs a CUDA or ROCm GPU and this process's JAX backend is {backend!r}")
    jt_version = _installed_version("jax-triton")
    if jt_version is None or importlib.util.find_spec("jax_triton") is None:
        reasons.append("jax-triton is not installed (install the GPU extra: pip install 'motif-jax[gpu]')")
    else:
        jax_version = _installed_version("jax") or jax.__version__
        for jt_max, jax_min, why in _KNOWN_INCOMPATIBLE:
            if _version_tuple(jt_version) <= jt_max and _version_tuple(jax_version) >= jax_min:
                reasons.append(why.format(jt=jt_version, jax=jax_version))
        if importlib.util.find_spec("triton") is None:
            reasons.append("the triton package is not installed")
    return "; ".join(reasons) if reasons else None


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def lm_head_stats_kernel(
        x_ptr, w_ptr, y_ptr, bias_ptr,  # inputs: x [T, D], w [D, V] row-major, y [T] int32, bias [V] f32
        m_ptr, l_ptr, s_ptr, t_ptr,  # outputs: [T] f32 each
        T: tl.constexpr, D: tl.constexpr, V: tl.constexpr,
        BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
        ENTROPY: tl.constexpr, IEEE: tl.constexpr,
    ):
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        row_ok = rows < T
        rows64 = rows.to(tl.int64)  # T * D and D * V can pass 2**31
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
        m = tl.full((BT,), -1e30, tl.float32)  # literal: @triton.jit reads no plain globals
        l = tl.zeros((BT,), tl.float32)
        s = tl.zeros((BT,), tl.float32)
        t = tl.zeros((BT,), tl.float32)
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            col_ok = cols < V
            acc = tl.zeros((BT, BV), tl.float32)
            for k0 in range(0, D, BK):
                ks = k0 + tl.arange(0, BK)
                k_ok = ks < D
                xk = tl.load(x_ptr + rows64[:, None] * D + ks[None, :],
                             mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                wk = tl.load(w_ptr + ks.to(tl.int64)[:, None] * V + cols[None, :],
                             mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                if IEEE:
                    acc = tl.dot(xk, wk, acc, input_precision="ieee")
                else:
                    acc = tl.dot(xk, wk, acc)
            # bias: 0 for real columns, -1e30 for padding (and past V).
            z = acc + tl.load(bias_ptr + cols, mask=col_ok, other=-1e30)[None, :]
            t += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            alpha = tl.exp(m - m_new)
            d = z - m_new[:, None]
            e = tl.exp(d)
            if ENTROPY:
                s = alpha * (s + (m - m_new) * l) + tl.sum(d * e, axis=1)
            l = alpha * l + tl.sum(e, axis=1)
            m = m_new
        tl.store(m_ptr + rows, m, mask=row_ok)
        tl.store(l_ptr + rows, l, mask=row_ok)
        tl.store(s_ptr + rows, s, mask=row_ok)
        tl.store(t_ptr + rows, t, mask=row_ok)

    return lm_head_stats_kernel


def stats(x, w, y, valid, *, blocks, with_entropy: bool = True):
    """Per-token (m, l, s, t) [T] f32 over the columns of w (see lm_head_pallas.stats). No padding copies:
    out-of-range rows, columns and depth are masked in the loads."""
    import jax_triton as jt

    t_len, d = x.shape
    v_len = w.shape[1]
    bt, bv, bk = blocks
    for name, b in (("token", bt), ("vocab", bv), ("depth", bk)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"triton {name} block must be a power of two >= 16, got {b}")
    limit = v_len if valid is None else jnp.minimum(valid, v_len)
    bias = jnp.where(jnp.arange(v_len) < limit, 0.0, _MASK_VALUE).astype(jnp.float32)
    out_shape = [jax.ShapeDtypeStruct((t_len,), jnp.float32)] * 4
    return tuple(jt.triton_call(
        x, w, y.astype(jnp.int32), bias,
        kernel=_kernel(), out_shape=out_shape, grid=(-(-t_len // bt),),
        num_warps=4, num_stages=3,
        T=t_len, D=d, V=v_len, BT=bt, BV=bv, BK=bk,
        ENTROPY=bool(with_entropy), IEEE=bool(x.dtype == jnp.float32),
    ))
