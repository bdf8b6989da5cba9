"""What a sandboxed run reports: its status, the result record, and how an exit is read as a status."""

from __future__ import annotations

import dataclasses
import signal
from typing import Literal

__all__ = ["SandboxResult", "SandboxStatus", "SandboxUnavailable", "classify", "last_line", "read_capped"]

SandboxStatus = Literal["ok", "runtime_error", "timeout", "memory", "output_limit", "violation", "killed", "error"]


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be provided on this machine (the message says what is missing)."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``exit_code``: the program's exit status (>= 0), ``-N`` if killed by signal N, ``None`` if it never started.
    ``pid``: the run's first process (``unshare`` or the process-mode supervisor), whose session and process group
    it leads; every process of the run is gone when ``run_python`` returns. ``cpu_s`` is the user + system time of
    the processes that were reaped. ``python``: the interpreter that ran the code.
    """

    status: SandboxStatus
    stdout: str
    stderr: str
    exit_code: int | None
    wall_s: float
    cpu_s: float
    stdout_truncated: bool
    stderr_truncated: bool
    isolation: Literal["namespaces", "process"]
    pid: int
    detail: str = ""
    python: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def read_capped(path: str, limit: int) -> tuple[str, bool]:
    """The first ``limit`` bytes of the file at ``path`` as text, and whether there was more."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    truncated = len(data) > limit
    return data[:limit].decode("utf-8", "replace"), truncated


def last_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return ""


def classify(code: int | None, started: bool, stderr: str, cpu_s: float, cpu_limit: int) -> str:
    """The status of a run that ended by itself: its exit code (``-N``: signal N), whether the runner started the
    code, the last line of its stderr and its CPU time against the limit."""
    if not started:
        return "error"
    if code == 0:
        return "ok"
    last = last_line(stderr)
    if code is not None and code < 0:
        sig = -code
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= cpu_limit - 0.05):
            return "timeout"
        if sig == signal.SIGXFSZ:
            return "output_limit"
        if sig == signal.SIGKILL and "MemoryError" in last:
            return "memory"
        return "killed"
    if last.startswith("MemoryError"):
        return "memory"
    # Python ignores SIGXFSZ and gets EFBIG instead; ENOSPC: the working directory (tmpfs) is full
    if "[Errno 27]" in last or last.endswith("File too large") or "[Errno 28]" in last:
        return "output_limit"
    if "[sandbox] " in last:  # a refusal of the Python layer ended the run (possibly wrapped, e.g. URLError)
        return "violation"
    return "runtime_error"
