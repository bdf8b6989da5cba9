"""Triton forward kernel of the LM-head loss through jax-triton (CUDA/ROCm GPUs only).

Same contract as `motif_kernels.lm_head_pallas.stats`: per-token (m, l, s, t) over w's columns; the backward is
the shared xla one. jax-triton is an optional GPU extra (``pip install 'motif-jax[gpu]'``) and is imported
lazily: this module imports on any machine. `unavailable_reason` says why the kernel cannot run here.

The grid is (token blocks, vocab slices) as in the Pallas kernel. ``make gpu-check-build`` lowers and compiles it
for sm_90 and assembles the PTX on a CPU host; it has never run on a GPU here (see docs/kernels.md).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
import re
from typing import Callable

import jax
import jax.numpy as jnp

from motif_kernels import target as target_lib
from motif_kernels.lm_head_tiles import KernelTiles, merge_splits, split_bounds

_MASK_VALUE = -1e30

# jax-triton releases known not to work with a jax release even with the shim below:
# (jax_triton <= this, jax >= that): why. Empty while the shim covers every known pairing.
_KNOWN_INCOMPATIBLE: list[tuple[tuple[int, ...], tuple[int, ...], str]] = []


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def _installed_version(dist: str) -> str | None:
    """The installed version of a distribution, or None (monkeypatched by the tests)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _backend() -> str:
    """The platform the program is lowered for (motif_kernels.target), not the host's default backend."""
    return target_lib.current_target().platform


def unavailable_reason() -> str | None:
    """Why the Triton kernel cannot run for the current target (all the reasons, '; '-joined), or None."""
    reasons = []
    backend = _backend()
    if backend != "gpu":
        reasons.append(f"it needs a CUDA or ROCm GPU and the program is lowered for {backend!r}")
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


def adapt_dce_rule(rule: Callable) -> Callable:
    """jax >= 0.12 calls DCE rules as ``rule(used_outputs, live_inputs, eqn)``; jax-triton 0.4.1 registers
    ``rule(used_outputs, eqn)`` (every triton_call then fails while tracing with "takes 2 positional arguments
    but 3 were given"). Returns a rule of the three-argument form (``rule`` itself when it already is one)."""
    params = [p for p in inspect.signature(rule, follow_wrapped=False).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) >= 3:
        return rule

    def three_argument_rule(used_outputs, live_inputs, eqn):
        del live_inputs  # the two-argument rule keeps every input live anyway
        return rule(used_outputs, eqn)

    three_argument_rule.__wrapped__ = rule
    return three_argument_rule


@functools.cache
def _install_compat() -> None:
    """Makes the installed jax-triton work with the installed jax (idempotent): the DCE-rule shim."""
    from jax._src.interpreters import partial_eval as pe
    from jax_triton import triton_lib

    prim = triton_lib.triton_kernel_call_p
    if prim in pe.dce_rules:
        pe.dce_rules[prim] = adapt_dce_rule(pe.dce_rules[prim])


def ptx_version_for(nvcc_version: str | None) -> int | None:
    """The PTX ISA version the ptxas of CUDA ``nvcc_version`` assembles (Triton's own rule), or None.

    Triton emits the ISA of the ptxas it bundles (PTX 9.4 for triton 3.9, CUDA 13), which the CUDA 12 ptxas of
    the jax CUDA plugin rejects ("Unsupported .version 9.4"); asking Triton for the plugin's ISA avoids that."""
    if not nvcc_version:
        return None
    major, minor = _version_tuple(nvcc_version)[:2]
    if major == 12:
        return 80 + minor - (1 if minor >= 6 else 0)
    if major >= 13:
        return 90 + (major - 13) * 10 + minor
    return None


def _ptx_version() -> int | None:
    return ptx_version_for(_installed_version("nvidia-cuda-nvcc-cu12") or _installed_version("nvidia-cuda-nvcc"))


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def lm_head_stats_kernel(
        x_ptr, w_ptr, y_ptr, bias_ptr,  # inputs: x [T, D], w [D, V] row-major, y [T] int32, bias [V] f32
        m_ptr, l_ptr, s_ptr, t_ptr,  # outputs: [S, T] f32 each (one row per vocab slice)
        T: tl.constexpr, D: tl.constexpr, V: tl.constexpr,
        BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, VS: tl.constexpr,
        ENTROPY: tl.constexpr, IEEE: tl.constexpr,
    ):
        # program (i, j): tokens [i*BT, (i+1)*BT), vocabulary slice [j*VS, min((j+1)*VS, V))
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        split = tl.program_id(1)
        row_ok = rows < T
        rows64 = rows.to(tl.int64)  # T * D and D * V can pass 2**31
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
        m = tl.full((BT,), -1e30, tl.float32)  # literal: @triton.jit reads no plain globals
        l = tl.zeros((BT,), tl.float32)
        s = tl.zeros((BT,), tl.float32)
        t = tl.zeros((BT,), tl.float32)
        for v0 in range(0, VS, BV):
            cols = split * VS + v0 + tl.arange(0, BV)
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
        out = split * T + rows
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(l_ptr + out, l, mask=row_ok)
        tl.store(s_ptr + out, s, mask=row_ok)
        tl.store(t_ptr + out, t, mask=row_ok)

    return lm_head_stats_kernel


def stats(x, w, y, valid, *, tiles: KernelTiles, with_entropy: bool = True):
    """Per-token (m, l, s, t) [T] f32 over the columns of w (see lm_head_pallas.stats). No padding copies:
    out-of-range rows, columns and depth are masked in the loads. Compiled for the target's compute capability
    (so it lowers for an H100 from any host with the GPU extra) and the PTX ISA of the plugin's ptxas."""
    import jax_triton as jt

    _install_compat()
    t_len, d = x.shape
    v_len = w.shape[1]
    bt, bv, bk = tiles.block_t, tiles.block_v, tiles.block_d
    for name, b in (("token", bt), ("vocab", bv), ("depth", bk)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"triton {name} block must be a power of two >= 16, got {b}")
    _, cols = split_bounds(v_len, bv, tiles.vocab_splits)
    splits = -(-v_len // cols)
    limit = v_len if valid is None else jnp.minimum(valid, v_len)
    bias = jnp.where(jnp.arange(v_len) < limit, 0.0, _MASK_VALUE).astype(jnp.float32)
    out_type = [jax.ShapeDtypeStruct((splits, t_len), jnp.float32)] * 4
    cap = target_lib.current_target().compute_capability
    options = {} if _ptx_version() is None else {"ptx_version": _ptx_version()}
    out = jt.triton_call(
        x, w, y.astype(jnp.int32), bias,
        kernel=_kernel(), out_type=out_type, grid=(-(-t_len // bt), splits),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        compute_capability=None if cap is None else cap[0] * 10 + cap[1],
        backend_options=options,
        T=t_len, D=d, V=v_len, BT=bt, BV=bv, BK=bk, VS=cols,
        ENTROPY=bool(with_entropy), IEEE=bool(x.dtype == jnp.float32),
    )
    return merge_splits(*out, with_entropy)
