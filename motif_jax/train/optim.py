"""Optimizers: AdamW (or Muon for weight matrices) with warm-up + decay schedules, clipping and a weight-decay mask.

Parameters are the model's ``nnx.State``; per-layer weights are stacked on a leading ``layers`` axis (scanned
layers), so "is this a matrix" is decided on the shape without that axis and on the parameter's name, never on
``ndim`` alone (a stacked norm weight is 2-D).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon
from optax.contrib._muon import scale_by_shape

from motif_jax.train.config import OptimConfig

__all__ = ["decay_mask", "make_optimizer", "make_schedule", "muon_labels", "learning_rate_of"]

# Parameter names (any path component containing one of these) that never get weight decay or Muon.
_NO_DECAY = ("norm", "bias", "lambda", "poly", "scale")
# 2-D parameters kept on AdamW under Muon (embedding tables and the LM head: Muon is for hidden matrices).
_EMBEDDINGS = ("embed", "lm_head")


def _keys(path) -> tuple[str, ...]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return tuple(k for k in out if k != "value")


def _matrix_info(path, x) -> tuple[bool, int]:
    """(is a weight matrix, number of leading stacked axes) for one parameter leaf."""
    keys = _keys(path)
    stacked = 1 if "layers" in keys else 0
    excluded = any(p in k.lower() for k in keys for p in _NO_DECAY)
    return (len(x.shape) - stacked >= 2) and not excluded, stacked


def decay_mask(params: Any) -> Any:
    """True for weight matrices and embeddings; False for norms, biases, lambdas, PolyNorm coefficients, 1-D."""
    return jax.tree_util.tree_map_with_path(lambda p, x: _matrix_info(p, x)[0], params)


def muon_labels(params: Any) -> Any:
    """"muon" for hidden weight matrices (attention / MLP projections), "adam" for everything else."""

    def label(path, x):
        is_matrix, _ = _matrix_info(path, x)
        name = _keys(path)[-1] if _keys(path) else ""
        return "muon" if is_matrix and name not in _EMBEDDINGS else "adam"

    return jax.tree_util.tree_map_with_path(label, params)


def _muon_dims(params: Any) -> Any:
    """Muon dimension numbers: a stacked [layers, in, out] kernel is a batch of [in, out] matrices."""

    def dims(x):
        if isinstance(x, optax.MaskedNode):
            return x
        lead = len(x.shape) - 2
        return MuonDimensionNumbers(reduction_axis=lead, output_axis=lead + 1)

    return jax.tree.map(dims, params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def make_schedule(cfg: OptimConfig, total_steps: int, peak: float | None = None) -> optax.Schedule:
    """Linear warm-up to ``peak`` (default ``cfg.lr``) over ``cfg.warmup_steps``, then cosine / linear / constant
    decay to ``peak * cfg.min_lr_ratio`` at ``total_steps``. The first update already uses ``peak / warmup_steps``.
    """
    peak = cfg.lr if peak is None else peak
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warm = cfg.warmup_steps
    rest = max(total_steps - warm, 1)
    end = peak * cfg.min_lr_ratio
    if cfg.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps=rest, alpha=cfg.min_lr_ratio)
    elif cfg.decay == "linear":
        decay = optax.linear_schedule(peak, end, transition_steps=rest)
    else:
        decay = optax.constant_schedule(peak)
    if warm == 0:
        return decay
    warmup = optax.linear_schedule(peak / warm, peak, transition_steps=max(warm - 1, 0))
    return optax.join_schedules([warmup, decay], [warm])


def make_optimizer(
    cfg: OptimConfig, total_steps: int, schedule: optax.Schedule | None = None
) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) -> AdamW (decoupled weight decay on matrices / embeddings only).

    With ``cfg.name == "muon"``: hidden weight matrices (stacked [layers, in, out] kernels are batches of
    matrices) get Muon (Nesterov momentum, Newton-Schulz orthogonalisation, shape scaling, decoupled weight decay);
    embeddings, the LM head and all vectors stay on AdamW with the same mask.
    """
    # ``schedule`` (e.g. an SFT curriculum's joined per-stage schedules) replaces the one built from ``cfg``.
    schedule = schedule or make_schedule(cfg, total_steps)
    mu_dtype = jnp.dtype(cfg.mu_dtype) if cfg.mu_dtype else None
    adam = optax.adamw(
        schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask,
        mu_dtype=mu_dtype,
    )
    if cfg.name == "adamw":
        core = adam
    else:
        muon_scale = (cfg.muon_lr or cfg.lr) / cfg.lr
        muon_schedule = lambda count: schedule(count) * muon_scale
        muon = optax.chain(
            scale_by_muon(ns_steps=cfg.muon_ns_steps, beta=cfg.muon_beta, eps=cfg.eps, mu_dtype=mu_dtype,
                          weight_dimension_numbers=_muon_dims),
            scale_by_shape(weight_dimension_numbers=_muon_dims),
            optax.add_decayed_weights(cfg.weight_decay),
            optax.scale_by_learning_rate(muon_schedule),
        )
        core = optax.partition({"muon": muon, "adam": adam}, muon_labels)
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), core)
    return core


def learning_rate_of(opt_state: Any, schedule: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """The learning rate the next update of ``opt_state`` will use (its first step counter through ``schedule``)."""
    counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    if not counts:
        return jnp.asarray(schedule(0), jnp.float32)
    return jnp.asarray(schedule(counts[0][1]), jnp.float32)
