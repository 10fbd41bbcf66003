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

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt2_jax import sharding
from gpt2_jax.attention import attention, probs_dropout
from gpt2_jax.config import GPTConfig
from gpt2_jax.loss import head_logits, lm_head_loss

LN_EPS = 1e-5  # GPT-2's LayerNorm epsilon (Flax's default is 1e-6)
INIT_STD = 0.02  # GPT-2 / nanoGPT init for weights and embeddings

# KV cache: (keys, values), each (n_layer, B, n_head, max_len, head_dim) in the compute dtype; heads come
# before positions so that attention reads a layer's keys and values without transposing them.
KVCache = tuple[jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class Unroll:
    """How the traced program unrolls its loops (what it computes is the same either way).

    `Unroll(layers=True, loss_chunks=True)` is what a FLOP count uses: XLA's cost analysis counts a loop
    body once. A deviceless compile (gpt2_jax.plan) runs on the CPU backend but compiles for a GPU or TPU:
    it passes `Unroll.for_platform(target platform, cfg)`.
    """

    layers: bool = False  # the layer scan (decoding always runs it rolled)
    loss_chunks: bool = False  # the chunked LM-head loss's scan (see loss.lm_head_loss)

    @classmethod
    def for_platform(cls, platform: str, cfg: GPTConfig) -> Unroll:
        """The fastest choice for `platform` ("cpu", "gpu", "tpu"): the layers unrolled on CPU without
        remat (see GPT._hidden), the loss chunks rolled."""
        return cls(layers=platform == "cpu" and cfg.remat == "none")


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


def _dense(layer: nnx.Linear, x: jax.Array) -> jax.Array:
    """`layer(x)` with x flattened to (tokens, features): the same math, but XLA:CPU computes the weight
    gradient of a 2-D matmul directly, where for a (B, T, C) input it adds a transpose and a slower
    kernel (measured 1.5x slower per matmul). A free reshape on GPU/TPU. (The tied LM head flattens
    alike: loss.head_logits.)
    """
    flat = x.reshape(-1, x.shape[-1])  # (B*T, C)
    out = layer(flat)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _layer_norm(cfg: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        cfg.n_embd, epsilon=LN_EPS, use_bias=cfg.bias, dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.float32, scale_init=_ones(("norm",)), bias_init=_zeros(("norm",)), rngs=rngs,
    )


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
        y = attention(q, k, v, mask, self.impl, probs_dropout(self.attn_dropout, dropout_rng))  # (B, T, nh, hs)
        y = _dense(self.c_proj, y.reshape(B, T, C))
        return self.resid_dropout(y, deterministic=dropout_rng is None, rngs=dropout_rng), cache


_GELU_C, _GELU_K = float(np.sqrt(2 / np.pi)), 0.044715  # tanh(C (x + K x^3)), as jax.nn.gelu(approximate=True)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """GPT-2's GELU (the tanh approximation), as jax.nn.gelu(x, approximate=True). Its backward pass keeps only
    x and recomputes the rest in float32: autodiff of the formula keeps several (B, T, 4C) intermediates."""
    return jax.nn.gelu(x, approximate=True)


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    xf = x.astype(jnp.float32)
    t = jnp.tanh(_GELU_C * (xf + _GELU_K * xf**3))
    slope = 0.5 * (1 + t) + 0.5 * xf * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_K * xf * xf)
    return ((g.astype(jnp.float32) * slope).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class MLP(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        proj_std = INIT_STD * (2 * cfg.n_layer) ** -0.5
        self.c_fc = _linear(cfg, cfg.n_embd, 4 * cfg.n_embd, ("embed", "mlp"), INIT_STD, rngs)
        self.c_proj = _linear(cfg, 4 * cfg.n_embd, cfg.n_embd, ("mlp", "embed"), proj_std, rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x, dropout_rng) -> jax.Array:
        h = gelu(_dense(self.c_fc, x))  # GPT-2's tanh approximation
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

    def __call__(self, idx: jax.Array, *, dropout_rng: jax.Array | None = None,
                 unroll: Unroll | None = None) -> jax.Array:
        """Logits (B, T, vocab_size) float32 for int tokens (B, T). Dropout is on iff `dropout_rng` is set.
        `unroll`: how the loops are traced (default: `Unroll.for_platform` of this process's backend)."""
        logits, _ = self._forward(idx, None, 0, dropout_rng, self._unroll(unroll).layers)
        return logits

    def loss(self, idx: jax.Array, targets: jax.Array, vocab_limit: int | None = None, *,
             dropout_rng: jax.Array | None = None, unroll: Unroll | None = None,
             chunk_len: int | None = None) -> jax.Array:
        """Mean next-token cross-entropy of `targets` (B, T) int: the training loss, equal to
        `cross_entropy(self(idx), targets, vocab_limit)` but without the (B, T, vocab) float32 logits
        when they are large (see loss.lm_head_loss). `unroll` as in `__call__`."""
        unroll = self._unroll(unroll)
        x, _ = self._hidden(idx, None, 0, dropout_rng, unroll.layers)
        return lm_head_loss(x, self.wte.embedding[...], targets, vocab_limit, chunk_len, unroll.loss_chunks)

    def crop_block_size(self, block_size: int) -> None:
        """Keep the first `block_size` learned positions, as nanoGPT does: fine-tuning at a shorter context
        than the checkpoint's. Every other weight is independent of the context length."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"cannot crop the context to {block_size}: the model has {self.config.block_size} "
                             "learned positions, and a longer context would need positions it never learned")
        self.wpe.embedding.set_value(self.wpe.embedding[:block_size])
        self.wpe.num_embeddings = block_size
        self.config = self.config.replace(block_size=block_size)

    def _unroll(self, unroll: Unroll | None) -> Unroll:
        return Unroll.for_platform(jax.default_backend(), self.config) if unroll is None else unroll

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
        return self._forward(idx, cache, pos, None, False, layers)

    def split_layers(self) -> list:
        """The blocks' parameters one layer at a time (n_layer states without the stacked axis).

        Computed once outside a decode loop and passed to every `decode` step, they spare XLA from
        copying each layer's weights out of the stacked arrays on every token (measured on CPU, 124M at
        batch 1: 32 -> 23 ms/token).
        """
        stacked = nnx.state(self.h)
        return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(self.config.n_layer)]

    def _forward(self, idx, cache, pos, dropout_rng, unroll: bool, layers=None):
        x, cache = self._hidden(idx, cache, pos, dropout_rng, unroll, layers)
        logits = head_logits(x, self.wte.embedding[...])  # tied LM head: x @ wte.T -> (B, T, vocab)
        return logits.astype(jnp.float32), cache

    def _hidden(self, idx, cache, pos, dropout_rng, unroll: bool, layers=None):
        """The final hidden states (B, T, C) after ln_f, in the compute dtype, and the updated cache.
        `unroll`: unroll the layer scan (`Unroll.layers`; ignored when decoding, which runs it rolled)."""
        cfg = self.config
        B, T = idx.shape
        max_len = cfg.block_size if cache is None else cache[0].shape[3]
        if T > max_len:
            raise ValueError(f"sequence length {T} exceeds block_size {max_len}; crop the input to the "
                             f"last {max_len} tokens")
        positions = pos + jnp.arange(T)
        # Split by batch under a mesh: propagation would follow the table's `embed` split (sharding.py).
        x = sharding.constrain_batch(self.wte(idx) + self.wpe(positions)[None])  # (B, T, C)
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
        unroll = cache is None and unroll
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


def count_params(cfg: GPTConfig) -> int:
    """Parameter count from shapes alone (no allocation): HF's convention, tied head counted once."""
    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))

