"""Scaled RoPE from real transformers checkpoints: YaRN (Qwen3) and Llama-3 scaling import exactly (log-probs to
1e-4 in f32 at positions beyond the original context) and export round-trips bit-identically; other types are
refused naming the type; Motif's separate SubLN epsilon survives the round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from motif_jax.convert import ConversionError, build_model, config_from_hf, export_hf, import_hf

ROPE = {
    "qwen3-yarn": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16},
                   {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-llama3": ("LlamaConfig", "LlamaForCausalLM", {},
                     {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}
T = 48  # three times the original context


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("name", sorted(ROPE))
def test_scaled_rope_imports_exactly_and_exports_bit_identically(tmp_path, name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_name, model_name, extra, rope = ROPE[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.15,
        rms_norm_eps=1e-6, rope_parameters=rope, **extra)
    model = getattr(transformers, model_name)(config).eval()
    src = tmp_path / "hf"
    model.save_pretrained(src, safe_serialization=True)
    tokens = np.random.default_rng(0).integers(0, 128, (2, T))
    with torch.no_grad():
        want = _log_softmax(model(torch.tensor(tokens)).logits.numpy().astype(np.float64))

    cfg, state = import_hf(src)
    assert cfg.rope_scaling.type == rope["rope_type"] and cfg.rope_scaling.factor == rope["factor"]
    ours = build_model(cfg, state)
    hidden, _ = ours(np.asarray(tokens, np.int32))
    got = _log_softmax(np.asarray(ours.logits(hidden), np.float64))
    np.testing.assert_allclose(got[:, 16:], want[:, 16:], atol=1e-4)  # beyond the original context
    np.testing.assert_allclose(got, want, atol=1e-4)

    out = export_hf(state, cfg, tmp_path / "out")
    again, _ = config_from_hf(json.loads((out / "config.json").read_text()))
    assert again == cfg
    original, exported = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert original.keys() == exported.keys()
    for k in original:
        assert original[k].dtype == exported[k].dtype and np.array_equal(original[k], exported[k]), k


def test_unsupported_rope_types_are_named_and_can_be_dropped():
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
          "num_attention_heads": 2, "intermediate_size": 16,
          "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}
    with pytest.raises(ConversionError, match="rope type 'longrope' is not supported.*--drop-rope-scaling"):
        config_from_hf(hf)
    with pytest.warns(UserWarning, match="dropped"):
        cfg, _ = config_from_hf(hf, drop_rope_scaling=True)
    assert cfg.rope_scaling.type == "none"


def test_motif_attention_norm_epsilon_round_trips():
    from motif_jax.convert.mapping import config_to_hf

    hf = {"architectures": ["MotifForCausalLM"], "vocab_size": 16, "hidden_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 10, "num_key_value_heads": 4, "num_noise_heads": 2, "intermediate_size": 64,
          "head_dim": 8, "rms_norm_eps": 1e-6, "attn_rms_norm_eps": 1e-5,
          "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096}}
    cfg, _ = config_from_hf(hf)
    assert cfg.attn_norm_eps == 1e-5 and cfg.norm_eps == 1e-6 and cfg.rope_scaling.type == "yarn"
    back = config_to_hf(cfg)
    assert back["attn_rms_norm_eps"] == 1e-5 and back["rope_scaling"]["factor"] == 2.0
    assert config_from_hf(back)[0] == cfg
