"""Weights & Biases (--wandb_project), offline (WANDB_MODE=offline): every metrics.jsonl row reaches the run's
history at its step, samples as a table, the resolved config as the run's config; a resumed run continues the
same run id; in a multi-process run only process 0 logs; without the package, one line naming the extra.

What W&B recorded is read back from its offline file (run-ID.wandb: a LevelDB-style log of protobuf records,
the format `wandb sync` uploads), not from a mock."""

import json
import math
import os
import struct
import sys
import time

import pytest
from test_reliability import TrainProcess, free_port
from tiny import TINY_RUN, tiny_train_config, train_flags

from gpt2_jax.metrics import WANDB_RUN_ID_FILE, MetricsLogger, read_metrics
from gpt2_jax.training.settings import TrainConfig

wandb = pytest.importorskip("wandb")  # the `wandb` extra
from wandb.proto import wandb_internal_pb2  # noqa: E402 -- only once wandb is known to be there


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline, its caches and settings in tmp_path (not the home folder)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    wandb.teardown()  # W&B reads the environment when it sets up, once per process: here, with these settings
    yield dict(os.environ)
    wandb.teardown()


def wandb_records(path):
    """The protobuf records of a .wandb file: a 7-byte header, then 32 KiB blocks of chunks, each
    (crc32: u32, length: u16, type: u8) + data; type 1 is a whole record, 2/3/4 its first/middle/last part."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def next_second() -> None:
    """Wait for the clock's next second: W&B names an offline run's folder by the second it starts and the run id,
    so a resume within the same second as its run (only a test is that fast) would write into the run's folder."""
    time.sleep(1 - time.time() % 1 + 0.01)


def offline_runs(wandb_dir):
    """[(run id, config, {step: {key: value}})] of each offline run folder under `wandb_dir`, oldest first."""
    runs = []
    for folder in sorted(wandb_dir.glob("wandb/offline-run-*")):
        (file,) = folder.glob("run-*.wandb")
        run_id, config, history = None, {}, {}
        for r in wandb_records(file):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run_id = r.run.run_id
                config = {u.key: json.loads(u.value_json) for u in r.run.config.update if u.key != "_wandb"}
            elif kind == "history":
                items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                history.setdefault(items["_step"], {}).update(items)
        runs.append((run_id, config, history))
    return runs


def assert_rows_logged(rows, history):
    """Each metrics.jsonl row's values are in W&B's history at the row's step (NaN where the row has null)."""
    for row in rows:
        logged = history[row["step"]]
        for key, value in row.items():
            if key == "step":
                continue
            if value is None or (isinstance(value, float) and math.isnan(value)):
                assert logged[key] in ("NaN", None) or math.isnan(logged[key]), (key, logged[key])
            else:
                assert logged[key] == pytest.approx(value, rel=1e-12, abs=0), (row["step"], key)


def test_logger_logs_every_row_samples_and_config_and_resumes_the_run(tmp_path, offline):
    config = {"train": {"max_lr": 6e-4}, "model": {"n_layer": 2}}
    opts = dict(project="proj", name="first", config=config)
    with MetricsLogger(tmp_path, tensorboard=False, wandb=opts) as logger:
        logger.log(1, loss=2.5, lr=1e-4, tokens_per_sec=1000.0)
        logger.log(1, val_loss=2.75)
        logger.log(2, loss=float("nan"), lr=2e-4)
        logger.log_samples(2, ["hello", "world"])
    run_id = (tmp_path / WANDB_RUN_ID_FILE).read_text().strip()
    next_second()
    with MetricsLogger(tmp_path, tensorboard=False, wandb=opts) as logger:  # a resumed run
        logger.log(3, loss=2.0, hellaswag_acc_norm=0.25)
    runs = offline_runs(tmp_path)
    assert [r[0] for r in runs] == [run_id, run_id]  # the same run, continued
    assert runs[0][1] == config
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert_rows_logged([r for r in rows if r["step"] < 3], runs[0][2])
    assert_rows_logged([r for r in rows if r["step"] == 3], runs[1][2])
    assert runs[0][2][2]["samples/_type"] == "table-file" and runs[0][2][2]["samples/nrows"] == 2
    (table,) = (tmp_path / "wandb").glob("offline-run-*/files/media/table/samples_2_*.table.json")
    assert json.loads(table.read_text())["data"] == [[2, 0, "hello"], [2, 1, "world"]]


def test_not_primary_logs_nothing(tmp_path, offline):
    with MetricsLogger(tmp_path, tensorboard=False, is_primary=False, wandb={"project": "p"}) as logger:
        logger.log(1, loss=1.0)
        logger.log_samples(1, ["x"])
    assert not (tmp_path / "wandb").exists() and not (tmp_path / WANDB_RUN_ID_FILE).exists()


def test_without_the_package_one_line_naming_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r'^--wandb_project needs Weights & Biases: pip install "gpt2-jax\[wandb\]"$'):
        TrainConfig(wandb_project="p")
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match=r'pip install "gpt2-jax\[wandb\]"'):
        MetricsLogger(tmp_path, tensorboard=False, wandb={"project": "p"})
    with pytest.raises(ValueError, match="--wandb_run_name and --wandb_entity name a run of a project: give "
                                         "--wandb_project too"):
        TrainConfig(wandb_run_name="x")


@pytest.mark.slow
def test_training_run_logs_its_rows_and_a_resume_continues_the_run(tmp_path, char_data, offline):
    from gpt2_jax.training import run

    out = tmp_path / "run"
    flags = dict(wandb_project="tiny", wandb_run_name="char", eval_every=2, eval_tokens=8 * 32 * 2, sample_every=2,
                 sample_tokens=4, checkpoint_every=2)
    run(tiny_train_config(out, char_data, max_steps=2, **flags))
    run(tiny_train_config(out, char_data, max_steps=4, **flags))  # resumed from step 2
    runs = offline_runs(out)
    run_id = (out / WANDB_RUN_ID_FILE).read_text().strip()
    assert [r[0] for r in runs] == [run_id, run_id]
    config = runs[1][1]
    assert config["train"]["max_steps"] == 4 and config["train"]["wandb_project"] == "tiny"
    assert config["model"]["n_layer"] == TINY_RUN["n_layer"]
    assert json.loads((out / "config.json").read_text()) == config  # the resolved config, as config.json
    rows = read_metrics(out / "metrics.jsonl")
    assert {r["step"] for r in rows} == {1, 2, 3, 4} and any("val_loss" in r for r in rows)
    assert_rows_logged([r for r in rows if r["step"] <= 2], runs[0][2])
    assert_rows_logged([r for r in rows if r["step"] > 2], runs[1][2])
    assert runs[1][2][4]["samples/nrows"] == 2  # --num_samples=2, a table


@pytest.mark.slow
@pytest.mark.e2e
def test_two_processes_only_process_0_logs(tmp_path, char_data, offline):
    out, port = tmp_path / "run", free_port()
    env = {**offline, "JAX_PLATFORMS": "cpu"}
    values = {**TINY_RUN, "platform": "cpu", "data": char_data, "out_dir": out, "max_steps": 2, "mesh": "data:2",
              "local_device_count": 1, "wandb_project": "tiny", "sample_every": 2, "sample_tokens": 4}
    procs = []
    try:
        for i in range(2):
            extra = {"distributed": "true", "num_processes": 2, "process_id": i,
                     "coordinator_address": f"127.0.0.1:{port}"}
            procs.append(TrainProcess(train_flags({**values, **extra}), env=env,
                                      stderr_path=tmp_path / f"err-{i}.txt"))
        codes = [p.finish(600) for p in procs]
    finally:
        for p in procs:
            p.__exit__()
    assert codes == [0, 0], [p.stderr[-2000:] for p in procs]
    runs = offline_runs(out)
    assert len(runs) == 1 and runs[0][0] == (out / WANDB_RUN_ID_FILE).read_text().strip()
    assert_rows_logged(read_metrics(out / "metrics.jsonl"), runs[0][2])


def test_online_without_an_api_key_is_one_line(tmp_path, offline, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "no-settings"))  # (no key stored there either)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    wandb.teardown()  # (as in `offline`)
    with pytest.raises(ValueError, match=r"Weights & Biases could not start the run \(UsageError: No API key "
                                         r".*run `wandb login`, or set WANDB_MODE=offline"):
        MetricsLogger(tmp_path, tensorboard=False, wandb={"project": "p"})


@pytest.mark.slow
def test_bucket_out_dir_keeps_the_run_id_there_and_uploads_the_offline_files(tmp_path, gcs_dir, offline):
    from etils import epath

    for attempt in range(2):  # a run, then its resume
        next_second()
        with MetricsLogger(gcs_dir, tensorboard=False, wandb={"project": "p"}) as logger:
            logger.log(attempt + 1, loss=1.0 + attempt)
    bucket = epath.Path(gcs_dir)
    run_id = (bucket / WANDB_RUN_ID_FILE).read_text().strip()
    local = tmp_path / "copy"  # the uploaded W&B files, read back from the bucket
    for f in (bucket / "wandb").glob("offline-run-*/run-*.wandb"):
        (local / "wandb" / f.parent.name).mkdir(parents=True)
        (local / "wandb" / f.parent.name / f.name).write_bytes(f.read_bytes())
    runs = offline_runs(local)
    assert [r[0] for r in runs] == [run_id, run_id]
    assert [sorted(r[2]) for r in runs] == [[1], [2]] and runs[1][2][2]["loss"] == 2.0
