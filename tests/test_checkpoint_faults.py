"""Broken checkpoints and failing saves: fall back to the newest step that reads back, with one warning line;
report and remove unfinished writes; fail a save in one line; end a stuck run in bounded time after SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from motif_jax.data.config import DataConfig, SourceConfig
from motif_jax.data.pipeline import make_data_iterator
from motif_jax.train.checkpoint import TMP_MARKER, CheckpointError, Checkpointer
from motif_jax.train.config import CheckpointConfig

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "synthetic:addition?style=aligned&n=200&min_digits=1&max_digits=2&split=train"


def _iterator():
    return make_data_iterator(DataConfig(sources=(SourceConfig(SOURCE),), seq_len=64, batch_size=2),
                              shard_index=0, shard_count=1)


def _target():
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {"train": {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=sharding)}}


def _three_steps(directory: Path) -> None:
    it = _iterator()
    ckpt = Checkpointer(directory, CheckpointConfig(keep=5, async_save=False))
    for step in (1, 2, 3):
        next(it)
        ckpt.save(step, {"train": {"w": jnp.full((64, 64), float(step))}}, data_iterator=it, extra={"step": step})
    ckpt.close()
    it.close()


def _files(step_dir: Path, name: str) -> list[Path]:
    return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == name]


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:7])


CORRUPTIONS = {
    "truncated chunk": lambda d: [_truncate(p) for p in _files(d, "d")],
    "zeroed chunk": lambda d: [p.write_bytes(b"\0" * p.stat().st_size) for p in _files(d, "d")],
    "deleted chunk": lambda d: [p.unlink() for p in _files(d, "d")],
    "garbage _METADATA": lambda d: (d / "state" / "_METADATA").write_text("{not json"),
    "deleted manifest": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "bad iterator JSON": lambda d: [p.write_text("{bad") for p in (d / "data").glob("*.json")],
    "bad extra": lambda d: [p.write_text("[1, 2") for p in (d / "extra").iterdir() if p.name != "commit_success.txt"],
    "emptied step": lambda d: (shutil.rmtree(d), d.mkdir()),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_corrupt_newest_step_falls_back_to_the_previous_one(tmp_path, capsys, kind):
    directory = tmp_path / "ckpt"
    _three_steps(directory)
    CORRUPTIONS[kind](directory / "3")
    it = _iterator()
    ckpt = Checkpointer(directory, CheckpointConfig(keep=5, async_save=False))
    step, state, extra = ckpt.restore_newest(lambda extra: _target(), data_iterator=it)
    assert step == 2 and extra == {"step": 2} and float(state["train"]["w"][0, 0]) == 2.0
    warning = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and "checkpoint step 3" in warning[0] and "3.unreadable" in warning[0], warning
    assert (directory / "3.unreadable").is_dir() and not (directory / "3").exists()
    assert ckpt.all_steps() == [1, 2]
    # the iterator continues where step 2 left it: its next batch is the third of a fresh iterator
    fresh = _iterator()
    for _ in range(2):
        next(fresh)
    np.testing.assert_array_equal(next(it)["tokens"], next(fresh)["tokens"])
    # the run goes on: step 3 can be written again
    ckpt.save(3, {"train": {"w": jnp.zeros((64, 64))}}, data_iterator=it, extra={"step": 3})
    ckpt.close()
    it.close()
    fresh.close()


def test_no_readable_step_is_one_error_naming_the_steps(tmp_path):
    directory = tmp_path / "ckpt"
    _three_steps(directory)
    for step in (1, 2, 3):
        CORRUPTIONS["garbage _METADATA"](directory / str(step))
    ckpt = Checkpointer(directory, CheckpointConfig(keep=5, async_save=False))
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* reads back \(step 3: .*step 1: .*\); move"):
        ckpt.restore_newest(lambda extra: _target())
    ckpt.close()


def test_unfinished_writes_are_reported_and_removed(tmp_path, capsys):
    directory = tmp_path / "ckpt"
    leftover = directory / f"4{TMP_MARKER}-1733140000"
    (leftover / "state").mkdir(parents=True)
    ckpt = Checkpointer(directory, CheckpointConfig())
    assert not leftover.exists() and ckpt.restore_newest(lambda extra: _target()) is None
    err = capsys.readouterr().err
    assert "removing 1 unfinished checkpoint write" in err and leftover.name in err
    ckpt.close()


def test_a_file_in_place_of_the_directory_and_a_failing_save_are_one_line_errors(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(CheckpointError, match="is not a directory"):
        Checkpointer(tmp_path / "file")
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(async_save=False))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt._manager, "save", disk_full)
    with pytest.raises(CheckpointError, match=r"saving checkpoint step 5 to .* failed \(OSError: .*No space left"):
        ckpt.save(5, {"train": {"w": jnp.zeros(4)}})
    ckpt._manager.close()


HUNG_RUN = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from motif_jax.train.checkpoint import PreemptionFlag
    flag = PreemptionFlag(grace_s={grace})
    print("ready", flush=True)
    while True:  # a run stuck where it never looks at the flag again (a hung save or collective)
        time.sleep(0.05)
""")


@pytest.mark.parametrize("how", ["grace", "second signal"])
def test_sigterm_ends_a_stuck_run_in_bounded_time(tmp_path, how):
    script = tmp_path / "hung.py"
    script.write_text(HUNG_RUN.format(root=str(ROOT), grace=2.0 if how == "grace" else 600.0))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    if how == "second signal":
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and "stop requested: exiting now" in err


def test_a_corrupt_checkpoint_resumes_sft_with_the_losses_of_an_uninterrupted_run(tmp_path, capsys):
    """End to end: SFT saves at steps 2 and 4, step 4 is corrupted, the same command resumes from step 2 and
    logs steps 3..6 exactly as a run that was never interrupted."""
    from motif_jax.config import from_dict
    from motif_jax.train.sft import SFTConfig, run_sft

    def cfg(run_dir, **kw):
        return from_dict(SFTConfig, {
            "model": {"base": "configs/model/tiny.yaml", "num_layers": 1, "max_seq_len": 64},
            "data": {"tokenizer": "byte", "seq_len": 64, "batch_size": 8, "sources": [{"path": SOURCE}],
                     "stages": [{"name": "main", "steps": 6}]},
            "optim": {"lr": 3e-3, "warmup_steps": 1}, "log_every": 1, "run_dir": str(run_dir),
            "checkpoint": {"save_every": 2, "keep": 5, "async_save": False}, **kw}, base_dir=ROOT)

    def losses(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["split"] == "train"]

    run_sft(cfg(tmp_path / "straight"))
    broken = tmp_path / "broken"
    assert run_sft(cfg(broken, stop_after_steps=4))["status"] == "stopped"
    CORRUPTIONS["truncated chunk"](broken / "checkpoints" / "4")
    capsys.readouterr()
    assert run_sft(cfg(broken))["status"] == "finished"
    out = capsys.readouterr()
    assert "checkpoint step 4" in out.err and "resumed from step 2" in out.out
    resumed = [x for x in losses(broken) if x[0] > 2][-4:]
    assert resumed == losses(tmp_path / "straight")[2:]
    assert os.path.isdir(broken / "checkpoints" / "4.unreadable")
