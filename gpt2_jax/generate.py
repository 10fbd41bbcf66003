"""Sampling with a KV cache: greedy, temperature, top-k and top-p (nucleus, Holtzman et al. 2019).

The prompt is run once to fill the cache (prefill); each new token then costs one single-position
forward pass. The decode loop is a `lax.fori_loop` inside one jit, so no step recompiles.

Prompts of different lengths share one batch without padding ever being attended: the cache is
prefilled with the first `min(lengths)` tokens of every row, then the loop walks one position at a
time, and a row whose prompt is not finished yet is fed its next prompt token instead of the sampled
one (teacher forcing). Every row sits at the same position at every step, so one scalar position and
one causal mask serve the whole batch.

Past the context (block_size positions, learned absolute embeddings) the window slides: once the cache
is full, the last `keep` tokens are prefilled again at positions [0, keep) into a fresh cache and
decoding goes on. The rule, token by token (tests/test_generate.py checks it against a full forward
pass per token): the window starts at w = 0; token n is predicted from tokens [w, n), and when n - w
would exceed block_size the window first moves to w = n - keep. So every token past the context sees
between `keep` and block_size tokens, always at positions from 0 as in training. keep = block_size is
nanoGPT's sampler exactly (each token from the last block_size tokens), at a prefill of block_size
tokens per token; the default keep = block_size // 2 re-prefills once per block_size // 2 + 1 tokens,
which amortises to about one prefilled token per new token (a prefilled token is several times cheaper
than a decode step: it runs as one batched matmul), and keeps at least half the context.

Each window is one jitted call (a prefill, then a fori_loop over its decode steps, with traced bounds);
a Python loop walks the windows. That compiles at most twice per batch shape: the first window (which
prefills min(lengths) prompt tokens) and the later ones (which all prefill `keep`).
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


@functools.partial(jax.jit, static_argnames=("graphdef", "prefill_len", "cache_len", "temperature", "top_k",
                                             "top_p", "vocab_limit"), donate_argnames="tokens")
def _window(graphdef, state, layers, tokens, lengths, rng, start, stop, *, prefill_len, cache_len, temperature,
            top_k, top_p, vocab_limit):
    """Decode one window into `tokens` (B, total), whose row b holds its prompt in [0, lengths[b]).

    The window starts at w = start - prefill_len: tokens [w, start) are prefilled at cache positions
    [0, prefill_len), then tokens [start, stop) are picked one at a time (sampled, or the prompt's own
    token while a row is still in its prompt) and decoded at positions [prefill_len, stop - w). The last
    decode step's logits predict token `stop`, which is picked too if stop < total (from a full window
    when stop - w = block_size; the next window starts after it). Returns (tokens, rng).
    """
    model: GPT = nnx.merge(graphdef, state)
    B, total = tokens.shape
    w = start - prefill_len
    cache = model.init_cache(B, cache_len)
    window = jax.lax.dynamic_slice_in_dim(tokens, w, prefill_len, axis=1)  # (B, prefill_len)
    logits, cache = model.decode(window, cache, 0, layers)  # prefill: (B, prefill_len, V)
    logits = logits[:, -1]  # (B, V): the distribution of token `start`

    def pick(pos, tokens, logits, rng):
        """Token `pos` of every row, written into `tokens`: sampled from `logits` past the row's prompt."""
        rng, sub = jax.random.split(rng)
        sampled = next_token(logits, sub, temperature, top_k, top_p, vocab_limit).astype(jnp.int32)  # (B,)
        tok = jnp.where(pos < lengths, tokens[:, pos], sampled)  # rows still in their prompt: teacher forcing
        return jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, pos)), tok, rng

    def step(pos, carry):
        tokens, cache, logits, rng = carry
        tokens, tok, rng = pick(pos, tokens, logits, rng)
        logits, cache = model.decode(tok[:, None], cache, pos - w, layers)  # (B, 1, V)
        return tokens, cache, logits[:, -1], rng

    tokens, _, logits, rng = jax.lax.fori_loop(start, stop, step, (tokens, cache, logits, rng))

    def pick_last():  # token `stop`: from the full window if stop - w = block_size
        tokens_, _, rng_ = pick(stop, tokens, logits, rng)
        return tokens_, rng_

    return jax.lax.cond(stop < total, pick_last, lambda: (tokens, rng))  # stop == total: nothing left to pick


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


def _check_settings(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int, keep: int,
                    block_size: int) -> None:
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if top_k is not None and not 1 <= top_k:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None for no top-k filtering)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not 1 <= keep <= block_size:
        raise ValueError(f"keep={keep} must be in [1, block_size={block_size}]: the tokens a full window keeps "
                         "when it slides")


def generate(model: GPT, prompt, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, vocab_limit: int | None = None, seed: int = 0,
             keep: int | None = None) -> np.ndarray | list[np.ndarray]:
    """Continue each prompt by `max_new_tokens` tokens sampled from `model`.

    prompt: a (B, T) int array, or a list of B token-id sequences whose lengths may differ; each at most
    block_size tokens. Returns, for an array, a (B, T + max_new_tokens) int32 array; for a list, a list
    of B int32 arrays, each its prompt followed by `max_new_tokens` new tokens.

    temperature 0 is greedy (top_k and top_p are then ignored). vocab_limit: ids >= it are never
    produced (the padding rows of a 50304 vocabulary: pass the tokenizer's vocab_size). max_new_tokens
    is not bounded by the context: past block_size the window slides, re-prefilling its last `keep`
    tokens (1 <= keep <= block_size; default block_size // 2; the module docstring has the rule).
    Same seed and inputs: same tokens.
    """
    ragged = not hasattr(prompt, "shape")  # a list (or tuple) of sequences, not an array
    padded, lengths = _right_pad(prompt)
    block_size = model.config.block_size
    keep = max(1, block_size // 2) if keep is None else keep
    if len(lengths) == 0 or lengths.min() == 0:
        raise ValueError(f"every prompt needs at least one token (lengths {lengths.tolist()}); start an empty "
                         "one with <|endoftext|> (GPT-2 BPE) or a newline")
    vocab = min(vocab_limit or model.config.vocab_size, model.config.vocab_size)
    if not np.issubdtype(padded.dtype, np.integer) or padded.min() < 0 or padded.max() >= vocab:
        # (an out-of-range id would silently read a clamped embedding row)
        raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {padded.dtype} in "
                         f"[{padded.min()}, {padded.max()}]")
    _check_settings(temperature, top_k, top_p, max_new_tokens, keep, block_size)
    if padded.shape[1] > block_size:
        raise ValueError(f"prompt length {padded.shape[1]} exceeds block_size {block_size}, the model's context; "
                         f"crop the prompt to its last {block_size} tokens")
    graphdef, state = nnx.split(model)
    layers = _split_layers(graphdef, state)
    B, L = padded.shape
    total = L + max_new_tokens
    tokens = jnp.zeros((B, total), jnp.int32).at[:, :L].set(jnp.asarray(padded, jnp.int32))
    lengths_ = jnp.asarray(lengths, jnp.int32)
    rng = jax.random.key(seed)
    kw = dict(temperature=float(temperature), top_k=top_k, top_p=top_p, vocab_limit=vocab_limit)
    # The first window prefills the common part of the prompts at [0, min(lengths)); a cache no longer
    # than needed when everything fits in it.
    start, prefill_len, cache_len = int(lengths.min()), int(lengths.min()), min(total, block_size)
    while True:
        stop = min(total, start - prefill_len + block_size)  # the window's last decoded token is stop - 1
        tokens, rng = _window(graphdef, state, layers, tokens, lengths_, rng, start, stop, prefill_len=prefill_len,
                              cache_len=cache_len, **kw)
        if stop + 1 >= total:  # token `stop` was the last one (or stop == total: nothing was left)
            break
        start, prefill_len, cache_len = stop + 1, keep, block_size  # slide: re-prefill tokens [stop + 1 - keep, stop]
    out = np.asarray(tokens)
    if not ragged:
        return out
    return [out[i, :n + max_new_tokens] for i, n in enumerate(lengths)]
