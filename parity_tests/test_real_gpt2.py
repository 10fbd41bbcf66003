"""The real OpenAI GPT-2 124M weights through all three implementations: HF, reference_torch, gpt2_jax.

The random checkpoint of test_parity.py proves the wiring; these tests add the real weights' regime
(large negative logits, a few residual channels with huge activations) on real text. The weights are
never downloaded here. They come from, in order:

1. $GPT2_JAX_HF_GPT2: a local folder with config.json and model.safetensors or pytorch_model.bin;
2. the local Hugging Face cache (`hf download gpt2` or any earlier `from_pretrained("gpt2")`).

With neither, every test here is skipped.
"""

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gpt2_jax
from gpt2_jax.generate import generate

ENV = "GPT2_JAX_HF_GPT2"
# Real text, encoded with tiktoken's "gpt2" encoding; the ids are written out so the tests run without
# the BPE files, and are checked against tiktoken where it is available.
PROMPTS = {
    "lecture": ("Hello, I'm a language model,", [15496, 11, 314, 1101, 257, 3303, 2746, 11]),
    "shakespeare": (
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.",
        [5962, 22307, 25, 198, 8421, 356, 5120, 597, 2252, 11, 3285, 502, 2740, 13, 198, 198, 3237, 25, 198,
         5248, 461, 11, 2740, 13, 198, 198, 5962, 22307, 25, 198, 1639, 389, 477, 12939, 2138, 284, 4656, 621,
         284, 1145, 680, 30, 198, 198, 3237, 25, 198, 4965, 5634, 13, 12939, 13],
    ),
}
# float32 throughout, JAX at "highest" matmul precision (conftest). Tolerance: test_parity.py's 1e-4,
# grown with the logits' size. Summation-order rounding is relative to the values: ~1.3e-6 of max|logit|
# measured on random 124M weights at max|logit| 2.6 (3.5e-6) and with ln_f scaled to max|logit| 103
# (1.4e-4, already past 1e-4). Real GPT-2 logits reach ~-100 or more, so allow 1e-5 of max|logit|
# (~8x headroom); a wrong tensor moves real logits by whole units.
LOGITS_ATOL = 1e-4
LOGITS_RTOL_OF_MAX = 1e-5
NEW_TOKENS = 20
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def find_gpt2() -> Path:
    """The folder holding the real gpt2 checkpoint, or pytest.skip saying where it was looked for."""
    if os.environ.get(ENV):
        folder = Path(os.environ[ENV]).expanduser()
        # Set on purpose, so a wrong folder is an error, not a silent skip.
        if not (folder / "config.json").is_file() or not any((folder / f).is_file() for f in WEIGHT_FILES):
            pytest.fail(f"{ENV}={folder} is not a GPT-2 checkpoint folder: it needs config.json and one of "
                        f"{WEIGHT_FILES}")
        return folder
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download("gpt2", local_files_only=True))
    except Exception as e:  # noqa: BLE001 -- LocalEntryNotFoundError (a FileNotFoundError) when not cached
        pytest.skip(f"real GPT-2 weights not found: set {ENV} to a local folder holding the 'gpt2' checkpoint "
                    f"(config.json + model.safetensors), or put it in the Hugging Face cache with "
                    f"`hf download gpt2` ({type(e).__name__})")
    if not (folder / "config.json").is_file() or not any((folder / f).is_file() for f in WEIGHT_FILES):
        pytest.skip(f"the Hugging Face cache has an incomplete 'gpt2' snapshot at {folder} (needs config.json "
                    f"and one of {WEIGHT_FILES}); set {ENV} or run `hf download gpt2`")
    return folder


@pytest.fixture(scope="module")
def gpt2_dir() -> Path:
    return find_gpt2()


@pytest.fixture(scope="module")
def hf_gpt2(gpt2_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(gpt2_dir).float().eval()  # float32 on any transformers


@pytest.fixture(scope="module")
def ref_gpt2(gpt2_dir):
    import reference_torch

    return reference_torch.GPT.from_pretrained(str(gpt2_dir)).eval()


@pytest.fixture(scope="module")
def jax_gpt2(gpt2_dir):
    model = gpt2_jax.load_hf(gpt2_dir)
    assert model.config.arch_diff(gpt2_jax.preset("gpt2")) == [], f"{gpt2_dir} is not GPT-2 124M: {model.config}"
    return model


@pytest.fixture(scope="module")
def prompts() -> dict[str, np.ndarray]:
    """(1, T) int64 ids per prompt; from tiktoken when its BPE files are at hand."""
    try:
        import tiktoken

        enc = tiktoken.get_encoding("gpt2")
    except Exception:  # noqa: BLE001 -- no tiktoken, or no BPE files and no network: the written-out ids
        enc = None
    out = {}
    for name, (text, ids) in PROMPTS.items():
        if enc is not None:
            assert enc.encode_ordinary(text) == ids, f"prompt {name!r}: tiktoken disagrees with PROMPTS"
        out[name] = np.array([ids], dtype=np.int64)
    return out


def all_logits(idx: np.ndarray, hf, ref, jx) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = {"hf": hf(torch.from_numpy(idx)).logits.numpy(), "ref": ref(torch.from_numpy(idx))[0].numpy()}
    out["jax"] = np.asarray(jx(jnp.asarray(idx, jnp.int32)))
    return out


@pytest.mark.parametrize("name", PROMPTS)
def test_logits_and_top1_match(name, prompts, hf_gpt2, ref_gpt2, jax_gpt2):
    idx = prompts[name]
    logits = all_logits(idx, hf_gpt2, ref_gpt2, jax_gpt2)
    for impl, x in logits.items():
        assert x.shape == (*idx.shape, 50257), impl
    atol = max(LOGITS_ATOL, LOGITS_RTOL_OF_MAX * float(np.abs(logits["hf"]).max()))
    for a, b in (("ref", "hf"), ("jax", "hf"), ("jax", "ref")):
        np.testing.assert_allclose(logits[a], logits[b], atol=atol, rtol=0, err_msg=f"{a} vs {b}")
    top1 = {impl: x.argmax(-1) for impl, x in logits.items()}
    np.testing.assert_array_equal(top1["ref"], top1["hf"])
    np.testing.assert_array_equal(top1["jax"], top1["hf"])


def test_greedy_generation_matches_hf(prompts, hf_gpt2, ref_gpt2, jax_gpt2):
    prompt = prompts["lecture"]
    T = prompt.shape[1]
    with torch.no_grad():
        hf_ids = hf_gpt2.generate(torch.from_numpy(prompt), attention_mask=torch.ones_like(torch.from_numpy(prompt)),
                                  max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=50256).numpy()
        # The reference, without a KV cache: one forward over HF's sequence. If its argmax at every step
        # is HF's next token, its own greedy decode yields the same sequence (by induction on the steps).
        ref_next = ref_gpt2(torch.from_numpy(hf_ids[:, :-1]))[0][:, T - 1:].argmax(-1).numpy()
    jax_ids = generate(jax_gpt2, prompt, NEW_TOKENS, temperature=0.0)
    assert hf_ids.shape == jax_ids.shape == (1, T + NEW_TOKENS)
    np.testing.assert_array_equal(jax_ids, hf_ids)
    np.testing.assert_array_equal(ref_next, hf_ids[:, T:])
