"""Ownership of the sandbox's temporary directories: ``<base>/proc-<pid>-<random>/motif_sbx_*/`` per run.

Each process holds an flock on its own proc-* directory for as long as it lives; a directory whose lock can be taken
belongs to a dead process and is removed by the next process that starts a sandbox under the same base.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import shutil
import tempfile
import threading
import time

from motif_jax.rl.config import SandboxConfig
from motif_jax.rl.sandbox_result import SandboxUnavailable

__all__ = ["owner_dir"]

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


def owner_dir(cfg: SandboxConfig) -> str:
    """This process's own directory under the configured base (made, and dead owners' swept, on first use)."""
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
