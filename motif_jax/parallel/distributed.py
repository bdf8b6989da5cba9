"""Multi-process start-up: explicit flags, SLURM, or a single process.

``init_kwargs`` is a pure function of (DistributedConfig, environment) that returns the arguments for
``jax.distributed.initialize`` (or None for a single process); ``initialize`` applies them. Keeping the derivation
pure makes every launcher layout testable without starting anything.

GPU layouts:
- one process per node driving all its GPUs (``srun --ntasks-per-node=1``): ``local_device_ids`` lists every GPU the
  process can see. Passing them explicitly matters: left unset under SLURM, JAX's auto-detection assigns
  ``[SLURM_LOCALID]`` = ``[0]`` and the process silently drives one GPU of its node (maxtext #865, #3433).
- one process per GPU (``--ntasks-per-node=<gpus>``): each process gets its own GPU (the only one visible when
  SLURM binds GPUs per task, else the one at index SLURM_LOCALID).
Device ids are CUDA ordinals as the process sees them (after CUDA_VISIBLE_DEVICES renumbering).

CPU: every process uses Gloo collectives, so two processes on 127.0.0.1 form one mesh (tests).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

from motif_jax.config import ConfigError, DistributedConfig

__all__ = [
    "first_host",
    "init_kwargs",
    "initialize",
    "local_device_ids_from_env",
    "slurm_port",
    "tasks_per_node",
]


def _parse_ids(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ConfigError(f"--{flag}: expected comma-separated integers, got {text!r}") from None


def first_host(nodelist: str) -> str:
    """First host name of a SLURM node list: ``"node[003-005,9],gpu1"`` -> ``"node003"``."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first comma outside brackets ends the first entry
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end].strip()
    # each bracket group contributes its first element (keeping zero padding): "a[01-04]-b[2,5]" -> "a01-b2"
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], entry)


def slurm_port(env: Mapping[str, str], port: int = 0) -> int:
    """``port`` if set, else JAX's own SLURM choice: SLURM_JOB_ID mod 4096 in the top ephemeral range."""
    if port:
        return port
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0"
    try:
        return int(job) % 2**12 + (65535 - 2**12 + 1)
    except ValueError:
        return 65535 - 2**12 + 1


def tasks_per_node(env: Mapping[str, str]) -> int | None:
    """Processes per node from SLURM_NTASKS_PER_NODE, SLURM_STEP_TASKS_PER_NODE ("8(x2)") or ntasks / nodes."""
    for key in ("SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        value = env.get(key)
        if value:
            m = re.match(r"\s*(\d+)", value)
            if m:
                return int(m.group(1))
    ntasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if ntasks and nodes and int(nodes) > 0:
        return max(int(ntasks) // int(nodes), 1)
    return None


def _visible_gpus(env: Mapping[str, str]) -> list[int] | None:
    """CUDA ordinals this process can use, or None when nothing says (then JAX uses every local device)."""
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() not in ("", "NoDevFiles"):
        return list(range(len([x for x in cvd.split(",") if x.strip() != ""])))
    for key in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):  # physical ids; ordinals equal them without CUDA_VISIBLE_DEVICES
        value = env.get(key)
        if value:
            try:
                return [int(x) for x in value.split(",") if x.strip() != ""]
            except ValueError:
                continue
    return None


def local_device_ids_from_env(env: Mapping[str, str], process_per: str = "auto") -> list[int] | None:
    """Local device ids for this process from CUDA_VISIBLE_DEVICES / SLURM_STEP_GPUS / SLURM_JOB_GPUS.

    process_per "node": all visible GPUs; "gpu": one GPU (the only visible one, or the one at SLURM_LOCALID);
    "auto": "node" when SLURM runs one task per node, else "gpu". None = let JAX use every local device.
    """
    visible = _visible_gpus(env)
    mode = process_per
    if mode == "auto":
        tpn = tasks_per_node(env)
        mode = "node" if (tpn is None or tpn == 1) else "gpu"
    if mode == "node":
        return visible
    local = int(env.get("SLURM_LOCALID", env.get("LOCAL_RANK", "0")))
    if visible is not None and len(visible) == 1:
        return visible
    if visible is not None and local < len(visible):
        return [visible[local]]
    return [local]


def init_kwargs(cfg: DistributedConfig, env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Arguments for ``jax.distributed.initialize``, or None for a single process.

    Precedence: explicit flags (``--distributed.coordinator-address`` with ``--distributed.num-processes`` > 1),
    then SLURM (``SLURM_NTASKS`` > 1, when ``--distributed.use-slurm``), else single process. The result always
    disables JAX's own cluster auto-detection: every value is decided here.
    """
    env = os.environ if env is None else env
    explicit_ids = _parse_ids(cfg.local_device_ids, "distributed.local-device-ids") if cfg.local_device_ids else None
    if cfg.num_processes > 1:
        ids = explicit_ids
        if ids is None and cfg.process_per != "auto":
            ids = local_device_ids_from_env(env, cfg.process_per)
        return {
            "coordinator_address": cfg.coordinator_address,
            "num_processes": cfg.num_processes,
            "process_id": cfg.process_id,
            "local_device_ids": ids,
            "cluster_detection_method": "deactivate",
        }
    if cfg.use_slurm and int(env.get("SLURM_NTASKS", env.get("SLURM_STEP_NUM_TASKS", "1")) or 1) > 1:
        missing = [k for k in ("SLURM_PROCID",) if k not in env]
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if missing or not nodelist:
            raise ConfigError(
                "--distributed.use-slurm: SLURM_NTASKS > 1 but SLURM_PROCID or the node list is missing; run under "
                "srun, or pass --distributed.coordinator-address / --distributed.num-processes / "
                "--distributed.process-id (or --distributed.use-slurm False for one process)"
            )
        host = cfg.coordinator_address or f"{first_host(nodelist)}:{slurm_port(env, cfg.coordinator_port)}"
        return {
            "coordinator_address": host,
            "num_processes": int(env.get("SLURM_NTASKS") or env["SLURM_STEP_NUM_TASKS"]),
            "process_id": int(env["SLURM_PROCID"]),
            "local_device_ids": explicit_ids if explicit_ids is not None
            else local_device_ids_from_env(env, cfg.process_per),
            "cluster_detection_method": "deactivate",
        }
    return None


def initialize(cfg: DistributedConfig = DistributedConfig(), env: Mapping[str, str] | None = None,
               **extra: Any) -> dict[str, Any] | None:
    """Starts the multi-process runtime when the flags / SLURM say so; a no-op for one process.

    Must run before any JAX computation. Sets Gloo CPU collectives so CPU processes form one mesh (harmless on
    GPU/TPU). Returns the kwargs used (None for a single process). ``extra`` goes to jax.distributed.initialize
    (e.g. ``initialization_timeout``).
    """
    kwargs = init_kwargs(cfg, env)
    if kwargs is None:
        return None
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    call = {k: v for k, v in kwargs.items() if v is not None}
    jax.distributed.initialize(**call, **extra)
    return kwargs


def describe(kwargs: Mapping[str, Any] | None) -> str:
    if kwargs is None:
        return "single process"
    ids: Sequence[int] | None = kwargs.get("local_device_ids")
    return (f"process {kwargs['process_id']}/{kwargs['num_processes']} via {kwargs['coordinator_address']}, "
            f"local devices {'all' if ids is None else list(ids)}")
