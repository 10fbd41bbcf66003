"""GPT-2 in Flax NNX (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners").

Pre-LayerNorm blocks, a final LayerNorm, learned positions, tanh-GELU, and an LM head tied to the token
embedding, as in OpenAI's GPT-2 and nanoGPT. Parameter names follow Hugging Face's GPT2LMHeadModel
(`wte, wpe, h.ln_1, h.attn.c_attn, ...`), so conversion is a rename table (see convert.py) plus one
reshape: c_attn keeps its fused q/k/v axis as (3, n_head, head_dim), for tensor parallelism by heads.

The 12..48 blocks are stored stacked, one leading `layers` axis per parameter, and run with `lax.scan`:
XLA compiles one block instead of n_layer copies (on CPU the scan is unrolled: it runs faster there).
Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `vocab`, `layers`); sharding.py
maps them to the device mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from gpt2_jax.config import GPTConfig

LN_EPS = 1e-5  # GPT-2's LayerNorm epsilon (Flax's default is 1e-6)
INIT_STD = 0.02  # GPT-2 / nanoGPT init for weights and embeddings

# KV cache: (keys, values), each (n_layer, B, n_head, max_len, head_dim) in the compute dtype; heads come
# before positions so that attention reads a layer's keys and values without transposing them.
KVCache = tuple[jax.Array, jax.Array]

# Platform-dependent tracing choices, normally from jax.default_backend(); see `compiling_for`.
_TARGET: contextvars.ContextVar[tuple[str, bool | None] | None] = contextvars.ContextVar("target", default=None)


@contextlib.contextmanager
def compiling_for(platform: str, unroll_layers: bool | None = None):
    """Trace the model for `platform` ("cpu", "gpu", "tpu") instead of the backend this process runs.

    A deviceless compile (gpt2_jax.plan) runs on the CPU backend but compiles for a GPU or TPU: the
    choices that depend on the platform (whether the layer scan is unrolled) must follow the target.
    `unroll_layers` forces the choice: XLA's cost analysis counts a loop body once, so FLOPs are
    counted on an unrolled program.
    """
    token = _TARGET.set((platform, unroll_layers))
    try:
        yield
    finally:
        _TARGET.reset(token)


def _unroll_layers(cfg: GPTConfig) -> bool:
    platform, forced = _TARGET.get() or (jax.default_backend(), None)
    return forced if forced is not None else platform == "cpu" and cfg.remat == "none"


def _unroll_loss_chunks() -> bool:
    """Unroll the chunk loop of `lm_head_loss` only where the layers are forced unrolled: for a FLOP count
    (XLA's cost analysis counts a loop body once)."""
    return (_TARGET.get() or (None, None))[1] is True


# Parameters only carry logical axis names; they are placed on devices by sharding.py through
# jit's out_shardings, never eagerly at creation, so model code needs no mesh.
def _normal(std: float, axes: tuple[str | None, ...]):
    return nnx.with_partitioning(nnx.initializers.normal(std), axes, eager_sharding=False)


def _zeros(axes):
    return nnx.with_partitioning(nnx.initializers.zeros_init(), axes, eager_sharding=False)


def _ones(axes):
    return nnx.with_partitioning(nnx.initializers.ones_init(), axes, eager_sharding=False)


def _linear(cfg: GPTConfig, d_in: int, d_out: int, axes, std: float, rngs: nnx.Rngs) -> nnx.Linear:
    """A Linear layer whose kernel is (in, out), the layout of HF's Conv1D."""
    return nnx.Linear(
        d_in, d_out, use_bias=cfg.bias, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32,
        kernel_init=_normal(std, axes), bias_init=_zeros(axes[1:]), rngs=rngs,
    )


def _dense(layer: nnx.Linear | nnx.Embed, x: jax.Array) -> jax.Array:
    """`layer(x)` with x flattened to (tokens, features): the same math, but XLA:CPU computes the weight
    gradient of a 2-D matmul directly, where for a (B, T, C) input it adds a transpose and a slower
    kernel (measured 1.5x slower per matmul). A free reshape on GPU/TPU.

    For an Embed (the tied LM head) it is `x @ embedding.T` in the dtype of x, the compute dtype.
    """
    flat = x.reshape(-1, x.shape[-1])  # (B*T, C)
    out = flat @ layer.embedding[...].astype(flat.dtype).T if isinstance(layer, nnx.Embed) else layer(flat)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _layer_norm(cfg: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        cfg.n_embd, epsilon=LN_EPS, use_bias=cfg.bias, dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.float32, scale_init=_ones(("norm",)), bias_init=_zeros(("norm",)), rngs=rngs,
    )


def attention(q, k, v, mask, implementation: str) -> jax.Array:
    """Scaled dot-product attention on (B, T, nh, hs) inputs; `mask` is (T, S) bool, True = attend.

    `mask=None` means causal over equal-length q and k (the training path). `implementation`: "xla"
    (jax.nn.dot_product_attention), "cudnn" (flash attention, NVIDIA, bf16/fp16), "blocked" (causal
    blocks that skip most of the masked half; the fastest on CPU) or "einsum" (the plain reference).
    """
    if implementation == "einsum":  # plain reference: softmax in float32
        return einsum_attention(q, k, v, mask)
    if mask is not None:
        # Decoding against a cache: an explicit mask, which the XLA implementation supports everywhere
        # (cuDNN takes only causal/padding masks; one query per step gains nothing from it anyway).
        return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None], implementation="xla")
    if implementation == "blocked":
        return blocked_attention(q, k, v)
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention='cudnn' needs bfloat16 or float16 compute, got {q.dtype} (cuDNN flash "
                         "attention has no float32 kernel); use dtype='bfloat16' or attention='xla'")
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def default_attention(backend: str, dtype: str) -> str:
    """The fastest implementation for a platform (jax.default_backend()) and compute dtype."""
    if backend == "gpu" and dtype != "float32":
        return "cudnn"  # flash attention; cuDNN has no float32 kernel
    return "blocked" if backend == "cpu" else "xla"


def blocked_attention(q, k, v, dropout=None) -> jax.Array:
    """Causal attention computed in blocks of query rows, each against only the keys up to its last row.

    With n blocks the score matrix costs (n + 1) / 2n of the full one: the masked upper triangle is mostly
    never computed. XLA:CPU has no flash-attention kernel, and this runs 2-3x faster there than
    `jax.nn.dot_product_attention` (fwd + bwd, T = 128..1024; measured in benchmarks/NOTES.md).
    `dropout(probs, block)`, if given, maps each block's probabilities (block = 0, 1, ...).
    """
    T = q.shape[1]
    block = max(64, T // 8)  # fewer, larger blocks for long sequences: the best measured on CPU
    rows = []
    for i, start in enumerate(range(0, T, block)):
        stop = min(start + block, T)
        mask = jnp.arange(stop)[None, :] <= jnp.arange(start, stop)[:, None]  # (rows, keys [0, stop))
        drop = None if dropout is None else functools.partial(dropout, block=i)
        rows.append(einsum_attention(q[:, start:stop], k[:, :stop], v[:, :stop], mask, drop))
    return jnp.concatenate(rows, axis=1) if len(rows) > 1 else rows[0]


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        proj_std = INIT_STD * (2 * cfg.n_layer) ** -0.5  # GPT-2: scale residual projections
        # The fused q/k/v projection, its kernel stored as (C, 3, nh, hs) rather than HF's (C, 3C): the
        # same numbers (convert.py reshapes), but with a dim of its own for the heads, so a tensor-parallel
        # mesh splits q, k and v alike by whole heads (Megatron's layout, see sharding.py). Split as one
        # 3C dim, shard 0 would hold all of q and half of k, and every step would reshuffle them.
        C, nh = cfg.n_embd, cfg.n_head
        self.c_attn = nnx.Einsum(
            "...C,CKHD->...KHD", (C, 3, nh, C // nh), (3, nh, C // nh) if cfg.bias else None,
            dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32, rngs=rngs,
            kernel_init=_normal(INIT_STD, ("embed", None, "heads", None)), bias_init=_zeros((None, "heads", None)),
        )
        self.c_proj = _linear(cfg, cfg.n_embd, cfg.n_embd, ("heads", "embed"), proj_std, rngs)
        self.attn_dropout = nnx.Dropout(cfg.dropout)
        self.resid_dropout = nnx.Dropout(cfg.dropout)
        self.n_head, self.impl = cfg.n_head, cfg.attention

    def __call__(self, x, cache: KVCache | None, layer, pos, dropout_rng) -> tuple[jax.Array, KVCache | None]:
        B, T, C = x.shape
        qkv = self.c_attn(x.reshape(B * T, C))  # (B*T, 3, nh, hs); 2-D input as in _dense, see there
        qkv = qkv.reshape(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, nh, hs)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, nh, hs)
        mask = None
        if cache is not None:  # write this step's keys/values at [pos, pos + T), attend to [0, pos + T)
            # `cache` holds every layer: updating it in place at `layer` writes only the new T positions,
            # where returning a per-layer slice from the layer scan would copy the whole cache per token.
            where = (layer, 0, 0, pos, 0)
            cache = tuple(jax.lax.dynamic_update_slice(c, new.swapaxes(1, 2)[None].astype(c.dtype), where)
                          for c, new in zip(cache, (k, v)))  # new (B, T, nh, hs) -> (1, B, nh, T, hs)
            k, v = (c[layer].swapaxes(1, 2) for c in cache)  # (B, S, nh, hs)
            mask = jnp.arange(k.shape[1])[None, :] <= pos + jnp.arange(T)[:, None]  # (T, S)
        if dropout_rng is not None and self.attn_dropout.rate > 0:
            # Dropout on the attention probabilities needs them materialised: the blocked or plain path.
            key = jax.random.fold_in(dropout_rng, 1)

            def drop(probs, block: int = 0):  # an independent mask per query block
                return self.attn_dropout(probs, deterministic=False, rngs=jax.random.fold_in(key, block))

            if self.impl == "blocked" and mask is None:
                y = blocked_attention(q, k, v, drop)
            else:
                y = einsum_attention(q, k, v, mask, drop)
        else:
            y = attention(q, k, v, mask, self.impl)  # (B, T, nh, hs)
        y = _dense(self.c_proj, y.reshape(B, T, C))
        return self.resid_dropout(y, deterministic=dropout_rng is None, rngs=dropout_rng), cache


def einsum_attention(q, k, v, mask, dropout=None) -> jax.Array:
    """Attention with the probabilities materialised, softmax in float32; `mask` as in `attention`.
    `dropout`, if given, maps the (B, nh, T, S) probabilities before they weight the values."""
    T, S = q.shape[1], k.shape[1]
    if mask is None:
        mask = jnp.tril(jnp.ones((T, S), dtype=bool))
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    return jnp.einsum("BNTS,BSNH->BTNH", probs.astype(v.dtype), v)


class MLP(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        proj_std = INIT_STD * (2 * cfg.n_layer) ** -0.5
        self.c_fc = _linear(cfg, cfg.n_embd, 4 * cfg.n_embd, ("embed", "mlp"), INIT_STD, rngs)
        self.c_proj = _linear(cfg, 4 * cfg.n_embd, cfg.n_embd, ("mlp", "embed"), proj_std, rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x, dropout_rng) -> jax.Array:
        h = jax.nn.gelu(_dense(self.c_fc, x), approximate=True)  # GPT-2's tanh approximation
        return self.dropout(_dense(self.c_proj, h), deterministic=dropout_rng is None, rngs=dropout_rng)


class Block(nnx.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)): the pre-LN residual block of GPT-2."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(cfg, rngs)
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.ln_2 = _layer_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cache=None, layer=0, pos=0, dropout_rng=None):
        rngs = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
        y, cache = self.attn(self.ln_1(x), cache, layer, pos, rngs[0])
        x = x + y
        x = x + self.mlp(self.ln_2(x), rngs[1])
        return x, cache


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


class GPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        # The embeddings, and so the residual stream, stay float32 whatever the compute dtype: as under
        # torch autocast in nanoGPT, only matmul and attention inputs are rounded to bfloat16, the sums
        # x + attn(...) and x + mlp(...) are float32 (ln_1/ln_2/ln_f output the compute dtype).
        self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, dtype=jnp.float32, param_dtype=jnp.float32,
                             embedding_init=_normal(INIT_STD, ("vocab", "embed")), rngs=rngs)
        self.wpe = nnx.Embed(cfg.block_size, cfg.n_embd, dtype=jnp.float32, param_dtype=jnp.float32,
                             embedding_init=_normal(INIT_STD, (None, "embed")), rngs=rngs)
        self.drop = nnx.Dropout(cfg.dropout)

        # n_layer blocks with independent init, stacked on a leading "layers" axis.
        @nnx.split_rngs(splits=cfg.n_layer)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs)

        self.h = make_blocks(rngs)
        self.ln_f = _layer_norm(cfg, rngs)

    def __call__(self, idx: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """Logits (B, T, vocab_size) float32 for int tokens (B, T). Dropout is on iff `dropout_rng` is set."""
        logits, _ = self._forward(idx, None, 0, dropout_rng)
        return logits

    def loss(self, idx: jax.Array, targets: jax.Array, vocab_limit: int | None = None, *,
             dropout_rng: jax.Array | None = None, chunk_len: int | None = None) -> jax.Array:
        """Mean next-token cross-entropy of `targets` (B, T) int: the training loss, equal to
        `cross_entropy(self(idx), targets, vocab_limit)` but without the (B, T, vocab) float32 logits
        when they are large (see `lm_head_loss`)."""
        x, _ = self._hidden(idx, None, 0, dropout_rng)
        return lm_head_loss(x, self.wte, targets, vocab_limit, chunk_len)

    def init_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        cfg = self.config
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len or cfg.block_size, cfg.head_dim)
        return jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)

    def decode(self, idx: jax.Array, cache: KVCache, pos,
               layers: list | None = None) -> tuple[jax.Array, KVCache]:
        """Logits for tokens `idx` (B, T) at positions [pos, pos + T), reading and extending `cache`.

        Prefill with the whole prompt at pos=0, then feed one token at a time; `pos` may be traced,
        so a jitted decode loop compiles once. `layers`: `self.split_layers()`, computed once before a
        decode loop (see there); the result is the same with or without it.
        """
        return self._forward(idx, cache, pos, None, layers)

    def split_layers(self) -> list:
        """The blocks' parameters one layer at a time (n_layer states without the stacked axis).

        Computed once outside a decode loop and passed to every `decode` step, they spare XLA from
        copying each layer's weights out of the stacked arrays on every token (measured on CPU, 124M at
        batch 1: 32 -> 23 ms/token).
        """
        stacked = nnx.state(self.h)
        return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(self.config.n_layer)]

    def _forward(self, idx, cache, pos, dropout_rng, layers=None):
        x, cache = self._hidden(idx, cache, pos, dropout_rng, layers)
        logits = _dense(self.wte, x)  # tied LM head: x @ wte.T -> (B, T, vocab)
        return logits.astype(jnp.float32), cache

    def _hidden(self, idx, cache, pos, dropout_rng, layers=None):
        """The final hidden states (B, T, C) after ln_f, in the compute dtype, and the updated cache."""
        cfg = self.config
        B, T = idx.shape
        max_len = cfg.block_size if cache is None else cache[0].shape[3]
        if T > max_len:
            raise ValueError(f"sequence length {T} exceeds block_size {max_len}; crop the input to the "
                             f"last {max_len} tokens")
        positions = pos + jnp.arange(T)
        x = self.wte(idx) + self.wpe(positions)[None]  # (B, T, C)
        keys = (None,) * 2 if dropout_rng is None else tuple(jax.random.split(dropout_rng))
        x = self.drop(x, deterministic=dropout_rng is None, rngs=keys[0])

        graphdef, stacked = nnx.split(self.h)  # params with a leading (n_layer,) axis

        def block_step(carry, layer):
            x, cache = carry  # the cache (all layers) rides in the carry, so it is updated in place
            params, rng, i = layer
            return nnx.merge(graphdef, params)(x, cache, i, pos, rng), None

        # A scan compiles one block instead of n_layer. On CPU, where models are small and compiling is
        # cheap, an unrolled forward+backward runs ~20% faster: a scan keeps each layer's activations in
        # stacked buffers that it zero-fills, writes and slices again. Decoding stays rolled (unrolled,
        # XLA:CPU copies every layer's weights out of the stacked arrays on every token), and so does
        # remat: unrolled, XLA schedules the recomputation early and saves no memory at all.
        unroll = cache is None and _unroll_layers(cfg)
        if cfg.remat != "none":  # inside a scan, remat needs no CSE barrier (which would block fusions)
            block_step = jax.checkpoint(block_step, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        layer_rngs = None if keys[1] is None else jax.random.split(keys[1], cfg.n_layer)
        if layers is not None:  # weights already split per layer (decode): a plain loop over them
            for i, params in enumerate(layers):
                (x, cache), _ = block_step((x, cache), (params, None, i))
        else:
            layers_in = (stacked, layer_rngs, jnp.arange(cfg.n_layer))
            (x, cache), _ = jax.lax.scan(block_step, (x, cache), layers_in, unroll=unroll)
        return self.ln_f(x), cache  # (B, T, C) in the compute dtype


def cross_entropy(logits: jax.Array, targets: jax.Array, vocab_limit: int | None = None) -> jax.Array:
    """Mean next-token loss in float32; `targets` (B, T) int.

    vocab_limit: ids >= it (the rows a padded vocabulary adds) are left out of the softmax. This matters
    when fine-tuning HF weights padded with zero rows: their logit is 0, far above GPT-2's typical
    (strongly negative) logits, so they would otherwise swallow most of the probability mass.
    """
    import optax  # noqa: PLC0415 (keeps `import gpt2_jax.model` light for tools that only build shapes)

    logits = logits.astype(jnp.float32)
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, jnp.finfo(jnp.float32).min)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


# Logits per chunk of the chunked loss: 2**27 float32 = 512 MiB, against 3.3 GB for GPT-2's full
# (16, 1024, 50304) micro-batch. Chunks of a few thousand rows keep the LM-head matmuls large enough to
# run at full speed on a GPU or TPU.
LOSS_CHUNK_LOGITS = 2**27


def loss_chunk_len(batch: int, seq_len: int, vocab: int) -> int:
    """Positions per chunk of `lm_head_loss`: the largest power of two whose (batch, chunk, vocab) logits
    fit LOSS_CHUNK_LOGITS, or seq_len (no chunking) when all of them fit."""
    rows = max(1, LOSS_CHUNK_LOGITS // (batch * vocab))
    return min(seq_len, 1 << (rows.bit_length() - 1))


def lm_head_loss(x: jax.Array, head: nnx.Embed, targets: jax.Array, vocab_limit: int | None = None,
                 chunk_len: int | None = None) -> jax.Array:
    """`cross_entropy(x @ head.embedding.T, targets, vocab_limit)` for final hidden states x (B, T, C),
    computed `chunk_len` positions at a time when the logits are large.

    The chunked path never holds more than one chunk's (B, chunk_len, vocab) logits: a custom VJP computes
    each chunk's loss and its gradients together in the forward pass and keeps only the gradients,
    dx (B, T, C) and d embedding (V, C) float32, for the backward. Its logits come out of the matmul in
    float32 (the unchunked path rounds them to the compute dtype first), and the embedding's gradient is
    summed over chunks in float32. Chunks run along T, so a batch sharded over devices stays sharded in
    every chunk.

    Small logits (chunk_len >= T, the default for a character vocabulary) take the plain path: a loop of
    one chunk would only add the (V, C) float32 gradient buffer.
    """
    B, T, _ = x.shape
    V = head.embedding.shape[0]
    chunk_len = chunk_len or loss_chunk_len(B, T, V)
    if chunk_len >= T:
        return cross_entropy(_dense(head, x).astype(jnp.float32), targets, vocab_limit)
    limit = V if vocab_limit is None else min(vocab_limit, V)
    return _chunked_loss(x, head.embedding[...], targets, limit, chunk_len)


def _to_chunks(a: jax.Array, chunk_len: int) -> jax.Array:
    """(B, T, ...) -> (n, B, chunk_len, ...), T zero-padded up to n * chunk_len."""
    B, T = a.shape[:2]
    n = -(-T // chunk_len)
    a = jnp.pad(a, [(0, 0), (0, n * chunk_len - T)] + [(0, 0)] * (a.ndim - 2))
    return a.reshape(B, n, chunk_len, *a.shape[2:]).swapaxes(0, 1)


def _chunk_logits(x: jax.Array, w: jax.Array, vocab_limit: int) -> jax.Array:
    """Logits (rows, V) float32 of a chunk x (B, t, C) against w (V, C), ids >= vocab_limit masked out."""
    logits = jnp.dot(x.reshape(-1, x.shape[-1]), w.T, preferred_element_type=jnp.float32)  # (B*t, V)
    if vocab_limit < w.shape[0]:
        logits = jnp.where(jnp.arange(w.shape[0]) < vocab_limit, logits, jnp.finfo(jnp.float32).min)
    return logits


def _chunk_mask(i, chunk_len: int, B: int, T: int) -> jax.Array:
    """(B*t,) float32: 1 for the rows of chunk i inside the sequence, 0 for the padding past T."""
    inside = i * chunk_len + jnp.arange(chunk_len) < T  # (t,)
    return jnp.broadcast_to(inside, (B, chunk_len)).reshape(-1).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_loss(x, embedding, targets, vocab_limit: int, chunk_len: int) -> jax.Array:
    return _chunk_loop(x, embedding, targets, vocab_limit, chunk_len, grads=False)[0]


def _chunk_loop(x, embedding, targets, vocab_limit: int, chunk_len: int, grads: bool):
    """The mean loss over chunks of positions and, with `grads`, its gradients: dx (B, T, C) in the
    compute dtype and d embedding (V, C) float32 (zero at ids >= vocab_limit)."""
    B, T, C = x.shape
    w = embedding.astype(x.dtype)  # (V, C) in the compute dtype, cast once for all chunks

    def chunk(carry, xs):
        total, dw = carry
        i, xc, tc = xs  # (), (B, t, C), (B, t)
        logits = _chunk_logits(xc, w, vocab_limit)  # (B*t, V)
        lse = jax.nn.logsumexp(logits, axis=-1)  # (B*t,)
        target = jnp.take_along_axis(logits, tc.reshape(-1, 1), axis=-1)[:, 0]
        inside = _chunk_mask(i, chunk_len, B, T)  # (B*t,)
        total = total + jnp.sum((lse - target) * inside)
        if not grads:
            return (total, dw), None
        probs = jnp.exp(logits - lse[:, None])  # softmax; 0 at the masked ids
        onehot = jnp.arange(w.shape[0]) == tc.reshape(-1, 1)
        dlogits = ((probs - onehot) * (inside / (B * T))[:, None]).astype(x.dtype)  # d mean / d logits
        dx = (dlogits @ w).reshape(xc.shape)  # (B, t, C)
        dw = dw + jnp.einsum("RV,RC->VC", dlogits, xc.reshape(-1, C), preferred_element_type=jnp.float32)
        return (total, dw), dx

    n = -(-T // chunk_len)
    xs = (jnp.arange(n), _to_chunks(x, chunk_len), _to_chunks(targets, chunk_len))
    dw = jnp.zeros(embedding.shape if grads else (), jnp.float32)
    (total, dw), dx = jax.lax.scan(chunk, (jnp.zeros((), jnp.float32), dw), xs, unroll=_unroll_loss_chunks())
    if grads:
        dx = dx.swapaxes(0, 1).reshape(B, n * chunk_len, C)[:, :T]  # (n, B, t, C) -> (B, T, C)
    return total / (B * T), dx, dw


# The loss is the end of the computation, so its gradient is known up to the scalar cotangent g: the
# forward pass computes it with each chunk's logits at hand (no recomputation, the same matmuls as the
# plain path) and the backward pass only scales it. Without differentiation (eval) only the loss runs.
def _chunked_loss_fwd(x, embedding, targets, vocab_limit, chunk_len):
    loss, dx, dw = _chunk_loop(x, embedding, targets, vocab_limit, chunk_len, grads=True)
    return loss, (dx, dw)


def _chunked_loss_bwd(vocab_limit, chunk_len, residuals, g):
    dx, dw = residuals
    return (g * dx).astype(dx.dtype), g * dw, None


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)


def count_params(cfg: GPTConfig) -> int:
    """Parameter count from shapes alone (no allocation): HF's convention, tied head counted once."""
    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))

