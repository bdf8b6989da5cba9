"""Activation rematerialisation policies, by tensor name.

Layers tag tensors with ``jax.ad_checkpoint.checkpoint_name(x, NAME)``; a policy is the set of names kept for the
backward pass (everything else is recomputed), or moved to host memory. Policies are chosen in config
(``--model.remat-policy``) and applied to each scanned layer, so changing them never touches model code.
"""

from __future__ import annotations

import typing
from typing import Any, Callable

import jax

from motif_jax.config import RematPolicy

# Names the layers tag (see motif_jax.model.layers). Stable: configs refer to them.
QUERY_PROJ = "query_proj"
KEY_PROJ = "key_proj"
VALUE_PROJ = "value_proj"
ATTENTION_OUT = "attention_out"  # attention output before o_proj (the expensive tensor to recompute)
OUT_PROJ = "out_proj"
MLP_GATE = "mlp_gate"
MLP_UP = "mlp_up"
MLP_OUT = "mlp_out"

PROJECTIONS = (QUERY_PROJ, KEY_PROJ, VALUE_PROJ, OUT_PROJ, MLP_GATE, MLP_UP, MLP_OUT)
ALL_NAMES = PROJECTIONS + (ATTENTION_OUT,)

_cp = jax.checkpoint_policies

# name -> policy; None means "do not wrap the layer in jax.checkpoint" (keep every activation).
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": _cp.nothing_saveable,
    "save_projections": _cp.save_only_these_names(*PROJECTIONS),
    "save_attention_out": _cp.save_only_these_names(ATTENTION_OUT),
    "save_qkv_attention_out": _cp.save_only_these_names(QUERY_PROJ, KEY_PROJ, VALUE_PROJ, ATTENTION_OUT),
    "offload_projections": _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=list(PROJECTIONS),
        offload_src="device",
        offload_dst="pinned_host",
    ),
    "offload_attention_out": _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=[ATTENTION_OUT],
        offload_src="device",
        offload_dst="pinned_host",
    ),
}


if set(REMAT_POLICIES) != set(typing.get_args(RematPolicy)):  # the config's Literal lists exactly these names
    raise ImportError(f"RematPolicy in motif_jax.config does not list the policies {sorted(REMAT_POLICIES)}")


def apply_remat(fn: Callable, policy_name: str, static_argnums: tuple[int, ...] = ()) -> Callable:
    """Wraps ``fn`` (one layer's body) in ``jax.checkpoint`` with the named policy ("none": unchanged)."""
    if policy_name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy_name!r}; choose one of {sorted(REMAT_POLICIES)}")
    policy = REMAT_POLICIES[policy_name]
    if policy is None:
        return fn
    return jax.checkpoint(fn, policy=policy, prevent_cse=False, static_argnums=static_argnums)
