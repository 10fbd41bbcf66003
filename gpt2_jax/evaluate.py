"""Evaluation: validation loss / perplexity, and HellaSwag.

    python -m gpt2_jax.evaluate loss --init_from=OUT_DIR --data DATA_DIR_OR_TEXT_FILE [--block_size T]
    python -m gpt2_jax.evaluate hellaswag --init_from=gpt2 [--data FILE] [--limit N]

`--init_from` is an HF GPT-2 name (`gpt2`, ...), an HF checkpoint folder, or a training run's out_dir
(its newest checkpoint, or `--step N`); the model's tokenizer comes with it (`load_model`).

Loss: the mean next-token cross-entropy over the val split of a token-shard folder (batches laid out
as `data.TokenLoader` reads them: B rows of T consecutive tokens, one pass over the split) or over a
UTF-8 text file tokenised with the model's tokenizer (<|endoftext|> first, as `gpt2_jax.data` writes a
document). The softmax runs over the tokenizer's vocabulary only, as HellaSwag's does: the extra rows
of a padded 50304 vocabulary are never text. (The trainer's in-loop val loss keeps them in; a model
trained with them learns to give them almost no mass, so the two then differ very little.)
Perplexity is exp(loss).

HellaSwag (Zellers et al. 2019): does the model prefer the right ending of a short story?

Completion-style scoring, as in the "reproduce GPT-2 124M" lecture's hellaswag.py: each example is a
context and 4 candidate endings; the model reads `context + " " + ending` for each candidate, and the
candidate whose ending tokens it finds least surprising wins. The model never sees the 4 options side by
side, so even a small model that cannot do multiple-choice prompting gets a signal.

Two scores, with the lecture's definitions (argmin over the 4 candidates):

    acc       the SUM of the ending tokens' cross-entropies      (favours short endings)
    acc_norm  the MEAN of the ending tokens' cross-entropies     (normalised by ending token count)

Note: EleutherAI's lm-evaluation-harness normalises acc_norm by the ending's length in *bytes*, not
tokens, so its numbers differ slightly. GPT-2 124M scores about 0.294 acc_norm on the official file
(the lecture's figure); `../shared/data/hellaswag_val.jsonl` is lightly cleaned, so expect a little off.

Batching: several examples (4 rows each) go through one jitted forward pass. Rows are right-padded to a
bucket length (a multiple of 32, capped at block_size) and the batch to a fixed row count, so jit
compiles one program per bucket, a handful in all. With a mesh, the batch rows are split over the mesh's
data axes.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import secrets
import shutil
import sys
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from gpt2_jax.config import GPT2_VOCAB_SIZE
from gpt2_jax.data import Tokenizer
from gpt2_jax.model import GPT
from gpt2_jax.sharding import BATCH_AXES, make_mesh

HELLASWAG_VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
NUM_ENDINGS = 4
BUCKET = 32  # rows are padded to a multiple of this many tokens: few shapes, so few compilations

Encode = Callable[[str], Sequence[int]]


# ------------------------------------------------------------------------------ data


def default_cache_dir() -> Path:
    """Where downloads go: $GPT2_JAX_CACHE, else $XDG_CACHE_HOME/gpt2_jax, else ~/.cache/gpt2_jax."""
    if "GPT2_JAX_CACHE" in os.environ:
        return Path(os.environ["GPT2_JAX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "gpt2_jax"


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
    path = Path(path) if path is not None else download_hellaswag()
    if not path.is_file():
        raise FileNotFoundError(f"HellaSwag file {path} does not exist")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or None for all examples)")
    examples = []
    with open(path, encoding="utf-8") as f:
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
    logits = model(tokens)[:, :-1, :vocab_limit]  # (R, L-1, V): drop padded-vocab columns
    targets = tokens[:, 1:]  # (R, L-1)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # float32, as the model returns float32 logits
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.where(mask[:, 1:] == 1, log_z - target_logits, 0.0)


def _batch_spec(mesh: Mesh) -> tuple[P, int]:
    """PartitionSpec that splits rows over the mesh's data-parallel axes, and the row multiple that needs."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    if not axes:
        raise ValueError(f"mesh axes {mesh.axis_names} include none of the batch axes {BATCH_AXES}")
    return P(axes), math.prod(mesh.shape[a] for a in axes)


def _on_mesh(state, mesh: Mesh):
    """Parameters already laid out on `mesh`'s devices and axes keep their layout (e.g. FSDP or tensor
    shards placed with sharding.state_shardings); the others are replicated over the mesh."""

    def place(x):
        s = getattr(x, "sharding", None)
        same_mesh = (isinstance(s, NamedSharding) and s.mesh.axis_names == mesh.axis_names
                     and s.mesh.devices.shape == mesh.devices.shape and (s.mesh.devices == mesh.devices).all())
        return jax.device_put(x, NamedSharding(mesh, s.spec if same_mesh else P()))

    return jax.tree.map(place, state)


def _place(state, mesh: Mesh | None, num_rows: int):
    """(state, row sharding, num_rows) for batches of `num_rows` rows: without a mesh, unchanged (the
    default device); with one, rows split over its batch axes (num_rows rounded up to a multiple of
    their size) and parameters not yet on the mesh replicated."""
    if mesh is None:
        return state, None, num_rows
    # The model leaves sharding to XLA's propagation, which needs Auto axes; jax.make_mesh's default
    # Explicit axes would make its embedding gather ambiguous. Same devices, so no data moves.
    mesh = mesh.update(axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    spec, multiple = _batch_spec(mesh)
    return _on_mesh(state, mesh), NamedSharding(mesh, spec), -(-num_rows // multiple) * multiple


def _run_on_rows(fn, graphdef, state, row_sharding, *arrays, vocab_limit: int) -> np.ndarray:
    """fn(graphdef, state, *arrays, vocab_limit) on host arrays split by rows; the result as float64 numpy."""
    if row_sharding is not None:  # global arrays split by rows; every process holds the whole batch
        arrays = [jax.make_array_from_callback(a.shape, row_sharding, lambda idx, a=a: a[idx]) for a in arrays]
    out = fn(graphdef, state, *arrays, vocab_limit)
    if not out.is_fully_addressable:  # multi-host: gather every row onto each process
        from jax.experimental import multihost_utils  # noqa: PLC0415

        out = multihost_utils.process_allgather(out, tiled=True)
    return np.asarray(out, dtype=np.float64)


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
    state, row_sharding, num_rows = _place(state, mesh, NUM_ENDINGS * batch_examples)

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
        losses = _run_on_rows(_token_losses, graphdef, state, row_sharding, tokens, mask,
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


# ------------------------------------------------------------------------------ loss


@functools.partial(jax.jit, static_argnums=(0, 4))
def _row_losses(graphdef, state, x, y, vocab_limit: int) -> jax.Array:
    """Mean next-token cross-entropy of each row: (R,) float32 for x, y (R, T), y = x shifted by one."""
    model = nnx.merge(graphdef, state)
    logits = model(x)[..., :vocab_limit]  # (R, T, V): drop padded-vocab columns
    log_z = jax.nn.logsumexp(logits, axis=-1)  # (R, T)
    target_logits = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    return (log_z - target_logits).mean(axis=1)


def _batches_in(num_tokens: int, batch_size: int, block_size: int) -> int:
    """Whole batches of `batch_size * block_size + 1` tokens, stepping by batch_size * block_size."""
    return max(0, (num_tokens - 1) // (batch_size * block_size))


def text_batches(tokens: np.ndarray, batch_size: int, block_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(x, y) int32 batches (batch_size, block_size) over a 1-D token array, laid out as TokenLoader lays
    out a shard: batch k is tokens[k*B*T : (k+1)*B*T + 1]. Tokens left over at the end are not scored."""
    B, T = batch_size, block_size
    for k in range(_batches_in(len(tokens), B, T)):
        buf = np.asarray(tokens[k * B * T:(k + 1) * B * T + 1], np.int32)
        yield buf[:-1].reshape(B, T), buf[1:].reshape(B, T)


def shard_batches(data_dir: str | os.PathLike, batch_size: int, block_size: int,
                  vocab_size: int | None = None) -> tuple[int, Iterator[tuple[np.ndarray, np.ndarray]]]:
    """(number of batches, the batches) of one pass over the val split of a token-shard folder."""
    from gpt2_jax.data import TokenLoader  # noqa: PLC0415

    loader = TokenLoader(data_dir, "val", batch_size, block_size, vocab_size=vocab_size)
    n = sum(_batches_in(size, batch_size, block_size) for size in loader.sizes)
    return n, (loader.next_batch() for _ in range(n))


def evaluate_loss(model: GPT, batches: Iterable[tuple[np.ndarray, np.ndarray]], *, vocab_limit: int | None = None,
                  mesh: Mesh | None = None, total: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Mean next-token loss of `model` over (x, y) batches of one shape (B, T); softmax over the first
    `vocab_limit` ids (default: all). Returns {"loss", "perplexity", "tokens", "batches"}.

    With `mesh`, rows are split over its batch axes (padded with rows that are scored and dropped).
    """
    vocab_limit = vocab_limit or model.config.vocab_size
    graphdef, state = nnx.split(model)
    row_sharding, num_rows = None, None
    loss_sum, tokens, n = 0.0, 0, 0
    for x, y in tqdm(batches, total=total, desc="loss", unit="batch", disable=not progress):
        B, T = x.shape
        if T > model.config.block_size:
            raise ValueError(f"block_size {T} exceeds the model's block_size {model.config.block_size}")
        if max(x.max(), y.max()) >= vocab_limit:
            raise ValueError(f"token id {max(x.max(), y.max())} is outside the model's vocabulary ({vocab_limit})")
        if num_rows is None:
            state, row_sharding, num_rows = _place(state, mesh, B)
        pad = ((0, num_rows - B), (0, 0))  # rows the mesh needs beyond B: scored, then dropped
        rows = _run_on_rows(_row_losses, graphdef, state, row_sharding, np.pad(x, pad), np.pad(y, pad),
                            vocab_limit=vocab_limit)[:B]
        loss_sum, tokens, n = loss_sum + rows.sum() * T, tokens + B * T, n + 1
    if n == 0:
        raise ValueError("no batches to evaluate")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "batches": n}


# ------------------------------------------------------------------------------ command line


def is_training_run(path: Path) -> bool:
    """Whether `path` is a training run's out_dir (it has checkpoints/) or its checkpoints/ folder."""
    return path.is_dir() and ((path / "checkpoints").is_dir() or path.name == "checkpoints")


def load_training_run(path: str | os.PathLike, step: int | None = None,
                      **overrides) -> tuple[GPT, Tokenizer | None, dict]:
    """`trainer.load_run` with a clear error for a missing step, and the tokenizer of checkpoints that
    predate recorded tokenizers inferred from the vocabulary (GPT-2 BPE if GPT-2-sized, else None)."""
    from gpt2_jax.checkpoint import Checkpointer  # noqa: PLC0415
    from gpt2_jax.trainer import load_run  # noqa: PLC0415

    path = Path(path)
    folder = path if path.name == "checkpoints" else path / "checkpoints"
    if not folder.is_dir():
        raise FileNotFoundError(f"{path} is not a training run: no checkpoints/ folder in it")
    absl = logging.getLogger("absl")  # orbax logs a warning each time a folder is opened read-only
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with Checkpointer(folder, read_only=True) as ckpt:
            steps = ckpt.all_steps()
        if not steps or (step is not None and step not in steps):
            raise FileNotFoundError(f"no checkpoint{'' if step is None else f' for step {step}'} in {folder} "
                                    f"(complete steps: {steps or 'none'})")
        model, tokenizer, meta = load_run(path, step=step, **overrides)
    finally:
        absl.setLevel(level)
    if tokenizer is None:
        tokenizer = Tokenizer.gpt2() if model.config.vocab_size >= GPT2_VOCAB_SIZE else None
    return model, tokenizer, meta


def load_model(init_from: str, *, step: int | None = None, **overrides) -> tuple[GPT, Tokenizer | None]:
    """(model, tokenizer) from `init_from`:

    - a training run's out_dir (or its checkpoints/ folder): `trainer.load_run`, the newest good
      checkpoint or `step`; the run's own tokenizer (GPT-2 BPE, or its characters);
    - an HF GPT-2 name (`gpt2`, `gpt2-medium`, ...) or checkpoint folder: `convert.load_hf`; the
      tokenizer that `python -m gpt2_jax.export` recorded in the folder, else GPT-2 BPE (tiktoken) for a
      GPT-2-sized vocabulary, else None (unknown).

    `overrides` set runtime GPTConfig fields (`dtype`, `attention`). Missing paths raise FileNotFoundError.
    """
    path = Path(init_from).expanduser()
    if is_training_run(path):
        model, tokenizer, _ = load_training_run(path, step, **overrides)
        return model, tokenizer
    if step is not None:
        raise ValueError(f"--step={step} applies to training runs only; {init_from} is not one (no checkpoints/)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is neither a training run's out_dir (no checkpoints/ folder) nor an HF "
                                "checkpoint folder (no config.json)")
    if not path.exists() and (path.is_absolute() or init_from.startswith((".", "~"))):
        raise FileNotFoundError(f"{path} does not exist; --init_from takes a training run's out_dir, an HF "
                                "checkpoint folder or an HF GPT-2 name (gpt2, gpt2-medium, ...)")
    from gpt2_jax.convert import load_hf, resolve_checkpoint  # noqa: PLC0415
    from gpt2_jax.export import read_tokenizer  # noqa: PLC0415

    folder = resolve_checkpoint(init_from)  # a Hub name is downloaded (or found in the HF cache) once
    model = load_hf(folder, **overrides)
    tokenizer = read_tokenizer(folder)
    if tokenizer is None and model.config.vocab_size >= GPT2_VOCAB_SIZE:
        tokenizer = Tokenizer.gpt2()
    return model, tokenizer


def _default_mesh() -> Mesh | None:
    """Every device on the data axis (params replicated, examples split), or None on one device."""
    return make_mesh() if jax.device_count() > 1 else None


def _loss_command(args) -> dict[str, Any]:
    if args.batch_size < 1 or args.block_size < 0 or args.max_batches < 0:
        raise ValueError(f"--batch_size={args.batch_size} must be >= 1, --block_size={args.block_size} and "
                         f"--max_batches={args.max_batches} >= 0 (0: the model's context / every batch)")
    data = Path(args.data).expanduser()
    if not data.exists():
        raise FileNotFoundError(f"--data {data} does not exist; pass a token-shard folder (its val split is "
                                "scored) or a UTF-8 text file")
    model, tokenizer = load_model(args.init_from, step=args.step, dtype=args.dtype)
    B, T = args.batch_size, args.block_size or model.config.block_size
    if T > model.config.block_size:
        raise ValueError(f"--block_size={T} exceeds the model's context of {model.config.block_size} tokens")
    if data.is_dir():
        if tokenizer is not None:
            data_tokenizer = Tokenizer.load(data)
            if (data_tokenizer.name, data_tokenizer.chars) != (tokenizer.name, tokenizer.chars):
                raise ValueError(f"{data} was tokenised {data_tokenizer.name}-level ({data_tokenizer.vocab_size} "
                                 f"tokens) but the model's tokenizer is {tokenizer.name} "
                                 f"({tokenizer.vocab_size} tokens); score data made with the model's tokenizer")
        total, batches = shard_batches(data, B, T, vocab_size=model.config.vocab_size)
        where = f"{data} (val split)"
    else:
        if tokenizer is None:
            raise ValueError(f"{args.init_from} has no known tokenizer (vocab_size {model.config.vocab_size}); "
                             "score a token-shard folder instead, or pass the training run's out_dir")
        ids = ([] if tokenizer.eot_token is None else [tokenizer.eot_token]) + tokenizer.encode(
            data.read_text(encoding="utf-8"))
        total = _batches_in(len(ids), B, T)
        if total == 0:
            raise ValueError(f"{data} holds {len(ids)} tokens, too few for one batch of --batch_size * "
                             f"--block_size + 1 = {B} * {T} + 1; use a smaller --batch_size or --block_size")
        batches = text_batches(np.asarray(ids), B, T)
        where = str(data)
    if args.max_batches:
        total = min(total, args.max_batches)
        batches = (b for _, b in zip(range(total), batches))
    result = evaluate_loss(model, batches, vocab_limit=tokenizer.vocab_size if tokenizer else None,
                           mesh=_default_mesh(), total=total, progress=not args.no_progress)
    print(f"loss {args.init_from} on {where}: {result['loss']:.4f} (perplexity {result['perplexity']:.2f}) over "
          f"{result['tokens']:,} tokens = {result['batches']} batches of {B} x {T}")
    return result


def _hellaswag_command(args) -> dict[str, Any]:
    examples = load_hellaswag(args.data, limit=args.limit)
    model, tokenizer = load_model(args.init_from, step=args.step, dtype=args.dtype)
    if tokenizer is None or tokenizer.name != "gpt2":
        kind = f"{tokenizer.name}-level" if tokenizer else f"of unknown vocabulary ({model.config.vocab_size} ids)"
        raise ValueError(f"HellaSwag needs a GPT-2 BPE model; {args.init_from} is {kind}")
    result = evaluate_hellaswag(model, examples, tokenizer.encode, batch_examples=args.batch_examples,
                                mesh=_default_mesh(), progress=not args.no_progress)
    print(f"hellaswag {args.init_from}: {result['n']} examples, acc {result['acc']:.4f} (summed loss), "
          f"acc_norm {result['acc_norm']:.4f} (mean loss per ending token)")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2_jax.evaluate", description="Evaluate a GPT-2 model.")
    commands = parser.add_subparsers(dest="command", required=True)
    ls = commands.add_parser("loss", help="validation loss and perplexity on token shards or a text file")
    hs = commands.add_parser("hellaswag", help="HellaSwag validation accuracy (acc and acc_norm)")
    for sub in (ls, hs):
        sub.add_argument("--init_from", default="gpt2",
                         help="HF GPT-2 name, HF checkpoint folder, or a training run's out_dir (default: gpt2)")
        sub.add_argument("--step", type=int, default=None, help="training runs: this checkpoint step (default: newest)")
        sub.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                         help="compute dtype (logits and losses stay float32)")
        sub.add_argument("--out", default=None, help="write the results to this JSON file")
        sub.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    ls.add_argument("--data", required=True, help="token-shard folder (its val split) or a UTF-8 text file")
    ls.add_argument("--batch_size", type=int, default=8, help="rows per forward pass (default: 8)")
    ls.add_argument("--block_size", type=int, default=0, help="tokens per row (default: the model's context)")
    ls.add_argument("--max_batches", type=int, default=0, help="score only the first N batches (default: all)")
    hs.add_argument("--data", default=None, help="HellaSwag JSONL file (default: download the official val)")
    hs.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    hs.add_argument("--batch_examples", type=int, default=8, help="examples (x4 rows) per forward pass")
    args = parser.parse_args(argv)

    try:
        result = (_loss_command if args.command == "loss" else _hellaswag_command)(args)
    except (OSError, ValueError, RuntimeError, ImportError) as e:  # OSError: FileNotFoundError, NotADirectoryError
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
