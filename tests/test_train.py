"""The trainer: sharded steps equal single-device steps, accumulation, torch parity, exact resume, CLI."""

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny import tiny_train_config

from gpt2_jax import data as data_lib
from gpt2_jax.training import run
from gpt2_jax.training.settings import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# Tolerances. Sharded and single-device steps run the same float32 math with different reduction
# orders (all-reduce of per-device gradient sums): differences are ~1e-7 relative.
LOSS_ATOL = 1e-5
PARAM_RTOL = 1e-5
# JAX/optax vs torch AdamW over 5 steps: each step's float32 noise (~1e-6) is amplified a little by
# Adam's normalisation of tiny gradients; 1e-4 on losses of ~4 is far below any recipe difference.
TRAJECTORY_ATOL = 1e-4
TRAJECTORY_PARAM_RTOL = 1e-4  # the same noise on the final params, relative L2 over all of them (see max_rel_err)


def losses(out_dir) -> list[float]:
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def max_rel_err(a, b) -> float:
    """||a - b|| / ||b|| over all parameters at once.

    Not per tensor: the key part of c_attn's bias has an exactly-zero true gradient (adding a constant to
    every key score of a query leaves the softmax unchanged), so its float32 gradient is pure rounding
    noise that Adam normalises into full-size steps; that slice differs between any two reduction orders
    (measured 5e-5 relative on that one tensor, <1e-6 on all others)."""
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("single")
    return out, run(tiny_train_config(out, char_data, mesh="data:1"))


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data:8", "data:2,fsdp:4", "data:4,tensor:2"])
def test_sharded_step_equals_single_device(mesh, tmp_path, char_data, single_device_run):
    assert len(jax.devices()) == 8
    ref_out, ref = single_device_run
    summary = run(tiny_train_config(tmp_path, char_data, mesh=mesh))
    np.testing.assert_allclose(losses(tmp_path), losses(ref_out), atol=LOSS_ATOL, rtol=0)
    assert len(losses(tmp_path)) == 3
    assert max_rel_err(summary["params"], ref["params"]) <= PARAM_RTOL
    if "fsdp" in mesh:  # FSDP really shards: the MLP kernel is split over its embed dim
        kernel = summary["params"]["h"]["mlp"]["c_fc"]["kernel"][...]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)


@pytest.mark.e2e
def test_grad_accumulation_equals_one_big_batch(tmp_path, char_data):
    accum = run(tiny_train_config(tmp_path / "accum", char_data, micro_batch_size=8, total_batch_size=4 * 8 * 32,
                                  max_steps=2))
    big = run(tiny_train_config(tmp_path / "big", char_data, micro_batch_size=32, total_batch_size=4 * 8 * 32,
                                max_steps=2))
    np.testing.assert_allclose(losses(tmp_path / "accum"), losses(tmp_path / "big"), atol=LOSS_ATOL, rtol=0)
    assert max_rel_err(accum["params"], big["params"]) <= PARAM_RTOL


def lecture_lr(it: int, max_lr: float, min_lr_ratio: float, warmup_steps: int, max_steps: int) -> float:
    """The "reproduce GPT-2" lecture's schedule, written out here so that the torch side does not share
    gpt2_jax.optim's code: linear warmup to max_lr, then a cosine down to min_lr over max_steps."""
    min_lr = max_lr * min_lr_ratio
    if it < warmup_steps:
        return max_lr * (it + 1) / warmup_steps
    if it > max_steps:
        return min_lr
    decay_ratio = (it - warmup_steps) / (max_steps - warmup_steps)  # 0 -> 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


@pytest.mark.slow
def test_trajectory_matches_torch_reference(tmp_path, char_data):
    """5 AdamW steps of the trainer vs a plain torch loop that shares only the initial weights: its own
    schedule (lecture_lr), its own batches cut from the raw train shard, torch's AdamW with decay on
    >=2-D params, and clip_grad_norm_. Losses, learning rates and the final params must agree.

    Measured (CPU, float32, 2 layers, width 32; the params move 9% relative L2 from init in these 5 steps):
    losses differ by <= 4.8e-7 (TRAJECTORY_ATOL 1e-4), learning rates by 0, final params by 7.0e-7
    relative L2 over all params (TRAJECTORY_PARAM_RTOL 1e-4). Per tensor the worst is c_attn's bias at
    6.5e-5 (its key part is pure rounding noise, see max_rel_err), all others <= 9e-6. A recipe slip is
    far outside: weight decay on the 1-D params too gives 3.4e-4 on the losses and 1.0e-3 on the params."""
    torch = pytest.importorskip("torch")
    from flax import nnx

    import reference_torch
    from gpt2_jax.convert import export_hf
    from gpt2_jax.model import GPT
    from gpt2_jax.training.settings import model_config, resolve

    B, T, steps, warmup, max_lr = 8, 32, 5, 2, 3e-3
    tc = tiny_train_config(tmp_path / "jax", char_data, micro_batch_size=B, block_size=T, total_batch_size=B * T,
                           max_steps=steps, warmup_steps=warmup, max_lr=max_lr, data_order="sequential")
    cfg = model_config(resolve(tc, "cpu", 1), data_lib.Tokenizer.load(char_data).vocab_size)
    init = GPT(cfg, rngs=nnx.Rngs(7))
    summary = run(dataclasses.replace(tc, init_from=str(export_hf(init, tmp_path / "init")), mesh="data:1"))

    ref = reference_torch.from_jax(init).train()
    decay = [p for p in ref.parameters() if p.dim() >= 2]  # matmul weights and embeddings
    no_decay = [p for p in ref.parameters() if p.dim() < 2]  # biases and LayerNorm gains
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=0.0, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    (shard,) = sorted(char_data.glob("train_*.npy"))  # one train shard: the batches never cross shards
    tokens = np.load(shard).astype(np.int64)  # (N,)
    torch_losses, torch_lrs = [], []
    for step in range(steps):
        buf = torch.from_numpy(tokens[step * B * T:(step + 1) * B * T + 1])  # (B*T + 1,): batch k follows batch k-1
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)  # (B, T) each; y is x shifted by one
        lr = lecture_lr(step, max_lr, tc.min_lr_ratio, warmup, steps)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        _, loss = ref(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), tc.grad_clip)
        opt.step()
        torch_losses.append(loss.item())
        torch_lrs.append(lr)

    rows = [json.loads(line) for line in (tmp_path / "jax" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert torch_losses[-1] < torch_losses[0] - 0.1  # it trains
    np.testing.assert_allclose([r["lr"] for r in rows], torch_lrs, rtol=1e-6, atol=0)
    np.testing.assert_allclose([r["loss"] for r in rows], torch_losses, atol=TRAJECTORY_ATOL, rtol=0)

    def by_name(params) -> dict:  # path -> array: a structure mismatch fails instead of misaligning leaves
        return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}

    trained, reference = by_name(summary["params"]), by_name(nnx.state(reference_torch.to_jax(ref), nnx.Param))
    assert trained.keys() == reference.keys()
    assert max_rel_err(trained, reference) <= TRAJECTORY_PARAM_RTOL


@pytest.mark.e2e
def test_resume_is_bit_identical(tmp_path, char_data):
    """6 straight steps == 3 steps, a restart from the step-3 checkpoint, 3 more steps."""
    straight = run(tiny_train_config(tmp_path / "straight", char_data, max_steps=6, checkpoint_every=3,
                                     keep_checkpoints=5))
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "3", resumed_dir / "checkpoints" / "3")
    resumed = run(tiny_train_config(resumed_dir, char_data, max_steps=6, checkpoint_every=3))
    assert resumed["start_step"] == 3
    assert losses(resumed_dir) == losses(tmp_path / "straight")[3:]
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                        resumed["params"], straight["params"])
    assert all(jax.tree.leaves(same))


# --- bad input: a clear error before anything compiles -------------------------------------------


def test_missing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        run(tiny_train_config(tmp_path, tmp_path / "nope"))


def test_vocab_smaller_than_data(tmp_path, char_data):
    with pytest.raises(ValueError, match=r"--vocab_size=50 is smaller than the data's vocabulary"):
        run(tiny_train_config(tmp_path, char_data, vocab_size=50))


def test_batch_not_divisible_by_data_axis(tmp_path, char_data):
    with pytest.raises(ValueError, match=r"--micro_batch_size=6 is not divisible by the 8 data-parallel devices"):
        run(tiny_train_config(tmp_path, char_data, micro_batch_size=6, total_batch_size=6 * 32, mesh="data:8"))


def test_total_batch_not_multiple(tmp_path, char_data):
    with pytest.raises(ValueError, match=r"--total_batch_size=1000 is not a multiple"):
        run(tiny_train_config(tmp_path, char_data, total_batch_size=1000))


def test_unknown_preset(tmp_path, char_data):
    with pytest.raises(ValueError, match=r"--preset='gpt5' is unknown"):
        run(tiny_train_config(tmp_path, char_data, preset="gpt5"))


def test_bad_mesh(tmp_path, char_data):
    with pytest.raises(ValueError, match=r"unknown axis 'model'"):
        run(tiny_train_config(tmp_path, char_data, mesh="model:8"))


@pytest.mark.slow
def test_resume_with_changed_model_names_the_field(tmp_path, char_data):
    run(tiny_train_config(tmp_path, char_data, max_steps=1))
    with pytest.raises(ValueError, match=r"n_embd: checkpoint 32 vs now 64"):
        run(tiny_train_config(tmp_path, char_data, max_steps=2, n_embd=64))


@pytest.mark.slow
def test_resume_with_changed_data_names_the_dir(tmp_path, char_data):
    run(tiny_train_config(tmp_path, char_data, max_steps=1))
    other = tmp_path / "other-data"
    data_lib.prepare_text_string(data_lib.default_corpus()[:150_000], other, tokenizer="char")  # same chars, more
    with pytest.raises(ValueError, match=r"the data changed .*other-data"):
        run(tiny_train_config(tmp_path, other, max_steps=2))


def test_resume_flag_without_checkpoint(tmp_path, char_data):
    with pytest.raises(FileNotFoundError, match=r"--resume: no checkpoint"):
        run(tiny_train_config(tmp_path, char_data, resume=True))


# --- the command line ----------------------------------------------------------------------------


def _train(*args, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_unknown_flag_and_preset(tmp_path):
    r = _train("--bogus=1")
    assert r.returncode == 2 and "unrecognized arguments: --bogus=1" in r.stderr
    r = _train("--preset=gpt5", f"--out_dir={tmp_path}", "--max_steps=1")  # a bad value: a usage error too
    assert r.returncode == 2 and "--preset='gpt5' is unknown" in r.stderr


def test_cli_help_lists_flags_with_defaults():
    r = _train("--help")
    assert r.returncode == 0
    assert "--total_batch_size" in r.stdout and "(default: 1.0)" in r.stdout  # grad_clip default shown


@pytest.mark.e2e
def test_cli_default_run_shortened(tmp_path):
    """`python train.py` as the README runs it, shortened by flags: Python's docs, char-level."""
    r = _train(f"--out_dir={tmp_path}", "--max_steps=4", "--n_layer=1", "--sample_tokens=16", "--eval_tokens=512")
    assert r.returncode == 0, r.stderr
    assert "step 4/4" in r.stdout and "val loss" in r.stdout and "sample 0:" in r.stdout
    assert (tmp_path / "checkpoints" / "4").is_dir() and (tmp_path / "loss.png").stat().st_size > 1000


@pytest.mark.e2e
def test_cli_tiny_shakespeare(tmp_path, tiny_shakespeare):
    r = subprocess.run([sys.executable, "-m", "gpt2_jax.data", "text", str(tiny_shakespeare), "--out",
                        str(tmp_path / "data"), "--tokenizer", "char"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = _train("--platform=cpu", f"--data={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}", "--max_steps=60",
               "--n_layer=2", "--n_embd=64", "--n_head=2", "--block_size=64", "--micro_batch_size=16",
               "--dropout=0", "--eval_every=30", "--eval_tokens=512", "--sample_every=0", "--max_lr=3e-3")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 61))
    assert {"lr", "grad_norm", "tokens_per_sec", "ms_per_step"} <= set(train_rows[0])
    assert [r["step"] for r in rows if "val_loss" in r] == [30, 60]
    first, last = train_rows[0]["loss"], np.mean([r["loss"] for r in train_rows[-5:]])
    # 65 chars: starts near ln(65) = 4.17. 60 steps: shuffled batches (the default order) are fresh text
    # every step, so the train loss falls a little slower than on sequential neighbours (3.20 at step 40).
    assert first > 4.0 and last < first - 1.0, (first, last)


@pytest.mark.e2e
def test_init_from_training_run_starts_from_its_params(tmp_path, char_data):
    first = run(tiny_train_config(tmp_path / "first", char_data, max_steps=2))
    # max_lr ~ 0: the new run's params stay (numerically) where the first run ended.
    second = run(tiny_train_config(tmp_path / "second", char_data, max_steps=1, init_from=str(tmp_path / "first"),
                                   max_lr=1e-30, weight_decay=0.0))
    assert max_rel_err(second["params"], first["params"]) < 1e-6
    assert second["start_step"] == 0  # a fresh run (new optimizer), not a resume


def test_cli_platform_without_backend(tmp_path):
    if any(d.platform == "gpu" for d in jax.devices()) or jax.default_backend() == "gpu":
        pytest.skip("a GPU backend is installed")
    r = _train("--platform=gpu", f"--out_dir={tmp_path}")
    assert r.returncode == 1
    from gpt2_jax import backends

    assert "--platform=gpu: no GPU is visible on this machine" in r.stderr, r.stderr
    assert ('pip install "gpt2-jax[gpu]"' in r.stderr) == (not backends.has_plugin("gpu"))  # no hint when installed


@pytest.mark.e2e
def test_padded_vocab_fine_tune_matches_unpadded(tmp_path, char_data):
    """HF weights padded with zero rows: the padded ids' logit is 0, and without masking they would take
    probability mass from the real ids. The trainer leaves them out of the softmax, so the padded model's
    loss equals the unpadded one's."""
    from flax import nnx

    from gpt2_jax.convert import export_hf
    from gpt2_jax.model import GPT
    from gpt2_jax.training.settings import model_config, resolve

    tc = resolve(tiny_train_config(tmp_path / "x", char_data), "cpu", 1)
    vocab = data_lib.Tokenizer.load(char_data).vocab_size
    model = GPT(model_config(tc, vocab), rngs=nnx.Rngs(3))
    nnx.update(model, jax.tree.map(lambda p: p * 4.0, nnx.state(model, nnx.Param)))  # logits far from 0
    init = export_hf(model, tmp_path / "init")
    run(tiny_train_config(tmp_path / "plain", char_data, init_from=str(init), max_steps=1, eval_every=1,
                          eval_tokens=512))
    run(tiny_train_config(tmp_path / "padded", char_data, init_from=str(init), max_steps=1, eval_every=1,
                          eval_tokens=512, vocab_size=vocab + 28))
    rows = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("plain", "padded")}
    assert rows["plain"][0]["loss"] == pytest.approx(rows["padded"][0]["loss"], rel=1e-6)
    assert rows["plain"][1]["val_loss"] == pytest.approx(rows["padded"][1]["val_loss"], rel=1e-6)


def test_cpu_default_is_the_small_char_model():
    """`python train.py` on a CPU trains the measured small config (recipes.RECIPES["char/cpu"]); flags still win, the
    micro-batch is a multiple of the devices, and GPU/TPU keep the char preset at full size."""
    from gpt2_jax.recipes import RECIPES
    from gpt2_jax.training.settings import resolve

    tc = resolve(TrainConfig(), "cpu", 1)
    assert {k: getattr(tc, k) for k in RECIPES["char/cpu"]} == RECIPES["char/cpu"]
    assert resolve(TrainConfig(), "cpu", 8).micro_batch_size == 16
    mine = resolve(TrainConfig(n_layer=2, warmup_steps=0, dropout=0.1, micro_batch_size=5), "cpu", 8)
    assert (mine.n_layer, mine.warmup_steps, mine.dropout, mine.micro_batch_size) == (2, 0, 0.1, 5)
    gpu = resolve(TrainConfig(), "gpu", 1)
    assert (gpu.n_layer, gpu.block_size, gpu.dropout, gpu.max_steps) == (0, 256, -1.0, 5000)  # preset's 6 x 384
