"""Our parameters + ModelConfig -> Hugging Face tensors: a model directory, or a stream for a running engine.

One mapping serves both: :func:`hf_tensor_specs` lists every Hugging Face tensor of a parameter State (name,
shape, dtype, bytes: from shapes alone, nothing gathered) and :func:`hf_tensors` yields ``(hf_name, array)`` pairs,
gathering to host one (per-layer) tensor at a time. :func:`export_hf` writes ``config.json`` for the architecture,
safetensors shards of at most ``max_shard_size`` bytes with ``model.safetensors.index.json`` (one
``model.safetensors`` when everything fits in one shard) and the tokenizer files when a source directory is given,
holding at most one shard on host; the vLLM rollout engine (``motif_jax.rl.engines.vllm_engine``) pushes the same
pairs into vLLM after every update.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Sequence
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


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One Hugging Face tensor of a parameter State: ``name`` (e.g. ``model.layers.3.mlp.up_proj.weight``), its
    ``shape`` and ``dtype`` as written, and where it comes from (``param.path``, ``layer`` of a stacked parameter or
    None; ``param.transpose`` for ``nn.Linear`` weights)."""

    name: str
    param: ParamMap
    layer: int | None
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def _values(state: nnx.State | nnx.Module, cfg: ModelConfig) -> dict[tuple[str, ...], Any]:
    if isinstance(state, nnx.Module):
        state = nnx.state(state, nnx.Param)
    values = flatten_tree(state)
    for m in param_maps(cfg):
        if m.path not in values:
            raise ConversionError(f"parameter {'/'.join(m.path)} is missing from the state to export")
    return values


def hf_tensor_specs(state: nnx.State | nnx.Module, cfg: ModelConfig, *, dtype: str | None = None) -> list[HFTensor]:
    """Every Hugging Face tensor of ``state`` (parameter State or Decoder) in a stable order (the order of
    :func:`~motif_jax.convert.mapping.param_maps`, layer by layer), from shapes alone. ``dtype`` casts every
    tensor (default: the parameters' dtypes)."""
    values = _values(state, cfg)
    out_dtype = None if dtype is None else np.dtype(dtype)
    specs = []
    for m in param_maps(cfg):
        arr = values[m.path]
        shape = hf_shape(m, tuple(arr.shape))
        for layer, name in enumerate(m.hf_names(cfg.num_layers)):
            specs.append(HFTensor(name, m, layer if m.stacked else None, shape, out_dtype or np.dtype(arr.dtype)))
    return specs


def hf_tensors(
    state: nnx.State | nnx.Module,
    cfg: ModelConfig,
    *,
    dtype: str | None = None,
    specs: Sequence[HFTensor] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """``(hf_name, array)`` pairs of ``state`` in the Hugging Face layout (``nn.Linear`` weights ``[out, in]``, one
    tensor per layer), C-contiguous host arrays gathered one at a time, so the caller holds one tensor unless it
    keeps them. ``specs`` (a subset of :func:`hf_tensor_specs`) selects and orders the tensors; ``dtype`` casts.
    Multi-host: every process iterates (arrays are gathered collectively)."""
    values = _values(state, cfg)
    for spec in specs if specs is not None else hf_tensor_specs(state, cfg, dtype=dtype):
        arr = values[spec.param.path]
        host = _to_host(arr if spec.layer is None else arr[spec.layer])
        if spec.param.transpose:
            host = host.T
        yield spec.name, np.ascontiguousarray(host, dtype=spec.dtype)


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
    specs = hf_tensor_specs(state, cfg, dtype=dtype)
    hf_config = config_to_hf(cfg, arch, dtype=str(specs[0].dtype), base=base_config, token_ids=token_ids)

    out_dir = Path(out_dir)
    writer = jax.process_index() == 0
    if writer:
        if out_dir.exists() and any(out_dir.iterdir()):
            if not overwrite:
                raise ConversionError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) or pick a new dir")
            for stale in list(out_dir.glob("*.safetensors")) + [out_dir / INDEX_FILE]:
                stale.unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)

    # Plan from shapes: tensors in a stable order, packed greedily into shards.
    limit = parse_size(max_shard_size)
    shards: list[list[HFTensor]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes

    n = len(shards)
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards):
        file = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        tensors = dict(hf_tensors(state, cfg, specs=shard))
        weight_map.update({name: file for name in tensors})
        if writer:
            save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
        del tensors
    if writer:
        if n > 1:
            total = sum(spec.nbytes for spec in specs)
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


__all__ = ["HFTensor", "export_hf", "export_pretrained", "hf_tensor_specs", "hf_tensors", "parse_size"]
