"""Will it fit? The trainer's exact train step compiled for a GPU or TPU that need not be attached, and what
the compiler says about it (python -m gpt2_jax.plan --help).

    hardware.py  targets: --target names and their memory (no JAX)
    devices.py   a target's devices (compile-only for GPU/TPU) and memory budget
    record.py    Plan, what the compiler says about one configuration (no JAX)
    hlo.py       text parsing of compiled programs and compiler messages (no JAX)
    step_time.py the step-time floor: compute, communication and memory-traffic times at the datasheet peaks (no JAX)
    compile.py   plan a run on a Target: plan_run (resolve once), plan_one, largest_micro_batch, search,
                 auto_micro_batch
    cli.py       the CLI: flags, the sandboxed child process for deviceless compiles, the report
"""

import importlib

from gpt2_jax.plan.cli import main, parse_args, sandbox_command, xla_flags_line
from gpt2_jax.plan.hardware import MissingExtra, Target, TargetSpec, missing_extra, parse_target
from gpt2_jax.plan.hlo import attention_kernel, collectives
from gpt2_jax.plan.record import Plan

# The names that load JAX come from their modules on first use (PEP 562): `python -m gpt2_jax.plan` runs this
# file before the CLI has chosen the platform and the sandbox, and JAX reads JAX_PLATFORMS when it is imported.
_LOADS_JAX = {"auto_micro_batch": "compile", "count_step_flops": "compile", "largest_micro_batch": "compile",
              "plan_one": "compile", "plan_run": "compile", "planned_model": "compile", "search": "compile",
              "load_target": "devices", "report": "report"}


def __getattr__(name: str):
    if name in _LOADS_JAX:
        return getattr(importlib.import_module(f"gpt2_jax.plan.{_LOADS_JAX[name]}"), name)
    raise AttributeError(f"module 'gpt2_jax.plan' has no attribute {name!r}")


__all__ = ["MissingExtra", "Plan", "Target", "TargetSpec", "attention_kernel", "auto_micro_batch", "collectives",
           "count_step_flops", "largest_micro_batch", "load_target", "main", "missing_extra", "parse_args",
           "parse_target", "plan_one", "plan_run", "planned_model", "report", "sandbox_command", "search",
           "xla_flags_line"]
