"""Smoke tests of the benchmark scripts on tiny shapes: they run, and the correctness checks they print
hold (the timings themselves are not tested: speed targets live in the scripts' output, not in tests)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_jax import plan

pytestmark = pytest.mark.e2e  # every test here runs a benchmark script in a subprocess

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str) -> dict:
    """Run a benchmark script as a user would: without the tests' JAX_PLATFORMS=cpu, so that a script that lets JAX
    try the installed GPU plugin or libtpu on this machine (their start-up tracebacks and warnings) fails here."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    for noise in ("Traceback", "plugin configuration error", "cuPTI", "libtpu"):
        assert noise not in r.stderr, f"{script} does not start quietly:\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])  # each script ends with one JSON line


def test_attention_benchmark_compares_every_implementation():
    # T=130: three query blocks for "blocked", the last one two rows long.
    result = bench("attention.py", "--batch=1", "--heads=2", "--seq=130", "--head_dim=16", "--repeats=1")
    assert set(result["rows"]) == {"xla", "einsum", "blocked", "torch SDPA"}
    for impl in ("xla", "blocked"):
        assert result["rows"][impl]["max_abs_diff_vs_einsum"] < 1e-4  # float32 rounding only (~1e-6)
    assert all(r["fastest_ms"] > 0 for r in result["rows"].values())


def test_sample_benchmark_matches_hf_and_prints_the_memory_floor():
    result = bench("sample.py", "--preset=gpt2", "--n_layer=1", "--n_head=2", "--n_embd=32", "--batch=2",
                   "--prompt_len=4", "--new_tokens=4", "--repeats=1")
    assert result["identical_rows"] == 2  # greedy ids equal to HF generate's
    floor = result["memory_floor"]
    # float32 wte + one block's four matrices (C x 3C, C x C, C x 4C, 4C x C) and biases + three LayerNorms;
    # not wpe, of which a decode step reads one row.
    C = 32
    assert floor["weight_bytes"] == 4 * (50257 * C + 12 * C * C + 9 * C + 3 * 2 * C)
    assert floor["bandwidth_gb_per_s"] > 0 and floor["floor_ms_per_token"] > 0


def test_device_check_dry_run_prints_every_step():
    """benchmarks/device_check.sh --dry_run (what a session lent a GPU runs first): prints each command, runs none,
    exits 0. Without the plan extra it says why the planner cannot run and uses micro-batch 16."""
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--dry_run"], cwd=ROOT,
                       env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for step, command in [("cudnn", "-m pytest -q -p no:cacheprovider tests/test_attention.py -k cudnn"),
                          ("train_step", "benchmarks/train_step.py --preset=gpt2 --vocab_size=50304 --dtype=bfloat16"),
                          ("sample", "benchmarks/sample.py --preset=gpt2")]:
        assert f"[{step}, <= " in out and command in out, step
    assert "[setup, <= " in out and "dry run: nothing was run" in out
    if plan.missing_extra(plan.parse_target("h200")):
        assert "plan: the planner cannot compile for h200 here" in out and "install the plan extra" in out
        assert "--micro_batch_size=16 " in out
    else:
        micro = re.search(r"plan: micro-batch (\d+) ", out).group(1)
        assert f"--micro_batch_size={micro} " in out


def test_device_check_rejects_unknown_options():
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--dryrun"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown option --dryrun" in r.stderr


def test_step_time_table_compiles_a_target_once_and_prints_its_row(tmp_path):
    """--compile stores one JSON line per target and skips a target already stored; --markdown prints its row.
    A GPU target: its compile takes seconds, a TPU slice's minutes."""
    if why := plan.missing_extra(plan.parse_target("h100")):
        pytest.skip(why)
    rows, script = tmp_path / "rows.jsonl", str(ROOT / "benchmarks" / "step_time_table.py")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}

    def run(*args):
        r = subprocess.run([sys.executable, script, *args, f"--out={rows}"], cwd=ROOT, capture_output=True,
                           text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr
        return r.stdout

    row = json.loads(run("--compile", "h100").splitlines()[-1])
    assert row["target"] == "h100" and row["chips"] == 1 and row["bound"] == "compute"
    assert row["memory_s"] is None and row["mfu_ceiling"] == 1.0  # a GPU compile reports no bytes accessed
    assert row["command"].startswith("python -m gpt2_jax.plan --target=h100 ")
    assert run("--compile", "h100") == f"h100: in {rows}, skipped (--redo compiles it again)\n"
    assert rows.read_text() == json.dumps(row) + "\n"
    table = run("--markdown").splitlines()
    assert len(table) == 3 and table[2].startswith("| h100 | 1 x NVIDIA H100 ")


def test_train_step_benchmark_profiles_the_step_and_names_the_top_operations(tmp_path):
    """--profile traces the trainer's compiled step after the timed rounds; trace_top.py ranks what ran on the
    compute threads (XLA ops such as fusions and the all-reduce, not the runtime's waits), as device_check.sh
    reports it for a GPU."""
    folder = tmp_path / "profile"
    result = bench("train_step.py", "--preset=char", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
                   "--micro_batch_size=4", "--steps=2", "--rounds=1", "--warmup=1", "--no_compile", "--no_forward",
                   f"--profile={folder}")
    profile = result["profile"]
    assert profile["folder"] == str(folder) and profile["source"] == "XLA:CPU compute threads"
    top = profile["top"]
    assert 1 <= len(top) <= 10 and profile["total_ms"] > 0
    assert [r["ms"] for r in top] == sorted((r["ms"] for r in top), reverse=True)
    assert 0 < sum(r["share"] for r in top) <= 1 + 1e-9
    assert not [r["op"] for r in top if re.match(r"(ThunkExecutor|Rendezvous|Wait)", r["op"])]
    # The CLI on the same trace prints the same ranking; on a folder without one, one line naming it.
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trace_top.py"), str(folder), "--top=3"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and [row["op"] for row in json.loads(r.stdout.splitlines()[-1])["top"]] == \
        [row["op"] for row in top[:3]]
    (empty := tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trace_top.py"), str(empty)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and r.stderr.strip() == (f"error: {empty}: no *.trace.json.gz under it; pass the "
                                                      "folder jax.profiler wrote (train.py --profile_steps writes "
                                                      "OUT_DIR/profile)")
