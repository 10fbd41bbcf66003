"""The jitted train and eval steps, and `build_step`: the one builder of the train step, for the trainer
and for the planner's ahead-of-time compiles (for devices that need not be attached).

One `jax.jit` train step with explicit in/out shardings does a whole optimizer step: the gradients of
`grad_accum` micro-batches are summed inside it with `lax.scan` (each data-parallel replica its own, added over
the replicas once: _gradient_sums), then clipped and applied. Its state argument is donated, so params and
optimizer state are updated in place. It is the one program of a step: the loop runs it, and the planner,
the benchmarks and the auto micro-batch compile it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gpt2_jax import sharding
from gpt2_jax.config import GPTConfig
from gpt2_jax.model import GPT, Unroll
from gpt2_jax.optim import OptimConfig, make_optimizer
from gpt2_jax.training.resolved import ResolvedRun
from gpt2_jax.training.settings import TrainConfig

INT32_MAX = 2**31 - 1


class TrainState(nnx.Module):
    """Everything the train step updates: the model and its optimizer (AdamW moments and step)."""

    def __init__(self, model: GPT, tx: optax.GradientTransformation):
        self.model = model
        self.opt = nnx.Optimizer(model, tx, wrt=nnx.Param)


def optim_config(tc: TrainConfig) -> OptimConfig:
    return OptimConfig(max_lr=tc.max_lr, min_lr_ratio=tc.min_lr_ratio, warmup_steps=tc.warmup_steps,
                       max_steps=tc.max_steps, weight_decay=tc.weight_decay, beta1=tc.beta1, beta2=tc.beta2,
                       eps=tc.eps, grad_clip=tc.grad_clip)


def _gradient_sums(model_def, param_shardings, mesh, vocab_limit: int | None, dropout: bool, unroll):
    """(params, x, y, keys) -> (the sum of the micro-batches' mean losses, the sum of their mean gradients), for
    x, y: (grad_accum, micro_batch, T) and a key per micro-batch.

    Data parallelism reduces the gradient ONCE per optimizer step: with a `data` axis, the micro-batches run under
    a shard_map that is manual over `data`, so each replica sums its own rows' gradients through every micro-batch
    and they are added over `data` once, after the loop, on each device's 1/fsdp of them. (Left to the
    partitioner, every micro-step all-reduced the whole gradient: XLA does not hoist the reduction out of the
    loop.) `fsdp` and `tensor` stay automatic: parameters are gathered and each micro-step's gradient is
    reduce-scattered over `fsdp`, as ZeRO-3 does; where both have size 1 the shard_map is manual over every axis
    (one device's program, as DDP). The activations' and the attention's mesh context is the step's mesh, with
    `data` manual inside the shard_map (sharding.mesh_batch_axes leaves it out)."""
    replicas = mesh.shape.get("data", 1)

    def loss_fn(params, x, y, key):
        return nnx.merge(model_def, params).loss(x, y, vocab_limit, dropout_rng=key if dropout else None,
                                                 unroll=unroll)

    def constrain(grads):  # a gradient lives where its parameter does (split over fsdp / tensor, never data)
        if not jax.sharding.get_abstract_mesh().auto_axes:  # every axis manual (data parallel alone): one device's
            return grads
        return jax.tree.map(lambda sh, g: jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sh.spec), g),
                            param_shardings, grads)

    def sums(params, x, y, keys):
        def micro_step(carry, batch):
            loss_sum, grad_sum = carry
            xi, yi, key = batch
            key = jax.random.fold_in(key, jax.lax.axis_index("data")) if replicas > 1 else key
            loss, grads = jax.value_and_grad(loss_fn)(params, xi, yi, key)
            return (loss_sum + loss, constrain(jax.tree.map(jnp.add, grad_sum, grads))), None

        zeros = (jnp.zeros((), jnp.float32), constrain(jax.tree.map(jnp.zeros_like, params)))
        (loss, grads), _ = jax.lax.scan(micro_step, zeros, (x, y, keys))
        if replicas > 1:  # the mean over all rows is the mean of the replicas' means (equal row counts)
            loss = jax.lax.psum(loss, "data") / replicas
            grads = constrain(jax.tree.map(lambda g: jax.lax.psum(g, "data") / replicas, grads))
        return loss, grads

    def traced(params, x, y, keys):  # under the step's mesh: activations and attention find it there
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            if replicas == 1:
                return sums(params, x, y, keys)
            # Each device its own rows of every micro-batch, and its own sums until the psum; check_vma=False: the
            # psum is written out (no automatic one for the replicated params), and the Pallas kernel declares
            # no varying types. Data parallel alone: manual over every axis, the body is one device's program.
            rows = P(None, "data")  # (grad_accum, micro_batch, T)
            manual = {"data"} if mesh.shape["fsdp"] * mesh.shape["tensor"] > 1 else set(mesh.axis_names)
            return jax.shard_map(sums, mesh=mesh, in_specs=(P(), rows, rows, P()), out_specs=(P(), P()),
                                 axis_names=manual, check_vma=False)(params, x, y, keys)

    return traced


def _apply(ts: TrainState, state, loss, grads):
    """Clip and apply the mean gradient to `ts` (a copy of `state`); a non-finite loss or gradient leaves the
    state as it was, and the host decides to stop or go on. Returns (the new state, scalar metrics)."""
    grad_norm = optax.tree.norm(grads)
    ts.opt.update(ts.model, grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), nnx.state(ts), state)
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}


def make_train_step(graphdef, state_shardings, batch_sharding, grad_accum: int, dropout: bool,
                    vocab_limit: int | None = None, unroll: Unroll | None = None):
    repl = sharding.replicated(batch_sharding.mesh)

    def train_step(state, x, y, rng):
        """x, y: (grad_accum, micro_batch, T). Returns the new state and scalar metrics."""
        # copy=True: without it `ts` shares its Variables with `state`, so the update below would
        # overwrite `state` too, and a non-finite step could not be undone.
        ts = nnx.merge(graphdef, state, copy=True)
        model_def, params = nnx.split(ts.model)
        sums = _gradient_sums(model_def, state_shardings["model"], batch_sharding.mesh, vocab_limit, dropout, unroll)
        loss, grads = sums(params, x, y, jax.random.split(rng, grad_accum))
        return _apply(ts, state, loss / grad_accum, jax.tree.map(lambda g: g / grad_accum, grads))

    return jax.jit(train_step, donate_argnums=0,
                   in_shardings=(state_shardings, batch_sharding, batch_sharding, repl),
                   out_shardings=(state_shardings, repl))


def make_eval_step(graphdef, state_shardings, batch_sharding, vocab_limit: int | None = None):
    def eval_step(state, x, y):
        with jax.sharding.use_abstract_mesh(batch_sharding.mesh.abstract_mesh):  # as in the train step
            return nnx.merge(graphdef, state).model.loss(x, y, vocab_limit)

    return jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding, batch_sharding),
                   out_shardings=sharding.replicated(batch_sharding.mesh))


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The jitted train step of a config on a mesh, and what it is built from: one code path for the
    trainer and for the planner's ahead-of-time compiles (for a target that need not be attached)."""

    graphdef: Any
    abstract: Any  # the TrainState as an nnx.State of ShapeDtypeStructs: shapes, no arrays
    shardings: Any  # of `abstract`
    tx: optax.GradientTransformation
    optim: OptimConfig
    grad_accum: int  # micro-batches per optimizer step
    batch_sharding: NamedSharding  # of a train batch (grad_accum, micro_batch, T)
    fn: Callable  # (state, x, y, rng) -> (state, metrics)
    batch_shape: tuple[int, int, int]  # (grad_accum, micro_batch, T)

    def abstract_args(self) -> tuple:
        """`fn`'s arguments as ShapeDtypeStructs with their shardings: `step.fn.lower(*step.abstract_args())`."""
        batch = jax.ShapeDtypeStruct(self.batch_shape, jnp.int32, sharding=self.batch_sharding)
        rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                   sharding=sharding.replicated(self.batch_sharding.mesh))
        return sharding.with_shardings(self.abstract, self.shardings), batch, batch, rng

    def init_state(self, cfg: GPTConfig, seed: int):
        """Fresh params (GPT-2's init from `seed`) and optimizer state, created directly on their devices."""
        return jax.jit(lambda: nnx.state(TrainState(GPT(cfg, rngs=nnx.Rngs(seed)), self.tx)),
                       out_shardings=self.shardings)()


def build_step(run: ResolvedRun, cfg: GPTConfig, vocab_limit: int | None = None, *,
               unroll: Unroll | None = None) -> TrainStep:
    """The train step of a resolved run (training.resolved) and its model `cfg`, on the run's mesh (any devices,
    attached or not): the trainer's, the planner's and the benchmarks' one program.
    `unroll` (model.Unroll): how the traced loops unroll; None: as suits the backend this process runs."""
    tc, mesh, grad_accum = run.tc, run.mesh, run.grad_accum
    if (tokens := tc.micro_batch_size * tc.block_size) > INT32_MAX:  # (the loss indexes a micro-batch's tokens)
        raise ValueError(f"--micro_batch_size={tc.micro_batch_size} x --block_size={tc.block_size} = {tokens:,} "
                         f"tokens per micro-batch, more than a 32-bit index counts ({INT32_MAX:,}) and far more than "
                         "any device holds; lower --micro_batch_size")
    oc = optim_config(tc)
    tx = make_optimizer(oc)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TrainState(GPT(cfg, rngs=nnx.Rngs(0)), tx)))
    shardings = sharding.state_shardings(abstract, mesh)
    batch_sh = sharding.batch_sharding(mesh, ndim=3, batch_dim=1)
    fn = make_train_step(graphdef, shardings, batch_sh, grad_accum, dropout=cfg.dropout > 0, vocab_limit=vocab_limit,
                         unroll=unroll)
    return TrainStep(graphdef, abstract, shardings, tx, oc, grad_accum, batch_sh, fn,
                     batch_shape=(grad_accum, tc.micro_batch_size, tc.block_size))

