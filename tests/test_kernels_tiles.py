"""The LM-head kernels' tiles: vocab-split grids (partial log-sum-exp per vocab slice, merged after) are exact in
interpret mode with odd shapes, padded vocabularies and cotangents into log-probs and entropy; the tile table
splits the vocabulary only when the token blocks leave SMs idle; the jax-triton compatibility pieces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from motif_kernels import linear_cross_entropy, linear_log_probs
from motif_kernels import lm_head_triton
from motif_kernels.lm_head_tiles import KernelTiles, choose_tiles, merge_splits
from tests.test_kernels_lm_head import make_inputs, naive_ce, naive_log_probs, objective, rel_err


def _pallas_grids(fn, *args) -> list[tuple[int, ...]]:
    jaxpr = jax.make_jaxpr(fn)(*args)
    grids = []

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "pallas_call":
                grids.append(tuple(eqn.params["grid_mapping"].grid))
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None:
                        walk(inner if hasattr(inner, "eqns") else inner.jaxpr)
    walk(jaxpr.jaxpr)
    return grids


# (T, D, V, valid, tiles, expected vocab slices): V = 96 in 16-column blocks is 6 blocks, so 4 slices become 3
# (whole slices, no padding); 100 columns pad to 112 = 7 blocks (prime: 7 slices); a padded tail inside a slice.
SPLITS = [
    (37, 24, 96, 90, KernelTiles(16, 16, 16, vocab_splits=3), 3),
    (40, 32, 96, None, KernelTiles(16, 16, 16, vocab_splits=4), 3),
    (33, 16, 100, 97, KernelTiles(16, 16, 16, vocab_splits=7), 7),
    (20, 16, 64, 60, KernelTiles(32, 32, 16, vocab_splits=1), 1),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("t,d,v,valid,tiles,slices", SPLITS)
def test_vocab_split_grid_matches_naive(t, d, v, valid, tiles, slices, dtype):
    dtype = jnp.dtype(dtype)
    x, w, y, g_lp, g_h = make_inputs(t, d, v, dtype, valid, seed=t)

    def ours(x, w, y, valid):
        return linear_log_probs(x, w, y, with_entropy=True, impl="pallas", valid_vocab=valid, kernel_tiles=tiles)

    grids = _pallas_grids(lambda x, w: ours(x, w, y, valid), x, w)
    assert grids and grids[0][1] == slices, grids  # the kernel ran with that many vocab slices
    (_, (lp, h)), (gx, gw) = objective(ours, y, g_lp, g_h, valid)(x, w)
    (_, (lp_n, h_n)), (gx_n, gw_n) = objective(naive_log_probs, y, g_lp, g_h, valid)(x, w)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for name, a, b in (("logp", lp, lp_n), ("entropy", h, h_n), ("dx", gx, gx_n), ("dw", gw, gw_n)):
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


def test_vocab_split_cross_entropy_with_mask_and_z_loss():
    t, d, v, valid = 37, 16, 96, 90
    x, w, y, _, _ = make_inputs(t, d, v, valid=valid, seed=4)
    mask = (jnp.arange(t) % 3 != 0).astype(jnp.float32)
    tiles = KernelTiles(16, 16, 16, vocab_splits=2)
    loss = lambda x, w: linear_cross_entropy(x, w, y, mask, z_loss=1e-2, impl="pallas", valid_vocab=valid,
                                             kernel_tiles=tiles)[0]
    val, (gx, gw) = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)
    val_n, (gx_n, gw_n) = jax.jit(jax.value_and_grad(naive_ce, (0, 1)), static_argnums=(4, 5))(x, w, y, mask, 1e-2,
                                                                                               valid)
    assert rel_err(val, val_n) < 1e-5 and rel_err(gx, gx_n) < 1e-5 and rel_err(gw, gw_n) < 1e-5


def test_merge_splits_equals_one_pass_even_with_an_all_padding_slice():
    z = jax.random.normal(jax.random.key(0), (5, 12)) * 4
    z = z.at[:, 8:].set(-1e30)  # the last slice of 4 columns is all padding
    parts = z.reshape(5, 3, 4).transpose(1, 0, 2)  # [S, T, cols]
    m = parts.max(-1)
    e = jnp.exp(parts - m[..., None])
    l = e.sum(-1)
    s = jnp.sum((parts - m[..., None]) * e, -1)
    t = jnp.zeros_like(m)
    mm, ll, ss, _ = merge_splits(m, l, s, t, with_entropy=True)
    lse = jax.nn.logsumexp(z, axis=1)
    p = jax.nn.softmax(z, axis=1)
    np.testing.assert_allclose(mm + jnp.log(ll), lse, rtol=1e-6)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=1)
    np.testing.assert_allclose(jnp.log(ll) - ss / ll, entropy, atol=1e-5)


def test_tile_table_splits_the_vocabulary_only_when_sms_would_idle():
    hopper = choose_tiles(4096, 219_520, "gpu", (9, 0))
    assert (hopper.block_t, hopper.block_v, hopper.num_warps) == (128, 256, 8)
    # 4,096 tokens in 128-token blocks: 32 programs for 132 SMs -> split the vocabulary to fill them twice
    assert hopper.vocab_splits == 9
    assert choose_tiles(65_536, 219_520, "gpu", (9, 0)).vocab_splits == 1  # 512 programs already
    assert choose_tiles(256, 1024, "gpu", (9, 0)).vocab_splits == 1  # too few vocab blocks to split
    assert choose_tiles(4096, 32_768, "gpu", (8, 0)).block_v == 128  # Ampere row
    assert choose_tiles(4096, 32_768, "cpu").vocab_splits == 1
    assert choose_tiles(4096, 32_768, "gpu", (9, 0), block_t=64).block_t == 64  # explicit sizes win
    with pytest.raises(ValueError, match="vocab_splits"):
        KernelTiles(vocab_splits=0)


def test_dce_rule_shim_turns_the_two_argument_rule_into_jax_0_12s_form():
    calls = []

    def two(used_outputs, eqn):
        calls.append((used_outputs, eqn))
        return [True], eqn

    def three(used_outputs, live_inputs, eqn):
        return [True], eqn

    adapted = lm_head_triton.adapt_dce_rule(two)
    assert adapted([False], [True], "eqn") == ([True], "eqn") and calls == [([False], "eqn")]
    assert lm_head_triton.adapt_dce_rule(three) is three
    assert lm_head_triton.adapt_dce_rule(adapted) is adapted


@pytest.mark.parametrize("nvcc,ptx", [("12.9.86", 88), ("12.4.131", 84), ("12.6.20", 85), ("13.0.48", 90),
                                      (None, None)])
def test_ptx_version_follows_the_plugins_ptxas(nvcc, ptx):
    assert lm_head_triton.ptx_version_for(nvcc) == ptx
