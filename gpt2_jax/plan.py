"""Will it fit? Compile the exact train step for a GPU or TPU that is not attached, and read the plan.

    python -m gpt2_jax.plan --target=h100 --preset=gpt2 --micro_batch_size=16
    python -m gpt2_jax.plan --target=v5e-8 --preset=gpt2-medium --mesh=data:8 --search
    python -m gpt2_jax.plan --target=local --preset=char

XLA compiles for a device it is only told about ("deviceless" / ahead-of-time compiles): NVIDIA GPUs from a
target description (gpt2_jax/targets/*.txtpb, XLA's GpuTargetConfigProto: compute capability, cores,
memory, cuDNN version), TPU slices from libtpu's topology names (`v5e:2x4`). The compiled program is the
one the trainer would run (same step function, shardings, donation, dtype, attention, remat), so its
memory plan says whether a run fits before one pays for the machine. Printed per device: argument,
output, temporary and code bytes against the device's memory, fits or not and what to change, the
attention kernel in the program, FLOPs per step beside the 6N + 12LHQT estimate the trainer logs, and
the collectives.

GPU and TPU compiles run in a child process with JAX_PLATFORMS=cpu and TPU_SKIP_MDS_QUERY=1, inside a
private network namespace (`unshare -n`) where the machine allows: libtpu then cannot reach a cloud
metadata server, or anything else. They need the `plan` extra (jax[cuda13] and jax[tpu]). GPU compiles
use the XLA flags that train.py --platform=gpu sets (config.GPU_XLA_FLAGS, unless XLA_FLAGS is set), and the
report prints them. train.py --micro_batch_size=0 on a GPU or TPU runs largest_micro_batch for --target=local.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

TARGETS_DIR = Path(__file__).parent / "targets"
GPU_TARGETS = {"h100": "h100.txtpb", "h200": "h200.txtpb", "a100": "a100.txtpb"}  # A100 = the 80 GB SXM4
# TPU generations: HBM per chip (GiB, datasheets) and whether the `-N` of a slice name counts TensorCores
# (v4, v5p: two per chip, one JAX device per chip in "megacore" mode) or chips (v5e, v6e).
TPU_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
TPU_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
# chips -> libtpu topology: v5e/v6e slices are 2-D tori, v4/v5p 3-D (checked against libtpu 0.0.42).
TPU_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
TPU_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
          512: "8x8x8"}
DEFAULT_MEM_FRACTION = 0.75  # JAX's GPU allocator takes 75% of the memory unless told otherwise
REMATS = ("none", "dots", "full")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
CHILD_ENV = "GPT2_JAX_PLAN_CHILD"  # set in the child process that compiles


class MissingExtra(RuntimeError):
    """The GPU plugin or libtpu is not installed."""


# ---------------------------------------------------------------------------------------------------
# Targets


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A --target value, parsed without importing JAX: which platform, and how to get its devices."""

    name: str
    platform: str  # "gpu" | "tpu" | "local"
    gpu_file: str = ""  # gpu: the target description file
    topology: str = ""  # tpu: libtpu topology name, e.g. "v5e:2x4"
    generation: str = ""  # tpu: v4 | v5e | v5p | v6e

    @property
    def deviceless(self) -> bool:
        return self.platform in ("gpu", "tpu")


def parse_target(name: str) -> TargetSpec:
    """'h100' | 'h200' | 'a100' | '<gen>-<N>' TPU slice (v4-8, v5e-8, v5p-16, v6e-8) | 'v5e:2x4' | 'local'."""
    key = name.lower().strip()
    if key == "local":
        return TargetSpec(name, "local")
    if key in GPU_TARGETS:
        return TargetSpec(name, "gpu", gpu_file=GPU_TARGETS[key])
    gens = "|".join(TPU_HBM_GIB)
    if m := re.fullmatch(rf"({gens}):(\d+(?:x\d+)+)", key):  # a libtpu topology name as is
        return TargetSpec(name, "tpu", topology=key, generation=m.group(1))
    if m := re.fullmatch(rf"({gens})-(\d+)", key):
        gen, n = m.group(1), int(m.group(2))
        chips, rest = divmod(n, TPU_CORES_PER_CHIP[gen])
        table = TPU_3D if TPU_CORES_PER_CHIP[gen] == 2 else TPU_2D
        if rest or chips not in table:
            sizes = ", ".join(f"{gen}-{c * TPU_CORES_PER_CHIP[gen]}" for c in table)
            raise ValueError(f"--target={name}: no {gen} slice of {n}; known sizes: {sizes} (or give a libtpu "
                             f"topology such as {gen}:{next(iter(table.values()))})")
        return TargetSpec(name, "tpu", topology=f"{gen}:{table[chips]}", generation=gen)
    raise ValueError(f"--target={name!r} is unknown; use one of {', '.join(GPU_TARGETS)}, a TPU slice "
                     f"<gen>-<N> with gen in {', '.join(TPU_HBM_GIB)} (e.g. v5e-8, v5p-16), or local")


@dataclasses.dataclass
class Target:
    spec: TargetSpec
    platform: str  # what the program is compiled for: "gpu" | "tpu" | "cpu"
    devices: list
    memory_bytes: int  # per device
    budget_bytes: int  # what one program may use per device
    budget_note: str

    @property
    def kind(self) -> str:
        return self.devices[0].device_kind


def missing_extra(spec: TargetSpec) -> str:
    """Why `spec` cannot be compiled for in this environment ("" if it can)."""
    import importlib.util  # noqa: PLC0415

    def installed(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is missing
            return False

    if spec.platform == "gpu" and not installed("jax_plugins.xla_cuda13"):
        what = "JAX's CUDA plugin (jax[cuda13], ~4.4 GB)"
    elif spec.platform == "tpu" and not installed("libtpu"):
        what = "libtpu (jax[tpu])"
    else:
        return ""
    return (f"--target={spec.name} needs {what}, which is not installed; install the plan extra: "
            f"pip install -e '.[plan]'")


def require_extra(spec: TargetSpec) -> None:
    if why := missing_extra(spec):
        raise MissingExtra(why)


def load_target(spec: TargetSpec) -> Target:
    """The devices of `spec` (compile-only for GPU/TPU targets) and their memory."""
    import jax  # noqa: PLC0415

    if spec.platform == "gpu":
        from jax.experimental import topologies  # noqa: PLC0415

        require_extra(spec)
        text = (TARGETS_DIR / spec.gpu_file).read_text()
        topo = topologies.get_topology_desc(platform="cuda", target_config=text, topology="1x1x1")
        memory = int(re.search(r"device_memory_size:\s*(\d+)", text).group(1))
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_MEM_FRACTION))
        note = f"{fraction:.0%} of {_gib(memory)}: JAX's GPU pool (XLA_PYTHON_CLIENT_MEM_FRACTION={fraction:g})"
        return Target(spec, "gpu", list(topo.devices), memory, int(fraction * memory), note)
    if spec.platform == "tpu":
        from jax.experimental import topologies  # noqa: PLC0415

        require_extra(spec)
        # v4 and v5p chips have two TensorCores that JAX uses as one device ("megacore"), as on a TPU VM.
        extra = {"chip_config_name": "megacore"} if spec.generation == "v4" else {}
        topo = topologies.get_topology_desc(spec.topology, platform="tpu", **extra)
        memory = TPU_HBM_GIB[spec.generation] * 2**30
        return Target(spec, "tpu", list(topo.devices), memory, memory, f"HBM per chip ({_gib(memory)})")
    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    if "bytes_limit" in stats:
        memory, note = stats["bytes_limit"], "the allocator's limit on this device"
    else:  # CPU: host memory
        memory, note = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this host's RAM"
    return Target(spec, jax.default_backend(), devices, memory, memory, note)


# ---------------------------------------------------------------------------------------------------
# The train step, as the trainer builds it


def build_train_step(tc, cfg, mesh, vocab_limit: int | None = None):
    """The trainer's jitted train step for `mesh` (trainer.build_step, as the trainer builds it), and the
    abstract arguments to lower it with: (step, (state, x, y, rng))."""
    from gpt2_jax.training.step import build_step  # noqa: PLC0415

    step = build_step(tc, cfg, mesh, vocab_limit)
    return step.fn, step.abstract_args()


def target_mesh(spec: str, devices):
    """The trainer's mesh over the target's devices."""
    from gpt2_jax import sharding  # noqa: PLC0415

    return sharding.make_mesh(spec, devices)


# ---------------------------------------------------------------------------------------------------
# One plan


@dataclasses.dataclass
class Plan:
    """What the compiler says about one configuration on one target (bytes are per device)."""

    remat: str
    micro_batch_size: int
    fits: bool
    need_bytes: int  # arguments + outputs - aliased + temporaries + code
    budget_bytes: int
    memory: dict = dataclasses.field(default_factory=dict)  # argument/output/alias/temp/code bytes
    error: str = ""  # the compiler's RESOURCE_EXHAUSTED message, if it refused
    attention: str = ""
    custom_calls: list = dataclasses.field(default_factory=list)
    flops_per_step: float | None = None
    flops_source: str = ""
    compiled_flops: float | None = None  # the compiled program's own count per device (TPU): loops once
    flops_6n: float = 0.0  # 6N + 12LHQT per token x tokens per step (metrics.flops_per_token)
    collectives: dict = dataclasses.field(default_factory=dict)  # kind -> {"count", "bytes"} per step
    suggestions: list = dataclasses.field(default_factory=list)


def _resolved(args, target: Target, remat: str, micro: int):
    from gpt2_jax.config import GPT2_SIZES, GPT2_VOCAB_SIZE, PRESETS  # noqa: PLC0415
    from gpt2_jax.training.settings import TrainConfig, model_config, resolve  # noqa: PLC0415

    tc = TrainConfig(preset=args.preset, micro_batch_size=micro, block_size=args.block_size, dtype=args.dtype,
                     attention=args.attention, remat=remat, mesh=args.mesh, vocab_size=args.vocab_size,
                     n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    tc = resolve(tc, target.platform, target_mesh(args.mesh, target.devices).size)
    tc = dataclasses.replace(tc, total_batch_size=tc.micro_batch_size * tc.block_size * args.grad_accum)
    data_vocab = GPT2_VOCAB_SIZE if args.preset in GPT2_SIZES else PRESETS[args.preset].vocab_size
    cfg = model_config(tc, data_vocab)
    return tc, cfg, data_vocab if data_vocab < cfg.vocab_size else None


def plan_one(args, target: Target, remat: str, micro: int, count_flops: bool = True) -> Plan:
    """Compile the train step for `target` with this remat policy and micro-batch, and read the result."""
    from gpt2_jax.metrics import flops_per_token  # noqa: PLC0415
    from gpt2_jax.model import compiling_for  # noqa: PLC0415

    tc, cfg, vocab_limit = _resolved(args, target, remat, micro)
    mesh = target_mesh(tc.mesh, target.devices)
    with compiling_for(target.platform):
        step, step_args = build_train_step(tc, cfg, mesh, vocab_limit)
        lowered = step.lower(*step_args)
    tokens = tc.total_batch_size
    p = Plan(remat, micro, False, 0, target.budget_bytes, flops_6n=flops_per_token(cfg, tc.block_size) * tokens)
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 -- only the compiler's out-of-memory refusal is a result
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        p.error = _first_line(str(e), "RESOURCE_EXHAUSTED")
        p.need_bytes, budget = _parse_exhausted(str(e))
        p.budget_bytes = budget or target.budget_bytes
    else:
        m = compiled.memory_analysis()
        p.memory = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
                    "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
                    "code": m.generated_code_size_in_bytes}
        p.need_bytes = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                        + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
        p.fits = p.need_bytes <= target.budget_bytes
        hlo = compiled.as_text()
        p.custom_calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
        p.attention = attention_kernel(p.custom_calls, cfg.attention)
        p.collectives = collectives(hlo)
        cost = compiled.cost_analysis()  # None for GPU targets
        p.compiled_flops = float(cost["flops"]) if cost and cost.get("flops") else None
        if count_flops:
            p.flops_per_step, p.flops_source = count_step_flops(tc, cfg, vocab_limit)
    if not p.fits:
        p.suggestions = suggestions(tc, mesh, p)
    return p


def count_step_flops(tc, cfg, vocab_limit) -> tuple[float | None, str]:
    """FLOPs of one optimizer step, all devices together.

    XLA's cost analysis counts a loop body once, whatever its trip count: the layer scan and the
    grad_accum scan would be counted as one layer and one micro-batch. So the FLOPs are counted on a CPU
    lowering of the same step with the layers unrolled and one micro-batch, times grad_accum (the
    optimizer update, ~10 FLOPs per parameter, is then counted grad_accum times: noise). The attention
    is lowered as "xla" there (cuDNN has no CPU lowering), i.e. counted over the full T x T scores, as the
    compiled kernels for XLA attention compute them. The compiled program's own count, where the backend
    gives one (TPU), is a lower bound only for the same reason, and is not used.
    """
    import jax  # noqa: PLC0415

    from gpt2_jax.model import compiling_for  # noqa: PLC0415

    grad_accum = tc.total_batch_size // (tc.micro_batch_size * tc.block_size)
    one = dataclasses.replace(tc, total_batch_size=tc.micro_batch_size * tc.block_size, mesh="data:1")
    mesh = target_mesh("data:1", jax.devices("cpu")[:1])
    attention = "xla" if cfg.attention == "cudnn" else cfg.attention
    with compiling_for("cpu", unroll_layers=True):
        step, step_args = build_train_step(one, cfg.replace(attention=attention), mesh, vocab_limit)
        cost = step.lower(*step_args).cost_analysis()
    flops = (cost or {}).get("flops")
    if not flops:
        return None, "no cost analysis"
    return float(flops) * grad_accum, "XLA cost analysis of a CPU lowering (layers unrolled)"


def attention_kernel(custom_calls: list[str], implementation: str) -> str:
    """The attention kernel in a compiled program, from its custom calls."""
    fmha = [c for c in custom_calls if c.startswith("__cudnn$fmha")]
    if fmha:
        return f"cuDNN flash attention ({', '.join(fmha)})"
    missing = " -- no cuDNN attention in the program!" if implementation == "cudnn" else ""
    return f"XLA ({implementation} attention as matmuls and fusions, no flash kernel){missing}"


_SIZES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}


def _shape_bytes(text: str) -> int:
    """Bytes of an HLO result type such as `bf16[8,1024]{1,0}` or a tuple `(f32[4], f32[4,4])`."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", text):
        if dtype in _SIZES:
            total += _SIZES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collectives(hlo: str) -> dict:
    """Collectives per step by kind: {"all-reduce": {"count": n, "bytes": b}, ...}.

    Read from the optimized HLO text. Each op counts with its result's bytes (async pairs once, at their
    `-done`), times the known trip counts of the loops around it (XLA writes them on while ops as
    known_trip_count), so an all-gather in the layer scan counts n_layer times.
    """
    comps: dict[str, list[str]] = {}
    order, current, entry = [], None, None
    for line in hlo.splitlines():
        if m := re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line):
            current = m.group(2)
            comps[current] = []
            order.append(current)
            if m.group(1):
                entry = current
        elif current is not None and line.strip() and line.strip() != "}":
            comps[current].append(line)
    mult = dict.fromkeys(comps, 0)
    if entry is None:
        return {}
    mult[entry] = 1
    for name in reversed(order):  # callers print after their callees: walk from the entry down
        if not mult[name]:
            continue
        for line in comps[name]:
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            for key, callee in re.findall(r"\b(body|condition|calls|to_apply|branch_computations)=\{?%?([\w.\-]+)",
                                          line):
                if callee in mult:
                    mult[callee] += mult[name] * (int(trip.group(1)) if key == "body" and trip else 1)
    out: dict[str, dict] = {}
    pattern = re.compile(r"=\s*(\(.*?\)|[\w]+\[[\d,]*\](?:\{[^}]*\})?)\s+(" + "|".join(COLLECTIVES)
                         + r")(-done)?\(")
    for name, lines in comps.items():
        for line in lines:
            if (m := pattern.search(line)) and mult[name]:
                row = out.setdefault(m.group(2), {"count": 0, "bytes": 0})
                row["count"] += mult[name]
                row["bytes"] += mult[name] * _shape_bytes(m.group(1))
    return out


def _first_line(text: str, marker: str) -> str:
    lines = [ln for ln in text.splitlines() if marker in ln]
    return (lines[0] if lines else text.splitlines()[0]).strip()[:500]


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _parse_exhausted(message: str) -> tuple[int, int | None]:
    """(needed, available) bytes from a TPU compiler refusal, e.g. `... HLO temporaries (70.76G) exceeds
    available HBM (15.75G)`; (0, None) when the message has no figures."""
    amounts = [(float(n) * _UNITS[u.upper()], label) for label, n, u in
               re.findall(r"([A-Za-z ]+?)\s*\(([\d.]+)\s*([KMGT]?)i?B?\)", message)]
    need = next((int(a) for a, label in amounts if "exceed" not in label and "available" not in label), 0)
    avail = next((int(a) for a, label in amounts if "available" in label), None)
    return need, avail


def suggestions(tc, mesh, p: Plan) -> list[str]:
    """What to change, most effective first."""
    out = []
    if tc.remat == "none":
        out.append("--remat=full (recompute each block in the backward pass: activations of one block "
                   "instead of all) or --remat=dots (keep the matmul outputs)")
    elif tc.remat == "dots":
        out.append("--remat=full (keeps less than dots)")
    n = math.prod(mesh.shape.values())
    args = p.memory.get("argument", 0)
    if n > 1 and mesh.shape["fsdp"] == 1:
        out.append(f"--mesh=fsdp:{n} (split params and AdamW state over the {n} devices"
                   + (f": {_gib(args)} of arguments per device now)" if args else ")"))
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if (micro := _micro_estimate(tc, p, dp)) is not None:
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


def _gib(b) -> str:
    return f"{b / 2**30:.2f} GiB"


# ---------------------------------------------------------------------------------------------------
# Report


def report(args, target: Target, p: Plan) -> str:
    tc, cfg, _ = _resolved(args, target, p.remat, p.micro_batch_size)
    from gpt2_jax.model import count_params  # noqa: PLC0415

    n = target_mesh(tc.mesh, target.devices).size
    grad_accum = tc.total_batch_size // (tc.micro_batch_size * tc.block_size)
    lines = [
        f"target   {target.spec.name}: {n} x {target.kind} ({target.platform}), mesh "
        f"{','.join(f'{k}:{v}' for k, v in target_mesh(tc.mesh, target.devices).shape.items())}",
        f"model    {args.preset}: {count_params(cfg) / 1e6:.1f}M params, n_layer={cfg.n_layer} n_head={cfg.n_head} "
        f"n_embd={cfg.n_embd} vocab={cfg.vocab_size} T={cfg.block_size} | {cfg.dtype}, attention={cfg.attention}, "
        f"remat={cfg.remat}",
        f"batch    {tc.micro_batch_size} x {tc.block_size} x {grad_accum} accum = {tc.total_batch_size:,} tokens/step",
    ]
    if p.memory:
        m = p.memory
        lines += ["memory per device (XLA's buffer assignment):",
                  f"  arguments    {_gib(m['argument']):>12}  params, AdamW state, batch",
                  f"  outputs      {_gib(m['output']):>12}",
                  f"  aliased    {'-' + _gib(m['alias']):>13}  outputs written over donated arguments",
                  f"  temporaries  {_gib(m['temp']):>12}  activations, gradients, workspace",
                  f"  code         {_gib(m['code']):>12}",
                  f"  total        {_gib(p.need_bytes):>12}  of {_gib(target.budget_bytes)} "
                  f"({target.budget_note})"]
    else:
        lines += [f"compiler refused: {p.error}"]
    if p.fits:
        lines.append(f"FITS, {_gib(target.budget_bytes - p.need_bytes)} to spare "
                     f"({100 * p.need_bytes / target.budget_bytes:.0f}% used)")
    else:
        over = f"{_gib(p.need_bytes - p.budget_bytes)} over" if p.need_bytes else "over"
        lines.append(f"DOES NOT FIT: {over} (needs {_gib(p.need_bytes)} of {_gib(p.budget_bytes)})")
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
        coll = ", ".join(f"{k} x{v['count']} ({_gib(v['bytes'])})" for k, v in sorted(p.collectives.items()))
        lines.append(f"collectives per step per device: {coll or 'none'}")
    return "\n".join(lines)


def search(args, target: Target) -> list[Plan]:
    """For each remat policy (or --remat's alone), the largest micro-batch that fits (largest_micro_batch)."""
    return [largest_micro_batch(args, target, remat) for remat in ((args.remat,) if args.remat else REMATS)]


def largest_micro_batch(args, target: Target, remat: str, log=lambda line: print(line, flush=True)) -> Plan:
    """The plan of the largest micro-batch of (data-parallel devices) x 2^k that fits with this remat policy; a
    Plan with micro_batch_size 0 when none does. Starts from --micro_batch_size (default 16 per device),
    doubling while it fits and halving while it does not: a handful of compiles. train.py
    --micro_batch_size=0 on a GPU or TPU calls this for --target=local."""
    from gpt2_jax import sharding  # noqa: PLC0415

    dp = sharding.data_parallel_size(target_mesh(args.mesh, target.devices))
    start = (args.micro_batch_size or 16 * dp) / dp
    micro, fitting = dp * 2 ** max(0, round(math.log2(max(start, 1)))), None
    tried: dict[int, bool] = {}
    while micro not in tried and dp <= micro <= 2**14:
        p = plan_one(args, target, remat, micro, count_flops=False)
        tried[micro] = p.fits
        if log:
            log(f"  remat={remat:<4} micro_batch_size={micro:<5} {'fits' if p.fits else 'does not fit'} "
                f"({_gib(p.need_bytes)} of {_gib(p.budget_bytes)})")
        if p.fits:
            fitting = p if fitting is None or p.micro_batch_size > fitting.micro_batch_size else fitting
            micro *= 2
        else:
            micro //= 2
    return fitting or Plan(remat, 0, False, 0, target.budget_bytes)


def auto_micro_batch(config: TrainConfig) -> tuple[int, str]:
    """The largest micro-batch of (data-parallel devices) x 2^k whose train step fits the attached devices'
    memory, by the planner (gpt2_jax.plan, --target=local: compiles, runs nothing), and a log line; (0, why)
    when none fits or none divides --total_batch_size, and the trainer's default then applies."""
    from gpt2_jax.config import GPT2_SIZES  # noqa: PLC0415
    from gpt2_jax.sharding import data_parallel_size  # noqa: PLC0415
    from gpt2_jax.training.settings import resolve  # noqa: PLC0415

    argv = ["--target=local", f"--preset={config.preset}", f"--mesh={config.mesh}", f"--remat={config.remat}",
            f"--block_size={config.block_size}", f"--dtype={config.dtype}", f"--attention={config.attention}",
            f"--vocab_size={config.vocab_size}", f"--n_layer={config.n_layer}", f"--n_head={config.n_head}",
            f"--n_embd={config.n_embd}"]
    target = load_target(parse_target("local"))
    mesh = target_mesh(config.mesh, target.devices)
    tc = resolve(config, target.platform, mesh.size)  # the default micro-batch, block size, total batch
    # Plan with grad accumulation where the run accumulates: its scan keeps a float32 gradient accumulator.
    accum = 2 if tc.total_batch_size > tc.micro_batch_size * tc.block_size else 1
    args = parse_args(argv + [f"--grad_accum={accum}"])
    best = largest_micro_batch(args, target, config.remat, log=None)
    micro = best.micro_batch_size
    # The micro-batch must divide a fixed total (--total_batch_size, or 2**19 tokens for GPT-2 sizes); otherwise
    # the total is one micro-batch and follows it.
    fixed_total = config.total_batch_size or (tc.total_batch_size if config.preset in GPT2_SIZES else 0)
    dp = data_parallel_size(mesh)
    while micro > dp and fixed_total and fixed_total % (micro * tc.block_size):
        micro //= 2
    if not micro:
        return 0, (f"micro-batch: none of the sizes tried fits {target.budget_note} with --remat={config.remat}; "
                   f"using the default ({tc.micro_batch_size}); python -m gpt2_jax.plan --target=local --search "
                   f"shows each policy's")
    if fixed_total and fixed_total % (micro * tc.block_size):
        return 0, (f"micro-batch: no size that fits ({best.micro_batch_size} or less) divides --total_batch_size="
                   f"{fixed_total} into micro-batches of {tc.block_size} tokens; using the default "
                   f"({tc.micro_batch_size})")
    need = best.need_bytes if micro == best.micro_batch_size else None
    return micro, (f"micro-batch: {micro}, the largest power of two that fits ("
                   + (f"{need / 2**30:.2f} GiB of {target.budget_bytes / 2**30:.2f} GiB per device, " if need else "")
                   + f"remat={config.remat}; --micro_batch_size=N to choose)")


# ---------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None) -> argparse.Namespace:
    from gpt2_jax.config import PRESETS  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="python -m gpt2_jax.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--target", default="local",
                   help="h100 | h200 | a100 | TPU slice <gen>-<N> (v4-8, v5e-8, v5p-16, v6e-8) | local")
    p.add_argument("--preset", default="gpt2", choices=sorted(PRESETS))
    p.add_argument("--mesh", default="", help="e.g. data:8 or data:2,fsdp:4 (empty: every device on data)")
    p.add_argument("--micro_batch_size", type=int, default=0, help="sequences per micro-step, all devices "
                   "(0: the trainer's default: 16 per device for GPT-2 sizes)")
    p.add_argument("--block_size", type=int, default=0, help="sequence length (0: the preset's)")
    p.add_argument("--remat", default="", choices=("",) + REMATS,
                   help="activation checkpointing (empty: none; with --search: each policy)")
    p.add_argument("--dtype", default="", help="float32 | bfloat16 (empty: the trainer's default)")
    p.add_argument("--attention", default="", help="xla | cudnn (empty: the trainer's default: cudnn on GPU)")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--vocab_size", type=int, default=0, help="0: 50304 for GPT-2 sizes (padded), the preset's")
    p.add_argument("--n_layer", type=int, default=0, help="override the preset (0: the preset's)")
    p.add_argument("--n_head", type=int, default=0, help="override the preset (0: the preset's)")
    p.add_argument("--n_embd", type=int, default=0, help="override the preset (0: the preset's)")
    p.add_argument("--search", action="store_true",
                   help="the largest power-of-two micro-batch that fits, for each remat policy")
    p.add_argument("--json", default="", help="also write the result as JSON to this file")
    p.add_argument("--no_sandbox", action="store_true",
                   help="compile in this process, without the child process and network namespace")
    args = p.parse_args(argv)
    if args.grad_accum < 1:
        p.error(f"--grad_accum={args.grad_accum}: must be >= 1")
    try:
        args.spec = parse_target(args.target)
    except ValueError as e:
        p.error(str(e))
    return args


def sandbox_command(argv: list[str], spec: TargetSpec) -> tuple[list[str], dict]:
    """The command and environment that re-run this CLI for a deviceless compile."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", **{CHILD_ENV: "1"})
    env.update(gpu_flags_env(spec, env))
    # A compile touches no chip: skip libtpu's one-process-per-host lockfile (/tmp/libtpu_lockfile), which
    # another JAX process with libtpu installed (a test session, a notebook) may hold.
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    # libtpu otherwise looks for these in the metadata server and warns when they are missing.
    env.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    env.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    cmd = [sys.executable, "-m", "gpt2_jax.plan", *argv]
    if can_unshare_net():
        cmd = ["unshare", "-n", *cmd]
    return cmd, env


def gpu_flags_env(spec: TargetSpec, env) -> dict:
    """XLA_FLAGS for a GPU target's compile, as train.py --platform=gpu sets them: the recommended flags
    (config.GPU_XLA_FLAGS) unless XLA_FLAGS is set already, so that the plan compiles the program the run will."""
    from gpt2_jax.config import GPU_XLA_FLAGS  # noqa: PLC0415

    if spec.platform != "gpu" or "XLA_FLAGS" in env:
        return {}
    return {"XLA_FLAGS": " ".join(GPU_XLA_FLAGS)}


def xla_flags_line(spec: TargetSpec) -> str:
    """The report's line on the XLA flags of a GPU compile ("" for other targets)."""
    from gpt2_jax.config import GPU_XLA_FLAGS  # noqa: PLC0415

    if spec.platform != "gpu":
        return ""
    flags = os.environ.get("XLA_FLAGS", "")
    which = ("the recommended GPU flags (config.GPU_XLA_FLAGS), as train.py --platform=gpu sets them"
             if flags == " ".join(GPU_XLA_FLAGS) else "from XLA_FLAGS in the environment, as train.py will use")
    return f"XLA_FLAGS  {flags or '(empty: XLA defaults)'} ({which})"


def can_unshare_net() -> bool:
    """Whether this machine lets an unprivileged process take a private network namespace."""
    if not shutil.which("unshare"):
        return False
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if why := missing_extra(args.spec):
        print(f"error: {why}", file=sys.stderr)
        return 2
    if args.spec.deviceless and not args.no_sandbox and not os.environ.get(CHILD_ENV):
        cmd, env = sandbox_command(argv, args.spec)
        if cmd[0] != "unshare":
            print("(no private network namespace here: compiling with TPU_SKIP_MDS_QUERY=1 only)", file=sys.stderr)
        return subprocess.run(cmd, env=env).returncode
    os.environ.update(gpu_flags_env(args.spec, os.environ))  # --no_sandbox: before the GPU plugin starts
    try:
        target = load_target(args.spec)
    except MissingExtra as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return run(args, target)
    except ValueError as e:  # bad flags: micro-batch vs devices, mesh, preset sizes
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args, target: Target) -> int:
    if line := xla_flags_line(args.spec):
        print(line)
    if args.search:
        print(f"searching micro-batch sizes on {args.spec.name} ({target.kind}), preset {args.preset}:")
        best = search(args, target)
        print(f"\n{'remat':<6} {'largest micro-batch that fits':>30} {'memory per device':>24}")
        for b in best:
            size = str(b.micro_batch_size) if b.fits else "none"
            print(f"{b.remat:<6} {size:>30} {_gib(b.need_bytes) + ' of ' + _gib(b.budget_bytes):>24}")
        result = {"target": args.spec.name, "search": [dataclasses.asdict(b) for b in best]}
        fits = any(b.fits for b in best)
    else:
        tc, _, _ = _resolved(args, target, args.remat or "none", args.micro_batch_size)
        p = plan_one(args, target, args.remat or "none", tc.micro_batch_size)
        print(report(args, target, p))
        result = {"target": args.spec.name, "device_kind": target.kind, "num_devices": target_mesh(args.mesh, target.devices).size,
                  **dataclasses.asdict(p)}
        fits = p.fits
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
