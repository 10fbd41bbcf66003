"""The tokenizer a dataset was written with: GPT-2 BPE (tiktoken) or a character-level vocabulary.

A dataset folder's meta.json records it (`Tokenizer.to_meta`); `read_meta` reads that file. It lives
here, below `gpt2_jax.data`, because `Tokenizer.load(data_dir)` needs it and the data package needs
the Tokenizer (``python -m gpt2_jax.data --help`` says how to make a dataset).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tiktoken

META_FILE = "meta.json"
HOW_TO_PREPARE = ("create it with `python -m gpt2_jax.data text FILE --out DIR` "
                  "or `python -m gpt2_jax.data fineweb-edu --out DIR`")
REPLACEMENT = "\ufffd"  # what `decode` shows for ids outside the vocabulary


class Tokenizer:
    """GPT-2 BPE (tiktoken) or a character-level vocabulary, as recorded in meta.json.

    ``encode`` adds no special tokens: GPT-2 text is encoded "ordinarily" (a literal
    "<|endoftext|>" is plain text), so add ``eot_token`` by id where a document starts.
    ``decode`` shows ids outside the vocabulary as U+FFFD instead of raising: a model with a padded
    vocabulary (50304 rows) can sample ids >= 50257, and that must not crash sampling.
    """

    def __init__(self, name: str, vocab_size: int, eot_token: int | None, chars: str | None = None):
        self.name, self.vocab_size, self.eot_token = name, vocab_size, eot_token
        self.chars = chars
        self._enc: Any = None  # tiktoken.Encoding, for "gpt2"
        self._stoi: dict[str, int] = {}  # char -> id, for "char"
        if name == "gpt2":
            try:
                self._enc = tiktoken.get_encoding("gpt2")
            except Exception as e:  # tiktoken downloads the BPE files on first use
                raise RuntimeError(f"could not load the GPT-2 BPE with tiktoken ({e}); offline, "
                                   "set TIKTOKEN_CACHE_DIR to a folder of its cached files") from e
        elif name == "char":
            if not chars:
                raise ValueError("a char tokenizer needs a non-empty `chars` vocabulary")
            self._stoi = {c: i for i, c in enumerate(chars)}
        else:
            raise ValueError(f"unknown tokenizer {name!r}; expected 'gpt2' or 'char'")

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """tiktoken's GPT-2 BPE: 50257 tokens, <|endoftext|> = 50256."""
        return cls("gpt2", vocab_size=50257, eot_token=50256)

    @classmethod
    def char(cls, chars: str) -> Tokenizer:
        """One token per character; the vocabulary is the sorted set of `chars`."""
        vocab = "".join(sorted(set(chars)))
        return cls("char", vocab_size=len(vocab), eot_token=None, chars=vocab)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Tokenizer:
        if not isinstance(meta, dict) or not isinstance(meta.get("chars") or "", str):
            raise ValueError(f"not a tokenizer record (tokenizer, vocab_size, chars): {str(meta)[:80]}")
        if meta.get("tokenizer") == "gpt2":
            return cls.gpt2()
        if meta.get("tokenizer") == "char":
            return cls.char(meta.get("chars") or "")
        raise ValueError(f"meta.json names an unknown tokenizer {meta.get('tokenizer')!r}")

    @classmethod
    def load(cls, data_dir: str | os.PathLike) -> Tokenizer:
        """The tokenizer a dataset directory was written with."""
        return cls.from_meta(read_meta(data_dir))

    def to_meta(self) -> dict[str, Any]:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size,
                "eot_token": self.eot_token, "chars": self.chars}

    def encode(self, text: str) -> list[int]:
        if self._enc is not None:
            return self._enc.encode_ordinary(text)
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this char-level vocabulary "
                             f"({self.vocab_size} characters)") from None

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self._enc is None:
            return "".join(self.chars[i] if 0 <= i < self.vocab_size else REPLACEMENT for i in ids)
        out, run = bytearray(), []  # decode runs of valid ids: one character may span tokens
        for i in ids:
            if 0 <= i < self.vocab_size:
                run.append(i)
            else:
                out += self._enc.decode_bytes(run) + REPLACEMENT.encode()
                run = []
        out += self._enc.decode_bytes(run)
        return out.decode("utf-8", errors="replace")


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a dataset directory, with errors that say how to create one."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist; {HOW_TO_PREPARE}")
    path = data_dir / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing, so {data_dir} holds no finished dataset "
                                f"(meta.json is written last); {HOW_TO_PREPARE}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {HOW_TO_PREPARE}") from e
    if problem := _meta_problem(meta):
        raise ValueError(f"{path} is not a dataset's meta.json: {problem}; {HOW_TO_PREPARE}")
    return meta


def _meta_problem(meta: Any) -> str | None:
    """What is wrong with the shape of a parsed meta.json (None: nothing): the fields readers index."""
    if not isinstance(meta, dict):
        return f"a JSON {type(meta).__name__}, not an object"
    if not isinstance(meta.get("tokenizer"), str):
        return f"tokenizer is {meta.get('tokenizer')!r}, not a name ('gpt2' or 'char')"
    vocab, shards = meta.get("vocab_size"), meta.get("shards")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        return f"vocab_size is {vocab!r}, not a positive integer"
    if not isinstance(shards, dict) or not all(isinstance(n, str) and os.path.basename(n) == n
                                               and isinstance(k, int) and k >= 0 for n, k in shards.items()):
        return "shards is not an object of {shard file name: token count}"
    return None
