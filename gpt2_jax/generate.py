"""Sampling with a KV cache: greedy, temperature, top-k and top-p (nucleus, Holtzman et al. 2019).

The prompt is run once to fill the cache (prefill); each new token then costs one single-position
forward pass. The decode loop is a `lax.fori_loop` inside one jit, so no step recompiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt2_jax.model import GPT


def filter_logits(logits: jax.Array, top_k: int | None, top_p: float | None, vocab_limit: int | None) -> jax.Array:
    """Set logits outside the allowed set to -inf. `logits` is (B, V) float32.

    vocab_limit: ids >= vocab_limit (the zero rows of a padded vocabulary) are never sampled.
    top_k: keep the k largest. top_p: keep the smallest set of largest-probability ids whose mass
    reaches p (the most likely id is always kept).
    """
    neg_inf = jnp.finfo(logits.dtype).min
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, neg_inf)
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely ids
        keep = mass_before < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)  # (B, 1)
        logits = jnp.where(logits < cutoff, neg_inf, logits)
    return logits


def next_token(logits, rng, temperature: float, top_k, top_p, vocab_limit) -> jax.Array:
    """One token per row from (B, V) logits; temperature 0 is greedy (argmax)."""
    if temperature == 0.0:
        return jnp.argmax(filter_logits(logits, None, None, vocab_limit), axis=-1)
    logits = filter_logits(logits / temperature, top_k, top_p, vocab_limit)
    return jax.random.categorical(rng, logits, axis=-1)


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "temperature", "top_k", "top_p", "vocab_limit"))
def _generate(model: GPT, prompt, rng, *, max_new_tokens, temperature, top_k, top_p, vocab_limit):
    B, T = prompt.shape
    total = T + max_new_tokens
    cache = model.init_cache(B, total)
    logits, cache = model.decode(prompt, cache, 0)  # prefill: (B, T, V)
    logits = logits[:, -1]  # (B, V): the distribution of the first new token
    tokens = jnp.zeros((B, total), jnp.int32).at[:, :T].set(prompt)

    def step(i, carry):
        tokens, cache, logits, rng = carry
        rng, sub = jax.random.split(rng)
        tok = next_token(logits, sub, temperature, top_k, top_p, vocab_limit)  # (B,)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None].astype(jnp.int32), (0, T + i))
        logits, cache = model.decode(tok[:, None].astype(jnp.int32), cache, T + i)
        logits = logits[:, -1]
        return tokens, cache, logits, rng

    tokens, *_ = jax.lax.fori_loop(0, max_new_tokens, step, (tokens, cache, logits, rng))
    return tokens


def generate(model: GPT, prompt, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, vocab_limit: int | None = None, seed: int = 0) -> np.ndarray:
    """Continue each row of `prompt` (B, T) ints by `max_new_tokens`; returns (B, T + max_new_tokens).

    All rows share one prompt length. The prompt plus new tokens must fit in block_size.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be (batch, length>=1) token ids, got shape {prompt.shape}")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if top_k is not None and not 1 <= top_k:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None for no top-k filtering)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if prompt.shape[1] + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                         f"block_size {model.config.block_size}")
    out = _generate(model, prompt, jax.random.key(seed), max_new_tokens=max_new_tokens,
                    temperature=float(temperature), top_k=top_k, top_p=top_p, vocab_limit=vocab_limit)
    return np.asarray(out)
