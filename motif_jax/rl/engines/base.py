"""The rollout-engine interface: what the RL loop needs from whatever generates its samples.

An engine generates ``n`` responses for each prompt with the policy of its current version and returns them with
their behaviour log-probs under softmax(logits / temperature) (the distribution the trainer recomputes for the
importance weights); ``sync_weights`` gives it the trainer's new parameters. The loop, the buffer and the
importance correction never look inside an engine, so the in-process JAX engine and vLLM are interchangeable
(``--rollout.engine``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from motif_jax.model.generate import FINISH_LENGTH, FINISH_STOP, Generation, SamplingConfig

__all__ = ["FINISH_LENGTH", "FINISH_STOP", "RolloutEngine", "Rollouts", "SamplingConfig"]


@dataclasses.dataclass
class Rollouts(Generation):
    """A :class:`~motif_jax.model.generate.Generation` of ``len(prompts) * n`` rows (rows ``i * n .. i * n + n - 1``
    answer prompt ``i``): tokens / logprobs [rows, max_new_tokens] (pad / 0 after a row finished, the stop token
    kept), lengths and finish_reason [rows] (FINISH_STOP or FINISH_LENGTH), plus the policy ``version`` that
    generated them and the engine's own timing counters."""

    version: int = 0
    stats: dict[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, gen: Generation, version: int, **stats: float) -> "Rollouts":
        return cls(gen.tokens, gen.logprobs, gen.lengths, gen.finish_reason, version=version, stats=dict(stats))

    @property
    def generated_tokens(self) -> int:
        return int(np.sum(self.lengths))


@runtime_checkable
class RolloutEngine(Protocol):
    """``generate`` samples with the weights of the last ``sync_weights`` (version ``version``)."""

    name: str
    version: int

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingConfig, seed: int) -> Rollouts:
        """``n`` samples for each prompt (token ids); ``seed`` makes the call reproducible."""
        ...

    def sync_weights(self, params: Any, version: int) -> None:
        """Load the trainer's parameters (an nnx.State in the trainer's shardings) as policy version ``version``."""
        ...

    def close(self) -> None:
        """Release what the engine holds (processes, memory)."""
        ...
