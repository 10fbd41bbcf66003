"""Reliability (issue #6): signals, kill -9, damaged checkpoints, resuming on another mesh, non-finite
losses, resume checks and multi-process runs, each through `train.py` as a user runs it.

Anything involving a signal, a kill or a second process runs train.py in a subprocess with 8 fake CPU
devices (`--local_device_count=8`); the other tests call `training.run` in this pytest process (8 fake
devices, root conftest.py). Every subprocess has a timeout. The subprocesses share a JAX persistent
compilation cache (a temp folder), which only saves compile time: a cached executable is the same
program, so bit-for-bit comparisons between runs are unaffected.

Two tolerances: a run resumed on the same mesh must be bit-identical to an uninterrupted one (same
program, same inputs, XLA:CPU is deterministic); a run on another mesh or process count reduces
gradients in another order, so it matches to 1e-5 (losses, absolute; params, relative), as in
tests/test_train.py.
"""

import functools
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import TINY_RUN, train_flags

from gpt2_jax.metrics import read_metrics
from gpt2_jax.runs import load_run
from gpt2_jax.training import run
from gpt2_jax.training import step as trainer  # (the train step's builder and its GPT)
from gpt2_jax.training.settings import TrainConfig

# A damaged checkpoint makes tensorstore call back into orbax's closed event loop after the failed
# read: Python reports an ignored "Event loop is closed". Harmless (see tests/test_checkpoint.py).
pytestmark = pytest.mark.filterwarnings("ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning")

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds, for any one train.py process (typically 5-15 s)
STEPS = 16  # long enough that a signal sent after step 3 lands well before the end (~10 ms a step + saves)
LOSS_ATOL = 1e-5  # another mesh or process count: another reduction order (see tests/test_train.py)
PARAM_RTOL = 1e-5

# The tiny char run with 1 layer, on 8 devices; the reference run checkpoints every 4 steps and keeps 3.
FLAGS = dict(TINY_RUN, platform="cpu", n_layer=1, max_steps=STEPS, warmup_steps=2, checkpoint_every=4,
             keep_checkpoints=3, mesh="data:8")


def flags(data, out_dir, **overrides) -> list[str]:
    return train_flags({**FLAGS, "data": data, "out_dir": out_dir, "local_device_count": 8, **overrides})


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """Environment of the train.py subprocesses: CPU, offline, one compilation cache for all of them (the
    first run compiles, the next ones start in seconds; JAX reads a damaged entry as a cache miss)."""
    cache = tmp_path_factory.mktemp("jax-cache")
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "HF_HUB_OFFLINE": "1"}


class TrainProcess:
    """`python train.py ARGS` in a subprocess. A thread collects its stdout lines, so a test can wait
    for a line (with a timeout) and then signal the process; stderr goes to a file. As a context
    manager it kills the process on the way out, whatever happened."""

    def __init__(self, args, *, env, stderr_path, script: str | None = None):
        """script: Python code to run instead of train.py (it gets `args` as sys.argv[1:])."""
        self.stderr_path = Path(stderr_path)
        program = ["-c", script] if script else [str(ROOT / "train.py")]
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-u", *program, *map(str, args)], cwd=ROOT,
                                         env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        """The first stdout line matching `pattern`, waiting for it as long as `timeout`."""
        deadline, seen = time.monotonic() + timeout, 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if m := re.search(pattern, line):
                        return m
                seen = len(self.lines)
                if not self._reader.is_alive() or time.monotonic() > deadline:
                    raise AssertionError(f"no stdout line matching {pattern!r} (exit status {self.proc.poll()}); "
                                         f"stdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}")
                self._cond.wait(0.1)

    def finish(self, timeout: float = TIMEOUT) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(timeout)
        return rc

    def send(self, *signals):
        for s in signals:
            os.kill(self.proc.pid, s)

    @property
    def stdout(self) -> str:
        return "".join(self.lines)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def train(args, env, stderr_path, timeout=TIMEOUT) -> TrainProcess:
    """Run train.py to the end; returns the finished process (exit status in .proc.returncode)."""
    with TrainProcess(args, env=env, stderr_path=stderr_path) as p:
        p.finish(timeout)
    return p


def complete_steps(out_dir) -> list[int]:
    """Checkpoint steps on disk that orbax committed (a bare number; saves in flight are `N.orbax-checkpoint-tmp`)."""
    folder = Path(out_dir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def timeline(out_dir, key="loss") -> dict[int, float]:
    """step -> value from metrics.jsonl. A resumed run logs again the steps after its checkpoint; as in
    gpt2_jax.plot, when steps go back the later rows replace the earlier ones from that step on."""
    points: dict[int, float] = {}
    for row in read_metrics(Path(out_dir) / "metrics.jsonl"):
        if key in row:
            points = {s: v for s, v in points.items() if s < row["step"]}
            points[row["step"]] = row[key]
    return points


@functools.cache  # read once a run has finished; the reference run is read by several tests
def final_state(out_dir):
    """(params as a list of numpy arrays, checkpoint meta) of the newest checkpoint of a run."""
    model, _, meta = load_run(out_dir)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))], meta


def assert_bit_identical(out_dir, reference):
    params, meta = final_state(out_dir)
    ref_params, ref_meta = final_state(reference)
    assert meta["step"] == ref_meta["step"] == STEPS
    assert meta["loader"] == ref_meta["loader"]
    assert all(np.array_equal(a, b) for a, b in zip(params, ref_params, strict=True)), "params differ"
    assert timeline(out_dir) == timeline(reference)  # exact floats, every step


def max_rel_err(a, b) -> float:
    """||a - b|| / ||b|| over all parameters at once (per tensor is noisy: see tests/test_train.py)."""
    a, b = np.concatenate([x.ravel() for x in a]), np.concatenate([x.ravel() for x in b])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, char_data, env) -> Path:
    """An uninterrupted 8-device run of STEPS steps: checkpoints at 8, 12, 16."""
    out = tmp_path_factory.mktemp("reference")
    p = train(flags(char_data, out), env, out / "stderr.txt")
    assert p.proc.returncode == 0, p.stderr[-3000:]
    assert complete_steps(out) == [8, 12, 16]  # keep_checkpoints=3 removed the older ones
    return out


def copy_run(reference, out_dir) -> Path:
    shutil.copytree(reference / "checkpoints", out_dir / "checkpoints")
    shutil.copy(reference / "metrics.jsonl", out_dir / "metrics.jsonl")
    return out_dir


# --- 1. SIGTERM / SIGINT ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_signal_stops_cleanly_second_signal_at_once_then_resume(tmp_path, char_data, env, reference):
    """SIGTERM: the step finishes, a checkpoint of it is written, exit 143 with how to resume. Then, in
    the resumed run, two signals at once (SIGINT and SIGTERM while the process is stopped, so both are
    pending together): exit at once, with 130 or 143 by which is handled second. The third start resumes
    from the newest complete checkpoint and ends bit-identical to the uninterrupted run."""
    out = tmp_path / "run"
    with TrainProcess(flags(char_data, out), env=env, stderr_path=tmp_path / "1.txt") as p:
        p.wait_for(rf"^step +3/{STEPS} ")
        p.send(signal.SIGTERM)
        assert p.finish() == 128 + signal.SIGTERM, p.stderr[-3000:]
    stopped = int(p.wait_for(r"stopped by SIGTERM after step (\d+); checkpoint saved in .*Resume with the same "
                             r"command").group(1))
    assert 3 <= stopped < STEPS
    assert "SIGTERM: finishing this step and writing a checkpoint" in p.stderr
    assert complete_steps(out)[-1] == stopped  # the step it stopped after, not the last periodic one
    assert_no_traceback_of_ours(p.stderr)

    with TrainProcess(flags(char_data, out), env=env, stderr_path=tmp_path / "2.txt") as p:
        p.wait_for(rf"resumed from .* at step {stopped}$")
        p.wait_for(rf"^step +{stopped + 2}/{STEPS} ")
        p.send(signal.SIGSTOP, signal.SIGINT, signal.SIGTERM, signal.SIGCONT)
        assert p.finish() in (128 + signal.SIGINT, 128 + signal.SIGTERM), p.stderr[-3000:]
    assert re.search(r"second signal \(SIG(INT|TERM)\): exiting now", p.stderr), p.stderr[-3000:]
    assert "stopped by" not in p.stdout  # it did not wait for the step and a save
    names = [d.name for d in (out / "checkpoints").iterdir()]
    assert all(n.isdigit() or n.endswith(".orbax-checkpoint-tmp") for n in names), names
    newest = complete_steps(out)[-1]

    p = train(flags(char_data, out), env, tmp_path / "3.txt")
    assert p.proc.returncode == 0, p.stderr[-3000:]
    p.wait_for(rf"resumed from .* at step {newest}$")  # the newest complete one: it restores cleanly
    assert "Could not restore" not in p.stderr
    assert_bit_identical(out, reference)


# --- 2. kill -9 -------------------------------------------------------------------------------------


class CheckpointWatcher(threading.Thread):
    """Lists a checkpoint folder about every millisecond and records every set of complete steps seen,
    to check that an old checkpoint is deleted only once a newer one is complete."""

    def __init__(self, out_dir):
        super().__init__(daemon=True)
        self.out_dir, self.seen, self.done = out_dir, [], threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                steps = complete_steps(self.out_dir)
            except FileNotFoundError:  # a folder deleted while listing
                continue
            if not self.seen or steps != self.seen[-1]:
                self.seen.append(steps)
            time.sleep(0.001)


@pytest.mark.e2e
def test_kill_9_resumes_from_last_complete_checkpoint_bit_identical(tmp_path, char_data, env, reference):
    """SIGKILL mid-run (a checkpoint every 2 steps, keep_checkpoints=1, so saves and deletions overlap the
    kill): the next start resumes from the newest complete checkpoint, never a partial one, and ends
    with the same params, data position and per-step losses as the uninterrupted run (metrics.jsonl
    holds the re-run steps twice; the later rows count). While the run is going, a watcher checks that
    there is always a complete checkpoint once the first was written: the old one is removed only
    after the newer one is complete."""
    out = tmp_path / "run"
    args = flags(char_data, out, checkpoint_every=2, keep_checkpoints=1)
    watcher = CheckpointWatcher(out)
    watcher.start()
    try:
        with TrainProcess(args, env=env, stderr_path=tmp_path / "1.txt") as p:
            p.wait_for(rf"^step +3/{STEPS} ")
            deadline = time.monotonic() + TIMEOUT
            while not complete_steps(out) and time.monotonic() < deadline:
                time.sleep(0.005)  # the first async save may still be writing
            p.send(signal.SIGKILL)
            assert p.finish() == -signal.SIGKILL
        newest = complete_steps(out)[-1]
        assert newest < STEPS, "the run ended before the kill; nothing was tested"

        p = train(args, env, tmp_path / "2.txt")
    finally:
        watcher.done.set()
        watcher.join()
    assert p.proc.returncode == 0, p.stderr[-3000:]
    p.wait_for(rf"resumed from .* at step {newest}$")
    assert "Could not restore" not in p.stderr
    first = next(i for i, steps in enumerate(watcher.seen) if steps)
    assert all(watcher.seen[first:]), f"no complete checkpoint for a moment: {watcher.seen}"
    assert len(watcher.seen) >= 5  # it saw saves and deletions come and go
    assert complete_steps(out) == [STEPS]  # keep_checkpoints=1
    assert_bit_identical(out, reference)


# --- 3. damaged checkpoints -------------------------------------------------------------------------


def assert_no_traceback_of_ours(stderr: str) -> None:
    """Errors reach the user as one message, never as a traceback through this project's code. (At
    interpreter exit after a failed restore, tensorstore's asyncio threads may print "Event loop is
    closed" tracebacks of their own; those are library noise, not ours.)"""
    frames = re.findall(r'File "[^"]*(?:gpt2_jax/|train\.py)[^"]*"', stderr)
    assert not frames, stderr[-3000:]


def damage(step_dir: Path, how: str) -> None:
    """Truncate every array data file of a checkpoint (the files in OCDBT `d/` folders) to half, or delete
    them. Every file, not just the largest: which byte ranges a restore reads depends on the layout
    orbax chose, and a file whose damaged half holds nothing that is read would not break the step."""
    data_files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert data_files, f"no array data files under {step_dir}"
    for f in data_files:
        if how == "truncate":
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
        else:
            f.unlink()


@pytest.mark.e2e
def test_damaged_checkpoints_fall_back_with_a_warning_or_stop_with_an_error(tmp_path, char_data, env, reference):
    """Newest checkpoint truncated, the one before missing a file: train.py warns about each (naming the
    step, its folder and the error), resumes from the one before those and ends bit-identical to the
    uninterrupted run; the damaged steps are replaced, keep_checkpoints old ones kept. With every
    checkpoint damaged it stops with an error that lists them, not a traceback."""
    out = copy_run(reference, tmp_path / "run")
    damage(out / "checkpoints" / "16", "truncate")
    damage(out / "checkpoints" / "12", "delete")
    p = train(flags(char_data, out), env, tmp_path / "1.txt")
    assert p.proc.returncode == 0, p.stderr[-3000:]
    for step in (16, 12):
        assert re.search(rf"Could not restore checkpoint step {step} \(.*checkpoints/{step}\): \w+", p.stderr), \
            p.stderr[-3000:]
    p.wait_for(r"resumed from .* at step 8 \(could not restore the newer checkpoints \[12, 16\]: see the warnings")
    assert "deleting checkpoints [12, 16]" in p.stderr  # the damaged ones, replaced by the new saves
    assert complete_steps(out) == [8, 12, 16]
    assert_bit_identical(out, reference)

    for step, how in ((8, "delete"), (12, "truncate"), (16, "truncate")):
        damage(out / "checkpoints" / str(step), how)
    p = train(flags(char_data, out), env, tmp_path / "2.txt")
    assert p.proc.returncode == 1, p.stderr[-3000:]
    assert re.search(r"error: cannot resume: None of the 3 checkpoints in .*checkpoints could be restored", p.stderr)
    assert all(f"step {s} (" in p.stderr for s in (8, 12, 16)) and "to start over" in p.stderr
    assert_no_traceback_of_ours(p.stderr)


# --- 4. another device count or mesh ----------------------------------------------------------------


@pytest.mark.e2e
def test_resume_on_other_device_counts_and_meshes(tmp_path, char_data, reference):
    """Steps 1-8 on 8 devices (the reference run), 9-12 on 1 device (data:1), 13-16 on 4 devices with
    FSDP (data:2,fsdp:2): the same losses and final params as the uninterrupted 8-device run (1e-5)."""
    base = dict(FLAGS)
    one = tmp_path / "one"
    (one / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "8", one / "checkpoints" / "8")
    summary = run(TrainConfig(**{**base, "data": str(char_data), "out_dir": str(one), "mesh": "data:1"}))
    assert summary["start_step"] == 8

    four = tmp_path / "four"
    (four / "checkpoints").mkdir(parents=True)
    shutil.copytree(one / "checkpoints" / "12", four / "checkpoints" / "12")
    summary = run(TrainConfig(**{**base, "data": str(char_data), "out_dir": str(four), "mesh": "data:2,fsdp:2"}))
    assert summary["start_step"] == 12
    kernel = summary["params"]["h"]["mlp"]["c_fc"]["kernel"][...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)  # really sharded
    assert len(kernel.sharding.device_set) == 4

    ref = timeline(reference)
    resumed = {s: v for s, v in timeline(one).items() if s <= 12} | timeline(four)
    assert sorted(resumed) == list(range(9, STEPS + 1))
    np.testing.assert_allclose([resumed[s] for s in sorted(resumed)], [ref[s] for s in sorted(resumed)],
                               atol=LOSS_ATOL, rtol=0)
    assert max_rel_err(final_state(four)[0], final_state(reference)[0]) <= PARAM_RTOL


# --- 5. non-finite loss -----------------------------------------------------------------------------
# No test-only code path: --max_lr=1e10 makes step 1's AdamW update (~lr per weight) blow the weights up
# to ~1e10, so step 2's forward pass overflows float32 (squares of ~1e10 activations in LayerNorm and
# the logits) and its loss is NaN, on every run. Every later step is NaN as well (the weights stay).


NAN = dict(max_lr=1e10, warmup_steps=1, max_steps=3, checkpoint_every=1, keep_checkpoints=5)


@pytest.mark.e2e
def test_nan_stop_keeps_last_good_checkpoint(tmp_path, char_data, env):
    out = tmp_path / "run"
    p = train(flags(char_data, out, **NAN, on_nan="stop"), env, tmp_path / "stderr.txt")
    assert p.proc.returncode == 1, p.stderr[-3000:]
    assert re.search(r"error: non-finite loss or gradient norm at step 2 \(loss nan.*the update was not applied. "
                     r"Last good checkpoint: step 1 in .*checkpoints\. .*--on_nan=skip", p.stderr), p.stderr[-3000:]
    assert_no_traceback_of_ours(p.stderr)
    assert complete_steps(out) == [1]
    assert sorted(timeline(out)) == [1]


@pytest.mark.e2e
def test_nan_skip_drops_the_update_counts_it_and_goes_on(tmp_path, char_data, env):
    out = tmp_path / "run"
    p = train(flags(char_data, out, **NAN, on_nan="skip"), env, tmp_path / "stderr.txt")
    assert p.proc.returncode == 0, p.stderr[-3000:]  # training went on to the end
    p.wait_for(r"^step 3: non-finite loss or gradient norm; update skipped \(--on_nan=skip, 2 skipped so far\)")
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r.get("skipped_steps", 0) for r in rows] == [0, 1, 2]
    assert np.isfinite(rows[0]["loss"]) and all(np.isnan(r["loss"]) for r in rows[1:])
    assert len({r["lr"] for r in rows}) == 1  # the schedule did not advance: no update was applied
    # The updates were dropped: step 3's checkpoint holds step 1's params, but the data moved on.
    after1, _, meta1 = load_run(out, step=1)
    after3, _, meta3 = load_run(out, step=3)
    same = jax.tree.map(np.array_equal, nnx.state(after1, nnx.Param), nnx.state(after3, nnx.Param))
    assert all(jax.tree.leaves(same))
    where = lambda meta: tuple(meta["loader"][k] for k in ("epoch", "shard_pos", "index"))  # noqa: E731 (shuffle order)
    assert meta3["skipped_steps"] == 2 and where(meta3) > where(meta1)


@pytest.mark.e2e
def test_nan_skip_stops_after_max_skips_in_a_row(tmp_path, char_data, env):
    """--on_nan=skip is not a licence to skip forever: more than --max_skips non-finite steps in a row stop
    the run as --on_nan=stop does (exit status 1, the last good checkpoint kept)."""
    out = tmp_path / "run"
    p = train(flags(char_data, out, **NAN, on_nan="skip", max_skips=1), env, tmp_path / "stderr.txt")
    assert p.proc.returncode == 1, p.stderr[-3000:]
    p.wait_for(r"^step 2: .*update skipped \(--on_nan=skip, 1 skipped so far\), 1 in a row of at most --max_skips=1")
    assert re.search(r"error: non-finite loss or gradient norm at 2 steps in a row \(2-3\), more than --max_skips=1: "
                     r"the run has likely diverged \(step 3: loss nan.*\); the update was not applied. Last good "
                     r"checkpoint: step 2 in .*checkpoints\. Lower --max_lr, or raise --max_skips", p.stderr), \
        p.stderr[-3000:]
    assert_no_traceback_of_ours(p.stderr)
    assert complete_steps(out) == [1, 2]  # step 2 skipped its update and was saved; step 3 stopped the run
    assert sorted(timeline(out)) == [1, 2]


POISON = -1  # a label id that no batch holds


def nan_at(monkeypatch, steps) -> None:
    """Make the loss NaN at `steps` (1-based) only, inside the jitted train step as a real overflow would
    be. (--max_lr=1e10 above cannot interleave finite steps: the blown-up weights stay.) Those steps'
    labels are replaced by POISON, and the trainer's loss (GPT.loss) is NaN for a batch of POISON labels."""
    real_loss, real_make = trainer.GPT.loss, trainer.make_train_step

    def loss(model, idx, targets, vocab_limit=None, **kwargs):
        return jnp.where(jnp.all(targets == POISON), jnp.nan, real_loss(model, idx, targets, vocab_limit, **kwargs))

    def make_train_step(*args, **kwargs):
        step_fn, calls = real_make(*args, **kwargs), itertools.count(1)

        def poisoned(state, x, y, rng):
            if next(calls) in steps:
                y = jax.device_put(np.full(y.shape, POISON, y.dtype), y.sharding)
            return step_fn(state, x, y, rng)

        return poisoned

    monkeypatch.setattr(trainer.GPT, "loss", loss)
    monkeypatch.setattr(trainer, "make_train_step", make_train_step)


@pytest.mark.e2e
def test_nan_skip_count_restarts_after_a_finite_step(tmp_path, char_data, monkeypatch, capsys):
    """--max_skips counts CONSECUTIVE skips: NaN at steps 2, 3, 5, 6 with --max_skips=2 runs to the end
    (4 skips, never more than 2 in a row), while NaN at 2, 3, 4 stops at step 4."""
    config = dict(FLAGS, data=str(char_data), max_steps=7, checkpoint_every=0, on_nan="skip", max_skips=2)
    nan_at(monkeypatch, {2, 3, 5, 6})
    summary = run(TrainConfig(**config, out_dir=str(tmp_path / "gaps")))
    assert (summary["step"], summary["skipped_steps"]) == (7, 4)
    rows = [r for r in read_metrics(tmp_path / "gaps" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows if np.isnan(r["loss"])] == [2, 3, 5, 6]
    stdout = capsys.readouterr().out
    assert "step 5: non-finite loss or gradient norm; update skipped (--on_nan=skip, 3 skipped so far), 1 in a row " \
           "of at most --max_skips=2" in stdout, stdout

    monkeypatch.undo()  # the control: the same skips without the finite step 4 in between stop the run
    nan_at(monkeypatch, {2, 3, 4})
    with pytest.raises(FloatingPointError, match=r"at 3 steps in a row \(2-4\), more than --max_skips=2"):
        run(TrainConfig(**config, out_dir=str(tmp_path / "streak")))


def test_max_skips_must_not_be_negative(tmp_path, char_data):
    with pytest.raises(ValueError, match=r"--max_skips=-1 is negative.*\(0: no limit\)"):
        run(TrainConfig(**dict(FLAGS, data=str(char_data), out_dir=str(tmp_path), on_nan="skip", max_skips=-1)))


# --- 6. resume checks on the command line -----------------------------------------------------------


@pytest.mark.e2e
def test_cli_resume_with_changed_model_or_data(tmp_path, char_data, env, reference):
    out = copy_run(reference, tmp_path / "run")
    p = train(flags(char_data, out, n_embd=64), env, tmp_path / "1.txt")
    assert p.proc.returncode == 1
    assert "error: cannot resume: the model config changed (n_embd: checkpoint 32 vs now 64)" in p.stderr, p.stderr
    assert_no_traceback_of_ours(p.stderr)

    other = tmp_path / "other-data"
    shutil.copytree(char_data, other)  # the same tokens in another folder: still another dataset
    p = train(flags(other, out), env, tmp_path / "2.txt")
    assert p.proc.returncode == 1
    assert re.search(rf"error: cannot resume: the data changed \(checkpoint trained on {re.escape(str(char_data))}, "
                     rf"now {re.escape(str(other))}", p.stderr), p.stderr
    assert_no_traceback_of_ours(p.stderr)
    assert complete_steps(out) == [8, 12, 16]  # untouched


# --- 7. several processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_two_processes_train_like_one(tmp_path, char_data, reference):
    """Two processes with 4 CPU devices each (gloo collectives) == one process with 8 devices: losses
    and final params to 1e-5. Only process 0 logs, writes metrics.jsonl and plots; both save their
    shards of each checkpoint, which one process restores."""
    out = tmp_path / "run"
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}  # no shared compile cache
    procs = []
    try:
        for i in range(2):
            args = flags(char_data, out, local_device_count=4, distributed=True, num_processes=2, process_id=i,
                         coordinator_address=f"127.0.0.1:{port}")
            procs.append(TrainProcess(args, env=env, stderr_path=tmp_path / f"{i}.txt"))
        codes = [p.finish(2 * TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.__exit__()
    assert codes == [0, 0], [p.stderr[-2000:] for p in procs]
    assert f"step {STEPS}/{STEPS}" in procs[0].stdout and "plot:" in procs[0].stdout
    assert "step" not in procs[1].stdout and "plot:" not in procs[1].stdout
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # one writer: no line twice
    ref = timeline(reference)
    np.testing.assert_allclose([r["loss"] for r in rows], [ref[s] for s in range(1, STEPS + 1)], atol=LOSS_ATOL,
                               rtol=0)
    assert complete_steps(out) == [8, 12, 16]
    params, meta = final_state(out)
    assert meta["loader"] == final_state(reference)[1]["loader"]
    assert max_rel_err(params, final_state(reference)[0]) <= PARAM_RTOL


# Process 1 of a run that resumes sees no checkpoint (a stale listing of an eventually consistent store),
# process 0 sees them all; then it runs train.py.
STALE_LISTING = """
import runpy, sys
from gpt2_jax.checkpoint import Checkpointer
if "--process_id=1" in sys.argv:
    Checkpointer._list_steps = lambda self: []
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.e2e
def test_processes_follow_process_0_when_their_listings_differ(tmp_path, char_data, reference):
    """Resume, start fresh and which step to restore are decided by process 0 and broadcast: with a
    process that sees no checkpoint, both resume from step 8 and end equal to the uninterrupted run."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "metrics.jsonl").unlink()
    for step in (12, 16):
        shutil.rmtree(out / "checkpoints" / str(step))
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    procs = []
    try:
        for i in range(2):
            args = flags(char_data, out, local_device_count=4, distributed=True, num_processes=2, process_id=i,
                         coordinator_address=f"127.0.0.1:{port}")
            procs.append(TrainProcess(args, env=env, stderr_path=tmp_path / f"{i}.txt", script=STALE_LISTING))
        codes = [p.finish(2 * TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.__exit__()
    assert codes == [0, 0], [p.stderr[-2000:] for p in procs]
    assert "resumed from" in procs[0].stdout and "at step 8" in procs[0].stdout
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(9, STEPS + 1))
    ref = timeline(reference)
    np.testing.assert_allclose([r["loss"] for r in rows], [ref[s] for s in range(9, STEPS + 1)], atol=LOSS_ATOL,
                               rtol=0)
    assert max_rel_err(final_state(out)[0], final_state(reference)[0]) <= PARAM_RTOL
