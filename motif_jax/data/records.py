"""Trace records: the one on-disk schema for SFT data, its validation, and readers for JSONL, Parquet and ArrayRecord.

A record (full description with examples in docs/data.md)::

    {
      "id": "addition-train-000017",                      # str, required, non-empty
      "task": "addition",                                  # str, required (task family; selects the verifier)
      "messages": [                                        # list, required, at least one assistant message
        {"role": "system", "content": "..."},              # optional, first message only
        {"role": "user", "content": "What is 17+25?"},
        {"role": "assistant", "content": "Answer: 42",     # content: str, required
         "reasoning": "7+5+0=12\\n1+2+1=04"}               # reasoning: str, optional, assistant messages only
      ],
      "answer": "42",                                      # str, optional: reference answer for the verifier
      "tests": [{"input": "1 2", "output": "3"}],          # list, optional: test cases (objects or strings)
      "provenance": {"source": "synthetic", "teacher": null, "style": "aligned"},   # optional: where it came from
      "scores": {"nll": 0.31},                             # {str: number}, optional (alignment scores)
      "meta": {...}                                        # object, optional, free-form
    }

``null`` for an optional field is the same as leaving it out (Parquet writes nulls for absent struct fields).
Unknown top-level or message keys are errors (a typo such as ``"anwser"`` must not vanish silently); put extra data
under ``meta``.

Every problem is reported as a :class:`TraceFormatError` naming the file, the line (JSONL) / row (Parquet) / record
(ArrayRecord) and the field. With ``on_error="skip"`` the record is dropped and counted in a :class:`SkipReport`
(counts by reason plus the first few messages per reason); nothing is dropped without being counted.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np

OnError = Literal["raise", "skip"]
ROLES = ("system", "user", "assistant")
REQUIRED_FIELDS = ("id", "task", "messages")
# provenance is optional (a user's own chat data rarely says which teacher wrote it); when absent it is recorded as
# {"source": <file name>, "teacher": None, "style": "unknown"}.
OPTIONAL_FIELDS = ("answer", "tests", "scores", "meta", "provenance")
MESSAGE_FIELDS = ("role", "content", "reasoning")
PROVENANCE_FIELDS = ("source", "teacher", "style")
FORMATS = ("jsonl", "parquet", "arrayrecord")


class TraceFormatError(ValueError):
    """A trace record (or file) that does not follow the schema.

    Attributes: ``path`` (file), ``location`` ("line 12", "row 3", "record 7" or "" for the whole file), ``field``
    (dotted path such as ``messages[1].role``, or "" when not about one field) and ``reason`` (a short code used for
    skip counts: invalid_json, not_utf8, not_object, missing_field, wrong_type, bad_value, unknown_field,
    empty_messages, no_assistant, empty_file, too_long).
    """

    def __init__(self, message: str, *, path: str = "", location: str = "", field: str = "", reason: str = "invalid"):
        self.path, self.location, self.field, self.reason, self.detail = path, location, field, reason, message
        where = ":".join(x for x in (path, location) if x) or "<record>"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message} [{reason}]")


@dataclasses.dataclass
class SkipReport:
    """What a reader / pipeline skipped, by reason, with the first ``max_examples`` messages of each reason."""

    max_examples: int = 3
    seen: int = 0
    kept: int = 0
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def add(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(message)

    def add_error(self, err: TraceFormatError) -> None:
        self.add(err.reason, str(err))

    @property
    def skipped(self) -> int:
        return int(sum(self.counts.values()))

    def merge(self, other: "SkipReport") -> None:
        self.seen += other.seen
        self.kept += other.kept
        for reason, n in other.counts.items():
            self.counts[reason] += n
            ex = self.examples.setdefault(reason, [])
            ex.extend(other.examples.get(reason, [])[: max(0, self.max_examples - len(ex))])

    def to_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "kept": self.kept, "skipped": self.skipped, "counts": dict(self.counts),
                "examples": {k: list(v) for k, v in self.examples.items()}}

    def summary(self) -> str:
        head = f"{self.kept} of {self.seen} records kept, {self.skipped} skipped"
        if not self.counts:
            return head
        lines = [head + ":"]
        for reason, n in self.counts.most_common():
            lines.append(f"  {reason}: {n}")
            lines.extend(f"    e.g. {m}" for m in self.examples.get(reason, []))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------

_JSON_TYPE = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "object",
              type(None): "null"}


def _tname(x: Any) -> str:
    return _JSON_TYPE.get(type(x), type(x).__name__)


def validate_record(obj: Any, *, path: str = "", location: str = "") -> dict[str, Any]:
    """Checks one record against the schema and returns it normalised (absent optional fields -> None/omitted).

    Raises :class:`TraceFormatError` naming ``path``, ``location`` and the offending field.
    """

    def err(field: str, msg: str, reason: str) -> TraceFormatError:
        return TraceFormatError(msg, path=path, location=location, field=field, reason=reason)

    if not isinstance(obj, dict):
        raise err("", f"a record must be a JSON object, got {_tname(obj)}", "not_object")
    unknown = sorted(set(obj) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise err(unknown[0], f"unknown field (allowed: {', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)}; put extra "
                  "data under 'meta')", "unknown_field")
    for f in REQUIRED_FIELDS:
        if f not in obj:
            raise err(f, "missing required field", "missing_field")

    def want_str(field: str, v: Any, *, nonempty: bool = False) -> str:
        if not isinstance(v, str):
            raise err(field, f"expected string, got {_tname(v)}", "wrong_type")
        if nonempty and not v.strip():
            raise err(field, "must not be empty", "bad_value")
        return v

    out: dict[str, Any] = {"id": want_str("id", obj["id"], nonempty=True), "task": want_str("task", obj["task"])}

    msgs = obj["messages"]
    if not isinstance(msgs, list):
        raise err("messages", f"expected list, got {_tname(msgs)}", "wrong_type")
    if not msgs:
        raise err("messages", "empty list (a record needs at least one user and one assistant message)",
                  "empty_messages")
    clean_msgs = []
    for i, m in enumerate(msgs):
        f = f"messages[{i}]"
        if not isinstance(m, dict):
            raise err(f, f"expected object, got {_tname(m)}", "wrong_type")
        extra = sorted(k for k in set(m) - set(MESSAGE_FIELDS) if m[k] is not None)
        if extra:
            raise err(f"{f}.{extra[0]}", f"unknown message field (allowed: {', '.join(MESSAGE_FIELDS)})",
                      "unknown_field")
        for k in ("role", "content"):
            if k not in m:
                raise err(f"{f}.{k}", "missing required field", "missing_field")
        role = want_str(f"{f}.role", m["role"])
        if role not in ROLES:
            raise err(f"{f}.role", f"must be one of {'|'.join(ROLES)}, got {role!r}", "bad_value")
        if role == "system" and i != 0:
            raise err(f"{f}.role", "a system message may only be the first message", "bad_value")
        cm = {"role": role, "content": want_str(f"{f}.content", m["content"])}
        reasoning = m.get("reasoning")
        if reasoning is not None:
            if role != "assistant":
                raise err(f"{f}.reasoning", f"only assistant messages carry reasoning (role is {role!r})",
                          "bad_value")
            cm["reasoning"] = want_str(f"{f}.reasoning", reasoning)
        clean_msgs.append(cm)
    if not any(m["role"] == "assistant" for m in clean_msgs):
        raise err("messages", "no assistant message: nothing to train on", "no_assistant")
    out["messages"] = clean_msgs

    prov = obj.get("provenance")
    if prov is None:
        prov = {"source": os.path.basename(path) or "unknown", "teacher": None, "style": "unknown"}
    if not isinstance(prov, dict):
        raise err("provenance", f"expected object, got {_tname(prov)}", "wrong_type")
    extra = sorted(k for k in set(prov) - set(PROVENANCE_FIELDS) if prov[k] is not None)
    if extra:
        raise err(f"provenance.{extra[0]}", f"unknown field (allowed: {', '.join(PROVENANCE_FIELDS)})",
                  "unknown_field")
    for k in ("source", "style"):
        if prov.get(k) is None:
            raise err(f"provenance.{k}", "missing required field", "missing_field")
    teacher = prov.get("teacher")
    out["provenance"] = {
        "source": want_str("provenance.source", prov["source"]),
        "teacher": None if teacher is None else want_str("provenance.teacher", teacher),
        "style": want_str("provenance.style", prov["style"]),
    }

    answer = obj.get("answer")
    if answer is not None:
        out["answer"] = want_str("answer", answer)
    tests = obj.get("tests")
    if tests is not None:
        if not isinstance(tests, list):
            raise err("tests", f"expected list, got {_tname(tests)}", "wrong_type")
        for i, t in enumerate(tests):
            if not isinstance(t, (dict, str)):
                raise err(f"tests[{i}]", f"expected object or string, got {_tname(t)}", "wrong_type")
        out["tests"] = tests
    scores = obj.get("scores")
    if scores is not None:
        if not isinstance(scores, dict):
            raise err("scores", f"expected object, got {_tname(scores)}", "wrong_type")
        for k, v in scores.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise err(f"scores.{k}", f"expected a finite number, got {_tname(v)} {v!r}", "wrong_type")
        out["scores"] = {k: float(v) for k, v in scores.items() if v is not None}
    meta = obj.get("meta")
    if meta is not None:
        if not isinstance(meta, dict):
            raise err("meta", f"expected object, got {_tname(meta)}", "wrong_type")
        out["meta"] = meta
    return out


def parse_record(raw: bytes | str | dict, *, path: str = "", location: str = "") -> dict[str, Any]:
    """Decodes (UTF-8), parses (JSON) and validates one raw record."""
    if isinstance(raw, dict):
        return validate_record(raw, path=path, location=location)
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise TraceFormatError(
                f"not valid UTF-8 (byte 0x{bytes(raw)[e.start]:02x} at offset {e.start}); re-encode the file as UTF-8",
                path=path, location=location, reason="not_utf8") from None
    try:
        obj = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise TraceFormatError(f"invalid JSON: {e.msg} at column {e.colno}", path=path, location=location,
                               reason="invalid_json") from None
    except _DuplicateKey as e:
        raise TraceFormatError(f"the key {e.args[0]!r} appears twice in one object (JSON parsers keep only one)",
                               path=path, location=location, reason="duplicate_key") from None
    except RecursionError:
        raise TraceFormatError("JSON nested too deeply to parse", path=path, location=location,
                               reason="invalid_json") from None
    except ValueError as e:  # e.g. an integer longer than Python's int-from-text limit
        raise TraceFormatError(f"invalid JSON value: {str(e).splitlines()[0]}", path=path, location=location,
                               reason="invalid_json") from None
    bad = _first_invalid_text(obj)
    if bad is not None:
        raise TraceFormatError("invalid Unicode (a lone surrogate escape such as \\ud800); fix the text",
                               path=path, location=location, field=bad, reason="bad_unicode")
    return validate_record(obj, path=path, location=location)


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _first_invalid_text(obj: Any, where: str = "") -> str | None:
    """The dotted path of the first string (key or value) that is not encodable as UTF-8, or None."""
    stack = [(obj, where)]
    while stack:
        x, at = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return at or "<record>"
        elif isinstance(x, dict):
            stack.extend((v, f"{at}.{k}" if at else str(k)) for k, v in reversed(list(x.items())))
            stack.extend((k, at or "<key>") for k in x)
        elif isinstance(x, list):
            stack.extend((v, f"{at}[{i}]") for i, v in reversed(list(enumerate(x))))
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Readers: random access to raw records (bytes or dicts) with a location string for messages.
# ---------------------------------------------------------------------------------------------------------------------


class RecordReader:
    """Random access to the raw records of one source. Picklable (files are reopened lazily in each process)."""

    path: str
    unit: str = "record"  # what a location counts: line, row, record

    def __len__(self) -> int:
        raise NotImplementedError

    def raw(self, i: int) -> bytes | dict:
        raise NotImplementedError

    def location(self, i: int) -> str:
        return f"{self.unit} {i + 1}"

    def record(self, i: int) -> dict[str, Any]:
        """The validated record ``i`` (raises :class:`TraceFormatError`)."""
        return parse_record(self.raw(i), path=self.path, location=self.location(i))


class JsonlReader(RecordReader):
    """One JSON object per line; blank lines are ignored; locations are 1-based line numbers."""

    unit = "line"

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        data = np.fromfile(self.path, dtype=np.uint8)
        nl = np.flatnonzero(data == ord("\n"))
        starts = np.concatenate([[0], nl + 1])
        ends = np.concatenate([nl, [len(data)]])
        line_no = np.arange(1, len(starts) + 1)
        keep = self._nonblank(data, starts, ends)
        self._starts, self._ends, self._lines = starts[keep], ends[keep], line_no[keep]
        self._fd: int | None = None

    @staticmethod
    def _nonblank(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        # A line is blank if it holds only whitespace bytes; count non-whitespace bytes per line with a cumsum.
        ws = np.isin(data, np.frombuffer(b" \t\r\n\x0b\x0c", dtype=np.uint8))
        c = np.concatenate([[0], np.cumsum(~ws)])
        return (c[ends] - c[starts]) > 0

    def __len__(self) -> int:
        return len(self._starts)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass

    def raw(self, i: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        s, e = int(self._starts[i]), int(self._ends[i])
        return os.pread(self._fd, e - s, s)

    def location(self, i: int) -> str:
        return f"line {int(self._lines[i])}"


class ParquetReader(RecordReader):
    """A Parquet table whose columns are the record fields (nested lists/structs for messages and provenance).

    The table is read into Arrow memory once; use ArrayRecord for corpora that do not fit in host memory.
    """

    unit = "row"

    def __init__(self, path: str | Path) -> None:
        import pyarrow.parquet as pq

        self.path = str(path)
        try:
            self._table = pq.read_table(self.path)
        except Exception as e:  # pyarrow raises ArrowInvalid & co for corrupt files
            raise TraceFormatError(f"cannot read Parquet file: {e}", path=self.path, reason="invalid_file") from e

    def __len__(self) -> int:
        return self._table.num_rows

    def raw(self, i: int) -> dict:
        return self._table.slice(i, 1).to_pylist()[0]

    def iter_raw(self) -> Iterator[dict]:
        for batch in self._table.to_batches(max_chunksize=1024):
            yield from batch.to_pylist()


class ArrayRecordReader(RecordReader):
    """An ArrayRecord file whose records are UTF-8 JSON objects."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._source = None
        self._len = len(self._open())

    def _open(self):
        if self._source is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            try:
                self._source = ArrayRecordDataSource([self.path])
            except Exception as e:
                raise TraceFormatError(f"cannot read ArrayRecord file: {e}", path=self.path,
                                       reason="invalid_file") from e
        return self._source

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_source": None}

    def __len__(self) -> int:
        return self._len

    def raw(self, i: int) -> bytes:
        return self._open()[i]


class MemoryReader(RecordReader):
    """Records held in memory (synthetic sources, tests); ``name`` stands in for the file path in messages."""

    def __init__(self, records: Sequence[dict | bytes | str], name: str = "<memory>") -> None:
        self.path = name
        self._records = list(records)

    def __len__(self) -> int:
        return len(self._records)

    def raw(self, i: int) -> dict | bytes | str:
        return self._records[i]


def detect_format(path: str | Path) -> str:
    name = str(path).lower()
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".arrayrecord", ".array_record")) or ".array_record-" in name:
        return "arrayrecord"
    raise TraceFormatError("cannot tell the format from the file name; use .jsonl, .parquet or .array_record, or "
                           "set the source's format explicitly", path=str(path), reason="unknown_format")


def open_reader(path: str | Path, format: str = "auto") -> RecordReader:
    """A :class:`RecordReader` for a JSONL, Parquet or ArrayRecord file (``format="auto"``: by file extension)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"trace file not found: {p} (check --data.sources)")
    fmt = detect_format(p) if format == "auto" else format
    if fmt == "jsonl":
        return JsonlReader(p)
    if fmt == "parquet":
        return ParquetReader(p)
    if fmt == "arrayrecord":
        return ArrayRecordReader(p)
    raise ValueError(f"unknown trace format {format!r}; expected auto or one of {', '.join(FORMATS)}")


def iter_valid(reader: RecordReader, *, on_error: OnError = "raise",
               report: SkipReport | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields ``(index, validated record)``; bad records raise or are counted in ``report`` (``on_error="skip"``).

    An empty source raises (``raise``) or is counted under ``empty_file`` (``skip``).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    report = report if report is not None else SkipReport()
    if len(reader) == 0:
        err = TraceFormatError("no records in this source (empty file)", path=reader.path, reason="empty_file")
        if on_error == "raise":
            raise err
        report.add_error(err)
        return
    raws: Iterable = reader.iter_raw() if isinstance(reader, ParquetReader) else (reader.raw(i) for i in
                                                                                    range(len(reader)))
    for i, raw in enumerate(raws):
        report.seen += 1
        try:
            rec = parse_record(raw, path=reader.path, location=reader.location(i))
        except TraceFormatError as err:
            if on_error == "raise":
                raise
            report.add_error(err)
            continue
        report.kept += 1
        yield i, rec


def read_records(path: str | Path, *, on_error: OnError = "raise", report: SkipReport | None = None,
                 format: str = "auto") -> list[dict[str, Any]]:
    """All valid records of one file (see :func:`iter_valid` for the error policy)."""
    return [r for _, r in iter_valid(open_reader(path, format), on_error=on_error, report=report)]


# ---------------------------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------------------------


def write_jsonl(records: Iterable[dict], path: str | Path) -> int:
    """Writes records one per line (UTF-8, no ASCII escaping); returns the count."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, p)
    return n


def write_parquet(records: Sequence[dict], path: str | Path) -> int:
    """Writes records as a Parquet table, one column per field (absent optional fields become nulls).

    Arrow needs one type per column, so free-form ``meta`` / ``tests`` must have the same shape in every record;
    use JSONL or ArrayRecord otherwise.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = [k for k in REQUIRED_FIELDS + OPTIONAL_FIELDS if any(k in r for r in records)]
    rows = [{k: r.get(k) for k in keys} for r in records]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return len(rows)


def write_array_record(records: Iterable[dict], path: str | Path) -> int:
    """Writes records as UTF-8 JSON bytes into an ArrayRecord file."""
    from array_record.python.array_record_module import ArrayRecordWriter

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    w = ArrayRecordWriter(str(path), "group_size:1")
    n = 0
    for r in records:
        w.write(json.dumps(r, ensure_ascii=False).encode("utf-8"))
        n += 1
    w.close()
    return n
