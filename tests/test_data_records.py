"""Trace schema validation and the bad-input corpus: clear errors (file, line, field) or counted skips."""

from __future__ import annotations

import json

import pytest

from motif_jax.data.config import DataConfig, SourceConfig
from motif_jax.data.pipeline import DataPipeline
from motif_jax.data.records import (
    SkipReport,
    TraceFormatError,
    open_reader,
    read_records,
    validate_record,
    write_array_record,
    write_parquet,
)


def good(i: int = 0, **over) -> dict:
    r = {
        "id": f"r{i}",
        "task": "addition",
        "messages": [{"role": "user", "content": f"What is {i}+1?"},
                     {"role": "assistant", "content": f"Answer: {i + 1}", "reasoning": f"{i}+1+0=0{i + 1}"}],
        "answer": str(i + 1),
        "provenance": {"source": "test", "teacher": None, "style": "aligned"},
    }
    r.update(over)
    return r


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


# (line content, reason, field) for each kind of broken record; the file puts one good record before each.
BAD = [
    (b'{"id": "x", "task": ', "invalid_json", ""),
    (line({k: v for k, v in good(1).items() if k != "messages"}), "missing_field", "messages"),
    (line(good(2, id=7)), "wrong_type", "id"),
    (line(good(3, messages="hi")), "wrong_type", "messages"),
    (line(good(4, messages=[])), "empty_messages", "messages"),
    (line(good(5, messages=[{"role": "bot", "content": "x"}])), "bad_value", "messages[0].role"),
    (line(good(6, messages=[{"role": "user", "content": 5}])), "wrong_type", "messages[0].content"),
    (line(good(7, messages=[{"role": "user", "content": "q", "reasoning": "r"}, {"role": "assistant",
                                                                                 "content": "a"}])),
     "bad_value", "messages[0].reasoning"),
    (line(good(8, messages=[{"role": "user", "content": "only a question"}])), "no_assistant", "messages"),
    (line(good(9, anwser="typo")), "unknown_field", "anwser"),
    (line(good(10, provenance={"source": "x"})), "missing_field", "provenance.style"),
    (line(good(11, scores={"nll": "low"})), "wrong_type", "scores.nll"),
    (b'{"id": "bad-bytes", "task": "\xff\xfe"}\n', "not_utf8", ""),
    (b"[1, 2, 3]\n", "not_object", ""),
    (b"[" * 200_000 + b"]" * 200_000 + b"\n", "invalid_json", ""),  # nested past the parser's recursion limit
    (b'{"id": "huge", "n": ' + b"7" * 5000 + b"}\n", "invalid_json", ""),  # past Python's int-from-text limit
    (b'{"id": "dup", "id": "dup2", "task": "t"}\n', "duplicate_key", ""),
    (line(good(12, messages=[{"role": "user", "content": "q \ud800"}, {"role": "assistant", "content": "a"}])),
     "bad_unicode", "messages[0].content"),
]


@pytest.fixture()
def bad_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    with open(path, "wb") as f:
        for i, (content, _, _) in enumerate(BAD):
            f.write(line(good(100 + i)))
            f.write(content if content.endswith(b"\n") else content + b"\n")
        f.write(b"\n   \n")  # blank lines are not records
        f.write(line(good(999)))
    return path


@pytest.mark.parametrize("k", range(len(BAD)))
def test_each_bad_record_raises_naming_file_line_field(bad_file, k):
    content, reason, field = BAD[k]
    reader = open_reader(bad_file)
    raw_index = 2 * k + 1  # good, bad, good, bad, ...
    with pytest.raises(TraceFormatError) as ei:
        reader.record(raw_index)
    e = ei.value
    assert e.reason == reason and e.field == field and e.path == str(bad_file)
    assert e.location == f"line {raw_index + 1}"
    msg = str(e)
    assert str(bad_file) in msg and f"line {raw_index + 1}" in msg and (field in msg)


def test_raise_policy_stops_at_first_bad_record(bad_file):
    with pytest.raises(TraceFormatError, match=r"bad\.jsonl:line 2: invalid JSON"):
        read_records(bad_file)


def test_skip_policy_counts_everything(bad_file):
    report = SkipReport()
    recs = read_records(bad_file, on_error="skip", report=report)
    assert [r["id"] for r in recs] == [f"r{100 + i}" for i in range(len(BAD))] + ["r999"]
    assert report.seen == 2 * len(BAD) + 1 and report.kept == len(recs) and report.skipped == len(BAD)
    expected: dict[str, int] = {}
    for _, reason, _ in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(report.counts) == expected
    assert all(len(v) <= report.max_examples for v in report.examples.values())
    s = report.summary()
    assert "invalid_json: 3" in s and "wrong_type: 4" in s and "bad.jsonl:line 2" in s


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(TraceFormatError, match=r"empty\.jsonl: no records .*\[empty_file\]"):
        read_records(empty)
    report = SkipReport()
    assert read_records(empty, on_error="skip", report=report) == []
    assert report.counts == {"empty_file": 1}
    with pytest.raises(FileNotFoundError, match="trace file not found"):
        read_records(tmp_path / "missing.jsonl")


def test_validate_normalises_optional_nulls():
    r = validate_record(good(1, answer=None, tests=None, scores={"nll": 1, "x": None}))
    assert "answer" not in r and "tests" not in r and r["scores"] == {"nll": 1.0}
    assert r["provenance"] == {"source": "test", "teacher": None, "style": "aligned"}


def test_parquet_and_array_record_round_trip_and_locations(tmp_path):
    # Typed columns: the broken rows are an empty list and a null message content (what Parquet can hold).
    null_content = [{"role": "user", "content": None, "reasoning": None}, good(6)["messages"][1]]
    recs = [good(i) for i in range(5)] + [good(5, messages=[]), good(6, messages=null_content)]
    pq, ar = tmp_path / "t.parquet", tmp_path / "t.array_record"
    write_parquet(recs, pq)
    write_array_record(recs, ar)
    for path, unit in ((pq, "row"), (ar, "record")):
        with pytest.raises(TraceFormatError) as ei:
            read_records(path)
        assert ei.value.location == f"{unit} 6" and ei.value.field == "messages" and str(path) in str(ei.value)
        report = SkipReport()
        got = read_records(path, on_error="skip", report=report)
        assert [r["id"] for r in got] == [f"r{i}" for i in range(5)]
        assert dict(report.counts) == {"empty_messages": 1, "wrong_type": 1}
        assert got[0] == validate_record(good(0))


def _cfg(path, **kw) -> DataConfig:
    return DataConfig(sources=(SourceConfig(str(path)),), seq_len=64, batch_size=2, num_epochs=1, **kw)


def test_pipeline_bad_corpus_raise_and_skip(bad_file, tmp_path):
    # raise: the pipeline fails at construction, naming the file and line.
    with pytest.raises(TraceFormatError, match=r"bad\.jsonl:line 2"):
        DataPipeline(_cfg(bad_file), shard_index=0, shard_count=1)
    # skip: everything bad is counted, and too-long records too.
    long = good(50, messages=[{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "y"}])
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(bad_file.read_bytes() + line(long))
    pl = DataPipeline(_cfg(path, on_error="skip"), shard_index=0, shard_count=1)
    (rep,) = pl.report.entries.values()
    assert rep.skipped == len(BAD) + 1 and rep.counts["too_long"] == 1 and rep.kept == len(BAD) + 1
    assert "mixed.jsonl:line" in rep.examples["too_long"][0]
    rows = sum(int((b["segment_ids"] > 0).any(axis=1).sum()) for b in pl)
    assert rows > 0
    # too_long=raise names the record; truncate keeps it at the limit.
    with pytest.raises(TraceFormatError, match=r"line \d+: .*tokens after the chat template.*\[too_long\]"):
        DataPipeline(_cfg(path, on_error="skip", too_long="raise"), shard_index=0, shard_count=1)
    pl = DataPipeline(_cfg(path, on_error="skip", too_long="truncate"), shard_index=0, shard_count=1)
    assert "too_long" not in next(iter(pl.report.entries.values())).counts
    # An empty file: clear error with raise; with skip an explicit report and an error since nothing is left.
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(TraceFormatError, match="empty file"):
        DataPipeline(_cfg(empty), shard_index=0, shard_count=1)
    with pytest.raises(TraceFormatError, match=r"only 0 usable records(.|\n)*empty_file: 1"):
        DataPipeline(_cfg(empty, on_error="skip"), shard_index=0, shard_count=1)


class _FailsOnTilde:
    """A tokenizer that cannot encode one character (a per-record tokenizer failure)."""

    def __init__(self):
        from motif_jax.data.tokenizer import ByteTokenizer

        self._inner = ByteTokenizer()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def encode_with_offsets(self, text: str):
        if "~" in text:
            raise RuntimeError("cannot encode '~'")
        return self._inner.encode_with_offsets(text)


def test_duplicate_ids_and_untokenizable_records_name_both_lines(tmp_path):
    path = tmp_path / "dups.jsonl"
    tilde = good(3, messages=[{"role": "user", "content": "a ~ b"}, {"role": "assistant", "content": "c"}])
    path.write_bytes(line(good(1)) + line(good(2)) + line(good(1)) + line(tilde) + line(good(4)))
    with pytest.raises(TraceFormatError, match=r"dups\.jsonl:line 3: field 'id': duplicate record id 'r1' \(first at "
                                               r"line 1\).*\[duplicate_id\]"):
        DataPipeline(_cfg(path), shard_index=0, shard_count=1)
    pl = DataPipeline(_cfg(path, on_error="skip"), tokenizer=_FailsOnTilde(), shard_index=0, shard_count=1)
    (rep,) = pl.report.entries.values()
    assert dict(rep.counts) == {"duplicate_id": 1, "tokenizer": 1} and rep.kept == 3
    assert "dups.jsonl:line 4: field 'messages': cannot be rendered and tokenized" in rep.examples["tokenizer"][0]


def test_sft_script_reports_a_bad_trace_file_in_one_line(tmp_path, bad_file):
    """Through scripts/sft.py a malformed trace file ends with one line naming file and line, exit status 2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, str(root / "scripts/sft.py"), "--config", str(root / "configs/sft/tiny-arith.yaml"),
         "--run-dir", str(tmp_path / "run"), "--data.sources.0.path", str(bad_file)],
        capture_output=True, text=True, cwd=root, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)})
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert errors[-1].startswith("error: ") and "bad.jsonl:line 2: invalid JSON" in errors[-1]
    assert "Traceback" not in out.stderr
