"""The planner's report: one plan or a search, printed for a person and written as JSON (python -m
gpt2_jax.plan). Loads JAX: the CLI imports it once the sandbox and the platform are decided."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from gpt2_jax.model import count_params
from gpt2_jax.plan.compile import plan_one, plan_run, planned_model, search
from gpt2_jax.plan.devices import load_target
from gpt2_jax.plan.hardware import Target, gib
from gpt2_jax.plan.hlo import fsdp_traffic
from gpt2_jax.plan.record import REMATS, Plan
from gpt2_jax.plan.step_time import describe
from gpt2_jax.training.resolved import ResolvedRun

__all__ = ["load_target", "report", "run"]


def report(run: ResolvedRun, target: Target, p: Plan) -> str:
    """The plan `p` of `run` on `target`, for a person."""
    tc, mesh, grad_accum = run.tc, run.mesh, run.grad_accum
    cfg, _ = planned_model(run)
    n = mesh.size
    lines = [
        f"target   {target.spec.name}: {n} x {target.kind} ({target.platform}), mesh "
        f"{','.join(f'{k}:{v}' for k, v in mesh.shape.items())}",
        f"model    {tc.preset}: {count_params(cfg) / 1e6:.1f}M params, n_layer={cfg.n_layer} n_head={cfg.n_head} "
        f"n_embd={cfg.n_embd} vocab={cfg.vocab_size} T={cfg.block_size} | {cfg.dtype}, attention={cfg.attention}, "
        f"remat={cfg.remat}",
        f"batch    {tc.micro_batch_size} x {tc.block_size} x {grad_accum} accum = {tc.total_batch_size:,} tokens/step",
    ]
    if p.memory:
        m = p.memory
        lines += ["memory per device (XLA's buffer assignment):",
                  f"  arguments    {gib(m['argument']):>12}  params, AdamW state, batch",
                  f"  outputs      {gib(m['output']):>12}",
                  f"  aliased    {'-' + gib(m['alias']):>13}  outputs written over donated arguments",
                  f"  temporaries  {gib(m['temp']):>12}  activations, gradients, workspace",
                  f"  code         {gib(m['code']):>12}",
                  f"  total        {gib(p.need_bytes):>12}  of {gib(target.budget_bytes)} "
                  f"({target.budget_note})"]
    else:
        lines += [f"{'refused by arithmetic, not compiled' if p.by_arithmetic else 'compiler refused'}: {p.error}"]
        if p.largest_buffers:
            lines += ["largest buffers (XLA's memory-usage report):"] + [f"  {b}" for b in p.largest_buffers]
    if p.fits:
        lines.append(f"FITS, {gib(target.budget_bytes - p.need_bytes)} to spare "
                     f"({100 * p.need_bytes / target.budget_bytes:.0f}% used)")
    else:
        over = f"{gib(p.need_bytes - p.budget_bytes)} over" if p.need_bytes else "over"
        lines.append(f"DOES NOT FIT: {over} (needs {gib(p.need_bytes)} of {gib(p.budget_bytes)})")
        lines += ["  try: " + s for s in p.suggestions]
    if p.attention:
        lines.append(f"attention  {p.attention}")
    if p.flops_per_step:
        ratio = p.flops_per_step / p.flops_6n
        lines.append(f"FLOPs/step {p.flops_per_step:.4g} ({p.flops_source}); 6N+12LHQT: {p.flops_6n:.4g} "
                     f"(XLA / estimate = {ratio:.3f})")
    elif p.flops_6n:
        lines.append(f"FLOPs/step 6N+12LHQT: {p.flops_6n:.4g}")
    if p.compiled_flops:
        lines.append(f"           the compiled program's own count: {p.compiled_flops:.4g} per device (each loop "
                     f"body once)")
    if p.memory:
        coll = ", ".join(f"{k} x{v['count']} ({gib(v['bytes'])})" for k, v in sorted(p.collectives.items()))
        lines.append(f"collectives per step per device: {coll or 'none'}")
        if p.collective_minimum:
            least, moved = sum(p.collective_minimum.values()), sum(v["bytes"] for v in p.collectives.values())
            parts = ", ".join(f"{what}: {gib(n)}" for what, n in p.collective_minimum.items())
            lines.append(f"  the mesh's minimum: {gib(least)} ({parts}); counted {gib(moved)} = {moved / least:.2f}x")
        if (fsdp := fsdp_traffic(p.collectives)) and mesh.shape["fsdp"] > 1:
            lines.append(f"  FSDP weight gathers: {gib(fsdp)} (all-gathers and, on TPU, the collective-permute "
                         f"rings XLA turns them into)")
    lines += describe(p.step_time)
    return "\n".join(lines)


def run(args, target: Target) -> int:
    planned = plan_run(args.config, target, args.grad_accum)  # resolved once: the mesh is built here
    if args.search:
        print(f"searching micro-batch sizes on {args.spec.name} ({target.kind}), preset {planned.tc.preset}:")
        best = search(planned, target, (args.remat,) if args.remat else REMATS)
        print(f"\n{'remat':<6} {'largest micro-batch that fits':>30} {'memory per device':>24}")
        for b in best:
            size = str(b.micro_batch_size) if b.fits else "none"
            print(f"{b.remat:<6} {size:>30} {gib(b.need_bytes) + ' of ' + gib(b.budget_bytes):>24}")
        result = {"target": args.spec.name, "search": [dataclasses.asdict(b) for b in best]}
        fits = any(b.fits for b in best)
    else:
        p = plan_one(planned, target)
        print(report(planned, target, p))
        result = {"target": args.spec.name, "device_kind": target.kind, "num_devices": planned.mesh.size,
                  **dataclasses.asdict(p)}
        fits = p.fits
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if fits else 1
