"""Reading a Hugging Face checkpoint directory one tensor slice at a time.

``config.json`` plus safetensors shards, with or without ``model.safetensors.index.json``. Tensors are read through
``safe_open(...).get_slice(name)[index]`` (memory-mapped: only the requested slice is copied to host memory), and
every read is counted in :class:`ReadStats` so tests and the CLI can show that no read exceeded one slice.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import ml_dtypes  # noqa: F401  (registers bfloat16 & co. with numpy, so safetensors' numpy reader accepts them)
import numpy as np
from safetensors import safe_open

from motif_jax.convert.mapping import ConversionError

INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"


@dataclasses.dataclass
class ReadStats:
    """Every host read from the safetensors files: count, total and largest (bytes, tensor name, slice shape)."""

    reads: int = 0
    total_bytes: int = 0
    max_bytes: int = 0
    max_name: str = ""
    max_shape: tuple[int, ...] = ()

    def add(self, name: str, array: np.ndarray) -> None:
        self.reads += 1
        self.total_bytes += array.nbytes
        if array.nbytes > self.max_bytes:
            self.max_bytes, self.max_name, self.max_shape = array.nbytes, name, tuple(array.shape)


class HFCheckpoint:
    """A local Hugging Face model directory: its config and a name -> shard file map, opened lazily."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConversionError(f"{self.directory} is not a directory (expected a Hugging Face model directory)")
        config_path = self.directory / CONFIG_FILE
        if not config_path.is_file():
            raise ConversionError(f"{config_path} is missing: a Hugging Face model directory needs config.json")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{config_path} is not valid JSON: {e}") from None
        self.stats = ReadStats()
        self._handles: dict[str, object] = {}
        index_path = self.directory / INDEX_FILE
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index_path} has no 'weight_map'")
            self.weight_map: dict[str, str] = dict(weight_map)
            for file in sorted(set(self.weight_map.values())):
                if not (self.directory / file).is_file():
                    raise ConversionError(f"shard file {file} listed in {index_path} is missing from {self.directory}")
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not files:
                raise ConversionError(f"no *.safetensors files (and no {INDEX_FILE}) in {self.directory}")
            self.weight_map = {}
            for file in files:
                for name in self._open(file).keys():
                    self.weight_map[name] = file

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.directory / file), framework="numpy")
            except Exception as e:  # corrupt or truncated file
                raise ConversionError(f"cannot open shard file {self.directory / file}: {e}") from None
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _slice_handle(self, name: str):
        if name not in self.weight_map:
            raise ConversionError(
                f"tensor {name!r} is missing from the checkpoint in {self.directory} "
                f"({INDEX_FILE if (self.directory / INDEX_FILE).is_file() else 'safetensors files'})"
            )
        file = self.weight_map[name]
        handle = self._open(file)
        try:
            return handle.get_slice(name)
        except Exception as e:
            raise ConversionError(f"tensor {name!r} is not in shard file {file} (the index says it is): {e}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._slice_handle(name).get_shape())

    def dtype(self, name: str) -> str:
        return str(self._slice_handle(name).get_dtype())

    def read(self, name: str, index: Sequence[slice] | None = None) -> np.ndarray:
        """``name[index]`` as a host numpy array; only that slice is copied from the memory-mapped file."""
        sl = self._slice_handle(name)
        if index is None:
            index = tuple(slice(None) for _ in sl.get_shape())
        array = np.asarray(sl[tuple(index)] if len(index) else sl[:])
        self.stats.add(name, array)
        return array

    def close(self) -> None:
        for handle in self._handles.values():
            exit_ = getattr(handle, "__exit__", None)
            if exit_ is not None:
                exit_(None, None, None)
        self._handles.clear()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
