"""Shared pytest fixtures: where ../shared lives, and skips for files a machine may not have.

`GPT2_JAX_SHARED` overrides where the read-only shared folder is (default: beside the checkout).
"""

import os
import subprocess
import sys
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


ROOT = Path(__file__).resolve().parents[1]
HELLASWAG_LIMIT = 20  # HellaSwag examples the shared BPE run evaluates in its loop


@pytest.fixture(scope="session")
def hellaswag_file(shared_dir) -> Path:
    path = shared_dir / "data" / "hellaswag_val.jsonl"
    if not path.is_file():
        pytest.skip(f"HellaSwag validation file not found at {path} (set GPT2_JAX_SHARED)")
    return path


@pytest.fixture(scope="session")
def bpe_run(tmp_path_factory, tiny_shakespeare, hellaswag_file, gpt2_bpe) -> tuple[Path, Path]:
    """(out_dir, data_dir): Tiny Shakespeare as GPT-2 BPE shards, and a 1-layer model trained on them for
    2 steps by train.py with in-loop HellaSwag. Made once per session, shared by the CLI tests."""
    from gpt2_jax import data as data_lib

    base = tmp_path_factory.getbasetemp() / "bpe-run"
    data, out = base / "data", base / "out"
    if not (out / "metrics.jsonl").is_file():
        assert data_lib.main(["text", str(tiny_shakespeare), "--out", str(data), "--tokenizer", "gpt2"]) == 0
        r = subprocess.run([sys.executable, "train.py", f"--data={data}", f"--out_dir={out}", "--max_steps=2",
                            "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=64", "--micro_batch_size=8",
                            "--eval_every=0", "--sample_every=0", "--tensorboard=false", "--hellaswag_every=2",
                            f"--hellaswag_data={hellaswag_file}", f"--hellaswag_limit={HELLASWAG_LIMIT}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert r.returncode == 0, r.stderr[-3000:]
    return out, data
