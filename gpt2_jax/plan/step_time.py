"""The step-time floor of a plan: how fast one optimizer step could be on its target at the chips' datasheet
peaks, from what the compile counted. A FLOOR: the step cannot be faster than this, and in practice is slower.
No JAX here.

    compute_s  FLOPs per step (6N + 12LHQT, metrics.flops_per_token: the MFU convention the trainer logs) /
               (chips x peak dense bf16 FLOP/s per chip, metrics.PEAK_BF16_FLOPS)
    comm_s     bytes each chip sends per step (hlo.collective_sends: the collectives' bytes, loop trips counted,
               by the ring algorithms' factors) / what one chip sends per second over its links (hardware.
               CHIP_BANDWIDTH: ICI per TPU generation, NVLink per GPU; one direction, half the vendors'
               bidirectional figure). 0 on one chip.
    memory_s   HBM bytes each chip reads and writes per step (hlo.hbm_traffic, an estimate from the compiled
               program with the loops' trips) / HBM bandwidth per chip; only where the compiler reports bytes
               accessed (TPU compiles; None for GPU compiles, whose cost analysis is empty)

The MFU ceiling these imply: with overlap, compute_s / max(compute_s, comm_s, memory_s); without,
compute_s / (compute_s + comm_s + memory_s). `compute_xla_s` is the same division for the FLOPs XLA counts
(layer norms, softmax, AdamW, remat's recomputation): shown, not used in the ceilings.
"""

from __future__ import annotations

from gpt2_jax.metrics import FLOPS_CONVENTION, peak_flops
from gpt2_jax.plan.hardware import CHIP_BANDWIDTH, ChipBandwidth
from gpt2_jax.plan.record import Plan

GPT2_STEPS_10B = 19073  # the GPT-2 recipe: 10B tokens at 2**19 tokens per step
PEAK_SOURCE = "peak dense bf16 FLOP/s per chip from the vendors' datasheets (gpt2_jax.metrics.PEAK_BF16_FLOPS)"


def step_time(p: Plan, chips: int, peak: float | None, bandwidth: ChipBandwidth | None) -> dict | None:
    """The floor of one step of plan `p` on `chips` chips of peak `peak` FLOP/s and `bandwidth`; None where the
    peak or the bandwidths are unknown (a CPU), or the plan holds no compile (refused)."""
    if not peak or bandwidth is None or chips < 1 or not p.memory:
        return None
    compute = p.flops_6n / (chips * peak)
    sent = float(sum(p.collective_sends.values()))
    comm = sent / bandwidth.link if chips > 1 else 0.0
    memory = p.hbm_bytes / bandwidth.hbm if p.bytes_accessed is not None and p.hbm_bytes is not None else None
    parts = {"compute": compute, "communication": comm, **({"memory": memory} if memory is not None else {})}
    floor, serial = max(parts.values()), sum(parts.values())
    return {
        "compute_s": compute,
        "comm_s": comm,
        "memory_s": memory,
        "floor_s": floor,  # max of the three: each overlapped with the others
        "floor_no_overlap_s": serial,  # their sum: none overlapped
        "mfu_ceiling": compute / floor if floor > 0 else None,
        "mfu_ceiling_no_overlap": compute / serial if serial > 0 else None,
        "bound": max(parts, key=parts.get),
        "compute_xla_s": p.flops_per_step / (chips * peak) if p.flops_per_step else None,
        "flops": p.flops_6n,
        "flops_convention": FLOPS_CONVENTION,
        "chips": chips,
        "peak_flops_per_chip": peak,
        "comm_bytes_per_chip": sent,
        "link_bytes_per_s": bandwidth.link,
        "link": f"{bandwidth.link_name}, {bandwidth.link / 1e9:g} GB/s per chip per direction",
        "memory_bytes_per_chip": p.hbm_bytes if memory is not None else None,
        "hbm_bytes_per_s": bandwidth.hbm,
        "compiler_bytes_accessed": p.bytes_accessed,  # XLA's count per chip, each loop body once
        "sources": [PEAK_SOURCE, bandwidth.source],
    }


def plan_step_time(p: Plan, chip: str, device_kind: str, chips: int) -> dict | None:
    """`step_time` for plan `p` on `chips` chips of `chip` (a hardware.CHIP_BANDWIDTH key; "" if unknown) whose
    JAX device kind is `device_kind` (its peak FLOP/s, metrics.peak_flops)."""
    return step_time(p, chips, peak_flops(device_kind), CHIP_BANDWIDTH.get(chip))


def describe(st: dict | None) -> list[str]:
    """The report's lines on the floor."""
    if st is None:
        return []

    def ms(s):
        return "-" if s is None else f"{s * 1e3:.2f} ms"

    mem_note = (f"{st['memory_bytes_per_chip'] / 2**30:.2f} GiB read and written per chip (estimated from the "
                f"compiled program, loops' trips counted; XLA's bytes accessed, each loop body once: "
                f"{st['compiler_bytes_accessed'] / 2**30:.2f} GiB) / {st['hbm_bytes_per_s'] / 1e12:.3g} TB/s HBM"
                if st["memory_s"] is not None else "not reported: this compiler gives no bytes accessed (GPU)")
    xla = f"; the FLOPs XLA counts: {ms(st['compute_xla_s'])}" if st["compute_xla_s"] else ""
    lines = [
        f"step-time FLOOR (the step cannot be faster than this; datasheet peaks, nothing measured): "
        f"{ms(st['floor_s'])} overlapped, {ms(st['floor_no_overlap_s'])} not; {st['bound']}-bound",
        f"  compute  {ms(st['compute_s']):>12}  {st['flops']:.4g} FLOPs ({st['flops_convention']}) / "
        f"({st['chips']} x {st['peak_flops_per_chip'] / 1e12:g} TFLOP/s){xla}",
        f"  comm     {ms(st['comm_s']):>12}  "
        + (f"{st['comm_bytes_per_chip'] / 2**30:.3f} GiB sent per chip (collectives, ring algorithms) / {st['link']}"
           if st["chips"] > 1 else "one chip: no communication"),
        f"  memory   {ms(st['memory_s']):>12}  {mem_note}",
        f"  MFU ceiling {st['mfu_ceiling']:.1%} with overlap, {st['mfu_ceiling_no_overlap']:.1%} without",
        "  sources: " + "; ".join(st["sources"]),
    ]
    return lines
