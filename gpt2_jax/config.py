"""Model configuration: one dataclass with nanoGPT's field names, plus the GPT-2 size presets.

This module imports nothing heavy, so `reference_torch` shares it without pulling in JAX.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

GPT2_VOCAB_SIZE = 50257  # BPE merges + 256 bytes + <|endoftext|>
PADDED_VOCAB_SIZE = 50304  # next multiple of 128: faster matmuls, the extra rows are never sampled

# Fields that define the network's shapes. Two configs that differ here cannot share weights.
ARCH_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias")
ATTENTION = ("xla", "cudnn", "blocked", "einsum")  # model.attention's implementations
DTYPES = ("float32", "bfloat16", "float16")  # compute dtypes
REMAT = ("none", "full", "dots")  # activation checkpointing policies
PLATFORMS = ("cpu", "gpu", "tpu")  # train.py --platform (train.py maps them to JAX_PLATFORMS names)


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


def _flag(default: Any, help: str, *, low: float | None = None, below: float | None = None,
          high: float | None = None, above: float | None = None, choices: tuple[str, ...] = ()) -> Any:
    """A TrainConfig field: its default, its --help text, and the values that make sense, which
    TrainConfig.__post_init__ enforces: `low <= value`, `value < below`, `value <= high`, `above < value`,
    `value in choices`. The default always passes: it is the "auto" value ("", -1) where the rules
    would reject it."""
    rules = dict(low=low, below=below, high=high, above=above, choices=choices)
    return dataclasses.field(default=default, metadata={"help": help, **rules})


AUTO_BOOL = ("auto", "true", "false")  # a bool flag whose default is decided at run time

_TYPES = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}  # annotation -> accepted types


def _flag_problem(f: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with `value` for the TrainConfig field `f`, as a sentence that names the flag as it
    is typed (--max_steps=-5) and ends with the flag's help; None if nothing is."""
    name, rule = f.name, f.metadata
    flag = f"--{name}={value!r}" if isinstance(value, str) else f"--{name}={value}"
    types = _TYPES[f.type]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        problem = f"is a {type(value).__name__}, not {f.type}"
    elif isinstance(value, float) and not math.isfinite(value):
        problem = "is not a finite number"
    elif value == f.default:
        return None
    elif rule["choices"]:
        if value in rule["choices"]:
            return None
        empty = " or empty" if f.default == "" else ""
        problem = f"is unknown; choose one of {', '.join(rule['choices'])}{empty}"
    else:
        low, below, high, above = rule["low"], rule["below"], rule["high"], rule["above"]
        if ((low is None or low <= value) and (below is None or value < below) and (high is None or value <= high)
                and (above is None or above < value)):
            return None
        if below is not None or high is not None:
            allowed = f"in [{low}, {below})" if below is not None else f"in [{low}, {high}]"
        else:
            allowed = f">= {low}" if low is not None else f"> {above}"
        problem = "is negative" if low == 0 and allowed.startswith(">=") else f"must be {allowed}"
        if f.default != 0 and not (low is None or low <= f.default):  # a sentinel below the range
            problem += f" or {f.default}"
    return f"{flag} {problem}; --{name}: {rule['help']}"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; `python train.py --key=value` sets any field.

    Zero / empty values mean "auto": resolved from the preset and the platform by trainer.resolve().
    Values that make no sense (a negative step count, beta2 = 1, an unknown dtype) raise ValueError at
    construction, naming the flag, so that train.py rejects them before JAX starts.
    """

    platform: str = _flag("", "JAX backend: cpu | gpu | tpu (empty: JAX's default)", choices=PLATFORMS)
    preset: str = _flag("char", "model size: " + ", ".join(PRESETS), choices=tuple(PRESETS))
    init_from: str = _flag("scratch", "scratch | an HF name (gpt2, gpt2-medium, ...) or folder | a training "
                           "out_dir (local or gs://)")
    data: str = _flag("", "token shard folder (python -m gpt2_jax.data ...); empty: Python's bundled docs, char-level")
    out_dir: str = _flag("out", "checkpoints, metrics.jsonl, TensorBoard events and plots go here: a local "
                         "folder or gs://bucket/path (pip install 'gpt2-jax[gcs]')")
    resume: bool = _flag(False, "require a checkpoint in out_dir to resume from (resuming is automatic anyway)")
    # Batch: total_batch_size tokens per optimizer step = micro_batch_size * block_size * grad_accum.
    total_batch_size: int = _flag(0, "tokens per optimizer step (0: 2**19 for GPT-2 sizes, one micro-batch for char)",
                                  low=0)
    micro_batch_size: int = _flag(0, "sequences per micro-step over all devices (0: auto)", low=0)
    block_size: int = _flag(0, "sequence length (0: the preset's; 64 for char on CPU)", low=0)
    n_layer: int = _flag(0, "override the preset's number of blocks (0: the preset's; 4 for char on CPU)", low=0)
    n_head: int = _flag(0, "override the preset's attention heads (0: the preset's; 4 for char on CPU)", low=0)
    n_embd: int = _flag(0, "override the preset's width (0: the preset's; 128 for char on CPU)", low=0)
    vocab_size: int = _flag(0, "model vocabulary (0: the data's; GPT-2 BPE is padded to 50304)", low=0)
    dropout: float = _flag(-1.0, "dropout rate (-1: the preset's; 0 for char on CPU)", low=0.0, below=1.0)
    dtype: str = _flag("", "compute dtype: float32 | bfloat16 (empty: bfloat16 on gpu/tpu, float32 on cpu)",
                       choices=DTYPES)
    attention: str = _flag("", "xla | cudnn | blocked | einsum (empty: cudnn on gpu with bfloat16, blocked on "
                                "cpu, else xla)", choices=ATTENTION)
    remat: str = _flag("none", "activation checkpointing per block: none | full | dots", choices=REMAT)
    data_order: str = _flag("shuffle", "order of the train windows: shuffle (a seeded permutation per epoch, from "
                            "--seed) | sequential (contiguous stretches, build-nanogpt's order)",
                            choices=("shuffle", "sequential"))
    mesh: str = _flag("", "device mesh, e.g. data:8 or data:2,fsdp:4 (empty: every device on data; "
                      "single-process runs may use fewer devices than they have)")
    # Optimizer and schedule (optim.py).
    max_steps: int = _flag(0, "optimizer steps (0: 19073 for GPT-2 sizes = 10B tokens; 2000 for char on CPU, 5000 elsewhere)",
                           low=0)
    warmup_steps: int = _flag(-1, "linear warmup steps (-1: 715 for GPT-2 sizes, 10% of max_steps otherwise)", low=-1)
    # No upper bound on max_lr: where training diverges depends on the model, batch and warmup (3e-3 trains
    # the small char model, 124M needs ~6e-4), a diverged run stops with a message naming --max_lr
    # (--on_nan), and the reliability tests set --max_lr=1e10 to make a real run diverge.
    max_lr: float = _flag(0.0, "peak learning rate (0: 6e-4 for GPT-2 sizes, 1e-3 for char)", low=0.0)
    min_lr_ratio: float = _flag(0.1, "final learning rate as a fraction of max_lr", low=0.0, high=1.0)
    weight_decay: float = _flag(0.1, "AdamW weight decay on >=2-D params", low=0.0)
    beta1: float = _flag(0.9, "AdamW beta1", low=0.0, below=1.0)
    beta2: float = _flag(0.95, "AdamW beta2", low=0.0, below=1.0)
    eps: float = _flag(1e-8, "AdamW epsilon", above=0.0)
    grad_clip: float = _flag(1.0, "max global gradient norm (0: off)", low=0.0)
    # Evaluation, samples, checkpoints, logs.
    eval_every: int = _flag(250, "validation loss every N steps (and at the end); 0: never", low=0)
    eval_tokens: int = _flag(20 * 64 * 1024 * 8, "validation tokens per evaluation: windows spread evenly over "
                             "the whole val split, the same ones every time (0: the whole split)", low=0)
    sample_every: int = _flag(250, "print samples every N steps (and at the end); 0: never", low=0)
    sample_tokens: int = _flag(64, "tokens per sample", low=1)
    num_samples: int = _flag(2, "samples per sampling round", low=1)
    sample_prompt: str = _flag("", "sample prompt (empty: \"Hello, I'm a language model,\" for BPE, newline for char)")
    hellaswag_every: int = _flag(0, "HellaSwag acc_norm every N steps (BPE models); 0: never", low=0)
    hellaswag_data: str = _flag("", "HellaSwag jsonl (empty: download the official validation file)")
    hellaswag_limit: int = _flag(0, "evaluate only the first N HellaSwag examples (0: all 10,042)", low=0)
    checkpoint_every: int = _flag(1000, "checkpoint every N steps (and at the end); 0: only at the end", low=0)
    keep_checkpoints: int = _flag(3, "how many recent checkpoints to keep", low=1)
    log_every: int = _flag(1, "console and metrics.jsonl line every N steps", low=1)
    tensorboard: bool = _flag(True, "also write TensorBoard event files to out_dir/tb")
    seed: int = _flag(1337, "seed for init, dropout and sampling")
    on_nan: str = _flag("stop", "non-finite loss or grad norm: stop (keep the last good checkpoint) | skip the update",
                        choices=("stop", "skip"))
    max_skips: int = _flag(10, "--on_nan=skip stops the run as --on_nan=stop does after more than this many "
                           "CONSECUTIVE skipped updates (a diverged run); a finite step resets the count (0: no limit)",
                           low=0)
    # Multi-process (multi-host GPU, or several CPU processes in tests); Cloud TPU VMs need none of these.
    distributed: str = _flag("auto", "call jax.distributed.initialize(): auto (with --platform=tpu, or where "
                             "TPU_WORKER_HOSTNAMES lists several hosts) | true | false", choices=AUTO_BOOL)
    coordinator_address: str = _flag("", "host:port of process 0, for --distributed off TPU")
    num_processes: int = _flag(0, "process count, for --distributed off TPU", low=0)
    process_id: int = _flag(-1, "this process's index, for --distributed off TPU", low=-1)
    local_device_count: int = _flag(0, "CPU only: fake devices per process (testing multi-device code)", low=0)
    # Compile once per machine: XLA programs are kept on disk and reused by the next run with the same program.
    compile_cache: str = _flag("", "persistent XLA compilation cache folder; empty: $JAX_COMPILATION_CACHE_DIR if "
                               "set, else $GPT2_JAX_CACHE/jax-compile ($XDG_CACHE_HOME/gpt2_jax or ~/.cache/gpt2_jax "
                               "without it); off: no cache")

    def __post_init__(self):
        """Reject values that make no sense, each problem on its own line. The one place these flags are
        checked: train.py turns the ValueError into a usage error (exit status 2) before JAX starts."""
        problems = [p for f in dataclasses.fields(self) if (p := _flag_problem(f, getattr(self, f.name)))]
        if 0 < self.num_processes <= self.process_id:
            problems.append(f"--process_id={self.process_id} must be < --num_processes={self.num_processes} "
                            "(processes count from 0)")
        if problems:
            raise ValueError("\n".join(problems))


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
