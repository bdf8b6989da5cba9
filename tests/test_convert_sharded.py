"""Import of a sharded Hugging Face checkpoint onto 8 simulated devices: each device's slice is read on its own (no
host copy of the model), parameters land in their target NamedShardings, and the ``--init-from`` directory restores
straight into them. Runs in a subprocess so the device count does not depend on other test modules."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    r"""
    import json, resource, sys, tracemalloc
    from pathlib import Path
    import jax, numpy as np
    from flax import nnx
    from motif_jax.config import MESH_AXES, ModelConfig
    from motif_jax.convert import ReadStats, export_hf, import_hf, load_params, param_maps, param_shardings, save_params
    from motif_jax.convert.hf_import import flatten_tree
    from motif_jax.model.transformer import create_model

    assert jax.device_count() == 8, jax.devices()
    work = Path(sys.argv[1])
    cfg = ModelConfig(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32,
                      mlp_dim=1024, qk_norm=True)
    original = flatten_tree(nnx.state(create_model(cfg, seed=3), nnx.Param))
    export_hf(nnx.state(create_model(cfg, seed=3), nnx.Param), cfg, work / "hf", max_shard_size="1MB")
    model_bytes = sum(int(np.asarray(v).nbytes) for v in original.values())
    host_original = {p: np.asarray(v) for p, v in original.items()}
    del original

    mesh = jax.make_mesh((1, 4, 2, 1), MESH_AXES)  # fsdp 4 x tensor 2
    # Host staging per parameter: traced peak while it is built minus what stays allocated afterwards. (On the CPU
    # backend device buffers are host memory too and may alias the numpy slices handed to them, so what stays is
    # device memory, not staging.)
    import motif_jax.convert.hf_import as H
    staging = []
    make_param = H._make_param

    def measured(*args, **kwargs):
        tracemalloc.reset_peak()
        array = jax.block_until_ready(make_param(*args, **kwargs))
        now, peak = tracemalloc.get_traced_memory()
        staging.append(peak - now)
        return array

    H._make_param = measured
    stats = ReadStats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    cfg2, state = import_hf(work / "hf", mesh=mesh, stats=stats)
    jax.block_until_ready(jax.tree.leaves(state))
    traced_now, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert cfg2 == cfg

    want = flatten_tree(param_shardings(cfg, mesh))
    got = flatten_tree(state)
    largest_slice = 0  # bytes of the largest single-device slice of one Hugging Face tensor
    largest_shard = 0  # bytes of the largest single-device shard of one (stacked) parameter
    for m in param_maps(cfg):
        arr = got[m.path]
        assert arr.sharding == want[m.path], (m.path, arr.sharding, want[m.path])
        np.testing.assert_array_equal(np.asarray(arr), host_original[m.path])
        shard = want[m.path].shard_shape(arr.shape)
        per_tensor = shard[1:] if m.stacked else shard
        largest_slice = max(largest_slice, int(np.prod(per_tensor)) * arr.dtype.itemsize)
        largest_shard = max(largest_shard, int(np.prod(shard)) * arr.dtype.itemsize)
    gate = got[("layers", "mlp", "gate_proj", "kernel")]
    shard_shapes = sorted({tuple(s.data.shape) for s in gate.addressable_shards})

    save_params(work / "init", cfg, state)
    cfg3, restored = load_params(work / "init", mesh=mesh)
    for path, arr in flatten_tree(restored).items():
        assert arr.sharding == want[path], path
        np.testing.assert_array_equal(np.asarray(arr), host_original[path])

    print("RESULT " + json.dumps(dict(
        model_bytes=model_bytes, largest_tensor=max(int(v.nbytes) for v in host_original.values()),
        largest_slice=largest_slice, largest_shard=largest_shard, max_staging=max(staging),
        max_read=stats.max_bytes, max_read_name=stats.max_name,
        max_read_shape=list(stats.max_shape), reads=stats.reads, read_bytes=stats.total_bytes,
        traced_peak=traced_peak, traced_kept=traced_now, rss_delta=(rss1 - rss0) * 1024, gate_shards=shard_shapes,
    )))
    """
)


def test_sharded_import_reads_only_device_slices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    print(r)
    # gate_proj [layers 4, embed 256 / fsdp 4, mlp 1024 / tensor 2] on every device
    assert r["gate_shards"] == [[4, 64, 512]]
    # no read larger than one device's slice of one Hugging Face tensor (a quarter of the largest tensor here)
    assert r["max_read"] <= r["largest_slice"] <= r["largest_tensor"] // 4
    # host staging is one device shard being assembled plus one layer's slice being read: not the model, not even
    # the host's share of one parameter (which jax.make_array_from_callback would hold)
    assert r["max_staging"] <= r["largest_shard"] + r["largest_slice"] + 64 * 1024, r
    assert r["traced_peak"] - r["traced_kept"] <= r["largest_shard"] + r["largest_slice"] + 64 * 1024, r
