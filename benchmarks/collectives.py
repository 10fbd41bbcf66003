"""The collectives in the trainer's compiled train step, per mesh: what a sharding strategy costs in
communication, read from the program XLA actually runs (no timing, so a CPU with fake devices suffices).

    python benchmarks/collectives.py --mesh=data:4,tensor:2 --mesh=data:2,tensor:4
    python benchmarks/collectives.py --preset=gpt2 --n_layer=2 --mesh=data:8 --mesh=data:2,fsdp:4

The step is `training.step.make_train_step` with the trainer's own state and batch shardings
(`sharding.state_shardings`, `sharding.batch_sharding`), built exactly as the trainer builds it, then
lowered and compiled for `--devices` fake CPU devices. The collectives in the compiled HLO text are counted by the
planner's own counter (gpt2_jax.plan.hlo.collectives: each all-gather, all-reduce, reduce-scatter, all-to-all and
collective-permute with the bytes of its result per device, an async pair once, an instruction in a loop once per
trip), so this table and `python -m gpt2_jax.plan` count alike. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from gpt2_jax.backends import cpu_if_no_accelerator  # after the checkout is on sys.path

cpu_if_no_accelerator(os.environ)  # no GPU or TPU here: the CPU, without the plugins' start-up tracebacks

from gpt2_jax.plan.hlo import COLLECTIVES, collectives


def count_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} for every kind (zeros included), by the planner's counter."""
    found = collectives(hlo_text)
    return {k: found.get(k, {"count": 0, "bytes": 0}) for k in COLLECTIVES}

def compiled_train_step_hlo(cfg, mesh_spec: str, micro_batch_size: int, grad_accum: int = 1) -> str:
    """The compiled HLO text of the trainer's train step (training.step.build_step) for `cfg` on `--mesh=mesh_spec`."""
    from gpt2_jax.training.resolved import resolve_run
    from gpt2_jax.training.settings import TrainConfig
    from gpt2_jax.training.step import build_step

    tc = TrainConfig(micro_batch_size=micro_batch_size, block_size=cfg.block_size, max_steps=100, warmup_steps=10,
                     max_lr=1e-3, total_batch_size=micro_batch_size * cfg.block_size * grad_accum)
    step = build_step(resolve_run(dataclasses.replace(tc, mesh=mesh_spec)), cfg)
    return step.fn.lower(*step.abstract_args()).compile().as_text()  # ShapeDtypeStructs: nothing is allocated


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mesh", action="append", help="a --mesh value of train.py; repeat for several "
                   "(default: data:4,tensor:2 and data:2,tensor:4)")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices")
    p.add_argument("--preset", default="char")
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=64)
    p.add_argument("--vocab_size", type=int, default=128, help="128: the char vocabulary (65) padded, so "
                   "that wte splits over tensor")
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--attention", default="", help="empty: the trainer's default on CPU")
    args = p.parse_args(argv)

    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)
    from gpt2_jax.config import (
        default_attention,
        preset,
    )

    cfg = preset(args.preset, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                 vocab_size=args.vocab_size, block_size=args.block_size, dropout=0.0, dtype="float32",
                 attention=args.attention or default_attention("cpu", "float32"))
    meshes = args.mesh or ["data:4,tensor:2", "data:2,tensor:4"]
    print(f"model: {args.preset} n_layer={cfg.n_layer} n_head={cfg.n_head} n_embd={cfg.n_embd} "
          f"vocab={cfg.vocab_size} T={cfg.block_size} attention={cfg.attention} | batch {args.micro_batch_size} | "
          f"{args.devices} CPU devices | jax {jax.__version__}")
    print(f"{'mesh':<20}" + "".join(f"{k:>24}" for k in COLLECTIVES))
    results = {}
    for spec in meshes:
        counts = count_collectives(compiled_train_step_hlo(cfg, spec, args.micro_batch_size, args.grad_accum))
        results[spec] = counts
        print(f"{spec:<20}" + "".join(f"{c['count']:>8} ({c['bytes']:>9,} B)" for c in counts.values()))
    print(f"(per optimizer step of {args.grad_accum} micro-batch(es), loop trips counted; bytes: result size per "
          "device)")
    out = {"bench": "collectives", "jax": jax.__version__, "config": cfg.to_dict(),
           "micro_batch_size": args.micro_batch_size, "grad_accum": args.grad_accum, "meshes": results,
           "command": "python benchmarks/collectives.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
