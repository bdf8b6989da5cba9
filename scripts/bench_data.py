"""Throughput of the SFT data pipeline: packed tokens per second on this host.

    python scripts/bench_data.py                       # byte tokenizer, seq_len 512 and 2048, in-process
    python scripts/bench_data.py --workers 0 2 --tokenizers byte hf

Writes a JSONL trace file (synthetic addition + linear traces, a mix of aligned / teacher / answer-only styles, so
record lengths vary from ~40 to ~350 tokens), then for each (tokenizer, seq_len, workers) builds the pipeline,
times the start-up scan, discards warm-up batches and times the next ones. Prints a table and one JSON line per
configuration (``{"bench": "data_pipeline", ...}``). "tokens/s" counts real (non-padding) tokens in packed rows;
"fill" is real tokens / (rows x seq_len).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from motif_jax.data.config import DataConfig, SourceConfig  # noqa: E402
from motif_jax.data.pipeline import DataPipeline, packing_stats  # noqa: E402
from motif_jax.data.records import write_jsonl  # noqa: E402
from motif_jax.data.synthetic import STYLES, Difficulty, generate_problems, make_record  # noqa: E402
from motif_jax.data.tokenizer import load_tokenizer  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Args:
    records: int = 20_000
    """Records in the benchmark file (half addition, half linear equations)."""
    seq_lens: tuple[int, ...] = (512, 2048)
    batch_size: int = 16
    """Packed rows per batch (one host)."""
    batches: int = 100
    """Timed batches per configuration (after warm-up)."""
    warmup: int = 5
    workers: tuple[int, ...] = (0,)
    """Grain multiprocess prefetch workers to try."""
    tokenizers: tuple[Literal["byte", "hf"], ...] = ("byte",)
    """'hf' trains a small byte-level BPE (2k vocab) on the traces and uses it through HFTokenizer."""


def _write_corpus(path: Path, n: int) -> list[dict]:
    recs = []
    for task in ("addition", "linear"):
        for i, p in enumerate(generate_problems(task, n // 2, seed=0, difficulty=Difficulty(2, 4, 3))):
            recs.append(make_record(p, STYLES[i % 3]))
    write_jsonl(recs, path)
    return recs


def _train_bpe(recs: list[dict], out: Path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<think>",
                "</think>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [m["content"] + m.get("reasoning", "") for r in recs[:5000] for m in r["messages"]]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2048, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out))
    return str(out)


def main(args: Args) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.jsonl"
        recs = _write_corpus(path, args.records)
        tok_specs = {"byte": "byte"}
        if "hf" in args.tokenizers:
            tok_specs["hf"] = _train_bpe(recs, Path(tmp) / "tokenizer.json")
        for tname in args.tokenizers:
            tokenizer = load_tokenizer(tok_specs[tname])
            for seq_len in args.seq_lens:
                for workers in args.workers:
                    cfg = DataConfig(sources=(SourceConfig(str(path)),), seq_len=seq_len, batch_size=args.batch_size,
                                     tokenizer=tok_specs[tname], prefetch_workers=workers, seed=0)
                    t0 = time.perf_counter()
                    pl = DataPipeline(cfg, tokenizer=tokenizer, shard_index=0, shard_count=1)
                    scan_s = time.perf_counter() - t0
                    it = iter(pl)
                    for _ in range(args.warmup):
                        next(it)
                    real = slots = segments = 0
                    t0 = time.perf_counter()
                    for _ in range(args.batches):
                        st = packing_stats(next(it))
                        real += st["tokens"]
                        segments += st["segments"]
                        slots += args.batch_size * seq_len
                    dt = time.perf_counter() - t0
                    it.close()
                    results.append({
                        "bench": "data_pipeline", "tokenizer": tname if tname == "byte" else "hf-bpe-2k",
                        "seq_len": seq_len, "batch_rows": args.batch_size, "workers": workers,
                        "records": len(recs), "scan_s": round(scan_s, 2),
                        "scan_records_per_s": round(len(recs) / scan_s),
                        "tokens_per_s": round(real / dt), "slots_per_s": round(slots / dt),
                        "records_per_s": round(segments / dt), "batches_per_s": round(args.batches / dt, 1),
                        "fill": round(real / slots, 3),
                    })
    print(f"{'tokenizer':<10} {'seq_len':>7} {'workers':>7} {'tokens/s':>10} {'records/s':>9} {'batch/s':>7} "
          f"{'fill':>5} {'scan s':>6} {'scan rec/s':>10}")
    for r in results:
        print(f"{r['tokenizer']:<10} {r['seq_len']:>7} {r['workers']:>7} {r['tokens_per_s']:>10,} "
              f"{r['records_per_s']:>9,} {r['batches_per_s']:>7} {r['fill']:>5} {r['scan_s']:>6} "
              f"{r['scan_records_per_s']:>10,}")
    for r in results:
        print(json.dumps(r))
    return results


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args, description=__doc__))
