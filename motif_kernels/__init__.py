"""Kernels used by motif_jax; imports jax only (never motif_jax).

The LM-head loss (``motif_kernels.lm_head``: xla, pallas, triton backends), the attention kernels the model dispatches
to (``attention_cudnn``, ``attention_splash``), the lowering target every backend choice follows
(``motif_kernels.target``) and what a lowered program contains (``motif_kernels.lowering``).
"""

from motif_kernels.lm_head import (
    IMPLS,
    BackendUnavailableError,
    default_blocks,
    linear_cross_entropy,
    linear_cross_entropy_sums,
    linear_log_probs,
    resolve_impl,
    sharded_linear_log_probs,
)
from motif_kernels.lm_head_tiles import KernelTiles
from motif_kernels.target import Target, current_target, lowering_target

__all__ = [
    "IMPLS",
    "BackendUnavailableError",
    "KernelTiles",
    "Target",
    "current_target",
    "default_blocks",
    "linear_cross_entropy",
    "linear_cross_entropy_sums",
    "linear_log_probs",
    "lowering_target",
    "resolve_impl",
    "sharded_linear_log_probs",
]
