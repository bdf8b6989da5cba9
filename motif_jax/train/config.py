"""Configuration of the optimizer and of the core train step (shared by SFT and RL trainers)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from motif_jax.config import _require

OptimizerName = Literal["adamw", "muon"]
DecayName = Literal["cosine", "linear", "constant"]
LossName = Literal["fused", "naive"]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW (or Muon for 2-D weight matrices) with linear warm-up, then cosine / linear decay, and clipping.

    The learning rate rises linearly from 0 to ``lr`` over ``warmup_steps``, then decays to ``lr * min_lr_ratio``
    at ``total_steps`` (given to ``make_optimizer``). Weight decay applies to weight matrices and embeddings only
    (never to norms, biases, differential-attention lambdas, PolyNorm coefficients or other 1-D parameters).
    """

    name: OptimizerName = "adamw"
    lr: float = 3e-4
    warmup_steps: int = 100
    decay: DecayName = "cosine"
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # clip gradients to this global L2 norm (0: no clipping)
    grad_clip: float = 1.0
    # Muon (name="muon"): momentum and Newton-Schulz steps for the matrices; AdamW with the fields above for the
    # rest (embeddings, LM head, norms, lambdas). ``muon_lr`` 0 = ``lr``.
    muon_lr: float = 0.0
    muon_beta: float = 0.95
    muon_ns_steps: int = 5
    # dtype of the first moment ("" = the parameter dtype, fp32)
    mu_dtype: str = ""

    def __post_init__(self) -> None:
        _require(self.name in ("adamw", "muon"), "optim.name", f"unknown optimizer {self.name!r}; choose adamw or muon")
        _require(self.lr > 0, "optim.lr", "must be > 0")
        _require(self.warmup_steps >= 0, "optim.warmup-steps", "must be >= 0")
        _require(
            self.decay in ("cosine", "linear", "constant"),
            "optim.decay",
            f"unknown schedule {self.decay!r}; choose cosine, linear or constant",
        )
        _require(0.0 <= self.min_lr_ratio <= 1.0, "optim.min-lr-ratio", "must be in [0, 1]")
        _require(0.0 <= self.b1 < 1.0, "optim.b1", "must be in [0, 1)")
        _require(0.0 <= self.b2 < 1.0, "optim.b2", "must be in [0, 1)")
        _require(self.eps > 0, "optim.eps", "must be > 0")
        _require(self.weight_decay >= 0, "optim.weight-decay", "must be >= 0")
        _require(self.grad_clip >= 0, "optim.grad-clip", "must be >= 0 (0 disables clipping)")
        _require(self.muon_lr >= 0, "optim.muon-lr", "must be >= 0 (0: use --optim.lr)")
        _require(0.0 <= self.muon_beta < 1.0, "optim.muon-beta", "must be in [0, 1)")
        _require(self.muon_ns_steps >= 1, "optim.muon-ns-steps", "must be >= 1")
        _require(
            self.mu_dtype in ("", "float32", "bfloat16"), "optim.mu-dtype", "choose '' (param dtype), float32 or bfloat16"
        )


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The core train step: gradient accumulation and the loss.

    The global batch of each step is split into ``num_microbatches`` micro-batches run one after another
    (``lax.scan``); the loss is normalised once by the global number of target tokens. ``loss`` "fused" computes
    the LM-head cross-entropy with ``kernels.lm_head`` (never [tokens, vocab] logits); "naive" materialises the
    logits (a baseline for memory comparisons).
    """

    num_microbatches: int = 1
    loss: LossName = "fused"
    # backend of the fused LM-head kernel: auto | xla | pallas | triton
    loss_impl: str = "auto"
    z_loss: float = 0.0

    def __post_init__(self) -> None:
        _require(self.num_microbatches >= 1, "train.num-microbatches", "must be >= 1")
        _require(self.loss in ("fused", "naive"), "train.loss", f"unknown loss {self.loss!r}; choose fused or naive")
        _require(
            self.loss_impl in ("auto", "xla", "pallas", "triton"),
            "train.loss-impl",
            f"unknown backend {self.loss_impl!r}; choose auto, xla, pallas or triton",
        )
        _require(self.z_loss >= 0, "train.z-loss", "must be >= 0")
