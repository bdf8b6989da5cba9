"""The GPU program, proven from this CPU: lowering for CUDA (``motif_kernels.target.lowering_target("cuda")`` +
``lowering_platforms=("cuda",)``) with no GPU and no jax CUDA plugin installed.

What is asserted is the program an H100 would receive: cuDNN fMHA custom calls with a causal mask type and no
O(T^2) operand (at the 12.7B preset's T = 65,536), the Pallas kernel lowered to a Triton custom call (never the
interpreter), and backend choices that follow the lowering target rather than this host's CPU backend.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from motif_kernels import linear_log_probs, lowering, resolve_impl
from motif_kernels import lm_head as lm_head_lib
from motif_kernels.attention_cudnn import layout
from motif_kernels.target import current_target, lowering_target
from motif_jax.config import MeshConfig, ModelConfig, load_yaml
from motif_jax.model.attention import AttentionBackendError, attend, resolve_impl as attention_impl
from motif_jax.model.layers import Attention
from motif_jax.parallel.mesh import make_mesh
from motif_jax.train.config import OptimConfig, StepConfig
from motif_jax.train.optim import make_optimizer, make_schedule
from motif_jax.train.state import abstract_train_state
from motif_jax.train.step import abstract_batch, lm_loss, lower_train_step

ROOT = Path(__file__).resolve().parent.parent
FMHA = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")
TRITON = "__gpu$xla.gpu.triton"
CAUSAL = {"CAUSAL", "PADDING_CAUSAL"}


def _lower_tiny_step(loss_impl: str) -> str:
    cfg = dataclasses.replace(load_yaml(ModelConfig, ROOT / "configs/model/tiny.yaml"), attention_impl="cudnn",
                              dtype="bfloat16")
    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=1, context=2)  # context parallel: the heads exchange path
    mesh = make_mesh(mesh_cfg, jax.devices()[:8])
    optim = OptimConfig()
    tx = make_optimizer(optim, 100)
    with lowering_target("cuda"):
        state, graphdef, shardings = abstract_train_state(cfg, tx, mesh, mesh_cfg.logical_rules)
        lowered = lower_train_step(lm_loss(graphdef, StepConfig(loss_impl=loss_impl)), tx, mesh=mesh,
                                   state_shardings=shardings, abstract_state=state, batch=abstract_batch(4, 256),
                                   mesh_cfg=mesh_cfg, schedule=make_schedule(optim, 100))
    return lowered.as_text()


@pytest.mark.parametrize("loss_impl", ["xla", "pallas"])
def test_tiny_train_step_lowers_for_cuda_with_cudnn_attention(loss_impl):
    calls = lowering.custom_calls(_lower_tiny_step(loss_impl))
    targets = lowering.count_targets(calls)
    assert all(targets.get(name, 0) > 0 for name in FMHA), targets  # forward and backward kernels
    masks = {c.mask_type for c in calls if c.target in FMHA}
    assert masks and masks <= CAUSAL, masks
    for c in calls:  # no [T, S] bias or mask operand: at most one dimension as long as a local sequence (128)
        if c.target in FMHA:
            assert all(sum(d >= 128 for d in t.shape) <= 1 for t in (*c.operands, *c.results)), c
    if loss_impl == "pallas":  # the Triton lowering of the Pallas kernel, not the interpreter (a scan)
        assert targets.get(TRITON, 0) >= 1, targets
    else:
        assert TRITON not in targets


def _preset_attention_lowered(seq_len: int) -> list[lowering.CustomCall]:
    cfg = load_yaml(ModelConfig, ROOT / "configs/model/motif-2-12.7b.yaml")
    assert cfg.attention_impl == "cudnn" and cfg.attention == "differential"
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Attention(cfg, rngs=nnx.Rngs(0))))
    s = jax.ShapeDtypeStruct
    x = s((1, seq_len, cfg.hidden_size), jnp.bfloat16)
    ids = s((1, seq_len), jnp.int32)

    def loss(params, x, seg, pos):
        out, _ = nnx.merge(graphdef, params)(x, seg, pos, jnp.int32(3))
        return jnp.sum(out.astype(jnp.float32))

    with lowering_target("cuda"):
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(params, x, ids, ids).lower(
            lowering_platforms=("cuda",)).as_text()
    return lowering.custom_calls(text)


def test_12b_attention_at_64k_has_causal_cudnn_calls_and_no_quadratic_operand():
    t = 65_536
    calls = [c for c in _preset_attention_lowered(t) if c.target in FMHA]
    assert {c.target for c in calls} == set(FMHA)
    assert {c.mask_type for c in calls} <= CAUSAL
    for c in calls:
        for tensor in (*c.operands, *c.results):
            # O(T) per head: at most one dimension as large as the sequence ([T, S] would have two)
            assert sum(d >= t for d in tensor.shape) <= 1, (c.target, tensor)
            assert tensor.bytes < 2**31, (c.target, tensor)  # q/k/v/o/stats are at most 256 MiB per call here
    # differential attention, unpacked rows: one call per pathway with the [V1|V2] value of width 256
    widths = {c.operands[2].shape[-1] for c in calls if c.target == FMHA[0]}
    assert 256 in widths


def test_12b_train_step_at_64k_lowers_for_cuda_through_the_planner():
    """The recommended 8-GPU layout (context 8): the whole train step, RL update and log-prob pass lower for
    CUDA; every cuDNN operand is O(T) and the plan names no [T, T] or [T, V] buffer."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/memory_plan.py"), "--config", "motif-2-12.7b", "--devices", "8",
         "--mesh.fsdp", "1", "--mesh.context", "8", "--seq-len", "65536", "--remat", "save_attention_out",
         "--lower-for", "cuda", "--no-compile"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    assert plan["lowered_for"] == "cuda" and plan["attention_impl"] == "cudnn" and plan["compiler"] is None
    assert all(plan["custom_calls"].get(name, 0) > 0 for name in FMHA), plan["custom_calls"]
    assert set(plan["cudnn_mask_types"]) <= CAUSAL
    assert plan["quadratic_buffers"] == []
    assert all(sum(d >= 65536 // 8 for d in shape) <= 1 for shape in plan["attention_shapes"]), plan["attention_shapes"]
    for name in ("rl_update", "rl_log_probs"):
        assert plan["functions"][name]["custom_calls"].get(FMHA[0], 0) > 0
    for key in ("largest_buffers", "custom_calls"):
        assert plan[key]
    assert {"shape", "dtype", "bytes"} <= set(plan["largest_buffers"][0])


def test_lowering_for_cuda_never_picks_interpret_mode():
    x, w, y = jnp.zeros((256, 64), jnp.bfloat16), jnp.zeros((64, 512), jnp.bfloat16), jnp.zeros((256,), jnp.int32)
    make = lambda: lm_head_lib._make_plan(x, w, y, with_entropy=True, impl="pallas", token_chunk=None,
                                          vocab_block=None, valid_vocab=None)
    assert make().interpret  # run here, on this CPU: the interpreter
    with lowering_target("cuda") as target:
        assert current_target().platform == "gpu" and target.compute_capability == (9, 0)
        plan = make()
        assert not plan.interpret and plan.kernel_tiles.block_t >= 64
        abstract = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
            device_kind=target.device_kind, num_cores=None, platform="gpu"))
        f = lambda x, w: linear_log_probs(x, w, y, with_entropy=True, impl="pallas")[0].sum()
        with jax.sharding.use_abstract_mesh(abstract):
            text = jax.jit(jax.grad(f, (0, 1))).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert lowering.count_targets(lowering.custom_calls(text)).get(TRITON) == 1


def test_backend_choices_follow_the_target_not_the_host():
    assert jax.default_backend() == "cpu"
    assert attention_impl("auto", jnp.bfloat16) == "blockwise"
    with lowering_target("cuda"):
        assert attention_impl("auto", jnp.bfloat16) == "cudnn"
        assert attention_impl("auto", jnp.float32) == "blockwise"  # cuDNN flash attention takes bf16/fp16 only
        assert resolve_impl("auto") == "xla"  # the LM head: xla until a GPU measurement says otherwise
        assert lm_head_lib.default_blocks() == (4096, 8192)
    with lowering_target("tpu"):
        assert attention_impl("auto", jnp.bfloat16) == "splash"
        from motif_kernels import BackendUnavailableError

        with pytest.raises(BackendUnavailableError, match="lowered for 'tpu'"):
            resolve_impl("pallas")


def test_cudnn_refuses_what_it_cannot_run_with_the_flag_to_change():
    q = jnp.zeros((1, 8, 2, 16), jnp.float32)
    ids = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(AttentionBackendError, match="CUDA GPU target.*'cpu'.*blockwise"):
        attend(q, q, q, ids, ids, ids, ids, impl="cudnn")
    with lowering_target("cuda"), pytest.raises(AttentionBackendError, match="bfloat16 or float16.*--model.dtype"):
        jax.jit(lambda q: attend(q, q, q, ids, ids, ids, ids, impl="cudnn")).trace(q)


def _rule(seg, pos):
    """The model's mask [B, T, T]: same segment and position[i] >= position[j]."""
    return (seg[:, :, None] == seg[:, None, :]) & (pos[:, :, None] >= pos[:, None, :])


def _cudnn_ragged_mask(lay, t):
    """What cuDNN's ragged causal call computes: token i of run r sees tokens j <= i of run r."""
    starts, lengths = np.asarray(lay.starts), np.asarray(lay.lengths)
    out = np.zeros((starts.shape[0], t, t), bool)
    for b in range(starts.shape[0]):
        for s0, n in zip(starts[b], lengths[b]):
            if n > 0:
                out[b, s0:s0 + n, s0:s0 + n] = np.tril(np.ones((n, n), bool))
    return out


def _packed(rng, t, max_runs):
    seg, pos = np.zeros(t, np.int32), np.zeros(t, np.int32)
    cuts = np.sort(rng.choice(np.arange(1, t), size=max_runs - 1, replace=False))
    sid = 0
    for a, b in zip([0, *cuts], [*cuts, t]):
        if rng.random() < 0.25:  # a padding run
            continue
        sid += 1
        seg[a:b], pos[a:b] = sid, np.arange(b - a)
    return seg, pos


def test_packed_layout_conversion_gives_cudnn_exactly_the_model_mask():
    rng = np.random.default_rng(0)
    t = 48
    rows = [_packed(rng, t, int(rng.integers(1, 7))) for _ in range(16)]
    seg, pos = (jnp.asarray(np.stack(a)) for a in zip(*rows))
    lay = layout(seg, pos, max_segments=8)
    assert bool(lay.natural)
    real = np.asarray(seg) > 0
    ours, theirs = np.asarray(_rule(seg, pos)), _cudnn_ragged_mask(lay, t)
    np.testing.assert_array_equal(ours[real], theirs[real])  # every real query row: the same keys
    # single rows (one segment + trailing padding) are recognised, with their length
    one = jnp.asarray([[1] * 30 + [0] * 18], jnp.int32)
    lay1 = layout(one, jnp.asarray([list(range(30)) + [0] * 18], jnp.int32))
    assert bool(lay1.single) and int(lay1.first_length[0]) == 30 and not bool(lay.single)


@pytest.mark.parametrize("case", ["permuted", "repeated_id", "positions_not_restarting", "too_many_runs"])
def test_layouts_cudnn_cannot_express_are_detected(case):
    t = 32
    seg = np.repeat(np.arange(1, 5), 8).astype(np.int32)[None]
    pos = np.tile(np.arange(8), 4).astype(np.int32)[None]
    if case == "permuted":  # the load-balanced context layout, or any reordering
        perm = np.random.default_rng(1).permutation(t)
        seg, pos = seg[:, perm], pos[:, perm]
    elif case == "repeated_id":  # segment 1 again after segment 2: the model joins them, cuDNN would not
        seg[0, 16:24] = 1
    elif case == "positions_not_restarting":
        pos = np.arange(t, dtype=np.int32)[None]
    lay = layout(jnp.asarray(seg), jnp.asarray(pos), max_segments=3 if case == "too_many_runs" else 8)
    assert not bool(lay.natural)


def test_kv_cache_decoding_with_cudnn_uses_a_bias_call_for_cuda():
    """Queries and keys of different lengths (generation over a KV cache): the explicit mask becomes an additive
    [B, 1, T, S] bias (T is a prompt bucket or 1 there), lowered without any host GPU check."""
    q = jax.ShapeDtypeStruct((2, 4, 8, 64), jnp.float16)
    kv = jax.ShapeDtypeStruct((2, 16, 2, 64), jnp.float16)
    qi, ki = jax.ShapeDtypeStruct((2, 4), jnp.int32), jax.ShapeDtypeStruct((2, 16), jnp.int32)
    with lowering_target("cuda"):
        text = jax.jit(lambda q, k, v, qs, ks, qp, kp: attend(q, k, v, qs, ks, qp, kp, impl="cudnn")).trace(
            q, kv, kv, qi, ki, qi, ki).lower(lowering_platforms=("cuda",)).as_text()
    calls = [c for c in lowering.custom_calls(text) if c.target.startswith("__cudnn$fmha")]
    assert [c.target for c in calls] == ["__cudnn$fmhaScaleBiasSoftmax"] and calls[0].mask_type == "NO_MASK"
    assert calls[0].operands[3].shape == (2, 1, 4, 16)
