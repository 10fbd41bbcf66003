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
from tiny import TINY_RUN, tiny_train_config, train_flags

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
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", f"{_ro_bind(probe)} && ! touch {probe}/x 2>/dev/null"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


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


def _low_file_limit(limit: int):
    """A preexec_fn: the child may hold `limit` open files (soft and hard), as under `ulimit -n LIMIT`."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


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
    r = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=HANG,
                       preexec_fn=_low_file_limit(128))
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
