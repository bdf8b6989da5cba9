"""Run untrusted, model-written Python code in a separate, resource-limited process.

``run_python(code, stdin=..., config=SandboxConfig(...)) -> SandboxResult`` runs ``code`` as ``__main__`` in a fresh
interpreter (``python -I -B``) and returns its status, (truncated) stdout/stderr, exit code and timings. One process
tree per call; nothing is shared between calls.

Layers, from strongest to weakest, and what each one guarantees
---------------------------------------------------------------
**Kernel layer, ``isolation="namespaces"``** (needs root and util-linux ``unshare``/``setpriv``; ``auto`` picks it
when a probe run succeeds):

* new network namespace: only a loopback device that is down, so no connection can leave the sandbox
  (``connect`` fails with "Network is unreachable"), whatever the code does (raw syscalls, native code);
* new PID namespace with its own ``/proc``: the code cannot see or signal processes outside the sandbox (the parent's
  ``/proc/<pid>/environ`` is not even visible); when the namespace's init exits, the kernel kills every process left
  in it, including ones that changed session or process group (no fork-bomb survivors);
* new mount namespace in which every mount is remounted read-only and the working directory is a private ``tmpfs``
  (size ``work_dir_mb``) owned by the sandbox uid: writes anywhere but the working directory fail with EROFS;
* a dedicated unprivileged uid per concurrent run (``uid_base + k``, leased with a lock file) with no supplementary
  groups, ``no_new_privs`` and an empty capability bounding set: no setuid-binary escalation, no access to files
  that are not world-readable (``/root`` ...), and ``RLIMIT_NPROC`` counts only this run's processes (RLIMIT_NPROC
  is per uid and not enforced for root, which is why the run never keeps uid 0);
* an in-namespace ``timeout -s KILL`` (as root, out of the code's reach) that ends the run even if the parent died.

**Resource limits** (set by the trusted runner before any user code runs): ``RLIMIT_CPU`` (SIGXCPU, then SIGKILL
one second later), ``RLIMIT_AS`` (allocations fail: ``MemoryError``), ``RLIMIT_FSIZE`` (also bounds stdout/stderr,
which go to files: ``OSError: File too large`` beyond it), ``RLIMIT_NOFILE``, no core files, and in namespaces mode
``RLIMIT_NPROC`` for the run's own uid. In ``process`` mode ``RLIMIT_NPROC`` is not set: it would count every process
of the caller's uid (and is ignored for root), so fork bombs are stopped there by the Python layer (no ``fork`` unless
``allow_subprocess``) and the process-group kill only. The parent enforces a wall-clock timeout and SIGKILLs the
whole process group (own session via ``start_new_session``); a watchdog thread in the runner does the same if the
parent is gone.

**Process hygiene** (both modes): the environment is rebuilt from scratch (minimal ``PATH``, ``LANG``, ``HOME`` and
``TMPDIR`` = the working directory), so the parent's variables are never passed; ``-I`` ignores ``PYTHON*``
variables and the user site; the working directory is a fresh empty temporary directory, deleted afterwards; stdin,
stdout and stderr are files, so a chatty program cannot dead-lock the parent.

**Python layer** (both modes; the only network/file-system barrier in ``process`` mode): an audit hook
(``sys.addaudithook``, cannot be removed) installed before the code runs refuses with ``PermissionError("[sandbox]
...")``: socket creation / connect / DNS (every ``socket.*`` event); opening files for writing (and renames,
removes, links, chmod ...) outside the working directory; reading ``/proc/<pid>`` of other processes (the parent's
environment); ``ctypes``/``cffi``; ``gc`` object walks; signals to other processes; and, unless
``allow_subprocess``, ``fork``/``exec``/``spawn``/``system``/``subprocess``. Python's own documentation says audit
hooks are *not* a sandbox: native extension modules loaded from the working directory, ``os.open(..., dir_fd=...)``
relative to a directory opened elsewhere, races between check and use, and monkey-patching of the modules the hook
relies on can get past it. In ``process`` mode (no root) the code runs under the caller's uid, so a determined
attacker who gets past the Python layer can read the caller's files and processes and use the network; use
``process`` mode only for trusted-ish code or inside an outer container/VM.

Not guaranteed in either mode: no seccomp filter and no cgroup, so kernel exploits are out of scope, memory is
bounded per process by ``RLIMIT_AS`` (virtual memory, up to ``max_processes`` x ``memory_mb`` with subprocesses) and
the working-directory tmpfs (``work_dir_mb``) rather than by a cgroup, and CPU/disk bandwidth is not shared fairly
between concurrent runs. The interpreter the code sees may differ from the caller's: the sandbox uid must be able to
read it, so when the caller's Python lives somewhere private (``/root/.pyenv``) ``auto`` falls back to the system
``python3``; :func:`isolation_mode` tells which one is used.

Statuses: ``ok`` (exit code 0), ``runtime_error`` (non-zero exit, e.g. an uncaught exception), ``timeout`` (wall clock
or CPU limit), ``memory`` (``MemoryError``), ``output_limit`` (file-size limit hit), ``violation`` (ended by a
sandbox refusal), ``killed`` (another signal), ``error`` (the sandbox itself could not start the code).
In namespaces mode exit codes above 128 are read as "killed by signal (code - 128)", as a shell reports them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Literal

from motif_jax.rl.config import SandboxConfig

__all__ = [
    "SandboxResult",
    "SandboxStatus",
    "SandboxUnavailable",
    "isolation_mode",
    "run_python",
]

SandboxStatus = Literal["ok", "runtime_error", "timeout", "memory", "output_limit", "violation", "killed", "error"]

logger = logging.getLogger(__name__)

_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_READY = b"R"


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be provided on this machine (the message says what is missing)."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``exit_code``: the program's exit status (>= 0), ``-N`` if killed by signal N, ``None`` if it never started.
    ``pid``: the process-group id of the run (equal to the pid of its first process); every process of the group is
    gone when ``run_python`` returns. ``cpu_s`` is the user + system time of the processes that were reaped.
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

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ---------------------------------------------------------------------------------------------------------------------
# The trusted runner: executed by the sandboxed interpreter as ``python -I -B -c RUNNER <json>``. It must work on any
# Python >= 3.8 (the sandbox interpreter may be a system python3), reads the program from an inherited fd, sets the
# resource limits, installs the audit hook and a watchdog, reports readiness on the control pipe and closes it, then
# executes the program as __main__.
# ---------------------------------------------------------------------------------------------------------------------
_RUNNER = r'''
import sys, os, json, resource
def _sandbox_setup():
    cfg = json.loads(sys.argv[1])
    with os.fdopen(cfg["program_fd"], "rb") as f:
        src = f.read()
    for name, soft, hard in cfg["rlimits"]:
        res = getattr(resource, name)
        cur_soft, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
        resource.setrlimit(res, (min(soft, hard), hard))

    import re, threading, time, signal, linecache, types, pathlib
    _isinstance, _str, _bytes, _int, _type, _tuple, _len = isinstance, str, bytes, int, type, tuple, len
    _PermissionError, _ImportError = PermissionError, ImportError
    _realpath, _abspath, _fsdecode = os.path.realpath, os.path.abspath, os.fsdecode
    _getpid, _getpgid = os.getpid, os.getpgid
    own_pid = _getpid()
    own_pgid = _getpgid(0)
    cwd = _realpath(os.getcwd())
    cwd_prefix = cwd if cwd.endswith("/") else cwd + "/"
    allow_sub = bool(cfg["allow_subprocess"])
    wflags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    proc_re = re.compile(r"^/proc/([0-9]+)(/|$)")
    path_types = (pathlib.PurePosixPath, pathlib.PosixPath)
    write_devices = ("/dev/null", "/dev/stdout", "/dev/stderr")
    blocked_modules = {"ctypes", "_ctypes", "cffi", "_cffi_backend"}
    if not allow_sub:
        blocked_modules.add("_posixsubprocess")
    proc_events = {"os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system",
                   "subprocess.Popen", "os.startfile"}
    # (event, indices of path arguments) for file-system modifications
    fs_events = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.replace": (0, 1),
                 "os.link": (0, 1), "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.lchown": (0,),
                 "os.utime": (0,), "os.truncate": (0,), "os.chflags": (0,), "os.lchflags": (0,), "os.mkfifo": (0,),
                 "os.mknod": (0,), "os.setxattr": (0,), "os.removexattr": (0,), "shutil.rmtree": (0,)}

    def deny(what):
        raise _PermissionError("[sandbox] " + what)

    def as_str(p):
        if _isinstance(p, _int):
            return None  # an already-open file descriptor
        if _type(p) is _str:
            return p
        if _type(p) is _bytes:
            return _fsdecode(p)
        if _type(p) in path_types:
            return _str(p)
        deny("unsupported path type %s" % _type(p).__name__)

    def inside(p):
        if p in write_devices:
            return True
        r = _realpath(_abspath(p))
        return r == cwd or r.startswith(cwd_prefix)

    def check_read(p):
        m = proc_re.match(_realpath(_abspath(p)))
        if m is not None and _int(m.group(1)) != own_pid:
            deny("reading other processes' /proc entries is not allowed: " + p)

    def hook(event, args):
        if event == "open":
            p = as_str(args[0])
            if p is None:
                return
            flags = args[2] if _len(args) > 2 else 0
            if flags and flags & wflags:
                if not inside(p):
                    deny("writing outside the working directory is not allowed: " + p)
            else:
                check_read(p)
        elif event in fs_events:
            for i in fs_events[event]:
                if i < _len(args):
                    p = as_str(args[i])
                    if p is not None and not inside(p):
                        deny("%s outside the working directory is not allowed: %s" % (event, p))
        elif event.startswith("socket."):
            deny("network access is disabled (%s)" % event)
        elif event in proc_events:
            if not allow_sub:
                deny("starting processes is disabled (%s)" % event)
        elif event in ("os.kill", "os.killpg"):
            target = args[0]
            if event == "os.kill":
                if target in (0, own_pid, -own_pgid):
                    return
                if allow_sub and target > 0:
                    try:
                        if _getpgid(target) == own_pgid:
                            return
                    except OSError:
                        pass
            elif target in (0, own_pgid):
                return
            deny("signalling other processes is not allowed")
        elif event == "import":
            if args[0] in blocked_modules:
                deny("module %s is not allowed" % args[0])
        elif event.startswith("ctypes.") or event in ("gc.get_objects", "gc.get_referrers", "gc.get_referents"):
            deny("%s is not allowed" % event)

    if not allow_sub:
        import _posixsubprocess
        def _no_fork_exec(*a, **k):
            deny("starting processes is disabled")
        _posixsubprocess.fork_exec = _no_fork_exec
    sys.addaudithook(hook)

    # Watchdog: end the whole process group if the run outlives its wall-clock budget (parent gone).
    budget = float(cfg["watchdog_s"])
    _sleep, _killpg, _exit, _SIGKILL = time.sleep, os.killpg, os._exit, signal.SIGKILL
    def watchdog():
        _sleep(budget)
        try:
            _killpg(0, _SIGKILL)
        finally:
            _exit(137)
    threading.stack_size(256 * 1024)
    threading.Thread(target=watchdog, name="sandbox-watchdog", daemon=True).start()
    threading.stack_size(0)

    os.write(cfg["control_fd"], b"R")
    os.close(cfg["control_fd"])

    text = src.decode("utf-8", "replace")
    linecache.cache["solution.py"] = (_len(text), None, text.splitlines(True), "solution.py")
    code = compile(src, "solution.py", "exec", dont_inherit=True)
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    main.__dict__["__file__"] = "solution.py"
    sys.modules["__main__"] = main
    sys.argv = ["solution.py"]
    return code, main.__dict__
_c, _g = _sandbox_setup()
del _sandbox_setup
exec(_c, _g)
'''

# Init script of the namespaced run: pid 1 of the new PID namespace, root inside the new mount/network namespaces.
_NS_INIT = r'''
W="$1"; U="$2"; SZ="$3"; T="$4"; shift 4
while read -r _dev mp fstype _rest; do
  case "$fstype" in
    proc|sysfs|cgroup|cgroup2|devpts|devtmpfs|securityfs|debugfs|tracefs|pstore|bpf|configfs) continue;;
  esac
  case "$mp" in *\\*) mp=$(printf '%b' "$mp");; esac
  mount -o remount,bind,ro "$mp" 2>/dev/null
done < /proc/self/mounts
if ( : > /.motif_sandbox_rw_probe ) 2>/dev/null; then
  rm -f /.motif_sandbox_rw_probe; echo "[sandbox-init] cannot make / read-only" >&2; exit 121
fi
mount -t tmpfs -o "size=$SZ,mode=0700,uid=$U,gid=$U,nosuid,nodev" motif_sandbox "$W" || exit 122
cd "$W" || exit 123
unset OLDPWD
timeout -s KILL "$T" setpriv --reuid="$U" --regid="$U" --clear-groups --no-new-privs --inh-caps=-all \
  --bounding-set=-all -- "$@"
exit $?
'''


# ---------------------------------------------------------------------------------------------------------------------
# Capability detection (once per process and config)
# ---------------------------------------------------------------------------------------------------------------------


def _ns_tools() -> dict[str, str] | None:
    tools = {name: shutil.which(name, path=_SAFE_PATH + ":/sbin:/usr/sbin") for name in ("unshare", "setpriv", "mount",
                                                                                       "sh", "timeout")}
    if any(v is None for v in tools.values()):
        return None
    return tools  # type: ignore[return-value]


def _python_candidates(explicit: str) -> list[str]:
    if explicit:
        return [explicit]
    out: list[str] = []
    for c in (sys.executable, getattr(sys, "_base_executable", ""), os.path.realpath(sys.executable),
              "/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if c and os.path.exists(c) and c not in out:
            out.append(c)
    return out


@functools.lru_cache(maxsize=16)
def _plan(isolation: str, python: str, uid_base: int, uid_count: int) -> tuple[str, str, str]:
    """(mode, interpreter, reason) for a config; probes the namespaced setup once with a real run."""
    reasons = []
    if isolation in ("auto", "namespaces"):
        if os.geteuid() != 0:
            reasons.append("namespaces need root (unshare of net/mount/pid namespaces and setuid to a sandbox uid)")
        elif _ns_tools() is None:
            reasons.append("namespaces need util-linux unshare, setpriv, mount and coreutils timeout on PATH")
        else:
            probe_cfg = SandboxConfig(isolation="namespaces", uid_base=uid_base, uid_count=uid_count,
                                      timeout_s=20.0, cpu_time_s=20, memory_mb=512)
            for cand in _python_candidates(python):
                r = _run(probe_cfg, "namespaces", cand, "import json, resource, re, threading\nprint('ok')\n", b"")
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


def isolation_mode(config: SandboxConfig | None = None) -> tuple[str, str]:
    """Which isolation ``run_python`` would use for ``config`` and with which interpreter: ``(mode, python)``.

    Detected once per process (a probe run through the namespaced setup). Raises :class:`SandboxUnavailable` if
    ``config.isolation == "namespaces"`` cannot be honoured.
    """
    cfg = config or SandboxConfig()
    mode, py, _ = _plan(cfg.isolation, cfg.python, cfg.uid_base, cfg.uid_count)
    return mode, py


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: uid leases, process-group inspection, status classification
# ---------------------------------------------------------------------------------------------------------------------


def _uid_has_processes(uid: int) -> bool:
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        if int(line.split()[1]) == uid:
                            return True
                        break
        except OSError:
            continue
    return False


class _UidLease:
    """Exclusive use of one sandbox uid: an flock'ed file per uid (released by the kernel if this process dies)."""

    def __init__(self, base: int, count: int):
        self.base, self.count = base, count
        self.fd: int | None = None
        self.uid = -1

    def __enter__(self) -> int:
        lock_dir = os.path.join(tempfile.gettempdir(), "motif_jax_sandbox_uids")
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        start = random.SystemRandom().randrange(self.count)
        for i in range(self.count):
            uid = self.base + (start + i) % self.count
            fd = os.open(os.path.join(lock_dir, f"{uid}.lock"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            if _uid_has_processes(uid):  # left over from a crashed parent: skip until its watchdog ends it
                os.close(fd)
                continue
            self.fd, self.uid = fd, uid
            return uid
        raise SandboxUnavailable(f"all {self.count} sandbox uids are busy (--sandbox.uid-count)")

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _group_members(pgid: int) -> list[int]:
    """Pids (zombies included) whose process group is ``pgid``, from /proc."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid:
            out.append(int(name))
    return out


def _read_capped(path: str, limit: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    truncated = len(data) > limit
    return data[:limit].decode("utf-8", "replace"), truncated


def _last_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return ""


def _classify(code: int | None, timed_out: bool, started: bool, stderr: str, cpu_s: float, cpu_limit: int) -> str:
    if timed_out:
        return "timeout"
    if not started:
        return "error"
    if code == 0:
        return "ok"
    last = _last_line(stderr)
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
    if "[Errno 27]" in last or last.endswith("File too large"):  # Python ignores SIGXFSZ and gets EFBIG instead
        return "output_limit"
    if "[sandbox] " in last:  # a refusal of the Python layer ended the run (possibly wrapped, e.g. URLError)
        return "violation"
    return "runtime_error"


# ---------------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------------


def run_python(code: str, stdin: str | bytes = b"", config: SandboxConfig | None = None) -> SandboxResult:
    """Run ``code`` (Python source) in the sandbox with ``stdin`` as its standard input.

    Blocks until the program ends or ``config.timeout_s`` (wall clock) passes; thread-safe (runs may be issued
    from a thread pool). Raises :class:`SandboxUnavailable` only for a configuration that cannot be honoured here;
    every failure of the program itself is reported in the result's ``status``.
    """
    cfg = config or SandboxConfig()
    mode, python, _ = _plan(cfg.isolation, cfg.python, cfg.uid_base, cfg.uid_count)
    data = stdin.encode("utf-8") if isinstance(stdin, str) else bytes(stdin)
    return _run(cfg, mode, python, code, data)


def _run(cfg: SandboxConfig, mode: str, python: str, code: str, stdin: bytes) -> SandboxResult:
    mib = 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="motif_sbx_") as root, contextlib.ExitStack() as stack:
        # The sandbox uid may traverse to its working directory (namespaces: a tmpfs mounted there, visible only in
        # its own mount namespace) but never read this run's program, input or output files (0600, root-owned).
        os.chmod(root, 0o711 if mode == "namespaces" else 0o700)
        work = os.path.join(root, "work")
        os.mkdir(work, 0o700)
        paths = {k: os.path.join(root, k) for k in ("program", "stdin", "stdout", "stderr")}
        for key, content in (("program", code.encode("utf-8", "surrogateescape")), ("stdin", stdin)):
            with open(os.open(paths[key], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), "wb") as f:
                f.write(content)
        in_f = stack.enter_context(open(paths["stdin"], "rb"))
        out_f = stack.enter_context(open(os.open(paths["stdout"], os.O_CREAT | os.O_WRONLY, 0o600), "wb"))
        err_f = stack.enter_context(open(os.open(paths["stderr"], os.O_CREAT | os.O_WRONLY, 0o600), "wb"))
        uid = stack.enter_context(_UidLease(cfg.uid_base, cfg.uid_count)) if mode == "namespaces" else None
        prog_fd = os.open(paths["program"], os.O_RDONLY)
        ctl_r, ctl_w = os.pipe()
        stack.callback(os.close, ctl_r)
        os.set_blocking(ctl_r, False)
        rlimits = [
            ["RLIMIT_CPU", cfg.cpu_time_s, cfg.cpu_time_s + 1],
            ["RLIMIT_AS", cfg.memory_mb * mib, cfg.memory_mb * mib],
            ["RLIMIT_FSIZE", cfg.max_file_mb * mib, cfg.max_file_mb * mib],
            ["RLIMIT_NOFILE", cfg.max_open_files, cfg.max_open_files],
            ["RLIMIT_CORE", 0, 0],
        ]
        if mode == "namespaces":  # per-uid limit: meaningful only for the run's own uid (see module docstring)
            rlimits.append(["RLIMIT_NPROC", cfg.max_processes, cfg.max_processes])
        runner_cfg = {
            "program_fd": prog_fd,
            "control_fd": ctl_w,
            "allow_subprocess": cfg.allow_subprocess,
            "watchdog_s": cfg.timeout_s + 2.0,
            "rlimits": rlimits,
        }
        py_cmd = [python, "-I", "-B", "-c", _RUNNER, json.dumps(runner_cfg)]
        if mode == "namespaces":
            tools = _ns_tools()
            assert tools is not None
            cmd = [
                tools["unshare"], "--mount", "--net", "--pid", "--fork", "--kill-child=SIGKILL", "--mount-proc",
                "--", tools["sh"], "-c", _NS_INIT, "sandbox-init", work, str(uid), f"{cfg.work_dir_mb}m",
                str(math.ceil(cfg.timeout_s) + 5), *py_cmd,
            ]
        else:
            cmd = py_cmd
        env = {"PATH": _SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": work, "TMPDIR": work}
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(
                cmd, stdin=in_f, stdout=out_f, stderr=err_f, env=env, cwd=work, start_new_session=True,
                pass_fds=(prog_fd, ctl_w), close_fds=True,
            )
        except OSError as e:
            return SandboxResult("error", "", "", None, 0.0, 0.0, False, False, mode,  # type: ignore[arg-type]
                                 -1, detail=f"cannot start the sandbox: {e}")
        finally:
            os.close(ctl_w)
            os.close(prog_fd)
        status, rusage, timed_out = _wait(proc, mode, cfg.timeout_s)
        wall = time.monotonic() - t0
        try:
            started = os.read(ctl_r, 16).startswith(_READY)
        except BlockingIOError:
            started = False
        stack.close()  # release the uid, the pipe and the files before reading back
        code_ = os.waitstatus_to_exitcode(status)
        if mode == "namespaces" and 128 < code_ < 128 + signal.NSIG:
            code_ = -(code_ - 128)
        cpu = rusage.ru_utime + rusage.ru_stime
        out, out_trunc = _read_capped(paths["stdout"], cfg.max_output_bytes)
        err, err_trunc = _read_capped(paths["stderr"], cfg.max_output_bytes)
        st = _classify(code_, timed_out, started, err, cpu, cfg.cpu_time_s)
        detail = ""
        if st == "error":
            detail = "the sandbox could not start the program: " + _last_line(err)
        elif timed_out:
            detail = f"wall-clock limit {cfg.timeout_s}s"
        return SandboxResult(st, out, err, code_, wall, cpu, out_trunc, err_trunc, mode,  # type: ignore[arg-type]
                             proc.pid, detail=detail)


def _wait(proc: subprocess.Popen, mode: str, timeout_s: float):
    """Wait for the run's first process; on timeout kill everything. Returns (wait status, rusage, timed_out)."""
    pid = proc.pid
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    status = rusage = None
    timed_out = False
    while True:
        wpid, st, ru = os.wait4(pid, os.WNOHANG)
        if wpid == pid:
            status, rusage = st, ru
            break
        now = time.monotonic()
        if now >= deadline:
            timed_out = True
            break
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, 0.02)
    if timed_out:
        if mode == "namespaces":
            # Kill the namespace's processes first (pid 1 included) so that unshare reaps its child itself and no
            # zombie is handed to the host's init; the kernel kills whatever is left in the PID namespace.
            for member in _group_members(pid):
                if member != pid:
                    _kill(member)
            grace = time.monotonic() + 2.0
            while time.monotonic() < grace:
                wpid, st, ru = os.wait4(pid, os.WNOHANG)
                if wpid == pid:
                    status, rusage = st, ru
                    break
                time.sleep(0.002)
        if status is None:
            _killpg(pid)
            _, status, rusage = os.wait4(pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    _killpg(pid)  # leftovers in the group (background children in process mode)
    return status, rusage, timed_out


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:  # a member runs under another uid that we cannot signal (not root)
        pass
    except OSError as e:  # pragma: no cover - defensive
        if e.errno != errno.ESRCH:
            raise

