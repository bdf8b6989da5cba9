"""Sharded training equals single-device training: loss, gradients and the optimizer update.

The tiny Motif model (configs/model/tiny.yaml: grouped differential attention, PolyNorm, f32) on packed rows, on the
8 simulated CPU devices of tests/conftest.py, under (data=2, fsdp=2, tensor=2), (fsdp=8) and (data=2, context=4)
with both context strategies. Also: the step engine's gradients in micro-batches normalised by the global token count, the compiled
sharded step (loss, gradient norm, skipping a non-finite step) and remat policies visible in compiled memory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from motif_jax.config import MeshConfig, ModelConfig, load_yaml
from motif_jax.model.transformer import abstract_model, create_model
from motif_jax.parallel.context import load_balance_batch
from motif_jax.parallel.mesh import activate, batch_sharding, make_mesh, param_shardings
from motif_jax.model.lm_head import cross_entropy_sums
from motif_jax.train.config import OptimConfig
from motif_jax.train.optim import make_optimizer, make_schedule
from motif_jax.train.state import TrainState, init_train_state
from motif_jax.train.step import compile_train_step, lm_loss, make_grad_fn, memory_stats

ROOT = Path(__file__).resolve().parent.parent
TINY = load_yaml(ModelConfig, ROOT / "configs/model/tiny.yaml")
B, L = 8, 32
OPTIM = OptimConfig(warmup_steps=0, lr=1e-2)


def packed_batch(b=B, t=L, vocab=TINY.vocab_size, seed=0) -> dict[str, np.ndarray]:
    """Rows of two packed documents and right padding; targets = next token inside the document."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (b, t)).astype(np.int32)
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    targets = np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), np.float32)
    for r in range(b):
        cut, end = int(rng.integers(5, t - 10)), int(rng.integers(t - 6, t + 1))
        for s, (lo, hi) in enumerate([(0, cut), (cut, end)], start=1):
            seg[r, lo:hi] = s
            pos[r, lo:hi] = np.arange(hi - lo)
            targets[r, lo:hi - 1] = tokens[r, lo + 1:hi]
            mask[r, lo + 1:hi - 1] = 1.0  # e.g. a prompt token masked out at the start of each document
        tokens[r, end:] = 0
    return {"tokens": tokens, "targets": targets, "loss_mask": mask, "segment_ids": seg, "positions": pos}


def _loss_and_grads(params, graphdef, batch):
    def loss(p):
        num, den, _ = cross_entropy_sums(nnx.merge(graphdef, p), batch)
        return num, den

    (num, den), g = jax.value_and_grad(loss, has_aux=True)(params)
    return num / den, jax.tree.map(lambda x: x / den, g)


@pytest.fixture(scope="module")
def reference():
    graphdef, params = nnx.split(create_model(TINY, seed=0))
    batch = {k: jnp.asarray(v) for k, v in packed_batch().items()}
    loss, grads = jax.jit(_loss_and_grads, static_argnums=1)(params, graphdef, batch)
    return graphdef, params, float(loss), jax.tree.map(np.asarray, grads)


def _max_err(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))


MESHES = {
    "data2-fsdp2-tensor2": MeshConfig(data=2, fsdp=2, tensor=2),
    "fsdp8": MeshConfig(fsdp=8),
    "data2-context4-allgather": MeshConfig(data=2, fsdp=1, context=4),
    "data2-context4-ring": MeshConfig(data=2, fsdp=1, context=4, context_strategy="ring"),
}


@pytest.mark.parametrize("name", MESHES)
def test_sharded_loss_and_grads_equal_single_device(reference, name):
    graphdef, params, ref_loss, ref_grads = reference
    mesh_cfg = MESHES[name]
    mesh = make_mesh(mesh_cfg)
    shardings = param_shardings(params, mesh, mesh_cfg.logical_rules)
    sharded = jax.device_put(params, shardings)
    # the load-balanced layout is applied to the batch once; the loss is a sum over tokens, so unchanged
    batch = load_balance_batch(packed_batch(), mesh.shape["context"])
    batch = jax.device_put(batch, batch_sharding(mesh, mesh_cfg.logical_rules))
    # a fresh function per mesh: jit's cache does not see the rules / context strategy selected while tracing
    with activate(mesh, mesh_cfg):
        loss, grads = jax.jit(lambda p, b: _loss_and_grads(p, graphdef, b))(sharded, batch)
    assert abs(float(loss) - ref_loss) < 1e-5
    assert _max_err(grads, ref_grads) < 1e-5


def test_micro_batched_sharded_gradients_and_the_compiled_step_match_the_reference(reference):
    """Two micro-batches on a sharded state: the engine's loss and gradients equal the single-device reference
    (normalised once by the global token count); the compiled step reports them and skips a non-finite update."""
    graphdef, params, ref_loss, ref_grads = reference
    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2)
    mesh = make_mesh(mesh_cfg)
    tx = make_optimizer(OPTIM, 10)
    state, graphdef2, shardings = init_train_state(TINY, tx, mesh, mesh_cfg.logical_rules, seed=0)
    assert _max_err(state.params, params) == 0.0  # sharded init == unsharded init
    assert state.params["embed"][...].sharding.spec == shardings.params["embed"].get_value().spec
    bs = batch_sharding(mesh, mesh_cfg.logical_rules)
    batch = jax.device_put(packed_batch(), bs)
    loss = lm_loss(graphdef2)
    with activate(mesh, mesh_cfg):
        grad_fn = jax.jit(make_grad_fn(loss, num_microbatches=2, param_shardings=shardings.params))
        grads, value, den, _ = grad_fn(state.params, batch)
    assert abs(float(value) - ref_loss) < 1e-5 and float(den) == float(packed_batch()["loss_mask"].sum())
    assert _max_err(grads, ref_grads) < 1e-5

    step = compile_train_step(loss, tx, mesh=mesh, state_shardings=shardings, abstract_state=state, batch=batch,
                              mesh_cfg=mesh_cfg, num_microbatches=2, schedule=make_schedule(OPTIM, 10), verbose=False)
    assert step.memory.total > 0 and step.memory.arguments > 0
    nan_state = TrainState(step=jnp.copy(state.step), params=jax.tree.map(lambda x: x * jnp.nan, state.params),
                           opt_state=jax.tree.map(jnp.copy, state.opt_state))
    count_before = int(optax.tree_utils.tree_get_all_with_path(nan_state.opt_state, "count")[0][1])
    new_state, metrics = step(state, batch)  # donates `state`
    assert abs(float(metrics["loss"]) - ref_loss) < 1e-5
    assert float(metrics["denominator"]) == float(packed_batch()["loss_mask"].sum())
    assert float(metrics["skipped"]) == 0.0 and float(metrics["learning_rate"]) == pytest.approx(OPTIM.lr)
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(ref_grads)), rel=1e-5)
    assert float(metrics["update_norm"]) > 0 and int(new_state.step) == 1

    # a non-finite loss skips the update: parameters and optimizer state are kept, the skip is counted
    kept = jax.tree.map(np.asarray, nan_state.params)
    skipped_state, metrics = step(nan_state, batch)
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    np.testing.assert_array_equal(np.asarray(skipped_state.params["embed"][...]), kept["embed"][...])
    assert int(optax.tree_utils.tree_get_all_with_path(skipped_state.opt_state, "count")[0][1]) == count_before
    assert int(skipped_state.step) == 1  # the step counter advances even when the update is skipped


def test_remat_policies_are_visible_in_compiled_memory():
    """Compile-only: `full` remat of each scanned layer holds far fewer temporaries than `none`."""
    cfg = dataclasses.replace(TINY, num_layers=6, max_seq_len=512)
    batch = {k: jax.ShapeDtypeStruct((4, 512), jnp.float32 if k == "loss_mask" else jnp.int32)
             for k in packed_batch()}
    temps = {}
    for policy in ("none", "full"):
        graphdef, params = abstract_model(dataclasses.replace(cfg, remat_policy=policy))
        fn = jax.jit(lambda p, b: _loss_and_grads(p, graphdef, b))
        temps[policy] = memory_stats(fn.lower(params, batch).compile()).temporaries
    assert temps["full"] < 0.6 * temps["none"], temps
