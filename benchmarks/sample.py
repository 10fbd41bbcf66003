"""Decode throughput: gpt2_jax's KV-cache `generate` against Hugging Face `generate`, same weights, greedy.

    python benchmarks/sample.py --preset=gpt2 --n_layer=4 --n_head=4 --n_embd=256 --batch=1 \
        --prompt_len=16 --new_tokens=128
    python benchmarks/sample.py --preset=gpt2 --batch=8 --new_tokens=256          # 124M

A randomly initialised gpt2_jax model is exported with `export_hf` and loaded by GPT2LMHeadModel, so both
sides hold the same float32 weights. gpt2_jax: `generate.generate(..., temperature=0)` (prefill, then a
`lax.fori_loop` of single-token steps inside one jit). HF: `generate(do_sample=False, use_cache=True)`
with no EOS, so both produce exactly `--new_tokens` tokens. Both are warmed up first (JAX compile time
is excluded); then `--repeats` calls are timed, alternating, and the medians compared.

Two rates per side: end to end (new tokens / wall time, prefill included, as a user sees it), and
per decoded token (the difference between a `--new_tokens` call and a 1-token call, which cancels the
prefill and fixed per-call costs). The greedy ids of the two sides are compared too. Also printed: the
memory-bandwidth floor of a batch-1 decode step (weight bytes / measured bandwidth).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for train_step's shared helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from gpt2_jax.backends import cpu_if_no_accelerator  # after the checkout is on sys.path

cpu_if_no_accelerator(os.environ)  # no GPU or TPU here: the CPU, without the plugins' start-up tracebacks

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from train_step import add_model_flags, environment, model_config, torch_setup

from gpt2_jax.convert import export_hf, export_vocab_size
from gpt2_jax.generate import generate
from gpt2_jax.model import GPT


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def weight_read_floor(model: GPT, repeats: int) -> dict:
    """The memory-bandwidth floor of decoding at batch 1: every weight is read once per token.

    Bandwidth is measured with the largest such read, the LM head's (vocab, C) float32 matrix times one
    vector; the bytes are all params except the position table (one row of it is read per token).
    """
    weights = nnx.state(model, nnx.Param)
    nbytes = sum(a.nbytes for a in jax.tree.leaves(weights)) - model.wpe.embedding[...].nbytes
    head = model.wte.embedding[...]
    gemv = jax.jit(lambda w, x: x @ w.T)
    x = jnp.ones((1, head.shape[1]), head.dtype)
    gemv(head, x).block_until_ready()
    gb_per_s = head.nbytes / min(timed(lambda: gemv(head, x).block_until_ready(), repeats * 4)) / 1e9
    return {"weight_bytes": nbytes, "bandwidth_gb_per_s": gb_per_s, "floor_ms_per_token": nbytes / gb_per_s / 1e6}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_model_flags(p)
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per side and length")
    args = p.parse_args(argv)

    cfg = model_config(args)
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    if P + N > cfg.block_size:
        raise ValueError(f"--prompt_len={P} + --new_tokens={N} exceeds block_size {cfg.block_size}")
    torch, device, autocast = torch_setup(args)
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    env = environment(torch)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    vocab = export_vocab_size(cfg)  # a padded vocabulary is exported as GPT-2's 50257 rows
    with tempfile.TemporaryDirectory() as tmp:
        hf = GPT2LMHeadModel.from_pretrained(export_hf(model, tmp)).to(device).eval()
    if args.dtype == "bfloat16":
        hf = hf.to(torch.bfloat16)
    hf.generation_config.eos_token_id = None  # never stop early: exactly N new tokens, like gpt2_jax
    prompt = np.random.default_rng(0).integers(0, vocab, size=(B, P), dtype=np.int32)
    prompt_t = torch.from_numpy(prompt.astype(np.int64)).to(device)
    limit = vocab if vocab < cfg.vocab_size else None

    def jax_gen(n):
        return generate(model, prompt, n, temperature=0.0, vocab_limit=limit)

    def hf_gen(n):
        with torch.inference_mode():
            out = hf.generate(prompt_t, attention_mask=torch.ones_like(prompt_t), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
        return out.cpu().numpy()

    print(f"device: {env['device']} ({env['cpu']}, {env['cores']} cores) | jax {env['jax']}, torch {env['torch']} "
          f"on {device} ({env['torch_threads']} threads) | load avg (1 min) {env['loadavg_1m_before']}")
    print(f"model: {args.preset} n_layer={cfg.n_layer} n_head={cfg.n_head} n_embd={cfg.n_embd} vocab={cfg.vocab_size} "
          f"| {cfg.dtype}, attention={cfg.attention} | batch {B}, prompt {P}, new tokens {N}, greedy")
    t0 = time.perf_counter()
    ours, theirs = jax_gen(N), hf_gen(N)  # warm-up: compiles the JAX loops
    jax_gen(1), hf_gen(1)
    print(f"warm-up (JAX compile included): {time.perf_counter() - t0:.1f} s")
    times = {("jax", N): [], ("hf", N): [], ("jax", 1): [], ("hf", 1): []}
    for _ in range(args.repeats):  # alternate the sides so that load from other processes hits both alike
        for side, fn in (("jax", jax_gen), ("hf", hf_gen)):
            for n in (N, 1):
                times[(side, n)] += timed(lambda: fn(n), 1)
    env["loadavg_1m_after"] = round(os.getloadavg()[0], 2)

    med = {k: statistics.median(v) for k, v in times.items()}
    rows = {}
    for side, name in (("jax", "gpt2_jax generate (KV cache, jit)"), ("hf", "HF generate (use_cache=True)")):
        end_to_end = B * N / med[(side, N)]
        per_token = (med[(side, N)] - med[(side, 1)]) / (N - 1) if N > 1 else None
        rows[side] = {"name": name, "tokens_per_s": end_to_end, "ms_per_call": 1e3 * med[(side, N)],
                      "ms_per_call_1_token": 1e3 * med[(side, 1)],
                      "decode_ms_per_token": None if per_token is None else 1e3 * per_token,
                      "decode_tokens_per_s": None if not per_token else B / per_token}
    same = int((ours == theirs).all(axis=1).sum())
    first_diff = [int(np.argmax(a != b)) - P for a, b in zip(ours, theirs) if (a != b).any()]

    print(f"\n{'decode':<36} {'tokens/s':>10} {'ms/call':>10} {'ms/token excl. prefill':>23} {'tokens/s excl.':>15}")
    for r in rows.values():
        per = "-" if r["decode_ms_per_token"] is None else f"{r['decode_ms_per_token']:.2f}"
        dts = "-" if not r["decode_tokens_per_s"] else f"{r['decode_tokens_per_s']:,.0f}"
        print(f"{r['name']:<36} {r['tokens_per_s']:10,.0f} {r['ms_per_call']:10.1f} {per:>23} {dts:>15}")
    floor = weight_read_floor(model, args.repeats)
    print(f"memory floor at batch 1: {floor['weight_bytes'] / 1e6:,.0f} MB of weights per token at "
          f"{floor['bandwidth_gb_per_s']:.1f} GB/s (measured: the LM head's matrix-vector product) = "
          f"{floor['floor_ms_per_token']:.2f} ms/token")
    ratio = rows["jax"]["tokens_per_s"] / rows["hf"]["tokens_per_s"]
    ratio_decode = (rows["jax"]["decode_tokens_per_s"] / rows["hf"]["decode_tokens_per_s"]
                    if rows["jax"]["decode_tokens_per_s"] and rows["hf"]["decode_tokens_per_s"] else None)
    per_token = f", {ratio_decode:.2f}x per decoded token" if ratio_decode else ""
    print(f"ratio JAX / HF: {ratio:.2f}x end to end{per_token}")
    differs = f" (first difference at new token {first_diff})" if first_diff else ""
    print(f"greedy ids identical in {same}/{B} rows{differs}"
          + f" | median of {args.repeats} | load avg (1 min) before {env['loadavg_1m_before']}, after "
          f"{env['loadavg_1m_after']}")
    result = {"bench": "sample", **env, "torch_device": device,
              "config": {**cfg.to_dict(), "preset": args.preset, "batch": B, "prompt_len": P, "new_tokens": N},
              "gpt2_jax": rows["jax"], "hf_generate": rows["hf"], "ratio_jax_over_hf": ratio,
              "ratio_jax_over_hf_decode_only": ratio_decode, "identical_rows": same, "memory_floor": floor,
              "command": "python benchmarks/sample.py " + " ".join(sys.argv[1:])}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
