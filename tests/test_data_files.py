"""`python -m gpt2_jax.data files|hf`: .txt/.jsonl/.json/.parquet and Hugging Face datasets (a local folder,
offline) -> shards; whole-document validation; the errors; a prep that resumes after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2_jax import data
from gpt2_jax.data import prepare, sources
from gpt2_jax.data.cli import main
from gpt2_jax.tokenizer import Tokenizer

datasets = pytest.importorskip("datasets")  # the `data` extra
ROOT = Path(__file__).resolve().parents[1]

DOCS = [f"Record {i}. " + "Some words of a document, " * (i % 5 + 1) + "the end." for i in range(40)]


def gpt2_docs(texts):
    tok = Tokenizer.gpt2()
    return [np.array([50256, *tok.encode(t)], dtype=np.uint16) for t in texts]


def read_split(out, split):
    meta = json.loads((out / "meta.json").read_text())
    names = sorted(n for n in meta["shards"] if n.startswith(f"{split}_"))
    return np.concatenate([np.load(out / n) for n in names])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def check_split(out, texts, n_val):
    """train = the first documents, val = the last n_val, whole, each <|endoftext|> + its tokens."""
    docs = gpt2_docs(texts)
    np.testing.assert_array_equal(read_split(out, "train"), np.concatenate(docs[:-n_val]))
    np.testing.assert_array_equal(read_split(out, "val"), np.concatenate(docs[-n_val:]))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "txt"])
def test_each_format_whole_documents(tmp_path, gpt2_bpe, fmt):
    records = [{"id": i, "text": t} for i, t in enumerate(DOCS)]
    if fmt == "jsonl":
        inputs = [str(write_jsonl(tmp_path / "a.jsonl", records))]
    elif fmt == "json":
        (tmp_path / "a.json").write_text(json.dumps(records))
        inputs = [str(tmp_path / "a.json")]
    elif fmt == "parquet":
        datasets.Dataset.from_list(records).to_parquet(tmp_path / "a.parquet")
        inputs = [str(tmp_path / "a.parquet")]
    else:
        for i, t in enumerate(DOCS):
            (tmp_path / f"doc{i:03d}.txt").write_text(t, encoding="utf-8")
        inputs = [str(tmp_path / "doc*.txt")]  # a glob, sorted by name
    out = tmp_path / "ds"
    meta = data.prepare_files(inputs, out, val_fraction=0.1, shard_size=100, num_proc=1, progress=False)
    check_split(out, DOCS, n_val=4)  # round(40 * 0.1)
    for split in ("train", "val"):  # all shards full but a split's last
        sizes = [n for name, n in meta["shards"].items() if name.startswith(split)]
        assert set(sizes[:-1]) <= {100} and 0 < sizes[-1] <= 100
    assert meta["tokenizer"] == "gpt2" and (out / "meta.json").is_file()


def test_several_files_keep_their_order_and_other_text_field(tmp_path, gpt2_bpe):
    write_jsonl(tmp_path / "b.jsonl", [{"body": t} for t in DOCS[20:]])
    write_jsonl(tmp_path / "a.jsonl", [{"body": t} for t in DOCS[:20]])
    out = tmp_path / "ds"
    assert main(["files", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--out", str(out),
                 "--text_field=body", "--val_fraction=0.25", "--shard_size=1000", "--num_proc=1"]) == 0
    check_split(out, DOCS, n_val=10)


def test_same_inputs_byte_identical_any_num_proc(tmp_path, gpt2_bpe):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in DOCS * 5])
    outs = []
    for k, num_proc in enumerate([1, 2, 1]):
        out = tmp_path / f"ds{k}"
        data.prepare_files([src], out, shard_size=300, num_proc=num_proc, progress=False)
        outs.append({p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")})
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) > 5


def test_char_tokenizer(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in ["abc", "bcd", "cde", "xyz"]])
    meta = data.prepare_files([src], tmp_path / "ds", tokenizer="char", val_fraction=0.25, num_proc=1,
                              progress=False)
    assert meta["chars"] == "abcdexyz" and meta["eot_token"] is None
    tok = Tokenizer.load(tmp_path / "ds")
    assert tok.decode(read_split(tmp_path / "ds", "train")) == "abcbcdcde"
    assert tok.decode(read_split(tmp_path / "ds", "val")) == "xyz"


def test_errors_name_fields_records_and_files(tmp_path):
    out = tmp_path / "ds"
    src = write_jsonl(tmp_path / "a.jsonl", [{"content": "x", "id": 1}])
    with pytest.raises(ValueError, match=r"a.jsonl has no field 'text'; its fields: content, id \(pass --text_field\)"):
        data.prepare_files([src], out, num_proc=1, progress=False)
    src = write_jsonl(tmp_path / "b.jsonl", [{"text": "fine"}, {"text": "also"}, {"text": 7}])
    with pytest.raises(ValueError, match=r"b.jsonl line 3: field 'text' is a int, not text"):
        data.prepare_files([src], out, num_proc=1, progress=False)
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": "fine"}, {"id": 2}])
    with pytest.raises(ValueError, match=r"c.jsonl line 2: field 'text' is missing or null"):
        data.prepare_files([src], out, num_proc=1, progress=False)
    datasets.Dataset.from_list([{"text": 1}, {"text": 2}]).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"d.parquet row 1: field 'text' is a int, not text"):
        data.prepare_files([tmp_path / "d.parquet"], out, num_proc=1, progress=False)
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"no documents in .*e.jsonl"):
        data.prepare_files([tmp_path / "e.jsonl"], out, num_proc=1, progress=False)
    src = write_jsonl(tmp_path / "f.jsonl", [{"text": "only one"}])
    with pytest.raises(ValueError, match="1 document.* can't be split with val_fraction=0.1: each split needs"):
        data.prepare_files([src], out, num_proc=1, progress=False)
    with pytest.raises(FileNotFoundError, match=r"nothing\*.jsonl matches no file"):
        data.prepare_files([str(tmp_path / "nothing*.jsonl")], out, num_proc=1, progress=False)
    (tmp_path / "g.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match=r"g.csv: unknown format '.csv'; pass .txt, .jsonl, .json, .parquet"):
        data.prepare_files([tmp_path / "g.csv"], out, num_proc=1, progress=False)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.0"):
        data.prepare_files([src], out, val_fraction=1.0, num_proc=1, progress=False)
    assert not (out / "meta.json").exists()


def test_cli_errors_are_one_line(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", [{"content": "x"}])
    assert main(["files", str(src), "--out", str(tmp_path / "ds")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no field 'text'; its fields: content" in err
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "cut short\n')
    (tmp_path / "fake.parquet").write_text("not parquet")
    for name, what in [("bad.jsonl", "JSON Lines"), ("fake.parquet", "Parquet")]:
        assert main(["files", str(tmp_path / name), "--out", str(tmp_path / "ds")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{tmp_path / name} is not a valid {what} file (" in err, err
    for bad in ["1", "999", "0", "-5", "2000000000"]:
        with pytest.raises(SystemExit) as e:
            main(["files", str(src), "--out", str(tmp_path / "ds"), f"--shard_size={bad}"])
        assert e.value.code == 2
        assert "argument --shard_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["text", str(src), "--out", str(tmp_path / "ds"), "--shard_size=1"])
    assert "too small: every shard is a file that training keeps open" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Hugging Face datasets, offline


def test_hf_saved_dataset_with_a_named_val_split(tmp_path, gpt2_bpe):
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:30]}),
                          "validation": datasets.Dataset.from_dict({"text": DOCS[30:]})}).save_to_disk(folder)
    out = tmp_path / "ds"
    assert main(["hf", str(folder), "--val_split=validation", "--out", str(out), "--shard_size=1000",
                 "--num_proc=1"]) == 0
    check_split(out, DOCS, n_val=10)
    with pytest.raises(ValueError, match="has no split 'test'; its splits: train, validation"):
        sources.prepare_hf(str(folder), tmp_path / "x", split="test", num_proc=1, progress=False)


def test_hf_saved_dataset_last_fraction_of_its_split(tmp_path, gpt2_bpe):
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS, "n": list(range(40))}),
                          "test": datasets.Dataset.from_dict({"text": ["unused"]})}).save_to_disk(folder)
    out = tmp_path / "ds"
    sources.prepare_hf(str(folder), out, val_fraction=0.25, shard_size=1000, num_proc=2, progress=False)
    check_split(out, DOCS, n_val=10)


def test_hf_folder_of_jsonl_last_fraction(tmp_path, gpt2_bpe):
    folder = tmp_path / "raw"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": t, "n": i} for i, t in enumerate(DOCS)])
    out = tmp_path / "ds"
    sources.prepare_hf(str(folder), out, val_fraction=0.2, shard_size=1000, num_proc=1, progress=False)
    check_split(out, DOCS, n_val=8)
    with pytest.raises(ValueError, match="has no field 'txt'; its fields: text, n"):
        sources.prepare_hf(str(folder), out, text_field="txt", num_proc=1, progress=False)


def test_hf_saved_single_dataset_row_errors(tmp_path):
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["a", None, "c"]}).save_to_disk(folder)
    with pytest.raises(ValueError, match=r"saved split 'train' row 2: field 'text' is missing or null"):
        sources.prepare_hf(str(folder), tmp_path / "ds", tokenizer="char", num_proc=1, progress=False)


# ----------------------------------------------------------------------------- resuming


def interrupted_after(monkeypatch, shards):
    """Make the prep raise KeyboardInterrupt (a Ctrl-C) once it has saved `shards` shards and their state."""
    saved = []

    def save_state(out, fingerprint, names, nxt, complete=False):
        real_save_state(out, fingerprint, names, nxt, complete)
        saved.append(nxt)
        if len(saved) == shards:
            raise KeyboardInterrupt
    monkeypatch.setattr(prepare, "_save_state", save_state)


real_save_state = prepare._save_state


def test_resume_continues_and_a_changed_input_starts_over(tmp_path, gpt2_bpe, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in DOCS * 3])
    ref, out = tmp_path / "ref", tmp_path / "ds"
    data.prepare_files([src], ref, shard_size=150, num_proc=1, progress=False)
    expected = {p.name: p.read_bytes() for p in ref.iterdir() if not p.name.startswith(".")}
    with monkeypatch.context() as m:
        interrupted_after(m, 5)
        with pytest.raises(KeyboardInterrupt):
            data.prepare_files([src], out, shard_size=150, num_proc=1, progress=False)
    assert sorted(p.name for p in out.glob("*.npy")) == [f"train_{k:06d}.npy" for k in range(5)]
    assert not (out / "meta.json").exists()
    capsys.readouterr()
    data.prepare_files([src], out, shard_size=150, num_proc=1, progress=False)
    assert "resuming in" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == expected
    data.prepare_files([src], out, shard_size=150, num_proc=1, progress=False)
    assert "already complete" in capsys.readouterr().out
    write_jsonl(src, [{"text": t} for t in DOCS[::-1] * 3])  # a changed input: starts over
    with monkeypatch.context() as m:
        interrupted_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            data.prepare_files([src], out, shard_size=150, num_proc=1, progress=False)
    assert "holds a dataset of other inputs, another tokenizer or shard size: starting over" in capsys.readouterr().out
    data.prepare_files([src], out, shard_size=170, num_proc=1, progress=False)  # and another shard size
    assert "holds an unfinished prep of other inputs" in capsys.readouterr().out
    assert set(json.loads((out / "meta.json").read_text())["shards"].values()) > {170}
    check_split(out, DOCS[::-1] * 3, n_val=12)


@pytest.mark.slow
def test_kill_9_mid_prep_resumes_to_identical_shards(tmp_path, gpt2_bpe):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rng = np.random.default_rng(0)
    src = write_jsonl(tmp_path / "big.jsonl",
                      [{"text": " ".join(rng.choice(words, size=int(rng.integers(20, 400))))} for _ in range(3000)])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def prep(out):
        return [sys.executable, "-m", "gpt2_jax.data", "files", str(src), "--out", str(out), "--shard_size=1000",
                "--num_proc=2"]
    ref, out = tmp_path / "ref", tmp_path / "ds"
    done = subprocess.run(prep(ref), capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    expected = {p.name: p.read_bytes() for p in ref.iterdir() if not p.name.startswith(".")}
    assert len(expected) > 100
    proc = subprocess.Popen(prep(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        while len(list(out.glob("train_*.npy"))) < 20 and proc.poll() is None:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the prep finished before it could be killed"
    assert not (out / "meta.json").exists()
    written = len(list(out.glob("train_*.npy")))
    again = subprocess.run(prep(out), capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "resuming in" in again.stdout + again.stderr
    got = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
    assert got == expected, f"killed after {written} shards"


def test_progress_bar_shows_tokens_per_second_and_time_left(tmp_path, gpt2_bpe, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in DOCS * 30])
    data.prepare_files([src], tmp_path / "ds", shard_size=1000, num_proc=1)
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()
    bar = [line for line in err if line.strip()][-1]  # its last refresh
    assert "100%" in bar and "tok/s" in bar and "<00:00" in bar, err  # done, its rate, the time left (none)


@pytest.mark.slow
def test_prep_benchmark_runs_and_both_ways_agree():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prep.py"), "--tokens=100000", "--repeats=1",
                        "--shard_size=10000"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])  # (the script asserts both ways wrote the same tokens)
    assert result["tokens"] >= 100_000 and len(result["tokens_per_s"]) == 3
    assert all(rate > 0 for rate in result["tokens_per_s"].values())
    assert all(set(hours) == {"2", "8", "32"} for hours in result["hours_10B"].values())


def test_a_text_prep_in_the_folder_forgets_the_resumable_state(tmp_path, gpt2_bpe, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in DOCS])
    out = tmp_path / "ds"
    data.prepare_files([src], out, num_proc=1, progress=False)
    data.prepare_text_string("another dataset entirely", out, "char", val_fraction=0.25)
    capsys.readouterr()
    meta = data.prepare_files([src], out, num_proc=1, progress=False)  # not "already complete": rebuilt
    assert "already complete" not in capsys.readouterr().out and meta["tokenizer"] == "gpt2"
    check_split(out, DOCS, n_val=4)


def test_non_utf8_text_file_names_it(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text \(byte offset 3: .*iconv"):
        data.prepare_files([tmp_path / "latin1.txt"], tmp_path / "ds", num_proc=1, progress=False)
