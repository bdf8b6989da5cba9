"""scripts/gpu_check.py without a GPU: the --build-only part runs here (the Triton part reports why it cannot, as
jax-triton is not in .venv), the GPU part refuses in one line, and the ~1B model of its MFU section is ~1B."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from motif_jax.model.transformer import abstract_model, count_params

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


def _run(*args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(tmp_path / "out.json")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_gpu_part_refuses_without_a_gpu_in_one_line(tmp_path):
    proc = _run(tmp_path=tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "no GPU here" in lines[0] and "--build-only" in lines[0], proc.stderr[-2000:]


def test_build_only_lowers_the_gpu_program_on_a_cpu_host(tmp_path):
    proc = _run("--build-only", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["target"] == {"device_kind": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0]}
    assert report["pallas_lowered"]["custom_calls"] == {"__gpu$xla.gpu.triton": 1}
    assert report["train_step_lowered"]["cudnn_mask_types"] == ["PADDING_CAUSAL"]
    assert "jax-triton is not installed" in report["triton_unavailable_reason"]  # .venv has no gpu extra
    assert "error" in report["triton_lowered"]  # reported, not a crash


def test_the_mfu_model_has_about_a_billion_parameters():
    cfg = gpu_check.one_b_config()
    n = count_params(abstract_model(cfg)[1])
    assert 0.8e9 < n < 1.3e9, n
    # model FLOPs per token exceed the 6 N of the matmuls by the causal attention term
    assert gpu_check._model_flops(cfg, n, 8192, 8192) > 6 * n * 8192
