"""Next-token cross-entropy: per token (validation loss, HellaSwag), as the mean (the training loss), and the
chunked LM-head loss that never holds the (B, T, vocab) float32 logits of a large vocabulary.

Every loss here leaves the ids >= vocab_limit (the rows a padded vocabulary adds) out of the softmax. This
matters when fine-tuning HF weights padded with zero rows: their logit is 0, far above GPT-2's typical
(strongly negative) logits, so they would otherwise swallow most of the probability mass.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gpt2_jax import sharding

# Logits per chunk of the chunked loss, on each device: 2**27 float32 = 512 MiB, against 3.3 GB for GPT-2's full
# (16, 1024, 50304) micro-batch. Chunks of a few thousand rows keep the LM-head matmuls large enough to
# run at full speed on a GPU or TPU.
LOSS_CHUNK_LOGITS = 2**27


def _limit_vocab(logits: jax.Array, vocab_limit: int | None) -> jax.Array:
    """float32 `logits` (..., V) with the ids >= vocab_limit masked out of the softmax."""
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, jnp.finfo(jnp.float32).min)
    return logits


def _log_z_and_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log of the softmax normaliser, -log p(target)) per row of float32 logits (..., V), targets (...)."""
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z, log_z - target_logits


def token_losses(logits: jax.Array, targets: jax.Array, vocab_limit: int | None = None) -> jax.Array:
    """Cross-entropy of each target given its logits: float32 of the shape of `targets` (int), for
    logits (..., V); the softmax runs over the first `vocab_limit` ids (default: all)."""
    return _log_z_and_losses(_limit_vocab(logits.astype(jnp.float32), vocab_limit), targets)[1]


def cross_entropy(logits: jax.Array, targets: jax.Array, vocab_limit: int | None = None) -> jax.Array:
    """Mean next-token loss in float32; `targets` (B, T) int; vocab_limit as in `token_losses`."""
    return token_losses(logits, targets, vocab_limit).mean()


def head_logits(x: jax.Array, embedding: jax.Array) -> jax.Array:
    """The tied LM head: `x @ embedding.T` in the dtype of x (the compute dtype), for x (..., C) and
    embedding (V, C), with x flattened to (tokens, C) as model._dense explains."""
    flat = x.reshape(-1, x.shape[-1])  # (B*T, C)
    out = flat @ embedding.astype(flat.dtype).T
    return out.reshape(*x.shape[:-1], out.shape[-1])


def loss_chunk_len(batch: int, seq_len: int, vocab: int) -> int:
    """Positions per chunk of `lm_head_loss`: the largest power of two whose (batch, chunk, vocab) logits
    fit LOSS_CHUNK_LOGITS, or seq_len (no chunking) when all of them fit. `batch`: the sequences one device
    holds (the chunks run on each device's rows)."""
    rows = max(1, LOSS_CHUNK_LOGITS // (batch * vocab))
    return min(seq_len, 1 << (rows.bit_length() - 1))


def _batch_split() -> int:
    """How many devices split a batch's rows under the mesh context: the product of the batch axes left to the
    partitioner (sharding.mesh_batch_axes); 1 without a mesh context."""
    mesh, axes = jax.sharding.get_abstract_mesh(), sharding.mesh_batch_axes()
    return math.prod(mesh.shape[a] for a in axes) if axes else 1


def _rows_per_device(batch: int) -> int:
    """The sequences of a (batch, T, C) activation that one device holds under the mesh context; `batch` where
    the devices do not split it evenly."""
    split = _batch_split()
    return batch // split if batch % split == 0 else batch


def lm_head_loss(x: jax.Array, embedding: jax.Array, targets: jax.Array, vocab_limit: int | None = None,
                 chunk_len: int | None = None, unroll: bool = False) -> jax.Array:
    """`cross_entropy(head_logits(x, embedding), targets, vocab_limit)` for final hidden states x (B, T, C),
    computed `chunk_len` positions at a time when the logits are large.

    The chunked path never holds more than one chunk's (B, chunk_len, vocab) logits: a custom VJP computes
    each chunk's loss and its gradients together in the forward pass and keeps only the gradients,
    dx (B, T, C) and d embedding (V, C) float32, for the backward. Its logits come out of the matmul in
    float32 (the unchunked path rounds them to the compute dtype first), and the embedding's gradient is
    summed over chunks in float32. Chunks run along T, so a batch sharded over devices stays sharded in
    every chunk. `unroll` unrolls the loop over chunks (for a FLOP count: XLA's cost analysis counts a
    loop body once); the result is the same.

    Small logits (chunk_len >= T, the default for a character vocabulary) take the plain path: a loop of
    one chunk would only add the (V, C) float32 gradient buffer.
    """
    B, T, _ = x.shape
    V = embedding.shape[0]
    chunk_len = chunk_len or loss_chunk_len(_rows_per_device(B), T, V)
    if chunk_len >= T:
        return cross_entropy(head_logits(x, embedding).astype(jnp.float32), targets, vocab_limit)
    limit = V if vocab_limit is None else min(vocab_limit, V)
    return _chunked_loss(x, embedding, targets, limit, chunk_len, unroll)


def _to_chunks(a: jax.Array, chunk_len: int) -> jax.Array:
    """(B, T, ...) -> (n, B, chunk_len, ...), T zero-padded up to n * chunk_len."""
    B, T = a.shape[:2]
    n = -(-T // chunk_len)
    a = jnp.pad(a, [(0, 0), (0, n * chunk_len - T)] + [(0, 0)] * (a.ndim - 2))
    return a.reshape(B, n, chunk_len, *a.shape[2:]).swapaxes(0, 1)


def _chunk_logits(x: jax.Array, w: jax.Array, vocab_limit: int) -> jax.Array:
    """Logits (rows, V) float32 of a chunk x (B, t, C) against w (V, C), ids >= vocab_limit masked out."""
    logits = jnp.dot(x.reshape(-1, x.shape[-1]), w.T, preferred_element_type=jnp.float32)  # (B*t, V)
    return _limit_vocab(logits, vocab_limit)


def _chunk_mask(i, chunk_len: int, B: int, T: int) -> jax.Array:
    """(B*t,) float32: 1 for the rows of chunk i inside the sequence, 0 for the padding past T."""
    inside = i * chunk_len + jnp.arange(chunk_len) < T  # (t,)
    return jnp.broadcast_to(inside, (B, chunk_len)).reshape(-1).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_loss(x, embedding, targets, vocab_limit: int, chunk_len: int, unroll: bool) -> jax.Array:
    return _chunk_loop(x, embedding, targets, vocab_limit, chunk_len, unroll, grads=False)[0]


def _chunk_loop(x, embedding, targets, vocab_limit: int, chunk_len: int, unroll: bool, grads: bool):
    """The mean loss over chunks of positions and, with `grads`, its gradients: dx (B, T, C) in the
    compute dtype and d embedding (V, C) float32 (zero at ids >= vocab_limit)."""
    B, T, C = x.shape
    w = embedding.astype(x.dtype)  # (V, C) in the compute dtype, cast once for all chunks

    def chunk(carry, xs):
        total, dw = carry
        i, xc, tc = xs  # (), (B, t, C), (B, t)
        logits = _chunk_logits(xc, w, vocab_limit)  # (B*t, V)
        lse, losses = _log_z_and_losses(logits, tc.reshape(-1))  # (B*t,) each
        inside = _chunk_mask(i, chunk_len, B, T)  # (B*t,)
        total = total + jnp.sum(losses * inside)
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
    (total, dw), dx = jax.lax.scan(chunk, (jnp.zeros((), jnp.float32), dw), xs, unroll=unroll)
    if grads:
        dx = dx.swapaxes(0, 1).reshape(B, n * chunk_len, C)[:, :T]  # (n, B, t, C) -> (B, T, C)
    return total / (B * T), dx, dw


# The loss is the end of the computation, so its gradient is known up to the scalar cotangent g: the
# forward pass computes it with each chunk's logits at hand (no recomputation, the same matmuls as the
# plain path) and the backward pass only scales it. Without differentiation (eval) only the loss runs.
def _chunked_loss_fwd(x, embedding, targets, vocab_limit, chunk_len, unroll):
    loss, dx, dw = _chunk_loop_per_shard(x, embedding, targets, vocab_limit, chunk_len, unroll)
    return loss, (dx, dw)


def _chunk_loop_per_shard(x, embedding, targets, vocab_limit: int, chunk_len: int, unroll: bool):
    """`_chunk_loop(..., grads=True)`, with each device's rows on their own under a mesh context (shard_map over
    the batch axes): the embedding gradient's partial sums stay on the device through all the chunks and are
    reduced once at the end, scattered over `fsdp` where the table is split there (sharding.RULES). XLA's
    partitioner instead all-reduces the whole (V, C) table after every chunk, since each chunk's `RV,RC->VC`
    contracts the batch-split rows: 32 full-table all-reduces per micro-step in the gpt2 `fsdp:8` program on
    v5e-8. With `tensor` (the vocabulary split) or no mesh context: `_chunk_loop` as it is."""
    mesh, axes = jax.sharding.get_abstract_mesh(), sharding.mesh_batch_axes()
    B, _, C = x.shape
    dp = _batch_split()
    if not axes or mesh.shape.get("tensor", 1) > 1 or B % dp:
        return _chunk_loop(x, embedding, targets, vocab_limit, chunk_len, unroll, grads=True)
    split = mesh.shape.get("fsdp", 1) > 1 and C % mesh.shape["fsdp"] == 0  # the table's embed dim over fsdp
    # Axes of size 1 are left out (a no-op all-reduce in the program); the data-axis sum runs after the scatter.
    replicated_on = tuple(a for a in axes if mesh.shape[a] > 1 and not (split and a == "fsdp"))

    def per_shard(x, embedding, targets):  # (b, T, C), (V, C / fsdp or C), (b, T): this device's rows
        if split:
            embedding = jax.lax.all_gather(embedding, "fsdp", axis=1, tiled=True)
        loss, dx, dw = _chunk_loop(x, embedding, targets, vocab_limit, chunk_len, unroll, grads=True)
        dw = dw / dp  # the mean over all rows is the mean of the devices' means (equal row counts)
        dw = jax.lax.psum_scatter(dw, "fsdp", scatter_dimension=1, tiled=True) if split else dw
        dw = jax.lax.psum(dw, replicated_on) if replicated_on else dw  # after the scatter: on 1/fsdp of the table
        return jax.lax.pmean(loss, axes), dx / dp, dw

    rows, table = P(axes, None, None), P(None, "fsdp" if split else None)
    # check_vma=False: the collectives above are all written out, and nothing differentiates through this.
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(rows, table, P(axes, None)), out_specs=(P(), rows, table),
                         check_vma=False)(x, embedding, targets)


def _chunked_loss_bwd(vocab_limit, chunk_len, unroll, residuals, g):
    dx, dw = residuals
    return (g * dx).astype(dx.dtype), g * dw, None


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)
