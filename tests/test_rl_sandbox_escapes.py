"""Sandbox escapes reported against earlier versions: each one now fails, in each mode it applies to.

Every case checks the attack's effect from outside (the file, the listener, the IPC object, the process) as well as
the run's status, and that nothing of the run is left running or on disk.
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest
from test_rl_sandbox import MODES, NS, TEMP_DIR, UID_BASE, _cfg, _run, _sandbox_uid_processes, needs_ns

from motif_jax.rl.config import SandboxConfig
from motif_jax.rl.sandbox import _default_python, run_python
from motif_jax.rl.sandbox_runner import _sandbox_runner

SYSTEM_PYTHON = "/usr/bin/python3"
# A second interpreter where _posixsubprocess is compiled in (Debian's python3), to which create_builtin applies.
INTERPRETERS = [pytest.param("", id="default")] + (
    [pytest.param(SYSTEM_PYTHON, id="system")]
    if os.path.exists(SYSTEM_PYTHON) and os.path.realpath(SYSTEM_PYTHON) != _default_python() else [])


@pytest.mark.parametrize("python", INTERPRETERS)
@pytest.mark.parametrize("mode", MODES)
def test_builtin_module_copies_are_refused(mode, python):
    code = textwrap.dedent("""
        import importlib.util, _imp
        for name in ('_posixsubprocess', 'posix', '_imp', '_signal'):
            try:
                m = importlib.util.module_from_spec(importlib.util.find_spec(name))
                print('COPY', name, hasattr(m, 'fork_exec'))
            except PermissionError:
                print('refused', name)
        try:
            _imp.create_builtin(importlib.util.find_spec('posix')); print('COPY raw')
        except PermissionError:
            print('refused raw')
        import _posixsubprocess, importlib
        importlib.reload(_posixsubprocess)
        try:
            _posixsubprocess.fork_exec(); print('RESTORED')
        except PermissionError:
            print('refused fork_exec')
    """)
    r = _run(code, _cfg(mode, python=python))
    assert r.status == "ok", r.stderr
    assert "COPY" not in r.stdout and "RESTORED" not in r.stdout
    assert r.stdout.count("refused") == 6


class _Listener:
    """A Unix-socket server (path or abstract) that records whether anything connected or sent data."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(address)
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.received: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1.0)
                self.received.append(conn.recv(100) or b"<connected>")

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


@needs_ns
def test_host_unix_sockets_are_unreachable_from_unguarded_children():
    # A child without the Python layer (subprocesses allowed) tries a world-writable path socket and an abstract one.
    d = tempfile.mkdtemp(prefix="motif_sbx_sock_", dir="/tmp")
    os.chmod(d, 0o755)
    path = os.path.join(d, "s")
    abstract = f"\0motif-sbx-test-{os.getpid()}"
    listeners = [_Listener(path), _Listener(abstract)]
    os.chmod(path, 0o777)
    try:
        inner = (f"import socket\nfor a in [{path!r}, {abstract!r}]:\n    s = socket.socket(socket.AF_UNIX)\n"
                 "    try:\n        s.connect(a); s.sendall(b'leak'); print('CONNECTED')\n"
                 "    except OSError as e:\n        print('refused', e.errno)\n")
        code = f"import subprocess, sys\nsubprocess.run([sys.executable, '-I', '-c', {inner!r}], check=True)\n"
        r = _run(code, _cfg("namespaces", allow_subprocess=True))
        assert r.status == "ok", r.stderr
        assert "CONNECTED" not in r.stdout and r.stdout.count("refused") == 2
        # the listeners were reachable: this process connects to both
        for a in (path, abstract):
            with socket.socket(socket.AF_UNIX) as c:
                c.connect(a)
                c.sendall(b"probe")
        deadline = time.monotonic() + 5
        while sum(len(x.received) for x in listeners) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        for x in listeners:
            x.close()
        os.unlink(path)
        os.rmdir(d)
    assert [x.received for x in listeners] == [[b"probe"], [b"probe"]]  # and nothing from the sandbox


def _host_shm_keys() -> set[int]:
    with open("/proc/sysvipc/shm") as f:
        return {int(line.split()[0]) for line in list(f)[1:]}


@needs_ns
def test_sysv_ipc_of_unguarded_children_dies_with_the_run():
    key = 0x5B0000 + os.getpid() % 0xFFFF
    inner = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
             f"i = libc.shmget({key}, 4096, 0o1666)\nprint('shm', i, ctypes.get_errno())\n")
    code = f"import subprocess, sys\nsubprocess.run([sys.executable, '-I', '-c', {inner!r}], check=True)\n"
    r = _run(code, _cfg("namespaces", allow_subprocess=True))
    assert r.status == "ok", r.stderr
    assert int(r.stdout.split()[1]) >= 0  # the segment was created, in the run's own IPC namespace
    assert key not in _host_shm_keys()


@pytest.mark.parametrize("mode", MODES)
def test_posix_shared_memory_is_refused(mode):
    r = _run("from multiprocessing import shared_memory\nshared_memory.SharedMemory(create=True, size=4096)\n",
             _cfg(mode))
    assert r.status == "violation", r.stderr


@pytest.mark.parametrize("mode", MODES)
def test_dir_fd_and_path_tricks_are_refused(mode, tmp_path):
    out = tmp_path / "escaped.txt"
    me = os.getpid()
    attacks = [
        # the parent's environment through a /proc directory fd, and through /proc/self/root
        f"import os\nfd = os.open('/proc', os.O_RDONLY)\nprint(os.read(os.open('{me}/environ', 0, dir_fd=fd), 9999))",
        f"print(open('/proc/self/root/proc/{me}/environ', 'rb').read())",
        # a write outside through a directory fd, through chdir, through /proc/self/cwd/..
        (f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
         "os.open('escaped.txt', os.O_CREAT | os.O_WRONLY, dir_fd=fd)"),
        f"import os\nos.chdir({str(tmp_path)!r})\nopen('escaped.txt', 'w')",
        "import os\nos.fchdir(os.open('/', os.O_RDONLY))",
        f"open('/proc/self/cwd/../../../../../../../..{out}', 'w')",
        # a hostile realpath does not fool the hook (it uses its own resolution)
        f"import os.path\nos.path.realpath = lambda p, **k: os.getcwd() + '/x'\nopen({str(out)!r}, 'w')",
        f"import builtins\nbuiltins.type = lambda x: str\nbuiltins.len = lambda x: 0\nopen({str(out)!r}, 'w')",
    ]
    for code in attacks:
        r = _run(code, _cfg(mode))
        # namespaces: the host's /proc entry or directory is simply not there
        missing = mode == "namespaces" and "FileNotFoundError" in r.stderr
        assert r.status == "violation" or (missing and r.status == "runtime_error"), (code, r.stdout, r.stderr)
        assert r.stdout == ""  # nothing was read
    assert not out.exists()


@pytest.mark.parametrize("mode", MODES)
def test_path_objects_work_and_are_checked(mode, tmp_path):
    # The C layer converts a PathLike to str once, before the audit event: pathlib needs no special case.
    code = "import pathlib\npathlib.Path('f.txt').write_text('x')\nprint(pathlib.Path('f.txt').read_text())\n"
    r = _run(code, _cfg(mode))
    assert r.status == "ok" and r.stdout == "x\n", r.stderr
    out = tmp_path / "escaped.txt"
    r = _run(f"import pathlib\npathlib.Path({str(out)!r}).write_text('x')\n", _cfg(mode))
    assert r.status == "violation" and not out.exists()


@pytest.mark.parametrize("mode", MODES)
def test_introspection_and_other_processes_are_refused(mode):
    attacks = ["import sys\nsys.settrace(lambda *a: None)", "import sys\nsys._current_frames()",
               "import gc\ngc.get_objects()", "import os\nos.pidfd_open(os.getppid())",
               "import os, resource\nresource.prlimit(os.getppid(), resource.RLIMIT_CORE, (0, 0))",
               "import os, signal\nos.kill(os.getppid(), signal.SIGCONT)"]
    if mode == "process":  # joining the supervisor's process group does not let the program signal it
        attacks.append("import os, signal\nos.setpgid(0, os.getppid())\nos.kill(0, signal.SIGCONT)")
    for code in attacks:
        r = _run(code, _cfg(mode))
        assert r.status in ("violation", "runtime_error"), (code, r.stderr)
        assert "[sandbox]" in r.stderr or "PermissionError" in r.stderr, (code, r.stderr)


def test_the_audit_hook_keeps_no_reachable_state():
    # Closure cells (readable through __closure__, writable through frames in 3.13) would let a program change what
    # the hook checks; every check function takes its state as immutable default arguments instead.
    nested = {c.co_name: c for c in _sandbox_runner.__code__.co_consts if hasattr(c, "co_freevars")}
    for name in ("hook", "deny", "resolve", "where", "inside", "check_read", "refused"):
        assert nested[name].co_freevars == (), name


def test_process_mode_kills_double_forked_sessions():
    # The grandchild leaves the session and the process group; the supervisor still finds and kills it.
    code = textwrap.dedent("""
        import os, signal, sys, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                print('grandchild', os.getpid(), flush=True)
                time.sleep(60)
            os._exit(0)
        time.sleep(0.3)
        print('parent done', flush=True)
    """)
    r = _run(code, _cfg("process", allow_subprocess=True))
    assert r.status == "ok" and "parent done" in r.stdout, r.stderr
    pid = int(r.stdout.split("grandchild")[1].split()[0])
    assert not os.path.exists(f"/proc/{pid}")


@pytest.mark.parametrize("mode", MODES)
def test_work_dir_limit_is_enforced(mode):
    # 1 MiB files (under max_file_mb) until 40 MiB: the 4 MiB working directory stops it either way.
    for tail in ("import time\ntime.sleep(5)\n", ""):  # caught while running / caught at the end
        code = ("import os\nfor i in range(40):\n    with open('f%d' % i, 'wb') as f:\n"
                "        f.write(os.urandom(1 << 20))\n" + tail)
        r = _run(code, _cfg(mode, max_file_mb=2, work_dir_mb=4, timeout_s=8))
        assert r.status == "output_limit", (r.status, r.stderr[-300:], r.detail)
        assert r.wall_s < 5.0


_KILLED_PARENT = """
import sys
from motif_jax.rl.config import SandboxConfig
from motif_jax.rl.sandbox import run_python
cfg = SandboxConfig(isolation=sys.argv[1], temp_dir=sys.argv[2], uid_base=int(sys.argv[3]), uid_count=4, timeout_s=1.0)
run_python("import time\\nprint('started', flush=True)\\ntime.sleep(60)\\n", "", cfg)
"""


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _processes_in(run_dirs: list[str]) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cwd = os.readlink(f"/proc/{name}/cwd")
            except OSError:
                continue
            if any(cwd.startswith(d) for d in run_dirs):
                out.append(int(name))
    return out


@pytest.mark.parametrize("mode", MODES)
def test_a_killed_parent_leaves_nothing_running_or_on_disk(mode, tmp_path):
    uid_base = UID_BASE + 500  # a range of its own: the check below counts its processes
    cfg = SandboxConfig(isolation=mode, temp_dir=str(tmp_path), uid_base=uid_base, uid_count=4)
    parent = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT, mode, str(tmp_path), str(uid_base)],
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    deadline = time.monotonic() + 30
    stdout = []
    while not stdout and time.monotonic() < deadline:
        stdout = [p for p in glob.glob(str(tmp_path / f"proc-{parent.pid}-*/motif_sbx_*/stdout"))
                  if "started" in _read(p)]
        time.sleep(0.02)
    assert stdout, "the sandboxed program did not start"
    run_dir = os.path.dirname(stdout[0])
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    while time.monotonic() < deadline and (_processes_in([run_dir]) or _sandbox_uid_processes(cfg)):
        time.sleep(0.05)  # the supervisor's watchdog (process) / the in-namespace timeout ends the run
    assert _processes_in([run_dir]) == [] and _sandbox_uid_processes(cfg) == []
    assert os.path.exists(run_dir)  # left behind by the killed parent ...
    assert run_python("print(1)", "", cfg).stdout == "1\n"
    assert not glob.glob(str(tmp_path / f"proc-{parent.pid}-*"))  # ... and removed by the next start


@pytest.mark.parametrize("mode", MODES)
def test_other_files_of_the_sandbox_are_not_readable(mode):
    # Other runs' programs (a code test's judge holds the expected values) live under the temporary directory.
    victim = os.path.join(TEMP_DIR, "judge-program.py")
    with open(victim, "w") as f:
        f.write("EXPECTED = 42\n")
    try:
        r = _run(f"print(open({victim!r}).read())", _cfg(mode))
    finally:
        os.unlink(victim)
    assert "EXPECTED" not in r.stdout
    assert r.status == ("violation" if mode == "process" else "runtime_error"), r.stderr  # namespaces: not there


@needs_ns
def test_world_readable_files_outside_the_visible_paths_are_not_there():
    d = tempfile.mkdtemp(prefix="motif_sbx_ref_", dir="/tmp")
    ref = os.path.join(d, "reference_outputs.txt")
    with open(ref, "w") as f:
        f.write("EXPECTED 42\n")
    os.chmod(d, 0o755)
    os.chmod(ref, 0o644)
    readme = os.path.abspath(__file__)
    try:
        code = (f"for p in [{ref!r}, {readme!r}]:\n    try:\n        print(open(p).read())\n"
                "    except OSError as e:\n        print('missing', e.errno)\n")
        inner = f"import subprocess, sys\nsubprocess.run([sys.executable, '-I', '-c', {code!r}], check=True)\n"
        r = _run(inner, _cfg("namespaces", allow_subprocess=True))  # no Python layer in the child
    finally:
        os.unlink(ref)
        os.rmdir(d)
    assert r.status == "ok", r.stderr
    assert r.stdout == "missing 2\nmissing 2\n"  # ENOENT: not merely unreadable


def test_namespaces_mode_refuses_nothing_it_cannot_provide():
    cfg = SandboxConfig(isolation="namespaces", uid_base=UID_BASE, uid_count=4, temp_dir=TEMP_DIR)
    if not NS:
        from motif_jax.rl.sandbox import SandboxUnavailable

        with pytest.raises(SandboxUnavailable, match="--sandbox.isolation process"):
            run_python("print(1)", "", cfg)
    else:
        assert run_python("print(1)", "", cfg).isolation == "namespaces"
