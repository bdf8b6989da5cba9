"""Policy objective for GRPO-style RL with buffered, off-policy trajectory reuse (pure JAX, jit-able).

Notation (see docs of :func:`policy_loss_terms`): ``l`` = log pi_theta (differentiable), ``lp`` = proximal log-probs
(detached; the parameters at the start of the update round, or ``lb`` in the "bypass" variant), ``lb`` = behaviour
log-probs stored with each sample (sampling temperature applied), ``A`` = group advantage, ``m`` = loss mask.

Per token::

    rho = exp(clamp(l - lp, +-20))                    (GSPO, ratio_level="sequence": exp(mean_t(l - lp)) per sequence)
    w   = min(exp(clamp(lp - lb, +-20)), C)           (detached; per sequence with the summed log-ratio)
    s   = min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)
    s   = max(s, c * A) where A < 0                   (dual clip, c > 1)
    L   = -w * s + beta * k3(lref, l) - eta * H       (k3 = exp(lref - l) - (lref - l) - 1)

The loss of a mini-batch is ``sum(numerators) / sum(denominators)`` over its micro-batches (and devices): each call
returns sums, never means, so gradient accumulation gives exactly the whole-batch loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LOG_RATIO_CLAMP",
    "METRICS",
    "REDUCTIONS",
    "aggregation_denominator",
    "finalize_metrics",
    "group_advantages",
    "has_policy_gradient",
    "policy_loss_terms",
    "zero_std_groups",
]

LOG_RATIO_CLAMP = 20.0

Array = jax.Array


def _grouped(rewards: np.ndarray, group_size: int | None) -> tuple[np.ndarray, tuple[int, ...]]:
    r = np.asarray(rewards, dtype=np.float64)
    shape = r.shape
    if r.ndim == 2:
        if group_size is not None and group_size != r.shape[1]:
            raise ValueError(f"rewards have groups of {r.shape[1]} but group_size={group_size}")
        return r, shape
    if r.ndim != 1:
        raise ValueError(f"rewards must be [N, G] or [N*G], got shape {shape}")
    if group_size is None or group_size < 1 or r.shape[0] % group_size:
        raise ValueError(
            f"flat rewards of length {r.shape[0]} need a group_size that divides it (got {group_size}); "
            "pass [N, G] rewards or whole groups only"
        )
    return r.reshape(-1, group_size), shape


def group_advantages(
    rewards: np.ndarray,
    group_size: int | None = None,
    *,
    normalize_std: bool = True,
    eps: float = 1e-6,
    ddof: int = 1,
) -> np.ndarray:
    """Group-relative advantages, computed once per complete group (on the host: numpy, float32 result).

    rewards: [N, G] or flat [N*G] (then ``group_size=G`` is required; samples of a group are contiguous).
    Returns an array of the same shape: ``(r - mean_g r) / (std_g r + eps)`` (GRPO, ``normalize_std=True``) or
    ``r - mean_g r`` (Dr. GRPO). ``ddof`` is the std's delta degrees of freedom: 1 (default) the sample std, as
    TRL and verl use (torch's ``std``), 0 the population std (advantages sqrt(G / (G - 1)) larger). A group whose
    rewards are all equal gets advantages 0 (see :func:`zero_std_groups`).
    """
    r, shape = _grouped(rewards, group_size)
    centered = r - r.mean(axis=1, keepdims=True)
    if normalize_std:
        centered = centered / (r.std(axis=1, ddof=ddof, keepdims=True) + eps)
    return centered.reshape(shape).astype(np.float32)


def zero_std_groups(rewards: np.ndarray, group_size: int | None = None, *, tol: float = 1e-8) -> np.ndarray:
    """[N] bool: groups whose rewards are all equal (no learning signal; DAPO drops them)."""
    r, _ = _grouped(rewards, group_size)
    return (r.max(axis=1) - r.min(axis=1)) <= tol


def _masked_seq_sum(x: Array, m: Array) -> Array:
    return jnp.sum(x * m, axis=-1)


def aggregation_denominator(
    mask: Array,
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_sum_norm"] = "token_mean",
    max_response_len: int | None = None,
) -> Array:
    """The loss denominator of one micro-batch (mask [B, T]): what :func:`policy_loss_terms` divides by."""
    m = jnp.asarray(mask).astype(jnp.float32)
    if aggregation == "token_mean":
        return jnp.sum(m)
    seqs = jnp.sum(m.sum(axis=-1) > 0).astype(jnp.float32)
    if aggregation == "seq_mean_token_mean":
        return seqs
    return seqs * float(max_response_len if max_response_len is not None else m.shape[1])


def has_policy_gradient(advantages: Array, mask: Array, *, negative_weight: float = 1.0) -> Array:
    """[B] bool: rows whose clipped policy term can have a nonzero gradient (tokens and a nonzero effective
    advantage). Every other row adds only to the denominator, unless a KL or entropy term acts on all rows."""
    adv = _weighted_advantages(jnp.asarray(advantages, jnp.float32), negative_weight)
    return (adv != 0) & (jnp.asarray(mask).astype(jnp.float32).sum(axis=-1) > 0)


def _weighted_advantages(adv: Array, negative_weight: float) -> Array:
    """Negative advantages scaled by ``negative_weight`` (see :func:`policy_loss_terms`)."""
    return adv if negative_weight == 1.0 else jnp.where(adv < 0, negative_weight * adv, adv)


def policy_loss_terms(
    logp: Array,
    prox_logp: Array,
    behaviour_logp: Array,
    advantages: Array,
    mask: Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = 3.0,
    is_cap: float | None = 2.0,
    is_level: Literal["token", "sequence", "none"] = "token",
    ratio_level: Literal["token", "sequence"] = "token",
    kl_coef: float = 0.0,
    ref_logp: Array | None = None,
    entropy: Array | None = None,
    entropy_coef: float = 0.0,
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_sum_norm"] = "token_mean",
    max_response_len: int | None = None,
    negative_weight: float = 1.0,
) -> tuple[Array, Array, dict[str, Array]]:
    """Clipped, importance-weighted policy-gradient loss of one micro-batch as ``(numerator, denominator, metrics)``.

    Args:
      logp: [B, T] log pi_theta of each target token (differentiable).
      prox_logp: [B, T] proximal log-probs lp (detached inside).
      behaviour_logp: [B, T] behaviour log-probs lb (detached inside).
      advantages: [B] per-sequence advantages (detached inside; broadcast to tokens).
      mask: [B, T] loss mask, 1 on generated tokens (bool or float). Rows that are all 0 (padding) contribute
        nothing, not even to the sequence counts.
      eps_low, eps_high: asymmetric clip range [1 - eps_low, 1 + eps_high] of the ratio.
      dual_clip: c > 1 bounds the loss of negative-advantage tokens by ``-c * A`` (None: off).
      is_cap: truncation C of the off-policy weight (None: untruncated).
      is_level: ``token`` w_t = min(exp(lp_t - lb_t), C); ``sequence`` one weight per sequence from the summed
        log-ratio; ``none`` w = 1.
      ratio_level: ``token`` (PPO/GRPO) or ``sequence`` (GSPO: rho = exp(masked mean of l - lp), shared by the
        tokens of a sequence, gradient flowing to all of them).
      kl_coef, ref_logp: weight beta and [B, T] reference log-probs of the k3 KL penalty (ref required if beta > 0).
      entropy, entropy_coef: [B, T] per-token entropy (differentiable) and its bonus weight eta.
      aggregation: ``token_mean``: num = sum m L, den = sum m (DAPO). ``seq_mean_token_mean``: num = sum over
        sequences of the sequence's token-mean, den = number of (non-empty) sequences (GRPO paper).
        ``seq_sum_norm``: num = sum m L, den = number of sequences * L_max (Dr. GRPO), L_max = ``max_response_len``
        or T.
      negative_weight: scale of negative advantages (1: plain GRPO; < 1 down-weights failed samples, as in
        W-REINFORCE; 0: only successes are reinforced). A failed sample's advantage lands on every token after its
        mistake too, which are often right given their context; with a small, low-entropy policy that collateral
        push can outweigh the signal.

    Returns:
      numerator, denominator: scalars; the loss is sum(numerators) / sum(denominators) over micro-batches.
      metrics: dict of scalars that aggregate across micro-batches by :data:`REDUCTIONS` (``*_max`` by max,
        everything else by sum; the step engine does it) and become means with :func:`finalize_metrics`. Token-level metrics count masked
        tokens (``tokens``); with sequence-level ratios/weights each token carries its sequence's value.
    """
    if ratio_level not in ("token", "sequence"):
        raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
    if is_level not in ("token", "sequence", "none"):
        raise ValueError(f"is_level must be 'token', 'sequence' or 'none', got {is_level!r}")
    if aggregation not in ("token_mean", "seq_mean_token_mean", "seq_sum_norm"):
        raise ValueError(f"unknown aggregation {aggregation!r}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp (reference-model log-probs)")
    if logp.ndim != 2 or logp.shape != prox_logp.shape or logp.shape != behaviour_logp.shape:
        raise ValueError(f"logp/prox_logp/behaviour_logp must be equal [B, T]: {logp.shape}, {prox_logp.shape}, "
                         f"{behaviour_logp.shape}")
    if mask.shape != logp.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(f"mask must be [B, T] and advantages [B]; got {mask.shape}, {advantages.shape}")

    f32 = jnp.float32
    sg = jax.lax.stop_gradient
    l = logp.astype(f32)
    lp = sg(prox_logp.astype(f32))
    lb = sg(behaviour_logp.astype(f32))
    adv = _weighted_advantages(sg(advantages.astype(f32))[:, None], negative_weight)
    m = mask.astype(f32)
    tok_count = m.sum(axis=-1)  # [B]
    seq_valid = (tok_count > 0).astype(f32)  # [B]
    safe_count = jnp.maximum(tok_count, 1.0)
    clamp = LOG_RATIO_CLAMP

    # Ratio to the proximal policy.
    if ratio_level == "token":
        log_ratio = jnp.clip(l - lp, -clamp, clamp)
    else:
        seq_lr = _masked_seq_sum(l - lp, m) / safe_count
        log_ratio = jnp.broadcast_to(jnp.clip(seq_lr, -clamp, clamp)[:, None], l.shape)
    ratio = jnp.exp(log_ratio)

    # Truncated off-policy weight (detached).
    if is_level == "token":
        raw_w = jnp.exp(jnp.clip(lp - lb, -clamp, clamp))
    elif is_level == "sequence":
        raw_w = jnp.broadcast_to(jnp.exp(jnp.clip(_masked_seq_sum(lp - lb, m), -clamp, clamp))[:, None], l.shape)
    else:
        raw_w = jnp.ones_like(l)
    w = raw_w if is_cap is None else jnp.minimum(raw_w, is_cap)
    w = sg(w)

    # Clipped surrogate with asymmetric range and optional dual clip.
    surr1 = ratio * adv
    surr2 = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    surr = jnp.minimum(surr1, surr2)
    if dual_clip is not None:
        dual_active = (adv < 0) & (surr < dual_clip * adv)
        surr = jnp.where(adv < 0, jnp.maximum(surr, dual_clip * adv), surr)
    else:
        dual_active = jnp.zeros(l.shape, dtype=bool)
    per_token = -w * surr

    k3 = None
    if ref_logp is not None:
        d = jnp.clip(sg(ref_logp.astype(f32)) - l, -clamp, clamp)
        k3 = jnp.exp(d) - d - 1.0
        if kl_coef != 0.0:
            per_token = per_token + kl_coef * k3
    if entropy is not None and entropy_coef != 0.0:
        per_token = per_token - entropy_coef * entropy.astype(f32)

    # Aggregation (global counts: sums only).
    if aggregation == "seq_mean_token_mean":
        numerator = jnp.sum(_masked_seq_sum(per_token, m) / safe_count * seq_valid)
    else:
        numerator = jnp.sum(per_token * m)
    denominator = aggregation_denominator(m, aggregation, max_response_len)

    # Health metrics, all as sums (or maxima) over masked tokens.
    ratio_d = sg(ratio)
    clip_high = (adv > 0) & (ratio_d > 1.0 + eps_high)
    clip_low = (adv < 0) & (ratio_d < 1.0 - eps_low)
    neg_inf = jnp.asarray(-jnp.inf, f32)
    mb = m > 0
    diff = jnp.abs(lp - lb)
    metrics = {
        "tokens": jnp.sum(m),
        "sequences": jnp.sum(seq_valid),
        "loss_sum": sg(jnp.sum(per_token * m)),
        "clip_high_sum": jnp.sum(clip_high * m),
        "clip_low_sum": jnp.sum(clip_low * m),
        "dual_clip_sum": jnp.sum(dual_active * m),
        "ratio_sum": jnp.sum(ratio_d * m),
        "ratio_max": jnp.max(jnp.where(mb, ratio_d, neg_inf)),
        "is_weight_sum": jnp.sum(w * m),
        "is_weight_max": jnp.max(jnp.where(mb, w, neg_inf)),
        "is_truncated_sum": jnp.sum(((raw_w > is_cap) if is_cap is not None else jnp.zeros_like(mb)) * m),
        "prox_behaviour_absdiff_sum": jnp.sum(diff * m),
        "prox_behaviour_absdiff_max": jnp.max(jnp.where(mb, diff, neg_inf)),
        "approx_kl_sum": sg(jnp.sum((lp - l) * m)),
        "advantage_sum": jnp.sum(sg(advantages.astype(f32)) * seq_valid),
    }
    if entropy is not None:
        metrics["entropy_sum"] = sg(jnp.sum(entropy.astype(f32) * m))
    if k3 is not None:
        metrics["kl_ref_sum"] = sg(jnp.sum(k3 * m))
    return numerator, denominator, metrics


# The one metric table: name -> (reduction over micro-batches, count that turns the sum into a mean (None:
# reported as is), the name reported). Maxima over zero tokens are -inf, means over zero tokens 0.
METRICS: dict[str, tuple[str, str | None, str]] = {
    "tokens": ("sum", None, "tokens"),
    "sequences": ("sum", None, "sequences"),
    "loss_sum": ("sum", "tokens", "loss_token_mean"),
    "clip_high_sum": ("sum", "tokens", "clip_frac_high"),
    "clip_low_sum": ("sum", "tokens", "clip_frac_low"),
    "dual_clip_sum": ("sum", "tokens", "dual_clip_frac"),
    "ratio_sum": ("sum", "tokens", "ratio_mean"),
    "ratio_max": ("max", None, "ratio_max"),
    "is_weight_sum": ("sum", "tokens", "is_weight_mean"),
    "is_weight_max": ("max", None, "is_weight_max"),
    "is_truncated_sum": ("sum", "tokens", "is_truncated_frac"),
    "prox_behaviour_absdiff_sum": ("sum", "tokens", "prox_behaviour_absdiff_mean"),
    "prox_behaviour_absdiff_max": ("max", None, "prox_behaviour_absdiff_max"),
    "approx_kl_sum": ("sum", "tokens", "approx_kl"),
    "advantage_sum": ("sum", "sequences", "advantage_mean"),
    "entropy_sum": ("sum", "tokens", "entropy_mean"),
    "kl_ref_sum": ("sum", "tokens", "kl_ref_mean"),
}
REDUCTIONS = {name: how for name, (how, _, _) in METRICS.items()}


def finalize_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Reduced sums -> means by :data:`METRICS` (``clip_high_sum`` -> ``clip_frac_high`` ...); maxima, counts and
    names the table does not know (the engine's loss, grad_norm, ...) pass through."""
    out: dict[str, float] = {}
    for key, val in metrics.items():
        _, count, name = METRICS.get(key, ("sum", None, key))
        v = float(np.asarray(val))
        if count is not None:
            c = float(np.asarray(metrics[count]))
            v = v / c if c > 0 else 0.0
        out[name] = v
    return out
