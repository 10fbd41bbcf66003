"""Train GPT-2 with JAX.

    python train.py                                  # a few minutes on a CPU: char-level model on Python's docs
    python train.py --platform=gpu --preset=gpt2 --data=DIR   # the GPT-2 124M reproduction (FineWeb-Edu 10B)
    python train.py --help                           # every setting, with its default

Every field of gpt2_jax.training.settings.TrainConfig is a --key=value flag; true/false flags also work bare
(--resume). The backend is chosen before JAX starts, and values that make no sense (--max_steps=-5) stop
the run before that, with exit status 2.

Stopping and resuming: SIGTERM or Ctrl-C (SIGINT) finishes the current step, writes a checkpoint and
exits; a second signal exits at once, leaving the checkpoints already on disk intact. Run the same
command again to resume from the newest good checkpoint in --out_dir (also after `kill -9` or a crash).

Compiling: XLA programs are cached on disk (--compile_cache), so a second start with the same settings skips
most of the compile time. An explicit JAX_COMPILATION_CACHE_DIR in the environment wins over the default
folder (not over --compile_cache=DIR or off). With --platform=gpu the recommended XLA flags
(gpt2_jax.launch.GPU_XLA_FLAGS) are set unless XLA_FLAGS is already set: XLA_FLAGS="" runs XLA's defaults.
--micro_batch_size=0 on a GPU or TPU compiles the train step for a few sizes first and takes the largest that
fits in the device's memory (python -m gpt2_jax.plan --target=local --search shows the same search).

Exit status: 0 finished; 1 an error (the message says what to change); 2 bad flags; 128+N stopped by
signal N (130 SIGINT, 143 SIGTERM), as a shell reports a killed process, so that `train.py && next`
does not go on with an unfinished model.
"""

from __future__ import annotations

import signal
import sys

from gpt2_jax import launch  # no JAX: it sets JAX's environment first
from gpt2_jax.cli import one_line_errors
from gpt2_jax.training.settings import parse_flags  # imports nothing heavy: JAX is not loaded yet


# OSError: missing files, an unreachable bucket. Ctrl-C in the training loop stops it after a checkpoint (the loop's
# handler); before it (start-up), it ends here: one line, exit 130, and the folder a new run made is removed.
@one_line_errors(errors=(ValueError, OSError, ImportError, FloatingPointError),
                 interrupted="stopped before training began; no step was trained. Run the same command to start again")
def main(argv: list[str] | None = None) -> int:
    config = parse_flags(argv, prog="train.py", description=__doc__)
    launch.start_jax(config)
    from gpt2_jax.training import run  # noqa: PLC0415 -- JAX, and the modules below, only after start_jax set its environment
    from gpt2_jax.training.resolved import resolve_run  # noqa: PLC0415 -- (loads JAX)

    resolved = resolve_run(config)  # once: --init_from's shape, the mesh, the auto values, the batch arithmetic
    if config.micro_batch_size == 0 and resolved.platform in ("gpu", "tpu"):
        from gpt2_jax.plan import auto_micro_batch  # noqa: PLC0415 -- (loads JAX)

        resolved, note = auto_micro_batch(resolved)  # the largest micro-batch that fits, or the default
        print(note, flush=True)
    summary = run(resolved)
    if summary.get("interrupted"):  # stopped by a signal, after writing a checkpoint
        return 128 + signal.Signals[summary["interrupted"]].value
    return 0


if __name__ == "__main__":
    sys.exit(main())
