"""One command for a lent GPU (H100 / H200): what this project's GPU program does on real hardware, in < 8 minutes.

    python scripts/gpu_check.py                      # on the GPU machine; prints a table, writes runs/gpu_check.json
    python scripts/gpu_check.py --build-only         # on any host with the gpu extra (make gpu-check-build)

Sections (each timed with the compile excluded, median of ``--repeats`` runs after a warm-up):

- ``loss``: every LM-head backend (xla, pallas, triton when it can run) at T = 65,536, D = 4,096, V = 219,520,
  bf16: log-probs, entropies and both gradients against xla, and fwd + bwd time against the 8 T D V bound;
- ``attention``: cuDNN against blockwise at T = 8K and 32K (the 12.7B signal pathway: 32 query heads over 8
  key/value heads, head 128, value 256), single and packed rows: value, gradients, time; plus a probe of the one
  packed cuDNN call with the wide value head that the code does not use yet (motif_kernels/attention_cudnn.py);
- ``mfu``: the train step of a ~1B Motif-style model at 8K tokens: step time and model FLOPs utilisation;
- ``memory``: XLA:GPU's compiled memory of the 12.7B layer stack at 64K on one device (recommended remat,
  cuDNN), from 1 and 2 layers extrapolated to 40 (the planner's --layers method);
- ``tiles``: a forward-only sweep of the kernels' tile table at T = 4,096 and 65,536 (what
  ``motif_kernels/lm_head_tiles.TILE_TABLE`` should say), last, while the budget lasts.

``--build-only`` needs no GPU: versions, the Triton kernel lowered and compiled to PTX for sm_90 by jax-triton,
that PTX assembled by the ptxas the jax CUDA plugin ships (registers, spills), the Pallas kernel lowered to a
Triton custom call and the tiny train step lowered for CUDA with cuDNN attention.
Nothing here has run on a GPU yet (docs/kernels.md says which results are still missing).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

T_LOSS, D_LOSS, V_LOSS = 65_536, 4_096, 219_520
# Dense bf16 tensor-core peak (FLOP/s) by device kind; the bound of a fwd + bwd LM head is 8 T D V / peak.
_PEAK = (("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("B200", 2250e12))


@dataclasses.dataclass(frozen=True)
class CheckArgs:
    """GPU checks of the kernels, the attention, a train step and the 64K memory (see the module docstring)."""

    out: str = "runs/gpu_check.json"
    """where the JSON report is written"""
    build_only: bool = False
    """no GPU: versions, Triton PTX for sm_90 assembled by the plugin's ptxas, CUDA lowerings"""
    sections: tuple[str, ...] = ("loss", "attention", "mfu", "memory", "tiles")
    """sections to run (loss, attention, mfu, memory, tiles), in this order"""
    repeats: int = 3
    """timed runs per measurement (median)"""
    budget_s: float = 420.0
    """no new section starts after this many seconds (the whole check must fit 8 minutes)"""
    scale: float = 1.0
    """shrink every size by this factor (e.g. 0.125 to try the script on a small GPU); results then are not the
    documented shapes"""


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _versions() -> dict[str, str | None]:
    import jax

    out = {d: _version(d) for d in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-triton",
                                    "triton", "nvidia-cudnn-cu12", "nvidia-cuda-nvcc-cu12", "flax")}
    out["python"] = sys.version.split()[0]
    out["jax_backend"] = jax.default_backend()
    return out


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(median seconds of ``repeats`` runs after one warm-up, last result); blocks on every output."""
    import jax

    out = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def _rel(a, b) -> float:
    import jax.numpy as jnp

    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def _peak() -> float:
    import jax

    kind = jax.devices()[0].device_kind
    return next((p for name, p in _PEAK if name in kind), 989e12)


# ---------------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------------


def check_loss(args: CheckArgs) -> dict:
    import jax
    import jax.numpy as jnp

    from motif_kernels import linear_log_probs
    from motif_kernels.lm_head_triton import unavailable_reason

    t, d, v = (max(256, int(n * args.scale)) // 128 * 128 for n in (T_LOSS, D_LOSS, V_LOSS))
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (t, d), jnp.bfloat16)
    w = (jax.random.normal(ks[1], (d, v), jnp.float32) * d ** -0.5).astype(jnp.bfloat16)
    y = jax.random.randint(ks[2], (t,), 0, v)
    g_lp, g_h = jax.random.normal(ks[3], (t,)), jax.random.normal(ks[4], (t,))

    def make(impl):
        def obj(x, w):
            lp, h = linear_log_probs(x, w, y, with_entropy=True, impl=impl)
            return jnp.sum(lp * g_lp) + jnp.sum(h * g_h), (lp, h)
        return jax.jit(jax.value_and_grad(obj, (0, 1), has_aux=True))

    bound = 8 * t * d * v / _peak()
    rows = {}
    ref = None
    for impl in ("xla", "pallas", "triton"):
        if impl == "triton" and unavailable_reason() is not None:
            rows[impl] = {"skipped": unavailable_reason()}
            continue
        try:
            fn = make(impl)
            t0 = time.perf_counter()
            fn.lower(x, w).compile()
            compile_s = time.perf_counter() - t0
            secs, ((_, (lp, h)), (gx, gw)) = _timed(lambda: fn(x, w), args.repeats)
        except Exception as e:  # a kernel that fails on this GPU is a result, not a crash of the whole check
            rows[impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        row = {"seconds": round(secs, 4), "compile_seconds": round(compile_s, 1),
               "tflops": round(8 * t * d * v / secs / 1e12, 1), "of_bound": round(bound / secs, 3)}
        if ref is None:
            ref = (lp, h, gx, gw)
        else:
            row.update({f"rel_err_{n}": _rel(a, b) for n, a, b in zip(("logp", "entropy", "dx", "dw"),
                                                                        (lp, h, gx, gw), ref)})
            row["exact"] = all(row[f"rel_err_{n}"] < 2e-2 for n in ("logp", "entropy", "dx", "dw"))
        rows[impl] = row
    return {"shape": [t, d, v], "bound_seconds": round(bound, 4), "backends": rows}


def _packed_rows(t: int, segments: int, seed: int = 0):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(t // 16, t - t // 16), segments - 1, replace=False))
    seg, pos = np.zeros(t, np.int32), np.zeros(t, np.int32)
    for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, t])):
        seg[a:b], pos[a:b] = i + 1, np.arange(b - a)
    seg[-t // 32:], pos[-t // 32:] = 0, 0  # trailing padding
    return jnp.asarray(seg[None]), jnp.asarray(pos[None])


def check_attention(args: CheckArgs) -> dict:
    import jax
    import jax.numpy as jnp

    from motif_kernels import attention_cudnn
    from motif_jax.model.attention import attend

    out: dict[str, Any] = {}
    for t in (8192, 32768):
        t = max(256, int(t * args.scale)) // 128 * 128
        ks = jax.random.split(jax.random.key(t), 4)
        q = jax.random.normal(ks[0], (1, t, 32, 128), jnp.bfloat16)
        k = jax.random.normal(ks[1], (1, t, 8, 128), jnp.bfloat16)
        v = jax.random.normal(ks[2], (1, t, 8, 256), jnp.bfloat16)
        ct = jax.random.normal(ks[3], (1, t, 32, 256), jnp.bfloat16)
        for rows_kind in ("single", "packed"):
            if rows_kind == "single":
                seg = jnp.ones((1, t), jnp.int32).at[:, -t // 32:].set(0)
                pos = jnp.arange(t, dtype=jnp.int32)[None]
            else:
                seg, pos = _packed_rows(t, 4)
            real = (seg > 0)[:, :, None, None]
            results = {}
            for impl in ("blockwise", "cudnn"):
                def loss(q, k, v, impl=impl):
                    o = attend(q, k, v, seg, seg, pos, pos, impl=impl, block_q=1024, block_kv=1024)
                    return jnp.sum((o * ct * real).astype(jnp.float32)), o * real
                fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
                try:
                    secs, ((_, o), g) = _timed(lambda: fn(q, k, v), args.repeats)
                    results[impl] = (secs, o, g)
                except Exception as e:
                    results[impl] = (None, f"{type(e).__name__}: {str(e)[:300]}", None)
            row: dict[str, Any] = {}
            for impl, (secs, o, g) in results.items():
                row[f"{impl}_seconds"] = None if secs is None else round(secs, 4)
                if secs is None:
                    row[f"{impl}_error"] = o
            if all(r[0] is not None for r in results.values()):
                (_, o0, g0), (_, o1, g1) = results["blockwise"], results["cudnn"]
                row.update(rel_err_out=_rel(o1, o0), rel_err_dq=_rel(g1[0], g0[0]), rel_err_dk=_rel(g1[1], g0[1]),
                           rel_err_dv=_rel(g1[2], g0[2]))
                row["exact"] = all(row[k] < 2e-2 for k in ("rel_err_out", "rel_err_dq", "rel_err_dk", "rel_err_dv"))
                row["speedup"] = round(row["blockwise_seconds"] / row["cudnn_seconds"], 2)
            out[f"{t}_{rows_kind}"] = row
        # probe: packed rows in ONE ragged call with the 256-wide value (not used by the code; see its docstring)
        seg, pos = _packed_rows(t, 4)
        lay = attention_cudnn.layout(seg, pos)
        offsets = jnp.concatenate([lay.starts, jnp.full((1, 1), -1, jnp.int32)], axis=1)
        try:
            fn = jax.jit(lambda q, k, v: attention_cudnn._fmha(q, k, v, None, lay.lengths, lay.lengths,
                                                               (offsets, offsets), 128 ** -0.5, "PADDING_CAUSAL"))
            wide = fn(q, k, v)
            split = jax.jit(lambda q, k, v: attention_cudnn.attention(q, k, v, lay, scale=128 ** -0.5,
                                                                      packed=True))(q, k, v)
            real = (seg > 0)[:, :, None, None]
            out[f"{t}_packed_wide_value_probe"] = {"rel_err_vs_split_calls": _rel(wide * real, split * real)}
        except Exception as e:
            out[f"{t}_packed_wide_value_probe"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def check_tiles(args: CheckArgs) -> dict:
    """Forward-only sweep of the kernels' tile table at T = 4,096 (where the vocabulary split matters) and 65,536:
    the fastest configuration per kernel and size is what motif_kernels/lm_head_tiles.TILE_TABLE should say."""
    import jax
    import jax.numpy as jnp

    from motif_kernels import lm_head_pallas, lm_head_triton
    from motif_kernels.lm_head_tiles import KernelTiles, choose_tiles

    d, v = (max(256, int(n * args.scale)) // 128 * 128 for n in (D_LOSS, V_LOSS))
    out: dict[str, Any] = {}
    candidates = [KernelTiles(64, 128, 64, 1, 4, 3), KernelTiles(128, 128, 64, 1, 4, 3),
                  KernelTiles(128, 256, 64, 1, 8, 3), KernelTiles(128, 256, 32, 1, 8, 4)]
    kernels = {"pallas": lambda x, w, y, tiles: lm_head_pallas.stats(x, w, y, None, tiles=tiles, interpret=False)}
    if lm_head_triton.unavailable_reason() is None:
        kernels["triton"] = lambda x, w, y, tiles: lm_head_triton.stats(x, w, y, None, tiles=tiles)
    for t in (4096, 65536):
        t = max(256, int(t * args.scale)) // 128 * 128
        x = jax.random.normal(jax.random.key(1), (t, d), jnp.bfloat16)
        w = (jax.random.normal(jax.random.key(2), (d, v), jnp.float32) * d ** -0.5).astype(jnp.bfloat16)
        y = jax.random.randint(jax.random.key(3), (t,), 0, v)
        table_choice = choose_tiles(t, v, "gpu", (9, 0))
        for name, kern in kernels.items():
            rows = []
            for base in candidates:
                tiles = dataclasses.replace(base, vocab_splits=choose_tiles(
                    t, v, "gpu", (9, 0), block_t=base.block_t, block_v=base.block_v).vocab_splits)
                try:
                    fn = jax.jit(lambda x, w, tiles=tiles: kern(x, w, y, tiles))
                    secs, _ = _timed(lambda: fn(x, w), args.repeats)
                    rows.append({"tiles": dataclasses.asdict(tiles), "seconds": round(secs, 5),
                                 "tflops": round(2 * t * d * v / secs / 1e12, 1)})
                except Exception as e:
                    rows.append({"tiles": dataclasses.asdict(tiles), "error": f"{type(e).__name__}: {str(e)[:200]}"})
            ok = [r for r in rows if "seconds" in r]
            out[f"{name}_{t}"] = {"table_choice": dataclasses.asdict(table_choice), "runs": rows,
                                  "best": min(ok, key=lambda r: r["seconds"]) if ok else None}
    return out


def one_b_config():
    """A ~1B Motif-style model (1.22B parameters: grouped differential attention, PolyNorm, tied embeddings), bf16,
    cuDNN attention."""
    from motif_jax.config import ModelConfig

    return ModelConfig(vocab_size=65_536, hidden_size=2048, num_layers=16, num_heads=20, num_kv_heads=8,
                       head_dim=128, mlp_dim=8192, attention="differential", diff_ratio=4, mlp="polynorm",
                       tie_embeddings=True, max_seq_len=8192, dtype="bfloat16", param_dtype="float32", attention_impl="cudnn",
                       attention_block_q=1024, attention_block_kv=1024, remat_policy="save_attention_out")


def _model_flops(cfg, params: int, tokens: int, seq: int) -> float:
    """6 N per token (matmuls, forward + backward) + causal attention: 6 * T^2 / 2 * width per layer-pathway."""
    signal = cfg.num_query_groups * cfg.diff_ratio * (cfg.head_dim + 2 * cfg.head_dim)
    noise = cfg.num_query_groups * (cfg.head_dim + 2 * cfg.head_dim)
    return 6 * params * tokens + cfg.num_layers * 6 * (seq * seq / 2) * (signal + noise) * (tokens / seq)


def check_mfu(args: CheckArgs) -> dict:
    import dataclasses as dc

    import jax
    import jax.numpy as jnp

    from motif_jax.config import MeshConfig
    from motif_jax.parallel.mesh import make_mesh
    from motif_jax.train.config import OptimConfig
    from motif_jax.train.optim import make_optimizer, make_schedule
    from motif_jax.train.state import init_train_state
    from motif_jax.train.step import compile_train_step, lm_loss

    seq = max(512, int(8192 * args.scale))
    cfg = dc.replace(one_b_config(), max_seq_len=seq)
    mesh_cfg = MeshConfig(data=1, fsdp=1, tensor=1, context=1)
    mesh = make_mesh(mesh_cfg, jax.devices()[:1])
    optim = OptimConfig()
    tx = make_optimizer(optim, 100)
    state, graphdef, shardings = init_train_state(cfg, tx, mesh, mesh_cfg.logical_rules)
    tokens = jax.random.randint(jax.random.key(0), (1, seq), 1, cfg.vocab_size)
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1), "loss_mask": jnp.ones((1, seq), jnp.float32),
             "segment_ids": jnp.ones((1, seq), jnp.int32), "positions": jnp.arange(seq, dtype=jnp.int32)[None]}
    t0 = time.perf_counter()
    step = compile_train_step(lm_loss(graphdef), tx, mesh=mesh, state_shardings=shardings, abstract_state=state,
                              batch=batch, mesh_cfg=mesh_cfg, schedule=make_schedule(optim, 100), verbose=False)
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics["loss"]

    secs, _ = _timed(run, max(args.repeats, 5))
    params = sum(int(x.size) for x in jax.tree.leaves(state.params))
    flops = _model_flops(cfg, params, seq, seq)
    return {"params": params, "seq_len": seq, "step_seconds": round(secs, 4), "compile_seconds": round(compile_s, 1),
            "model_tflops_per_step": round(flops / 1e12, 2), "mfu": round(flops / secs / _peak(), 3),
            "memory": step.memory.as_dict()}


def check_memory(args: CheckArgs) -> dict:
    """XLA:GPU's memory_analysis of the 12.7B train step at 64K on one device, 1 and 2 layers -> 40 (no run)."""
    import dataclasses as dc

    import jax

    from motif_jax.config import MeshConfig, ModelConfig, load_yaml
    from motif_jax.parallel.mesh import make_mesh
    from motif_jax.train.config import OptimConfig
    from motif_jax.train.optim import make_optimizer, make_schedule
    from motif_jax.train.state import abstract_train_state
    from motif_jax.train.step import abstract_batch, compile_train_step, lm_loss

    seq = max(1024, int(65536 * args.scale))
    base = load_yaml(ModelConfig, ROOT / "configs/model/motif-2-12.7b.yaml")
    mesh_cfg = MeshConfig(data=1, fsdp=1, tensor=1, context=1)
    mesh = make_mesh(mesh_cfg, jax.devices()[:1])
    optim = OptimConfig()
    tx = make_optimizer(optim, 100)
    mems = []
    t0 = time.perf_counter()
    for layers in (1, 2):
        cfg = dc.replace(base, num_layers=layers, max_seq_len=seq, remat_policy="save_attention_out")
        state, graphdef, shardings = abstract_train_state(cfg, tx, mesh, mesh_cfg.logical_rules)
        step = compile_train_step(lm_loss(graphdef), tx, mesh=mesh, state_shardings=shardings, abstract_state=state,
                                  batch=abstract_batch(1, seq), mesh_cfg=mesh_cfg, schedule=make_schedule(optim, 100),
                                  verbose=False)
        mems.append(step.memory.as_dict())
    per_layer = {k: mems[1][k] - mems[0][k] for k in mems[0]}
    full = {k: mems[0][k] + per_layer[k] * (base.num_layers - 1) for k in mems[0]}
    return {"seq_len": seq, "remat": "save_attention_out", "attention_impl": base.attention_impl,
            "one_layer": mems[0], "per_layer": per_layer, "extrapolated_40_layers": full,
            "note": "one device, no sharding: arguments hold the whole 12.7B state (152 GB), so compare temporaries",
            "compile_seconds": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------------------------------------------------------------
# --build-only (no GPU needed)
# ---------------------------------------------------------------------------------------------------------------------


def _ptxas() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    for root in roots:
        for cand in (root / "cuda_nvcc" / "bin" / "ptxas", root / "cu13" / "bin" / "ptxas"):
            if cand.exists():
                return cand
    return None


def build_checks() -> dict:
    import jax
    import jax.numpy as jnp

    from motif_kernels import linear_log_probs, lowering
    from motif_kernels import lm_head_triton
    from motif_kernels.target import lowering_target

    out: dict[str, Any] = {"versions": _versions()}
    x = jnp.zeros((4096, 4096), jnp.bfloat16)
    w = jnp.zeros((4096, 32768), jnp.bfloat16)
    y = jnp.zeros((4096,), jnp.int32)
    captured: list[Any] = []
    with lowering_target("cuda") as target:
        out["target"] = {"device_kind": target.device_kind, "compute_capability": list(target.compute_capability)}
        out["triton_unavailable_reason"] = lm_head_triton.unavailable_reason()
        # 1. the Triton kernel: jax-triton compiles it to PTX while lowering (capture the PTX it produces)
        try:
            from jax_triton import triton_lib

            original = triton_lib.compile_ttir_to_ptx_inplace

            def capture(*a, **kw):
                result = original(*a, **kw)
                captured.append(result)
                return result

            triton_lib.compile_ttir_to_ptx_inplace = capture
            try:
                text = jax.jit(lambda x, w: linear_log_probs(x, w, y, with_entropy=True, impl="triton")[0]).trace(
                    x, w).lower(lowering_platforms=("cuda",)).as_text()
            finally:
                triton_lib.compile_ttir_to_ptx_inplace = original
            out["triton_lowered"] = {"custom_calls": lowering.count_targets(lowering.custom_calls(text)),
                                     "ptx_kernels": len(captured)}
        except Exception as e:
            out["triton_lowered"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        # 2. the Pallas kernel: a Triton custom call (compiled by XLA:GPU on the GPU machine)
        abstract = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
            device_kind=target.device_kind, num_cores=None, platform="gpu"))
        try:
            with jax.sharding.use_abstract_mesh(abstract):
                text = jax.jit(lambda x, w: linear_log_probs(x, w, y, impl="pallas")[0]).trace(x, w).lower(
                    lowering_platforms=("cuda",)).as_text()
            out["pallas_lowered"] = {"custom_calls": lowering.count_targets(lowering.custom_calls(text))}
        except Exception as e:
            out["pallas_lowered"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    # 3. assemble the PTX with the toolchain of the jax CUDA plugin
    ptxas = _ptxas()
    out["ptxas"] = str(ptxas) if ptxas else None
    if captured and ptxas:
        ptx = captured[0].binary
        version = re.search(r"^\.version\s+(\S+)", ptx, re.M)
        arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)  # Triton targets sm_90a on Hopper (wgmma)
        arch = arch.group(1) if arch else "sm_90"
        out["ptx_version"] = version.group(1) if version else None
        out["ptx_target"] = arch
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "kernel.ptx"
            src.write_text(ptx)
            proc = subprocess.run([str(ptxas), f"-arch={arch}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                                  capture_output=True, text=True)
            version_line = subprocess.run([str(ptxas), "--version"], capture_output=True, text=True).stdout
        regs = re.search(r"Used (\d+) registers", proc.stderr)
        spills = re.findall(r"(\d+) bytes spill (stores|loads)", proc.stderr)
        out["ptxas_sm90"] = {"ok": proc.returncode == 0, "registers": int(regs.group(1)) if regs else None,
                             "spill_bytes": sum(int(n) for n, _ in spills),
                             "ptxas_version": (version_line.strip().splitlines() or [""])[-1],
                             "log": (proc.stderr or proc.stdout)[-600:]}
    # 4. the tiny train step with cuDNN attention and the Pallas loss, lowered for CUDA
    try:
        out["train_step_lowered"] = _lower_tiny_step()
    except Exception as e:
        out["train_step_lowered"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    return out


def _lower_tiny_step() -> dict:
    import jax

    from motif_kernels import lowering
    from motif_kernels.target import lowering_target
    from motif_jax.config import MeshConfig, ModelConfig, load_yaml
    from motif_jax.parallel.mesh import make_mesh
    from motif_jax.train.config import OptimConfig, StepConfig
    from motif_jax.train.optim import make_optimizer, make_schedule
    from motif_jax.train.state import abstract_train_state
    from motif_jax.train.step import abstract_batch, lm_loss, lower_train_step

    cfg = dataclasses.replace(load_yaml(ModelConfig, ROOT / "configs/model/tiny.yaml"), attention_impl="cudnn",
                              dtype="bfloat16")
    mesh_cfg = MeshConfig(data=1, fsdp=1, tensor=1, context=1)
    mesh = make_mesh(mesh_cfg, jax.devices()[:1])
    optim = OptimConfig()
    tx = make_optimizer(optim, 100)
    with lowering_target("cuda"):
        state, graphdef, shardings = abstract_train_state(cfg, tx, mesh, mesh_cfg.logical_rules)
        text = lower_train_step(lm_loss(graphdef, StepConfig(loss_impl="pallas")), tx, mesh=mesh,
                                state_shardings=shardings, abstract_state=state, batch=abstract_batch(2, 256),
                                mesh_cfg=mesh_cfg, schedule=make_schedule(optim, 100)).as_text()
    calls = lowering.custom_calls(text)
    return {"custom_calls": lowering.count_targets(calls),
            "cudnn_mask_types": sorted({c.mask_type for c in calls if c.mask_type})}


# ---------------------------------------------------------------------------------------------------------------------
# Table and main
# ---------------------------------------------------------------------------------------------------------------------


def _flatten(prefix: str, value: Any, rows: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, rows)
    else:
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        rows.append((prefix, text if len(text) < 100 else text[:97] + "..."))


def table(report: dict) -> str:
    rows: list[tuple[str, str]] = []
    _flatten("", report, rows)
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


SECTIONS = {"loss": check_loss, "attention": check_attention, "mfu": check_mfu, "memory": check_memory,
            "tiles": check_tiles}


def main(argv: list[str] | None = None) -> int:
    import tyro

    from motif_jax.config import ConfigError, require

    args = tyro.cli(CheckArgs, args=argv, description=__doc__.split("\n\n")[0])
    for s in args.sections:
        require(s in SECTIONS, "sections", f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")
    require(args.repeats >= 1, "repeats", "must be >= 1")
    require(0 < args.scale <= 1, "scale", "must be in (0, 1]")
    t_start = time.perf_counter()
    if args.build_only:
        report: dict[str, Any] = {"mode": "build-only", **build_checks()}
    else:
        import jax

        if jax.default_backend() != "gpu":
            raise ConfigError("--build-only: no GPU here (JAX backend "
                              f"{jax.default_backend()!r}); on a CPU host run with --build-only")
        dev = jax.devices()[0]
        report = {"mode": "gpu", "date": time.strftime("%Y-%m-%d"), "device": dev.device_kind,
                  "devices": jax.device_count(), "versions": _versions(), "scale": args.scale}
        for name in args.sections:
            if time.perf_counter() - t_start > args.budget_s:
                report[name] = {"skipped": f"time budget of {args.budget_s:.0f} s used"}
                continue
            t0 = time.perf_counter()
            try:
                report[name] = SECTIONS[name](args)
            except Exception as e:  # report and go on: one broken section must not hide the others
                report[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            report[name]["section_seconds"] = round(time.perf_counter() - t0, 1)
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print(table(report))
    out = Path(args.out if not args.build_only or args.out != CheckArgs.out else "runs/gpu_check_build.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # the loss check holds ~10 GB, the memory
    from motif_jax.cli import run

    raise SystemExit(run(main))
