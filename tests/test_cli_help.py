"""Every flag's --help text is its own: the scripts' help documents each flag (tyro reads the attribute docstrings),
and no flag shows another flag's text (tyro attaches a comment above one field to the fields after it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# script -> {flag: words its help must contain}
EXPECTED = {
    "sft.py": {
        "--train.num-microbatches": "gradient accumulation",
        "--eval.every": "between evaluations",
        "--seed": "seed of the initialisation",
        "--log-every": "between metric records",
        "--init-from": "policy to start from",
        "--model.remat-policy": "keep for the backward pass",
        "--max-minutes": "wall-clock budget",
    },
    "rl.py": {
        "--rollout.temperature": "sampling temperature",
        "--rollout.top-p": "nucleus sampling",
        "--rollout.max-new-tokens": "response budget",
        "--rollout.prompts-per-call": "prompts per generation call",
        "--update.groups-per-round": "groups trained on per round",
        "--objective.adv-std-ddof": "sample std",
        "--seed": "seed of the initialisation",
        "--log-every": "between metric records",
        "--train.num-microbatches": "gradient accumulation",
    },
    "score_traces.py": {"--policy": "policy directory", "--max-steps": "at most", "--batch-size": "scored at once"},
    "prefilter_prompts.py": {"--p-lo": "keep prompts", "--seed": "seed of the sampling"},
}


def _help(script: str) -> dict[str, str]:
    """flag -> its help text (defaults and choices removed), from ``script --help`` (one column of options)."""
    env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    texts: dict[str, str] = {}
    flag = None
    for line in out.stdout.splitlines():
        line = line.strip("│ ").rstrip()
        m = re.match(r"^(--[a-z0-9.-]+)(?:\s+[A-Z{][^\s]*)?\s*(.*)$", line)
        if m:
            flag = m.group(1)
            texts[flag] = m.group(2)
        elif flag and line and not line.startswith(("╭", "╰", "-h")):
            texts[flag] += " " + line
    clean = lambda t: re.sub(r"\((default|required)[^)]*\)|\{[^}]*\}", "", t).strip().lower()
    return {f: " ".join(clean(t).split()) for f, t in texts.items()}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_each_flag_has_its_own_help_text(script):
    texts = _help(script)
    for flag, words in EXPECTED[script].items():
        assert flag in texts, f"{script}: no {flag}"
        assert words in texts[flag], f"{script} {flag}: {texts[flag]!r}"
    seen: dict[str, str] = {}
    for flag, text in texts.items():
        if not text:
            continue
        # the same text on two flags is a comment attached to the wrong field (siblings in different sections,
        # e.g. --data.stages.0.x vs --data.x, may share it)
        other = seen.get(text)
        assert other is None or other.rsplit(".", 1)[-1] == flag.rsplit(".", 1)[-1], (script, other, flag, text)
        seen[text] = flag


# --help and a bad flag answer before JAX (and Orbax, Grain, transformers) load: ~0.4 s instead of ~2.5 s here
LIGHT = ["sft.py", "rl.py", "score_traces.py", "prefilter_prompts.py", "memory_plan.py", "demo.py", "ablate_rl.py"]
_PROBE = """import runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
print("EXIT", code, "HEAVY", sorted(m for m in ("jax", "flax", "orbax.checkpoint", "grain", "transformers")
                                     if m in sys.modules), file=sys.stderr)
"""


@pytest.mark.parametrize("script", LIGHT)
def test_help_and_flag_errors_answer_before_jax_loads(script):
    for args, code in ((["--help"], 0), (["--no-such-flag", "1"], 2)):
        out = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT / "scripts" / script), *args], text=True,
                             capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=120)
        assert out.stderr.strip().splitlines()[-1] == f"EXIT {code} HEAVY []", (script, args, out.stderr[-2000:])
    sub = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT / "scripts/convert_hf.py"), "import", "--help"],
                         text=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert sub.stderr.strip().splitlines()[-1] == "EXIT 0 HEAVY []", sub.stderr[-2000:]


def test_every_user_error_name_is_an_exception_class_and_only_those_exit_2(capsys):
    import importlib

    from motif_jax import cli

    for name in cli.USER_ERRORS:
        module, cls = name.split(":")
        assert issubclass(getattr(importlib.import_module(module), cls), Exception), name
    from motif_jax.data.records import TraceFormatError

    class Malformed(TraceFormatError):  # a subclass counts as its base
        pass

    def fail(e):
        def main():
            raise e
        return main

    err = Malformed("data.jsonl:3: not JSON")
    assert cli.run(fail(err)) == 2 and capsys.readouterr().err == f"error: {err}\n"
    with pytest.raises(KeyError):  # a bug keeps its traceback
        cli.run(fail(KeyError("bug")))
