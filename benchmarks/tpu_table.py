"""The "Will it fit?" table for Cloud TPU slices: for each slice and GPT-2 size, the largest micro-batch that fits
per chip, at which remat, under FSDP over every chip. Deviceless compiles (the planner's `--search`), one row at
a time, appended to a JSON-lines file so that an interrupted run goes on where it stopped; then a markdown table.

    python benchmarks/tpu_table.py --out benchmarks/tpu_table.jsonl          # compile (hours on 2 cores)
    python benchmarks/tpu_table.py --out benchmarks/tpu_table.jsonl --table  # print the table of what is done
    python benchmarks/tpu_table.py --out benchmarks/tpu_table.jsonl --compare ../before  # before/after columns
    python benchmarks/tpu_table.py --markdown  # docs/planner.md's tables, from benchmarks/tpu_table.jsonl

`--markdown` compiles nothing and imports no JAX: it prints the tables that docs/planner.md holds between its
`tpu_table.py --markdown` marker comments (tests/test_docs.py checks that the page holds exactly this).

`--compare DIR` compiles each searched row again at its micro-batch: with `--attention=xla` (the kernel's
effect), and with the checkout in DIR (e.g. `git worktree add ../before b541cc7^`, the code before #17: no batch
constraint under FSDP, XLA attention). A refused compile reports the temporaries the compiler asked for.

Each slice runs the four sizes with `--remat=none`, then with `--remat=full`. A fitting compile of a GPT-2 size
takes minutes on a 2-core machine; a refused one, seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "benchmarks" / "tpu_table.jsonl"  # the rows docs/planner.md's tables are made of
TARGETS = {"v5e-8": 8, "v6e-8": 8, "v5p-8": 4, "v4-8": 4}  # slice -> chips
SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def run_planner(flags: list[str], cwd: Path = ROOT) -> dict:
    """`python -m gpt2_jax.plan FLAGS` in the checkout `cwd`: its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        cmd = [sys.executable, "-m", "gpt2_jax.plan", *flags, f"--json={out}"]
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        if not out.is_file():
            raise RuntimeError(f"{' '.join(cmd)} in {cwd} failed ({r.returncode}):\n{r.stderr[-2000:]}")
        return json.loads(out.read_text())


def append(out: Path, row: dict) -> None:
    """Print a row and append it to the JSON-lines file `out`."""
    print(json.dumps(row), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


def search(target: str, preset: str, remat: str, chips: int) -> dict:
    """The planner's search for one (slice, size, remat): its JSON, plus the command and the seconds it took."""
    flags = [f"--target={target}", f"--preset={preset}", f"--mesh=fsdp:{chips}", f"--remat={remat}", "--search"]
    t0 = time.perf_counter()
    (best,) = run_planner(flags)["search"]
    seconds = time.perf_counter() - t0
    return {"target": target, "preset": preset, "mesh": f"fsdp:{chips}", "remat": remat, "seconds": round(seconds),
            "micro_batch_size": best["micro_batch_size"] if best["fits"] else 0,
            "need_gib": round(best["need_bytes"] / 2**30, 2), "budget_gib": round(best["budget_bytes"] / 2**30, 2),
            "command": " ".join(["-m", "gpt2_jax.plan", *flags])}


def compile_once(target: str, preset: str, remat: str, chips: int, micro: int, variant: str, cwd: Path,
                 extra: list[str]) -> dict:
    """One deviceless compile of a searched row's micro-batch in another configuration (`variant`)."""
    plan = run_planner([f"--target={target}", f"--preset={preset}", f"--mesh=fsdp:{chips}", f"--remat={remat}",
                        f"--micro_batch_size={micro}", *extra], cwd)
    return {"target": target, "preset": preset, "remat": remat, "variant": variant, "micro_batch_size": micro,
            "fits": plan["fits"], "need_gib": round(plan["need_bytes"] / 2**30, 2)}


def memory_cell(r: dict | None) -> str:
    """A compared compile: its total if it fits, else the temporaries libtpu refused."""
    if r is None:
        return "-"
    return f"{r['need_gib']} GiB" if r["fits"] else f"{r['need_gib']} GiB temp., refused"


def table(rows: list[dict], remat: str) -> str:
    """One line per slice and size at `remat`: the largest micro-batch over the slice (per chip) and its memory per
    chip; with `--compare` rows, what the same micro-batch needs with XLA attention and before #17. "-": not run."""
    found = {(r["target"], r["preset"], r["remat"], r.get("variant", "search")): r for r in rows}
    compared = any("variant" in r for r in rows)
    head = ["slice", "preset", "mesh", "largest micro-batch (per chip)", "memory per chip, splash"]
    head += ["same micro-batch, XLA attention", "same, before the FSDP fix (XLA attention)"] if compared else []
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for target, chips in TARGETS.items():
        for preset in SIZES:
            r = found.get((target, preset, remat, "search"))
            if r is None:
                continue
            if r["micro_batch_size"]:
                cells = [f"{r['micro_batch_size']} ({r['micro_batch_size'] // chips})",
                         f"{r['need_gib']} of {r['budget_gib']} GiB"]
            else:
                cells = ["none fits", f"(1 per chip: {r['need_gib']} GiB)"]
            if compared:
                cells += [memory_cell(found.get((target, preset, remat, v))) for v in ("xla", "before")]
            lines.append(f"| {target} | {preset} | fsdp:{chips} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (none if it does not exist yet)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def markdown(rows: list[dict]) -> str:
    """The tables of docs/planner.md: one per remat policy, each under its flag."""
    return "\n\n".join(f"`--remat={remat}`:\n\n{table(rows, remat)}" for remat in ("none", "full"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="JSON-lines file of the rows (appended; rows in it are skipped); "
                                            "required but with --markdown")
    p.add_argument("--table", action="store_true", help="print the markdown table of the rows in --out and exit")
    p.add_argument("--markdown", action="store_true",
                   help=f"print docs/planner.md's tables from --out (default: {ROWS.relative_to(ROOT)}) and exit; "
                        "compiles nothing")
    p.add_argument("--compare", type=Path, metavar="DIR",
                   help="compile each searched row again with --attention=xla, and in the checkout DIR (before #17)")
    args = p.parse_args()
    if args.markdown:
        print(markdown(read_rows(args.out or ROWS)))
        return
    if args.out is None:
        p.error("the following arguments are required: --out")
    rows = read_rows(args.out)
    if args.table:
        print(markdown(rows) + "\n")
        return
    if args.compare:
        compare(rows, args.compare.resolve(), args.out)
        return
    done = {(r["target"], r["preset"], r["remat"]) for r in rows if "variant" not in r}
    for target, chips in TARGETS.items():
        for remat in ("none", "full"):
            for preset in SIZES:
                if (target, preset, remat) not in done:
                    append(args.out, search(target, preset, remat, chips))


def compare(rows: list[dict], before: Path, out: Path) -> None:
    """The before/after columns: each searched row that fits, compiled at its micro-batch with XLA attention
    (this checkout) and with the checkout in `before`; appended to `out` like the searches."""
    if not (before / "gpt2_jax" / "plan").is_dir():
        raise SystemExit(f"--compare {before}: not a gpt2-jax checkout with the planner (gpt2_jax/plan missing)")
    done = {(r["target"], r["preset"], r["remat"], r["variant"]) for r in rows if "variant" in r}
    for r in [r for r in rows if "variant" not in r and r["micro_batch_size"]]:
        chips = TARGETS[r["target"]]
        for variant, cwd, extra in (("xla", ROOT, ["--attention=xla"]), ("before", before, [])):
            if (r["target"], r["preset"], r["remat"], variant) not in done:
                append(out, compile_once(r["target"], r["preset"], r["remat"], chips, r["micro_batch_size"],
                                         variant, cwd, extra))


if __name__ == "__main__":
    main()
