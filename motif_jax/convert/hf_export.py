"""Our parameters + ModelConfig -> a Hugging Face model directory.

Writes ``config.json`` for the architecture, safetensors shards of at most ``max_shard_size`` bytes with
``model.safetensors.index.json`` (one ``model.safetensors`` when everything fits in one shard), and copies the
tokenizer files when a source directory is given. The shard plan is made from shapes alone; each shard's tensors
are then gathered to host one (per-layer) tensor at a time, so host memory holds at most one shard.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (numpy <-> bfloat16 for safetensors)
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from motif_jax.config import ModelConfig
from motif_jax.convert.hf_import import flatten_tree
from motif_jax.convert.mapping import ConversionError, ParamMap, config_to_hf, hf_shape, param_maps
from motif_jax.convert.pretrained import copy_tokenizer_files
from motif_jax.convert.reader import CONFIG_FILE, INDEX_FILE

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """``5GB`` / ``500MB`` / ``2GiB`` / bytes -> bytes (decimal units as in transformers)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
    if not match or match.group(2).upper() not in _UNITS:
        raise ConversionError(f"--max-shard-size: cannot read {size!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _to_host(array: jax.Array) -> np.ndarray:
    if not getattr(array, "is_fully_addressable", True):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))


def export_hf(
    state: nnx.State | nnx.Module,
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    arch: str | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    tokenizer_dir: str | Path | None = None,
    base_config: dict | None = None,
    token_ids: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes ``state`` (parameter State, or a Decoder) as a Hugging Face model directory ``out_dir``.

    ``arch``: ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` / ``MotifForCausalLM`` (default: from the model's
    features). ``dtype``: cast every tensor (e.g. ``bfloat16``); default keeps the parameters' dtypes.
    Multi-host: every process calls it (arrays are gathered collectively), process 0 writes.
    """
    if isinstance(state, nnx.Module):
        state = nnx.state(state, nnx.Param)
    values = flatten_tree(state)
    maps = param_maps(cfg)
    for m in maps:
        if m.path not in values:
            raise ConversionError(f"parameter {'/'.join(m.path)} is missing from the state to export")
    out_dtype = None if dtype is None else np.dtype(dtype)
    first_dtype = str(out_dtype or np.dtype(values[("embed",)].dtype))
    hf_config = config_to_hf(cfg, arch, dtype=first_dtype, base=base_config, token_ids=token_ids)

    out_dir = Path(out_dir)
    writer = jax.process_index() == 0
    if writer:
        if out_dir.exists() and any(out_dir.iterdir()):
            if not overwrite:
                raise ConversionError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) or pick a new dir")
            for stale in list(out_dir.glob("*.safetensors")) + [out_dir / INDEX_FILE]:
                stale.unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)

    # Plan: (hf name, map, layer or None, bytes) in a stable order, packed greedily into shards.
    entries: list[tuple[str, ParamMap, int | None, int]] = []
    for m in maps:
        arr = values[m.path]
        itemsize = (out_dtype or np.dtype(arr.dtype)).itemsize
        nbytes = int(np.prod(hf_shape(m, tuple(arr.shape)))) * itemsize
        for layer, name in enumerate(m.hf_names(cfg.num_layers)):
            entries.append((name, m, layer if m.stacked else None, nbytes))
    limit = parse_size(max_shard_size)
    shards: list[list[tuple[str, ParamMap, int | None, int]]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry[3] > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[3]

    n = len(shards)
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards):
        file = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        tensors: dict[str, np.ndarray] = {}
        for name, m, layer, _ in shard:
            arr = values[m.path]
            host = _to_host(arr if layer is None else arr[layer])
            if m.transpose:
                host = host.T
            tensors[name] = np.ascontiguousarray(host, dtype=out_dtype or host.dtype)
            weight_map[name] = file
        if writer:
            save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
        del tensors
    if writer:
        if n > 1:
            total = sum(e[3] for e in entries)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
        (out_dir / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
        copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir


def export_pretrained(init_dir: str | Path, out_dir: str | Path, **kwargs: Any) -> Path:
    """Exports an ``--init-from`` directory (see :mod:`motif_jax.convert.pretrained`) to Hugging Face; tokenizer
    files and the original token ids come along when the directory has them."""
    from motif_jax.convert.pretrained import HF_CONFIG_FILE, load_params

    init_dir = Path(init_dir)
    cfg, state = load_params(init_dir)
    base = None
    if (init_dir / HF_CONFIG_FILE).is_file():
        base = json.loads((init_dir / HF_CONFIG_FILE).read_text())
    kwargs.setdefault("tokenizer_dir", init_dir)
    kwargs.setdefault("base_config", base)
    return export_hf(state, cfg, out_dir, **kwargs)


__all__ = ["export_hf", "export_pretrained", "parse_size"]
