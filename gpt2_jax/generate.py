"""Sampling with a KV cache: greedy, temperature, top-k and top-p (nucleus, Holtzman et al. 2019).

The prompt is run once to fill the cache (prefill); each new token then costs one single-position
forward pass. The decode loop is a `lax.fori_loop` inside one jit, so no step recompiles.

Prompts of different lengths share one batch without padding ever being attended: the cache is
prefilled with the first `min(lengths)` tokens of every row, then the loop walks one position at a
time, and a row whose prompt is not finished yet is fed its next prompt token instead of the sampled
one (teacher forcing). Every row sits at the same position at every step, so one scalar position and
one causal mask serve the whole batch.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt2_jax.model import GPT


def filter_logits(logits: jax.Array, top_k: int | None, top_p: float | None, vocab_limit: int | None) -> jax.Array:
    """Set logits outside the allowed set to the lowest float. `logits` is (B, V) float32.

    vocab_limit: ids >= vocab_limit (the zero rows of a padded vocabulary) are never sampled.
    top_k: keep the k largest. top_p: keep the smallest set of largest-probability ids whose mass
    reaches p (the most likely id is always kept). Ties at the cut are all kept.
    """
    V = logits.shape[-1]
    neg_inf = jnp.finfo(logits.dtype).min  # not -inf: a row of -inf would turn softmax into NaNs
    if vocab_limit is not None and vocab_limit < V:
        logits = jnp.where(jnp.arange(V) < vocab_limit, logits, neg_inf)
    sorted_logits = None  # descending, as far as anything is left
    if top_k is not None:
        k = min(top_k, vocab_limit or V, V)  # never let a masked id tie with the k-th largest
        sorted_logits = jax.lax.top_k(logits, k)[0]  # (B, k)
        logits = jnp.where(logits < sorted_logits[:, -1:], neg_inf, logits)
    if top_p is not None and top_p < 1.0:  # (1.0 keeps all: float32 cumsums may overshoot 1 in the tail)
        if sorted_logits is None:
            sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # (B, V); after top-k only k values to sort
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


# Both jits take the model's (graphdef, state), not the model through nnx.jit: nnx.jit returns every
# Variable from the call to propagate updates, a copy of all the weights per call (130 ms for 124M on CPU).
@functools.partial(jax.jit, static_argnames="graphdef")
def _split_layers(graphdef, state) -> list:
    """Per-layer weights, sliced once per generate() call instead of on every token. A jit of its own: inside
    _generate, XLA:CPU overlaps the slicing copies with the prefill and both run slower (124M: 134 vs 86 ms)."""
    return nnx.merge(graphdef, state).split_layers()


@functools.partial(jax.jit, static_argnames=("graphdef", "prefill_len", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "vocab_limit"))
def _generate(graphdef, state, layers, prompts, lengths, rng, *, prefill_len, max_new_tokens, temperature, top_k,
              top_p, vocab_limit):
    """prompts (B, L) right-padded, lengths (B,), prefill_len = min(lengths). Returns (B, L + max_new_tokens):
    row b is its prompt, then new tokens from position lengths[b] on (a shorter row gets more of them)."""
    model: GPT = nnx.merge(graphdef, state)
    B, L = prompts.shape
    total = L + max_new_tokens
    cache = model.init_cache(B, total)
    logits, cache = model.decode(prompts[:, :prefill_len], cache, 0, layers)  # prefill: (B, prefill_len, V)
    logits = logits[:, -1]  # (B, V): the distribution at position prefill_len
    tokens = jnp.zeros((B, total), jnp.int32).at[:, :L].set(prompts)

    def step(pos, carry):
        tokens, cache, logits, rng = carry
        rng, sub = jax.random.split(rng)
        sampled = next_token(logits, sub, temperature, top_k, top_p, vocab_limit).astype(jnp.int32)  # (B,)
        tok = jnp.where(pos < lengths, tokens[:, pos], sampled)  # rows still in their prompt: teacher forcing
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, pos))
        logits, cache = model.decode(tok[:, None], cache, pos, layers)  # (B, 1, V)
        return tokens, cache, logits[:, -1], rng

    tokens, *_ = jax.lax.fori_loop(prefill_len, total, step, (tokens, cache, logits, rng))
    return tokens


def _right_pad(prompt) -> tuple[np.ndarray, np.ndarray]:
    """(B, L) token ids, right-padded with 0, and the (B,) prompt lengths, from a (B, T) array or a
    list of B token sequences."""
    if hasattr(prompt, "shape"):
        ids = np.asarray(prompt)
        if ids.ndim != 2:
            raise ValueError(f"prompt must be (batch, length) token ids, got shape {ids.shape}")
        return ids, np.full(ids.shape[0], ids.shape[1])
    rows = [np.asarray(p).reshape(-1) for p in prompt]
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    ids = np.zeros((len(rows), max(lengths, default=0)), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return ids, lengths


def generate(model: GPT, prompt, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, vocab_limit: int | None = None,
             seed: int = 0) -> np.ndarray | list[np.ndarray]:
    """Continue each prompt by `max_new_tokens` tokens sampled from `model`.

    prompt: a (B, T) int array, or a list of B token-id sequences whose lengths may differ.
    Returns, for an array, a (B, T + max_new_tokens) int32 array; for a list, a list of B int32 arrays,
    each its prompt followed by `max_new_tokens` new tokens.

    temperature 0 is greedy (top_k and top_p are then ignored). vocab_limit: ids >= it are never
    produced (the padding rows of a 50304 vocabulary: pass the tokenizer's vocab_size). The longest
    prompt plus max_new_tokens must fit in block_size. Same seed and inputs: same tokens.
    """
    ragged = not hasattr(prompt, "shape")  # a list (or tuple) of sequences, not an array
    padded, lengths = _right_pad(prompt)
    if len(lengths) == 0 or lengths.min() == 0:
        raise ValueError(f"every prompt needs at least one token (lengths {lengths.tolist()}); start an empty "
                         "one with <|endoftext|> (GPT-2 BPE) or a newline")
    vocab = min(vocab_limit or model.config.vocab_size, model.config.vocab_size)
    if not np.issubdtype(padded.dtype, np.integer) or padded.min() < 0 or padded.max() >= vocab:
        # (an out-of-range id would silently read a clamped embedding row)
        raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {padded.dtype} in "
                         f"[{padded.min()}, {padded.max()}]")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if top_k is not None and not 1 <= top_k:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None for no top-k filtering)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if padded.shape[1] + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt length {padded.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                         f"block_size {model.config.block_size}; crop the prompt to its last "
                         f"{model.config.block_size - max_new_tokens} tokens")
    graphdef, state = nnx.split(model)
    out = _generate(graphdef, state, _split_layers(graphdef, state), jnp.asarray(padded, jnp.int32),
                    jnp.asarray(lengths, jnp.int32), jax.random.key(seed),
                    prefill_len=int(lengths.min()), max_new_tokens=max_new_tokens, temperature=float(temperature),
                    top_k=top_k, top_p=top_p, vocab_limit=vocab_limit)
    out = np.asarray(out)
    if not ragged:
        return out
    return [out[i, :n + max_new_tokens] for i, n in enumerate(lengths)]

