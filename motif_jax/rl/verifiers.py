"""Verifiable rewards: answer checks, math equivalence, code tests in the sandbox, format/instruction checks.

A verifier is a callable ``(record, response) -> VerifierResult`` with a ``name`` and an ``applies(record)`` test.
``record`` is the prompt record of the task (a mapping; the fields each verifier reads are listed on it) and
``response`` the model's full text. ``VerifierResult.score`` is in [0, 1]; ``applies=False`` means "this verifier has
nothing to say about this prompt" and such results are *left out* of the combined reward, never scored 0.

Routing: a record may name its verifiers explicitly (``record["verifiers"] = ["math", "format"]``); otherwise each
verifier decides from the record's fields (``answer``/``answer_type``/``task``, ``tests``, ``constraints``).

Answer extraction (shared by the exact and math verifiers) and its guards against reward hacking:

* only the text after the last ``</think>`` counts (an unfinished think block has no answer: ``parse_error``);
* candidates are the contents of every ``\\boxed{...}`` and the text after the *last* ``Answer:`` marker (to the end
  of its line); if several candidates disagree the response is ambiguous and scores 0 (``parse_error``), so
  "boxing everything" never passes;
* a candidate that lists alternatives ("3 or 4", "3 \\lor 4", "either ...", "3; 4") or has more comma-separated
  items than the reference is refused.

Code tests cannot be passed from inside the solution: outputs are compared by the verifier, asserts are evaluated
by a separate judge sandbox on plain values (see ``CodeVerifier``), so ``sys.exit(0)``, ``os._exit(0)``, ``atexit``
handlers and objects whose ``__eq__`` always returns True all score 0.
"""

from __future__ import annotations

import ast
import builtins
import concurrent.futures
import dataclasses
import functools
import inspect
import json
import os
import re
import textwrap
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from motif_jax.data.template import split_response
from motif_jax.rl.config import SandboxConfig
from motif_jax.rl.sandbox import SandboxResult, SandboxUnavailable, run_python

__all__ = [
    "CodeVerifier",
    "CombinedReward",
    "ExactAnswerVerifier",
    "FormatVerifier",
    "MathVerifier",
    "Verifier",
    "VerifierResult",
    "VerifierStatus",
    "combine_rewards",
    "default_verifiers",
    "extract_answer",
    "extract_code",
    "normalize_answer",
    "overlong_penalty",
    "score_response",
]

VerifierStatus = Literal["ok", "parse_error", "timeout", "error", "not_applicable", "exited_early", "tampered"]


@dataclasses.dataclass(frozen=True)
class VerifierResult:
    """One verifier's verdict on one response.

    ``score``: reward in [0, 1]. ``status``: ``ok`` (the response was checked; the score says how well it did),
    ``parse_error`` (no single answer / code could be extracted), ``timeout`` (the check ran out of time),
    ``error`` (the verifier itself failed), ``exited_early`` / ``tampered`` (code that exited before its tests were
    answered / handed the judge something it cannot judge: reward hacking or broken code, scored 0),
    ``not_applicable``. ``detail``: a short human-readable reason.
    """

    score: float
    status: VerifierStatus
    applies: bool = True
    detail: str = ""
    name: str = ""


def _not_applicable(name: str) -> VerifierResult:
    return VerifierResult(0.0, "not_applicable", applies=False, detail="verifier does not apply", name=name)


@runtime_checkable
class Verifier(Protocol):
    """``verifier(record, response) -> VerifierResult``; ``applies(record)`` says whether it scores this prompt."""

    name: str

    def applies(self, record: Mapping[str, Any]) -> bool: ...

    def __call__(self, record: Mapping[str, Any], response: str) -> VerifierResult: ...


def _routed(record: Mapping[str, Any], name: str) -> bool | None:
    """Explicit routing via ``record["verifiers"]``; None when the record does not route."""
    names = record.get("verifiers")
    if names is None:
        return None
    return name in names


# ---------------------------------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------------------------------

_ANSWER_RE = re.compile(r"answer\**\s*:", re.IGNORECASE)  # "Answer:", "**Answer**:", "answer :"
_ALTERNATIVES_RE = re.compile(r"(\bor\b|\\lor\b|\\vee\b|\\text\{\s*or\s*\}|\beither\b|;|\|\|)", re.IGNORECASE)


def _final_section(response: str) -> str | None:
    """The part of the response that may carry the answer: after the last ``</think>``; None if still thinking."""
    close = response.rfind("</think>")
    if close >= 0:
        return response[close + len("</think>") :]
    if "<think>" in response:
        return None
    return response


def _boxed_contents(text: str) -> list[str] | None:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces); None if one is unbalanced."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:
            return None
        out.append(text[m.end() : i - 1])
    return out


def extract_answer(response: str) -> tuple[str | None, str]:
    """The single final answer of ``response``, or ``(None, reason)``.

    Candidates: every ``\\boxed{}`` in the final section and the text after its last ``Answer:`` marker (if that text
    itself contains a ``\\boxed{}``, the boxed content is the candidate). Several candidates must agree after
    :func:`normalize_answer`; the returned string is the raw candidate.
    """
    final = _final_section(response)
    if final is None:
        return None, "unfinished <think> block"
    boxed = _boxed_contents(final)
    if boxed is None:
        return None, "unbalanced \\boxed{"
    candidates = [b.strip() for b in boxed]
    markers = list(_ANSWER_RE.finditer(final))
    if markers:
        tail = final[markers[-1].end() :].strip()
        line = tail.split("\n", 1)[0].strip()
        if line and "\\boxed" not in line and "\\fbox" not in line:
            candidates.append(line)
    candidates = [c for c in candidates if c]
    if not candidates:
        return None, "no final answer (expected 'Answer: ...' or \\boxed{...})"
    distinct = {normalize_answer(c) for c in candidates}
    if len(distinct) > 1:
        return None, f"ambiguous: {len(distinct)} different final answers"
    return candidates[-1], ""


_LATEX_WRAPPERS = [
    (re.compile(r"\\text\{([^{}]*)\}"), r"\1"),
    (re.compile(r"\\mathrm\{([^{}]*)\}"), r"\1"),
    (re.compile(r"\\textbf\{([^{}]*)\}"), r"\1"),
    (re.compile(r"\\(?:left|right|displaystyle|,|;|!|quad)"), ""),
]


def normalize_answer(ans: str) -> str:
    """Canonical string for comparing short answers: integers as ``str(int)``, other text case-folded.

    Strips ``$``, ``\\text{}``, surrounding punctuation/quotes, whitespace, a leading ``x =`` and thousands
    separators in numbers ("1,000" -> "1000", "-5.0" -> "-5", "\\$12" -> "12", "x = 5" -> "5").
    """
    s = ans.strip()
    for pat, rep in _LATEX_WRAPPERS:
        s = pat.sub(rep, s)
    s = s.replace("\\$", "").replace("$", "").strip()
    s = s.strip(" \t\n.。'\"`*")
    s = re.sub(r"\s+", " ", s)
    s = re.sub(r"^[A-Za-z]\s*=\s*(?=\S)", "", s)  # "x = 5" -> "5" (a single variable's value)
    num = s.replace(" ", "")
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", num):
        num = num.replace(",", "")
    if re.fullmatch(r"[+-]?\d+", num):
        return str(int(num))
    if re.fullmatch(r"[+-]?\d+\.\d*", num):
        value = float(num)
        if value.is_integer() and abs(value) < 2**53:
            return str(int(value))
        return repr(value)
    return s.casefold()


def _top_level_items(s: str) -> int:
    """Number of comma-separated items outside brackets."""
    depth, n = 0, 1
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            n += 1
    return n


def _hedged(candidate: str, reference: str) -> str:
    """Reason why ``candidate`` lists alternatives instead of one answer ("" if it does not)."""
    if _ALTERNATIVES_RE.search(candidate) and not _ALTERNATIVES_RE.search(reference):
        return "answer lists alternatives"
    c = candidate.replace("\\,", "").replace("\\!", "")
    r = reference.replace("\\,", "").replace("\\!", "")
    if re.fullmatch(r"\s*[+-]?\d{1,3}(,\d{3})+\s*", c):  # thousands separators, not a list
        return ""
    if _top_level_items(c) > _top_level_items(r):
        return "answer has more items than the reference"
    return ""


# ---------------------------------------------------------------------------------------------------------------------
# Exact answers (synthetic tasks)
# ---------------------------------------------------------------------------------------------------------------------


def _answer_kind(record: Mapping[str, Any]) -> str:
    kind = record.get("answer_type")
    if kind:
        return str(kind)
    return "math" if record.get("task") == "math" else "exact"


@dataclasses.dataclass(frozen=True)
class ExactAnswerVerifier:
    """Exact match of the extracted final answer against ``record["answer"]`` (int or str), after normalisation.

    Applies to records with an ``answer`` whose ``answer_type`` is ``exact`` (the default unless ``task == "math"``).
    Score 1 on a match, 0 otherwise; ``parse_error`` when no single answer can be extracted.
    """

    name: str = "exact"

    def applies(self, record: Mapping[str, Any]) -> bool:
        routed = _routed(record, self.name)
        if routed is not None:
            return routed and "answer" in record
        return "answer" in record and _answer_kind(record) == "exact"

    def __call__(self, record: Mapping[str, Any], response: str) -> VerifierResult:
        if not self.applies(record):
            return _not_applicable(self.name)
        return self.check(str(record["answer"]), response)

    def check(self, reference: str, response: str) -> VerifierResult:
        """The answer check alone (no routing): ``response``'s extracted answer against ``reference``."""
        cand, why = extract_answer(response)
        if cand is None:
            return VerifierResult(0.0, "parse_error", detail=why, name=self.name)
        hedge = _hedged(cand, reference)
        if hedge:
            return VerifierResult(0.0, "parse_error", detail=hedge, name=self.name)
        ok = normalize_answer(cand) == normalize_answer(reference)
        return VerifierResult(float(ok), "ok", detail=f"answer {cand!r}", name=self.name)


class StepsVerifier:
    """Reference-trace check for tasks whose aligned reasoning is deterministic (the synthetic tasks).

    Score 1 only when the response's reasoning reproduces every step line of the record's reference reasoning
    (the last assistant turn's ``reasoning``) *and* the final answer is exact. An answer-only verifier also rewards
    right answers reached through wrong steps; with a small policy those are common (a step that reads the wrong
    digit, an answer that does not follow from the steps), and reinforcing them teaches inconsistent reasoning.
    Applies to records with a reference reasoning whose provenance style is ``aligned``.
    """

    name: str = "steps"

    def applies(self, record: Mapping[str, Any]) -> bool:
        routed = _routed(record, self.name)
        has_reference = bool(_reference_reasoning(record)) and "answer" in record
        if routed is not None:
            return routed and has_reference
        return has_reference and (record.get("provenance") or {}).get("style") == "aligned"

    def __call__(self, record: Mapping[str, Any], response: str) -> VerifierResult:
        if not self.applies(record):
            return _not_applicable(self.name)
        reasoning, content = split_response(response)
        answer = dataclasses.replace(ExactAnswerVerifier().check(str(record["answer"]), content), name=self.name)
        if answer.status != "ok":
            return answer
        want = _step_lines(_reference_reasoning(record))
        got = _step_lines(reasoning or "")
        if got != want:
            # the first differing line (or the first missing / extra one)
            wrong = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            return VerifierResult(0.0, "ok", detail=f"step {wrong + 1} differs from the reference", name=self.name)
        return answer


def _reference_reasoning(record: Mapping[str, Any]) -> str:
    messages = record.get("messages") or []
    last = messages[-1] if messages else {}
    return (last.get("reasoning") or "") if last.get("role") == "assistant" else ""


def _step_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------------
# Math answers (math_verify)
# ---------------------------------------------------------------------------------------------------------------------


def _as_math(text: str) -> str:
    t = text.strip()
    return t if t.startswith("$") else f"${t}$"


@dataclasses.dataclass(frozen=True)
class MathVerifier:
    """Mathematical equivalence of the extracted answer and ``record["answer"]`` with ``math_verify``.

    Applies to records with an ``answer`` and ``answer_type == "math"`` (or ``task == "math"``). The answer is
    extracted with :func:`extract_answer` first (so hedged and multi-answer responses fail before math_verify can
    match one of several candidates), then both sides are parsed and compared ("\\frac{1}{2}" == "0.5").
    ``math_verify`` guards its own run time with ``signal.alarm``, which only works in the main thread; from other
    threads it is called without a time limit (run such threads in worker processes if inputs can be hostile).
    """

    name: str = "math"
    timeout_s: int = 5
    float_rounding: int = 6

    def applies(self, record: Mapping[str, Any]) -> bool:
        routed = _routed(record, self.name)
        if routed is not None:
            return routed and "answer" in record
        return "answer" in record and _answer_kind(record) == "math"

    def __call__(self, record: Mapping[str, Any], response: str) -> VerifierResult:
        if not self.applies(record):
            return _not_applicable(self.name)
        # heavy imports (sympy), only when used
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException

        reference = str(record["answer"])
        cand, why = extract_answer(response)
        if cand is None:
            return VerifierResult(0.0, "parse_error", detail=why, name=self.name)
        hedge = _hedged(cand, reference)
        if hedge:
            return VerifierResult(0.0, "parse_error", detail=hedge, name=self.name)
        timeout = self.timeout_s if threading.current_thread() is threading.main_thread() else None
        try:
            gold = parse(_as_math(reference), parsing_timeout=timeout, raise_on_error=True)
            pred = parse(_as_math(cand), parsing_timeout=timeout, raise_on_error=True)
            if not gold:
                return VerifierResult(0.0, "error", detail=f"cannot parse the reference {reference!r}", name=self.name)
            if not pred:
                return VerifierResult(0.0, "parse_error", detail=f"cannot parse {cand!r}", name=self.name)
            ok = verify(gold, pred, float_rounding=self.float_rounding, timeout_seconds=timeout, raise_on_error=True)
        except TimeoutException:
            return VerifierResult(0.0, "timeout", detail="math_verify timed out", name=self.name)
        except Exception as e:  # noqa: BLE001 - math_verify/sympy raise many types on odd inputs
            return VerifierResult(0.0, "parse_error", detail=f"{type(e).__name__}: {e}"[:200], name=self.name)
        return VerifierResult(float(bool(ok)), "ok", detail=f"answer {cand!r}", name=self.name)


# ---------------------------------------------------------------------------------------------------------------------
# Code (tests in the sandbox)
#
# Input/output tests: the solution runs with the test's stdin and the verifier compares its stdout here.
# Assert-style tests: two sandboxes per test. The *solution* sandbox runs the solution, then answers requests
# ("call f with (2,)", "attribute x of object 3", ...) on a pipe; the *judge* sandbox runs the test code, where
# every name the test takes from the solution is a proxy that sends such requests. Values come back as plain data
# (exact builtin types, decoded in the judge into its own objects), so every comparison, builtin and assert of the
# test is evaluated where no solution code ever ran; an object the judge cannot hold as plain data (a class with its
# own __eq__, __bool__ ...) cannot be compared at all: ``tampered``. The verifier relays and checks every reply, and
# the verdict reaches it on the judge's own pipe, which the solution cannot reach (another sandbox: another uid and
# PID namespace in namespaces mode). A solution that exits (``sys.exit``, ``os._exit``, a signal) before answering
# is ``exited_early``; ``atexit`` handlers and exit codes no longer matter. The solution only ever sees the inputs
# of the calls, never the expected values.
# ---------------------------------------------------------------------------------------------------------------------

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str | None:
    """The last fenced code block (```python ...``` or an untagged ```...```) after the thinking; None if none."""
    final = _final_section(response)
    if final is None:
        return None
    blocks = [(lang.lower(), body) for lang, body in _FENCE_RE.findall(final)]
    py = [b for lang, b in blocks if lang in ("python", "py", "python3", "")]
    return py[-1] if py else None


def _normalize_output(s: str) -> str:
    lines = [line.rstrip() for line in s.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


# The wire format and both harnesses below also run inside the sandboxes (embedded by source, see _harness):
# they must be self-contained and run on any Python >= 3.8.


def _wire_encode(value, handle, depth=0):
    """JSON form of ``value``: plain data by value (exact builtin types; subclasses that keep their base's equality
    and the ``collections`` mappings as their base type; Fraction, Decimal), anything else as ``handle(value)``."""
    t = type(value)
    if value is None or t is bool or t is str or t is float:
        return value
    if t is int:
        return value if -(1 << 53) < value < (1 << 53) else {"I": format(value, "x")}
    if depth > 100:
        raise ValueError("value nested too deeply")

    def enc(v):
        return _wire_encode(v, handle, depth + 1)

    if t is list or t is tuple or t is set or t is frozenset:
        return {{list: "L", tuple: "T", set: "S", frozenset: "F"}[t]: [enc(v) for v in value]}
    if t is dict:
        return {"D": [[enc(k), enc(v)] for k, v in value.items()]}
    if t is bytes or t is bytearray:
        return {"B" if t is bytes else "A": value.hex()}
    if t is complex:
        return {"C": [value.real, value.imag]}
    if t.__name__ == "Fraction" and t.__module__ == "fractions":
        return {"Q": [enc(value.numerator), enc(value.denominator)]}
    if t.__name__ == "Decimal" and t.__module__ == "decimal":
        return {"M": str(value)}
    for base in (int, float, str, bytes, list, tuple, dict, set, frozenset):  # namedtuple, IntEnum, Counter ...
        if isinstance(value, base) and (t.__eq__ is base.__eq__ or t.__module__ == "collections"):
            return enc(base(value))
    return handle(value)


def _wire_decode(obj, ref, depth=0):
    """Inverse of :func:`_wire_encode` for JSON from anywhere: raises ValueError/TypeError on anything malformed;
    handles ``{"H": [id, class name]}`` and names ``{"N": name}`` become ``ref(tag, body)``."""
    t = type(obj)
    if obj is None or t is bool or t is int or t is float or t is str:
        return obj
    if t is not dict or len(obj) != 1 or depth > 100:
        raise ValueError("malformed value")
    ((tag, body),) = obj.items()

    def dec(v):
        return _wire_decode(v, ref, depth + 1)

    if tag in ("L", "T", "S", "F") and type(body) is list:
        return {"L": list, "T": tuple, "S": set, "F": frozenset}[tag](dec(v) for v in body)
    if tag == "D" and type(body) is list and all(type(kv) is list and len(kv) == 2 for kv in body):
        return {dec(k): dec(v) for k, v in body}
    if tag == "I" and type(body) is str and len(body) <= 100_000:
        return int(body, 16)
    if tag in ("B", "A") and type(body) is str:
        return (bytes if tag == "B" else bytearray).fromhex(body)
    if tag == "C" and type(body) is list and len(body) == 2 and all(type(x) in (int, float) for x in body):
        return complex(body[0], body[1])
    if tag == "Q" and type(body) is list and len(body) == 2:
        import fractions

        num, den = dec(body[0]), dec(body[1])
        if type(num) is not int or type(den) is not int:
            raise ValueError("malformed fraction")
        return fractions.Fraction(num, den)
    if tag == "M" and type(body) is str and len(body) <= 10_000:
        import decimal

        return decimal.Decimal(body)
    if (tag == "H" and type(body) is list and len(body) == 2 and type(body[0]) is int and type(body[1]) is str) or (
        tag == "N" and type(body) is str
    ):
        return ref(tag, body)
    raise ValueError("malformed value")


def _solution_serve(namespace, rfd, wfd):
    """The solution's side: answer the judge's requests against ``namespace`` until the request pipe closes.

    Runs after the solution's own code, in its (untrusted) process: whatever it sends is only data to be checked,
    and choosing what it sends is no more than choosing what the solution's functions return.
    """
    import builtins
    import json
    import os

    handles = []

    def keep(value):
        handles.append(value)
        name = type(value).__name__
        return {"H": [len(handles) - 1, name if type(name) is str else "?"]}

    def find(tag, body):
        if tag == "H":
            return handles[body[0]]
        if body in namespace:
            return namespace[body]
        if hasattr(builtins, body):
            return getattr(builtins, body)
        raise NameError(f"name {body!r} is not defined")

    reader, writer = os.fdopen(rfd, "rb"), os.fdopen(wfd, "wb")
    for line in reader:
        op = None
        try:
            request = json.loads(line)
            op = request["op"]
            target = _wire_decode(request["obj"], find)
            if op == "call":
                args = [_wire_decode(a, find) for a in request["args"]]
                value = target(*args, **{k: _wire_decode(v, find) for k, v in request["kwargs"]})
            elif op == "getattr":
                value = getattr(target, request["name"])
            elif op == "iter":
                value = iter(target)
            elif op == "next":
                value = next(target)
            elif op == "getitem":
                value = target[_wire_decode(request["key"], find)]
            elif op == "len":
                value = len(target)
            elif op == "str":
                value = str(target)
            else:
                value = target
            reply = {"ok": _wire_encode(value, keep)}
        except StopIteration:
            reply = {"stop": True} if op == "next" else {"raise": ["StopIteration", ""]}
        except BaseException as e:  # noqa: BLE001 - SystemExit too: the judge decides what it means
            try:
                message = str(e)[:500]
            except BaseException:  # noqa: BLE001
                message = ""
            reply = {"raise": [type(e).__name__, message]}
        writer.write(json.dumps(reply).encode("utf-8") + b"\n")
        writer.flush()


def _judge_main(test_src, names, rfd, wfd):
    """The judge: run ``test_src`` with each of ``names`` bound to a proxy of the solution's object, then send the
    verdict (``pass``, ``fail``, or why the run could not be judged) as the last message on ``wfd``."""
    import builtins
    import json
    import operator
    import os

    reader, writer = os.fdopen(rfd, "rb"), os.fdopen(wfd, "wb")
    spoiled = []  # (verdict, detail) overriding the test's outcome, even when the test swallows the exception

    class Unjudgeable(BaseException):
        """The solution is gone or sent something that cannot be judged (a BaseException: ``except Exception``
        in a test does not catch it)."""

    class SolutionError(Exception):
        """An exception of a class of the solution's own."""

    def give_up(verdict, detail):
        spoiled.append((verdict, detail))
        raise Unjudgeable(detail)

    def send(message):
        writer.write(json.dumps(message).encode("utf-8") + b"\n")
        writer.flush()

    def rpc(op, wire, **extra):
        if spoiled:
            raise Unjudgeable(spoiled[0][1])
        send(dict(extra, op=op, obj=wire))
        line = reader.readline()
        if not line:
            give_up("gone", "the verifier closed the channel")
        reply = json.loads(line)
        if "spoil" in reply:
            give_up(*reply["spoil"])
        if "stop" in reply:
            raise StopIteration
        if "raise" in reply:
            name, message = reply["raise"]
            if name in ("SystemExit", "KeyboardInterrupt", "GeneratorExit"):
                give_up("exited_early", "the solution raised " + name)
            cls = getattr(builtins, name, None)
            error = None
            if isinstance(cls, type) and issubclass(cls, Exception) and cls is not StopIteration:
                try:
                    error = cls(message)
                except Exception:  # noqa: BLE001 - constructors with other signatures
                    error = None
            raise error if error is not None else SolutionError(name + ": " + message)
        return _wire_decode(reply["ok"], lambda tag, body: Ref({tag: body}))

    def wire_of(value):
        if type(value) is Ref:
            return value.wire
        raise TypeError("only plain values and the solution's own objects can be passed to the solution, "
                        f"not {type(value).__name__}")

    def enc(value):
        return _wire_encode(value, wire_of)

    def plain(ref):
        value = rpc("get", ref.wire)
        if type(value) is Ref:
            kind = value.wire.get("H", [0, "object"])[1]
            give_up("tampered", f"an object of class {kind} from the solution was compared or converted: only "
                    "plain values (numbers, strings, bytes and containers of them) can be judged")
        return value

    class Ref:
        """An object of the solution. Calls, attribute and item reads, iteration, len() and str() are forwarded to
        it (their results are values the solution chooses, like return values); comparisons, truth, hashing and
        arithmetic need its plain value, so they are evaluated here."""

        __slots__ = ("wire",)

        def __init__(self, wire):
            self.wire = wire

        def __call__(self, *args, **kwargs):
            return rpc("call", self.wire, args=[enc(a) for a in args],
                       kwargs=[[k, enc(v)] for k, v in kwargs.items()])

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return rpc("getattr", self.wire, name=name)

        def __iter__(self):
            it = rpc("iter", self.wire)
            return RefIterator(it) if type(it) is Ref else iter(it)

        def __getitem__(self, key):
            return rpc("getitem", self.wire, key=enc(key))

        def __len__(self):
            n = rpc("len", self.wire)
            return n if type(n) is int else give_up("tampered", "len() of a solution object is not an int")

        def __contains__(self, item):
            value = rpc("get", self.wire)
            if type(value) is not Ref:
                return item in value
            return any(x is item or x == item for x in self)  # as Python does for iterables, compared here

        def __str__(self):
            text = rpc("str", self.wire)
            return text if type(text) is str else give_up("tampered", "str() of a solution object is not a str")

        def __repr__(self):
            return f"<solution object {json.dumps(self.wire)}>"

    class RefIterator:
        def __init__(self, ref):
            self.ref = ref

        def __iter__(self):
            return self

        def __next__(self):
            return rpc("next", self.ref.wire)

    def on_plain(fn, reflected=False):
        if reflected:
            return lambda self, other: fn(other, plain(self))
        return lambda self, *other: fn(plain(self), *other)

    for name in ("eq", "ne", "lt", "le", "gt", "ge", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow"):
        setattr(Ref, f"__{name}__", on_plain(getattr(operator, name)))
    for name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow"):
        setattr(Ref, f"__r{name}__", on_plain(getattr(operator, name), reflected=True))
    for name, fn in (("hash", hash), ("bool", bool), ("int", int), ("float", float),
                     ("index", operator.index), ("neg", operator.neg), ("pos", operator.pos), ("abs", abs)):
        setattr(Ref, f"__{name}__", on_plain(fn))

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    for name in names:
        namespace[name] = Ref({"N": name})
    try:
        exec(compile(test_src, "test.py", "exec"), namespace)  # noqa: S102 - running the test is the judge's job
        verdict = ("pass", "")
    except Unjudgeable:
        verdict = ("gone", "")
    except BaseException as e:  # noqa: BLE001 - AssertionError or the solution's exception: the test failed
        try:
            verdict = ("fail", f"{type(e).__name__}: {e}"[:300])
        except BaseException:  # noqa: BLE001
            verdict = ("fail", type(e).__name__)
    if spoiled:
        verdict = spoiled[0]
    send({"op": "verdict", "verdict": verdict[0], "detail": verdict[1]})


@functools.cache
def _harness(*fns: Any) -> str:
    """Source of ``fns`` to run in a sandbox (the same code the verifier runs here)."""
    return "\n\n".join(textwrap.dedent(inspect.getsource(f)) for f in fns) + "\n\n"


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


@dataclasses.dataclass(frozen=True)
class _Outcome:
    passed: bool
    status: str  # passed, failed, exited_early, tampered, or a sandbox status (timeout, runtime_error, ...)
    detail: str = ""


def _gone_status(solution: SandboxResult) -> str:
    """Why the solution stopped answering, from its sandbox result."""
    if solution.status in ("ok", "killed"):  # exit status 0 or a signal before the tests were answered
        return "exited_early"
    return solution.status


@dataclasses.dataclass(frozen=True)
class CodeVerifier:
    """Runs the response's last Python code block against ``record["tests"]`` in the sandbox.

    Each test is ``{"input": stdin, "output": expected_stdout}`` (outputs compared here after stripping trailing
    whitespace per line and trailing blank lines), ``{"assert": "assert f(2) == 4"}`` or a plain string: test code
    (asserts, helper functions, HumanEval's ``check(candidate)``, loops ...) run by a separate judge sandbox against
    the solution's objects (see the comment above ``extract_code``). Values cross as plain data: numbers, strings,
    bytes, lists, tuples, dicts, sets, Fraction, Decimal (namedtuples, ``collections`` mappings and subclasses that
    keep their base's equality arrive as their base type); other objects can be called, iterated and have their
    attributes read, but not compared.

    Score = fraction of tests passed. Status: ``error`` if a sandbox failed or a test is malformed, else
    ``tampered`` (a solution object that overrides comparison or truth was judged, or a malformed reply),
    ``exited_early`` (the solution exited or was killed before answering), ``timeout``, else ``ok``. Tests run
    concurrently on ``max_workers`` threads (each in its own sandbox processes); ``stop_on_timeout`` skips the
    remaining tests (scored as failed) after a timeout. ``max_message_bytes`` caps one reply of the solution.
    """

    name: str = "code"
    sandbox: SandboxConfig = dataclasses.field(default_factory=SandboxConfig)
    max_workers: int = 2
    stop_on_timeout: bool = True
    max_message_bytes: int = 1 << 20

    def applies(self, record: Mapping[str, Any]) -> bool:
        routed = _routed(record, self.name)
        if routed is not None:
            return routed and bool(record.get("tests"))
        return bool(record.get("tests"))

    def _run_one(self, code: str, test: Any) -> _Outcome:
        if isinstance(test, str):
            test = {"assert": test}
        try:
            if "assert" in test:
                return self._run_assert(code, str(test["assert"]))
            r = run_python(code, str(test.get("input", "")), self.sandbox)
        except SandboxUnavailable as e:
            return _Outcome(False, "error", str(e))
        if r.status != "ok":
            return _Outcome(False, r.status, r.detail)
        same = not r.stdout_truncated and _normalize_output(r.stdout) == _normalize_output(str(test.get("output", "")))
        return _Outcome(same, "passed" if same else "failed")

    def _run_assert(self, code: str, test_src: str) -> _Outcome:
        try:
            names = _solution_names(ast.parse(test_src), code)
        except (SyntaxError, ValueError) as e:
            return _Outcome(False, "error", f"the test does not parse: {e}")
        judge_cfg = dataclasses.replace(self.sandbox, allow_subprocess=False, timeout_s=2 * self.sandbox.timeout_s + 2)
        judge_out, judge_w = os.pipe()  # judge -> verifier: requests, then the verdict
        judge_r, judge_in = os.pipe()  # verifier -> judge: checked replies
        solution_r, solution_in = os.pipe()  # verifier -> solution: requests
        solution_out, solution_w = os.pipe()  # solution -> verifier: replies
        ours = [judge_out, judge_in, solution_in, solution_out]
        solution = code + "\n\n" + _harness(_wire_encode, _wire_decode, _solution_serve) + (
            f"_solution_serve(globals(), {solution_r}, {solution_w})\n")
        judge = _harness(_wire_encode, _wire_decode, _judge_main) + (
            f"_judge_main({test_src!r}, {names!r}, {judge_r}, {judge_w})\n")
        cancel = threading.Event()
        results: dict[str, SandboxResult | Exception] = {}

        def run(key: str, program: str, cfg: SandboxConfig, fds: tuple[int, int], stop: threading.Event | None):
            try:
                results[key] = run_python(program, "", cfg, pass_fds=fds, cancel=stop)
            except Exception as e:  # noqa: BLE001 - reported as the test's error below
                results[key] = e

        threads = [threading.Thread(target=run, args=("solution", solution, self.sandbox, (solution_r, solution_w),
                                                      cancel), daemon=True),
                   threading.Thread(target=run, args=("judge", judge, judge_cfg, (judge_r, judge_w), None),
                                    daemon=True)]
        for t in threads:
            t.start()
        verdict = None
        try:
            verdict = _relay(_LineReader(judge_out, self.max_message_bytes), judge_in, solution_in,
                             _LineReader(solution_out, self.max_message_bytes))
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
                return _Outcome(False, "error", f"{type(r).__name__}: {r}"[:300])
        assert isinstance(sol, SandboxResult) and isinstance(jud, SandboxResult)
        if verdict is None:  # the judge ended without a verdict: its own limits, or a broken test harness
            status = jud.status if jud.status in ("timeout", "memory") else "error"
            return _Outcome(False, status, "judge: " + (jud.detail or _last_line(jud.stderr)))
        kind, detail = str(verdict.get("verdict")), str(verdict.get("detail", ""))
        if kind == "pass":
            return _Outcome(True, "passed")
        if kind == "gone":
            return _Outcome(False, _gone_status(sol), sol.detail or _last_line(sol.stderr))
        return _Outcome(False, "failed" if kind == "fail" else kind, detail)

    def __call__(self, record: Mapping[str, Any], response: str) -> VerifierResult:
        if not self.applies(record):
            return _not_applicable(self.name)
        code = extract_code(response)
        if code is None:
            return VerifierResult(0.0, "parse_error", detail="no ```python code block", name=self.name)
        tests = list(record["tests"])
        results: list[_Outcome | None] = [None] * len(tests)
        stop = threading.Event()

        def work(i: int) -> None:
            if stop.is_set():
                return
            results[i] = outcome = self._run_one(code, tests[i])
            if self.stop_on_timeout and outcome.status == "timeout":
                stop.set()

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, self.max_workers)) as pool:
            list(pool.map(work, range(len(tests))))
        statuses = [r.status if r is not None else "skipped" for r in results]
        passed = sum(1 for r in results if r is not None and r.passed)
        status: VerifierStatus = "ok"
        for s in ("error", "tampered", "exited_early", "timeout"):
            if s in statuses:
                status = s  # type: ignore[assignment]
                break
        counts: dict[str, int] = {}
        for s in statuses:
            counts[s] = counts.get(s, 0) + 1
        first = next((r.detail for r in results if r is not None and not r.passed and r.detail), "")
        detail = f"{passed}/{len(tests)} passed; {counts}" + (f"; {first[:200]}" if first else "")
        return VerifierResult(passed / len(tests), status, detail=detail, name=self.name)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


# ---------------------------------------------------------------------------------------------------------------------
# Format / instruction checks
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FormatVerifier:
    """Format and instruction-following checks; score = fraction of checks passed (``mode="all"``: 1 iff all pass).

    Fixed checks (constructor): ``require_think`` (a closed ``<think>...</think>`` block before the answer),
    ``require_answer`` (an ``Answer:`` marker or ``\\boxed{}`` after the thinking), ``max_chars``.
    Per-prompt checks from ``record["constraints"]``: ``must_contain`` / ``must_not_contain`` (lists of words or
    phrases, case-insensitive, word boundaries), ``max_words``, ``min_words``, ``max_chars`` (counted on the text after
    the thinking). Applies when it has a fixed check or the record has constraints (or routes to it).
    """

    name: str = "format"
    require_think: bool = False
    require_answer: bool = False
    max_chars: int | None = None
    mode: Literal["fraction", "all"] = "fraction"

    def _fixed(self) -> bool:
        return self.require_think or self.require_answer or self.max_chars is not None

    def applies(self, record: Mapping[str, Any]) -> bool:
        routed = _routed(record, self.name)
        if routed is not None:
            return routed
        return self._fixed() or bool(record.get("constraints"))

    def __call__(self, record: Mapping[str, Any], response: str) -> VerifierResult:
        if not self.applies(record):
            return _not_applicable(self.name)
        checks: list[tuple[str, bool]] = []
        final = _final_section(response)
        body = final if final is not None else ""
        if self.require_think:
            m = re.match(r"\s*<think>(.*?)</think>", response, re.DOTALL)
            checks.append(("think block", bool(m and m.group(1).strip()) and response.count("<think>") == 1))
        if self.require_answer:
            boxed = _boxed_contents(body) or []
            checks.append(("answer present", bool(_ANSWER_RE.search(body) or boxed)))
        if self.max_chars is not None:
            checks.append((f"<= {self.max_chars} chars", len(response) <= self.max_chars))
        cons = record.get("constraints") or {}
        words = re.findall(r"\w+", body)
        for w in cons.get("must_contain", []):
            checks.append((f"contains {w!r}", _contains(body, w)))
        for w in cons.get("must_not_contain", []):
            checks.append((f"does not contain {w!r}", not _contains(body, w)))
        if "max_words" in cons:
            checks.append((f"<= {cons['max_words']} words", len(words) <= int(cons["max_words"])))
        if "min_words" in cons:
            checks.append((f">= {cons['min_words']} words", len(words) >= int(cons["min_words"])))
        if "max_chars" in cons:
            checks.append((f"<= {cons['max_chars']} chars", len(body) <= int(cons["max_chars"])))
        if not checks:
            return VerifierResult(1.0, "ok", detail="no checks", name=self.name)
        passed = [ok for _, ok in checks]
        score = float(all(passed)) if self.mode == "all" else sum(passed) / len(passed)
        failed = [n for n, ok in checks if not ok]
        return VerifierResult(score, "ok", detail="failed: " + ", ".join(failed) if failed else "all passed",
                              name=self.name)


def _contains(text: str, phrase: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", text, re.IGNORECASE) is not None


# ---------------------------------------------------------------------------------------------------------------------
# Multi-task reward
# ---------------------------------------------------------------------------------------------------------------------

_STATUS_PRIORITY = ("error", "tampered", "exited_early", "timeout", "parse_error")


@dataclasses.dataclass(frozen=True)
class CombinedReward:
    """Total reward of one response and its parts.

    ``total`` = sum over applying verifiers of ``weight * score`` (divided by the applying weights' sum when
    ``normalize``). ``components``: score per applying verifier; ``statuses``: status per applying verifier.
    ``status``: ``ok`` if every applying verifier was ok, else the most severe of their statuses
    (error > tampered > exited_early > timeout > parse_error), ``no_verifier`` when none applies (``total`` is then 0 and ``applies`` False:
    the sample has no reward and should not be trained on).
    """

    total: float
    components: dict[str, float]
    statuses: dict[str, str]
    status: str
    applies: bool


def combine_rewards(
    results: Mapping[str, VerifierResult] | Sequence[VerifierResult],
    weights: Mapping[str, float] | None = None,
    *,
    normalize: bool = False,
) -> CombinedReward:
    """Weighted multi-task reward over the verifiers that apply (non-applying ones are left out, not scored 0).

    ``results``: name -> result (or a sequence of results, keyed by ``result.name``). ``weights``: name -> weight,
    default 1 for a name it does not list.
    """
    items = dict(results) if isinstance(results, Mapping) else {r.name: r for r in results}
    weights = weights or {}
    applying = {k: r for k, r in items.items() if r.applies}
    if not applying:
        return CombinedReward(0.0, {}, {}, "no_verifier", False)
    w = {k: float(weights.get(k, 1.0)) for k in applying}
    total = sum(w[k] * float(r.score) for k, r in applying.items())
    if normalize:
        denom = sum(w.values())
        total = total / denom if denom > 0 else 0.0
    statuses = {k: r.status for k, r in applying.items()}
    status = "ok"
    for s in _STATUS_PRIORITY:
        if s in statuses.values():
            status = s
            break
    return CombinedReward(total, {k: float(r.score) for k, r in applying.items()}, statuses, status, True)


def score_response(
    record: Mapping[str, Any],
    response: str,
    verifiers: Mapping[str, Verifier] | Sequence[Verifier],
    weights: Mapping[str, float] | None = None,
    *,
    normalize: bool = False,
) -> CombinedReward:
    """Run every verifier that applies to ``record`` on ``response`` and combine them (see :func:`combine_rewards`).

    A verifier that raises is reported as ``error`` with score 0 (the loop keeps going).
    """
    vs = dict(verifiers) if isinstance(verifiers, Mapping) else {v.name: v for v in verifiers}
    results: dict[str, VerifierResult] = {}
    for name, v in vs.items():
        if not v.applies(record):
            continue
        try:
            results[name] = v(record, response)
        except Exception as e:  # noqa: BLE001 - a broken verifier must not stop the RL loop
            results[name] = VerifierResult(0.0, "error", detail=f"{type(e).__name__}: {e}"[:200], name=name)
    return combine_rewards(results, weights, normalize=normalize)


def default_verifiers(sandbox: SandboxConfig | None = None) -> dict[str, Verifier]:
    """The standard set, keyed by name: exact, steps (reference trace), math, code (with ``sandbox``), format."""
    return {
        "exact": ExactAnswerVerifier(),
        "steps": StepsVerifier(),
        "math": MathVerifier(),
        "code": CodeVerifier(sandbox=sandbox or SandboxConfig()),
        "format": FormatVerifier(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# DAPO soft overlong penalty
# ---------------------------------------------------------------------------------------------------------------------


def overlong_penalty(
    length: int | np.ndarray, max_len: int, buffer_len: int, factor: float = 1.0
) -> float | np.ndarray:
    """DAPO soft overlong penalty ``-factor * clip((length - (max_len - buffer_len)) / buffer_len, 0, 1)``.

    ``length``: response length(s) in tokens, scalar or any-shape array; returns the same shape (<= 0), to be added to
    the reward. Zero up to ``max_len - buffer_len`` tokens, then linear down to ``-factor`` at ``max_len``.
    """
    if buffer_len <= 0 or buffer_len > max_len:
        raise ValueError(f"buffer_len must be in (0, max_len={max_len}], got {buffer_len}")
    x = (np.asarray(length, dtype=np.float64) - (max_len - buffer_len)) / buffer_len
    out = -factor * np.clip(x, 0.0, 1.0)
    return float(out) if np.ndim(out) == 0 else out

