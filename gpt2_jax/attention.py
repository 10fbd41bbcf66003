"""Causal self-attention, one dispatcher over its implementations: "xla" (jax.nn.dot_product_attention),
"cudnn" (flash attention, NVIDIA, bf16/fp16), "blocked" (causal blocks that skip most of the masked half;
the fastest on CPU) and "einsum" (the plain reference), attention dropout included.

A new implementation (a kernel for the causal training path) is one entry in IMPLEMENTATIONS, plus its name
in config.ATTENTION; decoding against a KV cache and attention with dropout fall back to the paths below.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gpt2_jax import pallas_attention

# Maps attention probabilities (B, nh, T, S) before they weight the values; `block` is the index of the
# query block they belong to (0 unless the implementation splits the queries into blocks).
Dropout = Callable[..., jax.Array]


def attention(q, k, v, mask, implementation: str, dropout: Dropout | None = None) -> jax.Array:
    """Scaled dot-product attention on (B, T, nh, hs) inputs; `mask` is (T, S) bool, True = attend.

    `mask=None` means causal over equal-length q and k (the training path). `implementation`: a key of
    IMPLEMENTATIONS. `dropout` (see `probs_dropout`), if given, maps the attention probabilities: it needs
    them materialised, so it runs where the implementation cannot apply it on the plain einsum path.
    """
    if mask is not None:
        if implementation == "einsum" or dropout is not None:
            return einsum_attention(q, k, v, mask, dropout)
        # Decoding against a cache: an explicit mask, which the XLA implementation supports everywhere
        # (cuDNN takes only causal/padding masks; one query per step gains nothing from it anyway).
        return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None], implementation="xla")
    impl = IMPLEMENTATIONS[implementation]
    if dropout is not None and not impl.dropout:
        impl = IMPLEMENTATIONS["einsum"]
    return impl.causal(q, k, v, dropout)


def probs_dropout(layer: nnx.Dropout, rng: jax.Array | None) -> Dropout | None:
    """The attention-probability dropout of `layer` for one call, an independent mask per query block;
    None when it is off (no `rng`, or rate 0)."""
    if rng is None or layer.rate == 0:
        return None
    key = jax.random.fold_in(rng, 1)

    def drop(probs, block: int = 0):  # an independent mask per query block
        return layer(probs, deterministic=False, rngs=jax.random.fold_in(key, block))

    return drop


def blocked_attention(q, k, v, dropout: Dropout | None = None) -> jax.Array:
    """Causal attention computed in blocks of query rows, each against only the keys up to its last row.

    With n blocks the score matrix costs (n + 1) / 2n of the full one: the masked upper triangle is mostly
    never computed. XLA:CPU has no flash-attention kernel, and this runs 2-3x faster there than
    `jax.nn.dot_product_attention` (fwd + bwd, T = 128..1024; measured in benchmarks/NOTES.md).
    `dropout(probs, block)`, if given, maps each block's probabilities (block = 0, 1, ...).
    """
    T = q.shape[1]
    block = max(64, T // 8)  # fewer, larger blocks for long sequences: the best measured on CPU
    # Heads first, once: each block's two matmuls are then batched over (B, nh) as they lie, where slices of
    # (B, T, nh, hs) cost XLA:CPU transposing copies per block (the char step: 144 -> 12; the same sums).
    q, k, v = (t.swapaxes(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    rows = []
    for i, start in enumerate(range(0, T, block)):
        stop = min(start + block, T)
        mask = jnp.arange(stop)[None, :] <= jnp.arange(start, stop)[:, None]  # (rows, keys [0, stop))
        drop = None if dropout is None else functools.partial(dropout, block=i)
        scores = jnp.einsum("BNTH,BNSH->BNTS", q[:, :, start:stop], k[:, :, :stop],
                            preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
        probs = _masked_softmax(scores, mask, drop)
        rows.append(jnp.einsum("BNTS,BNSH->BNTH", probs.astype(v.dtype), v[:, :, :stop]))
    out = jnp.concatenate(rows, axis=2) if len(rows) > 1 else rows[0]
    return out.swapaxes(1, 2)  # (B, T, nh, hs)


def einsum_attention(q, k, v, mask, dropout: Dropout | None = None) -> jax.Array:
    """Attention with the probabilities materialised, softmax in float32; `mask` as in `attention`.
    `dropout`, if given, maps the (B, nh, T, S) probabilities before they weight the values."""
    T, S = q.shape[1], k.shape[1]
    if mask is None:
        mask = jnp.tril(jnp.ones((T, S), dtype=bool))
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    probs = _masked_softmax(scores, mask, dropout)
    return jnp.einsum("BNTS,BSNH->BTNH", probs.astype(v.dtype), v)


def _masked_softmax(scores, mask, dropout: Dropout | None) -> jax.Array:
    """float32 softmax of (B, nh, T, S) scores over S where `mask` (T, S) is True, then `dropout` if given."""
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    return probs if dropout is None else dropout(probs)


def _fused(q, k, v, implementation: str) -> jax.Array:
    """jax.nn.dot_product_attention's causal path: a fused kernel that never materialises probabilities."""
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention='cudnn' needs bfloat16 or float16 compute, got {q.dtype} (cuDNN flash "
                         "attention has no float32 kernel); use dtype='bfloat16' or attention='xla'")
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


class Implementation(NamedTuple):
    causal: Callable[..., jax.Array]  # (q, k, v, dropout) -> (B, T, nh, hs) on the causal training path
    dropout: bool  # applies `dropout` itself; if not, attention with dropout runs on "einsum"


# The functions are looked up when called (lambdas), so that tests can monkeypatch this module's names.
IMPLEMENTATIONS: dict[str, Implementation] = {
    "xla": Implementation(lambda q, k, v, _: _fused(q, k, v, "xla"), dropout=False),
    "cudnn": Implementation(lambda q, k, v, _: _fused(q, k, v, "cudnn"), dropout=False),
    "blocked": Implementation(lambda q, k, v, dropout: blocked_attention(q, k, v, dropout), dropout=True),
    "einsum": Implementation(lambda q, k, v, dropout: einsum_attention(q, k, v, None, dropout), dropout=True),
    # Pallas TPU splash attention, per shard of the step's mesh; XLA's path where no mesh is set
    "splash": Implementation(lambda q, k, v, _: pallas_attention.splash_attention(q, k, v), dropout=False),
}
