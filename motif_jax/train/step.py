"""The step engine shared by SFT and RL: any (numerator, denominator) loss -> one compiled optimizer step.

A trainer plugs in a :class:`Loss`: ``fn(params, micro, frozen) -> (numerator, denominator, aux)`` returns sums,
never a per-micro-batch mean. The step splits the batch into micro-batches (``lax.scan``), sums numerators,
denominators, gradients and aux metrics over them and divides once, so loss and gradient are normalised by the
step's global denominator whatever the micro-batching or sharding. The engine also owns what every trainer needs
and nobody should write twice:

- skipping micro-batches without a gradient: a loss may supply ``skip(micro) -> (has_gradient, denominator)``;
  micro-batches without a gradient add only their denominator (``lax.cond``: no forward or backward pass);
- mixed precision (fp32 parameters and optimizer state; the model computes in ``ModelConfig.dtype``), the update
  of a step whose loss or gradient is not finite skipped (optimizer state kept) and reported (``skipped``);
- clipping and the optimizer (the optax chain), the learning rate of the update, explicit shardings with the state
  donated, and ``.lower().compile()`` before step 1 with the per-device memory report (the memory planner uses the
  same path with abstract inputs).

SFT's loss is :func:`lm_loss` (the fused cross-entropy); RL's is ``motif_jax.rl.step.policy_loss``. Both go
through ``motif_jax.model.lm_head``, vocab-parallel under a mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from motif_kernels import target as target_lib
from motif_jax.config import MeshConfig
from motif_jax.data.pipeline import BATCH_KEYS
from motif_jax.model.lm_head import cross_entropy_sums
from motif_jax.parallel import mesh as mesh_lib
from motif_jax.parallel.rules import constrain, logical_to_spec
from motif_jax.train.config import StepConfig
from motif_jax.train.optim import learning_rate_of
from motif_jax.train.state import TrainState

__all__ = [
    "BATCH_KEYS",
    "CompiledStep",
    "Loss",
    "MemoryStats",
    "abstract_batch",
    "batch_shardings",
    "compile_train_step",
    "lm_loss",
    "lower_train_step",
    "make_grad_fn",
    "make_train_step",
    "memory_stats",
    "reduce_stacked",
]

Batch = Mapping[str, jax.Array]
Reduction = Literal["sum", "max"]


@dataclasses.dataclass(frozen=True)
class Loss:
    """A loss the step engine can run.

    ``fn(params, micro, frozen) -> (numerator, denominator, aux)``: f32 scalars and a dict of f32 scalar metrics
    (sums, or maxima where ``reductions`` says "max"); ``frozen`` is the step's third argument (e.g. RL's reference
    parameters) or None. ``skip(micro) -> (has_gradient, denominator)`` (optional): a micro-batch whose
    ``has_gradient`` is False contributes only ``denominator`` (it must equal ``fn``'s) and no gradient.
    ``keys``: the batch arrays the loss reads (everything else is dropped before the step).
    """

    fn: Callable[[nnx.State, Batch, Any], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]
    keys: tuple[str, ...] = BATCH_KEYS
    reductions: Mapping[str, Reduction] = dataclasses.field(default_factory=dict)
    skip: Callable[[Batch], tuple[jax.Array, jax.Array]] | None = None


def lm_loss(graphdef: nnx.GraphDef, step_cfg: StepConfig = StepConfig()) -> Loss:
    """SFT's loss: masked next-token cross-entropy through the fused LM head; aux ``nll_sum``."""

    def fn(params, micro, frozen):
        del frozen
        model = nnx.merge(graphdef, params)
        return cross_entropy_sums(model, micro, impl=step_cfg.loss_impl, head=step_cfg.loss, z_loss=step_cfg.z_loss)

    return Loss(fn=fn)


def reduce_stacked(stacked: Mapping[str, jax.Array], reductions: Mapping[str, Reduction]) -> dict[str, jax.Array]:
    """[M]-stacked per-micro-batch metrics -> one value each: by ``reductions[name]`` ("max"), else summed."""
    return {k: (v.max(axis=0) if reductions.get(k) == "max" else v.sum(axis=0)) for k, v in stacked.items()}


def _split_microbatches(batch: Batch, m: int) -> dict[str, jax.Array]:
    """[B, ...] -> [M, B/M, ...], micro-batch i = rows i, i+M, ...: each device keeps its own rows (no exchange)."""

    def split(a):
        b = a.shape[0]
        if b % m:
            raise ValueError(f"batch of {b} rows cannot be split into {m} micro-batches (--train.num-microbatches)")
        return jnp.swapaxes(a.reshape(b // m, m, *a.shape[1:]), 0, 1)

    return {k: split(v) for k, v in batch.items()}


def _row_names(ndim: int) -> tuple[str | None, ...]:
    """Logical names of a batch array: [B] -> (batch,), [B, T, ...] -> (batch, length, None...)."""
    return ("batch", "length", *([None] * (ndim - 2)))[:ndim]


def make_grad_fn(
    loss: Loss, *, num_microbatches: int = 1, param_shardings: Any = None
) -> Callable[[nnx.State, Batch, Any], tuple[nnx.State, jax.Array, jax.Array, dict[str, jax.Array]]]:
    """``grad_fn(params, batch, frozen) -> (grads, loss, denominator, aux)``: the step's accumulation alone.

    Sums (numerator, denominator, gradient, aux) over ``num_microbatches`` micro-batches of ``batch`` (skipping
    those ``loss.skip`` says have no gradient) and divides once: grads and loss are those of
    ``sum(numerators) / sum(denominators)`` over the whole batch (zero for a denominator of 0). ``param_shardings``
    pins the gradient accumulators to the parameters' layout (FSDP-sharded, not replicated).
    """
    value_and_grad = jax.value_and_grad(lambda p, mb, fr: _pack(loss.fn(p, mb, fr)), has_aux=True)

    def pin(tree):
        if param_shardings is None:
            return tree
        return jax.tree.map(jax.lax.with_sharding_constraint, tree, param_shardings)

    def one_micro(params, micro, frozen):
        (num, (den, aux)), grads = value_and_grad(params, micro, frozen)
        return grads, num, den, aux

    def grad_fn(params: nnx.State, batch: Batch, frozen: Any = None):
        batch = {k: batch[k] for k in loss.keys}
        if num_microbatches == 1:
            grads, num, den, aux = one_micro(params, batch, frozen)
        else:
            def body(g_acc, mb):
                mb = {k: constrain(v, _row_names(v.ndim)) for k, v in mb.items()}

                def computed(g_acc):
                    g, num, den, aux = one_micro(params, mb, frozen)
                    return pin(jax.tree.map(lambda a, b: a + b.astype(a.dtype), g_acc, g)), (num, den, aux)

                if loss.skip is None:
                    return computed(g_acc)
                active, den = loss.skip(mb)
                shapes = jax.eval_shape(loss.fn, params, mb, frozen)[2]
                empty = {k: jnp.full(s.shape, -jnp.inf if loss.reductions.get(k) == "max" else 0.0, s.dtype)
                         for k, s in shapes.items()}
                skipped = lambda g_acc: (g_acc, (jnp.zeros((), jnp.float32), den.astype(jnp.float32), empty))
                return jax.lax.cond(active, computed, skipped, g_acc)

            zeros = pin(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
            grads, (nums, dens, stacked) = jax.lax.scan(body, zeros, _split_microbatches(batch, num_microbatches))
            num, den, aux = nums.sum(), dens.sum(), reduce_stacked(stacked, loss.reductions)
        # Divide once by the global denominator. An empty step (denominator 0) has zero sums, so zero gradients;
        # the clamp only avoids 0 / 0 (real denominators are counts >= 1, which it leaves alone).
        n = jnp.maximum(den, 1.0)
        grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), grads, params)
        return grads, num / n, den, aux

    return grad_fn


def make_train_step(
    loss: Loss,
    tx: optax.GradientTransformation,
    *,
    num_microbatches: int = 1,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    param_shardings: Any = None,
) -> Callable[[TrainState, Batch, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """``step(state, batch, frozen=None) -> (new state, metrics)``; pure, for ``jax.jit`` under an active mesh.

    metrics (f32 scalars): ``loss`` (numerator / denominator), ``denominator``, ``grad_norm`` (before clipping),
    ``update_norm``, ``learning_rate`` (of this update), ``skipped`` (1 when the loss or a gradient was not finite:
    parameters and optimizer state are kept, the step counter still advances), plus the loss's aux metrics reduced
    over micro-batches (see :func:`make_grad_fn`).
    """
    grad_fn = make_grad_fn(loss, num_microbatches=num_microbatches, param_shardings=param_shardings)

    def step(state: TrainState, batch: Batch, frozen: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
        grads, loss_value, den, aux = grad_fn(state.params, batch, frozen)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm)
        lr = learning_rate_of(state.opt_state, schedule) if schedule is not None else jnp.zeros((), jnp.float32)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                               opt_state=keep(new_opt, state.opt_state))
        metrics = {
            **aux,
            "loss": loss_value,
            "denominator": den,
            "grad_norm": grad_norm,
            "update_norm": jnp.where(ok, optax.tree.norm(updates), 0.0),
            "learning_rate": lr,
            "skipped": (~ok).astype(jnp.float32),
        }
        return new_state, metrics

    return step


def _pack(out):
    num, den, aux = out
    return num, (den, aux)


# ---------------------------------------------------------------------------------------------------------------------
# Shardings, ahead-of-time compilation and memory analysis
# ---------------------------------------------------------------------------------------------------------------------


def batch_shardings(mesh: Mesh, abstract: Mapping[str, Any], rules: Any = None) -> dict[str, NamedSharding]:
    """NamedSharding of every batch array by its rank: rows over the ``batch`` rule, [B, T] also T over ``length``."""
    rules = rules if rules is not None else MeshConfig().logical_rules
    return {k: NamedSharding(mesh, mesh_lib.fit_spec(v.shape, logical_to_spec(_row_names(len(v.shape)), rules,
                                                                               mesh.axis_names), mesh))
            for k, v in abstract.items()}


def abstract_batch(batch_size: int, seq_len: int, keys: tuple[str, ...] = BATCH_KEYS,
                   float_keys: tuple[str, ...] = ("loss_mask",)) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a [batch_size, seq_len] batch: int32 ids, float32 for ``float_keys``."""
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32 if k in float_keys else jnp.int32)
            for k in keys}


@dataclasses.dataclass(frozen=True)
class MemoryStats:
    """Per-device bytes from ``compiled.memory_analysis()``; total = arguments + outputs + temporaries - aliased."""

    arguments: int
    outputs: int
    temporaries: int
    aliased: int
    generated_code: int
    host_temporaries: int = 0

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries - self.aliased

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}

    def describe(self) -> str:
        gib = lambda b: f"{b / 2**30:8.2f} GiB"
        return (
            f"per-device memory: arguments {gib(self.arguments)} | outputs {gib(self.outputs)} | "
            f"temporaries {gib(self.temporaries)} | aliased {gib(self.aliased)} | total {gib(self.total)}"
        )


def memory_stats(compiled: Any) -> MemoryStats:
    ma = compiled.memory_analysis()
    if isinstance(ma, (list, tuple)):
        ma = ma[0]
    get = lambda name: int(getattr(ma, name, 0) or 0)
    return MemoryStats(
        arguments=get("argument_size_in_bytes"),
        outputs=get("output_size_in_bytes"),
        temporaries=get("temp_size_in_bytes"),
        aliased=get("alias_size_in_bytes"),
        generated_code=get("generated_code_size_in_bytes"),
        host_temporaries=get("host_temp_size_in_bytes"),
    )


@dataclasses.dataclass
class CompiledStep:
    """``fn(state, batch[, frozen]) -> (state, metrics)``, compiled for one batch shape; the state is donated."""

    fn: Any
    memory: MemoryStats
    with_frozen: bool = False

    def __call__(self, state: TrainState, batch: Mapping[str, Any], frozen: Any = None):
        return self.fn(state, batch, frozen) if self.with_frozen else self.fn(state, batch)


def lower_train_step(
    loss: Loss,
    tx: optax.GradientTransformation,
    *,
    mesh: Mesh,
    state_shardings: TrainState,
    abstract_state: TrainState,
    batch: Mapping[str, Any],
    mesh_cfg: MeshConfig | None = None,
    num_microbatches: int = 1,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    frozen: Any = None,
    frozen_shardings: Any = None,
) -> jax.stages.Lowered:
    """The train step of :func:`compile_train_step`, lowered but not compiled.

    Lowered for the target of ``motif_kernels.target.current_target()``: under an explicit
    ``motif_kernels.target.lowering_target("cuda")`` the StableHLO is CUDA's (cuDNN and Triton custom calls; the mesh
    may be of simulated CPU devices), which this host can inspect but not compile. Otherwise it is lowered for the
    mesh's own devices (CPU, or compile-only TPU devices from a topology).
    """
    mesh_cfg = mesh_cfg or MeshConfig()
    batch = {k: batch[k] for k in loss.keys}
    b_shardings = batch_shardings(mesh, batch, mesh_cfg.logical_rules)
    step = make_train_step(loss, tx, num_microbatches=num_microbatches, schedule=schedule,
                           param_shardings=state_shardings.params)
    spec = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    args = [jax.tree.map(spec, abstract_state, state_shardings), jax.tree.map(spec, batch, b_shardings)]
    in_shardings = [state_shardings, b_shardings]
    if frozen is not None:
        args.append(jax.tree.map(spec, frozen, frozen_shardings))
        in_shardings.append(frozen_shardings)
    else:
        step = (lambda f: lambda state, batch: f(state, batch, None))(step)
    jitted = jax.jit(step, in_shardings=tuple(in_shardings), out_shardings=(state_shardings,
                                                                            mesh_lib.replicated(mesh)),
                     donate_argnums=0)
    target = target_lib.current_target()
    with mesh_lib.activate(mesh, mesh_cfg):
        if not (target.explicit and target.lowering_platforms != (mesh.devices.flat[0].platform,)):
            return jitted.trace(*args).lower()
        # Lowering for another platform (CUDA from CPU devices): JAX's GPU kernel lowerings (Pallas Triton) read
        # the target GPU from the abstract mesh's device, so trace and lower under an abstract mesh that names it.
        abstract = jax.sharding.AbstractMesh(mesh.axis_sizes, mesh.axis_names, axis_types=mesh.axis_types,
                                             abstract_device=target_lib.abstract_device(target))
        with jax.sharding.use_abstract_mesh(abstract):
            return jitted.trace(*args).lower(lowering_platforms=target.lowering_platforms)


def compile_train_step(
    loss: Loss,
    tx: optax.GradientTransformation,
    *,
    mesh: Mesh,
    state_shardings: TrainState,
    abstract_state: TrainState,
    batch: Mapping[str, Any],
    mesh_cfg: MeshConfig | None = None,
    num_microbatches: int = 1,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    frozen: Any = None,
    frozen_shardings: Any = None,
    verbose: bool = True,
    label: str = "train step",
) -> CompiledStep:
    """``jax.jit(step, in_shardings, out_shardings, donate_argnums=0).lower(...).compile()``.

    abstract_state / batch / frozen: arrays or ShapeDtypeStructs giving shapes and dtypes (nothing is allocated).
    Batch arrays are sharded by :func:`batch_shardings`; ``frozen`` (e.g. reference parameters) by
    ``frozen_shardings``. Prints (``verbose``, process 0) and returns the per-device memory with the executable.
    """
    lowered = lower_train_step(loss, tx, mesh=mesh, state_shardings=state_shardings, abstract_state=abstract_state,
                               batch=batch, mesh_cfg=mesh_cfg, num_microbatches=num_microbatches,
                               schedule=schedule, frozen=frozen, frozen_shardings=frozen_shardings)
    compiled = lowered.compile()
    mem = memory_stats(compiled)
    if verbose and jax.process_index() == 0:
        print(f"{label}: {mem.describe()}", flush=True)
    return CompiledStep(fn=compiled, memory=mem, with_frozen=frozen is not None)
