"""Sampling (gpt2_jax/generate.py) and its command line (gpt2_jax/sample.py).

- greedy decoding of a batch of prompts of DIFFERENT lengths equals HF `generate(do_sample=False)` run on
  each prompt alone, on a small GPT-2 with every tensor randomised;
- past the context, greedy decoding equals a plain loop of full forward passes over the sliding window
  (the rule is spelled out in `window_starts`), and samples stay in the top-k of those windows' logits;
- top-k / top-p: `filter_logits` keeps exactly the sets computed in numpy, and thousands of samples
  (synthetic logits, and every token of sampled continuations of the model) never leave them;
- seeds, padded-vocabulary ids, and the CLI end to end: an HF folder (greedy, text equal to HF's), a
  char-level training run made by `train.py` (its own vocabulary), its export, and the error cases.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tiny import TINY_MODEL

from gpt2_jax import GPT, export_hf, load_hf
from gpt2_jax.generate import filter_logits, generate, next_token
from gpt2_jax.sample import main

ROOT = Path(__file__).resolve().parents[1]
SEED = 1234
PROMPT = "Hello, I'm a language model,"
# KV-cache decoding and a full forward pass differ by ~1e-6 in float32 (parity_tests measure it): a
# set computed from the full pass's logits is widened by this margin so that ids whose logit (or
# nucleus mass) sits within rounding of the cut are not counted as escapes.
MARGIN = 1e-4


@pytest.fixture(scope="module")
def hf_dir(random_hf_checkpoint) -> Path:
    return random_hf_checkpoint(SEED, n_layer=2, n_embd=64, n_head=4, vocab_size=50257, n_positions=128)


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def model(hf_dir) -> GPT:
    return load_hf(hf_dir)


def hf_greedy(hf_model, ids, max_new_tokens: int) -> list[int]:
    x = torch.tensor([list(ids)])
    with torch.no_grad():
        out = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=50256)
    return out[0].tolist()


_forward = nnx.jit(lambda m, x: m(x))  # one jit for every call: compiled once per model and shape


def full_logits(model: GPT, tokens: np.ndarray) -> np.ndarray:
    """(B, T, V) float64 logits of one causal forward pass over `tokens`."""
    with jax.default_matmul_precision("highest"):
        return np.asarray(_forward(model, jnp.asarray(tokens, jnp.int32)), np.float64)


def nucleus(logits: np.ndarray, top_p: float, margin: float = 0.0) -> np.ndarray:
    """Bool mask of the nucleus of each row of (B, V) logits: the ids whose strictly-more-likely mass is
    below top_p (+ margin), computed in float64."""
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, -1)
    before = np.cumsum(sorted_probs, -1) - sorted_probs
    keep = np.zeros_like(probs, dtype=bool)
    np.put_along_axis(keep, order, before < top_p + margin, -1)
    return keep


def top_k_set(logits: np.ndarray, k: int, margin: float = 0.0) -> np.ndarray:
    kth = np.sort(logits, -1)[:, -k][:, None]
    return logits >= kth - margin


# ------------------------------------------------------------------------------ greedy parity


def test_greedy_prompts_of_different_lengths_match_hf(model, hf_model):
    rng = np.random.default_rng(SEED)
    prompts = [rng.integers(0, 50257, n).tolist() for n in (7, 1, 13, 4)]
    with jax.default_matmul_precision("highest"):
        ours = generate(model, prompts, 20, temperature=0.0)
    assert [len(o) for o in ours] == [len(p) + 20 for p in prompts]
    for prompt, out in zip(prompts, ours):
        assert out[:len(prompt)].tolist() == prompt  # the prompt is kept, not overwritten by samples
        assert out.tolist() == hf_greedy(hf_model, prompt, 20)


# ------------------------------------------------------------------------------ past the context

WINDOW = 16  # the tiny model's block_size


@pytest.fixture(scope="module")
def tiny_model() -> GPT:
    """block_size 16, every tensor random at scales where greedy output depends on the window's tokens
    and positions: embeddings N(0, 0.3^2), matrices N(0, 1/fan_in), LayerNorm gains 1 + N(0, 0.1^2),
    biases N(0, 0.1^2). (At GPT-2's init scale a tiny random model soon repeats one token forever,
    which every window rule reproduces; the test below checks that this one tells rules apart.)"""
    model = GPT(TINY_MODEL.replace(block_size=WINDOW, vocab_size=96), rngs=nnx.Rngs(0))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))

    def draw(i: int, path, a: jax.Array) -> jax.Array:
        name, noise = jax.tree_util.keystr(path), jax.random.normal(jax.random.key(i), a.shape)
        if "wte" in name or "wpe" in name:
            return 0.3 * noise
        if "['scale']" in name:
            return 1.0 + 0.1 * noise
        if "['bias']" in name:
            return 0.1 * noise
        return noise / np.sqrt(a.shape[-2])  # kernels (in, out), stacked over layers: (n_layer, in, out)

    nnx.update(model, jax.tree_util.tree_unflatten(treedef, [draw(i, p, a) for i, (p, a) in enumerate(leaves)]))
    return model


def window_starts(prompt_len: int, total: int, block_size: int, keep: int) -> list[tuple[int, int]]:
    """The sliding-window rule, as (n, w) for each new token n in [prompt_len, total): token n is predicted
    from tokens [w, n) at positions [0, n - w). The window starts at w = 0; when n - w would exceed
    block_size, it moves to w = n - keep, so n - w stays in [keep, block_size] past the context.
    (keep = block_size is nanoGPT's sampler: every token from the last block_size tokens.)"""
    w, out = 0, []
    for n in range(prompt_len, total):
        if n - w > block_size:
            w = n - keep
        out.append((n, w))
    return out


def window_logits(model: GPT, seq, n: int, w: int) -> np.ndarray:
    """(V,) float64 logits for token n: one full forward pass (no cache) over seq[w:n], right-padded to
    block_size so that a single shape compiles; the model is causal, so the padding after position n - w - 1
    does not change its logits."""
    T = model.config.block_size
    x = np.zeros((1, T), np.int32)
    x[0, :n - w] = seq[w:n]
    return full_logits(model, x)[0, n - w - 1]


def greedy_reference(model: GPT, prompt: list[int], new_tokens: int, keep: int) -> tuple[list[int], float]:
    """(prompt + new_tokens greedy tokens by the window rule, the smallest gap between the two largest
    logits over all steps: how close the comparison came to a tie)."""
    seq, gap = list(prompt), np.inf
    for n, w in window_starts(len(prompt), len(prompt) + new_tokens, model.config.block_size, keep):
        logits = window_logits(model, seq, n, w)
        top2 = np.sort(logits)[-2:]
        gap = min(gap, top2[1] - top2[0])
        seq.append(int(np.argmax(logits)))
    return seq, gap


@pytest.mark.slow
@pytest.mark.parametrize("keep", [None, WINDOW - 1, WINDOW], ids=["default_half", "block_minus_1", "nanogpt"])
def test_greedy_past_the_context_matches_full_forward_over_the_window(tiny_model, keep):
    """Prompts of lengths 1, 5 and 16 (a full context) in one batch, 50 new tokens: 4-40 slides each."""
    rng = np.random.default_rng(SEED)
    prompts = [rng.integers(0, 96, n).tolist() for n in (1, 5, WINDOW)]
    with jax.default_matmul_precision("highest"):
        ours = generate(tiny_model, prompts, 50, temperature=0.0, keep=keep)
    keep = WINDOW // 2 if keep is None else keep
    for prompt, out in zip(prompts, ours):
        want, gap = greedy_reference(tiny_model, prompt, 50, keep)
        # KV-cache decoding and a full pass differ by ~1e-6 in float32: ids compare exactly when no
        # argmax is closer to a tie than that.
        assert gap > 1e-4
        assert out.tolist() == want
        assert len(set(want[len(prompt):])) > 3  # not one token repeated
        # The comparison tells window rules apart: keeping one token fewer gives other ids.
        assert greedy_reference(tiny_model, prompt, 50, keep - 1)[0] != want


@pytest.mark.slow
def test_sampling_past_the_context_stays_in_the_windows_top_k_and_is_seeded(tiny_model):
    prompts = [[3], [7, 1, 4]]
    with jax.default_matmul_precision("highest"):
        a, b, c = (generate(tiny_model, prompts, 40, top_k=5, seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))
    for prompt, out in zip(prompts, a):
        for n, w in window_starts(len(prompt), len(out), WINDOW, WINDOW // 2):
            logits = window_logits(tiny_model, out, n, w)[None]
            assert top_k_set(logits, 5, MARGIN)[0, out[n]], f"token {n} (window from {w}) is not in the top 5"


def test_past_the_context_compiles_twice_not_per_window(tiny_model):
    """200 tokens from a block of 16 are ~24 windows: the first window and the slid ones compile once each."""
    from gpt2_jax.generate import _window

    before = _window._cache_size()
    generate(tiny_model, [[1], [2, 3]], 200, temperature=0.0, keep=5)  # keep=5: shapes no other test uses
    assert _window._cache_size() - before == 2


# ------------------------------------------------------------------------------ filtering


def test_filter_logits_keeps_exactly_the_numpy_sets():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 300)) * 3.0  # continuous values: no ties
    lowest = np.finfo(np.float32).min

    def kept(**kw) -> np.ndarray:
        return np.asarray(filter_logits(jnp.asarray(logits, jnp.float32), **kw)) > lowest

    np.testing.assert_array_equal(kept(top_k=7, top_p=None, vocab_limit=None), top_k_set(logits, 7))
    np.testing.assert_array_equal(kept(top_k=None, top_p=0.6, vocab_limit=None), nucleus(logits, 0.6))
    np.testing.assert_array_equal(kept(top_k=None, top_p=1e-6, vocab_limit=None),
                                  logits == logits.max(-1, keepdims=True))  # the most likely id always stays
    assert kept(top_k=None, top_p=1.0, vocab_limit=None).all()
    limited = np.where(np.arange(300) < 250, logits, -np.inf)
    np.testing.assert_array_equal(kept(top_k=None, top_p=None, vocab_limit=250), np.isfinite(limited))
    np.testing.assert_array_equal(kept(top_k=7, top_p=None, vocab_limit=250), top_k_set(limited, 7))
    np.testing.assert_array_equal(kept(top_k=None, top_p=0.6, vocab_limit=250), nucleus(limited, 0.6))
    # k beyond the allowed ids (and beyond V) keeps the allowed ids, never a padded one
    np.testing.assert_array_equal(kept(top_k=280, top_p=None, vocab_limit=250), np.isfinite(limited))
    assert kept(top_k=1000, top_p=None, vocab_limit=None).all()
    # top-k then top-p: the nucleus of what top-k left
    both = np.where(top_k_set(logits, 20), logits, -np.inf)
    np.testing.assert_array_equal(kept(top_k=20, top_p=0.5, vocab_limit=None), nucleus(both, 0.5))


@pytest.mark.parametrize("top_k, top_p", [(5, None), (None, 0.5), (20, 0.8)])
def test_many_samples_never_leave_the_allowed_set(top_k, top_p):
    logits = np.random.default_rng(1).normal(size=(1, 64)) * 2.0
    allowed = np.ones_like(logits, dtype=bool)
    if top_k:
        allowed &= top_k_set(logits, top_k)
    if top_p:
        allowed &= nucleus(np.where(allowed, logits, -np.inf), top_p)
    batch = jnp.asarray(np.repeat(logits, 4096, axis=0), jnp.float32)
    sample = jax.jit(next_token, static_argnums=(2, 3, 4, 5))
    ids = np.asarray(sample(batch, jax.random.key(0), 1.0, top_k, top_p, None))
    seen = np.unique(ids)
    assert allowed[0, seen].all(), f"sampled {sorted(set(seen) - set(np.flatnonzero(allowed[0])))} outside the set"
    assert len(seen) == allowed.sum()  # 4096 draws reach every allowed id: it samples, not argmax


@pytest.mark.slow
@pytest.mark.parametrize("top_k, top_p, temperature", [(10, None, 1.0), (None, 0.9, 0.5)])
def test_model_samples_stay_in_top_k_and_nucleus(model, top_k, top_p, temperature):
    """Every token of 8 sampled continuations is in the set computed in numpy from the logits of one
    full forward pass over the result (position t's logits predict token t + 1)."""
    T, N = 6, 8
    prompt = np.tile(np.random.default_rng(2).integers(0, 50257, (1, T)), (8, 1))
    with jax.default_matmul_precision("highest"):
        out = generate(model, prompt, N, temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
    logits = full_logits(model, out)[:, T - 1:-1] / temperature  # (B, N, V): the distribution of each new token
    new = out[:, T:]  # (B, N)
    flat = logits.reshape(-1, logits.shape[-1])
    allowed = top_k_set(flat, top_k, MARGIN) if top_k else nucleus(flat, top_p, MARGIN)
    assert allowed[np.arange(len(flat)), new.reshape(-1)].all()
    strict = top_k_set(flat, top_k) if top_k else nucleus(flat, top_p)
    assert strict.sum(-1).min() > 1  # the sets are not trivial: something is being sampled
    assert len(np.unique(new)) > N  # rows differ


def test_same_seed_same_tokens_other_seed_other_tokens(model):
    prompts = [[464, 3290], [15496, 11, 314, 1101]]
    kw = dict(temperature=1.0, top_k=50)
    a, b, c = (generate(model, prompts, 16, seed=s, **kw) for s in (0, 0, 1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))


@pytest.mark.slow
def test_padded_vocab_ids_are_never_sampled(hf_dir):
    """A padded model (50304 ids) whose padding rows get by far the largest logits: without vocab_limit
    they win every time, with it never."""
    model = load_hf(hf_dir, vocab_size=50304)
    b = jnp.full((64,), 0.5)
    model.ln_f.scale[...] = jnp.zeros((64,))  # the final hidden state is always b ...
    model.ln_f.bias[...] = b
    model.wte.embedding[...] = model.wte.embedding[...].at[50257:].set(10 * b)  # ... so padding logits are 160
    prompt = np.zeros((8, 2), np.int32)
    assert (generate(model, prompt, 4, temperature=1.0)[:, 2:] >= 50257).all()  # the trap works
    assert generate(model, prompt, 4, temperature=1.0, vocab_limit=50257).max() < 50257


def test_generate_errors(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match=r"in \[0, 50257\)"):
        generate(model, [[1, 50257]], 4)
    with pytest.raises(ValueError, match="prompt length 129 exceeds block_size 128, the model's context; "
                                         "crop the prompt to its last 128"):
        generate(model, [[1] * 129, [2]], 4)
    for keep in (0, 129):
        with pytest.raises(ValueError, match=f"keep={keep} must be in \\[1, block_size=128\\]"):
            generate(model, [[1]], 4, keep=keep)
    for kw, msg in ((dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
                    (dict(top_p=1.5), "top_p")):
        with pytest.raises(ValueError, match=msg):
            generate(model, [[1]], 4, **kw)


# ------------------------------------------------------------------------------ the command line


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "gpt2_jax.sample", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def samples(stdout: str) -> list[str]:
    """The texts printed after `--- sample j ---` (or `--- prompt i, sample j ---`) lines, in order."""
    parts = re.split(r"^--- (?:prompt \d+, )?sample \d+ ---\n", stdout, flags=re.MULTILINE)[1:]
    return [p[:-1] for p in parts]  # each text ends with print's newline


@pytest.mark.slow
def test_cli_greedy_on_an_exported_hf_folder_matches_hf(model, hf_model, tmp_path, gpt2_bpe):
    import tiktoken

    folder = export_hf(model, tmp_path / "hf")
    r = run_cli(f"--init_from={folder}", "--prompt", PROMPT, "--num_samples=2", "--max_new_tokens=16",
                "--temperature=0", "--seed=5")
    assert r.returncode == 0, r.stderr
    enc = tiktoken.get_encoding("gpt2")
    want = enc.decode(hf_greedy(hf_model, enc.encode_ordinary(PROMPT), 16))
    assert samples(r.stdout) == [want, want]


@pytest.fixture(scope="module")
def char_run(tmp_path_factory) -> Path:
    """A char-level training run on Python's bundled docs, as the README's quick start makes one."""
    out = tmp_path_factory.mktemp("char-run")
    r = subprocess.run([sys.executable, "train.py", "--max_steps=2", "--n_layer=1", "--n_embd=32", "--n_head=2",
                        "--block_size=32", "--micro_batch_size=8", "--eval_every=0", "--sample_every=0",
                        "--tensorboard=false", f"--out_dir={out}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.e2e
def test_cli_on_a_char_level_run_uses_its_vocabulary(char_run, capsys, tmp_path):
    from gpt2_jax.runs import load_run

    run_model, tokenizer, _ = load_run(char_run)
    assert tokenizer.name == "char" and tokenizer.vocab_size == run_model.config.vocab_size < 200
    flags = ["--num_samples=2", "--max_new_tokens=16"]  # each prompt's 2 samples: 2 rows of the CLI's batch
    the = tokenizer.encode("The ")

    def direct(rows: list[list[int]], **kw) -> list[str]:  # the library call the CLI should make
        out = generate(run_model, rows, 16, vocab_limit=tokenizer.vocab_size, **kw)
        return [tokenizer.decode(o) for o in out]

    code, out, err = cli(capsys, f"--init_from={char_run}", "--prompt=The ", "--temperature=0", *flags)
    assert code == 0, err
    greedy = direct([the, the], temperature=0.0)
    assert samples(out) == greedy and greedy[0].startswith("The ") and set(greedy[0]) <= set(tokenizer.chars)
    # Sampling: the library's tokens for the same seed, decoded with the run's characters.
    code, out, err = cli(capsys, f"--init_from={char_run}", "--prompt=The ", "--seed=3", "--top_k=none",
                         "--top_p=0.99", *flags)
    assert code == 0, err
    assert samples(out) == direct([the, the], temperature=1.0, top_p=0.99, seed=3)
    assert samples(out)[0] != samples(out)[1] and set("".join(samples(out))) <= set(tokenizer.chars)
    # Two prompts of different lengths in one batch: an empty one starts from "\n" (not printed); one
    # longer than the context keeps its last 32 tokens, with a warning.
    code, out, err = cli(capsys, f"--init_from={char_run}", "--prompt=", "--prompt=" + "ab" * 40, "--temperature=0",
                         *flags)
    assert code == 0 and "prompt 1 is 80 tokens; keeping its last 32, the model's context" in err
    nl, ab = tokenizer.encode("\n"), tokenizer.encode("ab" * 16)
    want = direct([nl, nl, ab, ab], temperature=0.0)
    assert samples(out) == [want[0][1:], want[1][1:], want[2], want[3]]
    assert want[2].startswith("ab" * 16) and len(want[2]) == 48
    # More new tokens than the context holds: the window slides, and the CLI prints what generate gives.
    code, out, err = cli(capsys, f"--init_from={char_run}", "--prompt=The ", "--seed=3", "--num_samples=2",
                         "--max_new_tokens=100")
    assert code == 0, err
    long = [tokenizer.decode(o) for o in generate(run_model, [the, the], 100, vocab_limit=tokenizer.vocab_size,
                                                  top_k=50, seed=3)]
    assert samples(out) == long and len(long[0]) == 104

    # Its export is an HF folder that records the characters, so the CLI decodes it the same way.
    from gpt2_jax.export import main as export_main

    assert export_main([str(char_run), "--to", str(tmp_path / "hf")]) == 0
    assert "no Hugging Face tokenizer matches" in capsys.readouterr().err
    code, out, err = cli(capsys, f"--init_from={tmp_path / 'hf'}", "--prompt=The ", "--temperature=0", *flags)
    assert code == 0, err
    assert samples(out) == greedy


@pytest.mark.parametrize("flags, message", [
    (["--top_k=0"], "--top_k=0 must be >= 1"),
    (["--temperature=-0.5"], "--temperature=-0.5 must be >= 0"),
    (["--top_p=0"], "--top_p=0.0 must be in (0, 1]"),
    (["--top_p=1.01"], "--top_p=1.01 must be in (0, 1]"),
    (["--num_samples=0"], "--num_samples=0 must be >= 1"),
])
def test_cli_rejects_bad_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(flags)
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_cli_errors_name_the_problem(char_run, tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    r = run_cli(f"--init_from={missing}")  # a real process: the message, no traceback
    assert r.returncode == 1 and str(missing) in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, f"--init_from={tmp_path / 'empty'}")
    assert code == 1 and "neither a training run's out_dir" in err
    code, _, err = cli(capsys, f"--init_from={char_run}", "--step=7")
    assert code == 1 and "no checkpoint for step 7" in err and "complete steps: [2]" in err
    code, _, err = cli(capsys, f"--init_from={char_run}", "--prompt=\u2603")
    assert code == 1 and "is not in this char-level vocabulary" in err
