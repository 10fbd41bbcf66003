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

import errno
import os
import resource
from collections import OrderedDict
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


# Memory maps open at once. Each holds a file descriptor (Python's mmap keeps its own), so a map per shard of a
# dataset of thousands of shards would pass a usual open-file limit (ulimit -n 1024): shards are mapped when read,
# and the least recently read are closed past this many.
OPEN_SHARDS = 64
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _too_many_open_files(path: Path, e: OSError) -> OSError:
    """EMFILE/ENFILE, said as what it is: the shard is fine, the process may not open another file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    which = "this process's" if e.errno == errno.EMFILE else "the system's"
    return OSError(e.errno, f"cannot open shard {path}: {which} open-file limit is reached (ulimit -n: {soft}, "
                   f"at most {hard}); the shard itself is fine. Raise the limit (e.g. `ulimit -n {max(hard, 4096)}` "
                   "before the command), or close other programs' files")


class LocalShard:
    """A shard of a local dataset as the loaders index it (len, slices): checked against meta.json when made,
    memory-mapped when read (at most OPEN_SHARDS maps, shared by every shard, are open at once)."""

    _maps: OrderedDict[Path, np.ndarray] = OrderedDict()

    def __init__(self, path: Path, size: int, offset: int):
        self.path, self.size, self.offset = path, size, offset

    def __len__(self) -> int:
        return self.size

    def tokens(self) -> np.ndarray:
        """The shard's tokens: a read-only memory map (nothing is read until indexed)."""
        maps = LocalShard._maps
        if self.path in maps:
            maps.move_to_end(self.path)
            return maps[self.path]
        while len(maps) >= OPEN_SHARDS:
            maps.popitem(last=False)  # its descriptor closes when the last slice of it is gone
        try:
            tokens = np.memmap(self.path, dtype=np.uint16, mode="r", offset=self.offset, shape=(self.size,))
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise _too_many_open_files(self.path, e) from None
            raise
        maps[self.path] = tokens
        return tokens

    def __getitem__(self, index) -> np.ndarray:
        return self.tokens()[index]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self.tokens(), dtype=dtype)


def _open_shard(path: Path, expected: int) -> LocalShard:
    """A shard, checked against meta.json from its header and size; no file stays open (see LocalShard)."""
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} is listed in meta.json but missing; {HOW_TO_PREPARE}")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in _HEADER_READERS:
                raise ValueError(f".npy format version {version} (this reader knows {sorted(_HEADER_READERS)})")
            shape, fortran_order, dtype = _HEADER_READERS[version](f)
            offset, size = f.tell(), os.fstat(f.fileno()).st_size
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            raise _too_many_open_files(path, e) from None
        raise ValueError(f"shard {path} cannot be read ({e.strerror or e}); check the file, or recreate the "
                         f"dataset: {HOW_TO_PREPARE}") from e
    except (ValueError, EOFError) as e:
        raise ValueError(f"shard {path} is truncated or corrupt ({e}); recreate the dataset: "
                         f"{HOW_TO_PREPARE}") from e
    if len(shape) != 1 or dtype != np.uint16 or fortran_order or shape[0] != expected:
        raise ValueError(f"shard {path} is truncated or corrupt: {dtype}"
                         f"{list(shape)}, meta.json says uint16[{expected}]; recreate "
                         f"the dataset: {HOW_TO_PREPARE}")
    if size < offset + 2 * expected:
        raise ValueError(f"shard {path} is truncated or corrupt: {size} bytes, where its header and meta.json "
                         f"need {offset + 2 * expected}; recreate the dataset: {HOW_TO_PREPARE}")
    return LocalShard(path, expected, offset)


def open_split(data_dir: str | os.PathLike, split: str,
               vocab_size: int | None = None) -> tuple[list[str], list[np.ndarray]]:
    """(names, shards) of one split's shards, in name order, checked against meta.json. A shard is indexed as
    an array of uint16 tokens (len, slices): a LocalShard, memory-mapped when read, or a remote dataset's
    LazyShard, fetched when first read."""
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
