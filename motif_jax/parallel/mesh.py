"""Device meshes (ICI x DCN), start-up validation against the model, and shardings derived from abstract pytrees.

A mesh has the axes ``("data", "fsdp", "tensor", "context")``. Each axis has an intra-node (ICI) and a cross-node
(DCN) size; the device array is laid out with the DCN factor outermost on every axis, so collectives over an axis
whose DCN size is 1 stay inside a node. Shardings are never hand-written: parameters carry logical axis names
(see :mod:`motif_jax.parallel.rules`), ``jax.eval_shape`` gives the abstract tree, and the functions here map it to
``NamedSharding`` leaves for ``jax.jit(in_shardings=..., out_shardings=...)``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from motif_jax.config import MESH_AXES, ConfigError, MeshConfig, ModelConfig, require
from motif_jax.parallel import rules as rules_lib
from motif_jax.parallel.context import context_strategy

__all__ = [
    "activate",
    "axis_size",
    "batch_sharding",
    "batch_spec",
    "fit_spec",
    "make_mesh",
    "mesh_shape",
    "opt_state_shardings",
    "param_shardings",
    "replicated",
    "validate_mesh",
]


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Total size of every axis (ICI x DCN) for ``num_devices`` devices; -1 in the ICI sizes is filled."""
    dcn = mesh_cfg.dcn_shape()
    slices = math.prod(dcn.values())
    require(
        num_devices % slices == 0,
        "mesh.dcn-data",
        f"{num_devices} devices cannot form {slices} nodes/slices (product of the dcn_* sizes {dcn})",
    )
    ici = mesh_cfg.ici_shape(num_devices // slices)
    return {a: ici[a] * dcn[a] for a in MESH_AXES}


def _granules(devices: Sequence[Any]) -> int:
    """Number of slices (TPU) or processes (GPU/CPU): the units create_hybrid_device_mesh splits over."""
    if all(getattr(d, "slice_index", None) is not None for d in devices):
        return len({d.slice_index for d in devices})
    return len({d.process_index for d in devices})


def _ordered_hybrid(devices: Sequence[Any], ici: Sequence[int], dcn: Sequence[int]) -> np.ndarray:
    """The hybrid layout without topology awareness: consecutive blocks of devices form the nodes (DCN outermost)."""
    ordered = sorted(devices, key=lambda d: (getattr(d, "slice_index", 0) or 0, d.process_index, d.id))
    arr = np.asarray(ordered, dtype=object).reshape(tuple(dcn) + tuple(ici))
    n = len(ici)
    # axes (dcn_0..dcn_n-1, ici_0..ici_n-1) -> (dcn_0, ici_0, dcn_1, ici_1, ...) -> merge each pair
    arr = arr.transpose([k for i in range(n) for k in (i, n + i)])
    return arr.reshape(tuple(i * d for i, d in zip(ici, dcn)))


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """The device mesh ``(data, fsdp, tensor, context)`` for ``devices`` (default: all devices of all processes).

    With more than one node/slice (product of the ``dcn_*`` sizes > 1) the array comes from
    ``mesh_utils.create_hybrid_device_mesh`` (ICI axes inside a node, DCN axes across nodes); otherwise from
    ``create_device_mesh`` (topology-aware on TPU/GPU). When the devices do not form that many slices/processes
    (e.g. a simulated CPU mesh), the devices are split into nodes in order. Axes are of type ``Auto``: the model
    annotates with ``with_sharding_constraint`` and XLA's partitioner places the rest.
    """
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    dcn = [mesh_cfg.dcn_shape()[a] for a in MESH_AXES]
    ici = [shape[a] // d for a, d in zip(MESH_AXES, dcn)]
    slices = math.prod(dcn)
    if slices > 1:
        process_is_granule = not all(getattr(d, "slice_index", None) is not None for d in devices)
        if _granules(devices) == slices:
            try:
                arr = mesh_utils.create_hybrid_device_mesh(
                    ici, dcn, devices, process_is_granule=process_is_granule, allow_split_physical_axes=True
                )
            except (ValueError, AssertionError, NotImplementedError):
                arr = _ordered_hybrid(devices, ici, dcn)
        else:
            arr = _ordered_hybrid(devices, ici, dcn)
    else:
        try:
            arr = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
        except (ValueError, AssertionError, NotImplementedError):
            arr = np.asarray(devices, dtype=object).reshape(ici)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def axis_size(mesh: Mesh | Any, axes: str | Sequence[str] | None) -> int:
    """Product of the sizes of ``axes`` in ``mesh`` (axes it lacks count as 1)."""
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    shape = dict(mesh.shape)
    return math.prod(shape.get(a, 1) for a in axes)


def validate_mesh(
    mesh_cfg: MeshConfig,
    model_cfg: ModelConfig,
    *,
    num_devices: int,
    seq_len: int | None = None,
    global_batch: int | None = None,
    num_microbatches: int = 1,
    seq_flag: str = "data.seq-len",
    batch_flag: str = "data.batch-size",
) -> dict[str, int]:
    """Checks that the mesh can run this model and batch; returns the total axis sizes.

    Raises ConfigError naming the flag to change: heads / key-value heads / (differential) query and key-value
    groups must split evenly over ``tensor``; the vocabulary too (the LM-head loss shards it there); the sequence
    over ``context`` (x 2 for the load-balanced causal layout); the global batch (per micro-batch) over
    ``data x fsdp``.
    """
    shape = mesh_shape(mesh_cfg, num_devices)
    tp, cp = shape["tensor"], shape["context"]
    checks = [("model.num-heads", model_cfg.num_heads, "query heads"),
              ("model.num-kv-heads", model_cfg.num_kv_heads, "key/value heads")]
    if model_cfg.attention == "differential":
        checks += [("model.num-heads", model_cfg.num_query_groups, "differential query groups"),
                   ("model.num-kv-heads", model_cfg.num_kv_groups, "differential key/value pairs")]
    for flag, n, what in checks:
        require(
            n % tp == 0,
            "mesh.tensor",
            f"the tensor axis (size {tp}) must divide the {n} {what}; change --mesh.tensor (or --{flag})",
        )
    require(
        model_cfg.vocab_size % tp == 0,
        "mesh.tensor",
        f"the tensor axis (size {tp}) must divide the vocabulary ({model_cfg.vocab_size}); the LM-head loss splits "
        "the vocabulary over it (pad --model.vocab-size or change --mesh.tensor)",
    )
    require(
        model_cfg.mlp_dim % tp == 0,
        "mesh.tensor",
        f"the tensor axis (size {tp}) must divide --model.mlp-dim ({model_cfg.mlp_dim})",
    )
    if seq_len is not None and cp > 1:
        unit = 2 * cp if mesh_cfg.context_load_balance else cp
        require(
            seq_len % unit == 0,
            seq_flag,
            f"sequence length {seq_len} must be divisible by {unit} (context axis {cp}"
            + (" x 2 chunks for the load-balanced causal layout)" if mesh_cfg.context_load_balance else ")")
            + "; change it or --mesh.context",
        )
    if global_batch is not None:
        dp = shape["data"] * shape["fsdp"]
        require(num_microbatches >= 1, "train.num-microbatches", "must be >= 1")
        require(
            global_batch % (dp * num_microbatches) == 0,
            batch_flag,
            f"global batch {global_batch} must be divisible by data x fsdp = {dp}"
            + (f" x {num_microbatches} micro-batches" if num_microbatches > 1 else "")
            + "; change it or --mesh.data / --mesh.fsdp",
        )
    return shape


# ---------------------------------------------------------------------------------------------------------------------
# Shardings
# ---------------------------------------------------------------------------------------------------------------------


def fit_spec(shape: Sequence[int], spec: P, mesh: Mesh | Any) -> P:
    """``spec`` with, per dimension, the mesh axes that do not divide it evenly dropped (from the innermost).

    Keeps odd-sized leaves (e.g. a 3-vector, or a head count a mesh axis does not divide) valid: replicated over
    the axes that cannot split them rather than an error deep inside XLA.
    """
    out = []
    for i, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if entry is None:
            out.append(None)
            continue
        axes = list((entry,) if isinstance(entry, str) else entry)
        while axes and shape[i] % axis_size(mesh, axes):
            axes.pop()
        out.append(None if not axes else (axes[0] if len(axes) == 1 else tuple(axes)))
    return P(*out)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _rules(mesh_rules) -> tuple:
    return tuple(mesh_rules) if mesh_rules is not None else MeshConfig().logical_rules


def param_shardings(abstract_state: Any, mesh: Mesh, rules: rules_lib.Rules | None = None) -> Any:
    """NamedShardings for an NNX state (abstract or concrete) from its logical axis metadata and ``rules``.

    abstract_state: ``nnx.State`` (e.g. from ``jax.eval_shape`` / ``nnx.eval_shape``) whose Params carry
    ``out_sharding`` logical names. Returns the same tree with a NamedSharding per leaf.
    """
    rules = _rules(rules)
    specs = nnx.get_partition_spec(abstract_state)

    def one(x, names):
        names = tuple(names) if names is not None else (None,) * len(x.shape)
        spec = rules_lib.logical_to_spec(names, rules, mesh.axis_names)
        return NamedSharding(mesh, fit_spec(x.shape, spec, mesh))

    return jax.tree.map(one, abstract_state, specs, is_leaf=lambda v: isinstance(v, P))


def batch_spec(mesh: Mesh | Any, rules: rules_lib.Rules | None = None) -> P:
    """PartitionSpec of a [batch, length] array: batch over the ``batch`` rule axes, length over ``length``'s."""
    return rules_lib.logical_to_spec(("batch", "length"), _rules(rules), mesh.axis_names)


def batch_sharding(mesh: Mesh, rules: rules_lib.Rules | None = None) -> NamedSharding:
    """Sharding of [batch, length] batch arrays (tokens, targets, masks): batch over data+fsdp, length over context."""
    return NamedSharding(mesh, batch_spec(mesh, rules))


def _path_keys(path) -> tuple:
    keys = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                keys.append(getattr(k, attr))
                break
    return tuple(keys)


def opt_state_shardings(abstract_opt_state: Any, abstract_params: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of an optax state mirroring the parameters.

    A leaf whose path ends with a parameter's path and has that parameter's shape (Adam's mu / nu, Muon's momentum,
    ...) gets that parameter's sharding; a leaf with a parameter's shape but no matching path gets the sharding of
    the (first) parameter of that shape; everything else (step counts, scalars, schedule state) is replicated.
    """
    by_path: dict[tuple, tuple] = {}
    by_shape: dict[tuple, NamedSharding] = {}
    for (path, x), s in zip(
        jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree_util.tree_leaves(params_shardings)
    ):
        keys = tuple(k for k in _path_keys(path) if k != "value")
        by_path[keys] = (tuple(x.shape), s)
        by_shape.setdefault(tuple(x.shape), s)
    rep = replicated(mesh)

    def one(path, x):
        shape = tuple(getattr(x, "shape", ()))
        if not shape:
            return rep
        keys = tuple(k for k in _path_keys(path) if k != "value")
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        return by_shape.get(shape, rep)

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


@contextlib.contextmanager
def activate(mesh: Mesh, mesh_cfg: MeshConfig | None = None) -> Iterator[None]:
    """Makes ``mesh``, its logical rules and the context-parallel strategy active for tracing.

    Inside: ``constrain`` shards activations by the rules, and attention runs context-parallel when the mesh's
    ``context`` axis is larger than 1.
    """
    mesh_cfg = mesh_cfg or MeshConfig()
    with jax.set_mesh(mesh), rules_lib.axis_rules(mesh_cfg.logical_rules), context_strategy(
        mesh_cfg.context_strategy
    ):
        yield


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{a}={s}" for a, s in mesh.shape.items())


__all__ += ["describe", "ConfigError"]
