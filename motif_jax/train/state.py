"""The train state pytree and its sharded creation (nothing is ever materialised unsharded).

``create_train_state`` traces the initialiser with ``jax.eval_shape`` (no memory), derives a NamedSharding for
every leaf from the parameters' logical axis names and the rules table (optimizer moments mirror their parameter),
then runs the initialiser under ``jax.jit(out_shardings=...)`` so each device only ever computes its own shards.
``abstract_train_state`` stops before running: ShapeDtypeStructs with shardings, for the memory planner and for
restoring a checkpoint straight into the target layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from motif_jax.config import ModelConfig
from motif_jax.model.transformer import abstract_model, create_model
from motif_jax.parallel import mesh as mesh_lib
from motif_jax.parallel.rules import Rules
from motif_jax.train.config import OptimConfig
from motif_jax.train.optim import make_optimizer

__all__ = ["TrainState", "abstract_train_state", "create_train_state", "train_state_shardings"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """step: int32 scalar (train steps taken, skipped ones included); params: the model's nnx.State (fp32 master
    weights); opt_state: the optax state (moments mirror params)."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


def _init_fn(model_cfg: ModelConfig, tx: optax.GradientTransformation, seed: int):
    def init() -> TrainState:
        _, params = nnx.split(create_model(model_cfg, seed))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return init


def train_state_shardings(abstract_state: TrainState, mesh: Mesh, rules: Rules | None = None) -> TrainState:
    """NamedShardings for every leaf of a (possibly abstract) TrainState."""
    params = mesh_lib.param_shardings(abstract_state.params, mesh, rules)
    opt = mesh_lib.opt_state_shardings(abstract_state.opt_state, abstract_state.params, params, mesh)
    return TrainState(step=mesh_lib.replicated(mesh), params=params, opt_state=opt)


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def abstract_train_state(
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    mesh: Mesh,
    rules: Rules | None = None,
    *,
    total_steps: int = 1,
    seed: int = 0,
) -> tuple[TrainState, nnx.GraphDef, TrainState]:
    """(abstract state of sharded ShapeDtypeStructs, model graphdef, state shardings); allocates nothing."""
    tx = make_optimizer(optim_cfg, total_steps)
    abstract = jax.eval_shape(_init_fn(model_cfg, tx, seed))
    shardings = train_state_shardings(abstract, mesh, rules)
    graphdef, _ = abstract_model(model_cfg)
    return _with_shardings(abstract, shardings), graphdef, shardings


def create_train_state(
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    mesh: Mesh,
    rules: Rules | None = None,
    seed: int = 0,
    *,
    total_steps: int = 1,
) -> tuple[TrainState, nnx.GraphDef, TrainState]:
    """(state initialised already sharded over ``mesh``, model graphdef, state shardings).

    The optimizer state's structure does not depend on ``total_steps`` (only the schedule does), so the state can
    be created before the run length is known; pass the same OptimConfig to ``make_optimizer`` for the step.
    """
    tx = make_optimizer(optim_cfg, total_steps)
    init = _init_fn(model_cfg, tx, seed)
    abstract = jax.eval_shape(init)
    shardings = train_state_shardings(abstract, mesh, rules)
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    graphdef, _ = abstract_model(model_cfg)
    return state, graphdef, shardings
