"""Token shards: text -> tokens -> uint16 ``.npy`` shards on disk -> per-process batches.

- `gpt2_jax.data.prepare`: text -> shards (atomic writes; meta.json last; a prep that resumes).
- `gpt2_jax.data.shards`: the folder format, opening shards, reading windows, vocabulary checks.
- `gpt2_jax.data.loader`: `TokenLoader` (a sequential or shuffled cursor) and `EvalWindows`.
- `gpt2_jax.data.remote`: a dataset in a bucket, fetched shard by shard into a local cache.
- `gpt2_jax.data.sources`: documents from .txt/.jsonl/.json/.parquet files and Hugging Face datasets.
- `gpt2_jax.data.cli`: ``python -m gpt2_jax.data fineweb-edu|text|files|hf ...`` (``--help``: the options).

The names below are the package's face: ``from gpt2_jax.data import TokenLoader``.
"""

from gpt2_jax.data.cli import main
from gpt2_jax.data.loader import DEFAULT_EVAL_TOKENS, ORDERS, EvalWindows, TokenLoader, eval_windows
from gpt2_jax.data.prepare import (
                                  DEFAULT_SHARD_SIZE,
                                  default_corpus,
                                  prepare_fineweb,
                                  prepare_text,
                                  prepare_text_string,
                                  write_shards,
)
from gpt2_jax.data.remote import open_remote
from gpt2_jax.data.shards import SPLITS, check_vocab, open_split, read_windows
from gpt2_jax.data.sources import prepare_files, prepare_hf
from gpt2_jax.tokenizer import META_FILE, Tokenizer, read_meta

__all__ = [
    "DEFAULT_EVAL_TOKENS", "DEFAULT_SHARD_SIZE", "META_FILE", "ORDERS", "SPLITS", "EvalWindows",
    "TokenLoader", "Tokenizer", "check_vocab", "default_corpus", "eval_windows", "main",
    "open_remote", "open_split", "prepare_files", "prepare_fineweb", "prepare_hf", "prepare_text",
    "prepare_text_string", "read_meta", "read_windows", "write_shards",
]
