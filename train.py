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

Compiling: XLA programs are cached on disk (--compile_cache), so a second start with the same settings skips
most of the compile time. An explicit JAX_COMPILATION_CACHE_DIR in the environment wins over the default
folder (not over --compile_cache=DIR or off). With --platform=gpu the recommended XLA flags
(gpt2_jax.config.GPU_XLA_FLAGS) are set unless XLA_FLAGS is already set: XLA_FLAGS="" runs XLA's defaults.
--micro_batch_size=0 on a GPU or TPU compiles the train step for a few sizes first and takes the largest that
fits in the device's memory (python -m gpt2_jax.plan --target=local --search shows the same search).

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

from gpt2_jax.config import AUTO_BOOL, GPU_XLA_FLAGS, TrainConfig  # imports nothing heavy: JAX is not loaded yet

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


# Programs that compile faster than this are not written to the compile cache. JAX's default (1 s) leaves out
# most of the CPU default run's programs (eval, sampling, the data pipeline's small jits: 0.1-0.9 s each).
CACHE_MIN_COMPILE_SECS = "0.1"


def default_cache_dir(env) -> str:
    """$GPT2_JAX_CACHE, else $XDG_CACHE_HOME/gpt2_jax, else ~/.cache/gpt2_jax; + /jax-compile."""
    home = env.get("HOME") or os.path.expanduser("~")
    base = env.get("GPT2_JAX_CACHE") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join(home, ".cache"),
                                                     "gpt2_jax")
    return os.path.join(base, "jax-compile")


def jax_environment(config: TrainConfig, env) -> tuple[dict, list[str]]:
    """The environment JAX should start in, from `env` (left unchanged), and a log line per decision.

    JAX and XLA read these variables when they start, so train.py sets them before importing JAX:
    JAX_PLATFORMS from --platform; the persistent compile cache (JAX_COMPILATION_CACHE_DIR: --compile_cache=DIR,
    else the user's own variable, else the default folder; --compile_cache=off disables it); XLA_FLAGS for
    --platform=gpu: the recommended GPU flags, unless the user set XLA_FLAGS (even empty) themselves.
    """
    env, notes = dict(env), []
    if config.platform:
        env["JAX_PLATFORMS"] = JAX_PLATFORMS[config.platform]
    if config.compile_cache == "off":
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
        notes.append("compile cache: off (--compile_cache=off)")
    else:
        if config.compile_cache:
            env["JAX_COMPILATION_CACHE_DIR"], source = config.compile_cache, "--compile_cache"
            env["JAX_ENABLE_COMPILATION_CACHE"] = "true"
        elif env.get("JAX_COMPILATION_CACHE_DIR"):
            source = "JAX_COMPILATION_CACHE_DIR in the environment"
        else:
            env["JAX_COMPILATION_CACHE_DIR"] = default_cache_dir(env)
            source = "the default; --compile_cache=off disables it"
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", CACHE_MIN_COMPILE_SECS)
        if env.get("JAX_ENABLE_COMPILATION_CACHE", "true").lower() in ("0", "false"):
            notes.append("compile cache: off (JAX_ENABLE_COMPILATION_CACHE in the environment)")
        else:
            notes.append(f"compile cache: {env['JAX_COMPILATION_CACHE_DIR']} ({source})")
    if config.platform == "gpu":
        if "XLA_FLAGS" in env:
            notes.append(f"XLA_FLAGS={env['XLA_FLAGS']!r} from the environment; the recommended GPU flags "
                         f"(gpt2_jax.config.GPU_XLA_FLAGS) are not added")
        else:
            env["XLA_FLAGS"] = " ".join(GPU_XLA_FLAGS)
            notes.append(f"XLA_FLAGS={env['XLA_FLAGS']!r}: the recommended GPU flags (set XLA_FLAGS to replace them)")
    return env, notes


def start_jax(config: TrainConfig) -> None:
    """Set JAX's environment (jax_environment), pin JAX to one backend and join the other processes, before any
    backend initialises; exit with what to install if the backend is missing."""
    env, notes = jax_environment(config, os.environ)
    os.environ.update(env)
    for note in notes:
        print(note, flush=True)
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


def auto_micro_batch(config: TrainConfig) -> tuple[int, str]:
    """The largest micro-batch of (data-parallel devices) x 2^k whose train step fits the attached devices'
    memory, by the planner (gpt2_jax.plan, --target=local: compiles, runs nothing), and a log line; (0, why)
    when none fits or none divides --total_batch_size, and the trainer's default then applies."""
    from gpt2_jax import plan  # noqa: PLC0415 -- plan imports the trainer: this sits above both
    from gpt2_jax.sharding import data_parallel_size  # noqa: PLC0415
    from gpt2_jax.trainer import GPT2_SIZES, resolve  # noqa: PLC0415

    argv = ["--target=local", f"--preset={config.preset}", f"--mesh={config.mesh}", f"--remat={config.remat}",
            f"--block_size={config.block_size}", f"--dtype={config.dtype}", f"--attention={config.attention}",
            f"--vocab_size={config.vocab_size}", f"--n_layer={config.n_layer}", f"--n_head={config.n_head}",
            f"--n_embd={config.n_embd}"]
    target = plan.load_target(plan.parse_target("local"))
    mesh = plan.target_mesh(config.mesh, target.devices)
    tc = resolve(config, target.platform, mesh.size)  # the default micro-batch, block size, total batch
    # Plan with grad accumulation where the run accumulates: its scan keeps a float32 gradient accumulator.
    accum = 2 if tc.total_batch_size > tc.micro_batch_size * tc.block_size else 1
    args = plan.parse_args(argv + [f"--grad_accum={accum}"])
    best = plan.largest_micro_batch(args, target, config.remat, log=None)
    micro = best.micro_batch_size
    # The micro-batch must divide a fixed total (--total_batch_size, or 2**19 tokens for GPT-2 sizes); otherwise
    # the total is one micro-batch and follows it.
    fixed_total = config.total_batch_size or (tc.total_batch_size if config.preset in GPT2_SIZES else 0)
    dp = data_parallel_size(mesh)
    while micro > dp and fixed_total and fixed_total % (micro * tc.block_size):
        micro //= 2
    if not micro:
        return 0, (f"micro-batch: none of the sizes tried fits {target.budget_note} with --remat={config.remat}; "
                   f"using the default ({tc.micro_batch_size}); python -m gpt2_jax.plan --target=local --search "
                   f"shows each policy's")
    if fixed_total and fixed_total % (micro * tc.block_size):
        return 0, (f"micro-batch: no size that fits ({best.micro_batch_size} or less) divides --total_batch_size="
                   f"{fixed_total} into micro-batches of {tc.block_size} tokens; using the default "
                   f"({tc.micro_batch_size})")
    need = best.need_bytes if micro == best.micro_batch_size else None
    return micro, (f"micro-batch: {micro}, the largest power of two that fits ("
                   + (f"{need / 2**30:.2f} GiB of {target.budget_bytes / 2**30:.2f} GiB per device, " if need else "")
                   + f"remat={config.remat}; --micro_batch_size=N to choose)")


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    start_jax(config)
    import jax  # noqa: PLC0415

    if config.micro_batch_size == 0 and jax.default_backend() in ("gpu", "tpu"):
        micro, note = auto_micro_batch(config)
        print(note, flush=True)
        if micro:
            config = dataclasses.replace(config, micro_batch_size=micro)
    from gpt2_jax.trainer import run  # noqa: PLC0415

    try:
        summary = run(config)
    except (ValueError, OSError, ImportError, FloatingPointError) as e:  # OSError: missing files, unreachable bucket
        sys.exit(f"error: {e}")
    if summary.get("interrupted"):  # stopped by a signal, after writing a checkpoint
        sys.exit(128 + signal.Signals[summary["interrupted"]].value)


if __name__ == "__main__":
    main()
