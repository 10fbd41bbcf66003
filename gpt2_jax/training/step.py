"""The jitted train and eval steps, and `build_step`: the one builder of the train step, for the trainer
and for the planner's ahead-of-time compiles (for devices that need not be attached).

One `jax.jit` train step with explicit in/out shardings does a whole optimizer step: the gradients of
`grad_accum` micro-batches are summed inside it with `lax.scan`, then clipped and applied. Its state
argument is donated, so params and optimizer state are updated in place. With grad_accum > 1 the same step
also comes in parts (MicroSteps: a jitted micro-step per micro-batch, then the update), which the loop runs
so that a stop signal need not wait for a whole long step.
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

from gpt2_jax import sharding
from gpt2_jax.config import GPTConfig
from gpt2_jax.model import GPT, Unroll
from gpt2_jax.optim import OptimConfig, make_optimizer
from gpt2_jax.training.settings import TrainConfig, grad_accum_steps

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


def _loss_fn(model_def, vocab_limit: int | None, dropout: bool, unroll, mesh):
    """(params, x, y, key) -> the mean loss of one micro-batch (x, y: (micro_batch, T)).

    Traced with `mesh` as the context: activations split by batch (sharding.constrain_batch) and the Pallas
    attention's shard_map find it there (jax.sharding.use_abstract_mesh: jax.set_mesh does not work under jit)."""
    def loss_fn(params, x, y, key):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return nnx.merge(model_def, params).loss(x, y, vocab_limit, dropout_rng=key if dropout else None,
                                                     unroll=unroll)

    return loss_fn


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
        loss_fn = _loss_fn(model_def, vocab_limit, dropout, unroll, batch_sharding.mesh)

        def micro_step(carry, batch):
            loss_sum, grad_sum = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        keys = jax.random.split(rng, grad_accum) if dropout else None
        zeros = jax.tree.map(jnp.zeros_like, params)
        (loss, grads), _ = jax.lax.scan(micro_step, (jnp.zeros((), jnp.float32), zeros), (x, y, keys))
        return _apply(ts, state, loss / grad_accum, jax.tree.map(lambda g: g / grad_accum, grads))

    return jax.jit(train_step, donate_argnums=0,
                   in_shardings=(state_shardings, batch_sharding, batch_sharding, repl),
                   out_shardings=(state_shardings, repl))


@dataclasses.dataclass(frozen=True)
class MicroSteps:
    """The train step in parts, for a loop that may stop between micro-steps (a long step, grad_accum > 1):
    `acc = zeros(state)`, then for i in range(grad_accum) `acc, loss_i = micro(state, acc, x, y, i, rng)`, then
    `state, metrics = apply(state, acc)`. The same arithmetic, in the same order, as the fused step's scan.
    `acc` is donated to each call; `state` only to `apply`, so dropping `acc` midway leaves the state whole."""

    zeros: Callable  # state -> acc: {"loss": 0, "grads": zeros like the params}
    micro: Callable  # (state, acc, x, y, i, rng) -> (acc + micro-batch i's loss and gradient, its loss)
    apply: Callable  # (state, acc) -> (state, metrics), as the fused step's


def make_micro_steps(graphdef, state_shardings, batch_sharding, grad_accum: int, dropout: bool,
                     vocab_limit: int | None = None, unroll=None) -> MicroSteps:
    repl = sharding.replicated(batch_sharding.mesh)
    acc_sh = {"loss": repl, "grads": state_shardings["model"]}

    def zeros(state):
        params = nnx.split(nnx.merge(graphdef, state).model)[1]
        return {"loss": jnp.zeros((), jnp.float32), "grads": jax.tree.map(jnp.zeros_like, params)}

    def micro(state, acc, x, y, i, rng):
        model_def, params = nnx.split(nnx.merge(graphdef, state).model)
        key = jax.random.split(rng, grad_accum)[i] if dropout else None
        xi, yi = (jax.lax.dynamic_index_in_dim(a, i, keepdims=False) for a in (x, y))
        loss_fn = _loss_fn(model_def, vocab_limit, dropout, unroll, batch_sharding.mesh)
        loss, grads = jax.value_and_grad(loss_fn)(params, xi, yi, key)
        return {"loss": acc["loss"] + loss, "grads": jax.tree.map(jnp.add, acc["grads"], grads)}, loss

    def apply(state, acc):
        ts = nnx.merge(graphdef, state, copy=True)
        return _apply(ts, state, acc["loss"] / grad_accum, jax.tree.map(lambda g: g / grad_accum, acc["grads"]))

    return MicroSteps(
        zeros=jax.jit(zeros, in_shardings=(state_shardings,), out_shardings=acc_sh),
        micro=jax.jit(micro, donate_argnums=1, in_shardings=(state_shardings, acc_sh, batch_sharding,
                                                             batch_sharding, repl, repl), out_shardings=(acc_sh, repl)),
        apply=jax.jit(apply, donate_argnums=0, in_shardings=(state_shardings, acc_sh),
                      out_shardings=(state_shardings, repl)))


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
    micro_steps: MicroSteps | None = None  # `fn` in parts, for grad_accum > 1 (a loop that may stop midway)

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


def build_step(tc: TrainConfig, cfg: GPTConfig, mesh, vocab_limit: int | None = None, *,
               unroll: Unroll | None = None) -> TrainStep:
    """The train step for a resolved `tc` and its model `cfg` on `mesh` (any devices, attached or not).
    `unroll` (model.Unroll): how the traced loops unroll; None: as suits the backend this process runs."""
    if (tokens := tc.micro_batch_size * tc.block_size) > INT32_MAX:  # (the loss indexes a micro-batch's tokens)
        raise ValueError(f"--micro_batch_size={tc.micro_batch_size} x --block_size={tc.block_size} = {tokens:,} "
                         f"tokens per micro-batch, more than a 32-bit index counts ({INT32_MAX:,}) and far more than "
                         "any device holds; lower --micro_batch_size")
    grad_accum = grad_accum_steps(tc, sharding.data_parallel_size(mesh), jax.process_count())
    oc = optim_config(tc)
    tx = make_optimizer(oc)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TrainState(GPT(cfg, rngs=nnx.Rngs(0)), tx)))
    shardings = sharding.state_shardings(abstract, mesh)
    batch_sh = sharding.batch_sharding(mesh, ndim=3, batch_dim=1)
    fn = make_train_step(graphdef, shardings, batch_sh, grad_accum, dropout=cfg.dropout > 0, vocab_limit=vocab_limit,
                         unroll=unroll)
    parts = (make_micro_steps(graphdef, shardings, batch_sh, grad_accum, dropout=cfg.dropout > 0,
                              vocab_limit=vocab_limit, unroll=unroll) if grad_accum > 1 else None)
    return TrainStep(graphdef, abstract, shardings, tx, oc, grad_accum, batch_sh, fn,
                     batch_shape=(grad_accum, tc.micro_batch_size, tc.block_size), micro_steps=parts)

