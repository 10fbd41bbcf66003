"""Batches from the shards of a split: `TokenLoader` for training, `EvalWindows` for validation.

`TokenLoader` reads batches of one split, each process only its rows, in one of two orders:
"sequential" as llm.c's loader (each batch the next ``batch_size * seq_len + 1`` contiguous
tokens; `SequentialCursor`) or "shuffle" (windows of ``seq_len + 1`` tokens in a seeded order per
epoch; `ShuffledCursor`). `EvalWindows` gives the validation batches: the same windows, spread
over the split, at every call.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpt2_jax.data.remote import LazyShard
from gpt2_jax.data.shards import open_split, read_windows

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


# ------------------------------------------------------------------------------ the two orders
# A cursor walks the split's windows in one order; both have the same methods (shortfall, reset,
# next_rows, state, restore), and TokenLoader delegates to the one its `order` names.


class SequentialCursor:
    """``order="sequential"`` (llm.c, build-nanogpt): a batch takes the ``batch_size * seq_len + 1``
    tokens of the current shard from `position`: global row r is ``tokens[position + r*seq_len :
    position + (r+1)*seq_len + 1]``. When a shard has too few tokens left for a whole batch, the
    loader moves to the next shard (skipping any too small for one batch), and after the last one
    back to the first. Consecutive batches are neighbouring text, which learns slower on small data
    (Tiny Shakespeare, char model: whole-split val loss 1.977, against 1.899 with random offsets).
    """

    order = "sequential"
    epoch = None  # no epochs: the batches wrap around shard by shard

    def __init__(self, sizes: Sequence[int], batch_size: int, seq_len: int, seed: int):
        del seed  # nothing is drawn
        self.sizes, self.batch_size, self.seq_len = list(sizes), batch_size, seq_len

    def shortfall(self) -> str | None:
        """Why no batch fits in the shards, or None."""
        B, T = self.batch_size, self.seq_len
        if max(self.sizes) < B * T + 1:
            return (f"batch_size*seq_len+1 = {B}*{T}+1 = {B * T + 1} tokens needed, the largest "
                    f"shard has {max(self.sizes)}")
        return None

    def reset(self) -> None:
        self.shard_index, self.position = 0, 0

    def next_rows(self, row0: int, rows: int) -> np.ndarray:
        """[[shard, start], ...] (rows, 2) of global rows [row0, row0 + rows) of the next batch."""
        B, T = self.batch_size, self.seq_len
        for _ in range(len(self.sizes) + 1):  # find a shard with room for a whole batch
            if self.position + B * T + 1 <= self.sizes[self.shard_index]:
                break
            self.shard_index, self.position = (self.shard_index + 1) % len(self.sizes), 0
        starts = self.position + (row0 + np.arange(rows, dtype=np.int64)) * T  # (rows,)
        self.position += B * T
        return np.stack([np.full(rows, self.shard_index, dtype=np.int64), starts], axis=1)

    def next_shard(self) -> int:
        """The shard after the current one (a remote dataset fetches it ahead)."""
        return (self.shard_index + 1) % len(self.sizes)

    def state(self) -> dict[str, Any]:
        return {"shard_index": self.shard_index, "position": self.position}

    def restore(self, state: dict[str, Any]) -> None:
        index, position = int(state["shard_index"]), int(state["position"])
        if not (0 <= index < len(self.sizes) and 0 <= position <= self.sizes[index]):
            raise ValueError(f"loader state position ({index}, {position}) is outside the "
                             "shards")
        self.shard_index, self.position = index, position


class ShuffledCursor:
    """``order="shuffle"``: epoch e reads every window of every shard once, in an order drawn from
    (seed, e): the shards in a seeded permutation, and the windows of each shard in a seeded
    permutation of a grid shifted by a seeded offset in [0, seq_len) (`_window_plan`; the tokens
    before the offset and the tail shorter than a window are not read that epoch). A global batch
    is the next B windows of this stream: batches run on across shard and epoch boundaries, so no
    window is dropped or repeated. Only permutations of window indices are held in memory (~0.8 MB
    for a 100M-token shard at seq_len 1024); rows are read from the memory maps one by one. The
    draws are numpy `default_rng` streams: every process, and a resumed run, needs the same numpy.

    The position in the stream is a cursor (epoch, shard_pos, index): window `index` of the shard
    at `shard_pos` of `epoch`'s shard order.
    """

    order = "shuffle"

    def __init__(self, sizes: Sequence[int], batch_size: int, seq_len: int, seed: int):
        self.sizes, self.batch_size, self.seq_len = list(sizes), batch_size, seq_len
        self.seed = seed

    def shortfall(self) -> str | None:
        """Why an epoch may hold too few windows for one batch, or None."""
        T = self.seq_len
        fewest = sum(max(0, (n - T) // T) for n in self.sizes)  # at offset seq_len-1
        if fewest < self.batch_size:
            return (f"an epoch may hold only {fewest} windows of seq_len+1 = {T + 1} tokens, "
                    f"batch_size={self.batch_size} needed")
        return None

    def reset(self) -> None:
        self.epoch, self.shard_pos, self.index = self._settle(0, 0, 0)

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

    def next_rows(self, row0: int, rows: int) -> np.ndarray:
        """[[shard, start], ...] (rows, 2) of global rows [row0, row0 + rows) of the next batch."""
        where = np.empty((rows, 2), dtype=np.int64)
        cursor = self._settle(self.epoch, self.shard_pos, self.index + row0)
        for r in range(rows):
            shard, offset, order = self._plan(*cursor[:2])
            where[r] = shard, offset + int(order[cursor[2]]) * self.seq_len
            cursor = self._settle(cursor[0], cursor[1], cursor[2] + 1)
        self.epoch, self.shard_pos, self.index = self._settle(
            self.epoch, self.shard_pos, self.index + self.batch_size)
        return where

    def next_shard(self) -> int:
        """The shard after the current one in this epoch's order, or the next epoch's first."""
        n = len(self.sizes)
        epoch, pos = (self.epoch, self.shard_pos + 1) if self.shard_pos + 1 < n else (self.epoch + 1, 0)
        return int(_shard_order(self.seed, epoch, n)[pos])

    def state(self) -> dict[str, Any]:
        return {"order": self.order, "seed": self.seed, "seq_len": self.seq_len,
                "epoch": self.epoch, "shard_pos": self.shard_pos, "index": self.index}

    def restore(self, state: dict[str, Any]) -> None:
        epoch, pos, index = int(state["epoch"]), int(state["shard_pos"]), int(state["index"])
        if not (epoch >= 0 and 0 <= pos < len(self.sizes)
                and 0 <= index <= len(self._plan(epoch, pos)[2])):
            raise ValueError(f"loader state position (epoch {epoch}, shard_pos {pos}, index "
                             f"{index}) is outside the shards")
        self.epoch, self.shard_pos, self.index = self._settle(epoch, pos, index)


CURSORS = {cursor.order: cursor for cursor in (ShuffledCursor, SequentialCursor)}
ORDERS = tuple(CURSORS)  # ("shuffle", "sequential")


# ------------------------------------------------------------------------------ training batches


class TokenLoader:
    """(x, y) batches from the shards of one split, sliced per process, in one of two orders.

    Every row is a window of ``seq_len + 1`` tokens: x its first seq_len, y its last (x shifted by
    one); windows lie at a stride of seq_len, so a window's target token is the next one's first
    input. `batch_size` is GLOBAL: process p of P reads only the rows ``[p*B/P, (p+1)*B/P)`` of each
    global batch, straight from the memory maps, so `state()` is the same in every process and a
    run can resume on a different number of processes.

    The order is a cursor over the split's windows, `CURSORS[order]`: ``"sequential"``
    (`SequentialCursor`) or ``"shuffle"`` (`ShuffledCursor`); their docstrings describe them.
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
        self.cursor = CURSORS[order](self.sizes, batch_size, seq_len, seed)
        if (shortfall := self.cursor.shortfall()) is not None:
            raise ValueError(f"the {split} shards of {self.data_dir} are too small for one batch: "
                             f"{shortfall}; use a smaller batch_size or seq_len")
        self.reset()

    @property
    def epoch(self) -> int | None:
        """The shuffle order's epoch of the next batch; None in the sequential order."""
        return self.cursor.epoch

    def reset(self) -> None:
        """Back to the start: the first token of the first shard, or epoch 0's first window."""
        self.cursor.reset()

    # --- state

    def state(self) -> dict[str, Any]:
        """Where the next batch starts (JSON-serialisable); `restore` resumes exactly there.

        Sequential: {split, shard_index, position, shards}, the format of checkpoints written
        before shuffling existed. Shuffle: {split, order, seed, seq_len, epoch, shard_pos, index,
        shards}, a position in windows, so it holds for any batch_size and process count.
        """
        shards = [[n, size] for n, size in zip(self.names, self.sizes, strict=True)]
        return {"split": self.split, **self.cursor.state(), "shards": shards}

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
        self.cursor.restore(state)

    # --- batches

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y): int32, (batch_size // process_count, seq_len) each; y is x shifted by one."""
        where = self.cursor.next_rows(self.row0, self.rows)  # (B/P, 2)
        batch = read_windows(self.shards, self.names, where, self.seq_len, self.vocab_size,
                             self.data_dir)
        if isinstance(upcoming := self.shards[self.cursor.next_shard()], LazyShard):
            upcoming.prefetch()  # a remote dataset: the next shard comes while this one is read
        return batch

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
            yield read_windows(self.shards, self.names, self.windows[first:first + self.rows],
                               self.seq_len, self.vocab_size, self.data_dir)
