"""The ``--init-from DIR`` layout: pretrained parameters the trainers start from.

```
DIR/
  model.yaml        our ModelConfig (motif_jax.config.load_yaml(ModelConfig, DIR/model.yaml))
  params/           Orbax StandardCheckpointer checkpoint of the parameter State as a pure nested dict
                    ({"embed": ..., "layers": {"attn": {"q_proj": {"kernel": [layers, embed, heads]}}}, ...})
  hf_config.json    the source config.json, when imported from Hugging Face (token ids reused on export)
  tokenizer.json    tokenizer files copied from the source directory, when present
  (tokenizer_config.json, special_tokens_map.json, chat_template.jinja, generation_config.json, ...)
```

:func:`load_params` restores ``params/`` straight into the target shardings (Orbax restore with
``jax.ShapeDtypeStruct`` targets that carry them); given a Hugging Face directory instead (``config.json`` +
safetensors) it imports that directly, so ``--init-from`` accepts both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml
from flax import nnx
from jax.sharding import Mesh

from motif_jax.config import DEFAULT_LOGICAL_RULES, ConfigError, ModelConfig, load_yaml, to_dict
from motif_jax.convert.hf_import import import_hf, resolve_shardings
from motif_jax.convert.mapping import ConversionError
from motif_jax.model.transformer import abstract_model
from motif_jax.parallel.rules import Rules

PARAMS_DIR = "params"
MODEL_CONFIG_FILE = "model.yaml"
HF_CONFIG_FILE = "hf_config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)

# ModelConfig fields that define the parameters (shapes and meaning); the rest are run-time choices.
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "attention",
    "diff_ratio", "mlp", "qk_norm", "tie_embeddings", "rope_theta", "rope_scaling", "norm_eps", "attn_norm_eps",
)


def copy_tokenizer_files(src: str | Path | None, dst: str | Path) -> list[str]:
    """Copies the tokenizer files present in ``src`` to ``dst``; returns their names."""
    if src is None:
        return []
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def save_params(directory: str | Path, cfg: ModelConfig, state: nnx.State, *, tokenizer_dir: str | Path | None = None,
                hf_config: dict | None = None, overwrite: bool = False) -> Path:
    """Writes the ``--init-from`` layout (see module docstring). Every process calls it (Orbax is collective)."""
    directory = Path(directory).absolute()
    params_dir = directory / PARAMS_DIR
    if params_dir.exists():
        if not overwrite:
            raise ConversionError(f"{params_dir} already exists; pass overwrite=True (--overwrite) to replace it")
        if jax.process_index() == 0:
            shutil.rmtree(params_dir)
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, nnx.to_pure_dict(state))
    checkpointer.wait_until_finished()
    checkpointer.close()
    if jax.process_index() == 0:
        (directory / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if hf_config is not None:
            (directory / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
        copy_tokenizer_files(tokenizer_dir, directory)
    return directory


def is_hf_dir(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / "config.json").is_file() and not (directory / MODEL_CONFIG_FILE).is_file()


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{path} is missing: {directory} is not a motif_jax pretrained directory "
                              f"(expected {MODEL_CONFIG_FILE} and {PARAMS_DIR}/, or a Hugging Face config.json)")
    try:
        return load_yaml(ModelConfig, path)
    except ConfigError as e:
        raise ConversionError(f"{path}: {e}") from None


def load_params(
    directory: str | Path,
    mesh: Mesh | None = None,
    shardings: Any = None,
    *,
    rules: Rules = DEFAULT_LOGICAL_RULES,
    **import_kwargs: Any,
) -> tuple[ModelConfig, nnx.State]:
    """(ModelConfig, parameter State) from an ``--init-from`` directory, restored into the target shardings.

    ``shardings`` (State or nested dict of shardings) wins over ``mesh`` + ``rules``; with neither, everything
    lands on the first device. A Hugging Face directory is imported with :func:`import_hf` (``import_kwargs``
    passed on), so trainers accept either layout.
    """
    directory = Path(directory)
    if is_hf_dir(directory):
        return import_hf(directory, mesh=mesh, shardings=shardings, rules=rules, **import_kwargs)
    cfg = load_config(directory)
    params_dir = directory.absolute() / PARAMS_DIR
    if not params_dir.is_dir():
        raise ConversionError(f"{params_dir} is missing: no parameters in {directory}")
    _, abstract = abstract_model(cfg)
    placement = resolve_shardings(cfg, mesh, shardings, rules)
    flat = nnx.to_flat_state(abstract)
    target = nnx.from_flat_state([
        (p, v.replace(value=jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                                 sharding=placement[tuple(map(str, p))])))
        for p, v in flat
    ])
    checkpointer = ocp.StandardCheckpointer()
    try:
        restored = checkpointer.restore(params_dir, nnx.to_pure_dict(target))
    except (ValueError, KeyError) as e:
        raise ConversionError(f"{params_dir} does not match {directory / MODEL_CONFIG_FILE}: {e}") from None
    finally:
        checkpointer.close()
    nnx.replace_by_pure_dict(target, restored)
    return cfg, target


def check_same_architecture(loaded: ModelConfig, wanted: ModelConfig) -> None:
    """Raises ConversionError naming every architecture field where a run's config differs from the loaded one."""
    diffs = [f"--model.{f.replace('_', '-')}: run has {getattr(wanted, f)!r}, checkpoint has {getattr(loaded, f)!r}"
             for f in ARCHITECTURE_FIELDS if getattr(loaded, f) != getattr(wanted, f)]
    if diffs:
        raise ConversionError("the pretrained parameters do not fit this model: " + "; ".join(diffs))
