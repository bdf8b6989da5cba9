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
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import fcntl
import functools
import inspect
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
import textwrap
import threading
import time
from collections.abc import Sequence
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
_NS_WORK = "/sandbox"  # the working directory inside the namespace
_DU_INTERVAL_S = 0.1  # process mode: how often the working directory's size is checked
_DU_MAX_ENTRIES = 20_000  # process mode: more files than this ends the run (the check must stay cheap)


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


# ---------------------------------------------------------------------------------------------------------------------
# The trusted runner. Its source is executed by the sandboxed interpreter as ``python -I -B -c <source> <json>``; it
# never runs in the caller. It must work on any Python >= 3.8 and be self-contained (imports inside). The audit hook
# and its helpers take all their state as default arguments holding immutable values and C functions: no closure
# cells, globals or mutable containers the program could reach (through traceback frames, ``builtins`` rebinding or
# monkey-patching) and change.
# ---------------------------------------------------------------------------------------------------------------------


def _sandbox_runner():  # pragma: no cover - runs inside the sandbox (tests observe it from outside)
    import contextlib
    import json
    import os
    import sys

    cfg = json.loads(sys.argv[1])
    with os.fdopen(cfg["program_fd"], "rb") as f:
        src = f.read()

    def kill_descendants():
        """SIGKILL every child (orphans come back to us as subreaper) and session member until none is left."""
        import signal

        me = os.getpid()
        for _ in range(10_000):
            found = False
            for name in os.listdir("/proc"):
                if not name.isdigit() or int(name) == me:
                    continue
                try:
                    with open("/proc/" + name + "/stat", "rb") as f:
                        stat = f.read()
                except OSError:
                    continue
                fields = stat[stat.rfind(b")") + 2 :].split()
                if int(fields[1]) == me or int(fields[3]) == me:
                    found = True
                    if fields[0] != b"Z":
                        with contextlib.suppress(OSError):
                            os.kill(int(name), signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            if not found:
                return

    def supervise():
        """Process mode: fork; the child returns and runs the program, this process waits and cleans up."""
        import resource
        import signal

        # Orphaned descendants (double fork, setsid) are reparented to us instead of init. Without ctypes only the
        # members of our session can be found and killed.
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        for name in list(sys.modules):
            if name in ("ctypes", "_ctypes") or name.startswith("ctypes."):
                del sys.modules[name]
        child = os.fork()
        if child == 0:
            os.setpgid(0, 0)  # own group: the program may signal its group, never the supervisor
            return
        os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # hold no pipe of the program's open

        class Stop(Exception):
            pass

        def stop(*_):
            raise Stop

        signal.signal(signal.SIGTERM, stop)  # from the caller: time out / cancel
        signal.signal(signal.SIGALRM, stop)  # our own watchdog, for a caller that died
        signal.setitimer(signal.ITIMER_REAL, float(cfg["watchdog_s"]))
        code = 128 + signal.SIGKILL
        try:
            while True:
                pid, status = os.waitpid(-1, 0)
                if pid == child:
                    code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                    break
        except (Stop, ChildProcessError):
            pass
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        kill_descendants()
        os._exit(code)

    if cfg["supervise"]:
        supervise()

    import resource

    for name, soft, hard in cfg["rlimits"]:
        res = getattr(resource, name)
        cur_hard = resource.getrlimit(res)[1]
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
        resource.setrlimit(res, (min(soft, hard), hard))

    import _imp
    import _stat
    import linecache
    import posix
    import types

    allow_sub = bool(cfg["allow_subprocess"])
    for name in sys.builtin_module_names:  # import every compiled-in module now: create_builtin is refused below
        if name not in sys.modules and not name.startswith(("_test", "_xx")):
            with contextlib.suppress(Exception):
                __import__(name)
    if not allow_sub:
        import _posixsubprocess

    def deny(what, _PermissionError=PermissionError):
        raise _PermissionError("[sandbox] " + what)

    def resolve(p, base, _lstat=posix.lstat, _readlink=posix.readlink, _islnk=_stat.S_ISLNK, _OSError=OSError):
        """Absolute ``p`` (relative to ``base``) with '.', '..' and symbolic links resolved; None past 40 links."""
        todo = (p if p.startswith("/") else base + "/" + p).split("/")
        todo.reverse()
        out = []
        hops = 0
        while todo:
            part = todo.pop()
            if part == "" or part == ".":
                continue
            if part == "..":
                if out:
                    out.pop()
                continue
            out.append(part)
            here = "/" + "/".join(out)
            try:
                if not _islnk(_lstat(here).st_mode):
                    continue
                target = _readlink(here)
            except _OSError:  # missing (or unreadable) component: keep it as written
                continue
            hops += 1
            if hops > 40:
                return None
            out.pop()
            if target.startswith("/"):
                out = []
            more = target.split("/")
            more.reverse()
            todo.extend(more)
        return "/" + "/".join(out)

    W = posix.getcwd()

    def where(p, _deny=deny, _resolve=resolve, W=W, _type=type, _str=str, _bytes=bytes, _int=int):
        """Resolved absolute path of a path argument (an int is an open fd); None when it cannot be checked.

        The C functions convert a PathLike to str/bytes once, before their audit event, and use that value: only
        Python-level events (shutil.rmtree) pass other objects, and the os calls they make are audited themselves.
        """
        t = _type(p)
        if t is _int:
            return _resolve(f"/proc/self/fd/{p}", W)
        if t is _bytes:
            p = p.decode("utf-8", "surrogateescape")
        elif t is not _str:
            return None
        r = _resolve(p, W)
        if r is None:
            _deny("too many levels of symbolic links: " + p)
        return r

    def inside(r, W=W, Wp=W + "/"):
        return r == W or r.startswith(Wp)

    def check_read(r, private, dir_ok, _deny=deny, _getpid=posix.getpid, _stat_=posix.stat, _isdir=_stat.S_ISDIR,
                   _OSError=OSError):
        """Reading ``r`` (outside the working directory): not other processes, private files, or directories."""
        if r.startswith("/proc/"):
            head = r[6:].partition("/")[0]
            if head.isdigit() and head != f"{_getpid()}":
                _deny("reading other processes' /proc entries is not allowed: " + r)
        for d in private:
            if r == d or r.startswith(d + "/"):
                _deny("the sandbox's own files are not readable: " + r)
        if dir_ok:
            return
        try:
            is_dir = _isdir(_stat_(r).st_mode)
        except _OSError:
            return
        if is_dir:  # a directory fd would let dir_fd-relative paths escape the checks above
            _deny("opening a directory outside the working directory is not allowed: " + r)

    fs_events = types.MappingProxyType({
        "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.replace": (0, 1),
        "os.link": (0, 1), "os.chmod": (0,), "os.chown": (0,), "os.lchown": (0,), "os.utime": (0,),
        "os.truncate": (0,), "os.chflags": (0,), "os.lchflags": (0,), "os.mkfifo": (0,), "os.mknod": (0,),
        "os.setxattr": (0,), "os.removexattr": (0,), "shutil.rmtree": (0,), "os.chdir": (0,)})
    blocked = {"ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixshmem"}
    if not allow_sub:
        blocked.add("_posixsubprocess")
    denied_events = frozenset({"gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace",
                               "sys.setprofile", "sys._current_frames", "sys.monitoring.register_callback",
                               "os.symlink"})
    proc_events = frozenset({"os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system",
                             "subprocess.Popen", "os.startfile"})
    wflags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    own_pgid = posix.getpgid(0)
    blocked = frozenset(blocked)
    private = tuple(cfg["private_dirs"])

    def hook(event, args, *, private=private,
             allow_sub=allow_sub, own_pgid=own_pgid, blocked=blocked, fs_events=fs_events,
             denied_events=denied_events, proc_events=proc_events, wflags=wflags,
             write_devices=("/dev/null", "/dev/stdout", "/dev/stderr"), _deny=deny, _where=where, _inside=inside,
             _check_read=check_read, _getpid=posix.getpid, _getpgid=posix.getpgid, _type=type, _str=str,
             _int=int, _len=len, _OSError=OSError):
        if event == "open":
            p = args[0]
            if _type(p) is _int:  # io.open(fd): an fd the program already has
                return
            flags = args[2] if _len(args) > 2 and _type(args[2]) is _int else 0
            writing = flags & wflags
            if writing and _type(p) is _str and p in write_devices:
                return
            r = _where(p)
            if r is None:  # not str/bytes: never seen from CPython, which converts first; refuse rather than guess
                _deny("unsupported path argument")
            if _inside(r):
                return
            if writing:
                _deny(f"writing outside the working directory is not allowed: {r}")
            _check_read(r, private, False)
        elif event in fs_events:
            for i in fs_events[event]:
                if i < _len(args) and args[i] is not None:
                    r = _where(args[i])
                    if r is None and event != "shutil.rmtree":  # rmtree's own os calls are audited one by one
                        _deny("unsupported path argument")
                    if r is not None and not _inside(r):
                        _deny(f"{event} outside the working directory is not allowed: {r}")
        elif event in ("os.listdir", "os.scandir"):
            p = args[0] if args else None
            r = _where(p) if p is not None else None
            if r is not None and not _inside(r):
                _check_read(r, private, True)
        elif event.startswith("socket."):
            if event == "socket.__new__" and _len(args) > 1 and args[1] == 1:  # AF_UNIX: socketpair() (asyncio)
                return  # harmless unconnected: connect, bind, sendto and sendmsg stay refused
            _deny(f"network access is disabled ({event})")
        elif event in proc_events:
            if not allow_sub:
                _deny(f"starting processes is disabled ({event})")
        elif event == "os.kill" or event == "os.killpg":
            target = args[0]
            if _type(target) is not _int:
                _deny("bad signal target")
            if _getpgid(0) != own_pgid:  # the program moved itself into another group: signal nothing
                _deny("signalling other processes is not allowed")
            if event == "os.killpg":
                if target in (0, own_pgid):
                    return
            elif target in (0, _getpid(), -own_pgid):
                return
            elif allow_sub and target > 0:
                try:
                    if _getpgid(target) == own_pgid:
                        return
                except _OSError:
                    pass
            _deny("signalling other processes is not allowed")
        elif event == "resource.prlimit":
            if args[0] not in (0, _getpid()):
                _deny("prlimit on other processes is not allowed")
        elif event == "import":
            name = args[0]
            if _type(name) is not _str:
                _deny("unusual module name")
            top = name.partition(".")[0]
            if top in blocked or top.startswith("_test"):
                _deny(f"module {name} is not allowed")
            origin = args[1] if _len(args) > 1 else None
            if _type(origin) is _str:  # an extension module about to be loaded (create_dynamic)
                r = _where(origin)
                if origin.startswith(("/proc/", "/dev/")) or r is None or _inside(r):
                    _deny("native modules cannot be loaded from here: " + origin)
                for d in private:
                    if r.startswith(d + "/"):
                        _deny("native modules cannot be loaded from here: " + origin)
        elif event in denied_events or event.startswith("ctypes."):
            _deny(f"{event} is not allowed")

    def refused(*args, _deny=deny, **kwargs):
        _deny("this function is disabled in the sandbox")

    # Fresh builtin-module copies (``module_from_spec(find_spec('_posixsubprocess'))``) go through create_builtin and
    # raise no audit event; every compiled-in module is already imported, so nothing legitimate needs it any more.
    _imp.create_builtin = refused
    for mod, names in ((posix, ("pidfd_open", "setns", "unshare")), (os, ("pidfd_open", "setns", "unshare"))):
        for name in names:
            if hasattr(mod, name):
                setattr(mod, name, refused)
    if not allow_sub:
        _posixsubprocess.fork_exec = refused
    sys.addaudithook(hook)

    os.write(cfg["control_fd"], b"R")
    os.close(cfg["control_fd"])

    text = src.decode("utf-8", "replace")
    linecache.cache["solution.py"] = (len(text), None, text.splitlines(True), "solution.py")
    code = compile(src, "solution.py", "exec", dont_inherit=True)
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    main.__dict__["__file__"] = "solution.py"
    sys.modules["__main__"] = main
    sys.argv = ["solution.py"]
    return code, main.__dict__


_RUNNER = (textwrap.dedent(inspect.getsource(_sandbox_runner))
           + "_c, _g = _sandbox_runner()\ndel _sandbox_runner\nexec(_c, _g)\n")

# Init script of a namespaced run: pid 1 of the new PID namespace, root in the new mount namespace. It builds a root
# file system that holds only the visible paths (read-only), /proc, a few devices and the tmpfs working directory,
# pivots into it, drops the old root and starts the program as the sandbox uid under an in-namespace timeout.
_NS_INIT = r'''
umask 022
PATH=/usr/sbin:/sbin:$PATH
R="$1"; U="$2"; SZ="$3"; T="$4"; N="$5"; shift 5
fail() { echo "[sandbox-init] $1" >&2; exit 121; }
mount -t tmpfs -o size=1m,mode=0755,nosuid,nodev motif_root "$R" || fail "cannot mount the root tmpfs"
while [ "$N" -gt 0 ]; do
  p="$1"; d="$R$p"; shift; N=$((N - 1))
  if [ -L "$p" ]; then
    mkdir -p "${d%/*}" && ln -s "$(readlink "$p")" "$d" || fail "cannot link $p"; continue
  fi
  [ -e "$p" ] || continue
  mkdir -p "${d%/*}" || fail "cannot create ${d%/*}"
  if [ -d "$p" ]; then mkdir -p "$d"; else : > "$d"; fi
  mount --bind "$p" "$d" && mount -o remount,bind,ro,nosuid,nodev "$d" || fail "cannot bind $p read-only"
done
mkdir -p "$R/proc" "$R/dev" "$R/sandbox" "$R/.old" || fail "cannot create the skeleton"
for n in null zero full random urandom; do
  : > "$R/dev/$n" && mount --bind "/dev/$n" "$R/dev/$n" || fail "cannot bind /dev/$n"
done
ln -s /proc/self/fd "$R/dev/fd" && ln -s /proc/self/fd/0 "$R/dev/stdin" && ln -s /proc/self/fd/1 "$R/dev/stdout" \
  && ln -s /proc/self/fd/2 "$R/dev/stderr" || fail "cannot link /dev/fd"
mount -t proc -o nosuid,nodev,noexec proc "$R/proc" || fail "cannot mount /proc"
mount -t tmpfs -o "size=$SZ,mode=0700,uid=$U,gid=$U,nosuid,nodev" motif_sandbox "$R/sandbox" \
  || fail "cannot mount the working directory"
mount -o remount,ro "$R" || fail "cannot make the root read-only"
cd "$R" && pivot_root . .old && umount -l /.old || fail "pivot_root failed"
cd /sandbox || fail "no working directory"
unset OLDPWD
PATH=/usr/local/bin:/usr/bin:/bin
timeout -s KILL "$T" setpriv --reuid="$U" --regid="$U" --clear-groups --no-new-privs --inh-caps=-all \
  --bounding-set=-all -- "$@"
exit $?
'''


# ---------------------------------------------------------------------------------------------------------------------
# Capability detection (once per process and configuration)
# ---------------------------------------------------------------------------------------------------------------------


def _ns_tools() -> dict[str, str] | None:
    names = ("unshare", "setpriv", "mount", "sh", "timeout", "pivot_root")
    tools = {name: shutil.which(name, path=_SAFE_PATH + ":/sbin:/usr/sbin") for name in names}
    if any(v is None for v in tools.values()):
        return None
    return tools  # type: ignore[return-value]


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
def _interpreter_dirs(python: str) -> tuple[str, ...]:
    """Directories ``python`` needs (its prefixes and its own directory), as reported by itself, run here."""
    probe = "import json, sys; print(json.dumps([sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix]))"
    try:
        out = subprocess.run([python, "-I", "-c", probe], capture_output=True, text=True, timeout=30, check=True)
        dirs = set(json.loads(out.stdout))
    except (OSError, subprocess.SubprocessError, ValueError):
        dirs = set()
    dirs |= {os.path.dirname(os.path.abspath(python)), os.path.dirname(os.path.realpath(python))}
    return tuple(sorted(os.path.normpath(d) for d in dirs if d))


def _mounts(visible: Sequence[str], python: str) -> list[str]:
    """Paths to show read-only in the namespace: ``visible`` plus the interpreter's, none inside another."""
    out: list[str] = []
    for p in sorted({os.path.normpath(p) for p in (*visible, *_interpreter_dirs(python))}):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


@functools.lru_cache(maxsize=16)
def _plan(isolation: str, python: str, uid_base: int, uid_count: int, visible: tuple[str, ...],
          temp_dir: str) -> tuple[str, str, str]:
    """(mode, interpreter, reason) for a config; probes the namespaced setup once with a real run."""
    reasons = []
    if isolation in ("auto", "namespaces"):
        if os.geteuid() != 0:
            reasons.append("namespaces need root (unshare of net/mount/pid/ipc namespaces and setuid to a sandbox uid)")
        elif _ns_tools() is None:
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


# ---------------------------------------------------------------------------------------------------------------------
# Temporary directories: <base>/proc-<pid>-<random>/motif_sbx_*/ per run. Each process holds an flock on its own
# proc-* directory for as long as it lives; a directory whose lock can be taken belongs to a dead process and is
# removed by the next process that starts a sandbox under the same base.
# ---------------------------------------------------------------------------------------------------------------------

_owner_dirs: dict[str, str] = {}
_owner_lock = threading.Lock()


def _forget_owner_dirs() -> None:  # a forked child makes its own directory (the parent's stays the parent's)
    _owner_dirs.clear()


os.register_at_fork(after_in_child=_forget_owner_dirs)


def _base_dir(cfg: SandboxConfig) -> str:
    base = cfg.temp_dir or os.path.join(tempfile.gettempdir(), "motif_jax_sandbox")
    os.makedirs(base, mode=0o700, exist_ok=True)
    st = os.lstat(base)
    if not os.path.isdir(base) or os.path.islink(base) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise SandboxUnavailable(f"{base} must be a directory owned by uid {os.geteuid()} and writable only by it "
                                 "(--sandbox.temp-dir)")
    return os.path.realpath(base)


def _sweep(base: str) -> None:
    """Remove the proc-* directories of processes that died (their lock is free)."""
    for name in os.listdir(base):
        path = os.path.join(base, name)
        if not name.startswith("proc-"):
            continue
        try:
            fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:  # being created right now, or its creator died before locking it
            with contextlib.suppress(OSError):
                if time.time() - os.lstat(path).st_mtime > 60:
                    shutil.rmtree(path, ignore_errors=True)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner is alive
        finally:
            os.close(fd)  # releases our lock (if taken) before the removal; nobody else can want the directory
        shutil.rmtree(path, ignore_errors=True)


def _owner_dir(cfg: SandboxConfig) -> str:
    base = _base_dir(cfg)
    with _owner_lock:
        own = _owner_dirs.get(base)
        if own is not None and os.path.isdir(own):
            return own
        _sweep(base)
        own = tempfile.mkdtemp(prefix=f"proc-{os.getpid()}-", dir=base)
        fd = os.open(os.path.join(own, ".lock"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held (fd kept open) until this process exits
        _owner_dirs[base] = own
        atexit.register(shutil.rmtree, own, True)
        return own


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: uid leases, process inspection, disk usage, status classification
# ---------------------------------------------------------------------------------------------------------------------


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


def _group_members(pgid: int) -> list[int]:
    """Pids (zombies included) whose process group is ``pgid``, from /proc."""
    return [pid for pid, f in _proc_stats() if len(f) > 2 and int(f[2]) == pgid]


def _session_members(sid: int) -> list[int]:
    """Pids (zombies included) whose session or process group is ``sid``."""
    return [pid for pid, f in _proc_stats() if len(f) > 3 and sid in (int(f[2]), int(f[3]))]


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
        lock_dir = os.path.join(tempfile.gettempdir(), "motif_jax_sandbox_uids")  # machine-wide, whatever temp_dir
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
            if _uid_has_processes(uid):  # left over from a crashed parent: skip until its timeout ends it
                os.close(fd)
                continue
            self.fd, self.uid = fd, uid
            return uid
        raise SandboxUnavailable(f"all {self.count} sandbox uids are busy (--sandbox.uid-count)")

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


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


def _classify(code: int | None, started: bool, stderr: str, cpu_s: float, cpu_limit: int) -> str:
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
    # Python ignores SIGXFSZ and gets EFBIG instead; ENOSPC: the working directory (tmpfs) is full
    if "[Errno 27]" in last or last.endswith("File too large") or "[Errno 28]" in last:
        return "output_limit"
    if "[sandbox] " in last:  # a refusal of the Python layer ended the run (possibly wrapped, e.g. URLError)
        return "violation"
    return "runtime_error"


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
    mib = 1024 * 1024
    run_dir = tempfile.mkdtemp(prefix="motif_sbx_", dir=_owner_dir(cfg))
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
            if mode == "namespaces":  # per-uid limit: meaningful only for the run's own uid (not root, not ours)
                rlimits.append(["RLIMIT_NPROC", cfg.max_processes, cfg.max_processes])
            runner_cfg = {
                "program_fd": prog_fd,
                "control_fd": ctl_w,
                "allow_subprocess": cfg.allow_subprocess,
                "supervise": mode == "process",
                "watchdog_s": cfg.timeout_s + 2.0,
                "rlimits": rlimits,
                "private_dirs": [os.path.dirname(os.path.dirname(run_dir))] if mode == "process" else [],
            }
            py_cmd = [python, "-I", "-B", "-c", _RUNNER, json.dumps(runner_cfg)]
            if mode == "namespaces":
                tools = _ns_tools()
                assert tools is not None
                root = os.path.join(run_dir, "root")
                os.mkdir(root, 0o700)
                mounts = _mounts(cfg.visible_paths, python)
                cmd = [
                    tools["unshare"], "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child=SIGKILL",
                    "--", tools["sh"], "-c", _NS_INIT, "sandbox-init", root, str(uid), f"{cfg.work_dir_mb}m",
                    str(math.ceil(cfg.timeout_s) + 2), str(len(mounts)), *mounts, *py_cmd,
                ]
                home = _NS_WORK
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
            status, rusage, reason = _wait(proc, mode, cfg, work, cancel)
            wall = time.monotonic() - t0
            try:
                started = os.read(ctl_r, 16).startswith(_READY)
            except BlockingIOError:
                started = False
        code_ = os.waitstatus_to_exitcode(status)
        if 128 < code_ < 128 + signal.NSIG:  # the init shell / the supervisor report a signal as 128 + N
            code_ = -(code_ - 128)
        cpu = rusage.ru_utime + rusage.ru_stime
        out, out_trunc = _read_capped(paths["stdout"], cfg.max_output_bytes)
        err, err_trunc = _read_capped(paths["stderr"], cfg.max_output_bytes)
        st = _classify(code_, started, err, cpu, cfg.cpu_time_s)
        detail = ""
        if reason == "timeout":
            st, detail = "timeout", f"wall-clock limit {cfg.timeout_s}s"
        elif reason == "work_dir":
            st, detail = "output_limit", f"working directory over --sandbox.work-dir-mb {cfg.work_dir_mb}"
        elif reason == "cancelled":
            st, detail = "killed", "cancelled by the caller"
        elif st == "error":
            detail = "the sandbox could not start the program: " + _last_line(err)
        return SandboxResult(st, out, err, code_, wall, cpu, out_trunc, err_trunc, mode,  # type: ignore[arg-type]
                             proc.pid, detail=detail, python=python)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _wait(proc: subprocess.Popen, mode: str, cfg: SandboxConfig, work: str, cancel: threading.Event | None):
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
    for member in _session_members(pid) if mode == "process" else ():  # only if the supervisor itself was killed
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
        for member in _session_members(pid):
            _kill(member)
    else:
        # Kill the namespace's processes first (pid 1 included) so that unshare reaps its child itself and no
        # zombie is handed to the host's init; the kernel kills whatever is left in the PID namespace.
        for member in _group_members(pid):
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
