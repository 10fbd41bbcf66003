"""Causal attention alone, forward + backward: each gpt2_jax implementation against torch's fused SDPA.

    python benchmarks/attention.py --batch=8 --heads=6 --seq=256            # the char preset's layer
    python benchmarks/attention.py --batch=2 --heads=12 --seq=1024          # a GPT-2 124M layer

One layer's attention on random (B, T, nh, hs) inputs: the gradient of sum(attention(q, k, v) * g) with
respect to q, k and v, jitted, for `attention.attention`'s "xla" (jax.nn.dot_product_attention), "einsum"
and "blocked" implementations ("cudnn" too on a GPU in bf16), and torch's
`scaled_dot_product_attention(is_causal=True)` with `.backward()` on the same inputs. Each is warmed up;
then `--repeats` rounds call them in turn, and the fastest and median times are printed, with each
implementation's largest output and gradient difference from "einsum".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for train_step's shared helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from gpt2_jax.backends import cpu_if_no_accelerator  # after the checkout is on sys.path

cpu_if_no_accelerator(os.environ)  # no GPU or TPU here: the CPU, without the plugins' start-up tracebacks

import jax
import jax.numpy as jnp
import numpy as np
from train_step import environment, torch_setup

from gpt2_jax.attention import attention


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=7, help="timed calls per implementation")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: all cores)")
    args = p.parse_args(argv)
    torch, device, _ = torch_setup(args)
    env = environment(torch)

    shape = (args.batch, args.seq, args.heads, args.head_dim)
    q, k, v, g = (np.random.default_rng(i).standard_normal(shape).astype(np.float32) for i in range(4))
    dtype = jnp.dtype(args.dtype)
    impls = ["xla", "einsum", "blocked"] + (["cudnn"] if jax.default_backend() == "gpu" and args.dtype != "float32"
                                            else [])

    def grad_fn(impl):
        loss = lambda q, k, v: jnp.sum(attention(q, k, v, None, impl).astype(jnp.float32) * g)  # noqa: E731
        f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        args_ = [jnp.asarray(a, dtype) for a in (q, k, v)]
        return lambda: jax.block_until_ready(f(*args_))

    tq, tk, tv = (torch.tensor(a.transpose(0, 2, 1, 3).copy(), device=device, requires_grad=True) for a in (q, k, v))
    tg = torch.tensor(g.transpose(0, 2, 1, 3).copy(), device=device)
    if args.dtype == "bfloat16":
        tq, tk, tv = (t.detach().to(torch.bfloat16).requires_grad_() for t in (tq, tk, tv))

    def torch_step():
        for t in (tq, tk, tv):
            t.grad = None
        (torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True).float() * tg).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    runs = {impl: grad_fn(impl) for impl in impls} | {"torch SDPA": torch_step}
    ref = [np.asarray(a, np.float32) for a in runs["einsum"]()]
    errors = {impl: max(float(np.max(np.abs(np.asarray(a, np.float32) - b))) for a, b in zip(runs[impl](), ref))
              for impl in impls}
    torch_step()  # warm-up
    times = {name: [] for name in runs}
    for _ in range(args.repeats):  # in turn, so that load from other processes hits all alike
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    torch_best = min(times["torch SDPA"])
    print(f"device: {env['device']} ({env['cpu']}, {env['cores']} cores) | jax {env['jax']}, torch {env['torch']} "
          f"on {device} ({env['torch_threads']} threads) | load avg (1 min) {env['loadavg_1m_before']}")
    print(f"causal attention, forward + backward: (B, T, nh, hs) = {shape}, {args.dtype}")
    print(f"{'implementation':<16} {'fastest ms':>11} {'median ms':>10} {'torch / this':>13} "
          f"{'max |diff| vs einsum':>21}")
    rows = {}
    for name, ts in times.items():
        rows[name] = {"fastest_ms": 1e3 * min(ts), "median_ms": 1e3 * statistics.median(ts),
                      "torch_over_this": torch_best / min(ts), "max_abs_diff_vs_einsum": errors.get(name)}
        err = "-" if name not in errors else f"{errors[name]:.1e}"
        print(f"{name:<16} {rows[name]['fastest_ms']:11.2f} {rows[name]['median_ms']:10.2f} "
              f"{rows[name]['torch_over_this']:12.2f}x {err:>21}")
    result = {"bench": "attention", **env, "shape": shape, "dtype": args.dtype, "rows": rows,
              "command": "python benchmarks/attention.py " + " ".join(sys.argv[1:])}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
