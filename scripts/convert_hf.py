"""Hugging Face <-> motif_jax checkpoints.

  python scripts/convert_hf.py import --hf-dir ~/models/Qwen3-0.6B --out-dir runs/qwen3-init [--mesh.tensor 2]
  python scripts/convert_hf.py export --init-dir runs/qwen3-init --out-dir runs/qwen3-hf [--dtype bfloat16]

``import`` reads a local Hugging Face directory (Llama, Qwen3, Motif-2) shard by shard straight into the parameter
shardings of the mesh given by the --mesh flags (default: every device on the fsdp axis) and writes the
``--init-from`` layout (params/ Orbax checkpoint, model.yaml, hf_config.json, tokenizer files). ``export`` writes an
``--init-from`` directory back as a Hugging Face directory. See docs/hf_interop.md.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Literal

import tyro

from motif_jax import cli
from motif_jax.config import MESH_AXES, MeshConfig
from motif_jax.data.tokenizer import HFTokenizer

# The converters (JAX, Orbax) are imported where they run: --help and a bad flag answer before they load.


@dataclasses.dataclass(frozen=True)
class MeshFlags:
    """Mesh axis sizes (ICI); one may be -1 (fill with the remaining devices). DCN sizes for multi-slice runs."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    context: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    dcn_context: int = 1


@dataclasses.dataclass(frozen=True)
class Import:
    """Hugging Face directory -> --init-from directory."""

    hf_dir: Path
    """local Hugging Face model directory (config.json, *.safetensors, tokenizer files)"""
    out_dir: Path
    """--init-from directory to write"""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the stored parameters"""
    drop_rope_scaling: bool = False
    """accept a scaled RoPE (e.g. Motif-2's YaRN) and import with plain RoPE: only for inference-time extensions"""
    overwrite: bool = False
    """replace an existing out_dir/params"""
    mesh: MeshFlags = MeshFlags()
    """mesh the parameters are sharded over while importing"""


@dataclasses.dataclass(frozen=True)
class Export:
    """--init-from directory -> Hugging Face directory."""

    init_dir: Path
    """--init-from directory (model.yaml + params/), or a Hugging Face directory"""
    out_dir: Path
    """Hugging Face directory to write"""
    arch: Literal["auto", "LlamaForCausalLM", "Qwen3ForCausalLM", "MotifForCausalLM"] = "auto"
    """target architecture; auto: Motif for differential attention, Qwen3 with QK-norm, else Llama"""
    dtype: Literal["keep", "float32", "bfloat16", "float16"] = "keep"
    """cast every tensor; keep: the parameters' dtype"""
    max_shard_size: str = "5GB"
    """largest safetensors shard (5GB, 500MB, 2GiB, bytes)"""
    overwrite: bool = False
    """write into a non-empty out_dir"""


def make_mesh(flags: MeshFlags):
    import jax
    from jax.experimental import mesh_utils

    cfg = MeshConfig(**dataclasses.asdict(flags))
    dcn = cfg.dcn_shape()
    slices = 1
    for v in dcn.values():
        slices *= v
    ici = cfg.ici_shape(jax.device_count() // slices)
    if slices == 1:
        return jax.make_mesh(tuple(ici[a] for a in MESH_AXES), MESH_AXES)
    devices = mesh_utils.create_hybrid_device_mesh([ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES])
    return jax.sharding.Mesh(devices, MESH_AXES)


def run_import(args: Import) -> None:
    from motif_jax.convert import ReadStats, import_hf, save_params

    start = time.time()
    mesh = make_mesh(args.mesh)
    stats = ReadStats()
    cfg, state = import_hf(args.hf_dir, mesh=mesh, param_dtype=args.param_dtype,
                           drop_rope_scaling=args.drop_rope_scaling, stats=stats)
    hf_config = json.loads((args.hf_dir / "config.json").read_text())
    save_params(args.out_dir, cfg, state, tokenizer_dir=args.hf_dir, hf_config=hf_config, overwrite=args.overwrite)
    print(f"imported {args.hf_dir} -> {args.out_dir} on mesh {dict(mesh.shape)} in {time.time() - start:.1f}s; "
          f"{stats.reads} reads, {stats.total_bytes / 2**20:.1f} MiB, largest {stats.max_bytes / 2**20:.2f} MiB "
          f"({stats.max_name} {list(stats.max_shape)})")


def run_export(args: Export) -> None:
    from motif_jax.convert import export_pretrained

    start = time.time()
    token_ids = None
    if (args.init_dir / "tokenizer.json").is_file():  # the tokenizer the policy was trained with
        token_ids = HFTokenizer(args.init_dir).config_token_ids()
    out = export_pretrained(
        args.init_dir, args.out_dir, token_ids=token_ids,
        arch=None if args.arch == "auto" else args.arch,
        dtype=None if args.dtype == "keep" else args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(f"exported {args.init_dir} -> {out} in {time.time() - start:.1f}s")


def main(argv: list[str] | None = None) -> None:
    args = tyro.extras.subcommand_cli_from_dict(
        {"import": Import, "export": Export}, args=argv, description=__doc__
    )
    run_import(args) if isinstance(args, Import) else run_export(args)


if __name__ == "__main__":
    sys.exit(cli.run(lambda: main(sys.argv[1:])))
