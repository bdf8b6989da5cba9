"""The decoder: causality, packed-segment isolation, attention backends, KV-cache decoding, Motif-2 formulas."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from motif_jax.config import ConfigError, ModelConfig, load_yaml
from motif_jax.model.attention import AttentionBackendError, attend
from motif_jax.model.generate import SamplingConfig, generate
from motif_jax.model.layers import Attention, lambda_init, polynorm
from motif_jax.model.transformer import abstract_model, count_params, create_model

STANDARD = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
                       mlp_dim=64, max_seq_len=128)
GQA = dataclasses.replace(STANDARD, num_kv_heads=2, qk_norm=True, tie_embeddings=True)
DIFF = dataclasses.replace(STANDARD, attention="differential", num_heads=10, num_kv_heads=4, diff_ratio=4,
                           mlp="polynorm")
CONFIGS = {"standard": STANDARD, "gqa": GQA, "differential": DIFF}


def _tokens(b, t, vocab=64, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, vocab, (b, t)), jnp.int32)


@nnx.jit
def _hidden(model, *args):
    """The decoder's hidden states as one jitted program (op by op, every new shape compiles each op again)."""
    return model(*args)[0]


@nnx.jit
def _full_forward_logprobs(model, rows, temperature):
    """rows [R, T] -> log softmax(logits / temperature) [R, T, V] of one full forward pass (no KV cache)."""
    return jax.nn.log_softmax(model.logits(model(rows)[0]) / temperature, axis=-1)


def _expected_logprobs(model, prompts, generated, temperature) -> np.ndarray:
    """[rows, n]: the log-prob of each generated token under a full forward pass over its row's prompt and tokens.
    One jitted pass over the rows padded on the right to one width (causal: the padding reaches no position read)."""
    seqs = [list(p) + list(g) for p, g in zip(prompts, generated.tolist())]
    width = max(map(len, seqs))
    logp = np.asarray(_full_forward_logprobs(model, jnp.asarray([s + [0] * (width - len(s)) for s in seqs]),
                                             temperature))
    n = generated.shape[1]
    return np.stack([logp[r, len(p) - 1 + np.arange(n), generated[r]] for r, p in enumerate(prompts)])


@pytest.mark.parametrize("name", CONFIGS)
def test_causal(name):
    model = create_model(CONFIGS[name], seed=1)
    tokens = _tokens(2, 24)
    t = 13
    changed = tokens.at[:, t].set((tokens[:, t] + 7) % 64)
    h1, h2 = _hidden(model, tokens), _hidden(model, changed)
    np.testing.assert_array_equal(np.asarray(h1[:, :t]), np.asarray(h2[:, :t]))
    assert np.abs(np.asarray(h1[:, t:] - h2[:, t:])).max() > 1e-4  # and the change is seen from t on


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_segments_are_isolated(name):
    """A packed row [A | B | pad] gives the same hidden states as A and B run alone."""
    model = create_model(CONFIGS[name], seed=2)
    a, b = _tokens(1, 9, seed=3), _tokens(1, 6, seed=4)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
    seg = jnp.asarray([[1] * 9 + [2] * 6 + [0] * 3], jnp.int32)
    pos = jnp.asarray([list(range(9)) + list(range(6)) + [0] * 3], jnp.int32)
    h, ha, hb = _hidden(model, packed, seg, pos), _hidden(model, a), _hidden(model, b)
    np.testing.assert_allclose(h[:, :9], ha, atol=1e-5)
    np.testing.assert_allclose(h[:, 9:15], hb, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_blockwise_matches_xla_value_and_gradient(name):
    cfg = CONFIGS[name]
    tokens = _tokens(2, 29)
    seg = jnp.asarray([[1] * 16 + [2] * 13, [1] * 29], jnp.int32)
    pos = jnp.asarray([list(range(16)) + list(range(13)), list(range(29))], jnp.int32)

    def loss(params, impl):
        c = dataclasses.replace(cfg, attention_impl=impl, attention_block_q=8, attention_block_kv=16)
        model = nnx.merge(nnx.graphdef(create_model(c)), params)
        h, _ = model(tokens, seg, pos)
        return jnp.sum(h * jnp.sin(jnp.arange(h.size).reshape(h.shape)))

    params = nnx.state(create_model(cfg, seed=5))
    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)  # one program each, not op by op
    v1, g1 = value_and_grad(params, "xla")
    v2, g2 = value_and_grad(params, "blockwise")
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    flat1, flat2 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in (g1, g2))
    assert np.linalg.norm(flat1 - flat2) <= 1e-5 * np.linalg.norm(flat1)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        # Per leaf, norm-wise: the summation order differs (online softmax). The differential lambdas' gradient is
        # a sum over every token and head with heavy cancellation: its f32 noise is ~1e-5 even against a float64
        # run of the xla path, hence the looser per-leaf bound.
        assert np.linalg.norm(x - y) <= 1e-4 * np.linalg.norm(x)


@pytest.mark.parametrize("name", CONFIGS)
def test_kv_cache_decoding_matches_full_forward(name):
    model = create_model(CONFIGS[name], seed=6)
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11, 12]]  # different lengths: left padding in the batch
    n = 10
    out = generate(model, prompts, jax.random.key(0),
                   SamplingConfig(max_new_tokens=n, temperature=0.8, stop_tokens=(), prompt_bucket=8))
    assert out.tokens.shape == (2, n) and (out.lengths == n).all()
    np.testing.assert_allclose(out.logprobs, _expected_logprobs(model, prompts, out.tokens, 0.8), atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_samples_sharing_a_prefill_are_exact_and_compile_once(name):
    """num_samples: one prefill per prompt, its cache repeated for the samples. Each sampled row's log-probs are
    those of a full forward pass over its own tokens; greedy samples equal greedy decoding of the prompt alone; a
    second call with other prompts of the same bucket reuses the compiled program."""
    from motif_jax.model.generate import _generate

    model = create_model(CONFIGS[name], seed=6)
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11, 12]]
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.8, stop_tokens=(), prompt_bucket=8)
    out = generate(model, prompts, jax.random.key(1), cfg, num_samples=3)
    assert out.tokens.shape == (6, 6) and len({tuple(r) for r in out.tokens.tolist()}) > 2  # samples differ
    row_prompts = [prompts[row // 3] for row in range(6)]
    np.testing.assert_allclose(out.logprobs, _expected_logprobs(model, row_prompts, out.tokens, 0.8), atol=1e-5)
    greedy = SamplingConfig(max_new_tokens=6, greedy=True, stop_tokens=(), prompt_bucket=8)
    alone = generate(model, prompts, jax.random.key(0), greedy)
    shared = generate(model, prompts, jax.random.key(0), greedy, num_samples=2)
    np.testing.assert_array_equal(shared.tokens, np.repeat(alone.tokens, 2, axis=0))
    compiles = _generate._cache_size()
    generate(model, [[20, 21], [22, 23, 24, 25]], jax.random.key(2), cfg, num_samples=3)
    assert _generate._cache_size() == compiles


def test_generation_stops_and_reports_finish_reason():
    model = create_model(STANDARD, seed=7)
    greedy = generate(model, [[5, 6, 7]], jax.random.key(0), SamplingConfig(max_new_tokens=6, greedy=True,
                                                                             stop_tokens=()))
    first = int(greedy.tokens[0, 2])  # make the third generated token a stop token
    out = generate(model, [[5, 6, 7]], jax.random.key(0), SamplingConfig(max_new_tokens=6, greedy=True,
                                                                          stop_tokens=(first,)))
    stop_at = list(greedy.tokens[0]).index(first)
    assert out.lengths[0] == stop_at + 1 and out.finish_reason[0] == 0
    assert (out.tokens[0, stop_at + 1:] == 0).all() and (out.logprobs[0, stop_at + 1:] == 0).all()
    assert greedy.finish_reason[0] == 1


def test_polynorm_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 16)).astype(np.float32)
    w = np.array([0.2, -0.5, 1.3], np.float32)
    b = np.array([0.1], np.float32)

    def n(z):
        return z / np.sqrt(np.mean(z**2, axis=-1, keepdims=True) + 1e-6)

    expected = w[0] * n(x**3) + w[1] * n(x**2) + w[2] * n(x) + b[0]
    np.testing.assert_allclose(polynorm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)), expected, rtol=1e-5)


def test_differential_attention_against_direct_formula():
    """Grouped differential attention written out per head from the recipe, in NumPy."""
    cfg = dataclasses.replace(DIFF, rope_theta=10_000.0)
    attn = Attention(cfg, rngs=nnx.Rngs(params=3))
    t, d, hd, r = 7, cfg.hidden_size, cfg.head_dim, cfg.diff_ratio
    x = np.random.default_rng(1).normal(size=(1, t, d)).astype(np.float32)
    seg = jnp.ones((1, t), jnp.int32)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    layer = 3
    out, _ = nnx.jit(lambda a, *args: a(*args))(attn, jnp.asarray(x), seg, pos, jnp.int32(layer))

    def rope_np(v):  # [T, D] rotate-half
        inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2) / hd))
        ang = np.arange(t)[:, None] * inv
        c, s = np.cos(ang), np.sin(ang)
        a, bb = v[:, : hd // 2], v[:, hd // 2:]
        return np.concatenate([a * c - bb * s, bb * c + a * s], axis=-1)

    def softmax_causal(q, k):
        s = q @ k.T / np.sqrt(hd)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        e = np.exp(s - s.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    wq = np.asarray(attn.q_proj.kernel[...]); wk = np.asarray(attn.k_proj.kernel[...])
    wv = np.asarray(attn.v_proj.kernel[...]); wo = np.asarray(attn.o_proj.kernel[...])
    q = (x[0] @ wq).reshape(t, cfg.num_heads, hd)
    k = (x[0] @ wk).reshape(t, cfg.num_kv_heads, hd)
    v = (x[0] @ wv).reshape(t, cfg.num_kv_heads, hd)
    lam_init = 0.8 - 0.6 * np.exp(-0.3 * (layer - 1))
    lam = (np.exp(np.dot(attn.lambda_q1[...], attn.lambda_k1[...]))
           - np.exp(np.dot(attn.lambda_q2[...], attn.lambda_k2[...])) + lam_init)
    sub_w = np.asarray(attn.subln.weight[...])
    heads = []
    for g in range(cfg.num_query_groups):
        kv = g * cfg.num_kv_groups // cfg.num_query_groups  # key/value pair serving query group g
        k1, k2 = rope_np(k[:, 2 * kv]), rope_np(k[:, 2 * kv + 1])
        vals = np.concatenate([v[:, 2 * kv], v[:, 2 * kv + 1]], axis=-1)  # [V1 | V2]
        noise = softmax_causal(rope_np(q[:, g * (r + 1) + r]), k2) @ vals
        for i in range(r):
            sig = softmax_causal(rope_np(q[:, g * (r + 1) + i]), k1) @ vals
            z = sig - lam * noise
            z = z / np.sqrt(np.mean(z**2, -1, keepdims=True) + cfg.norm_eps) * sub_w
            heads.append(z * (1 - lam_init))
    expected = np.concatenate(heads, axis=-1) @ wo
    np.testing.assert_allclose(out[0], expected, rtol=1e-4, atol=1e-5)
    assert abs(float(lambda_init(jnp.int32(0))) - (0.8 - 0.6 * np.exp(0.3))) < 1e-6


def test_motif_preset_parameter_count_is_12_7b():
    cfg = load_yaml(ModelConfig, "configs/model/motif-2-12.7b.yaml")
    _, state = abstract_model(cfg)  # ShapeDtypeStructs only: nothing allocated
    n = count_params(state)
    assert abs(n - 12.7e9) / 12.7e9 < 0.02
    assert n == cfg.param_count()


@pytest.mark.parametrize("preset", ["tiny", "small", "llama3-style", "qwen3-style"])
def test_presets_load_and_count(preset):
    cfg = load_yaml(ModelConfig, f"configs/model/{preset}.yaml")
    _, state = abstract_model(cfg)
    assert count_params(state) == cfg.param_count()


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(num_heads=6, num_kv_heads=4), "--model.num-kv-heads"),
        (dict(attention="differential", num_heads=8, diff_ratio=4), "--model.num-heads"),
        (dict(attention="differential", num_heads=10, num_kv_heads=3), "--model.num-kv-heads"),
        (dict(head_dim=7), "--model.head-dim"),
        (dict(remat_policy="everything"), "--model.remat-policy"),
    ],
)
def test_invalid_model_config_names_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        ModelConfig(**kwargs)


def test_cudnn_attention_refuses_cpu_clearly():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present: cudnn can run")
    q = jnp.zeros((1, 4, 2, 8))
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(AttentionBackendError, match="blockwise"):
        attend(q, q, q, ids, ids, ids, ids, impl="cudnn")


def test_nested_preset_with_overrides_and_bad_reference(tmp_path):
    """A section may name a preset as its base and override fields; a missing preset is a clear ConfigError."""
    import dataclasses as dc

    @dc.dataclass(frozen=True)
    class Run:
        model: ModelConfig = ModelConfig()

    (tmp_path / "run.yaml").write_text("model: {base: configs/model/tiny.yaml, num_layers: 2}\n")
    tiny = load_yaml(ModelConfig, "configs/model/tiny.yaml")
    assert load_yaml(Run, tmp_path / "run.yaml").model == dc.replace(tiny, num_layers=2)
    (tmp_path / "whole.yaml").write_text("model: configs/model/tiny.yaml\n")
    assert load_yaml(Run, tmp_path / "whole.yaml").model == tiny
    (tmp_path / "bad.yaml").write_text("model: {base: configs/model/nope.yaml}\n")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_yaml(Run, tmp_path / "bad.yaml")
