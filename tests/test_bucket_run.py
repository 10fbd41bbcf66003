"""A training run in a bucket, end to end: `python train.py ... --out_dir=gs://bucket/run` against the local
GCS emulator (fake-gcs-server on 127.0.0.1, tests/gcs_emulator.py), with CPU processes.

The main test trains a tiny char model into the bucket from token shards in the bucket, kills the process with
SIGKILL after a checkpoint is committed, deletes the local shard cache, resumes it with the same command, and checks
that params, data position and every step's loss equal an uninterrupted LOCAL run of the same flags, bit for bit
(same program, same inputs, XLA:CPU is deterministic). Then it runs sample / evaluate / export / plot on the run in
the bucket (their `main`, in this process: the same code `python -m gpt2_jax.<tool>` runs). What is in the bucket is
read through the emulator's own JSON API (`objects`), and no test may leave a local folder named `gs:` (the autouse
`no_local_gs_folder`). `test_in_private_network` reruns this file in a network namespace that has nothing but
loopback, emulator included.

Not tested here: a real bucket (credentials, latency, eventual consistency of listings) and a real pod.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gcs_emulator
import jax
import numpy as np
import pytest
import test_reliability as reliability
from etils import epath
from flax import nnx
from test_gcs_emulator import IN_PRIVATE_NETWORK, key, no_local_gs_folder, objects  # noqa: F401
from test_reliability import TrainProcess

from gpt2_jax import data as data_lib
from gpt2_jax import evaluate as evaluate_cli
from gpt2_jax import export, plot, runs, sample, storage
from gpt2_jax.hellaswag import load_hellaswag
from gpt2_jax.metrics import MetricsLogger, read_metrics
from gpt2_jax.training import setup as trainer
from gpt2_jax.training.settings import TrainConfig

pytestmark = pytest.mark.e2e  # train.py and the tools end to end against the emulated bucket

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds, for any one train.py process
STEPS = 24  # several checkpoints: in a bucket each save takes long enough for the kill to land mid-run
# test_reliability's 1-layer char model, on 2 fake CPU devices (each array saved as 2 shards), TensorBoard on.
FLAGS = {**reliability.FLAGS, "max_steps": STEPS, "keep_checkpoints": 2, "tensorboard": True, "mesh": "data:2",
         "local_device_count": 2}


def flags(data, out_dir, **overrides) -> list[str]:
    return reliability.flags(data, out_dir, **{**FLAGS, **overrides})


@pytest.fixture(scope="module")
def env(tmp_path_factory, gcs_emulator_env) -> dict:
    """train.py's environment: CPU, offline, the emulator, one JAX compilation cache for every process, and
    a cache folder of its own (where a bucket run would put the bundled corpus)."""
    return {**os.environ, **gcs_emulator_env, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax-cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "GPT2_JAX_CACHE": str(tmp_path_factory.mktemp("gpt2_jax-cache"))}


def train(args, env, stderr_path) -> TrainProcess:
    with TrainProcess(args, env=env, stderr_path=stderr_path) as p:
        p.finish(TIMEOUT)
    assert p.proc.returncode == 0, p.stderr[-3000:]
    return p


def committed_steps(env, run: str) -> list[int]:
    """Checkpoint steps whose commit marker is in the bucket (GCS has no rename: orbax writes
    `<step>/commit_success.txt` last)."""
    prefix = f"{key(run)}/checkpoints/"
    found = (re.fullmatch(r"(\d+)/commit_success\.txt", n.removeprefix(prefix)) for n in objects(env, prefix))
    return sorted(int(m.group(1)) for m in found if m)


def timeline(run) -> dict[int, float]:
    """step -> loss; when steps go back (a resumed run logs them again) the later rows count."""
    points: dict[int, float] = {}
    for row in read_metrics(epath.Path(str(run)) / runs.METRICS_FILE):
        if "loss" in row:
            points = {s: v for s, v in points.items() if s < row["step"]}
            points[row["step"]] = row["loss"]
    return points


def params_of(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_train_kill_resume_and_tools_in_a_bucket(tmp_path, char_data, env, gcs_dir, capsys):
    reference = tmp_path / "reference"  # the same flags, a local out_dir, never interrupted
    train(flags(char_data, reference), env, tmp_path / "ref.txt")

    run, data = f"{gcs_dir}/run", f"{gcs_dir}/data"  # the token shards in the bucket too (--data=gs://)
    for f in sorted(char_data.iterdir(), key=lambda p: p.name == "meta.json"):  # meta.json last
        (epath.Path(data) / f.name).write_bytes(f.read_bytes())
    args = flags(data, run)
    with TrainProcess(args, env=env, stderr_path=tmp_path / "1.txt") as p:
        deadline = time.monotonic() + TIMEOUT
        while not committed_steps(env, run) and p.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        p.send(signal.SIGKILL)
        assert p.finish() == -signal.SIGKILL, p.stderr[-3000:]
    newest = committed_steps(env, run)[-1]
    assert newest < STEPS, "the run ended before the kill; nothing was tested"
    cached = Path(env["GPT2_JAX_CACHE"]) / "data"
    assert list(cached.rglob("train_*.npy")), "the shards were not fetched into the local cache"
    shutil.rmtree(cached)  # a replaced host: the resumed run fetches the shards again

    p = train(args, env, tmp_path / "2.txt")
    p.wait_for(rf"resumed from {run}/checkpoints at step {newest}$")
    assert "Could not restore" not in p.stderr

    # Bit-identical to the local run: params, data position, every step's loss.
    model, tokenizer, meta = runs.load_run(run)
    ref_model, _, ref_meta = runs.load_run(reference)
    assert meta["step"] == ref_meta["step"] == STEPS and meta["loader"] == ref_meta["loader"]
    assert all(np.array_equal(a, b) for a, b in zip(params_of(model), params_of(ref_model), strict=True))
    assert timeline(run) == timeline(reference) and len(timeline(run)) == STEPS

    names = objects(env, key(run))
    for name in ("config.json", "metrics.jsonl", "loss.png", f"checkpoints/{STEPS}/commit_success.txt"):
        assert f"{key(run)}/{name}" in names, names
    events = [n for n in names if n.startswith(f"{key(run)}/tb/events.out.tfevents.")]
    assert 1 <= len(events) <= 2, names  # one per process (the killed one's if its upload finished)
    assert (epath.Path(f"gs://{gcs_emulator.BUCKET}") / events[-1]).read_bytes().count(b"loss") > 0
    assert json.loads(epath.Path(f"{run}/config.json").read_text())["train"]["out_dir"] == run
    assert not (Path(env["GPT2_JAX_CACHE"]) / "char-data").exists()  # --data given: no corpus prepared locally

    # The tools, on the run in the bucket.
    capsys.readouterr()
    assert sample.main([f"--init_from={run}", "--num_samples=1", "--max_new_tokens=8", "--temperature=0",
                        "--prompt=The"]) == 0
    assert "--- sample 0 ---\nThe" in capsys.readouterr().out
    assert evaluate_cli.main(["loss", f"--init_from={run}", f"--data={char_data}", "--batch_size=8",
                              "--block_size=32", "--max_batches=2", "--no_progress", f"--out={run}/eval.json"]) == 0
    assert json.loads(epath.Path(f"{run}/eval.json").read_text())["batches"] == 2

    assert export.main([run, "--to", f"{gcs_dir}/hf"]) == 0
    assert sorted(n.rsplit("/", 1)[1] for n in objects(env, f"{key(gcs_dir)}/hf/")) == [
        "config.json", runs.TOKENIZER_FILE, "model.safetensors"]
    # --init_from in a bucket gives its shape without reading the arrays (train.py --init_from=gs://...).
    assert runs.source_config(f"{gcs_dir}/hf").arch_diff(model.config) == []
    assert runs.source_config(run).arch_diff(model.config) == []
    hf_model, hf_tokenizer, hf_meta = runs.load_model(f"{gcs_dir}/hf")
    assert hf_meta == {"source": f"{gcs_dir}/hf"} and hf_tokenizer.chars == tokenizer.chars
    assert all(np.array_equal(a, b) for a, b in zip(params_of(hf_model), params_of(model), strict=True))

    epath.Path(f"{run}/loss.png").unlink()  # written by train.py at the end; the plot CLI writes it again
    assert plot.main([run]) == 0
    assert f"wrote {run}/loss.png" in capsys.readouterr().out
    assert epath.Path(f"{run}/loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_missing_bucket_fails_before_compiling(char_data, gcs_emulator_env, monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("setup went on to build the train step")

    monkeypatch.setattr(trainer, "build_step", no_compile)
    tc = TrainConfig(**{**FLAGS, "local_device_count": 0, "mesh": ""}, data=str(char_data),
                     out_dir="gs://no-such-bucket/run")
    t0 = time.monotonic()
    with pytest.raises(OSError, match=r"--out_dir=gs://no-such-bucket/run \(bucket 'no-such-bucket'\) \(no such "
                                      r"bucket\?\): FileNotFoundError"):
        trainer.setup(tc)
    assert time.monotonic() - t0 < 10
    assert not [n for n in objects(gcs_emulator_env, "") if n.startswith("no-such-bucket")]


def test_unreachable_storage_fails_within_the_probe_timeout(tmp_path, char_data, env):
    """Nothing listens on the storage port: train.py stops with the bucket and the connection error,
    after GPT2_JAX_STORAGE_TIMEOUT seconds (gcsfs alone would retry for ~33 s), before compiling."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    bad = {**env, "STORAGE_EMULATOR_HOST": closed, "TENSORSTORE_GCS_HTTP_URL": closed, "GPT2_JAX_STORAGE_TIMEOUT": "4"}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "train.py", *flags(char_data, f"gs://{gcs_emulator.BUCKET}/unreachable")],
                       cwd=ROOT, env=bad, capture_output=True, text=True, timeout=TIMEOUT)
    elapsed = time.monotonic() - t0
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"error: cannot reach --out_dir=gs://{gcs_emulator.BUCKET}/unreachable (bucket '{gcs_emulator.BUCKET}')" \
        in r.stderr, r.stderr[-3000:]
    assert "took more than 4 s" in r.stderr and "Cannot connect to host 127.0.0.1" in r.stderr, r.stderr[-3000:]
    assert "model char" not in r.stdout  # stopped before the model was built
    assert elapsed < 30, elapsed  # ~4 s probe + interpreter and JAX start-up


def test_bundled_corpus_goes_to_a_local_cache(tmp_path, gcs_dir, gcs_emulator_env, monkeypatch):
    """No --data and a bucket out_dir: the shards go to this machine's cache, not the bucket nor `gs:`."""
    monkeypatch.setenv("GPT2_JAX_CACHE", str(tmp_path / "cache"))
    out_dir = storage.run_path(f"{gcs_dir}/run")
    folder = trainer.prepare_data(TrainConfig(out_dir=str(out_dir)), out_dir)
    assert folder.parent == tmp_path / "cache" / "char-data" and (folder / data_lib.META_FILE).is_file()
    assert data_lib.Tokenizer.load(folder).name == "char"
    assert trainer.prepare_data(TrainConfig(out_dir=str(out_dir)), out_dir) == folder  # found again
    assert objects(gcs_emulator_env, key(gcs_dir)) == []
    with pytest.raises(FileNotFoundError, match=r"--data=gs://b/shards: gs://b/shards/meta.json is missing, so it "
                                                r"holds no finished dataset"):
        trainer.prepare_data(TrainConfig(data="gs://b/shards"), out_dir)


def test_metrics_logger_in_a_bucket_appends_across_runs(gcs_dir, gcs_emulator_env):
    """Whole-file uploads at sync/close; a second logger (a resumed run) downloads and appends, after
    cutting off a partial last line that a killed writer left."""
    with MetricsLogger(gcs_dir, tensorboard=True) as logger:
        logger.log(1, loss=2.5)
        assert objects(gcs_emulator_env, key(gcs_dir)) == []  # nothing uploaded before a sync
        logger.sync()
        assert read_metrics(f"{gcs_dir}/metrics.jsonl") == [{"step": 1, "loss": 2.5}]
        logger.log(2, loss=float("nan"))
    path = epath.Path(f"{gcs_dir}/metrics.jsonl")
    path.write_bytes(path.read_bytes() + b'{"step": 3, "lo')  # a killed writer's partial line
    with MetricsLogger(gcs_dir, tensorboard=False) as logger:
        logger.log(3, loss=2.0)
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3] and np.isnan(rows[1]["loss"]) and rows[2]["loss"] == 2.0
    names = objects(gcs_emulator_env, key(gcs_dir))
    assert len([n for n in names if "/tb/events.out.tfevents." in n]) == 1, names


def test_hellaswag_file_in_a_bucket(gcs_dir, hellaswag_file):
    lines = hellaswag_file.read_text().splitlines(keepends=True)[:3]
    epath.Path(f"{gcs_dir}/hellaswag.jsonl").write_text("".join(lines))
    assert load_hellaswag(f"{gcs_dir}/hellaswag.jsonl") == load_hellaswag(hellaswag_file, limit=3)


def test_a_bucket_path_without_gcsfs_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # `import gcsfs` raises ImportError
    with pytest.raises(ImportError, match=r'gs://b/run is in Cloud Storage, which needs gcsfs: pip install '
                                          r'"gpt2-jax\[gcs\]"'):
        storage.run_path("gs://b/run")
    with pytest.raises(ImportError, match=r"gpt2-jax\[gcs\]"):
        runs.load_model("gs://b/run")
    with pytest.raises(ValueError, match="s3://b/run: only local paths and gs:// buckets are supported"):
        storage.run_path("s3://b/run")


@pytest.mark.skipif(os.environ.get(IN_PRIVATE_NETWORK) == "1", reason="already inside the private network")
def test_in_private_network(tmp_path):
    """Reruns the tests above in a network namespace with nothing but loopback, emulator included: a client
    that tried to reach anything but 127.0.0.1 (storage.googleapis.com, a metadata server, a credential
    endpoint) would fail there instead of passing."""
    out = gcs_emulator.rerun_in_private_network(__file__, tmp_path / "inner", ROOT, timeout=900)
    assert "7 passed, 1 skipped" in out, out[-2000:]
