"""The ``namespaces`` isolation set-up: the tools it needs, the sandbox uids, and the command that builds a new root
file system and new mount, network, PID, IPC and UTS namespaces around one run (what it guarantees:
``motif_jax.rl.sandbox``)."""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

from motif_jax.rl.config import SandboxConfig
from motif_jax.rl.sandbox_result import SandboxUnavailable

__all__ = ["NS_WORK", "UidLease", "namespace_command", "ns_tools"]

NS_WORK = "/sandbox"  # the working directory inside the namespace
_TOOL_PATH = "/usr/local/bin:/usr/bin:/bin:/sbin:/usr/sbin"


def namespace_command(cfg: SandboxConfig, python: str, run_dir: str, uid: int, py_cmd: list[str]) -> list[str]:
    """The command that runs ``py_cmd`` (the runner under ``python``) as ``uid`` in new namespaces, its root file
    system built under ``<run_dir>/root``."""
    tools = ns_tools()
    assert tools is not None
    root = os.path.join(run_dir, "root")
    os.mkdir(root, 0o700)
    mounts = _mounts(cfg.visible_paths, python)
    return [
        tools["unshare"], "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child=SIGKILL",
        "--", tools["sh"], "-c", _NS_INIT, "sandbox-init", root, str(uid), f"{cfg.work_dir_mb}m",
        str(math.ceil(cfg.timeout_s) + 2), str(len(mounts)), *mounts, *py_cmd,
    ]


def ns_tools() -> dict[str, str] | None:
    """Paths of the tools a namespaced run needs; None if one is missing."""
    names = ("unshare", "setpriv", "mount", "sh", "timeout", "pivot_root")
    tools = {name: shutil.which(name, path=_TOOL_PATH) for name in names}
    if any(v is None for v in tools.values()):
        return None
    return tools  # type: ignore[return-value]


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


class UidLease:
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
