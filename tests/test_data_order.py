"""Data order (TokenLoader order="shuffle" | "sequential") and the validation windows (EvalWindows).

Synthetic shards: shard k holds 1000*k + arange(n), so the first token of a row names the window it
came from: (shard, start) = divmod(x[r, 0], 1000).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from gpt2_jax import data, evaluate
from gpt2_jax.data import EvalWindows, TokenLoader

T = 8  # seq_len
TRAIN_SIZES = [203, 157, 96]  # 25, 19, 11 windows at offset 0; 24, 18, 11 at offset 7
VAL_SIZE = 131  # 16 windows of 9 tokens at stride 8


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    shards = {f"train_{k:06d}.npy": 1000 * k + np.arange(n) for k, n in enumerate(TRAIN_SIZES)}
    shards["val_000000.npy"] = 5000 + np.arange(VAL_SIZE)
    for name, tokens in shards.items():
        np.save(tmp_path / name, tokens.astype(np.uint16))
    meta = {"tokenizer": "char", "vocab_size": 6000, "eot_token": None, "chars": None,
            "shards": {name: len(tokens) for name, tokens in shards.items()}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path


def windows(x: np.ndarray, y: np.ndarray) -> list[tuple[int, int]]:
    """(shard, start) of each row, after checking that the row is one window: x then y = x + 1."""
    np.testing.assert_array_equal(x, x[:, :1] + np.arange(x.shape[1]))
    np.testing.assert_array_equal(y, x + 1)
    return [divmod(int(t), 1000) for t in x[:, 0]]


def stream(loader: TokenLoader, batches: int) -> list[tuple[int, int]]:
    return [w for _ in range(batches) for w in windows(*loader.next_batch())]


def epochs(ds: Path, n: int, seed: int = 0) -> list[list[tuple[int, int]]]:
    """The windows of the first n epochs, one batch of one window at a time."""
    loader = TokenLoader(ds, "train", 1, T, order="shuffle", seed=seed)
    out = [[] for _ in range(n)]
    while loader.epoch < n:
        out[loader.epoch] += windows(*loader.next_batch())
    return out


# ----------------------------------------------------------------------------- shuffle


def test_an_epoch_reads_every_window_once_shard_by_shard(ds):
    for epoch in epochs(ds, 3):
        shard_runs = [k for i, (k, _) in enumerate(epoch) if i == 0 or epoch[i - 1][0] != k]
        assert sorted(shard_runs) == [0, 1, 2]  # each shard's windows in one run, shards permuted
        for k, size in enumerate(TRAIN_SIZES):
            starts = sorted(s for shard, s in epoch if shard == k)
            offset = starts[0]
            assert 0 <= offset < T
            # every window of the grid at `offset` that fits in the shard, each once
            assert starts == list(range(offset, size - T, T))
            assert starts[-1] + T + 1 <= size < starts[-1] + 2 * T + 1


def test_batches_run_on_across_shard_and_epoch_boundaries(ds):
    one_by_one = [w for epoch in epochs(ds, 3) for w in epoch]
    B = 4
    batched = stream(TokenLoader(ds, "train", B, T, order="shuffle"), len(one_by_one) // B)
    assert batched == one_by_one[:len(batched)]


def test_seed_and_epoch_change_the_order(ds):
    first, second = epochs(ds, 2, seed=0)
    assert epochs(ds, 2, seed=0) == [first, second]  # deterministic
    assert epochs(ds, 1, seed=1)[0] != first
    assert sorted(first) != sorted(second)  # another grid, not only another order
    offsets = [[min(s for k, s in epoch if k == shard) for shard in range(3)]
               for epoch in (first, second)]
    assert offsets[0] != offsets[1]
    assert first != sorted(first)  # not in reading order


def test_resume_mid_epoch_is_exact_and_any_process_count(ds):
    B = 4
    loader = TokenLoader(ds, "train", B, T, order="shuffle", seed=3)
    stream(loader, 7)
    state = json.loads(json.dumps(loader.state()))  # as a checkpoint stores it
    assert state["order"] == "shuffle" and state["seed"] == 3 and state["epoch"] == 0
    expected = [loader.next_batch() for _ in range(10)]  # windows 28..67: into epoch 1 (~54)
    assert loader.epoch == 1
    resumed = TokenLoader(ds, "train", B, T, order="shuffle", seed=3)
    resumed.restore(state)
    for (ex, ey), (x, y) in zip(expected, (resumed.next_batch() for _ in range(10)), strict=True):
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)

    # Two processes read the two halves of the same global batches; their state restores on one.
    halves = [TokenLoader(ds, "train", B, T, process_index=p, process_count=2, order="shuffle",
                          seed=3) for p in (0, 1)]
    whole = TokenLoader(ds, "train", B, T, order="shuffle", seed=3)
    for _ in range(9):
        parts = [h.next_batch() for h in halves]
        assert all(x.shape == (B // 2, T) for x, _ in parts)
        gx, gy = whole.next_batch()
        np.testing.assert_array_equal(np.concatenate([x for x, _ in parts]), gx)
        np.testing.assert_array_equal(np.concatenate([y for _, y in parts]), gy)
    assert halves[0].state() == halves[1].state() == whole.state()
    single = TokenLoader(ds, "train", B, T, order="shuffle", seed=3)
    single.restore(json.loads(json.dumps(halves[1].state())))
    for _ in range(15):
        parts = [h.next_batch()[0] for h in halves]
        np.testing.assert_array_equal(single.next_batch()[0], np.concatenate(parts))


def test_reset_goes_back_to_the_first_batch(ds):
    loader = TokenLoader(ds, "train", 4, T, order="shuffle")
    first = loader.next_batch()[0]
    stream(loader, 30)
    loader.reset()
    np.testing.assert_array_equal(loader.next_batch()[0], first)


# ----------------------------------------------------------------------------- sequential


def test_sequential_is_todays_layout_and_state(tmp_path):
    np.save(tmp_path / "train_000000.npy", np.arange(20, dtype=np.uint16))
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "char", "vocab_size": 20,
                                                    "shards": {"train_000000.npy": 20}}))
    # B=2, T=3: a batch takes 7 tokens at 0, 6, 12; at 18 only 2 are left, so back to 0.
    expected_x = [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]],
                  [[12, 13, 14], [15, 16, 17]], [[0, 1, 2], [3, 4, 5]]]
    for loader in (TokenLoader(tmp_path, "train", 2, 3),  # the default order
                   TokenLoader(tmp_path, "train", 2, 3, order="sequential", seed=5)):
        for ex in expected_x:
            x, y = loader.next_batch()
            np.testing.assert_array_equal(x, ex)
            np.testing.assert_array_equal(y, np.array(ex) + 1)
        # today's state format, unchanged, so checkpoints written before shuffling resume
        assert loader.state() == {"split": "train", "shard_index": 0, "position": 6,
                                  "shards": [["train_000000.npy", 20]]}
    old = {"split": "train", "shard_index": 0, "position": 12, "shards": [["train_000000.npy", 20]]}
    loader.restore(old)
    np.testing.assert_array_equal(loader.next_batch()[0], expected_x[2])


# ----------------------------------------------------------------------------- bad input


def test_state_of_another_order_seed_or_seq_len_is_rejected(ds):
    shuffled = TokenLoader(ds, "train", 4, T, order="shuffle", seed=0)
    sequential = TokenLoader(ds, "train", 4, T)
    with pytest.raises(ValueError, match=r"loader state is for data order 'sequential', but this "
                                         r"loader reads 'shuffle' \(seed 0, seq_len 8\); resume "
                                         r"with the data order, seed and seq_len"):
        shuffled.restore(sequential.state())
    with pytest.raises(ValueError, match=r"for data order 'shuffle' \(seed 0, seq_len 8\), but "
                                         r"this loader reads 'sequential'"):
        sequential.restore(shuffled.state())
    with pytest.raises(ValueError, match=r"for data order 'shuffle' \(seed 0, seq_len 8\), but "
                                         r"this loader reads 'shuffle' \(seed 1, seq_len 8\)"):
        TokenLoader(ds, "train", 4, T, order="shuffle", seed=1).restore(shuffled.state())
    with pytest.raises(ValueError, match=r"reads 'shuffle' \(seed 0, seq_len 4\)"):
        TokenLoader(ds, "train", 4, 4, order="shuffle").restore(shuffled.state())
    val = TokenLoader(ds, "val", 4, T, order="shuffle")
    with pytest.raises(ValueError, match="loader state is for other data"):
        val.restore(shuffled.state())
    with pytest.raises(ValueError, match=r"position \(epoch 0, shard_pos 5, index 0\) is outside"):
        shuffled.restore({**shuffled.state(), "shard_pos": 5})


def test_bad_order_seed_small_data_and_big_token_ids(ds):
    with pytest.raises(ValueError, match=r"data order 'random' is not one of \('shuffle', "
                                         r"'sequential'\)"):
        TokenLoader(ds, "train", 4, T, order="random")
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        TokenLoader(ds, "train", 4, T, order="shuffle", seed=-1)
    # val: 131 tokens, at worst (offset 15) 7 windows of 17 tokens
    with pytest.raises(ValueError, match=r"too small for one batch: an epoch may hold only 7 "
                                         r"windows of seq_len\+1 = 17 tokens, batch_size=8 needed"):
        TokenLoader(ds, "val", 8, 16, order="shuffle")
    meta = json.loads((ds / "meta.json").read_text())  # claims a vocab that fits, but shard 2
    (ds / "meta.json").write_text(json.dumps({**meta, "vocab_size": 1500}))  # holds 2000..2095
    loader = TokenLoader(ds, "train", 48, T, order="shuffle", vocab_size=2000)  # 48 > 25 + 19
    with pytest.raises(ValueError, match=r"token id 2\d\d\d >= vocab_size=2000 in shard .*"
                                         r"train_000002.npy; the data doesn't match the model"):
        stream(loader, 1)


# ----------------------------------------------------------------------------- validation windows


def test_eval_windows_small_split_is_the_whole_split_as_evaluate_scores_it(ds):
    for B in (4, 3):  # 16 windows: 4 whole batches of 4; 5 of 3, the 16th window dropped
        ev = EvalWindows(ds, T, B)
        assert len(ev) == ev.num_batches == 16 // B and ev.num_tokens == len(ev) * B * T
        got = [w for batch in ev for w in windows(*batch)]
        assert got == [(5, 8 * i) for i in range(len(ev) * B)]
        n, batches = evaluate.shard_batches(ds, B, T)
        assert n == len(ev)
        for (ex, ey), (x, y) in zip(batches, ev, strict=True):
            np.testing.assert_array_equal(x, ex)
            np.testing.assert_array_equal(y, ey)


def test_eval_windows_spread_evenly_and_the_same_every_time(ds):
    ev = EvalWindows(ds, T, batch_size=4, max_tokens=8 * T + 5)  # room for 8 of the 16 windows
    got = [w for batch in ev for w in windows(*batch)]
    assert got == [(5, 16 * i) for i in range(8)]  # every other window, to the split's end
    assert [w for batch in ev for w in windows(*batch)] == got
    assert ev.num_tokens == 8 * T
    # across shards: 10 of the train split's 25 + 19 + 11 = 55 windows, window 11*i // 2
    train = data.eval_windows(TRAIN_SIZES, T, batch_size=5, max_tokens=10 * T)
    assert train.tolist() == [[0, 0], [0, 40], [0, 88], [0, 128], [0, 176],  # windows 0..22
                              [1, 16], [1, 64], [1, 104], [2, 0], [2, 40]]  # 27..49


def test_eval_windows_per_process(ds):
    whole = list(EvalWindows(ds, T, 4))
    halves = [list(EvalWindows(ds, T, 4, process_index=p, process_count=2)) for p in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == len(whole)
    for (gx, gy), (x0, y0), (x1, y1) in zip(whole, *halves, strict=True):
        assert x0.shape == (2, T)
        np.testing.assert_array_equal(np.concatenate([x0, x1]), gx)
        np.testing.assert_array_equal(np.concatenate([y0, y1]), gy)


def test_eval_windows_errors(ds):
    with pytest.raises(ValueError, match=r"one batch of batch_size=20 windows of seq_len\+1 = 9 "
                                         r"tokens, but the split has 16"):
        EvalWindows(ds, T, 20)
    assert len(EvalWindows(ds, T, 4, max_tokens=16)) == 1  # room for 2 windows: still one whole batch
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by process_count=4"):
        EvalWindows(ds, T, 6, process_count=4)


def test_eval_windows_cover_tiny_shakespeare_val(tmp_path, tiny_shakespeare):
    data.prepare_text([tiny_shakespeare], tmp_path, tokenizer="char")
    ev = EvalWindows(tmp_path, 256, 8, vocab_size=65)  # default max_tokens: ~10M, > 111,539
    assert len(ev) == (111_539 - 1) // (8 * 256) == 54 and ev.num_tokens == 54 * 8 * 256
    n, batches = evaluate.shard_batches(tmp_path, 8, 256)
    assert n == len(ev)
    for (ex, _), (x, _) in zip(batches, ev, strict=True):
        np.testing.assert_array_equal(x, ex)
