"""Multi-process start-up: init kwargs from flags / SLURM (pure, nothing started) and a real two-process run.

The two-process test starts two interpreters on 127.0.0.1 (CPU, Gloo collectives), 4 CPU devices each; together
they form one 8-device mesh (data=2, fsdp=2, tensor=2) and run compiled train steps of the tiny model. The first
step's loss and gradient norm must equal the single-process (one device) values of the same parameters and batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from motif_jax.config import ConfigError, DistributedConfig
from motif_jax.parallel.distributed import (
    first_host,
    init_kwargs,
    local_device_ids_from_env,
    slurm_port,
    tasks_per_node,
)

ROOT = Path(__file__).resolve().parent.parent

SLURM_2_NODES_1_TASK_EACH = {
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_STEP_NODELIST": "gpu-node[007-008]",
    "SLURM_JOB_ID": "4242",
    "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
}


def test_single_process_by_default():
    assert init_kwargs(DistributedConfig(), env={}) is None
    assert init_kwargs(DistributedConfig(), env={"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert init_kwargs(DistributedConfig(use_slurm=False), env=SLURM_2_NODES_1_TASK_EACH) is None


def test_explicit_flags_win():
    cfg = DistributedConfig(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
                            local_device_ids="0,1")
    kw = init_kwargs(cfg, env=SLURM_2_NODES_1_TASK_EACH)
    assert kw == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
                  "local_device_ids": [0, 1], "cluster_detection_method": "deactivate"}
    with pytest.raises(ConfigError, match="distributed.local-device-ids"):
        init_kwargs(DistributedConfig(coordinator_address="h:1", num_processes=2, local_device_ids="0,x"), env={})


def test_slurm_one_process_per_node_drives_all_its_gpus():
    """The 'only GPU 0' trap: with one task per node, every visible GPU must be listed, not [SLURM_LOCALID]."""
    kw = init_kwargs(DistributedConfig(), env=SLURM_2_NODES_1_TASK_EACH)
    assert kw["coordinator_address"] == f"gpu-node007:{4242 % 4096 + 61440}"
    assert kw["num_processes"] == 2 and kw["process_id"] == 1
    assert kw["local_device_ids"] == list(range(8))
    assert kw["cluster_detection_method"] == "deactivate"  # JAX must not re-derive [SLURM_LOCALID]
    # GPUs known only from SLURM (no CUDA_VISIBLE_DEVICES): physical ids are the ordinals
    env = {k: v for k, v in SLURM_2_NODES_1_TASK_EACH.items() if k != "CUDA_VISIBLE_DEVICES"}
    assert init_kwargs(DistributedConfig(), env={**env, "SLURM_STEP_GPUS": "4,5,6,7"})["local_device_ids"] == [4, 5, 6, 7]
    assert init_kwargs(DistributedConfig(), env={**env, "SLURM_JOB_GPUS": "0,1"})["local_device_ids"] == [0, 1]
    # nothing says: None = every local device (auto-detection stays off)
    assert init_kwargs(DistributedConfig(), env=env)["local_device_ids"] is None


def test_slurm_one_process_per_gpu():
    env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_NNODES": "2",
           "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_NODELIST": "a[1-2]", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    kw = init_kwargs(DistributedConfig(coordinator_port=7777), env=env)
    assert kw["coordinator_address"] == "a1:7777" and kw["num_processes"] == 16 and kw["process_id"] == 13
    assert kw["local_device_ids"] == [5]
    # SLURM bound one GPU per task: the only visible one (ordinal 0)
    assert init_kwargs(DistributedConfig(), env={**env, "CUDA_VISIBLE_DEVICES": "5"})["local_device_ids"] == [0]
    # forcing the layout
    assert init_kwargs(DistributedConfig(process_per="node"), env=env)["local_device_ids"] == list(range(8))


def test_slurm_helpers():
    assert first_host("node[003-005,9],gpu1") == "node003"
    assert first_host("host-a,host-b") == "host-a"
    assert first_host("rack[1-2]-n[01-04]") == "rack1-n01"
    assert first_host("single") == "single"
    assert slurm_port({"SLURM_JOB_ID": "1"}) == 61441 and slurm_port({}, 1234) == 1234
    assert tasks_per_node({"SLURM_STEP_TASKS_PER_NODE": "4(x3)"}) == 4
    assert tasks_per_node({"SLURM_NTASKS": "16", "SLURM_NNODES": "2"}) == 8
    assert local_device_ids_from_env({"CUDA_VISIBLE_DEVICES": "2,3"}, "node") == [0, 1]
    with pytest.raises(ConfigError, match="SLURM_PROCID"):
        init_kwargs(DistributedConfig(), env={"SLURM_NTASKS": "2"})


# ---------------------------------------------------------------------------------------------------------------------
# Two real processes
# ---------------------------------------------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {root!r})
    from motif_jax.config import DistributedConfig, MeshConfig, ModelConfig, load_yaml
    from motif_jax.parallel.distributed import initialize

    pid, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    nproc = int(sys.argv[4])
    if nproc > 1:
        initialize(DistributedConfig(coordinator_address=f"127.0.0.1:{{port}}", num_processes=nproc, process_id=pid),
                   initialization_timeout=120)
    import jax
    import numpy as np
    from motif_jax.parallel.mesh import batch_sharding, make_mesh
    from motif_jax.train.optim import make_optimizer, make_schedule
    from motif_jax.train.state import init_train_state
    from motif_jax.train.step import compile_train_step, lm_loss
    sys.path.insert(0, {tests!r})
    from test_parallel_train import OPTIM, TINY, packed_batch

    assert jax.device_count() == 8, jax.device_count()
    assert jax.process_count() == nproc
    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2)
    mesh = make_mesh(mesh_cfg)
    tx = make_optimizer(OPTIM, 10)
    state, graphdef, shardings = init_train_state(TINY, tx, mesh, mesh_cfg.logical_rules, seed=0)
    bs = batch_sharding(mesh, mesh_cfg.logical_rules)
    host = packed_batch()
    batch = {{k: jax.make_array_from_callback(v.shape, bs, lambda idx, v=v: v[idx]) for k, v in host.items()}}
    step = compile_train_step(lm_loss(graphdef), tx, mesh=mesh, state_shardings=shardings, abstract_state=state,
                              batch=batch, mesh_cfg=mesh_cfg, schedule=make_schedule(OPTIM, 10), verbose=False)
    new_state, metrics = step(state, batch)
    new_state, metrics2 = step(new_state, batch)  # the update ran on both processes' shards consistently
    result = {{"loss": float(metrics["loss"]), "loss2": float(metrics2["loss"]),
              "grad_norm": float(metrics["grad_norm"]), "processes": jax.process_count(),
              "local_devices": jax.local_device_count()}}
    with open(out, "w") as f:
        json.dump(result, f)
    if nproc > 1:
        jax.distributed.shutdown()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_form_one_mesh_and_match_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), tests=str(ROOT / "tests")))
    port = _free_port()

    def launch(pid, nproc, devices):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"}
        env.pop("SLURM_NTASKS", None)
        return subprocess.Popen(
            [sys.executable, str(script), str(pid), str(port), str(tmp_path / f"out{nproc}_{pid}.json"), str(nproc)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    procs = [launch(0, 2, 4), launch(1, 2, 4)]
    try:
        # the single-process reference (one device, same parameters and batch) while the workers compile
        import jax
        import numpy as np
        import optax
        from flax import nnx

        from motif_jax.model.transformer import create_model
        from tests.test_parallel_train import TINY, _loss_and_grads, packed_batch

        graphdef, params = nnx.split(create_model(TINY, seed=0))
        loss, grads = jax.jit(lambda p, b: _loss_and_grads(p, graphdef, b))(params, packed_batch())
        single = {"loss": float(loss), "grad_norm": float(optax.tree.norm(grads))}
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    r0, r1 = (json.loads((tmp_path / name).read_text()) for name in ("out2_0.json", "out2_1.json"))
    assert r0["processes"] == 2 and r0["local_devices"] == 4
    for r in (r0, r1):
        assert abs(r["loss"] - single["loss"]) < 1e-5
        assert abs(r["grad_norm"] - single["grad_norm"]) < 1e-5 * max(single["grad_norm"], 1.0)
        assert np.isfinite(r["loss2"]) and r["loss2"] < r["loss"]  # the sharded update trains
    assert r0["loss2"] == r1["loss2"]  # both processes see the same global value
