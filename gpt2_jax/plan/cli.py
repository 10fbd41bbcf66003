"""Will it fit? Compile the exact train step for a GPU or TPU that is not attached, and read the plan.

    python -m gpt2_jax.plan --target=h100 --preset=gpt2 --micro_batch_size=16
    python -m gpt2_jax.plan --target=v5e-8 --preset=gpt2-medium --mesh=data:8 --search
    python -m gpt2_jax.plan --target=local --preset=char

XLA compiles for a device it is only told about ("deviceless" / ahead-of-time compiles): NVIDIA GPUs from a
target description (gpt2_jax/targets/*.txtpb, XLA's GpuTargetConfigProto: compute capability, cores,
memory, cuDNN version), TPU slices from libtpu's topology names (`v5e:2x4`). The compiled program is the
one the trainer would run (same step function, shardings, donation, dtype, attention, remat), so its
memory plan says whether a run fits before one pays for the machine. Printed per device: argument,
output, temporary and code bytes against the device's memory, fits or not and what to change, the
attention kernel in the program, FLOPs per step beside the 6N + 12LHQT estimate the trainer logs, the
collectives, and a step-time floor: compute, communication and (TPU) memory-traffic times at the chips' datasheet
peaks, and the MFU ceiling they imply (gpt2_jax.plan.step_time; docs/step-time.md).

GPU and TPU compiles run in a child process with JAX_PLATFORMS=cpu and TPU_SKIP_MDS_QUERY=1, inside a
private network namespace (`unshare -n`) where the machine allows: libtpu then cannot reach a cloud
metadata server, or anything else. They need the `plan` extra (jax[cuda13] and jax[tpu]). GPU compiles
use the XLA flags that train.py --platform=gpu sets (launch.GPU_XLA_FLAGS, unless XLA_FLAGS is set), and the
report prints them. train.py --micro_batch_size=0 on a GPU or TPU runs largest_micro_batch for --target=local.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from gpt2_jax.backends import cpu_if_no_accelerator
from gpt2_jax.cli import BadFlag, one_line_errors
from gpt2_jax.launch import GPU_XLA_FLAGS
from gpt2_jax.plan.hardware import MissingExtra, TargetSpec, missing_extra, parse_target
from gpt2_jax.training.settings import TrainConfig, add_flags

CHILD_ENV = "GPT2_JAX_PLAN_CHILD"  # set in the child process that compiles


# ---------------------------------------------------------------------------------------------------
# CLI


# The planner's TrainConfig flags: what changes the compiled step. Their help is TrainConfig's.
CONFIG_FLAGS = ("preset", "mesh", "micro_batch_size", "block_size", "remat", "dtype", "attention", "vocab_size",
                "n_layer", "n_head", "n_embd")


def build_parser() -> argparse.ArgumentParser:
    """The planner's flags: its own and the TrainConfig fields that change the compiled step (CONFIG_FLAGS)."""
    p = argparse.ArgumentParser(prog="python -m gpt2_jax.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--target", default="local",
                   help="h100 | h200 | a100 | TPU slice <gen>-<N> (v4-8, v5e-8, v5p-16, v6e-8) | local")
    add_flags(p, names=CONFIG_FLAGS, preset="gpt2", remat="")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--search", action="store_true",
                   help="the largest power-of-two micro-batch that fits, for each remat policy (--remat empty: "
                        "each one, else --remat's alone; without --search, an empty --remat means none)")
    p.add_argument("--json", default="", help="also write the result as JSON to this file")
    p.add_argument("--no_sandbox", action="store_true",
                   help="compile in this process, without the child process and network namespace")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, with `args.spec` (the parsed --target) and `args.config` (the TrainConfig to plan)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.grad_accum < 1:
        p.error(f"--grad_accum={args.grad_accum}: must be >= 1")
    try:
        args.spec = parse_target(args.target)
        args.config = TrainConfig(**{k: getattr(args, k) for k in CONFIG_FLAGS} | {"remat": args.remat or "none"})
    except ValueError as e:
        p.error(str(e))
    return args


def sandbox_command(argv: list[str], spec: TargetSpec) -> tuple[list[str], dict]:
    """The command and environment that re-run this CLI for a deviceless compile."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", **{CHILD_ENV: "1"})
    env.update(gpu_flags_env(spec, env))
    # A compile touches no chip: skip libtpu's one-process-per-host lockfile (/tmp/libtpu_lockfile), which
    # another JAX process with libtpu installed (a test session, a notebook) may hold.
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    # libtpu otherwise looks for these in the metadata server and warns when they are missing.
    env.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    env.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    cmd = [sys.executable, "-m", "gpt2_jax.plan", *argv]
    if can_unshare_net():
        cmd = ["unshare", "-n", *cmd]
    return cmd, env


def gpu_flags_env(spec: TargetSpec, env) -> dict:
    """XLA_FLAGS for a GPU target's compile, as train.py --platform=gpu sets them: the recommended flags
    (launch.GPU_XLA_FLAGS) unless XLA_FLAGS is set already, so that the plan compiles the program the run will."""
    if spec.platform != "gpu" or "XLA_FLAGS" in env:
        return {}
    return {"XLA_FLAGS": " ".join(GPU_XLA_FLAGS)}


def xla_flags_line(spec: TargetSpec) -> str:
    """The report's line on the XLA flags of a GPU compile ("" for other targets)."""
    if spec.platform != "gpu":
        return ""
    flags = os.environ.get("XLA_FLAGS", "")
    which = ("the recommended GPU flags (launch.GPU_XLA_FLAGS), as train.py --platform=gpu sets them"
             if flags == " ".join(GPU_XLA_FLAGS) else "from XLA_FLAGS in the environment, as train.py will use")
    return f"XLA_FLAGS  {flags or '(empty: XLA defaults)'} ({which})"


def can_unshare_net() -> bool:
    """Whether this machine lets an unprivileged process take a private network namespace."""
    if not shutil.which("unshare"):
        return False
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@one_line_errors(interrupted="stopped before the plan was made")
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if why := missing_extra(args.spec):
        raise BadFlag(why)
    if args.spec.deviceless and not args.no_sandbox and not os.environ.get(CHILD_ENV):
        cmd, env = sandbox_command(argv, args.spec)
        if cmd[0] != "unshare":
            print("(no private network namespace here: compiling with TPU_SKIP_MDS_QUERY=1 only)", file=sys.stderr)
        return subprocess.run(cmd, env=env).returncode
    os.environ.update(gpu_flags_env(args.spec, os.environ))  # --no_sandbox: before the GPU plugin starts
    if not args.spec.deviceless:
        cpu_if_no_accelerator(os.environ)  # the local target on a machine without GPU or TPU: quiet
    # JAX loads here, not at the top: the parent of a sandboxed compile never starts it, and a local target on a
    # machine without a GPU or TPU is set to the CPU first (JAX reads JAX_PLATFORMS when it is imported).
    from gpt2_jax.plan.report import load_target, run  # noqa: PLC0415 -- see above

    try:
        target = load_target(args.spec)
    except MissingExtra as e:
        raise BadFlag(e) from None
    if line := xla_flags_line(args.spec):
        print(line)
    try:
        return run(args, target)
    except ValueError as e:  # bad flags: micro-batch vs devices, mesh, preset sizes
        raise BadFlag(e) from None
