"""`python -m gpt2_jax.export OUT_DIR --to HF_DIR` (gpt2_jax/export.py): a trained checkpoint becomes a
folder that transformers loads, gives gpt2_jax's logits, and generates from.

The run is a tiny GPT-2-BPE model (vocabulary padded to 50304) trained for 2 steps on Tiny Shakespeare;
tests/test_eval_cli.py makes the same run, and whichever file runs second reuses it. (A char-level
export is tested in tests/test_generate.py, on the char-level run there.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from gpt2_jax.export import main
from gpt2_jax.generate import generate
from gpt2_jax.runs import TOKENIZER_FILE

ROOT = Path(__file__).resolve().parents[1]
# HF (torch) and gpt2_jax on the same float32 weights: a 1-layer, 32-wide model's logits differ only by
# summation order (measured ~1e-7); 1e-4 is the project's logits tolerance (parity_tests).
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def exported(bpe_run, tmp_path_factory) -> tuple[Path, str]:
    """The run exported by the command line, in its own process; (folder, stdout)."""
    folder = tmp_path_factory.mktemp("exported") / "hf"
    r = subprocess.run([sys.executable, "-m", "gpt2_jax.export", str(bpe_run[0]), "--to", str(folder)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    return folder, r.stdout


def test_export_writes_an_hf_folder_with_the_real_vocabulary(exported):
    folder, stdout = exported
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", TOKENIZER_FILE}
    config = json.loads((folder / "config.json").read_text())
    assert (config["vocab_size"], config["n_layer"], config["n_embd"], config["n_positions"]) == (50257, 1, 32, 64)
    assert "from step 2" in stdout and "vocab_size=50257 (sliced from 50304)" in stdout
    assert json.loads((folder / TOKENIZER_FILE).read_text())["tokenizer"] == "gpt2"


def test_transformers_loads_it_with_gpt2_jax_logits_and_generates(exported, bpe_run):
    from transformers import GPT2LMHeadModel

    from gpt2_jax.runs import load_run

    hf = GPT2LMHeadModel.from_pretrained(exported[0]).eval()
    model, tokenizer, meta = load_run(bpe_run[0])
    assert meta["step"] == 2
    tokens = np.random.default_rng(0).integers(0, 50257, (2, 64))
    with torch.no_grad():
        hf_logits = hf(torch.from_numpy(tokens)).logits.numpy()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(tokens, jnp.int32)))
    assert hf_logits.shape == (2, 64, 50257)
    np.testing.assert_allclose(hf_logits, ours[..., :50257], atol=LOGITS_ATOL, rtol=0)

    prompt = np.array([tokenizer.encode("ROMEO:\nWhat light")])
    with torch.no_grad():
        hf_ids = hf.generate(torch.from_numpy(prompt), attention_mask=torch.ones_like(torch.from_numpy(prompt)),
                             max_new_tokens=12, do_sample=False, pad_token_id=50256).numpy()
    with jax.default_matmul_precision("highest"):
        np.testing.assert_array_equal(generate(model, prompt, 12, temperature=0.0, vocab_limit=50257), hf_ids)
    with torch.no_grad():  # and it samples
        sampled = hf.generate(torch.from_numpy(prompt), attention_mask=torch.ones_like(torch.from_numpy(prompt)),
                              max_new_tokens=8, do_sample=True, top_k=50, pad_token_id=50256)
    assert sampled.shape == (1, prompt.shape[1] + 8)


def test_export_errors_name_the_problem(bpe_run, tmp_path, capsys):
    out, _ = bpe_run
    assert main([str(tmp_path / "no-run"), "--to", str(tmp_path / "hf")]) == 1
    assert f"{tmp_path / 'no-run'} is not a training run" in capsys.readouterr().err
    assert main([str(out), "--to", str(tmp_path / "hf"), "--step=99"]) == 1
    assert "no checkpoint for step 99" in capsys.readouterr().err
    assert main([str(out), "--to", str(out)]) == 1
    assert "would write into the run's own folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main([str(out), "--to", str(tmp_path / "file")]) == 1
    assert "is a file" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
