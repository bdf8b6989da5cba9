"""Hugging Face interop with real transformers models: Llama and Qwen3 import / export / round trip, the
``--init-from`` layout, and the errors a user can cause."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from safetensors.numpy import load_file

from motif_jax.convert import (
    ConversionError,
    ReadStats,
    build_model,
    check_same_architecture,
    config_from_hf,
    export_hf,
    export_pretrained,
    import_hf,
    load_params,
    save_params,
)

# transformers classes by name, imported lazily (torch is imported by the first test that needs it, not at collection)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
}
TOKENIZER_JSON = json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}})


def _tokens():
    return np.random.default_rng(0).integers(0, 128, (2, 13))


def _torch():
    return pytest.importorskip("torch")


def _hf_logits(model, tokens):
    torch = _torch()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


_BUILT: dict = {}


def _build(name, tmp_path_factory):
    """A tiny random float32 model saved in several safetensors shards, and its logits on fixed tokens (cached)."""
    if name in _BUILT:
        return _BUILT[name]
    torch = _torch()
    transformers = pytest.importorskip("transformers")
    config_name, model_name, extra = ARCHS[name]
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.15,
        rms_norm_eps=1e-6, **extra,
    )
    model = model_cls(config).eval()
    with torch.no_grad():  # norms are initialised to ones; make them random so a wrong mapping shows up
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(name) / "hf"
    model.save_pretrained(path, safe_serialization=True, max_shard_size="40KB")
    (path / "tokenizer.json").write_text(TOKENIZER_JSON)
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 3
    _BUILT[name] = (name, model_cls, path, _hf_logits(model, _tokens()))
    return _BUILT[name]


@pytest.fixture(scope="module", params=list(ARCHS))
def hf_model(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory)


def test_import_matches_transformers_logits(hf_model):
    name, _, path, ref = hf_model
    stats = ReadStats()
    cfg, state = import_hf(path, stats=stats)
    assert cfg.qk_norm == (name == "qwen3") and cfg.num_kv_heads == 2 and cfg.head_dim == 16
    model = build_model(cfg, state)
    ours = np.asarray(model.logits(model(jnp.asarray(_tokens(), jnp.int32))[0]))
    assert np.abs(ref).max() > 1.0  # logits large enough for the comparison to mean something
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert stats.max_bytes <= 128 * 64 * 4  # no read larger than the largest single tensor


def test_export_loads_in_transformers_and_round_trips_bit_exactly(hf_model, tmp_path):
    _, model_cls, path, ref = hf_model
    cfg, state = import_hf(path)
    out = export_hf(state, cfg, tmp_path / "out", max_shard_size="50KB", tokenizer_dir=path)
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    reloaded = model_cls.from_pretrained(out, dtype=_torch().float32).eval()
    np.testing.assert_allclose(_hf_logits(reloaded, _tokens()), ref, atol=1e-5, rtol=0)

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    original, exported = tensors(path), tensors(out)
    assert sorted(original) == sorted(exported)
    for name, a in original.items():
        b = exported[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), f"{name} changed in the round trip"


def test_init_from_layout_round_trip(hf_model, tmp_path):
    _, model_cls, path, ref = hf_model
    cfg, state = import_hf(path)
    init = save_params(tmp_path / "init", cfg, state, tokenizer_dir=path,
                       hf_config=json.loads((path / "config.json").read_text()))
    assert {"model.yaml", "params", "tokenizer.json", "hf_config.json"} <= {p.name for p in init.iterdir()}
    cfg2, state2 = load_params(init)
    assert cfg2 == cfg
    check_same_architecture(cfg2, cfg)
    model = build_model(cfg2, state2)
    ours = np.asarray(model.logits(model(jnp.asarray(_tokens(), jnp.int32))[0]))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # --init-from also takes the Hugging Face directory itself
    cfg3, _ = load_params(path)
    assert cfg3 == cfg
    # and an --init-from directory exports back (tokenizer and token ids carried along)
    out = export_pretrained(init, tmp_path / "hf_again", max_shard_size="1MB")
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    reloaded = model_cls.from_pretrained(out, dtype=_torch().float32).eval()
    np.testing.assert_allclose(_hf_logits(reloaded, _tokens()), ref, atol=1e-5, rtol=0)
    with pytest.raises(ConversionError, match="--model.mlp-dim"):
        import dataclasses

        check_same_architecture(cfg2, dataclasses.replace(cfg, mlp_dim=256))


# ---------------------------------------------------------------------------------------------------------------------
# Errors a user can cause
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def llama_copy(tmp_path_factory, tmp_path):
    _, _, path, _ = _build("llama", tmp_path_factory)
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def _edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_unsupported_architecture_is_named(llama_copy):
    _edit_json(llama_copy / "config.json", lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ConversionError, match=r"GPT2LMHeadModel.*supported: LlamaForCausalLM, Qwen3ForCausalLM"):
        import_hf(llama_copy)


def test_missing_shard_file_is_named(llama_copy):
    victim = sorted(llama_copy.glob("model-*.safetensors"))[2]
    victim.unlink()
    with pytest.raises(ConversionError, match=f"shard file {victim.name}"):
        import_hf(llama_copy)


def test_missing_tensor_is_named(llama_copy):
    _edit_json(llama_copy / "model.safetensors.index.json",
               lambda i: i["weight_map"].pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ConversionError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        import_hf(llama_copy)


def test_shape_mismatch_names_tensor_and_shapes(llama_copy):
    _edit_json(llama_copy / "config.json", lambda c: c.update(intermediate_size=96))
    expected = r"model\.layers\.0\.mlp\.gate_proj\.weight.*\[128, 64\], expected \[96, 64\]"
    with pytest.raises(ConversionError, match=expected):
        import_hf(llama_copy)


def test_unsupported_config_features_are_named(llama_copy):
    cfg = json.loads((llama_copy / "config.json").read_text())
    with pytest.raises(ConversionError, match="attention_bias=True"):
        config_from_hf({**cfg, "attention_bias": True})
    with pytest.raises(ConversionError, match="hidden_act='gelu'"):
        config_from_hf({**cfg, "hidden_act": "gelu"})
    dynamic = {**cfg, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}}
    with pytest.raises(ConversionError, match=r"rope type 'dynamic' is not supported.*drop-rope-scaling"):
        config_from_hf(dynamic)
    with pytest.warns(UserWarning, match="dropped"):
        model_cfg, _ = config_from_hf(dynamic, drop_rope_scaling=True)
    assert model_cfg.rope_theta == 1e6 and model_cfg.rope_scaling.type == "none"
    # supported types need their parameters (tests/test_convert_rope.py imports them exactly)
    with pytest.raises(ConversionError, match=r"original-max-len"):
        config_from_hf({**cfg, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


def test_export_refuses_incompatible_architecture(hf_model, tmp_path):
    name, _, path, _ = hf_model
    cfg, state = import_hf(path)
    wrong = "LlamaForCausalLM" if name == "qwen3" else "Qwen3ForCausalLM"
    with pytest.raises(ConversionError, match="qk_norm"):
        export_hf(state, cfg, tmp_path / "x", arch=wrong)
    with pytest.raises(ConversionError, match="not supported|supported"):
        export_hf(state, cfg, tmp_path / "y", arch="GPT2LMHeadModel")
