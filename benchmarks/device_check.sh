#!/usr/bin/env bash
# The first thing to run on a machine lent with one NVIDIA GPU (written for an H200: 16 CPUs, pip registries
# at most, 10 minutes a call): the checks that need the GPU, within 8 minutes in all, each step time-boxed.
#
#     bash benchmarks/device_check.sh [--dry_run] [OUT_DIR]
#
#   0. setup      imports jax (with a GPU), torch (with CUDA), flax, optax, orbax, transformers, pytest; installs
#                 what is missing (pip install torch, whose PyPI wheel is the CUDA build; pip install -e ".[gpu,test]")
#   1. plan       python -m gpt2_jax.plan --target=h200 --search --remat=none: the largest micro-batch of GPT-2
#                 124M (bf16, T=1024, cuDNN) that fits, for JAX's share of the GPU in the benchmark (see below)
#   2. cudnn      pytest tests/test_attention.py -k cudnn: cuDNN flash attention against the XLA reference
#   3. train_step benchmarks/train_step.py: the trainer's step against torch eager and torch.compile, MFU; then
#                 a jax.profiler trace of a few of its steps, and the top 10 operations by device time (where the
#                 time goes: benchmarks/trace_top.py; the trace itself stays in $TMPDIR, too big to copy back)
#   4. sample     benchmarks/sample.py: KV-cache decoding against Hugging Face generate
#
# Results: device_check.json (each step's command, exit status, seconds; the benchmarks' JSON lines; versions)
# and device_check.md (a table), plus one log per step, in OUT_DIR, else $OUT, else ./device_check_out.
# --dry_run prints the commands (with the planner's figures where the plan extra is installed) and runs none.
#
# The benchmark runs JAX and torch in one process on one GPU, so JAX is held to MEM_FRACTION of the memory (its
# pool grows on demand up to that) and the planner sizes the micro-batch for that budget; torch gets the rest.
# DEVICE_CHECK_MICRO=N skips the planner.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
DEST=""
for arg in "$@"; do
  case "$arg" in
    --dry_run) DRY=1 ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "device_check.sh: unknown option $arg (use --dry_run, --help or an output folder)" >&2; exit 2 ;;
    *) DEST=$arg ;;
  esac
done
DEST=${DEST:-${OUT:-device_check_out}}
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
MEM_FRACTION=0.45
BUDGET_S=480          # 8 minutes for the plan and the checks together (setup before them)
START=$(date +%s)
MODEL=(--preset=gpt2 --vocab_size=50304 --dtype=bfloat16 --block_size=1024)

# step NAME SECONDS COMMAND...: run it under `timeout` (never past what is left of BUDGET_S), log to DEST/NAME.log,
# and record it in DEST/steps.tsv. In a dry run, print it.
step() {
  local name=$1 limit=$2; shift 2
  if [ "$DRY" = 1 ]; then
    printf '[%s, <= %ss] %s\n' "$name" "$limit" "$*"
    return 0
  fi
  local left=$((BUDGET_S - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "skipped" 0 0 "$*" >>"$DEST/steps.tsv"
    echo "== $name: skipped, ${left}s left of the ${BUDGET_S}s budget"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (<= ${limit}s): $*"
  local t0=$(date +%s) rc
  timeout --kill-after=10 "$limit" "$@" >"$DEST/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$limit" "$*" >>"$DEST/steps.tsv"
  tail -n 15 "$DEST/$name.log"
  echo "== $name: exit status $rc in $(($(date +%s) - t0))s"
  return $rc
}

if [ "$DRY" = 0 ]; then
  mkdir -p "$DEST" && : >"$DEST/steps.tsv"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  # 0. setup: what is missing, installed (a machine with no registry keeps what it has and says so).
  missing=$("$PY" - <<'EOF'
import importlib
out = []
for mod in ("flax", "optax", "orbax.checkpoint", "tiktoken", "transformers", "pytest", "tensorboardX"):
    try:
        importlib.import_module(mod)
    except Exception:
        out.append(mod)
try:
    import jax
    jax.devices("gpu")
except Exception:
    out.append("jax-gpu")
try:
    import torch
    assert torch.cuda.is_available()
except Exception:
    out.append("torch-cuda")
print(" ".join(out))
EOF
)
  if [ -n "$missing" ]; then
    echo "missing: $missing"
    case " $missing " in *" torch-cuda "*) step setup_torch 150 "$PY" -m pip install -q torch ;; esac
    step setup 150 "$PY" -m pip install -q -e ".[gpu,test]"
  else
    echo "setup: everything is installed"
  fi
fi

if [ "$DRY" = 1 ]; then
  echo "[setup, <= 300s] import jax (GPU), torch (CUDA), flax, optax, orbax, tiktoken, transformers, pytest; where one" \
       "is missing: $PY -m pip install -q torch (if torch lacks CUDA); $PY -m pip install -q -e \".[gpu,test]\""
fi

START=$(date +%s)  # the 8 minutes count from here: setup is not in them

# 1. The planner's micro-batch for this device (deviceless compiles for the h200 target: the same in a dry run).
MICRO=${DEVICE_CHECK_MICRO:-}
if [ -z "$MICRO" ]; then
  why=$("$PY" -c 'from gpt2_jax import plan; print(plan.missing_extra(plan.parse_target("h200")))' 2>&1)
  if [ -n "$why" ]; then
    echo "plan: the planner cannot compile for h200 here ($why); using the trainer's default micro-batch, 16"
    MICRO=16
  else
    plan_json="${DEST}/plan.json"
    [ "$DRY" = 1 ] && plan_json=$(mktemp)
    plan_cmd=(env XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION "$PY" -m gpt2_jax.plan --target=h200 --preset=gpt2
              --micro_batch_size=32 --search --remat=none --json="$plan_json")
    if [ "$DRY" = 1 ]; then
      echo "[plan] ${plan_cmd[*]}"
      timeout 300 "${plan_cmd[@]}" 2>&1 | sed 's/^/  /'
    else
      step plan 90 "${plan_cmd[@]}"
    fi
    MICRO=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["search"][0]["micro_batch_size"] or 16)' \
            "$plan_json" 2>/dev/null || echo 16)
    echo "plan: micro-batch $MICRO (largest power of two whose train step fits ${MEM_FRACTION} of the H200's memory)"
  fi
fi

# 2-4. The checks.
step cudnn 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_attention.py -k cudnn -rs
step train_step 200 env XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION "$PY" benchmarks/train_step.py "${MODEL[@]}" \
  --micro_batch_size="$MICRO" --steps=5 --rounds=2 --warmup=2 --no_forward \
  --profile="${TMPDIR:-/tmp}/device_check_profile"
step sample 90 "$PY" benchmarks/sample.py --preset=gpt2 --batch=8 --prompt_len=16 --new_tokens=256 --repeats=3

[ "$DRY" = 1 ] && { echo "dry run: nothing was run; results would go to $DEST/device_check.{json,md}"; exit 0; }

# Results: the JSON lines the benchmarks print last, the steps' status, a markdown table.
"$PY" - "$DEST" "$MICRO" <<'EOF'
import json, platform, sys
from pathlib import Path

dest, micro = Path(sys.argv[1]), int(sys.argv[2])
steps = []
for line in (dest / "steps.tsv").read_text().splitlines():
    name, rc, secs, limit, cmd = line.split("\t", 4)
    steps.append({"name": name, "exit_status": rc, "seconds": int(secs), "limit_s": int(limit), "command": cmd,
                  "timed_out": rc in ("124", "137")})

def last_json(name):
    log = dest / f"{name}.log"
    for line in reversed(log.read_text().splitlines() if log.exists() else []):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None

def tail(name, n=1):
    log = dest / f"{name}.log"
    return " ".join(log.read_text().strip().splitlines()[-n:]) if log.exists() else ""

result = {"micro_batch_size": micro, "python": platform.python_version(), "steps": steps,
          "cudnn_tests": tail("cudnn"), "train_step": last_json("train_step"), "sample": last_json("sample")}
plan_file = dest / "plan.json"
if plan_file.exists():
    result["plan"] = json.loads(plan_file.read_text())
(dest / "device_check.json").write_text(json.dumps(result, indent=2) + "\n")

rows = ["| step | exit | s | result |", "| --- | --- | --- | --- |"]
ts, sm = result["train_step"] or {}, result["sample"] or {}
for s in steps:
    what = ""
    if s["name"] == "cudnn":
        what = result["cudnn_tests"]
    elif s["name"] == "train_step" and ts:
        what = "; ".join(f"{k}: {v.get('tokens_per_s', 0):,.0f} tok/s, MFU {v.get('mfu') or 0:.1%}"
                         if "error" not in v else f"{k}: {v['error'][:80]}" for k, v in ts["train"].items())
    elif s["name"] == "sample" and sm:
        what = (f"gpt2_jax {sm['gpt2_jax']['tokens_per_s']:,.0f} tok/s, HF {sm['hf_generate']['tokens_per_s']:,.0f} "
                f"tok/s ({sm['ratio_jax_over_hf']:.2f}x), identical rows {sm['identical_rows']}")
    elif s["name"] == "plan":
        what = f"micro-batch {micro}"
    rows.append(f"| {s['name']} | {s['exit_status']} | {s['seconds']} | {what.replace('|', '/')} |")
profile = ts.get("profile") or {}
if profile.get("top"):
    rows += ["", f"Top operations of the gpt2_jax train step by device time ({profile['source']}, "
             f"{profile['total_ms']:.1f} ms traced):", "", "| ms | share | calls | operation |", "| --- | --- | --- | --- |"]
    rows += [f"| {r['ms']:.2f} | {r['share']:.1%} | {r['calls']} | {r['op'][:80].replace('|', '/')} |"
             for r in profile["top"]]
(dest / "device_check.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
# Exit 0 when every step passed. steps.tsv and plan.json are in device_check.json: removed, so that the files
# to copy back stay few (the device tool returns at most 8).
awk -F'\t' '$2 != "0" { failed = 1 } END { exit failed }' "$DEST/steps.tsv"
status=$?
rm -f "$DEST/steps.tsv" "$DEST/plan.json"
exit $status
