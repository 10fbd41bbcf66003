"""Bad input to the command lines (issue #18): every one gets one line that names the flag or the file, what is
wrong and what to do, with exit status 2 for a bad flag and 1 for anything else, before any work starts, and
nothing is written or lost elsewhere.

The CLIs are driven through their `main(argv)` in this process (train.py's flags too: they are checked before
JAX starts), except where a subprocess is the point (marked e2e). The models are tiny (1 layer, 32 wide).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny import TINY_MODEL, TINY_RUN, private_mount_works, tiny_train_config, train_flags

import train
from gpt2_jax import data as data_lib
from gpt2_jax import evaluate, export, plot, sample
from gpt2_jax.tokenizer import read_meta

ROOT = Path(__file__).resolve().parents[1]
ONE_LAYER = dict(n_layer=1, mesh="data:1")  # the tiny run (tiny.py) with 1 layer, on one device


def _fails(main, argv, capsys, status: int) -> str:
    """Run a CLI's main(argv); assert it exits with `status` (returned or raised); its stderr."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == status, err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny random GPT-2 as an HF folder (config.json + model.safetensors; 128 tokens, more than the char
    data has), written with numpy in HF's names and layouts (building a GPT eagerly costs ~20 s on a loaded 2-core
    machine)."""
    from safetensors.numpy import save_file

    from gpt2_jax.convert import config_to_hf

    cfg = TINY_MODEL.replace(n_layer=1, vocab_size=128)
    C, T, V = cfg.n_embd, cfg.block_size, cfg.vocab_size
    shapes = {"wte.weight": (V, C), "wpe.weight": (T, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for name, shape in {"ln_1.weight": (C,), "ln_1.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
                        "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
                        "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "mlp.c_fc.weight": (C, 4 * C),
                        "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,)}.items():
        shapes[f"h.0.{name}"] = shape
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    folder.mkdir()
    save_file({f"transformer.{k}": rng.normal(0, 0.02, v).astype(np.float32) for k, v in shapes.items()},
              folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg, V)))
    return folder


# ------------------------------------------------------------------------------------- numbers


NON_FINITE = [
    (sample.main, ["--temperature", "nan"], "--temperature"),
    (sample.main, ["--temperature", "inf"], "--temperature"),
    (sample.main, ["--temperature=-inf"], "--temperature"),
    (sample.main, ["--temperature=-1"], "--temperature"),
    (sample.main, ["--top_p", "nan"], "--top_p"),
    (data_lib.main, ["text", "x.txt", "--out", "{out}", "--val_fraction", "nan"], "--val_fraction"),
    (data_lib.main, ["text", "x.txt", "--out", "{out}", "--val_fraction", "inf"], "--val_fraction"),
    (evaluate.main, ["loss", "--data", "{out}", "--batch_size", "nan"], "--batch_size"),
    (evaluate.main, ["hellaswag", "--limit", "inf"], "--limit"),
    (export.main, ["{out}", "--to", "{out}", "--step", "nan"], "--step"),
    (train.main, ["--max_lr=nan", "--out_dir={out}"], "--max_lr"),
    (train.main, ["--grad_clip=inf", "--out_dir={out}"], "--grad_clip"),
]


@pytest.mark.parametrize("main, argv, flag", NON_FINITE,
                         ids=[f"{m.__module__}-{' '.join(a)}" for m, a, _ in NON_FINITE])
def test_non_finite_numbers_are_bad_flags(main, argv, flag, tmp_path, capsys):
    """NaN, inf and negative temperatures: exit 2 naming the flag, before any model or file is touched."""
    out = tmp_path / "out"
    err = _fails(main, [a.format(out=out) for a in argv], capsys, 2)
    assert flag in err and err.count("error:") == 1
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--n_head=5"], "--n_head=5 does not divide n_embd=128 (the char preset's on cpu)"),
    (["--n_head=3", "--platform=cpu"], "--n_head=3 does not divide n_embd=128"),
    (["--n_head=3", "--n_embd=64"], "--n_head=3 does not divide --n_embd=64; set --n_head and --n_embd"),
    (["--preset=gpt2", "--n_embd=100"], "n_head=12 does not divide --n_embd=100 (the gpt2 preset's"),
    (["--seed=-1"], "--seed=-1 must be in [0, 9223372036854775807]"),
    (["--seed=18446744073709551616"], "--seed=18446744073709551616 must be in"),
])
def test_train_head_count_and_seed_are_bad_flags(argv, message, tmp_path, capsys):
    """The README promises exit 2 for bad flags: --n_head that does not divide the width and an out-of-range
    --seed are caught with the other flags, before JAX starts (they used to fail at run time with 1)."""
    err = _fails(train.main, [*argv, f"--out_dir={tmp_path / 'out'}"], capsys, 2)
    assert message in err
    assert not (tmp_path / "out").exists()


def test_a_valid_head_count_for_the_platform_passes():
    from gpt2_jax.training.settings import TrainConfig

    TrainConfig(n_head=3, platform="gpu")  # the char preset is 384 wide off the CPU
    TrainConfig(n_head=8, n_embd=64)


# ------------------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_damaged_safetensors_is_one_line(damage, hf_folder, tmp_path, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_bytes((hf_folder / "config.json").read_bytes())
    weights = (hf_folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes({"truncated": weights[:len(weights) // 2],
                                                "random": os.urandom(4096), "empty": b""}[damage])
    err = _fails(sample.main, ["--init_from", str(folder), "--max_new_tokens=2"], capsys, 1)
    assert err.startswith(f"error: {folder / 'model.safetensors'} is damaged or not a weights file")
    assert "download or export the checkpoint again" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("meta", [[1, 2], {"tokenizer": 3}, {"tokenizer": "char", "vocab_size": "65"},
                                  {"tokenizer": "char", "vocab_size": 65},
                                  {"tokenizer": "char", "vocab_size": 65, "shards": {"../x.npy": 3}}])
def test_meta_json_of_the_wrong_shape_is_one_line(meta, hf_folder, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="is not a dataset's meta.json: .*; create it with"):
        read_meta(data)
    err = _fails(evaluate.main, ["loss", "--init_from", str(hf_folder), "--data", str(data), "--no_progress"],
                 capsys, 1)
    assert f"error: {data / 'meta.json'} is not a dataset's meta.json" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("content", [b"caf\xe9 au lait\n" * 50, bytes(range(256)) * 8])
def test_text_that_is_not_utf8_names_the_file(content, tmp_path, capsys):
    good, bad, out = tmp_path / "good.txt", tmp_path / "bad.txt", tmp_path / "data"
    good.write_text("plain text\n" * 50)
    bad.write_bytes(content)
    err = _fails(data_lib.main, ["text", str(good), str(bad), "--out", str(out), "--tokenizer", "char"], capsys, 1)
    assert err.startswith(f"error: {bad} is not UTF-8 text (byte ") and "iconv -f latin1 -t utf-8" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def tiny_run(char_data, tmp_path_factory) -> Path:
    """A 2-step char-level training run (in this process), checkpointed at steps 1 and 2."""
    from gpt2_jax.training import run

    out = tmp_path_factory.mktemp("run") / "out"
    run(tiny_train_config(out, char_data, **ONE_LAYER, max_steps=2, checkpoint_every=1, compile_cache="off"))
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("other", ["run", "config only"])
def test_export_refuses_another_runs_folder(other, tiny_run, tmp_path, capsys):
    """`export RUN --to OTHER_RUN` used to overwrite the other run's config.json (which then broke its
    resume): now an error that says what to do, and nothing in that folder changes."""
    target = tmp_path / "other"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"train": {"seed": 1}, "model": {"n_layer": 3}}))
    if other == "run":
        (target / "checkpoints" / "40").mkdir(parents=True)
    before = _snapshot(target)
    err = _fails(export.main, [str(tiny_run), "--to", str(target)], capsys, 1)
    assert f"error: --to {target} holds " in err and "pass a new folder" in err and len(err.splitlines()) == 1
    assert _snapshot(target) == before


@pytest.mark.slow
def test_export_writes_files_with_the_usual_mode(tiny_run, tmp_path, capsys):
    """model.safetensors gets the mode any file gets under the umask (safetensors alone makes it 0600); a
    second export into the same folder (an HF folder now) is allowed."""
    folder = tmp_path / "hf"
    old = os.umask(0o022)
    try:
        for _ in range(2):
            assert export.main([str(tiny_run), "--to", str(folder)]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644, "gpt2_jax_tokenizer.json": 0o644}


# ------------------------------------------------------------------------------------- a full disk


def test_a_full_disk_is_one_error_and_keeps_the_checkpoints(tmp_path, monkeypatch):
    """Checkpointer: ENOSPC from orbax (tensorstore's words, wrapped in a ValueError, as a real full disk
    raises it; simulated by patching orbax's save) becomes one DiskFullError naming the folder, the free space
    and what to do; the partial folder is removed and the complete checkpoint restores."""
    import errno

    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from gpt2_jax.checkpoint import Checkpointer, DiskFullError

    state = {"w": jnp.arange(4.0)}
    with Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
        ckpt.save(1, state, {"step": 1})

        def full(self, step, *args, **kwargs):
            (ckpt.directory / f"{step}.orbax-checkpoint-tmp").mkdir()  # what a failed save leaves
            raise ValueError('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database: Failed to write 8495 '
                             "bytes to file 8: No space left on device [os_error_code='28']")

        monkeypatch.setattr(ocp.CheckpointManager, "save", full)
        with pytest.raises(DiskFullError) as e:
            ckpt.save(2, state, {"step": 2})
        monkeypatch.undo()
        assert e.value.errno == errno.ENOSPC and "\n" not in str(e.value)
        assert str(e.value).startswith(f"the disk is full: checkpoint 2 could not be written to {ckpt.directory} (")
        assert "MiB free). The checkpoints already there are intact (newest: step 1)" in str(e.value)
        assert sorted(p.name for p in ckpt.directory.iterdir()) == ["1"]
        target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=state["w"].sharding)}
        restored, meta, step = ckpt.restore(target)
    assert step == 1 and meta == {"step": 1}
    np.testing.assert_array_equal(restored["w"], state["w"])


def _can_mount_tmpfs(tmp_path) -> bool:
    return private_mount_works(f"mount -t tmpfs -o size=64k tmpfs {tmp_path}")


@pytest.mark.e2e
def test_train_on_a_full_disk_stops_with_one_line(char_data, tmp_path):
    """train.py with its out_dir on a real 700 KiB filesystem (a tmpfs in a private mount namespace:
    `unshare -rm`), where the first checkpoint (~330 KiB) fits and the second does not: one line naming the
    folder and the free space, exit 1, and checkpoint 1 intact (the folder is copied out before the
    namespace ends, then restored here)."""
    small, kept = tmp_path / "small", tmp_path / "kept"
    small.mkdir()
    if not _can_mount_tmpfs(small):
        pytest.skip("no private mount namespace here (unshare -rm + mount tmpfs); the patched test covers it")
    train_cmd = " ".join([sys.executable, "train.py", *train_flags({
        **TINY_RUN, **ONE_LAYER, "platform": "cpu", "data": char_data, "out_dir": f"{small}/out", "max_steps": 6,
        "checkpoint_every": 1})])
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=700k tmpfs {small} && {train_cmd}; "
                        f"status=$?; cp -r {small}/out {kept}; exit $status"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    # Which save meets the full disk depends on what else the run wrote by then (metrics, TensorBoard): the
    # second or a later one. The message names it and the newest checkpoint that is complete.
    full = re.fullmatch(rf"error: the disk is full: checkpoint (\d+) could not be written to {re.escape(str(small))}"
                        rf"/out/checkpoints \(.*\(newest: step (\d+)\).*", errors[-1])
    assert full and int(full[1]) >= 2 and int(full[2]) == int(full[1]) - 1, r.stderr[-3000:]
    assert "ERROR:absl" not in r.stderr and "ERROR:asyncio" not in r.stderr, r.stderr[-3000:]
    assert len(errors) <= 8, r.stderr[-3000:]  # not ~340 lines of tracebacks
    names = [p.name for p in (kept / "checkpoints").iterdir()]
    kept_steps = sorted(int(n) for n in names if n.isdigit())
    assert kept_steps[-1] == int(full[2]), names  # the failed save committed nothing
    # Its partial folder is removed, but orbax's writer threads may still be finishing it as the process exits:
    # at most that one temporary folder is left, which orbax never restores.
    assert set(names) - {str(n) for n in kept_steps} <= {f"{full[1]}.orbax-checkpoint-tmp"}, names
    from gpt2_jax.runs import load_run

    assert load_run(kept)[2]["step"] == int(full[2])


# ------------------------------------------------------------------------------------- results files


def _evaluate(hf_folder, data, out) -> list[str]:
    return ["loss", "--init_from", str(hf_folder), "--data", str(data), "--max_batches=1", "--no_progress",
            "--out", str(out)]


@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_unusable_results_file_fails_before_the_work(where, char_data, tmp_path, capsys):
    """evaluate --out / plot --out that cannot be written: exit 2 and one line, before the evaluation runs
    (it used to run to the end, then lose the results to a traceback). --init_from names no model at all:
    had the evaluation started, the error would be that one."""
    (tmp_path / "file").write_text("")
    out = tmp_path if where == "a folder" else tmp_path / "file" / "results.json"
    message = f"--out {out} is a folder; pass a file name in it" if where == "a folder" else \
        f"--out {out}: cannot write in {out.parent} ("
    err = _fails(evaluate.main, _evaluate(tmp_path / "no-model", char_data, out), capsys, 2)
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1
    err = _fails(plot.main, [str(tmp_path / "no-run"), "--out", str(out)], capsys, 2)
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written, no probe left


def test_results_file_folder_is_made(hf_folder, char_data, tmp_path, capsys):
    out = tmp_path / "new" / "sub" / "loss.json"
    assert evaluate.main(_evaluate(hf_folder, char_data, out)) == 0
    assert json.loads(out.read_text())["batches"] == 1
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 4.0 - s / 10}) + "\n" for s in (1, 2)))
    png = tmp_path / "plots" / "deep" / "loss.png"
    assert plot.main([str(run), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in png.parent.iterdir()) == ["loss.png"]
    capsys.readouterr()


@pytest.mark.parametrize("out", ["file", "file/sub"])
def test_dataset_out_that_is_a_file(out, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "in.txt").write_text("plain text\n" * 50)
    err = _fails(data_lib.main, ["text", str(tmp_path / "in.txt"), "--out", str(tmp_path / out), "--tokenizer", "char"],
                 capsys, 2)
    assert err.startswith(f"error: --out {tmp_path / out} is ") and "pass a folder for the dataset" in err
    assert (tmp_path / "file").read_text() == "mine"


# ------------------------------------------------------------------------------------- --platform without the hardware


def _unshare_net() -> list[str]:
    """`unshare -n` where it works (libtpu must never reach the network), else nothing."""
    try:
        ok = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return ["unshare", "-n"] if ok else []


@pytest.mark.e2e
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_platform_without_its_device_is_one_line(platform, tmp_path):
    """--platform=tpu without a TPU used to end in a traceback about coordinator_address; --platform=gpu with the
    CUDA plugin installed but no GPU told the user to install it. Now one line, before JAX loads any plugin."""
    from gpt2_jax import backends

    if backends.has_accelerator(platform):
        pytest.skip(f"this machine has a {platform.upper()}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_PLATFORMS", "XLA_"))}
    r = subprocess.run([*_unshare_net(), sys.executable, "train.py", f"--platform={platform}", "--max_steps=1",
                        f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**env, "TPU_SKIP_MDS_QUERY": "1"})
    assert r.returncode == 1
    name = platform.upper()
    assert r.stderr.startswith(f"--platform={platform}: no {name} is visible on this machine (no /dev/"), r.stderr
    if backends.has_plugin(platform):  # the plan extra: jax[cuda13] and libtpu
        assert "although JAX's" in r.stderr and "pip install" not in r.stderr
    else:
        assert backends.INSTALL_HINT[platform] in r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stdout == ""
    assert not (tmp_path / "out").exists()


def test_missing_backend_messages(monkeypatch):
    from gpt2_jax import backends

    monkeypatch.setattr(backends, "has_accelerator", lambda platform=None: False)
    monkeypatch.setattr(backends, "has_plugin", lambda platform: False)
    assert backends.missing_backend("cpu") is None and backends.missing_backend("") is None
    assert backends.missing_backend("gpu").endswith('is not installed; on a GPU machine: pip install "gpt2-jax[gpu]"'
                                                    "  (JAX with CUDA)")
    monkeypatch.setattr(backends, "has_accelerator", lambda platform=None: platform == "gpu")
    assert backends.missing_backend("gpu") is None and backends.missing_backend("tpu") is not None


@pytest.mark.parametrize("tool", ["sample", "evaluate", "export", "plot"])
def test_tools_take_platform_as_train_py_does(tool, hf_folder, char_data, tmp_path, capsys, monkeypatch):
    """sample, evaluate, export and plot take train.py's --platform: a platform without its device is one line
    and exit 1 before any model is read; an unknown one is a bad flag (exit 2); --platform=cpu runs."""
    import importlib

    from gpt2_jax import backends

    monkeypatch.setattr(backends, "has_accelerator", lambda platform=None: False)
    main = importlib.import_module(f"gpt2_jax.{tool}").main
    argv = {"sample": ["--init_from", str(tmp_path / "none")],
            "evaluate": ["loss", "--init_from", str(tmp_path / "none"), "--data", str(char_data)],
            "export": [str(tmp_path / "none"), "--to", str(tmp_path / "hf")],
            "plot": [str(tmp_path / "none")]}[tool]
    err = _fails(main, [*argv, "--platform=tpu"], capsys, 1)
    assert err.startswith("error: --platform=tpu: no TPU is visible on this machine") and len(err.splitlines()) == 1
    err = _fails(main, [*argv, "--platform=npu"], capsys, 2)
    assert "--platform: invalid choice: 'npu'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing read or written
    if tool == "evaluate":
        assert main(_evaluate(hf_folder, char_data, tmp_path / "loss.json") + ["--platform=cpu"]) == 0


@pytest.mark.e2e
def test_a_tool_starts_quietly_with_the_gpu_and_tpu_plugins_installed(hf_folder, char_data, tmp_path):
    """`python -m gpt2_jax.evaluate` with no --platform and no JAX_PLATFORMS, the plugins installed and no GPU
    or TPU attached: it runs on the CPU without the plugins' tracebacks and warnings, as train.py does."""
    from test_compile_setup import PLUGIN_NOISE, quiet_start_env

    r = subprocess.run([sys.executable, "-m", "gpt2_jax.evaluate", *_evaluate(hf_folder, char_data,
                                                                              tmp_path / "loss.json")],
                       cwd=ROOT, env=quiet_start_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "loss.json").read_text())["batches"] == 1
    for noise in PLUGIN_NOISE:
        assert noise not in r.stderr, f"{noise!r} in the evaluate CLI's stderr:\n{r.stderr[-3000:]}"


# ------------------------------------------------------------------------------------- --compile_cache


@pytest.mark.parametrize("where", ["file", "file/sub"])
def test_unusable_compile_cache_is_a_bad_flag_or_a_warning(where, tmp_path, capsys):
    """An unusable cache folder used to turn JAX's cache off without a word. --compile_cache=DIR: exit 2 before
    JAX starts; the default folder ($GPT2_JAX_CACHE/jax-compile): a warning, and the cache off."""
    from gpt2_jax import launch
    from gpt2_jax.training.settings import TrainConfig

    (tmp_path / "file").write_text("")
    folder = tmp_path / where
    err = _fails(train.main, [f"--compile_cache={folder}", f"--out_dir={tmp_path / 'out'}"], capsys, 2)
    assert err.startswith(f"error: --compile_cache={folder} ") and "pass a folder you may write to, or " \
        "--compile_cache=off" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()

    env, notes = launch.jax_environment(TrainConfig(), {"GPT2_JAX_CACHE": str(folder)})
    launch.check_compile_cache(TrainConfig(), env, notes)
    assert env["JAX_ENABLE_COMPILATION_CACHE"] == "false"
    assert notes == [f"warning: compile cache: off: {folder}/jax-compile cannot be written (Not a directory), "
                     "so every program is compiled anew; pass --compile_cache=DIR with a folder you may write to"]
    env, notes = launch.jax_environment(TrainConfig(), {"GPT2_JAX_CACHE": str(tmp_path / "fine")})
    launch.check_compile_cache(TrainConfig(), env, notes)
    assert "JAX_ENABLE_COMPILATION_CACHE" not in env and len(notes) == 1
    assert list((tmp_path / "fine" / "jax-compile").iterdir()) == []  # made, and the probe is gone


# ------------------------------------------------------------------------------------- housekeeping


@pytest.mark.e2e
def test_a_pytest_session_leaves_no_cache_folder(tmp_path):
    """The root conftest.py makes a session's cache folder (GPT2_JAX_CACHE) in the temp folder: and removes it."""
    env = {k: v for k, v in os.environ.items() if k != "GPT2_JAX_CACHE"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cli_errors.py",
                        "-k", "test_a_valid_head_count_for_the_platform_passes"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**env, "TMPDIR": str(tmp_path)})
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-3000:]
    assert not list(tmp_path.glob("gpt2_jax-test-cache-*"))


def test_bucket_metrics_staging_is_reused_after_a_kill(gcs_dir, tmp_path, monkeypatch):
    """A bucket run's local staging folder (metrics.jsonl, TensorBoard) used to be a new /tmp folder per start,
    left behind by kill -9. Now one folder per bucket folder, under the cache: the next start empties and reuses
    it, and a clean close removes it."""
    from gpt2_jax.metrics import MetricsLogger, read_metrics

    monkeypatch.setenv("GPT2_JAX_CACHE", str(tmp_path / "cache"))
    killed = MetricsLogger(gcs_dir, tensorboard=False)
    killed.log(1, loss=4.0)
    killed.sync()
    killed.log(2, loss=3.0)  # not uploaded: lost with the process, logged again by the resumed run
    staging = killed._staging
    assert staging.is_relative_to(tmp_path / "cache")  # (and kill -9: nothing closes it)
    with MetricsLogger(gcs_dir, tensorboard=False) as resumed:
        assert resumed._staging == staging
        resumed.log(2, loss=3.5)
    assert [r["loss"] for r in read_metrics(f"{gcs_dir}/metrics.jsonl")] == [4.0, 3.5]
    assert not staging.exists() and list((tmp_path / "cache" / "metrics-staging").iterdir()) == []


# ------------------------------------------------------------------------------------- old checkpoints


def _write_old_layout(run: Path) -> None:
    """Rewrite every checkpoint of `run` as versions before commit cd3ca52 wrote it: c_attn's kernel
    (..., C, 3C) and bias (..., 3C), in the params and in AdamW's moments, instead of (..., 3, n_head, head_dim)."""
    import orbax.checkpoint as ocp

    for step_dir in (run / "checkpoints").iterdir():
        raw = ocp.PyTreeCheckpointer().restore(step_dir / "state")
        flat = ocp.tree.to_flat_dict(raw, sep=".")
        flat = {k: np.asarray(v).reshape(v.shape[:-3] + (-1,)) if "c_attn" in k else np.asarray(v)
                for k, v in flat.items()}
        assert sum("c_attn" in k for k in flat) == 6  # kernel and bias: params, mu, nu
        shutil.rmtree(step_dir / "state")
        ocp.PyTreeCheckpointer().save(step_dir / "state", ocp.tree.from_flat_dict(flat, sep="."))


def _c_attn_shapes(step_dir: Path) -> set[tuple]:
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointHandler().metadata(step_dir / "state").tree
    return {tuple(m.shape) for k, m in ocp.tree.to_flat_dict(tree, sep=".").items() if "c_attn.kernel" in k}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
def test_a_run_saved_before_the_c_attn_layout_change_loads_and_resumes(tiny_run, char_data, tmp_path, capsys):
    """Runs saved before c_attn became (C, 3, n_head, head_dim) used to fail with a shape error. Restoring reads
    the array metadata, finds the old shapes, reads them as saved and reshapes: export gives the same file as
    from the same run in the new layout, and training resumes, writing the new layout."""
    from gpt2_jax.training import run

    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    _write_old_layout(old)
    assert _c_attn_shapes(old / "checkpoints" / "2") == {(1, 32, 96)}
    with pytest.warns(UserWarning, match=r"c_attn\) in the layout before \(C, 3, n_head, head_dim\): reshaped"):
        assert export.main([str(old), "--to", str(tmp_path / "hf-old")]) == 0
    assert export.main([str(tiny_run), "--to", str(tmp_path / "hf-new")]) == 0
    capsys.readouterr()
    assert (tmp_path / "hf-old" / "model.safetensors").read_bytes() == \
        (tmp_path / "hf-new" / "model.safetensors").read_bytes()

    with pytest.warns(UserWarning, match="reshaped on restore"):
        summary = run(tiny_train_config(old, char_data, **ONE_LAYER, max_steps=3, checkpoint_every=1))
    assert summary["start_step"] == 2 and summary["step"] == 3
    assert _c_attn_shapes(old / "checkpoints" / "3") == {(1, 32, 3, 2, 16)}


def test_tests_allow_slow_collectives():
    """The root conftest raises XLA:CPU's 40 s rendezvous timeout for this session and its subprocesses (a
    loaded machine is not a deadlock); XLA accepted the flag, or JAX would not have started."""
    assert "--xla_cpu_collective_call_terminate_timeout_seconds=600" in os.environ["XLA_FLAGS"].split()
    assert len(jax.devices()) == 8
