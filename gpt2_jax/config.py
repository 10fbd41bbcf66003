"""Model configuration: one dataclass with nanoGPT's field names, the GPT-2 size presets, the training
recipes' numbers (one table), and the choices the flags allow.

This module imports nothing heavy, so `reference_torch` and train.py's flag parsing use it without JAX.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Any

GPT2_VOCAB_SIZE = 50257  # BPE merges + 256 bytes + <|endoftext|>
PADDED_VOCAB_SIZE = 50304  # next multiple of 128: faster matmuls, the extra rows are never sampled

# Fields that define the network's shapes. Two configs that differ here cannot share weights.
ARCH_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias")
ATTENTION = ("xla", "cudnn", "blocked", "einsum", "splash")  # attention.py's implementations (attention.IMPLEMENTATIONS)
DTYPES = ("float32", "bfloat16", "float16")  # compute dtypes
REMAT = ("none", "full", "dots")  # activation checkpointing policies
PLATFORMS = ("cpu", "gpu", "tpu")  # --platform (backends.py maps them to JAX_PLATFORMS names)
DATA_CACHE_GB = 16.0  # --data=gs://...: shards kept on each machine (FineWeb-Edu 10B: ~100 of 200 MB; a fifth)
PLATFORM_HELP = "JAX backend: cpu | gpu | tpu (empty: the GPU or TPU this machine has, else the CPU)"  # every CLI's


def finite_float(text: str) -> float:
    """argparse type of every float flag of the CLIs: a number, never NaN or +-inf (float() takes "nan",
    and NaN passes every range check: a NaN temperature would sample token 0 forever)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


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

# What a run's "auto" settings (0 / -1 / empty flags) become: the one table of recipe numbers. A row is a
# family of presets ("gpt2": the GPT-2 sizes, "char": the char preset); a "<family>/cpu" row overrides it on
# a CPU. training/settings.py's resolve() fills the flags a user left unset from it, the flags' help reads it,
# and so do OptimConfig's defaults. `micro_per_device`: sequences per micro-step and device; where a row
# gives `micro_batch_size` instead, that many over all devices (rounded up to a multiple of them).
RECIPES: dict[str, dict[str, Any]] = {
    # build-nanogpt's GPT-2 124M run (the GPT-3 paper's 125M settings): 2**19 tokens per step, 10B tokens
    # = 19073 steps, warmup over 375M tokens = 715 steps, peak learning rate 6e-4.
    "gpt2": dict(total_batch_size=2**19, micro_per_device=16, max_steps=19073, warmup_steps=715, max_lr=6e-4),
    "gpt2/cpu": dict(micro_per_device=4),
    # nanoGPT's Shakespeare-char run; the total batch is one micro-batch, warmup 10% of the steps.
    "char": dict(micro_per_device=64, max_steps=5000, max_lr=1e-3),
    # The char preset on a CPU (the default `python train.py`): the settings that learned the most in about
    # 3 minutes on 2 cores (benchmarks/convergence.py --corpus bundled; benchmarks/NOTES.md).
    "char/cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, micro_batch_size=12, max_steps=2000,
                     warmup_steps=100, dropout=0.0),
    # Fine-tuning a checkpoint (--finetune, with --init_from), over any family's row: nanoGPT's
    # finetune_shakespeare settings (2**15 tokens per step, a constant 3e-5, no warmup, 20 steps, an eval every
    # 5), with the micro-batch at 8 sequences so that the step splits evenly at any context up to 4096.
    "finetune": dict(total_batch_size=2**15, micro_batch_size=8, max_steps=20, warmup_steps=0, max_lr=3e-5,
                     min_lr_ratio=1.0, dropout=0.0, eval_every=5),
}
# AdamW and the schedule's shape, the same for every preset (GPT-3 paper, Appendix B).
ADAMW: dict[str, float] = dict(min_lr_ratio=0.1, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0)


def recipe(preset_name: str, backend: str, finetune: bool = False) -> dict[str, Any]:
    """The RECIPES row of a preset on a backend ("cpu", "gpu", "tpu"): the family's, with its backend's overrides,
    and the fine-tuning row over both for `finetune`."""
    family = "gpt2" if preset_name in GPT2_SIZES else "char"
    row = {**RECIPES[family], **RECIPES.get(f"{family}/{backend}", {})}
    return {**row, **RECIPES["finetune"]} if finetune else row


def default_attention(backend: str, dtype: str) -> str:
    """The fastest attention for a platform (jax.default_backend()) and compute dtype."""
    if backend == "gpu" and dtype != "float32":
        return "cudnn"  # flash attention; cuDNN has no float32 kernel
    if backend == "tpu" and dtype != "float32":
        return "splash"  # Pallas flash attention that skips masked blocks (pallas_attention.py)
    return "blocked" if backend == "cpu" else "xla"

# XLA flags for NVIDIA GPUs, set by train.py --platform=gpu (and by `python -m gpt2_jax.plan` for GPU targets, so
# that the plan is the program that runs) unless XLA_FLAGS is already set. Each one was checked to exist in the
# jaxlib 0.10.2 CUDA plugin: XLA stops at start with "Unknown flag in XLA_FLAGS" otherwise.
GPU_XLA_FLAGS = (
    # Schedule the program so that collectives (data-parallel all-reduce, FSDP all-gather / reduce-scatter) run
    # while compute proceeds; JAX's GPU performance tips and NVIDIA's JAX containers set it.
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    # Matmuls on cuBLAS(Lt) instead of Triton-generated kernels: the plain GEMMs of a transformer are cuBLAS's
    # home ground, and autotuning Triton configurations for each one lengthens every compile.
    "--xla_gpu_enable_triton_gemm=false",
    # Give the streams that carry those collectives the highest priority, so that they are not queued behind
    # compute kernels (JAX's GPU performance tips).
    "--xla_gpu_enable_highest_priority_async_stream=true",
)
