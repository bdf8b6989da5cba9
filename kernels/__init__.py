"""Kernels used by motif_jax; imports jax only (never motif_jax)."""

from kernels.lm_head import (
    IMPLS,
    BackendUnavailableError,
    default_blocks,
    linear_cross_entropy,
    linear_cross_entropy_sums,
    linear_log_probs,
    resolve_impl,
    sharded_linear_log_probs,
)

__all__ = [
    "IMPLS",
    "BackendUnavailableError",
    "default_blocks",
    "linear_cross_entropy",
    "linear_cross_entropy_sums",
    "linear_log_probs",
    "resolve_impl",
    "sharded_linear_log_probs",
]
