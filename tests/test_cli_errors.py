"""Bad input to the command lines (issue #18): every one gets one line that names the flag or the file, what is
wrong and what to do, with exit status 2 for a bad flag and 1 for anything else, before any work starts, and
nothing is written or lost elsewhere.

The CLIs are driven through their `main(argv)` in this process (train.py's flags too: they are checked before
JAX starts), except where a subprocess is the point (marked slow). The models are tiny (1 layer, 32 wide).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import train
from gpt2_jax import data as data_lib
from gpt2_jax import evaluate, export, plot, sample
from gpt2_jax.tokenizer import read_meta

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=32)


def _fails(main, argv, capsys, status: int) -> str:
    """Run a CLI's main(argv); assert it exits with `status` (returned or raised); its stderr."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == status, err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny random GPT-2 as an HF folder (config.json + model.safetensors, 65 tokens), written with numpy
    in HF's names and layouts (building a GPT eagerly costs ~20 s on a loaded 2-core machine)."""
    from safetensors.numpy import save_file

    from gpt2_jax.config import GPTConfig
    from gpt2_jax.convert import config_to_hf

    cfg = GPTConfig(**TINY, vocab_size=65)
    C, T, V = cfg.n_embd, cfg.block_size, cfg.vocab_size
    shapes = {"wte.weight": (V, C), "wpe.weight": (T, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for name, shape in {"ln_1.weight": (C,), "ln_1.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
                        "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
                        "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "mlp.c_fc.weight": (C, 4 * C),
                        "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,)}.items():
        shapes[f"h.0.{name}"] = shape
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    folder.mkdir()
    save_file({f"transformer.{k}": rng.normal(0, 0.02, v).astype(np.float32) for k, v in shapes.items()},
              folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg, V)))
    return folder


# ------------------------------------------------------------------------------------- numbers


NON_FINITE = [
    (sample.main, ["--temperature", "nan"], "--temperature"),
    (sample.main, ["--temperature", "inf"], "--temperature"),
    (sample.main, ["--temperature=-inf"], "--temperature"),
    (sample.main, ["--temperature=-1"], "--temperature"),
    (sample.main, ["--top_p", "nan"], "--top_p"),
    (data_lib.main, ["text", "x.txt", "--out", "{out}", "--val_fraction", "nan"], "--val_fraction"),
    (data_lib.main, ["text", "x.txt", "--out", "{out}", "--val_fraction", "inf"], "--val_fraction"),
    (evaluate.main, ["loss", "--data", "{out}", "--batch_size", "nan"], "--batch_size"),
    (evaluate.main, ["hellaswag", "--limit", "inf"], "--limit"),
    (export.main, ["{out}", "--to", "{out}", "--step", "nan"], "--step"),
    (train.main, ["--max_lr=nan", "--out_dir={out}"], "--max_lr"),
    (train.main, ["--grad_clip=inf", "--out_dir={out}"], "--grad_clip"),
]


@pytest.mark.parametrize("main, argv, flag", NON_FINITE,
                         ids=[f"{m.__module__}-{' '.join(a)}" for m, a, _ in NON_FINITE])
def test_non_finite_numbers_are_bad_flags(main, argv, flag, tmp_path, capsys):
    """NaN, inf and negative temperatures: exit 2 naming the flag, before any model or file is touched."""
    out = tmp_path / "out"
    err = _fails(main, [a.format(out=out) for a in argv], capsys, 2)
    assert flag in err and err.count("error:") == 1
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--n_head=5"], "--n_head=5 does not divide n_embd=128 (the char preset's on cpu)"),
    (["--n_head=3", "--platform=cpu"], "--n_head=3 does not divide n_embd=128"),
    (["--n_head=3", "--n_embd=64"], "--n_head=3 does not divide --n_embd=64; set --n_head and --n_embd"),
    (["--preset=gpt2", "--n_embd=100"], "n_head=12 does not divide --n_embd=100 (the gpt2 preset's"),
    (["--seed=-1"], "--seed=-1 must be in [0, 9223372036854775807]"),
    (["--seed=18446744073709551616"], "--seed=18446744073709551616 must be in"),
])
def test_train_head_count_and_seed_are_bad_flags(argv, message, tmp_path, capsys):
    """The README promises exit 2 for bad flags: --n_head that does not divide the width and an out-of-range
    --seed are caught with the other flags, before JAX starts (they used to fail at run time with 1)."""
    err = _fails(train.main, [*argv, f"--out_dir={tmp_path / 'out'}"], capsys, 2)
    assert message in err
    assert not (tmp_path / "out").exists()


def test_a_valid_head_count_for_the_platform_passes():
    from gpt2_jax.training.settings import TrainConfig

    TrainConfig(n_head=3, platform="gpu")  # the char preset is 384 wide off the CPU
    TrainConfig(n_head=8, n_embd=64)


# ------------------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_damaged_safetensors_is_one_line(damage, hf_folder, tmp_path, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_bytes((hf_folder / "config.json").read_bytes())
    weights = (hf_folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes({"truncated": weights[:len(weights) // 2],
                                                "random": os.urandom(4096), "empty": b""}[damage])
    err = _fails(sample.main, ["--init_from", str(folder), "--max_new_tokens=2"], capsys, 1)
    assert err.startswith(f"error: {folder / 'model.safetensors'} is damaged or not a weights file")
    assert "download or export the checkpoint again" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("meta", [[1, 2], {"tokenizer": 3}, {"tokenizer": "char", "vocab_size": "65"},
                                  {"tokenizer": "char", "vocab_size": 65},
                                  {"tokenizer": "char", "vocab_size": 65, "shards": {"../x.npy": 3}}])
def test_meta_json_of_the_wrong_shape_is_one_line(meta, hf_folder, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="is not a dataset's meta.json: .*; create it with"):
        read_meta(data)
    err = _fails(evaluate.main, ["loss", "--init_from", str(hf_folder), "--data", str(data), "--no_progress"],
                 capsys, 1)
    assert f"error: {data / 'meta.json'} is not a dataset's meta.json" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("content", [b"caf\xe9 au lait\n" * 50, bytes(range(256)) * 8])
def test_text_that_is_not_utf8_names_the_file(content, tmp_path, capsys):
    good, bad, out = tmp_path / "good.txt", tmp_path / "bad.txt", tmp_path / "data"
    good.write_text("plain text\n" * 50)
    bad.write_bytes(content)
    err = _fails(data_lib.main, ["text", str(good), str(bad), "--out", str(out), "--tokenizer", "char"], capsys, 1)
    assert err.startswith(f"error: {bad} is not UTF-8 text (byte ") and "iconv -f latin1 -t utf-8" in err
    assert not out.exists()
