"""Causal attention with a Pallas TPU kernel: splash attention (jax.experimental.pallas.ops.tpu).

Splash ("sparse flash") attention computes attention block by block, skipping the blocks the causal mask
hides, and never materialises the (B, H, T, T) scores that XLA attention holds for the backward pass (issue
17, deviceless v5e-8 compiles: the gpt2 train step at micro-batch 64 goes from 14.24 to 8.10 GiB of
temporaries per chip).

How it runs, and why:
- XLA will not partition a Mosaic kernel ("Mosaic kernels cannot be automatically partitioned"), so it runs
  per shard under `shard_map`: the batch split over the data-parallel axes, the heads over `tensor` (the
  layout c_attn gives q, k and v, see sharding.py), the sequence and head dims whole.
- The kernel takes one example's (H, T, D) and does not scale q: the wrapper transposes the model's
  (B, T, H, D) to (B, H, T, D), scales q by 1/sqrt(D), and maps the kernel over the batch with vmap.
- The mesh comes from the context that the train and eval steps set while tracing
  (`jax.sharding.use_abstract_mesh`). Where none is set (decoding, HellaSwag, evaluate's CLI, unsharded
  tests) this falls back to XLA's attention, which is the same math.
- The kernels have no CPU lowering: on a CPU mesh they run in Pallas interpret mode (slow; for tests).
- No dropout: splash has none; attention with dropout runs on the einsum path (attention.py).
- Inside the train step's shard_map over every axis (a data-parallel mesh: step._gradient_sums), the arrays are
  each device's own, and the kernel runs on them directly.

Block sizes: 512 (or the largest of 512/256/128 dividing T), as MaxText's default; whether they suit each
TPU generation is unmeasured (no TPU here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gpt2_jax import sharding

BLOCK_SIZES = (512, 256, 128)  # the first that divides T; a T that none divides is one block


def block_size(T: int) -> int:
    return next((b for b in BLOCK_SIZES if T % b == 0), T)


def _kernel(heads: int, T: int, interpret: bool):
    """A causal splash kernel for (heads, T, D) inputs. Built while tracing: it holds the mask's block map as
    arrays, which become constants of the program (splash caches the mask processing itself)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # noqa: PLC0415 (heavy, TPU only)

    b = block_size(T)
    blocks = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                               block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = splash.MultiHeadMask([splash.CausalMask((T, T))] * heads)
    return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool | None = None) -> jax.Array:
    """Causal attention on (B, T, H, D) q, k, v -> (B, T, H, D), per shard of the context mesh.

    `interpret`: run the kernel in Pallas interpret mode; None = where the context mesh is a CPU one.
    Without a mesh context (or one without batch axes): jax.nn.dot_product_attention's XLA path.
    """
    axes, mesh = sharding.mesh_batch_axes(), jax.sharding.get_abstract_mesh()
    own = not mesh.empty and not mesh.auto_axes  # inside a shard_map manual over every axis: this device's arrays
    if not axes and not own:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    B, T, H, D = q.shape
    tensor = 1 if own else mesh.shape.get("tensor", 1)
    if H % tensor:
        raise ValueError(f"attention='splash' splits the {H} heads over tensor:{tensor}, which does not divide "
                         f"them; use a tensor size that divides n_head, or attention='xla'")
    dp = 1
    for a in axes:
        dp *= mesh.shape[a]
    if B % dp:
        raise ValueError(f"attention='splash': batch {B} is not divisible by the {dp} data-parallel devices")
    if interpret is None:
        interpret = mesh.abstract_device is not None and mesh.abstract_device.platform == "cpu"
    kernel = _kernel(H // tensor, T, interpret)

    def per_shard(q, k, v):  # (b, T, h, D) each: this device's sequences and heads
        q = q * jnp.asarray(D**-0.5, q.dtype)  # the kernel does not scale
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # (b, h, T, D)
        return jax.vmap(kernel)(q, k, v).transpose(0, 2, 1, 3)  # (b, T, h, D)

    if own:
        # The train step of a data-parallel mesh runs each replica's micro-batches under a shard_map manual over
        # every axis (step._gradient_sums): the kernel runs on this device's arrays as they are.
        return per_shard(q, k, v)
    spec = P(axes, None, "tensor" if "tensor" in mesh.axis_names else None, None)
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)
