"""How fast small runs learn under each data order (--data_order=shuffle | sequential).

    python benchmarks/convergence.py                                  # Tiny Shakespeare, 3 seeds, both orders
    python benchmarks/convergence.py --seeds 1337 --steps 500         # a quick look
    python benchmarks/convergence.py --corpus bundled                 # the default `python train.py` corpus

The config (issue #12): a 4-layer, 4-head, 128-wide char model, batch 12 x 64, --max_steps 2000, max lr
1e-3, warmup 100, beta2 0.99, dropout 0, the other settings as in train.py, on one CPU device.
Each (order, seed) is one training run through `training.run`, in this process, one after the other.
Printed per order: the in-loop val loss at each eval step (whole val split: Tiny Shakespeare's 111K
characters are far below --eval_tokens), the whole-split loss of the final checkpoint as
`python -m gpt2_jax.evaluate loss` computes it (it must equal the in-loop figure), and wall time per
run and per step. Then the mean and spread over seeds, and one JSON line.
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

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = Path(os.environ.get("GPT2_JAX_SHARED", ROOT.parent / "shared")) / "data" / "tinyshakespeare.txt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(SHAKESPEARE),
                        help="a UTF-8 text file, or 'bundled' (Python's pydoc topics, train.py's default)")
    parser.add_argument("--orders", default="shuffle,sequential")
    parser.add_argument("--seeds", default="1337,1,2", help="comma-separated")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval_every", type=int, default=250)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--beta2", type=float, default=0.99)
    args = parser.parse_args(argv)

    import jax

    from gpt2_jax import data as data_lib
    from gpt2_jax.evaluate import evaluate_loss, shard_batches
    from gpt2_jax.metrics import read_metrics
    from gpt2_jax.runs import load_run
    from gpt2_jax.training import run
    from gpt2_jax.training.settings import TrainConfig

    work = Path(tempfile.mkdtemp(prefix="convergence-"))
    data = work / "data"
    text = data_lib.default_corpus() if args.corpus == "bundled" else Path(args.corpus).read_text(encoding="utf-8")
    data_lib.prepare_text_string(text, data, tokenizer="char")
    print(f"{args.corpus}: {len(text):,} characters; {jax.device_count()} device(s) {jax.devices()[0].device_kind}; "
          f"{args.n_layer}L/{args.n_embd}, batch {args.batch} x {args.block}, {args.steps} steps, beta2 {args.beta2}")

    results: dict[str, list[dict]] = {}
    for order in args.orders.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            out = work / f"{order}-{seed}"
            tc = TrainConfig(preset="char", data=str(data), out_dir=str(out), data_order=order, seed=seed,
                             n_layer=args.n_layer, n_head=4, n_embd=args.n_embd, block_size=args.block,
                             micro_batch_size=args.batch, max_steps=args.steps, warmup_steps=100, max_lr=1e-3,
                             beta2=args.beta2, dropout=0.0, eval_every=args.eval_every, sample_every=0,
                             checkpoint_every=0, tensorboard=False, mesh="data:1", log_every=50)
            t0 = time.perf_counter()
            run(tc)
            wall = time.perf_counter() - t0
            rows = read_metrics(out / "metrics.jsonl")
            curve = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
            ms = statistics.median(r["ms_per_step"] for r in rows if "ms_per_step" in r)
            model, _, _ = load_run(out)
            n, batches = shard_batches(data, args.batch, args.block, vocab_size=model.config.vocab_size)
            whole = evaluate_loss(model, batches, total=n, progress=False)["loss"]
            results.setdefault(order, []).append({"seed": seed, "curve": curve, "whole_split": whole,
                                                  "wall_s": wall, "ms_per_step": ms})
            print(f"{order:>10} seed {seed}: " + " ".join(f"{s}:{v:.3f}" for s, v in curve.items())
                  + f" | evaluate loss {whole:.4f} | {wall:.0f} s, {ms:.1f} ms/step", flush=True)

    print("\n| data order | in-loop val loss at " + " / ".join(str(s) for s in results[next(iter(results))][0]["curve"])
          + " (mean of seeds) | whole-split val loss (mean ± sd) | ms/step (median) |")
    print("| --- | --- | --- | --- |")
    for order, runs in results.items():
        steps = list(runs[0]["curve"])
        means = [statistics.mean(r["curve"][s] for r in runs) for s in steps]
        whole = [r["whole_split"] for r in runs]
        sd = statistics.stdev(whole) if len(whole) > 1 else 0.0
        print(f"| {order} | {' / '.join(f'{m:.3f}' for m in means)} | {statistics.mean(whole):.3f} ± {sd:.3f} "
              f"({', '.join(f'{w:.3f}' for w in whole)}) | {statistics.median(r['ms_per_step'] for r in runs):.1f} |")
    print(json.dumps({"config": vars(args), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
