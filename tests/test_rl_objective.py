"""Policy objective: hand-computed values, gradients, micro-batch aggregation, group advantages."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from motif_jax.rl.config import RLObjectiveConfig
from motif_jax.train.step import reduce_stacked
from motif_jax.rl.objective import (
    REDUCTIONS,
    finalize_metrics,
    group_advantages,
    policy_loss_terms,
    zero_std_groups,
)


def _one_token(ratio: float, adv: float, w: float = 1.0, **kw):
    """Single token: l - lp = log(ratio), lp - lb = log(w). Returns (loss, dloss/dl, metrics)."""
    lp = jnp.array([[-1.0]])
    lb = lp - math.log(w)
    mask = jnp.ones((1, 1))
    a = jnp.array([adv])

    def loss(l):
        num, den, met = policy_loss_terms(l, lp, lb, a, mask, **kw)
        return num / den, met

    l = lp + math.log(ratio)
    (val, met), grad = jax.value_and_grad(loss, has_aux=True)(l)
    return float(val), float(grad[0, 0]), finalize_metrics(met)


def test_unclipped_token_matches_ratio_times_advantage():
    val, grad, met = _one_token(1.1, 1.0)
    assert val == pytest.approx(-1.1, rel=1e-6)
    assert grad == pytest.approx(-1.1, rel=1e-6)  # d(-rho A)/dl = -rho A
    assert met["clip_frac_high"] == 0 and met["clip_frac_low"] == 0


def test_negative_weight_scales_only_negative_advantages():
    val, grad, _ = _one_token(1.1, -1.0, negative_weight=0.25)
    assert val == pytest.approx(0.25 * 1.1, rel=1e-6) and grad == pytest.approx(0.25 * 1.1, rel=1e-6)
    assert _one_token(1.1, -1.0, negative_weight=0.0)[:2] == (0.0, 0.0)  # successes only
    assert _one_token(1.1, 2.0, negative_weight=0.0)[0] == pytest.approx(-2.2, rel=1e-6)  # positives untouched


def test_clip_high_value_and_zero_gradient():
    val, grad, met = _one_token(1.5, 1.0, eps_high=0.28)
    assert val == pytest.approx(-1.28, rel=1e-6)
    assert grad == 0.0
    assert met["clip_frac_high"] == 1.0 and met["clip_frac_low"] == 0.0


def test_clip_low_value_and_zero_gradient():
    val, grad, met = _one_token(0.5, -1.0, eps_low=0.2)
    assert val == pytest.approx(0.8, rel=1e-6)  # -min(-0.5, -0.8)
    assert grad == 0.0
    assert met["clip_frac_low"] == 1.0 and met["clip_frac_high"] == 0.0


def test_ratio_inside_low_side_keeps_gradient_for_positive_advantage():
    # A > 0 and rho < 1 - eps: the unclipped term is the min, the gradient flows (PPO's pessimistic bound).
    val, grad, _ = _one_token(0.5, 1.0)
    assert val == pytest.approx(-0.5, rel=1e-6)
    assert grad == pytest.approx(-0.5, rel=1e-6)


def test_dual_clip_bounds_negative_advantage_loss():
    val, grad, met = _one_token(5.0, -1.0, dual_clip=3.0)
    assert val == pytest.approx(3.0, rel=1e-6)
    assert grad == 0.0
    assert met["dual_clip_frac"] == 1.0
    val_nd, grad_nd, met_nd = _one_token(5.0, -1.0, dual_clip=None)
    assert val_nd == pytest.approx(5.0, rel=1e-6)
    assert grad_nd == pytest.approx(5.0, rel=1e-6)
    assert met_nd["dual_clip_frac"] == 0.0


def test_truncated_importance_weight_token_level():
    val, grad, met = _one_token(1.0, 1.0, w=3.0, is_cap=2.0)
    assert val == pytest.approx(-2.0, rel=1e-6)
    assert grad == pytest.approx(-2.0, rel=1e-6)  # w is detached: d(-w rho A)/dl = -w rho A
    assert met["is_weight_mean"] == pytest.approx(2.0)
    assert met["is_weight_max"] == pytest.approx(2.0)
    assert met["is_truncated_frac"] == 1.0
    assert met["prox_behaviour_absdiff_mean"] == pytest.approx(math.log(3.0), rel=1e-6)
    val_u, _, met_u = _one_token(1.0, 1.0, w=1.5, is_cap=2.0)
    assert val_u == pytest.approx(-1.5, rel=1e-6) and met_u["is_truncated_frac"] == 0.0
    val_n, _, _ = _one_token(1.0, 1.0, w=3.0, is_cap=None)
    assert val_n == pytest.approx(-3.0, rel=1e-6)
    val_off, _, _ = _one_token(1.0, 1.0, w=3.0, is_level="none")
    assert val_off == pytest.approx(-1.0, rel=1e-6)


def test_sequence_level_is_weight_uses_summed_log_ratio():
    lp = jnp.zeros((1, 3))
    lb = jnp.array([[-0.2, -0.3, -5.0]])  # third token masked out
    mask = jnp.array([[1.0, 1.0, 0.0]])
    num, den, met = policy_loss_terms(lp, lp, lb, jnp.array([1.0]), mask, is_level="sequence", is_cap=10.0)
    w = math.exp(0.5)
    assert float(num / den) == pytest.approx(-w, rel=1e-6)
    assert finalize_metrics(met)["is_weight_mean"] == pytest.approx(w, rel=1e-6)
    num_c, den_c, _ = policy_loss_terms(lp, lp, lb, jnp.array([1.0]), mask, is_level="sequence", is_cap=1.2)
    assert float(num_c / den_c) == pytest.approx(-1.2, rel=1e-6)


def test_gspo_sequence_ratio_value_and_gradient():
    lp = jnp.zeros((1, 3))
    diffs = jnp.array([[0.1, 0.3, 9.0]])  # third token masked out
    mask = jnp.array([[1.0, 1.0, 0.0]])

    def loss(l):
        num, den, _ = policy_loss_terms(l, lp, lp, jnp.array([1.0]), mask, ratio_level="sequence")
        return num / den

    val, grad = jax.value_and_grad(loss)(lp + diffs)
    rho = math.exp(0.2)  # exp(mean of the masked log-ratios), shared by both tokens
    assert float(val) == pytest.approx(-rho, rel=1e-6)
    # loss = -(rho + rho) / 2 with rho = exp((d1 + d2) / 2): dloss/dd_t = -rho / 2
    np.testing.assert_allclose(np.asarray(grad), [[-rho / 2, -rho / 2, 0.0]], rtol=1e-6)
    # outside the (tight, GSPO-like) clip range the whole sequence is clipped
    g2 = jax.grad(lambda l: policy_loss_terms(l, lp, lp, jnp.array([1.0]), mask, ratio_level="sequence",
                                              eps_low=3e-4, eps_high=4e-4)[0])(lp + diffs)
    np.testing.assert_array_equal(np.asarray(g2), 0.0)


def test_kl_k3_and_entropy_terms():
    l = jnp.array([[-1.0, -2.0]])
    ref = jnp.array([[-1.5, -1.0]])
    mask = jnp.ones((1, 2))
    ent = jnp.array([[0.7, 1.3]])
    num, den, met = policy_loss_terms(l, l, l, jnp.array([0.0]), mask, kl_coef=0.1, ref_logp=ref,
                                      entropy=ent, entropy_coef=0.01)
    d = np.array([-0.5, 1.0])
    k3 = np.exp(d) - d - 1
    expected = np.mean(0.1 * k3 - 0.01 * np.array([0.7, 1.3]))
    assert float(num / den) == pytest.approx(expected, rel=1e-5)
    fm = finalize_metrics(met)
    assert fm["kl_ref_mean"] == pytest.approx(k3.mean(), rel=1e-5)
    assert fm["entropy_mean"] == pytest.approx(1.0, rel=1e-6)
    # k3 gradient: d/dl [exp(ref - l) - (ref - l) - 1] = 1 - exp(ref - l)
    g = jax.grad(lambda x: policy_loss_terms(x, l, l, jnp.array([0.0]), mask, kl_coef=1.0, ref_logp=ref)[0])(l)
    np.testing.assert_allclose(np.asarray(g), [1 - np.exp(d)], rtol=1e-5)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss_terms(l, l, l, jnp.array([0.0]), mask, kl_coef=0.1)


def test_log_ratio_clamped_before_exp():
    lp = jnp.zeros((1, 1))
    num, den, met = policy_loss_terms(lp + 100.0, lp, lp - 100.0, jnp.array([-1.0]), jnp.ones((1, 1)),
                                      dual_clip=None, is_cap=None)
    assert np.isfinite(float(num))
    assert finalize_metrics(met)["ratio_max"] == pytest.approx(math.exp(20.0), rel=1e-5)


def _random_batch(seed: int, b: int = 6, t: int = 7):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, t + 1, size=b)
    lens[2] = 0  # an empty (padding) row
    mask = (np.arange(t)[None, :] < lens[:, None]).astype(np.float32)
    lb = rng.normal(-2.0, 0.5, (b, t)).astype(np.float32)
    lp = (lb + rng.normal(0, 0.3, (b, t))).astype(np.float32)
    logp = (lp + rng.normal(0, 0.4, (b, t))).astype(np.float32)
    ref = (lp + rng.normal(0, 0.2, (b, t))).astype(np.float32)
    ent = rng.uniform(0.1, 2.0, (b, t)).astype(np.float32)
    adv = rng.normal(0, 1, b).astype(np.float32)
    return [jnp.asarray(x) for x in (logp, lp, lb, adv, mask, ref, ent)]


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_sum_norm"])
@pytest.mark.parametrize("ratio_level,is_level", [("token", "token"), ("sequence", "sequence")])
def test_microbatches_sum_to_the_whole_batch(aggregation, ratio_level, is_level):
    logp, lp, lb, adv, mask, ref, ent = _random_batch(0)
    kw = dict(aggregation=aggregation, ratio_level=ratio_level, is_level=is_level, kl_coef=0.05, entropy_coef=0.01,
              max_response_len=16)

    def terms(l, sl):
        return policy_loss_terms(l[sl], lp[sl], lb[sl], adv[sl], mask[sl], ref_logp=ref[sl], entropy=ent[sl], **kw)

    whole = slice(0, 6)
    parts = [slice(0, 2), slice(2, 4), slice(4, 6)]  # row 2 (empty) sits in the middle micro-batch
    num, den, met = terms(logp, whole)
    nums, dens, mets = zip(*(terms(logp, s) for s in parts))
    assert float(sum(dens)) == pytest.approx(float(den))
    assert float(sum(nums)) == pytest.approx(float(num), rel=1e-5, abs=1e-6)
    assert float(sum(nums) / sum(dens)) == pytest.approx(float(num / den), rel=1e-5, abs=1e-6)
    stacked = {k: jnp.stack([m[k] for m in mets]) for k in mets[0]}
    whole_m, parts_m = finalize_metrics(met), finalize_metrics(reduce_stacked(stacked, REDUCTIONS))
    assert whole_m.keys() == parts_m.keys()
    for k in whole_m:
        assert parts_m[k] == pytest.approx(whole_m[k], rel=1e-5, abs=1e-6), k
    # gradient accumulation: grad of the summed numerators / global denominator == whole-batch gradient
    g_whole = jax.grad(lambda l: terms(l, whole)[0] / den)(logp)
    g_acc = sum(jax.grad(lambda l, s=s: terms(l, s)[0])(logp) for s in parts) / den
    np.testing.assert_allclose(np.asarray(g_acc), np.asarray(g_whole), rtol=1e-5, atol=1e-7)


def test_aggregation_denominators():
    logp, lp, lb, adv, mask, _, _ = _random_batch(1)
    n_tokens = float(mask.sum())
    n_seq = float((mask.sum(axis=1) > 0).sum())
    assert float(policy_loss_terms(logp, lp, lb, adv, mask)[1]) == n_tokens
    assert float(policy_loss_terms(logp, lp, lb, adv, mask, aggregation="seq_mean_token_mean")[1]) == n_seq
    assert float(policy_loss_terms(logp, lp, lb, adv, mask, aggregation="seq_sum_norm")[1]) == n_seq * 7
    assert float(policy_loss_terms(logp, lp, lb, adv, mask, aggregation="seq_sum_norm",
                                   max_response_len=32)[1]) == n_seq * 32
    # seq_mean_token_mean: mean over sequences of each sequence's token-mean, computed by hand
    num, den, _ = policy_loss_terms(logp, lp, lp, adv, mask, aggregation="seq_mean_token_mean", dual_clip=None,
                                    eps_low=0.5, eps_high=100.0)
    rho = np.exp(np.asarray(logp - lp))
    per_tok = -np.minimum(rho * np.asarray(adv)[:, None], np.clip(rho, 0.5, 101.0) * np.asarray(adv)[:, None])
    m = np.asarray(mask)
    seq_means = [(per_tok[i] * m[i]).sum() / m[i].sum() for i in range(6) if m[i].sum() > 0]
    assert float(num / den) == pytest.approx(float(np.mean(seq_means)), rel=1e-5)


def test_jit_with_config_kwargs():
    logp, lp, lb, adv, mask, _, _ = _random_batch(2)
    cfg = RLObjectiveConfig()
    fn = jax.jit(functools.partial(policy_loss_terms, **cfg.loss_kwargs()))
    num, den, met = fn(logp, lp, lb, adv, mask)
    ref_num, ref_den, _ = policy_loss_terms(logp, lp, lb, adv, mask, **cfg.loss_kwargs())
    assert float(num) == pytest.approx(float(ref_num), rel=1e-5)
    assert float(den) == float(ref_den)
    assert set(finalize_metrics(met)) >= {"clip_frac_high", "clip_frac_low", "dual_clip_frac", "is_weight_mean",
                                         "is_weight_max", "is_truncated_frac", "prox_behaviour_absdiff_mean",
                                         "prox_behaviour_absdiff_max", "approx_kl"}


def test_approx_kl_metric_is_mean_prox_minus_logp():
    logp, lp, lb, adv, mask, _, _ = _random_batch(3)
    _, _, met = policy_loss_terms(logp, lp, lb, adv, mask)
    m = np.asarray(mask)
    expected = float((np.asarray(lp - logp) * m).sum() / m.sum())
    assert finalize_metrics(met)["approx_kl"] == pytest.approx(expected, rel=1e-5)


def test_group_advantages_grpo_and_dr_grpo():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]], dtype=np.float32)
    a = group_advantages(r, ddof=0)
    np.testing.assert_allclose(a[0], [1, -1, -1, 1], atol=1e-5)  # mean .5, population std .5
    np.testing.assert_allclose(a[1], 0.0, atol=1e-7)
    flat = group_advantages(r.reshape(-1), group_size=4, ddof=0)
    np.testing.assert_allclose(flat, a.reshape(-1), atol=1e-7)
    dr = group_advantages(r, normalize_std=False)
    np.testing.assert_allclose(dr[0], [0.5, -0.5, -0.5, 0.5], atol=1e-7)
    np.testing.assert_array_equal(zero_std_groups(r), [False, True])
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r.reshape(-1), group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r.reshape(-1))


def test_group_advantages_default_to_the_sample_std_as_trl_and_verl():
    """TRL and verl normalise by torch's (unbiased) std: the default equals that to 1e-6 at G = 8."""
    import torch

    rewards = np.random.default_rng(0).integers(0, 2, (16, 8)).astype(np.float32)
    rewards[0] = [1, 0, 0, 0, 0, 0, 0, 0]
    t = torch.from_numpy(rewards)
    peer = ((t - t.mean(dim=1, keepdim=True)) / (t.std(dim=1, keepdim=True) + 1e-6)).numpy()
    np.testing.assert_allclose(group_advantages(rewards, eps=1e-6), peer, rtol=1e-6, atol=1e-6)
    pop = group_advantages(rewards[:1], ddof=0)
    np.testing.assert_allclose(pop / group_advantages(rewards[:1]), np.sqrt(8 / 7), rtol=1e-5)  # 1.069x
