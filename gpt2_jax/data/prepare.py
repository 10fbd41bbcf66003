"""Text -> tokens -> the uint16 ``.npy`` shards of a dataset folder (format: `gpt2_jax.data.shards`).

Each file is written atomically (temp file in the same folder, fsync, ``os.replace``; in a bucket, gs://...,
a whole upload) and meta.json comes last, so a killed prep never leaves a folder that looks complete: readers trust
meta.json only.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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
    _clear(out)  # (a resumable prep's state too: it no longer describes the folder)
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
    return Tokenizer.gpt2()  # loaded once per process


# ----------------------------------------------------------------------------- the resumable prep
# Documents are tokenised in batches by a thread per core (tiktoken straight into numpy arrays, one uint16 array
# per batch; build-nanogpt pickles each document to a process and an array back), and packed into shards in
# their order. After each shard, STATE_FILE records where the next one starts (part, document, token), so
# rerunning the same command after a kill continues from there and writes the bytes an uninterrupted prep would.

STATE_FILE = ".prep_state.json"
BATCH_DOCS, BATCH_CHARS = 1024, 2**20  # a batch for one thread: at most this many documents or characters


@dataclasses.dataclass
class Part:
    """A run of documents that goes to one split: `texts(start)` yields them from document `start` on.
    `first_val`: the first shard is ``val_000000.npy`` and the rest train (FineWeb-Edu's layout)."""
    split: str
    texts: Callable[[int], Iterator[str]]
    num_docs: int | None = None  # for the progress bar's estimate, when known
    first_val: bool = False


def _encode_batch(texts: list[str], tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, lengths): <|endoftext|> (GPT-2) + the tokens of each text, all in one uint16 array."""
    if tok.name == "gpt2" and hasattr(tok._enc, "encode_to_numpy"):
        # tiktoken straight into arrays (no Python int per token); with no special token allowed or
        # disallowed this is encode_ordinary: a literal "<|endoftext|>" in a text is plain text
        ids = [tok._enc.encode_to_numpy(t, allowed_special=set(), disallowed_special=()) for t in texts]
    else:
        ids = [np.asarray(tok.encode(t), dtype=np.int64) for t in texts]
    eot = np.array([] if tok.eot_token is None else [tok.eot_token], dtype=np.int64)
    lengths = np.array([len(eot) + len(x) for x in ids], dtype=np.int64)
    pieces = [np.zeros(0, np.int64)]
    for x in ids:
        pieces += (eot, x)
    tokens = np.concatenate(pieces)
    return _checked_tokens(tokens, tok).astype(np.uint16), lengths


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) == BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tokenised(texts: Iterator[str], tokenizer: Tokenizer, pool: ThreadPoolExecutor | None,
               num_proc: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The batches of `texts`, tokenised in `pool` (None: here), in order; at most 2 per thread in flight, so
    a fast reader doesn't pile the whole dataset up in memory (as Pool.imap's unbounded read-ahead would)."""
    if pool is None:
        yield from (_encode_batch(b, tokenizer) for b in _batches(texts))
        return
    pending: collections.deque = collections.deque()
    for batch in _batches(texts):
        pending.append(pool.submit(_encode_batch, batch, tokenizer))
        if len(pending) >= 2 * num_proc:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def default_num_proc() -> int:
    """The CPUs this process may use: a tokeniser thread each (the main thread only reads and copies)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _read_state(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _clear(out: Path) -> None:
    """Remove a dataset's files from `out`: meta.json first, so it never vouches for a half-made folder."""
    (out / META_FILE).unlink(missing_ok=True)
    for path in out.iterdir() if out.exists() else ():  # (a bucket has no empty folders)
        if (SHARD_NAME.fullmatch(path.name) or path.name == STATE_FILE
                or (path.name.startswith(".") and path.suffix == ".tmp")):
            path.unlink()


class _Packer:
    """Packs one part's token batches into shards of `shard_size`: saves each full shard, then the state that
    says where the next one starts (part, document, token), so a rerun resumes there."""

    def __init__(self, out: Path, fingerprint: dict[str, Any], shards: dict[str, int], p: int, part: Part,
                 buf: np.ndarray):
        self.out, self.fingerprint, self.shards, self.p, self.part, self.buf = out, fingerprint, shards, p, part, buf
        self.fill = 0
        self.count = len(shards) if part.first_val else sum(1 for n in shards if n.startswith(f"{part.split}_"))

    def add(self, tokens: np.ndarray, lengths: np.ndarray, first_doc: int, offset: int) -> None:
        """A batch whose first document is number `first_doc` of the part, from its token `offset` on (the
        tokens before it are in earlier shards)."""
        ends = np.cumsum(lengths)  # where each document of the batch ends, counting the skipped tokens
        i, size = offset, len(self.buf)  # i: the batch's next token to write
        while i < len(tokens):
            take = min(size - self.fill, len(tokens) - i)
            self.buf[self.fill:self.fill + take] = tokens[i:i + take]
            self.fill, i = self.fill + take, i + take
            if self.fill == size:
                k = int(np.searchsorted(ends, i, side="right"))  # documents wholly written
                self._save(self.buf, next_at=[self.p, first_doc + k, i - (int(ends[k - 1]) if k else 0)])

    def finish(self) -> None:
        """The part's last, shorter shard (a rerun after a kill here writes it again from the last state)."""
        if self.fill:
            self._save(self.buf[:self.fill], next_at=None)

    def _save(self, tokens: np.ndarray, next_at: list[int] | None) -> None:
        name = _shard_name(self.part, self.count)
        _save_shard(self.out, name, tokens)
        self.shards[name] = len(tokens)
        self.count, self.fill = self.count + 1, 0
        if next_at is not None:
            _save_state(self.out, self.fingerprint, self.shards, next_at)


def _resume_point(out: Path, fingerprint: dict[str, Any],
                  log: Callable[[str], None]) -> tuple[dict[str, int], list[int], bool]:
    """(shards written, [part, document, token] to go on from, whether the dataset is complete) of the prep
    of `fingerprint` in `out`; anything else there is cleared, saying so if it was another prep's."""
    state = _read_state(out)
    if state is not None and state.get("fingerprint") == fingerprint:
        if (out / META_FILE).exists() and state.get("complete"):
            log(f"{out} is already complete for these inputs; nothing to do")
            return state["shards"], state["next"], True
        log(f"resuming in {out} after {len(state['shards'])} complete shard(s)")
        (out / META_FILE).unlink(missing_ok=True)
        return dict(state["shards"]), state["next"], False
    if state is not None:
        what = "a dataset" if state.get("complete") else "an unfinished prep"
        log(f"{out} holds {what} of other inputs, another tokenizer or shard size: starting over")
    _clear(out)
    return {}, [0, 0, 0], False


def prepare_documents(parts: Sequence[Part], out_dir: str | os.PathLike, tokenizer: Tokenizer,
                      fingerprint: dict[str, Any], shard_size: int = DEFAULT_SHARD_SIZE,
                      num_proc: int | None = None, progress: bool = True,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tokenise the documents of `parts`, in order, into shards of `shard_size` tokens; return the meta.

    Each document is <|endoftext|> + its tokens (GPT-2; char: its tokens) and documents run on across the
    shards of a part. The last shard of a part may be shorter. Resumable: when `out_dir` holds the state of
    an unfinished prep with the same `fingerprint` (inputs, tokenizer, shard size, ...), it continues after
    the last complete shard; with another fingerprint it starts over, and says so.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    out = storage.run_path(out_dir) if storage.is_remote(out_dir) else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = {**fingerprint, "tokenizer": tokenizer.to_meta(), "shard_size": shard_size}
    shards, (part_i, doc_i, skip), complete = _resume_point(out, fingerprint, log)
    if complete:
        return json.loads((out / META_FILE).read_text())
    num_proc = num_proc or default_num_proc()
    buf = np.empty(shard_size, dtype=np.uint16)
    # Threads, not processes: tiktoken releases the GIL while it encodes, so the texts and tokens need no
    # pickling between processes, and there is no start-up per worker. (A char tokenizer runs in Python
    # under the GIL, on one core at a time; char datasets are small.)
    pool = ThreadPoolExecutor(num_proc, thread_name_prefix="tokenise") if num_proc > 1 else None
    bar = tqdm(unit="tok", unit_scale=True, desc=f"tokenising into {out}", disable=not progress, smoothing=0.1)
    known = all(part.num_docs is not None for part in parts[part_i:])
    docs_left = sum(part.num_docs for part in parts[part_i:]) - doc_i if known else None
    docs_seen = 0  # by this run, for the estimate of the tokens to come
    try:
        for p in range(part_i, len(parts)):
            start, offset = (doc_i, skip) if p == part_i else (0, 0)
            packer = _Packer(out, fingerprint, shards, p, parts[p], buf)
            for tokens, lengths in _tokenised(parts[p].texts(start), tokenizer, pool, num_proc):
                packer.add(tokens, lengths, start, offset)
                start, offset, docs_seen = start + len(lengths), 0, docs_seen + len(lengths)
                bar.update(int(lengths.sum()))
                if docs_left is not None:  # the tokens to come at this run's tokens per document: the ETA
                    docs_left -= len(lengths)
                    bar.total = bar.n + round(bar.n / docs_seen * max(0, docs_left))
            packer.finish()
            if p + 1 < len(parts):
                _save_state(out, fingerprint, shards, [p + 1, 0, 0])
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if not shards:
        raise ValueError("no documents: the inputs hold no text to tokenise")
    meta = _finish_output(out, tokenizer, shards)
    _save_state(out, fingerprint, shards, [len(parts), 0, 0], complete=True)
    return meta


def _shard_name(part: Part, count: int) -> str:
    """The name of the part's shard number `count` (from 0)."""
    if part.first_val:  # (a part of its own)
        return "val_000000.npy" if count == 0 else f"train_{count - 1:06d}.npy"
    return f"{part.split}_{count:06d}.npy"


def _save_state(out: Path, fingerprint: dict[str, Any], shards: dict[str, int], nxt: list[int],
                complete: bool = False) -> None:
    state = {"fingerprint": fingerprint, "shards": shards, "next": nxt, "complete": complete}
    _atomic_write(out / STATE_FILE, lambda f: f.write(json.dumps(state).encode()))


def prepare_fineweb(out_dir: str | os.PathLike, shard_size: int = DEFAULT_SHARD_SIZE,
                    docs: Iterable[dict[str, Any]] | None = None, num_proc: int | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Tokenise FineWeb-Edu sample-10BT (or `docs`: dicts with a "text" field) into GPT-2 shards.

    Streams the dataset with Hugging Face `datasets`, tokenises in `num_proc` threads (default: all the
    CPUs; 1 = in this thread) and prepends <|endoftext|> to every document, as GPT-2 did. The first shard is
    validation. Rerun after a kill, it resumes (`prepare_documents`).
    """
    num_docs = None
    if docs is None:
        try:
            import datasets  # noqa: PLC0415 (an optional extra)
        except ImportError as e:
            raise ImportError('downloading FineWeb-Edu needs Hugging Face `datasets`: '
                              'pip install "gpt2-jax[data]"') from e
        docs = datasets.load_dataset("HuggingFaceFW/fineweb-edu", name="sample-10BT",
                                     split="train", streaming=True)
        splits = getattr(docs.info, "splits", None) or {}
        num_docs = splits["train"].num_examples if "train" in splits else None
        fingerprint = {"source": "fineweb-edu", "name": "sample-10BT"}
    else:
        docs = list(docs) if not hasattr(docs, "skip") else docs  # resumable: read again from any document
        fingerprint = {"source": "fineweb-edu", "docs": _digest(d["text"] for d in docs)}
    tokenizer = _gpt2_tokenizer()  # fail here, not in a worker, if the BPE can't be loaded

    def texts(start: int) -> Iterator[str]:
        rest = docs.skip(start) if hasattr(docs, "skip") else itertools.islice(docs, start, None)
        return (doc["text"] for doc in rest)
    part = Part("train", texts, num_docs=num_docs, first_val=True)
    return prepare_documents([part], out_dir, tokenizer, fingerprint, shard_size, num_proc, progress,
                             log=lambda m: print(m, file=sys.stderr))


def _digest(texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


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
    from pydoc_data.topics import topics  # noqa: PLC0415 (400 kB of text, for the default run only)

    return "\n\n".join(topics[key] for key in sorted(topics))
