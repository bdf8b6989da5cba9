"""Optimizer: schedules, the weight-decay mask on stacked-layer parameters, Muon, config validation."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from motif_jax.config import ConfigError, ModelConfig, load_yaml
from motif_jax.model.transformer import abstract_model, create_model
from motif_jax.train.config import OptimConfig, StepConfig
from motif_jax.train.optim import decay_mask, make_optimizer, make_schedule, muon_labels

ROOT = Path(__file__).resolve().parent.parent
TINY = load_yaml(ModelConfig, ROOT / "configs/model/tiny.yaml")


def _flat(tree) -> dict[str, object]:
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_schedules():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    s = make_schedule(cfg, total_steps=14)
    np.testing.assert_allclose([float(s(i)) for i in range(4)], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    assert float(s(9)) == pytest.approx(0.55, rel=1e-5)  # cosine half way: 0.1 + 0.9 * 0.5
    assert float(s(14)) == pytest.approx(0.1, rel=1e-5) and float(s(100)) == pytest.approx(0.1, rel=1e-5)
    lin = make_schedule(OptimConfig(lr=1.0, warmup_steps=0, decay="linear", min_lr_ratio=0.0), total_steps=10)
    assert float(lin(0)) == 1.0 and float(lin(5)) == pytest.approx(0.5)
    const = make_schedule(OptimConfig(lr=2.0, warmup_steps=2, decay="constant"), total_steps=10)
    assert [float(const(i)) for i in (0, 1, 5)] == [1.0, 2.0, 2.0]


def test_weight_decay_mask_sees_through_the_layers_axis():
    _, params = abstract_model(TINY)
    mask = _flat(decay_mask(params))
    decayed = {k for k, v in mask.items() if v}
    assert any("q_proj" in k for k in decayed) and any("down_proj" in k for k in decayed)
    assert any("['embed']" in k for k in decayed) and any("lm_head" in k for k in decayed)
    for k, v in mask.items():  # stacked norms are [layers, dim] (2-D) but must not decay
        if any(n in k for n in ("norm", "lambda", "poly", "subln")):
            assert not v, k
    labels = _flat(muon_labels(params))
    assert all(v == "muon" for k, v in labels.items() if "kernel" in k)
    assert all(v == "adam" for k, v in labels.items() if "kernel" not in k)


def test_adamw_decay_and_clipping():
    model = create_model(TINY, seed=0)
    from flax import nnx

    _, params = nnx.split(model)
    tx = make_optimizer(OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, grad_clip=1.0), total_steps=10)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    flat_u, flat_p = _flat(updates), _flat(params)
    for k, u in flat_u.items():
        if "norm" in k or "lambda" in k or "poly" in k:
            assert float(jnp.abs(u).max()) == 0.0, k  # no decay
        elif "kernel" in k:
            np.testing.assert_allclose(np.asarray(u), -0.1 * 0.5 * np.asarray(flat_p[k]), rtol=1e-5, atol=1e-9)
    big = jax.tree.map(lambda p: jnp.full_like(p, 100.0), params)
    clipped, _ = optax.clip_by_global_norm(1.0).update(big, optax.clip_by_global_norm(1.0).init(params))
    assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-5)


def test_muon_updates_matrices_and_adam_the_rest():
    from flax import nnx

    _, params = nnx.split(create_model(TINY, seed=0))
    tx = make_optimizer(OptimConfig(name="muon", lr=0.02, warmup_steps=0, weight_decay=0.0), total_steps=10)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.01, params)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    flat = _flat(updates)
    q = flat[next(k for k in flat if "q_proj" in k)]
    assert q.shape == params["layers"]["attn"]["q_proj"]["kernel"][...].shape
    assert all(bool(jnp.isfinite(v).all()) for v in flat.values())
    assert float(jnp.abs(q).max()) > 0.0
    # the momentum of Muon exists only for the matrices; AdamW moments only for the rest
    inner = state[1].inner_states  # chain(clip, partition)
    assert set(inner) == {"muon", "adam"}


def test_config_validation_names_flags():
    with pytest.raises(ConfigError, match="--optim.lr"):
        OptimConfig(lr=0.0)
    with pytest.raises(ConfigError, match="--optim.decay"):
        OptimConfig(decay="step")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--optim.name"):
        OptimConfig(name="sgd")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--train.num-microbatches"):
        StepConfig(num_microbatches=0)
    with pytest.raises(ConfigError, match="--train.loss"):
        StepConfig(loss="chunked")  # type: ignore[arg-type]
