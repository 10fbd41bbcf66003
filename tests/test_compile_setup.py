"""What train.py does before the first step: the persistent compile cache, the auto micro-batch (the planner on
the attached devices, GPU/TPU only) and the XLA flags of the planner's GPU compiles."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_jax import plan
from gpt2_jax.launch import GPU_XLA_FLAGS
from gpt2_jax.training.resolved import resolve_run
from gpt2_jax.training.settings import TrainConfig, resolve

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(preset="char", n_layer=2, n_embd=64, n_head=2, block_size=64, mesh="data:1")


@pytest.mark.e2e
def test_second_run_reads_the_compile_cache(tmp_path):
    """Two runs with --compile_cache=DIR: the first writes entries there, the second loads them (JAX logs each
    persistent-cache hit as a warning under JAX_LOG_COMPILES). No timings asserted: the machine is shared."""
    cache = tmp_path / "cache"
    flags = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32", "--max_steps=1", "--eval_every=0",
             "--sample_every=0", "--tensorboard=false", f"--compile_cache={cache}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")} | {"JAX_PLATFORMS": "cpu"}

    def run(n):
        return subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, f"--out_dir={tmp_path / f'run{n}'}"],
                              cwd=ROOT, env=env | {"JAX_LOG_COMPILES": "1"}, capture_output=True, text=True,
                              timeout=600)

    first = run(1)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"compile cache: {cache} (--compile_cache)" in first.stdout
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "the first run wrote no cache entry"
    assert "Persistent compilation cache hit" not in first.stderr
    second = run(2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("Persistent compilation cache hit") >= 1
    assert "step 1/1" in second.stdout


# --- a quiet start on a machine without accelerators ------------------------------------------------


# What JAX's GPU and TPU plugins print when they probe hardware that is not there.
PLUGIN_NOISE = ("Traceback", "cuPTI", "CUDA", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "libtpu")


def quiet_start_env() -> dict:
    """This process's environment without JAX_*, TPU_* and XLA_* variables (as a user's shell has it); skips
    where no plugin is installed (nothing could be noisy) or a GPU or TPU is attached (the plugins should load)."""
    import importlib.util
    import pkgutil

    from gpt2_jax import backends

    plugins = [m.name for m in pkgutil.iter_modules(importlib.import_module("jax_plugins").__path__)] \
        if importlib.util.find_spec("jax_plugins") else []
    if not plugins and importlib.util.find_spec("libtpu") is None:
        pytest.skip("neither a JAX GPU plugin nor libtpu is installed (pip install -e '.[plan]'): nothing to be noisy")
    if backends.has_accelerator():
        pytest.skip("this machine has a GPU or TPU: the plugins are meant to load")
    return {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "TPU_", "XLA_"))}


@pytest.mark.e2e
def test_plain_train_py_starts_quietly_with_the_gpu_and_tpu_plugins_installed(tmp_path):
    """`python train.py` with no --platform and no JAX_PLATFORMS, where the CUDA plugin and libtpu are installed
    (the plan extra) but no GPU or TPU is attached: JAX would try both plugins and print the CUDA plugin's
    traceback ("Unable to load cuPTI") and libtpu's warnings. backends.py sees no device file and picks the CPU."""
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--n_layer=1", "--n_embd=32", "--n_head=2",
                        "--block_size=32", "--max_steps=1", "--eval_every=0", "--sample_every=0", "--tensorboard=false",
                        "--compile_cache=off", f"--out_dir={tmp_path / 'run'}"],
                       cwd=ROOT, env=quiet_start_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 1/1" in r.stdout
    for noise in PLUGIN_NOISE:
        assert noise not in r.stderr, f"{noise!r} in train.py's stderr:\n{r.stderr[-3000:]}"


# --- --micro_batch_size=0 on GPU/TPU ---------------------------------------------------------------


@pytest.mark.e2e
def test_auto_micro_batch_is_the_largest_power_of_two_that_fits(monkeypatch):
    """The planner's `local` target on the CPU, with the memory budget cut to fall between what micro-batches
    of 8 and 16 need: 8 is chosen. (Each size is compiled once: plan_one is memoised here.)"""
    config = TrainConfig(**TINY, total_batch_size=64 * 64)
    local = plan.load_target(plan.parse_target("local"))
    run = resolve_run(config, local.devices, local.platform)
    compiled, plan_one = {}, plan.plan_one

    def memo(run, target, count_flops=True):
        micro = run.tc.micro_batch_size
        if micro not in compiled:
            compiled[micro] = plan_one(run, dataclasses.replace(target, budget_bytes=2**62), False)
        p = dataclasses.replace(compiled[micro], budget_bytes=target.budget_bytes)
        return dataclasses.replace(p, fits=p.need_bytes <= target.budget_bytes)

    monkeypatch.setattr(plan.compile, "plan_one", memo)
    need = {m: plan.compile.plan_one(run.replace(micro_batch_size=m, grad_accum=2), local).need_bytes
            for m in (8, 16)}
    assert need[8] < need[16]
    budget = (need[8] + need[16]) // 2
    monkeypatch.setattr(plan.compile, "load_target", lambda spec: dataclasses.replace(local, budget_bytes=budget,
                                                                                 budget_note="a test's budget"))
    chosen, note = plan.auto_micro_batch(run)
    assert chosen.tc.micro_batch_size == 8 and chosen.grad_accum == 64 * 64 // (8 * 64), note
    assert chosen.mesh is run.mesh  # the run's mesh: built once
    assert sorted(compiled) == [8, 16], "the search starts at 16 per device, halves once, and stops"
    assert note.startswith(f"micro-batch: 8, the largest power of two that fits ({need[8] / 2**30:.2f} GiB of ")
    # The largest that fits does not divide --total_batch_size into whole micro-batches: halved until it does.
    chosen, _ = plan.auto_micro_batch(resolve_run(dataclasses.replace(config, total_batch_size=4 * 64)))
    assert chosen.tc.micro_batch_size == 4
    # A budget that even one sequence overflows: the trainer's default, said so (sizes 4, 2, 1 compiled as well).
    monkeypatch.setattr(plan.compile, "load_target", lambda spec: dataclasses.replace(local, budget_bytes=1024,
                                                                                 budget_note="a test's budget"))
    chosen, note = plan.auto_micro_batch(run)
    default = resolve(config, "cpu", 1).micro_batch_size  # the trainer's own auto value for this config
    assert chosen is run and "none of the sizes tried fits a test's budget" in note
    assert f"using the default ({default})" in note


@pytest.mark.parametrize("backend, flag, calls, used", [
    ("gpu", 0, 1, 32), ("tpu", 0, 1, 32), ("cpu", 0, 0, 0), ("gpu", 8, 0, 8),
])
def test_train_asks_the_planner_only_on_gpu_and_tpu(monkeypatch, capsys, backend, flag, calls, used):
    import jax

    import train
    from gpt2_jax import launch, training

    asked, ran = [], []
    monkeypatch.setattr(launch, "start_jax", lambda config: None)
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(plan, "auto_micro_batch",
                        lambda run: asked.append(run) or (run.replace(micro_batch_size=32), "micro-batch: 32"))
    monkeypatch.setattr(training, "run", lambda run: ran.append(run) or {})
    train.main([f"--micro_batch_size={flag}"])
    default = resolve(TrainConfig(), backend, jax.device_count()).micro_batch_size
    assert len(asked) == calls and ran[0].tc.micro_batch_size == (used or default)
    assert ran[0].platform == backend and (not asked or asked[0].mesh is ran[0].mesh)  # resolved once, one mesh
    assert ("micro-batch: 32" in capsys.readouterr().out) == bool(calls)


# --- the planner compiles GPU targets with the flags train.py sets ------------------------------------


def test_plan_sets_the_gpu_flags_in_its_gpu_compiles_unless_xla_flags_is_set(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    _, env = plan.sandbox_command(["--target=h100"], plan.parse_target("h100"))
    assert env["XLA_FLAGS"] == " ".join(GPU_XLA_FLAGS)
    _, env = plan.sandbox_command(["--target=v5e-8"], plan.parse_target("v5e-8"))
    assert "XLA_FLAGS" not in env
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/d")
    _, env = plan.sandbox_command(["--target=h100"], plan.parse_target("h100"))
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/d"
    monkeypatch.setenv("XLA_FLAGS", " ".join(GPU_XLA_FLAGS))
    assert plan.xla_flags_line(plan.parse_target("h100")).endswith("(the recommended GPU flags (launch.GPU_XLA_FLAGS), "
                                                                    "as train.py --platform=gpu sets them)")
    assert plan.xla_flags_line(plan.parse_target("v5e-8")) == ""
