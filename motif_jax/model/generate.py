"""Batched generation: one prefill over left-padded prompts, then incremental decode with a KV cache.

Used by SFT evaluation (greedy), RL rollouts (sampled, with behaviour log-probs) and trace scoring. Everything from
prefill to the last token is one jitted program (``lax.while_loop`` that stops when every row has finished), compiled
once per (prompt bucket, batch, samples per prompt, max_new_tokens, sampling settings).

``num_samples`` > 1 (RL's G responses per prompt) prefills each prompt once and repeats its KV cache for its
samples, which then draw their own tokens from the first one on. The cache travels whole through the decode loop
and every layer writes its slice in place (``motif_jax.model.transformer``), so a decode step costs what its rows
compute, not a copy of the cache. Under an active mesh the batch rows follow the ``batch`` rule's axes: with several
processes each computes the rows on its devices and every process receives all of them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from motif_jax.model.transformer import Decoder, init_kv_cache
from motif_jax.parallel.hosts import host_array
from motif_jax.parallel.rules import constrain

FINISH_STOP = 0  # a stop token was generated (it is included in the output)
FINISH_LENGTH = 1  # max_new_tokens reached


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """``greedy`` takes the arg-max; otherwise sample from softmax(logits / temperature), truncated to ``top_p``."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    stop_tokens: tuple[int, ...] = (2,)
    # prompts are left-padded to a multiple of this, so few distinct shapes get compiled.
    prompt_bucket: int = 32

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not self.greedy and self.temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling (use greedy=True for arg-max decoding)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


@dataclasses.dataclass
class Generation:
    """tokens, logprobs: [B, max_new_tokens] (pad_id / 0 after a row finished); lengths, finish_reason: [B].

    ``logprobs`` are the log-probabilities of the generated tokens under softmax(logits / temperature) (temperature 1
    for greedy): exactly what the trainer recomputes from its own parameters. With top_p < 1 the sampler draws from
    the truncated distribution; its log-probs differ from these only by the log of the kept mass.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    finish_reason: np.ndarray

    def sequences(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (tokens [B, P], segment ids [B, P]: 1 on prompt tokens, 0 on padding), P a multiple of ``bucket``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = -(-max(len(p) for p in prompts) // bucket) * bucket
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    segments = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, length - len(p) :] = p
        segments[i, length - len(p) :] = 1
    return tokens, segments


def _sample(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """logits [B, V] f32 -> (token [B], its log-prob under softmax(logits / temperature)) [B]."""
    if cfg.greedy:
        token = jnp.argmax(logits, axis=-1)
        logp = jax.nn.log_softmax(logits, axis=-1)
    else:
        logp = jax.nn.log_softmax(logits / cfg.temperature, axis=-1)
        draw_from = logp
        if cfg.top_p < 1.0:
            # Keep the smallest set of tokens whose mass reaches top_p (the arg-max always survives).
            sorted_logp = jnp.sort(logp, axis=-1)[:, ::-1]
            cum = jnp.cumsum(jnp.exp(sorted_logp), axis=-1)
            cutoff_index = jnp.sum(cum - jnp.exp(sorted_logp) < cfg.top_p, axis=-1) - 1
            cutoff = jnp.take_along_axis(sorted_logp, cutoff_index[:, None], axis=-1)
            draw_from = jnp.where(logp >= cutoff, logp, -jnp.inf)
        token = jax.random.categorical(rng, draw_from, axis=-1)
    return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def _constrain_cache(cache):
    """Cache rows over the ``batch`` rule's axes, heads over ``kv_heads``'s (k, v: [layers, B, heads, S, D])."""
    out = dict(cache)
    for name in ("k", "v"):
        out[name] = constrain(cache[name], (None, "batch", "kv_heads", None, None))
    for name in ("segment_ids", "positions"):
        out[name] = constrain(cache[name], ("batch", None))
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "pad_id", "num_samples"))
def _generate(graphdef, state, tokens, segments, rng, *, cfg: SamplingConfig, pad_id: int, num_samples: int = 1):
    model: Decoder = nnx.merge(graphdef, state)
    b, p = tokens.shape
    n = cfg.max_new_tokens
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0).astype(jnp.int32)
    cache = _constrain_cache(init_kv_cache(model.cfg, b, p + n))
    hidden, cache = model(tokens, segments, positions, kv_cache=cache, cache_index=0)
    last_logits = model.logits(hidden[:, -1])  # [prompts, V]
    if num_samples > 1:  # one prefill per prompt; its samples share it and diverge from their first token on
        rep = lambda a, axis: jnp.repeat(a, num_samples, axis=axis)
        cache = _constrain_cache({"k": rep(cache["k"], 1), "v": rep(cache["v"], 1),
                                  "segment_ids": rep(cache["segment_ids"], 0), "positions": rep(cache["positions"], 0)})
        last_logits, positions = rep(last_logits, 0), rep(positions, 0)
        b = b * num_samples
    rng, key = jax.random.split(rng)
    token, logp = _sample(last_logits, key, cfg)
    stops = jnp.asarray(cfg.stop_tokens, jnp.int32)

    out_tokens = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(token)
    out_logp = jnp.zeros((b, n), jnp.float32).at[:, 0].set(logp)
    done = jnp.isin(token, stops)
    lengths = jnp.ones((b,), jnp.int32)
    next_pos = positions[:, -1] + 1

    def cond(carry):
        i, _, _, _, done, _, _, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, cache, out_tokens, out_logp, done, lengths, pos, rng = carry
        prev = out_tokens[:, i - 1]
        seg = jnp.where(done, 0, 1)[:, None].astype(jnp.int32)
        hidden, cache = model(prev[:, None], seg, pos[:, None], kv_cache=cache, cache_index=p + i - 1)
        rng, key = jax.random.split(rng)
        token, logp = _sample(model.logits(hidden[:, 0]), key, cfg)
        token = jnp.where(done, pad_id, token)
        logp = jnp.where(done, 0.0, logp)
        out_tokens = out_tokens.at[:, i].set(token)
        out_logp = out_logp.at[:, i].set(logp)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stops)
        return i + 1, cache, out_tokens, out_logp, done, lengths, pos + 1, rng

    carry = (jnp.int32(1), cache, out_tokens, out_logp, done, lengths, next_pos, rng)
    _, _, out_tokens, out_logp, done, lengths, _, _ = jax.lax.while_loop(cond, body, carry)
    finish = jnp.where(done, FINISH_STOP, FINISH_LENGTH).astype(jnp.int32)
    return out_tokens, out_logp, lengths, finish


def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    rng: jax.Array,
    cfg: SamplingConfig = SamplingConfig(),
    pad_id: int = 0,
    num_samples: int = 1,
) -> Generation:
    """Generates up to ``cfg.max_new_tokens`` tokens after each prompt (lists of token ids, any lengths),
    ``num_samples`` times per prompt: rows ``i * num_samples .. (i + 1) * num_samples - 1`` answer prompt ``i``.

    A row stops after its first stop token (kept in the output, counted in ``lengths``).
    """
    tokens, segments = left_pad(prompts, pad_id, cfg.prompt_bucket)
    max_len = model.cfg.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest + cfg.max_new_tokens > max_len:
        raise ValueError(
            f"longest prompt {longest} + max_new_tokens {cfg.max_new_tokens} exceeds the model's "
            f"max_seq_len {max_len}; shorten prompts or lower max_new_tokens"
        )
    graphdef, state = nnx.split(model)
    out = _generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(segments), rng, cfg=cfg, pad_id=pad_id,
                    num_samples=num_samples)
    return Generation(*(host_array(x) for x in out))  # every process gets every row (multi-host RL)
