"""Model configuration: one dataclass with nanoGPT's field names, plus the GPT-2 size presets.

This module imports nothing heavy, so `reference_torch` shares it without pulling in JAX.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

GPT2_VOCAB_SIZE = 50257  # BPE merges + 256 bytes + <|endoftext|>
PADDED_VOCAB_SIZE = 50304  # next multiple of 128: faster matmuls, the extra rows are never sampled

# Fields that define the network's shapes. Two configs that differ here cannot share weights.
ARCH_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias")
ATTENTION = ("xla", "cudnn", "blocked", "einsum")  # model.attention's implementations


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
    attention: str = "xla"  # "xla" | "cudnn" (flash attention on NVIDIA) | "blocked" (CPU) | "einsum" (reference)
    remat: str = "none"  # activation checkpointing per block: "none" | "full" | "dots" (save matmuls)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}: use float32, bfloat16 or float16")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention={self.attention!r}: use one of {', '.join(ATTENTION)}")
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"remat={self.remat!r}: use none, full or dots")
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


def _flag(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; `python train.py --key=value` sets any field.

    Zero / empty values mean "auto": resolved from the preset and the platform by trainer.resolve().
    """

    platform: str = _flag("", "JAX backend: cpu | gpu | tpu (empty: JAX's default)")
    preset: str = _flag("char", "model size: " + ", ".join(PRESETS))
    init_from: str = _flag("scratch", "scratch | an HF name (gpt2, gpt2-medium, ...) or folder | a training out_dir")
    data: str = _flag("", "token shard folder (python -m gpt2_jax.data ...); empty: Python's bundled docs, char-level")
    out_dir: str = _flag("out", "checkpoints, metrics.jsonl, TensorBoard events and plots go here")
    resume: bool = _flag(False, "require a checkpoint in out_dir to resume from (resuming is automatic anyway)")
    # Batch: total_batch_size tokens per optimizer step = micro_batch_size * block_size * grad_accum.
    total_batch_size: int = _flag(0, "tokens per optimizer step (0: 2**19 for GPT-2 sizes, one micro-batch for char)")
    micro_batch_size: int = _flag(0, "sequences per micro-step over all devices (0: auto)")
    block_size: int = _flag(0, "sequence length (0: the preset's)")
    n_layer: int = _flag(0, "override the preset's number of blocks (0: the preset's)")
    n_head: int = _flag(0, "override the preset's attention heads (0: the preset's)")
    n_embd: int = _flag(0, "override the preset's width (0: the preset's)")
    vocab_size: int = _flag(0, "model vocabulary (0: the data's; GPT-2 BPE is padded to 50304)")
    dropout: float = _flag(-1.0, "dropout rate (-1: the preset's)")
    dtype: str = _flag("", "compute dtype: float32 | bfloat16 (empty: bfloat16 on gpu/tpu, float32 on cpu)")
    attention: str = _flag("", "xla | cudnn | blocked | einsum (empty: cudnn on gpu with bfloat16, blocked on "
                                "cpu, else xla)")
    remat: str = _flag("none", "activation checkpointing per block: none | full | dots")
    mesh: str = _flag("", "device mesh, e.g. data:8 or data:2,fsdp:4 (empty: every device on data; "
                      "single-process runs may use fewer devices than they have)")
    # Optimizer and schedule (optim.py).
    max_steps: int = _flag(0, "optimizer steps (0: 19073 for GPT-2 sizes = 10B tokens; a few minutes for char)")
    warmup_steps: int = _flag(-1, "linear warmup steps (-1: 715 for GPT-2 sizes, 10% of max_steps otherwise)")
    max_lr: float = _flag(0.0, "peak learning rate (0: 6e-4 for GPT-2 sizes, 1e-3 for char)")
    min_lr_ratio: float = _flag(0.1, "final learning rate as a fraction of max_lr")
    weight_decay: float = _flag(0.1, "AdamW weight decay on >=2-D params")
    beta1: float = _flag(0.9, "AdamW beta1")
    beta2: float = _flag(0.95, "AdamW beta2")
    eps: float = _flag(1e-8, "AdamW epsilon")
    grad_clip: float = _flag(1.0, "max global gradient norm (0: off)")
    # Evaluation, samples, checkpoints, logs.
    eval_every: int = _flag(250, "validation loss every N steps (and at the end); 0: never")
    eval_steps: int = _flag(20, "validation micro-batches per evaluation")
    sample_every: int = _flag(250, "print samples every N steps (and at the end); 0: never")
    sample_tokens: int = _flag(64, "tokens per sample")
    num_samples: int = _flag(2, "samples per sampling round")
    sample_prompt: str = _flag("", "sample prompt (empty: \"Hello, I'm a language model,\" for BPE, newline for char)")
    hellaswag_every: int = _flag(0, "HellaSwag acc_norm every N steps (BPE models); 0: never")
    hellaswag_data: str = _flag("", "HellaSwag jsonl (empty: download the official validation file)")
    hellaswag_limit: int = _flag(0, "evaluate only the first N HellaSwag examples (0: all 10,042)")
    checkpoint_every: int = _flag(1000, "checkpoint every N steps (and at the end); 0: only at the end")
    keep_checkpoints: int = _flag(3, "how many recent checkpoints to keep")
    log_every: int = _flag(1, "console and metrics.jsonl line every N steps")
    tensorboard: bool = _flag(True, "also write TensorBoard event files to out_dir/tb")
    seed: int = _flag(1337, "seed for init, dropout and sampling")
    on_nan: str = _flag("stop", "non-finite loss or grad norm: stop (keep the last good checkpoint) | skip the update")
    max_skips: int = _flag(10, "--on_nan=skip stops the run as --on_nan=stop does after more than this many "
                           "CONSECUTIVE skipped updates (a diverged run); a finite step resets the count. 0: no limit")
    # Multi-process (multi-host GPU, or several CPU processes in tests); Cloud TPU VMs need none of these.
    distributed: bool = _flag(False, "call jax.distributed.initialize() (automatic on TPU pods)")
    coordinator_address: str = _flag("", "host:port of process 0, for --distributed off TPU")
    num_processes: int = _flag(0, "process count, for --distributed off TPU")
    process_id: int = _flag(-1, "this process's index, for --distributed off TPU")
    local_device_count: int = _flag(0, "CPU only: fake devices per process (testing multi-device code)")
