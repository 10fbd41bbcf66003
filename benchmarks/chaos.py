"""Chaos test: kill a tiny training run with SIGKILL at random moments, restart it each time, and check
that it ends exactly where a run that was never interrupted ends.

    python benchmarks/chaos.py --kills 5 --seed 0
    python benchmarks/chaos.py --kills 20 --seed 1 --steps 120 --devices 1 --out /tmp/chaos

What it does (CPU, a 1-layer char model, `--devices` fake devices on a data-parallel mesh):
1. Two uninterrupted runs of train.py (the first also fills a JAX compilation cache, so that restarts
   start in seconds). They must be bit-identical, or no comparison below would mean anything; the
   second gives the timings used to place the kills.
2. The chaos run: K times, start train.py (it resumes from its out_dir) and SIGKILL it at a moment
   drawn uniformly from [0, start-up + 80% of the remaining training time] (or once it has printed the
   second-to-last step, if it runs faster than the timed run), so kills land in start-up, restore,
   compiles, steps, async checkpoint writes and the deletion of old checkpoints alike. Each
   restart must resume from the newest complete checkpoint on disk (never a partial one, never
   an older one, no "Could not restore" warning).
3. A last restart runs to the end; its final checkpoint (params, data position) and the per-step
   losses of metrics.jsonl (the later row wins where a resumed run re-logged a step) are compared bit
   for bit with the uninterrupted run's.

Prints one line per kill and a verdict; the exit status is 0 iff every restart resumed correctly and the
result is bit-identical.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt2_jax.backends import cpu_if_no_accelerator  # after the checkout is on sys.path

cpu_if_no_accelerator(os.environ)  # no GPU or TPU here: the CPU, without the plugins' start-up tracebacks

RESUMED = re.compile(r"resumed from .* at step (\d+)")
STEP = re.compile(r"^step +(\d+)/")
MODEL = re.compile(r"^model ")  # printed after the choice of checkpoint (or none) is made


class Attempt:
    """One `python train.py` process; a thread records its stdout lines with their times."""

    def __init__(self, args: list[str], env: dict, stderr_path: Path):
        self.t0 = time.monotonic()
        self.stderr_path = stderr_path
        with open(stderr_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                                         stdout=subprocess.PIPE, stderr=err, text=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.t0, line.rstrip("\n")))

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            sys.exit(f"train.py took longer than {timeout} s; stderr in {self.stderr_path}")
        self.reader.join()
        return rc

    def first(self, pattern: re.Pattern) -> re.Match | None:
        return next((m for _, line in self.lines if (m := pattern.search(line))), None)

    def last_step(self) -> int | None:
        steps = [int(m.group(1)) for _, line in self.lines if (m := STEP.search(line))]
        return steps[-1] if steps else None

    def stderr(self) -> str:
        return self.stderr_path.read_text()


def on_disk(out_dir: Path) -> tuple[list[int], list[str]]:
    """(complete checkpoint steps, names of saves in flight) in out_dir/checkpoints."""
    folder = out_dir / "checkpoints"
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return sorted(int(n) for n in names if n.isdigit()), [n for n in names if not n.isdigit()]


def timeline(out_dir: Path) -> dict[int, float]:
    """step -> train loss; when steps go back (a resumed run), later rows replace the earlier ones."""
    from gpt2_jax.metrics import read_metrics

    points: dict[int, float] = {}
    for row in read_metrics(out_dir / "metrics.jsonl"):
        if "loss" in row:
            points = {s: v for s, v in points.items() if s < row["step"]}
            points[row["step"]] = row["loss"]
    return points


def final_state(out_dir: Path):
    """(params as numpy arrays, checkpoint meta) of the newest checkpoint."""
    import jax
    import numpy as np
    from flax import nnx

    from gpt2_jax.runs import load_run

    model, _, meta = load_run(out_dir)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))], meta


def identical(a: Path, b: Path) -> tuple[bool, str]:
    """Bit-identical final params, data position and per-step losses? (verdict, what differs)."""
    import numpy as np

    (pa, ma), (pb, mb) = final_state(a), final_state(b)
    if ma["step"] != mb["step"]:
        return False, f"final steps differ: {ma['step']} vs {mb['step']}"
    if ma["loader"] != mb["loader"]:
        return False, f"data positions differ: {ma['loader']} vs {mb['loader']}"
    diff = [float(np.max(np.abs(x - y))) for x, y in zip(pa, pb, strict=True) if not np.array_equal(x, y)]
    if diff:
        return False, f"{len(diff)} of {len(pa)} param tensors differ (max abs diff {max(diff):.3g})"
    la, lb = timeline(a), timeline(b)
    if la != lb:
        bad = [s for s in sorted(set(la) | set(lb)) if la.get(s) != lb.get(s)]
        return False, f"losses differ at steps {bad[:10]}"
    return True, f"{len(pa)} param tensors, {len(la)} step losses"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs to survive (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times (default 0)")
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument("--checkpoint_every", type=int, default=3, help="(default 3)")
    parser.add_argument("--keep_checkpoints", type=int, default=2, help="(default 2)")
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices, all on --mesh=data:N (default 8)")
    parser.add_argument("--out", default="", help="work folder (default: a temp folder, deleted at the end)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds any one train.py may take")
    args = parser.parse_args(argv)

    work = Path(args.out or tempfile.mkdtemp(prefix="gpt2-jax-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("reference", "reference-2", "chaos", "logs"):
        shutil.rmtree(work / name, ignore_errors=True)
    (work / "logs").mkdir()
    data = work / "data"
    if not (data / "meta.json").exists():
        from gpt2_jax import data as data_lib

        data_lib.prepare_text_string(data_lib.default_corpus()[:100_000], data, tokenizer="char")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(work / "jax-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

    def flags(out_dir: Path) -> list[str]:
        return [f"--data={data}", f"--out_dir={out_dir}", "--platform=cpu", f"--local_device_count={args.devices}",
                f"--mesh=data:{args.devices}", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
                "--micro_batch_size=8", f"--max_steps={args.steps}", "--warmup_steps=5", "--eval_every=0",
                "--sample_every=0", f"--checkpoint_every={args.checkpoint_every}",
                f"--keep_checkpoints={args.keep_checkpoints}", "--tensorboard=false", "--dropout=0",
                "--dtype=float32"]

    def uninterrupted(name: str) -> Attempt:
        attempt = Attempt(flags(work / name), env, work / "logs" / f"{name}.txt")
        if attempt.wait(args.timeout) != 0:
            sys.exit(f"the uninterrupted run failed; see {attempt.stderr_path}")
        return attempt

    t = time.monotonic()
    uninterrupted("reference")
    cold = time.monotonic() - t
    ref = uninterrupted("reference-2")
    startup = ref.lines[[i for i, (_, line) in enumerate(ref.lines) if STEP.search(line)][0]][0]
    training = ref.lines[-1][0] - startup
    same, detail = identical(work / "reference", work / "reference-2")
    print(f"uninterrupted runs: {cold:.1f} s (cold compile) and {startup + training:.1f} s (start-up {startup:.1f} s, "
          f"{args.steps} steps {training:.1f} s); bit-identical to each other: {'yes' if same else 'NO: ' + detail}")
    if not same:
        return 1

    rng = random.Random(args.seed)
    out = work / "chaos"
    problems, landed = [], 0
    for i in range(1, args.kills + 2):
        complete, _ = on_disk(out)
        expected = complete[-1] if complete else None  # where this start must resume
        remaining = (args.steps - (expected or 0)) / args.steps * training
        attempt = Attempt(flags(out), env, work / "logs" / f"chaos-{i}.txt")
        final = i == args.kills + 1
        if not final:
            at = rng.uniform(0, startup + 0.8 * remaining)
            # ... or earlier, if this start runs faster than the timed one: a kill must land before the end.
            while (time.monotonic() - attempt.t0 < at and attempt.proc.poll() is None
                   and (attempt.last_step() or 0) < args.steps - 1):
                time.sleep(0.002)
            at = time.monotonic() - attempt.t0
            if attempt.proc.poll() is None:
                attempt.proc.send_signal(signal.SIGKILL)
                landed += 1
        rc = attempt.wait(args.timeout)
        resumed = attempt.first(RESUMED)
        got = int(resumed.group(1)) if resumed else None
        if "Could not restore" in attempt.stderr():
            problems.append(f"start {i} met a damaged checkpoint: see {attempt.stderr_path}")
        if not resumed and not attempt.first(MODEL):  # killed before it chose where to start
            start = f"start {i}: killed before choosing a checkpoint"
        else:
            start = f"start {i}: resumed at step {got}" if resumed else f"start {i}: fresh start"
            start += " (the newest complete: ok)" if got == expected else f" (NEWEST COMPLETE WAS {expected})"
            if got != expected:
                problems.append(f"start {i} resumed from {got}, but the newest complete checkpoint was {expected}")
        if final:
            if rc != 0:
                problems.append(f"the final run failed (exit {rc}); see {attempt.stderr_path}")
            print(f"{start}; ran to the end (exit {rc})")
        elif rc == -signal.SIGKILL:
            step = attempt.last_step()
            complete, partial = on_disk(out)
            where = f"after step {step}" if step is not None else "in start-up (no step yet)"
            print(f"{start}; SIGKILL at {at:.2f} s, {where}; on disk: complete {complete}"
                  + (f", in flight {partial}" if partial else ""))
        else:
            print(f"{start}; finished (exit {rc}) before its kill at {at:.2f} s")
            if rc != 0:
                problems.append(f"start {i} failed (exit {rc}); see {attempt.stderr_path}")

    same, detail = identical(out, work / "reference")
    print(f"survived {landed}/{args.kills} kills" + ("" if landed == args.kills else " (the rest came too late)")
          + f"; final params bit-identical to the uninterrupted run: {'yes' if same else 'NO'} ({detail})")
    for p in problems:
        print(f"problem: {p}")
    if not args.out and same and not problems:
        shutil.rmtree(work, ignore_errors=True)
    elif not same or problems:
        print(f"logs and runs kept in {work}")
    return 0 if same and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
