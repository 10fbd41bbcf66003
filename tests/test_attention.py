"""Attention implementations, the bfloat16 compute path and rematerialisation against plain references.

`attention.attention` has its implementations ("xla": jax.nn.dot_product_attention's XLA path, "cudnn":
cuDNN flash attention, "blocked": causal query blocks that skip most of the masked half, "einsum": the
model's own plain version); each must equal softmax(QK^T/sqrt(hs))V
computed here in float64 numpy, on the causal training path and on the decode path (a query block at
position `pos` against a longer KV cache, with the cache mask).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import TINY_MODEL, tiny_model

from gpt2_jax.attention import attention, blocked_attention
from gpt2_jax.config import GPTConfig
from gpt2_jax.loss import cross_entropy
from gpt2_jax.model import GPT
from gpt2_jax.training.settings import TrainConfig, resolve

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="cuDNN flash attention needs an NVIDIA GPU")

# Float32 attention on O(1) inputs: the only error is float32 rounding in sums over <= 256 terms
# (measured <= 1e-6, gradients <= 2.2e-6); 1e-5 leaves 4x headroom while a masking or scaling bug is O(0.1).
F32_ATOL = 1e-5
# cuDNN runs in bfloat16 (8 significant bits, relative rounding 4e-3 per value): outputs of size ~1
# are compared at 2e-2.
BF16_ATOL = 2e-2
# The bfloat16 model against the float32 one, same weights: the bound; measured 1.1e-3 on a loss
# of 4.7 (bf16 keeps 8 significant bits; matmul inputs and the logits are rounded to bf16).
BF16_LOSS_ATOL = 2e-2
# Remat recomputes the same float32 ops; XLA may fuse them differently (measured: loss equal, grads 1.5e-8).
REMAT_ATOL = 1e-5


@pytest.fixture(autouse=True)
def full_precision_matmuls():
    """Full float32 matmuls (JAX's GPU/TPU default is TF32/bf16 passes; CPU is full float32 anyway)."""
    with jax.default_matmul_precision("highest"):
        yield


def reference_attention(q, k, v, mask) -> np.ndarray:
    """softmax(q k^T / sqrt(hs), masked) v in float64; q (B, T, nh, hs), k, v (B, S, nh, hs), mask (T, S)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])  # (B, nh, T, S)
    scores = np.where(mask, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v)  # (B, T, nh, hs)


def qkv(T: int, S: int, dtype=jnp.float32, B: int = 2, nh: int = 3, hs: int = 16):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(kq, (B, T, nh, hs), dtype), jax.random.normal(kk, (B, S, nh, hs), dtype),
            jax.random.normal(kv, (B, S, nh, hs), dtype))


# T = 130 and 200 split into 3 and 4 blocks for "blocked", the last one shorter than the rest.
@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "blocked", "einsum"])
@pytest.mark.parametrize("T", [1, 17, 130, 200])
def test_causal_training_path_matches_reference(impl, T):
    q, k, v = qkv(T, T)
    out = jax.jit(attention, static_argnums=(3, 4))(q, k, v, None, impl)
    causal = np.tril(np.ones((T, T), bool))
    np.testing.assert_allclose(out, reference_attention(q, k, v, causal), atol=F32_ATOL, rtol=0)


# "cudnn" runs here on every platform: with a mask the model routes to the XLA path, which is how
# decoding works in a model configured for cuDNN training.
@pytest.mark.parametrize("impl", ["xla", "blocked", "einsum", "cudnn"])
@pytest.mark.parametrize("T,pos", [(1, 0), (1, 9), (4, 5)])
def test_decode_path_with_cache_mask_matches_reference(impl, T, pos):
    S = 12  # cache length; positions > pos + t are empty (zeros in a real cache, random here)
    q, k, v = qkv(T, S)
    mask = jnp.arange(S)[None, :] <= pos + jnp.arange(T)[:, None]  # the mask CausalSelfAttention builds
    out = jax.jit(attention, static_argnums=4)(q, k, v, mask, impl)
    np.testing.assert_allclose(out, reference_attention(q, k, v, np.asarray(mask)), atol=F32_ATOL, rtol=0)


@pytest.mark.parametrize("T", [100, 256])
def test_blocked_gradients_match_einsum(T):
    """The blocked path's backward pass (what training runs on CPU) equals the plain one's."""
    q, k, v = qkv(T, T)
    cotangent = jax.random.normal(jax.random.key(7), q.shape)

    def grads(impl):
        loss = lambda *qkv: jnp.sum(attention(*qkv, None, impl) * cotangent)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(grads("blocked"), grads("einsum")):
        np.testing.assert_allclose(got, want, atol=F32_ATOL, rtol=0)


def test_blocked_dropout_maps_every_block_with_its_own_index():
    """Attention dropout on the blocked path (the CPU default, char preset: dropout 0.2): each query block's
    probabilities go through `dropout` with its own block index (the model folds it into the RNG key, so
    the blocks draw independent masks), and what it returns is what weights the values."""
    q, k, v = qkv(200, 200)  # blocks of 64 rows: 64, 64, 64 and 8
    seen = []

    def double(probs, block):
        seen.append((block, probs.shape))
        return 2.0 * probs

    out = blocked_attention(q, k, v, double)
    B, _, nh, _ = q.shape
    assert seen == [(0, (B, nh, 64, 64)), (1, (B, nh, 64, 128)), (2, (B, nh, 64, 192)), (3, (B, nh, 8, 200))]
    np.testing.assert_allclose(out, 2.0 * attention(q, k, v, None, "einsum"), atol=2 * F32_ATOL, rtol=0)


@pytest.mark.slow
def test_model_sends_attention_dropout_through_the_blocked_path(monkeypatch):
    import gpt2_jax.attention as attention_lib  # noqa: PLC0415

    calls, real = [], attention_lib.blocked_attention
    monkeypatch.setattr(attention_lib, "blocked_attention",
                        lambda q, k, v, dropout=None: calls.append(dropout is not None) or real(q, k, v, dropout))
    cfg = TINY_MODEL.replace(dropout=0.2, attention="blocked", block_size=160)
    _, with_dropout, _ = loss_and_grads(cfg, dropout_rng=jax.random.key(3))
    _, without, _ = loss_and_grads(cfg)
    assert calls == [True, False]  # traced once per call (the layers share one scan body)
    assert float(with_dropout) != float(without)


@needs_gpu
@pytest.mark.parametrize("T", [64, 256])
def test_cudnn_causal_training_path_matches_reference(T):
    q, k, v = qkv(T, T, jnp.bfloat16, nh=4, hs=64)
    out = jax.jit(attention, static_argnums=(3, 4))(q, k, v, None, "cudnn")
    causal = np.tril(np.ones((T, T), bool))
    ref = reference_attention(*(np.asarray(a.astype(jnp.float32)) for a in (q, k, v)), causal)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, atol=BF16_ATOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "blocked", "einsum", "cudnn"])
def test_kv_cache_decode_matches_full_forward_per_implementation(impl):
    """Prefill 5 tokens, then decode one at a time: the logits equal one full forward pass of the plain
    einsum model. A "cudnn" model decodes in float32 on any platform (its masked path is XLA's)."""
    idx = jax.random.randint(jax.random.key(1), (2, 12), 0, TINY_MODEL.vocab_size)
    full = tiny_model(attention="einsum")(idx)
    model = tiny_model(attention=impl)  # the same weights: the same seed
    for layers in (None, model.split_layers()):  # the stacked weights, or split once for a decode loop
        decode = nnx.jit(lambda m, x, c, p, layers=layers: m.decode(x, c, p, layers))
        cache = model.init_cache(2, 16)
        logits, cache = decode(model, idx[:, :5], cache, 0)
        steps = [logits]
        for t in range(5, 12):
            logits, cache = decode(model, idx[:, t : t + 1], cache, t)
            steps.append(logits)
        np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=F32_ATOL, rtol=0)


def test_cudnn_with_float32_compute_is_a_clear_error():
    q, k, v = qkv(8, 8)
    with pytest.raises(ValueError, match="needs bfloat16"):
        attention(q, k, v, None, "cudnn")


def loss_and_grads(cfg: GPTConfig, weight_scale: float = 1.0, dropout_rng=None):
    """Loss and gradients of a tiny model: the same weights for any dtype/attention/remat, with the
    matrices scaled by `weight_scale` (at GPT-2's init scale the logits are nearly flat and the loss is
    ln(vocab) whatever the arithmetic; scaled up, the loss depends on every value)."""
    model = GPT(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p: p * weight_scale if p.ndim >= 2 else p, params))
    data = jax.random.randint(jax.random.key(2), (4, cfg.block_size + 1), 0, cfg.vocab_size)
    x, y = data[:, :-1], data[:, 1:]
    loss_fn = lambda m: cross_entropy(m(x, dropout_rng=dropout_rng), y)  # noqa: E731
    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    return model, loss, grads


@pytest.mark.slow
def test_bfloat16_keeps_float32_params_and_loss_close_to_float32():
    f32_model, f32_loss, _ = loss_and_grads(TINY_MODEL, weight_scale=10.0)
    bf16_model, bf16_loss, bf16_grads = loss_and_grads(TINY_MODEL.replace(dtype="bfloat16"), weight_scale=10.0)
    params = nnx.state(bf16_model, nnx.Param)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(bf16_grads))
    same = jax.tree.map(np.array_equal, params, nnx.state(f32_model, nnx.Param))
    assert all(jax.tree.leaves(same))  # same weights: only the compute dtype differs
    assert float(f32_loss) > np.log(TINY_MODEL.vocab_size) + 0.3  # logits are far from flat
    assert bf16_loss.dtype == jnp.float32
    assert abs(float(bf16_loss) - float(f32_loss)) <= BF16_LOSS_ATOL  # measured 1.1e-3
    assert float(bf16_loss) != float(f32_loss)  # the bf16 path really ran in bf16


@pytest.mark.slow
def test_bfloat16_rounds_matmul_inputs_but_keeps_the_residual_stream_float32():
    """As under torch autocast (nanoGPT): embeddings and the residual sums stay float32, LayerNorms hand
    the compute dtype to the matmuls, and the matmuls run in bfloat16."""
    model = tiny_model(dtype="bfloat16")
    assert model.wte(jnp.zeros((1, 4), jnp.int32)).dtype == jnp.float32
    assert model.wpe(jnp.arange(4)).dtype == jnp.float32
    block = nnx.merge(nnx.graphdef(model.h), model.split_layers()[0])  # one block, unstacked
    x = jax.random.normal(jax.random.key(4), (1, 4, TINY_MODEL.n_embd), jnp.float32)
    assert block(x)[0].dtype == jnp.float32
    assert block.ln_1(x).dtype == jnp.bfloat16
    assert block.attn.c_attn(block.ln_1(x)).dtype == jnp.bfloat16
    assert model(jnp.zeros((1, 4), jnp.int32)).dtype == jnp.float32  # logits: bf16 head, cast for the loss


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "dots"])
@pytest.mark.parametrize("impl", ["xla", "blocked"])
def test_remat_gives_same_loss_and_grads(remat, impl, dropout=0.2):
    """Recomputing a block in the backward pass must not change anything, dropout masks included
    (blocked: T=160, three query blocks, each with its own dropout mask). With dropout on, the same check
    covers the deterministic path too."""
    cfg = TINY_MODEL.replace(dropout=dropout, attention=impl,
                             block_size=160 if impl == "blocked" else TINY_MODEL.block_size)
    rng = jax.random.key(3) if dropout else None
    _, loss, grads = loss_and_grads(cfg, dropout_rng=rng)
    _, loss_r, grads_r = loss_and_grads(cfg.replace(remat=remat), dropout_rng=rng)
    np.testing.assert_allclose(loss_r, loss, atol=REMAT_ATOL, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=REMAT_ATOL, rtol=0), grads_r, grads)


@pytest.mark.slow
def test_remat_saves_activation_memory():
    """XLA's buffer plan for the gradient: remat must shrink the temporaries. (It silently stops doing
    so if the layer loop is unrolled: XLA then schedules the recomputation early and keeps everything.)"""
    cfg = TINY_MODEL.replace(n_layer=4, block_size=64)
    x = jnp.zeros((8, cfg.block_size), jnp.int32)

    def temp_bytes(remat: str) -> int:
        graphdef, params = nnx.split(GPT(cfg.replace(remat=remat), rngs=nnx.Rngs(0)))
        grad = jax.jit(jax.grad(lambda p: cross_entropy(nnx.merge(graphdef, p)(x), x)))
        analysis = grad.lower(params).compile().memory_analysis()
        if analysis is None:
            pytest.skip(f"no memory_analysis on {jax.default_backend()}")
        return analysis.temp_size_in_bytes

    none, dots, full = (temp_bytes(r) for r in ("none", "dots", "full"))
    assert full < dots < none, (none, dots, full)


@pytest.mark.parametrize("backend,dtype,expected", [("cpu", "", "blocked"), ("gpu", "", "cudnn"),
                                                    ("gpu", "float32", "xla"), ("tpu", "", "splash"),
                                                    ("tpu", "float32", "xla")])
def test_trainer_default_attention_per_platform(backend, dtype, expected):
    """`--attention` empty: cuDNN on GPUs and splash (Pallas) on TPUs in bf16, blocked on CPU, else XLA's."""
    assert resolve(TrainConfig(dtype=dtype), backend, 1).attention == expected
    assert resolve(TrainConfig(dtype=dtype, attention="einsum"), backend, 1).attention == "einsum"  # explicit wins


def test_unknown_attention_is_a_clear_error():
    with pytest.raises(ValueError, match=r"attention='flash': use one of xla, cudnn, blocked, einsum"):
        GPTConfig(attention="flash")
