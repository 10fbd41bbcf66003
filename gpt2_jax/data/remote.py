"""Token shards in a bucket (`--data=gs://bucket/shards`): fetched whole into a local cache, then memory-mapped.

The loaders read windows from memory maps, so a remote dataset gets a local folder of this machine
(`storage.local_folder_for`, keyed by the URL and its meta.json: a rewritten dataset gets a new folder) that
holds a copy of meta.json, `source.json` (the URL), and the shards fetched so far. `open_split` sees
source.json and opens each shard as a `LazyShard`: fetched the first time a window of it is read, checked
against meta.json (a damaged or partial copy is fetched again), and kept for the next start. The loader
prefetches the shard its order reads next in a background thread, so the loop does not wait on the network.
The cache holds at most `max_bytes` of shards: the least recently used ones are deleted first (a shard in use
stays readable: its memory map keeps the data). Each host of a pod keeps its own cache and fetches only the
shards its windows are in.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from gpt2_jax import storage
from gpt2_jax.recipes import DATA_CACHE_GB
from gpt2_jax.tokenizer import META_FILE, read_meta

SOURCE_FILE = "source.json"  # in a cache folder: {"url": the dataset in the bucket}
_caches: dict[Path, ShardCache] = {}  # (one per folder and process: the loaders of a run share it)
_lock = threading.Lock()


def is_cache(folder: str | os.PathLike) -> bool:
    """Whether `folder` is the local cache of a remote dataset (it has source.json)."""
    return (Path(folder) / SOURCE_FILE).is_file()


def open_remote(url: str, max_gb: float = DATA_CACHE_GB) -> Path:
    """The local cache folder of the dataset at `url`, with its meta.json (read from the bucket now: a
    missing or unfinished dataset fails here, before anything compiles); its shards come on first use."""
    remote = storage.run_path(url)
    meta_file = remote / META_FILE
    try:
        text = meta_file.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"--data={url}: {meta_file} is missing, so it holds no finished dataset (meta.json "
                                "is written last); write one with python -m gpt2_jax.data ... --out " + url) from None
    key = hashlib.sha256(text.encode()).hexdigest()[:12]  # a rewritten dataset is a new folder
    folder = storage.local_folder_for(url, "data") / key
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in ((META_FILE, text), (SOURCE_FILE, json.dumps({"url": str(remote)}))):
        if not (folder / name).is_file():
            tmp = folder / f".{name}.{os.getpid()}"
            tmp.write_text(content)
            os.replace(tmp, folder / name)
    read_meta(folder)  # its shape, checked once here
    cache = ShardCache.of(folder)
    cache.max_bytes = int(max_gb * 2**30)
    return folder


class ShardCache:
    """The fetched shards of one remote dataset in its local folder (see the module docstring)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.url = storage.run_path(json.loads((folder / SOURCE_FILE).read_text())["url"])
        self.sizes = read_meta(folder)["shards"]  # {name: tokens}
        self.max_bytes = int(DATA_CACHE_GB * 2**30)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch")
        self._pending: dict[str, concurrent.futures.Future] = {}
        self._guard = threading.Lock()

    @classmethod
    def of(cls, folder: str | os.PathLike) -> ShardCache:
        folder = Path(folder).resolve()
        with _lock:
            if folder not in _caches:
                _caches[folder] = cls(folder)
            return _caches[folder]

    def open(self, name: str) -> np.ndarray:
        """Shard `name` as a read-only memory map, fetched first unless a good copy is here."""
        with self._guard:
            future = self._pending.pop(name, None)
        if future is not None:
            future.result()  # a prefetch of it, finished (or failed: fetch again below)
        for attempt in range(3):
            path = self.folder / name
            tokens = self._check(path) if path.is_file() else None
            if tokens is not None:
                os.utime(path)  # recently used: evicted last
                return tokens
            if attempt < 2:
                self._fetch(name)
        raise ValueError(f"shard {self.url / name} does not match meta.json ({self.sizes[name]:,} uint16 tokens) "
                         f"after fetching it twice; recreate the dataset: python -m gpt2_jax.data ... --out {self.url}")

    def prefetch(self, name: str) -> None:
        """Start fetching shard `name` in the background, unless it is here or on its way."""
        with self._guard:
            if name in self._pending or (self.folder / name).is_file():
                return
            self._pending[name] = self._pool.submit(self._fetch, name)

    def _check(self, path: Path) -> np.ndarray | None:
        """The shard at `path` as a memory map if it is what meta.json says, else None (deleted)."""
        try:
            tokens = np.load(path, mmap_mode="r")
            if tokens.ndim == 1 and tokens.dtype == np.uint16 and len(tokens) == self.sizes[path.name]:
                return tokens
        except (ValueError, OSError, EOFError):
            pass
        path.unlink(missing_ok=True)
        return None

    def _fetch(self, name: str) -> None:
        """Copy shard `name` from the bucket (to a temporary name, then renamed: a kill leaves no partial
        shard), then delete the least recently used shards beyond max_bytes."""
        tmp = self.folder / f".{name}.{os.getpid()}.{threading.get_ident()}"
        try:
            with (self.url / name).open("rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 * 2**20)
            os.replace(tmp, self.folder / name)
        except FileNotFoundError:
            raise FileNotFoundError(f"shard {self.url / name} is listed in meta.json but missing from the bucket; "
                                    f"recreate the dataset: python -m gpt2_jax.data ... --out {self.url}") from None
        finally:
            tmp.unlink(missing_ok=True)
        self._evict(keep=name)

    def _evict(self, keep: str) -> None:
        shards = sorted(self.folder.glob("*.npy"), key=lambda p: p.stat().st_mtime)  # oldest use first
        total = sum(p.stat().st_size for p in shards)
        for path in shards:
            if total <= self.max_bytes:
                break
            if path.name != keep:
                total -= path.stat().st_size
                path.unlink(missing_ok=True)  # (a memory map of it stays readable)


class LazyShard:
    """A shard of a remote dataset as the loaders index it (len, slices): fetched on the first read. Its memory
    map holds a file descriptor, so at most OPEN_SHARDS of them stay mapped (the least recently read are let go,
    and opened again from the cache, or fetched again, when next read): a long run over thousands of shards
    neither passes the open-file limit nor keeps evicted shards' disk space."""

    OPEN_SHARDS = 64
    _mapped: OrderedDict[LazyShard, None] = OrderedDict()  # the shards holding a map, least recently read first

    def __init__(self, cache: ShardCache, name: str):
        self.cache, self.name, self._tokens = cache, name, None

    def __len__(self) -> int:
        return self.cache.sizes[self.name]

    def __getitem__(self, index) -> np.ndarray:
        mapped = LazyShard._mapped
        if self._tokens is None:
            while len(mapped) >= self.OPEN_SHARDS:
                mapped.popitem(last=False)[0]._tokens = None
            self._tokens = self.cache.open(self.name)
        mapped[self] = None
        mapped.move_to_end(self)
        return self._tokens[index]

    def prefetch(self) -> None:
        if self._tokens is None:
            self.cache.prefetch(self.name)
