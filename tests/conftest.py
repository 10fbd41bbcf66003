"""Fixtures of tests/: the GPT-2 BPE check and a small BPE training run shared by several modules.
(The shared folder's fixtures -- shared_dir, tiny_shakespeare, hellaswag_file -- are in the root conftest.py.)
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest


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
