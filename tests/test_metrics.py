"""FLOPs per token, MFU, the device peak table, the metrics logger and its reader."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from gpt2_jax.config import preset
from gpt2_jax.metrics import (
    FLOPS_CONVENTION,
    PEAK_BF16_FLOPS,
    MetricsLogger,
    flops_per_token,
    format_step_line,
    mfu,
    mfu_banner,
    peak_flops,
    read_metrics,
)

GPT2_124M_PARAMS = 124_439_808  # HF's GPT-2 124M, tied head counted once


def test_flops_per_token_gpt2():
    cfg = preset("gpt2")
    n = GPT2_124M_PARAMS - 1024 * 768  # without wpe
    expected = 6 * n + 12 * 12 * 12 * 64 * 1024  # 6N + 12*L*H*Q*T
    assert flops_per_token(cfg, 1024) == expected
    # Only the attention term depends on T.
    assert flops_per_token(cfg, 1024) - flops_per_token(cfg, 512) == 12 * 12 * 12 * 64 * 512


def test_mfu_h100_example():
    # ~578K tok/s for the 124M model at T=1024 on one H100 is half of its bf16 peak.
    f = flops_per_token(preset("gpt2"), 1024)
    got = mfu(578_000, f, 1, PEAK_BF16_FLOPS["H100 SXM"])
    assert got == pytest.approx(0.5, rel=0.01)
    assert mfu(8 * 578_000, f, 8, PEAK_BF16_FLOPS["H100 SXM"]) == pytest.approx(got)
    assert mfu(578_000, f, 1, None) is None


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100-PCIE-40GB", 312e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5p", 459e12),
        ("TPU v5", 459e12),  # how JAX names v5p
        ("TPU v6 lite", 918e12),
        ("TPU v6e", 918e12),
        ("cpu", None),
        ("NVIDIA GeForce RTX 4090", None),
        ("", None),
    ],
)
def test_peak_flops(kind, peak):
    assert peak_flops(SimpleNamespace(device_kind=kind)) == peak
    assert peak_flops(kind) == peak


def test_peak_flops_without_device_kind():
    assert peak_flops(object()) is None


def test_mfu_banner_names_convention():
    line = mfu_banner(8.55e8, SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3"), 8)
    assert FLOPS_CONVENTION in line and "989 TFLOP/s" in line and "x 8" in line
    assert "no peak known" in mfu_banner(8.55e8, SimpleNamespace(device_kind="cpu"), 1)


def test_format_step_line():
    scalars = dict(loss=3.45123, lr=6e-4, grad_norm=0.4123, ms_per_step=412.34, tokens_per_sec=1_270_000.0,
                   mfu=0.4812)
    line = format_step_line(120, 19073, scalars)
    assert line == (
        "step   120/19073 | loss 3.4512 | lr 6.00e-04 | norm 0.41 | 412.3 ms | 1,270,000 tok/s | MFU 48.1%"
    )
    assert format_step_line(5, 10, {"loss": 2.0, "mfu": None}) == "step  5/10 | loss 2.0000"


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path) as log:
        log.log(10, loss=2.3, lr=np.float32(6e-4), grad_norm=0.5, tokens_per_sec=1e6, mfu=None)
        log.log(np.int64(20), loss=float("nan"), grad_norm=float("inf"), tokens=np.int64(40960))
        log.log(250, val_loss=3.1)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # strict JSON: NaN/Infinity would parse, so check text too
    assert "NaN" not in lines[1] and "Infinity" not in lines[1]
    assert rows[0] == {"step": 10, "loss": 2.3, "lr": pytest.approx(6e-4), "grad_norm": 0.5,
                       "tokens_per_sec": 1e6, "mfu": None}
    assert rows[1] == {"step": 20, "loss": None, "grad_norm": None, "tokens": 40960}
    assert rows[2] == {"step": 250, "val_loss": 3.1}
    assert list((tmp_path / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    # The reader maps null back to NaN.
    back = read_metrics(tmp_path / "metrics.jsonl")
    assert math.isnan(back[1]["loss"]) and back[2]["val_loss"] == 3.1


def test_logger_non_primary_writes_nothing(tmp_path):
    out = tmp_path / "run"
    log = MetricsLogger(out, is_primary=False)
    log.log(1, loss=1.0)
    log.close()
    assert not out.exists()


def test_logger_without_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, loss=1.0)
    assert not (tmp_path / "tb").exists()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]


def test_read_metrics_skips_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.9}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    # A logger reopening the file (a resumed run) cuts the partial line, so appends stay parseable.
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(3, loss=2.8)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_read_metrics_warns_on_bad_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\ngarbage\n{"step": 2}\n')
    with pytest.warns(UserWarning, match="unparseable"):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
