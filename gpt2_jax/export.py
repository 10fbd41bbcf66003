"""A training run's checkpoint -> a Hugging Face GPT-2 folder.

    python -m gpt2_jax.export OUT_DIR --to HF_DIR [--step N]     # newest good checkpoint by default

HF_DIR gets `config.json` and `model.safetensors` (`convert.export_hf`: a padded 50304 vocabulary is
sliced back to GPT-2's 50257), which `transformers.GPT2LMHeadModel.from_pretrained(HF_DIR)` loads, and
`gpt2_jax_tokenizer.json`, the run's tokenizer as gpt2_jax records it, so that
`python -m gpt2_jax.sample --init_from=HF_DIR` and `python -m gpt2_jax.evaluate` decode its ids.

Tokenizers: a GPT-2 BPE model uses GPT-2's own tokenizer (`GPT2TokenizerFast.from_pretrained("gpt2")`
in transformers, or tiktoken's "gpt2"); no tokenizer files are copied. A char-level model is exported
too (HF's GPT-2 takes any vocabulary size), with a warning: no HF tokenizer matches it; id i is the
character `chars[i]` of gpt2_jax_tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from etils import epath

from gpt2_jax.backends import add_platform_flag, pin_platform
from gpt2_jax.cli import CliError, one_line_errors
from gpt2_jax.config import GPT2_VOCAB_SIZE, GPTConfig
from gpt2_jax.convert import config_to_hf, export_hf, export_vocab_size
from gpt2_jax.runs import CHECKPOINTS, CONFIG_FILE, TOKENIZER_FILE, load_run, write_tokenizer
from gpt2_jax.storage import check_readable, check_writable, is_remote, run_path

EXPORT_FILES = (CONFIG_FILE, "model.safetensors", TOKENIZER_FILE)  # what an export writes (and nothing else)
EXPORT_TEMPORARIES = (".config.json.tmp", ".model.safetensors.tmp")  # an interrupted export's (convert.export_hf)


def _foreign_contents(to: epath.Path) -> str | None:
    """What in folder `to` an export must not overwrite (None: nothing). Only a folder an earlier export wrote
    may be written again: no other files than an export's, and a config.json with exactly the keys an export
    writes (Hugging Face's save_pretrained writes more, e.g. transformers_version; a training run's holds
    {"train", "model"})."""
    if not to.is_dir():
        return None
    if (to / CHECKPOINTS).exists():
        return f"another training run ({CHECKPOINTS}/)"
    names = sorted(p.name for p in to.iterdir() if p.name not in EXPORT_TEMPORARIES)
    if others := [n for n in names if n not in EXPORT_FILES]:
        return f"files an export does not write ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
    if not names:
        return None  # an empty folder
    try:
        config = json.loads((to / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or set(config) != set(config_to_hf(GPTConfig(), GPT2_VOCAB_SIZE)):
        return (f"a {CONFIG_FILE} that an export did not write (another Hugging Face model's, or a training run's "
                "settings)" if (to / CONFIG_FILE).exists() else f"{', '.join(names)} without an export's "
                f"{CONFIG_FILE}")
    return None


def export_run(out_dir: str | os.PathLike, to: str | os.PathLike, step: int | None = None) -> tuple[epath.Path, dict]:
    """Write the checkpoint of training run `out_dir` (newest, or `step`) as an HF folder `to`. Either may
    be in a bucket (gs://): the folder is then written locally first and its files copied up.

    Returns (the folder, a summary: step, tokenizer name, vocab sizes, n_layer/n_head/n_embd/block_size).
    """
    run, to = (p if is_remote(p) else p.resolve() for p in (run_path(out_dir), run_path(to)))
    root = run.parent if run.name == CHECKPOINTS else run
    if to == root or root / CHECKPOINTS in (to, *to.parents):
        raise ValueError(f"--to {to} would write into the run's own folder (and overwrite its config.json); "
                         "pick another folder")
    if to.exists() and not to.is_dir():
        raise NotADirectoryError(f"--to {to} is a file; pass a folder (it is created if missing)")
    if what := _foreign_contents(to):
        raise ValueError(f"--to {to} holds {what}, which an export must not overwrite (the folder is left as it "
                         "is); pass a new folder, an empty one, or one an earlier export wrote")
    model, tokenizer, meta = load_run(run, step)
    cfg = model.config
    vocab = export_vocab_size(cfg)
    if tokenizer is not None and tokenizer.vocab_size > vocab:
        raise ValueError(f"the run's tokenizer has {tokenizer.vocab_size} ids but the model only {vocab}")
    with tempfile.TemporaryDirectory(prefix="gpt2_jax-export-") as tmp:
        local = Path(tmp) if is_remote(to) else to  # safetensors writes local files only
        export_hf(model, local, vocab_size=vocab)
        if tokenizer is not None:
            write_tokenizer(local, tokenizer)
        if is_remote(to):
            for f in sorted(Path(tmp).iterdir()):  # an object appears whole once uploaded: no temp names
                (to / f.name).write_bytes(f.read_bytes())
    summary = {"step": meta["step"], "tokenizer": tokenizer.name if tokenizer else None, "vocab_size": vocab,
               "model_vocab_size": cfg.vocab_size,
               **{k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size")}}
    return to, summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gpt2_jax.export", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="a training run's --out_dir (or its checkpoints/ folder)")
    parser.add_argument("--to", required=True, help="the HF folder to write (created if missing)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest good one)")
    add_platform_flag(parser)
    return parser


@one_line_errors(interrupted="stopped before the export finished")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if problem := pin_platform(args.platform):  # before any JAX backend starts
        raise CliError(problem)
    check_readable(args.out_dir, "out_dir")  # buckets: one line in seconds, not a minute of retries
    check_writable(run_path(args.to), "--to")
    folder, info = export_run(args.out_dir, args.to, args.step)
    sliced = f" (sliced from {info['model_vocab_size']})" if info["model_vocab_size"] != info["vocab_size"] else ""
    print(f"wrote {folder} from step {info['step']}: GPT-2 with n_layer={info['n_layer']}, n_head={info['n_head']}, "
          f"n_embd={info['n_embd']}, block_size={info['block_size']}, vocab_size={info['vocab_size']}{sliced}")
    print(f"load it with transformers.GPT2LMHeadModel.from_pretrained({str(folder)!r})")
    if info["tokenizer"] == "gpt2":
        print("tokenizer: GPT-2's BPE (GPT2TokenizerFast.from_pretrained('gpt2') or tiktoken 'gpt2')")
    elif info["tokenizer"] == "char":
        print(f"warning: this model is char-level: no Hugging Face tokenizer matches its vocabulary. Its "
              f"characters are in {folder / TOKENIZER_FILE} (id i = chars[i]); python -m gpt2_jax.sample reads them",
              file=sys.stderr)
    else:
        print("warning: the run records no tokenizer and its vocabulary is not GPT-2's: no tokenizer is known "
              "for this model", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
