"""Motif-2 import/export against a synthetic checkpoint in the Hub's naming, checked with an independent NumPy forward
pass written from the formulas in reference/recipe.md (grouped differential attention, PolyNorm, SubLN, RoPE)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from motif_jax.convert import ConversionError, build_model, config_from_hf, export_hf, import_hf

# Two query groups of (4 signal + 1 noise) heads, two (K1/V1, K2/V2) pairs, as in the 12.7B model (8 groups).
HF_CONFIG = {
    "architectures": ["MotifForCausalLM"],
    "model_type": "Motif",
    "vocab_size": 96,
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 10,
    "num_noise_heads": 2,
    "num_key_value_heads": 4,
    "k_ratio": 1,
    "head_dim": 8,
    "rms_norm_eps": 1e-6,
    "attn_rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "hidden_act": "poly_norm",
    "use_bias": False,
    "torch_dtype": "float32",
}


def synthetic_motif(hf=HF_CONFIG, seed=0) -> dict[str, np.ndarray]:
    """Random float32 tensors named and shaped as Motif's Hub checkpoints (nn.Linear weights are [out, in])."""
    rng = np.random.default_rng(seed)
    d, f, hd, v = hf["hidden_size"], hf["intermediate_size"], hf["head_dim"], hf["vocab_size"]
    nh, nkv = hf["num_attention_heads"], hf["num_key_value_heads"]
    noise = hf.get("num_noise_heads") or nh // 2
    n_signal = nh - noise

    def w(*shape, std=0.15):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    t = {"model.embed_tokens.weight": w(v, d, std=1.0), "model.norm.weight": 1 + w(d, std=0.1),
         "lm_head.weight": w(v, d, std=0.3)}
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= {
            p + "input_layernorm.weight": 1 + w(d, std=0.1),
            p + "post_attention_layernorm.weight": 1 + w(d, std=0.1),
            p + "self_attn.q_proj.weight": w(nh * hd, d, std=0.3),
            p + "self_attn.k_proj.weight": w(nkv * hd, d, std=0.3),
            p + "self_attn.v_proj.weight": w(nkv * hd, d),
            p + "self_attn.o_proj.weight": w(d, n_signal * 2 * hd),
            p + "self_attn.lambda_q1": w(hd, std=0.3),
            p + "self_attn.lambda_k1": w(hd, std=0.3),
            p + "self_attn.lambda_q2": w(hd, std=0.3),
            p + "self_attn.lambda_k2": w(hd, std=0.3),
            p + "self_attn.subln.weight": 1 + w(2 * hd, std=0.1),
            p + "mlp.gate_proj.weight": w(f, d),
            p + "mlp.up_proj.weight": w(f, d),
            p + "mlp.down_proj.weight": w(d, f),
            p + "mlp.act_fn.weight": (1 / 3 + w(3, std=0.1)),
            p + "mlp.act_fn.bias": w(1, std=0.1),
        }
    return t


def write_checkpoint(path, tensors, hf=HF_CONFIG, files=2):
    """Shards without an index file (the reader must discover the names)."""
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    for k in range(files):
        save_file({n: tensors[n] for n in names[k::files]}, str(path / f"part-{k}.safetensors"))
    (path / "config.json").write_text(json.dumps(hf))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The reference forward, from recipe.md's formulas (float64, one sequence, causal).
# ---------------------------------------------------------------------------------------------------------------------


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_rotate_half(x, theta):
    """x: [T, H, D]; NeoX style: x * cos + rotate_half(x) * sin, frequencies theta^(-2j/D) repeated over both halves."""
    t, _, dim = x.shape
    freq = theta ** (-np.arange(0, dim, 2) / dim)  # [D/2]
    angle = np.arange(t)[:, None] * np.concatenate([freq, freq])[None, :]  # [T, D]
    rotated = np.concatenate([-x[..., dim // 2 :], x[..., : dim // 2]], axis=-1)
    return x * np.cos(angle)[:, None, :] + rotated * np.sin(angle)[:, None, :]


def softmax_attention(q, k, v):
    """q [T, D], k [T, D], v [T, Dv]: causal softmax(q k^T / sqrt(D)) v."""
    s = q @ k.T / np.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones_like(s, dtype=bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def polynorm(x, w, b, eps=1e-6):
    def n(z):
        return z / np.sqrt(np.mean(z * z, axis=-1, keepdims=True) + eps)

    return w[0] * n(x**3) + w[1] * n(x**2) + w[2] * n(x) + b[0]


def reference_logits(t, hf, tokens):
    t = {k: v.astype(np.float64) for k, v in t.items()}
    hd, nh, nkv, eps = hf["head_dim"], hf["num_attention_heads"], hf["num_key_value_heads"], hf["rms_norm_eps"]
    groups = hf["num_noise_heads"]
    ratio = (nh - groups) // groups  # signal heads per group
    pairs = nkv // 2
    x = t["model.embed_tokens.weight"][tokens]  # [T, d]
    T = len(tokens)
    for layer in range(hf["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rmsnorm(x, t[p + "input_layernorm.weight"], eps)
        q = rope_rotate_half((h @ t[p + "self_attn.q_proj.weight"].T).reshape(T, nh, hd), hf["rope_theta"])
        k = rope_rotate_half((h @ t[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd), hf["rope_theta"])
        v = (h @ t[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd)
        lam_init = 0.8 - 0.6 * np.exp(-0.3 * (layer - 1))
        lam = (np.exp(t[p + "self_attn.lambda_q1"] @ t[p + "self_attn.lambda_k1"])
               - np.exp(t[p + "self_attn.lambda_q2"] @ t[p + "self_attn.lambda_k2"]) + lam_init)
        outs = []
        for g in range(groups):  # heads g*(ratio+1) .. +ratio-1 are signal, head g*(ratio+1)+ratio is noise
            pair = g // (groups // pairs)  # K/V pair serving this group; even K/V heads signal, odd heads noise
            k1, k2 = k[:, 2 * pair], k[:, 2 * pair + 1]
            v12 = np.concatenate([v[:, 2 * pair], v[:, 2 * pair + 1]], axis=-1)  # [V1 | V2], width 2 hd
            noise = softmax_attention(q[:, g * (ratio + 1) + ratio], k2, v12)
            for i in range(ratio):
                signal = softmax_attention(q[:, g * (ratio + 1) + i], k1, v12)
                outs.append(rmsnorm(signal - lam * noise, t[p + "self_attn.subln.weight"], eps) * (1 - lam_init))
        x = x + np.concatenate(outs, axis=-1) @ t[p + "self_attn.o_proj.weight"].T
        h = rmsnorm(x, t[p + "post_attention_layernorm.weight"], eps)
        act = polynorm(h @ t[p + "mlp.gate_proj.weight"].T, t[p + "mlp.act_fn.weight"], t[p + "mlp.act_fn.bias"])
        x = x + (act * (h @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
    return rmsnorm(x, t["model.norm.weight"], eps) @ t["lm_head.weight"].T


@pytest.fixture(scope="module")
def motif_dir(tmp_path_factory):
    tensors = synthetic_motif()
    return write_checkpoint(tmp_path_factory.mktemp("motif") / "hf", tensors), tensors


def test_motif_import_matches_numpy_reference(motif_dir):
    path, tensors = motif_dir
    cfg, state = import_hf(path)
    assert (cfg.attention, cfg.mlp, cfg.diff_ratio, cfg.num_query_groups, cfg.num_kv_groups) == (
        "differential", "polynorm", 4, 2, 2)
    tokens = np.random.default_rng(1).integers(0, HF_CONFIG["vocab_size"], 12)
    ref = reference_logits(tensors, HF_CONFIG, tokens)
    model = build_model(cfg, state)
    ours = np.asarray(model.logits(model(jnp.asarray(tokens[None], jnp.int32))[0]))[0]
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_motif_tied_bfloat16_checkpoint(tmp_path):
    """Tied embeddings (no lm_head.weight, as Motif-2.6B) stored in bfloat16, imported to float32."""
    import ml_dtypes

    hf = HF_CONFIG | {"tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    tensors = synthetic_motif(hf, seed=2)
    del tensors["lm_head.weight"]
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    path = write_checkpoint(tmp_path / "hf", tensors, hf)
    cfg, state = import_hf(path)
    assert cfg.tie_embeddings and cfg.param_dtype == "float32"
    tokens = np.random.default_rng(1).integers(0, hf["vocab_size"], 12)
    as32 = {k: v.astype(np.float32) for k, v in tensors.items()}
    ref = reference_logits(as32 | {"lm_head.weight": as32["model.embed_tokens.weight"]}, hf, tokens)
    model = build_model(cfg, state)
    ours = np.asarray(model.logits(model(jnp.asarray(tokens[None], jnp.int32))[0]))[0]
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # exported back in bfloat16: the same bits as the source
    out = export_hf(state, cfg, tmp_path / "out", dtype="bfloat16")
    exported = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in exported and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for name, a in tensors.items():
        assert exported[name].dtype == a.dtype and exported[name].tobytes() == a.tobytes(), name


def test_motif_export_writes_hub_naming_bit_exactly(motif_dir, tmp_path):
    path, tensors = motif_dir
    cfg, state = import_hf(path)
    out = export_hf(state, cfg, tmp_path / "out", max_shard_size="20KB")
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["MotifForCausalLM"] and hf["model_type"] == "Motif"
    for key in ("num_attention_heads", "num_noise_heads", "num_key_value_heads", "k_ratio", "head_dim",
                "intermediate_size", "hidden_act", "rms_norm_eps", "tie_word_embeddings"):
        assert hf[key] == HF_CONFIG[key], key
    assert hf["auto_map"]["AutoModelForCausalLM"] == "modeling_motif.MotifForCausalLM"
    exported = {}
    for f in out.glob("*.safetensors"):
        exported.update(load_file(str(f)))
    assert sorted(exported) == sorted(tensors)
    for name, a in tensors.items():
        assert exported[name].tobytes() == a.tobytes(), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)


def test_motif_config_variants():
    # Motif-2.6B style config (no num_noise_heads): plain differential attention, adjacent (signal, noise) pairs.
    vanilla = {k: v for k, v in HF_CONFIG.items() if k != "num_noise_heads"} | {"num_attention_heads": 8}
    cfg, arch = config_from_hf(vanilla)
    assert arch == "MotifForCausalLM" and cfg.diff_ratio == 1 and cfg.num_query_groups == 4
    with pytest.raises(ConversionError, match="k_ratio=2"):
        config_from_hf(HF_CONFIG | {"k_ratio": 2})
    assert config_from_hf(HF_CONFIG | {"attn_rms_norm_eps": 1e-5})[0].attn_norm_eps == 1e-5  # SubLN's own epsilon
    with pytest.raises(ConversionError, match="num_noise_heads=3"):
        config_from_hf(HF_CONFIG | {"num_noise_heads": 3})


def test_motif_unexpected_tensors_are_named(tmp_path):
    tensors = synthetic_motif()
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(80, np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(4, np.float32)  # a buffer: ignored
    path = write_checkpoint(tmp_path / "hf", tensors)
    with pytest.raises(ConversionError, match=r"1 tensor\(s\).*q_proj\.bias"):
        import_hf(path)
