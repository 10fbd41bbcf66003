"""Token shards, tokenizers and the per-process loader (gpt2_jax/data.py)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2_jax import data
from gpt2_jax.data import Tokenizer, TokenLoader


def write_dataset(root: Path, shards: dict[str, np.ndarray], vocab_size: int = 1000) -> Path:
    """A dataset written by hand (not by data.py), so the loader is checked against plain numpy."""
    root.mkdir(parents=True, exist_ok=True)
    for name, tokens in shards.items():
        np.save(root / name, np.asarray(tokens, dtype=np.uint16))
    meta = {"tokenizer": "char", "vocab_size": vocab_size, "eot_token": None, "chars": None,
            "shards": {name: len(tokens) for name, tokens in shards.items()}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


# Shard k holds 100*k + arange(n): every token says where it came from. With batch_size=2, seq_len=3
# a batch needs 7 tokens, so train_000002 (5 tokens) can never hold one and is skipped.
SHARD_SIZES = [10, 15, 5, 8]
# (shard, position) of successive batches, worked out by hand from TokenLoader's docstring:
# 0:0, 0:6 has 4 left -> 1:0, 1:6, 1:12 has 3 left -> 2 is too small -> 3:0, 3:6 -> wrap to 0:0.
EXPECTED_STARTS = [(0, 0), (1, 0), (1, 6), (3, 0), (0, 0), (1, 0), (1, 6), (3, 0)]


@pytest.fixture
def shards_dir(tmp_path: Path) -> Path:
    shards = {f"train_{k:06d}.npy": 100 * k + np.arange(n) for k, n in enumerate(SHARD_SIZES)}
    shards["val_000000.npy"] = 900 + np.arange(20)
    return write_dataset(tmp_path / "ds", shards)


def expected_batch(shard: int, pos: int, batch_size: int = 2, seq_len: int = 3):
    window = 100 * shard + np.arange(pos, pos + batch_size * seq_len + 1)
    x = np.stack([window[r * seq_len:(r + 1) * seq_len] for r in range(batch_size)])
    y = np.stack([window[r * seq_len + 1:(r + 1) * seq_len + 1] for r in range(batch_size)])
    return x, y


# ----------------------------------------------------------------------------- tokenizers


def test_char_tokenizer_round_trip_and_errors():
    tok = Tokenizer.char("hello world")
    assert tok.chars == " dehlorw" and tok.vocab_size == 8 and tok.eot_token is None
    ids = tok.encode("hello")
    assert ids == [3, 2, 4, 4, 5] and tok.decode(ids) == "hello"
    assert tok.decode([3, 8, -1, 2]) == "h\ufffd\ufffde"  # out-of-vocab ids can't crash sampling
    with pytest.raises(ValueError, match="'z' is not in this char-level vocabulary"):
        tok.encode("zebra")
    again = Tokenizer.from_meta(json.loads(json.dumps(tok.to_meta())))
    assert again.chars == tok.chars and again.encode("world") == tok.encode("world")


def test_gpt2_tokenizer(gpt2_bpe):
    tok = Tokenizer.gpt2()
    assert (tok.vocab_size, tok.eot_token) == (50257, 50256)
    text = "Hello world, naïve café ☕"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("<|endoftext|>") != [50256]  # special tokens are added by id, never parsed
    # A padded-vocab model (50304) can sample ids >= 50257: each becomes U+FFFD, the rest decodes.
    padded = [*ids[:2], 50257, 50303, *ids[2:]]
    assert tok.decode(padded) == tok.decode(ids[:2]) + "\ufffd\ufffd" + tok.decode(ids[2:])
    assert Tokenizer.from_meta(tok.to_meta()).vocab_size == 50257


# ----------------------------------------------------------------------------- loader


def test_loader_order_shift_skip_and_wrap(shards_dir):
    loader = TokenLoader(shards_dir, "train", batch_size=2, seq_len=3)
    other = TokenLoader(shards_dir, "train", batch_size=2, seq_len=3)
    for shard, pos in EXPECTED_STARTS:
        x, y = loader.next_batch()
        assert x.dtype == np.int32 and x.shape == (2, 3)
        np.testing.assert_array_equal(x, expected_batch(shard, pos)[0])
        np.testing.assert_array_equal(y, expected_batch(shard, pos)[1])
        np.testing.assert_array_equal(y[:, :-1], x[:, 1:])  # y is x shifted by one
        ox, oy = other.next_batch()  # a second loader gives the same stream
        np.testing.assert_array_equal(ox, x)
        np.testing.assert_array_equal(oy, y)
    loader.reset()
    np.testing.assert_array_equal(next(iter(loader))[0], expected_batch(0, 0)[0])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_are_disjoint_and_make_the_global_batch(tmp_path, process_count):
    root = write_dataset(tmp_path / "ds", {"train_000000.npy": np.arange(500),
                                           "train_000001.npy": np.arange(500, 900),
                                           "val_000000.npy": np.arange(100)})
    B, T = 8, 5
    whole = TokenLoader(root, "train", B, T)
    parts = [TokenLoader(root, "train", B, T, process_index=p, process_count=process_count)
             for p in range(process_count)]
    for _ in range(25):  # 25 batches of 40 tokens: into the second shard and back to the first
        gx, gy = whole.next_batch()
        xs, ys = zip(*(p.next_batch() for p in parts), strict=True)
        assert all(x.shape == (B // process_count, T) for x in xs)
        np.testing.assert_array_equal(np.concatenate(xs), gx)
        np.testing.assert_array_equal(np.concatenate(ys), gy)
        seen = [set(x.ravel().tolist()) for x in xs]  # tokens are unique, so slices share none
        assert sum(len(s) for s in seen) == len(set().union(*seen))
    assert whole.state() == parts[0].state() and whole.state()["shard_index"] == 0


def test_val_split_is_separate(shards_dir):
    val = TokenLoader(shards_dir, "val", batch_size=2, seq_len=3)
    assert val.names == ["val_000000.npy"] and val.num_tokens == 20
    x, y = val.next_batch()
    np.testing.assert_array_equal(x, 900 + np.array([[0, 1, 2], [3, 4, 5]]))
    train = TokenLoader(shards_dir, "train", batch_size=2, seq_len=3)
    assert "val_000000.npy" not in train.names and train.num_tokens == sum(SHARD_SIZES)


def test_state_restore_resumes_exactly(shards_dir):
    loader = TokenLoader(shards_dir, "train", batch_size=2, seq_len=3)
    for _ in range(3):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state()))  # as a checkpoint would store it
    expected = [loader.next_batch() for _ in range(5)]
    resumed = TokenLoader(shards_dir, "train", batch_size=2, seq_len=3)
    resumed.restore(state)
    for (ex, ey), (x, y) in zip(expected, [resumed.next_batch() for _ in range(5)], strict=True):
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)
    # The state is global: a resume on two processes reads the two halves of the same batches.
    halves = [TokenLoader(shards_dir, "train", 2, 3, process_index=p, process_count=2)
              for p in (0, 1)]
    for h in halves:
        h.restore(state)
    resumed_x = np.concatenate([h.next_batch()[0] for h in halves])
    np.testing.assert_array_equal(resumed_x, expected[0][0])
    val = TokenLoader(shards_dir, "val", batch_size=2, seq_len=3)
    with pytest.raises(ValueError, match="loader state is for other data"):
        val.restore(state)


# ----------------------------------------------------------------------------- loader errors


def test_missing_dir_meta_or_split(tmp_path, shards_dir):
    how = "python -m gpt2_jax.data text FILE --out DIR"
    with pytest.raises(FileNotFoundError, match=f"does not exist.*{how}"):
        TokenLoader(tmp_path / "nope", "train", 2, 3)
    (shards_dir / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json is missing.*fineweb-edu --out DIR"):
        TokenLoader(shards_dir, "train", 2, 3)
    only_val = write_dataset(tmp_path / "only_val", {"val_000000.npy": np.arange(50)})
    with pytest.raises(FileNotFoundError, match="has no train shards.*python -m gpt2_jax.data"):
        TokenLoader(only_val, "train", 2, 3)


def test_truncated_or_mismatched_shard(shards_dir):
    path = shards_dir / "train_000001.npy"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 6)  # a half-copied file
    with pytest.raises(ValueError, match="shard .*train_000001.npy is truncated or corrupt"):
        TokenLoader(shards_dir, "train", 2, 3)
    np.save(path, np.arange(12, dtype=np.uint16))  # a valid file, but not the one in meta.json
    with pytest.raises(ValueError, match=r"train_000001.npy is truncated or corrupt: uint16\[12\], "
                                         r"meta.json says uint16\[15\]"):
        TokenLoader(shards_dir, "train", 2, 3)


def test_shards_too_small_and_bad_process_count(shards_dir):
    with pytest.raises(ValueError, match=r"too small for one batch: batch_size\*seq_len\+1 = "
                       r"4\*4\+1 = 17 tokens needed, the largest shard has 15; use a smaller "
                       r"batch_size or seq_len"):
        TokenLoader(shards_dir, "train", batch_size=4, seq_len=4)
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by process_count=4"):
        TokenLoader(shards_dir, "train", batch_size=6, seq_len=1, process_count=4)


def test_vocab_checks(shards_dir):
    with pytest.raises(ValueError, match="vocab_size=1000 .* but the model has vocab_size=65"):
        data.check_vocab(shards_dir, 65)
    assert data.check_vocab(shards_dir, 50304)["vocab_size"] == 1000
    with pytest.raises(ValueError, match="vocab_size=1000 .* but the model has vocab_size=200"):
        TokenLoader(shards_dir, "train", 2, 3, vocab_size=200)
    # meta.json claims a vocab that fits, but shard 3 holds ids 300..307: the batch check names it.
    meta = json.loads((shards_dir / "meta.json").read_text())
    (shards_dir / "meta.json").write_text(json.dumps({**meta, "vocab_size": 150}))
    loader = TokenLoader(shards_dir, "train", 2, 3, vocab_size=200)
    for _ in range(3):
        loader.next_batch()  # shards 0 and 1: ids < 200
    with pytest.raises(ValueError, match="token id 306 >= vocab_size=200 in shard .*train_000003"):
        loader.next_batch()


# ----------------------------------------------------------------------------- writing


def test_write_shards_layout_and_atomic_meta(tmp_path):
    docs = [np.arange(7), np.arange(7, 20), np.arange(20, 23)]  # 23 tokens -> 10 (val), 10, 3
    tok = Tokenizer.char("".join(chr(65 + i) for i in range(30)))
    meta = data.write_shards(iter(docs), tmp_path, tok, shard_size=10, progress=False)
    assert meta["shards"] == {"val_000000.npy": 10, "train_000000.npy": 10, "train_000001.npy": 3}
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    got = [np.load(tmp_path / name) for name in meta["shards"]]
    assert all(g.dtype == np.uint16 for g in got)
    np.testing.assert_array_equal(np.concatenate(got), np.arange(23))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted([*meta["shards"], "meta.json"])  # and no temp files
    (tmp_path / "plain").write_text("")  # shards get the permissions of any new file (umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert set(modes.values()) == {modes.pop("plain")}
    (tmp_path / "plain").unlink()

    def dies_halfway():
        yield np.arange(15)
        raise KeyboardInterrupt  # a killed prep
    with pytest.raises(KeyboardInterrupt):
        data.write_shards(dies_halfway(), tmp_path, tok, shard_size=10, progress=False)
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):  # the old one is gone
        TokenLoader(tmp_path, "train", 1, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["val_000000.npy"]  # and the old shards too


def test_write_shards_rejects_tokens_out_of_range(tmp_path):
    tok = Tokenizer.char("abc")
    with pytest.raises(ValueError, match="token id 3 >= the tokenizer's vocab_size 3"):
        data.write_shards([np.array([0, 1, 3])], tmp_path, tok, shard_size=4, progress=False)
    big = Tokenizer("char", vocab_size=70000, eot_token=None, chars="x" * 70000)
    with pytest.raises(ValueError, match="token id 65536 does not fit the uint16 shards"):
        data.write_shards([np.array([1, 65536])], tmp_path, big, shard_size=4, progress=False)
    assert not (tmp_path / "meta.json").exists()


FAKE_DOCS = [f"Document {i}: " + "The quick brown fox jumps over the lazy dog. " * (i % 7 + 1)
             for i in range(60)]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_prepare_fineweb_with_a_stand_in_stream(tmp_path, gpt2_bpe, num_proc):
    tok = Tokenizer.gpt2()
    stream = ({"text": t, "id": i} for i, t in enumerate(FAKE_DOCS))  # like streaming `datasets`
    meta = data.prepare_fineweb(tmp_path, shard_size=1000, docs=stream, num_proc=num_proc,
                                progress=False)
    names = list(meta["shards"])
    assert names == ["val_000000.npy", *(f"train_{k:06d}.npy" for k in range(len(names) - 1))]
    sizes = list(meta["shards"].values())
    assert len(names) >= 3 and all(s == 1000 for s in sizes[:-1]) and 0 < sizes[-1] <= 1000
    stream_tokens = np.concatenate([np.load(tmp_path / n) for n in names])
    expected = np.concatenate([[50256, *tok.encode(t)] for t in FAKE_DOCS])
    np.testing.assert_array_equal(stream_tokens, expected)  # val: the stream's first 1000 tokens
    starts = np.flatnonzero(stream_tokens == 50256)
    assert len(starts) == len(FAKE_DOCS) and starts[0] == 0  # an <|endoftext|> before each doc
    texts = [tok.decode(doc) for doc in np.split(stream_tokens, starts[1:])]
    assert texts == ["<|endoftext|>" + t for t in FAKE_DOCS]
    assert Tokenizer.load(tmp_path).name == "gpt2" and meta["eot_token"] == 50256


def test_prepare_fineweb_without_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match=r'pip install "gpt2-jax\[data\]"'):
        data.prepare_fineweb(tmp_path)


def test_prepare_text_gpt2_on_tiny_shakespeare(tmp_path, tiny_shakespeare, gpt2_bpe):
    text = tiny_shakespeare.read_text(encoding="utf-8")
    meta = data.prepare_text([tiny_shakespeare], tmp_path, tokenizer="gpt2", val_fraction=0.1,
                             shard_size=200_000)
    train = np.concatenate([np.load(tmp_path / n) for n in meta["shards"] if "train" in n])
    val = np.load(tmp_path / "val_000000.npy")
    n = len(train) + len(val)
    assert len(val) == int(n * 0.1) and meta["shards"]["train_000000.npy"] == 200_000
    tokens = np.concatenate([train, val])  # val is the END of the text
    tok = Tokenizer.load(tmp_path)
    assert tokens[0] == 50256 and tok.decode(tokens[1:]) == text


def test_prepare_text_char_on_tiny_shakespeare(tmp_path, tiny_shakespeare):
    text = tiny_shakespeare.read_text(encoding="utf-8")
    meta = data.prepare_text([tiny_shakespeare], tmp_path, tokenizer="char", val_fraction=0.1)
    assert meta["vocab_size"] == 65 and meta["chars"] == "".join(sorted(set(text)))
    assert meta["shards"] == {"val_000000.npy": 111539, "train_000000.npy": len(text) - 111539}
    tok = Tokenizer.load(tmp_path)
    train, val = np.load(tmp_path / "train_000000.npy"), np.load(tmp_path / "val_000000.npy")
    assert tok.decode(train) + tok.decode(val) == text
    x, y = TokenLoader(tmp_path, "val", batch_size=4, seq_len=64, vocab_size=65).next_batch()
    assert tok.decode(x[0]) == text[-111539:][:64]


def test_prepare_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="text file.* not found: .*missing.txt"):
        data.prepare_text([tmp_path / "missing.txt"], tmp_path / "out")
    with pytest.raises(ValueError, match="val_fraction must be in"):
        data.prepare_text_string("abcdef", tmp_path / "out", "char", val_fraction=1.0)
    with pytest.raises(ValueError, match="each split needs at least one token"):
        data.prepare_text_string("abc", tmp_path / "out", "char", val_fraction=0.1)


def test_default_corpus_is_big_deterministic_and_trainable(tmp_path):
    corpus = data.default_corpus()
    assert len(corpus) > 100_000 and corpus == data.default_corpus()
    meta = data.prepare_text_string(corpus, tmp_path, "char", val_fraction=0.1)
    assert sum(meta["shards"].values()) == len(corpus) and meta["vocab_size"] == len(set(corpus))


# ----------------------------------------------------------------------------- command line


def test_cli_text_char(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("To be, or not to be, that is the question.\n" * 50)
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "gpt2_jax.data", "text", str(src), "--out", str(out),
           "--tokenizer", "char", "--val_fraction", "0.2", "--shard_size", "1000"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "train: 2 shard(s), 1,720 tokens" in run.stdout
    assert "val: 1 shard(s), 430 tokens" in run.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "char" and meta["shards"]["train_000001.npy"] == 720


def test_cli_missing_file_fails_cleanly(tmp_path):
    run = subprocess.run([sys.executable, "-m", "gpt2_jax.data", "text", str(tmp_path / "nope.txt"),
                          "--out", str(tmp_path / "ds"), "--tokenizer", "char"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "error: text file(s) not found" in run.stderr and "nope.txt" in run.stderr
    assert "Traceback" not in run.stderr
