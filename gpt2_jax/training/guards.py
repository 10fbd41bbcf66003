"""The run's guards: what happens on a non-finite step (--on_nan) and on SIGTERM / SIGINT."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading

import jax

from gpt2_jax.checkpoint import Checkpointer
from gpt2_jax.distributed import log, max_over_processes

STOP_CHECK_EVERY = 10  # steps between the stop-signal exchanges of a multi-process run


@dataclasses.dataclass
class NanPolicy:
    """--on_nan: a non-finite loss or gradient norm left the state unchanged (the train step's guard);
    `stop` ends the run there, `skip` goes on, but stops too after more than `max_skips` in a row."""

    mode: str  # "stop" | "skip"
    max_skips: int  # 0: no limit
    skipped: int = 0  # skipped updates in all (they did not advance the LR schedule)
    in_a_row: int = 0  # consecutive ones up to now

    def check(self, step: int, metrics: dict, ckpt: Checkpointer) -> None:
        self.in_a_row = 0 if metrics["finite"] else self.in_a_row + 1
        if metrics["finite"]:
            return
        values = f"loss {metrics['loss']}, grad norm {metrics['grad_norm']}"
        if self.mode == "stop":
            self._stop(f"non-finite loss or gradient norm at step {step} ({values})",
                       "Lower --max_lr, or use --on_nan=skip to drop such updates", ckpt)
        if 0 < self.max_skips < self.in_a_row:
            self._stop(f"non-finite loss or gradient norm at {self.in_a_row} steps in a row "
                       f"({step - self.in_a_row + 1}-{step}), more than --max_skips={self.max_skips}: the run has "
                       f"likely diverged (step {step}: {values})", "Lower --max_lr, or raise --max_skips (0: no limit)",
                       ckpt)
        self.skipped += 1
        limit = f", {self.in_a_row} in a row of at most --max_skips={self.max_skips}" if self.max_skips else ""
        log(f"step {step}: non-finite loss or gradient norm; update skipped (--on_nan=skip, "
             f"{self.skipped} skipped so far){limit}")

    @staticmethod
    def _stop(what: str, fix: str, ckpt: Checkpointer):
        ckpt.wait()  # the newest save may still be in flight: name the one that is on disk
        good = ckpt.latest_step()
        raise FloatingPointError(f"{what}; the update was not applied. Last good checkpoint: "
                                 f"{'none' if good is None else f'step {good}'} in {ckpt.directory}. {fix}")


class StopSignal:
    """SIGTERM/SIGINT: finish the step, checkpoint, exit. A second signal exits at once (status 128+N),
    without waiting for the step or a save: the checkpoints on disk stay complete (orbax commits a step
    by renaming its folder, so a save cut short leaves only a temp folder that restore ignores).

    Python runs signal handlers only between bytecodes of the main thread, which may be blocked for
    minutes (a first compile, a collective waiting for a dead process). So the handler only records
    the signal; a thread reads the signal numbers that CPython's C-level handler writes at once to the
    "wakeup fd", prints, and exits on the second.

    Processes of one run must stop after the same step, because they save the checkpoint together:
    `agreed()` is the decision of all of them, so a signal to any one process stops the whole run.

    The step in progress always finishes (it is one program): the message says how long a step takes once the
    loop has timed one (`step_time`), which on a CPU may be minutes.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None  # name of the first signal, as the main thread saw it
        self.step_time = ""  # "3.2 min": how long a step takes here, once the loop knows
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._old_wakeup = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="StopSignal", daemon=True).start()

    def _handle(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name

    def _watch(self):
        count = 0
        while data := os.read(self._read, 64):  # b"" once restore() closes the write end
            for signum in data:
                if signum not in self.SIGNALS:
                    continue
                count += 1
                name = signal.Signals(signum).name
                if count == 1:
                    took = f" (a step takes about {self.step_time} here)" if self.step_time else ""
                    print(f"\n{name}: finishing this step and writing a checkpoint{took} (send again to exit at "
                          "once)", file=sys.stderr, flush=True)
                else:
                    print(f"\nsecond signal ({name}): exiting now; the checkpoints on disk are intact",
                          file=sys.stderr, flush=True)
                    os._exit(128 + signum)
        os.close(self._read)

    def agreed(self, step: int) -> str | None:
        """The name of the signal to stop for (None: go on), the same on every process. Several processes
        exchange it (a collective) only every STOP_CHECK_EVERY steps, so a stop comes at most that many
        steps late; one process checks at every step."""
        if jax.process_count() == 1:
            return self.received
        if step % STOP_CHECK_EVERY:
            return None
        signum = max_over_processes(signal.Signals[self.received].value if self.received else 0)
        return signal.Signals(signum).name if signum else None

    def restore(self):
        signal.set_wakeup_fd(self._old_wakeup)
        os.close(self._write)
        for s, h in self._old.items():
            signal.signal(s, h)
