"""What SFT and RL share: restore-or-init with --init-from (ours or a Hugging Face directory) keeping the flags'
run-time model fields, and reproducible runs (the same seeded config gives the same losses and parameters)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from motif_jax.config import ModelConfig, from_dict
from motif_jax.convert import export_hf
from motif_jax.model.transformer import create_model
from motif_jax.rl.config import RLConfig, RolloutConfig, UpdateConfig
from motif_jax.train.checkpoint import save_policy
from motif_jax.train.config import EvalConfig
from motif_jax.train.sft import SFTConfig, SFTTrainer, run_sft

ROOT = Path(__file__).resolve().parent.parent
# a Llama-shaped policy (standard attention, SwiGLU): exportable to Hugging Face
POLICY = ModelConfig(vocab_size=272, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     mlp_dim=64, max_seq_len=128)
RUNTIME = dict(dtype="bfloat16", attention_impl="blockwise", attention_block_q=16, attention_block_kv=16,
               remat_policy="full")
SOURCE = "synthetic:addition?style=aligned&n=400&min_digits=1&max_digits=2&split=train"


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    """The same parameters as our policy directory and as a Hugging Face directory."""
    root = tmp_path_factory.mktemp("policies")
    _, params = nnx.split(create_model(POLICY, seed=3))
    ours = save_policy(root / "ours", POLICY, params, "byte", source="test")
    hf = export_hf(params, POLICY, root / "hf")
    return {"ours": ours, "hf": hf}, jax.tree.map(np.asarray, params)


def _sft_cfg(run_dir: Path, steps: int = 2, **kw) -> SFTConfig:
    return from_dict(SFTConfig, {
        "data": {"tokenizer": "byte", "seq_len": 64, "batch_size": 8, "sources": [{"path": SOURCE}],
                 "stages": [{"name": "main", "steps": steps}]},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "checkpoint": {"save_every": 0, "async_save": False},
        "mesh": {"data": 1, "fsdp": -1},
        "log_every": 1,
        "run_dir": str(run_dir),
        **kw,
    }, base_dir=ROOT)


def _rl_cfg(run_dir: Path, init_from: str, model: ModelConfig) -> RLConfig:
    return RLConfig(model=model, init_from=init_from, run_dir=str(run_dir), rounds=1, verifiers=("exact",),
                    prompts="synthetic:addition?split=train&n=16&max_digits=1",
                    eval=EvalConfig(heldout=""), rollout=RolloutConfig(group_size=2, max_new_tokens=8,
                                                                       max_prompt_len=32),
                    update=UpdateConfig(groups_per_round=4))


def _assert_same_params(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("kind", ["ours", "hf"])
def test_init_from_keeps_the_flags_runtime_fields_in_sft_and_rl(tmp_path, policies, kind):
    """--init-from brings the architecture and the parameters (restored into their shardings); --model.dtype,
    --model.attention-impl and --model.remat-policy (and the blocks) still apply, in SFT and in RL alike."""
    from motif_jax.rl.loop import RLTrainer

    dirs, params = policies
    flags = dataclasses.replace(ModelConfig(), **RUNTIME)  # default architecture fields: the policy's must win
    sft = SFTTrainer(_sft_cfg(tmp_path / "sft", init_from=str(dirs[kind]), model=dataclasses.asdict(flags)))
    rl = RLTrainer(_rl_cfg(tmp_path / "rl", str(dirs[kind]), flags))
    for trainer in (sft, rl):
        cfg = trainer.model_cfg
        assert {k: getattr(cfg, k) for k in RUNTIME} == RUNTIME
        assert (cfg.hidden_size, cfg.num_layers, cfg.mlp_dim) == (32, 2, 64)  # the policy's architecture
        _assert_same_params(trainer.state.params, params)
        assert trainer.tokenizer_spec == "byte"
    summary = sft.run()  # two steps with the loaded policy in bf16, blockwise attention, full remat
    assert summary["status"] == "finished" and summary["steps"] == 2
    assert rl.run_unit(0)["rollouts_round"] > 0
    rl.close()


def test_sft_and_rl_refuse_a_tokenizer_beside_init_from(tmp_path, policies):
    from motif_jax.config import ConfigError

    dirs, _ = policies
    data = {"tokenizer": "missing/tokenizer.json", "seq_len": 64, "batch_size": 8, "sources": [{"path": SOURCE}],
            "stages": [{"name": "main", "steps": 2}]}
    with pytest.raises(ConfigError, match="--data.tokenizer"):
        SFTTrainer(_sft_cfg(tmp_path / "sft", init_from=str(dirs["ours"]), data=data))


def test_the_same_seeded_sft_config_gives_the_same_losses_and_parameters(tmp_path):
    """Two runs of one config and seed: every logged loss and the final parameters are bit-identical."""
    runs = [run_sft(_sft_cfg(tmp_path / name, steps=4, model=dataclasses.asdict(POLICY))) for name in "ab"]
    logs = []
    for name in "ab":
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        logs.append([(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, lines) if r["split"] == "train"])
    assert len(logs[0]) == 4 and logs[0] == logs[1]
    from motif_jax.train.checkpoint import load_policy

    _, pa, _ = load_policy(runs[0]["final_policy"])
    _, pb, _ = load_policy(runs[1]["final_policy"])
    _assert_same_params(pa, jax.tree.map(np.asarray, pb))
