"""Train GPT-2 with JAX.

    python train.py                                  # a few minutes on a CPU: char-level model on Python's docs
    python train.py --platform=gpu --preset=gpt2 --data=DIR   # the GPT-2 124M reproduction (FineWeb-Edu 10B)
    python train.py --help                           # every setting, with its default

Every field of gpt2_jax.config.TrainConfig is a --key=value flag; true/false flags also work bare
(--resume). The backend is chosen before JAX starts, and values that make no sense (--max_steps=-5) stop
the run before that, with exit status 2.

Stopping and resuming: SIGTERM or Ctrl-C (SIGINT) finishes the current step, writes a checkpoint and
exits; a second signal exits at once, leaving the checkpoints already on disk intact. Run the same
command again to resume from the newest good checkpoint in --out_dir (also after `kill -9` or a crash).

Exit status: 0 finished; 1 an error (the message says what to change); 2 bad flags; 128+N stopped by
signal N (130 SIGINT, 143 SIGTERM), as a shell reports a killed process, so that `train.py && next`
does not go on with an unfinished model.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys

from gpt2_jax.config import AUTO_BOOL, TrainConfig  # imports nothing heavy: JAX is not loaded yet

JAX_PLATFORMS = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}  # --platform (config.PLATFORMS) -> JAX_PLATFORMS
INSTALL_HINT = {"gpu": 'pip install "gpt2-jax[gpu]"  (JAX with CUDA)', "tpu": 'pip install "gpt2-jax[tpu]"'}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _auto_bool(text: str) -> str:
    return "auto" if text.lower() == "auto" else str(_bool(text)).lower()


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags -> TrainConfig. A bool flag works bare (`--resume`) or with a value (`--tensorboard=false`).
    Bad values exit with status 2 and the flag's name: argparse checks the types, TrainConfig the values."""
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        text = f"{f.metadata['help']} (default: {f.default!r})".replace('%', '%%')
        if f.type in (bool, "bool"):
            parser.add_argument(f"--{f.name}", type=_bool, nargs="?", const=True, default=f.default,
                                metavar="BOOL", help=text)
        elif f.metadata["choices"] == AUTO_BOOL:  # --distributed, --distributed=false, --distributed=auto
            parser.add_argument(f"--{f.name}", type=_auto_bool, nargs="?", const="true", default=f.default,
                                metavar="auto|BOOL", help=text)
        else:
            parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default,
                                metavar=type(f.default).__name__.upper(), help=text)
    args = parser.parse_args(argv)
    try:
        return TrainConfig(**vars(args))
    except ValueError as e:
        parser.error(str(e))


def start_jax(config: TrainConfig) -> None:
    """Pin JAX to one backend and join the other processes, before any backend initialises; exit with
    what to install if the backend is missing."""
    if config.platform:
        os.environ["JAX_PLATFORMS"] = JAX_PLATFORMS[config.platform]
    import jax  # noqa: PLC0415

    from gpt2_jax.trainer import init_distributed  # noqa: PLC0415

    init_distributed(config)
    try:
        jax.devices()
    except Exception as e:  # RuntimeError, or an AssertionError from some JAX versions
        if not config.platform:
            raise
        hint = INSTALL_HINT.get(config.platform)
        sys.exit(f"--platform={config.platform}: this JAX has no {JAX_PLATFORMS[config.platform]} backend "
                 f"({type(e).__name__}: {e}).\n" + (f"Install it: {hint}" if hint else ""))


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    start_jax(config)
    from gpt2_jax.trainer import run  # noqa: PLC0415

    try:
        summary = run(config)
    except (ValueError, OSError, ImportError, FloatingPointError) as e:  # OSError: missing files, unreachable bucket
        sys.exit(f"error: {e}")
    if summary.get("interrupted"):  # stopped by a signal, after writing a checkpoint
        sys.exit(128 + signal.Signals[summary["interrupted"]].value)


if __name__ == "__main__":
    main()
