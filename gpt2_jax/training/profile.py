"""--profile_steps=A:B: a `jax.profiler` trace of training steps A to B, written to OUT_DIR/profile.

The trace starts before step A is dispatched and stops once step B's results are on the host, so it holds
those steps whole: the device's kernels and collectives, and the host's dispatch and data loading between them.
Step 1 compiles the program, so A >= 2 (settings.profile_steps_problem). Each process writes its own host's file
(`plugins/profile/<time>/<host>.xplane.pb`, with a `.trace.json.gz` beside it). A bucket out_dir: the trace is
written to a local folder first, then uploaded (the profiler writes local files only).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax

from gpt2_jax import storage
from gpt2_jax.distributed import log
from gpt2_jax.training.settings import profile_steps


class StepProfiler:
    """Starts and stops the trace around steps A..B of `tc.profile_steps`; does nothing without it."""

    def __init__(self, spec: str, out_dir):
        self.steps = profile_steps(spec)
        self.out_dir, self.remote = out_dir, storage.is_remote(out_dir)
        self.folder = (storage.local_folder_for(out_dir, "profile") if self.remote
                       else Path(str(out_dir)) / "profile")
        self.active = False

    def before(self, step: int) -> None:
        """Called before step `step` is dispatched: the trace starts before step A."""
        if self.steps and step == self.steps[0]:
            if self.remote:
                shutil.rmtree(self.folder, ignore_errors=True)  # what an earlier run left to upload
            jax.profiler.start_trace(str(self.folder))
            self.active = True
            log(f"profiling steps {self.steps[0]} to {self.steps[1]} (--profile_steps)")

    def after(self, step: int, state) -> None:
        """Called once step `step` is dispatched: after step B, wait for it and stop."""
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(state)
            self.stop(step)

    def stop(self, step: int) -> None:
        """Write the trace (and upload it for a bucket out_dir); say where it is and how to open it."""
        self.active = False
        jax.profiler.stop_trace()
        where = self.folder
        if self.remote:
            where = self.out_dir / "profile"
            for f in sorted(p for p in self.folder.rglob("*") if p.is_file()):
                target = where / f.relative_to(self.folder).as_posix()
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(f.read_bytes())
            shutil.rmtree(self.folder, ignore_errors=True)
        first = self.steps[0]
        log(f"profile of steps {first} to {step} written to {where}: open it with `tensorboard --logdir {where}` "
            f"(pip install tensorboard tensorboard-plugin-profile; the Profile tab) or xprof, or load "
            f"plugins/profile/*/*.trace.json.gz in Perfetto (ui.perfetto.dev)")

    def close(self, step: int) -> None:
        """The run ended inside the window (a stop signal, or --max_steps before B): keep what was traced."""
        if self.active:
            self.stop(step)
