"""Hugging Face directory -> our ModelConfig and parameters, streamed straight into the target sharding.

Every parameter is assembled from per-device arrays (``jax.make_array_from_single_device_arrays``: the streaming
form of ``jax.make_array_from_callback``). For each addressable device only that device's slice of the Hugging Face
tensor(s) is read from the memory-mapped safetensors file (for a stacked ``[layers, ...]`` parameter: that slice of
each needed layer's tensor, one layer at a time), transferred, and released before the next slice is read. So the
model never sits in host memory, nor does one whole tensor unless a device's shard is the whole tensor. Each process
reads only the slices of its own devices (multi-host safe).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from motif_jax.config import DEFAULT_LOGICAL_RULES, ModelConfig
from motif_jax.convert.mapping import (
    IGNORED_SUFFIXES,
    ConversionError,
    ParamMap,
    config_from_hf,
    hf_shape,
    param_maps,
)
from motif_jax.convert.reader import HFCheckpoint, ReadStats
from motif_jax.model.transformer import Decoder, abstract_model
from motif_jax.parallel.rules import Rules, logical_to_spec

Path_ = tuple[str, ...]


def flatten_tree(tree: Any) -> dict[Path_, Any]:
    """nnx.State / nested dict -> {key path: leaf value} (Variables unwrapped)."""
    if isinstance(tree, nnx.State):
        return {tuple(str(k) for k in p): v.get_value() if isinstance(v, nnx.Variable) else v
                for p, v in nnx.to_flat_state(tree)}
    out: dict[Path_, Any] = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, prefix + (str(k),))
        else:
            out[prefix] = node.get_value() if isinstance(node, nnx.Variable) else node

    walk(tree, ())
    return out


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_LOGICAL_RULES) -> nnx.State:
    """A State of NamedShardings (one per parameter) from the parameters' logical axis names and ``rules``."""
    _, abstract = abstract_model(cfg)
    specs = nnx.get_partition_spec(abstract)
    return jax.tree.map(
        lambda p: NamedSharding(mesh, logical_to_spec(tuple(p), rules, mesh.axis_names)),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def resolve_shardings(cfg: ModelConfig, mesh: Mesh | None, shardings: Any,
                      rules: Rules = DEFAULT_LOGICAL_RULES) -> dict[Path_, jax.sharding.Sharding]:
    """{parameter path: sharding}: ``shardings`` if given (State or nested dict), else from ``mesh`` and ``rules``,
    else everything on the first device."""
    _, abstract = abstract_model(cfg)
    paths = list(flatten_tree(abstract))
    if shardings is not None:
        flat = flatten_tree(shardings)
        missing = [p for p in paths if p not in flat]
        if missing:
            raise ConversionError(f"shardings has no entry for parameter {'/'.join(missing[0])}")
        return {p: flat[p] for p in paths}
    if mesh is not None:
        return flatten_tree(param_shardings(cfg, mesh, rules))
    device = SingleDeviceSharding(jax.devices()[0])
    return {p: device for p in paths}


def _check_divisible(path: Path_, shape: tuple[int, ...], sharding: jax.sharding.Sharding) -> None:
    if not isinstance(sharding, NamedSharding):
        return
    for dim, axes in zip(shape, tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))):
        if axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        size = int(np.prod([sharding.mesh.shape[a] for a in axes]))
        if dim % size:
            raise ConversionError(
                f"parameter {'/'.join(path)} of shape {shape} cannot be sharded as {sharding.spec}: dimension {dim} is "
                f"not divisible by mesh axes {axes} of size {size}; change --mesh sizes or --mesh.logical-rules"
            )


def _normalize(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out = []
    for sl, dim in zip(index, shape):
        start, stop, step = sl.indices(dim)
        if step != 1:
            raise ConversionError(f"unexpected strided shard index {index}")
        out.append(slice(start, stop))
    return tuple(out)


def _make_param(ckpt: HFCheckpoint, m: ParamMap, shape: tuple[int, ...], dtype: Any,
                sharding: jax.sharding.Sharding) -> jax.Array:
    """One global array whose per-device shards are read slice by slice from the HF tensor(s)."""
    dtype = np.dtype(dtype)

    def host_slice(name: str, index: tuple[slice, ...]) -> np.ndarray:
        x = ckpt.read(name, index[::-1] if m.transpose else index)
        return x.T if m.transpose else x

    def callback(index: tuple) -> np.ndarray:
        index = _normalize(index, shape)
        if not m.stacked:
            return np.ascontiguousarray(host_slice(m.hf_name, index), dtype=dtype)
        layers = range(index[0].start, index[0].stop)
        out = np.empty((len(layers),) + tuple(s.stop - s.start for s in index[1:]), dtype)
        for j, i in enumerate(layers):  # one layer's slice in host memory at a time
            out[j] = host_slice(m.hf_name.format(i=i), index[1:])
        return out

    # What jax.make_array_from_callback does, but one device slice in host memory at a time: it would hold every
    # local device's host slice until one batched transfer (a host's whole share of the parameter). Devices that
    # need the same slice (replication) share one read.
    by_index: dict[tuple, list] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple((s.start, s.stop) for s in _normalize(index, shape))
        by_index.setdefault(key, [index]).append(device)
    shards = []
    for index, *devices in by_index.values():
        host = callback(index)
        placed = [jax.device_put(host, d) for d in devices]
        jax.block_until_ready(placed)  # the transfer is done before the next slice is read
        shards.extend(placed)
        del host
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def _check_tensors(ckpt: HFCheckpoint, cfg: ModelConfig, maps: list[ParamMap],
                   shapes: dict[Path_, tuple[int, ...]]) -> None:
    """All expected tensors exist with the right shapes (header reads only), and none is left unused."""
    expected: set[str] = set()
    for m in maps:
        want = hf_shape(m, shapes[m.path])
        for name in m.hf_names(cfg.num_layers):
            expected.add(name)
            found = ckpt.shape(name)  # raises ConversionError naming a missing tensor
            if found != want:
                raise ConversionError(
                    f"tensor {name!r} in {ckpt.directory} has shape {list(found)}, expected {list(want)} from "
                    "config.json"
                )
    unused = [
        n for n in ckpt.names()
        if n not in expected and not n.endswith(IGNORED_SUFFIXES) and not (cfg.tie_embeddings and n == "lm_head.weight")
    ]
    if unused:
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        raise ConversionError(
            f"{len(unused)} tensor(s) in {ckpt.directory} have no motif_jax parameter (an unsupported feature such as "
            f"biases?): {', '.join(sorted(unused)[:5])}{more}"
        )


def import_hf(
    hf_dir: str | Path,
    *,
    mesh: Mesh | None = None,
    shardings: Any = None,
    rules: Rules = DEFAULT_LOGICAL_RULES,
    param_dtype: str = "float32",
    overrides: dict[str, Any] | None = None,
    drop_rope_scaling: bool = False,
    stats: ReadStats | None = None,
) -> tuple[ModelConfig, nnx.State]:
    """Reads a local Hugging Face model directory into (ModelConfig, parameter nnx.State).

    Placement: ``shardings`` (a State or nested dict of shardings, e.g. from :func:`param_shardings`) if given,
    else per-parameter NamedShardings on ``mesh`` from the logical axis names and ``rules``, else the first device.
    Parameters are cast to ``param_dtype`` (λ and PolyNorm vectors stay fp32, as in the model). ``stats`` (if given)
    receives the read accounting (count, bytes, largest single read).
    """
    with HFCheckpoint(hf_dir) as ckpt:
        if stats is not None:
            ckpt.stats = stats
        cfg, _arch = config_from_hf(
            ckpt.config, param_dtype=param_dtype, overrides=overrides, drop_rope_scaling=drop_rope_scaling
        )
        _, abstract = abstract_model(cfg)
        flat = nnx.to_flat_state(abstract)
        maps = {m.path: m for m in param_maps(cfg)}
        shapes = {tuple(map(str, p)): tuple(v.get_value().shape) for p, v in flat}
        unmapped = [p for p in shapes if p not in maps]
        if unmapped:  # a model feature without a Hugging Face name: a bug in mapping.py, not a user error
            raise ConversionError(f"no Hugging Face name for parameter {'/'.join(unmapped[0])}")
        _check_tensors(ckpt, cfg, list(maps.values()), shapes)
        placement = resolve_shardings(cfg, mesh, shardings, rules)
        leaves = []
        for p, var in flat:
            path = tuple(map(str, p))
            abstract_value = var.get_value()
            _check_divisible(path, shapes[path], placement[path])
            array = _make_param(ckpt, maps[path], shapes[path], abstract_value.dtype, placement[path])
            leaves.append((p, var.replace(value=array)))
        return cfg, nnx.from_flat_state(leaves)


def build_model(cfg: ModelConfig, state: nnx.State) -> Decoder:
    """A Decoder holding ``state`` (no initialisation is run)."""
    graphdef, _ = abstract_model(cfg)
    return nnx.merge(graphdef, state)
