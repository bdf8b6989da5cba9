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
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from motif_jax.data.template import split_response
from motif_jax.rl.config import SandboxConfig
from motif_jax.rl.sandbox import SandboxResult, run_python

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

VerifierStatus = Literal["ok", "parse_error", "timeout", "error", "not_applicable"]


@dataclasses.dataclass(frozen=True)
class VerifierResult:
    """One verifier's verdict on one response.

    ``score``: reward in [0, 1]. ``status``: ``ok`` (the response was checked; the score says how well it did),
    ``parse_error`` (no single answer / code could be extracted), ``timeout`` (the check ran out of time),
    ``error`` (the verifier itself failed), ``not_applicable``. ``detail``: a short human-readable reason.
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
        from math_verify import parse, verify  # noqa: PLC0415 - heavy import (sympy), only when used
        from math_verify.errors import TimeoutException  # noqa: PLC0415

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


@dataclasses.dataclass(frozen=True)
class CodeVerifier:
    """Runs the response's last Python code block against ``record["tests"]`` in the sandbox.

    Each test is ``{"input": stdin, "output": expected_stdout}`` (outputs compared after stripping trailing
    whitespace per line and trailing blank lines), ``{"assert": "assert f(2) == 4"}`` or a plain string (an
    assert-style snippet appended to the solution; it passes when the program exits with status 0).
    Score = fraction of tests passed; status ``timeout`` if any test timed out, ``error`` if the sandbox failed,
    ``parse_error`` if there is no code block, else ``ok``. Tests run concurrently on ``max_workers`` threads (each
    in its own sandbox process); ``stop_on_timeout`` skips the remaining tests (scored as failed) after a timeout.
    """

    name: str = "code"
    sandbox: SandboxConfig = dataclasses.field(default_factory=SandboxConfig)
    max_workers: int = 2
    stop_on_timeout: bool = True

    def applies(self, record: Mapping[str, Any]) -> bool:
        routed = _routed(record, self.name)
        if routed is not None:
            return routed and bool(record.get("tests"))
        return bool(record.get("tests"))

    def _run_one(self, code: str, test: Any) -> tuple[bool, SandboxResult]:
        if isinstance(test, str):
            test = {"assert": test}
        if "assert" in test:
            r = run_python(code + "\n\n" + str(test["assert"]) + "\n", "", self.sandbox)
            return r.status == "ok", r
        r = run_python(code, str(test.get("input", "")), self.sandbox)
        passed = r.status == "ok" and not r.stdout_truncated
        passed = passed and _normalize_output(r.stdout) == _normalize_output(str(test.get("output", "")))
        return passed, r

    def __call__(self, record: Mapping[str, Any], response: str) -> VerifierResult:
        if not self.applies(record):
            return _not_applicable(self.name)
        code = extract_code(response)
        if code is None:
            return VerifierResult(0.0, "parse_error", detail="no ```python code block", name=self.name)
        tests = list(record["tests"])
        results: list[tuple[bool, SandboxResult] | None] = [None] * len(tests)
        stop = threading.Event()

        def work(i: int) -> None:
            if stop.is_set():
                return
            results[i] = self._run_one(code, tests[i])
            if self.stop_on_timeout and results[i][1].status == "timeout":  # type: ignore[index]
                stop.set()

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, self.max_workers)) as pool:
            list(pool.map(work, range(len(tests))))
        statuses = [r[1].status if r is not None else "skipped" for r in results]
        passed = sum(1 for r in results if r is not None and r[0])
        score = passed / len(tests)
        if any(s == "error" for s in statuses):
            status: VerifierStatus = "error"
        elif any(s == "timeout" for s in statuses):
            status = "timeout"
        else:
            status = "ok"
        counts: dict[str, int] = {}
        for s in statuses:
            counts[s] = counts.get(s, 0) + 1
        return VerifierResult(score, status, detail=f"{passed}/{len(tests)} passed; {counts}", name=self.name)


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

_STATUS_PRIORITY = ("error", "timeout", "parse_error")


@dataclasses.dataclass(frozen=True)
class CombinedReward:
    """Total reward of one response and its parts.

    ``total`` = sum over applying verifiers of ``weight * score`` (divided by the applying weights' sum when
    ``normalize``). ``components``: score per applying verifier; ``statuses``: status per applying verifier.
    ``status``: ``ok`` if every applying verifier was ok, else the most severe of their statuses
    (error > timeout > parse_error), ``no_verifier`` when none applies (``total`` is then 0 and ``applies`` False:
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

