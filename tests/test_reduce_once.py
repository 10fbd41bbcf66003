"""Data parallelism reduces the gradient once per optimizer step, whatever grad_accum is (step._gradient_sums).

Each replica sums its own rows' gradients through the micro-batches, and they are added over `data` once after
the loop. Checked on the 8 fake CPU devices: the numbers equal one device's within float32's promise (f32_atol),
and the compiled program's all-reduce bytes do not grow with grad_accum on a data-parallel mesh (they did: XLA
reduced every micro-step's gradient, 4x the bytes at grad_accum=4)."""

import dataclasses

import jax
import numpy as np
import pytest
from tiny import TINY_MODEL, f32_atol

from gpt2_jax.model import count_params
from gpt2_jax.plan.hlo import collectives
from gpt2_jax.training.resolved import resolve_run
from gpt2_jax.training.settings import TrainConfig
from gpt2_jax.training.step import build_step

MICRO, ACCUM = 16, 4


def step_on(mesh_spec: str, grad_accum: int = ACCUM, block_size: int = TINY_MODEL.block_size, **overrides):
    tc = TrainConfig(preset="char", micro_batch_size=MICRO, total_batch_size=MICRO * block_size * grad_accum,
                     mesh=mesh_spec, max_steps=10, warmup_steps=1, dropout=0.0, block_size=block_size,
                     **{k: getattr(TINY_MODEL, k) for k in ("n_layer", "n_head", "n_embd")})
    run = resolve_run(dataclasses.replace(tc, **overrides), jax.devices()[:1] if mesh_spec == "data:1" else None)
    cfg = TINY_MODEL.replace(attention=run.tc.attention, block_size=block_size)
    return build_step(run, cfg), cfg


def batches(step, n: int = 2):
    rng = np.random.default_rng(0)
    for _ in range(n):
        x, y = (rng.integers(0, TINY_MODEL.vocab_size, step.batch_shape).astype(np.int32) for _ in range(2))
        yield jax.device_put(x, step.batch_sharding), jax.device_put(y, step.batch_sharding)


def first_moments(state) -> dict:
    """AdamW's first moments by parameter: after one step, 0.1 x the (clipped) mean gradient of that step. The
    gradients are compared here, not the params: AdamW's first update is about lr x sign(g), so where a gradient is
    ~0 its float32 rounding decides a step of +-lr."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state["opt"]))[0]
    named = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}
    return {name: leaf for name, leaf in named.items() if "['mu']" in name}


def assert_gradients_equal(state, want_state, tokens: int):
    got, want = first_moments(state), first_moments(want_state)
    assert got.keys() == want.keys() and len(want) > 5
    for name in want:  # each gradient sums over every token of the step
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=f32_atol(want[name], tokens), err_msg=name)


def train(mesh_spec: str):
    """Two optimizer steps from the same init: the losses, and the state after the first."""
    step, cfg = step_on(mesh_spec)
    state, losses, first = step.init_state(cfg, seed=0), [], None
    with jax.default_matmul_precision("highest"):
        for i, (x, y) in enumerate(batches(step)):
            state, metrics = step.fn(state, x, y, jax.random.key(i))
            losses.append(float(metrics["loss"]))
            first = jax.device_get(state) if first is None else first
    return losses, first


@pytest.fixture(scope="module")
def one_device():
    return train("data:1")


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec", ["data:8", "data:2,fsdp:4", "fsdp:8"])
def test_the_step_equals_one_device(mesh_spec, one_device):
    """The losses of 2 steps of 4 micro-batches, and the first step's gradients, equal one device's within what
    float32 can promise for another summation order (a loss averages the step's tokens; a gradient sums over them)."""
    want_losses, want_state = one_device
    losses, state = train(mesh_spec)
    tokens = ACCUM * MICRO * TINY_MODEL.block_size
    np.testing.assert_allclose(losses, want_losses, rtol=0, atol=f32_atol(want_losses, tokens))
    assert_gradients_equal(state, want_state, tokens)


def all_reduce_bytes(mesh_spec: str, grad_accum: int) -> int:
    step, _ = step_on(mesh_spec, grad_accum)
    return collectives(step.fn.lower(*step.abstract_args()).compile().as_text()).get("all-reduce", {}).get("bytes", 0)


@pytest.mark.slow
def test_data_parallel_reduces_the_gradient_once_per_step():
    """data:8: the same all-reduce bytes at grad_accum 1 and 4, and that is every float32 gradient once (plus the
    loss and a few scalars): within 1.1x of 4 bytes x params."""
    once, four = all_reduce_bytes("data:8", 1), all_reduce_bytes("data:8", 4)
    assert four == once
    minimum = 4 * count_params(TINY_MODEL)  # every parameter's float32 gradient, wte and wpe included
    assert minimum <= four <= 1.1 * minimum, (four, minimum)


@pytest.mark.slow
def test_with_fsdp_only_the_fsdp_reduction_follows_the_micro_steps():
    """data:2,fsdp:4: the reduction over `data` comes once a step; what grows with grad_accum is the gradient's
    reduction over fsdp at each micro-step (ZeRO-3's cost), so 4 micro-steps cost less than 4x one."""
    once, four = all_reduce_bytes("data:2,fsdp:4", 1), all_reduce_bytes("data:2,fsdp:4", 4)
    assert once < four < 4 * once, (once, four)


@pytest.mark.e2e  # the Pallas kernel runs interpreted on a CPU: ~1 min per mesh on 2 cores
@pytest.mark.parametrize("mesh_spec", ["data:8", "data:2,fsdp:4"])
def test_the_step_with_splash_attention_equals_one_device(mesh_spec):
    """Splash (the TPU default) inside the step's shard_map over `data`: on data:8 the kernel runs on each device's
    own arrays (the shard_map is manual over every axis), on data:2,fsdp:4 under its own shard_map over fsdp nested
    in it. The loss and every gradient equal the einsum model's on one device."""
    step, cfg = step_on(mesh_spec, grad_accum=2, block_size=128, attention="splash")  # the kernel's blocks: 128
    ref, ref_cfg = step_on("data:1", grad_accum=2, block_size=128, attention="einsum")
    state = step.init_state(cfg, seed=0)
    ref_state = ref.init_state(ref_cfg, seed=0)
    (x, y), = batches(step, 1)
    with jax.default_matmul_precision("highest"):
        new, metrics = step.fn(state, x, y, jax.random.key(0))
        ref_new, ref_metrics = ref.fn(ref_state, jax.device_put(x, ref.batch_sharding),
                                      jax.device_put(y, ref.batch_sharding), jax.random.key(0))
    tokens = 2 * MICRO * 128
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=0,
                               atol=f32_atol(ref_metrics["loss"], tokens))
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(ref_metrics["grad_norm"]), rtol=0,
                               atol=f32_atol(ref_metrics["grad_norm"], tokens))
    assert_gradients_equal(new, ref_new, tokens)
