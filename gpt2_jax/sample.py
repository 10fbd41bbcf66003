"""Sample text from a GPT-2 model: an HF GPT-2 name or folder, or a training run's out_dir.

    python -m gpt2_jax.sample --init_from=gpt2 --prompt "Hello, I'm a language model," \\
        --num_samples 4 --max_new_tokens 64 --temperature 1.0 --top_k 50 [--top_p 0.95] --seed 0
    python -m gpt2_jax.sample --init_from=out --temperature 0      # greedy, from a training run's checkpoint

Every sample is drawn in one batch by generate.py's jitted KV-cache loop: one compilation (two past
the context), then one single-position forward pass per token.

- `--max_new_tokens` is not bounded by the model's context (block_size): past it the window slides as
  in nanoGPT's sampler, each new token seeing at least the last block_size // 2 tokens (generate.py's
  docstring has the exact rule), at the cost of a prefill of block_size // 2 tokens every
  block_size // 2 + 1 tokens.
- `--temperature 0` is greedy (argmax; top-k and top-p then do not apply). `--top_k none` turns
  top-k off; `--top_p` (nucleus) is off unless given.
- `--prompt` may be repeated: each prompt gets `--num_samples` samples, all in one batch (prompts of
  different lengths share it, see generate.py).
- A prompt longer than the model's context keeps its LAST block_size tokens, with a warning.
- An empty prompt starts from <|endoftext|> (GPT-2 BPE). A char-level vocabulary has no such token: it
  starts from "\\n" if that is one of its characters, else from id 0 (its first character in sorted
  order). The start token is not printed.
- Text is encoded and decoded with the model's tokenizer: a training run's own (GPT-2 BPE or its
  characters); GPT-2's BPE for HF models. Ids past the tokenizer's vocabulary (the padding rows of a
  50304 vocabulary) are never sampled.
- Same flags and seed: same text.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from gpt2_jax.backends import add_platform_flag, pin_platform
from gpt2_jax.cli import CliError, finite_float, one_line_errors
from gpt2_jax.storage import check_readable


def start_ids(tokenizer) -> list[int]:
    """What an empty prompt starts from: <|endoftext|>, else a newline, else the first character."""
    if tokenizer.eot_token is not None:
        return [tokenizer.eot_token]
    if tokenizer.chars and "\n" in tokenizer.chars:
        return tokenizer.encode("\n")
    return [0]


def crop_prompt(ids: Sequence[int], block_size: int) -> tuple[list[int], int]:
    """(the last block_size tokens of `ids`, how many were dropped): what the model's context holds."""
    ids = list(ids)
    return ids[-block_size:], max(0, len(ids) - block_size)


def _top_k(text: str) -> int | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'none', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gpt2_jax.sample", description=__doc__.splitlines()[0],
                                     epilog="See the module docstring (gpt2_jax/sample.py) for details.")
    parser.add_argument("--init_from", default="gpt2",
                        help="HF GPT-2 name, HF checkpoint folder, or a training run's out_dir (default: gpt2)")
    parser.add_argument("--step", type=int, default=None, help="training runs: this checkpoint step (default: newest)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="text to continue; repeat for several prompts (default: one empty prompt)")
    parser.add_argument("--num_samples", type=int, default=4, help="samples per prompt (default: 4)")
    parser.add_argument("--max_new_tokens", type=int, default=64,
                        help="tokens to sample; may exceed the model's context, whose window then slides "
                        "(default: 64)")
    parser.add_argument("--temperature", type=finite_float, default=1.0,
                        help="softmax temperature; 0 = greedy (default: 1)")
    parser.add_argument("--top_k", type=_top_k, default=50,
                        help="keep the k most likely tokens; 'none': all (default: 50)")
    parser.add_argument("--top_p", type=finite_float, default=None, help="nucleus sampling: keep the top tokens whose "
                        "probability mass reaches p, in (0, 1] (default: off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="compute dtype (default: float32)")
    add_platform_flag(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.temperature < 0:
        parser.error(f"--temperature={args.temperature} must be >= 0 (0 is greedy)")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top_k={args.top_k} must be >= 1; use --top_k=none to sample from every token")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        parser.error(f"--top_p={args.top_p} must be in (0, 1]")
    if args.num_samples < 1:
        parser.error(f"--num_samples={args.num_samples} must be >= 1")
    if args.max_new_tokens < 0:
        parser.error(f"--max_new_tokens={args.max_new_tokens} must be >= 0")
    args.prompt = args.prompt or [""]
    return args


@one_line_errors(interrupted="stopped before the samples were drawn")
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)  # bad flags exit here, before JAX starts
    if problem := pin_platform(args.platform):  # before any JAX backend starts
        raise CliError(problem)
    check_readable(args.init_from, "--init_from")  # a bucket: one line in seconds, not a minute of retries
    from gpt2_jax.generate import generate  # noqa: PLC0415 -- JAX loads after the flags and the platform are settled
    from gpt2_jax.runs import load_model  # noqa: PLC0415 -- (as above)

    model, tokenizer, _ = load_model(args.init_from, step=args.step, dtype=args.dtype)
    if tokenizer is None:
        raise ValueError(f"{args.init_from} has no known tokenizer (vocab_size {model.config.vocab_size} is not "
                         "GPT-2's): sample from the training run's out_dir, or export it with gpt2_jax.export")
    rows, skips = [], []
    for p, prompt in enumerate(args.prompt):
        ids = tokenizer.encode(prompt) or start_ids(tokenizer)
        ids, dropped = crop_prompt(ids, model.config.block_size)
        if dropped:
            print(f"warning: prompt {p} is {len(ids) + dropped} tokens; keeping its last {len(ids)}, the "
                  "model's context (block_size)", file=sys.stderr)
        rows += [ids] * args.num_samples
        skips += [0 if prompt else len(ids)] * args.num_samples  # don't print the start token
    t0 = time.perf_counter()
    out = generate(model, rows, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, vocab_limit=min(tokenizer.vocab_size, model.config.vocab_size), seed=args.seed)
    dt = time.perf_counter() - t0
    for i, (row, skip) in enumerate(zip(out, skips)):
        p, j = divmod(i, args.num_samples)
        print(f"--- sample {j} ---" if len(args.prompt) == 1 else f"--- prompt {p}, sample {j} ---")
        print(tokenizer.decode(row[skip:].tolist()))
    print(f"({len(rows)} samples x {args.max_new_tokens} tokens in {dt:.1f} s, compilation included)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
