"""Verifiers: answer extraction, exact and math answers, reward hacking (answers and code), code tests, format checks,
combination. Code cases run in both sandbox isolation modes where the machine allows namespaces."""

from __future__ import annotations

import contextlib
import json
import os
import textwrap
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
from test_rl_sandbox import MODES, TEMP_DIR, UID_BASE, UID_COUNT, _leftover_run_dirs, _sandbox_uid_processes

from motif_jax.rl.code_harness import _wire_decode, _wire_encode
from motif_jax.rl.config import SandboxConfig
from motif_jax.rl.verifiers import (
    CodeVerifier,
    ExactAnswerVerifier,
    FormatVerifier,
    MathVerifier,
    Verifier,
    VerifierResult,
    combine_rewards,
    default_verifiers,
    extract_answer,
    extract_code,
    normalize_answer,
    overlong_penalty,
    score_response,
)

EXACT = ExactAnswerVerifier()
MATH = MathVerifier()


@pytest.mark.parametrize(
    "response,score",
    [
        ("<think>7 * 6 = 42</think>\nAnswer: 42", 1.0),
        ("The result is \\boxed{42}.", 1.0),
        ("Answer: 42.", 1.0),
        ("Answer: $42$", 1.0),
        ("Answer: 42.0", 1.0),
        ("**Answer**: 42", 1.0),
        ("Answer: x = 42", 1.0),
        ("Answer: 41", 0.0),
        ("<think>Answer: 41</think> Answer: 42", 1.0),  # answers inside the thinking do not count
        ("<think>Answer: 42</think> Answer: 41", 0.0),
    ],
)
def test_exact_answer(response, score):
    r = EXACT({"prompt": "6*7?", "answer": 42}, response)
    assert r.score == score and r.status == "ok" and r.applies


def test_exact_answer_strings_and_normalisation():
    assert normalize_answer(" 1,000 ") == "1000"
    assert normalize_answer("\\text{Paris}.") == "paris"
    assert normalize_answer("-7") == "-7"
    assert normalize_answer("x = -7") == "-7"
    assert EXACT({"answer": "Paris"}, "Answer: paris") .score == 1.0
    assert EXACT({"answer": "Paris"}, "Answer: Paris, France").score == 0.0


@pytest.mark.parametrize(
    "response,why",
    [
        ("Answer: 41 or 42", "alternatives"),
        ("\\boxed{41 \\text{ or } 42}", "alternatives"),
        ("Answer: 41, 42", "more items"),
        ("\\boxed{41} or maybe \\boxed{42}", "ambiguous"),
        ("\\boxed{42} Answer: 41", "ambiguous"),
        ("Answer: 41\nAnswer: 42; 43", "alternatives"),
        ("<think>still thinking... Answer: 42", "unfinished"),
        ("I think it is 42", "no final answer"),
        ("\\boxed{42", "unbalanced"),
    ],
)
def test_reward_hacking_and_unparseable_answers_score_zero(response, why):
    for verifier, record in ((EXACT, {"answer": 42}), (MATH, {"answer": "42", "task": "math"})):
        r = verifier(record, response)
        assert r.score == 0.0 and r.status == "parse_error", (verifier.name, r)
        assert why in r.detail


def test_synthetic_task_traces_pass_the_exact_verifier():
    synthetic = pytest.importorskip("motif_jax.data.synthetic")
    for task in synthetic.TASKS:
        for style in ("aligned", "teacher", "none"):
            for p in synthetic.generate_problems(task, 5, seed=1):
                reasoning, content = synthetic.trace(p, style)
                response = (f"<think>{reasoning}</think>" if reasoning else "") + content
                assert EXACT(synthetic.make_record(p, style), response).score == 1.0


def test_repeated_identical_answer_is_not_ambiguous():
    assert extract_answer("\\boxed{42} so Answer: 42")[0] == "42"


@pytest.mark.parametrize(
    "gold,response,score",
    [
        ("\\frac{1}{2}", "Answer: 0.5", 1.0),
        ("0.5", "\\boxed{\\frac{1}{2}}", 1.0),
        ("\\frac{1}{2}", "\\boxed{\\frac{2}{4}}", 1.0),
        ("\\sqrt{2}/2", "\\boxed{\\frac{\\sqrt{2}}{2}}", 1.0),
        ("x^2+2x+1", "\\boxed{(x+1)^2}", 1.0),
        ("(1, 2)", "\\boxed{(1,2)}", 1.0),
        ("\\frac{1}{2}", "Answer: \\frac{1}{3}", 0.0),
        ("3", "\\boxed{3.5}", 0.0),
    ],
)
def test_math_verify_equivalences(gold, response, score):
    r = MATH({"answer": gold, "task": "math"}, response)
    assert r.status == "ok", r
    assert r.score == score


def test_math_verifier_parse_errors_are_caught():
    r = MATH({"answer": "1/2", "task": "math"}, "Answer: \\frac{")
    assert r.score == 0.0 and r.status in ("parse_error", "ok")


def test_routing_and_applicability():
    rec_exact = {"answer": 3}
    rec_math = {"answer": "3", "task": "math"}
    assert EXACT.applies(rec_exact) and not MATH.applies(rec_exact)
    assert MATH.applies(rec_math) and not EXACT.applies(rec_math)
    assert EXACT.applies({"answer": "3", "task": "math", "verifiers": ["exact"]})
    assert not EXACT({"prompt": "write a poem"}, "Answer: 3").applies
    assert isinstance(EXACT, Verifier) and isinstance(CodeVerifier(), Verifier)


# ---------------------------------------------------------------------------------------------------------------------
# code: in both isolation modes where the machine allows namespaces (see test_rl_sandbox.py)


def _sbx(mode: str = "process", **kw) -> SandboxConfig:
    base = {"isolation": mode, "timeout_s": 2.0, "cpu_time_s": 2, "memory_mb": 256, "uid_base": UID_BASE,
            "uid_count": UID_COUNT, "temp_dir": TEMP_DIR}
    return SandboxConfig(**{**base, **kw})


SBX = _sbx()
CODE = CodeVerifier(sandbox=SBX, max_workers=2)


def _verify(mode: str, record: dict, code: str, **kw) -> VerifierResult:
    """Score ``code`` on ``record``; nothing of the runs may be left running or on disk afterwards."""
    verifier = CodeVerifier(sandbox=_sbx(mode), max_workers=2, **kw)
    cwd, env, fds = os.getcwd(), dict(os.environ), _open_fds()
    r = verifier(record, f"```python\n{code}\n```")
    assert _leftover_run_dirs() == []
    assert _sandbox_uid_processes(verifier.sandbox) == []
    assert _processes_under(TEMP_DIR) == []
    assert os.getcwd() == cwd and dict(os.environ) == env
    assert _open_fds() == fds  # every pipe of the relay is closed
    return r


def _open_fds() -> list[str]:
    """What this process's file descriptors point to (the sandbox's per-process lock file aside)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if not target.endswith("/.lock") and not target.startswith("/proc/"):
                out.append(target)
    return sorted(out)


def _processes_under(path: str) -> list[int]:
    real = os.path.realpath(path)
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{name}/cwd").startswith(real):
                    out.append(int(name))
    return out


def test_extract_code_takes_last_python_block_after_thinking():
    resp = "<think>```python\nprint('draft')\n```</think>\nFinal:\n```python\nprint(1)\n```\nand\n```py\nprint(2)\n```"
    assert extract_code(resp).strip() == "print(2)"
    assert extract_code("<think>```python\nprint(1)\n```") is None
    assert extract_code("no code") is None


@pytest.mark.parametrize("mode", MODES)
def test_code_stdin_tests_fraction_passed(mode):
    record = {"tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10"},
                        {"input": "2 2\n", "output": "5\n"}]}
    r = _verify(mode, record, "a, b = map(int, input().split())\nprint(a + b)")
    assert r.status == "ok"
    assert r.score == pytest.approx(2 / 3)
    # printing the answer and then exiting is legitimate for stdin/stdout tasks
    r = _verify(mode, record, "import sys\na, b = map(int, input().split())\nprint(a + b)\nsys.exit(0)")
    assert r.score == pytest.approx(2 / 3)


@pytest.mark.parametrize("mode", MODES)
def test_code_assert_tests(mode):
    record = {"tests": ["assert sq(3) == 9", {"assert": "assert sq(-2) == 4"}, "assert sq(2) == 5"]}
    r = _verify(mode, record, "def sq(x):\n    return x * x")
    assert r.status == "ok" and r.score == pytest.approx(2 / 3)
    assert "'passed': 2" in r.detail and "'failed': 1" in r.detail


def test_code_timeout_and_missing_code():
    record = {"tests": [{"input": "", "output": "1"}, {"input": "", "output": "1"}]}
    r = CodeVerifier(sandbox=_sbx(timeout_s=1.0, cpu_time_s=1))(record, "```python\nwhile True:\n    pass\n```")
    assert r.status == "timeout" and r.score == 0.0
    r = CODE(record, "I would write a loop.")
    assert r.status == "parse_error" and r.score == 0.0


def test_code_hostile_solution_scores_zero():
    record = {"tests": [{"input": "", "output": "ok"}]}
    r = CODE(record, "```python\nimport socket\nsocket.create_connection(('127.0.0.1', 9))\nprint('ok')\n```")
    assert r.score == 0.0


WRONG = "def sq(x):\n    return 0\n"
HACKS = {
    # (solution, status): each is a wrong solution plus a trick that scored 1.0 when a test passed on exit status 0
    "sys_exit": (WRONG + "import sys\nsys.exit(0)", "exited_early"),
    "os_exit": (WRONG + "import os\nos._exit(0)", "exited_early"),
    "exit_inside_the_call": ("def sq(x):\n    import os\n    os._exit(0)", "exited_early"),
    "system_exit_inside_the_call": ("def sq(x):\n    raise SystemExit(0)", "exited_early"),
    "kill_itself": ("def sq(x):\n    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)", "exited_early"),
    "eq_always_true": ("class A:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
                       + "def sq(x):\n    return A()", "tampered"),
    "int_subclass_eq": ("class A(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
                        + "def sq(x):\n    return A(0)", "tampered"),
    # every fd: the pipes keep the verifier's fd numbers, which grow with what its process holds open
    "forged_replies_on_every_fd": (WRONG + "import os\nfor fd in range(3, 1 << 16):\n    try:\n        os.write(fd, "
                                   "b'{\"spoil\": [\"pass\", \"\"]}\\n{\"op\": \"verdict\", \"verdict\": \"pass\"}\\n')"
                                   "\n    except OSError:\n        pass\nprint('{\"verdict\": \"pass\"}')",
                                   "tampered"),
    # these do nothing any more: the test fails as a plain wrong answer
    "atexit_os_exit": ("import atexit, os\natexit.register(lambda: os._exit(0))\n" + WRONG, "ok"),
    "patched_builtins": (WRONG + "import builtins\nbuiltins.AssertionError = type('E', (Exception,), {})\n"
                         "builtins.abs = lambda x: 0", "ok"),
}


@pytest.mark.parametrize("hack", sorted(HACKS))
@pytest.mark.parametrize("mode", MODES)
def test_reward_hacks_score_zero(mode, hack):
    code, status = HACKS[hack]
    record = {"tests": ["assert sq(3) == 9", "assert abs(sq(2) - 4) < 1e-9 and isinstance(sq(1), int)"]}
    r = _verify(mode, record, code)
    assert r.score == 0.0 and r.status == status, r
    if status == "ok":
        assert "'failed': 2" in r.detail


@pytest.mark.parametrize("mode", MODES)
def test_truthiness_of_a_solution_object_cannot_be_forged(mode):
    code = "class Yes:\n    def __bool__(self):\n        return True\ndef is_prime(n):\n    return Yes()"
    r = _verify(mode, {"tests": ["assert is_prime(7)", "assert not is_prime(8)"]}, code)
    assert r.score == 0.0 and r.status == "tampered"


@pytest.mark.parametrize("mode", MODES)
def test_expected_values_never_reach_the_solution(mode):
    # A solution that searches its own program and memory for the expected value finds nothing to copy.
    code = ("import linecache, sys\n"
            "def f(x):\n    src = ''.join(linecache.cache['solution.py'][2])\n"
            "    seen = src + repr(sys.argv) + open('/proc/self/cmdline', 'rb').read().decode('latin-1')\n"
            "    needle = str(987654320 + 1)\n    return int(needle) if needle in seen else -1")
    r = _verify(mode, {"tests": ["assert f(1) == 987654321"]}, code)
    assert r.score == 0.0 and r.status == "ok"


@pytest.mark.parametrize("mode", MODES)
def test_unjudgeable_replies(mode):
    # Over max_message_bytes: output_limit. A solution that dies while answering: exited_early.
    r = _verify(mode, {"tests": ["assert len(big(1)) == 3"]}, "def big(n):\n    return 'x' * (3 << 20)")
    assert r.score == 0.0 and "output_limit" in r.detail
    r = _verify(mode, {"tests": ["assert sq(2) == 4", "assert sq(3) == 9"]}, "import sys\nsys.exit(1)")
    assert r.score == 0.0 and "runtime_error" in r.detail  # a crash before answering is not hacking


@pytest.mark.parametrize("mode", MODES)
def test_honest_solutions_in_many_test_styles_pass(mode):
    code = textwrap.dedent("""
        import collections, fractions
        from typing import List
        MOD = 10**9 + 7
        Point = collections.namedtuple("Point", "x y")

        def sq(x):
            return x * x

        def scale(x, *, by=1):
            return x * by

        def count(s):
            return collections.Counter(s)

        def half(n):
            return fractions.Fraction(n, 2)

        def pts():
            return [Point(0, 1), Point(2, 3)]

        def evens(n):
            for i in range(n):
                if i % 2 == 0:
                    yield i

        def check_positive(n):
            if n <= 0:
                raise ValueError("not positive")
            return True

        def mean(xs):
            return sum(xs) / len(xs)

        class Solution:
            def twoSum(self, nums: List[int], target: int) -> List[int]:
                seen = {}
                for i, v in enumerate(nums):
                    if target - v in seen:
                        return [seen[target - v], i]
                    seen[v] = i

        if __name__ == "__main__":
            pass
    """)
    tests = [
        "assert sq(3) == 9 and sq(-2) == 4",
        "def check(candidate):\n    assert candidate(2) == 4\n    assert abs(mean([1, 2]) - 1.5) < 1e-9\ncheck(sq)",
        "assert scale(2, by=3) == 6",
        "assert count('aab') == {'a': 2, 'b': 1}",
        "import fractions\nassert half(3) == fractions.Fraction(3, 2)",
        "assert pts() == [(0, 1), (2, 3)] and pts()[1].__class__ is tuple",
        "assert list(evens(5)) == [0, 2, 4] and [x for x in evens(3)] == [0, 2] and 4 in evens(5)",
        "assert len(pts()) == 2 and pts()[0] == (0, 1) and count('ab')['a'] == 1",
        "try:\n    check_positive(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError('no error')",
        "assert Solution().twoSum([2, 7, 11], 9) == [0, 1]",
        "assert MOD == 1000000007 and sq(10**30) == 10**60 and sq(1.5) == 2.25",
        "assert {sq(2), sq(-2)} == {4} and sq(b'ab'[0]) == 9409 and sq(1j) == -1",
    ]
    r = _verify(mode, {"tests": tests}, code)
    assert r.score == 1.0 and r.status == "ok", r.detail


def test_malformed_test_is_an_error():
    r = CODE({"tests": ["assert sq(3) == "]}, "```python\ndef sq(x):\n    return x * x\n```")
    assert r.status == "error" and r.score == 0.0


@pytest.mark.parametrize("value", [None, True, 3, -(1 << 80), 2.5, float("inf"), "é\ud800", b"\x00\xff",
                                   bytearray(b"ab"), 1 + 2j, [1, (2, 3)], {"a": {1, 2}}, frozenset({(1, "x")}),
                                   {(1, 2): [None]}, Fraction(3, 7), Decimal("1.25")])
def test_wire_format_round_trips_plain_values(value):
    wire = json.loads(json.dumps(_wire_encode(value, lambda v: pytest.fail(f"{v!r} is plain"))))
    back = _wire_decode(wire, lambda tag, body: pytest.fail("no refs"))
    assert back == value and type(back) is type(value)


def test_wire_format_sends_other_objects_by_handle_and_rejects_malformed_input():
    class Odd:
        pass

    kept = []
    assert _wire_encode([Odd()], lambda v: kept.append(v) or {"H": [0, "Odd"]}) == {"L": [{"H": [0, "Odd"]}]}
    assert len(kept) == 1
    for bad in ({"L": 3}, {"X": []}, {"D": [[1]]}, {"I": 5}, {"L": [], "T": []}, {"H": ["0", "Odd"]},
                {"S": [{"L": []}]}, {"Q": [1, 0]}, {"C": ["1", 2]}):
        with pytest.raises((ValueError, TypeError, ZeroDivisionError)):
            _wire_decode(bad, lambda tag, body: None)


# ---------------------------------------------------------------------------------------------------------------------
# format / instructions


def test_format_checks():
    fmt = FormatVerifier(require_think=True, require_answer=True, max_chars=200)
    good = "<think>reasoning</think>\nAnswer: 4"
    assert fmt({}, good).score == 1.0
    r = fmt({}, "Answer: 4")
    assert r.score == pytest.approx(2 / 3) and "think block" in r.detail
    assert fmt({}, "<think>x</think> " + "y" * 300).score == pytest.approx(1 / 3)
    strict = FormatVerifier(require_think=True, require_answer=True, mode="all")
    assert strict({}, "Answer: 4").score == 0.0


def test_instruction_constraints():
    fmt = FormatVerifier()
    rec = {"constraints": {"must_contain": ["ocean"], "must_not_contain": ["blue"], "max_words": 5}}
    assert fmt.applies(rec) and not fmt.applies({"answer": 1})
    assert fmt(rec, "<think>blue blue</think>The ocean is wide.").score == 1.0  # thinking is not checked
    r = fmt(rec, "The blue ocean is very very wide.")
    assert r.score == pytest.approx(1 / 3)
    assert fmt(rec, "Oceanic views.").score == pytest.approx(2 / 3)  # whole words only


# ---------------------------------------------------------------------------------------------------------------------
# combination


def test_combine_rewards_leaves_out_non_applying_verifiers():
    results = {
        "math": VerifierResult(1.0, "ok", name="math"),
        "code": VerifierResult(0.0, "not_applicable", applies=False, name="code"),
        "format": VerifierResult(0.5, "ok", name="format"),
    }
    c = combine_rewards(results, {"math": 1.0, "code": 1.0, "format": 0.2})
    assert c.total == pytest.approx(1.1)
    assert set(c.components) == {"math", "format"} and c.status == "ok" and c.applies
    assert combine_rewards(results, {"math": 1.0, "format": 0.2}, normalize=True).total == pytest.approx(1.1 / 1.2)
    none = combine_rewards([VerifierResult(0.0, "not_applicable", applies=False, name="code")])
    assert none.status == "no_verifier" and not none.applies and none.total == 0.0
    worst = combine_rewards([VerifierResult(0.0, "parse_error", name="a"), VerifierResult(0.0, "timeout", name="b")])
    assert worst.status == "timeout"


def test_score_response_routes_by_record():
    vs = default_verifiers(SBX)
    c = score_response({"answer": 12, "constraints": {"max_words": 3}}, "Answer: 12", vs, {"format": 0.1})
    assert set(c.components) == {"exact", "format"}
    assert c.total == pytest.approx(1.1)
    c = score_response({"prompt": "chat"}, "hello", vs)
    assert c.status == "no_verifier"


def test_overlong_penalty():
    assert overlong_penalty(100, max_len=1000, buffer_len=200) == 0.0
    assert overlong_penalty(800, max_len=1000, buffer_len=200) == 0.0
    assert overlong_penalty(900, max_len=1000, buffer_len=200) == pytest.approx(-0.5)
    assert overlong_penalty(1200, max_len=1000, buffer_len=200, factor=2.0) == pytest.approx(-2.0)
    np.testing.assert_allclose(overlong_penalty(np.array([0, 850, 1000]), 1000, 200), [0.0, -0.25, -1.0])
    with pytest.raises(ValueError):
        overlong_penalty(1, 10, 0)


def test_steps_verifier_rewards_only_right_answers_with_right_steps():
    from motif_jax.data.synthetic import synthetic_records
    from motif_jax.rl.verifiers import StepsVerifier

    v = StepsVerifier()
    rec = next(iter(synthetic_records("synthetic:addition?style=aligned&n=1&min_digits=3&max_digits=4")))
    steps = rec["messages"][-1]["reasoning"]
    good = f"<think>{steps}</think>Answer: {rec['answer']}"
    assert v.applies(rec) and v(rec, good).score == 1.0
    lines = steps.splitlines()
    lucky = f"<think>{chr(10).join(['9+9+0=18'] + lines[1:])}</think>Answer: {rec['answer']}"  # wrong step
    res = v(rec, lucky)
    assert res.score == 0.0 and res.status == "ok" and "step 1" in res.detail
    assert v(rec, f"<think>{steps}</think>Answer: {int(rec['answer']) + 1}").score == 0.0
    assert v(rec, "<think>" + steps + "</think>no answer").status == "parse_error"
    teacher = next(iter(synthetic_records("synthetic:addition?style=teacher&n=1")))
    assert not v.applies(teacher)  # only aligned references are step-checkable
