"""Verifiers: answer extraction, exact and math answers, reward hacking, code tests, format checks, combination."""

from __future__ import annotations

import numpy as np
import pytest

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
# code


SBX = SandboxConfig(isolation="process", timeout_s=1.0, cpu_time_s=1, memory_mb=256)
CODE = CodeVerifier(sandbox=SBX, max_workers=2)


def test_extract_code_takes_last_python_block_after_thinking():
    resp = "<think>```python\nprint('draft')\n```</think>\nFinal:\n```python\nprint(1)\n```\nand\n```py\nprint(2)\n```"
    assert extract_code(resp).strip() == "print(2)"
    assert extract_code("<think>```python\nprint(1)\n```") is None
    assert extract_code("no code") is None


def test_code_stdin_tests_fraction_passed():
    record = {"tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10"},
                        {"input": "2 2\n", "output": "5\n"}]}
    resp = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    r = CODE(record, resp)
    assert r.status == "ok"
    assert r.score == pytest.approx(2 / 3)


def test_code_assert_tests():
    record = {"tests": ["assert sq(3) == 9", {"assert": "assert sq(-2) == 4"}, "assert sq(2) == 5"]}
    r = CODE(record, "```python\ndef sq(x):\n    return x * x\n```")
    assert r.status == "ok" and r.score == pytest.approx(2 / 3)


def test_code_timeout_and_missing_code():
    record = {"tests": [{"input": "", "output": "1"}, {"input": "", "output": "1"}]}
    r = CODE(record, "```python\nwhile True:\n    pass\n```")
    assert r.status == "timeout" and r.score == 0.0
    r = CODE(record, "I would write a loop.")
    assert r.status == "parse_error" and r.score == 0.0


def test_code_hostile_solution_scores_zero():
    record = {"tests": [{"input": "", "output": "ok"}]}
    r = CODE(record, "```python\nimport socket\nsocket.create_connection(('127.0.0.1', 9))\nprint('ok')\n```")
    assert r.score == 0.0


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
