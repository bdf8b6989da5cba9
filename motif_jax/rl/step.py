"""What RL plugs into the step engine (``motif_jax.train.step``): the policy objective as a :class:`Loss`, and the
jitted log-prob pass (proximal / reference log-probs).

Batch layout (see ``motif_jax.rl.buffer.collate``): per-token arrays [B, T] line up with ``targets``, the log-prob
of response token j at position ``P - 1 + j``; ``advantages`` is [B]; ``prox_logp`` holds the round's proximal
log-probs. Log-probs are ``log softmax(z / temperature)`` to match the sampler's behaviour log-probs, through the
shared LM head (``motif_jax.model.lm_head.token_log_probs``: fused, vocab-parallel under a mesh, no [tokens, vocab]
logits).

A micro-batch none of whose rows has a policy gradient (every effective advantage 0, e.g. the failures when
``negative_weight`` is 0, and no KL or entropy term) adds only its denominator: the engine skips its forward and
backward passes, so the update puts the rows with a gradient first. The health metrics then describe the
micro-batches that were computed.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
from flax import nnx
from jax.sharding import NamedSharding

from motif_jax.data.pipeline import BATCH_KEYS
from motif_jax.model.lm_head import token_log_probs
from motif_jax.rl.objective import REDUCTIONS, aggregation_denominator, has_policy_gradient, policy_loss_terms
from motif_jax.train.config import StepConfig
from motif_jax.train.step import Loss

__all__ = ["RL_BATCH_KEYS", "make_logprob_fn", "policy_loss"]

# The arrays of an RL update batch: the language-model ones plus the sampler's log-probs, the advantages and the
# proximal log-probs of the round.
RL_BATCH_KEYS = (*BATCH_KEYS, "behaviour_logp", "advantages", "prox_logp")


def policy_loss(
    graphdef: nnx.GraphDef,
    loss_kwargs: Mapping[str, Any],
    *,
    temperature: float,
    step_cfg: StepConfig = StepConfig(),
    skip_inert: bool = True,
) -> Loss:
    """The clipped, importance-weighted policy objective (``objective.policy_loss_terms``) as an engine loss.

    ``loss_kwargs``: static keyword arguments of ``policy_loss_terms`` (``RLObjectiveConfig.loss_kwargs()``, with
    ``max_response_len`` set). With ``kl_coef > 0`` the step's ``frozen`` argument is the reference parameters.
    ``skip_inert=False`` computes every micro-batch (the skip is exact: without KL or entropy terms a row with
    effective advantage 0 has an exactly zero gradient).
    """
    kw = dict(loss_kwargs)
    use_ref = kw.get("kl_coef", 0.0) != 0.0
    lp = dict(temperature=temperature, impl=step_cfg.loss_impl, head=step_cfg.loss)

    def fn(params, mb, ref_params):
        logp, ent = token_log_probs(nnx.merge(graphdef, params), mb, with_entropy=True, **lp)
        ref = None
        if use_ref:
            ref = jax.lax.stop_gradient(token_log_probs(nnx.merge(graphdef, ref_params), mb, **lp)[0])
        return policy_loss_terms(logp, mb["prox_logp"], mb["behaviour_logp"], mb["advantages"], mb["loss_mask"],
                                 ref_logp=ref, entropy=ent, **kw)

    def skip(mb):
        active = has_policy_gradient(mb["advantages"], mb["loss_mask"],
                                     negative_weight=kw.get("negative_weight", 1.0)).any()
        return active, aggregation_denominator(mb["loss_mask"], kw.get("aggregation", "token_mean"),
                                               kw.get("max_response_len"))

    inert_is_exact = not use_ref and kw.get("entropy_coef", 0.0) == 0.0
    return Loss(fn=fn, keys=RL_BATCH_KEYS, reductions=REDUCTIONS,
                skip=skip if skip_inert and inert_is_exact else None)


def make_logprob_fn(graphdef: nnx.GraphDef, *, temperature: float, step_cfg: StepConfig = StepConfig(),
                    param_sharding: Any = None, batch_sharding: NamedSharding | None = None) -> Callable:
    """Jitted ``(params, batch [b, T]) -> logp [b, T]`` (no gradient, no entropy), under the active mesh."""

    def fn(params, batch):
        logp, _ = token_log_probs(nnx.merge(graphdef, params), batch, temperature=temperature,
                                  impl=step_cfg.loss_impl, head=step_cfg.loss)
        return jax.lax.stop_gradient(logp)

    if param_sharding is None:
        return jax.jit(fn)
    return jax.jit(fn, in_shardings=(param_sharding, batch_sharding), out_shardings=batch_sharding)
