"""Logical axis names -> mesh axes.

Modules name the axes of parameters (``nnx.Param(..., out_sharding=("embed", "mlp"))``) and of activations
(:func:`constrain`); one rules table (``MeshConfig.logical_rules``) maps those names onto mesh axes. The table is
made active for tracing with :func:`axis_rules`; outside such a context :func:`constrain` does nothing, so the model
runs unchanged on one device.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import jax
from jax.sharding import PartitionSpec as P

Rules = Sequence[tuple[str, Sequence[str]]]

_ACTIVE_RULES: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("motif_jax_axis_rules", default=None)


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[None]:
    """Makes ``rules`` the table :func:`constrain` uses while tracing inside this context."""
    token = _ACTIVE_RULES.set(tuple((name, tuple(axes)) for name, axes in rules))
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def active_rules() -> tuple | None:
    return _ACTIVE_RULES.get()


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh_axes: Sequence[str] | None = None) -> P:
    """PartitionSpec for an array whose dimensions carry the logical ``names``.

    A mesh axis is used at most once per array: a later dimension that maps to an axis already taken stays
    replicated over it (e.g. ``batch -> (data, fsdp)`` and ``embed -> fsdp`` on an activation). Mesh axes not in
    ``mesh_axes`` (when given) are dropped, so one table serves meshes with fewer axes.
    """
    table = {name: tuple(axes) for name, axes in rules}
    used: set[str] = set()
    spec: list = []
    for name in names:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; add it to --mesh.logical-rules")
        axes = tuple(a for a in table[name] if a not in used and (mesh_axes is None or a in mesh_axes))
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names, when rules and a mesh are active; identity otherwise."""
    rules = _ACTIVE_RULES.get()
    if rules is None:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules, mesh.axis_names))
