"""The tiny model, the tiny training run and the char data that the tests share: written once here.

Test modules import it (`from tiny import TINY_MODEL, tiny_model`: pytest puts tests/ on sys.path, as for
gcs_emulator.py); conftest.py's session fixture `char_data` writes the data with `write_char_data`. A test
that needs another shape passes overrides -- `tiny_model(vocab_size=50257)`,
`tiny_train_config(out, char_data, n_layer=1)` -- instead of restating the config.
"""

import subprocess
from pathlib import Path

import numpy as np

from gpt2_jax.config import GPTConfig
from gpt2_jax.training.settings import TrainConfig

# 2 layers, 32 wide: compiles and runs in about a second on a CPU.
TINY_MODEL = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0)

# The TrainConfig fields of a run of TINY_MODEL that trains in seconds on a CPU: char-level (the vocabulary
# comes from the data), 3 steps of one micro-batch of 8 x 32 tokens, float32, no eval, sample, checkpoint or
# TensorBoard. Without data and out_dir: tiny_train_config adds them.
TINY_RUN = dict(preset="char", **{k: getattr(TINY_MODEL, k) for k in ("n_layer", "n_head", "n_embd", "block_size",
                                                                        "dropout", "dtype", "attention")},
                micro_batch_size=8, total_batch_size=8 * 32, max_steps=3, warmup_steps=1, eval_every=0,
                sample_every=0, checkpoint_every=0, tensorboard=False)

# The char data: the bundled corpus's first 100K characters (all of its 100 distinct characters; 90K train
# tokens in one shard, 10K val tokens), enough for every test's steps and evals many times over.
CHAR_DATA_CHARS = 100_000


def tiny_model(seed: int = 0, **overrides):
    """A GPT of TINY_MODEL with `overrides` (GPTConfig fields), initialised from nnx.Rngs(seed)."""
    from flax import nnx

    from gpt2_jax.model import GPT

    return GPT(TINY_MODEL.replace(**overrides), rngs=nnx.Rngs(seed))


def tiny_train_config(out_dir, data, **overrides) -> TrainConfig:
    """TINY_RUN writing to `out_dir`, on the shards in `data` (the `char_data` fixture), with `overrides`."""
    return TrainConfig(**{**TINY_RUN, "data": str(data), "out_dir": str(out_dir), **overrides})


def train_flags(values: dict) -> list[str]:
    """`values` (TrainConfig fields) as train.py's command line: ["--name=value", ...], booleans as true/false."""
    return [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]


def write_char_data(folder: Path) -> Path:
    """The char data (CHAR_DATA_CHARS of the bundled corpus) as shards in `folder`."""
    from gpt2_jax import data as data_lib

    data_lib.prepare_text_string(data_lib.default_corpus()[:CHAR_DATA_CHARS], folder, tokenizer="char")
    return folder


def f32_atol(reference, terms: int) -> float:
    """The tolerance for a float32 result whose sums of `terms` values may run in another order (another kernel,
    another CPU's vector width): sqrt(terms) roundings of float32 epsilon, scaled to the result's largest
    magnitude -- what float32 can promise, not what one machine measured. (A fixed atol=1e-6 on splash attention
    failed by 1.07e-6 on an Intel Xeon with AVX-512: 2.9 eps x max|ref| there, where this allows sqrt(384) = 19.6.)"""
    return float(np.sqrt(terms) * np.finfo(np.float32).eps * np.abs(np.asarray(reference)).max())


def private_mount_works(script: str) -> bool:
    """Whether `script` succeeds in a private user and mount namespace (`unshare -rm`): the tests that mount a small
    or read-only filesystem over a folder skip where the machine does not allow it."""
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
