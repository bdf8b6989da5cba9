"""Vocab-parallel LM-head loss on 8 simulated CPU devices equals the unsharded one (values and gradients).

The device count of a process is fixed when its first JAX computation runs. Under pytest-xdist
(`-n 2 --dist loadfile`) other test modules in the same worker may already have started JAX with one CPU
device, and forcing 8 devices at import time would change their tests too. So, unless the worker already
has 8 devices, the checks run in a fresh interpreter started with `jax_num_cpu_devices=8`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from motif_kernels import linear_cross_entropy, linear_log_probs, sharded_linear_log_probs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _inputs(t, d, v, valid):
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (t, d))
    w = jax.random.normal(ks[1], (d, v)) * 0.5
    y = jax.random.randint(ks[2], (t,), 0, valid or v)
    return x, w, y, jax.random.normal(ks[3], (t,)), jax.random.normal(ks[4], (t,))


def check_log_probs(axis_type: str, impl: str, valid, t=48, d=24, v=128) -> None:
    """(data=2, tensor=4) mesh; with valid=90 the last vocab shard (columns 96..127) is all padding."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(getattr(AxisType, axis_type),) * 2)
    x, w, y, g_lp, g_h = _inputs(t, d, v, valid)
    kw = dict(with_entropy=True, impl=impl, token_chunk=16, vocab_block=16, valid_vocab=valid)

    def objective(fn):
        def f(x, w):
            lp, h = fn(x, w)
            return jnp.sum(lp * g_lp) + jnp.sum(h * g_h), (lp, h)
        return jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))

    sharded = objective(lambda x, w: sharded_linear_log_probs(
        x, w, y, mesh=mesh, token_axes=("data",), vocab_axis="tensor", **kw))
    dense = objective(lambda x, w: linear_log_probs(x, w, y, **kw))
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    ws = jax.device_put(w, NamedSharding(mesh, P(None, "tensor")))
    (_, (lp, h)), (gx, gw) = sharded(xs, ws)
    (_, (lp0, h0)), (gx0, gw0) = dense(x, w)
    for name, a, b in (("logp", lp, lp0), ("entropy", h, h0), ("dx", gx, gx0), ("dw", gw, gw0)):
        assert _rel(a, b) < 1e-5, (axis_type, impl, name, _rel(a, b))
    assert gw.sharding.spec == P(None, "tensor"), gw.sharding


def check_cross_entropy() -> None:
    """Masked CE with z-loss; tokens over (data, fsdp), vocab over tensor; replicated inputs."""
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    x, w, y, _, _ = _inputs(32, 16, 64, None)
    mask = (jnp.arange(32) % 3 != 0).astype(jnp.float32)
    kw = dict(z_loss=1e-2, impl="xla", token_chunk=8, vocab_block=16)
    loss_s = lambda x, w: linear_cross_entropy(x, w, y, mask, mesh=mesh, token_axes=("data", "fsdp"), **kw)[0]
    loss_d = lambda x, w: linear_cross_entropy(x, w, y, mask, **kw)[0]
    a = jax.jit(jax.value_and_grad(loss_s, (0, 1)))(x, w)
    b = jax.jit(jax.value_and_grad(loss_d, (0, 1)))(x, w)
    for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert _rel(p, q) < 1e-5, _rel(p, q)


def check_bad_mesh() -> None:
    mesh = jax.make_mesh((2, 4), ("data", "tensor"))
    x, w, y, _, _ = _inputs(8, 8, 30, None)
    with pytest.raises(ValueError, match="V=30 must be divisible by the 'tensor' axis size 4"):
        sharded_linear_log_probs(x, w, y, mesh=mesh)
    with pytest.raises(ValueError, match="mesh has no axis 'model'"):
        sharded_linear_log_probs(x, w, y, mesh=mesh, vocab_axis="model")


def run_all_checks() -> None:
    assert jax.device_count() >= 8, jax.device_count()
    check_log_probs("Explicit", "xla", 90)
    check_log_probs("Auto", "xla", None)
    check_log_probs("Explicit", "pallas", 90, t=32, d=16, v=128)
    check_cross_entropy()
    check_bad_mesh()


def test_sharded_equals_unsharded():
    if jax.device_count() >= 8:
        run_all_checks()
        return
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import jax
        jax.config.update("jax_num_cpu_devices", 8)
        from tests.test_kernels_sharded import run_all_checks
        run_all_checks()
        print("SHARDED-OK")
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "SHARDED-OK" in proc.stdout, proc.stdout + proc.stderr
