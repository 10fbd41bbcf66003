"""The model: one configuration dataclass with nanoGPT's field names, the GPT-2 size presets and sizes, and the
choices of how the network is computed (dtype, attention, remat).

The training recipes are in recipes.py, the GPU XLA flags in launch.py, the flags' shared argparse types in cli.py.
This module imports nothing heavy, so `reference_torch` and train.py's flag parsing use it without JAX.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

GPT2_VOCAB_SIZE = 50257  # BPE merges + 256 bytes + <|endoftext|>
PADDED_VOCAB_SIZE = 50304  # next multiple of 128: faster matmuls, the extra rows are never sampled

# Fields that define the network's shapes. Two configs that differ here cannot share weights.
ARCH_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias")
ATTENTION = ("xla", "cudnn", "blocked", "einsum", "splash")  # attention.IMPLEMENTATIONS, the implementations
DTYPES = ("float32", "bfloat16", "float16")  # compute dtypes
REMAT = ("none", "full", "dots")  # activation checkpointing policies


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # maximum context length (learned positions)
    vocab_size: int = GPT2_VOCAB_SIZE  # rows of the token embedding / columns of the logits
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # residual stream width
    dropout: float = 0.0  # on attention probs, residual branches and embeddings (0 for pretraining)
    bias: bool = True  # biases in Linear layers and LayerNorms (GPT-2 has them)
    # How the network is computed, not what it is: changing these keeps weights compatible.
    dtype: str = "float32"  # compute dtype ("bfloat16" on GPU/TPU); params are always float32
    # "xla" | "cudnn" (flash attention on NVIDIA) | "blocked" (CPU) | "einsum" (reference) | "splash" (Pallas, TPU)
    attention: str = "xla"
    remat: str = "none"  # activation checkpointing per block: "none" | "full" | "dots" (save matmuls)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention={self.attention!r}: use one of {', '.join(ATTENTION)}")
        if self.remat not in REMAT:
            raise ValueError(f"remat={self.remat!r}: use one of {', '.join(REMAT)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def replace(self, **changes: Any) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)

    def arch_diff(self, other: "GPTConfig") -> list[str]:
        """Names of the shape-defining fields where `self` and `other` differ."""
        return [f for f in ARCH_FIELDS if getattr(self, f) != getattr(other, f)]


# The GPT-2 family (Radford et al. 2019, Table 2) plus the lecture's small char-level model.
PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # nanoGPT's Shakespeare-char model; vocab_size is set from the data's character set.
    "char": GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
}


def preset(name: str, **overrides: Any) -> GPTConfig:
    """A preset by name, with fields overridden, e.g. `preset("gpt2", vocab_size=50304)`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


# The GPT-2 sizes: trained on GPT-2 BPE with the reproduction recipe below.
GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")

def default_attention(backend: str, dtype: str) -> str:
    """The fastest attention for a platform (jax.default_backend()) and compute dtype."""
    if backend == "gpu" and dtype != "float32":
        return "cudnn"  # flash attention; cuDNN has no float32 kernel
    if backend == "tpu" and dtype != "float32":
        return "splash"  # Pallas flash attention that skips masked blocks (pallas_attention.py)
    return "blocked" if backend == "cpu" else "xla"
