"""Hugging Face interop: import (Llama, Qwen3, Motif-2 safetensors -> sharded parameters), the ``--init-from``
directory layout (Orbax parameters + model.yaml + tokenizer), and export back to Hugging Face. See
docs/hf_interop.md."""

from motif_jax.convert.hf_export import export_hf, export_pretrained, parse_size
from motif_jax.convert.hf_import import build_model, import_hf, param_shardings
from motif_jax.convert.mapping import (
    SUPPORTED_ARCHITECTURES,
    ConversionError,
    ParamMap,
    config_from_hf,
    config_to_hf,
    param_maps,
)
from motif_jax.convert.pretrained import (
    ARCHITECTURE_FIELDS,
    check_same_architecture,
    load_config,
    load_params,
    save_params,
)
from motif_jax.convert.reader import HFCheckpoint, ReadStats

__all__ = [
    "ARCHITECTURE_FIELDS",
    "ConversionError",
    "HFCheckpoint",
    "ParamMap",
    "ReadStats",
    "SUPPORTED_ARCHITECTURES",
    "build_model",
    "check_same_architecture",
    "config_from_hf",
    "config_to_hf",
    "export_hf",
    "export_pretrained",
    "import_hf",
    "load_config",
    "load_params",
    "param_maps",
    "param_shardings",
    "parse_size",
    "save_params",
]
