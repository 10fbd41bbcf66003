"""The command line of ``python -m gpt2_jax.data`` (``--help`` lists the options)::

    python -m gpt2_jax.data fineweb-edu --out data/fineweb10B     # FineWeb-Edu 10BT, GPT-2 BPE
    python -m gpt2_jax.data text input.txt --out data/shakespeare --tokenizer char
    python -m gpt2_jax.data files "chats/*.jsonl" --out data/chats --text_field=text   # .txt .jsonl .json .parquet
    python -m gpt2_jax.data hf roneneldan/TinyStories --val_split=validation --out data/tinystories
    python -m gpt2_jax.data fineweb-edu --out gs://BUCKET/fineweb10B  # straight to a bucket (train.py --data=gs://...)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt2_jax import storage
from gpt2_jax.cli import finite_float
from gpt2_jax.data.prepare import DEFAULT_SHARD_SIZE, prepare_fineweb, prepare_text
from gpt2_jax.data.shards import SPLITS
from gpt2_jax.data.sources import prepare_files, prepare_hf

# A shard is a file that training holds open: tiny shards make a dataset of more files than tokens' worth
# (--shard_size 1 wrote 200,000 files) and can exhaust the open-file limit; huge ones are a buffer in memory.
MIN_SHARD_SIZE, MAX_SHARD_SIZE = 1_000, 1_000_000_000


def shard_size(text: str) -> int:
    """argparse type for --shard_size: an int in [MIN_SHARD_SIZE, MAX_SHARD_SIZE], saying why if not."""
    try:
        n = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens") from None
    if n < MIN_SHARD_SIZE:
        raise argparse.ArgumentTypeError(
            f"{n} tokens per shard is too small: every shard is a file that training keeps open, and a "
            f"1B-token dataset would be {10**9 // max(n, 1):,} files; use at least {MIN_SHARD_SIZE:,} "
            f"(the default is {DEFAULT_SHARD_SIZE:,})")
    if n > MAX_SHARD_SIZE:
        raise argparse.ArgumentTypeError(
            f"{n:,} tokens per shard is too large: a shard is built in memory ({2 * n / 2**30:.0f} GiB) and "
            f"read as one file; use at most {MAX_SHARD_SIZE:,} (the default is {DEFAULT_SHARD_SIZE:,})")
    return n


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _summary(out_dir: str | os.PathLike, meta: dict[str, Any]) -> str:
    lines = [f"wrote {out_dir} ({meta['tokenizer']} tokenizer, vocab_size {meta['vocab_size']})"]
    for split in SPLITS:
        sizes = [n for name, n in meta["shards"].items() if name.startswith(f"{split}_")]
        lines.append(f"  {split}: {len(sizes)} shard(s), {sum(sizes):,} tokens")
    return "\n".join(lines)


def _out_problem(out: Path) -> str | None:
    """Why the dataset folder `out` cannot be made (None: it can be, as far as a look tells), before any work."""
    for folder in (out, *out.parents):
        if folder.exists():
            return None if folder.is_dir() else ("is a file" if folder == out else f"is inside {folder}, a file")
    return None


def _not_utf8(files: Sequence[str], e: UnicodeDecodeError) -> str:
    """The message for a text file that is not UTF-8 (Latin-1 text, a binary file): which one, and what to do."""
    for name in files:
        try:
            Path(name).read_bytes().decode("utf-8")
        except UnicodeDecodeError as bad:
            e = bad
            break
    else:
        name = "a text file"
    return (f"{name} is not UTF-8 text (byte {e.object[e.start:e.start + 1].hex(' ')} at offset {e.start}: "
            f"{e.reason}); pass UTF-8 text files, converting others first (e.g. iconv -f latin1 -t utf-8 IN > OUT)")


def build_parser() -> argparse.ArgumentParser:
    """The sub-commands (fineweb-edu, text, files, hf) and their flags."""
    parser = argparse.ArgumentParser(prog="python -m gpt2_jax.data",
                                     description="Tokenise text into uint16 token shards.")
    commands = parser.add_subparsers(dest="command", required=True)
    fw = commands.add_parser("fineweb-edu", help="stream FineWeb-Edu sample-10BT (GPT-2 BPE)")
    fw.add_argument("--out", required=True, help="output dataset directory (rerun the same command to resume)")
    fw.add_argument("--shard_size", type=shard_size, default=DEFAULT_SHARD_SIZE, help="tokens per shard")
    fw.add_argument("--num_proc", type=positive_int, default=None, help="tokeniser threads (default: one per CPU)")
    tx = commands.add_parser("text", help="local text files; the last val_fraction of the tokens is validation")
    tx.add_argument("files", nargs="+", help="UTF-8 text files, one document each")
    tx.add_argument("--out", required=True, help="output dataset directory")
    tx.add_argument("--tokenizer", choices=["gpt2", "char"], default="gpt2")
    tx.add_argument("--val_fraction", type=finite_float, default=0.1)
    tx.add_argument("--shard_size", type=shard_size, default=DEFAULT_SHARD_SIZE, help="tokens per shard")
    fl = commands.add_parser("files", help=".txt (a document per file), .jsonl/.json (per record), .parquet "
                             "(per row); the last val_fraction of the documents is validation")
    fl.add_argument("files", nargs="+", metavar="PATH_OR_GLOB", help='files, or globs in quotes ("data/*.jsonl")')
    hf = commands.add_parser("hf", help="a Hugging Face dataset: streamed from the Hub, or a local folder")
    hf.add_argument("name", help="a Hub name (roneneldan/TinyStories), or a folder (save_to_disk, or jsonl/parquet)")
    hf.add_argument("--subset", default=None, help="the dataset's configuration (subset), if it has several")
    hf.add_argument("--split", default="train", help="the split to train on")
    hf.add_argument("--val_split", default=None,
                    help="the split to validate on (default: the last val_fraction of --split's documents)")
    for p in (fl, hf):
        p.add_argument("--out", required=True, help="output dataset directory (rerun the same command to resume)")
        p.add_argument("--text_field", default="text", help="the field of each record that holds its text")
        p.add_argument("--tokenizer", choices=["gpt2", "char"], default="gpt2")
        p.add_argument("--val_fraction", type=finite_float, default=0.1,
                       help="the last fraction of the documents that is validation (whole documents)")
        p.add_argument("--shard_size", type=shard_size, default=DEFAULT_SHARD_SIZE, help="tokens per shard")
        p.add_argument("--num_proc", type=positive_int, default=None, help="tokeniser threads (default: one per CPU)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not storage.is_remote(args.out) and (problem := _out_problem(Path(args.out))):
        print(f"error: --out {args.out} {problem}; pass a folder for the dataset (it is created if missing)",
              file=sys.stderr)
        return 2
    try:
        storage.check_writable(storage.run_path(args.out), "--out")  # a bucket: before any work
        if args.command == "fineweb-edu":
            meta = prepare_fineweb(args.out, args.shard_size, num_proc=args.num_proc)
        elif args.command == "files":
            meta = prepare_files(args.files, args.out, args.text_field, args.tokenizer, args.val_fraction,
                                 args.shard_size, args.num_proc)
        elif args.command == "hf":
            meta = prepare_hf(args.name, args.out, args.subset, args.split, args.val_split, args.text_field,
                              args.tokenizer, args.val_fraction, args.shard_size, args.num_proc)
        else:
            meta = prepare_text(args.files, args.out, args.tokenizer, args.val_fraction,
                                args.shard_size)
    except UnicodeDecodeError as e:
        print(f"error: {_not_utf8(args.files, e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command to resume after the last complete shard in {args.out}",
              file=sys.stderr)
        return 130
    except (OSError, ValueError, ImportError, RuntimeError) as e:  # OSError: missing, unreadable files
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(_summary(args.out, meta))
    return 0
