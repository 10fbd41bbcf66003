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
meta.json only. `TokenLoader` reads one split in a fixed order, as llm.c's loader does: each batch
is the next ``batch_size * seq_len + 1`` contiguous tokens, and each process reads only its rows.
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


class TokenLoader:
    """(x, y) batches from the shards of one split, in a fixed order, sliced per process.

    A batch takes the ``batch_size * seq_len + 1`` tokens of the current shard from `position`;
    global row r is ``tokens[position + r*seq_len : position + (r+1)*seq_len + 1]``, x its first
    seq_len tokens and y its last (x shifted by one). Process p of P reads only the rows
    ``[p*B/P, (p+1)*B/P)`` from the memory map. When a shard has too few tokens left for a whole
    batch, the loader moves to the next shard (skipping any too small for one batch), and after the
    last one back to the first. `batch_size` is GLOBAL, so `state()` is the same in every process
    and a run can resume on a different number of processes.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int,
                 process_index: int = 0, process_count: int = 1, vocab_size: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive: {batch_size}, {seq_len}")
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} is not divisible by process_count="
                             f"{process_count}; use a multiple of {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
        self.data_dir, self.split = Path(data_dir), split
        self.batch_size, self.seq_len, self.vocab_size = batch_size, seq_len, vocab_size
        self.rows = batch_size // process_count  # rows this process reads
        self.row0 = process_index * self.rows  # its first global row
        meta = read_meta(data_dir) if vocab_size is None else check_vocab(data_dir, vocab_size)
        self.names = sorted(n for n in meta["shards"] if n.startswith(f"{split}_"))
        if not self.names:
            raise FileNotFoundError(f"{self.data_dir} has no {split} shards ({split}_*.npy in "
                                    f"meta.json); {HOW_TO_PREPARE}")
        self.shards = [self._open(name, meta["shards"][name]) for name in self.names]
        self.sizes = [len(s) for s in self.shards]
        self.num_tokens = sum(self.sizes)
        need = batch_size * seq_len + 1
        if max(self.sizes) < need:
            raise ValueError(
                f"the {split} shards of {self.data_dir} are too small for one batch: "
                f"batch_size*seq_len+1 = {batch_size}*{seq_len}+1 = {need} tokens needed, the "
                f"largest shard has {max(self.sizes)}; use a smaller batch_size or seq_len")
        self.reset()

    def _open(self, name: str, expected: int) -> np.ndarray:
        path = self.data_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} is listed in meta.json but missing; "
                                    f"{HOW_TO_PREPARE}")
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

    def reset(self) -> None:
        """Back to the first token of the first shard."""
        self.shard_index, self.position = 0, 0

    def state(self) -> dict[str, Any]:
        """Where the next batch starts (JSON-serialisable); `restore` resumes exactly there."""
        return {"split": self.split, "shard_index": self.shard_index, "position": self.position,
                "shards": [[n, size] for n, size in zip(self.names, self.sizes, strict=True)]}

    def restore(self, state: dict[str, Any]) -> None:
        mine, theirs = self.state()["shards"], [list(s) for s in state.get("shards", [])]
        if state.get("split") != self.split or theirs != mine:
            raise ValueError(f"loader state is for other data (split {state.get('split')!r}, "
                             f"shards {theirs}) than {self.data_dir} {self.split} "
                             f"({mine}); resume with the data the run started with")
        index, position = int(state["shard_index"]), int(state["position"])
        if not (0 <= index < len(self.sizes) and 0 <= position <= self.sizes[index]):
            raise ValueError(f"loader state position ({index}, {position}) is outside the shards")
        self.shard_index, self.position = index, position

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y): int32, (batch_size // process_count, seq_len) each; y is x shifted by one."""
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
