"""Fixtures for parity tests: one seeded, fully randomised GPT-2 124M checkpoint in HF format, loaded
through each implementation's public loader.

All comparisons run in float32 with JAX's matmul precision at "highest" (JAX's accelerator default is
TF32/bf16 passes; torch's CPU default is full float32).
"""

import os
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

jax.config.update("jax_default_matmul_precision", "highest")
torch.set_num_threads(os.cpu_count() or 1)

SEED = 1234


@pytest.fixture(scope="session")
def hf_dir(random_hf_checkpoint) -> Path:
    """A GPT2LMHeadModel(GPT2Config()) -- the exact 124M architecture -- randomised and saved."""
    return random_hf_checkpoint(SEED)  # root conftest.py


@pytest.fixture(scope="session")
def hf_model(hf_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="session")
def ref_model(hf_dir):
    import reference_torch

    return reference_torch.GPT.from_pretrained(str(hf_dir)).eval()


@pytest.fixture(scope="session")
def jax_model(hf_dir):
    import gpt2_jax

    return gpt2_jax.load_hf(hf_dir)


@pytest.fixture(scope="session")
def tokens() -> dict[str, np.ndarray]:
    """Seeded token batches: an odd length, and the full 1024 context."""
    rng = np.random.default_rng(SEED)
    return {
        "odd": rng.integers(0, 50257, size=(2, 37)),
        "full": rng.integers(0, 50257, size=(1, 1024)),
    }
