"""The in-process JAX rollout engine: the policy's own parameters, no copy, no weight transfer."""

from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from motif_jax.model.generate import SamplingConfig, generate
from motif_jax.rl.engines.base import Rollouts

__all__ = ["JaxEngine"]


class JaxEngine:
    """Samples with the trainer's parameters in place (``sync_weights`` keeps a reference: nothing is copied)."""

    name = "jax"

    def __init__(self, *, graphdef: nnx.GraphDef, params: Any, pad_id: int, **_: Any):
        self.graphdef = graphdef
        self.params = params
        self.pad_id = pad_id
        self.version = 0

    def sync_weights(self, params: Any, version: int) -> None:
        self.params, self.version = params, version

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig, seed: int) -> Rollouts:
        if sampling.greedy:
            raise ValueError("RL rollouts must sample (greedy=False): identical responses give no group signal")
        t0 = time.time()
        model = nnx.merge(self.graphdef, self.params)
        gen = generate(model, [list(p) for p in prompts], jax.random.key(seed), sampling, pad_id=self.pad_id,
                       num_samples=n)
        return Rollouts.of(gen, self.version, time_s=time.time() - t0)

    def close(self) -> None:
        pass


def call_seed(*parts: int) -> int:
    """A 31-bit seed from integers (run seed, round, call): independent streams for every call."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)
