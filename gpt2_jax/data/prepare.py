"""Text -> tokens -> the uint16 ``.npy`` shards of a dataset folder (format: `gpt2_jax.data.shards`).

Each file is written atomically (temp file in the same folder, fsync, ``os.replace``; in a bucket, gs://...,
a whole upload) and meta.json comes last, so a killed prep never leaves a folder that looks complete: readers trust
meta.json only.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import re
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from gpt2_jax import storage
from gpt2_jax.tokenizer import META_FILE, Tokenizer

SHARD_NAME = re.compile(r"(train|val)_\d{6}\.npy")
DEFAULT_SHARD_SIZE = 100_000_000  # 200 MB of uint16 per shard
MAX_UINT16 = 2**16


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """write(file) into a temp file beside `path`, fsync it, then rename it over `path`. In a bucket: into a
    local temp file, then uploaded (an object appears whole, when its upload ends)."""
    if storage.is_remote(path):
        with tempfile.TemporaryFile() as f:
            write(f)
            f.seek(0)
            with path.open("wb") as dst:
                shutil.copyfileobj(f, dst, 16 * 2**20)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _save_shard(out: Path, name: str, tokens: np.ndarray) -> None:
    _atomic_write(out / name, lambda f: np.save(f, np.asarray(tokens, dtype=np.uint16)))


def _begin_output(out_dir: str | os.PathLike) -> Path:
    """Create `out_dir` and clear an old dataset there: meta.json first, so it never vouches for
    new shards; old shards, so none is left over; temp files of a killed run. `out_dir` may be gs://..."""
    out = storage.run_path(out_dir) if storage.is_remote(out_dir) else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)
    for path in out.iterdir() if out.exists() else ():  # (a bucket has no empty folders)
        if SHARD_NAME.fullmatch(path.name) or (path.name.startswith(".") and path.suffix == ".tmp"):
            path.unlink()
    return out


def _finish_output(out: Path, tokenizer: Tokenizer, shards: dict[str, int]) -> dict[str, Any]:
    meta = {**tokenizer.to_meta(), "dtype": "uint16", "shards": shards}
    if not any(name.startswith("train_") for name in shards):
        warnings.warn(f"{out} has no train shard: all tokens went to validation; use a smaller "
                      "shard_size or more data", stacklevel=3)
    _atomic_write(out / META_FILE, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return meta


def _checked_tokens(tokens: Any, tokenizer: Tokenizer) -> np.ndarray:
    """`tokens` as a 1-D array; ValueError if an id doesn't fit uint16 or the tokenizer's vocab."""
    arr = np.asarray(tokens).reshape(-1)
    if arr.size == 0:
        return arr.astype(np.uint16)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token arrays must hold integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= MAX_UINT16:
        raise ValueError(f"token id {lo if lo < 0 else hi} does not fit the uint16 shards (ids "
                         f"must be in [0, {MAX_UINT16})); use a vocabulary of at most {MAX_UINT16}")
    if hi >= tokenizer.vocab_size:
        raise ValueError(f"token id {hi} >= the tokenizer's vocab_size {tokenizer.vocab_size}; "
                         "the tokens and the tokenizer don't match")
    return arr


def write_shards(token_iter: Iterable[Any], out_dir: str | os.PathLike, tokenizer: Tokenizer,
                 shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True) -> dict[str, Any]:
    """Pack documents (1-D token arrays) into shards of `shard_size` tokens; return the meta.

    Shard 0 is ``val_000000.npy``, then ``train_000000.npy``, ``train_000001.npy``, ...;
    documents run on across shard boundaries, and the final partial shard is written too.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    out = _begin_output(out_dir)
    shards: dict[str, int] = {}
    buf, fill = np.empty(shard_size, dtype=np.uint16), 0

    def flush() -> None:
        name = f"train_{len(shards) - 1:06d}.npy" if shards else "val_000000.npy"
        _save_shard(out, name, buf[:fill])
        shards[name] = fill

    with tqdm(unit="tok", unit_scale=True, desc=f"writing {out}", disable=not progress) as bar:
        for doc in token_iter:
            tokens = _checked_tokens(doc, tokenizer)
            i = 0
            while i < len(tokens):  # a document may span several shards
                take = min(shard_size - fill, len(tokens) - i)
                buf[fill:fill + take] = tokens[i:i + take]
                fill, i = fill + take, i + take
                if fill == shard_size:
                    flush()
                    fill = 0
            bar.update(len(tokens))
        if fill:
            flush()
    return _finish_output(out, tokenizer, shards)


@functools.cache
def _gpt2_tokenizer() -> Tokenizer:
    return Tokenizer.gpt2()  # once per (worker) process


def _gpt2_document(text: str) -> np.ndarray:
    """<|endoftext|> + the GPT-2 tokens of one document (runs in the worker processes)."""
    tok = _gpt2_tokenizer()
    return np.array([tok.eot_token, *tok.encode(text)], dtype=np.uint16)  # ids < 50257 fit


def prepare_fineweb(out_dir: str | os.PathLike, shard_size: int = DEFAULT_SHARD_SIZE,
                    docs: Iterable[dict[str, Any]] | None = None, num_proc: int | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Tokenise FineWeb-Edu sample-10BT (or `docs`: dicts with a "text" field) into GPT-2 shards.

    Streams the dataset with Hugging Face `datasets`, tokenises in `num_proc` processes (default:
    half the CPUs; 1 = no pool) and prepends <|endoftext|> to every document, as GPT-2 did.
    """
    if docs is None:
        try:
            import datasets
        except ImportError as e:
            raise ImportError('downloading FineWeb-Edu needs Hugging Face `datasets`: '
                              'pip install "gpt2-jax[data]"') from e
        docs = datasets.load_dataset("HuggingFaceFW/fineweb-edu", name="sample-10BT",
                                     split="train", streaming=True)
    tokenizer = _gpt2_tokenizer()  # fail here, not in a worker, if the BPE can't be loaded
    num_proc = num_proc or max(1, (os.cpu_count() or 2) // 2)
    texts = (doc["text"] for doc in docs)
    if num_proc == 1:
        return write_shards(map(_gpt2_document, texts), out_dir, tokenizer, shard_size, progress)
    # "spawn": forking a process that has imported JAX (multithreaded) can deadlock.
    with multiprocessing.get_context("spawn").Pool(num_proc) as pool:
        # imap keeps the document order, so the shards are deterministic
        tokens = pool.imap(_gpt2_document, texts, chunksize=16)
        return write_shards(tokens, out_dir, tokenizer, shard_size, progress)


def prepare_text_string(text: str | Sequence[str], out_dir: str | os.PathLike,
                        tokenizer: str | Tokenizer = "char", val_fraction: float = 0.1,
                        shard_size: int = DEFAULT_SHARD_SIZE) -> dict[str, Any]:
    """Tokenise in-memory text (one document or a list of them) into train/val shards.

    "gpt2": <|endoftext|> before every document. "char": the vocabulary is the sorted set of all
    characters. The LAST `val_fraction` of the tokens become ``val_*.npy``, the rest ``train_*``.
    """
    documents = [text] if isinstance(text, str) else list(text)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if tokenizer == "char":
        tokenizer = Tokenizer.char("".join(documents))
    elif tokenizer == "gpt2":
        tokenizer = Tokenizer.gpt2()
    elif not isinstance(tokenizer, Tokenizer):
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected 'gpt2', 'char', a Tokenizer")
    prefix = [] if tokenizer.eot_token is None else [tokenizer.eot_token]
    ids = [i for doc in documents for i in prefix + tokenizer.encode(doc)]
    tokens = _checked_tokens(ids, tokenizer)
    n_val = int(len(tokens) * val_fraction)
    if n_val < 1 or n_val == len(tokens):
        raise ValueError(f"{len(tokens)} tokens can't be split with val_fraction={val_fraction}: "
                         "each split needs at least one token; give more text")
    out = _begin_output(out_dir)
    shards: dict[str, int] = {}
    for split, part in (("val", tokens[-n_val:]), ("train", tokens[:-n_val])):
        for k, start in enumerate(range(0, len(part), shard_size)):
            shard = part[start:start + shard_size]
            _save_shard(out, f"{split}_{k:06d}.npy", shard)
            shards[f"{split}_{k:06d}.npy"] = len(shard)
    return _finish_output(out, tokenizer, shards)


def prepare_text(files: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 tokenizer: str | Tokenizer = "gpt2", val_fraction: float = 0.1,
                 shard_size: int = DEFAULT_SHARD_SIZE) -> dict[str, Any]:
    """Local UTF-8 text files (e.g. Tiny Shakespeare) -> shards; each file is one document."""
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"text file(s) not found: {', '.join(missing)}")
    texts = [Path(f).read_text(encoding="utf-8") for f in files]
    return prepare_text_string(texts, out_dir, tokenizer, val_fraction, shard_size)


def default_corpus() -> str:
    """~465k characters of English that ship with Python: the help topics of `pydoc_data`.

    Joined in sorted-key order: the same on every run of one Python version (other versions ship
    slightly different text). For the no-download char-level run of ``python train.py``.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))
