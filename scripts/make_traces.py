"""Writes synthetic trace files (JSONL, or Parquet / ArrayRecord) for chosen tasks, styles, splits and sizes.

    python scripts/make_traces.py --out-dir data/traces --tasks addition linear --styles aligned teacher none \
        --splits train test --n 20000 --n-eval 500 --min-digits 3 --max-digits 4 --seed 0

One file per (task, style, split): ``{out_dir}/{task}-{style}-{split}.jsonl``. The same problems are used for every
style of a (task, split), so styles differ only in their traces. Held-out splits never share a problem with train.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from motif_jax.data.records import write_array_record, write_jsonl, write_parquet  # noqa: E402
from motif_jax.data.synthetic import Difficulty, generate_problems, make_record  # noqa: E402

Task = Literal["addition", "linear"]
Style = Literal["aligned", "teacher", "none"]
Split = Literal["train", "valid", "test"]


@dataclasses.dataclass(frozen=True)
class Args:
    out_dir: str = "data/traces"
    """Folder for the trace files."""
    tasks: tuple[Task, ...] = ("addition",)
    styles: tuple[Style, ...] = ("aligned", "teacher", "none")
    splits: tuple[Split, ...] = ("train", "test")
    n: int = 20_000
    """Problems per train file."""
    n_eval: int = 500
    """Problems per valid / test file."""
    seed: int = 0
    min_digits: int = 1
    """Fewest digits of an operand (addition) or of x (linear)."""
    max_digits: int = 3
    """Most digits of an operand (addition) or of x (linear)."""
    steps: int = 2
    """Operations applied to x (linear equations)."""
    format: Literal["jsonl", "parquet", "arrayrecord"] = "jsonl"

def main(args: Args) -> list[Path]:
    difficulty = Difficulty(min_digits=args.min_digits, max_digits=args.max_digits, steps=args.steps)
    out = Path(args.out_dir)
    ext = {"jsonl": "jsonl", "parquet": "parquet", "arrayrecord": "array_record"}[args.format]
    writer = {"jsonl": write_jsonl, "parquet": write_parquet, "arrayrecord": write_array_record}[args.format]
    written = []
    for task in args.tasks:
        for split in args.splits:
            n = args.n if split == "train" else args.n_eval
            problems = generate_problems(task, n, seed=args.seed, split=split, difficulty=difficulty)
            for style in args.styles:
                path = out / f"{task}-{style}-{split}.{ext}"
                count = writer([make_record(p, style, difficulty=difficulty) for p in problems], path)
                print(json.dumps({"file": str(path), "records": count, "task": task, "style": style, "split": split}))
                written.append(path)
    return written


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args, description=__doc__))
