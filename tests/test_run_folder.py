"""The run folder (issue #18): one trainer per --out_dir (a lock, local and in a bucket), what out_dir already
holds against what was asked (--init_from, --max_steps), start-up checks that leave nothing behind, and the
derived defaults that follow the run (warmup, the sample prompt, a GPT-2 size on a CPU).

Subprocess tests (marked e2e) run train.py as a user does and check its exit status and message; the others
call `gpt2_jax.training.run` in this process (8 fake CPU devices, root conftest.py) on a 1-layer char model.
"""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_reliability import TrainProcess, complete_steps, flags, timeline
from tiny import tiny_train_config

from gpt2_jax import data as data_lib
from gpt2_jax import runlock, storage
from gpt2_jax.training import run
from gpt2_jax.training.settings import TrainConfig, parse_flags, resolve

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240


def tiny(out_dir, data, **overrides) -> TrainConfig:
    """The shared tiny run with one layer and two steps."""
    return tiny_train_config(out_dir, data, **{"n_layer": 1, "max_steps": 2, **overrides})


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("jax-cache")
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "HF_HUB_OFFLINE": "1"}


def train_py(*args, env, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def files_under(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. one trainer per folder -------------------------------------------------------------------


@pytest.mark.e2e
def test_a_second_trainer_on_the_folder_exits_at_once_naming_the_holder(tmp_path, char_data, env):
    """The issue's case: a run, then a second with another --n_layer on the same folder. The second exits 1
    before doing anything, naming the first (host, pid, start time); the first goes on, its checkpoints intact."""
    out = tmp_path / "run"
    with TrainProcess(flags(char_data, out, max_steps=10_000), env=env, stderr_path=tmp_path / "1.txt") as first:
        first.wait_for(r"^step +9/")
        before = complete_steps(out)
        t0 = time.monotonic()
        second = train_py(*flags(char_data, out, n_layer=3), env=env)
        assert second.returncode == 1, second.stderr[-3000:]
        assert time.monotonic() - t0 < 60
        message = second.stderr.strip().splitlines()[-1]
        assert message.startswith(f"error: --out_dir={out} is in use by another trainer (host "
                                  f"{socket.gethostname()}, pid {first.proc.pid}, started "), message
        assert "use another --out_dir" in message and "Traceback" not in second.stderr
        assert "deleting checkpoints" not in second.stderr + second.stdout
        assert set(before) <= set(complete_steps(out)) or before[-1] < complete_steps(out)[0]
        first.send(signal.SIGTERM)
        assert first.finish() == 128 + signal.SIGTERM, first.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["n_layer"] == 1  # the second run did not write its own
    assert not (out / runlock.LOCK_FILE).exists()  # released at exit


@pytest.mark.e2e
def test_a_held_folder_refuses_a_run_and_keeps_its_files(tmp_path, char_data):
    out = tmp_path / "run"
    run(tiny(out, char_data))
    held = runlock.LocalLock(storage.run_path(out))  # another trainer, as far as the run can tell
    try:
        before = files_under(out)
        with pytest.raises(runlock.RunFolderBusy, match=rf"--out_dir={out} is in use by another trainer \(host "
                                                        rf"{socket.gethostname()}, pid {os.getpid()}, started "):
            run(tiny(out, char_data, n_layer=3, max_steps=4))
        assert files_under(out) == before
    finally:
        held.release()
    run(tiny(out, char_data, max_steps=3))  # free again: it resumes


@pytest.mark.slow
def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, char_data, capsys):
    out = tmp_path / "run"
    out.mkdir()
    pid = dead_pid()
    (out / runlock.LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": pid,
                                                     "started_at": "2020-01-01T00:00:00+00:00"}))
    summary = run(tiny(out, char_data))
    assert summary["step"] == 2
    assert f"taking over the lock of a trainer that is gone (host {socket.gethostname()}, pid {pid}, started " \
           "2020-01-01T00:00:00+00:00)" in capsys.readouterr().out
    assert not (out / runlock.LOCK_FILE).exists()


def test_bucket_lock_one_holder_takeover_when_expired_or_dead_and_lost_lease(gcs_dir, monkeypatch, capsys):
    folder = storage.run_path(gcs_dir)
    lock = runlock.acquire(folder)
    try:
        with pytest.raises(runlock.RunFolderBusy, match=rf"--out_dir={gcs_dir} is in use by another trainer \(host "
                                                        rf"{socket.gethostname()}, pid {os.getpid()}, .* expires in "):
            runlock.acquire(folder)
    finally:
        lock.release()
    assert not (folder / runlock.LOCK_FILE).exists()

    # Expired (another host), then a dead process of this host: both taken over, and the takeover logged.
    for holder, why in [({"host": "elsewhere", "pid": 1, "expires": time.time() - 5}, r"it expired \d+ s ago"),
                        ({"host": socket.gethostname(), "pid": dead_pid(), "expires": time.time() + 600},
                         "its process is gone")]:
        (folder / runlock.LOCK_FILE).write_text(json.dumps(holder))
        lock = runlock.acquire(folder)
        log = capsys.readouterr().out
        assert f"taking over the lock of host {holder['host']}, pid {holder['pid']}" in log
        assert re.search(why, log), log
        assert json.loads((folder / runlock.LOCK_FILE).read_text())["pid"] == os.getpid()
        lock.release()

    # A run whose lease ran out and was taken over finds out at its next checkpoint.
    monkeypatch.setenv("GPT2_JAX_LOCK_LEASE", "0.4")
    lock = runlock.acquire(folder)
    (folder / runlock.LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1}))  # a new generation
    time.sleep(0.6)
    with pytest.raises(runlock.RunFolderBusy, match="another trainer took over the lock"):
        lock.check()
    lock.release()
    assert (folder / runlock.LOCK_FILE).exists()  # the new holder's, not deleted


def test_a_bucket_run_refuses_a_held_folder(tmp_path, char_data, gcs_dir):
    lock = runlock.acquire(storage.run_path(gcs_dir))
    try:
        with pytest.raises(runlock.RunFolderBusy, match=f"--out_dir={gcs_dir} is in use by another trainer"):
            run(tiny(gcs_dir, char_data))
    finally:
        lock.release()


# --- 2. what the user asked for is never silently dropped ---------------------------------------


@pytest.mark.e2e
def test_init_from_on_a_folder_that_holds_a_run_is_an_error(tmp_path, char_data):
    first, second = tmp_path / "first", tmp_path / "second"
    run(tiny(first, char_data))
    run(tiny(second, char_data))
    before = files_under(second)
    with pytest.raises(ValueError, match=rf"--init_from={first}: --out_dir={second} already holds a run "
                                         r"\(checkpoint of step 2, started from scratch\).*Use a new --out_dir to "
                                         r"start from --init_from, or drop --init_from to resume that run"):
        run(tiny(second, char_data, max_steps=4, init_from=str(first)))
    assert files_under(second) == before
    # The same command again resumes a run that started from --init_from.
    tuned = tmp_path / "tuned"
    run(tiny(tuned, char_data, init_from=str(first)))
    assert run(tiny(tuned, char_data, init_from=str(first), max_steps=3))["start_step"] == 2


@pytest.mark.e2e
def test_a_resume_past_max_steps_says_so(tmp_path, char_data, env):
    out = tmp_path / "run"
    run(tiny(out, char_data, max_steps=3))
    before = files_under(out)
    r = train_py(*flags(char_data, out, max_steps=2, mesh="", local_device_count=0), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"nothing to train: the run in {out} is at step 3 and --max_steps=2; raise --max_steps" in r.stdout
    assert files_under(out) == before  # no config.json with max_steps=2, no plot, no checkpoint


# --- 3. derived defaults follow the run ---------------------------------------------------------


@pytest.mark.parametrize("preset,backend,max_steps,warmup", [
    ("char", "cpu", 20, 2), ("char", "cpu", 0, 100), ("char", "gpu", 0, 500), ("char", "gpu", 50_000, 5000),
    ("gpt2", "gpu", 20, 2), ("gpt2", "gpu", 0, 715), ("gpt2-xl", "tpu", 5000, 500), ("gpt2", "cpu", 100_000, 715)])
def test_warmup_is_a_tenth_of_max_steps_capped_by_the_recipe(preset, backend, max_steps, warmup):
    assert resolve(TrainConfig(preset=preset, max_steps=max_steps), backend, 1).warmup_steps == warmup
    assert resolve(TrainConfig(preset=preset, max_steps=max_steps, warmup_steps=7), backend, 1).warmup_steps == 7


@pytest.mark.e2e
def test_a_short_run_warms_up_within_it(tmp_path, env):
    """The issue's case: `python train.py --max_steps=20` wrote warmup_steps 100 and ended at 2e-4 of its lr."""
    r = train_py("--max_steps=20", "--n_layer=1", "--eval_every=0", "--sample_every=0", "--tensorboard=false",
                 f"--out_dir={tmp_path / 'run'}", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["warmup_steps"] == 2


def test_the_warmup_help_says_so(capsys):
    with pytest.raises(SystemExit):
        parse_flags(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "10% of max_steps, at most 715 for GPT-2 sizes and 100 for char on CPU" in help_text


@pytest.mark.slow
def test_a_gpt2_size_on_a_cpu_names_the_batch_and_estimates_a_step(tmp_path, char_data, capsys):
    """`--preset=gpt2 --platform=cpu`: 2**19 tokens a step. The run says so at the start, and how long a step
    takes once one has run without its compile (here a 1-layer GPT-2 of 4 micro-steps a step)."""
    run(tiny(tmp_path / "run", char_data, preset="gpt2", total_batch_size=4 * 8 * 32, max_steps=3))
    out = " ".join(capsys.readouterr().out.split())
    assert ("note: gpt2 on a CPU: a step is --total_batch_size=1,024 tokens, 4 micro-steps of 8 x 32; it may take "
            "minutes or hours") in out and "e.g. --total_batch_size=256" in out
    assert re.search(r"a step takes about [\d.]+ (s|min|h) \(4 micro-steps of 8 x 32\): [\d.]+ (s|min|h) for "
                     r"--max_steps=3; a stop signal waits for the step in progress, then saves", out), out


@pytest.mark.e2e
def test_a_stop_signal_during_a_long_step_finishes_it_says_how_long_and_the_resume_is_exact(
        tmp_path, char_data, monkeypatch, capsys):
    """SIGTERM while step 4 (of 4 micro-steps) runs: the step is one program, so it finishes; the message says how
    long a step takes (timed on step 2); step 4 is checkpointed with its loader position, and the same command
    then ends bit-identical to a run never stopped."""
    flags_ = dict(total_batch_size=4 * 8 * 32, max_steps=6, dropout=0.1)
    straight = run(tiny(tmp_path / "straight", char_data, **flags_))
    calls = []

    def signalling(build):
        def build_(*args, **kwargs):
            built = build(*args, **kwargs)

            def fn(*a):
                calls.append(len(calls))
                if len(calls) == 4:  # step 4 is dispatched
                    os.kill(os.getpid(), signal.SIGTERM)
                return built.fn(*a)
            return dataclasses.replace(built, fn=fn)
        return build_

    from gpt2_jax.training import setup as setup_lib
    with monkeypatch.context() as m:
        m.setattr(setup_lib, "build_step", signalling(setup_lib.build_step))
        stopped = run(tiny(tmp_path / "run", char_data, **flags_))
    out = capsys.readouterr()
    assert stopped["interrupted"] == "SIGTERM" and stopped["step"] == 4
    assert len(calls) == 4  # no step after the signal's
    assert "stopped by SIGTERM after step 4; checkpoint saved in" in out.out
    assert re.search(r"SIGTERM: finishing this step and writing a checkpoint \(a step takes about [\d.]+ (s|min) "
                     r"here\)", out.err), out.err
    assert complete_steps(tmp_path / "run") == [4]
    resumed = run(tiny(tmp_path / "run", char_data, **flags_))
    assert resumed["start_step"] == 4 and resumed["step"] == 6
    assert timeline(tmp_path / "run") == timeline(tmp_path / "straight")
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), resumed["params"],
                        straight["params"])
    assert all(jax.tree.leaves(same))


# --- 4. --out_dir= ------------------------------------------------------------------------------


@pytest.mark.e2e
def test_empty_out_dir_is_a_usage_error(tmp_path, env):
    r = train_py("--out_dir=", "--max_steps=1", env=env, cwd=tmp_path)
    assert r.returncode == 2
    assert "--out_dir='' is empty (an unset shell variable?); give a folder" in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written into the current folder


# --- 5. the sample prompt, checked only where it is used -----------------------------------------


@pytest.fixture(scope="module")
def no_newline_data(tmp_path_factory) -> Path:
    """A char corpus without '\\n', the char models' default sample prompt."""
    folder = tmp_path_factory.mktemp("no-newline")
    data_lib.prepare_text_string(data_lib.default_corpus()[:50_000].replace("\n", " "), folder, tokenizer="char")
    return folder


@pytest.mark.e2e
def test_sample_prompt_is_checked_only_when_sampling(tmp_path, no_newline_data):
    assert run(tiny(tmp_path / "a", no_newline_data, sample_every=0))["step"] == 2
    with pytest.raises(ValueError, match=r"--sample_prompt \(empty: '\\n'\): character '\\n' is not in this "
                                         r"char-level vocabulary .*; set --sample_prompt, or --sample_every=0"):
        run(tiny(tmp_path / "b", no_newline_data, sample_every=1))
    assert not (tmp_path / "b").exists()
    run(tiny(tmp_path / "c", no_newline_data, sample_every=2, sample_prompt="The", sample_tokens=8))
    with pytest.raises(ValueError, match=r"--sample_prompt='x{32}' has 32 tokens; a sample needs 1 to 31, to leave "
                                         r"room in block_size 32"):
        run(tiny(tmp_path / "d", no_newline_data, sample_every=1, sample_prompt="x" * 32))


def test_the_default_bpe_prompt_fits_a_short_block(gpt2_bpe):
    """The issue's `--preset=gpt2 --block_size=64`: "must have 1 to 1 tokens", about flags nobody set. The
    prompt only has to fit the block; the sample then gets the room that is left."""
    from gpt2_jax.config import preset
    from gpt2_jax.tokenizer import Tokenizer
    from gpt2_jax.training.setup import sample_prompt

    ids = sample_prompt(TrainConfig(preset="gpt2", block_size=64), preset("gpt2", block_size=64), Tokenizer.gpt2())
    assert len(ids) == 8


def test_a_changed_data_folder_is_named_before_the_model(tmp_path, char_data, no_newline_data):
    """Other data may change the vocabulary too: the error names the data, not "the model config changed"."""
    out = tmp_path / "run"
    run(tiny(out, char_data))
    with pytest.raises(ValueError, match=rf"cannot resume: the data changed .*{no_newline_data.name}"):
        run(tiny(out, no_newline_data, max_steps=3, sample_every=1))


# --- 6. a failed start leaves nothing behind -----------------------------------------------------


@pytest.mark.e2e
def test_a_failed_start_leaves_no_out_dir(tmp_path, no_newline_data, env):
    out = tmp_path / "new" / "run"
    r = train_py(f"--data={no_newline_data}", f"--out_dir={out}", "--sample_every=5", "--max_steps=1", env=env)
    assert r.returncode == 1 and r.stderr.startswith("error: --sample_prompt (empty: '\\n')"), r.stderr[-3000:]
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    r = train_py(f"--data={no_newline_data}", f"--out_dir={existing}", "--sample_every=5", "--max_steps=1", env=env)
    assert r.returncode == 1
    assert list(existing.iterdir()) == []
