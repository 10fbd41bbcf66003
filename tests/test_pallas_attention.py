"""Splash attention (gpt2_jax/pallas_attention.py), the Pallas TPU kernel, on CPU in Pallas interpret mode.

The kernel runs per shard under shard_map over the mesh context that the train step sets
(`jax.sharding.use_abstract_mesh`); on a CPU mesh it runs interpreted. Compared with the model's einsum
attention in float32, within what float32 can promise for a different summation order (`f32_atol`): the kernel
scales q before the product and sums over the keys in 128-blocks, so its rounding differs from the einsum's. Under a
sharded mesh each device computes whole sequences and whole heads: the same numbers as one device.
The tests run on the 8 fake CPU devices of conftest.py; interpreting the kernel is slow, so those over
~20 s on 2 cores are marked e2e, and those over 6 s slow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import f32_atol

from gpt2_jax import pallas_attention, sharding
from gpt2_jax.attention import einsum_attention
from gpt2_jax.config import GPTConfig, default_attention
from gpt2_jax.model import GPT

# One device interprets all 8 sequences in turn (~20-50 s): slow; a shard interprets one or two.
MESHES = [pytest.param("data:1", marks=pytest.mark.e2e), "data:8", "data:2,fsdp:4", "fsdp:4,tensor:2"]


@pytest.fixture(autouse=True)
def full_precision_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def qkv_and_cotangent(B=8, T=384, H=4, D=32):
    """Seeded (B, T, H, D) float32 q, k, v and an output cotangent. T=384 runs three 128-blocks: the kernel
    skips the masked ones and masks inside the diagonal ones."""
    return tuple(jax.random.normal(k, (B, T, H, D), jnp.float32) for k in jax.random.split(jax.random.key(0), 4))


def on_mesh(fn, mesh):
    """fn under the mesh context, jitted with the batch split over the mesh's batch axes (as the train step)."""

    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    sh = sharding.batch_sharding(mesh, ndim=4)
    return jax.jit(traced, in_shardings=(sh,) * 3, out_shardings=sh)


def mesh_of(spec: str):
    return sharding.make_mesh(spec, jax.devices()[:1] if spec == "data:1" else None)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec", MESHES)
def test_splash_equals_einsum_forward_and_gradients(mesh_spec):
    q, k, v, g = qkv_and_cotangent()
    splash = on_mesh(pallas_attention.splash_attention, mesh_of(mesh_spec))
    ref = einsum_attention(q, k, v, None)
    T = q.shape[1]  # each output sums over up to T keys; each gradient over T queries or keys
    np.testing.assert_allclose(splash(q, k, v), ref, atol=f32_atol(ref, T), rtol=0)

    def grads(attn):
        return jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v) * g), argnums=(0, 1, 2))(q, k, v)

    for got, want, name in zip(grads(splash), grads(lambda q, k, v: einsum_attention(q, k, v, None)), "qkv"):
        np.testing.assert_allclose(got, want, atol=f32_atol(want, T), rtol=0, err_msg=f"d{name}")


def test_splash_program_holds_the_kernel_and_no_scores():
    """On a mesh: one Pallas call per direction and no (B, H, T, T) scores; without one: XLA's attention."""
    q, k, v, _ = qkv_and_cotangent()
    mesh = mesh_of("data:2,fsdp:4")

    def jaxpr(fn):
        return str(jax.make_jaxpr(lambda q, k, v: jax.grad(lambda q: fn(q, k, v).sum())(q))(q, k, v))

    sharded = jaxpr(lambda *a: on_mesh(pallas_attention.splash_attention, mesh)(*a))
    assert "pallas_call" in sharded and "384,384" not in sharded.replace(" ", "")
    plain = jaxpr(pallas_attention.splash_attention)  # no mesh context: decoding, HellaSwag
    assert "pallas_call" not in plain
    ref = einsum_attention(q, k, v, None)
    np.testing.assert_allclose(pallas_attention.splash_attention(q, k, v), ref, atol=f32_atol(ref, q.shape[1]), rtol=0)


def test_heads_not_divisible_by_tensor_is_refused():
    q, k, v, _ = qkv_and_cotangent(H=3)
    with pytest.raises(ValueError, match="splits the 3 heads over tensor:2"):
        on_mesh(pallas_attention.splash_attention, mesh_of("data:4,tensor:2"))(q, k, v)


TINY = GPTConfig(block_size=128, vocab_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0)


@pytest.mark.e2e  # 50-90 s on 2 cores: the interpreted kernel, forward and backward, in 2 layers
@pytest.mark.parametrize("mesh_spec", ["fsdp:8", "data:4,tensor:2"])
def test_model_loss_and_grads_with_splash_on_a_mesh(mesh_spec):
    """The GPT's loss and gradients with attention='splash' on a sharded mesh equal the einsum model's on one
    device (same weights): the kernel, its shard_map and the activation constraints together."""
    model = GPT(TINY.replace(attention="einsum"), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    splash_def, _ = nnx.split(GPT(TINY.replace(attention="splash"), rngs=nnx.Rngs(0)))
    keys = jax.random.split(jax.random.key(1))
    x, y = (jax.random.randint(k, (8, TINY.block_size), 0, TINY.vocab_size) for k in keys)
    mesh = sharding.make_mesh(mesh_spec)
    param_sh, batch_sh = sharding.state_shardings(params, mesh), sharding.batch_sharding(mesh, ndim=2)

    def sharded(p, x, y):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return nnx.merge(splash_def, p).loss(x, y)

    loss, grads = jax.jit(jax.value_and_grad(sharded), in_shardings=(param_sh, batch_sh, batch_sh))(params, x, y)
    ref_loss, ref_grads = jax.value_and_grad(lambda p: nnx.merge(graphdef, p).loss(x, y))(params)
    tokens = x.size  # the loss averages, and each weight's gradient sums, over every token
    np.testing.assert_allclose(loss, ref_loss, atol=f32_atol(ref_loss, tokens), rtol=0)
    excess = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()) / f32_atol(b, tokens), grads, ref_grads)
    assert max(jax.tree.leaves(excess)) <= 1.0, excess


def test_splash_is_the_tpu_default_for_bfloat16():
    assert default_attention("tpu", "bfloat16") == "splash"
    assert default_attention("tpu", "float32") == "xla"
