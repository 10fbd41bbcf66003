"""tiktoken's "gpt2" encoding vs a Hugging Face GPT-2 tokenizer built from the same two files.

Both read OpenAI's original BPE files from `<shared>/tiktoken-cache` (tiktoken through its cache,
HF as vocab.json + merges.txt), so any difference is in the tokenizer code: the pre-tokenising regex,
byte-level mapping, merge order or special-token handling. Compared:

- every one of the 50257 vocabulary entries, id by id, as bytes;
- all of Tiny Shakespeare (338,025 tokens, the figure from the GPT-2 lecture), and short strings with
  unicode, whitespace runs, contractions and digits, encoded as plain text;
- "<|endoftext|>" both ways: as the special token 50256 (tiktoken `allowed_special`, HF's default for a
  registered special token) and as plain text (`encode_ordinary` vs HF `split_special_tokens=True`);
- decoding: ids -> text returns the original text exactly, in both libraries.
"""

from pathlib import Path

import pytest

VOCAB_JSON = "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6"  # encoder.json, read by HF as vocab.json
MERGES_TXT = "6d1cbeee0f20b3d9449abfede4726ed8212e3aee"  # vocab.bpe, read by HF as merges.txt
N_VOCAB = 50257
EOT = 50256
SHAKESPEARE_TOKENS = 338_025

SAMPLES = {
    "empty": "",
    "ascii": "Hello, I'm a language model, and I can't stop; we'll see. They're 100% sure it's DON'T.",
    "digits": "1234567890 3.14159 1,000,000 2024-01-31 0x1F",
    "accents": "naïve café, Ærø, façade, Øresund, ß",
    "cjk": "日本語のテキストと中文文本, 한국어",
    "emoji": "👍🏽 family: 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "rtl_and_combining": "مرحبا بالعالم שלום e\u0301 a\u0308",
    "whitespace_runs": "a  b   c    d\t\tindented\n\n\nthree newlines \r\n crlf   trailing   ",
    "leading_space": "   leading spaces and a lone\n",
    "only_whitespace": " \n \t\n\n  ",
    "symbols": "∑_{i=1}^n x_i ≤ ∞ → λ; <|endoftext > <|endoftext| |>",
    "control_and_nul": "bell\x07 nul\x00 del\x7f",
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (OpenAI's encoder.py): how vocab.json spells bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


@pytest.fixture(scope="module")
def bpe_files(shared_dir) -> Path:
    cache = shared_dir / "tiktoken-cache"
    for name, what in ((VOCAB_JSON, "encoder.json"), (MERGES_TXT, "vocab.bpe")):
        if not (cache / name).is_file():
            pytest.skip(f"GPT-2 BPE file {what} ({name}) not found at {cache}; set GPT2_JAX_SHARED to the "
                        "folder holding tiktoken-cache/")
    return cache


@pytest.fixture(scope="module")
def tiktoken_enc(bpe_files):
    import tiktoken

    with pytest.MonkeyPatch.context() as mp:  # read the shared files, never the network
        mp.setenv("TIKTOKEN_CACHE_DIR", str(bpe_files))
        enc = tiktoken.get_encoding("gpt2")
    assert enc.n_vocab == N_VOCAB and enc.eot_token == EOT
    return enc


@pytest.fixture(scope="module")
def hf_tok(bpe_files, tmp_path_factory):
    from transformers import GPT2TokenizerFast

    folder = tmp_path_factory.mktemp("hf-gpt2-tokenizer")
    (folder / "vocab.json").symlink_to(bpe_files / VOCAB_JSON)
    (folder / "merges.txt").symlink_to(bpe_files / MERGES_TXT)
    tok = GPT2TokenizerFast.from_pretrained(folder, model_max_length=10**9)  # no "too long" warnings
    # transformers 5 can silently build an empty GPT-2 tokenizer from wrong arguments: guard against it.
    assert len(tok) == N_VOCAB, f"HF tokenizer has {len(tok)} tokens, expected {N_VOCAB}"
    assert tok.convert_tokens_to_ids("<|endoftext|>") == EOT
    return tok


@pytest.fixture(scope="module")
def shakespeare(tiny_shakespeare) -> str:
    return tiny_shakespeare.read_text(encoding="utf-8")


def hf_encode_plain(tok, text: str) -> list[int]:
    """HF ids with special-token strings treated as ordinary text, like tiktoken's encode_ordinary."""
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def hf_decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, clean_up_tokenization_spaces=False)  # no " ." -> "." style rewriting


def test_vocabularies_are_identical(tiktoken_enc, hf_tok):
    to_char = bytes_to_unicode()
    hf_tokens = hf_tok.convert_ids_to_tokens(list(range(N_VOCAB)))
    for i in range(N_VOCAB - 1):  # the last id is the special token, checked separately
        expected = "".join(to_char[b] for b in tiktoken_enc.decode_single_token_bytes(i))
        assert hf_tokens[i] == expected, f"id {i}: HF {hf_tokens[i]!r} vs tiktoken {expected!r}"
    assert hf_tokens[EOT] == "<|endoftext|>" == tiktoken_enc.decode([EOT])


def test_tiny_shakespeare_ids_identical(tiktoken_enc, hf_tok, shakespeare):
    ours = tiktoken_enc.encode_ordinary(shakespeare)
    theirs = hf_encode_plain(hf_tok, shakespeare)
    assert len(ours) == SHAKESPEARE_TOKENS
    if ours != theirs:
        first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        raise AssertionError(f"first difference at token {first}: tiktoken {ours[first:first + 5]} vs HF "
                             f"{theirs[first:first + 5]} ({tiktoken_enc.decode(ours[first:first + 5])!r})")
    assert tiktoken_enc.decode(ours) == shakespeare
    assert hf_decode(hf_tok, theirs) == shakespeare


@pytest.mark.parametrize("name", SAMPLES)
def test_special_strings_ids_identical_and_round_trip(tiktoken_enc, hf_tok, name):
    text = SAMPLES[name]
    ids = tiktoken_enc.encode_ordinary(text)
    assert hf_encode_plain(hf_tok, text) == ids
    assert hf_tok.encode(text) == ids  # no BOS/EOS added by default either
    assert tiktoken_enc.decode(ids) == text
    assert hf_decode(hf_tok, ids) == text


def test_endoftext_as_special_token(tiktoken_enc, hf_tok):
    text = "First document.<|endoftext|>Second document."
    ids = tiktoken_enc.encode(text, allowed_special={"<|endoftext|>"})
    assert ids.count(EOT) == 1
    assert hf_tok.encode(text) == ids  # HF matches registered special tokens in the text by default
    assert tiktoken_enc.decode(ids) == hf_decode(hf_tok, ids) == text
    # tiktoken refuses to guess: special-token text without allowed_special is an error.
    with pytest.raises(ValueError, match="disallowed special token"):
        tiktoken_enc.encode(text)


def test_endoftext_as_plain_text(tiktoken_enc, hf_tok):
    text = "First document.<|endoftext|>Second document."
    ids = tiktoken_enc.encode_ordinary(text)  # == encode(text, disallowed_special=())
    assert EOT not in ids and ids == tiktoken_enc.encode(text, disallowed_special=())
    assert hf_encode_plain(hf_tok, text) == ids
    assert tiktoken_enc.decode(ids) == hf_decode(hf_tok, ids) == text
