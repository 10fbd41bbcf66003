"""Reading a compiled program's text: its custom calls (the attention kernel), its collectives, and the
compiler's out-of-memory refusal. Pure text parsing: no JAX here."""

from __future__ import annotations

import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def custom_calls(hlo: str) -> list[str]:
    """The custom-call targets of an optimized HLO text, sorted, each once."""
    return sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))


def attention_kernel(custom_calls: list[str], implementation: str) -> str:
    """The attention kernel in a compiled program, from its custom calls."""
    fmha = [c for c in custom_calls if c.startswith("__cudnn$fmha")]
    if fmha:
        return f"cuDNN flash attention ({', '.join(fmha)})"
    if "tpu_custom_call" in custom_calls and implementation == "splash":
        return "Pallas TPU splash attention (tpu_custom_call), per shard"
    if implementation == "splash":
        return "XLA -- no Pallas kernel (tpu_custom_call) in the program!"
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
    known_trip_count; XLA:TPU does not, and `_trip_count` reads the loop's condition), so an all-gather in the
    layer scan counts n_layer times. One collective written
    several times counts once: XLA's TPU backend runs a collective overlapped with compute as fusions around
    `AsyncCollectiveStart` / `AsyncCollectiveDone` custom calls, and writes the same op (one channel_id, result
    dims and replica groups; the layouts may differ) in the start fusion, the done fusion and the compute fused
    with it. The channel_id alone is no key: the collectives written out in a shard_map all get channel_id 1.
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
            trip = _trip_count(line, comps)
            for key, callee in re.findall(r"\b(body|condition|calls|to_apply|branch_computations)=\{?%?([\w.\-]+)",
                                          line):
                if callee in mult:
                    mult[callee] += mult[name] * (trip if key == "body" else 1)
    out: dict[str, dict] = {}
    pattern = re.compile(r"=\s*(\(.*?\)|[\w]+\[[\d,]*\](?:\{[^}]*\})?)\s+(" + "|".join(COLLECTIVES)
                         + r")(-done)?\(")
    seen = set()  # (kind, channel_id, result dims, replica groups) of the collectives counted
    for name, lines in comps.items():
        for line in lines:
            if (m := pattern.search(line)) and mult[name]:
                if channel := re.search(r"\bchannel_id=(\d+)", line):
                    groups = re.search(r"\breplica_groups=(\S+)", line)
                    dims = re.sub(r"\{[^}]*\}", "", m.group(1))  # layouts differ between the writes (S(1))
                    key = (m.group(2), channel.group(1), dims, groups and groups.group(1))
                    if key in seen:
                        continue
                    seen.add(key)
                row = out.setdefault(m.group(2), {"count": 0, "bytes": 0})
                row["count"] += mult[name]
                row["bytes"] += mult[name] * _shape_bytes(m.group(1))
    return out


def _trip_count(line: str, comps: dict[str, list[str]]) -> int:
    """How many times the while op on `line` runs its body: XLA's known_trip_count where it writes one (CPU,
    GPU); else read off its condition (XLA:TPU writes no trip counts): `i < N` against a constant N, the
    counter starting at 0 and stepping by 1 as in the loops of a scan and of XLA's windowed matmuls; 1 for
    anything else (and for a line that is not a while op)."""
    if known := re.search(r'"known_trip_count":\{"n":"(\d+)"', line):
        return int(known.group(1))
    condition = re.search(r"\bcondition=%?([\w.\-]+)", line)
    body = comps.get(condition.group(1), []) if condition and " while(" in line else []
    constants = dict(re.findall(r"%([\w.\-]+) = s32\[\]\S* constant\((\d+)\)", "\n".join(body)))
    root = next((ln for ln in body if "ROOT" in ln and "compare(" in ln and "direction=LT" in ln), "")
    bound = re.search(r"compare\([^)]*%([\w.\-]+)\)", root)
    return int(constants[bound.group(1)]) if bound and bound.group(1) in constants else 1


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


def fsdp_traffic(collectives: dict) -> int:
    """Bytes per step of FSDP's weight gathers: all-gathers, and the collective-permutes that XLA's TPU
    backend turns them into (rings of neighbour exchanges), as `collectives` counts them."""
    return sum(collectives.get(k, {}).get("bytes", 0) for k in ("all-gather", "collective-permute"))
