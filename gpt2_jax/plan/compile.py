"""Plan a TrainConfig on a Target: compile the trainer's exact train step for the target's devices (attached
or not) and read what the compiler says: memory per device, fits or not and what to change, the attention
kernel, FLOPs, collectives. Also the micro-batch searches: `largest_micro_batch` per remat policy, and
`auto_micro_batch` for train.py --micro_batch_size=0 on a GPU or TPU.

This module loads JAX and the trainer. Its JAX-free parts -- the Plan record (record.py), target parsing
(hardware.py), HLO text (hlo.py) -- are apart, so that the CLI parses its flags and re-runs itself in a sandbox
(gpt2_jax.plan.cli) before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import jax

from gpt2_jax.config import GPT2_SIZES, GPT2_VOCAB_SIZE, PRESETS
from gpt2_jax.metrics import flops_per_token
from gpt2_jax.model import Unroll, count_params
from gpt2_jax.plan.devices import load_target
from gpt2_jax.plan.hardware import Target, chip_of, gib, parse_target
from gpt2_jax.plan.hlo import (
    _first_line,
    _parse_exhausted,
    attention_kernel,
    collective_sends,
    collectives,
    custom_calls,
    hbm_traffic,
)
from gpt2_jax.plan.record import REMATS, STATE_BYTES_PER_PARAM, Plan, minimum_collectives
from gpt2_jax.plan.step_time import plan_step_time
from gpt2_jax.sharding import data_parallel_size, make_mesh
from gpt2_jax.training.resolved import ResolvedRun, resolve_run
from gpt2_jax.training.settings import TrainConfig
from gpt2_jax.training.step import build_step


def planned_model(run: ResolvedRun):
    """The model of `run` for the data the planner assumes (GPT-2's BPE for GPT-2 sizes, else the preset's
    vocabulary), and that data's vocabulary limit where the model pads it: (cfg, vocab_limit)."""
    data_vocab = GPT2_VOCAB_SIZE if run.tc.preset in GPT2_SIZES else PRESETS[run.tc.preset].vocab_size
    cfg = run.model_config(data_vocab)
    return cfg, data_vocab if data_vocab < cfg.vocab_size else None


def _lower(run: ResolvedRun, cfg, vocab_limit: int | None, unroll):
    """The trainer's jitted train step for `run` (training.step.build_step, as the trainer builds it), lowered
    on its abstract arguments. `unroll` (model.Unroll): how the model's loops unroll."""

    step = build_step(run, cfg, vocab_limit, unroll=unroll)
    return step.fn.lower(*step.abstract_args())


def _too_big_to_compile(tc, cfg, mesh, target: Target) -> Plan | None:
    """A refusal by arithmetic, before anything is traced: the params and AdamW state alone (12 bytes a
    parameter, split over the fsdp and tensor axes) exceed the device's memory. Tracing and compiling a model
    that size would take minutes to say the same (or never finish)."""

    n = count_params(cfg)
    need = STATE_BYTES_PER_PARAM * n // (mesh.shape["fsdp"] * mesh.shape["tensor"])
    if need <= target.budget_bytes:
        return None
    p = Plan(tc.remat, tc.micro_batch_size, False, need, target.budget_bytes,
             by_arithmetic=True,
             error=f"{n / 1e9:.3g}B params x {STATE_BYTES_PER_PARAM} bytes (params + "
                   f"AdamW) / {mesh.shape['fsdp'] * mesh.shape['tensor']} shards = {gib(need)} per device, more than "
                   f"{gib(target.budget_bytes)}")
    p.suggestions = suggestions(tc, mesh, p)
    return p


def plan_one(run: ResolvedRun, target: Target, count_flops: bool = True) -> Plan:
    """Compile the train step of `run` (resolved on `target`'s devices: plan_run) for `target` and read the
    result."""

    tc, mesh = run.tc, run.mesh
    cfg, vocab_limit = planned_model(run)
    if (refused := _too_big_to_compile(tc, cfg, mesh, target)) is not None:
        return refused
    lowered = _lower(run, cfg, vocab_limit, Unroll.for_platform(target.platform, cfg))  # the target's unrolling
    tokens = tc.total_batch_size
    p = Plan(tc.remat, tc.micro_batch_size, False, 0, target.budget_bytes,
             flops_6n=flops_per_token(cfg, tc.block_size) * tokens)
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 -- only the compiler's out-of-memory refusal is a result
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        p.error = _first_line(str(e), "RESOURCE_EXHAUSTED")
        p.need_bytes, budget = _parse_exhausted(str(e))
        p.budget_bytes = budget or target.budget_bytes
        p.largest_buffers = largest_buffers(lowered)
    else:
        m = compiled.memory_analysis()
        p.memory = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
                    "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
                    "code": m.generated_code_size_in_bytes}
        p.need_bytes = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                        + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
        p.fits = p.need_bytes <= target.budget_bytes
        hlo = compiled.as_text()
        p.custom_calls = custom_calls(hlo)
        p.attention = attention_kernel(p.custom_calls, cfg.attention)
        p.collectives = collectives(hlo)
        p.collective_sends = collective_sends(hlo)
        p.collective_minimum = minimum_collectives(count_params(cfg), dict(mesh.shape), run.grad_accum,
                                                   2 if cfg.dtype != "float32" else 4)
        cost = compiled.cost_analysis()  # None for GPU targets
        p.compiled_flops = float(cost["flops"]) if cost and cost.get("flops") else None
        if cost and cost.get("bytes accessed"):  # TPU: counts each loop body once; the HLO estimate counts trips
            p.bytes_accessed, p.hbm_bytes = float(cost["bytes accessed"]), float(hbm_traffic(hlo)[0])
        if count_flops:
            p.flops_per_step, p.flops_source = count_step_flops(run, cfg, vocab_limit)
        p.step_time = plan_step_time(p, chip_of(target.spec, target.kind), target.kind, mesh.size)
    if not p.fits:
        p.suggestions = suggestions(tc, mesh, p)
    return p


def largest_buffers(lowered, n: int = 8) -> list[str]:
    """The largest buffers of a compile the compiler refused for lack of memory: compiled again with
    `xla_dump_to`, which writes XLA's memory-usage report even then. ["4.00GiB: 5×bf16[2,1,512,...]", ...]."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            lowered.compile({"xla_dump_to": folder})
        except Exception:  # noqa: BLE001, S110 -- refused again, as expected: the report is written
            pass
        reports = sorted(Path(folder).glob("*memory-usage-report.txt"))
        text = reports[0].read_text() if reports else ""
    rows = []  # "  cumulative;  size;  offset;  n values;  shapes" after the first dashed line
    for line in text.split("-" * 20, 1)[-1].splitlines() if text else []:
        parts = [c.strip() for c in line.split(";")]
        if len(parts) == 5:
            rows.append(f"{parts[1]}: {parts[4]}")
        elif rows:
            break
    return rows[:n]


def count_step_flops(run: ResolvedRun, cfg, vocab_limit) -> tuple[float | None, str]:
    """FLOPs of one optimizer step, all devices together.

    XLA's cost analysis counts a loop body once, whatever its trip count: the layer scan and the
    grad_accum scan would be counted as one layer and one micro-batch. So the FLOPs are counted on a CPU
    lowering of the same step with the layers unrolled and one micro-batch, times grad_accum (the
    optimizer update, ~10 FLOPs per parameter, is then counted grad_accum times: noise). The attention
    is lowered as "xla" there (cuDNN and the Pallas TPU kernels have no CPU lowering), i.e. counted over the
    full T x T scores, as the compiled kernels for XLA attention compute them (splash skips the masked
    blocks: it computes a little over half of them). The compiled program's own count, where the backend
    gives one (TPU), is a lower bound only for the same reason, and is not used.
    """


    tc = run.tc
    one = dataclasses.replace(tc, total_batch_size=tc.micro_batch_size * tc.block_size, mesh="data:1")
    on_one_cpu = dataclasses.replace(run, tc=one, mesh=make_mesh("data:1", jax.devices("cpu")[:1]))
    attention = "xla" if cfg.attention in ("cudnn", "splash") else cfg.attention
    unroll = Unroll(layers=True, loss_chunks=True)  # every loop unrolled: XLA counts a loop body once
    cost = _lower(on_one_cpu, cfg.replace(attention=attention), vocab_limit, unroll).cost_analysis()
    flops = (cost or {}).get("flops")
    if not flops:
        return None, "no cost analysis"
    return float(flops) * run.grad_accum, "XLA cost analysis of a CPU lowering (layers unrolled)"


def suggestions(tc, mesh, p: Plan) -> list[str]:
    """What to change, most effective first (where the params and AdamW state alone do not fit, only more
    devices to split them over can help)."""
    out = []
    if p.by_arithmetic:
        pass
    elif tc.remat == "none":
        out.append("--remat=full (recompute each block in the backward pass: activations of one block "
                   "instead of all) or --remat=dots (keep the matmul outputs)")
    elif tc.remat == "dots":
        out.append("--remat=full (keeps less than dots)")
    n = math.prod(mesh.shape.values())
    args = p.memory.get("argument", 0)
    if n > 1 and mesh.shape["fsdp"] == 1:
        out.append(f"--mesh=fsdp:{n} (split params and AdamW state over the {n} devices"
                   + (f": {gib(args)} of arguments per device now)" if args else ")"))
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if not p.by_arithmetic and (micro := _micro_estimate(tc, p, dp)) is not None:
        accum = tc.total_batch_size // (micro * tc.block_size)
        out.append(f"--micro_batch_size={micro} --grad_accum={accum} (same tokens per step; an estimate from "
                   f"temporaries growing in proportion to the micro-batch: --search compiles to check)")
    if n == 1:
        out.append("more devices: a target with more chips and --mesh=fsdp:N")
    return out


def _micro_estimate(tc, p: Plan, dp: int) -> int | None:
    """The largest power-of-two micro-batch below this one whose temporaries would fit, if they scale
    in proportion to it (activations do; params and optimizer state do not)."""
    temp = p.memory.get("temp", p.need_bytes)
    room = p.budget_bytes - (p.need_bytes - temp)  # what params, AdamW state and code leave
    if temp <= 0 or room <= 0:
        return None
    micro = 2 ** math.floor(math.log2(max(1.0, tc.micro_batch_size * room / temp)))
    micro = min(micro, tc.micro_batch_size // 2)
    return micro if micro >= dp and micro % dp == 0 else None


# ---------------------------------------------------------------------------------------------------
# Searches


def plan_run(config: TrainConfig, target: Target, grad_accum: int = 1) -> ResolvedRun:
    """`config` resolved as the trainer resolves it, on `target`'s devices, with `grad_accum` micro-batches per
    step (the planner's --grad_accum; the total follows): the mesh is built here, once per plan."""
    return resolve_run(config, target.devices, target.platform, grad_accum)


def search(run: ResolvedRun, target: Target, remats: tuple[str, ...] = REMATS) -> list[Plan]:
    """For each remat policy in `remats`, the largest micro-batch that fits (largest_micro_batch)."""
    return [largest_micro_batch(run.replace(remat=remat), target) for remat in remats]


def largest_micro_batch(run: ResolvedRun, target: Target, log=lambda line: print(line, flush=True)) -> Plan:
    """The plan of the largest micro-batch of (data-parallel devices) x 2^k that fits with `run`'s remat
    policy and micro-batches per step; a Plan with micro_batch_size 0 when none does. Starts from its
    micro-batch (the trainer's default where the flag is 0, recipes.RECIPES: 16 per device for GPT-2 sizes),
    doubling while it fits and halving while it does not: a handful of compiles, on `run`'s mesh. train.py
    --micro_batch_size=0 on a GPU or TPU calls this for --target=local (auto_micro_batch)."""

    dp = data_parallel_size(run.mesh)
    start = run.tc.micro_batch_size / dp
    micro, fitting = dp * 2 ** max(0, round(math.log2(max(start, 1)))), None
    tried: dict[int, bool] = {}
    while micro not in tried and dp <= micro <= 2**14:
        p = plan_one(run.replace(micro_batch_size=micro), target, count_flops=False)
        tried[micro] = p.fits
        if log:
            log(f"  remat={run.tc.remat:<4} micro_batch_size={micro:<5} {'fits' if p.fits else 'does not fit'} "
                f"({gib(p.need_bytes)} of {gib(p.budget_bytes)})")
        if p.fits:
            fitting = p if fitting is None or p.micro_batch_size > fitting.micro_batch_size else fitting
            micro *= 2
        else:
            micro //= 2
    return fitting or Plan(run.tc.remat, 0, False, 0, target.budget_bytes)


def auto_micro_batch(run: ResolvedRun) -> tuple[ResolvedRun, str]:
    """`run` with the largest micro-batch of (data-parallel devices) x 2^k whose train step fits the attached
    devices' memory, by the planner (gpt2_jax.plan, --target=local: compiles, runs nothing), and a log line;
    `run` itself, and why, when none fits or none divides --total_batch_size: the trainer's default then applies."""

    target = load_target(parse_target("local"))
    tc = run.tc  # the default micro-batch, block size and total batch
    # Plan with grad accumulation where the run accumulates: its scan keeps a float32 gradient accumulator.
    accum = 2 if tc.total_batch_size > tc.micro_batch_size * tc.block_size else 1
    best = largest_micro_batch(run.replace(grad_accum=accum), target, log=None)
    micro = best.micro_batch_size
    # The micro-batch must divide a fixed total (--total_batch_size, or the recipe's for GPT-2 sizes); otherwise
    # the total is one micro-batch and follows it.
    fixed_total = run.flags.total_batch_size or (tc.total_batch_size if run.flags.preset in GPT2_SIZES else 0)
    dp = data_parallel_size(run.mesh)
    while micro > dp and fixed_total and fixed_total % (micro * tc.block_size):
        micro //= 2
    if not micro:
        return run, (f"micro-batch: none of the sizes tried fits {target.budget_note} with --remat={tc.remat}; "
                     f"using the default ({tc.micro_batch_size}); python -m gpt2_jax.plan --target=local --search "
                     f"shows each policy's")
    if fixed_total and fixed_total % (micro * tc.block_size):
        return run, (f"micro-batch: no size that fits ({best.micro_batch_size} or less) divides --total_batch_size="
                     f"{fixed_total} into micro-batches of {tc.block_size} tokens; using the default "
                     f"({tc.micro_batch_size})")
    need = best.need_bytes if micro == best.micro_batch_size else None
    return run.replace(micro_batch_size=micro), (
        f"micro-batch: {micro}, the largest power of two that fits ("
        + (f"{need / 2**30:.2f} GiB of {target.budget_bytes / 2**30:.2f} GiB per device, " if need else "")
        + f"remat={tc.remat}; --micro_batch_size=N to choose)")
