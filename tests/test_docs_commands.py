"""Every command shown in README.md and docs/*.md names flags its script has, and the presets it names exist.

The commands are read from the Markdown (``python scripts/NAME.py ...``, continuation lines included); each flag is
looked up in the script's own ``--help`` (per sub-command for convert_hf.py); ``--config`` files are checked to exist
(presets made up in the text, such as my_sft.yaml, are skipped: they are the reader's)."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# argparse-based scripts whose own flags are not tyro fields (their --help lists them too)
PLACEHOLDER = re.compile(r"^[A-Z_]+$|\$|\[|<")


def _commands() -> list[tuple[str, str, list[str]]]:
    """(document, script, argument tokens) of every ``python scripts/X.py`` command in the docs."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"python (scripts/[a-z_]+\.py)((?:[^\n`]|\\\n)*)", text):
            args = m.group(2).replace("\\\n", " ").split("#", 1)[0]
            out.append((doc.name, m.group(1), args.split()))
    return out


@functools.cache
def _flags(script: str, sub: str = "") -> frozenset[str]:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(ROOT / script), *([sub] if sub else []), "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, (cmd, out.stderr[-2000:])
    return frozenset(re.findall(r"(--[a-z0-9][a-z0-9.-]*)", out.stdout))


COMMANDS = _commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 20 and {s for _, s, _ in COMMANDS} >= {"scripts/sft.py", "scripts/rl.py"}


@pytest.mark.parametrize("doc, script, args", COMMANDS, ids=[f"{d}:{s}:{i}" for i, (d, s, _) in enumerate(COMMANDS)])
def test_every_documented_flag_exists(doc, script, args):
    sub = args[0] if script.endswith("convert_hf.py") and args and not args[0].startswith("-") else ""
    known = _flags(script, sub)
    for i, tok in enumerate(args):
        flag = tok.split("=", 1)[0].strip("[]\"'")
        if flag.startswith("--") and not PLACEHOLDER.search(flag):
            assert flag in known, f"{doc}: `{script}` has no flag {flag}"
        if flag == "--config" and i + 1 < len(args):
            preset = args[i + 1]
            if preset.startswith("configs/") and not re.search(r"/my[-_]", preset):  # not the reader's own
                assert (ROOT / preset).is_file(), f"{doc}: no preset {preset}"
