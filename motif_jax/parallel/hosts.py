"""Data between the processes of a multi-host run: what RL needs beyond SFT's per-host batches.

In RL every process holds the same round (prompts, groups, buffer), so the update's batch is built from identical
host data on every process (:func:`global_array`), outputs sharded over the mesh are read whole by every process
(:func:`host_array`), and work split by process (verifying its share of the responses) is put back together with
:func:`allgather_objects`. With one process all three are plain conversions.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding

__all__ = ["allgather_objects", "global_array", "host_array", "process_slice"]


def host_array(x: jax.Array | np.ndarray) -> np.ndarray:
    """The whole value of ``x`` on this host (all-gathered over processes when it is not all addressable here)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def global_array(x: np.ndarray, sharding: Sharding) -> jax.Array:
    """A global array laid out by ``sharding`` from ``x``, which every process holds whole and identical."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def process_slice(n: int) -> slice:
    """This process's contiguous share of ``n`` items (the shares of all processes cover 0..n-1 in order)."""
    p, i = jax.process_count(), jax.process_index()
    return slice(n * i // p, n * (i + 1) // p)


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's JSON-able ``obj``, in process order (one entry with a single process)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:size]).decode()) for row, size in zip(rows, sizes)]
