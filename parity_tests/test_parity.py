"""HF transformers vs reference_torch vs gpt2_jax on one randomised GPT-2 124M checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import gpt2_jax
from gpt2_jax.generate import generate
from gpt2_jax.loss import cross_entropy

# Tolerances, stated once. All runs are float32; differences come from summation order only.
# Logits: ~0.1-1 in magnitude after 12 blocks of float32 matmuls over 768..3072 terms; measured
# max |diff| is ~1e-5, so 1e-4 leaves 10x headroom while a wrong tensor shows up as >1e-2.
LOGITS_ATOL = 1e-4
# Loss is a mean over B*T positions of log-softmax; averaging shrinks the per-logit error.
LOSS_ATOL = 1e-5
# Per-tensor relative L2 error of gradients (measured ~1e-6).
GRAD_RTOL = 1e-4
# KV-cache decode vs full forward: same math, different matmul shapes (measured ~1e-6).
CACHE_ATOL = 1e-5


def hf_logits(hf_model, idx: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.from_numpy(idx)).logits.numpy()


def ref_logits(ref_model, idx: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return ref_model(torch.from_numpy(idx))[0].numpy()


def jax_logits(jax_model, idx: np.ndarray) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, x: m(x))(jax_model, jnp.asarray(idx, jnp.int32)))


@pytest.mark.slow
@pytest.mark.parametrize("batch", ["odd", "full"])
def test_logits_match_pairwise(batch, tokens, hf_model, ref_model, jax_model):
    idx = tokens[batch]
    hf, ref, jx = hf_logits(hf_model, idx), ref_logits(ref_model, idx), jax_logits(jax_model, idx)
    assert hf.shape == ref.shape == jx.shape == (*idx.shape, 50257)
    assert hf.std() > 0.1  # the random weights produce non-trivial logits
    np.testing.assert_allclose(ref, hf, atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_allclose(jx, hf, atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_allclose(jx, ref, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.slow
def test_loss_and_gradients_match_reference(tokens, ref_model, jax_model):
    idx = np.ascontiguousarray(tokens["odd"][:, :-1])
    targets = np.ascontiguousarray(tokens["odd"][:, 1:])
    ref_model.zero_grad()
    _, loss_t = ref_model(torch.from_numpy(idx), torch.from_numpy(targets))
    loss_t.backward()

    def loss_fn(model):
        return cross_entropy(model(jnp.asarray(idx, jnp.int32)), jnp.asarray(targets, jnp.int32))

    loss_j, grads = nnx.jit(nnx.value_and_grad(loss_fn))(jax_model)
    assert abs(float(loss_j) - loss_t.item()) <= LOSS_ATOL

    # Compare per tensor in HF layout: the converter is the one mapping between the two namings.
    from gpt2_jax.convert import model_to_hf_tensors

    grad_model = nnx.merge(nnx.graphdef(jax_model), grads)
    g_jax = model_to_hf_tensors(grad_model)
    g_torch = {k: v.grad for k, v in ref_model.named_parameters()}
    g_torch = {k: (g.t() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else g).numpy()
               for k, g in g_torch.items() if k != "lm_head.weight"}
    assert set(g_jax) == set(g_torch)
    for name, gt in g_torch.items():
        rel = np.linalg.norm(g_jax[name] - gt) / np.linalg.norm(gt)
        assert rel <= GRAD_RTOL, f"{name}: relative gradient error {rel:.2e}"


@pytest.mark.slow
def test_kv_cache_matches_full_forward(tokens, jax_model):
    idx = jnp.asarray(tokens["odd"], jnp.int32)
    full = jax_logits(jax_model, np.asarray(idx))
    decode = nnx.jit(lambda m, x, c, p: m.decode(x, c, p))
    cache = jax_model.init_cache(idx.shape[0], 64)
    prefill, cache = decode(jax_model, idx[:, :20], cache, 0)
    steps = [prefill]
    for t in range(20, idx.shape[1]):
        logits, cache = decode(jax_model, idx[:, t : t + 1], cache, t)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=CACHE_ATOL, rtol=0)


@pytest.mark.slow
def test_greedy_generation_matches_hf(tokens, hf_model, jax_model):
    prompt = tokens["odd"][:, :9]
    with torch.no_grad():
        hf_ids = hf_model.generate(torch.from_numpy(prompt), attention_mask=torch.ones_like(torch.from_numpy(prompt)),
                                   max_new_tokens=32, do_sample=False, pad_token_id=50256).numpy()
    ours = generate(jax_model, prompt, 32, temperature=0.0)
    assert hf_ids.shape == ours.shape == (2, 9 + 32)
    np.testing.assert_array_equal(ours, hf_ids)


def test_round_trip_hf_jax_hf_is_bit_identical(hf_dir, hf_model, jax_model, tmp_path):
    from transformers import GPT2LMHeadModel

    out = gpt2_jax.export_hf(jax_model, tmp_path / "exported")
    back = GPT2LMHeadModel.from_pretrained(out)
    original, exported = hf_model.state_dict(), back.state_dict()
    assert set(original) == set(exported)
    for k in original:
        assert torch.equal(original[k], exported[k]), k


def test_round_trip_torch_reference_jax_is_bit_identical(ref_model, jax_model):
    import reference_torch

    as_jax = reference_torch.to_jax(ref_model)
    same = jax.tree.map(np.array_equal, nnx.state(as_jax, nnx.Param), nnx.state(jax_model, nnx.Param))
    assert all(jax.tree.leaves(same))
    back = reference_torch.from_jax(as_jax)
    for (k, a), (k2, b) in zip(ref_model.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k


@pytest.mark.slow
def test_padded_vocab_loads_and_exports(hf_dir, tokens, hf_model, tmp_path):
    padded = gpt2_jax.load_hf(hf_dir, vocab_size=50304)
    assert padded.config.vocab_size == 50304
    emb = np.asarray(padded.wte.embedding[...])
    assert emb.shape == (50304, 768) and not emb[50257:].any()  # zero rows appended
    logits = jax_logits(padded, tokens["odd"])
    np.testing.assert_allclose(logits[..., :50257], hf_logits(hf_model, tokens["odd"]), atol=LOGITS_ATOL, rtol=0)
    from safetensors.numpy import load_file

    exported = load_file(gpt2_jax.export_hf(padded, tmp_path / "sliced") / "model.safetensors")
    assert exported["transformer.wte.weight"].shape == (50257, 768)
    original = load_file(hf_dir / "model.safetensors")
    np.testing.assert_array_equal(exported["transformer.wte.weight"], original["transformer.wte.weight"])


@pytest.mark.parametrize("name,expected", [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200),
])
def test_preset_parameter_counts_equal_hf(name, expected):
    from gpt2_jax.model import count_params

    assert count_params(gpt2_jax.preset(name)) == expected
