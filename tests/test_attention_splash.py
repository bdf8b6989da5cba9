"""attention_impl="splash" (the Pallas TPU kernel, run through the Pallas interpreter on this CPU) equals the xla
reference in value and gradient: packed segments with padding, GQA, a value head twice the key head (differential
attention's [V1|V2]), inside the model, and under context parallelism (heads exchanged, load-balanced layout undone).

The kernel masks by index, so it is used only for natural-order rows; the tests also prove which path ran by
replacing the other one with zeros (a wrong path would then give zeros, not the reference).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from motif_kernels import attention_splash
from motif_jax.config import MeshConfig, ModelConfig
from motif_jax.model import attention as attn_lib
from motif_jax.model.attention import AttentionBackendError, attend
from motif_jax.model.context_attention import context_parallel_attention
from motif_jax.model.transformer import create_model
from motif_jax.parallel.context import inverse_permutation, load_balance_permutation
from motif_jax.parallel.mesh import make_mesh
from motif_kernels.target import lowering_target

T = 32


def _inputs(b=2, t=T, hq=8, hk=4, d=8, dv=16, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, ct = (jax.random.normal(kk, shape).astype(dtype) for kk, shape in
                   zip(ks, [(b, t, hq, d), (b, t, hk, d), (b, t, hk, dv), (b, t, hq, dv)]))
    seg = np.ones((b, t), np.int32)
    pos = np.tile(np.arange(t), (b, 1)).astype(np.int32)
    seg[0, 10:25], pos[0, 10:25] = 2, np.arange(15)  # packed: [A | B | padding]
    seg[0, 25:], pos[0, 25:] = 0, 0
    seg[1, 20:], pos[1, 20:] = 2, np.arange(t - 20)
    return q, k, v, ct, jnp.asarray(seg), jnp.asarray(pos)


def _value_and_grads(impl, q, k, v, ct, seg, pos):
    real = (seg > 0)[:, :, None, None]  # padding outputs are unspecified in every backend

    def loss(q, k, v):
        o = attend(q, k, v, seg, seg, pos, pos, impl=impl, block_q=8, block_kv=8)
        return jnp.sum(o * ct * real), o * real

    (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("hq,hk,dv", [(8, 4, 16), (4, 4, 8), (4, 1, 8)], ids=["gqa-wide-v", "mha", "mqa"])
def test_splash_equals_xla_value_and_gradient(dtype, tol, hq, hk, dv):
    args = _inputs(hq=hq, hk=hk, dv=dv, dtype=jnp.dtype(dtype))
    out, grads = _value_and_grads("splash", *args)
    ref, ref_grads = _value_and_grads("xla", *args)
    scale = lambda a: float(jnp.max(jnp.abs(a.astype(jnp.float32))))
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
        assert err <= tol * max(scale(b), 1.0), err


def test_splash_path_is_taken_for_natural_rows_and_blockwise_otherwise(monkeypatch):
    q, k, v, ct, seg, pos = _inputs()
    ref, _ = _value_and_grads("xla", q, k, v, ct, seg, pos)
    zeros = lambda q, k, v, *a, **kw: jnp.zeros(q.shape[:-1] + (v.shape[-1],), q.dtype)
    with monkeypatch.context() as m:  # natural rows: the blockwise fallback must not be what produced the result
        m.setattr(attn_lib, "blockwise_attention", zeros)
        out, _ = _value_and_grads("splash", q, k, v, ct, seg, pos)
        np.testing.assert_allclose(out, ref, atol=1e-5)
    perm = np.random.default_rng(0).permutation(T)  # a permuted row: splash would be wrong, blockwise is used
    take = lambda a: jnp.take(a, perm, axis=1)
    args = tuple(map(take, (q, k, v, ct, seg, pos)))
    with monkeypatch.context() as m:
        m.setattr(attention_splash, "attention", lambda q, k, v, *a, **kw: zeros(q, k, v))
        out, _ = _value_and_grads("splash", *args)
    ref_p, _ = _value_and_grads("xla", *args)
    np.testing.assert_allclose(out, ref_p, atol=1e-5)


def test_model_with_splash_equals_xla_differential_attention():
    """Grouped differential attention (signal and noise pathways, [V1|V2] values) through the whole decoder, as
    tests/test_model.py checks blockwise: same objective and norm-wise tolerances."""
    from flax import nnx

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=10, num_kv_heads=4, head_dim=8,
                      mlp_dim=64, attention="differential", mlp="polynorm", max_seq_len=64)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 29)), jnp.int32)
    seg = jnp.asarray([[1] * 16 + [2] * 13, [1] * 29], jnp.int32)
    pos = jnp.asarray([list(range(16)) + list(range(13)), list(range(29))], jnp.int32)

    def loss(params, impl):
        model = nnx.merge(nnx.graphdef(create_model(dataclasses.replace(cfg, attention_impl=impl))), params)
        h, _ = model(tokens, seg, pos)
        return jnp.sum(h * jnp.sin(jnp.arange(h.size).reshape(h.shape)))

    params = nnx.state(create_model(cfg, seed=5))
    v1, g1 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, "xla")
    v2, g2 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, "splash")
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    flat1, flat2 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in (g1, g2))
    assert np.linalg.norm(flat1 - flat2) <= 1e-5 * np.linalg.norm(flat1)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert np.linalg.norm(x - y) <= 1e-4 * np.linalg.norm(x)  # per leaf: the lambdas' sums cancel heavily


@pytest.mark.parametrize("balanced", [True, False], ids=["load-balanced", "natural"])
def test_splash_under_context_parallelism_equals_reference(balanced, monkeypatch):
    q, k, v, ct, seg, pos = _inputs()
    real = (seg > 0)[:, :, None, None]
    ref, ref_grads = _value_and_grads("xla", q, k, v, ct, seg, pos)
    perm = load_balance_permutation(T, 4) if balanced else np.arange(T)
    take = lambda a: jnp.take(a, perm, axis=1)
    qp, kp, vp, ctp, segp, posp, realp = map(take, (q, k, v, ct, seg, pos, real))
    # the splash kernel, not blockwise, must produce the result: blockwise returns zeros here
    monkeypatch.setattr(attn_lib, "blockwise_attention",
                        lambda q, k, v, *a, **kw: jnp.zeros(q.shape[:-1] + (v.shape[-1],), q.dtype))

    def loss(q, k, v):
        o = context_parallel_attention(q, k, v, segp, segp, posp, posp, strategy="all_gather", impl="splash")
        return jnp.sum(o * ctp * realp), o * realp

    with jax.set_mesh(make_mesh(MeshConfig(data=2, fsdp=1, context=4))):
        (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(qp, kp, vp)
    back = lambda a: np.asarray(jnp.take(a, inverse_permutation(np.asarray(perm)), axis=1))
    np.testing.assert_allclose(back(out), ref, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(back(a), b, atol=1e-5)


def test_splash_refuses_gpu_targets_and_bad_head_counts():
    q = jnp.zeros((1, 8, 3, 8))
    k = jnp.zeros((1, 8, 2, 8))
    ids = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(AttentionBackendError, match="multiple of key/value heads"):
        attend(q, k, k, ids, ids, ids, ids, impl="splash")
    with lowering_target("cuda"), pytest.raises(AttentionBackendError, match="TPU kernel.*'gpu'"):
        attend(k, k, k, ids, ids, ids, ids, impl="splash")
    with pytest.raises(AttentionBackendError, match="divisible by --mesh.context 4"), \
            jax.set_mesh(make_mesh(MeshConfig(data=2, fsdp=1, context=4))):
        qq = jnp.zeros((2, T, 6, 8))
        kk = jnp.zeros((2, T, 2, 8))
        seg = jnp.ones((2, T), jnp.int32)
        jax.jit(lambda q, k: context_parallel_attention(q, k, k, seg, seg, seg, seg, impl="splash")).trace(qq, kk)
