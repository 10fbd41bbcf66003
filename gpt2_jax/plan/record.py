"""The planner's record of one compile (Plan) and its constants: no JAX, so that the CLI's parent process and
the report read plans without loading the compiler."""

from __future__ import annotations

import dataclasses

REMATS = ("none", "dots", "full")  # config.REMAT in the order of the memory they keep: --search tries each


@dataclasses.dataclass
class Plan:
    """What the compiler says about one configuration on one target (bytes are per device)."""

    remat: str
    micro_batch_size: int
    fits: bool
    need_bytes: int  # arguments + outputs - aliased + temporaries + code
    budget_bytes: int
    memory: dict = dataclasses.field(default_factory=dict)  # argument/output/alias/temp/code bytes
    error: str = ""  # the compiler's RESOURCE_EXHAUSTED message, if it refused (or the arithmetic's, see below)
    largest_buffers: list = dataclasses.field(default_factory=list)  # if it refused: "size: shapes", largest first
    attention: str = ""
    custom_calls: list = dataclasses.field(default_factory=list)
    flops_per_step: float | None = None
    flops_source: str = ""
    compiled_flops: float | None = None  # the compiled program's own count per device (TPU): loops once
    flops_6n: float = 0.0  # 6N + 12LHQT per token x tokens per step (metrics.flops_per_token)
    collectives: dict = dataclasses.field(default_factory=dict)  # kind -> {"count", "bytes"} per step
    collective_sends: dict = dataclasses.field(default_factory=dict)  # kind -> bytes each device sends per step
    collective_minimum: dict = dataclasses.field(default_factory=dict)  # what the mesh must move (minimum_collectives)
    bytes_accessed: float | None = None  # the compiler's count per device (TPU), each loop body once
    hbm_bytes: float | None = None  # HBM bytes per device per step, estimated from the program (hlo.hbm_traffic)
    step_time: dict | None = None  # the step-time floor on the target (step_time.step_time)
    suggestions: list = dataclasses.field(default_factory=list)
    by_arithmetic: bool = False  # refused before compiling: the params and AdamW state alone do not fit


STATE_BYTES_PER_PARAM = 12  # float32 params + AdamW's two float32 moments: what the arguments hold at least


def minimum_collectives(n_params: int, mesh_shape: dict, grad_accum: int, compute_bytes: int) -> dict:
    """The collective bytes per device and optimizer step that a mesh cannot do without, counted as the planner
    counts (each collective's result): {what: bytes}.

    - data parallelism (`data` > 1): every float32 gradient summed over the replicas once a step, on each device's
      1/(fsdp x tensor) of it: 4 x params / (fsdp x tensor);
    - FSDP (`fsdp` > 1), ZeRO-3: at each micro-step the parameters gathered for the forward and again for the
      backward pass, in the compute dtype (2 x params x its bytes; remat recomputes within the backward's), and
      the gradient reduce-scattered (its 1/fsdp in float32).
    Tensor parallelism's activation reductions depend on the batch and are not counted."""
    fsdp, tensor = mesh_shape.get("fsdp", 1), mesh_shape.get("tensor", 1)
    out = {}
    if mesh_shape.get("data", 1) > 1:
        out["data: gradient all-reduce, once"] = 4 * n_params // (fsdp * tensor)
    if fsdp > 1:
        out["fsdp: parameter gathers, forward + backward per micro-step"] = (
            grad_accum * 2 * compute_bytes * n_params // tensor)
        out["fsdp: gradient reduce-scatter per micro-step"] = grad_accum * 4 * n_params // (fsdp * tensor)
    return out
