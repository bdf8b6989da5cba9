"""Rollout engines behind one interface (:class:`~motif_jax.rl.engines.base.RolloutEngine`): the in-process JAX
engine (``--rollout.engine jax``, the default) and vLLM (``--rollout.engine vllm``, an optional extra)."""

from __future__ import annotations

from typing import Any

from motif_jax.rl.engines.base import RolloutEngine, Rollouts

__all__ = ["RolloutEngine", "Rollouts", "check_available", "make_engine"]


def check_available(rollout: Any) -> None:
    """Raises ConfigError (naming the extra) if ``rollout.engine`` cannot run here: called at start-up, before
    anything is compiled, so a missing vLLM costs seconds, not a compile."""
    if rollout.engine == "vllm":
        from motif_jax.rl.engines.vllm_engine import require_vllm

        require_vllm(rollout.vllm.python if rollout.vllm.mode == "server" else "")


def make_engine(name: str, **kwargs: Any) -> RolloutEngine:
    """The engine ``name`` ('jax' or 'vllm'), built from the keyword arguments its class takes."""
    if name == "jax":
        from motif_jax.rl.engines.jax_engine import JaxEngine

        return JaxEngine(**kwargs)
    if name == "vllm":
        from motif_jax.rl.engines.vllm_engine import VLLMEngine  # an optional extra: imported only when chosen

        return VLLMEngine(**kwargs)
    raise ValueError(f"unknown rollout engine {name!r}; choose jax or vllm (--rollout.engine)")
