"""Shared pytest fixtures: where ../shared lives, and skips for files a machine may not have.

`GPT2_JAX_SHARED` overrides where the read-only shared folder is (default: beside the checkout).
"""

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("GPT2_JAX_SHARED", Path(__file__).resolve().parents[2] / "shared"))

# Offline by default: tiktoken reads the GPT-2 BPE from the shared cache, and Hugging Face hub calls
# fail at once instead of retrying for ~20 s.
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken-cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken-cache")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def tiny_shakespeare() -> Path:
    path = SHARED / "data" / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {path} (set GPT2_JAX_SHARED to shared/)")
    return path


@pytest.fixture(scope="session")
def gpt2_bpe() -> None:
    """Skip unless tiktoken can load the GPT-2 BPE (from TIKTOKEN_CACHE_DIR or a download)."""
    try:
        import tiktoken

        tiktoken.get_encoding("gpt2")
    except Exception as e:  # no cache and no network
        pytest.skip(f"GPT-2 BPE unavailable ({e}); set TIKTOKEN_CACHE_DIR=../shared/tiktoken-cache")
