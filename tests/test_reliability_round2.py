"""Reliability, round 2 (issue #28): a failed checkpoint save never hangs, export never overwrites a folder it did
not write, many shards under a low open-file limit are not "corrupt", and the start-up errors of every CLI are one
line that names the flag and the fix (a gs:// path that cannot be reached, an interrupt, an OS error, a wrong kind
of --data, garbage metrics, numbers that overflow).

Subprocesses are used where the point is the process itself (it exits, its exit status, its open-file limit) and
marked e2e; the rest run in this process. No test contacts anything but 127.0.0.1; the timeouts only detect a hang.
"""

import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tiny import TINY_RUN, private_mount_works, tiny_train_config, train_flags

ROOT = Path(__file__).resolve().parents[1]
ONE_LAYER = dict(n_layer=1, mesh="data:1")
HANG = 240  # seconds: far more than any of these takes on a loaded machine; only a hang reaches it


def _long_folder(base: Path, total: int) -> Path:
    """A folder path of about `total` characters under `base` (components of 200: each is a legal name)."""
    path = str(base)
    while len(path) < total - 201:
        path += "/" + "d" * 200
    return Path(path + "/" + "e" * (total - len(path) - 1))


def _save_too_long(folder: Path) -> str:
    """A Python program that saves a checkpoint into `folder` with the start-up probe switched off: the save
    itself meets ENAMETOOLONG (in orbax's background threads). It prints the error and returns."""
    return f"""
import jax.numpy as jnp
import gpt2_jax.checkpoint as C
C._probe = lambda directory: None
ckpt = C.Checkpointer({str(folder)!r}, async_save=True)
for call in (lambda: ckpt.save(1, {{"w": jnp.arange(4.0)}}, {{"step": 1}}), ckpt.wait, ckpt.close):
    try:
        call()
    except OSError as e:
        print(f"{{type(e).__name__}} {{e.errno}}: {{e}}")
        break
"""


# ------------------------------------------------------------------------------------- a failed save (BAD 1)


@pytest.mark.e2e
def test_a_failed_save_ends_the_process(tmp_path):
    """A save whose paths pass the system's limit used to print an error and then keep the process alive (orbax's
    save threads waited 300 s, more than once, for a signal from the step that failed). Now one error naming the
    folder and the fix, and the process ends."""
    folder = _long_folder(tmp_path, os.pathconf("/", "PC_PATH_MAX") - 60) / "checkpoints"
    r = subprocess.run([sys.executable, "-c", _save_too_long(folder)], cwd=ROOT, capture_output=True, text=True,
                       timeout=HANG, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"CheckpointWriteError {errno.ENAMETOOLONG}: checkpoint 1 could "
                                                   f"not be written to {folder}: [Errno 36] File name too long. The "
                                                   "checkpoints already there are intact"), r.stdout
    assert "pass a shorter --out_dir" in lines[0]
    assert "ERROR:absl" not in r.stderr, r.stderr[-3000:]  # orbax's own tracebacks of it: reported once, above
    assert not list(folder.glob("*.orbax-checkpoint-tmp"))


def test_a_failed_save_releases_orbax_threads(tmp_path):
    """The same in this process: after the error, no orbax save thread is left waiting."""
    import jax.numpy as jnp

    import gpt2_jax.checkpoint as checkpoint

    folder = _long_folder(tmp_path, os.pathconf("/", "PC_PATH_MAX") - 60) / "checkpoints"
    probe = checkpoint._probe
    checkpoint._probe = lambda directory: None
    try:
        ckpt = checkpoint.Checkpointer(folder, async_save=True)
    finally:
        checkpoint._probe = probe
    with pytest.raises(checkpoint.CheckpointWriteError) as e:
        ckpt.save(1, {"w": jnp.arange(4.0)}, {"step": 1})
        ckpt.wait()
    assert e.value.errno == errno.ENAMETOOLONG and "\n" not in str(e.value)
    try:  # (raises the error again where the failure reached orbax's background thread first)
        ckpt.close()
    except checkpoint.CheckpointWriteError:
        pass
    waiting = [t for t in threading.enumerate() if isinstance(t, checkpoint._orbax_future._SignalingThread)]
    for t in waiting:
        t.join(timeout=30)
    assert not [t for t in waiting if t.is_alive()]


def test_a_folder_that_cannot_hold_a_checkpoint_fails_at_start(char_data, tmp_path):
    """--out_dir so long that orbax's paths under it would pass the limit: an error at start-up, before any step
    (it used to train, then fail at the first save), naming the folder, the cause and the fix; the out_dir that
    start made is removed."""
    from gpt2_jax.checkpoint import CheckpointWriteError
    from gpt2_jax.training.setup import setup

    out = _long_folder(tmp_path, os.pathconf("/", "PC_PATH_MAX") - 40)
    with pytest.raises(CheckpointWriteError) as e:
        setup(tiny_train_config(out, char_data, **ONE_LAYER, compile_cache="off"))
    message = str(e.value)
    assert message.startswith(f"{out}/checkpoints cannot hold a checkpoint: [Errno 36] File name too long (orbax "
                              "writes paths of ") and message.endswith("Nothing was trained; pass a shorter --out_dir")
    assert "\n" not in message and not out.exists()


def _ro_bind(folder: Path) -> str:
    """Shell words that make `folder` read-only in a private mount namespace (as root, chmod would not)."""
    return f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder}"


def _can_remount_read_only(tmp_path) -> bool:
    probe = tmp_path / "ro-probe"
    probe.mkdir()
    return private_mount_works(f"{_ro_bind(probe)} && ! touch {probe}/x 2>/dev/null")


@pytest.mark.e2e
def test_resume_into_a_read_only_checkpoint_folder_stops_at_start(char_data, tmp_path):
    """A run resumed after its checkpoints/ became read-only used to train, fail at the save, then hang with 25
    threads. Now: exit 1 at start-up, one line naming the folder and the fix, the checkpoint there intact."""
    if not _can_remount_read_only(tmp_path):
        pytest.skip("no private mount namespace here (unshare -rm + a read-only bind mount)")
    out = tmp_path / "out"
    flags = train_flags({**TINY_RUN, **ONE_LAYER, "platform": "cpu", "data": char_data, "out_dir": out,
                         "max_steps": 1, "compile_cache": "off"})
    first = subprocess.run([sys.executable, "train.py", *flags], cwd=ROOT, capture_output=True, text=True,
                           timeout=HANG)
    assert first.returncode == 0, first.stderr[-3000:]
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    more = " ".join([sys.executable, "train.py", *flags, "--max_steps=3"])
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"{_ro_bind(out / 'checkpoints')} && {more}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=HANG)
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert errors == [f"error: {out}/checkpoints cannot hold a checkpoint: [Errno 30] Read-only file system. "
                      "Nothing was trained; the checkpoints already there are intact (newest: step 1); it is on a "
                      "read-only filesystem: pass an --out_dir on a writable one"], r.stderr[-3000:]
    assert "step 1/" not in r.stdout + r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


# ------------------------------------------------------------------------------------- export --to (BAD 2)


@pytest.fixture(scope="module")
def tiny_run(char_data, tmp_path_factory) -> Path:
    """A 1-step char-level training run (in this process), with a checkpoint."""
    from gpt2_jax.training import run

    out = tmp_path_factory.mktemp("run") / "out"
    run(tiny_train_config(out, char_data, **ONE_LAYER, max_steps=1, compile_cache="off"))
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _hf_model(folder: Path, head: bool) -> None:
    """Another model, as Hugging Face's save_pretrained writes it (GPT2LMHeadModel also writes
    generation_config.json; GPT2Model only config.json and model.safetensors)."""
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=50,
                                      bos_token_id=0, eos_token_id=0)
    model = (transformers.GPT2LMHeadModel if head else transformers.GPT2Model)(config)
    model.save_pretrained(folder)


@pytest.mark.slow
@pytest.mark.parametrize("other", ["hf lm head model", "hf base model", "a user's folder", "a lone safetensors"])
def test_export_refuses_a_folder_it_did_not_write(other, tiny_run, tmp_path, capsys):
    """export --to a folder that save_pretrained wrote for another model used to exit 0, replace its config.json
    and model.safetensors and keep its generation_config.json. Now any folder an export did not write is refused
    with one line, and stays byte for byte as it was."""
    from gpt2_jax import export

    target = tmp_path / "other"
    if other.startswith("hf"):
        _hf_model(target, head=other == "hf lm head model")
    else:
        target.mkdir()
        (target / ("notes.txt" if other == "a user's folder" else "model.safetensors")).write_bytes(b"mine")
    before = _snapshot(target)
    capsys.readouterr()
    assert export.main([str(tiny_run), "--to", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --to {target} holds ") and err.endswith(
        "which an export must not overwrite (the folder is left as it is); pass a new folder, an empty one, or one an "
        "earlier export wrote\n") and len(err.splitlines()) == 1, err
    assert _snapshot(target) == before


@pytest.mark.slow
def test_export_writes_into_an_empty_folder_and_over_its_own_export(tiny_run, tmp_path, capsys):
    from gpt2_jax import export

    target = tmp_path / "hf"
    target.mkdir()
    for _ in range(2):
        assert export.main([str(tiny_run), "--to", str(target)]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "gpt2_jax_tokenizer.json", "model.safetensors"]


# ------------------------------------------------------------------------------------- many shards (BAD 3)


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Path:
    """About 300 train shards of 1,000 char tokens (and 34 val shards): more than an open-file limit of 128."""
    from gpt2_jax import data as data_lib

    folder = tmp_path_factory.mktemp("many-shards")
    data_lib.prepare_text_string(data_lib.default_corpus()[:334_000], folder, tokenizer="char", shard_size=1000)
    assert len(list(folder.glob("train_*.npy"))) >= 300
    return folder


def _with_file_limit(limit: int, argv: list[str]) -> list[str]:
    """`argv` run under `ulimit -n LIMIT` (soft and hard): a shell sets it, not a preexec_fn (Python code in a
    child forked from this multithreaded process could deadlock)."""
    return ["sh", "-c", f'ulimit -n {limit} && exec "$@"', "sh", *argv]


@pytest.mark.parametrize("order", ["sequential", "shuffle"])
def test_more_shards_than_the_open_file_limit(order, many_shards):
    """Under `ulimit -n 128`, a dataset of 300 shards used to be reported as "truncated or corrupt" ([Errno 24]
    Too many open files: a memory map held a descriptor per shard). Now the loaders read every shard and the
    validation windows, with a bounded number of maps open."""
    program = f"""
from gpt2_jax.data import EvalWindows, TokenLoader
loader = TokenLoader({str(many_shards)!r}, "train", 4, 32, order={order!r})
seen = set()
for _ in range(3000):
    loader.next_batch()
    seen.add(loader.cursor.state().get("shard_index", loader.cursor.state().get("shard_pos")))
windows = EvalWindows({str(many_shards)!r}, 32, 4, max_tokens=None)
batches = sum(1 for _ in windows)
print(len(seen), batches)
"""
    r = subprocess.run(_with_file_limit(128, [sys.executable, "-c", program]), cwd=ROOT, capture_output=True,
                       text=True, timeout=HANG)
    assert r.returncode == 0, r.stderr[-3000:]
    seen, batches = map(int, r.stdout.split())
    assert seen >= 300 and batches > 200, r.stdout


def test_the_open_file_limit_is_named_not_a_corrupt_shard(many_shards, monkeypatch):
    """Where even one more file cannot be opened, the error says it is the open-file limit (and how to raise it),
    never "corrupt" or "recreate the dataset": both when the shards are checked and when one is mapped."""
    import builtins

    import numpy as np

    from gpt2_jax.data import TokenLoader, shards

    def emfile(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    with monkeypatch.context() as m:  # checking the shards at start
        m.setattr(builtins, "open", emfile)
        with pytest.raises(OSError) as e:
            TokenLoader(many_shards, "train", 4, 32)
    loader = TokenLoader(many_shards, "train", 4, 32)
    shards.LocalShard._maps.clear()
    monkeypatch.setattr(np, "memmap", emfile)
    with pytest.raises(OSError) as mapping:  # mapping a shard to read it
        loader.next_batch()
    for error in (e.value, mapping.value):
        message = str(error)
        assert error.errno == errno.EMFILE and "open-file limit is reached (ulimit -n: " in message, message
        assert "the shard itself is fine. Raise the limit (e.g. `ulimit -n" in message
        assert "corrupt" not in message and "recreate" not in message


# ------------------------------------------------------------------------------------- UGLY: gs:// paths offline


def _offline_env() -> dict:
    """A machine with no route to Cloud Storage: the storage endpoint is a closed port on 127.0.0.1 (gcsfs then
    retries ~33 s per request); the probe gives up after 4 s."""
    import socket

    import gcs_emulator

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    return {**os.environ, **gcs_emulator.emulator_env(closed), "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
            "GPT2_JAX_STORAGE_TIMEOUT": "4"}


GS = "gs://no-network-bucket"
OFFLINE_CASES = {  # command -> the flag and path its one line names
    "train --data": (["train.py", f"--data={GS}/data"], f"--data={GS}/data"),
    "train --init_from": (["train.py", f"--init_from={GS}/run"], f"--init_from={GS}/run"),
    "train --hellaswag_data": (["train.py", f"--hellaswag_data={GS}/h.jsonl"], f"--hellaswag_data={GS}/h.jsonl"),
    "sample --init_from": (["-m", "gpt2_jax.sample", f"--init_from={GS}/run"], f"--init_from={GS}/run"),
    "evaluate --data": (["-m", "gpt2_jax.evaluate", "loss", f"--data={GS}/data"], f"--data={GS}/data"),
    "export --to": (["-m", "gpt2_jax.export", "some-run", "--to", f"{GS}/hf"], f"--to={GS}/hf"),
    "export out_dir": (["-m", "gpt2_jax.export", f"{GS}/run", "--to", "hf"], f"out_dir={GS}/run"),
    "plot out_dir": (["-m", "gpt2_jax.plot", f"{GS}/run"], f"out_dir={GS}/run"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", OFFLINE_CASES)
def test_every_bucket_path_fails_fast_offline(case, tmp_path):
    """Offline, only --out_dir=gs:// used to fail in one line (18 s); --data, --init_from, --to ... took 60-140 s and
    100-200 lines of gcsfs warnings and aiohttp tracebacks naming neither flag nor bucket. Now each flag gets the
    same probe: one line naming the flag and the bucket, after the probe's timeout, exit 1."""
    argv, named = OFFLINE_CASES[case]
    if argv[0] == "train.py":
        argv = [*argv, f"--out_dir={tmp_path / 'out'}", "--max_steps=1"]
    r = subprocess.run([sys.executable, *argv], cwd=tmp_path if argv[0] == "-m" else ROOT, capture_output=True,
                       text=True, timeout=HANG, env={**_offline_env(), "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot reach {named} (bucket 'no-network-bucket'): "),\
        r.stderr[-3000:]
    assert "took more than 4 s" in errors[0] and "Check the network, the bucket name and the credentials" in errors[0]
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) <= 3, r.stderr[-3000:]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- UGLY: Ctrl-C at start-up


def _interrupt_when(argv: list[str], ready, cwd: Path) -> subprocess.CompletedProcess:
    """Run `argv`; once `ready(line)` holds for a line of its output (it is then in start-up), send SIGINT."""
    import signal

    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"})
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if ready(line):
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=HANG)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(argv, proc.returncode, "".join(seen) + rest, "")


@pytest.mark.e2e
def test_an_interrupt_during_start_up_is_one_line(char_data, tmp_path):
    """Ctrl-C while train.py starts used to print a 49-76 line KeyboardInterrupt traceback. Now one line, exit
    130, and the new run's folder is removed."""
    out = tmp_path / "out"
    argv = [sys.executable, "train.py", *train_flags({**TINY_RUN, **ONE_LAYER, "platform": "cpu", "data": char_data,
                                                      "out_dir": out, "compile_cache": "off"})]
    r = _interrupt_when(argv, lambda line: True, ROOT)  # its first line (the compile cache's): JAX starts next
    assert r.returncode == 130, r.stdout[-3000:]
    assert "Traceback" not in r.stdout and "KeyboardInterrupt" not in r.stdout, r.stdout[-3000:]
    assert r.stdout.splitlines()[-1] == ("interrupted (SIGINT): stopped before training began; no step was trained. "
                                         "Run the same command to start again"), r.stdout[-3000:]
    assert not out.exists()


@pytest.mark.e2e
def test_an_interrupt_in_a_tool_is_one_line(tiny_run, tmp_path):
    """The same for a tool: sample, interrupted while it compiles (after its warning about the long prompt)."""
    argv = [sys.executable, "-m", "gpt2_jax.sample", f"--init_from={tiny_run}", "--prompt", "x" * 40,
            "--max_new_tokens=400", "--platform=cpu"]
    r = _interrupt_when(argv, lambda line: line.startswith("warning: prompt 0 is"), ROOT)
    assert r.returncode == 130, r.stdout[-3000:]
    assert "Traceback" not in r.stdout and r.stdout.splitlines()[-1] == (
        "interrupted (SIGINT): stopped before the samples were drawn"), r.stdout[-3000:]


# ---------------------------------------------------------------------- UGLY: the words of start-up errors


@pytest.mark.parametrize("where", ["under a file", "a name too long"])
def test_an_out_dir_that_cannot_be_made_names_the_flag(where, char_data, tmp_path):
    """An OS error making --out_dir used to be `error: [Errno 13] Permission denied: '/.../run'`: now it names
    the flag, the folder, the cause and the fix."""
    from gpt2_jax.training.setup import setup

    (tmp_path / "file").write_text("mine")
    out = tmp_path / "file" / "run" if where == "under a file" else tmp_path / ("x" * 300) / "run"
    with pytest.raises(OSError) as e:
        setup(tiny_train_config(out, char_data, **ONE_LAYER, compile_cache="off"))
    cause = "[Errno 20] Not a directory" if where == "under a file" else "[Errno 36] File name too long"
    fix = "an --out_dir in" if where == "under a file" else "an --out_dir with a shorter path in"
    assert str(e.value) == (f"--out_dir={out}: cannot make the folder {out} ({cause}); pass {fix} a folder you may "
                            "write to")
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.e2e
def test_an_out_dir_under_a_read_only_folder_names_the_flag(char_data, tmp_path):
    if not _can_remount_read_only(tmp_path):
        pytest.skip("no private mount namespace here (unshare -rm + a read-only bind mount)")
    parent = tmp_path / "ro"
    parent.mkdir()
    train = " ".join([sys.executable, "train.py", *train_flags({**TINY_RUN, **ONE_LAYER, "platform": "cpu",
                                                                "data": char_data, "out_dir": parent / "run"})])
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"{_ro_bind(parent)} && {train}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=HANG)
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.splitlines()[-1] == (f"error: --out_dir={parent}/run: cannot make the folder {parent}/run "
                                         "([Errno 30] Read-only file system); pass an --out_dir in a folder you may "
                                         "write to"), r.stderr[-3000:]


@pytest.mark.parametrize("what", ["a text file", "a shard"])
def test_data_that_is_a_file_says_what_training_reads(what, char_data, tmp_path):
    """--data=<a text file> used to say the data directory "does not exist"; the file exists: say that training
    reads a folder of token shards, and how to make one."""
    from gpt2_jax.training.setup import setup

    data = tmp_path / "book.txt" if what == "a text file" else char_data / "train_000000.npy"
    if what == "a text file":
        data.write_text("Call me Ishmael.")
    with pytest.raises(ValueError) as e:
        setup(tiny_train_config(tmp_path / "out", data, **ONE_LAYER, compile_cache="off"))
    assert str(e.value) == (f"--data={data} is a file; training reads a folder of token shards. Make one from a text "
                            f"file with `python -m gpt2_jax.data text {data} --out DIR`, then pass --data=DIR")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("split", ["train", "val"])
def test_shards_beyond_meta_vocabulary_stop_before_the_model_is_built(split, char_data, tmp_path, monkeypatch):
    """A meta.json whose vocabulary is smaller than its shards' ids used to stop at the first step (or the first
    eval), after the model was built, leaving the new out_dir behind. Now the first batches are read at start-up:
    the error comes before the model is built, and the folder the start made is removed."""
    import json
    import shutil

    import numpy as np

    from gpt2_jax.training import setup as setup_lib

    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    meta = json.loads((data / "meta.json").read_text())
    meta["vocab_size"], meta["chars"] = 40, meta["chars"][:40]  # (letters are past the 40th character)
    (data / "meta.json").write_text(json.dumps(meta))
    other = "val" if split == "train" else "train"
    for shard in data.glob(f"{other}_*.npy"):  # only `split` holds ids past the vocabulary
        np.save(shard, np.minimum(np.load(shard), 39).astype(np.uint16))

    def built(*args, **kwargs):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(setup_lib, "build_step", built)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"token id \d+ >= vocab_size=40 in shard .*" + split):
        setup_lib.setup(tiny_train_config(out, data, **ONE_LAYER, compile_cache="off", eval_every=1))
    assert not out.exists()


@pytest.mark.parametrize("content", [b"\x8b\x00\xffrandom bytes\n" * 140, b"\x00\x13\x37 no newline at all",
                                     b'{"a": 1}\n{"b": 2}\n'])
def test_plot_of_garbage_metrics_is_one_line_and_no_png(content, tmp_path, capsys):
    """plot on a metrics.jsonl of random bytes used to print 140 warnings and write an empty PNG, exit 0."""
    from gpt2_jax import plot

    (tmp_path / "metrics.jsonl").write_bytes(content)
    assert plot.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {tmp_path / 'metrics.jsonl'} holds no metrics rows (no line is a JSON row with a step): "
                   "is it a run's metrics.jsonl? Nothing was plotted\n"), err
    assert not list(tmp_path.glob("*.png*"))


@pytest.mark.parametrize("flags", [["--micro_batch_size=1000000000"], ["--micro_batch_size=40000000",
                                                                       "--block_size=64"]])
def test_plan_of_an_impossible_micro_batch_is_one_line(flags, capsys):
    """plan --micro_batch_size=1000000000 used to end in a 58-line OverflowError from inside the loss."""
    from gpt2_jax.plan.cli import main

    try:
        code = main(["--target=local", "--preset=char", *flags])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code not in (0, None) and "Traceback" not in err and "OverflowError" not in err, err
    assert "tokens per micro-batch, more than a 32-bit index counts" in err and "lower --micro_batch_size" in err


# ------------------------------------------------------------------------------------- also seen: resuming


@pytest.mark.slow
def test_resume_names_a_changed_schedule_and_drops_rows_past_the_checkpoint(char_data, tmp_path, capsys):
    """A run checkpointed at step 2, killed after logging steps 3-5 (rows appended here), resumed with a larger
    --max_steps: the log names the schedule change and the rates (it used to jump with no word), and metrics.jsonl
    holds each step once (the dead run's rows 3-5 used to stay, then repeat)."""
    import json

    from gpt2_jax.training import run

    out = tmp_path / "out"
    config = dict(**ONE_LAYER, compile_cache="off", warmup_steps=1)
    run(tiny_train_config(out, char_data, max_steps=2, **config))
    metrics = out / "metrics.jsonl"
    with metrics.open("a") as f:
        for step in (3, 4, 5):
            f.write(json.dumps({"step": step, "loss": 9.0}) + "\n")
    capsys.readouterr()
    run(tiny_train_config(out, char_data, max_steps=4, **config))
    log = capsys.readouterr().out
    assert "note: the learning-rate schedule changed since the checkpoint (--max_steps 2 -> 4): the next step " \
           "trains at lr " in log, log
    assert f"{metrics}: removed 3 rows of steps after 2" in log
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and all(row["loss"] != 9.0 for row in rows), rows


def test_a_remote_dataset_keeps_a_bounded_number_of_shards_mapped(monkeypatch):
    """A dataset in a bucket: each shard read kept its memory map (a descriptor, and the disk space of a shard the
    cache had evicted) for the whole run. Now at most OPEN_SHARDS stay mapped; a shard let go is opened again
    from the cache when read again, with the same tokens."""
    import numpy as np

    from gpt2_jax.data.remote import LazyShard

    class Cache:  # what LazyShard asks of data.remote.ShardCache
        sizes = {f"train_{i:06d}.npy": 10 for i in range(300)}
        opened: list[str] = []

        def open(self, name):
            self.opened.append(name)
            return np.full(10, int(name[6:12]), np.uint16)

    monkeypatch.setattr(LazyShard, "_mapped", type(LazyShard._mapped)())
    cache = Cache()
    shards = [LazyShard(cache, name) for name in Cache.sizes]
    for k, shard in enumerate(shards):
        assert shard[3] == k
        assert sum(s._tokens is not None for s in shards) <= LazyShard.OPEN_SHARDS
    assert shards[0][0] == 0 and len(cache.opened) == 301  # let go, then opened again
    assert shards[-1][0] == 299 and len(cache.opened) == 301  # still mapped
