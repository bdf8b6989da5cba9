"""Answer checks: is the final answer of a generated turn the record's reference answer?

One verdict per record, used by SFT's held-out evaluation (``train.evaluate.default_checker``), RL's evaluation
(``rl.loop.make_checker``) and RL's answer rewards (the ``exact``, ``steps`` and ``math`` verifiers), so one
checkpoint scores the same whichever program evaluates it. Pure functions of text: no sandbox, no model.

Routing (:func:`answer_check`), for a record with an ``answer``:

1. its ``verifiers`` list (written by ``--task-verifiers`` or by the record itself): the first of ``exact``,
   ``steps``, ``math`` it names; a list that names none of them (``code``, ``format`` only) has no answer check;
2. else its ``answer_type``;
3. else ``math`` for ``task == "math"``, else ``exact``.

The checks:

* ``exact``: the extracted final answer equals the reference after :func:`normalize_answer`. For the synthetic task
  families (:data:`INTEGER_TASKS`) it is their own check instead: the last ``Answer:`` line compared as an integer
  (:func:`check_answer`).
* ``math``: mathematical equivalence with ``math_verify`` ("1/2" == "0.5" == "\\frac{2}{4}").
* ``steps``: the ``exact`` check plus every step line of the record's reference reasoning reproduced in the thinking.
  Evaluation checkers only see the text after the thinking, so there ``steps`` records are checked on their answer.

Answer extraction and its guards against reward hacking (``exact`` outside the synthetic tasks, ``math``):

* only the text after the last ``</think>`` counts (an unfinished think block has no answer: ``parse_error``);
* candidates are the contents of every ``\\boxed{...}`` and the text after the *last* ``Answer:`` marker (to the end
  of its line); if several candidates disagree the response is ambiguous and scores 0 (``parse_error``), so
  "boxing everything" never passes;
* a candidate that lists alternatives ("3 or 4", "3 \\lor 4", "either ...", "3; 4") or has more comma-separated
  items than the reference is refused.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Mapping
from typing import Any, Literal

from motif_jax.data.template import split_response

__all__ = [
    "ANSWER_CHECKS",
    "ANSWER_MARKER_RE",
    "INTEGER_TASKS",
    "AnswerVerdict",
    "answer_check",
    "answer_correct",
    "answer_kind",
    "answer_line",
    "boxed_contents",
    "check_answer",
    "check_exact",
    "check_integer",
    "check_math",
    "check_record",
    "check_steps",
    "extract_answer",
    "final_section",
    "normalize_answer",
    "reference_reasoning",
]

ANSWER_CHECKS = ("exact", "steps", "math")
"""Verifier names whose verdict is an answer check (the others, ``code`` and ``format``, need rl/)."""

INTEGER_TASKS = ("addition", "linear")
"""Tasks whose answers are integers, checked on their last ``Answer:`` line: the synthetic task families."""

AnswerStatus = Literal["ok", "parse_error", "timeout", "error"]


@dataclasses.dataclass(frozen=True)
class AnswerVerdict:
    """One answer check of one response.

    ``correct``: the answer matches the reference. ``status``: ``ok`` (an answer was checked), ``parse_error`` (no
    single answer could be extracted, or it lists alternatives), ``timeout`` (math_verify ran out of time),
    ``error`` (the reference itself cannot be parsed). ``detail``: a short human-readable reason.
    """

    correct: bool
    status: AnswerStatus
    detail: str = ""


# ---------------------------------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------------------------------


def answer_kind(record: Mapping[str, Any]) -> str:
    """The answer check of a record that names no ``verifiers``: its ``answer_type``, else math for task 'math',
    else exact."""
    kind = record.get("answer_type")
    if kind:
        return str(kind)
    return "math" if record.get("task") == "math" else "exact"


def answer_check(record: Mapping[str, Any]) -> str | None:
    """Which answer check (``exact``, ``steps``, ``math``) gives ``record``'s verdict; None when it has no
    ``answer`` or is routed only to other verifiers (code tests, format checks). See the module docstring."""
    if "answer" not in record:
        return None
    names = record.get("verifiers")
    if names is not None:
        return next((n for n in names if n in ANSWER_CHECKS), None)
    kind = answer_kind(record)
    return kind if kind in ANSWER_CHECKS else None


def check_record(record: Mapping[str, Any], response: str, *, check: str | None = None) -> AnswerVerdict:
    """``record``'s answer check (``check``, default :func:`answer_check`) on ``response``.

    ``response``: the whole generated turn (the thinking is skipped) or only its text after the thinking. Raises
    ValueError for a record without an answer check.
    """
    check = check or answer_check(record)
    if check not in ANSWER_CHECKS:
        raise ValueError(f"record {record.get('id', '?')!r} (task {record.get('task')!r}) has no answer check: it "
                         f"needs an 'answer' and a route to one of {ANSWER_CHECKS} (its verifiers: "
                         f"{record.get('verifiers')}); code and format checks are scored by the RL verifiers")
    if check == "math":
        return check_math(str(record["answer"]), response)
    if check == "steps":
        return check_steps(record, response)
    return check_exact(str(record["answer"]), response, task=record.get("task"))


def answer_correct(record: Mapping[str, Any], content: str) -> bool:
    """The evaluation verdict: is ``content`` (a generated turn's text after the thinking) right for ``record``?

    The steps of a ``steps`` record are in the thinking, which ``content`` does not hold: its answer is checked.
    Raises ValueError for a record without an answer check (see :func:`answer_check`).
    """
    check = answer_check(record)
    return check_record(record, content, check="exact" if check == "steps" else check).correct


# ---------------------------------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------------------------------

ANSWER_MARKER_RE = re.compile(r"answer\**\s*:", re.IGNORECASE)  # "Answer:", "**Answer**:", "answer :"
_ALTERNATIVES_RE = re.compile(r"(\bor\b|\\lor\b|\\vee\b|\\text\{\s*or\s*\}|\beither\b|;|\|\|)", re.IGNORECASE)


def final_section(response: str) -> str | None:
    """The part of the response that may carry the answer: after the last ``</think>``; None if still thinking."""
    close = response.rfind("</think>")
    if close >= 0:
        return response[close + len("</think>") :]
    if "<think>" in response:
        return None
    return response


def boxed_contents(text: str) -> list[str] | None:
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
    final = final_section(response)
    if final is None:
        return None, "unfinished <think> block"
    boxed = boxed_contents(final)
    if boxed is None:
        return None, "unbalanced \\boxed{"
    candidates = [b.strip() for b in boxed]
    markers = list(ANSWER_MARKER_RE.finditer(final))
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


def _single_answer(reference: str, response: str) -> tuple[str | None, AnswerVerdict | None]:
    """(the extracted, unhedged candidate, None) or (None, the parse_error verdict)."""
    cand, why = extract_answer(response)
    if cand is None:
        return None, AnswerVerdict(False, "parse_error", why)
    hedge = _hedged(cand, reference)
    if hedge:
        return None, AnswerVerdict(False, "parse_error", hedge)
    return cand, None


# ---------------------------------------------------------------------------------------------------------------------
# Exact answers; the synthetic tasks' integer check
# ---------------------------------------------------------------------------------------------------------------------


def check_exact(reference: str, response: str, *, task: str | None = None) -> AnswerVerdict:
    """Exact match of ``response``'s final answer and ``reference`` after normalisation; for a ``task`` in
    :data:`INTEGER_TASKS`, that task's own check (:func:`check_integer`)."""
    if task in INTEGER_TASKS:
        return check_integer(reference, response)
    cand, failed = _single_answer(reference, response)
    if failed is not None:
        return failed
    return AnswerVerdict(normalize_answer(cand) == normalize_answer(reference), "ok", f"answer {cand!r}")


_ANSWER_LINE_RE = re.compile(r"^\s*\**Answer\**\s*:\s*\**\s*(.+?)\s*\**\s*$", re.MULTILINE)


def answer_line(text: str) -> str | None:
    """The value of the last ``Answer: ...`` line of ``text`` (None if there is none)."""
    found = _ANSWER_LINE_RE.findall(text)
    return found[-1] if found else None


def _as_int(s: str) -> int | None:
    s = s.strip().rstrip(".").replace(",", "").replace(" ", "")
    if s.lower().startswith("x="):
        s = s[2:]
    try:
        return int(s)
    except ValueError:
        return None


def check_answer(task: str, response_text: str, answer: str) -> bool:
    """True iff the response's final ``Answer:`` line equals the reference ``answer``.

    ``addition`` and ``linear`` compare integers (``1,234`` and ``x = 5`` accepted); other tasks compare the
    whitespace-normalised strings. The whole text is searched (thinking included); :func:`check_integer` is the
    same comparison on the text after the thinking.
    """
    got = answer_line(response_text)
    if got is None:
        return False
    if task in INTEGER_TASKS:
        g, want = _as_int(got), _as_int(str(answer))
        return g is not None and g == want
    return " ".join(got.split()) == " ".join(str(answer).split())


def check_integer(reference: str, response: str) -> AnswerVerdict:
    """The synthetic tasks' check: the last ``Answer:`` line after the thinking, compared as an integer
    (``1,234``, ``x = 5``, ``**Answer:** 5`` accepted); a value that is not an integer is a parse error."""
    final = final_section(response)
    if final is None:
        return AnswerVerdict(False, "parse_error", "unfinished <think> block")
    got = answer_line(final)
    if got is None:
        return AnswerVerdict(False, "parse_error", "no final answer (expected a line 'Answer: <integer>')")
    value = _as_int(got)
    if value is None:
        return AnswerVerdict(False, "parse_error", f"answer {got!r} is not an integer")
    return AnswerVerdict(value == _as_int(reference), "ok", f"answer {got!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Reference steps (tasks whose aligned reasoning is deterministic)
# ---------------------------------------------------------------------------------------------------------------------


def reference_reasoning(record: Mapping[str, Any]) -> str:
    """The reasoning of the record's reference turn (its last message, if the assistant's), "" if none."""
    messages = record.get("messages") or []
    last = messages[-1] if messages else {}
    return (last.get("reasoning") or "") if last.get("role") == "assistant" else ""


def _step_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def check_steps(record: Mapping[str, Any], response: str) -> AnswerVerdict:
    """Correct only when ``response``'s thinking reproduces every step line of the record's reference reasoning
    *and* its answer passes the ``exact`` check (``response``: the whole generated turn, thinking included).

    An answer-only check also accepts right answers reached through wrong steps; with a small policy those are common
    (a step that reads the wrong digit, an answer that does not follow from the steps), and rewarding them teaches
    inconsistent reasoning.
    """
    reasoning, content = split_response(response)
    answer = check_exact(str(record["answer"]), content, task=record.get("task"))
    if answer.status != "ok":
        return answer
    want = _step_lines(reference_reasoning(record))
    got = _step_lines(reasoning or "")
    if got != want:
        # the first differing line (or the first missing / extra one)
        wrong = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        return AnswerVerdict(False, "ok", f"step {wrong + 1} differs from the reference")
    return answer


# ---------------------------------------------------------------------------------------------------------------------
# Math answers (math_verify)
# ---------------------------------------------------------------------------------------------------------------------


def _as_math(text: str) -> str:
    t = text.strip()
    return t if t.startswith("$") else f"${t}$"


def check_math(reference: str, response: str, *, timeout_s: int = 5, float_rounding: int = 6) -> AnswerVerdict:
    """Mathematical equivalence of ``response``'s final answer and ``reference`` with ``math_verify``.

    The answer is extracted with :func:`extract_answer` first (so hedged and multi-answer responses fail before
    math_verify can match one of several candidates), then both sides are parsed and compared ("\\frac{1}{2}" ==
    "0.5"). ``math_verify`` guards its own run time with ``signal.alarm``, which only works in the main thread; from
    other threads it is called without a time limit (run such threads in worker processes if inputs can be hostile).
    """
    # heavy imports (sympy), only when used
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    cand, failed = _single_answer(reference, response)
    if failed is not None:
        return failed
    timeout = timeout_s if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(_as_math(reference), parsing_timeout=timeout, raise_on_error=True)
        pred = parse(_as_math(cand), parsing_timeout=timeout, raise_on_error=True)
        if not gold:
            return AnswerVerdict(False, "error", f"cannot parse the reference {reference!r}")
        if not pred:
            return AnswerVerdict(False, "parse_error", f"cannot parse {cand!r}")
        ok = verify(gold, pred, float_rounding=float_rounding, timeout_seconds=timeout, raise_on_error=True)
    except TimeoutException:
        return AnswerVerdict(False, "timeout", "math_verify timed out")
    except Exception as e:  # noqa: BLE001 - math_verify/sympy raise many types on odd inputs
        return AnswerVerdict(False, "parse_error", f"{type(e).__name__}: {e}"[:200])
    return AnswerVerdict(bool(ok), "ok", f"answer {cand!r}")
