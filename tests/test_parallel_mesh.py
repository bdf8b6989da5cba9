"""Mesh construction (ICI x DCN), validation against the model, and shardings derived from abstract trees."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from motif_jax.config import ConfigError, MeshConfig, ModelConfig, load_yaml
from motif_jax.parallel.mesh import (
    batch_sharding,
    fit_spec,
    make_mesh,
    mesh_shape,
    opt_state_shardings,
    validate_mesh,
)
from motif_jax.train.config import OptimConfig
from motif_jax.train.optim import make_optimizer
from motif_jax.train.state import abstract_train_state

ROOT = Path(__file__).resolve().parent.parent
TINY = load_yaml(ModelConfig, ROOT / "configs/model/tiny.yaml")
BIG = load_yaml(ModelConfig, ROOT / "configs/model/motif-2-12.7b.yaml")


def test_make_mesh_fills_and_orders_axes():
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor", "context")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "context": 1}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_hybrid_mesh_keeps_dcn_outermost():
    """2 'nodes' of 4 devices, data over DCN: each data index holds one node's devices."""
    devices = jax.devices()[:8]
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=2, dcn_data=2), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "context": 1}
    node0 = {d.id for d in mesh.devices[0].flat}
    assert node0 == {d.id for d in devices[:4]}
    # fsdp over DCN: the fsdp axis is (node, ici) with the node index outermost
    mesh = make_mesh(MeshConfig(fsdp=2, dcn_fsdp=4), devices)
    assert dict(mesh.shape)["fsdp"] == 8
    ids = [d.id for d in mesh.devices[0, :, 0, 0]]
    assert [i // 2 for i in ids] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_mesh_shape_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--mesh"):
        mesh_shape(MeshConfig(data=3, fsdp=1), 8)
    with pytest.raises(ConfigError, match="--mesh.dcn-data"):
        mesh_shape(MeshConfig(dcn_data=3), 8)


def test_validate_mesh_against_model():
    assert validate_mesh(MeshConfig(fsdp=1, context=8), BIG, num_devices=8, seq_len=65536, global_batch=1)
    assert validate_mesh(MeshConfig(fsdp=1, tensor=8), BIG, num_devices=8)
    with pytest.raises(ConfigError, match="--mesh.tensor.*query heads"):
        validate_mesh(MeshConfig(fsdp=1, tensor=4), TINY, num_devices=4)  # 10 heads
    with pytest.raises(ConfigError, match="--mesh.tensor.*differential query groups"):
        # 8 heads = 2 groups of (3 signal + 1 noise): heads and kv heads split over 4, the groups do not
        validate_mesh(MeshConfig(fsdp=1, tensor=4), dataclasses.replace(TINY, num_heads=8, diff_ratio=3),
                      num_devices=4)
    with pytest.raises(ConfigError, match="--data.seq-len.*16.*load-balanced"):
        validate_mesh(MeshConfig(fsdp=1, context=8), BIG, num_devices=8, seq_len=65536 + 8)
    with pytest.raises(ConfigError, match="--data.batch-size.*data x fsdp = 8"):
        validate_mesh(MeshConfig(fsdp=8), BIG, num_devices=8, global_batch=4)
    with pytest.raises(ConfigError, match="--data.batch-size.*2 micro-batches"):
        validate_mesh(MeshConfig(fsdp=8), BIG, num_devices=8, global_batch=8, num_microbatches=2)


def test_fit_spec_drops_axes_that_do_not_divide():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert fit_spec((3, 8), P("tensor", ("data", "fsdp")), mesh) == P(None, ("data", "fsdp"))
    assert fit_spec((4, 6), P(None, ("data", "fsdp")), mesh) == P(None, "data")


def test_param_and_optimizer_shardings_from_eval_shape():
    mesh_cfg = MeshConfig(data=1, fsdp=2, tensor=2, context=2)
    mesh = make_mesh(mesh_cfg)
    state, _, shardings = abstract_train_state(TINY, make_optimizer(OptimConfig(), 10), mesh, mesh_cfg.logical_rules)
    p = shardings.params
    # logical names -> mesh axes: q_proj [layers, embed, heads] -> (None, (fsdp, context), tensor)
    assert p["layers"]["attn"]["q_proj"]["kernel"].get_value().spec == P(None, ("fsdp", "context"), "tensor")
    assert p["embed"].get_value().spec == P("tensor", ("fsdp", "context"))
    assert p["layers"]["mlp"]["poly_weight"].get_value().spec == P(None, None)
    # abstract leaves carry their sharding; nothing was allocated
    assert isinstance(state.params["embed"].get_value(), jax.ShapeDtypeStruct)
    # optimizer moments mirror their parameter, counts are replicated
    opt = opt_state_shardings(state.opt_state, state.params, p, mesh)
    leaves = jax.tree_util.tree_leaves_with_path(opt)
    mu = [s for path, s in leaves if "mu" in jax.tree_util.keystr(path) and "q_proj" in jax.tree_util.keystr(path)]
    assert mu and all(s.spec == P(None, ("fsdp", "context"), "tensor") for s in mu)
    counts = [s for path, s in leaves if "count" in jax.tree_util.keystr(path)]
    assert counts and all(s.spec == P() for s in counts)


def test_batch_sharding():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, context=2))
    assert batch_sharding(mesh).spec == P(("data", "fsdp"), "context")
    x = jax.device_put(np.zeros((4, 16), np.int32), batch_sharding(mesh))
    assert x.addressable_shards[0].data.shape == (1, 8)
