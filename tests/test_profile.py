"""--profile_steps=A:B (training/profile.py): a jax.profiler trace of steps A to B in OUT_DIR/profile, on a CPU.

The trace is read back: the Chrome-trace JSON that the profiler writes beside its xplane file must hold the
train step's executions, as many as the steps profiled, and nothing of the steps outside the window."""

import gzip
import json
import re

import pytest
from tiny import tiny_train_config

from gpt2_jax.training import run
from gpt2_jax.training.settings import TrainConfig


def trace_events(out_dir) -> list[dict]:
    (trace,) = sorted((out_dir / "profile").glob("plugins/profile/*/*.trace.json.gz"))
    return [e for e in json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"] if isinstance(e, dict)]


def executions(out_dir) -> dict[str, int]:
    """How many times each compiled program ran in the trace (the runtime's one event per launch; per-device
    events carry a "[i] " prefix)."""
    found = {}
    for e in trace_events(out_dir):
        if m := re.fullmatch(r"CommonPjRtLoadedExecutable::Execute \(jit_(\w+)\)", e.get("name", "")):
            found[m.group(1)] = found.get(m.group(1), 0) + 1
    return found


@pytest.mark.slow
@pytest.mark.parametrize("total_batch, window, profiled", [(8 * 32, "2:3", 2), (2 * 8 * 32, "3:3", 1)])
def test_profile_steps_writes_a_trace_of_those_steps(tmp_path, char_data, capsys, total_batch, window, profiled):
    """One micro-batch a step and two: the trace holds the step program of the profiled steps alone (one program
    a step either way), and the log says where the trace is and how to open it."""
    out = tmp_path / "run"
    run(tiny_train_config(out, char_data, max_steps=4, total_batch_size=total_batch, profile_steps=window))
    assert executions(out) == {"train_step": profiled}  # one program a step, its micro-batches inside
    log = capsys.readouterr().out
    assert f"profiling steps {window.replace(':', ' to ')} (--profile_steps)" in log
    assert f"written to {out / 'profile'}: open it with `tensorboard --logdir {out / 'profile'}`" in log


@pytest.mark.slow
def test_a_run_that_ends_inside_the_window_keeps_its_trace(tmp_path, char_data, capsys):
    out = tmp_path / "run"
    run(tiny_train_config(out, char_data, max_steps=3, profile_steps="3:10"))
    assert executions(out) == {"train_step": 1}
    assert f"profile of steps 3 to 3 written to {out / 'profile'}" in capsys.readouterr().out


@pytest.mark.parametrize("value, problem", [
    ("1:3", "starts before step 2: step 1 compiles the program"),
    ("0:0", "starts before step 2"),
    ("5:3", "ends before it starts; give A:B with A <= B (e.g. 5:7)"),
    ("two:three", "is not A:B (two step numbers, e.g. 5:7)"),
    ("2:", "is not A:B"),
])
def test_bad_profile_steps_are_refused_before_anything_runs(value, problem):
    with pytest.raises(ValueError, match=re.escape(f"--profile_steps={value!r} {problem}")):
        TrainConfig(profile_steps=value)


def test_profile_steps_of_one_step():
    assert TrainConfig(profile_steps="4").profile_steps == "4"  # A alone: that one step
