"""Ahead-of-time memory plan of the full train step (forward, backward, optimizer update) of any preset.

    python scripts/memory_plan.py --config motif-2-12.7b --devices 8 --mesh.fsdp 1 --mesh.context 8 \
        --seq-len 65536 --remat save_attention_out --device-memory-gb 80              # XLA:CPU, 8 simulated devices
    python scripts/memory_plan.py ... --lower-for cuda      # + the CUDA program: custom calls, largest buffers
    python scripts/memory_plan.py --config motif-2-12.7b --topology v5p-256 ...   # the TPU compiler's answer

Builds the abstract train state (ShapeDtypeStructs with shardings) and compiles the train step with
``compiled.memory_analysis()``: nothing is allocated at full size. Which compiler answers:

- default: XLA:CPU for ``--devices`` simulated CPU devices. Kernels that exist only on a GPU or TPU (``cudnn``,
  ``splash`` attention; ``pallas``/``triton`` loss) are compiled as their portable stand-ins (``blockwise``, ``xla``)
  and the output says so (``compiled``).
- ``--lower-for cuda``: also lowers the train step, the RL update and the RL log-prob pass for an abstract H100
  mesh (same shape, simulated devices) with the requested kernels and reports what the CUDA program contains
  without compiling it: ``custom_calls`` (cuDNN fMHA, Triton), the cuDNN mask types, the largest tensors and any
  [tokens, tokens] / [tokens, vocab] tensor (``quadratic_buffers``). ``--no-compile`` skips the XLA:CPU compile.
- ``--topology v5p-256`` (v4-N, v5p-N: N TensorCores, 2 per chip; v5e-N, v6e-N: N chips; or v5p:4x4x8), with
  ``--num-slices``: compile-only TPU devices from libtpu, compiled by the real TPU compiler (``"compiler": "tpu"``).
  libtpu lives in ``.venv-tpu/site`` (``make tpu-plan``), which only this planner's subprocess puts on its path.

Prints a table and, as the last line, one JSON object. Every bad argument is one ``error: --flag: ...`` line and
exit status 2. ``--layers K`` compiles K and 2K layers and extrapolates linearly to the model's depth.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TPU_SITE = ROOT / ".venv-tpu" / "site"  # libtpu, installed by `make tpu-plan`; never on the main venv's path


def _preparse_devices(argv: list[str]) -> tuple[int, str | None]:
    """--devices before jax is imported (it fixes the simulated device count): (count, error line or None)."""
    value = None
    for i, a in enumerate(argv):
        if a == "--devices":
            value = argv[i + 1] if i + 1 < len(argv) else ""
        elif a.startswith("--devices="):
            value = a.split("=", 1)[1]
    if value is None:
        return 8, None
    try:
        n = int(value)
    except ValueError:
        return 8, f"--devices: expected a positive integer, got {value!r}"
    if n < 1:
        return 8, f"--devices: must be >= 1, got {n}"
    return n, None


_N, _DEVICES_ERROR = _preparse_devices(sys.argv[1:]) if __name__ == "__main__" else (8, None)
if "jax" not in sys.modules:  # before anything imports jax: a CPU backend with N simulated devices
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = " ".join(
        [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        + [f"--xla_force_host_platform_device_count={_N}"]
    )
sys.path.insert(0, str(ROOT))

import dataclasses  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Any, Literal, get_args  # noqa: E402

from motif_jax.config import ConfigError, MeshConfig, ModelConfig, RematPolicy, load_yaml, require  # noqa: E402

AttentionChoice = Literal["", "xla", "blockwise", "cudnn", "splash", "auto"]
LossImplChoice = Literal["auto", "xla", "pallas", "triton"]


@dataclasses.dataclass(frozen=True)
class PlanArgs:
    """Memory plan of one training configuration."""

    config: str = "tiny"
    """model preset name (configs/model/NAME.yaml) or a path to a model YAML"""
    devices: int = 8
    """number of simulated CPU devices (the mesh of the plan; with --topology: the topology's devices)"""
    mesh: MeshConfig = MeshConfig()
    seq_len: int = 65536
    """tokens per sequence"""
    batch: int = 0
    """global batch in sequences per step (0: one sequence per data x fsdp rank per micro-batch)"""
    microbatches: int = 1
    """gradient-accumulation micro-batches per step"""
    device_memory_gb: float = 0.0
    """device memory in GB (1e9 bytes) to compare the per-device total with (0: 80 for GPU plans, the chip's HBM
    with --topology: v4 32, v5e 16, v5p 95, v6e 32)"""
    remat: str = ""
    """remat policy (default: the preset's); see motif_jax.model.remat"""
    loss: Literal["fused", "naive"] = "fused"
    """fused: LM-head loss kernel without logits; naive: log_softmax(x @ w)"""
    loss_impl: LossImplChoice = "auto"
    """backend of the fused loss (auto: xla; pallas/triton are GPU kernels, compiled as xla on XLA:CPU)"""
    attention_impl: AttentionChoice = ""
    """attention implementation (default: the preset's); see motif_jax.model.attention"""
    dtype: Literal["", "float32", "bfloat16", "float16"] = ""
    """compute dtype (default: the preset's); cudnn attention needs bfloat16 or float16"""
    optimizer: Literal["adamw", "muon"] = "adamw"
    layers: int = 0
    """compile K and 2K layers and extrapolate linearly to the model depth (0: compile the real depth)"""
    lower_for: Literal["", "cuda"] = ""
    """also lower the train step, RL update and RL log-probs for this platform and report their custom calls and
    largest buffers (no compile: this host cannot compile for it)"""
    gpu: str = ""
    """device kind lowered for with --lower-for (default: NVIDIA H100 80GB HBM3)"""
    compile: bool = True
    """compile on XLA:CPU for the memory figures (--no-compile with --lower-for: the lowering report only)"""
    topology: str = ""
    """TPU topology compiled for by the TPU compiler: v5p-256, v5p-128, v5e-256, v6e-256, v4-128 or v5p:4x4x8"""
    num_slices: int = 1
    """TPU slices (with --topology); the mesh's dcn_* sizes must multiply to it"""
    rl: bool = False
    """with --topology: also compile the RL update (policy loss over the same batch)"""

    def validate(self) -> None:
        """Raises ConfigError naming the flag (after parsing: tyro would wrap it in a box)."""
        require(self.devices >= 1, "devices", f"must be >= 1, got {self.devices}")
        require(self.seq_len >= 1, "seq-len", f"must be a positive number of tokens, got {self.seq_len}")
        require(self.batch >= 0, "batch", f"must be >= 0 (0: one sequence per data x fsdp rank), got {self.batch}")
        require(self.microbatches >= 1, "microbatches", f"must be >= 1, got {self.microbatches}")
        require(self.device_memory_gb >= 0, "device-memory-gb", f"must be > 0 (0: the default), got "
                f"{self.device_memory_gb}")
        require(self.layers >= 0, "layers", f"must be >= 0, got {self.layers}")
        require(self.num_slices >= 1, "num-slices", f"must be >= 1, got {self.num_slices}")
        require(not self.remat or self.remat in get_args(RematPolicy), "remat",
                f"unknown policy {self.remat!r}; choose one of {', '.join(get_args(RematPolicy))}")
        require(not (self.topology and self.lower_for), "lower-for",
                "--lower-for cuda and --topology plan different platforms; give one of them")
        require(self.num_slices == 1 or bool(self.topology), "num-slices", "needs --topology")
        require(not self.gpu or bool(self.lower_for), "gpu", "names the GPU of --lower-for cuda; add that flag")
        if self.gpu:
            from motif_kernels.target import Target

            require(Target("gpu", self.gpu, explicit=True).compute_capability is not None, "gpu",
                    f"unknown GPU {self.gpu!r}; give its device kind as JAX reports it, e.g. 'NVIDIA H100 80GB HBM3', "
                    "'NVIDIA H200', 'NVIDIA A100-SXM4-80GB'")
        require(self.compile or bool(self.lower_for), "compile", "--no-compile leaves nothing to do without "
                "--lower-for cuda")
        if self.topology:
            tpu_topology(self.topology, self.num_slices)  # validates the name


# ---------------------------------------------------------------------------------------------------------------------
# TPU topologies
# ---------------------------------------------------------------------------------------------------------------------

# Chips -> ICI shape of the standard slices (Cloud TPU docs); v4 / v5p names count TensorCores (2 per chip).
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_HBM_GB = {"v4": 32.0, "v5p": 95.0, "v5e": 16.0, "v6e": 32.0}  # per chip (Cloud TPU docs)
_GENERATIONS = {"v4": ("v4", 2, _SHAPES_3D, "megacore"), "v5p": ("v5p", 2, _SHAPES_3D, "megacore"),
                "v5e": ("v5e", 1, _SHAPES_2D, "default"), "v5litepod": ("v5e", 1, _SHAPES_2D, "default"),
                "v6e": ("v6e", 1, _SHAPES_2D, "default")}


def tpu_topology(name: str, num_slices: int = 1) -> dict[str, Any]:
    """``v5p-256`` / ``v5e-256`` / ``v5p:4x4x8`` -> {topology_name, chip_config_name, chips, ...}."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)[-:]((?:\d+x)*\d+)", name.strip())
    require(m is not None, "topology", f"unknown TPU topology {name!r}; use e.g. v5p-256, v5p-128, v5e-256, "
            "v6e-256, v4-128 or v5p:4x4x8")
    gen, cores_per_chip, shapes, chip_config = _GENERATIONS[m.group(1)]
    size = m.group(2)
    if "x" in size:
        shape = size
    else:
        chips, rem = divmod(int(size), cores_per_chip)
        require(rem == 0 and chips in shapes, "topology",
                f"{name!r} is not a standard {gen} slice; sizes: "
                f"{', '.join(f'{gen}-{c * cores_per_chip}' for c in shapes)} (or give the shape: {gen}:4x4x8)")
        shape = shapes[chips]
    dims = [int(d) for d in shape.split("x")]
    chips = 1
    for d in dims:
        chips *= d
    return {"name": name, "topology_name": f"{gen}:{shape}", "chip_config_name": chip_config, "chips": chips,
            "num_slices": num_slices, "generation": gen}


def tpu_devices(topo: dict[str, Any]) -> list[Any]:
    """Compile-only TPU devices for the topology (needs libtpu in this process)."""
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo["topology_name"],
                                        chip_config_name=topo["chip_config_name"], chips_per_host_bounds=(2, 2, 1),
                                        num_slices=topo["num_slices"])
    return list(desc.devices)


def _libtpu_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def _run_with_libtpu(argv: list[str]) -> int:
    """Re-runs this planner with .venv-tpu/site on its path (libtpu stays out of every other process)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TPU_SITE), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep), MOTIF_PLAN_WITH_LIBTPU="1")
    return subprocess.call([sys.executable, str(Path(__file__).resolve()), *argv], env=env)


# ---------------------------------------------------------------------------------------------------------------------
# Programs
# ---------------------------------------------------------------------------------------------------------------------


def _base_model_cfg(args: PlanArgs) -> ModelConfig:
    path = Path(args.config)
    if path.suffix not in (".yaml", ".yml"):
        path = ROOT / "configs" / "model" / f"{args.config}.yaml"
    require(path.exists(), "config", f"no model preset {args.config!r} ({path} does not exist)")
    return load_yaml(ModelConfig, path)


def requested_impls(args: PlanArgs) -> tuple[str, str]:
    """(attention impl, loss impl) the run would use (the preset's unless a flag says otherwise)."""
    return args.attention_impl or _base_model_cfg(args).attention_impl, args.loss_impl


def compiled_impls(args: PlanArgs, platform: str) -> tuple[str, str]:
    """The kernels the program compiled for ``platform`` uses: the requested ones where they exist there, else
    their portable stand-ins (blockwise attention, xla loss), so XLA:CPU never compiles an interpret-mode kernel."""
    attention, loss = requested_impls(args)
    loss = "xla" if loss == "auto" else loss  # motif_kernels.resolve_impl: xla on every platform for now
    if platform == "cpu":
        attention = "blockwise" if attention in ("cudnn", "splash", "auto") else attention
        loss = "xla" if loss in ("pallas", "triton") else loss
    elif platform == "tpu":  # (cudnn was refused by check_tpu_request)
        attention = "splash" if attention == "auto" else attention
    return attention, loss


def check_tpu_request(args: PlanArgs) -> None:
    """What --topology runs cannot be, checked before libtpu loads: a GPU kernel, or DCN sizes that are not the
    number of slices."""
    require(requested_impls(args)[0] != "cudnn", "attention-impl", "cudnn is a GPU kernel; for --topology use "
            "splash, auto or blockwise")
    slices = math.prod(args.mesh.dcn_shape().values())
    require(slices == args.num_slices, "num-slices", f"{args.num_slices} slice(s) but the mesh's dcn_* sizes "
            f"multiply to {slices} (set --mesh.dcn-data / --mesh.dcn-fsdp)")


def model_cfg(args: PlanArgs, attention: str, num_layers: int | None = None) -> ModelConfig:
    cfg = _base_model_cfg(args)
    changes: dict[str, Any] = dict(attention_impl=attention, max_seq_len=max(cfg.max_seq_len, args.seq_len))
    if args.remat:
        changes["remat_policy"] = args.remat
    if args.dtype:
        changes["dtype"] = args.dtype
    if num_layers is not None:
        changes["num_layers"] = num_layers
    return dataclasses.replace(cfg, **changes)


def _rl_batch(batch: int, seq_len: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from motif_jax.rl.step import RL_BATCH_KEYS
    from motif_jax.train.step import abstract_batch

    out = abstract_batch(batch, seq_len, keys=RL_BATCH_KEYS, float_keys=("loss_mask", "behaviour_logp", "prox_logp"))
    out["advantages"] = jax.ShapeDtypeStruct((batch,), jnp.float32)
    return out


class _Setup:
    """Mesh, abstract state and the losses of one plan (shared by the compile and the lowering)."""

    def __init__(self, args: PlanArgs, attention: str, loss_impl: str, devices: list[Any],
                 num_layers: int | None = None):
        from motif_jax.model.transformer import count_params
        from motif_jax.parallel.mesh import make_mesh, mesh_shape, validate_mesh
        from motif_jax.train.config import OptimConfig, StepConfig
        from motif_jax.train.optim import make_optimizer, make_schedule
        from motif_jax.train.state import abstract_train_state

        self.model = model_cfg(args, attention, num_layers)
        self.shape = mesh_shape(args.mesh, len(devices))
        dp = self.shape["data"] * self.shape["fsdp"]
        self.batch = args.batch or dp * args.microbatches
        validate_mesh(args.mesh, self.model, num_devices=len(devices), seq_len=args.seq_len,
                      global_batch=self.batch, num_microbatches=args.microbatches, seq_flag="seq-len",
                      batch_flag="batch")
        self.mesh = make_mesh(args.mesh, devices)
        optim = OptimConfig(name=args.optimizer)
        self.tx = make_optimizer(optim, 1000)
        self.schedule = make_schedule(optim, 1000)
        self.state, self.graphdef, self.shardings = abstract_train_state(self.model, self.tx, self.mesh,
                                                                         args.mesh.logical_rules)
        self.params = count_params(self.state.params)
        self.step_cfg = StepConfig(loss=args.loss, loss_impl=loss_impl)
        self.args = args

    def lower(self, which: str):
        """``which``: train | rl_update | rl_log_probs -> jax.stages.Lowered (for the current target)."""
        from motif_jax.train.step import abstract_batch, lm_loss, lower_train_step

        args = self.args
        common = dict(mesh=self.mesh, state_shardings=self.shardings, abstract_state=self.state,
                      mesh_cfg=args.mesh, num_microbatches=args.microbatches, schedule=self.schedule)
        if which == "train":
            return lower_train_step(lm_loss(self.graphdef, self.step_cfg), self.tx,
                                    batch=abstract_batch(self.batch, args.seq_len), **common)
        from motif_jax.rl.config import RLObjectiveConfig
        from motif_jax.rl.step import make_logprob_fn, policy_loss

        if which == "rl_update":
            kw = dataclasses.replace(RLObjectiveConfig(), max_response_len=args.seq_len).loss_kwargs()
            loss = policy_loss(self.graphdef, kw, temperature=1.0, step_cfg=self.step_cfg)
            return lower_train_step(loss, self.tx, batch=_rl_batch(self.batch, args.seq_len), **common)
        return self._lower_log_probs(make_logprob_fn)

    def _lower_log_probs(self, make_logprob_fn):
        import jax

        from motif_kernels import target as target_lib
        from motif_jax.parallel import mesh as mesh_lib
        from motif_jax.train.step import abstract_batch, batch_shardings

        keys = ("tokens", "targets", "segment_ids", "positions")
        batch = abstract_batch(self.batch, self.args.seq_len, keys=keys, float_keys=())
        b_sh = batch_shardings(self.mesh, batch, self.args.mesh.logical_rules)
        fn = make_logprob_fn(self.graphdef, temperature=1.0, step_cfg=self.step_cfg,
                             param_sharding=self.shardings.params, batch_sharding=b_sh["tokens"])
        spec = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        params = jax.tree.map(spec, self.state.params, self.shardings.params)
        batch = jax.tree.map(spec, batch, b_sh)
        target = target_lib.current_target()
        with mesh_lib.activate(self.mesh, self.args.mesh):
            abstract = jax.sharding.AbstractMesh(self.mesh.axis_sizes, self.mesh.axis_names,
                                                 axis_types=self.mesh.axis_types,
                                                 abstract_device=target_lib.abstract_device(target))
            with jax.sharding.use_abstract_mesh(abstract):
                return fn.trace(params, batch).lower(lowering_platforms=target.lowering_platforms)


def compile_once(args: PlanArgs, devices: list[Any], platform: str, num_layers: int | None = None) -> dict:
    """Compiles the train step (and with --rl the RL update) on the given devices; memory stats and timings."""
    from motif_jax.train.step import memory_stats

    attention, loss_impl = compiled_impls(args, platform)
    t0 = time.time()
    setup = _Setup(args, attention, loss_impl, devices, num_layers)
    out = {"setup": setup, "memory": memory_stats(setup.lower("train").compile()).as_dict()}
    if args.rl and platform == "tpu":
        out["rl_update_memory"] = memory_stats(setup.lower("rl_update").compile()).as_dict()
    out["compile_seconds"] = round(time.time() - t0, 1)
    out["compiled"] = {"platform": platform, "attention_impl": attention, "loss_impl": loss_impl}
    return out


def compile_plan(args: PlanArgs, devices: list[Any], platform: str) -> dict:
    if not args.layers:
        return compile_once(args, devices, platform)
    a, b = compile_once(args, devices, platform, args.layers), compile_once(args, devices, platform, 2 * args.layers)
    depth = _base_model_cfg(args).num_layers
    scale = (depth - args.layers) / args.layers
    extrapolate = lambda x, y: int(round(x + (y - x) * scale))
    mem = {k: extrapolate(a["memory"][k], b["memory"][k]) for k in a["memory"]}
    out = dict(b, memory=mem, compile_seconds=a["compile_seconds"] + b["compile_seconds"],
               extrapolated_from_layers=[args.layers, 2 * args.layers])
    out["params"] = extrapolate(a["setup"].params, b["setup"].params)
    return out


def quadratic_tensors(tensors, seq_len: int, context: int, vocab: int, tensor: int, rows: int,
                      model_dims: set[int]) -> list:
    """Tensors of the lowered module with two token dimensions ([T, S] attention) or a token and a vocabulary
    dimension ([T, V] logits). Token dims: T, T / context and their multiples up to ``rows`` rows, except those
    equal to a model width (``model_dims``: e.g. the 12.7B's attention width 8,192 = 65,536 / 8), which would
    flag every activation; vocabulary: V and V / tensor. A heuristic for the table; the attention custom calls
    are checked exactly (``attention_shapes``)."""
    local = seq_len // context
    tokens = {n * t for t in {seq_len, local} for n in range(1, rows + 1)} - (model_dims - {seq_len})
    vocab_dims = {vocab, vocab // tensor}
    out = []
    for t in tensors:
        n_tok = sum(d in tokens for d in t.shape)
        if n_tok >= 2 or (n_tok >= 1 and any(d in vocab_dims for d in t.shape)):
            out.append(t)
    return out


def lowering_report(args: PlanArgs, devices: list[Any]) -> dict:
    """Lowers the train step, RL update and RL log-probs for ``args.lower_for``; what their StableHLO contains."""
    from motif_kernels import lowering
    from motif_kernels import target as target_lib

    attention, loss_impl = requested_impls(args)
    dtype = args.dtype or _base_model_cfg(args).dtype
    require(attention != "cudnn" or dtype in ("bfloat16", "float16"), "dtype",
            f"cudnn attention takes bfloat16 or float16 inputs and {args.config} computes in {dtype}: add --dtype "
            "bfloat16 (or plan --attention-impl auto / blockwise)")
    with target_lib.lowering_target(args.lower_for, args.gpu or None) as target:
        setup = _Setup(args, attention, loss_impl, devices)
        report: dict[str, Any] = {"lowered_for": args.lower_for, "device_kind": target.device_kind,
                                  "attention_impl": attention, "loss_impl": loss_impl}
        t0 = time.time()
        functions = {}
        for which in ("train", "rl_update", "rl_log_probs"):
            text = setup.lower(which).as_text()
            calls = lowering.custom_calls(text)
            shape = setup.shape
            rows = max(1, setup.batch // max(1, shape["data"] * shape["fsdp"]))
            m = setup.model
            widths = {m.hidden_size, m.mlp_dim, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim,
                      m.attention_out_dim, 2 * m.head_dim}
            quad = quadratic_tensors(set(lowering.tensors(text)), args.seq_len, shape["context"],
                                     m.vocab_size, shape["tensor"], rows, widths)
            attn = [c for c in calls if c.target.startswith("__cudnn$fmha")]
            functions[which] = {
                "custom_calls": lowering.count_targets(calls),
                "cudnn_mask_types": sorted({c.mask_type for c in attn if c.mask_type}),
                "attention_shapes": sorted({tuple(t.shape) for c in attn for t in (*c.operands, *c.results)}),
                "largest_attention_operand": max(((t.as_dict() for c in attn for t in (*c.operands, *c.results))),
                                                 key=lambda d: d["bytes"], default=None),
                "largest_buffers": [t.as_dict() for t in lowering.largest_tensors(text, 8)],
                "quadratic_buffers": [t.as_dict() for t in sorted(set(quad), key=lambda t: -t.bytes)[:8]],
            }
        report["lower_seconds"] = round(time.time() - t0, 1)
    train = functions["train"]
    report.update(custom_calls=train["custom_calls"], largest_buffers=train["largest_buffers"],
                  cudnn_mask_types=train["cudnn_mask_types"], quadratic_buffers=train["quadratic_buffers"],
                  attention_shapes=train["attention_shapes"],
                  largest_attention_operand=train["largest_attention_operand"],
                  functions={k: v for k, v in functions.items() if k != "train"}, params=setup.params,
                  mesh=setup.shape, batch=setup.batch, model=setup.model)
    return report


# ---------------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------------


def report(args: PlanArgs, compiled: dict | None, lowered: dict | None, compiler: str | None,
           topology: dict | None, devices: int) -> dict:
    source = compiled["setup"] if compiled else None
    cfg: ModelConfig = source.model if source else lowered["model"]
    attention, loss_impl = requested_impls(args)
    out: dict[str, Any] = {
        "config": args.config,
        "params": (compiled.get("params") if compiled else None) or (source.params if source else lowered["params"]),
        "devices": devices,
        "mesh": source.shape if source else lowered["mesh"],
        "context_strategy": args.mesh.context_strategy,
        "seq_len": args.seq_len,
        "batch": source.batch if source else lowered["batch"],
        "microbatches": args.microbatches,
        "remat": cfg.remat_policy,
        "loss": args.loss,
        "attention_impl": attention,
        "loss_impl": loss_impl,
        "dtype": cfg.dtype,
        "optimizer": args.optimizer,
        "compiler": compiler,
    }
    if topology:
        out["topology"] = {k: topology[k] for k in ("name", "topology_name", "chips", "num_slices")}
    if compiled:
        mem = compiled["memory"]
        gb = args.device_memory_gb or (_HBM_GB[topology["generation"]] if topology else 80.0)
        limit = int(gb * 1e9)
        out.update(
            compiled=compiled["compiled"],
            per_device_bytes={k: mem[k] for k in ("arguments", "temporaries", "outputs", "aliased", "total")},
            device_memory_bytes=limit,
            fits=mem["total"] <= limit,
            compile_seconds=compiled["compile_seconds"],
        )
        if "rl_update_memory" in compiled:
            rl = compiled["rl_update_memory"]
            out["rl_update_per_device_bytes"] = {k: rl[k] for k in ("arguments", "temporaries", "outputs",
                                                                    "aliased", "total")}
        if "extrapolated_from_layers" in compiled:
            out["extrapolated_from_layers"] = compiled["extrapolated_from_layers"]
    if lowered:
        out.update({k: v for k, v in lowered.items() if k not in ("model", "params", "mesh", "batch")})
    return out


def _table(out: dict) -> str:
    gb = lambda b: f"{b / 1e9:9.2f} GB"
    rows = [
        ("model", f"{out['config']} ({out['params'] / 1e9:.2f}B parameters)"),
        ("mesh", " x ".join(f"{k}={v}" for k, v in out["mesh"].items()) + f"  ({out['devices']} devices, "
                 f"context strategy {out['context_strategy']})"),
        ("batch", f"{out['batch']} x {out['seq_len']} tokens, {out['microbatches']} micro-batch(es)"),
        ("remat / loss", f"{out['remat']} / {out['loss']} ({out['optimizer']}, {out['dtype']})"),
        ("kernels", f"attention {out['attention_impl']}, loss {out['loss_impl']}"),
    ]
    if "compiled" in out:
        c = out["compiled"]
        rows += [
            ("compiled by", f"{out['compiler']} with attention {c['attention_impl']}, loss {c['loss_impl']}"
                            + (f" (topology {out['topology']['topology_name']} x {out['topology']['num_slices']})"
                               if "topology" in out else "")),
            ("arguments", gb(out["per_device_bytes"]["arguments"])),
            ("temporaries", gb(out["per_device_bytes"]["temporaries"])),
            ("outputs", gb(out["per_device_bytes"]["outputs"])),
            ("aliased (donated)", gb(out["per_device_bytes"]["aliased"])),
            ("total per device", gb(out["per_device_bytes"]["total"])),
            ("device memory", gb(out["device_memory_bytes"])),
            ("fits", "yes" if out["fits"] else "NO"),
            ("compile", f"{out['compile_seconds']} s"
                        + (f" (extrapolated from {out['extrapolated_from_layers']} layers)"
                           if "extrapolated_from_layers" in out else "")),
        ]
        if "rl_update_per_device_bytes" in out:
            rows.append(("RL update total", gb(out["rl_update_per_device_bytes"]["total"])))
    if "lowered_for" in out:
        calls = ", ".join(f"{k} x{v}" for k, v in sorted(out["custom_calls"].items())) or "none"
        big = out["largest_attention_operand"]
        rows += [
            ("lowered for", f"{out['lowered_for']} ({out['device_kind']}), {out['lower_seconds']} s"),
            ("custom calls", calls),
            ("cuDNN masks", ", ".join(out["cudnn_mask_types"]) or "-"),
            ("largest attention", "-" if big is None else f"{big['shape']} {big['dtype']} ({big['bytes'] / 1e9:.3f} GB)"),
            ("[T,T] / [T,V]", ", ".join(f"{t['shape']} {t['dtype']}" for t in out["quadratic_buffers"]) or "none"),
        ]
        for name, f in out["functions"].items():
            rows.append((name, ", ".join(f"{k} x{v}" for k, v in sorted(f["custom_calls"].items())) or "no custom calls"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def _parse(argv: list[str] | None) -> PlanArgs:
    """tyro, with its parse errors reduced to one ``error: --flag: ...`` line (exit 2)."""
    import contextlib

    import tyro

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return tyro.cli(PlanArgs, args=argv, description=__doc__.split("\n\n")[0])
    except SystemExit as e:
        if e.code in (0, None):
            raise
        body = []
        for line in err.getvalue().splitlines()[1:]:  # tyro's box: a title line, the message, a rule, the help hint
            inner = line.strip().strip("\u2502").strip()
            if not inner or set(inner) <= set("\u2500\u2570\u256f"):
                break
            body.append(inner)
        msg = re.sub(r"^Error parsing (PlanArgs: )?", "", " ".join(body)) or "invalid arguments"
        flag = re.search(r"--[\w.-]+", msg)
        flag = flag.group(0) if flag else "arguments"
        msg = msg[len(flag) + 1:].strip() if msg.startswith(flag + ":") else msg
        raise ConfigError(f"{flag}: {msg}") from None


def main(argv: list[str] | None = None) -> dict | None:
    from motif_jax.cli import run

    raw = list(sys.argv[1:] if argv is None else argv)
    result: dict[str, Any] = {}

    def body() -> int | None:
        if _DEVICES_ERROR and argv is None:
            raise ConfigError(_DEVICES_ERROR)
        args = _parse(raw)
        args.validate()
        if args.devices != _N and argv is None and not args.topology:
            raise ConfigError(f"--devices: {args.devices} but the process was started with {_N} devices")
        topology = tpu_topology(args.topology, args.num_slices) if args.topology else None
        if topology:
            check_tpu_request(args)
        if topology and not _libtpu_importable():
            if TPU_SITE.exists() and not os.environ.get("MOTIF_PLAN_WITH_LIBTPU"):
                return _run_with_libtpu(raw)
            raise ConfigError(
                "--topology: the TPU compiler (libtpu) is not installed for the planner: run `make tpu-plan` "
                f"(pip install --target {TPU_SITE.relative_to(ROOT)} 'libtpu==0.0.50.*', ~640 MB); it stays out of "
                ".venv so the rest of the suite keeps the CPU backend")
        import jax

        if topology:
            devices = tpu_devices(topology)
            given = any(a == "--devices" or a.startswith("--devices=") for a in raw)
            require(not given or args.devices == len(devices), "devices",
                    f"{args.topology} x {args.num_slices} slice(s) has {len(devices)} devices, not {args.devices}")
            compiled = compile_plan(args, devices, "tpu")
            out = report(args, compiled, None, "tpu", topology, len(devices))
        else:
            devices = jax.devices()[: args.devices]
            compiled = compile_plan(args, devices, "cpu") if args.compile else None
            lowered = lowering_report(args, devices) if args.lower_for else None
            out = report(args, compiled, lowered, "xla:cpu" if compiled else None, None, args.devices)
        print(_table(out))
        print(json.dumps(out, default=str), flush=True)
        result.update(out)
        return 0

    code = run(body)
    if argv is None:
        raise SystemExit(code)
    if code:
        raise SystemExit(code)
    return result


if __name__ == "__main__":
    main()
