"""Synthetic verifiable tasks with traces in several styles: the miniature of the recipe's aligned-trace finding.

Task families (exact verifiers):
  ``addition``  multi-digit addition with carries; difficulty: operand digits in [min_digits, max_digits].
  ``linear``    multi-step linear equations such as ``2*(3*x+4)-5=33``; difficulty: ``steps`` operations applied to
                x (add, subtract, multiply), x with min_digits..max_digits digits.

Trace styles for the same problem:
  ``aligned``   short, fixed, compact steps a tiny byte-level model can execute one line at a time
                (addition: one line per digit from the right, ``a+b+carry=two-digit sum``; linear: undo one
                operation per line, ``inner=rhs-k=value``).
  ``teacher``   a "frontier teacher" trace: several steps merged per sentence, prose, different notation
                (place-value decomposition, implicit multiplication ``3x``).
  ``none``      the answer only.
Every response's content ends with the line ``Answer: <value>`` (:func:`motif_jax.data.answers.check_answer`).

Splits ``train`` / ``valid`` / ``test`` are decided by a hash of the problem (task + canonical problem string, with
``a+b`` and ``b+a`` merged), so held-out problems can never appear in training, whatever the seed or size. Generation is deterministic in the seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import urllib.parse
from typing import Any, Sequence

import numpy as np

# The tasks' answer check lives with every other answer check (data/answers.py, whose INTEGER_TASKS holds TASKS);
# importable from here as before.
from motif_jax.data.answers import answer_line as extract_answer  # noqa: F401
from motif_jax.data.answers import check_answer  # noqa: F401

TASKS = ("addition", "linear")
STYLES = ("aligned", "teacher", "none")
SPLITS = ("train", "valid", "test")
# Hash buckets (of 1000) per split: 5% test, 5% valid, 90% train.
_SPLIT_BUCKETS = {"test": (0, 50), "valid": (50, 100), "train": (100, 1000)}
SOURCE_NAME = "motif_jax.synthetic"


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """Difficulty knobs. ``min_digits`` / ``max_digits``: operand digits (addition) or digits of x (linear);
    ``steps``: number of operations applied to x (linear)."""

    min_digits: int = 1
    max_digits: int = 3
    steps: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits <= 18:
            raise ValueError(f"need 1 <= min_digits <= max_digits <= 18, got {self.min_digits}, {self.max_digits}")
        if not 1 <= self.steps <= 12:
            raise ValueError(f"need 1 <= steps <= 12, got {self.steps}")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem. ``key`` is its canonical string (identity for de-duplication and for the split hash)."""

    task: str
    key: str
    question: str
    answer: str
    data: tuple = ()

    @property
    def split(self) -> str:
        return split_of(self.task, self.canonical_key)

    @property
    def canonical_key(self) -> str:
        """The key with symmetric variants merged (``a+b`` and ``b+a``), so they always land in the same split."""
        if self.task == "addition":
            a, b = self.data
            return f"{min(a, b)}+{max(a, b)}"
        return self.key


def split_of(task: str, key: str) -> str:
    """``train`` / ``valid`` / ``test`` from a hash of the problem; stable across runs and machines."""
    bucket = int.from_bytes(hashlib.sha256(f"{task}:{key}".encode()).digest()[:8], "big") % 1000
    for name, (lo, hi) in _SPLIT_BUCKETS.items():
        if lo <= bucket < hi:
            return name
    raise AssertionError(bucket)


# ---------------------------------------------------------------------------------------------------------------------
# Problem generation
# ---------------------------------------------------------------------------------------------------------------------


def _rand_int_with_digits(rng: np.random.Generator, digits: int) -> int:
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(lo, 10**digits))


def _addition_problem(rng: np.random.Generator, d: Difficulty) -> Problem:
    a = _rand_int_with_digits(rng, int(rng.integers(d.min_digits, d.max_digits + 1)))
    b = _rand_int_with_digits(rng, int(rng.integers(d.min_digits, d.max_digits + 1)))
    return Problem("addition", f"{a}+{b}", f"What is {a}+{b}?", str(a + b), (a, b))


def _linear_problem(rng: np.random.Generator, d: Difficulty) -> Problem:
    x = _rand_int_with_digits(rng, int(rng.integers(d.min_digits, d.max_digits + 1)))
    ops: list[tuple[str, int]] = []
    for _ in range(d.steps):
        op = ("+", "-", "*")[int(rng.integers(3))]
        k = int(rng.integers(2, 10)) if op == "*" else _rand_int_with_digits(rng, int(rng.integers(1, 3))) or 1
        ops.append((op, k))
    exprs, _ = _linear_build(x, ops)
    rhs = _linear_value(x, ops)
    key = f"{exprs[-1]}={rhs}"
    return Problem("linear", key, f"Solve for x: {key}", str(x), (x, tuple(ops)))


def _linear_value(x: int, ops: Sequence[tuple[str, int]]) -> int:
    v = x
    for op, k in ops:
        v = v + k if op == "+" else v - k if op == "-" else v * k
    return v


def _linear_build(x: int, ops: Sequence[tuple[str, int]]) -> tuple[list[str], list[int]]:
    """Expressions after 0..n operations (``exprs[0] == "x"``) and their values."""
    exprs, vals, e, v = ["x"], [x], "x", x
    for op, k in ops:
        if op == "*":
            e = f"{k}*x" if e == "x" else f"{k}*({e})"
            v *= k
        else:
            e = f"{e}{op}{k}"
            v = v + k if op == "+" else v - k
        exprs.append(e)
        vals.append(v)
    return exprs, vals


_GENERATORS = {"addition": _addition_problem, "linear": _linear_problem}


def generate_problems(
    task: str, n: int, *, seed: int = 0, split: str = "train", difficulty: Difficulty = Difficulty()
) -> list[Problem]:
    """``n`` distinct problems of ``task`` that belong to ``split``; deterministic in ``(task, seed, split,
    difficulty)``. Raises ValueError if the difficulty does not have ``n`` distinct problems in the split."""
    if task not in _GENERATORS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, TASKS.index(task), SPLITS.index(split)])
    out: list[Problem] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 200 * n + 10_000
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"only {len(out)} distinct {task} problems found for split {split!r} at {difficulty}; "
                             f"ask for fewer than {n} or raise the difficulty")
        p = _GENERATORS[task](rng, difficulty)
        if p.key in seen or p.split != split:
            continue
        seen.add(p.key)
        out.append(p)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Trace styles
# ---------------------------------------------------------------------------------------------------------------------


def _addition_aligned(a: int, b: int) -> str:
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lines.append(f"{x}+{y}+{carry}={s:02d}")
        carry = s // 10
    return "\n".join(lines)


def _pick(p: Problem, options: Sequence[str]) -> str:
    h = int.from_bytes(hashlib.sha256(p.key.encode()).digest()[8:12], "big")
    return options[h % len(options)]


def _addition_teacher(p: Problem) -> tuple[str, str]:
    a, b = p.data
    big, small = max(a, b), min(a, b)
    parts = [int(c) * 10**i for i, c in enumerate(str(small)[::-1]) if c != "0"][::-1] or [0]
    opening = _pick(p, ("Let me work this out carefully.", "We want the sum of the two numbers.",
                        "Okay, so we need to add these two numbers together."))
    text = [f"{opening} It is easiest to keep {big} whole and break {small} into place values: "
            f"{small} = {' + '.join(str(x) for x in parts)}."]
    acc = big
    # Merge the place-value additions two at a time: a stronger model skips the intermediate totals.
    for i in range(0, len(parts), 2):
        chunk = parts[i : i + 2]
        new = acc + sum(chunk)
        text.append(f"Adding {' and then '.join(str(x) for x in chunk)} to {acc:,} gives {new:,}.")
        acc = new
    text.append(f"As a sanity check, {a + b:,} - {b:,} = {a:,}, which matches.")
    return " ".join(text), f"The sum of {a} and {b} is **{a + b:,}**.\nAnswer: {a + b}"


def _pretty(e: str) -> str:
    """Teacher notation: implicit multiplication (``3x``, ``2(3x+4)``) and spaced operators."""
    e = re.sub(r"(\d)\*", r"\1", e)
    return re.sub(r"([+\-=])", r" \1 ", e)


def _linear_aligned(p: Problem) -> str:
    x, ops = p.data
    exprs, vals = _linear_build(x, ops)
    lines, rhs = [], vals[-1]
    for i in range(len(ops) - 1, -1, -1):
        op, k = ops[i]
        new = vals[i]
        sym = {"+": "-", "-": "+", "*": "/"}[op]
        lines.append(f"{exprs[i]}={rhs}{sym}{k}={new}")
        rhs = new
    return "\n".join(lines)


def _linear_teacher(p: Problem) -> tuple[str, str]:
    x, ops = p.data
    exprs, vals = _linear_build(x, ops)
    verb = {"+": "subtract {k}", "-": "add {k}", "*": "divide by {k}"}
    text = [f"We isolate x in {_pretty(exprs[-1])} = {vals[-1]} by undoing the operations from the outside in."]
    i = len(ops)
    while i > 0:
        j = max(0, i - 2)  # two inverse operations per sentence: intermediate results are skipped
        actions = " and then ".join(verb[ops[t][0]].format(k=ops[t][1]) for t in range(i - 1, j - 1, -1))
        text.append(f"We {actions} on both sides, which leaves {_pretty(exprs[j])} = {vals[j]}.")
        i = j
    text.append(f"Substituting back: {_pretty(exprs[-1]).replace('x', f'({x})')} = {vals[-1]}. ✓")
    return " ".join(text), f"Therefore the solution is x = {x}.\nAnswer: {x}"


def trace(problem: Problem, style: str) -> tuple[str | None, str]:
    """``(reasoning, content)`` of the response to ``problem`` in ``style``; content ends with ``Answer: ...``."""
    if style == "none":
        return None, f"Answer: {problem.answer}"
    if problem.task == "addition":
        if style == "aligned":
            return _addition_aligned(*problem.data), f"Answer: {problem.answer}"
        if style == "teacher":
            return _addition_teacher(problem)
    elif problem.task == "linear":
        if style == "aligned":
            return _linear_aligned(problem), f"Answer: {problem.answer}"
        if style == "teacher":
            return _linear_teacher(problem)
    else:
        raise ValueError(f"unknown task {problem.task!r}")
    raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")


def make_record(problem: Problem, style: str, *, difficulty: Difficulty | None = None) -> dict[str, Any]:
    """A trace record (schema of motif_jax.data.records) for ``problem`` in ``style``."""
    reasoning, content = trace(problem, style)
    assistant: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        assistant["reasoning"] = reasoning
    meta: dict[str, Any] = {"split": problem.split, "problem": problem.key}
    if difficulty is not None:
        meta["difficulty"] = dataclasses.asdict(difficulty)
    return {
        "id": f"{problem.task}/{problem.key}/{style}",
        "task": problem.task,
        "messages": [{"role": "user", "content": problem.question}, assistant],
        "answer": problem.answer,
        "provenance": {"source": SOURCE_NAME, "teacher": {"aligned": "rule-aligned", "teacher": "rule-teacher"}
                       .get(style), "style": style},
        "meta": meta,
    }


# ---------------------------------------------------------------------------------------------------------------------
# In-memory sources: "synthetic:<task>?style=aligned&n=1000&split=train&seed=0&min_digits=1&max_digits=3&steps=2"
# ---------------------------------------------------------------------------------------------------------------------

SYNTHETIC_PREFIX = "synthetic:"


def is_synthetic_spec(path: str) -> bool:
    return path.startswith(SYNTHETIC_PREFIX)


def synthetic_records(spec: str) -> list[dict[str, Any]]:
    """Records for a data-source spec ``synthetic:<task>?style=...&n=...&split=...&seed=...&<difficulty>``.

    Lets a config train on generated traces without files (defaults: style aligned, n 1000, split train, seed 0,
    Difficulty defaults).
    """
    if not is_synthetic_spec(spec):
        raise ValueError(f"not a synthetic source spec: {spec!r}")
    body = spec[len(SYNTHETIC_PREFIX) :]
    task, _, query = body.partition("?")
    params = dict(urllib.parse.parse_qsl(query, strict_parsing=bool(query)))
    allowed = {"style", "n", "split", "seed", "min_digits", "max_digits", "steps"}
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"{spec!r}: unknown parameter(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    style = params.get("style", "aligned")
    if style not in STYLES:
        raise ValueError(f"{spec!r}: unknown style {style!r}; expected one of {', '.join(STYLES)}")
    try:
        d = Difficulty(**{k: int(params[k]) for k in ("min_digits", "max_digits", "steps") if k in params})
        n, seed = int(params.get("n", 1000)), int(params.get("seed", 0))
    except ValueError as e:
        raise ValueError(f"{spec!r}: {e}") from None
    problems = generate_problems(task, n, seed=seed, split=params.get("split", "train"), difficulty=d)
    return [make_record(p, style, difficulty=d) for p in problems]
