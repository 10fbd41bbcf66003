"""Plot a run's metrics.jsonl: loss (train and val) and HellaSwag accuracy against step.

    python -m gpt2_jax.plot OUT_DIR [--out FILE.png]     # default OUT_DIR/loss.png

As the "reproduce GPT-2 124M" lecture plots do, OpenAI's GPT-2 124M checkpoint is drawn as a dashed
line, but only where it compares: on runs over GPT-2 BPE tokens (a model vocabulary of at least 50257
in the run's config.json; a char-level loss is in other units). A run without HellaSwag evals gets the
loss panel alone. The trainer calls `plot_run(out_dir)` at the end of a run.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import warnings
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gpt2_jax.backends import add_platform_flag, pin_platform
from gpt2_jax.cli import BadFlag, CliError, one_line_errors
from gpt2_jax.config import GPT2_VOCAB_SIZE
from gpt2_jax.metrics import read_metrics
from gpt2_jax.runs import CONFIG_FILE, METRICS_FILE, PLOT_FILE
from gpt2_jax.storage import check_readable, is_remote, results_file, run_path

# OpenAI's GPT-2 124M, evaluated as in the lecture: loss on the FineWeb-Edu validation split (10M tokens)
# and HellaSwag acc_norm on the 10,042 validation examples.
GPT2_124M_VAL_LOSS = 3.2924
GPT2_124M_HELLASWAG = 0.2955
HELLASWAG_CHANCE = 0.25  # four endings


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) for `key`. If steps go back (a run resumed from an earlier checkpoint), the
    later rows replace the earlier ones from that step on, so the curve does not fold over itself."""
    points: list[tuple[int, float]] = []
    for row in rows:
        if key not in row or "step" not in row:
            continue
        step = int(row["step"])
        while points and points[-1][0] >= step:
            points.pop()
        points.append((step, float(row[key])))
    return [s for s, _ in points], [v for _, v in points]


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=12, color="0.4",
            bbox=dict(facecolor="white", edgecolor="0.8", alpha=0.9))


def _ylim(series: list[tuple[list[int], list[float]]], refs: list[float], skip_frac: float = 0.0):
    """Y range covering the reference lines and the points past the first `skip_frac` of the steps
    (None when there is nothing to cover: matplotlib's default then).

    For loss, skip_frac=0.05 shows the tail of training rather than the first steps' loss of ~11
    (the lecture uses ylim(top=4.0) for the same reason).
    """
    last = max((s[-1] for s, _ in series if s), default=0)
    vals = [v for steps, values in series for s, v in zip(steps, values) if s >= skip_frac * last]
    vals = [v for v in vals if math.isfinite(v)] + refs
    if not vals:
        return None
    lo, hi = min(vals), max(vals)
    pad = 0.05 * (hi - lo) or 0.05
    return lo - pad, hi + pad


def compares_to_gpt2(out_dir: Path, has_hellaswag: bool) -> bool:
    """Whether OpenAI GPT-2 124M's figures compare with this run: its model reads GPT-2 BPE tokens
    (vocab_size >= 50257 in config.json). Without a readable config.json: whether it has HellaSwag
    evals (the trainer runs them only on GPT-2 BPE models)."""
    try:
        vocab_size = json.loads((out_dir / CONFIG_FILE).read_text())["model"]["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError):  # missing, not JSON, or not a run's config
        return has_hellaswag
    return int(vocab_size) >= GPT2_VOCAB_SIZE


def _read_rows(metrics_path) -> list[dict]:
    """The rows of a metrics.jsonl; ValueError if it holds something, but no row (random bytes, other JSON)."""
    with warnings.catch_warnings(record=True) as skipped:  # one per unparseable line: said once, below
        warnings.simplefilter("always")
        rows = read_metrics(metrics_path)
    if not any("step" in row for row in rows) and metrics_path.read_bytes().strip():  # (empty: a run's first steps)
        raise ValueError(f"{metrics_path} holds no metrics rows (no line is a JSON row with a step): is it a run's "
                         "metrics.jsonl? Nothing was plotted")
    if skipped:
        warnings.warn(f"{metrics_path}: skipped {len(skipped)} unparseable lines; first: {skipped[0].message}",
                      stacklevel=3)
    return rows


def run_figure(out_dir: str | Path) -> Figure:
    """The figure for `out_dir/metrics.jsonl`: loss (train and val), and HellaSwag acc_norm if the run
    has HellaSwag evals; the GPT-2 124M baselines where they compare (see `compares_to_gpt2`)."""
    out_dir = run_path(out_dir)  # local or gs://
    metrics_path = out_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise FileNotFoundError(f"no metrics file at {metrics_path} (is {out_dir} a run's --out_dir?)")
    rows = _read_rows(metrics_path)
    train_steps, train = _series(rows, "loss")
    val_steps, val = _series(rows, "val_loss")
    hs_steps, hs = _series(rows, "hellaswag_acc_norm")
    gpt2 = compares_to_gpt2(out_dir, bool(hs))

    fig = Figure(figsize=(13, 4.8) if hs else (7, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if hs else 1, squeeze=False)[0]

    # Loss. Train loss is noisy per step, so it is drawn light; val loss is the curve to read.
    ax_loss = axes[0]
    if train:
        ax_loss.plot(train_steps, train, color="tab:blue", alpha=0.4, lw=0.8, label="train loss")
    if val:
        ax_loss.plot(val_steps, val, color="tab:blue", lw=2.2, marker="o" if len(val) < 30 else None,
                     ms=3, label=f"val loss (last {val[-1]:.4f})")
    loss_refs = [GPT2_124M_VAL_LOSS] if gpt2 else []
    if gpt2:
        ax_loss.axhline(GPT2_124M_VAL_LOSS, color="tab:red", ls="--", lw=1.2,
                        label=f"OpenAI GPT-2 124M val loss ({GPT2_124M_VAL_LOSS})")
    ylim = _ylim([(train_steps, train), (val_steps, val)], loss_refs, skip_frac=0.05)
    if ylim:
        ax_loss.set_ylim(*ylim)
    if not val:
        _note(ax_loss, "no evals yet" if train else "no evals yet (no train steps logged)")
    ax_loss.set(title="Loss", xlabel="step", ylabel="cross-entropy (nats/token)")

    if hs:  # HellaSwag acc_norm
        ax_hs = axes[1]
        ax_hs.plot(hs_steps, hs, color="tab:green", lw=2.2, marker="o" if len(hs) < 30 else None, ms=3,
                   label=f"acc_norm (last {hs[-1]:.4f})")
        hs_refs = [HELLASWAG_CHANCE]
        if gpt2:
            ax_hs.axhline(GPT2_124M_HELLASWAG, color="tab:red", ls="--", lw=1.2,
                          label=f"OpenAI GPT-2 124M ({GPT2_124M_HELLASWAG})")
            hs_refs.append(GPT2_124M_HELLASWAG)
        ax_hs.axhline(HELLASWAG_CHANCE, color="0.5", ls=":", lw=1.0, label=f"chance ({HELLASWAG_CHANCE})")
        ax_hs.set_ylim(*_ylim([(hs_steps, hs)], hs_refs))
        ax_hs.set(title="HellaSwag", xlabel="step", ylabel="acc_norm")

    last_step = int(rows[-1].get("step", 0)) if rows else 0
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # (an empty log draws no line: no empty legend box)
            ax.legend(loc="upper right" if ax is ax_loss else "lower right", fontsize=9)
        if train_steps or hs_steps or val_steps:
            ax.set_xlim(0, max(train_steps + val_steps + hs_steps + [1]))
    fig.suptitle(f"{(out_dir if is_remote(out_dir) else out_dir.resolve()).name}: step {last_step}")
    return fig


def plot_run(out_dir: str | Path, png_path: str | Path | None = None) -> Path:
    """Write `run_figure(out_dir)` to `png_path` (default out_dir/loss.png); returns the PNG's path."""
    fig = run_figure(out_dir)
    png_path = run_path(png_path) if png_path is not None else run_path(out_dir) / PLOT_FILE
    if is_remote(png_path):  # an object appears whole once its upload ends: no temporary name needed
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
        png_path.write_bytes(png.getvalue())
        return png_path
    # Write to a temporary name and rename, so a viewer never sees a half-written PNG.
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(png_path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, png_path)
    return png_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gpt2_jax.plot", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="a run's output folder (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="PNG to write (default: OUT_DIR/loss.png)")
    add_platform_flag(parser)
    return parser


@one_line_errors(interrupted="stopped before the plot was written")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = results_file(args.out, "--out") if args.out else None
    except (OSError, ValueError, ImportError) as e:
        raise BadFlag(e) from None
    if problem := pin_platform(args.platform):  # before any JAX backend starts
        raise CliError(problem)
    check_readable(args.out_dir, "out_dir")  # a bucket: one line in seconds, not a minute of retries
    path = plot_run(args.out_dir, out)  # no metrics file, an unreadable one: one line (one_line_errors)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
