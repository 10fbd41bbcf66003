"""Smoke tests of the benchmark scripts on tiny shapes: they run, and the correctness checks they print
hold (the timings themselves are not tested: speed targets live in the scripts' output, not in tests)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str) -> dict:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
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
