"""Synthetic verifiable tasks: exact verifiers, disjoint held-out splits, determinism, styles, trace files."""

from __future__ import annotations

import json
import re

import pytest

from motif_jax.data.records import read_records, validate_record
from motif_jax.data.synthetic import (
    STYLES,
    TASKS,
    Difficulty,
    check_answer,
    extract_answer,
    generate_problems,
    make_record,
    synthetic_records,
    trace,
)
from motif_jax.data.template import apply_template
from motif_jax.data.tokenizer import ByteTokenizer


@pytest.mark.parametrize("task", TASKS)
def test_verifier_accepts_reference_rejects_wrong(task):
    for p in generate_problems(task, 50, seed=0, difficulty=Difficulty(1, 4, 3)):
        assert check_answer(task, f"blah\nAnswer: {p.answer}", p.answer)
        assert not check_answer(task, f"Answer: {int(p.answer) + 1}", p.answer)
        assert not check_answer(task, "no answer line at all", p.answer)
        # The last Answer line counts.
        assert not check_answer(task, f"Answer: {p.answer}\nAnswer: {int(p.answer) - 1}", p.answer)
    assert check_answer("addition", "Answer: 1,234.", "1234") and check_answer("linear", "Answer: x = -5", "-5")
    assert check_answer("addition", "**Answer:** 12", "12") and not check_answer("addition", "Answer: 12abc", "12")
    assert extract_answer("Answer: 5\ntext") == "5" and extract_answer("The Answer: is") is None


@pytest.mark.parametrize("task", TASKS)
def test_all_styles_parse_to_the_reference_answer(task):
    for p in generate_problems(task, 40, seed=1, difficulty=Difficulty(2, 4, 3)):
        for style in STYLES:
            rec = validate_record(make_record(p, style))
            assert rec["provenance"]["style"] == style and rec["task"] == task and rec["answer"] == p.answer
            content = rec["messages"][-1]["content"]
            assert content.splitlines()[-1] == f"Answer: {p.answer}"
            assert check_answer(task, content, p.answer)
            assert (style == "none") == ("reasoning" not in rec["messages"][-1])


def test_aligned_addition_steps_are_correct_and_regular():
    for p in generate_problems("addition", 200, seed=2, difficulty=Difficulty(1, 5)):
        reasoning, _ = trace(p, "aligned")
        a, b = p.data
        lines = reasoning.split("\n")
        assert len(lines) == max(len(str(a)), len(str(b)))
        carry, digits = 0, []
        for i, ln in enumerate(lines):
            m = re.fullmatch(r"(\d)\+(\d)\+([01])=(\d\d)", ln)
            assert m, ln
            x, y, c, s = map(int, m.groups())
            assert c == carry and x + y + c == s
            assert x == (a // 10**i) % 10 and y == (b // 10**i) % 10
            digits.append(s % 10)
            carry = s // 10
        assert int(str(carry) + "".join(map(str, digits[::-1]))) == a + b


def test_aligned_linear_steps_are_correct():
    for p in generate_problems("linear", 100, seed=3, difficulty=Difficulty(1, 3, 4)):
        reasoning, _ = trace(p, "aligned")
        lines = reasoning.split("\n")
        assert len(lines) == 4 and lines[-1].startswith("x=") and lines[-1].endswith(f"={p.answer}")
        for ln in lines:
            lhs, expr, val = ln.split("=")
            assert eval(expr.replace("/", "//")) == int(val)  # noqa: S307 - arithmetic we generated
            assert eval(lhs.replace("x", f"({p.answer})")) == int(val)  # noqa: S307


def test_aligned_traces_are_short_for_the_tiny_model():
    tok = ByteTokenizer()
    lens = {s: max(len(apply_template(make_record(p, s)["messages"], tok)[0])
                   for p in generate_problems("addition", 200, seed=0, difficulty=Difficulty(3, 4)))
            for s in STYLES}
    assert lens["aligned"] <= 96 < 200 < lens["teacher"] <= 512 and lens["none"] < lens["aligned"]


@pytest.mark.parametrize("task", TASKS)
def test_splits_disjoint_and_deterministic(task):
    d = Difficulty(1, 2, 2)
    train = generate_problems(task, 1500, seed=0, split="train", difficulty=d)
    test = generate_problems(task, 60, seed=0, split="test", difficulty=d)
    valid = generate_problems(task, 60, seed=5, split="valid", difficulty=d)
    canon = lambda ps: {p.canonical_key for p in ps}  # noqa: E731
    assert not canon(train) & canon(test) and not canon(train) & canon(valid) and not canon(test) & canon(valid)
    assert len({p.key for p in train}) == 1500
    assert [p.key for p in generate_problems(task, 1500, seed=0, split="train", difficulty=d)] == [p.key for p in
                                                                                                    train]
    other = generate_problems(task, 1500, seed=1, split="train", difficulty=d)
    assert [p.key for p in other] != [p.key for p in train]
    assert not canon(other) & canon(test)  # whatever the seed


def test_too_many_problems_is_a_clear_error():
    with pytest.raises(ValueError, match="distinct addition problems"):
        generate_problems("addition", 50, split="test", difficulty=Difficulty(1, 1))
    with pytest.raises(ValueError, match="unknown task"):
        generate_problems("sorting", 5)


def test_synthetic_spec():
    recs = synthetic_records("synthetic:linear?style=teacher&n=7&steps=3&split=valid&seed=2")
    assert len(recs) == 7 and all(r["provenance"]["style"] == "teacher" and r["meta"]["split"] == "valid"
                                  for r in recs)
    assert recs == synthetic_records("synthetic:linear?style=teacher&n=7&steps=3&split=valid&seed=2")
    with pytest.raises(ValueError, match="unknown parameter"):
        synthetic_records("synthetic:addition?digits=3")


def test_make_traces_script(tmp_path, monkeypatch):
    import importlib.util
    import pathlib
    import sys

    spec = importlib.util.spec_from_file_location(
        "make_traces", pathlib.Path(__file__).resolve().parents[1] / "scripts" / "make_traces.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "make_traces", mod)  # dataclasses look their module up while defining
    spec.loader.exec_module(mod)
    paths = mod.main(mod.Args(out_dir=str(tmp_path), tasks=("addition", "linear"), n=30, n_eval=10))
    assert len(paths) == 2 * 3 * 2
    train = read_records(tmp_path / "addition-aligned-train.jsonl")
    test = read_records(tmp_path / "addition-teacher-test.jsonl")
    assert len(train) == 30 and len(test) == 10
    assert not {r["meta"]["problem"] for r in train} & {r["meta"]["problem"] for r in test}
    # Same problems for every style of a (task, split).
    none = read_records(tmp_path / "addition-none-train.jsonl")
    assert [r["meta"]["problem"] for r in none] == [r["meta"]["problem"] for r in train]
    assert json.loads((tmp_path / "linear-none-test.jsonl").read_text().splitlines()[0])["task"] == "linear"


def test_a_mixed_pool_joins_several_sources():
    from motif_jax.data.prompts import load_prompt_records

    pool = load_prompt_records("synthetic:addition?n=20&min_digits=1&max_digits=8;synthetic:linear?n=10&steps=3")
    assert len(pool) == 30 and {r["task"] for r in pool} == {"addition", "linear"}
    digits = {len(str(max(r["meta"]["problem"].split("+"), key=len))) for r in pool if r["task"] == "addition"}
    assert len(digits) >= 4  # a real spread of difficulty
    assert len(load_prompt_records("synthetic:addition?n=20;synthetic:linear?n=10", limit=25)) == 25
