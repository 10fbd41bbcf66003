"""Will it fit? The trainer's exact train step compiled for a GPU or TPU that need not be attached, and what
the compiler says about it (python -m gpt2_jax.plan --help).

    hardware.py  targets: --target names, their devices (compile-only for GPU/TPU) and memory budgets
    hlo.py       text parsing of compiled programs and compiler messages (no JAX)
    compile.py   plan a TrainConfig on a Target: plan_one, largest_micro_batch, search, auto_micro_batch
    cli.py       the CLI: flags, the sandboxed child process for deviceless compiles, the report
"""

from gpt2_jax.plan.cli import main, parse_args, report, sandbox_command, xla_flags_line
from gpt2_jax.plan.compile import (
                                   Plan,
                                   auto_micro_batch,
                                   count_step_flops,
                                   largest_micro_batch,
                                   plan_one,
                                   resolved,
                                   search,
)
from gpt2_jax.plan.hardware import MissingExtra, Target, TargetSpec, load_target, missing_extra, parse_target
from gpt2_jax.plan.hlo import attention_kernel, collectives

__all__ = ["MissingExtra", "Plan", "Target", "TargetSpec", "attention_kernel", "auto_micro_batch", "collectives",
           "count_step_flops", "largest_micro_batch", "load_target", "main", "missing_extra", "parse_args",
           "parse_target", "plan_one", "report", "resolved", "sandbox_command", "search", "xla_flags_line"]
