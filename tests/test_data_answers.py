"""Answer checks: routing by record, the synthetic tasks' integer check, and one verdict per record whichever program
evaluates it (SFT's held-out evaluation, RL's evaluation, RL's reward at the success threshold)."""

from __future__ import annotations

import pytest

from motif_jax.data import answers, synthetic
from motif_jax.data.answers import answer_check, answer_correct, check_integer, check_record
from motif_jax.data.prompts import route_tasks
from motif_jax.data.template import split_response
from motif_jax.rl.config import SandboxConfig
from motif_jax.rl.loop import make_checker
from motif_jax.rl.verifiers import StepsVerifier, default_verifiers, score_response
from motif_jax.train.evaluate import default_checker

THRESHOLD = 0.5  # DifficultyConfig.success_threshold's default


def _addition_record() -> dict:
    return synthetic.synthetic_records("synthetic:addition?style=aligned&n=1&min_digits=3&max_digits=4")[0]


@pytest.mark.parametrize(
    "record,check",
    [
        ({"task": "addition", "answer": "12"}, "exact"),
        ({"task": "math", "answer": "1/2"}, "math"),
        ({"task": "physics", "answer": "3", "answer_type": "math"}, "math"),
        ({"task": "math", "answer": "1/2", "verifiers": ["exact"]}, "exact"),  # the record's list wins
        ({"task": "addition", "answer": "3", "verifiers": ["format", "steps"]}, "steps"),
        ({"task": "algebra", "answer": "3", "verifiers": ["code", "format"]}, None),  # no answer check in the list
        ({"task": "coding", "tests": ["assert f() == 1"]}, None),  # no answer
    ],
)
def test_routing(record, check):
    assert answer_check(record) == check


def test_task_verifiers_route_any_task_name():
    records = route_tasks([{"task": "algebra", "answer": "3"}, {"task": "math", "answer": "3"},
                           {"task": "algebra", "answer": "3", "verifiers": ["exact"]}], {"algebra": "math", "math": "exact"})
    assert [answer_check(r) for r in records] == ["math", "exact", "exact"]


def test_synthetic_tasks_keep_their_integer_check():
    assert set(synthetic.TASKS) <= set(answers.INTEGER_TASKS)
    assert synthetic.check_answer is answers.check_answer and synthetic.extract_answer is answers.answer_line
    # the integer check on text without thinking is exactly check_answer, forms accepted and refused alike
    for content in ("Answer: 1234", "Answer: 1,234.", "**Answer:** 1234", "Answer: x = 1234", "Answer: 1235",
                    "Answer: 1234\nAnswer: 1", "Answer: 12abc", "\\boxed{1234}", "the answer: 1234", "no answer"):
        for task in synthetic.TASKS:
            assert check_integer("1234", content).correct == synthetic.check_answer(task, content, "1234"), content
    # only the text after the thinking counts
    assert check_integer("5", "<think>Answer: 5</think>Answer: 6").correct is False
    assert check_integer("5", "<think>Answer: 5").status == "parse_error"
    assert check_integer("5", "Answer: five").status == "parse_error"


CASES = [
    # (name, record, full response, expected verdict)
    ("synthetic right", "addition", "<think>{steps}</think>Answer: {answer}", True),
    ("synthetic wrong", "addition", "<think>{steps}</think>Answer: {wrong}", False),
    ("synthetic boxed", "addition", "\\boxed{{{answer}}}", False),  # not an 'Answer:' line: the task's own check
    ("math 0.5 for 1/2", {"task": "math", "answer": "1/2"}, "<think>half</think>Answer: 0.5", True),
    ("math 2/4 boxed", {"task": "math", "answer": "1/2"}, "\\boxed{\\frac{2}{4}}", True),
    ("math wrong", {"task": "math", "answer": "1/2"}, "Answer: 1/3", False),
    ("math hedged", {"task": "math", "answer": "1/2"}, "Answer: 0.5 or 1/3", False),
    ("routed to math", route_tasks([{"task": "algebra", "answer": "0.5"}], {"algebra": "math"})[0],
     "Answer: \\frac{1}{2}", True),
    ("routed to exact", route_tasks([{"task": "math", "answer": "1/2"}], {"math": "exact"})[0], "Answer: 0.5", False),
    ("routed to exact, same", route_tasks([{"task": "math", "answer": "1/2"}], {"math": "exact"})[0], "Answer: 1/2",
     True),
]


@pytest.mark.parametrize("name,record,response,expected", CASES, ids=[c[0] for c in CASES])
def test_sft_and_rl_give_the_same_verdict_and_the_reward_agrees(name, record, response, expected):
    if record == "addition":
        record = _addition_record()
        response = response.format(steps=record["messages"][-1]["reasoning"], answer=record["answer"],
                                   wrong=int(record["answer"]) + 1)
    verifiers = default_verifiers(SandboxConfig(isolation="process"))
    content = split_response(response)[1]  # what evaluation checks: the turn after the thinking
    assert default_checker(record, content) is expected  # SFT's held-out evaluation
    assert make_checker(verifiers, THRESHOLD)(record, content) is expected  # RL's evaluation
    reward = score_response(record, response, verifiers)  # RL's reward sees the whole turn
    assert reward.applies and (reward.total >= THRESHOLD) is expected, reward


def test_records_without_an_answer_check():
    record = {"id": "p1", "task": "chat", "verifiers": ["format"], "constraints": {"max_words": 3}}
    with pytest.raises(ValueError, match="'p1'.*no answer check"):
        default_checker(record, "hello there")  # SFT cannot score format / code records
    checker = make_checker(default_verifiers(SandboxConfig(isolation="process")), THRESHOLD)
    assert checker(record, "hello there") and not checker(record, "one two three four")  # RL scores them


def test_steps_records_are_evaluated_on_their_answer_and_rewarded_on_their_steps():
    record = {**_addition_record(), "verifiers": ["steps"]}
    steps = record["messages"][-1]["reasoning"].splitlines()
    lucky = "<think>" + "\n".join(["9+9+0=18"] + steps[1:]) + f"</think>Answer: {record['answer']}"
    content = split_response(lucky)[1]
    # evaluation sees no thinking: the answer is right
    assert answer_correct(record, content) and default_checker(record, content)
    assert make_checker(default_verifiers(SandboxConfig(isolation="process")), THRESHOLD)(record, content)
    # the reward and the full check see the wrong first step
    verdict = check_record(record, lucky)
    assert not verdict.correct and verdict.status == "ok" and "step 1" in verdict.detail
    assert StepsVerifier()(record, lucky).score == 0.0
