"""Assert-style code tests judged in two sandboxes: the verifier's side (the programs are in ``code_harness``).

Two sandboxes per test. The *solution* sandbox runs the solution, then answers requests ("call f with (2,)",
"attribute x of object 3", ...) on a pipe; the *judge* sandbox runs the test code, where every name the test takes
from the solution is a proxy that sends such requests. Values come back as plain data (exact builtin types, decoded in
the judge into its own objects), so every comparison, builtin and assert of the test is evaluated where no solution
code ever ran; an object the judge cannot hold as plain data (a class with its own __eq__, __bool__ ...) cannot be
compared at all: ``tampered``. The verifier relays and checks every reply (:func:`_relay`), and the verdict reaches it
on the judge's own pipe, which the solution cannot reach (another sandbox: another uid and PID namespace in
namespaces mode). A solution that exits (``sys.exit``, ``os._exit``, a signal) before answering is
``exited_early``; ``atexit`` handlers and exit codes no longer matter. The solution only ever sees the inputs of the
calls, never the expected values.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import json
import os
import threading
from typing import Any

# _wire_decode keeps its underscore for the harness (see code_harness); here it checks the solution's replies
from motif_jax.rl.code_harness import _wire_decode, judge_program, solution_program
from motif_jax.rl.config import SandboxConfig
from motif_jax.rl.sandbox import SandboxResult, run_python

__all__ = ["Outcome", "run_assert_test"]


def run_assert_test(code: str, test_src: str, sandbox: SandboxConfig, max_message_bytes: int) -> Outcome:
    """Judge the test code ``test_src`` against the solution ``code``; ``max_message_bytes`` caps one reply of the
    solution. The judge runs with ``sandbox``'s limits, no subprocesses and twice its wall-clock time (it waits for the
    solution's answers)."""
    try:
        names = _solution_names(ast.parse(test_src), code)
    except (SyntaxError, ValueError) as e:
        return Outcome(False, "error", f"the test does not parse: {e}")
    judge_cfg = dataclasses.replace(sandbox, allow_subprocess=False, timeout_s=2 * sandbox.timeout_s + 2)
    judge_out, judge_w = os.pipe()  # judge -> verifier: requests, then the verdict
    judge_r, judge_in = os.pipe()  # verifier -> judge: checked replies
    solution_r, solution_in = os.pipe()  # verifier -> solution: requests
    solution_out, solution_w = os.pipe()  # solution -> verifier: replies
    ours = [judge_out, judge_in, solution_in, solution_out]
    solution = solution_program(code, solution_r, solution_w)
    judge = judge_program(test_src, names, judge_r, judge_w)
    cancel = threading.Event()
    results: dict[str, SandboxResult | Exception] = {}

    def run(key: str, program: str, cfg: SandboxConfig, fds: tuple[int, int], stop: threading.Event | None):
        try:
            results[key] = run_python(program, "", cfg, pass_fds=fds, cancel=stop)
        except Exception as e:  # noqa: BLE001 - reported as the test's error below
            results[key] = e

    threads = [threading.Thread(target=run, args=("solution", solution, sandbox, (solution_r, solution_w),
                                                  cancel), daemon=True),
               threading.Thread(target=run, args=("judge", judge, judge_cfg, (judge_r, judge_w), None),
                                daemon=True)]
    for t in threads:
        t.start()
    verdict = None
    try:
        verdict = _relay(_LineReader(judge_out, max_message_bytes), judge_in, solution_in,
                         _LineReader(solution_out, max_message_bytes))
    finally:
        if verdict is None or verdict.get("verdict") != "gone":  # a gone solution is left to report its exit
            cancel.set()  # the verdict is in (or the judge is gone): nothing is left for the solution to do
        for fd in ours:
            os.close(fd)
        for t in threads:
            t.join()
    sol, jud = results["solution"], results["judge"]
    for r in (jud, sol):
        if isinstance(r, Exception):
            return Outcome(False, "error", f"{type(r).__name__}: {r}"[:300])
    assert isinstance(sol, SandboxResult) and isinstance(jud, SandboxResult)
    if verdict is None:  # the judge ended without a verdict: its own limits, or a broken test harness
        status = jud.status if jud.status in ("timeout", "memory") else "error"
        return Outcome(False, status, "judge: " + (jud.detail or _last_line(jud.stderr)))
    kind, detail = str(verdict.get("verdict")), str(verdict.get("detail", ""))
    if kind == "pass":
        return Outcome(True, "passed")
    if kind == "gone":
        return Outcome(False, _gone_status(sol), sol.detail or _last_line(sol.stderr))
    return Outcome(False, "failed" if kind == "fail" else kind, detail)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one test of a solution ended."""

    passed: bool
    status: str  # passed, failed, exited_early, tampered, or a sandbox status (timeout, runtime_error, ...)
    detail: str = ""


def _gone_status(solution: SandboxResult) -> str:
    """Why the solution stopped answering, from its sandbox result."""
    if solution.status in ("ok", "killed"):  # exit status 0 or a signal before the tests were answered
        return "exited_early"
    return solution.status


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _names_in(tree: ast.AST) -> tuple[set[str], set[str]]:
    """(names read, names bound anywhere) in ``tree``."""
    loaded: set[str] = set()
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return loaded, bound


def _solution_names(test: ast.AST, code: str) -> list[str]:
    """Names the test reads but does not define: the solution's (a builtin's name only if the solution binds it)."""
    loaded, bound = _names_in(test)
    try:
        solution_bound = _names_in(ast.parse(code))[1]
    except (SyntaxError, ValueError):
        solution_bound = set()
    return sorted(n for n in loaded - bound if n in solution_bound or not hasattr(builtins, n))


class _Oversize(Exception):
    pass


class _LineReader:
    """Newline-framed messages from a pipe, at most ``limit`` bytes each."""

    def __init__(self, fd: int, limit: int):
        self.fd, self.limit, self.buf, self.scanned = fd, limit, bytearray(), 0

    def read_line(self) -> bytes | None:
        """The next message (without its newline); None at end of file; raises _Oversize past the limit."""
        while True:
            i = self.buf.find(b"\n", self.scanned)
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 1]
                self.scanned = 0
                return line
            self.scanned = len(self.buf)
            if len(self.buf) > self.limit:
                raise _Oversize
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk


def _write_all(fd: int, data: bytes) -> bool:
    """Write ``data`` to a pipe; False if its reader is gone."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except (BrokenPipeError, OSError):
        return False
    return True


def _handle_placeholder(tag: str, body: Any) -> None:
    if tag != "H":  # the solution returns its own objects by handle; names are the judge's to send
        raise ValueError("names are not allowed in replies")


def _spoil(verdict: str, detail: str) -> bytes:
    """A message that makes the judge stop with ``verdict`` (never sent by the solution: its replies are checked)."""
    return json.dumps({"spoil": [verdict, detail]}).encode()


def _checked_reply(line: bytes) -> bytes:
    """``line`` if it is a well-formed reply of the solution, else a "tampered" message for the judge."""
    try:
        reply = json.loads(line)
        if type(reply) is not dict or len(reply) != 1:
            raise ValueError("not a reply")
        ((key, body),) = reply.items()
        if key == "ok":
            _wire_decode(body, _handle_placeholder)
        elif not ((key == "raise" and type(body) is list and len(body) == 2 and all(type(x) is str for x in body))
                  or (key == "stop" and body is True)):
            raise ValueError("not a reply")
    except Exception:  # noqa: BLE001 - any malformed input (bad JSON, nesting, numbers, types)
        return _spoil("tampered", "the solution sent a malformed reply")
    return line


def _ask_solution(solution_in: int, solution_out: _LineReader, request: bytes) -> tuple[bytes, bool]:
    """(the solution's checked reply to ``request`` or a spoil message, whether it can no longer be asked)."""
    if not _write_all(solution_in, request + b"\n"):
        return _spoil("gone", "the solution ended before answering"), True
    try:
        reply = solution_out.read_line()
    except _Oversize:
        return _spoil("output_limit", f"a reply of the solution is over {solution_out.limit} bytes"), True
    if reply is None:
        return _spoil("gone", "the solution ended before answering"), True
    return _checked_reply(reply), False


def _relay(judge_out: _LineReader, judge_in: int, solution_in: int, solution_out: _LineReader) -> dict | None:
    """Forward the judge's requests to the solution and its checked replies back; return the judge's verdict
    message (None if the judge ended without one)."""
    final: bytes | None = None  # once set, the answer to every further request
    while True:
        try:
            line = judge_out.read_line()
            message = json.loads(line) if line is not None else None
        except (_Oversize, ValueError):  # a judge that died mid-message
            return None
        if message is None or message.get("op") == "verdict":
            return message
        answer = final
        if answer is None:
            answer, done = _ask_solution(solution_in, solution_out, line)  # type: ignore[arg-type]
            final = answer if done else None
        if not _write_all(judge_in, answer + b"\n"):
            return None


