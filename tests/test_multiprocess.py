"""The whole training loop on several processes equals one process: 2 processes x 4 CPU devices (gloo
collectives) with the val loss, HellaSwag and samples in the loop, then its checkpoint resumed onto
1 process x 8 devices and onto 4 processes x 2 devices, all against one uninterrupted 1 x 8 run.

A GPT-2 BPE model (1 layer, 32 wide, vocabulary padded to 50304) on Tiny Shakespeare, so that HellaSwag
runs; shuffled data order (the default). Tolerances as in tests/test_train.py: other process counts are
other reduction orders, ~1e-7 relative; HellaSwag picks must be identical.
"""

import json
import os
import shutil

import numpy as np
import pytest
from test_reliability import TrainProcess, free_port, timeline
from tiny import TINY_RUN

pytestmark = pytest.mark.e2e  # several train.py processes, end to end

STEPS = 8
LOSS_ATOL = 1e-5
# The tiny run (tests/tiny.py) as a 1-layer GPT-2 BPE model with a context of 64, every periodic task every 4 steps.
FLAGS = dict(TINY_RUN, platform="cpu", preset="gpt2", n_layer=1, block_size=64, total_batch_size=8 * 64,
             max_steps=STEPS, warmup_steps=2, max_lr=1e-3, eval_every=4, eval_tokens=8 * 64 * 4, hellaswag_every=4,
             hellaswag_limit=8, sample_every=4, sample_tokens=8, checkpoint_every=4, mesh="data:8")


def launch(tmp_path, name, data, hellaswag_file, out, processes: int, env) -> list[TrainProcess]:
    """train.py as `processes` processes sharing 8 CPU devices among them; waits for all to finish."""
    port = free_port()
    values = {**FLAGS, "data": data, "out_dir": out, "hellaswag_data": hellaswag_file,
              "local_device_count": 8 // processes}
    procs = []
    try:
        for i in range(processes):
            extra = ({"distributed": "true", "num_processes": processes, "process_id": i,
                      "coordinator_address": f"127.0.0.1:{port}"} if processes > 1 else {})
            args = [f"--{k}={v}" for k, v in {**values, **extra}.items()]
            procs.append(TrainProcess(args, env=env, stderr_path=tmp_path / f"{name}-{i}.txt"))
        codes = [p.finish(600) for p in procs]
    finally:
        for p in procs:
            p.__exit__()
    assert codes == [0] * processes, [p.stderr[-2000:] for p in procs]
    return procs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bpe_run, hellaswag_file):
    """{name: out_dir}: the 1 x 8 reference, and 2 x 4 from the start."""
    tmp = tmp_path_factory.mktemp("multiprocess")
    data = bpe_run[1]
    cache = tmp / "jax-cache"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    out = {"1x8": tmp / "1x8", "2x4": tmp / "2x4"}
    launch(tmp, "1x8", data, hellaswag_file, out["1x8"], 1, env)
    procs = launch(tmp, "2x4", data, hellaswag_file, out["2x4"], 2, env)
    assert "sample 0:" in procs[0].stdout and "sample 0:" not in procs[1].stdout  # process 0 prints
    for processes, name in ((1, "resumed 1x8"), (4, "resumed 4x2")):
        # The 2 x 4 run as it was after step 4: its checkpoint of step 4 and the metrics up to it.
        run = out[name] = tmp / name.replace(" ", "-")
        shutil.copytree(out["2x4"] / "checkpoints" / "4", run / "checkpoints" / "4")
        rows = (out["2x4"] / "metrics.jsonl").read_text().splitlines(keepends=True)
        (run / "metrics.jsonl").write_text("".join(r for r in rows if json.loads(r)["step"] <= 4))
        procs = launch(tmp, name, data, hellaswag_file, run, processes, env)
        assert "resumed from" in procs[0].stdout and "at step 4" in procs[0].stdout
    return out


@pytest.mark.parametrize("name", ["2x4", "resumed 1x8", "resumed 4x2"])
def test_whole_loop_equals_one_process(runs, name):
    ref, got = runs["1x8"], runs[name]
    for key in ("loss", "val_loss"):
        want, have = timeline(ref, key), timeline(got, key)
        assert sorted(have) == sorted(want), key  # every step (or eval step) logged once
        np.testing.assert_allclose([have[s] for s in sorted(want)], [want[s] for s in sorted(want)],
                                   atol=LOSS_ATOL, rtol=0, err_msg=key)
    assert sorted(timeline(ref, "val_loss")) == [4, 8]
    for key in ("hellaswag_acc_norm", "hellaswag_acc"):
        assert timeline(got, key) == timeline(ref, key), key  # the same picks, exactly
