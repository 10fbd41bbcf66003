"""Training metrics: FLOPs per token, MFU (device peak table), console lines and log writers.

MFU follows PaLM (Chowdhery et al. 2022, appendix B) as nanoGPT's `estimate_mfu` does: a training token
costs 6N FLOPs in the matmuls with the weights (2N forward, 4N backward) plus 12*L*H*Q*T in attention
(QK^T and AV, forward and backward), against the device's peak dense bf16 FLOP/s.

Logs go to `out_dir/metrics.jsonl`, one JSON object per line, each with a "step", e.g.
    {"step": 10, "loss": 2.3, "lr": 0.0006, "grad_norm": 0.41, "tokens_per_sec": 1270000.0, ...}
    {"step": 250, "val_loss": 3.1}
and, unless switched off, to TensorBoard event files in `out_dir/tb`.

A bucket (gs://) cannot be appended to: there the logger writes both to a local staging folder and
`sync()` uploads them as whole files (the trainer calls it at each checkpoint and at the end), so a run
killed with -9 loses in the bucket only the rows since its last checkpoint, which a resumed run logs again.

Non-finite floats (NaN, +-inf) are written as JSON `null`, so every line is valid JSON for any parser
(`json.dumps` would otherwise write the bare `NaN`, which is not JSON). The key stays present, so
"the loss was not a number" differs from "the loss was not logged"; `read_metrics` reads `null` back
as `float("nan")`.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from gpt2_jax.config import GPTConfig
from gpt2_jax.storage import is_remote, local_folder_for, run_path

FLOPS_CONVENTION = "6N + 12*L*H*Q*T (PaLM/nanoGPT), N excludes wpe"

# Peak dense (no sparsity) bf16 FLOP/s per device, from the vendors' datasheets.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "A100": 312e12,  # SXM and PCIe alike
    "TPU v4": 275e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6e": 918e12,
}

# `device.device_kind` (lower-cased) -> table key; the first match wins, so specific names go first.
# JAX reports e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "TPU v5 lite" (v5e), "TPU v5" (v5p),
# "TPU v6 lite" (v6e).
_DEVICE_KIND_PATTERNS: list[tuple[str, str]] = [
    (r"h200", "H200"),
    (r"h100.*pcie", "H100 PCIe"),
    (r"h100", "H100 SXM"),
    (r"a100", "A100"),
    (r"tpu\s*v6\s*(lite|e)\b", "TPU v6e"),
    (r"tpu\s*v5\s*(lite|e)\b", "TPU v5e"),
    (r"tpu\s*v5\s*p?\b", "TPU v5p"),
    (r"tpu\s*v4\b", "TPU v4"),
]


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token at context length `seq_len`: 6N + 12*L*H*Q*T (see FLOPS_CONVENTION).

    N counts the parameters from shapes alone (no allocation), the tied LM head once, and leaves out
    the learned positions (wpe), which are a lookup rather than a matmul.
    """
    from gpt2_jax.model import count_params  # lazy: keeps `import gpt2_jax.metrics` free of Flax

    n = count_params(cfg) - cfg.block_size * cfg.n_embd
    attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
    return float(6 * n + attention)


def peak_flops(device: Any) -> float | None:
    """Peak dense bf16 FLOP/s of one device (a `jax.Device` or its `device_kind` string); None if unknown."""
    kind = device if isinstance(device, str) else getattr(device, "device_kind", "")
    kind = str(kind).lower()
    for pattern, key in _DEVICE_KIND_PATTERNS:
        if re.search(pattern, kind):
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(tokens_per_sec: float, flops_per_token: float, num_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the devices' summed peak; None without a peak."""
    if peak is None or peak <= 0 or num_devices <= 0:
        return None
    return tokens_per_sec * flops_per_token / (num_devices * peak)


def mfu_banner(flops_per_tok: float, device: Any, num_devices: int) -> str:
    """One line to print at start-up, naming the FLOP convention and the peak MFU is measured against."""
    peak = peak_flops(device)
    kind = device if isinstance(device, str) else getattr(device, "device_kind", "?")
    if peak is None:
        against = f"no peak known for {kind!r}, MFU not shown"
    else:
        against = f"peak {peak / 1e12:.0f} TFLOP/s bf16 x {num_devices} ({kind})"
    return f"MFU: {flops_per_tok:.3e} FLOP/token [{FLOPS_CONVENTION}], {against}"


def format_step_line(step: int, total_steps: int, scalars: dict[str, Any]) -> str:
    """One console line, e.g.
    `step   120/19073 | loss 3.4512 | lr 6.00e-04 | norm 0.41 | 412.3 ms | 1,270,000 tok/s | MFU 48.1%`
    Fields missing from `scalars` (or None) are left out.
    """
    width = len(str(total_steps))
    parts = [f"step {step:>{width}}/{total_steps}"]
    fields = [  # (key, format)
        ("loss", "loss {:.4f}"),
        ("val_loss", "val {:.4f}"),
        ("lr", "lr {:.2e}"),
        ("grad_norm", "norm {:.2f}"),
        ("ms_per_step", "{:.1f} ms"),
        ("tokens_per_sec", "{:,.0f} tok/s"),
    ]
    for key, fmt in fields:
        if scalars.get(key) is not None:
            parts.append(fmt.format(float(scalars[key])))
    if scalars.get("mfu") is not None:
        parts.append(f"MFU {100 * float(scalars['mfu']):.1f}%")
    return " | ".join(parts)


def _to_json_value(value: Any) -> Any:
    """Python/numpy/JAX scalar -> JSON-safe value: ints stay ints, non-finite floats become None."""
    if value is None or isinstance(value, (bool, str)):
        return value
    dtype_kind = getattr(getattr(value, "dtype", None), "kind", "")
    if isinstance(value, numbers.Integral) or dtype_kind in ("i", "u"):
        return int(value)  # Python, numpy and integer JAX scalars
    x = float(value)  # numpy and 0-d JAX arrays convert here (a device->host copy for JAX)
    return x if math.isfinite(x) else None


class MetricsLogger:
    """Appends scalars to `out_dir/metrics.jsonl` (and TensorBoard); a no-op on non-primary processes.

    Local out_dir: each line is flushed as it is written, so a crash loses nothing already logged. A
    partial last line left by a killed run is cut off when the file is reopened, so appended lines stay
    parseable.

    Bucket out_dir (gs://): metrics.jsonl is downloaded into a local staging folder (a resumed run appends to
    it), TensorBoard writes there too, and `sync()` / `close()` copy both to the bucket, whole files. The
    folder is the bucket folder's own (storage.local_folder_for), emptied at each start: one killed with -9
    is reused by the next run, not left behind.
    """

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True, is_primary: bool = True):
        self.out_dir = run_path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._staging: Path | None = None  # the local copies of a bucket out_dir
        self._uploaded: dict[Path, int] = {}  # staged file -> its size at its last upload
        if not is_primary:
            return
        if is_remote(self.out_dir):
            # One staging folder per bucket folder, emptied at each start: what a run killed with -9 left there
            # is reused, not piled up (its rows after the last upload are logged again by the resumed run).
            self._staging = local_folder_for(self.out_dir, "metrics-staging")
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging.mkdir(parents=True)
            local, tb_dir = self._staging / "metrics.jsonl", self._staging / "tb"
            if self.path.exists():
                local.write_bytes(self.path.read_bytes())
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            local, tb_dir = Path(self.path), self.out_dir / "tb"
        _drop_partial_last_line(local)
        self._file = open(local, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter  # lazy: protobuf import is not free

            self._tb = SummaryWriter(str(tb_dir))

    def log(self, step: int, **scalars: Any) -> None:
        if self._file is None:
            return
        row = {"step": int(step)}
        row.update({k: _to_json_value(v) for k, v in scalars.items()})
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in scalars.items():
                v = row[key]
                if isinstance(v, (bool, str)) or value is None:
                    continue  # TensorBoard scalars are numbers only
                self._tb.add_scalar(key, math.nan if v is None else v, row["step"])

    def sync(self) -> None:
        """Flush; for a bucket out_dir also upload metrics.jsonl and the TensorBoard files that changed.
        An upload that fails is a warning (the next sync copies the whole file again), not a stopped run."""
        if self._file is None:
            return
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()
        if self._staging is None:
            return
        for f in sorted(p for p in self._staging.rglob("*") if p.is_file()):
            size = f.stat().st_size
            if self._uploaded.get(f) == size:
                continue
            target = self.out_dir / f.relative_to(self._staging).as_posix()
            try:
                target.write_bytes(f.read_bytes())
                self._uploaded[f] = size
            except Exception as e:  # gcsfs raises OSError, aiohttp errors, ...
                warnings.warn(f"could not upload {f} to {target} ({type(e).__name__}: {e}); the next sync "
                              "tries again", stacklevel=2)

    def close(self) -> None:
        """Close the files; for a bucket out_dir upload them a last time and delete the local copies (kept,
        with a warning naming them, if an upload failed)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None
        if self._staging is not None:
            staged = [p for p in self._staging.rglob("*") if p.is_file()]
            if all(self._uploaded.get(p) == p.stat().st_size for p in staged):
                shutil.rmtree(self._staging, ignore_errors=True)
            else:
                warnings.warn(f"the metrics of {self.out_dir} are not all uploaded; local copies in "
                              f"{self._staging}", stacklevel=2)
            self._staging = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _drop_partial_last_line(path: Path) -> None:
    """Truncate `path` after its last newline (a line cut short by a kill), if it has such a tail."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl, in order; `null` values come back as NaN.

    A truncated last line (the writer was killed mid-line) is skipped silently; an unparseable line
    elsewhere is skipped with a warning.
    """
    path = run_path(path)
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                warnings.warn(f"{path}:{i + 1}: skipping unparseable line {line[:80]!r}", stacklevel=2)
            continue
        if isinstance(row, dict):
            rows.append({k: (math.nan if v is None else v) for k, v in row.items()})
    return rows
