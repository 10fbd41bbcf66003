"""Fine-tuning (issue #19): --init_from sets the model's shape, a shorter --block_size crops its context, and
--finetune picks the fine-tuning recipe (recipes.RECIPES["finetune"]). The checkpoint is a tiny random GPT
(2 layers, 32 wide, 32 positions, the char data's 100 tokens) exported as an HF folder."""

import json
import re
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tiny import TINY_MODEL, f32_atol, tiny_model

import train
from gpt2_jax import evaluate, export, sample
from gpt2_jax.recipes import RECIPES
from gpt2_jax.tokenizer import Tokenizer

FT = RECIPES["finetune"]


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory, char_data) -> Path:
    from gpt2_jax.convert import export_hf

    vocab = Tokenizer.load(char_data).vocab_size
    return export_hf(tiny_model(seed=1, vocab_size=vocab), tmp_path_factory.mktemp("hf") / "tiny")


def _train(argv: list[str], capsys) -> tuple[int, str, str]:
    """train.py's main in this process: (exit status, stdout, stderr)."""
    try:
        code = train.main(["--platform=cpu", "--mesh=data:1", "--tensorboard=false", *argv]) or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):  # sys.exit("error: ...") prints its message as it exits
            print(e.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_crop_block_size_keeps_the_first_positions_and_the_logits():
    """GPT.crop_block_size: wpe keeps its first rows, every other weight stays, and the logits of a sequence
    that fits the shorter context are the uncropped model's (the same float32 arithmetic: within f32_atol over the
    n_embd-long dot products)."""
    model = tiny_model(seed=2)
    idx = jnp.asarray(np.random.default_rng(0).integers(0, TINY_MODEL.vocab_size, (2, 12)))
    before, wpe = model(idx), np.asarray(model.wpe.embedding[...])
    model.crop_block_size(16)
    assert model.config.block_size == 16 and model.wpe.embedding.shape == (16, TINY_MODEL.n_embd)
    np.testing.assert_array_equal(np.asarray(model.wpe.embedding[...]), wpe[:16])
    np.testing.assert_allclose(np.asarray(model(idx)), np.asarray(before), rtol=0,
                               atol=f32_atol(before, TINY_MODEL.n_embd))
    with pytest.raises(ValueError, match=r"cannot crop the context to 17: the model has 16 learned positions"):
        model.crop_block_size(17)
    with pytest.raises(ValueError, match=r"sequence length 17 exceeds block_size 16"):
        model(jnp.zeros((1, 17), jnp.int32))


@pytest.mark.slow
def test_finetune_needs_only_init_from_data_and_the_choice(tmp_path, char_data, hf_tiny, capsys):
    """No size flag: the shape comes from the HF folder (the CPU char default would be 4 x 128), the recipe
    from --finetune: a constant learning rate, no warmup, 2**15 tokens per step, an eval every 5 steps."""
    out = tmp_path / "ft"
    code, stdout, err = _train([f"--init_from={hf_tiny}", f"--data={char_data}", f"--out_dir={out}", "--finetune",
                                "--max_steps=1"], capsys)
    assert code == 0, err
    assert (f"model shape from --init_from={hf_tiny}: n_layer=2 n_head=2 n_embd=32, vocab 100, context 32"
            in stdout), stdout
    config = json.loads((out / "config.json").read_text())
    got = {k: config["train"][k] for k in ("total_batch_size", "micro_batch_size", "warmup_steps", "max_lr",
                                           "min_lr_ratio", "eval_every", "n_layer", "n_embd", "block_size")}
    assert got == dict(total_batch_size=FT["total_batch_size"], micro_batch_size=FT["micro_batch_size"],
                       warmup_steps=0, max_lr=FT["max_lr"], min_lr_ratio=1.0, eval_every=FT["eval_every"],
                       n_layer=2, n_embd=32, block_size=32)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r] == pytest.approx([FT["max_lr"]], rel=1e-6)
    assert any("val_loss" in r for r in rows)  # the end of the run evaluates


@pytest.mark.slow
def test_a_shorter_context_trains_samples_evaluates_and_exports(tmp_path, char_data, hf_tiny, capsys):
    """--block_size=16 from a 32-position checkpoint: the run's model has 16 positions (config.json, the
    checkpoint), and sample, evaluate and export work on it; the exported HF folder says n_positions 16."""
    out = tmp_path / "ft16"
    code, stdout, err = _train([f"--init_from={hf_tiny}", f"--data={char_data}", f"--out_dir={out}", "--finetune",
                                "--max_steps=1", "--block_size=16", "--total_batch_size=2048", "--eval_every=0",
                                "--sample_every=0"], capsys)
    assert code == 0, err
    assert "context 16 (--block_size; cropped from 32)" in stdout, stdout
    assert json.loads((out / "config.json").read_text())["model"]["block_size"] == 16
    assert sample.main([f"--init_from={out}", "--prompt=The ", "--max_new_tokens=8", "--num_samples=1",
                        "--platform=cpu"]) == 0
    result = tmp_path / "loss.json"
    assert evaluate.main(["loss", f"--init_from={out}", f"--data={char_data}", "--max_batches=1", "--no_progress",
                          f"--out={result}", "--platform=cpu"]) == 0
    assert json.loads(result.read_text())["tokens"] == 8 * 16  # one batch of 8 rows of the model's context
    assert export.main([str(out), "--to", str(tmp_path / "hf16"), "--platform=cpu"]) == 0
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["n_positions"] == 16
    capsys.readouterr()


@pytest.mark.parametrize("flags, message", [
    (["--n_layer=3"], r"--n_layer=3 conflicts with --init_from=\S+, which has n_layer=2; drop the flag: with "
                      r"--init_from the model's shape comes from the checkpoint"),
    (["--n_embd=64", "--n_head=2"], r"--n_embd=64 conflicts with --init_from=\S+, which has n_embd=32"),
    (["--preset=gpt2"], r"--preset=gpt2 \(its n_layer=12\) conflicts with --init_from=\S+, which has n_layer=2"),
    (["--block_size=64"], r"--block_size=64 is longer than --init_from=\S+'s context: it learned 32 positions and "
                          r"has none for the others; use --block_size <= 32 \(a shorter one crops"),
    (["--vocab_size=50"], r"--vocab_size=50 is smaller than --init_from=\S+'s vocabulary \(100\); a vocabulary can "
                          r"be padded, never cut"),
])
def test_a_flag_that_conflicts_with_the_checkpoint_is_one_error(flags, message, tmp_path, char_data, hf_tiny,
                                                                capsys):
    """Each names the flag, its value and the checkpoint's, exits 1 before any work, and writes nothing."""
    code, _, err = _train([f"--init_from={hf_tiny}", f"--data={char_data}", f"--out_dir={tmp_path / 'out'}",
                           *flags], capsys)
    assert code == 1, err
    assert re.search(message, err), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_finetune_without_a_checkpoint_is_a_usage_error(tmp_path, capsys):
    code, _, err = _train(["--finetune", f"--out_dir={tmp_path / 'out'}"], capsys)
    assert code == 2 and "--finetune fine-tunes a checkpoint: give --init_from" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_checkpoint_of_another_tokenizer_is_refused(tmp_path, char_data, hf_tiny, gpt2_bpe, capsys):
    """An HF folder that records GPT-2's BPE, on char data with as many tokens: the vocabulary sizes would let
    it train on ids that mean other things; the error names both tokenizers."""
    import shutil

    from gpt2_jax.runs import write_tokenizer

    bpe = tmp_path / "bpe"
    shutil.copytree(hf_tiny, bpe)
    write_tokenizer(bpe, Tokenizer.gpt2())
    code, _, err = _train([f"--init_from={bpe}", f"--data={char_data}", f"--out_dir={tmp_path / 'out'}",
                           "--max_steps=1"], capsys)
    assert code == 1, err
    assert f"--init_from={bpe} was trained on gpt2-level tokens (50257) but the data ({char_data}) is char-level " \
           "(100); tokenise the data with the checkpoint's tokenizer" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_init_from_a_training_run_takes_its_shape_and_its_vocabulary(tmp_path, char_data, capsys):
    """A training run as the source: its meta gives the shape (1 layer here, where the CPU char default has 4)
    and the vocabulary; no size flag is needed."""
    from tiny import tiny_train_config

    from gpt2_jax.training import run

    run(tiny_train_config(tmp_path / "first", char_data, n_layer=1, max_steps=1, checkpoint_every=1,
                          mesh="data:1"))
    capsys.readouterr()
    code, stdout, err = _train([f"--init_from={tmp_path / 'first'}", f"--data={char_data}", "--max_steps=1",
                                f"--out_dir={tmp_path / 'second'}", "--micro_batch_size=8", "--eval_every=0",
                                "--sample_every=0"], capsys)
    assert code == 0, err
    assert (f"model shape from --init_from={tmp_path / 'first'}: n_layer=1 n_head=2 n_embd=32, vocab 100, "
            "context 32" in stdout), stdout
    assert f"init_from: {tmp_path / 'first'} step 1 (params only; a fresh optimizer)" in stdout
