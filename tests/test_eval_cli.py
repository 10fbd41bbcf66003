"""`python -m gpt2_jax.evaluate loss | hellaswag` on a training run's out_dir (gpt2_jax/evaluate.py).

- `loss` on a token-shard folder (its val split) and on a text file equals the mean cross-entropy
  computed here directly (JAX logits, numpy float64 log-softmax over the 50257 real ids);
- the HellaSwag acc_norm that `train.py` logs in its loop equals the CLI's on the same checkpoint;
- a char-level model is refused for HellaSwag, mismatched data for loss, with messages.

The run is a tiny GPT-2-BPE model trained for 2 steps on Tiny Shakespeare (`bpe_run`); tests/
test_export_cli.py makes the same run, and whichever file runs second reuses it.
"""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import TINY_MODEL, tiny_train_config

from gpt2_jax import data as data_lib
from gpt2_jax.evaluate import main, shard_batches

HELLASWAG_LIMIT = 20  # the in-loop limit of the bpe_run fixture (tests/conftest.py)
# The CLI's loss: float32 logits and logsumexp over 50257 ids, averaged over a few hundred tokens;
# the direct computation: the same logits in float64. Measured difference ~1e-7.
LOSS_ATOL = 1e-5


@pytest.fixture(scope="module")
def run_model(bpe_run):
    from gpt2_jax.runs import load_run

    model, tokenizer, _ = load_run(bpe_run[0])
    assert model.config.vocab_size == 50304 and tokenizer.name == "gpt2"
    return model


_RESULTS = itertools.count()


def cli(capsys, tmp_path, *args) -> tuple[int, dict | None, str]:
    """(exit code, the --out JSON, stderr) of `python -m gpt2_jax.evaluate ARGS`, run in this process."""
    out = tmp_path / f"result-{next(_RESULTS)}.json"
    code = main([*map(str, args), f"--out={out}", "--no_progress"])
    err = capsys.readouterr().err
    return code, json.loads(out.read_text()) if out.is_file() else None, err


def direct_loss(model, tokens: np.ndarray, batch_size: int, block_size: int, num_batches: int) -> float:
    """Mean next-token loss over the first `num_batches` windows of batch_size * block_size (+1) tokens."""
    B, T = batch_size, block_size
    rows = np.stack([tokens[k * B * T + r * T:k * B * T + (r + 1) * T + 1]
                     for k in range(num_batches) for r in range(B)]).astype(np.int32)  # (n*B, T+1)
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(rows[:, :-1])), np.float64)
    logits = logits[..., :50257]  # the real GPT-2 ids; the padding rows are not text
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target = np.take_along_axis(logits, rows[:, 1:, None], -1)[..., 0]
    return float((log_z - target).mean())


# ------------------------------------------------------------------------------ loss


@pytest.mark.slow
def test_loss_on_shards_equals_direct_computation(bpe_run, run_model, capsys, tmp_path):
    out, data = bpe_run
    code, result, err = cli(capsys, tmp_path, "loss", f"--init_from={out}", f"--data={data}", "--batch_size=4",
                            "--block_size=32", "--max_batches=3")
    assert code == 0, err
    val = np.load(data / "val_000000.npy")
    want = direct_loss(run_model, val, 4, 32, 3)
    assert (result["batches"], result["tokens"]) == (3, 3 * 4 * 32)
    assert abs(result["loss"] - want) <= LOSS_ATOL and 10.0 < want < 11.5  # ~ln(50257) after 2 steps
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]), rel=1e-12)


@pytest.mark.slow
def test_loss_on_a_text_file_equals_direct_computation(bpe_run, run_model, tiny_shakespeare, capsys, tmp_path):
    import tiktoken

    text = tiny_shakespeare.read_text()[:2500]
    path = tmp_path / "snippet.txt"
    path.write_text(text)
    code, result, err = cli(capsys, tmp_path, "loss", f"--init_from={bpe_run[0]}", f"--data={path}",
                            "--batch_size=2", "--block_size=32")
    assert code == 0, err
    tokens = np.array([50256, *tiktoken.get_encoding("gpt2").encode_ordinary(text)])  # <|endoftext|> first
    n = (len(tokens) - 1) // 64  # whole batches only
    assert result["batches"] == n >= 5
    assert abs(result["loss"] - direct_loss(run_model, tokens, 2, 32, n)) <= LOSS_ATOL


def test_shard_batches_make_one_pass_over_every_val_shard(tmp_path):
    text = "".join(chr(97 + i % 26) for i in range(1000))
    data_lib.prepare_text_string(text, tmp_path / "d", tokenizer="char", val_fraction=0.2, shard_size=47)
    meta = data_lib.read_meta(tmp_path / "d")
    shards = [np.load(tmp_path / "d" / n) for n in sorted(meta["shards"]) if n.startswith("val_")]
    assert [len(s) for s in shards] == [47, 47, 47, 47, 12]
    n, batches = shard_batches(tmp_path / "d", batch_size=2, block_size=5)
    # Every window of 5 + 1 tokens at stride 5 in each shard (9, 9, 9, 9 and 2 of them), in order, two
    # to a batch: batches run across shard boundaries, so no window is left out.
    windows = [s[k * 5:k * 5 + 6] for s in shards for k in range((len(s) - 1) // 5)]
    want = [(np.stack([w[:-1] for w in pair]), np.stack([w[1:] for w in pair]))
            for pair in zip(windows[0::2], windows[1::2])]
    got = list(batches)
    assert n == len(got) == len(want) == (4 * 9 + 2) // 2
    for (x, y), (wx, wy) in zip(got, want, strict=True):
        np.testing.assert_array_equal(x, wx)
        np.testing.assert_array_equal(y, wy)


def test_loss_errors_name_the_problem(bpe_run, capsys, tmp_path):
    out, data = bpe_run
    char_data = tmp_path / "char"
    data_lib.prepare_text_string("hello world " * 100, char_data, tokenizer="char")
    code, _, err = cli(capsys, tmp_path, "loss", f"--init_from={out}", f"--data={char_data}", "--block_size=8")
    assert code == 1 and "was tokenised char-level" in err and "model's tokenizer is gpt2" in err
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be")
    code, _, err = cli(capsys, tmp_path, "loss", f"--init_from={out}", f"--data={short}")
    assert code == 1 and "too few for one batch" in err
    code, _, err = cli(capsys, tmp_path, "loss", f"--init_from={out}", f"--data={tmp_path / 'nothing'}")
    assert code == 1 and f"{tmp_path / 'nothing'} does not exist" in err
    code, _, err = cli(capsys, tmp_path, "loss", f"--init_from={out}", f"--data={data}", "--block_size=65")
    assert code == 1 and "--block_size=65 exceeds the model's context of 64" in err


# ------------------------------------------------------------------------------ HellaSwag


def test_hellaswag_in_the_training_loop_equals_the_cli(bpe_run, hellaswag_file, capsys, tmp_path):
    out, _ = bpe_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in logged] == [2]
    code, result, err = cli(capsys, tmp_path, "hellaswag", f"--init_from={out}", f"--data={hellaswag_file}",
                            f"--limit={HELLASWAG_LIMIT}")
    assert code == 0, err
    assert result["n"] == HELLASWAG_LIMIT
    assert (result["acc_norm"], result["acc"]) == (logged[0]["hellaswag_acc_norm"], logged[0]["hellaswag_acc"])


def test_hellaswag_refuses_a_char_level_model(hellaswag_file, capsys, tmp_path):
    from gpt2_jax import GPT, export_hf
    from gpt2_jax.runs import TOKENIZER_FILE

    tokenizer = data_lib.Tokenizer.char("abcdefghij ")
    cfg = TINY_MODEL.replace(vocab_size=tokenizer.vocab_size)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))  # shapes only: the values
    model = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), state))  # don't matter here
    folder = export_hf(model, tmp_path / "char-hf")
    code, _, err = cli(capsys, tmp_path, "hellaswag", f"--init_from={folder}", f"--data={hellaswag_file}", "--limit=2")
    assert code == 1 and "HellaSwag needs a GPT-2 BPE model" in err and "unknown vocabulary (11 ids)" in err
    (folder / TOKENIZER_FILE).write_text(json.dumps(tokenizer.to_meta()))  # as gpt2_jax.export writes it
    code, _, err = cli(capsys, tmp_path, "hellaswag", f"--init_from={folder}", f"--data={hellaswag_file}", "--limit=2")
    assert code == 1 and f"{folder} is char-level" in err


@pytest.mark.slow
def test_in_loop_val_loss_equals_the_cli_on_tiny_shakespeare(tiny_shakespeare, capsys, tmp_path):
    """The trainer's in-loop val loss covers the whole val split (111K characters, far below
    --eval_tokens) with the windows `evaluate loss` reads, so on the same checkpoint the two agree: both
    average the same per-token float32 losses, in batches of the same shape (measured difference ~1e-7)."""
    from gpt2_jax.metrics import read_metrics
    from gpt2_jax.training import run

    data = tmp_path / "data"
    assert data_lib.main(["text", str(tiny_shakespeare), "--out", str(data), "--tokenizer", "char"]) == 0
    B, T = 16, 64
    run(tiny_train_config(tmp_path / "run", data, n_layer=1, block_size=T, micro_batch_size=B,
                          total_batch_size=B * T, eval_every=3, mesh="data:1"))
    in_loop = [r["val_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    code, result, err = cli(capsys, tmp_path, "loss", f"--init_from={tmp_path / 'run'}", f"--data={data}",
                            f"--batch_size={B}", f"--block_size={T}")
    assert code == 0, err
    val_tokens = data_lib.read_meta(data)["shards"]["val_000000.npy"]
    assert result["tokens"] == (val_tokens - 1) // T // B * B * T  # every whole batch of windows
    assert abs(in_loop[-1] - result["loss"]) <= LOSS_ATOL
