"""Run untrusted, model-written Python code in a separate, resource-limited process.

``run_python(code, stdin=..., config=SandboxConfig(...)) -> SandboxResult`` runs ``code`` as ``__main__`` in a fresh
interpreter (``python -I -B``) and returns its status, (truncated) stdout/stderr, exit code and timings. One process
tree per call; nothing is shared between calls. ``pass_fds`` hands pipes to the program (the code verifier's
request/reply channels); ``cancel`` ends a run early.

The interpreter is ``SandboxConfig.python``; by default the *base* interpreter of the Python running motif_jax
(``sys._base_executable``: same version, standard library only, no virtual-environment packages), in both modes.
:func:`isolation_mode` and ``SandboxResult.python`` say which one ran.

What each mode guarantees (each line is exercised by ``tests/test_rl_sandbox*.py``)
---------------------------------------------------------------------------------
**``isolation="namespaces"``** (root + util-linux ``unshare``/``setpriv``/``pivot_root``; ``auto`` picks it when a
probe run succeeds). The kernel contains the code, whatever it runs (native code, children without the Python
layer):

* a new root file system: a read-only skeleton holding only ``visible_paths`` (``/usr``, ``/lib*``, ``/bin`` ...,
  bind-mounted read-only) and the interpreter's prefix, a private ``/proc``, ``/dev/{null,zero,full,random,urandom}``
  and the working directory ``/sandbox``, a ``tmpfs`` of ``work_dir_mb`` owned by the sandbox uid. Nothing else of the
  host is there: no ``/tmp``, ``/run``, ``/home``, data or reference outputs, no host Unix socket to ``connect()`` to;
* new network namespace (loopback down: no connection leaves; abstract Unix sockets are per namespace too), new IPC
  namespace (SysV / POSIX IPC objects die with the run), new UTS and PID namespaces (the code sees and signals only
  its own processes; when the namespace's init exits the kernel kills every process left, new sessions included);
* a dedicated unprivileged uid per concurrent run (leased with a lock file), no supplementary groups,
  ``no_new_privs``, an empty capability bounding set, ``RLIMIT_NPROC`` per run (per uid), and an in-namespace
  ``timeout -s KILL`` that ends the run even when the caller died.

**``isolation="process"``** (weaker: no root needed). The code runs under the caller's uid and sees the caller's
file system; only the Python layer below stands between it and the caller's files, processes and network. A
supervisor process (``PR_SET_CHILD_SUBREAPER``) outlives the code, inherits every orphaned descendant and kills
them all when the code ends, times out or the caller dies (double fork + ``setsid`` included). The caller polls the
working directory's disk usage every 0.1 s and ends the run past ``work_dir_mb`` (a burst can overshoot by what is
written in that interval, each file capped at ``max_file_mb``). Not provided: IPC, network and file-system isolation
from children started with ``allow_subprocess`` (they have no Python layer), so with ``allow_subprocess`` such a
child can do anything the caller's uid can, including forging a code verifier's verdict; nor from third-party
native packages that expose raw memory (numpy's ``__array_interface__``), which is one reason the default
interpreter has none. Use ``process`` mode only for trusted-ish code or inside an outer container/VM.

**Python layer** (both modes; an audit hook installed before the code runs, which cannot be removed and holds only
immutable state). It refuses with ``PermissionError("[sandbox] ...")``: sockets other than ``socketpair`` and DNS;
writes, renames, removals, links, mode changes ... outside the working directory, symbolic links, ``chdir`` out of
it; opening a directory outside it (so no ``dir_fd`` can point elsewhere: relative paths are checked against the
working directory); reading ``/proc/<pid>`` of other processes and, in ``process`` mode, the sandbox's own temporary
directories (other runs' programs); ``ctypes``/``cffi``/``_posixshmem``/``_test*`` modules and extension modules
loaded from the working directory; every ``_imp.create_builtin`` after start-up (all compiled-in modules are
imported first, so no fresh copy of ``_posixsubprocess``/``posix`` can be made, and copies of extension modules raise
an ``import`` event that is checked); ``pidfd_open``/``setns``/``unshare``; ``gc`` object walks, tracing and
profiling hooks, other threads' frames; signals or ``prlimit`` on other process groups; and, unless
``allow_subprocess``, ``fork``/``exec``/``spawn``/``system``/``subprocess``. Python's documentation says audit hooks
are not a sandbox; in ``namespaces`` mode they only give early, readable refusals.

**Both modes**: ``RLIMIT_CPU`` (SIGXCPU, then SIGKILL one second later), ``RLIMIT_AS``, ``RLIMIT_FSIZE`` (also bounds
stdout/stderr, which go to files), ``RLIMIT_NOFILE``, no core files; the environment rebuilt from scratch; a
wall-clock timeout after which every process of the run is killed; temporary files live under
``<temp_dir>/proc-<pid>-*/``, removed after each run and, if the caller was killed, by the next process that starts a
sandbox there (a lock file tells live owners from dead ones).

Not guaranteed in either mode: no seccomp filter and no cgroup, so kernel exploits are out of scope, memory is
bounded per process by ``RLIMIT_AS`` rather than by a cgroup, and CPU/disk bandwidth is not shared fairly between
concurrent runs. In ``namespaces`` mode the files under ``visible_paths`` are readable (keep data out of them).

Statuses: ``ok`` (exit code 0), ``runtime_error`` (non-zero exit, e.g. an uncaught exception), ``timeout`` (wall clock
or CPU limit), ``memory`` (``MemoryError``), ``output_limit`` (file-size limit, working directory full or over
``work_dir_mb``), ``violation`` (ended by a sandbox refusal), ``killed`` (another signal, or ``cancel``), ``error``
(the sandbox itself could not start the code). Exit codes above 128 are read as "killed by signal (code - 128)", as a
shell reports them.

Code: this module (the API: one run, choosing the isolation and the interpreter); ``sandbox_runner`` (the program
that starts inside: supervisor, resource limits, audit hook); ``sandbox_namespaces`` (the namespaces set-up and the
sandbox uids); ``sandbox_processes`` (waiting for a run under its limits, killing its process tree);
``sandbox_tempdirs`` (temporary directories and their owners); ``sandbox_result`` (statuses and the result).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

from motif_jax.rl.config import SandboxConfig
from motif_jax.rl.sandbox_namespaces import NS_WORK, UidLease, namespace_command, ns_tools
from motif_jax.rl.sandbox_processes import wait_run
from motif_jax.rl.sandbox_result import (
    SandboxResult,
    SandboxStatus,
    SandboxUnavailable,
    classify,
    last_line,
    read_capped,
)
from motif_jax.rl.sandbox_runner import READY, runner_command
from motif_jax.rl.sandbox_tempdirs import owner_dir

__all__ = [
    "SandboxResult",
    "SandboxStatus",
    "SandboxUnavailable",
    "isolation_mode",
    "run_python",
]

logger = logging.getLogger(__name__)

_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


# ---------------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------------


def run_python(code: str, stdin: str | bytes = b"", config: SandboxConfig | None = None, *,
               pass_fds: Sequence[int] = (), cancel: threading.Event | None = None) -> SandboxResult:
    """Run ``code`` (Python source) in the sandbox with ``stdin`` as its standard input.

    Blocks until the program ends, ``config.timeout_s`` (wall clock) passes or ``cancel`` is set; thread-safe (runs
    may be issued from a thread pool). ``pass_fds``: file descriptors the program inherits under the same numbers;
    they belong to the run: ``run_python`` closes them in the caller once the program has started (or failed to).
    Raises :class:`SandboxUnavailable` only for a configuration that cannot be honoured here; every failure of the
    program itself is reported in the result's ``status``.
    """
    fds = list(pass_fds)
    try:
        cfg = config or SandboxConfig()
        mode, python, _ = _plan_for(cfg)
        data = stdin.encode("utf-8") if isinstance(stdin, str) else bytes(stdin)
        return _run(cfg, mode, python, code, data, fds, cancel)
    finally:
        _close_fds(fds)


def _close_fds(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


def _run(cfg: SandboxConfig, mode: str, python: str, code: str, stdin: bytes, fds: list[int],
         cancel: threading.Event | None) -> SandboxResult:
    run_dir = tempfile.mkdtemp(prefix="motif_sbx_", dir=owner_dir(cfg))
    try:
        with contextlib.ExitStack() as stack:
            # Program, input and output files are the caller's (0600, in a 0700 directory): the sandbox uid cannot
            # read them, and in namespaces mode this directory is not even in the program's file system.
            work = os.path.join(run_dir, "work")
            os.mkdir(work, 0o700)
            paths = {k: os.path.join(run_dir, k) for k in ("program", "stdin", "stdout", "stderr")}
            for key, content in (("program", code.encode("utf-8", "surrogateescape")), ("stdin", stdin)):
                with open(os.open(paths[key], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), "wb") as f:
                    f.write(content)
            in_f = stack.enter_context(open(paths["stdin"], "rb"))
            out_f = stack.enter_context(open(os.open(paths["stdout"], os.O_CREAT | os.O_WRONLY, 0o600), "wb"))
            err_f = stack.enter_context(open(os.open(paths["stderr"], os.O_CREAT | os.O_WRONLY, 0o600), "wb"))
            uid = stack.enter_context(UidLease(cfg.uid_base, cfg.uid_count)) if mode == "namespaces" else None
            prog_fd = os.open(paths["program"], os.O_RDONLY)
            ctl_r, ctl_w = os.pipe()
            stack.callback(os.close, ctl_r)
            os.set_blocking(ctl_r, False)
            py_cmd = runner_command(python, cfg, mode, program_fd=prog_fd, control_fd=ctl_w,
                                    private_dirs=[os.path.dirname(os.path.dirname(run_dir))] if mode == "process"
                                    else [])
            if mode == "namespaces":
                assert uid is not None
                cmd, home = namespace_command(cfg, python, run_dir, uid, py_cmd), NS_WORK
            else:
                cmd, home = py_cmd, work
            env = {"PATH": _SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": home, "TMPDIR": home}
            t0 = time.monotonic()
            try:
                proc = subprocess.Popen(
                    cmd, stdin=in_f, stdout=out_f, stderr=err_f, env=env, cwd=work, start_new_session=True,
                    pass_fds=(prog_fd, ctl_w, *fds), close_fds=True,
                )
            except OSError as e:
                return SandboxResult("error", "", "", None, 0.0, 0.0, False, False, mode,  # type: ignore[arg-type]
                                     -1, detail=f"cannot start the sandbox: {e}", python=python)
            finally:
                os.close(ctl_w)
                os.close(prog_fd)
                _close_fds(fds)  # the program's now; holding them would hide its end-of-file from the caller
            status, rusage, reason = wait_run(proc, mode, cfg, work, cancel)
            wall = time.monotonic() - t0
            try:
                started = os.read(ctl_r, 16).startswith(READY)
            except BlockingIOError:
                started = False
        code_ = os.waitstatus_to_exitcode(status)
        if 128 < code_ < 128 + signal.NSIG:  # the init shell / the supervisor report a signal as 128 + N
            code_ = -(code_ - 128)
        cpu = rusage.ru_utime + rusage.ru_stime
        out, out_trunc = read_capped(paths["stdout"], cfg.max_output_bytes)
        err, err_trunc = read_capped(paths["stderr"], cfg.max_output_bytes)
        st = classify(code_, started, err, cpu, cfg.cpu_time_s)
        detail = ""
        if reason == "timeout":
            st, detail = "timeout", f"wall-clock limit {cfg.timeout_s}s"
        elif reason == "work_dir":
            st, detail = "output_limit", f"working directory over --sandbox.work-dir-mb {cfg.work_dir_mb}"
        elif reason == "cancelled":
            st, detail = "killed", "cancelled by the caller"
        elif st == "error":
            detail = "the sandbox could not start the program: " + last_line(err)
        return SandboxResult(st, out, err, code_, wall, cpu, out_trunc, err_trunc, mode,  # type: ignore[arg-type]
                             proc.pid, detail=detail, python=python)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# Choosing the isolation and the interpreter (once per process and configuration)
# ---------------------------------------------------------------------------------------------------------------------


def _default_python() -> str:
    """The base interpreter of the running Python (outside any virtual environment)."""
    return os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable)


def _python_candidates(explicit: str) -> list[str]:
    if explicit:
        return [explicit]
    out: list[str] = []
    for c in (_default_python(), "/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if c and os.path.exists(c) and c not in out:
            out.append(c)
    return out


@functools.lru_cache(maxsize=16)
def _plan(isolation: str, python: str, uid_base: int, uid_count: int, visible: tuple[str, ...],
          temp_dir: str) -> tuple[str, str, str]:
    """(mode, interpreter, reason) for a config; probes the namespaced setup once with a real run."""
    reasons = []
    if isolation in ("auto", "namespaces"):
        if os.geteuid() != 0:
            reasons.append("namespaces need root (unshare of net/mount/pid/ipc namespaces and setuid to a sandbox uid)")
        elif ns_tools() is None:
            reasons.append("namespaces need util-linux unshare, setpriv, mount, pivot_root and coreutils timeout")
        else:
            probe_cfg = SandboxConfig(isolation="namespaces", uid_base=uid_base, uid_count=uid_count,
                                      visible_paths=visible, temp_dir=temp_dir, timeout_s=20.0, cpu_time_s=20,
                                      memory_mb=512)
            for cand in _python_candidates(python):
                r = _run(probe_cfg, "namespaces", cand, "import json, resource, re, threading\nprint('ok')\n", b"",
                         [], None)
                if r.status == "ok" and r.stdout.strip() == "ok":
                    return "namespaces", cand, ""
                reasons.append(f"{cand}: {r.status} {r.stderr.strip()[-300:]}")
        if isolation == "namespaces":
            raise SandboxUnavailable(
                "--sandbox.isolation namespaces is not available here: " + "; ".join(reasons)
                + ". Use --sandbox.isolation process (weaker) or run as root with util-linux installed."
            )
    if isolation == "auto" and os.geteuid() == 0:
        logger.warning("code sandbox falls back to the weaker 'process' isolation: %s", "; ".join(reasons))
    cands = _python_candidates(python)
    return "process", (cands[0] if cands else sys.executable), "; ".join(reasons)


def _plan_for(cfg: SandboxConfig) -> tuple[str, str, str]:
    return _plan(cfg.isolation, cfg.python, cfg.uid_base, cfg.uid_count, tuple(cfg.visible_paths), cfg.temp_dir)


def isolation_mode(config: SandboxConfig | None = None) -> tuple[str, str]:
    """Which isolation ``run_python`` would use for ``config`` and with which interpreter: ``(mode, python)``.

    Detected once per process (a probe run through the namespaced setup). Raises :class:`SandboxUnavailable` if
    ``config.isolation == "namespaces"`` cannot be honoured.
    """
    mode, py, _ = _plan_for(config or SandboxConfig())
    return mode, py
