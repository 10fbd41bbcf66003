"""Token shards: text -> tokens -> uint16 ``.npy`` shards on disk -> per-process batches.

A dataset directory::

    DIR/val_000000.npy     1-D uint16 token ids: the validation split
    DIR/train_000000.npy   1-D uint16 token ids, `shard_size` each (the last may be shorter)
    DIR/train_000001.npy   ...
    DIR/meta.json          tokenizer, vocab_size, eot_token, chars, {shard name: num tokens}

Create one with the CLI (``--help`` lists the options)::

    python -m gpt2_jax.data fineweb-edu --out data/fineweb10B     # FineWeb-Edu 10BT, GPT-2 BPE
    python -m gpt2_jax.data text input.txt --out data/shakespeare --tokenizer char

Each file is written atomically (temp file in the same folder, fsync, ``os.replace``) and
meta.json comes last, so a killed prep never leaves a folder that looks complete: readers trust
meta.json only. `TokenLoader` reads batches of one split, each process only its rows, in one of
two orders: "sequential" as llm.c's loader (each batch the next ``batch_size * seq_len + 1``
contiguous tokens) or "shuffle" (windows of ``seq_len + 1`` tokens in a seeded order per epoch).
`EvalWindows` gives the validation batches: the same windows, spread over the split, at every call.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import re
import secrets
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

META_FILE = "meta.json"
SPLITS = ("train", "val")
SHARD_NAME = re.compile(r"(train|val)_\d{6}\.npy")
DEFAULT_SHARD_SIZE = 100_000_000  # 200 MB of uint16 per shard
MAX_UINT16 = 2**16
HOW_TO_PREPARE = ("create it with `python -m gpt2_jax.data text FILE --out DIR` "
                  "or `python -m gpt2_jax.data fineweb-edu --out DIR`")
REPLACEMENT = "\ufffd"  # what `decode` shows for ids outside the vocabulary


class Tokenizer:
    """GPT-2 BPE (tiktoken) or a character-level vocabulary, as recorded in meta.json.

    ``encode`` adds no special tokens: GPT-2 text is encoded "ordinarily" (a literal
    "<|endoftext|>" is plain text), so add ``eot_token`` by id where a document starts.
    ``decode`` shows ids outside the vocabulary as U+FFFD instead of raising: a model with a padded
    vocabulary (50304 rows) can sample ids >= 50257, and that must not crash sampling.
    """

    def __init__(self, name: str, vocab_size: int, eot_token: int | None, chars: str | None = None):
        self.name, self.vocab_size, self.eot_token = name, vocab_size, eot_token
        self.chars = chars
        self._enc: Any = None  # tiktoken.Encoding, for "gpt2"
        self._stoi: dict[str, int] = {}  # char -> id, for "char"
        if name == "gpt2":
            import tiktoken

            try:
                self._enc = tiktoken.get_encoding("gpt2")
            except Exception as e:  # tiktoken downloads the BPE files on first use
                raise RuntimeError(f"could not load the GPT-2 BPE with tiktoken ({e}); offline, "
                                   "set TIKTOKEN_CACHE_DIR to a folder of its cached files") from e
        elif name == "char":
            if not chars:
                raise ValueError("a char tokenizer needs a non-empty `chars` vocabulary")
            self._stoi = {c: i for i, c in enumerate(chars)}
        else:
            raise ValueError(f"unknown tokenizer {name!r}; expected 'gpt2' or 'char'")

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """tiktoken's GPT-2 BPE: 50257 tokens, <|endoftext|> = 50256."""
        return cls("gpt2", vocab_size=50257, eot_token=50256)

    @classmethod
    def char(cls, chars: str) -> Tokenizer:
        """One token per character; the vocabulary is the sorted set of `chars`."""
        vocab = "".join(sorted(set(chars)))
        return cls("char", vocab_size=len(vocab), eot_token=None, chars=vocab)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Tokenizer:
        if meta.get("tokenizer") == "gpt2":
            return cls.gpt2()
        if meta.get("tokenizer") == "char":
            return cls.char(meta.get("chars") or "")
        raise ValueError(f"meta.json names an unknown tokenizer {meta.get('tokenizer')!r}")

    @classmethod
    def load(cls, data_dir: str | os.PathLike) -> Tokenizer:
        """The tokenizer a dataset directory was written with."""
        return cls.from_meta(read_meta(data_dir))

    def to_meta(self) -> dict[str, Any]:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size,
                "eot_token": self.eot_token, "chars": self.chars}

    def encode(self, text: str) -> list[int]:
        if self._enc is not None:
            return self._enc.encode_ordinary(text)
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this char-level vocabulary "
                             f"({self.vocab_size} characters)") from None

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self._enc is None:
            return "".join(self.chars[i] if 0 <= i < self.vocab_size else REPLACEMENT for i in ids)
        out, run = bytearray(), []  # decode runs of valid ids: one character may span tokens
        for i in ids:
            if 0 <= i < self.vocab_size:
                run.append(i)
            else:
                out += self._enc.decode_bytes(run) + REPLACEMENT.encode()
                run = []
        out += self._enc.decode_bytes(run)
        return out.decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------ writing shards


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """write(file) into a temp file beside `path`, fsync it, then rename it over `path`."""
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
    new shards; old shards, so none is left over; temp files of a killed run."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)
    for path in out.iterdir():
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


# ------------------------------------------------------------------------------ reading shards


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a dataset directory, with errors that say how to create one."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist; {HOW_TO_PREPARE}")
    path = data_dir / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing, so {data_dir} holds no finished dataset "
                                f"(meta.json is written last); {HOW_TO_PREPARE}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {HOW_TO_PREPARE}") from e


def check_vocab(data_dir: str | os.PathLike, vocab_size: int) -> dict[str, Any]:
    """Raise if the dataset may hold token ids >= the model's `vocab_size`; return the meta."""
    meta = read_meta(data_dir)
    if meta["vocab_size"] > vocab_size:
        raise ValueError(f"{data_dir} was tokenised with vocab_size={meta['vocab_size']} "
                         f"({meta['tokenizer']}) but the model has vocab_size={vocab_size}; use a "
                         f"model with vocab_size >= {meta['vocab_size']} or data of its tokenizer")
    return meta


ORDERS = ("shuffle", "sequential")
# The in-loop val loss of build-nanogpt: 20 steps of 64 x 1024 tokens on 8 GPUs.
DEFAULT_EVAL_TOKENS = 20 * 64 * 1024 * 8  # 10,485,760
_SHARD_ORDER, _WINDOW_ORDER = 0, 1  # tags that keep the two seeded draws of an epoch apart


def _check_batch(batch_size: int, seq_len: int, process_index: int, process_count: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive: {batch_size}, {seq_len}")
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by process_count="
                         f"{process_count}; use a multiple of {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")


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
    return names, [_open_shard(Path(data_dir) / n, meta["shards"][n]) for n in names]


def _read_windows(shards: Sequence[np.ndarray], names: Sequence[str], where: np.ndarray,
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


@functools.lru_cache(maxsize=8)
def _shard_order(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    """The shards of `epoch` in their seeded order: (num_shards,) shard indices."""
    return np.random.default_rng((seed, epoch, _SHARD_ORDER, 0)).permutation(num_shards)


@functools.lru_cache(maxsize=8)
def _window_plan(seed: int, epoch: int, shard: int, size: int, seq_len: int) -> tuple[int, np.ndarray]:
    """(offset, order) of one shard in `epoch`: its windows start at offset + i*seq_len, i in
    [0, count), and are read in the seeded order `order` (a permutation of range(count)).

    The offset shifts the grid each epoch, so a token is not always at the same place in a row.
    (SeedSequence pads keys with zeros, so every key here has 4 entries and a tag: no two collide.)
    """
    rng = np.random.default_rng((seed, epoch, _WINDOW_ORDER, shard))
    offset = int(rng.integers(seq_len))
    count = max(0, (size - offset - 1) // seq_len)  # windows of seq_len + 1 tokens that fit
    return offset, rng.permutation(count)


def _order_of(state: dict[str, Any]) -> str:
    """A loader state's data order, as errors name it (a state without "order" is sequential)."""
    if state.get("order", "sequential") == "sequential":
        return "'sequential'"
    return f"{state.get('order')!r} (seed {state.get('seed')}, seq_len {state.get('seq_len')})"


class TokenLoader:
    """(x, y) batches from the shards of one split, sliced per process, in one of two orders.

    Every row is a window of ``seq_len + 1`` tokens: x its first seq_len, y its last (x shifted by
    one); windows lie at a stride of seq_len, so a window's target token is the next one's first
    input. `batch_size` is GLOBAL: process p of P reads only the rows ``[p*B/P, (p+1)*B/P)`` of each
    global batch, straight from the memory maps, so `state()` is the same in every process and a
    run can resume on a different number of processes.

    ``order="sequential"`` (llm.c, build-nanogpt): a batch takes the ``batch_size * seq_len + 1``
    tokens of the current shard from `position`: global row r is ``tokens[position + r*seq_len :
    position + (r+1)*seq_len + 1]``. When a shard has too few tokens left for a whole batch, the
    loader moves to the next shard (skipping any too small for one batch), and after the last one
    back to the first. Consecutive batches are neighbouring text, which learns slower on small data
    (Tiny Shakespeare, char model: whole-split val loss 1.977, against 1.899 with random offsets).

    ``order="shuffle"``: epoch e reads every window of every shard once, in an order drawn from
    (seed, e): the shards in a seeded permutation, and the windows of each shard in a seeded
    permutation of a grid shifted by a seeded offset in [0, seq_len) (`_window_plan`; the tokens
    before the offset and the tail shorter than a window are not read that epoch). A global batch
    is the next B windows of this stream: batches run on across shard and epoch boundaries, so no
    window is dropped or repeated. Only permutations of window indices are held in memory (~0.8 MB
    for a 100M-token shard at seq_len 1024); rows are read from the memory maps one by one. The
    draws are numpy `default_rng` streams: every process, and a resumed run, needs the same numpy.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int,
                 process_index: int = 0, process_count: int = 1, vocab_size: int | None = None,
                 order: str = "sequential", seed: int = 0):
        _check_batch(batch_size, seq_len, process_index, process_count)
        if order not in ORDERS:
            raise ValueError(f"data order {order!r} is not one of {ORDERS}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"the data order's seed must be an integer >= 0, got {seed!r}")
        self.data_dir, self.split = Path(data_dir), split
        self.batch_size, self.seq_len, self.vocab_size = batch_size, seq_len, vocab_size
        self.order, self.seed = order, seed
        self.rows = batch_size // process_count  # rows this process reads
        self.row0 = process_index * self.rows  # its first global row
        self.names, self.shards = open_split(data_dir, split, vocab_size)
        self.sizes = [len(s) for s in self.shards]
        self.num_tokens = sum(self.sizes)
        if order == "sequential" and max(self.sizes) < batch_size * seq_len + 1:
            raise ValueError(
                f"the {split} shards of {self.data_dir} are too small for one batch: "
                f"batch_size*seq_len+1 = {batch_size}*{seq_len}+1 = {batch_size * seq_len + 1} "
                f"tokens needed, the largest shard has {max(self.sizes)}; use a smaller "
                "batch_size or seq_len")
        fewest = sum(max(0, (n - seq_len) // seq_len) for n in self.sizes)  # at offset seq_len-1
        if order == "shuffle" and fewest < batch_size:
            raise ValueError(
                f"the {split} shards of {self.data_dir} are too small for one batch: an epoch may "
                f"hold only {fewest} windows of seq_len+1 = {seq_len + 1} tokens, batch_size="
                f"{batch_size} needed; use a smaller batch_size or seq_len")
        self.reset()

    def reset(self) -> None:
        """Back to the start: the first token of the first shard, or epoch 0's first window."""
        self.shard_index, self.position = 0, 0  # sequential
        self.epoch, self.shard_pos, self.index = None, None, None  # shuffle: (0, 0, 0) settled
        if self.order == "shuffle":
            self.epoch, self.shard_pos, self.index = self._settle(0, 0, 0)

    # --- shuffle: the stream of windows, and a cursor (epoch, shard_pos, index) into it

    def _plan(self, epoch: int, shard_pos: int) -> tuple[int, int, np.ndarray]:
        """(shard, offset, window order) of the shard at `shard_pos` of `epoch`'s shard order."""
        shard = int(_shard_order(self.seed, epoch, len(self.sizes))[shard_pos])
        return shard, *_window_plan(self.seed, epoch, shard, self.sizes[shard], self.seq_len)

    def _settle(self, epoch: int, shard_pos: int, index: int) -> tuple[int, int, int]:
        """The cursor `index` windows on from the start of (epoch, shard_pos): past the shards
        (and epochs) that `index` runs beyond. So it also skips n windows: `_settle(e, p, i + n)`."""
        while index >= (count := len(self._plan(epoch, shard_pos)[2])):
            index -= count
            shard_pos += 1
            if shard_pos == len(self.sizes):
                epoch, shard_pos = epoch + 1, 0
        return epoch, shard_pos, index

    def _next_shuffled(self) -> tuple[np.ndarray, np.ndarray]:
        where = np.empty((self.rows, 2), dtype=np.int64)  # [shard, start] of this process's rows
        cursor = self._settle(self.epoch, self.shard_pos, self.index + self.row0)
        for r in range(self.rows):
            shard, offset, order = self._plan(*cursor[:2])
            where[r] = shard, offset + int(order[cursor[2]]) * self.seq_len
            cursor = self._settle(cursor[0], cursor[1], cursor[2] + 1)
        self.epoch, self.shard_pos, self.index = self._settle(
            self.epoch, self.shard_pos, self.index + self.batch_size)
        return _read_windows(self.shards, self.names, where, self.seq_len, self.vocab_size,
                             self.data_dir)

    # --- state

    def state(self) -> dict[str, Any]:
        """Where the next batch starts (JSON-serialisable); `restore` resumes exactly there.

        Sequential: {split, shard_index, position, shards}, the format of checkpoints written
        before shuffling existed. Shuffle: {split, order, seed, seq_len, epoch, shard_pos, index,
        shards}, a position in windows, so it holds for any batch_size and process count.
        """
        shards = [[n, size] for n, size in zip(self.names, self.sizes, strict=True)]
        if self.order == "sequential":
            return {"split": self.split, "shard_index": self.shard_index,
                    "position": self.position, "shards": shards}
        return {"split": self.split, "order": self.order, "seed": self.seed,
                "seq_len": self.seq_len, "epoch": self.epoch, "shard_pos": self.shard_pos,
                "index": self.index, "shards": shards}

    def restore(self, state: dict[str, Any]) -> None:
        """Resume from `state()`; ValueError if it was saved for other data, order or seed."""
        mine, theirs = self.state()["shards"], [list(s) for s in state.get("shards", [])]
        if state.get("split") != self.split or theirs != mine:
            raise ValueError(f"loader state is for other data (split {state.get('split')!r}, "
                             f"shards {theirs}) than {self.data_dir} {self.split} "
                             f"({mine}); resume with the data the run started with")
        if _order_of(state) != _order_of(self.state()):
            raise ValueError(f"loader state is for data order {_order_of(state)}, but this "
                             f"loader reads {_order_of(self.state())}; resume with the data "
                             "order, seed and seq_len the run started with")
        if self.order == "sequential":
            index, position = int(state["shard_index"]), int(state["position"])
            if not (0 <= index < len(self.sizes) and 0 <= position <= self.sizes[index]):
                raise ValueError(f"loader state position ({index}, {position}) is outside the "
                                 "shards")
            self.shard_index, self.position = index, position
            return
        epoch, pos, index = int(state["epoch"]), int(state["shard_pos"]), int(state["index"])
        if not (epoch >= 0 and 0 <= pos < len(self.sizes)
                and 0 <= index <= len(self._plan(epoch, pos)[2])):
            raise ValueError(f"loader state position (epoch {epoch}, shard_pos {pos}, index "
                             f"{index}) is outside the shards")
        self.epoch, self.shard_pos, self.index = self._settle(epoch, pos, index)

    # --- batches

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y): int32, (batch_size // process_count, seq_len) each; y is x shifted by one."""
        if self.order == "shuffle":
            return self._next_shuffled()
        B, T = self.batch_size, self.seq_len
        for _ in range(len(self.shards) + 1):  # find a shard with room for a whole batch
            if self.position + B * T + 1 <= self.sizes[self.shard_index]:
                break
            self.shard_index, self.position = (self.shard_index + 1) % len(self.shards), 0
        start = self.position + self.row0 * T
        shard = self.shards[self.shard_index]
        buf = np.asarray(shard[start:start + self.rows * T + 1], dtype=np.int32)  # (rows*T + 1,)
        if self.vocab_size is not None and int(buf.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(buf.max())} >= vocab_size={self.vocab_size} in shard "
                             f"{self.data_dir / self.names[self.shard_index]}; the data doesn't "
                             "match the model")
        self.position += B * T
        x = buf[:-1].reshape(self.rows, T)  # (B/P, T)
        y = buf[1:].reshape(self.rows, T)  # (B/P, T)
        return x, y

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        return self.next_batch()


# ------------------------------------------------------------------------------ validation


def eval_windows(sizes: Sequence[int], seq_len: int, batch_size: int,
                 max_tokens: int | None = DEFAULT_EVAL_TOKENS) -> np.ndarray:
    """[[shard, start], ...] (N, 2) of the windows a validation pass scores; N = a whole number of
    batches of `batch_size` windows.

    The split's windows are those of the sequential layout: ``seq_len + 1`` tokens at stride
    seq_len from each shard's first token, shard after shard (W in all). When the split fits in
    `max_tokens` (None or 0: no limit), the pass scores its first ``W - W % batch_size`` windows:
    the last partial batch is dropped, as `evaluate.shard_batches` drops it, so on a one-shard split
    the two give the same batches. Otherwise it scores K = ``max_tokens // seq_len`` windows rounded
    down to whole batches (at least one batch), spread evenly over the split (window ``i*W // K``), not its first K:
    a sample of all of it, the same at every evaluation.
    """
    counts = [max(0, (n - 1) // seq_len) for n in sizes]  # windows that fit in each shard
    every = np.concatenate([np.stack([np.full(c, k), np.arange(c) * seq_len], axis=1)
                            for k, c in enumerate(counts)]).astype(np.int64)  # (W, 2)
    W = len(every)
    if W < batch_size:
        raise ValueError(f"validation needs one batch of batch_size={batch_size} windows of "
                         f"seq_len+1 = {seq_len + 1} tokens, but the split has {W}; use a smaller "
                         "batch_size or seq_len, or more validation data")
    afford = max(batch_size, max_tokens // seq_len) if max_tokens else W  # at least one batch
    if afford >= W:
        return every[:W - W % batch_size]
    K = afford - afford % batch_size
    return every[np.arange(K) * W // K]


class EvalWindows:
    """The batches of the in-loop validation loss: `eval_windows` of a split, sliced per process.

    Iterating gives the same (x, y) batches every time, int32 (batch_size // process_count,
    seq_len): process p reads rows [p*B/P, (p+1)*B/P) of each global batch. `num_batches` (also
    len()) and `num_tokens` (= num_batches * batch_size * seq_len, all processes) say what a
    pass scores; the mean of the per-batch mean losses is the mean over those tokens.
    """

    def __init__(self, data_dir: str | os.PathLike, seq_len: int, batch_size: int,
                 max_tokens: int | None = DEFAULT_EVAL_TOKENS, process_index: int = 0,
                 process_count: int = 1, vocab_size: int | None = None, split: str = "val"):
        _check_batch(batch_size, seq_len, process_index, process_count)
        self.data_dir, self.seq_len, self.batch_size = Path(data_dir), seq_len, batch_size
        self.vocab_size = vocab_size
        self.rows = batch_size // process_count
        self.row0 = process_index * self.rows
        self.names, self.shards = open_split(data_dir, split, vocab_size)
        self.windows = eval_windows([len(s) for s in self.shards], seq_len, batch_size,
                                    max_tokens)  # (N, 2) global
        self.num_batches = len(self.windows) // batch_size
        self.num_tokens = len(self.windows) * seq_len

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for b in range(self.num_batches):
            first = b * self.batch_size + self.row0
            yield _read_windows(self.shards, self.names, self.windows[first:first + self.rows],
                                self.seq_len, self.vocab_size, self.data_dir)


# ------------------------------------------------------------------------------ command line


def _summary(out_dir: str | os.PathLike, meta: dict[str, Any]) -> str:
    lines = [f"wrote {out_dir} ({meta['tokenizer']} tokenizer, vocab_size {meta['vocab_size']})"]
    for split in SPLITS:
        sizes = [n for name, n in meta["shards"].items() if name.startswith(f"{split}_")]
        lines.append(f"  {split}: {len(sizes)} shard(s), {sum(sizes):,} tokens")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2_jax.data",
                                     description="Tokenise text into uint16 token shards.")
    commands = parser.add_subparsers(dest="command", required=True)
    fw = commands.add_parser("fineweb-edu", help="stream FineWeb-Edu sample-10BT (GPT-2 BPE)")
    fw.add_argument("--out", required=True, help="output dataset directory")
    fw.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE, help="tokens per shard")
    fw.add_argument("--num_proc", type=int, default=None, help="tokeniser processes (CPUs / 2)")
    tx = commands.add_parser("text", help="local text files; the last val_fraction is validation")
    tx.add_argument("files", nargs="+", help="UTF-8 text files, one document each")
    tx.add_argument("--out", required=True, help="output dataset directory")
    tx.add_argument("--tokenizer", choices=["gpt2", "char"], default="gpt2")
    tx.add_argument("--val_fraction", type=float, default=0.1)
    tx.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE, help="tokens per shard")
    args = parser.parse_args(argv)
    try:
        if args.command == "fineweb-edu":
            meta = prepare_fineweb(args.out, args.shard_size, num_proc=args.num_proc)
        else:
            meta = prepare_text(args.files, args.out, args.tokenizer, args.val_fraction,
                                args.shard_size)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(_summary(args.out, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
