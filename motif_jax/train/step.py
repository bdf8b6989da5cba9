"""The core train step: fused LM-head loss, gradient accumulation, mixed precision, skip-on-non-finite, AOT compile.

``loss_fn`` returns (numerator, denominator) sums, never a per-micro-batch mean: the step sums both over its
micro-batches (``lax.scan``) and divides once, so the loss and its gradient are normalised by the global number of
target tokens of the step whatever the micro-batching or sharding. Parameters and optimizer state are fp32; the
model computes in ``ModelConfig.dtype`` (bf16 at scale), casting the weights at use.

``compile_train_step`` jits with explicit in/out shardings and the state donated, compiles before step 1
(``.lower(...).compile()``) and reports the per-device memory; the memory planner uses the same path with abstract
(ShapeDtypeStruct) inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from kernels import linear_cross_entropy_sums
from motif_jax.config import MeshConfig
from motif_jax.parallel import mesh as mesh_lib
from motif_jax.parallel.context import context_strategy
from motif_jax.parallel.rules import active_rules, axis_rules, constrain, logical_to_spec
from motif_jax.train.config import StepConfig
from motif_jax.train.optim import learning_rate_of
from motif_jax.train.state import TrainState

__all__ = [
    "BATCH_KEYS",
    "CompiledStep",
    "MemoryStats",
    "abstract_batch",
    "compile_train_step",
    "loss_fn",
    "make_train_step",
    "memory_stats",
]

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
Batch = Mapping[str, jax.Array]


def _loss_axes(mesh: Any) -> tuple[tuple[str, ...], str | None]:
    """(token axes, vocab axis) of the LM-head loss from the active rules: tokens = batch + length axes."""
    rules = active_rules() or MeshConfig().logical_rules
    tok = []
    for entry in logical_to_spec(("batch", "length"), rules, mesh.axis_names):
        if entry is not None:
            tok.extend((entry,) if isinstance(entry, str) else entry)
    voc = logical_to_spec(("vocab",), rules, mesh.axis_names)[0]
    voc = None if voc is None else (voc if isinstance(voc, str) else voc[0])
    if voc in tok:
        voc = None
    return tuple(tok), voc


def loss_fn(
    params: nnx.State,
    graphdef: nnx.GraphDef,
    batch: Batch,
    *,
    loss: str = "fused",
    loss_impl: str = "auto",
    z_loss: float = 0.0,
) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
    """Masked next-token cross-entropy as sums: (numerator, (denominator, aux)).

    batch: tokens, targets, loss_mask, segment_ids, positions [B, L] (loss_mask int / bool / float).
    numerator = sum(mask * nll) (+ z_loss * sum(mask * lse^2)), denominator = sum(mask), both f32.
    The fused loss goes from the final hidden states and ``output_projection()`` through ``kernels.lm_head``
    without [tokens, vocab] logits; under a mesh (``jax.set_mesh``) it is the vocab-parallel kernel, tokens split
    over the batch and length axes and the vocabulary over the ``vocab`` rule's axis. ``loss="naive"`` materialises
    fp32 logits and log_softmax (baseline for memory comparisons).
    """
    model = nnx.merge(graphdef, params)
    hidden, _ = model(batch["tokens"], batch["segment_ids"], batch["positions"])
    w = model.output_projection()
    b, t, d = hidden.shape
    x = hidden.reshape(b * t, d)
    targets = batch["targets"].reshape(b * t).astype(jnp.int32)
    mask = batch["loss_mask"].reshape(b * t).astype(jnp.float32)
    if loss == "naive":
        logits = jnp.dot(x, w, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        safe = jnp.where(mask > 0, targets, 0)
        logp = jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0] - lse
        nll_sum = -jnp.sum(mask * logp)
        num = nll_sum + z_loss * jnp.sum(mask * lse * lse) if z_loss else nll_sum
        return num, (jnp.sum(mask), {"nll_sum": jax.lax.stop_gradient(nll_sum)})
    if loss != "fused":
        raise ValueError(f"unknown loss {loss!r}; choose fused or naive (--train.loss)")
    mesh = jax.sharding.get_abstract_mesh()
    kw: dict[str, Any] = {}
    if mesh is not None and not mesh.empty and mesh.size > 1:
        tok, voc = _loss_axes(mesh)
        if voc is not None:
            kw = dict(mesh=mesh, token_axes=tok, vocab_axis=voc)
    num, den, aux = linear_cross_entropy_sums(x, w, targets, mask, z_loss=z_loss, impl=loss_impl, **kw)
    return num, (den, {"nll_sum": aux["nll_sum"]})


def _split_microbatches(batch: Batch, m: int) -> dict[str, jax.Array]:
    """[B, L] -> [M, B/M, L] with micro-batch i = rows i, i+M, ...: each device keeps its own rows (no exchange)."""
    def split(a):
        b = a.shape[0]
        if b % m:
            raise ValueError(f"batch of {b} rows cannot be split into {m} micro-batches (--train.num-microbatches)")
        return jnp.swapaxes(a.reshape(b // m, m, *a.shape[1:]), 0, 1)

    return {k: split(v) for k, v in batch.items()}


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    step_cfg: StepConfig = StepConfig(),
    *,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    mesh_cfg: MeshConfig | None = None,
    param_shardings: Any = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """train_step(state, batch) -> (new state, metrics); pure, for ``jax.jit``.

    metrics (f32 scalars): loss (global masked mean CE), nll, grad_norm (before clipping), learning_rate (of this
    update), tokens (target tokens), skipped (1 when the loss or a gradient was not finite: the update is not
    applied and the optimizer state is kept; the step counter still advances).
    ``param_shardings`` pins the gradient accumulators to the parameters' layout (FSDP-sharded, not replicated).
    """
    mesh_cfg = mesh_cfg or MeshConfig()
    lf = jax.value_and_grad(
        lambda p, mb: loss_fn(p, graphdef, mb, loss=step_cfg.loss, loss_impl=step_cfg.loss_impl,
                              z_loss=step_cfg.z_loss),
        has_aux=True,
    )

    def pin(tree):
        if param_shardings is None:
            return tree
        return jax.tree.map(jax.lax.with_sharding_constraint, tree, param_shardings)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        with axis_rules(mesh_cfg.logical_rules), context_strategy(mesh_cfg.context_strategy):
            batch = {k: batch[k] for k in BATCH_KEYS}
            batch["loss_mask"] = batch["loss_mask"].astype(jnp.float32)
            m = step_cfg.num_microbatches
            if m == 1:
                (num, (den, aux)), grads = lf(state.params, batch)
                nll = aux["nll_sum"]
            else:
                micro = _split_microbatches(batch, m)

                def body(carry, mb):
                    g_acc, num_acc, den_acc, nll_acc = carry
                    mb = {k: constrain(v, ("batch", "length")) for k, v in mb.items()}
                    (num, (den, aux)), g = lf(state.params, mb)
                    g_acc = pin(jax.tree.map(lambda a, b: a + b.astype(a.dtype), g_acc, g))
                    return (g_acc, num_acc + num, den_acc + den, nll_acc + aux["nll_sum"]), None

                zeros = pin(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params))
                z = jnp.zeros((), jnp.float32)
                (grads, num, den, nll), _ = jax.lax.scan(body, (zeros, z, z, z), micro)
            n = jnp.maximum(den, 1.0)
            grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), grads, state.params)
            loss = num / n
            grad_norm = optax.tree.norm(grads)
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            lr = learning_rate_of(state.opt_state, schedule) if schedule is not None else jnp.zeros((), jnp.float32)
            updates, new_opt = tx.update(grads, state.opt_state, state.params)
            new_params = optax.apply_updates(state.params, updates)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
            new_state = TrainState(
                step=state.step + 1, params=keep(new_params, state.params), opt_state=keep(new_opt, state.opt_state)
            )
            metrics = {
                "loss": loss,
                "nll": nll / n,
                "grad_norm": grad_norm,
                "learning_rate": lr,
                "tokens": den,
                "skipped": (~ok).astype(jnp.float32),
            }
            return new_state, metrics

    return train_step


# ---------------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation and memory analysis
# ---------------------------------------------------------------------------------------------------------------------


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
    fn: Any  # the compiled executable: fn(state, batch) -> (state, metrics); the state is donated
    memory: MemoryStats

    def __call__(self, state: TrainState, batch: Batch):
        return self.fn(state, batch)


def abstract_batch(
    batch_size: int, seq_len: int, sharding: NamedSharding | None = None
) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a [batch_size, seq_len] batch (int32 ids, float32 loss mask)."""
    dtypes = {"loss_mask": jnp.float32}
    return {
        k: jax.ShapeDtypeStruct((batch_size, seq_len), dtypes.get(k, jnp.int32), sharding=sharding) for k in BATCH_KEYS
    }


def compile_train_step(
    state_shardings: TrainState,
    batch_shardings: NamedSharding | Mapping[str, NamedSharding],
    abstract_state: TrainState,
    batch: Mapping[str, Any],
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    mesh_cfg: MeshConfig | None = None,
    step_cfg: StepConfig = StepConfig(),
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    verbose: bool = True,
) -> CompiledStep:
    """``jax.jit(train_step, in_shardings, out_shardings, donate_argnums=0).lower(...).compile()``.

    abstract_state / batch: arrays or ShapeDtypeStructs giving shapes and dtypes (nothing is allocated here).
    Prints (``verbose``, process 0) and returns the per-device memory analysis with the executable.
    """
    mesh_cfg = mesh_cfg or MeshConfig()
    if isinstance(batch_shardings, NamedSharding):
        batch_shardings = {k: batch_shardings for k in BATCH_KEYS}
    batch = {k: batch[k] for k in BATCH_KEYS}
    batch_shardings = {k: batch_shardings[k] for k in BATCH_KEYS}
    step = make_train_step(graphdef, tx, step_cfg, schedule=schedule, mesh_cfg=mesh_cfg,
                           param_shardings=state_shardings.params)
    rep = mesh_lib.replicated(mesh)
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, rep),
        donate_argnums=0,
    )
    spec = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    args = (jax.tree.map(spec, abstract_state, state_shardings), jax.tree.map(spec, batch, batch_shardings))
    with mesh_lib.activate(mesh, mesh_cfg):
        compiled = jitted.lower(*args).compile()
    mem = memory_stats(compiled)
    if verbose and jax.process_index() == 0:
        print(mem.describe(), flush=True)
    return CompiledStep(fn=compiled, memory=mem)
