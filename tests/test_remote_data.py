"""Token shards in a bucket (`--data=gs://...`, gpt2_jax.data.remote) against the local GCS emulator: the data
CLI writes a dataset there, the loaders read it through a local cache (fetched shard by shard, checked against
meta.json, the next shard prefetched, size-bounded, reused), and a run trained from it resumes bit-identical
after its cache is lost. test_bucket_run.py does the same with train.py killed by SIGKILL (e2e)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from etils import epath
from test_gcs_emulator import key, no_local_gs_folder, objects  # noqa: F401
from tiny import tiny_train_config

from gpt2_jax import data as data_lib
from gpt2_jax.data import remote

SHARD = 8_000  # tokens per shard: the tiny corpus below makes 1 val and 5 train shards


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(data_lib.default_corpus()[:44_000], encoding="utf-8")
    return path


@pytest.fixture
def cache_home(tmp_path, monkeypatch) -> Path:
    """GPT2_JAX_CACHE of this test: where the dataset's local cache folder goes."""
    monkeypatch.setenv("GPT2_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_both(corpus: Path, local: Path, url: str) -> None:
    """The same char dataset in a local folder and, through the data CLI, in the bucket."""
    for out in (str(local), url):
        assert data_lib.main(["text", str(corpus), "--out", out, "--tokenizer", "char",
                              f"--shard_size={SHARD}"]) == 0


def test_data_cli_writes_to_a_bucket_and_the_loader_reads_it_as_the_local_folder(
        tmp_path, corpus, cache_home, gcs_dir, gcs_emulator_env):
    """The bucket holds the same files as the local folder; a shuffled loader over the bucket's dataset gives
    the local loader's batches, across shard and epoch boundaries; shards are fetched as they are needed, and
    the next one in the order is prefetched."""
    local, url = tmp_path / "local", f"{gcs_dir}/shards"
    write_both(corpus, local, url)
    names = sorted(p.name for p in local.iterdir())
    assert [n.removeprefix(f"{key(url)}/") for n in objects(gcs_emulator_env, key(url))] == names
    assert len([n for n in names if n.startswith("train_")]) == 5

    folder = data_lib.open_remote(url)
    assert folder.is_relative_to(cache_home) and sorted(p.name for p in folder.glob("*.npy")) == []
    theirs = data_lib.TokenLoader(folder, "train", 8, 64, order="shuffle", seed=3)
    mine = data_lib.TokenLoader(local, "train", 8, 64, order="shuffle", seed=3)
    windows_per_epoch = sum((n - 1) // 64 for n in mine.sizes)
    for _ in range(windows_per_epoch // 8 + 20):  # into the second epoch
        for a, b in zip(theirs.next_batch(), mine.next_batch(), strict=True):
            np.testing.assert_array_equal(a, b)
    assert theirs.state() == mine.state() and mine.epoch == 1
    cache = remote.ShardCache.of(folder)
    upcoming = theirs.names[theirs.cursor.next_shard()]
    if (pending := cache._pending.get(upcoming)) is not None:
        pending.result(timeout=60)
    assert (folder / upcoming).is_file()  # fetched ahead, before any window of it was read
    val = data_lib.EvalWindows(folder, 64, 8, max_tokens=None)
    ref = data_lib.EvalWindows(local, 64, 8, max_tokens=None)
    for a, b in zip(val, ref, strict=True):
        np.testing.assert_array_equal(a[0], b[0])


def test_the_cache_is_bounded_reused_and_checked(tmp_path, corpus, cache_home, gcs_dir, gcs_emulator_env):
    local, url = tmp_path / "local", f"{gcs_dir}/shards"
    write_both(corpus, local, url)
    shard_bytes = (local / "train_000000.npy").stat().st_size
    folder = data_lib.open_remote(url, max_gb=2.5 * shard_bytes / 2**30)  # room for two shards
    loader = data_lib.TokenLoader(folder, "train", 8, 64, order="sequential")
    for _ in range(60):  # through all five train shards
        loader.next_batch()
    remote.ShardCache.of(folder)._pool.submit(lambda: None).result(timeout=60)  # prefetches done
    kept = sorted(p.name for p in folder.glob("*.npy"))
    assert 1 <= len(kept) <= 2, kept

    # Reused: a shard in the cache is read from it, even with the bucket's copy gone.
    name = kept[-1]
    (epath.Path(url) / name).unlink()
    fresh = data_lib.open_remote(url)
    assert fresh == folder
    again = remote.LazyShard(remote.ShardCache.of(fresh), name)
    np.testing.assert_array_equal(again[:100], np.load(local / name)[:100])

    # Checked: a damaged copy is fetched again (here it cannot be: the bucket lost it), and a shard missing
    # from the bucket is an error that names it and the fix.
    (folder / name).write_bytes((folder / name).read_bytes()[:200])
    with pytest.raises(FileNotFoundError, match=rf"shard {url}/{name} is listed in meta.json but missing from the "
                                                rf"bucket; recreate the dataset: python -m gpt2_jax.data"):
        remote.LazyShard(remote.ShardCache.of(folder), name)[:10]
    (epath.Path(url) / name).write_bytes((local / name).read_bytes())
    np.testing.assert_array_equal(remote.LazyShard(remote.ShardCache.of(folder), name)[:],
                                  np.load(local / name))


def test_a_missing_dataset_in_the_bucket_is_one_error(gcs_dir, cache_home, gcs_emulator_env):
    with pytest.raises(FileNotFoundError, match=rf"--data={gcs_dir}/none: {gcs_dir}/none/meta.json is missing, so it "
                                                r"holds no finished dataset"):
        data_lib.open_remote(f"{gcs_dir}/none")


@pytest.mark.slow
def test_a_run_from_a_bucket_resumes_bit_identical_after_losing_its_cache(
        tmp_path, char_data, cache_home, gcs_dir, gcs_emulator_env):
    """4 steps straight, against 2 steps, the cache folder deleted (a replaced host), then 2 more: the same
    params, bit for bit, and the same data position."""
    from gpt2_jax.runs import load_run
    from gpt2_jax.training import run

    url = f"{gcs_dir}/char"
    for f in sorted(char_data.iterdir(), key=lambda p: p.name == "meta.json"):  # meta.json last
        (epath.Path(url) / f.name).write_bytes(f.read_bytes())
    common = dict(checkpoint_every=2, data_order="shuffle", mesh="data:1")
    straight = run(tiny_train_config(tmp_path / "straight", url, **common, max_steps=4))
    run(tiny_train_config(tmp_path / "resumed", url, **common, max_steps=2))
    folders = list((cache_home / "data").iterdir())
    assert len(folders) == 1
    shutil.rmtree(folders[0])
    resumed = run(tiny_train_config(tmp_path / "resumed", url, **common, max_steps=4))
    assert resumed["start_step"] == 2
    a, b = load_run(tmp_path / "straight"), load_run(tmp_path / "resumed")
    assert a[2]["loader"] == b[2]["loader"] and a[2]["data"] == b[2]["data"] == {
        "dir": url, "shards": a[2]["loader"]["shards"]}
    import jax

    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(straight["params"]),
                                                     jax.tree.leaves(resumed["params"]), strict=True))
    assert json.loads((tmp_path / "resumed" / "config.json").read_text())["train"]["data"] == url


@pytest.mark.slow
def test_evaluate_scores_shards_in_a_bucket_as_the_local_folder(tmp_path, char_data, cache_home, gcs_dir,
                                                                 gcs_emulator_env, capsys):
    from tiny import tiny_model

    from gpt2_jax import evaluate
    from gpt2_jax.convert import export_hf

    url = f"{gcs_dir}/char"
    for f in sorted(char_data.iterdir(), key=lambda p: p.name == "meta.json"):  # meta.json last
        (epath.Path(url) / f.name).write_bytes(f.read_bytes())
    hf = export_hf(tiny_model(seed=4, vocab_size=data_lib.Tokenizer.load(char_data).vocab_size), tmp_path / "hf")
    results = {}
    for name, data in (("local", char_data), ("bucket", url)):
        assert evaluate.main(["loss", f"--init_from={hf}", f"--data={data}", "--max_batches=3", "--no_progress",
                              f"--out={tmp_path / name}.json", "--platform=cpu"]) == 0
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["bucket"] == results["local"] and results["local"]["batches"] == 3
    assert f"on {url} (val split)" in capsys.readouterr().out
