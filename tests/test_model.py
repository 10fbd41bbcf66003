"""Model pieces whose gradients are written by hand: GPT-2's GELU (model.gelu) against autodiff of the formula and
against the exact derivative in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax.model import gelu


def _inputs(dtype) -> jax.Array:
    # Around GPT-2's pre-activations, with the tails where tanh saturates and the slope is 0 or 1.
    return jnp.concatenate([jax.random.normal(jax.random.key(0), (4096,)) * 3, jnp.array([-12.0, -5, 0, 5, 12])
                            ]).astype(dtype)


def _exact_slope(x) -> np.ndarray:
    """d gelu_tanh / dx in float64: 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 k x^2), t = tanh(c (x + k x^3))."""
    x = np.asarray(x, np.float64)
    c, k = np.sqrt(2 / np.pi), 0.044715
    t = np.tanh(c * (x + k * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * k * x * x)


def _grads(x: jax.Array, w: jax.Array):
    """d sum(f(x) * w) / dx for f = model.gelu and for autodiff of jax.nn.gelu, as float64 numpy."""
    def grad(f):
        return np.asarray(jax.grad(lambda v: jnp.sum((f(v) * w).astype(jnp.float32)))(x), np.float64)
    return grad(gelu), grad(lambda v: jax.nn.gelu(v, approximate=True))


def test_gelu_is_jax_nn_gelu():
    x = _inputs(jnp.float32)
    np.testing.assert_array_equal(np.asarray(gelu(x)), np.asarray(jax.nn.gelu(x, approximate=True)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_gradient_is_as_exact_as_autodiff(dtype):
    """Against the exact derivative (float64, from the same rounded inputs and cotangents): no further off than
    autodiff of the formula in float32. In bfloat16 ours runs in float32 and rounds once, where autodiff rounds at
    every step: within half a bfloat16 ulp of the exact value, and closer than autodiff on average."""
    x = _inputs(dtype)
    w = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).astype(dtype)
    ours, autodiff = _grads(x, w)
    exact = _exact_slope(x) * np.asarray(w, np.float64)
    ours_err, autodiff_err = np.abs(ours - exact), np.abs(autodiff - exact)
    if dtype == jnp.float32:
        # Both meet float32's rounding of tanh near saturation (measured 3.5e-6 each here, at |x| ~ 3-4).
        assert ours_err.max() <= 1.5 * autodiff_err.max() + 1e-7, (ours_err.max(), autodiff_err.max())
    else:
        half_ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - 8)  # bfloat16's, at each value
        assert np.all(ours_err <= half_ulp + 1e-5), (ours_err - half_ulp).max()  # + float32's error inside
        assert ours_err.mean() < autodiff_err.mean()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_backward_pass_keeps_only_the_input(dtype):
    """What the forward pass keeps for the backward (the residuals of jax.vjp): x alone, where autodiff of
    jax.nn.gelu keeps several arrays of x's size -- in a GPT-2 MLP each one is (B, T, 4C). Planner, gpt2 on one
    H100 at micro-batch 16: 14.55 -> 10.05 GiB per device."""
    x = _inputs(dtype)

    def kept(f):
        _, backward = jax.vjp(f, x)
        return [leaf for leaf in jax.tree.leaves(backward) if getattr(leaf, "shape", ()) == x.shape]

    assert len(kept(gelu)) == 1
    assert len(kept(lambda v: jax.nn.gelu(v, approximate=True))) >= 2
