"""TPU plans from this CPU host, compiled by the real TPU compiler (libtpu's compile-only topology devices).

libtpu never enters this test process or .venv (JAX would select the TPU backend for the whole suite): it lives in
``.venv-tpu/site`` and only the planner's subprocess puts it on its path. The first run installs it there (the
version jax's ``tpu`` extra pins, ~640 MB, cached for later runs); without a package index the TPU tests skip and
say so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parent.parent
PLANNER = ROOT / "scripts" / "memory_plan.py"
SITE = ROOT / ".venv-tpu" / "site"
LIBTPU = "libtpu==0.0.50.*"  # what `jax[tpu]==0.12.0.1` requires


@pytest.fixture(scope="module")
def libtpu_site() -> Path:
    if not (SITE / "libtpu").is_dir():
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(SITE),
                               LIBTPU], capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            pytest.skip(f"libtpu could not be installed into {SITE} (no package index?): {proc.stderr[-300:]}")
    return SITE


def _plan(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(PLANNER), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_libtpu_stays_out_of_this_process():
    assert importlib.util.find_spec("libtpu") is None
    assert jax.default_backend() == "cpu"


def test_tiny_train_step_and_rl_update_compile_for_v5p_with_the_tpu_compiler(libtpu_site):
    proc = _plan("--config", "tiny", "--topology", "v5p-8", "--seq-len", "512", "--attention-impl", "auto", "--rl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plan["compiler"] == "tpu" and plan["compiled"]["platform"] == "tpu"
    assert plan["topology"] == {"name": "v5p-8", "topology_name": "v5p:2x2x1", "chips": 4, "num_slices": 1}
    assert plan["devices"] == 4
    assert plan["compiled"]["attention_impl"] == "splash"  # auto on TPU: the Mosaic splash kernel
    assert plan["device_memory_bytes"] == 95e9  # a v5p chip's HBM
    mem = plan["per_device_bytes"]
    assert mem["temporaries"] > 0 and mem["arguments"] > 0
    assert mem["total"] == mem["arguments"] + mem["outputs"] + mem["temporaries"] - mem["aliased"]
    assert plan["rl_update_per_device_bytes"]["total"] > 0


def test_context_parallel_splash_compiles_for_two_v5p_slices(libtpu_site):
    """Two slices (DCN data parallelism), context parallelism with heads exchanged inside each slice."""
    proc = _plan("--config", "tiny", "--topology", "v5p-8", "--num-slices", "2", "--seq-len", "512",
                 "--mesh.fsdp", "2", "--mesh.context", "2", "--mesh.dcn-data", "2", "--attention-impl", "splash")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plan["compiler"] == "tpu" and plan["devices"] == 8
    assert plan["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1, "context": 2}


def test_planner_without_libtpu_says_how_to_install_it():
    # MOTIF_PLAN_WITH_LIBTPU marks the planner's own libtpu subprocess: with it set and no libtpu on the path the
    # planner must not look further, which is the situation of a machine where `make tpu-plan` never ran.
    proc = _plan("--config", "tiny", "--topology", "v5p-8", env_extra={"MOTIF_PLAN_WITH_LIBTPU": "1"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --topology:") and "make tpu-plan" in lines[0], lines


@pytest.mark.parametrize("args,flag", [
    (["--topology", "v5p-7"], "--topology"),
    (["--topology", "v5p-8", "--num-slices", "2"], "--num-slices"),  # the dcn_* sizes do not multiply to 2
    (["--topology", "v5p-8", "--attention-impl", "cudnn"], "--attention-impl"),
    (["--topology", "v5p-8", "--lower-for", "cuda"], "--lower-for"),
])
def test_bad_tpu_arguments_are_one_line_errors(libtpu_site, args, flag):
    proc = _plan("--config", "tiny", "--seq-len", "256", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {flag}:"), proc.stderr[-2000:]
