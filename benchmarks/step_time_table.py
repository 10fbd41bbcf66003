"""docs/step-time.md's table: the planner's step-time floor of the GPT-2 124M recipe on each target.

One deviceless compile per target (`python -m gpt2_jax.plan ... --json=FILE`, the commands the page lists), its
figures stored as one JSON line in benchmarks/step_time.jsonl, so that an interrupted run goes on where it
stopped; then a markdown table of them.

    python benchmarks/step_time_table.py --compile          # compile the targets not in the file yet
    python benchmarks/step_time_table.py --compile --redo   # compile every target again
    python benchmarks/step_time_table.py --compile --redo v5e-8 h100   # only these again
    python benchmarks/step_time_table.py --markdown         # the page's table, from the file

`--markdown` compiles nothing and imports no JAX: it prints the table that docs/step-time.md holds between its
`step-time table` marker comments (tests/test_docs.py checks that the page holds exactly this).

A compile takes 1-5 minutes on 2 cores for a TPU slice, about 15 s for a GPU. A compile that is refused, or
that does not fit, stops the run with the planner's error: its micro-batch belongs to a smaller setting.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

from gpt2_jax.plan.step_time import GPT2_STEPS_10B  # no JAX; after the checkout is on sys.path

ROWS = ROOT / "benchmarks" / "step_time.jsonl"  # the rows of docs/step-time.md's table

# target -> (mesh, micro-batch, gradient accumulation): 2**19 tokens per step of T=1024. On a TPU slice the
# largest micro-batch that fitted under FSDP in the search before the GELU's backward kept only its input (after
# it, the same but on v5p-8, where 512 fits: benchmarks/tpu_table.jsonl); on a GPU one that fits its memory.
TARGETS = {
    "v5e-8": ("fsdp:8", 128, 4),
    "v6e-8": ("fsdp:8", 256, 2),
    "v5p-8": ("fsdp:4", 256, 2),
    "v4-8": ("fsdp:4", 128, 4),
    "h100": ("data:1", 32, 16),
    "h200": ("data:1", 64, 8),
    "a100": ("data:1", 32, 16),
}

# The figures of the planner's `step_time` that the table shows.
KEPT = ("compute_s", "comm_s", "comm_bytes_per_chip", "memory_s", "memory_bytes_per_chip", "floor_s",
        "floor_no_overlap_s", "mfu_ceiling", "mfu_ceiling_no_overlap", "bound")


def flags(target: str) -> list[str]:
    """The planner's flags for `target`, as docs/step-time.md lists them."""
    mesh, micro, accum = TARGETS[target]
    return [f"--target={target}", "--preset=gpt2", f"--mesh={mesh}", "--remat=none", f"--micro_batch_size={micro}",
            f"--grad_accum={accum}"]


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def compile_target(target: str) -> dict:
    """One deviceless compile of `target`: the row of the table, with the command, the date and the versions."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        cmd = [sys.executable, "-m", "gpt2_jax.plan", *flags(target), f"--json={out}"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        plan = json.loads(out.read_text()) if out.is_file() else None
    if plan is None or not plan["fits"] or plan["step_time"] is None:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{(r.stderr or r.stdout)[-2000:]}")
    mesh, micro, accum = TARGETS[target]
    return {"target": target, "device_kind": plan["device_kind"], "chips": plan["num_devices"], "mesh": mesh,
            "micro_batch_size": micro, "grad_accum": accum, "need_bytes": plan["need_bytes"],
            **{k: plan["step_time"][k] for k in KEPT},
            "command": " ".join(["python -m gpt2_jax.plan", *flags(target), f"--json={target}.json"]),
            "date": datetime.date.today().isoformat(), "seconds": round(seconds),
            "jax": version("jax"), "libtpu": version("libtpu")}


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (none if it does not exist yet)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def write_rows(path: Path, rows: dict[str, dict]) -> None:
    """The rows, one line each, in the order of TARGETS."""
    path.write_text("".join(json.dumps(rows[t]) + "\n" for t in TARGETS if t in rows))


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms"


def hours(seconds: float) -> str:
    """The time of the recipe's 10B tokens at `seconds` a step."""
    return f"{seconds * GPT2_STEPS_10B / 3600:.2f} h"


def markdown(rows: list[dict]) -> str:
    """docs/step-time.md's table: one line per target."""
    head = ["target", "chips", "mesh", "micro-batch x accum", "compute", "communication", "memory traffic (est.)",
            "floor, overlapped", "floor, not", "MFU ceiling (overlapped / not)", "bound", "10B tokens at the floor",
            "planner's memory per chip"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        comm = (f"{r['comm_s'] * 1e3:.1f} ms ({r['comm_bytes_per_chip'] / 2**30:.2f} GiB)" if r["chips"] > 1
                else "0 (1 chip)")
        memory = ("n/a (GPU)" if r["memory_s"] is None
                  else f"{ms(r['memory_s'])} ({r['memory_bytes_per_chip'] / 2**30:.0f} GiB)")
        cells = [r["target"], f"{r['chips']} x {r['device_kind']}", r["mesh"],
                 f"{r['micro_batch_size']} x {r['grad_accum']}", ms(r["compute_s"]), comm, memory,
                 f"**{ms(r['floor_s'])}**", ms(r["floor_no_overlap_s"]),
                 f"{r['mfu_ceiling']:.0%} / {r['mfu_ceiling_no_overlap']:.0%}", r["bound"],
                 f"**{hours(r['floor_s'])}** / {hours(r['floor_no_overlap_s'])}",
                 f"{r['need_bytes'] / 2**30:.1f} GiB"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="*", metavar="TARGET",
                   help=f"the targets to compile (default: all of {', '.join(TARGETS)})")
    p.add_argument("--compile", action="store_true", help="compile the targets missing from --out")
    p.add_argument("--redo", action="store_true", help="with --compile: compile the targets in --out again too")
    p.add_argument("--markdown", action="store_true", help="print docs/step-time.md's table from --out; compiles "
                                                           "nothing")
    p.add_argument("--out", type=Path, default=ROWS, help=f"the JSON-lines file (default: {ROWS.relative_to(ROOT)})")
    args = p.parse_args()
    if args.markdown == args.compile:
        p.error("pass one of --compile and --markdown")
    if unknown := [t for t in args.targets if t not in TARGETS]:
        p.error(f"no row for {', '.join(unknown)}; the targets are {', '.join(TARGETS)}")
    if args.markdown:
        print(markdown(read_rows(args.out)))
        return
    rows = {r["target"]: r for r in read_rows(args.out)}
    for target in args.targets or TARGETS:
        if target in rows and not args.redo:
            print(f"{target}: in {args.out}, skipped (--redo compiles it again)", flush=True)
            continue
        rows[target] = compile_target(target)
        print(json.dumps(rows[target]), flush=True)
        write_rows(args.out, rows)


if __name__ == "__main__":
    main()
