"""The optimizer of the GPT-2 reproduction recipe (GPT-3 paper's settings, as in nanoGPT's build).

AdamW (beta1 0.9, beta2 0.95, eps 1e-8), weight decay 0.1 on matrices and embeddings only (params with
ndim >= 2 in HF's layout; biases and LayerNorm gains are not decayed), global-norm gradient clipping at
1.0, and a learning rate that warms up linearly then follows a cosine down to min_lr_ratio * max_lr.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import optax

from gpt2_jax.recipes import ADAMW, RECIPES

_GPT2 = RECIPES["gpt2"]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The defaults are the GPT-2 124M recipe (recipes.RECIPES, recipes.ADAMW)."""

    max_lr: float = _GPT2["max_lr"]  # peak learning rate, reached at the end of warmup
    min_lr_ratio: float = ADAMW["min_lr_ratio"]  # the cosine ends at max_lr * min_lr_ratio
    warmup_steps: int = _GPT2["warmup_steps"]  # linear warmup from max_lr / warmup_steps
    max_steps: int = _GPT2["max_steps"]  # the cosine spans [warmup_steps, max_steps]; constant min_lr afterwards
    weight_decay: float = ADAMW["weight_decay"]
    beta1: float = ADAMW["beta1"]
    beta2: float = ADAMW["beta2"]
    eps: float = ADAMW["eps"]
    grad_clip: float = ADAMW["grad_clip"]  # max global gradient norm (0 disables clipping)

def lr_at(step: int, c: OptimConfig) -> float:
    """The schedule as plain Python (the formula the tests check against); step counts from 0."""
    min_lr = c.max_lr * c.min_lr_ratio
    if step < c.warmup_steps:
        return c.max_lr * (step + 1) / c.warmup_steps
    if step >= c.max_steps:
        return min_lr
    progress = (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (c.max_lr - min_lr)


def lr_schedule(c: OptimConfig) -> optax.Schedule:
    """`lr_at` in jnp, for optax (step is the optimizer's update count)."""
    min_lr = c.max_lr * c.min_lr_ratio

    def schedule(step):
        warm = c.max_lr * (step + 1) / c.warmup_steps
        progress = jax.numpy.clip((step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps), 0.0, 1.0)
        cosine = min_lr + 0.5 * (1.0 + jax.numpy.cos(jax.numpy.pi * progress)) * (c.max_lr - min_lr)
        return jax.numpy.where(step < c.warmup_steps, warm, cosine)

    return schedule


DECAYED = ("kernel", "embedding")  # matmul weights and embeddings: the params >= 2-D per layer in HF's layout


def decay_mask(params):
    """True for params that get weight decay: matmul kernels and embeddings, i.e. every tensor that is
    >= 2-D per layer in HF's layout. Decided by name because the blocks are stacked on a leading layers
    axis (a stacked bias is (n_layer, C) but still a bias), c_attn's bias is stored as (3, n_head,
    head_dim) (see model.py), and optax hands this function plain arrays."""

    def decayed(path, _):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        return any(n in DECAYED for n in names)

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(c: OptimConfig) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(c.grad_clip)] if c.grad_clip > 0 else []
    parts.append(optax.adamw(lr_schedule(c), b1=c.beta1, b2=c.beta2, eps=c.eps,
                             weight_decay=c.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
