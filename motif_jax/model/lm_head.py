"""Hidden states -> LM head, the one path every consumer of token log-probs takes (SFT loss, RL objective, trace
scoring): the fused kernel of ``motif_kernels.lm_head`` (no [tokens, vocab] logits), vocab-parallel under a mesh.

Under an active mesh (``jax.set_mesh`` / ``parallel.mesh.activate``) whose ``vocab`` rule maps to a mesh axis, the
kernel splits the output projection over that axis and the tokens over the ``batch`` and ``length`` rules' axes
(each device computes its vocabulary slice; 4 floats per token cross the vocab axis). ``loss="naive"``
materialises fp32 logits instead: a baseline for memory comparisons.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp

from motif_kernels import linear_cross_entropy_sums, linear_log_probs, sharded_linear_log_probs
from motif_jax.config import DEFAULT_LOGICAL_RULES
from motif_jax.parallel.rules import active_rules, logical_to_spec

__all__ = ["cross_entropy_sums", "token_log_probs", "vocab_parallel_axes"]

Head = Literal["fused", "naive"]


def vocab_parallel_axes() -> dict[str, Any]:
    """Keyword arguments (mesh, token_axes, vocab_axis) of the vocab-parallel kernel for the active mesh and rules;
    empty when there is no mesh, or the ``vocab`` rule maps to no axis of it (the plain kernel is used). A vocab
    axis of size 1 still takes the sharded kernel: its shard_map keeps each device on its own tokens."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return {}
    rules = active_rules() or DEFAULT_LOGICAL_RULES
    tokens: list[str] = []
    for entry in logical_to_spec(("batch", "length"), rules, mesh.axis_names):
        if entry is not None:
            tokens.extend((entry,) if isinstance(entry, str) else entry)
    vocab = logical_to_spec(("vocab",), rules, mesh.axis_names)[0]
    vocab = None if vocab is None else (vocab if isinstance(vocab, str) else vocab[0])
    if vocab is None or vocab in tokens:
        return {}
    return {"mesh": mesh, "token_axes": tuple(tokens), "vocab_axis": vocab}


def _head_inputs(model: Any, batch: Mapping[str, jax.Array], temperature: float) -> tuple[jax.Array, jax.Array]:
    """(x [B*T, D] final hidden states, scaled by 1 / temperature; w [D, V])."""
    hidden, _ = model(batch["tokens"], batch["segment_ids"], batch["positions"])
    b, t, d = hidden.shape
    x = hidden.reshape(b * t, d)
    if temperature != 1.0:
        x = x * jnp.asarray(1.0 / temperature, x.dtype)
    return x, model.output_projection()


def _naive_log_softmax(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(jnp.dot(x, w, preferred_element_type=jnp.float32), axis=-1)


def token_log_probs(
    model: Any,
    batch: Mapping[str, jax.Array],
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    impl: str = "auto",
    head: Head = "fused",
) -> tuple[jax.Array, jax.Array | None]:
    """Per-token log pi(target) under softmax(logits / temperature), and optionally that distribution's entropy.

    batch: ``tokens``, ``targets``, ``segment_ids``, ``positions`` [B, T]. Returns (logp [B, T] f32, entropy
    [B, T] f32 or None); values at padding positions are meaningless (mask them). Differentiable.
    """
    x, w = _head_inputs(model, batch, temperature)
    b, t = batch["targets"].shape
    targets = batch["targets"].reshape(b * t).astype(jnp.int32)
    if head == "naive":
        logz = _naive_log_softmax(x, w)
        logp = jnp.take_along_axis(logz, targets[:, None], axis=-1)[:, 0]
        ent = -jnp.sum(jnp.exp(logz) * logz, axis=-1) if with_entropy else None
    else:
        kw = vocab_parallel_axes()
        fn = sharded_linear_log_probs if kw else linear_log_probs
        logp, ent = fn(x, w, targets, with_entropy=with_entropy, impl=impl, **kw)
    return logp.reshape(b, t), (None if ent is None else ent.reshape(b, t))


def cross_entropy_sums(
    model: Any,
    batch: Mapping[str, jax.Array],
    *,
    impl: str = "auto",
    head: Head = "fused",
    z_loss: float = 0.0,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Masked next-token cross-entropy as sums: (numerator, denominator, {"nll_sum"}), f32 scalars.

    batch: tokens, targets, loss_mask, segment_ids, positions [B, T]. numerator = sum(mask * nll) (+ z_loss *
    sum(mask * lse^2)), denominator = sum(mask): sum both over micro-batches and divide once.
    """
    x, w = _head_inputs(model, batch, 1.0)
    b, t = batch["targets"].shape
    targets = batch["targets"].reshape(b * t).astype(jnp.int32)
    mask = batch["loss_mask"].reshape(b * t).astype(jnp.float32)
    if head == "naive":
        logits = jnp.dot(x, w, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        safe = jnp.where(mask > 0, targets, 0)
        nll_sum = -jnp.sum(mask * (jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0] - lse))
        num = nll_sum + z_loss * jnp.sum(mask * lse * lse) if z_loss else nll_sum
        return num, jnp.sum(mask), {"nll_sum": jax.lax.stop_gradient(nll_sum)}
    num, den, aux = linear_cross_entropy_sums(x, w, targets, mask, z_loss=z_loss, impl=impl, **vocab_parallel_axes())
    return num, den, {"nll_sum": aux["nll_sum"]}
