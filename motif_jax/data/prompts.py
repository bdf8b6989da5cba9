"""Prompt records for generation (RL prompt pools, held-out evaluation): ``synthetic:...`` specs or JSONL files.

Several sources separated by ``;`` make one mixed pool, e.g. a spread of difficulty:
``synthetic:addition?min_digits=1&max_digits=8;synthetic:linear?steps=1;synthetic:linear?steps=3``.

A JSONL line is a record with ``messages`` (the conversation; a trailing assistant turn is the reference and is
dropped when prompting, so SFT trace files serve as held-out sets too), or a ``prompt`` / ``question`` string (one
user turn); ``id`` (default ``<file>:<line>``), ``task`` and the verifier fields (``answer``, ``tests``,
``constraints``, ...) pass through.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from motif_jax.config import ConfigError
from motif_jax.data.records import TraceFormatError, detect_format, iter_valid, open_reader
from motif_jax.data.synthetic import is_synthetic_spec, synthetic_records

__all__ = ["load_prompt_records"]


def _format(path: Path) -> str:
    try:
        return detect_format(path)
    except TraceFormatError:  # any other name is read as JSON lines
        return "jsonl"


def route_tasks(records: list[dict[str, Any]], task_verifiers: Mapping[str, str]) -> list[dict[str, Any]]:
    """Records whose ``task`` has an entry in ``task_verifiers`` (and that name no ``verifiers`` of their own) get
    ``verifiers: [that one]``: the routing --task-verifiers gives evaluation and rewards alike."""
    if not task_verifiers:
        return records
    return [{**r, "verifiers": [task_verifiers[r.get("task")]]} if r.get("task") in task_verifiers and
            "verifiers" not in r else r for r in records]


def load_prompt_records(spec: str, *, limit: int | None = None, flag: str = "prompts",
                        task_verifiers: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Prompt records from a ``synthetic:...`` spec or a JSONL file.

    A JSONL line is a record with ``messages`` (the conversation up to the answer; a trailing assistant turn is the
    reference and is dropped when prompting), or a ``prompt`` / ``question`` string (one user turn); ``id``
    (default ``<file>:<line>``), ``task`` and the verifier fields (``answer``, ``tests``, ``constraints``, ...)
    pass through. Raises ConfigError naming ``--<flag>`` for a missing file or a malformed line.
    """
    parts = [p.strip() for p in spec.split(";") if p.strip()]
    records = [r for part in parts for r in _load(part, None if len(parts) > 1 else limit, flag)]
    return route_tasks(records[:limit] if limit else records, task_verifiers or {})


def _load(spec: str, limit: int | None, flag: str) -> list[dict[str, Any]]:
    if is_synthetic_spec(spec):
        try:
            records = synthetic_records(spec)
        except ValueError as e:
            raise ConfigError(f"--{flag}: {e}") from None
        return records[:limit] if limit else records
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--{flag}: no such file {spec!r} (give a JSONL file or a synthetic:<task>?... spec)")
    if _format(path) != "jsonl":  # Parquet / ArrayRecord trace files: validated trace records
        records = [rec for _, rec in iter_valid(open_reader(path))]
        return records[:limit] if limit else records
    records = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--{flag}: {path}:{lineno}: not JSON ({e})") from None
            if "messages" not in rec:
                text = rec.get("prompt", rec.get("question"))
                if not isinstance(text, str):
                    raise ConfigError(f"--{flag}: {path}:{lineno}: needs 'messages' or a 'prompt' string")
                rec["messages"] = [{"role": "user", "content": text}]
            rec.setdefault("id", f"{path.name}:{lineno}")
            records.append(rec)
            if limit and len(records) >= limit:
                break
    if not records:
        raise ConfigError(f"--{flag}: {path} holds no records")
    return records
