"""HellaSwag evaluation (gpt2_jax/hellaswag.py): schema checks, rendering, and scores checked against an
independent per-ending loop over reference_torch, unsharded and sharded over 8 CPU devices.

A tiny random model keeps this fast; the data file and the GPT-2 BPE come from ../shared (skipped if
absent: set GPT2_JAX_SHARED to the shared folder).
"""

import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from tiny import TINY_MODEL

from gpt2_jax import GPT
from gpt2_jax.evaluate import main
from gpt2_jax.hellaswag import download_hellaswag, evaluate_hellaswag, load_hellaswag, pack_batch, render_example

TINY = TINY_MODEL.replace(block_size=128, vocab_size=50257)  # GPT-2's ids; rows here are up to 86 tokens
N_EXAMPLES = 50
# float32 throughout; the two implementations sum in different orders (fused XLA kernels vs torch ops),
# which moves a per-token loss of ~10.8 (= ln 50257) by ~1e-6, and a summed ending loss (<= ~30 tokens)
# by a few 1e-5. The candidates' mean losses differ by ~1e-2 on this model, far more than that, so the
# predictions must agree exactly.
ATOL = 1e-4

GOOD = {"ind": 7, "activity_label": "Roofing", "ctx": "A man is on a roof. he", "label": 3,
        "endings": ["sings.", "jumps off.", "eats a cube.", "pulls up shingles."]}


def char_encode(text: str) -> list[int]:
    """A stand-in tokenizer for tests that only need token bookkeeping: one id per character."""
    return [ord(c) for c in text]


@pytest.fixture(scope="module")
def encode(gpt2_bpe):
    import tiktoken

    return tiktoken.get_encoding("gpt2").encode_ordinary


@pytest.fixture(scope="module")
def examples(hellaswag_file) -> list[dict]:
    return load_hellaswag(hellaswag_file, limit=N_EXAMPLES)


@pytest.fixture(scope="module")
def tiny_model() -> GPT:
    return GPT(TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def jax_result(tiny_model, examples, encode) -> dict:
    # Full float32 matmuls on GPU/TPU as well (their default is TF32/bf16 passes); a no-op on CPU.
    with jax.default_matmul_precision("highest"):
        # Small batches: each row's float32 logits are L x 50257, and the CPU is shared.
        return evaluate_hellaswag(tiny_model, examples, encode, batch_examples=2, progress=False)


def reference_losses(ref: torch.nn.Module, example: dict, encode, block_size: int) -> tuple[list, list]:
    """Summed and mean ending losses, one plain forward pass per ending, written without hellaswag.py.

    A row longer than block_size keeps its last block_size tokens; the row's first token has no
    prediction, so at most len(row) - 1 ending tokens are scored.
    """
    ctx = encode(example["ctx"])
    sums, means = [], []
    for ending in example["endings"]:
        end = encode(" " + ending)
        row = (ctx + end)[-block_size:]
        n = min(len(end), len(row) - 1)
        with torch.no_grad():
            logits, _ = ref(torch.tensor([row]))  # (1, T, V)
        losses = F.cross_entropy(logits[0, len(row) - 1 - n:-1], torch.tensor(row[len(row) - n:]),
                                 reduction="none")  # (n,) float32
        sums.append(losses.sum().item())
        means.append(losses.mean().item())
    return sums, means


def assert_matches_reference(result: dict, model: GPT, examples: list[dict], encode) -> None:
    from reference_torch import from_jax

    ref = from_jax(model).eval()
    assert result["n"] == len(examples) == len(result["per_example"])
    for ex, got in zip(examples, result["per_example"]):
        sums, means = reference_losses(ref, ex, encode, model.config.block_size)
        np.testing.assert_allclose(got["losses"], sums, rtol=0, atol=ATOL, err_msg=f"ind {ex['ind']}")
        np.testing.assert_allclose(got["avg_losses"], means, rtol=0, atol=ATOL, err_msg=f"ind {ex['ind']}")
        assert (got["ind"], got["label"]) == (ex["ind"], ex["label"])
        assert (got["pred"], got["pred_norm"]) == (int(np.argmin(sums)), int(np.argmin(means)))
    per = result["per_example"]
    assert result["acc"] == sum(e["pred"] == e["label"] for e in per) / len(per)
    assert result["acc_norm"] == sum(e["pred_norm"] == e["label"] for e in per) / len(per)


# ------------------------------------------------------------------------------ scores


@pytest.mark.slow
def test_matches_reference_torch(jax_result, tiny_model, examples, encode):
    assert_matches_reference(jax_result, tiny_model, examples, encode)


@pytest.mark.slow
def test_random_model_is_near_chance(jax_result):
    # A random model's pick is close to a fair 1-in-4 guess: correct answers ~ Binomial(50, 0.25), mean
    # 12.5, sd 3.1. [0.05, 0.5] is 2.5..25 correct, about 3.3 sd below and 4 sd above the mean: a
    # bound that only a broken scorer (e.g. argmax instead of argmin, or always the label) should leave.
    assert 0.05 <= jax_result["acc_norm"] <= 0.5
    assert 0.05 <= jax_result["acc"] <= 0.5


def test_crops_long_rows_from_the_left(examples, encode):
    # block_size 48 is shorter than most rows here (up to 86 tokens): the context loses its start.
    model = GPT(TINY.replace(block_size=48), rngs=nnx.Rngs(1))
    some = examples[:4]
    assert max(len(encode(e["ctx"] + " " + x)) for e in some for x in e["endings"]) > 48
    with jax.default_matmul_precision("highest"):
        result = evaluate_hellaswag(model, some, encode, batch_examples=2, progress=False)
    assert_matches_reference(result, model, some, encode)


def test_padded_vocab_rows_are_left_out(examples, encode):
    # The converter pads 50257 -> 50304 with zero rows, whose logits are 0. Left in the softmax they
    # would raise every loss by about ln(1 + 47 / 50257) ~ 1e-3 on this model; evaluate drops them.
    from gpt2_jax.convert import model_from_hf_tensors, model_to_hf_tensors

    model = GPT(TINY, rngs=nnx.Rngs(2))
    padded = model_from_hf_tensors(model_to_hf_tensors(model), TINY.replace(vocab_size=50304))
    some = examples[:4]
    with jax.default_matmul_precision("highest"):
        a = evaluate_hellaswag(model, some, encode, batch_examples=2, progress=False)
        b = evaluate_hellaswag(padded, some, encode, batch_examples=2, progress=False)
    for x, y in zip(a["per_example"], b["per_example"]):
        np.testing.assert_allclose(y["losses"], x["losses"], rtol=0, atol=ATOL)


SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np, tiktoken
    from flax import nnx
    from gpt2_jax import GPT, GPTConfig
    from gpt2_jax.hellaswag import evaluate_hellaswag, load_hellaswag
    from gpt2_jax.sharding import make_mesh, state_shardings

    assert jax.device_count() == 8, jax.devices()
    encode = tiktoken.get_encoding("gpt2").encode_ordinary
    examples = load_hellaswag(sys.argv[1], limit=16)
    model = GPT(GPTConfig.from_dict(json.loads(sys.argv[2])), rngs=nnx.Rngs(0))  # TINY
    # The project's mesh with params split on their mlp/heads dims (kept as placed), batch over data:4.
    tp_mesh = make_mesh("data:4,tensor:2")
    graphdef, state = nnx.split(model)
    tp_model = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, tp_mesh)))
    assert "tensor" in str(tp_model.h.mlp.c_fc.kernel.value.sharding.spec)
    runs = {
        "none": (model, None),
        "data4_tensor2": (tp_model, tp_mesh),
        # A user's mesh: jax.make_mesh's default Explicit axes; 8-way batch over data and fsdp.
        "data2_fsdp4": (model, jax.make_mesh((2, 4), ("data", "fsdp"))),
    }
    # batch_examples=5: 20 rows per batch, padded to 24 for the 8-way split; the 16 examples end in a
    # partial batch (1 example: 4 rows, the rest padding).
    out = {name: evaluate_hellaswag(m, examples, encode, batch_examples=5, mesh=mesh, progress=False)
           for name, (m, mesh) in runs.items()}
    print(json.dumps(out))
""")


@pytest.mark.e2e
def test_sharded_matches_unsharded(hellaswag_file, gpt2_bpe):
    # A fresh process with 8 fake devices: the result must not depend on the device count the root
    # conftest.py gives this pytest process (JAX fixes it when its backend starts).
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(hellaswag_file), TINY.to_json()], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    base = results.pop("none")
    assert base["n"] == 16
    for name, result in results.items():
        assert (result["acc"], result["acc_norm"], result["n"]) == (base["acc"], base["acc_norm"], base["n"])
        for x, y in zip(base["per_example"], result["per_example"]):
            assert (y["ind"], y["pred"], y["pred_norm"]) == (x["ind"], x["pred"], x["pred_norm"]), name
            # Same rows, split differently: per-device matmul shapes change, float32 results barely.
            np.testing.assert_allclose(y["losses"], x["losses"], rtol=0, atol=1e-5, err_msg=name)


# ------------------------------------------------------------------------------ data


def test_render_example():
    tokens, mask, label = render_example(GOOD, char_encode)
    ctx = GOOD["ctx"]
    assert label == 3 and tokens.dtype == mask.dtype == np.int32
    longest = max(len(ctx) + 1 + len(e) for e in GOOD["endings"])
    assert tokens.shape == mask.shape == (4, longest)
    for i, ending in enumerate(GOOD["endings"]):
        n = len(ctx) + 1 + len(ending)
        assert "".join(map(chr, tokens[i, :n])) == ctx + " " + ending  # the ending gets a leading space
        assert "".join(chr(t) for t, m in zip(tokens[i], mask[i]) if m) == " " + ending
        assert not tokens[i, n:].any() and not mask[i, n:].any()  # right padding


def test_pack_batch_crops_each_row_from_the_left():
    rendered = [render_example(GOOD, char_encode)]
    tokens, mask = pack_batch(rendered, num_rows=8, block_size=20)
    assert tokens.shape == mask.shape == (8, 20)  # bucket: 32 capped at block_size
    for i, ending in enumerate(GOOD["endings"]):
        row = char_encode(GOOD["ctx"] + " " + ending)[-20:]
        assert tokens[i, :len(row)].tolist() == row
        assert mask[i].sum() == min(len(ending) + 1, 20)
    assert not tokens[4:].any() and not mask[4:].any()  # rows past the examples are padding
    short = [render_example(dict(GOOD, ctx="Hi."), char_encode)]
    assert pack_batch(short, 4, block_size=1024)[0].shape == (4, 32)


@pytest.mark.parametrize("lines, lineno, field", [
    ([GOOD, "{not json"], 2, "invalid JSON"),
    ([GOOD, "", {k: v for k, v in GOOD.items() if k != "endings"}], 3, "'endings'"),
    ([dict(GOOD, endings=GOOD["endings"][:3])], 1, "'endings'"),
    ([dict(GOOD, endings=["a", "b", "c", 4])], 1, "'endings'"),
    ([dict(GOOD, endings="abcd")], 1, "'endings'"),
    ([GOOD, dict(GOOD, label=4)], 2, "'label'"),
    ([dict(GOOD, label="3")], 1, "'label'"),
    ([{k: v for k, v in GOOD.items() if k != "ctx"}], 1, "'ctx'"),
    ([GOOD, GOOD, ["a", "list"]], 3, "JSON object"),
])
def test_schema_errors_name_file_line_and_field(tmp_path, lines, lineno, field):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl") as info:
        load_hellaswag(path)
    assert f"{path}:{lineno}:" in str(info.value) and field in str(info.value)


def test_load_limit_and_blank_lines(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text("\n".join(json.dumps(dict(GOOD, ind=i)) for i in range(5)) + "\n\n" + "{broken\n")
    assert [e["ind"] for e in load_hellaswag(path, limit=3)] == [0, 1, 2]  # stops before the bad line
    with pytest.raises(ValueError, match=r"ok\.jsonl:7: invalid JSON"):
        load_hellaswag(path)
    with pytest.raises(ValueError, match="no HellaSwag examples"):
        (tmp_path / "empty.jsonl").write_text("\n")
        load_hellaswag(tmp_path / "empty.jsonl")


def test_download_is_atomic_and_offline_error_says_what_to_do(tmp_path, monkeypatch):
    source = tmp_path / "source.jsonl"
    source.write_text(json.dumps(GOOD) + "\n")
    cache = tmp_path / "cache"
    path = download_hellaswag(cache, url=source.as_uri())  # urllib reads file:// URLs too
    assert path == cache / "hellaswag_val.jsonl" and load_hellaswag(path) == [GOOD]
    assert download_hellaswag(cache, url="http://unused.invalid/") == path  # cached: no second download

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match="--data FILE"):
        download_hellaswag(tmp_path / "empty_cache")
    assert list((tmp_path / "empty_cache").iterdir()) == []  # no half-written file left behind


def test_cli_on_an_exported_checkpoint(tmp_path, hellaswag_file, gpt2_bpe, tiny_model, capsys):
    from gpt2_jax import export_hf

    folder = export_hf(tiny_model, tmp_path / "tiny")
    out = tmp_path / "result.json"
    argv = ["hellaswag", f"--init_from={folder}", f"--data={hellaswag_file}", "--limit=4",
            "--batch_examples=2", "--no_progress", f"--out={out}"]
    assert main(argv) == 0
    assert "4 examples" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["n"] == 4 and len(result["per_example"]) == 4
    assert main(["hellaswag", f"--init_from={tmp_path / 'missing'}", f"--data={hellaswag_file}"]) == 1
    assert "does not exist" in capsys.readouterr().err
