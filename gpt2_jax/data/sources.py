"""Documents from files (.txt, .jsonl, .json, .parquet) and from Hugging Face datasets, as the parts of a prep.

- ``.txt``: one document per file; ``.jsonl``/``.json``: one per record; ``.parquet``: one per row. Records are
  read with Hugging Face `datasets` (the ``data`` extra), streaming, so a file is never loaded whole.
- A Hub dataset by name is streamed; a local folder (one written by ``Dataset.save_to_disk``, or a folder of
  jsonl/parquet files) works as the name too.
- Validation is whole documents: a named split, or the last `val_fraction` of the documents (at least one).

Each part reads its documents again from any document on (`Part.texts(start)`), which is how a killed prep
resumes. A record whose field is not text is an error that names its file and line (or row).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from gpt2_jax.data.prepare import DEFAULT_SHARD_SIZE, Part, prepare_documents
from gpt2_jax.tokenizer import Tokenizer

FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
RECORD = {".jsonl": "line", ".json": "record", ".parquet": "row"}  # what an error calls a document's place
FORMAT_NAMES = {".jsonl": "JSON Lines", ".json": "JSON", ".parquet": "Parquet"}
READ_BATCH = 1000  # records per read from `datasets`
DATA_EXTRA = 'pip install "gpt2-jax[data]"'


def _datasets() -> Any:
    try:
        import datasets  # noqa: PLC0415 (an optional extra, and ~1 s to import)
    except ImportError as e:
        raise ImportError(f"reading jsonl, json, parquet and Hub datasets needs Hugging Face `datasets`: "
                          f"{DATA_EXTRA}") from e
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors come back as exceptions, said once
    return datasets


def expand_files(patterns: Sequence[str]) -> list[Path]:
    """Paths and globs -> the files, in the order given (a glob's matches sorted by name)."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(f"{pattern} matches no file")
        for name in matches:
            path = Path(name).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"input file not found: {path}")
            if path.suffix.lower() not in FORMATS:
                raise ValueError(f"{path}: unknown format {path.suffix or '(no extension)'!r}; "
                                 f"pass {', '.join(FORMATS)} files")
            files.append(path)
    return files


def _checked(texts: list[Any], field: str, first: int, where: Callable[[int], str]) -> list[str]:
    """`texts` if each is a str; else ValueError naming the record (`where(index)`)."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            what = "missing or null" if t is None else f"a {type(t).__name__}, not text"
            raise ValueError(f"{where(first + i)}: field {field!r} is {what}")
    return texts


def _records(ds: Any, field: str, what: str, where: Callable[[int], str], start: int) -> Iterator[str]:
    """The `field` of the records of a `datasets` dataset from record `start` on, checked to be text."""
    names = ds.column_names
    if names is None:  # a streamed .json file: the fields are known once read
        first = next(iter(ds.take(1)), None)
        names = [] if first is None else list(first)
    if names and field not in names:
        raise ValueError(f"{what} has no field {field!r}; its fields: {', '.join(names)} (pass --text_field)")
    if start:
        ds = ds.skip(start)
    i = start
    for batch in ds.select_columns([field]).iter(batch_size=READ_BATCH):
        texts = batch[field]
        yield from _checked(texts, field, i, where)
        i += len(texts)


def _file_texts(path: Path, field: str) -> Iterator[str]:
    """The documents of one file, in order."""
    if path.suffix.lower() == ".txt":
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text (byte offset {e.start}: {e.reason}); convert it "
                             "first (e.g. iconv -f latin1 -t utf-8 IN > OUT)") from None
        return
    if path.stat().st_size == 0:  # no records (`datasets` fails on an empty file)
        return
    kind = RECORD[path.suffix.lower()]
    try:
        ds = _datasets().load_dataset(FORMATS[path.suffix.lower()], data_files=[str(path)], split="train",
                                      streaming=True)
        yield from _records(ds, field, str(path), lambda i: f"{path} {kind} {i + 1}", 0)
    except ValueError as e:  # pyarrow's ArrowInvalid (a ValueError) names neither the file nor the format
        if str(e).startswith(str(path)):  # (ours: it does)
            raise
        raise ValueError(f"{path} is not a valid {FORMAT_NAMES[path.suffix.lower()]} file ({e})") from None


def _count(texts: Iterator[str], chars: set[str] | None) -> int:
    n = 0
    for n, text in enumerate(texts, 1):
        if chars is not None:
            chars.update(text)
    return n


def _stat(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _split_parts(texts: Callable[[int], Iterator[str]], n: int, val_fraction: float, what: str) -> list[Part]:
    """Train: the first documents; val: the last round(n * val_fraction), at least one; each split non-empty."""
    if n == 0:
        raise ValueError(f"no documents in {what}")
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise ValueError(f"{n} document(s) in {what} can't be split with val_fraction={val_fraction}: each "
                         "split needs at least one whole document; give more documents or pass a validation split")

    def part_texts(lo: int, hi: int) -> Callable[[int], Iterator[str]]:
        return lambda start: (t for _, t in zip(range(lo + start, hi), texts(lo + start)))
    return [Part("train", part_texts(0, n - n_val), n - n_val), Part("val", part_texts(n - n_val, n), n_val)]


def _check(tokenizer: str, val_fraction: float) -> None:
    """Before any pass over the data."""
    if tokenizer not in ("gpt2", "char"):
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected 'gpt2' or 'char'")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if tokenizer == "gpt2":
        Tokenizer.gpt2()  # tiktoken's BPE files: a missing cache offline fails here, not after a pass


def _tokenizer(name: str, chars: set[str] | None) -> Tokenizer:
    if name == "gpt2":
        return Tokenizer.gpt2()
    if name == "char":
        if not chars:
            raise ValueError("no text: a char tokenizer needs at least one character")
        return Tokenizer.char("".join(chars))
    raise ValueError(f"unknown tokenizer {name!r}; expected 'gpt2' or 'char'")


def prepare_files(patterns: Sequence[str | os.PathLike], out_dir: str | os.PathLike, text_field: str = "text",
                  tokenizer: str = "gpt2", val_fraction: float = 0.1, shard_size: int = DEFAULT_SHARD_SIZE,
                  num_proc: int | None = None, progress: bool = True) -> dict[str, Any]:
    """.txt/.jsonl/.json/.parquet files -> shards; the last `val_fraction` of the documents are validation.

    A first pass counts the documents (and, for "char", collects the vocabulary); a rerun of the same
    command after a kill resumes (`prepare_documents`)."""
    _check(tokenizer, val_fraction)
    files = expand_files([os.fspath(p) for p in patterns])

    def texts(start: int) -> Iterator[str]:
        for path in files:
            for text in _file_texts(path, text_field):  # (skipping by reading: cheap next to tokenising)
                if start:
                    start -= 1
                    continue
                yield text
    chars = set() if tokenizer == "char" else None
    n = _count(texts(0), chars)
    what = ", ".join(str(f) for f in files) if len(files) <= 3 else f"{len(files)} files"
    parts = _split_parts(texts, n, val_fraction, what)
    fingerprint = {"source": "files", "files": [_stat(f) for f in files], "text_field": text_field,
                   "val_fraction": val_fraction}
    return prepare_documents(parts, out_dir, _tokenizer(tokenizer, chars), fingerprint, shard_size, num_proc,
                             progress)


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _hf_split(name: str, subset: str | None, split: str) -> tuple[Any, int | None]:
    """(dataset, number of records or None) of one split of a Hub dataset or a local folder."""
    datasets, local = _datasets(), Path(name).expanduser()
    if local.is_dir() and _is_saved_dataset(local):
        saved = datasets.load_from_disk(str(local))
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise ValueError(f"{name} has no split {split!r}; its splits: {', '.join(saved)}")
            saved = saved[split]
        elif split != "train":
            raise ValueError(f"{name} is a single dataset (no splits); leave out --split, or pass --val_split")
        return saved, len(saved)
    try:
        ds = datasets.load_dataset(str(local) if local.is_dir() else name, subset, split=split, streaming=True)
    except ValueError as e:  # e.g. an unknown split: `datasets` names the ones there are
        raise ValueError(f"{name}: {e}") from None
    splits = getattr(ds.info, "splits", None) or {}
    n = splits[split].num_examples if split in splits and splits[split].num_examples else None
    return ds, n


def _hf_fingerprint(name: str) -> list[Any]:
    local = Path(name).expanduser()
    if not local.is_dir():
        return [name]
    return [_stat(p) for p in sorted(local.rglob("*")) if p.is_file()]


def prepare_hf(name: str, out_dir: str | os.PathLike, subset: str | None = None, split: str = "train",
               val_split: str | None = None, text_field: str = "text", tokenizer: str = "gpt2",
               val_fraction: float = 0.1, shard_size: int = DEFAULT_SHARD_SIZE, num_proc: int | None = None,
               progress: bool = True) -> dict[str, Any]:
    """A Hugging Face dataset (streamed from the Hub, or a local folder) -> shards.

    Validation: the `val_split` split, or else the last `val_fraction` of `split`'s documents (their number
    from the dataset's info, or a first pass over a local dataset)."""
    _check(tokenizer, val_fraction)
    train, n = _hf_split(name, subset, split)
    label = f"{name} split {split!r}"

    def split_texts(ds: Any, what: str) -> Callable[[int], Iterator[str]]:
        return lambda start: _records(ds, text_field, what, lambda i: f"{what} row {i + 1}", start)
    texts = split_texts(train, label)
    chars = set() if tokenizer == "char" else None
    if val_split is not None:
        val, n_val = _hf_split(name, subset, val_split)
        val_texts = split_texts(val, f"{name} split {val_split!r}")
        if chars is not None:
            n, n_val = _count(texts(0), chars), _count(val_texts(0), chars)
        for what, some, count in ((label, texts, n), (f"{name} split {val_split!r}", val_texts, n_val)):
            if count == 0 or (count is None and next(some(0), None) is None):
                raise ValueError(f"no documents in {what}")
        parts = [Part("train", texts, n), Part("val", val_texts, n_val)]
    else:
        if n is None or chars is not None:
            if n is None and not Path(name).expanduser().is_dir():
                raise ValueError(f"{label} does not say how many documents it has, so the last val_fraction "
                                 "can't be found while streaming; pass --val_split (e.g. validation)")
            n = _count(texts(0), chars)
        parts = _split_parts(texts, n, val_fraction, label)
    fingerprint = {"source": "hf", "name": _hf_fingerprint(name), "subset": subset, "split": split,
                   "val_split": val_split, "text_field": text_field,
                   "val_fraction": None if val_split else val_fraction}
    return prepare_documents(parts, out_dir, _tokenizer(tokenizer, chars), fingerprint, shard_size, num_proc,
                             progress)

