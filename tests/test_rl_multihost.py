"""Multi-host RL: two processes on 127.0.0.1 (4 CPU devices each, Gloo) form one 8-device mesh, generate their
shares of each round's rows, verify their shares, share every result, and update on the global mesh: the rounds'
rewards and update losses, and the final parameters, equal a one-process run on 8 devices with the same seed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from test_sft import _free_port, subprocess_env

ROOT = Path(__file__).resolve().parent.parent


def _recipe(run_dir: Path) -> dict:
    model = yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text())
    model.update(num_layers=1, max_seq_len=64)
    return {
        "model": model, "mesh": {"data": 1, "fsdp": -1}, "run_dir": str(run_dir), "seed": 3, "rounds": 3,
        "prompts": "synthetic:addition?split=train&n=64&max_digits=1", "verifiers": ["exact"],
        "eval": {"heldout": "synthetic:addition?split=test&n=8&max_digits=2", "num_records": 8,
                 "max_new_tokens": 8, "batch_size": 8},
        "rollout": {"group_size": 4, "max_new_tokens": 8, "max_prompt_len": 32, "temperature": 1.0},
        "update": {"groups_per_round": 4, "num_minibatches": 2},
        "band_filter": False, "objective": {"drop_zero_std_groups": False},
        "optim": {"lr": 3.0e-3, "warmup_steps": 0, "decay": "constant", "weight_decay": 0.0},
        "checkpoint": {"save_every": 0, "async_save": False},
    }


def _records(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.mark.multiprocess
def test_two_processes_run_rl_like_one_process(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(_recipe(two)))
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(_recipe(one)))
    port = _free_port()
    script = str(ROOT / "scripts/rl.py")

    def start(args, devices):
        return subprocess.Popen([sys.executable, script, *args], env=subprocess_env(devices), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = [start(["--config", str(tmp_path / "two.yaml"), "--distributed.coordinator-address", f"127.0.0.1:{port}",
                    "--distributed.num-processes", "2", "--distributed.process-id", str(pid)], 4) for pid in (0, 1)]
    procs.append(start(["--config", str(tmp_path / "one.yaml")], 8))
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]

    for split, keys in (("rollout", ("reward_mean", "rollouts", "groups_admitted")),
                        ("update", ("loss", "grad_norm"))):
        a, b = _records(two, split), _records(one, split)
        assert len(a) == len(b) > 0 and [r["step"] for r in a] == [r["step"] for r in b]
        for ra, rb in zip(a, b):
            for k in keys:
                assert (k in ra) == (k in rb), f"{split} {k}"
                np.testing.assert_allclose(ra.get(k, 0.0), rb.get(k, 0.0), rtol=1e-5, atol=1e-6, err_msg=f"{split} {k}")
    assert not (two / "summary.json").read_text() == ""  # process 0 wrote the summary
    from motif_jax.train.checkpoint import load_policy

    _, pa, _ = load_policy(two / "final")
    _, pb, _ = load_policy(one / "final")
    import jax

    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
