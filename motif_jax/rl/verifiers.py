"""Verifiable rewards: answer checks, math equivalence, code tests in the sandbox, format/instruction checks.

A verifier is a callable ``(record, response) -> VerifierResult`` with a ``name`` and an ``applies(record)`` test.
``record`` is the prompt record of the task (a mapping; the fields each verifier reads are listed on it) and
``response`` the model's full text. ``VerifierResult.score`` is in [0, 1]; ``applies=False`` means "this verifier has
nothing to say about this prompt" and such results are *left out* of the combined reward, never scored 0.

Routing: a record may name its verifiers explicitly (``record["verifiers"] = ["math", "format"]``); otherwise each
verifier decides from the record's fields (``answer``/``answer_type``/``task``, ``tests``, ``constraints``).

The answer verifiers (``exact``, ``steps``, ``math``) score with the answer checks of ``motif_jax.data.answers``
(extraction, its guards against reward hacking, the synthetic tasks' integer check, math_verify): the same checks
that give SFT's and RL's evaluation verdicts, so a reward of 1 and a correct evaluation mean the same thing.

Code tests cannot be passed from inside the solution: outputs are compared by the verifier, asserts are evaluated
by a separate judge sandbox on plain values (``motif_jax.rl.code_judge``), so ``sys.exit(0)``, ``os._exit(0)``,
``atexit`` handlers and objects whose ``__eq__`` always returns True all score 0.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from motif_jax.data.answers import (
    ANSWER_MARKER_RE,
    AnswerVerdict,
    answer_kind,
    boxed_contents,
    check_exact,
    check_math,
    check_steps,
    extract_answer,
    final_section,
    normalize_answer,
    reference_reasoning,
)
from motif_jax.rl.code_judge import Outcome, run_assert_test
from motif_jax.rl.config import SandboxConfig
from motif_jax.rl.sandbox import SandboxUnavailable, run_python

__all__ = [
    "CodeVerifier",
    "CombinedReward",
    "ExactAnswerVerifier",
    "FormatVerifier",
    "MathVerifier",
    "StepsVerifier",
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


def _scored(verdict: AnswerVerdict, name: str) -> VerifierResult:
    return VerifierResult(float(verdict.correct), verdict.status, detail=verdict.detail, name=name)


# ---------------------------------------------------------------------------------------------------------------------
# Answers (checks in motif_jax.data.answers)
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExactAnswerVerifier:
    """Exact match of the extracted final answer against ``record["answer"]`` (int or str), after normalisation;
    the synthetic tasks' integer check for their records (``data.answers.check_exact``).

    Applies to records with an ``answer`` whose ``answer_type`` is ``exact`` (the default unless ``task == "math"``).
    Score 1 on a match, 0 otherwise; ``parse_error`` when no single answer can be extracted.
    """

    name: str = "exact"

    def applies(self, record: Mapping[str, Any]) -> bool:
        routed = _routed(record, self.name)
        if routed is not None:
            return routed and "answer" in record
        return "answer" in record and answer_kind(record) == "exact"

    def __call__(self, record: Mapping[str, Any], response: str) -> VerifierResult:
        if not self.applies(record):
            return _not_applicable(self.name)
        return self.check(str(record["answer"]), response, task=record.get("task"))

    def check(self, reference: str, response: str, *, task: str | None = None) -> VerifierResult:
        """The answer check alone (no routing): ``response``'s extracted answer against ``reference`` (for a
        synthetic ``task``, as an integer)."""
        return _scored(check_exact(reference, response, task=task), self.name)


class StepsVerifier:
    """Reference-trace check for tasks whose aligned reasoning is deterministic (the synthetic tasks).

    Score 1 only when the response's reasoning reproduces every step line of the record's reference reasoning
    (the last assistant turn's ``reasoning``) *and* the final answer is exact (``data.answers.check_steps``). An
    answer-only verifier also rewards right answers reached through wrong steps; with a small policy those are common
    (a step that reads the wrong digit, an answer that does not follow from the steps), and reinforcing them teaches
    inconsistent reasoning. Applies to records with a reference reasoning whose provenance style is ``aligned``.
    """

    name: str = "steps"

    def applies(self, record: Mapping[str, Any]) -> bool:
        routed = _routed(record, self.name)
        has_reference = bool(reference_reasoning(record)) and "answer" in record
        if routed is not None:
            return routed and has_reference
        return has_reference and (record.get("provenance") or {}).get("style") == "aligned"

    def __call__(self, record: Mapping[str, Any], response: str) -> VerifierResult:
        if not self.applies(record):
            return _not_applicable(self.name)
        return _scored(check_steps(record, response), self.name)


@dataclasses.dataclass(frozen=True)
class MathVerifier:
    """Mathematical equivalence of the extracted answer and ``record["answer"]`` with ``math_verify``
    (``data.answers.check_math``).

    Applies to records with an ``answer`` and ``answer_type == "math"`` (or ``task == "math"``). The answer is
    extracted first (so hedged and multi-answer responses fail before math_verify can match one of several
    candidates), then both sides are parsed and compared ("\\frac{1}{2}" == "0.5"). ``math_verify`` guards its own run
    time with ``signal.alarm``, which only works in the main thread; from other threads it is called without a time
    limit (run such threads in worker processes if inputs can be hostile).
    """

    name: str = "math"
    timeout_s: int = 5
    float_rounding: int = 6

    def applies(self, record: Mapping[str, Any]) -> bool:
        routed = _routed(record, self.name)
        if routed is not None:
            return routed and "answer" in record
        return "answer" in record and answer_kind(record) == "math"

    def __call__(self, record: Mapping[str, Any], response: str) -> VerifierResult:
        if not self.applies(record):
            return _not_applicable(self.name)
        verdict = check_math(str(record["answer"]), response, timeout_s=self.timeout_s,
                             float_rounding=self.float_rounding)
        return _scored(verdict, self.name)


# ---------------------------------------------------------------------------------------------------------------------
# Code (tests in the sandbox)
#
# Input/output tests: the solution runs with the test's stdin and the verifier compares its stdout here.
# Assert-style tests: two sandboxes per test, the solution's and a judge's (motif_jax.rl.code_judge).
# ---------------------------------------------------------------------------------------------------------------------

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str | None:
    """The last fenced code block (```python ...``` or an untagged ```...```) after the thinking; None if none."""
    final = final_section(response)
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


@dataclasses.dataclass(frozen=True)
class CodeVerifier:
    """Runs the response's last Python code block against ``record["tests"]`` in the sandbox.

    Each test is ``{"input": stdin, "output": expected_stdout}`` (outputs compared here after stripping trailing
    whitespace per line and trailing blank lines), ``{"assert": "assert f(2) == 4"}`` or a plain string: test code
    (asserts, helper functions, HumanEval's ``check(candidate)``, loops ...) run by a separate judge sandbox against
    the solution's objects (``motif_jax.rl.code_judge``). Values cross as plain data: numbers, strings,
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

    def _run_one(self, code: str, test: Any) -> Outcome:
        if isinstance(test, str):
            test = {"assert": test}
        try:
            if "assert" in test:
                return run_assert_test(code, str(test["assert"]), self.sandbox, self.max_message_bytes)
            r = run_python(code, str(test.get("input", "")), self.sandbox)
        except SandboxUnavailable as e:
            return Outcome(False, "error", str(e))
        if r.status != "ok":
            return Outcome(False, r.status, r.detail)
        same = not r.stdout_truncated and _normalize_output(r.stdout) == _normalize_output(str(test.get("output", "")))
        return Outcome(same, "passed" if same else "failed")

    def __call__(self, record: Mapping[str, Any], response: str) -> VerifierResult:
        if not self.applies(record):
            return _not_applicable(self.name)
        code = extract_code(response)
        if code is None:
            return VerifierResult(0.0, "parse_error", detail="no ```python code block", name=self.name)
        tests = list(record["tests"])
        results: list[Outcome | None] = [None] * len(tests)
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
        final = final_section(response)
        body = final if final is not None else ""
        if self.require_think:
            m = re.match(r"\s*<think>(.*?)</think>", response, re.DOTALL)
            checks.append(("think block", bool(m and m.group(1).strip()) and response.count("<think>") == 1))
        if self.require_answer:
            boxed = boxed_contents(body) or []
            checks.append(("answer present", bool(ANSWER_MARKER_RE.search(body) or boxed)))
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

