"""The loss / HellaSwag plot: renders with and without eval rows, and fails clearly without a log; the
GPT-2 124M baselines appear only on GPT-2 BPE runs, the HellaSwag panel only with HellaSwag evals (read
from the Figure: its axes, line data and legend labels)."""

import json
import subprocess
import sys

import pytest

from gpt2_jax.plot import GPT2_124M_HELLASWAG, GPT2_124M_VAL_LOSS, HELLASWAG_CHANCE, plot_run, run_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_config(out_dir, vocab_size):
    (out_dir / "config.json").write_text(json.dumps({"train": {"max_steps": 200}, "model": {"vocab_size": vocab_size}}))


def _hlines(ax) -> list[float]:
    """The y of every horizontal line (axhline) in `ax`."""
    ys = [line.get_ydata() for line in ax.get_lines()]
    return [float(y[0]) for y in ys if len(y) == 2 and y[0] == y[1]]


def _labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _write_run(out_dir, steps=200, evals=True, truncated=False, hellaswag=None, loss_scale=1.0):
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(0, steps, 5):
        lines.append({"step": step, "loss": loss_scale * (11.0 * (1 + step) ** -0.2 + 0.05 * (step % 3)), "lr": 6e-4})
        if evals and step % 50 == 0:
            lines.append({"step": step, "val_loss": loss_scale * 10.5 * (1 + step) ** -0.2})
            if evals if hellaswag is None else hellaswag:
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


def test_char_run_has_one_panel_without_gpt2_baseline(tmp_path):
    """A char-level run (vocab 65, no HellaSwag): the loss panel alone, scaled to its own curve (val loss
    here ends near 1.1, far below GPT-2's 3.29 BPE loss, which is in other units)."""
    _write_config(tmp_path, 65)
    _write_run(tmp_path, hellaswag=False, loss_scale=0.3)
    fig = run_figure(tmp_path)
    assert len(fig.axes) == 1
    (ax,) = fig.axes
    assert GPT2_124M_VAL_LOSS not in _hlines(ax)
    assert not any("GPT-2" in label for label in _labels(ax))
    val = next(line for line in ax.get_lines() if line.get_label().startswith("val loss"))
    lo, hi = ax.get_ylim()
    assert lo <= min(val.get_ydata()) and hi < GPT2_124M_VAL_LOSS  # the range is the run's own
    assert fig.get_size_inches()[0] < 8  # one panel: not the two-panel width
    _assert_png(plot_run(tmp_path))


def test_bpe_run_with_hellaswag_has_both_panels_and_baselines(tmp_path):
    _write_config(tmp_path, 50304)
    _write_run(tmp_path)
    fig = run_figure(tmp_path)
    assert len(fig.axes) == 2
    ax_loss, ax_hs = fig.axes
    assert _hlines(ax_loss) == [GPT2_124M_VAL_LOSS]
    assert sorted(_hlines(ax_hs)) == [HELLASWAG_CHANCE, GPT2_124M_HELLASWAG]
    assert f"OpenAI GPT-2 124M val loss ({GPT2_124M_VAL_LOSS})" in _labels(ax_loss)
    assert f"OpenAI GPT-2 124M ({GPT2_124M_HELLASWAG})" in _labels(ax_hs)
    assert ax_loss.get_ylim()[0] <= GPT2_124M_VAL_LOSS <= ax_loss.get_ylim()[1]


@pytest.mark.parametrize("hellaswag", [True, False], ids=["hellaswag_rows", "no_hellaswag_rows"])
def test_without_config_the_baseline_follows_hellaswag_rows(tmp_path, hellaswag):
    _write_run(tmp_path, hellaswag=hellaswag)
    fig = run_figure(tmp_path)
    assert len(fig.axes) == (2 if hellaswag else 1)
    assert (GPT2_124M_VAL_LOSS in _hlines(fig.axes[0])) == hellaswag


def test_bpe_run_without_hellaswag_keeps_the_loss_baseline(tmp_path):
    _write_config(tmp_path, 50257)
    _write_run(tmp_path, hellaswag=False)
    fig = run_figure(tmp_path)
    assert len(fig.axes) == 1 and _hlines(fig.axes[0]) == [GPT2_124M_VAL_LOSS]
