"""The shards of a dataset folder: their format, opening them, and reading windows of tokens.

A dataset directory::

    DIR/val_000000.npy     1-D uint16 token ids: the validation split
    DIR/train_000000.npy   1-D uint16 token ids, `shard_size` each (the last may be shorter)
    DIR/train_000001.npy   ...
    DIR/meta.json          tokenizer, vocab_size, eot_token, chars, {shard name: num tokens}

A dataset in a bucket is read through its local cache folder (`gpt2_jax.data.remote`): meta.json and
source.json, and the shards fetched so far.

meta.json comes last (see `gpt2_jax.data.prepare`), so readers trust meta.json only: `read_meta`
(in `gpt2_jax.tokenizer`, which `Tokenizer.load` needs) reads it, `open_split` checks every shard
against it, and `read_windows` checks every token it reads against the model's vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpt2_jax.data.remote import LazyShard, ShardCache, is_cache
from gpt2_jax.tokenizer import HOW_TO_PREPARE, read_meta

SPLITS = ("train", "val")


def check_vocab(data_dir: str | os.PathLike, vocab_size: int) -> dict[str, Any]:
    """Raise if the dataset may hold token ids >= the model's `vocab_size`; return the meta."""
    meta = read_meta(data_dir)
    if meta["vocab_size"] > vocab_size:
        raise ValueError(f"{data_dir} was tokenised with vocab_size={meta['vocab_size']} "
                         f"({meta['tokenizer']}) but the model has vocab_size={vocab_size}; use a "
                         f"model with vocab_size >= {meta['vocab_size']} or data of its tokenizer")
    return meta


def _open_shard(path: Path, expected: int) -> np.ndarray:
    """A shard as a read-only memory map (nothing is read yet), checked against meta.json."""
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} is listed in meta.json but missing; {HOW_TO_PREPARE}")
    try:
        tokens = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"shard {path} is truncated or corrupt ({e}); recreate the dataset: "
                         f"{HOW_TO_PREPARE}") from e
    if tokens.ndim != 1 or tokens.dtype != np.uint16 or len(tokens) != expected:
        raise ValueError(f"shard {path} is truncated or corrupt: {tokens.dtype}"
                         f"{list(tokens.shape)}, meta.json says uint16[{expected}]; recreate "
                         f"the dataset: {HOW_TO_PREPARE}")
    return tokens


def open_split(data_dir: str | os.PathLike, split: str,
               vocab_size: int | None = None) -> tuple[list[str], list[np.ndarray]]:
    """(names, memory maps) of one split's shards, in name order, checked against meta.json."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    meta = read_meta(data_dir) if vocab_size is None else check_vocab(data_dir, vocab_size)
    names = sorted(n for n in meta["shards"] if n.startswith(f"{split}_"))
    if not names:
        raise FileNotFoundError(f"{data_dir} has no {split} shards ({split}_*.npy in meta.json); "
                                f"{HOW_TO_PREPARE}")
    if is_cache(data_dir):  # a dataset in a bucket: each shard is fetched when first read
        cache = ShardCache.of(data_dir)
        return names, [LazyShard(cache, n) for n in names]
    return names, [_open_shard(Path(data_dir) / n, meta["shards"][n]) for n in names]


def read_windows(shards: Sequence[np.ndarray], names: Sequence[str], where: np.ndarray,
                 seq_len: int, vocab_size: int | None,
                 data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) int32 (R, seq_len) from R windows `where` = [[shard, start], ...] of seq_len + 1
    tokens; only those tokens are read from the memory maps."""
    buf = np.stack([np.asarray(shards[k][s:s + seq_len + 1], dtype=np.int32)
                    for k, s in where])  # (R, T + 1)
    if vocab_size is not None and int(buf.max()) >= vocab_size:
        row = int(np.argmax(buf.max(axis=1)))
        raise ValueError(f"token id {int(buf.max())} >= vocab_size={vocab_size} in shard "
                         f"{data_dir / names[where[row][0]]}; the data doesn't match the model")
    return np.ascontiguousarray(buf[:, :-1]), np.ascontiguousarray(buf[:, 1:])
