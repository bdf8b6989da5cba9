"""The trusted runner: the program the sandboxed interpreter starts with, before the untrusted code.

It reads the code from an inherited file descriptor, and then, in this order: (process mode) forks a supervisor that
outlives the code and kills every descendant when it ends; applies the resource limits (``RLIMIT_CPU``, ``_AS``,
``_FSIZE``, ``_NOFILE``, ``_CORE``, and ``_NPROC`` in namespaces mode); imports every compiled-in module (so no fresh
copy can be created later); installs the audit hook (the Python layer of ``motif_jax.rl.sandbox``'s guarantees);
reports "started" on the control pipe; and returns the compiled code for ``exec`` as ``__main__``.
:func:`runner_command` builds the command line that starts it, limits included.
"""

from __future__ import annotations

import inspect
import json
import textwrap

from motif_jax.rl.config import SandboxConfig

__all__ = ["READY", "RUNNER", "runner_command"]

READY = b"R"  # written by the runner on the control pipe once the code is about to run (see the end of the runner)


def runner_command(python: str, cfg: SandboxConfig, mode: str, *, program_fd: int, control_fd: int,
                   private_dirs: list[str]) -> list[str]:
    """``python -I -B -c <runner> <its JSON config>`` for one run: the code is read from ``program_fd``, READY is
    written to ``control_fd``; ``private_dirs`` are refused to the code (process mode: the sandbox's temporary
    files)."""
    mib = 1024 * 1024
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
        "program_fd": program_fd,
        "control_fd": control_fd,
        "allow_subprocess": cfg.allow_subprocess,
        "supervise": mode == "process",
        "watchdog_s": cfg.timeout_s + 2.0,
        "rlimits": rlimits,
        "private_dirs": private_dirs,
    }
    return [python, "-I", "-B", "-c", RUNNER, json.dumps(runner_cfg)]


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


RUNNER = (textwrap.dedent(inspect.getsource(_sandbox_runner))
          + "_c, _g = _sandbox_runner()\ndel _sandbox_runner\nexec(_c, _g)\n")
