"""The loss / HellaSwag plot: renders with and without eval rows, and fails clearly without a log."""

import json
import subprocess
import sys

import pytest

from gpt2_jax.plot import plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(out_dir, steps=200, evals=True, truncated=False):
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(0, steps, 5):
        lines.append({"step": step, "loss": 11.0 * (1 + step) ** -0.2 + 0.05 * (step % 3), "lr": 6e-4})
        if evals and step % 50 == 0:
            lines.append({"step": step, "val_loss": 10.5 * (1 + step) ** -0.2})
            lines.append({"step": step, "hellaswag_acc_norm": 0.25 + step / 4000})
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if truncated:
        text += '{"step": 999, "loss": 3.'
    (out_dir / "metrics.jsonl").write_text(text)


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1024


@pytest.mark.parametrize("evals", [True, False], ids=["with_evals", "no_evals"])
def test_plot_run_writes_png(tmp_path, evals):
    _write_run(tmp_path, evals=evals, truncated=True)
    path = plot_run(tmp_path)
    assert path == tmp_path / "loss.png"
    _assert_png(path)
    assert not list(tmp_path.glob("*.tmp"))


def test_plot_run_empty_log_and_custom_path(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    _assert_png(plot_run(tmp_path, tmp_path / "sub" / "fig.png"))


def test_cli_writes_png(tmp_path):
    _write_run(tmp_path)
    out = tmp_path / "custom.png"
    proc = subprocess.run([sys.executable, "-m", "gpt2_jax.plot", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    _assert_png(out)


def test_cli_missing_metrics_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gpt2_jax.plot", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert str(tmp_path / "metrics.jsonl") in proc.stderr
    assert not (tmp_path / "loss.png").exists()


def test_resumed_run_keeps_later_rows(tmp_path):
    # A run killed at step 30 and resumed from its step-20 checkpoint logs steps 20..30 again; the plot
    # keeps the resumed values. A NaN loss (logged as null) must not break the figure.
    from gpt2_jax.metrics import read_metrics
    from gpt2_jax.plot import _series

    rows = [{"step": s, "loss": 5.0} for s in (0, 10, 20, 30)]
    rows += [{"step": s, "loss": 4.0} for s in (20, 30, 40)]
    rows.append({"step": 50, "loss": None})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps, losses = _series(read_metrics(tmp_path / "metrics.jsonl"), "loss")
    assert steps == [0, 10, 20, 30, 40, 50]
    assert losses[:5] == [5.0, 5.0, 4.0, 4.0, 4.0]
    _assert_png(plot_run(tmp_path))
