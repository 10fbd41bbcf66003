"""Where the time goes: the operations that took the most device time in a `jax.profiler` trace.

    python benchmarks/trace_top.py OUT_DIR/profile [--top 10]

Reads the Chrome-trace JSON (`plugins/profile/*/*.trace.json.gz`) that jax.profiler writes beside its xplane
file (train.py --profile_steps, benchmarks/train_step.py --profile). On a GPU or TPU the operations are the events
of the device's own timelines (processes named `/device:...`: kernels on GPU streams, XLA ops on a TPU); on a CPU,
the XLA operations that the compute threads ran (runtime bookkeeping such as waits and rendezvous left out).
Prints a table of the top operations by total time (their share of all device time, call count, mean), then one
JSON line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

# CPU timelines: XLA:CPU's compute threads; and events there that are the runtime, not an operation.
CPU_COMPUTE_THREAD = re.compile(r"^tf_XLAEigen")
RUNTIME = re.compile(r"^(ThunkExecutor::|Rendezvous|Wait[ :]|\$)")


def load_events(folder: Path) -> list[dict]:
    traces = sorted(Path(folder).glob("**/*.trace.json.gz"))
    if not traces:
        raise FileNotFoundError(f"{folder}: no *.trace.json.gz under it; pass the folder jax.profiler wrote "
                                f"(train.py --profile_steps writes OUT_DIR/profile)")
    events = []
    for path in traces:  # one per host
        events += [e for e in json.loads(gzip.decompress(path.read_bytes()))["traceEvents"] if isinstance(e, dict)]
    return events


def device_ops(events: list[dict]) -> tuple[str, list[dict]]:
    """The timed events that are device operations, and where they came from."""
    process_names = {e.get("pid"): e.get("args", {}).get("name", "") for e in events
                     if e.get("ph") == "M" and e.get("name") == "process_name"}
    timed = [e for e in events if e.get("ph") == "X" and "dur" in e]
    devices = {pid for pid, name in process_names.items() if name.startswith("/device:")}
    if devices:
        return "device timelines", [e for e in timed if e.get("pid") in devices]
    thread_names = {(e.get("pid"), e.get("tid")): e.get("args", {}).get("name", "") for e in events
                    if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return "XLA:CPU compute threads", [e for e in timed
                                       if CPU_COMPUTE_THREAD.match(thread_names.get((e.get("pid"), e.get("tid")), ""))
                                       and not RUNTIME.match(e.get("name", ""))]


def top_ops(folder: Path, n: int = 10) -> dict:
    """{"source", "total_ms", "top": [{"op", "ms", "share", "calls", "mean_us"}, ...]}: largest total time first."""
    source, ops = device_ops(load_events(folder))
    total, calls = defaultdict(float), defaultdict(int)
    for e in ops:
        total[e["name"]] += e["dur"]  # microseconds
        calls[e["name"]] += 1
    whole = sum(total.values())
    rows = [{"op": name, "ms": us / 1e3, "share": us / whole if whole else 0.0, "calls": calls[name],
             "mean_us": us / calls[name]} for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:n]]
    return {"source": source, "total_ms": whole / 1e3, "top": rows}


def table(result: dict) -> str:
    lines = [f"top operations by time ({result['source']}; {result['total_ms']:.1f} ms in all):",
             f"{'ms':>10} {'share':>6} {'calls':>6} {'mean us':>9}  operation"]
    lines += [f"{r['ms']:>10.2f} {r['share']:>6.1%} {r['calls']:>6} {r['mean_us']:>9.1f}  {r['op'][:90]}"
              for r in result["top"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="the folder jax.profiler wrote (e.g. OUT_DIR/profile)")
    p.add_argument("--top", type=int, default=10, help="how many operations")
    args = p.parse_args(argv)
    try:
        result = top_ops(args.folder, args.top)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
