"""Dataset prep throughput: the project's prep against build-nanogpt's way, same documents, same cores.

    python benchmarks/prep.py                      # ~4M GPT-2 tokens, each way 3 times, alternating
    python benchmarks/prep.py --tokens=500000 --repeats=1

Documents: Tiny Shakespeare (the shared data folder) and Python's own help text, cut into documents whose
lengths are drawn log-normally around FineWeb-Edu's (median ~2,500 characters), and repeated up to
`--tokens` GPT-2 tokens. Both ways get the same in-memory list of texts and write uint16 shards of
`--shard_size` tokens into a temporary folder; the time is from the first document to the last shard on disk.

- build-nanogpt's way (fineweb.py of the "reproduce GPT-2" lecture, written afresh here): a
  `multiprocessing.Pool(os.cpu_count() // 2)`, `imap(tokenize, docs, chunksize=16)`, where `tokenize` is
  tiktoken's `encode_ordinary` of one document after <|endoftext|>, made a numpy uint16 array; the main
  process copies each array into a shard buffer and `np.save`s full ones. Also timed with a process per CPU,
  so that the number of processes is not the only difference.
- the project's prep: `gpt2_jax.data.prepare.prepare_documents` (what `python -m gpt2_jax.data files|hf|
  fineweb-edu` run), with its defaults: a tokeniser thread per CPU (tiktoken releases the GIL), batches of
  documents encoded straight into numpy arrays (`encode_to_numpy`, no Python int per token, no pickling),
  atomic shard writes and the resume state.

Besides wall-clock tokens/s, each way's CPU time (its own and its children's) per million tokens is printed:
on a machine that others share, the wall clock shows the contention as much as the code.

Both ways' shards are checked to hold the same tokens. Prints a table, the ratios, the hours 10B tokens would
take at the measured CPU time per token on 2, 8 and 32 busy cores, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

import numpy as np  # after the checkout is on sys.path
import tiktoken  # noqa: E402

from gpt2_jax.data import default_corpus  # noqa: E402
from gpt2_jax.data.prepare import Part, default_num_proc, prepare_documents  # noqa: E402
from gpt2_jax.tokenizer import Tokenizer  # noqa: E402

SHAKESPEARE = Path(os.environ.get("GPT2_JAX_SHARED", "/work/shared")) / "data" / "tinyshakespeare.txt"
EOT = 50256


def documents(tokens: int, seed: int = 0) -> list[str]:
    """Texts of log-normal lengths (median ~2,500 characters) from the two corpora, up to ~`tokens` tokens."""
    corpus = default_corpus()
    if SHAKESPEARE.is_file():
        corpus += "\n\n" + SHAKESPEARE.read_text(encoding="utf-8")
    rng = np.random.default_rng(seed)
    docs, chars, target = [], 0, tokens * 4  # ~4 characters per GPT-2 token in English
    while chars < target:
        n = int(np.clip(rng.lognormal(np.log(2500), 0.9), 50, 50_000))
        start = int(rng.integers(0, len(corpus) - n))
        docs.append(corpus[start:start + n])
        chars += n
    return docs


# ----------------------------------------------------------------------------- build-nanogpt's way

_enc = None


def _nanogpt_tokenize(text: str) -> np.ndarray:
    global _enc
    if _enc is None:
        _enc = tiktoken.get_encoding("gpt2")
    tokens = [EOT]
    tokens.extend(_enc.encode_ordinary(text))
    arr = np.array(tokens)
    assert (0 <= arr).all() and (arr < 2**16).all()
    return arr.astype(np.uint16)


def nanogpt_way(docs: list[str], out: Path, shard_size: int, procs: int) -> int:
    """Pool.imap per document, chunksize 16; shards filled in the main process. Returns the tokens written."""
    buf, fill, shard, total = np.empty(shard_size, dtype=np.uint16), 0, 0, 0
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        for tokens in pool.imap(_nanogpt_tokenize, docs, chunksize=16):
            i = 0
            while i < len(tokens):
                take = min(shard_size - fill, len(tokens) - i)
                buf[fill:fill + take] = tokens[i:i + take]
                fill, i = fill + take, i + take
                if fill == shard_size:
                    np.save(out / f"shard_{shard:06d}.npy", buf)
                    shard, fill = shard + 1, 0
            total += len(tokens)
    if fill:
        np.save(out / f"shard_{shard:06d}.npy", buf[:fill])
    return total


def project_way(docs: list[str], out: Path, shard_size: int, procs: int) -> int:
    part = Part("train", lambda start: iter(docs[start:]), num_docs=len(docs))
    meta = prepare_documents([part], out, Tokenizer.gpt2(), {"benchmark": len(docs)}, shard_size, procs,
                             progress=False, log=lambda _: None)
    return sum(meta["shards"].values())


def cpu_seconds() -> float:
    """User + system time of this process and its finished children (a Pool's workers, once joined)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def stream(out: Path) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted(out.glob("*.npy"))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4_000_000, help="about this many GPT-2 tokens")
    parser.add_argument("--shard_size", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cpus = default_num_proc()
    docs = documents(args.tokens)
    ways = {f"build-nanogpt ({max(1, cpus // 2)} proc, its default)": (nanogpt_way, max(1, cpus // 2)),
            f"build-nanogpt ({cpus} proc)": (nanogpt_way, cpus),
            f"gpt2_jax prep ({cpus} thread(s), its default)": (project_way, cpus)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    cpu_s: dict[str, list[float]] = {name: [] for name in ways}
    tokens, first = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for k, (name, (way, procs)) in enumerate(ways.items()):
                out = Path(tmp) / f"{r}-{k}"
                out.mkdir()
                t0, c0 = time.perf_counter(), cpu_seconds()
                tokens[name] = way(docs, out, args.shard_size, procs)
                times[name].append(time.perf_counter() - t0)
                cpu_s[name].append(cpu_seconds() - c0)
                got = stream(out)
                if first is None:
                    first = got
                assert np.array_equal(got, first), f"{name} wrote other tokens"
    rates = {name: tokens[name] / statistics.median(t) for name, t in times.items()}
    base, base_all, ours = rates.values()
    print(f"{len(docs):,} documents, {len(first):,} tokens, {cpus} CPU(s), shard_size {args.shard_size:,}, "
          f"median of {args.repeats}")
    for name, rate in rates.items():
        cpu = statistics.median(cpu_s[name]) / tokens[name] * 1e6
        print(f"  {name:<44} {rate / 1e6:6.2f} M tokens/s ({statistics.median(times[name]):.2f} s)   "
              f"{cpu:.3f} CPU-s per M tokens")
    print(f"  ratio vs build-nanogpt's default: {ours / base:.2f}x; vs it with a process per CPU: "
          f"{ours / base_all:.2f}x")
    # 10B tokens: the CPU time per token spread over the cores each way keeps busy on n cores (build-nanogpt's
    # default: n // 2 processes). Tokenising parallelises per batch or document; this assumes it scales.
    cpu_per_token = {name: statistics.median(v) / tokens[name] for name, v in cpu_s.items()}
    busy = {name: (lambda n: max(1, n // 2)) if "its default" in name and "nanogpt" in name else (lambda n: n)
            for name in ways}
    hours = {name: {n: 10e9 * c / busy[name](n) / 3600 for n in (2, 8, 32)} for name, c in cpu_per_token.items()}
    for name, h in hours.items():
        print(f"  10B tokens, {name}: " + ", ".join(f"{n} cores {v:.2f} h" for n, v in h.items()))
    print(json.dumps({"cpus": cpus, "documents": len(docs), "tokens": int(len(first)),
                      "tokens_per_s": {k: round(v) for k, v in rates.items()},
                      "cpu_s_per_M_tokens": {k: round(statistics.median(v) / tokens[k] * 1e6, 4)
                                             for k, v in cpu_s.items()},
                      "ratio_vs_default": round(ours / base, 3), "ratio_vs_same_procs": round(ours / base_all, 3),
                      "hours_10B": {k: {str(n): round(v, 2) for n, v in h.items()} for k, h in hours.items()}}))


if __name__ == "__main__":
    main()
