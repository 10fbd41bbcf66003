"""Train-step and forward throughput of gpt2_jax against PyTorch, in one process on one device.

    python benchmarks/train_step.py --preset=char --micro_batch_size=8 --block_size=256
    python benchmarks/train_step.py --preset=gpt2 --n_layer=4 --n_head=4 --n_embd=256 --micro_batch_size=8 \
        --block_size=256
    python benchmarks/train_step.py --preset=gpt2 --vocab_size=50304 --micro_batch_size=16 --dtype=bfloat16

(the last on a GPU; --attention defaults to the trainer's choice: cudnn on a GPU in bf16, blocked on CPU)

Contenders, all float32 unless --dtype says otherwise, same config, same batch, dropout 0:
  train    gpt2_jax: training.step.make_train_step (the trainer's jitted step: grad accumulation in lax.scan,
           clip + AdamW from optim.py, donated state) | reference_torch eager | reference_torch under
           torch.compile (skipped, with the reason, where it fails) -- each with AdamW and clipping at 1.0.
  forward  gpt2_jax logits (jit) | Hugging Face GPT2LMHeadModel (eager, no grad), random weights.
Each contender is warmed up (compiled) first; then `--rounds` rounds of `--steps` timed calls run,
the contenders interleaved round by round so that load from other processes hits them alike; the
median call time is reported. Prints a table, then one JSON line.

Memory: on GPU, JAX's device memory_stats() peak and torch.cuda.max_memory_allocated(). On CPU, the
growth of the process's peak RSS over its RSS before the contender was built, measured during its
timed calls (compile-time peaks excluded; heap the allocators keep after compiling included), plus,
for JAX, XLA's own buffer plan (compiled.memory_analysis(): arguments + outputs + temporaries -
donated aliases), which is exact for the step and device-independent.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX shares the GPU with torch here
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from gpt2_jax.backends import cpu_if_no_accelerator  # after the checkout is on sys.path

cpu_if_no_accelerator(os.environ)  # no GPU or TPU here: the CPU, without the plugins' start-up tracebacks

import jax
import numpy as np
from flax import nnx
from trace_top import table as table_of_ops
from trace_top import top_ops

from gpt2_jax import sharding
from gpt2_jax.config import (
    ATTENTION,
    GPT2_VOCAB_SIZE,
    PADDED_VOCAB_SIZE,
    PRESETS,
    GPTConfig,
    default_attention,
    preset,
)
from gpt2_jax.metrics import FLOPS_CONVENTION, flops_per_token, mfu, peak_flops
from gpt2_jax.model import GPT
from gpt2_jax.optim import OptimConfig, make_optimizer
from gpt2_jax.training.step import TrainState, make_train_step

# ---------------------------------------------------------------------------------------------------
# Flags and environment (sample.py uses these too)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="char", choices=sorted(PRESETS))
    p.add_argument("--block_size", type=int, default=0, help="sequence length (0: the preset's)")
    for name in ("n_layer", "n_head", "n_embd", "vocab_size"):
        p.add_argument(f"--{name}", type=int, default=0, help="override the preset's (0: keep)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--attention", default="", choices=("",) + ATTENTION,
                   help="empty: the trainer's default for this platform and dtype")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: all cores)")


def model_config(args) -> GPTConfig:
    overrides = {k: getattr(args, k) for k in ("block_size", "n_layer", "n_head", "n_embd", "vocab_size")
                 if getattr(args, k)}
    attention = args.attention or default_attention(jax.default_backend(), args.dtype)
    return preset(args.preset, dropout=0.0, dtype=args.dtype, attention=attention, remat=args.remat,
                  **overrides)


def torch_setup(args):
    """(torch, device, autocast factory): torch on the GPU JAX uses, else on the CPU."""
    import contextlib

    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and not torch.cuda.is_available():
        print("WARNING: JAX runs on a GPU but torch has no CUDA: the torch numbers are CPU numbers")
    device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    if device == "cuda":  # JAX's default float32 matmul precision on GPU is TF32: give torch the same
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.dtype == "bfloat16":
        return torch, device, lambda: torch.autocast(device, dtype=torch.bfloat16)
    return torch, device, contextlib.nullcontext


def environment(torch=None) -> dict:
    dev = jax.devices()[0]
    cpuinfo = Path("/proc/cpuinfo")
    cpu = re.search(r"model name\s*:\s*(.*)", cpuinfo.read_text()) if cpuinfo.exists() else None
    env = {"device": f"{dev.platform}:{dev.device_kind}", "cpu": cpu.group(1) if cpu else "?",
           "cores": os.cpu_count(), "jax": jax.__version__, "loadavg_1m_before": round(os.getloadavg()[0], 2),
           "date": datetime.date.today().isoformat()}
    if torch is not None:
        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return env


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def trim_heap() -> None:
    """Give freed heap back to the OS, so that memory one contender freed does not hide the next one's."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    trim_heap()
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    return _status_kb("VmHWM") * 1024


# ---------------------------------------------------------------------------------------------------
# Contenders: a name, a zero-argument call that runs one step to completion, tokens per call


@dataclasses.dataclass
class Contender:
    name: str
    run: Callable[[], object] | None  # None: could not be built (see `error`)
    tokens: int
    error: str = ""
    times: list[float] = dataclasses.field(default_factory=list)
    mem: dict = dataclasses.field(default_factory=dict)
    torch_gpu: object = None  # the torch module when the contender runs on a CUDA device

    def tokens_per_s(self) -> float | None:
        return self.tokens / statistics.median(self.times) if self.times else None


def data_vocab(cfg: GPTConfig) -> int:
    """The token ids the data holds: a padded vocabulary's extra rows never occur (the trainer masks them)."""
    return GPT2_VOCAB_SIZE if cfg.vocab_size == PADDED_VOCAB_SIZE else cfg.vocab_size


def jax_train(cfg: GPTConfig, x: np.ndarray, y: np.ndarray) -> tuple[Callable, dict]:
    """The trainer's own jitted step (donated state) with its real optax chain, on one device."""
    grad_accum = x.shape[0]
    tx = make_optimizer(OptimConfig(warmup_steps=10, max_steps=10_000))
    mesh = sharding.make_mesh("data:1")
    abstract = nnx.eval_shape(lambda: TrainState(GPT(cfg, rngs=nnx.Rngs(0)), tx))
    graphdef, abstract_state = nnx.split(abstract)
    state_sh = sharding.state_shardings(abstract_state, mesh)
    batch_sh = sharding.batch_sharding(mesh, ndim=3, batch_dim=1)
    state = jax.jit(lambda: nnx.state(TrainState(GPT(cfg, rngs=nnx.Rngs(0)), tx)), out_shardings=state_sh)()
    step = make_train_step(graphdef, state_sh, batch_sh, grad_accum, dropout=cfg.dropout > 0,
                           vocab_limit=data_vocab(cfg))
    x, y = jax.device_put(x, batch_sh), jax.device_put(y, batch_sh)
    rng = jax.random.key(0)
    compiled = step.lower(state, x, y, rng).compile()  # the executable step(...) runs, compiled once here
    box = {"state": state}

    def run():
        box["state"], metrics = compiled(box["state"], x, y, rng)
        return jax.block_until_ready((box["state"], metrics))

    return run, _xla_memory(compiled)


def jax_forward(cfg: GPTConfig, x: np.ndarray) -> tuple[Callable, dict]:
    graphdef, params = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)))
    fwd = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    x = jax.device_put(x)
    compiled = fwd.lower(params, x).compile()
    return (lambda: compiled(params, x).block_until_ready()), _xla_memory(compiled)


def _xla_memory(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        return {"xla_plan_bytes": int(total), "xla_temp_bytes": int(m.temp_size_in_bytes)}
    except Exception:  # noqa: BLE001 -- not every backend implements it
        return {}


def torch_train(cfg: GPTConfig, x: np.ndarray, y: np.ndarray, ts, compiled: bool) -> Callable:
    """reference_torch.GPT with AdamW (decay on >=2-D params, as optim.py) and clipping at 1.0."""
    import reference_torch

    torch, device, autocast = ts
    model = reference_torch.GPT(cfg).to(device).train()
    params = list(model.parameters())  # the tied wte/lm_head weight once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=device == "cuda")
    forward = torch.compile(model) if compiled else model
    xs, ys = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    grad_accum = x.shape[0]

    def run():
        opt.zero_grad(set_to_none=True)
        for xb, yb in zip(xs, ys):
            with autocast():
                _, loss = forward(xb, yb)
            (loss / grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()  # waits for the GPU, like the trainer's device_get(metrics)

    return run


def hf_forward(cfg: GPTConfig, x: np.ndarray, ts) -> Callable:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch, device, autocast = ts
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                    n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)).to(device).eval()
    xs = torch.from_numpy(x).to(device)

    def run():
        with torch.inference_mode(), autocast():
            logits = hf(xs).logits
        return logits[0, 0, 0].item()

    return run


# ---------------------------------------------------------------------------------------------------
# Timing


def build(name: str, make: Callable[[], Callable | tuple[Callable, dict]], tokens: int, warmup: int,
          torch_gpu=None) -> Contender:
    """Build a contender and warm it up; a failure (e.g. torch.compile without a compiler) is recorded."""
    trim_heap()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    try:
        made = make()
        run, mem = made if isinstance(made, tuple) else (made, {})
        for _ in range(warmup):
            run()
    except Exception as e:  # noqa: BLE001 -- report any failure and go on with the others
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print(f"  {name}: FAILED to build/warm up -- {msg}")
        return Contender(name, None, tokens, error=msg)
    print(f"  {name}: built and warmed up in {time.perf_counter() - t0:.1f} s")
    c = Contender(name, run, tokens, mem=dict(mem), torch_gpu=torch_gpu)
    c.mem["rss_base_bytes"] = rss0
    return c


def time_round(c: Contender, steps: int, first: bool) -> None:
    if c.run is None:
        return
    if first:  # memory is measured over the first timed round
        reset_peak_rss()
        if c.torch_gpu is not None:
            c.torch_gpu.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        t0 = time.perf_counter()
        c.run()
        c.times.append(time.perf_counter() - t0)
    if first:
        if jax.default_backend() == "cpu":
            c.mem["peak_rss_growth_bytes"] = peak_rss_bytes() - c.mem["rss_base_bytes"]
        elif c.torch_gpu is not None:
            c.mem["device_peak_bytes"] = c.torch_gpu.cuda.max_memory_allocated()
        elif stats := jax.devices()[0].memory_stats():  # cumulative over the process: train runs first
            c.mem["device_peak_bytes"] = stats.get("peak_bytes_in_use")


def run_rounds(contenders: list[Contender], steps: int, rounds: int) -> None:
    for r in range(rounds):
        for c in contenders:
            time_round(c, steps, first=r == 0)


# ---------------------------------------------------------------------------------------------------
# Report


def _gb(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GiB"


def mem_text(c: Contender) -> str:
    m = c.mem
    parts = []
    if "device_peak_bytes" in m:
        parts.append(f"device peak {_gb(m['device_peak_bytes'])}")
    if "peak_rss_growth_bytes" in m:
        parts.append(f"RSS +{_gb(m['peak_rss_growth_bytes'])}")
    if "xla_plan_bytes" in m:
        parts.append(f"XLA plan {_gb(m['xla_plan_bytes'])}")
    return ", ".join(parts) or "-"


def table(title: str, contenders: list[Contender], fpt: float | None, peak: float | None) -> list[str]:
    lines = [f"{title:<30} {'tokens/s':>11} {'ms/call (median [min..max])':>30} {'GFLOP/s':>8} {'MFU':>6}  memory"]
    for c in contenders:
        if c.run is None:
            lines.append(f"{c.name:<30} {'failed':>11}  {c.error[:100]}")
            continue
        t = np.array(c.times) * 1e3
        tps = c.tokens_per_s()
        flops = f"{tps * fpt / 1e9:8.1f}" if fpt else f"{'-':>8}"
        m = mfu(tps, fpt, 1, peak) if fpt else None
        mfu_s = f"{100 * m:5.1f}%" if m is not None else f"{'n/a':>6}"
        timing = f"{np.median(t):.1f} [{t.min():.1f}..{t.max():.1f}]"
        lines.append(f"{c.name:<30} {tps:11,.0f} {timing:>30} {flops} {mfu_s}  {mem_text(c)}")
    return lines


def ratio(a: Contender, b: Contender, best: bool = False) -> float | None:
    """a's throughput over b's: from median call times, or from the fastest calls (`best`), which are
    the least disturbed by other processes on a shared machine."""
    if a.run is None or b.run is None:
        return None
    return min(b.times) / min(a.times) if best else a.tokens_per_s() / b.tokens_per_s()


def ratio_text(label: str, a: Contender, b: Contender) -> str:
    r, best = ratio(a, b), ratio(a, b, best=True)
    return f"{label}: n/a" if r is None else f"{label}: {r:.2f}x (fastest calls: {best:.2f}x)"


def summary(c: Contender, fpt: float | None, peak: float | None) -> dict:
    if c.run is None:
        return {"error": c.error}
    tps = c.tokens_per_s()
    out = {"tokens_per_s": round(tps, 1), "ms_median": round(1e3 * statistics.median(c.times), 3),
           "ms_min": round(1e3 * min(c.times), 3), "n": len(c.times), **c.mem}
    if fpt:
        out["mfu"] = mfu(tps, fpt, 1, peak)
    return out


def trace_train_step(c: Contender, steps: int, folder: str) -> dict | None:
    """`steps` calls of a compiled, warmed-up step under jax.profiler (after the timed rounds, so that tracing
    does not slow the figures), and where their time went: trace_top.top_ops."""
    if c.run is None:
        return None
    jax.profiler.start_trace(folder)
    for _ in range(steps):
        c.run()
    jax.profiler.stop_trace()
    result = top_ops(Path(folder))
    print(table_of_ops(result))
    return {"folder": folder, **result}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_model_flags(p)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=5, help="timed calls per contender per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds; contenders alternate between rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
    p.add_argument("--no_compile", action="store_true", help="skip torch.compile")
    p.add_argument("--no_forward", action="store_true", help="skip the forward-only comparison")
    p.add_argument("--profile", default="", help="also trace --steps calls of the gpt2_jax train step with "
                   "jax.profiler into this folder, and report the top operations by device time (trace_top.py)")
    args = p.parse_args(argv)

    cfg = model_config(args)
    ts = torch_setup(args)
    torch, device = ts[0], ts[1]
    env = environment(torch)
    B, T, A = args.micro_batch_size, cfg.block_size, args.grad_accum
    tokens = np.random.default_rng(0).integers(0, data_vocab(cfg), size=(A, B, T + 1), dtype=np.int32)
    x, y = np.ascontiguousarray(tokens[..., :-1]), np.ascontiguousarray(tokens[..., 1:])
    x64, y64 = x.astype(np.int64), y.astype(np.int64)  # torch embedding / cross_entropy indices
    fpt = flops_per_token(cfg, T)
    peak = peak_flops(jax.devices()[0])
    n_params = sum(v.size for v in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))))
    torch_gpu = torch if device == "cuda" else None

    print(f"device: {env['device']} ({env['cpu']}, {env['cores']} cores) | jax {env['jax']}, torch {env['torch']} "
          f"on {device} ({env['torch_threads']} threads) | load avg (1 min) {env['loadavg_1m_before']}")
    print(f"model: {args.preset} n_layer={cfg.n_layer} n_head={cfg.n_head} n_embd={cfg.n_embd} vocab={cfg.vocab_size} "
          f"T={T} | {n_params / 1e6:.2f}M params | {cfg.dtype}, attention={cfg.attention}, remat={cfg.remat}")
    print(f"batch: {B} x {T} x {A} accum = {A * B * T:,} tokens/step | FLOPs/token {fpt:.3e} [{FLOPS_CONVENTION}] | "
          + (f"peak {peak / 1e12:.0f} TFLOP/s bf16 dense" if peak else "no known peak for this device: MFU n/a"))

    print("building (compile times are not timed):")
    train = [build("gpt2_jax (jit, donated)", lambda: jax_train(cfg, x, y), A * B * T, args.warmup),
             build("torch eager", lambda: torch_train(cfg, x64, y64, ts, False), A * B * T, args.warmup, torch_gpu)]
    if not args.no_compile:
        train.append(build("torch.compile", lambda: torch_train(cfg, x64, y64, ts, True), A * B * T,
                           args.warmup, torch_gpu))
    run_rounds(train, args.steps, args.rounds)
    profile = trace_train_step(train[0], args.steps, args.profile) if args.profile else None
    forward = []
    if not args.no_forward:
        forward = [build("gpt2_jax forward (jit)", lambda: jax_forward(cfg, x[0]), B * T, args.warmup),
                   build("HF GPT2LMHeadModel forward", lambda: hf_forward(cfg, x64[0], ts), B * T, args.warmup,
                         torch_gpu)]
        run_rounds(forward, args.steps, args.rounds)
    env["loadavg_1m_after"] = round(os.getloadavg()[0], 2)

    print()
    print("\n".join(table("train step", train, fpt, peak)))
    compiled = train[2] if len(train) > 2 else Contender("torch.compile", None, 0, error="skipped")
    print(ratio_text("ratio JAX / torch eager", train[0], train[1]) + " | "
          + ratio_text("JAX / torch.compile", train[0], compiled))
    if forward:
        print()
        print("\n".join(table("forward (logits, no grad)", forward, fpt / 3, peak)))
        print(ratio_text("ratio JAX / HF forward", forward[0], forward[1]))
    print(f"(median of {args.rounds} rounds x {args.steps} calls each; forward FLOPs = 1/3 of the train convention; "
          f"load avg (1 min) before {env['loadavg_1m_before']}, after {env['loadavg_1m_after']})")

    result = {
        "bench": "train_step", **env, "torch_device": device,
        "config": {**cfg.to_dict(), "preset": args.preset, "params": n_params, "micro_batch_size": B,
                   "grad_accum": A, "tokens_per_step": A * B * T},
        "flops_per_token": fpt, "flops_convention": FLOPS_CONVENTION, "peak_flops": peak,
        "train": {c.name: summary(c, fpt, peak) for c in train},
        "forward": {c.name: summary(c, fpt / 3, peak) for c in forward},
        "ratio_jax_over_torch_eager": ratio(train[0], train[1]),
        "ratio_jax_over_torch_compile": ratio(train[0], compiled),
        "ratio_jax_over_torch_eager_fastest": ratio(train[0], train[1], best=True),
        "ratio_jax_over_hf_forward": ratio(forward[0], forward[1]) if forward else None,
        "profile": profile,
        "command": "python benchmarks/train_step.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
