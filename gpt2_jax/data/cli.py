"""The command line of ``python -m gpt2_jax.data`` (``--help`` lists the options)::

    python -m gpt2_jax.data fineweb-edu --out data/fineweb10B     # FineWeb-Edu 10BT, GPT-2 BPE
    python -m gpt2_jax.data text input.txt --out data/shakespeare --tokenizer char
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
    return (f"{name} is not UTF-8 text (byte {e.object[e.start:e.start + 1].hex(' ')} at offset {e.start}: {e.reason}); "
            "pass UTF-8 text files, converting others first (e.g. iconv -f latin1 -t utf-8 IN > OUT)")


def build_parser() -> argparse.ArgumentParser:
    """The two sub-commands, fineweb-edu and text, and their flags."""
    parser = argparse.ArgumentParser(prog="python -m gpt2_jax.data",
                                     description="Tokenise text into uint16 token shards.")
    commands = parser.add_subparsers(dest="command", required=True)
    fw = commands.add_parser("fineweb-edu", help="stream FineWeb-Edu sample-10BT (GPT-2 BPE)")
    fw.add_argument("--out", required=True, help="output dataset directory")
    fw.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE, help="tokens per shard")
    fw.add_argument("--num_proc", type=int, default=None, help="tokeniser processes (CPUs / 2)")
    tx = commands.add_parser("text", help="local text files; the last val_fraction is validation")
    tx.add_argument("files", nargs="+", help="UTF-8 text files, one document each")
    tx.add_argument("--out", required=True, help="output dataset directory")
    tx.add_argument("--tokenizer", choices=["gpt2", "char"], default="gpt2")
    tx.add_argument("--val_fraction", type=finite_float, default=0.1)
    tx.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE, help="tokens per shard")
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
        else:
            meta = prepare_text(args.files, args.out, args.tokenizer, args.val_fraction,
                                args.shard_size)
    except UnicodeDecodeError as e:
        print(f"error: {_not_utf8(args.files, e)}", file=sys.stderr)
        return 1
    except (OSError, ValueError, ImportError, RuntimeError) as e:  # OSError: missing, unreadable files
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(_summary(args.out, meta))
    return 0
