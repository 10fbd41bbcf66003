"""The optimizer recipe: LR schedule values and the weight-decay mask."""

import math

import jax
import numpy as np
import pytest
from flax import nnx
from tiny import tiny_model

from gpt2_jax.optim import OptimConfig, decay_mask, lr_at, lr_schedule

C = OptimConfig()  # the GPT-2 124M recipe: max 6e-4, min 6e-5, warmup 715, 19073 steps


@pytest.mark.parametrize("step,expected", [
    (0, 6e-4 / 715),  # warmup starts at max_lr / warmup (step counts from 0)
    (714, 6e-4),  # warmup ends at max_lr
    (715, 6e-4),  # cosine starts at max_lr
    ((715 + 19073) // 2, 6e-5 + 0.5 * (1 + math.cos(math.pi * ((715 + 19073) // 2 - 715) / (19073 - 715))) * 5.4e-4),
    (19073, 6e-5),  # the end: min_lr = 10% of max_lr
    (25000, 6e-5),  # past the end: constant
])
def test_schedule_matches_formula(step, expected):
    assert lr_at(step, C) == pytest.approx(expected, rel=1e-12)
    assert float(lr_schedule(C)(np.float32(step))) == pytest.approx(expected, rel=1e-5)  # float32 in optax


def test_schedule_midpoint_is_halfway_between_max_and_min():
    mid = 715 + (19073 - 715) / 2
    assert lr_at(mid, C) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-12)


def test_decay_mask_covers_exactly_the_2d_params():
    """nanoGPT's rule, on HF's layout: the tensors that are >= 2-D per layer, and no others."""
    params = nnx.state(tiny_model(n_layer=3), nnx.Param)
    mask = decay_mask(params)
    pairs = list(zip(jax.tree_util.tree_leaves_with_path(mask), jax.tree.leaves(params), strict=True))
    assert len(pairs) == 16
    for (path, decayed), value in pairs:
        key = jax.tree_util.keystr(path)
        per_layer_ndim = value.ndim - (1 if key.startswith("['h']") else 0)
        if "c_attn" in key:  # stored with HF's 3C axis unfolded to (3, n_head, head_dim): count it as one
            per_layer_ndim -= 2
        assert decayed == (per_layer_ndim >= 2), jax.tree_util.keystr(path)
    assert sum(d for _, d in (p for p, _ in pairs)) == 6  # wte, wpe, c_attn, attn.c_proj, c_fc, mlp.c_proj
