"""HellaSwag (Zellers et al. 2019): does the model prefer the right ending of a short story?

    python -m gpt2_jax.evaluate hellaswag --init_from=gpt2 [--data FILE] [--limit N]

Completion-style scoring, as in the "reproduce GPT-2 124M" lecture's hellaswag.py: each example is a
context and 4 candidate endings; the model reads `context + " " + ending` for each candidate, and the
candidate whose ending tokens it finds least surprising wins. The model never sees the 4 options side by
side, so even a small model that cannot do multiple-choice prompting gets a signal.

Two scores, with the lecture's definitions (argmin over the 4 candidates):

    acc       the SUM of the ending tokens' cross-entropies      (favours short endings)
    acc_norm  the MEAN of the ending tokens' cross-entropies     (normalised by ending token count)

Note: EleutherAI's lm-evaluation-harness normalises acc_norm by the ending's length in *bytes*, not
tokens, so its numbers differ slightly. GPT-2 124M scores 0.2955 acc_norm on the official file (the
lecture's figure, `plot.GPT2_124M_HELLASWAG`); `../shared/data/hellaswag_val.jsonl` is lightly cleaned,
so expect a little off.

Batching: several examples (4 rows each) go through one jitted forward pass. Rows are right-padded to a
bucket length (a multiple of 32, capped at block_size) and the batch to a fixed row count, so jit
compiles one program per bucket, a handful in all. With a mesh, the batch rows are split over the mesh's
data axes. The padded ids of a 50304 vocabulary are left out of the softmax.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from gpt2_jax.config import GPT2_VOCAB_SIZE
from gpt2_jax.loss import token_losses
from gpt2_jax.model import GPT
from gpt2_jax.runs import load_model
from gpt2_jax.sharding import eval_mesh, place_for_rows, run_on_rows
from gpt2_jax.storage import cache_dir, run_path

HELLASWAG_VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
NUM_ENDINGS = 4
BUCKET = 32  # rows are padded to a multiple of this many tokens: few shapes, so few compilations

Encode = Callable[[str], Sequence[int]]


# ------------------------------------------------------------------------------ data


def default_cache_dir() -> Path:
    """Where downloads go: $GPT2_JAX_CACHE, else $XDG_CACHE_HOME/gpt2_jax, else ~/.cache/gpt2_jax."""
    return cache_dir()


def download_hellaswag(cache_dir: str | os.PathLike | None = None, url: str = HELLASWAG_VAL_URL) -> Path:
    """The official validation file, downloaded once into `cache_dir` (atomically: temp file + rename)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = cache / "hellaswag_val.jsonl"
    if dest.is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{dest.name}.{secrets.token_hex(4)}.tmp"  # same folder, so the rename is atomic
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
        os.replace(tmp, dest)
    except OSError as e:  # urllib's URLError, timeouts and disk errors are all OSErrors
        raise RuntimeError(f"could not download HellaSwag from {url} ({type(e).__name__}: {e}); offline, "
                           "pass a local copy with --data FILE (load_hellaswag(path))") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _check_example(ex: Any, where: str) -> dict:
    """`ex` if it has HellaSwag's schema, else a ValueError that names `where` (file:line) and the field."""
    if not isinstance(ex, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(ex).__name__}")
    for field in ("ind", "activity_label", "ctx", "label", "endings"):
        if field not in ex:
            raise ValueError(f"{where}: missing field {field!r}")
    if not isinstance(ex["ind"], int) or isinstance(ex["ind"], bool):
        raise ValueError(f"{where}: field 'ind' must be an integer, got {ex['ind']!r}")
    for field in ("activity_label", "ctx"):
        if not isinstance(ex[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {type(ex[field]).__name__}")
    endings = ex["endings"]
    if (not isinstance(endings, list) or len(endings) != NUM_ENDINGS
            or not all(isinstance(e, str) for e in endings)):
        raise ValueError(f"{where}: field 'endings' must be a list of {NUM_ENDINGS} strings, got {endings!r}")
    label = ex["label"]
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < NUM_ENDINGS:
        raise ValueError(f"{where}: field 'label' must be an integer in 0..{NUM_ENDINGS - 1}, got {label!r}")
    return ex


def load_hellaswag(path: str | os.PathLike | None = None, limit: int | None = None) -> list[dict]:
    """HellaSwag examples from a JSONL file (`ind, activity_label, ctx, label, endings` per line).

    `path=None` downloads the official validation file once (see `download_hellaswag`). `limit` keeps the
    first N examples. A line that breaks the schema raises ValueError naming the file, line and field.
    """
    path = run_path(path) if path is not None else download_hellaswag()  # local or gs://
    if not path.is_file():
        raise FileNotFoundError(f"HellaSwag file {path} does not exist")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or None for all examples)")
    examples = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():  # tolerate blank lines (e.g. a trailing newline)
                continue
            where = f"{path}:{lineno}"
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            examples.append(_check_example(ex, where))
    if not examples:
        raise ValueError(f"{path} holds no HellaSwag examples")
    return examples


def render_example(example: dict, encode: Encode) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens (4, L) int32, mask (4, L) int32, label): row i is context + ending i, right-padded with 0.

    mask is 1 on the ending's tokens. Endings are encoded as " " + ending: in GPT-2's BPE a word's
    leading space belongs to the word's token, and the context ends without one.
    """
    ctx = list(encode(example["ctx"]))
    rows, masks = [], []
    for ending in example["endings"]:
        end = list(encode(" " + ending))
        rows.append(ctx + end)
        masks.append([0] * len(ctx) + [1] * len(end))
    L = max(len(r) for r in rows)
    tokens = np.zeros((NUM_ENDINGS, L), np.int32)
    mask = np.zeros((NUM_ENDINGS, L), np.int32)
    for i, (row, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(row)] = row
        mask[i, :len(m)] = m
    return tokens, mask, int(example["label"])


# ------------------------------------------------------------------------------ scoring


def bucket_length(n: int, block_size: int) -> int:
    """`n` rounded up to a multiple of BUCKET, capped at block_size."""
    return min(block_size, -(-n // BUCKET) * BUCKET)


def pack_batch(rendered: Sequence[tuple[np.ndarray, np.ndarray, int]], num_rows: int,
               block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack rendered examples into (num_rows, L) tokens and mask, L a bucket length <= block_size.

    A row longer than block_size keeps its last block_size tokens (cropped from the left: the ending
    and the end of the context). Rows past the examples are all padding (mask 0).
    """
    lengths = [int(np.flatnonzero(m).max()) + 1 for _, mask, _ in rendered for m in mask]  # ctx + ending
    L = bucket_length(max(lengths), block_size)
    tokens = np.zeros((num_rows, L), np.int32)
    mask = np.zeros((num_rows, L), np.int32)
    r = 0
    for t, m, _ in rendered:
        for j in range(NUM_ENDINGS):
            n = lengths[r]
            start = max(0, n - L)
            tokens[r, :n - start] = t[j, start:n]
            mask[r, :n - start] = m[j, start:n]
            r += 1
    return tokens, mask


@functools.partial(jax.jit, static_argnums=(0, 4))
def _token_losses(graphdef, state, tokens, mask, vocab_limit: int) -> jax.Array:
    """Cross-entropy of each masked token given the tokens before it: (R, L-1) float32, 0 where mask=0.

    Entry [r, t] scores tokens[r, t + 1] from the logits at position t.
    """
    model = nnx.merge(graphdef, state)
    losses = token_losses(model(tokens)[:, :-1], tokens[:, 1:], vocab_limit)  # (R, L-1); padded ids left out
    return jnp.where(mask[:, 1:] == 1, losses, 0.0)


def evaluate_hellaswag(model: GPT, examples: Sequence[dict], encode: Encode, *, batch_examples: int = 8,
                       mesh: Mesh | None = None, progress: bool = True) -> dict[str, Any]:
    """Score `examples` (from `load_hellaswag`) with `model`; `encode` maps text to GPT-2 token ids.

    Returns {"acc", "acc_norm", "n", "per_example": [{"ind", "label", "pred", "pred_norm",
    "losses" (4 summed ending losses), "avg_losses" (4 mean ending losses)}]}; see the module docstring
    for the definitions. `batch_examples` examples (4 rows each) share one forward pass; with `mesh`,
    rows are split over its batch axes (sharding.BATCH_AXES; the row count is padded to a multiple of
    their size) and parameters not yet on the mesh are replicated; without, it runs on the default device.
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    if batch_examples < 1:
        raise ValueError(f"batch_examples={batch_examples} must be >= 1")
    cfg = model.config
    # Ids >= 50257 are the zero rows of a padded vocabulary: never real text, so they are left out of
    # the softmax (with zero rows their logit is 0, which would otherwise shift every loss a little).
    vocab_limit = min(cfg.vocab_size, GPT2_VOCAB_SIZE)
    graphdef, state = nnx.split(model)
    state, row_sharding, num_rows = place_for_rows(state, mesh, NUM_ENDINGS * batch_examples)

    per_example, correct_norm = [], 0
    bar = tqdm(total=len(examples), desc="hellaswag", unit="ex", disable=not progress)
    for start in range(0, len(examples), batch_examples):
        chunk = examples[start:start + batch_examples]
        rendered = [render_example(ex, encode) for ex in chunk]
        tokens, mask = pack_batch(rendered, num_rows, cfg.block_size)
        if tokens.max() >= vocab_limit:
            raise ValueError(f"token id {tokens.max()} is outside the model's vocabulary ({vocab_limit}); "
                             "HellaSwag needs a GPT-2 BPE model and encoder")
        counts = mask[:, 1:].sum(axis=1)  # scored ending tokens per row
        losses = run_on_rows(_token_losses, graphdef, state, row_sharding, tokens, mask,
                              vocab_limit=vocab_limit)  # (num_rows, L-1)
        for i, (ex, (_, _, label)) in enumerate(zip(chunk, rendered)):
            rows = slice(NUM_ENDINGS * i, NUM_ENDINGS * (i + 1))
            # A row scores >= 1 token unless it is a single token (empty context, one-token ending):
            # such a candidate cannot be scored, so it gets an infinite loss and never wins.
            sums = np.where(counts[rows] > 0, losses[rows].sum(axis=1), np.inf)
            avgs = sums / np.maximum(counts[rows], 1)
            per_example.append({"ind": ex["ind"], "label": label, "pred": int(sums.argmin()),
                                "pred_norm": int(avgs.argmin()), "losses": sums.tolist(),
                                "avg_losses": avgs.tolist()})
            correct_norm += per_example[-1]["pred_norm"] == label
        bar.update(len(chunk))
        bar.set_postfix(acc_norm=f"{correct_norm / len(per_example):.4f}")
    bar.close()
    n = len(per_example)
    return {"acc": sum(e["pred"] == e["label"] for e in per_example) / n,
            "acc_norm": correct_norm / n,
            "n": n, "per_example": per_example}


# ------------------------------------------------------------------------------ command line


def add_arguments(parser) -> None:
    parser.add_argument("--data", default=None, help="HellaSwag JSONL file (default: download the official val)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    parser.add_argument("--batch_examples", type=int, default=8, help="examples (x4 rows) per forward pass")


def command(args) -> dict[str, Any]:
    examples = load_hellaswag(args.data, limit=args.limit)
    model, tokenizer, _ = load_model(args.init_from, step=args.step, dtype=args.dtype)
    if tokenizer is None or tokenizer.name != "gpt2":
        kind = f"{tokenizer.name}-level" if tokenizer else f"of unknown vocabulary ({model.config.vocab_size} ids)"
        raise ValueError(f"HellaSwag needs a GPT-2 BPE model; {args.init_from} is {kind}")
    result = evaluate_hellaswag(model, examples, tokenizer.encode, batch_examples=args.batch_examples,
                                mesh=eval_mesh(), progress=not args.no_progress)
    print(f"hellaswag {args.init_from}: {result['n']} examples, acc {result['acc']:.4f} (summed loss), "
          f"acc_norm {result['acc_norm']:.4f} (mean loss per ending token)")
    return result

