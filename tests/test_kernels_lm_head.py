"""motif_kernels.lm_head against the naive jax.nn.log_softmax(x @ w): values and gradients, both backends that
run on CPU (xla, and pallas in interpret mode on tiny shapes)."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from motif_kernels import (
    BackendUnavailableError,
    linear_cross_entropy,
    linear_cross_entropy_sums,
    linear_log_probs,
    resolve_impl,
)


def naive_log_probs(x, w, y, valid=None):
    """Reference: full f32 logits, padding columns dropped."""
    z = x.astype(jnp.float32) @ w.astype(jnp.float32)
    if valid is not None:
        z = z[:, :valid]
    lp = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.take_along_axis(lp, y[:, None], axis=1)[:, 0]
    return logp, -jnp.sum(jnp.exp(lp) * lp, axis=-1)


def rel_err(a, b) -> float:
    """Normwise relative error max|a - b| / max|b| (elementwise relative error is meaningless for gradient
    entries near zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def make_inputs(t, d, v, dtype=jnp.float32, valid=None, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (t, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(ks[1], (d, v), jnp.float32) * 0.5).astype(dtype)
    y = jax.random.randint(ks[2], (t,), 0, valid or v)
    g_lp = jax.random.normal(ks[3], (t,))
    g_h = jax.random.normal(ks[4], (t,))
    return x, w, y, g_lp, g_h


def objective(fn, y, g_lp, g_h, valid):
    """A scalar that sends cotangents g_lp into log p and g_h into the entropy at once."""
    def f(x, w):
        lp, h = fn(x, w, y, valid)
        return jnp.sum(lp * g_lp) + jnp.sum(h * g_h), (lp, h)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


# (impl, T, D, V, token_chunk, vocab_block, valid_vocab): T not a multiple of the chunk, V not a multiple of
# the block, padded vocab; T > V exercises the token-outer backward, T < V the vocab-outer one.
CASES = [
    ("xla", 37, 24, 100, 8, 32, 90),
    ("xla", 150, 16, 40, 32, 16, None),
    ("xla", 20, 8, 64, None, None, 60),  # platform defaults: one tile
    ("pallas", 37, 24, 100, 16, 32, 90),
    ("pallas", 40, 32, 96, 16, 64, None),
]


PARAMS = [(*case, "float32") for case in CASES] + [(*CASES[0], "bfloat16"), (*CASES[3], "bfloat16")]


@pytest.mark.parametrize("impl,t,d,v,chunk,block,valid,dtype", PARAMS)
def test_log_probs_entropy_and_grads_match_naive(impl, t, d, v, chunk, block, valid, dtype):
    dtype = jnp.dtype(dtype)
    x, w, y, g_lp, g_h = make_inputs(t, d, v, dtype, valid)

    def ours(x, w, y, valid):
        return linear_log_probs(x, w, y, with_entropy=True, impl=impl, token_chunk=chunk, vocab_block=block,
                                valid_vocab=valid)

    (val, (lp, h)), (gx, gw) = objective(ours, y, g_lp, g_h, valid)(x, w)
    (val_n, (lp_n, h_n)), (gx_n, gw_n) = objective(naive_log_probs, y, g_lp, g_h, valid)(x, w)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert lp.dtype == h.dtype == jnp.float32 and lp.shape == h.shape == (t,)
    assert gx.dtype == x.dtype and gw.dtype == w.dtype
    for name, a, b in (("logp", lp, lp_n), ("entropy", h, h_n), ("dx", gx, gx_n), ("dw", gw, gw_n)):
        assert rel_err(a, b) < tol, (name, rel_err(a, b))
    if valid is not None:  # padding columns take no gradient (the naive reference never sees them)
        assert float(jnp.max(jnp.abs(gw[:, valid:].astype(jnp.float32)))) == 0.0


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_log_probs_without_entropy(impl):
    x, w, y, g_lp, _ = make_inputs(33, 16, 80)
    lp, h = jax.jit(lambda x, w: linear_log_probs(x, w, y, impl=impl, token_chunk=16, vocab_block=32))(x, w)
    assert h is None
    assert rel_err(lp, naive_log_probs(x, w, y)[0]) < 1e-5
    gx, gw = jax.jit(jax.grad(lambda x, w: jnp.sum(g_lp * linear_log_probs(
        x, w, y, impl=impl, token_chunk=16, vocab_block=32)[0]), (0, 1)))(x, w)
    gx_n, gw_n = jax.jit(jax.grad(lambda x, w: jnp.sum(g_lp * naive_log_probs(x, w, y)[0]), (0, 1)))(x, w)
    assert rel_err(gx, gx_n) < 1e-5 and rel_err(gw, gw_n) < 1e-5


def naive_ce(x, w, y, mask, z_loss=0.0, valid=None):
    z = x.astype(jnp.float32) @ w.astype(jnp.float32)
    if valid is not None:
        z = z[:, :valid]
    lse = jax.nn.logsumexp(z, axis=-1)
    nll = lse - jnp.take_along_axis(z, jnp.clip(y, 0)[:, None], axis=1)[:, 0]
    n = jnp.maximum(mask.sum(), 1.0)
    return (jnp.sum(mask * nll) + z_loss * jnp.sum(mask * lse**2)) / n


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_cross_entropy_masked_with_z_loss(impl):
    t, d, v, valid = 37, 16, 72, 70
    x, w, y, _, _ = make_inputs(t, d, v, valid=valid, seed=1)
    mask = (jnp.arange(t) % 4 != 0).astype(jnp.float32)
    y = jnp.where(mask > 0, y, -100)  # ignored ids on masked tokens must be harmless
    kw = dict(z_loss=1e-2, impl=impl, token_chunk=16, vocab_block=32, valid_vocab=valid)

    def ours(x, w):
        return linear_cross_entropy(x, w, y, mask, **kw)

    (loss, aux), (gx, gw) = jax.jit(jax.value_and_grad(ours, (0, 1), has_aux=True))(x, w)
    loss_n, (gx_n, gw_n) = jax.jit(jax.value_and_grad(naive_ce, (0, 1)), static_argnums=(4, 5))(
        x, w, y, mask, 1e-2, valid)
    assert rel_err(loss, loss_n) < 1e-5
    assert rel_err(gx, gx_n) < 1e-5 and rel_err(gw, gw_n) < 1e-5
    assert float(aux["num_tokens"]) == float(mask.sum())
    assert rel_err(aux["nll"] + aux["z_loss"], loss) < 1e-6
    # Masked tokens contribute nothing: zero gradient rows, and changing them leaves the loss unchanged.
    assert float(jnp.max(jnp.abs(gx[mask == 0]))) == 0.0
    x2 = jnp.where(mask[:, None] > 0, x, 100.0 * x)
    loss2, _ = jax.jit(ours)(x2, w)
    assert rel_err(loss2, loss) < 1e-6


def test_cross_entropy_sums_normalise_across_micro_batches():
    t, d, v = 64, 16, 50
    x, w, y, _, _ = make_inputs(t, d, v, seed=2)
    mask = (jax.random.uniform(jax.random.key(3), (t,)) > 0.3).astype(jnp.float32)
    kw = dict(impl="xla", token_chunk=16, vocab_block=16)

    def two_micro_batches(x, w):
        parts = [linear_cross_entropy_sums(x[s], w, y[s], mask[s], **kw) for s in (slice(0, 24), slice(24, t))]
        return sum(p[0] for p in parts) / sum(p[1] for p in parts)

    loss, (gx, gw) = jax.jit(jax.value_and_grad(two_micro_batches, (0, 1)))(x, w)
    loss_n, (gx_n, gw_n) = jax.jit(jax.value_and_grad(naive_ce, (0, 1)))(x, w, y, mask)
    assert rel_err(loss, loss_n) < 1e-5 and rel_err(gx, gx_n) < 1e-5 and rel_err(gw, gw_n) < 1e-5


def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def _all_avals(jaxpr):
    for eqn in jaxpr.eqns:
        for var in (*eqn.invars, *eqn.outvars):
            if hasattr(var, "aval"):
                yield var.aval
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                yield from _all_avals(sub)


def test_never_materialises_the_logits():
    """No intermediate of forward + backward is as large as [T, V] (here T*V > every other array)."""
    t, d, v = 64, 8, 96
    x, w, y, _, _ = make_inputs(t, d, v)
    loss = lambda x, w: linear_cross_entropy(x, w, y, None, impl="xla", token_chunk=16, vocab_block=32)[0]
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, (0, 1)))(x, w).jaxpr
    biggest = max(int(np.prod(a.shape)) for a in _all_avals(jaxpr) if hasattr(a, "shape"))
    assert biggest < t * v, biggest


def test_auto_is_xla_on_cpu():
    assert jax.default_backend() == "cpu"
    assert resolve_impl("auto") == "xla"
    assert resolve_impl("pallas") == "pallas"


def test_bad_inputs_raise_value_errors_naming_the_argument():
    x, w, y, _, _ = make_inputs(8, 16, 32)
    with pytest.raises(ValueError, match="x and w disagree on the hidden size D"):
        linear_log_probs(x, w.T, y)
    with pytest.raises(ValueError, match="targets must have shape"):
        linear_log_probs(x, w, y[:5])
    with pytest.raises(ValueError, match="targets must be integer"):
        linear_log_probs(x, w, y.astype(jnp.float32))
    with pytest.raises(ValueError, match="x must be"):
        linear_log_probs(x[None], w, y)
    with pytest.raises(ValueError, match="valid_vocab"):
        linear_log_probs(x, w, y, valid_vocab=33)
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_log_probs(x, w, y, impl="cuda")
    with pytest.raises(ValueError, match="token_chunk"):
        linear_log_probs(x, w, y, token_chunk=0)
    with pytest.raises(ValueError, match="mask must have the shape"):
        linear_cross_entropy(x, w, y, jnp.ones((3,)))
    with pytest.raises(BackendUnavailableError):
        linear_log_probs(x, w, y, impl="triton")
