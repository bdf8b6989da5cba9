"""The jitted RL policy update and the log-prob pass, both compiled once per run (fixed shapes).

Batch layout (see ``motif_jax.rl.buffer.collate``): per-token arrays line up with ``targets``, the log-prob of
response token j at position ``P - 1 + j``. One optimizer mini-batch is stacked as ``[M, b, T]`` (M micro-batches of
b samples); :func:`make_update_fn` scans over the M micro-batches, sums the objective's ``(numerator, denominator)``
and the gradients of the numerators, and divides once: the gradient is exactly that of the whole mini-batch's loss
``sum(num) / sum(den)`` (global token counts, not a mean of per-micro-batch means). A micro-batch none of whose rows
has a policy gradient (every effective advantage 0, e.g. the failures when ``negative_weight`` is 0, and no KL or
entropy term) adds only its denominator: its forward and backward passes are skipped (``lax.cond``), so the caller
puts the rows with a gradient first (:func:`motif_jax.rl.objective.has_policy_gradient`). The health metrics then
describe the micro-batches that were computed.

Log-probs are ``log softmax(z / temperature)`` to match the sampler's behaviour log-probs: the hidden states are
scaled by ``1 / temperature`` before the fused LM-head kernel (``kernels.lm_head.linear_log_probs``), so no
[tokens, vocab] logits are ever built.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kernels.lm_head import linear_log_probs
from motif_jax.rl.objective import METRIC_REDUCTIONS, aggregation_denominator, has_policy_gradient, policy_loss_terms

__all__ = [
    "BATCH_KEYS",
    "StepFns",
    "make_logprob_fn",
    "make_update_fn",
    "reduce_stacked_metrics",
    "token_logprobs",
]

# The per-sample arrays of a training batch (from collate) the update reads.
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask", "behaviour_logp", "advantages")


def token_logprobs(
    model: Any,
    batch: Mapping[str, jax.Array],
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array | None]:
    """Per-token log pi(target) under softmax(logits / temperature) and optionally the entropy of that distribution.

    batch: ``inputs``, ``targets``, ``positions``, ``segment_ids`` [B, T]. Returns (logp [B, T] f32, entropy [B, T]
    f32 or None); values at padding positions are meaningless (mask them).
    """
    hidden, _ = model(batch["inputs"], batch["segment_ids"], batch["positions"])
    b, t, d = hidden.shape
    x = hidden.reshape(b * t, d)
    if temperature != 1.0:
        x = x * jnp.asarray(1.0 / temperature, x.dtype)
    logp, ent = linear_log_probs(
        x, model.output_projection(), batch["targets"].reshape(b * t), with_entropy=with_entropy, impl=impl
    )
    return logp.reshape(b, t), (None if ent is None else ent.reshape(b, t))


def reduce_stacked_metrics(stacked: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """[M]-stacked micro-batch metrics -> one value each (``*_max`` by max, the rest by sum; see objective)."""
    out = {}
    for k, v in stacked.items():
        how = METRIC_REDUCTIONS.get(k, ("sum", None))[0]
        out[k] = v.max(axis=0) if how == "max" else v.sum(axis=0)
    return out


@dataclasses.dataclass(frozen=True)
class StepFns:
    """The compiled functions of a run.

    ``update(params, opt_state, batch, prox_logp, ref_params) -> (params, opt_state, metrics)``: batch arrays
    [M, b, T] (``advantages`` [M, b]), prox_logp [M, b, T]; ``ref_params`` is ignored (pass None) unless the
    objective has a KL term. ``logprobs(params, batch) -> [b, T]`` on one micro-batch (proximal / reference
    log-probs).
    """

    update: Callable
    logprobs: Callable


def make_logprob_fn(graphdef: Any, *, temperature: float, impl: str, param_sharding: Any = None,
                    batch_sharding: NamedSharding | None = None) -> Callable:
    """Jitted ``(params, batch [b, T]) -> logp [b, T]`` (no gradient, no entropy)."""

    def fn(params, batch):
        model = nnx.merge(graphdef, params)
        logp, _ = token_logprobs(model, batch, temperature=temperature, impl=impl)
        return jax.lax.stop_gradient(logp)

    if param_sharding is None:
        return jax.jit(fn)
    return jax.jit(fn, in_shardings=(param_sharding, batch_sharding), out_shardings=batch_sharding)


def make_update_fn(
    graphdef: Any,
    tx: optax.GradientTransformation,
    *,
    loss_kwargs: Mapping[str, Any],
    temperature: float,
    impl: str = "auto",
    param_sharding: Any = None,
    opt_sharding: Any = None,
    stacked_sharding: NamedSharding | None = None,
    adv_sharding: NamedSharding | None = None,
    replicated: NamedSharding | None = None,
    with_entropy: bool = True,
    skip_inert: bool = True,
) -> Callable:
    """Jitted update over one mini-batch stacked as [M, b, T]; see the module docstring.

    ``loss_kwargs``: static keyword arguments of ``policy_loss_terms`` (``RLObjectiveConfig.loss_kwargs()``).
    With ``kl_coef > 0`` the reference log-probs come from ``ref_params`` (frozen) inside the step.
    Returns metrics: the objective's sums/maxima reduced over micro-batches plus ``loss``, ``grad_norm``
    (before clipping), ``update_norm``, ``denominator``. ``skip_inert=False`` computes every micro-batch.
    """
    kw = dict(loss_kwargs)
    use_ref = kw.get("kl_coef", 0.0) != 0.0
    # Without KL or entropy terms a row with effective advantage 0 has an exactly zero gradient.
    skip_inert = skip_inert and not use_ref and kw.get("entropy_coef", 0.0) == 0.0

    def update(params, opt_state, batch, prox_logp, ref_params):
        def micro(grad_acc, xs):
            mb, prox = xs

            def loss_fn(p):
                model = nnx.merge(graphdef, p)
                logp, ent = token_logprobs(model, mb, temperature=temperature, with_entropy=with_entropy, impl=impl)
                ref = None
                if use_ref:
                    ref_model = nnx.merge(graphdef, ref_params)
                    ref, _ = token_logprobs(ref_model, mb, temperature=temperature, impl=impl)
                    ref = jax.lax.stop_gradient(ref)
                num, den, metrics = policy_loss_terms(
                    logp, prox, mb["behaviour_logp"], mb["advantages"], mb["loss_mask"],
                    ref_logp=ref, entropy=ent, **kw,
                )
                return num, (den, metrics)

            def computed(grad_acc):
                (num, (den, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
                return jax.tree.map(jnp.add, grad_acc, grads), (num, den, metrics)

            if not skip_inert:
                return computed(grad_acc)

            def skipped(grad_acc):
                shapes = jax.eval_shape(loss_fn, params)[1][1]
                empty = {k: jnp.full(v.shape, -jnp.inf if METRIC_REDUCTIONS.get(k, ("sum",))[0] == "max" else 0.0,
                                     v.dtype) for k, v in shapes.items()}
                den = aggregation_denominator(mb["loss_mask"], kw.get("aggregation", "token_mean"),
                                              kw.get("max_response_len"))
                return grad_acc, (jnp.zeros((), jnp.float32), den, empty)

            active = has_policy_gradient(mb["advantages"], mb["loss_mask"],
                                         negative_weight=kw.get("negative_weight", 1.0)).any()
            return jax.lax.cond(active, computed, skipped, grad_acc)

        zeros = jax.tree.map(jnp.zeros_like, params)
        grad_sum, (nums, dens, stacked) = jax.lax.scan(micro, zeros, (batch, prox_logp))
        num, den = nums.sum(), dens.sum()
        # Divide once by the global denominator; an empty mini-batch (den 0) gives zero gradients.
        scale = jnp.where(den > 0, 1.0 / jnp.maximum(den, 1e-12), 0.0)
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grad_sum)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = reduce_stacked_metrics(stacked)
        metrics["loss"] = num * scale
        metrics["denominator"] = den
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["update_norm"] = optax.tree.norm(updates)
        return params, opt_state, metrics

    if param_sharding is None:
        return jax.jit(update, donate_argnums=(0, 1))
    batch_sh = {k: (adv_sharding if k == "advantages" else stacked_sharding) for k in BATCH_KEYS}
    return jax.jit(
        update,
        in_shardings=(param_sharding, opt_sharding, batch_sh, stacked_sharding,
                      param_sharding if use_ref else None),
        out_shardings=(param_sharding, opt_sharding, replicated),
        donate_argnums=(0, 1),
    )


def stacked_shardings(mesh: Any, batch_axes: Any) -> tuple[NamedSharding, NamedSharding, NamedSharding]:
    """Shardings of [M, b, T] arrays, [M, b] arrays and [b, T] arrays: the sample axis over ``batch_axes``."""
    return (
        NamedSharding(mesh, P(None, batch_axes, None)),
        NamedSharding(mesh, P(None, batch_axes)),
        NamedSharding(mesh, P(batch_axes, None)),
    )


__all__ += ["stacked_shardings"]
