"""The caller's side of a running sandbox: wait for it under the wall clock, ``cancel`` and (process mode) the
working directory's disk quota, then stop it and kill every process of its tree."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import threading
import time

from motif_jax.rl.config import SandboxConfig

__all__ = ["group_members", "session_members", "wait_run"]

_DU_INTERVAL_S = 0.1  # process mode: how often the working directory's size is checked
_DU_MAX_ENTRIES = 20_000  # process mode: more files than this ends the run (the check must stay cheap)


def _proc_stats() -> list[tuple[int, list[bytes]]]:
    """(pid, fields after the command name of /proc/<pid>/stat) for every process."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        out.append((int(name), stat[stat.rfind(b")") + 2 :].split()))
    return out


def group_members(pgid: int) -> list[int]:
    """Pids (zombies included) whose process group is ``pgid``, from /proc."""
    return [pid for pid, f in _proc_stats() if len(f) > 2 and int(f[2]) == pgid]


def session_members(sid: int) -> list[int]:
    """Pids (zombies included) whose session or process group is ``sid``."""
    return [pid for pid, f in _proc_stats() if len(f) > 3 and sid in (int(f[2]), int(f[3]))]


def _over_quota(path: str, limit_bytes: int) -> bool:
    """Whether the tree at ``path`` uses more than ``limit_bytes`` of disk (or has too many entries to count)."""
    used, entries, todo = 0, 0, [path]
    while todo:
        try:
            it = os.scandir(todo.pop())
        except OSError:
            continue
        with it:
            for e in it:
                entries += 1
                if entries > _DU_MAX_ENTRIES:
                    return True
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                used += max(st.st_size, st.st_blocks * 512)  # blocks may lag behind (delayed allocation)
                if e.is_dir(follow_symlinks=False):
                    todo.append(e.path)
    return used > limit_bytes


def wait_run(proc: subprocess.Popen, mode: str, cfg: SandboxConfig, work: str, cancel: threading.Event | None):
    """Wait for the run's first process, ending the run on timeout, cancel or (process mode) a full working
    directory. Returns (wait status, rusage, reason) with reason None, "timeout", "cancelled" or "work_dir"."""
    pid = proc.pid
    deadline = time.monotonic() + cfg.timeout_s
    quota = cfg.work_dir_mb * 1024 * 1024
    next_du = time.monotonic() + _DU_INTERVAL_S
    delay = 0.001
    reason = None
    while True:
        wpid, status, rusage = os.wait4(pid, os.WNOHANG)
        if wpid == pid:
            break
        now = time.monotonic()
        if now >= deadline:
            reason = "timeout"
        elif cancel is not None and cancel.is_set():
            reason = "cancelled"
        elif mode == "process" and now >= next_du:
            next_du = now + _DU_INTERVAL_S
            if _over_quota(work, quota):
                reason = "work_dir"
        if reason is not None:
            status, rusage = _stop(pid, mode)
            break
        time.sleep(min(delay, max(0.0, deadline - now)))
        delay = min(delay * 2, 0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    for member in session_members(pid) if mode == "process" else ():  # only if the supervisor itself was killed
        _kill(member)
    _killpg(pid)
    if reason is None and mode == "process" and _over_quota(work, quota):  # written and gone between two checks
        reason = "work_dir"
    return status, rusage, reason


def _reap_within(pid: int, seconds: float):
    """(status, rusage) of ``pid`` if it ends within ``seconds``, else None."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        wpid, status, rusage = os.wait4(pid, os.WNOHANG)
        if wpid == pid:
            return status, rusage
        time.sleep(0.002)
    return None


def _stop(pid: int, mode: str):
    """End a running run and reap its first process. Returns (wait status, rusage)."""
    if mode == "process":
        _kill(pid, signal.SIGTERM)  # the supervisor kills every descendant, then exits
        got = _reap_within(pid, 3.0)
        if got is not None:
            return got
        for member in session_members(pid):
            _kill(member)
    else:
        # Kill the namespace's processes first (pid 1 included) so that unshare reaps its child itself and no
        # zombie is handed to the host's init; the kernel kills whatever is left in the PID namespace.
        for member in group_members(pid):
            if member != pid:
                _kill(member)
        got = _reap_within(pid, 2.0)
        if got is not None:
            return got
    _killpg(pid)
    _, status, rusage = os.wait4(pid, 0)
    return status, rusage


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # gone, or a member under another uid we cannot signal
        pass
    except OSError as e:  # pragma: no cover - defensive
        if e.errno != errno.ESRCH:
            raise
