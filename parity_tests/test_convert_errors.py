"""Bad input to `gpt2_jax.load_hf` and to the models: each failure names what is wrong.

Every case starts from one tiny, seeded GPT2LMHeadModel written by `save_pretrained` (2 layers, width 64,
4 heads, 100 tokens, 32 positions), then breaks one thing: the folder, config.json, or one tensor.
"""

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import gpt2_jax
from gpt2_jax.generate import generate

TINY = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
SEED = 1234


def same_weights_atol(logits, n_embd: int) -> float:
    """The same float32 tensors through two file formats give the same logits up to float32 rounding: sqrt(n_embd)
    roundings of epsilon (the LM head's dot products) scaled to the largest logit, whatever the CPU's sum order."""
    return float(np.sqrt(n_embd) * np.finfo(np.float32).eps * np.abs(logits).max())


def save_tiny_hf(folder: Path, **changes) -> Path:
    """A seeded, tiny GPT2LMHeadModel saved by HF itself (model.safetensors + config.json)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    config = GPT2Config(**{**TINY, **changes}, bos_token_id=99, eos_token_id=99)  # ids inside the tiny vocab
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def write_checkpoint(folder: Path, config: dict, tensors: dict[str, np.ndarray] | None) -> Path:
    """config.json plus, unless `tensors` is None, model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_hf(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture
def config(tiny_dir) -> dict:
    return json.loads((tiny_dir / "config.json").read_text())


@pytest.fixture
def tensors(tiny_dir) -> dict[str, np.ndarray]:
    return load_file(tiny_dir / "model.safetensors")


@pytest.fixture(scope="module")
def idx() -> np.ndarray:
    return np.random.default_rng(SEED).integers(0, TINY["vocab_size"], size=(2, TINY["n_positions"]))


def logits_of(model, idx: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(idx, jnp.int32)))


# --- the folder -------------------------------------------------------------------------------------


def test_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + ".*does not exist"):
        gpt2_jax.load_hf(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        gpt2_jax.load_hf(str(missing))  # a str path too, not sent to the Hub


@pytest.mark.slow
def test_file_instead_of_folder(tiny_dir):
    weights = tiny_dir / "model.safetensors"
    with pytest.raises(NotADirectoryError, match=re.escape(str(weights)) + " is a file; pass the folder"):
        gpt2_jax.load_hf(weights)


def test_config_without_weights_names_folder_and_expected_files(tmp_path, config):
    folder = write_checkpoint(tmp_path / "config-only", config, None)
    with pytest.raises(FileNotFoundError, match=re.escape(f"no weights in {folder}")) as e:
        gpt2_jax.load_hf(folder)
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        assert name in str(e.value)


def test_folder_without_config(tmp_path, tensors):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{folder} has no config.json")):
        gpt2_jax.load_hf(folder)


# --- config.json ------------------------------------------------------------------------------------


@pytest.mark.parametrize("change,message", [
    ({"model_type": "bert"}, "model_type is 'bert', not 'gpt2'"),
    ({"activation_function": "relu"}, "activation_function='relu' is not supported"),
    ({"activation_function": "gelu"}, "activation_function='gelu' is not supported"),  # erf GELU, not tanh
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True is not supported"),
    ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn=True is not supported"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06 is not supported"),
    ({"n_inner": 128}, "n_inner=128 is not supported"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False is not supported"),
    ({"n_embd": None}, re.escape("missing GPT-2 size fields ['n_embd']")),
])
def test_unsupported_config_names_the_field(tmp_path, config, tensors, change, message):
    config = {k: v for k, v in {**config, **change}.items() if v is not None}
    folder = write_checkpoint(tmp_path / "ckpt", config, tensors)
    with pytest.raises(ValueError, match=re.escape(str(folder / "config.json")) + ": " + message):
        gpt2_jax.load_hf(folder)


def test_config_that_is_not_json(tmp_path, tensors):
    folder = write_checkpoint(tmp_path / "ckpt", {}, tensors)
    (folder / "config.json").write_text("{'model_type': 'gpt2'}")  # Python, not JSON
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'config.json'} is not valid JSON")):
        gpt2_jax.load_hf(folder)


# --- tensors ----------------------------------------------------------------------------------------


def test_config_wider_than_weights_names_tensor_and_both_shapes(tmp_path):
    narrow = save_tiny_hf(tmp_path / "narrow", n_embd=32)  # tensors for width 32 ...
    config = json.loads((narrow / "config.json").read_text())
    (narrow / "config.json").write_text(json.dumps({**config, "n_embd": 64}))  # ... config says 64
    with pytest.raises(ValueError, match=re.escape("tensor wte.weight: checkpoint shape (100, 32) does not "
                                                   "match the model's (100, 64)")):
        gpt2_jax.load_hf(narrow)


@pytest.mark.parametrize("name,shape,want", [
    ("transformer.h.1.mlp.c_fc.weight", (64, 255), (64, 256)),  # one layer of a stacked tensor
    ("transformer.h.0.attn.c_attn.weight", (192, 64), (64, 192)),  # torch nn.Linear layout, not Conv1D
    ("transformer.wpe.weight", (16, 64), (32, 64)),
    ("transformer.ln_f.bias", (63,), (64,)),
])
def test_one_tensor_with_wrong_shape_names_it_and_both_shapes(tmp_path, config, tensors, name, shape, want):
    tensors[name] = np.zeros(shape, np.float32)
    folder = write_checkpoint(tmp_path / "ckpt", config, tensors)
    short = name.removeprefix("transformer.")
    with pytest.raises(ValueError, match=re.escape(f"tensor {short}: checkpoint shape {shape} does not match "
                                                   f"the model's {want}")):
        gpt2_jax.load_hf(folder)


def test_embedding_rows_disagreeing_with_config_vocab_are_refused_not_padded(tmp_path, config, tensors):
    # Zero-padding wte is for an explicit larger vocab_size (50257 -> 50304), never for a broken checkpoint.
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:90]
    folder = write_checkpoint(tmp_path / "ckpt", config, tensors)
    with pytest.raises(ValueError, match=re.escape("tensor wte.weight: checkpoint shape (90, 64) does not "
                                                   "match the model's (100, 64)")):
        gpt2_jax.load_hf(folder)
    with pytest.raises(ValueError, match=re.escape("(90, 64)")):
        gpt2_jax.load_hf(folder, vocab_size=128)


def test_missing_tensor_is_named(tmp_path, config, tensors):
    del tensors["transformer.h.1.ln_2.bias"]
    folder = write_checkpoint(tmp_path / "ckpt", config, tensors)
    with pytest.raises(ValueError, match=re.escape("checkpoint has no tensor 'h.1.ln_2.bias'")):
        gpt2_jax.load_hf(folder)


def test_extra_layer_in_weights(tmp_path, config):
    deep = save_tiny_hf(tmp_path / "deep", n_layer=3)  # weights for 3 layers ...
    (deep / "config.json").write_text(json.dumps(config))  # ... config says 2
    with pytest.raises(ValueError, match=r"tensors the model does not use: \['h\.2\..*\] and 7 more "
                                         r"\(is n_layer=2 right\?\)"):
        gpt2_jax.load_hf(deep)


def test_vocab_size_smaller_than_checkpoint(tiny_dir):
    with pytest.raises(ValueError, match=r"vocab_size=50 is smaller than the checkpoint's 100"):
        gpt2_jax.load_hf(tiny_dir, vocab_size=50)


# --- other file layouts that must load --------------------------------------------------------------


def test_pytorch_model_bin_fallback_gives_the_same_logits(tmp_path, tiny_dir, config, idx):
    from transformers import GPT2LMHeadModel

    # transformers 5 always writes safetensors (safe_serialization=False is ignored), so write the .bin
    # the way older transformers did: torch.save of the full state dict (tied lm_head.weight included).
    folder = write_checkpoint(tmp_path / "bin", config, None)
    torch.save(GPT2LMHeadModel.from_pretrained(tiny_dir).state_dict(), folder / "pytorch_model.bin")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.bin"]
    from_bin, from_safetensors = gpt2_jax.load_hf(folder), gpt2_jax.load_hf(tiny_dir)
    want = logits_of(from_safetensors, idx)
    np.testing.assert_allclose(logits_of(from_bin, idx), want, atol=same_weights_atol(want, TINY["n_embd"]), rtol=0)


def test_checkpoint_without_transformer_prefix_loads(tmp_path, tiny_dir, config, tensors, idx):
    # The original OpenAI-converted `gpt2` files: no "transformer." prefix, no lm_head, and the causal
    # mask buffers `h.{i}.attn.bias` / `h.{i}.attn.masked_bias` stored beside the weights.
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    for i in range(TINY["n_layer"]):
        T = TINY["n_positions"]
        bare[f"h.{i}.attn.bias"] = np.tril(np.ones((T, T), np.float32))[None, None]
        bare[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    folder = write_checkpoint(tmp_path / "bare", config, bare)
    want = logits_of(gpt2_jax.load_hf(tiny_dir), idx)
    np.testing.assert_allclose(logits_of(gpt2_jax.load_hf(folder), idx), want,
                               atol=same_weights_atol(want, TINY["n_embd"]), rtol=0)


# --- the models -------------------------------------------------------------------------------------


def test_sequence_longer_than_block_size(tiny_dir):
    import reference_torch

    too_long = np.zeros((1, TINY["n_positions"] + 1), np.int64)
    model = gpt2_jax.load_hf(tiny_dir)
    with pytest.raises(ValueError, match="sequence length 33 exceeds block_size 32"):
        model(jnp.asarray(too_long, jnp.int32))
    with pytest.raises(ValueError, match="sequence length 33 exceeds block_size 32"):
        model.decode(jnp.asarray(too_long, jnp.int32), model.init_cache(1), 0)  # cache of block_size
    with pytest.raises(ValueError, match="exceeds block_size 32"):
        generate(model, too_long, 3, temperature=0.0)  # the prompt; new tokens past the context slide the window
    ref = reference_torch.GPT(model.config)
    with pytest.raises(ValueError, match="sequence length 33 exceeds block_size 32"):
        ref(torch.from_numpy(too_long))
