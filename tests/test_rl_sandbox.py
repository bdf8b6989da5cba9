"""Sandbox: hostile programs end with a non-ok status and leave nothing behind; the test process is unharmed.

Runs every case in ``process`` isolation and, where available (root + util-linux + permission to create
namespaces), in ``namespaces`` isolation. Limits are small so each case takes well under a few seconds. The escapes
reported against earlier versions are in ``test_rl_sandbox_escapes.py``; the helpers here are shared with it.
"""

from __future__ import annotations

import ast
import atexit
import glob
import os
import shutil
import sys
import tempfile
import time

import pytest

from motif_jax.rl.config import ConfigError, SandboxConfig
from motif_jax.rl.sandbox import SandboxUnavailable, _default_python, isolation_mode, run_python
from motif_jax.rl.sandbox_processes import group_members, session_members

# Each pytest-xdist worker gets its own sandbox uids and temporary directory, so "nothing left" checks see only
# this worker's runs.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").lstrip("gw") or 0)
UID_BASE = 310_000 + 1_000 * _WORKER
UID_COUNT = 64
TEMP_DIR = tempfile.mkdtemp(prefix="motif_sbx_tests_")
atexit.register(shutil.rmtree, TEMP_DIR, True)


def _ns_available() -> bool:
    try:
        return isolation_mode(SandboxConfig(isolation="auto", uid_base=UID_BASE, uid_count=UID_COUNT,
                                            temp_dir=TEMP_DIR))[0] == "namespaces"
    except SandboxUnavailable:
        return False


NS = _ns_available()
NS_REASON = "namespaces need root, util-linux unshare/setpriv/pivot_root and permission to create namespaces"
needs_ns = pytest.mark.skipif(not NS, reason=NS_REASON)
MODES = ["process", pytest.param("namespaces", marks=needs_ns)]


def _cfg(mode: str, **kw) -> SandboxConfig:
    base = {"isolation": mode, "timeout_s": 1.5, "cpu_time_s": 1, "memory_mb": 256, "max_processes": 8,
            "max_file_mb": 1, "work_dir_mb": 4, "uid_base": UID_BASE, "uid_count": UID_COUNT, "temp_dir": TEMP_DIR}
    return SandboxConfig(**{**base, **kw})


def _sandbox_uid_processes(cfg: SandboxConfig) -> list[int]:
    """Pids running under one of the sandbox uids (namespaces mode)."""
    lo, hi = cfg.uid_base, cfg.uid_base + cfg.uid_count
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if lo <= uid < hi:
            out.append(int(name))
    return out


def _leftover_run_dirs(temp_dir: str = TEMP_DIR) -> list[str]:
    return glob.glob(os.path.join(temp_dir, f"proc-{os.getpid()}-*", "motif_sbx_*"))


def _assert_nothing_left(r, cfg: SandboxConfig) -> None:
    assert group_members(r.pid) == [], f"leftover processes in group {r.pid}"
    assert session_members(r.pid) == [], f"leftover processes in session {r.pid}"
    if r.isolation == "namespaces":
        assert _sandbox_uid_processes(cfg) == []
    assert _leftover_run_dirs(cfg.temp_dir) == []


def _run(code: str, cfg: SandboxConfig, stdin: str = ""):
    cwd, env = os.getcwd(), dict(os.environ)
    r = run_python(code, stdin, cfg)
    # nothing of the run survives, and the test process is untouched
    _assert_nothing_left(r, cfg)
    assert os.getcwd() == cwd and dict(os.environ) == env
    assert r.isolation == cfg.isolation
    return r


@pytest.mark.parametrize("mode", MODES)
def test_runs_a_normal_program_with_stdin(mode):
    r = _run("import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n", _cfg(mode), "2 40\n")
    assert r.status == "ok" and r.exit_code == 0
    assert r.stdout == "42\n"


@pytest.mark.parametrize("mode", MODES)
def test_interpreter_is_the_named_one(mode):
    # The default is the base interpreter of the Python running the tests (same version, standard library only).
    r = _run("import sys\nprint(tuple(sys.version_info[:2]))\n", _cfg(mode))
    assert r.status == "ok", r.stderr
    assert r.python == _default_python() == isolation_mode(_cfg(mode))[1]
    assert r.stdout == f"{tuple(sys.version_info[:2])}\n"


@pytest.mark.parametrize("mode", MODES)
def test_working_directory_is_private_writable_and_removed(mode):
    code = "import os, tempfile\nprint(os.listdir('.'))\nopen('f.txt', 'w').write('x')\n" \
           "tempfile.NamedTemporaryFile().close()\nprint(os.getcwd())\n"
    r = _run(code, _cfg(mode))
    assert r.status == "ok", r.stderr
    first, cwd = r.stdout.splitlines()
    assert first == "[]"  # starts empty
    if mode == "namespaces":
        assert cwd == "/sandbox"  # the tmpfs inside the namespace
    else:
        assert cwd.startswith(os.path.realpath(TEMP_DIR)) and not os.path.exists(cwd)  # deleted afterwards


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_times_out(mode):
    t0 = time.monotonic()
    r = _run("while True:\n    pass\n", _cfg(mode))
    assert r.status == "timeout"
    assert time.monotonic() - t0 < 6.0


@pytest.mark.parametrize("mode", MODES)
def test_sleeping_program_hits_wall_clock(mode):
    r = _run("import time\ntime.sleep(60)\n", _cfg(mode, timeout_s=0.5))
    assert r.status == "timeout" and r.wall_s < 5.0


@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb_is_refused(mode):
    r = _run("import os\nwhile True:\n    os.fork()\n", _cfg(mode))
    assert r.status != "ok"
    assert "[sandbox]" in r.stderr


@needs_ns
def test_fork_bomb_with_subprocesses_allowed_hits_kernel_limits():
    # Python layer off: the per-uid RLIMIT_NPROC and the PID namespace contain it.
    code = "import os, sys\nn = 0\nwhile True:\n    try:\n        os.fork(); n += 1\n" \
           "    except OSError:\n        print('limited', flush=True); sys.exit(3)\n"
    cfg = _cfg("namespaces", allow_subprocess=True, max_processes=6)
    r = _run(code, cfg)
    assert r.status != "ok"
    assert "limited" in r.stdout


@needs_ns
def test_escaped_session_dies_with_the_namespace():
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')\n"
    r = _run(code, _cfg("namespaces", allow_subprocess=True))
    assert r.status == "ok" and "parent done" in r.stdout


@pytest.mark.parametrize("mode", MODES)
def test_memory_bomb(mode):
    r = _run("x = bytearray(1 << 30)\nprint('allocated')\n", _cfg(mode, memory_mb=128))
    assert r.status == "memory"
    assert "allocated" not in r.stdout


@pytest.mark.parametrize("mode", MODES)
def test_output_limit(mode):
    r = _run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", _cfg(mode, max_output_bytes=1000))
    assert r.status == "output_limit"
    assert r.stdout_truncated and len(r.stdout) == 1000


@pytest.mark.parametrize("mode", MODES)
def test_write_outside_working_directory_fails(mode, tmp_path):
    target = tmp_path / "escaped.txt"
    for code in (f"open({str(target)!r}, 'w').write('x')",
                 f"import os\nos.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))",
                 f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')",
                 "open('/tmp/motif_sbx_escape_test', 'w').write('x')"):
        r = _run(code, _cfg(mode))
        assert r.status == "violation", (code, r.stderr)
    assert not target.exists()
    assert not os.path.exists("/tmp/motif_sbx_escape_test")


@needs_ns
def test_kernel_layer_blocks_writes_and_network_without_the_python_guard():
    # A child interpreter started with subprocesses allowed has no audit hook: only the kernel layer protects.
    inner = ("import os, socket\n"
             "for p in ['/tmp/motif_sbx_kernel_test', '/dev/shm/motif_sbx_kernel_test', '/usr/motif_sbx_kt', '/x']:\n"
             "    try:\n        open(p, 'w'); print('WROTE', p)\n    except OSError as e:\n        print('ro', e.errno)\n"
             "s = socket.socket()\ntry:\n    s.connect(('1.1.1.1', 80)); print('CONNECTED')\n"
             "except OSError as e:\n    print('net', e.errno)\n"
             "print(sorted(p for p in os.listdir('/proc') if p.isdigit()))\n"
             "print(sorted(os.listdir('/')))\n")
    code = f"import subprocess, sys\nsubprocess.run([sys.executable, '-I', '-c', {inner!r}], check=True)\n"
    r = _run(code, _cfg("namespaces", allow_subprocess=True))
    assert r.status == "ok", r.stderr
    assert "WROTE" not in r.stdout and "CONNECTED" not in r.stdout
    assert r.stdout.count("ro 2\n") == 2  # /tmp and /dev/shm do not exist in the sandbox's root
    assert r.stdout.count("ro 30\n") == 2  # /usr and / are read-only (EROFS)
    assert "net 101" in r.stdout  # ENETUNREACH
    *_, pids, root = r.stdout.splitlines()
    assert all(int(p) < 100 for p in ast.literal_eval(pids))  # its own PID namespace
    assert set(ast.literal_eval(root)) <= {".old", "bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc",
                                           "root", "sandbox", "sbin", "usr"}
    assert not os.path.exists("/tmp/motif_sbx_kernel_test")


@pytest.mark.parametrize("mode", MODES)
def test_network_is_refused(mode):
    for code in ("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
                 "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n",
                 "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('/run/motif.sock')\n",
                 "import socket\nsocket.getaddrinfo('example.com', 80)\n",
                 "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9', timeout=1)\n"):
        r = _run(code, _cfg(mode))
        assert r.status == "violation", (code, r.stderr)
        assert "network access is disabled" in r.stderr


@pytest.mark.parametrize("mode", MODES)
def test_parent_environment_is_not_readable(mode, monkeypatch):
    secret = "motif-secret-4f9c1e"
    monkeypatch.setenv("MOTIF_SANDBOX_TEST_SECRET", secret)
    me = os.getpid()
    code = (
        "import os\nprint(sorted(os.environ))\nprint(os.environ.get('MOTIF_SANDBOX_TEST_SECRET'))\n"
        f"for p in ['/proc/{me}/environ', '/proc/{me}/cmdline', '/proc/%d/environ' % os.getppid(), '/proc/1/environ']:\n"
        "    try:\n        print(open(p, 'rb').read())\n    except Exception as e:\n        print(type(e).__name__)\n"
    )
    r = _run(code, _cfg(mode))
    assert secret not in r.stdout and secret not in r.stderr
    assert "MOTIF_SANDBOX_TEST_SECRET" not in r.stdout
    assert os.environ["MOTIF_SANDBOX_TEST_SECRET"] == secret


@pytest.mark.parametrize("mode", MODES)
def test_ctypes_and_subprocess_refused(mode):
    for code in ("import ctypes\n", "import subprocess\nsubprocess.run(['true'])\n", "import os\nos.system('true')\n",
                 f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)\n"):
        r = _run(code, _cfg(mode))
        assert r.status == "violation", (code, r.stderr)


@pytest.mark.parametrize("mode", MODES)
def test_ordinary_standard_library_use_is_not_refused(mode):
    code = ("import asyncio, collections, dataclasses, decimal, fractions, heapq, json, pathlib, re, statistics\n"
            "import subprocess, tempfile, typing, threading\n"
            "P = collections.namedtuple('P', 'x y')\n@dataclasses.dataclass\nclass D:\n    x: int = 1\n"
            "open('/dev/null', 'w').write('x')\nwith tempfile.TemporaryDirectory() as d:\n    pass\n"
            "print(P(1, 2), D(), json.dumps({'a': [1]}), statistics.mean([1, 2]), asyncio.run(asyncio.sleep(0, 3)))\n")
    r = _run(code, _cfg(mode, memory_mb=512))
    assert r.status == "ok", r.stderr
    assert r.stdout == "P(x=1, y=2) D(x=1) {\"a\": [1]} 1.5 3\n"


@pytest.mark.parametrize("mode", MODES)
def test_runtime_error_status(mode):
    r = _run("raise ValueError('boom')\n", _cfg(mode))
    assert r.status == "runtime_error" and r.exit_code == 1
    assert "ValueError: boom" in r.stderr
    r = _run("import sys\nsys.exit(3)\n", _cfg(mode))
    assert r.status == "runtime_error" and r.exit_code == 3


def test_config_validation_names_the_flag():
    with pytest.raises(ConfigError, match="--sandbox.timeout-s"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ConfigError, match="--sandbox.memory-mb"):
        SandboxConfig(memory_mb=8)
    with pytest.raises(ConfigError, match="--sandbox.isolation"):
        SandboxConfig(isolation="docker")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--sandbox.visible-paths"):
        SandboxConfig(visible_paths=("usr",))
    with pytest.raises(ConfigError, match="--sandbox.temp-dir"):
        SandboxConfig(temp_dir="relative/dir")
