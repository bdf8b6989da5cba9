"""SFT trainer end to end on CPU: exact resume, SIGKILL during an asynchronous save, two processes = one process.

Every run is the tiny recipe shrunk (tiny.yaml with 2 layers, 64-token rows, 8 rows per step, a few steps) on 8
CPU devices (``data=1, fsdp=8``). A persistent XLA compilation cache shared by the module's runs (in process and in
subprocesses) keeps the cost to one compilation per program; a cached executable is the same program.

- resume (in process, ``run_sft``): 2N steps in one go vs N steps (``stop_after_steps=N``) + the same command again:
  every logged train metric of every step and the final train state (params, optimizer state, step) and policy
  are bit-identical.
- SIGKILL (``scripts/sft.py``, asynchronous save every step): the run is frozen (SIGSTOP) at a moment when a save is
  verifiably in flight (an Orbax ``*.orbax-checkpoint-tmp`` directory) and at least one step is finalised, then
  SIGKILLed; the restart resumes from the newest finalised step and finishes.
- two processes (``--distributed.*`` on 127.0.0.1, 4 CPU devices each, Gloo): the per-step losses equal those of one
  process on 8 devices fed the same global batches (both hosts' shards side by side) to 1e-5; process 0 alone
  writes metrics.jsonl / tensorboard / config / summary; each checkpoint holds both hosts' iterator states; a
  stopped two-process run resumes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from motif_jax.config import from_dict
from motif_jax.data.pipeline import make_data_iterator
from motif_jax.train.sft import SFTConfig, run_sft

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "synthetic:addition?style=aligned&n=2000&min_digits=2&max_digits=3&split=train"
# metrics that depend on wall-clock time, not on the computation
TIMING_KEYS = {"tokens_per_s", "mfu"}


def recipe(run_dir: Path, steps: int, **top) -> dict:
    """The run as a plain dict (what a YAML preset holds): tiny.yaml with 2 layers, 8 x 64-token rows per step."""
    model = yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text())
    model.update(num_layers=2, max_seq_len=128)
    cfg = {
        "model": model,
        "mesh": {"data": 1, "fsdp": -1},
        "data": {"tokenizer": "byte", "seq_len": 64, "batch_size": 8, "sources": [{"path": SOURCE}],
                 "stages": [{"name": "main", "steps": steps}]},
        "optim": {"lr": 3.0e-3, "warmup_steps": 2, "decay": "cosine", "min_lr_ratio": 0.1},
        "checkpoint": {"save_every": 4, "keep": 2, "async_save": True},
        "log_every": 1,
        "seed": 0,
        "run_dir": str(run_dir),
    }
    for key, value in top.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def make_cfg(run_dir: Path, steps: int, **top) -> SFTConfig:
    return from_dict(SFTConfig, recipe(run_dir, steps, **top), base_dir=ROOT)


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def final_state(run_dir: Path) -> dict:
    """The newest checkpoint's train state (params, optimizer state, step) as host numpy arrays."""
    import orbax.checkpoint as ocp

    ckpt = run_dir / "checkpoints"
    step = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    with ocp.StandardCheckpointer() as c:
        restored = c.restore(ckpt / str(step) / "state")
    return jax.tree.map(np.asarray, restored["train"])


def subprocess_env(devices: int) -> dict:
    """Environment of a run in a subprocess: ``devices`` CPU devices, the run's compilation cache (inherited, see
    conftest.py), and LLVM optimisation level 0 (every subprocess run uses the same flags, so runs that are compared
    execute the same code)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def write_recipe(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def eight_devices():
    if jax.device_count() != 8:
        pytest.skip("needs the 8 simulated CPU devices of tests/conftest.py")


# ---------------------------------------------------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------------------------------------------------


def test_resume_is_bit_exact(tmp_path, eight_devices, capsys):
    n = 3  # stop at 3 (not a save_every multiple: the stop itself saves), total 6
    full = run_sft(make_cfg(tmp_path / "full", 2 * n))
    assert full["status"] == "finished" and full["steps"] == 2 * n

    split = tmp_path / "split"
    first = run_sft(make_cfg(split, 2 * n, stop_after_steps=n))
    assert first == {"status": "stopped", "steps": n}
    assert not (split / "final").exists() and not (split / "summary.json").exists()
    capsys.readouterr()
    second = run_sft(make_cfg(split, 2 * n, stop_after_steps=n))  # the same command again: runs the rest, finishes
    assert f"resumed from step {n}" in capsys.readouterr().out
    assert second["status"] == "finished" and second["steps"] == 2 * n

    a, b = train_records(tmp_path / "full"), train_records(split)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 2 * n + 1))  # every step once
    for ra, rb in zip(a, b):
        keys = set(ra) - TIMING_KEYS
        assert keys == set(rb) - TIMING_KEYS and {"loss", "grad_norm", "learning_rate", "tokens"} <= keys
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}, f"step {ra['step']}"

    sa, sb = final_state(tmp_path / "full"), final_state(split)
    la, tree_a = jax.tree.flatten(sa)
    lb, tree_b = jax.tree.flatten(sb)
    assert tree_a == tree_b and len(la) > 10
    assert int(sa["step"]) == int(sb["step"]) == 2 * n
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(x, y)

    from motif_jax.train.checkpoint import load_policy

    _, pa, _ = load_policy(tmp_path / "full")
    _, pb, _ = load_policy(split)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------------------------------------
# SIGKILL during an asynchronous save
# ---------------------------------------------------------------------------------------------------------------------

TMP_MARK = ".orbax-checkpoint-tmp"
# runs in subprocesses all have this many steps: one compiled program (compilation cache) serves several of them
SUBPROCESS_STEPS = 10


def _checkpoint_dirs(ckpt: Path) -> tuple[list[int], list[str]]:
    """(finalised step numbers, in-flight temporary directory names)."""
    names = [p.name for p in ckpt.iterdir()] if ckpt.is_dir() else []
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if TMP_MARK in n)


def test_sigkill_during_async_save_restarts_from_last_complete_checkpoint(tmp_path):
    total = SUBPROCESS_STEPS
    run_dir = tmp_path / "run"
    cfg = write_recipe(tmp_path / "recipe.yaml",
                       recipe(run_dir, total, checkpoint={"save_every": 1, "keep": 3, "async_save": True}))
    cmd = [sys.executable, str(ROOT / "scripts/sft.py"), "--config", str(cfg)]
    env = subprocess_env(8)
    ckpt = run_dir / "checkpoints"
    log = tmp_path / "first.log"  # a file, not a pipe: a full pipe would block the run
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    killed_at = None
    try:
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            done, tmp = _checkpoint_dirs(ckpt)
            if len(done) >= 2 and tmp:  # several complete steps to choose from, one in flight
                proc.send_signal(signal.SIGSTOP)  # freeze every thread, then look again: no race with a rename
                done, tmp = _checkpoint_dirs(ckpt)
                if len(done) >= 2 and tmp:
                    proc.kill()
                    killed_at = (done, tmp)
                    break
                proc.send_signal(signal.SIGCONT)
            time.sleep(0.003)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait(timeout=60)
    out = log.read_text()
    print(f"killed with finalised steps {killed_at and killed_at[0]}, in flight {killed_at and killed_at[1]}")
    assert killed_at is not None, f"the run ended before a save could be caught in flight:\n{out[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    done, tmp = killed_at
    assert _checkpoint_dirs(ckpt) == killed_at  # nothing moved after the kill
    last_complete = done[-1]
    in_flight = sorted(int(n.split(".")[0]) for n in tmp)
    assert last_complete < total and in_flight[-1] > last_complete, (done, tmp)
    assert not (run_dir / "summary.json").exists()
    before = train_records(run_dir)  # may go past last_complete: those steps are lost and run again

    res = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=240)
    assert res.returncode == 0, res.stdout[-4000:]
    m = re.search(r"resumed from step (\d+)", res.stdout)
    assert m and int(m.group(1)) == last_complete, res.stdout[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == total
    after = train_records(run_dir)[len(before):]
    assert [r["step"] for r in after] == list(range(last_complete + 1, total + 1))  # exactly the missing steps
    assert [r["step"] for r in before][:last_complete] == list(range(1, last_complete + 1))
    lost = {r["step"]: r for r in before if r["step"] > last_complete}
    for r in after:  # a step run before the kill and again after the restart computed the same numbers
        if r["step"] in lost:
            assert r["loss"] == lost[r["step"]]["loss"] and r["grad_norm"] == lost[r["step"]]["grad_norm"]
    assert all(np.isfinite(r["loss"]) for r in after)
    done_now, tmp_now = _checkpoint_dirs(ckpt)
    assert done_now[-1] == total
    assert int(final_state(run_dir)["step"]) == total


# ---------------------------------------------------------------------------------------------------------------------
# Two processes on 127.0.0.1
# ---------------------------------------------------------------------------------------------------------------------


class SideBySideShards:
    """One process reading what ``count`` hosts would: the batches of every host's shard, concatenated in host
    order (the rows host i feeds to ``make_array_from_process_local_data``), so its global batch is the
    multi-host one. (One process reading the source unsharded would pack other records into its rows.)"""

    def __init__(self, data_cfg, tokenizer, count: int):
        self._its = [make_data_iterator(data_cfg, tokenizer=tokenizer, shard_index=i, shard_count=count)
                     for i in range(count)]
        self.report = self._its[0].report

    @property
    def stage(self) -> int:
        return self._its[0].stage

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        parts = [next(it) for it in self._its]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> dict:
        return {"shards": [it.get_state() for it in self._its]}

    def close(self) -> None:
        for it in self._its:
            it.close()


def side_by_side_data(count: int):
    """A stand-in for ``motif_jax.train.sft.make_data_iterator`` feeding ``count`` hosts' batches to one process."""

    def make(data_cfg, *, tokenizer=None, shard_index=None, shard_count=None):
        if shard_index is not None:  # the held-out evaluation's own (unsharded) iterator
            return make_data_iterator(data_cfg, tokenizer=tokenizer, shard_index=shard_index, shard_count=shard_count)
        return SideBySideShards(data_cfg, tokenizer, count)

    return make


# Runs scripts/sft.py as __main__. With $SFT_WRITES_LOG it records every file the process opens for writing
# (Python-level opens: metrics, tensorboard events, summary/config, Grain iterator states; array data goes through
# TensorStore) into $SFT_WRITES_LOG.json at exit. With $SFT_SIDE_BY_SIDE_HOSTS=k one process reads k hosts' data.
LAUNCHER = textwrap.dedent(
    """
    import atexit, json, os, runpy, sys
    log = os.environ.get("SFT_WRITES_LOG")
    if log:
        writes = set()
        def hook(event, args):
            if event == "open":
                path, mode, flags = args
                if isinstance(path, int):
                    return
                if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                        mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                    writes.add(os.path.abspath(os.fsdecode(path)))
            elif event == "os.mkdir":
                writes.add(os.path.abspath(os.fsdecode(args[0])) + "/")
        sys.addaudithook(hook)
        atexit.register(lambda: open(log + ".json", "w").write(json.dumps(sorted(writes))))
    if os.environ.get("SFT_SIDE_BY_SIDE_HOSTS"):
        import motif_jax.train.sft
        from tests.test_sft import side_by_side_data
        motif_jax.train.sft.make_data_iterator = side_by_side_data(int(os.environ["SFT_SIDE_BY_SIDE_HOSTS"]))
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_log_like_one_process(tmp_path):
    steps, stop = SUBPROCESS_STEPS, SUBPROCESS_STEPS // 2
    run_dir, single_dir = tmp_path / "two", tmp_path / "single"
    cfg = write_recipe(tmp_path / "recipe.yaml", recipe(run_dir, steps))
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)

    def start(args: list[str], devices: int, **env_extra) -> subprocess.Popen:
        env = {**subprocess_env(devices), **env_extra}
        return subprocess.Popen([sys.executable, str(launcher), str(ROOT / "scripts/sft.py"), *args], env=env,
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def run_all(procs: list[subprocess.Popen]) -> list[str]:
        try:
            outs = [p.communicate(timeout=400)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for p, out in zip(procs, outs):
            assert p.returncode == 0, out[-4000:]
        return outs

    def pair(extra: list[str], tag: str) -> list[subprocess.Popen]:
        port = _free_port()
        return [start(["--config", str(cfg), "--distributed.coordinator-address", f"127.0.0.1:{port}",
                       "--distributed.num-processes", "2", "--distributed.process-id", str(pid), *extra], 4,
                      SFT_WRITES_LOG=str(tmp_path / f"writes_{tag}_{pid}")) for pid in (0, 1)]

    def writes(tag: str) -> list[set[Path]]:
        """Files (not directories) each process opened for writing under the run directory."""
        out = []
        for pid in (0, 1):
            paths = json.loads((tmp_path / f"writes_{tag}_{pid}.json").read_text())
            out.append({Path(w) for w in paths if not w.endswith("/") and Path(w).is_relative_to(run_dir)})
        return out

    # part 1: two processes stop after `stop` steps (a collective save of both hosts' state); meanwhile the
    # single-process reference: 8 devices in one process, fed both hosts' shards side by side
    reference = start(["--config", str(cfg), "--run-dir", str(single_dir)], 8, SFT_SIDE_BY_SIDE_HOSTS="2")
    outs1 = run_all(pair(["--stop-after-steps", str(stop)], "a") + [reference])
    assert f"saved step {stop}" in outs1[0]
    step_dir = run_dir / "checkpoints" / str(stop)
    assert sorted(p.name for p in (step_dir / "data").iterdir() if p.suffix == ".json") == [
        "process_0-of-2.json", "process_1-of-2.json"]  # each host's iterator position, in one checkpoint step
    for i in (0, 1):
        assert json.loads((step_dir / "data" / f"process_{i}-of-2.json").read_text())["step"] == stop
    assert not (run_dir / "summary.json").exists()
    # part 2: the same two-process command again resumes from that checkpoint and finishes
    outs2 = run_all(pair([], "b"))
    assert f"resumed from step {stop}" in outs2[0] and "resumed from" not in outs2[1]  # process 0 alone prints

    single = {r["step"]: r["loss"] for r in train_records(single_dir)}
    records = train_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, steps + 1))  # one writer, every step once
    assert sorted(single) == list(range(1, steps + 1))
    for r in records:
        assert abs(r["loss"] - single[r["step"]]) < 1e-5, (r["step"], r["loss"], single[r["step"]])
    assert records[-1]["loss"] < records[0]["loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == steps
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per invocation

    for tag in ("a", "b"):
        w0, w1 = writes(tag)
        top0 = {p.relative_to(run_dir).parts[0] for p in w0}
        assert {"metrics.jsonl", "tensorboard", "config.yaml", "checkpoints"} <= top0, top0
        assert any(p.name == "process_0-of-2.json" for p in w0)
        # process 1 wrote only its own parts of the collective Orbax saves (its Grain iterator state, its array
        # metadata), never a log, the config or the summary
        assert any(p.name == "process_1-of-2.json" for p in w1), w1
        assert all(p.name.startswith("process_1") for p in w1), sorted(w1)
    assert run_dir / "summary.json" in writes("b")[0]
