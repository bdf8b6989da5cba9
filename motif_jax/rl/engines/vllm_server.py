"""vLLM's OpenAI-compatible server as a subprocess the engine owns: start, wait for health, talk JSON, stop.

:class:`VLLMServer` starts ``python -m motif_jax.rl.engines.vllm_plugin`` (vLLM's
``vllm.entrypoints.openai.api_server`` with Motif-2 registered) listening on ``host:port``, in its own process
group, with ``VLLM_SERVER_DEV_MODE=1`` (the ``/collective_rpc`` and ``/reset_prefix_cache`` routes the weight push
uses). Its output goes to a log file; a failed start reports the log's last lines. ``stop`` (also run at interpreter
exit, and when the object is collected) sends SIGTERM to the whole group, then SIGKILL after a grace period, and
the launcher asks the kernel to kill the server if its parent dies first, so no server outlives the run.

Only the standard library is used here: the trainer's environment need not have vLLM (``python`` may be the
interpreter of another environment, e.g. ``.venv-vllm/bin/python``).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ServerError", "VLLMServer", "free_port"]

PARENT_PID_ENV = "MOTIF_JAX_VLLM_PARENT_PID"  # the launcher dies with this process (see vllm_plugin.main)


class ServerError(RuntimeError):
    """The vLLM server did not start, died, or refused a request; the message points at its log."""


def free_port(host: str) -> int:
    """A port the OS reports free on ``host`` now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _group_gone(pgid: int, timeout_s: float) -> bool:
    """Waits until no process of group ``pgid`` exists (dead children are reaped by init); False at the timeout."""
    deadline = time.time() + timeout_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # only processes we cannot signal are left: not ours
            return True
        if time.time() >= deadline:
            return False
        time.sleep(0.05)


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the server's process group (vLLM shuts its engine core down), SIGKILL to whatever is left after
    ``grace_s``; returns once the leader is reaped and the group is empty."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
        if _group_gone(proc.pid, grace_s):
            return


class VLLMServer:
    """A running vLLM server (``args``: the api_server's command-line arguments after ``--host/--port``).

    ``launcher`` replaces ``[python, "-m", "motif_jax.rl.engines.vllm_plugin"]`` (tests use a stand-in server)."""

    def __init__(self, *, python: str, host: str, port: int, args: Sequence[str], log_path: Path,
                 env: Mapping[str, str] | None = None, startup_timeout_s: float = 600.0,
                 request_timeout_s: float = 3600.0, grace_s: float = 20.0, launcher: Sequence[str] | None = None):
        self.host, self.port = host, port or free_port(host)
        self.request_timeout_s = request_timeout_s
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        launcher = list(launcher or [python or sys.executable, "-m", "motif_jax.rl.engines.vllm_plugin"])
        cmd = [*launcher, "--host", host, "--port", str(self.port), *args]
        full_env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", PARENT_PID_ENV: str(os.getpid()), **(env or {})}
        t0 = time.time()
        try:
            # A new session: the server and the processes it starts form one group that stop() signals at once.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                         env=full_env, start_new_session=True)
        except OSError as e:
            self._log.close()
            raise ServerError(f"cannot start the vLLM server with {cmd[0]}: {e}") from None
        self._finalizer = weakref.finalize(self, _stop, self.proc, grace_s)
        atexit.register(self._finalizer)
        try:
            self._wait_healthy(startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.time() - t0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def running(self) -> bool:
        return self.proc.poll() is None

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if not self.running():
                raise ServerError(f"the vLLM server exited with status {self.proc.returncode} while starting; the "
                                  f"end of {self.log_path}:\n{_tail(self.log_path)}")
            try:
                wait = max(min(5.0, deadline - time.time()), 0.1)
                with urllib.request.urlopen(self.url + "/health", timeout=wait) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise ServerError(f"the vLLM server did not answer {self.url}/health within {timeout_s:.0f} s "
                          f"(--rollout.vllm.startup-timeout-s); the end of {self.log_path}:\n{_tail(self.log_path)}")

    def post(self, path: str, body: Mapping[str, Any] | None = None, timeout_s: float | None = None) -> Any:
        """POST ``body`` as JSON to ``path``; the decoded JSON answer (None when empty). Raises ServerError."""
        if not self.running():
            raise ServerError(f"the vLLM server has exited (status {self.proc.returncode}); the end of "
                              f"{self.log_path}:\n{_tail(self.log_path)}")
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.request_timeout_s) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:2000]
            raise ServerError(f"vLLM server: POST {path} failed with HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            raise ServerError(f"vLLM server: POST {path} failed ({e}); the end of {self.log_path}:\n"
                              f"{_tail(self.log_path)}") from None
        return json.loads(raw) if raw.strip() else None

    def stop(self) -> None:
        """Stops the server and every process it started (idempotent)."""
        self._finalizer()
        atexit.unregister(self._finalizer)
        if not self._log.closed:
            self._log.close()
