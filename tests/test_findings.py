"""scripts/findings.py --smoke runs every arm of every finding end to end at toy sizes and writes the report (tables
and one plot per finding) and, as its last line, the JSON of per-arm mean, std and seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_sft import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_findings_smoke_runs_every_arm_and_writes_the_report(tmp_path):
    env = subprocess_env(1)  # one CPU device, as a user's run on a CPU has (not the suite's 8)
    # --smoke defaults to one seed
    out = subprocess.run([sys.executable, str(ROOT / "scripts/findings.py"), "--smoke", "--out-dir",
                          str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    arms = {"aligned_traces": {"aligned", "teacher", "answer_only", "mix_filtered"},
            "band": {"band", "no_band", "band@equal_wall", "no_band@equal_wall"}, "reuse": {"reuse", "no_reuse"},
            "rl_vs_sft": {"start@1-4", "start@5-6", "rl@1-4", "rl@5-6", "sft@1-4", "sft@5-6"}}
    assert {k: set(v) for k, v in result.items()} == arms
    for finding in result.values():
        for arm in finding.values():
            assert set(arm) == {"mean", "std", "seeds"} and len(arm["seeds"]) == 1 and 0 <= arm["mean"] <= 1
    report = (tmp_path / "findings.md").read_text()
    for name in arms:
        assert f"img/findings_{name}.png" in report and (tmp_path / "img" / f"findings_{name}.png").stat().st_size
    for finding in ("aligned_traces", "rl"):  # every arm left its run directory with a summary
        assert list((tmp_path / "seed0" / finding).glob("*/summary.json"))
