"""Speed and compiled memory of the fused LM-head loss (motif_kernels.lm_head) against the naive XLA version.

    python scripts/bench_loss.py                          # this platform's default shapes, every backend
    python scripts/bench_loss.py --shapes 8192,1024,32768,float32 --runs 5
    python scripts/bench_loss.py --impls xla --no-memory-row

For each shape "T,D,V,dtype" and each implementation (naive = log_softmax(x @ w) under XLA, then each
backend that can run here) it compiles value_and_grad of the masked mean cross-entropy with respect to x and
w, reads the compiled temp memory, and times forward + backward (median of --runs after --warmup calls;
the rounds alternate the implementations so that load from other processes affects them alike).
A memory-only row (compile, nothing allocated) covers the Motif-2 scale T=65,536, D=4,096, V=219,520 bf16.
Prints a table, then one JSON line ({"bench": "lm_head_loss", ...}).

The issue's speed requirement: on CPU at T=8,192, D=1,024, V=32,768 f32, the xla backend's fwd+bwd time is
at most 1.5x the naive one ("xla_over_naive" in the JSON line).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import tyro  # noqa: E402

from motif_kernels import BackendUnavailableError, default_blocks, linear_cross_entropy, resolve_impl  # noqa: E402

DEFAULT_SHAPES = {
    "cpu": ("2048,512,8192,float32", "8192,1024,32768,float32", "2048,1024,32768,bfloat16"),
    "gpu": ("8192,1024,32768,float32", "16384,4096,131072,bfloat16", "65536,4096,219520,bfloat16"),
}
MEMORY_SHAPE = "65536,4096,219520,bfloat16"


@dataclasses.dataclass(frozen=True)
class Args:
    shapes: tuple[str, ...] = ()
    """Timed shapes "T,D,V,dtype" (default: per platform, see DEFAULT_SHAPES)."""
    impls: tuple[str, ...] = ("naive", "xla", "pallas", "triton")
    """Implementations to try; backends that cannot run here are listed with the reason."""
    runs: int = 3
    """Timed calls per (shape, impl); the median is reported."""
    warmup: int = 1
    memory_row: bool = True
    """Add the compile-only memory row at T=65,536, D=4,096, V=219,520 bf16."""
    mask_fraction: float = 0.9
    """Fraction of tokens with mask 1."""
    token_chunk: int | None = None
    """xla tile sizes (default: motif_kernels.default_blocks() for this platform)."""
    vocab_block: int | None = None
    device_memory_gb: float | None = None
    """Skip timing a configuration whose compiled temp memory exceeds this (default: 80% of host or device
    memory as reported by JAX when available, else no limit)."""


def _parse(shape: str):
    t, d, v, dtype = shape.split(",")
    return int(t), int(d), int(v), jnp.dtype(dtype)


def _naive_loss(x, w, y, mask):
    lp = jax.nn.log_softmax((x @ w).astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(lp, y[:, None], axis=1)[:, 0]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _loss_fn(impl: str, args: Args):
    if impl == "naive":
        return _naive_loss
    kw = dict(impl=impl)
    if impl == "xla":
        kw.update(token_chunk=args.token_chunk, vocab_block=args.vocab_block)
    return lambda x, w, y, m: linear_cross_entropy(x, w, y, m, **kw)[0]


def _compile(impl: str, args: Args, t: int, d: int, v: int, dtype):
    s = jax.ShapeDtypeStruct
    specs = (s((t, d), dtype), s((d, v), dtype), s((t,), jnp.int32), s((t,), jnp.float32))
    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(_loss_fn(impl, args), argnums=(0, 1))).lower(*specs).compile()
    return compiled, time.perf_counter() - t0, compiled.memory_analysis().temp_size_in_bytes


def _inputs(t, d, v, dtype, mask_fraction):
    ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(ks[0], (t, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(ks[1], (d, v), jnp.float32) / d**0.5).astype(dtype)
    y = jax.random.randint(ks[2], (t,), 0, v, dtype=jnp.int32)
    mask = (jax.random.uniform(ks[3], (t,)) < mask_fraction).astype(jnp.float32)
    return x, w, y, mask


def _memory_limit(args: Args) -> float | None:
    if args.device_memory_gb is not None:
        return args.device_memory_gb * 1e9
    try:
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:
            return 0.8 * stats["bytes_limit"]
    except Exception:  # noqa: BLE001 - memory_stats is optional per platform
        pass
    try:
        import os

        return 0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _available(impl: str) -> str | None:
    """None when impl can be benchmarked here, else why not."""
    if impl == "naive":
        return None
    try:
        resolve_impl(impl)
    except BackendUnavailableError as e:
        return str(e).split(". Use")[0]
    if impl == "pallas" and jax.default_backend() == "cpu":
        return "interpret mode on CPU (~1 ms a grid step): a correctness path, not benchmarked"
    return None


def main(args: Args) -> dict:
    plat = "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else jax.default_backend()
    shapes = args.shapes or DEFAULT_SHAPES.get(plat, DEFAULT_SHAPES["cpu"])
    limit = _memory_limit(args)
    skipped = {impl: why for impl in args.impls if (why := _available(impl)) is not None}
    impls = [impl for impl in args.impls if impl not in skipped]
    rows = []
    header = f"{'shape (T,D,V,dtype)':34} {'impl':7} {'fwd+bwd s':>10} {'vs naive':>9} {'temp GB':>9} " \
             f"{'vs naive':>9} {'compile s':>9}  loss"
    print(f"platform {plat}: {jax.devices()[0].device_kind}; jax {jax.__version__}; xla tiles "
          f"(token_chunk, vocab_block) = {(args.token_chunk, args.vocab_block)} or default {default_blocks()}")
    for impl, why in skipped.items():
        print(f"  {impl}: not run ({why})")
    print(header)
    print("-" * len(header))

    def report(row):
        rows.append(row)
        base = next((r for r in rows if r["shape"] == row["shape"] and r["impl"] == "naive"), None)
        if base and row["impl"] != "naive":
            if row.get("time_s") and base.get("time_s"):
                row["time_vs_naive"] = row["time_s"] / base["time_s"]
            row["temp_vs_naive"] = row["temp_bytes"] / base["temp_bytes"]
        fmt = lambda val, spec: format(val, spec) if val is not None else "-".rjust(int(spec.split(".")[0] or 0))
        print(f"{row['shape']:34} {row['impl']:7} {fmt(row.get('time_s'), '10.3f')} "
              f"{fmt(row.get('time_vs_naive'), '9.2f')} {row['temp_bytes'] / 1e9:9.3f} "
              f"{fmt(row.get('temp_vs_naive'), '9.4f')} {row['compile_s']:9.2f}  "
              f"{fmt(row.get('loss'), '.6f')}{'  ' + row['note'] if row.get('note') else ''}", flush=True)

    for shape in shapes:
        t, d, v, dtype = _parse(shape)
        compiled, shape_rows = {}, {}
        for impl in impls:
            fn, compile_s, temp = _compile(impl, args, t, d, v, dtype)
            shape_rows[impl] = {"shape": shape, "impl": impl, "temp_bytes": temp, "compile_s": compile_s}
            if limit is not None and temp > limit:
                shape_rows[impl]["note"] = f"not timed: temp memory above {limit / 1e9:.0f} GB"
            else:
                compiled[impl] = fn
        if compiled:
            # Rounds alternate the implementations so that load from other processes hits them alike.
            data = _inputs(t, d, v, dtype, args.mask_fraction)
            times = {impl: [] for impl in compiled}
            for r in range(args.warmup + args.runs):
                for impl, fn in compiled.items():
                    t0 = time.perf_counter()
                    out = jax.block_until_ready(fn(*data))
                    if r >= args.warmup:
                        times[impl].append(time.perf_counter() - t0)
                    shape_rows[impl]["loss"] = float(out[0])
            for impl, ts in times.items():
                shape_rows[impl].update(time_s=statistics.median(ts), times_s=ts)
            del compiled, data
        for impl in impls:
            report(shape_rows[impl])

    if args.memory_row:
        t, d, v, dtype = _parse(MEMORY_SHAPE)
        for impl in [i for i in impls if i in ("naive", "xla")]:
            _, compile_s, temp = _compile(impl, args, t, d, v, dtype)
            report({"shape": MEMORY_SHAPE, "impl": impl, "temp_bytes": temp, "compile_s": compile_s,
                    "note": "compile only"})

    req = next((r.get("time_vs_naive") for r in rows
                if r["shape"] == "8192,1024,32768,float32" and r["impl"] == "xla"), None)
    result = {
        "bench": "lm_head_loss", "platform": plat, "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__, "machine": platform.machine(), "xla_blocks": default_blocks(),
        "runs": args.runs, "warmup": args.warmup, "rows": rows, "skipped": skipped,
        "xla_over_naive_8192x1024x32768_f32": req,
    }
    if req is not None:
        print(f"requirement (CPU, T=8192 D=1024 V=32768 f32): xla / naive = {req:.2f} (limit 1.5)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
