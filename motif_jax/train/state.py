"""The train state pytree, and the one way to build it: random init, an ``--init-from`` policy, or (through the loop)
a checkpoint, always straight into its shardings (nothing is ever materialised unsharded or gathered on a host).

:func:`resolve_model` decides the model of a run: without ``--init-from`` the flags' ModelConfig; with it, the
architecture saved in the policy directory (ours or a Hugging Face one) plus the run-time fields of the flags
(dtype, attention backend and blocks, remat policy, layer scan), the same rule for SFT, RL and trace scoring.
:func:`abstract_train_state` traces the initialiser with ``jax.eval_shape`` (no memory) and derives a NamedSharding
for every leaf from the parameters' logical axis names and the rules (optimizer moments mirror their parameter):
the target of a checkpoint restore and of the memory planner. :func:`init_train_state` then either runs the
initialiser under ``jax.jit(out_shardings=...)`` (each device computes only its shards) or restores the policy's
parameters into those shardings and initialises the optimizer state beside them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from motif_jax.config import ModelConfig
from motif_jax.model.transformer import abstract_model, create_model
from motif_jax.parallel import mesh as mesh_lib
from motif_jax.parallel.rules import Rules
from motif_jax.train.checkpoint import load_policy_params, policy_model_config, resolve_policy_dir

__all__ = ["RUNTIME_FIELDS", "TrainState", "abstract_train_state", "init_train_state", "resolve_model",
           "train_state_shardings"]

# ModelConfig fields that are run-time choices, not part of the parameters: the flags keep them under --init-from.
RUNTIME_FIELDS = ("dtype", "attention_impl", "attention_block_q", "attention_block_kv", "remat_policy", "scan_layers")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """step: int32 scalar (train steps taken, skipped ones included); params: the model's nnx.State (fp32 master
    weights); opt_state: the optax state (moments mirror params)."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


def resolve_model(model_cfg: ModelConfig, init_from: str = "") -> tuple[ModelConfig, Path | None, str | None]:
    """(the run's ModelConfig, the policy directory or None, its tokenizer spec or None).

    With ``init_from`` the architecture comes from the policy (``model.yaml``, or a Hugging Face ``config.json``) and
    :data:`RUNTIME_FIELDS` from ``model_cfg`` (the flags). Raises CheckpointNotFoundError for a path that is no
    policy, run or Hugging Face directory.
    """
    if not init_from:
        return model_cfg, None, None
    policy_dir = resolve_policy_dir(init_from)
    loaded, tokenizer = policy_model_config(policy_dir)
    runtime = {k: getattr(model_cfg, k) for k in RUNTIME_FIELDS}
    return dataclasses.replace(loaded, **runtime), policy_dir, tokenizer


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


def abstract_train_state(
    model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules | None = None
) -> tuple[TrainState, nnx.GraphDef, TrainState]:
    """(state of ShapeDtypeStructs carrying their shardings, model graphdef, state shardings); allocates nothing."""
    abstract = jax.eval_shape(_init_fn(model_cfg, tx, 0))
    shardings = train_state_shardings(abstract, mesh, rules)
    graphdef, _ = abstract_model(model_cfg)
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return jax.tree.map(with_sharding, abstract, shardings), graphdef, shardings


def init_train_state(
    model_cfg: ModelConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules | None = None,
    *,
    seed: int = 0,
    policy_dir: Path | None = None,
) -> tuple[TrainState, nnx.GraphDef, TrainState]:
    """(state placed in its shardings over ``mesh``, model graphdef, state shardings).

    ``policy_dir`` (from :func:`resolve_model`): parameters restored from it straight into their shardings, fresh
    optimizer state; else a random initialisation from ``seed``. The optimizer state's structure does not depend
    on the schedule, so the state can be built before the run length is known.
    """
    init = _init_fn(model_cfg, tx, seed)
    shardings = train_state_shardings(jax.eval_shape(init), mesh, rules)
    graphdef, _ = abstract_model(model_cfg)
    if policy_dir is None:
        with jax.set_mesh(mesh):
            return jax.jit(init, out_shardings=shardings)(), graphdef, shardings
    params = load_policy_params(policy_dir, model_cfg, shardings.params)
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state), graphdef, shardings
