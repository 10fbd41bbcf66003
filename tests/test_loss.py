"""The training loss: `GPT.loss` (LM head + cross-entropy a chunk of positions at a time, so the full
(B, T, vocab) float32 logits never exist) against the plain `cross_entropy(model(x), y)`.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny import TINY_MODEL

from gpt2_jax import sharding
from gpt2_jax.config import GPTConfig
from gpt2_jax.loss import _chunk_loop_per_shard, cross_entropy, loss_chunk_len
from gpt2_jax.model import GPT
from gpt2_jax.plan.hlo import collectives

# vocab 96 padded to 128: the padded ids must stay out of the softmax. T=10 in chunks of 3 positions:
# four chunks, the last one a single position plus two rows of padding.
PADDED = TINY_MODEL.replace(block_size=16, vocab_size=128, dtype="float32")
VOCAB_LIMIT, B, T, CHUNK = 96, 3, 10, 3
# Float32, the same math in another order (each row's logsumexp computed directly instead of through
# optax's log-softmax, the embedding gradient summed over chunks): measured <= 4.5e-7 relative per tensor
# on one device, <= 7.5e-7 on a mesh of 8.
F32_RTOL = 1e-6
# bfloat16: the chunked head keeps float32 logits out of the matmul, the plain one rounds them to bf16.
BF16_RTOL = 2e-2


@pytest.fixture(autouse=True)
def full_precision_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def model_and_batch(cfg: GPTConfig, batch: int = B):
    model = GPT(cfg, rngs=nnx.Rngs(0))
    # Scaled-up matrices: at GPT-2's init scale the logits are nearly flat and the loss is ln(vocab)
    # whatever the arithmetic; scaled, the loss depends on every value. (Not more: at 10x the gradients
    # are so ill-conditioned that float32 itself is only good to ~5e-4, measured against float64.)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p: p * 5.0 if p.ndim >= 2 else p, params))
    x = jax.random.randint(jax.random.key(1), (batch, T), 0, VOCAB_LIMIT)
    y = jax.random.randint(jax.random.key(2), (batch, T), 0, VOCAB_LIMIT)
    return model, x, y


def relative_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def both_losses(cfg: GPTConfig, dropout_rng=None, chunk_len: int = CHUNK):
    """(loss, grads) of the chunked `GPT.loss` and of the plain logits path, same weights and batch."""
    model, x, y = model_and_batch(cfg)
    graphdef, params = nnx.split(model)

    def chunked(p):
        return nnx.merge(graphdef, p).loss(x, y, VOCAB_LIMIT, dropout_rng=dropout_rng, chunk_len=chunk_len)

    def plain(p):
        return cross_entropy(nnx.merge(graphdef, p)(x, dropout_rng=dropout_rng), y, VOCAB_LIMIT)

    return (jax.jit(jax.value_and_grad(f))(params) for f in (chunked, plain))


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_chunked_loss_and_grads_equal_the_plain_path(remat, dropout):
    cfg = PADDED.replace(remat=remat, dropout=dropout)
    (loss, grads), (ref_loss, ref_grads) = both_losses(cfg, jax.random.key(3) if dropout else None)
    assert float(ref_loss) > np.log(VOCAB_LIMIT) + 0.1  # logits not flat
    assert relative_l2(loss, ref_loss) <= F32_RTOL
    errors = jax.tree.map(relative_l2, grads, ref_grads)
    assert max(jax.tree.leaves(errors)) <= F32_RTOL, errors
    # The padded ids took no part: their embedding rows get no gradient from the head or the lookup.
    assert not np.any(grads["wte"]["embedding"][...][VOCAB_LIMIT:])


@pytest.mark.slow
def test_padded_ids_are_left_out_of_the_softmax():
    """With vocab_limit the loss is the softmax over the first 96 ids only: raising the padded rows'
    logits (as HF weights padded with zeros do) does not change it."""
    model, x, y = model_and_batch(PADDED)
    before = model.loss(x, y, VOCAB_LIMIT, chunk_len=CHUNK)
    model.wte.embedding[...] = model.wte.embedding[...].at[VOCAB_LIMIT:].set(3.0)
    np.testing.assert_allclose(model.loss(x, y, VOCAB_LIMIT, chunk_len=CHUNK), before, rtol=F32_RTOL)
    unlimited = model.loss(x, y, None, chunk_len=CHUNK)  # without vocab_limit the padded ids count
    np.testing.assert_allclose(unlimited, cross_entropy(model(x), y), rtol=F32_RTOL)
    assert float(unlimited) > float(before) + 0.1


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec", ["data:4,tensor:2", "fsdp:8"])
def test_chunked_loss_on_a_sharded_mesh(mesh_spec):
    """Batch split over the data axes (chunks run along T, so every chunk stays split), vocab over
    `tensor` or parameters over `fsdp`: the same loss and gradients as the plain path on that mesh.
    (Against one device both paths differ by up to 7.7e-6: sharding reorders the sums.)"""
    model, x, y = model_and_batch(PADDED, batch=8)
    graphdef, params = nnx.split(model)
    mesh = sharding.make_mesh(mesh_spec)
    param_sh = sharding.state_shardings(params, mesh)
    batch_sh = sharding.batch_sharding(mesh, ndim=2)
    args = jax.device_put(params, param_sh), jax.device_put(x, batch_sh), jax.device_put(y, batch_sh)

    def chunked(p, x, y):
        return nnx.merge(graphdef, p).loss(x, y, VOCAB_LIMIT, chunk_len=CHUNK)

    def plain(p, x, y):
        return cross_entropy(nnx.merge(graphdef, p)(x), y, VOCAB_LIMIT)

    (loss, grads), (ref_loss, ref_grads) = (
        jax.jit(jax.value_and_grad(f), in_shardings=(param_sh, batch_sh, batch_sh))(*args) for f in (chunked, plain))
    assert relative_l2(loss, ref_loss) <= F32_RTOL
    errors = jax.tree.map(relative_l2, grads, ref_grads)
    assert max(jax.tree.leaves(errors)) <= F32_RTOL, errors  # measured 7.5e-7


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec", ["data:2,fsdp:4", "data:8"])  # both reductions; a psum alone
def test_chunked_loss_runs_per_shard_under_the_step_mesh(mesh_spec):
    """Under the mesh context that the train step sets, the chunked loss runs per shard (shard_map over the
    batch axes): the same loss and gradients as the plain path, and the embedding gradient is reduced once,
    scattered over fsdp, where XLA's partitioner all-reduced the whole (V, C) table after every chunk."""
    model, x, y = model_and_batch(PADDED, batch=8)
    graphdef, params = nnx.split(model)
    mesh = sharding.make_mesh(mesh_spec)
    param_sh = sharding.state_shardings(params, mesh)
    batch_sh = sharding.batch_sharding(mesh, ndim=2)
    args = jax.device_put(params, param_sh), jax.device_put(x, batch_sh), jax.device_put(y, batch_sh)

    def in_context(loss):
        def f(p, x, y):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return loss(nnx.merge(graphdef, p), x, y)
        return jax.jit(jax.value_and_grad(f), in_shardings=(param_sh, batch_sh, batch_sh))

    chunked = in_context(lambda m, x, y: m.loss(x, y, VOCAB_LIMIT, chunk_len=CHUNK))
    plain = in_context(lambda m, x, y: cross_entropy(m(x), y, VOCAB_LIMIT))
    (loss, grads), (ref_loss, ref_grads) = chunked(*args), plain(*args)
    assert relative_l2(loss, ref_loss) <= F32_RTOL
    errors = jax.tree.map(relative_l2, grads, ref_grads)
    assert max(jax.tree.leaves(errors)) <= F32_RTOL, errors
    # All-reduced bytes per step (loop trips counted): no more than the plain path's, which reduces every
    # gradient once. Before, the 4 chunks' table all-reduces made it 185,104 bytes against 135,940 (data:8).
    ours, theirs = (collectives(f.lower(*args).compile().as_text()) for f in (chunked, plain))
    assert ours.get("all-reduce", {}).get("bytes", 0) <= theirs["all-reduce"]["bytes"], (ours, theirs)
    assert ("reduce-scatter" in ours) == ("fsdp" in mesh_spec), ours


@pytest.mark.parametrize("mesh_spec", ["fsdp:8", "data:2,fsdp:4"])
def test_the_table_gradient_is_all_reduced_on_its_fsdp_shard_only(mesh_spec):
    """Per shard, the (V, C) gradient is scattered over fsdp first; what crosses the other batch axes is the
    (V, C / fsdp) shard. No all-reduce carries the whole table: neither a no-op one over an axis of size 1
    (fsdp:8 has data:1), nor the data-axis sum before the scatter (data:2,fsdp:4: 4x the bytes)."""
    V, C, fsdp = 120, 24, int(mesh_spec.rsplit(":", 1)[1])  # shapes that no other array of the program has
    mesh = sharding.make_mesh(mesh_spec)
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (8, 6, C))
    table = jax.random.normal(keys[1], (V, C))
    targets = jax.random.randint(keys[2], (8, 6), 0, V)

    def per_shard(x, table, targets):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return _chunk_loop_per_shard(x, table, targets, V, 3, False)

    shardings = (sharding.batch_sharding(mesh, ndim=3), NamedSharding(mesh, P(None, "fsdp")),
                 sharding.batch_sharding(mesh, ndim=2))
    hlo = jax.jit(per_shard, in_shardings=shardings).lower(x, table, targets).compile().as_text()
    all_reduces = [line for line in hlo.splitlines() if re.search(r"\ball-reduce(-start)?\(", line)]
    assert not [line for line in all_reduces if f"f32[{V},{C}]" in line], all_reduces
    assert any(f"f32[{V},{C // fsdp}]" in line for line in all_reduces) == ("data:2" in mesh_spec), all_reduces
    assert "reduce-scatter(" in hlo


@pytest.mark.slow
def test_bfloat16_chunked_loss_is_close_and_grads_are_float32():
    (loss, grads), (ref_loss, ref_grads) = both_losses(PADDED.replace(dtype="bfloat16"))
    assert loss.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert relative_l2(loss, ref_loss) <= BF16_RTOL
    errors = jax.tree.map(relative_l2, grads, ref_grads)
    assert max(jax.tree.leaves(errors)) <= BF16_RTOL, errors


def test_chunk_length_follows_the_logits_size():
    assert loss_chunk_len(16, 1024, 50304) == 128  # GPT-2: 8 chunks of (16, 128, 50304) float32, 412 MB
    assert loss_chunk_len(1, 1024, 50304) == 1024  # one sequence's logits fit in one chunk
    assert loss_chunk_len(8, 128, 65) == 128  # a character vocabulary: never chunked


@pytest.mark.parametrize("mesh_spec, per_device", [("fsdp:8", 2), ("data:2,fsdp:4", 2), ("data:1", 16), ("", 16)])
def test_the_chunk_length_counts_the_sequences_each_device_holds(monkeypatch, mesh_spec, per_device):
    """LOSS_CHUNK_LOGITS is a budget per device: a batch split over fsdp is chunked by the rows each device
    holds. It was the whole batch's: gpt2 at micro-batch 128 on fsdp:8 ran chunks of 16 positions where 128 fit,
    8x the chunks, each re-reading and rewriting the float32 table gradient (v5e-8: 443 -> 408 GiB of HBM
    traffic per chip and step by the planner's estimate, the same memory)."""
    from gpt2_jax import loss as loss_lib

    asked = []
    monkeypatch.setattr(loss_lib, "loss_chunk_len", lambda b, t, v: asked.append(b) or 4)
    x, table = jax.ShapeDtypeStruct((16, 8, 24), jnp.float32), jax.ShapeDtypeStruct((40, 24), jnp.float32)
    targets = jax.ShapeDtypeStruct((16, 8), jnp.int32)
    if mesh_spec:
        with jax.sharding.use_abstract_mesh(sharding.make_mesh(mesh_spec).abstract_mesh):
            jax.eval_shape(loss_lib.lm_head_loss, x, table, targets)
    else:
        jax.eval_shape(loss_lib.lm_head_loss, x, table, targets)
    assert asked == [per_device]


@pytest.mark.slow
def test_chunked_loss_never_holds_the_full_logits():
    """XLA's buffer plan of the loss gradient: the plain path keeps the (B, T, vocab) float32 logits (and
    copies of them) for its backward pass, the chunked one only a chunk's."""
    cfg = TINY_MODEL.replace(block_size=256, vocab_size=4096, n_layer=1, dtype="float32")
    graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)))
    x = jnp.zeros((4, cfg.block_size), jnp.int32)
    logits_bytes = x.size * cfg.vocab_size * 4  # 16 MiB

    def temp_bytes(loss_fn) -> int:
        analysis = jax.jit(jax.grad(loss_fn)).lower(params).compile().memory_analysis()
        if analysis is None:
            pytest.skip(f"no memory_analysis on {jax.default_backend()}")
        return analysis.temp_size_in_bytes

    plain = temp_bytes(lambda p: cross_entropy(nnx.merge(graphdef, p)(x), x))
    chunked = temp_bytes(lambda p: nnx.merge(graphdef, p).loss(x, x, chunk_len=32))  # 8 chunks
    # Measured on CPU: plain 41.5 MB, chunked 10.7 MB (of which ~9.5 MB is the rest of the model: with
    # chunks of 8 positions it is 9.5 MB). The saving is more than a whole copy of the logits.
    assert plain - chunked >= logits_bytes, (plain, chunked, logits_bytes)
