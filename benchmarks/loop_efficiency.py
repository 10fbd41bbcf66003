"""The training loop's efficiency: in-loop tokens/s over the bare jitted step's, on the same config.

    python benchmarks/loop_efficiency.py                      # 2 layers, 64 wide, char, on one CPU device
    python benchmarks/loop_efficiency.py --steps 500 --log_every 10

A model this small makes the loop's own costs show: reading and placing each batch, reading the metrics
back, logging, the NaN check, the stop signal. Both sides come from one `training.setup.setup` (same jitted
step, same shardings, same data):
  bare     the jitted train step called back to back on one pre-placed batch, then one block;
  in loop  `training.loop.train`: its own per-step times (the time between two steps' results, which covers
           everything the loop does between them), steps 2..N (step 1 compiles).
Efficiency = in-loop tokens/s / bare tokens/s. Printed: both, the ratio, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from gpt2_jax.backends import cpu_if_no_accelerator  # after the checkout is on sys.path

cpu_if_no_accelerator(os.environ)  # no GPU or TPU here: the CPU, without the plugins' start-up tracebacks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n_layer", type=int, default=2)
    parser.add_argument("--n_embd", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--log_every", type=int, default=1)
    parser.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--rounds", type=int, default=3, help="bare and in-loop alternate this many times")
    args = parser.parse_args(argv)

    import jax

    from gpt2_jax import data as data_lib
    from gpt2_jax.metrics import read_metrics
    from gpt2_jax.training.loop import next_batch, train
    from gpt2_jax.training.settings import TrainConfig
    from gpt2_jax.training.setup import setup

    work = Path(tempfile.mkdtemp(prefix="loop-"))
    data_lib.prepare_text_string(data_lib.default_corpus(), work / "data", tokenizer="char")

    def config(out: str) -> TrainConfig:
        return TrainConfig(preset="char", data=str(work / "data"), out_dir=str(work / out), n_layer=args.n_layer,
                           n_head=2, n_embd=args.n_embd, block_size=args.block, micro_batch_size=args.batch,
                           total_batch_size=args.batch * args.block * args.grad_accum,
                           max_steps=args.steps, dropout=0.0, eval_every=0, sample_every=0, checkpoint_every=0,
                           log_every=args.log_every, mesh="data:1", tensorboard=False)

    bare, in_loop = [], []
    for r in range(args.rounds):
        run = setup(config(f"bare{r}"))
        x, y = next_batch(run)
        key = jax.random.key(0)
        state, m = run.step.fn(run.state, x, y, key)  # compile
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, m = run.step.fn(state, x, y, key)
        jax.block_until_ready((state, m))
        bare.append(args.steps * run.tc.total_batch_size / (time.perf_counter() - t0))
        run.ckpt.close()
        run.logger.close()

        run = setup(config(f"loop{r}"))
        train(run)
        times = [row["ms_per_step"] for row in read_metrics(run.out_dir / "metrics.jsonl")
                 if "ms_per_step" in row and row["step"] > 1]
        in_loop.append(run.tc.total_batch_size / (statistics.mean(times) / 1000))  # every logged step's own time
        print(f"round {r}: bare {bare[-1]:,.0f} tok/s, in loop {in_loop[-1]:,.0f} tok/s, "
              f"ratio {in_loop[-1] / bare[-1]:.3f}", flush=True)

    b, loop = statistics.median(bare), statistics.median(in_loop)
    print(f"\n{args.n_layer}L/{args.n_embd}, batch {args.batch} x {args.block} x {args.grad_accum} accum, "
          f"{args.steps} steps, log_every "
          f"{args.log_every}, {jax.devices()[0].device_kind}: bare step {b:,.0f} tok/s, in loop {loop:,.0f} tok/s, "
          f"efficiency {loop / b:.3f} (median of {args.rounds} rounds)")
    print(json.dumps({"config": vars(args), "bare_tok_s": bare, "in_loop_tok_s": in_loop, "efficiency": loop / b}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
