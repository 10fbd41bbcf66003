"""Training metrics: FLOPs per token, MFU (device peak table), console lines and log writers.

MFU follows PaLM (Chowdhery et al. 2022, appendix B) as nanoGPT's `estimate_mfu` does: a training token
costs 6N FLOPs in the matmuls with the weights (2N forward, 4N backward) plus 12*L*H*Q*T in attention
(QK^T and AV, forward and backward), against the device's peak dense bf16 FLOP/s.

Logs go to `out_dir/metrics.jsonl`, one JSON object per line, each with a "step", e.g.
    {"step": 10, "loss": 2.3, "lr": 0.0006, "grad_norm": 0.41, "tokens_per_sec": 1270000.0, ...}
    {"step": 250, "val_loss": 3.1}
and, unless switched off, to TensorBoard event files in `out_dir/tb`; with --wandb_project, every row to
Weights & Biases too (`WandbWriter`), the samples as a table.

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
import secrets
import shutil
import string
import warnings
from pathlib import Path
from typing import Any

from gpt2_jax.config import GPTConfig
from gpt2_jax.storage import is_remote, local_folder_for, run_path

FLOPS_CONVENTION = "6N + 12*L*H*Q*T (PaLM/nanoGPT), N excludes wpe"
WANDB_EXTRA = 'pip install "gpt2-jax[wandb]"'
WANDB_RUN_ID_FILE = "wandb_run_id"  # in the run folder: a resumed run logs to the same W&B run

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
    from gpt2_jax.model import count_params  # noqa: PLC0415 (lazy: keeps `import gpt2_jax.metrics` free of Flax)

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


class WandbWriter:
    """One Weights & Biases run per run folder: its id is kept in out_dir/wandb_run_id, so a resumed run
    continues it. W&B's own files (all of them, with WANDB_MODE=offline) go to `local_dir`/wandb. Steps a resumed run
    logs again (those after the last checkpoint of a killed run) are dropped by W&B, which keeps the first."""

    def __init__(self, out_dir: Any, local_dir: Path, *, project: str, name: str = "", entity: str = "",
                 config: dict[str, Any] | None = None):
        try:
            import wandb  # noqa: PLC0415 (an optional extra, ~1 s to import)
        except ImportError as e:
            raise ImportError(f"--wandb_project needs Weights & Biases: {WANDB_EXTRA}") from e
        self._wandb = wandb
        id_file = out_dir / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else ""
        if not run_id:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's form
            id_file.write_text(run_id + "\n")
        local_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=project, entity=entity or None, name=name or None, id=run_id,
                                  resume="allow", dir=str(local_dir), config=config or {},
                                  settings=wandb.Settings(silent=True, disable_git=True, save_code=False))
        except wandb.errors.Error as e:  # no API key, an unknown entity, no network: one line, not a traceback
            raise ValueError(f"Weights & Biases could not start the run ({type(e).__name__}: {e}); run `wandb login`, "
                             f"or set WANDB_MODE=offline to keep it in {local_dir / 'wandb'} for `wandb sync`") from e

    def log(self, row: dict[str, Any]) -> None:
        """A metrics.jsonl row (JSON values: null is NaN) at its step."""
        self.run.log({k: math.nan if v is None else v for k, v in row.items() if k != "step"}, step=row["step"])

    def log_samples(self, step: int, texts: list[str]) -> None:
        table = self._wandb.Table(columns=["step", "sample", "text"], data=[[step, i, t] for i, t in enumerate(texts)])
        self.run.log({"samples": table}, step=step)

    def finish(self) -> None:
        """End the run, and stop W&B's service process: its files are then whole (to upload, or to sync)."""
        self.run.finish()
        self._wandb.teardown()


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

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True, is_primary: bool = True,
                 wandb: dict[str, Any] | None = None):
        """`wandb`: WandbWriter's keyword arguments (project, name, entity, config), or None: no W&B."""
        self.out_dir = run_path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._wandb: WandbWriter | None = None
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
            from tensorboardX import SummaryWriter  # noqa: PLC0415 (lazy: protobuf import is not free)

            self._tb = SummaryWriter(str(tb_dir))
        if wandb:  # its files (in a folder "wandb") beside TensorBoard's: out_dir, or the staging folder sync uploads
            self._wandb = WandbWriter(self.out_dir, tb_dir.parent, **wandb)

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
        if self._wandb is not None:
            self._wandb.log(row)

    def log_samples(self, step: int, texts: list[str]) -> None:
        """Generated samples: a table in W&B (metrics.jsonl and TensorBoard keep numbers only)."""
        if self._wandb is not None:
            self._wandb.log_samples(step, texts)

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
            except Exception as e:  # noqa: BLE001 (gcsfs raises OSError, aiohttp errors, ...)
                warnings.warn(f"could not upload {f} to {target} ({type(e).__name__}: {e}); the next sync "
                              "tries again", stacklevel=2)

    def close(self) -> None:
        """Close the files; for a bucket out_dir upload them a last time and delete the local copies (kept,
        with a warning naming them, if an upload failed)."""
        if self._wandb is not None:  # first: its last files are then uploaded with the rest
            self._wandb.finish()
            self._wandb = None
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
