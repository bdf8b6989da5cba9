"""impl="triton": a clear BackendUnavailableError wherever the Triton kernel cannot run; GPU-only check."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from motif_kernels import BackendUnavailableError, linear_log_probs, resolve_impl
from motif_kernels import lm_head_triton


def _inputs():
    x = jax.random.normal(jax.random.key(0), (64, 32))
    w = jax.random.normal(jax.random.key(1), (32, 256)) * 0.3
    y = jax.random.randint(jax.random.key(2), (64,), 0, 256)
    return x, w, y


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error raised off GPU")
def test_triton_raises_backend_unavailable_without_gpu():
    x, w, y = _inputs()
    with pytest.raises(BackendUnavailableError) as info:
        linear_log_probs(x, w, y, impl="triton")
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "impl='triton' cannot run here" in msg
    assert "GPU" in msg and "'cpu'" in msg  # says why
    assert "impl='xla'" in msg  # and what to use instead
    # auto never picks it here: no silent fallback from an explicit request, no surprise from auto.
    assert resolve_impl("auto") == "xla"


def test_jax_triton_0_4_1_with_jax_0_12_is_usable_through_the_shim_and_breakage_is_reported(monkeypatch):
    """jax-triton 0.4.1's two-argument DCE rule is adapted (motif_kernels.lm_head_triton.adapt_dce_rule), so that
    pairing is no longer refused; a pairing listed as incompatible is reported before any tracing."""
    monkeypatch.setattr(lm_head_triton, "_backend", lambda: "gpu")
    versions = {"jax-triton": "0.4.1", "jax": "0.12.0.1"}
    monkeypatch.setattr(lm_head_triton, "_installed_version", versions.get)
    monkeypatch.setattr(lm_head_triton.importlib.util, "find_spec", lambda name: object())
    assert lm_head_triton.unavailable_reason() is None
    monkeypatch.setattr(lm_head_triton, "_KNOWN_INCOMPATIBLE",
                        [((0, 4, 1), (0, 12, 0), "jax-triton {jt} breaks with jax {jax}")])
    assert "jax-triton 0.4.1 breaks with jax 0.12.0.1" in lm_head_triton.unavailable_reason()
    versions["jax"] = "0.11.2"
    assert lm_head_triton.unavailable_reason() is None
    versions["jax-triton"] = None
    assert "not installed" in lm_head_triton.unavailable_reason()


@pytest.mark.skipif(lm_head_triton.unavailable_reason() is not None,
                    reason=f"Triton kernel cannot run here: {lm_head_triton.unavailable_reason()}")
def test_triton_matches_xla_on_gpu():  # pragma: no cover - GPU only
    x, w, y = _inputs()
    x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    g = jax.random.normal(jax.random.key(3), (64,))

    def f(impl):
        def obj(x, w):
            lp, h = linear_log_probs(x, w, y, with_entropy=True, impl=impl, valid_vocab=250)
            return jnp.sum(lp * g) + jnp.sum(h), (lp, h)
        return jax.jit(jax.value_and_grad(obj, (0, 1), has_aux=True))(x, w)

    (_, (lp, h)), (gx, gw) = f("triton")
    (_, (lp0, h0)), (gx0, gw0) = f("xla")
    for a, b in ((lp, lp0), (h, h0), (gx, gx0), (gw, gw0)):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) < 2e-2
