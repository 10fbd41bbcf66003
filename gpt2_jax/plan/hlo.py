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
    out: dict[str, dict] = {}
    for kind, trips, nbytes, _ in _collective_ops(hlo):
        row = out.setdefault(kind, {"count": 0, "bytes": 0})
        row["count"] += trips
        row["bytes"] += trips * nbytes
    return out


# The bytes one device sends for a collective whose result is R bytes, in a group of n devices, by the
# bandwidth-optimal (ring) algorithms: what a link must carry at least, whatever the algorithm.
_SEND_FACTOR = {
    "all-gather": lambda n: (n - 1) / n,  # R is the gathered array: each device sends its 1/n to the others
    "all-reduce": lambda n: 2 * (n - 1) / n,  # a reduce-scatter, then an all-gather, of R
    "reduce-scatter": lambda n: n - 1,  # R is this device's 1/n of the reduced array
    "all-to-all": lambda n: (n - 1) / n,  # keeps its own 1/n
    "collective-permute": lambda n: 1,  # sends its operand (the result's size) to one peer
}


def collective_sends(hlo: str) -> dict:
    """Bytes each device sends per step, by collective kind: {"all-reduce": bytes, ...}. The ops and loop
    trips of `collectives`, each op's result bytes times its ring algorithm's factor for its group of n devices
    (_SEND_FACTOR: all-reduce 2(n-1)/n, all-gather and all-to-all (n-1)/n, reduce-scatter n-1, collective-permute
    1). A group of one device sends nothing."""
    out: dict[str, float] = {}
    for kind, trips, nbytes, n in _collective_ops(hlo):
        out[kind] = out.get(kind, 0.0) + (trips * nbytes * _SEND_FACTOR[kind](n) if n > 1 else 0.0)
    return out


def _group_size(line: str, num_partitions: int) -> int:
    """Devices in each replica group of a collective: `{{0,1,2,3},{4,5,6,7}}` (4), the iota form `[2,4]<=[8]`
    (4), the mesh form `mesh['axis_0'=2,'axis_1'=4] {'axis_1'}` (4: the sizes of the named axes), or none
    (`{}`: every device). A collective-permute's pairs are no group: 2."""
    if "source_target_pairs=" in line:
        return 2
    if m := re.search(r"\breplica_groups=\{\{([\d,]*)\}", line):
        return len(m.group(1).split(","))
    if m := re.search(r"\breplica_groups=\[[\d,]*?(\d+)\]<=", line):
        return int(m.group(1))
    if m := re.search(r"\breplica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line):
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes.get(a, 1)) for a in re.findall(r"'([^']+)'", m.group(2)))
    return num_partitions


def _computations(hlo: str) -> tuple[dict[str, list[str]], list[str], str | None]:
    """The computations of an HLO text: ({name: instruction lines}, names in print order, the entry's name)."""
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
    return comps, order, entry


def _multiplicities(comps, order, entry) -> tuple[dict[str, int], dict[str, int]]:
    """How many times each computation runs per execution of the entry (loop trips multiplied through), with
    the trips taken (`trips`) and with each loop body once (`once`)."""
    trips, once = dict.fromkeys(comps, 0), dict.fromkeys(comps, 0)
    trips[entry] = once[entry] = 1
    for name in reversed(order):  # callers print after their callees: walk from the entry down
        if not once[name]:
            continue
        for line in comps[name]:
            n = _trip_count(line, comps)
            for key, callee in re.findall(r"\b(body|condition|calls|to_apply|branch_computations)=\{?%?([\w.\-]+)",
                                          line):
                if callee in trips:
                    trips[callee] += trips[name] * (n if key == "body" else 1)
                    once[callee] += once[name]
    return trips, once


def _collective_ops(hlo: str):
    """(kind, runs per step, result bytes, group size) of each collective op, each op once (see `collectives`)."""
    comps, order, entry = _computations(hlo)
    if entry is None:
        return
    mult = _multiplicities(comps, order, entry)[0]
    partitions = re.search(r"\bnum_partitions=(\d+)", hlo)
    num_partitions = int(partitions.group(1)) if partitions else 1
    pattern = re.compile(r"=\s*(\(.*?\)|[\w]+\[[\d,]*\](?:\{[^}]*\})?)\s+(" + "|".join(COLLECTIVES)
                         + r")(-done)?\(")
    seen = set()  # (kind, channel_id, result dims, replica groups) of the collectives counted
    for name, lines in comps.items():
        defs = {d.group(1): ln for ln in lines if (d := re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=", ln))}
        for line in lines:
            if (m := pattern.search(line)) and mult[name]:
                if channel := re.search(r"\bchannel_id=(\d+)", line):
                    groups = re.search(r"\breplica_groups=(\S+)", line)
                    dims = re.sub(r"\{[^}]*\}", "", m.group(1))  # layouts differ between the writes (S(1))
                    key = (m.group(2), channel.group(1), dims, groups and groups.group(1))
                    if key in seen:
                        continue
                    seen.add(key)
                if m.group(3) and (start := re.search(r"-done\(\s*(?:\S+\s+)?%([\w.\-]+)", line)):
                    line = defs.get(start.group(1), line)  # an async pair's groups are written on its -start
                yield m.group(2), mult[name], _shape_bytes(m.group(1)), _group_size(line, num_partitions)


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


# Ops that move no data in HBM themselves: structure, aliases, and the loops and calls whose bodies count apart.
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "iota"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\](\{[^}]*\})?")


def _hbm_bytes(shape: str) -> int:
    """Bytes of the arrays of an HLO type that live in HBM: those whose layout names no other memory space
    (`S(1)`: TPU's on-chip vector memory, where XLA's memory-space assignment keeps and prefetches buffers)."""
    return sum(_SIZES[t] * math.prod(int(d) for d in dims.split(",") if d)
               for t, dims, layout in _ARRAY.findall(shape) if t in _SIZES and "S(" not in (layout or ""))


def hbm_traffic(hlo: str) -> tuple[int, int]:
    """Bytes each device reads and writes in HBM per step, estimated from an optimized HLO text: (with the
    loops' trips, with each loop body once).

    Each instruction outside fusions counts its operands and its result in HBM (not those in another memory
    space, `S(1)`), as XLA's cost analysis counts bytes accessed; a fusion's operand that the fusion only slices
    counts the slices (a layer's weights out of the stacked layers), and a fusion that updates a buffer in place
    (dynamic-update-slice) counts the update, not the buffer. An async pair counts its operands at the -start
    and its result at the -done; a loop's condition (a scalar compare) counts nothing. Loops multiply by their trip
    counts (`_trip_count`); the compiler's own count
    (cost_analysis' "bytes accessed") takes each loop body once, as the second figure does. An estimate: what
    stays in on-chip memory inside a fusion is not counted, caches are not modelled.
    """
    total = total_once = 0
    for _, trips, once, _, nbytes in _traffic(hlo):
        total += trips * nbytes
        total_once += once * nbytes
    return total, total_once


def _traffic(hlo: str):
    """(instruction name, runs per step, runs with each loop body once, op, HBM bytes per run) of each
    instruction outside fusions (see hbm_traffic)."""
    comps, order, entry = _computations(hlo)
    if entry is None:
        return
    trips, once = _multiplicities(comps, order, entry)
    control = {entry} | {c for ln in hlo.splitlines()
                         for c in re.findall(r"\b(?:body|branch_computations)=\{?%?([\w.\-]+)", ln)}
    control |= {c for ln in hlo.splitlines() if " call(" in ln for c in re.findall(r"\bto_apply=%?([\w.\-]+)", ln)}
    for name in control & set(comps):
        lines = comps[name]
        types = {m.group(1): m.group(2) for ln in lines if (m := _INSTRUCTION.match(ln))}
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m or m.group(3) in _NO_TRAFFIC or not trips[name] or '"AllocateBuffer"' in line:
                continue  # XLA:TPU's AllocateBuffer custom call only reserves a buffer
            op, args = m.group(3), m.group(4)
            operands = re.findall(r"%([\w.\-]+)", args.split("), ")[0] if "), " in args else args)
            if op == "slice-start":  # reads the slice: its result, less the operand it carries along
                nbytes = max(0, _shape_bytes(m.group(2)) - sum(_shape_bytes(types.get(o, "")) for o in operands))
                nbytes *= not any("S(" in types.get(o, "") for o in operands)
            elif op.endswith("-start"):
                nbytes = sum(_hbm_bytes(types.get(o, "")) for o in operands)
            elif op.endswith("-done"):
                nbytes = _hbm_bytes(m.group(2))
            elif op == "fusion" and (fused := re.search(r"\bcalls=%?([\w.\-]+)", line)) and fused.group(1) in comps:
                nbytes = _fusion_bytes(comps[fused.group(1)], [types.get(o, "") for o in operands], m.group(2))
            else:
                nbytes = _hbm_bytes(m.group(2)) + sum(_hbm_bytes(types.get(o, "")) for o in operands)
            yield m.group(1), trips[name], once[name], op, nbytes


def _fusion_bytes(body: list[str], operand_types: list[str], result: str) -> int:
    """HBM bytes of one fusion: its operands (only the slices, where the fused computation only slices one) and
    its results (only the update, where a result updates a buffer in place: a dynamic-update-slice, alone or in
    the tuple of a multi-output fusion, possibly behind a bitcast; the buffer is then not read either)."""
    defs, params, uses = {}, {}, {}
    root = None
    for line in body:
        if not (m := _INSTRUCTION.match(line)):
            continue
        ops = re.findall(r"%([\w.\-]+)", m.group(4).split("), ")[0])
        defs[m.group(1)] = (m.group(3), m.group(2), ops)
        if m.group(3) == "parameter" and (i := re.match(r"\s*(\d+)", m.group(4))):
            params[m.group(1)] = int(i.group(1))
        for k, o in enumerate(ops):
            uses.setdefault(o, []).append((m.group(3), k, m.group(2)))
        if line.lstrip().startswith("ROOT"):
            root = m.group(1)

    def through_bitcasts(name):
        while name in defs and defs[name][0] in ("bitcast", "copy") and defs[name][2]:
            name = defs[name][2][0]
        return name

    outputs = defs[root][2] if root in defs and defs[root][0] == "tuple" else [root]
    arrays = _ARRAY.findall(result)
    in_place, nbytes = set(), 0
    for k, (dtype, dims, layout) in enumerate(arrays):
        if dtype not in _SIZES or "S(" in (layout or ""):
            continue
        full = _SIZES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
        out = through_bitcasts(outputs[k]) if k < len(outputs) else None
        if out in defs and defs[out][0] == "dynamic-update-slice" and len(defs[out][2]) > 1:
            buffer, update = through_bitcasts(defs[out][2][0]), defs[out][2][1]
            in_place.add(buffer)
            full = min(full, _hbm_bytes(re.sub(r"S\(\d+\)", "", defs[update][1])) if update in defs else full)
        nbytes += full
    for pname, i in params.items():
        if i >= len(operand_types) or pname in in_place:
            continue
        users = uses.get(pname, [])
        if users and all(op in ("dynamic-slice", "slice") and k == 0 for op, k, _ in users):
            nbytes += sum(_hbm_bytes(t) if "S(" not in operand_types[i] else 0 for _, _, t in users)
        else:
            nbytes += _hbm_bytes(operand_types[i])
    return nbytes
