"""Session-wide test setup, before any test module initialises JAX: 8 fake CPU devices, so that
multi-device code (meshes, shardings, collectives) is tested on a plain CPU machine. Also what both test
folders (parity_tests/ and tests/) use: the read-only shared folder -- `../shared` beside the checkout,
or $GPT2_JAX_SHARED -- with fixtures that skip, naming the path, when a file is missing; and a random
HF checkpoint.

Kept import-light: torch is imported only inside the fixtures that need it."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from gpt2_jax.launch import CPU_COLLECTIVE_TIMEOUT, CPU_COLLECTIVE_TIMEOUT_FLAG  # JAX-free: no JAX yet

SHARED = Path(os.environ.get("GPT2_JAX_SHARED", Path(__file__).resolve().parent.parent / "shared"))

# Offline: tiktoken reads the GPT-2 BPE from the shared cache, and Hugging Face hub calls fail at once
# instead of retrying for ~20 s.
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken-cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken-cache")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network
# Tests run on the CPU. With the plan extra installed (the CUDA plugin, libtpu) JAX would otherwise try those
# backends first, and libtpu would ask the cloud metadata server where it runs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# XLA:CPU aborts a program whose devices do not all reach a collective within 40 s ("Termination timeout for
# all-reduce ... Expected 8 threads to join the rendezvous, but only 7 of them arrived"): on a loaded 2-core
# machine the 8 fake devices' threads can fall that far apart without anything being wrong. Tests (and their
# train.py subprocesses, which inherit it) allow 10 minutes, as launch.py gives a user's CPU run with several
# devices; a real deadlock still ends in the test's timeout.
if CPU_COLLECTIVE_TIMEOUT not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_COLLECTIVE_TIMEOUT_FLAG}".strip()
# Caches (JAX's compilation cache of train.py, char data of bucket runs) in a folder of this session, not the
# user's ~/.cache; shared by the session's train.py subprocesses, which then compile each program once.
# Removed at the end of the session (pytest_unconfigure) when this file made it.
_SESSION_CACHE = None if "GPT2_JAX_CACHE" in os.environ else tempfile.mkdtemp(prefix="gpt2_jax-test-cache-")
if _SESSION_CACHE:
    os.environ["GPT2_JAX_CACHE"] = _SESSION_CACHE

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# The tests of this process compile the same programs again and again (every tiny training run traces its step
# anew): JAX's persistent cache, in this session's folder, turns each repeat into a read (a 2-step tiny run:
# ~12 s -> ~2 s). train.py subprocesses keep their own entries there (programs for other device counts).
jax.config.update("jax_compilation_cache_dir", os.path.join(os.environ["GPT2_JAX_CACHE"], "jax-compile"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def pytest_unconfigure(config):
    if _SESSION_CACHE:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def random_hf_checkpoint(tmp_path_factory):
    """`random_hf_checkpoint(seed, **GPT2Config kwargs) -> folder`: a GPT2LMHeadModel with every tensor
    given distinct random values (LayerNorm weights and biases included, so that a swapped, transposed or
    dropped tensor changes the output instead of hiding behind ones and zeros), written with
    `save_pretrained` -- the same files, and so the same loading path, as a real Hub checkpoint."""
    import torch  # noqa: PLC0415
    from transformers import GPT2Config, GPT2LMHeadModel  # noqa: PLC0415

    def make(seed: int, **config):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(**config))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=gen)
                if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                    p.copy_(1.0 + 0.1 * noise)  # LayerNorm gains around 1
                else:
                    p.copy_(0.02 * noise)
        path = tmp_path_factory.mktemp("hf-random")
        model.save_pretrained(path)
        return path

    return make


def _shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: set GPT2_JAX_SHARED to the shared folder (holding data/ and tiktoken-cache/)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def tiny_shakespeare() -> Path:
    return _shared_file("data", "tinyshakespeare.txt")


@pytest.fixture(scope="session")
def hellaswag_file() -> Path:
    return _shared_file("data", "hellaswag_val.jsonl")
