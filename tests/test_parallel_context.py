"""Context-parallel attention (all_gather and ring) equals the reference attention in value and gradient.

Runs on the 8 simulated CPU devices of tests/conftest.py. Inputs are packed rows (two segments and padding), GQA
(10 query heads over 2 key/value heads) and a value width twice the key width (differential attention's [V1|V2]).
The sequence is reordered with the load-balanced layout before sharding, and the outputs are put back in order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from motif_jax.config import ConfigError, MeshConfig
from motif_jax.model.attention import attend
from motif_jax.model.context_attention import context_parallel_attention
from motif_jax.parallel.context import (
    inverse_permutation,
    load_balance_batch,
    load_balance_permutation,
)
from motif_jax.parallel.mesh import make_mesh

T = 32


def _inputs(b=2, t=T, hq=10, hk=2, d=8, dv=16):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, t, hq, d))
    k = jax.random.normal(ks[1], (b, t, hk, d))
    v = jax.random.normal(ks[2], (b, t, hk, dv))
    ct = jax.random.normal(ks[3], (b, t, hq, dv))
    seg = np.ones((b, t), np.int32)
    pos = np.tile(np.arange(t), (b, 1)).astype(np.int32)
    seg[0, 10:25], pos[0, 10:25] = 2, np.arange(15)  # packed: [A | B | padding]
    seg[0, 25:], pos[0, 25:] = 0, 0
    seg[1, 20:], pos[1, 20:] = 2, np.arange(t - 20)
    return q, k, v, ct, jnp.asarray(seg), jnp.asarray(pos)


@pytest.fixture(scope="module")
def reference():
    q, k, v, ct, seg, pos = _inputs()

    def loss(q, k, v):
        o = attend(q, k, v, seg, seg, pos, pos, impl="xla")
        return jnp.sum(o * ct), o

    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


CASES = [
    # (mesh, strategy, per-shard attention impl)
    (MeshConfig(data=2, fsdp=1, context=4), "all_gather", "xla"),
    (MeshConfig(data=2, fsdp=1, context=4), "ring", "xla"),
    (MeshConfig(data=1, fsdp=1, tensor=2, context=4), "all_gather", "blockwise"),
    (MeshConfig(data=1, fsdp=1, tensor=2, context=4), "ring", "xla"),
    (MeshConfig(data=1, fsdp=1, context=8), "ring", "xla"),
    # heads (10) do not split over tensor=4: replicated over it inside the shard_map, gradients still exact
    (MeshConfig(data=1, fsdp=1, tensor=4, context=2), "all_gather", "xla"),
]


def _case_id(case) -> str:
    m, strategy, impl = case
    return f"d{m.data}t{m.tensor}c{m.context}-{strategy}-{impl}"


@pytest.mark.parametrize("mesh_cfg,strategy,impl", CASES, ids=[_case_id(c) for c in CASES])
def test_context_parallel_matches_reference(reference, mesh_cfg, strategy, impl):
    ref_out, ref_grads = reference
    q, k, v, ct, seg, pos = _inputs()
    mesh = make_mesh(mesh_cfg)
    perm = load_balance_permutation(T, mesh.shape["context"])
    take = lambda a: jnp.take(a, perm, axis=1)
    qp, kp, vp, ctp, segp, posp = map(take, (q, k, v, ct, seg, pos))

    def loss(q, k, v):
        o = context_parallel_attention(q, k, v, segp, segp, posp, posp, strategy=strategy, impl=impl,
                                       block_q=4, block_kv=4)
        return jnp.sum(o * ctp), o

    with jax.set_mesh(mesh):
        (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(qp, kp, vp)
    inv = inverse_permutation(perm)
    back = lambda a: np.asarray(jnp.take(a, inv, axis=1))
    np.testing.assert_allclose(back(out), np.asarray(ref_out), atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(back(g), np.asarray(r), atol=1e-5, rtol=1e-5)


def test_load_balance_permutation():
    perm = load_balance_permutation(16, 2)  # chunks of 4: shard 0 gets chunks 0 and 3, shard 1 chunks 1 and 2
    np.testing.assert_array_equal(perm, [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11])
    np.testing.assert_array_equal(perm[inverse_permutation(perm)], np.arange(16))
    # every shard gets the same causal work: sum over its tokens of (position + 1)
    perm = load_balance_permutation(64, 4)
    work = [(perm[i * 16:(i + 1) * 16] + 1).sum() for i in range(4)]
    assert len(set(work)) == 1
    with pytest.raises(ValueError, match="divisible by 2 x context"):
        load_balance_permutation(20, 4)


def test_load_balance_batch_moves_every_key_together():
    rng = np.random.default_rng(0)
    batch = {k: rng.integers(0, 100, (2, 16)).astype(np.int32)
             for k in ("tokens", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = rng.random((2, 16)).astype(np.float32)
    out = load_balance_batch(batch, 2)
    perm = load_balance_permutation(16, 2)
    for k, v in batch.items():
        np.testing.assert_array_equal(out[k], v[:, perm])
    assert load_balance_batch(batch, 1)["tokens"] is batch["tokens"]


def test_unknown_strategy_is_a_config_error():
    with pytest.raises(ConfigError, match="mesh.context-strategy"):
        MeshConfig(context_strategy="ulysses")  # type: ignore[arg-type]
