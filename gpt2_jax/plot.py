"""Plot a run's metrics.jsonl: loss (train and val) and HellaSwag accuracy against step.

    python -m gpt2_jax.plot OUT_DIR [--out FILE.png]     # default OUT_DIR/loss.png

As the "reproduce GPT-2 124M" lecture plots do, OpenAI's GPT-2 124M checkpoint is drawn as a dashed
line in each panel. The trainer calls `plot_run(out_dir)` at the end of a run.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gpt2_jax.metrics import read_metrics
from gpt2_jax.storage import is_remote, run_path

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
    """Y range covering the reference lines and the points past the first `skip_frac` of the steps.

    For loss, skip_frac=0.05 shows the tail of training rather than the first steps' loss of ~11
    (the lecture uses ylim(top=4.0) for the same reason).
    """
    last = max((s[-1] for s, _ in series if s), default=0)
    vals = [v for steps, values in series for s, v in zip(steps, values) if s >= skip_frac * last]
    vals = [v for v in vals if math.isfinite(v)] + refs
    lo, hi = min(vals), max(vals)
    pad = 0.05 * (hi - lo) or 0.05
    return lo - pad, hi + pad


def plot_run(out_dir: str | Path, png_path: str | Path | None = None) -> Path:
    """Write the loss / HellaSwag figure for `out_dir/metrics.jsonl`; returns the PNG's path."""
    out_dir = run_path(out_dir)  # local or gs://
    metrics_path = out_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"no metrics file at {metrics_path} (is {out_dir} a run's --out_dir?)")
    png_path = run_path(png_path) if png_path is not None else out_dir / "loss.png"
    rows = read_metrics(metrics_path)

    fig = Figure(figsize=(13, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_hs = fig.subplots(1, 2)

    # Left: loss. Train loss is noisy per step, so it is drawn light; val loss is the curve to read.
    train_steps, train = _series(rows, "loss")
    val_steps, val = _series(rows, "val_loss")
    if train:
        ax_loss.plot(train_steps, train, color="tab:blue", alpha=0.4, lw=0.8, label="train loss")
    if val:
        ax_loss.plot(val_steps, val, color="tab:blue", lw=2.2, marker="o" if len(val) < 30 else None,
                     ms=3, label=f"val loss (last {val[-1]:.4f})")
    ax_loss.axhline(GPT2_124M_VAL_LOSS, color="tab:red", ls="--", lw=1.2,
                    label=f"OpenAI GPT-2 124M val loss ({GPT2_124M_VAL_LOSS})")
    ax_loss.set_ylim(*_ylim([(train_steps, train), (val_steps, val)], [GPT2_124M_VAL_LOSS], skip_frac=0.05))
    if not val:
        _note(ax_loss, "no evals yet" if train else "no evals yet (no train steps logged)")
    ax_loss.set(title="Loss", xlabel="step", ylabel="cross-entropy (nats/token)")

    # Right: HellaSwag acc_norm.
    hs_steps, hs = _series(rows, "hellaswag_acc_norm")
    if hs:
        ax_hs.plot(hs_steps, hs, color="tab:green", lw=2.2, marker="o" if len(hs) < 30 else None, ms=3,
                   label=f"acc_norm (last {hs[-1]:.4f})")
    else:
        _note(ax_hs, "no evals yet")
    ax_hs.axhline(GPT2_124M_HELLASWAG, color="tab:red", ls="--", lw=1.2,
                  label=f"OpenAI GPT-2 124M ({GPT2_124M_HELLASWAG})")
    ax_hs.axhline(HELLASWAG_CHANCE, color="0.5", ls=":", lw=1.0, label=f"chance ({HELLASWAG_CHANCE})")
    ax_hs.set_ylim(*_ylim([(hs_steps, hs)], [GPT2_124M_HELLASWAG, HELLASWAG_CHANCE]))
    ax_hs.set(title="HellaSwag", xlabel="step", ylabel="acc_norm")

    last_step = int(rows[-1].get("step", 0)) if rows else 0
    for ax in (ax_loss, ax_hs):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right" if ax is ax_loss else "lower right", fontsize=9)
        if train_steps or hs_steps or val_steps:
            ax.set_xlim(0, max(train_steps + val_steps + hs_steps + [1]))
    fig.suptitle(f"{(out_dir if is_remote(out_dir) else out_dir.resolve()).name}: step {last_step}")

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2_jax.plot", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="a run's output folder (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="PNG to write (default: OUT_DIR/loss.png)")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.out_dir, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
