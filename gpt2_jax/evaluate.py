"""Validation loss and perplexity (+ the evaluation CLI, HellaSwag's included).

    python -m gpt2_jax.evaluate loss --init_from=OUT_DIR --data DATA_DIR_OR_TEXT_FILE [--block_size T]
    python -m gpt2_jax.evaluate hellaswag --init_from=gpt2 [--data FILE] [--limit N]    # hellaswag.py

`--init_from` is an HF GPT-2 name (`gpt2`, ...), an HF checkpoint folder, or a training run's out_dir
(its newest checkpoint, or `--step N`); the model's tokenizer comes with it (`runs.load_model`).

Loss: the mean next-token cross-entropy over the val split of a token-shard folder (every whole batch of
windows of T + 1 tokens at stride T, as the trainer's in-loop val loss reads them: `data.EvalWindows`) or over a
UTF-8 text file tokenised with the model's tokenizer (<|endoftext|> first, as `gpt2_jax.data` writes a
document). The softmax runs over the tokenizer's vocabulary only, as in the trainer's in-loop val loss
and HellaSwag: the extra rows of a padded 50304 vocabulary are never text. Perplexity is exp(loss).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from gpt2_jax import hellaswag
from gpt2_jax.backends import add_platform_flag, pin_platform
from gpt2_jax.cli import BadFlag, CliError, one_line_errors
from gpt2_jax.data import EvalWindows, open_remote
from gpt2_jax.loss import token_losses
from gpt2_jax.model import GPT
from gpt2_jax.runs import load_model
from gpt2_jax.sharding import eval_mesh, place_for_rows, run_on_rows
from gpt2_jax.storage import check_readable, is_remote, results_file
from gpt2_jax.tokenizer import Tokenizer


@functools.partial(jax.jit, static_argnums=(0, 4))
def _row_losses(graphdef, state, x, y, vocab_limit: int) -> jax.Array:
    """Mean next-token cross-entropy of each row: (R,) float32 for x, y (R, T), y = x shifted by one."""
    model = nnx.merge(graphdef, state)
    return token_losses(model(x), y, vocab_limit).mean(axis=1)  # padded-vocab ids out of the softmax


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
    """(number of batches, the batches) of one pass over the val split of a token-shard folder: every
    whole batch of windows, laid out as the trainer's in-loop val loss reads them (data.EvalWindows with
    no token limit), so the two agree on the same checkpoint."""
    windows = EvalWindows(data_dir, block_size, batch_size, max_tokens=None, vocab_size=vocab_size)
    return len(windows), iter(windows)


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
            state, row_sharding, num_rows = place_for_rows(state, mesh, B)
        pad = ((0, num_rows - B), (0, 0))  # rows the mesh needs beyond B: scored, then dropped
        rows = run_on_rows(_row_losses, graphdef, state, row_sharding, np.pad(x, pad), np.pad(y, pad),
                            vocab_limit=vocab_limit)[:B]
        loss_sum, tokens, n = loss_sum + rows.sum() * T, tokens + B * T, n + 1
    if n == 0:
        raise ValueError("no batches to evaluate")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "batches": n}



# ------------------------------------------------------------------------------ command line


def _loss_command(args) -> dict[str, Any]:
    if args.batch_size < 1 or args.block_size < 0 or args.max_batches < 0:
        raise ValueError(f"--batch_size={args.batch_size} must be >= 1, --block_size={args.block_size} and "
                         f"--max_batches={args.max_batches} >= 0 (0: the model's context / every batch)")
    # Token shards in a bucket: their local cache folder, each shard fetched when first read (data.remote).
    data = open_remote(args.data) if is_remote(args.data) else Path(args.data).expanduser()
    if not data.exists():
        raise FileNotFoundError(f"--data {data} does not exist; pass a token-shard folder (its val split is "
                                "scored) or a UTF-8 text file")
    model, tokenizer, _ = load_model(args.init_from, step=args.step, dtype=args.dtype)
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
        where = f"{args.data} (val split)"
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
                           mesh=eval_mesh(), total=total, progress=not args.no_progress)
    print(f"loss {args.init_from} on {where}: {result['loss']:.4f} (perplexity {result['perplexity']:.2f}) over "
          f"{result['tokens']:,} tokens = {result['batches']} batches of {B} x {T}")
    return result


def build_parser() -> argparse.ArgumentParser:
    """The two sub-commands, loss and hellaswag, and their flags."""
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
        add_platform_flag(sub)
    ls.add_argument("--data", required=True, help="token-shard folder (its val split) or a UTF-8 text file")
    ls.add_argument("--batch_size", type=int, default=8, help="rows per forward pass (default: 8)")
    ls.add_argument("--block_size", type=int, default=0, help="tokens per row (default: the model's context)")
    ls.add_argument("--max_batches", type=int, default=0, help="score only the first N batches (default: all)")
    hellaswag.add_arguments(hs)
    return parser


@one_line_errors(interrupted="stopped before the evaluation finished; nothing was written")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = results_file(args.out, "--out") if args.out else None  # before the evaluation, not after it
    except (OSError, ValueError, ImportError) as e:
        raise BadFlag(e) from None
    if problem := pin_platform(args.platform):  # before any JAX backend starts
        raise CliError(problem)
    for flag, path in (("--init_from", args.init_from), ("--data", args.data)):
        check_readable(path, flag)  # a bucket: one line in seconds, not a minute of retries
    result = (_loss_command if args.command == "loss" else hellaswag.command)(args)
    if out is not None:
        out.write_text(json.dumps(result, indent=1) + "\n")  # local or gs://
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
