"""Every setting of a training run (TrainConfig), the flags that set them, and how the "auto" values become
concrete ones (resolve). No JAX here: train.py and `python -m gpt2_jax.plan` check their flags before JAX
starts, and both build their flags from the fields below, so a flag's help is written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
from typing import Any

from gpt2_jax.backends import PLATFORM_HELP, PLATFORMS
from gpt2_jax.config import (
    ATTENTION,
    DTYPES,
    GPT2_SIZES,
    GPT2_VOCAB_SIZE,
    PADDED_VOCAB_SIZE,
    PRESETS,
    REMAT,
    GPTConfig,
    default_attention,
    preset,
)
from gpt2_jax.metrics import WANDB_EXTRA
from gpt2_jax.recipes import ADAMW, DATA_CACHE_GB, RECIPES, recipe

_G, _C, _F = RECIPES["gpt2"], RECIPES["char/cpu"], RECIPES["finetune"]  # (for the help texts)


def _power_of_two(n: int) -> str:
    return f"2**{int(math.log2(n))}" if n & (n - 1) == 0 else str(n)


def _lr(x: float) -> str:
    """6e-4, not 0.0006 or 6e-04."""
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _flag(default: Any, help: str, *, low: float | None = None, below: float | None = None,
          high: float | None = None, above: float | None = None, choices: tuple[str, ...] = (),
          nonempty: bool = False) -> Any:
    """A TrainConfig field: its default, its --help text, and the values that make sense, which
    TrainConfig.__post_init__ enforces: `low <= value`, `value < below`, `value <= high`, `above < value`,
    `value in choices`, a `nonempty` string. The default always passes: it is the "auto" value ("", -1)
    where the rules would reject it."""
    rules = dict(low=low, below=below, high=high, above=above, choices=choices, nonempty=nonempty)
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
    elif rule["nonempty"] and not value.strip():
        problem = "is empty (an unset shell variable?); give a folder"
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

    Zero / empty values mean "auto": resolved from the preset and the platform by resolve() (recipes.RECIPES).
    Values that make no sense (a negative step count, beta2 = 1, an unknown dtype) raise ValueError at
    construction, naming the flag, so that train.py rejects them before JAX starts.
    """

    platform: str = _flag("", PLATFORM_HELP, choices=PLATFORMS)
    preset: str = _flag("char", "model size: " + ", ".join(PRESETS), choices=tuple(PRESETS))
    init_from: str = _flag("scratch", "scratch | an HF name (gpt2, gpt2-medium, ...) or folder | a training "
                           "out_dir (local or gs://)")
    finetune: bool = _flag(False, "fine-tune --init_from with the fine-tuning recipe: "
                           f"{_power_of_two(_F['total_batch_size'])} tokens per step, a constant {_lr(_F['max_lr'])}, "
                           f"no warmup, {_F['max_steps']} steps, "
                           f"validation every {_F['eval_every']} (any of these flags still wins)")
    data: str = _flag("", "token shard folder (python -m gpt2_jax.data ...), local or gs://bucket/path (fetched "
                      "shard by shard into a local cache); empty: Python's bundled docs, char-level")
    data_cache_gb: float = _flag(DATA_CACHE_GB, "--data=gs://...: the most GiB of shards kept in this machine's "
                                 "cache (the least recently used go first)", above=0.0)
    out_dir: str = _flag("out", "checkpoints, metrics.jsonl, TensorBoard events and plots go here: a local "
                         "folder or gs://bucket/path (pip install 'gpt2-jax[gcs]')", nonempty=True)
    resume: bool = _flag(False, "require a checkpoint in out_dir to resume from (resuming is automatic anyway)")
    # Batch: total_batch_size tokens per optimizer step = micro_batch_size * block_size * grad_accum.
    total_batch_size: int = _flag(0, f"tokens per optimizer step (0: {_power_of_two(_G['total_batch_size'])} for "
                                  "GPT-2 sizes, one micro-batch for char)", low=0)
    micro_batch_size: int = _flag(0, "sequences per micro-step over all devices (0: auto)", low=0)
    block_size: int = _flag(0, f"sequence length (0: the preset's; {_C['block_size']} for char on CPU)", low=0)
    n_layer: int = _flag(0, f"override the preset's number of blocks (0: the preset's; {_C['n_layer']} for char on "
                         "CPU)", low=0)
    n_head: int = _flag(0, f"override the preset's attention heads (0: the preset's; {_C['n_head']} for char on "
                        "CPU)", low=0)
    n_embd: int = _flag(0, f"override the preset's width (0: the preset's; {_C['n_embd']} for char on CPU)", low=0)
    vocab_size: int = _flag(0, "model vocabulary (0: the data's; GPT-2 BPE is padded to 50304)", low=0)
    dropout: float = _flag(-1.0, f"dropout rate (-1: the preset's; {_C['dropout']:g} for char on CPU)",
                           low=0.0, below=1.0)
    dtype: str = _flag("", "compute dtype: float32 | bfloat16 (empty: bfloat16 on gpu/tpu, float32 on cpu)",
                       choices=DTYPES)
    attention: str = _flag("", "xla | cudnn | blocked | einsum | splash (empty: cudnn on gpu and splash on tpu "
                                "with bfloat16, blocked on cpu, else xla)", choices=ATTENTION)
    remat: str = _flag("none", "activation checkpointing per block: none | full | dots", choices=REMAT)
    data_order: str = _flag("shuffle", "order of the train windows: shuffle (a seeded permutation per epoch, from "
                            "--seed) | sequential (contiguous stretches, build-nanogpt's order)",
                            choices=("shuffle", "sequential"))
    mesh: str = _flag("", "device mesh, e.g. data:8 or data:2,fsdp:4 (empty: every device on data; "
                      "single-process runs may use fewer devices than they have)")
    # Optimizer and schedule (optim.py).
    max_steps: int = _flag(0, f"optimizer steps (0: {_G['max_steps']} for GPT-2 sizes = 10B tokens; "
                           f"{_C['max_steps']} for char on CPU, {RECIPES['char']['max_steps']} elsewhere)", low=0)
    warmup_steps: int = _flag(-1, f"linear warmup steps (-1: 10% of max_steps, at most {_G['warmup_steps']} for GPT-2 "
                              f"sizes and {_C['warmup_steps']} for char on CPU)", low=-1)
    # No upper bound on max_lr: where training diverges depends on the model, batch and warmup (3e-3 trains
    # the small char model, 124M needs ~6e-4), a diverged run stops with a message naming --max_lr
    # (--on_nan), and the reliability tests set --max_lr=1e10 to make a real run diverge.
    max_lr: float = _flag(0.0, f"peak learning rate (0: {_lr(_G['max_lr'])} for GPT-2 sizes, "
                          f"{_lr(RECIPES['char']['max_lr'])} for char)", low=0.0)
    min_lr_ratio: float = _flag(ADAMW["min_lr_ratio"], "final learning rate as a fraction of max_lr", low=0.0, high=1.0)
    weight_decay: float = _flag(ADAMW["weight_decay"], "AdamW weight decay on >=2-D params", low=0.0)
    beta1: float = _flag(ADAMW["beta1"], "AdamW beta1", low=0.0, below=1.0)
    beta2: float = _flag(ADAMW["beta2"], "AdamW beta2", low=0.0, below=1.0)
    eps: float = _flag(ADAMW["eps"], "AdamW epsilon", above=0.0)
    grad_clip: float = _flag(ADAMW["grad_clip"], "max global gradient norm (0: off)", low=0.0)
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
    wandb_project: str = _flag("", "Weights & Biases project: log every metrics.jsonl row, samples and the config "
                               "there (needs the wandb extra; WANDB_MODE=offline: files in out_dir/wandb); empty: off")
    wandb_run_name: str = _flag("", "the W&B run's name (empty: W&B picks one); a resumed run keeps its run")
    wandb_entity: str = _flag("", "the W&B team or user the project belongs to (empty: your default)")
    profile_steps: str = _flag("", "A:B: a jax.profiler trace of training steps A to B in out_dir/profile, for "
                               "TensorBoard's profile plugin, xprof or Perfetto (from step 2: step 1 compiles)")
    seed: int = _flag(1337, "seed for init, dropout and sampling", low=0, high=2**63 - 1)
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
        if self.finetune and self.init_from == "scratch":
            problems.append("--finetune fine-tunes a checkpoint: give --init_from (an HF name or folder, or a "
                            "training run's out_dir)")
        problems += _width_problems(self)
        if self.profile_steps and (problem := profile_steps_problem(self.profile_steps)):
            problems.append(f"--profile_steps={self.profile_steps!r} {problem}")
        if (self.wandb_run_name or self.wandb_entity) and not self.wandb_project:
            problems.append("--wandb_run_name and --wandb_entity name a run of a project: give --wandb_project too")
        if self.wandb_project and importlib.util.find_spec("wandb") is None:
            problems.append(f"--wandb_project needs Weights & Biases: {WANDB_EXTRA}")
        if problems:
            raise ValueError("\n".join(problems))


def profile_steps(text: str) -> tuple[int, int] | None:
    """--profile_steps "A:B" as (A, B); None when empty."""
    if not text:
        return None
    first, colon, last = text.partition(":")
    return int(first), int(last) if colon else int(first)


def profile_steps_problem(text: str) -> str | None:
    try:
        first, last = profile_steps(text)
    except ValueError:
        return "is not A:B (two step numbers, e.g. 5:7)"
    if first < 2:
        return "starts before step 2: step 1 compiles the program, and the trace is of compiled steps (e.g. 2:4)"
    if last < first:
        return f"ends before it starts; give A:B with A <= B (e.g. {first}:{first + 2})"
    return None


def _width_problems(tc: TrainConfig) -> list[str]:
    """--n_head must divide the width (GPTConfig's rule), checked here, before JAX starts, against the width
    the run will have: --n_embd, else the preset's on each backend the run may land on (--platform, or all:
    the char preset is narrower on a CPU)."""
    sizes = (tc.n_head, tc.n_embd)
    if tc.preset not in PRESETS or not any(sizes) or not all(isinstance(n, int) and n >= 0 for n in sizes):
        return []  # nothing set, or already rejected above
    base, found = PRESETS[tc.preset], {}
    for backend in (tc.platform,) if tc.platform in PLATFORMS else PLATFORMS:
        row = recipe(tc.preset, backend)
        width, heads = tc.n_embd or row.get("n_embd", base.n_embd), tc.n_head or row.get("n_head", base.n_head)
        if width % heads:
            found.setdefault((width, heads), []).append(backend)
    set_heads, set_width = "--" * bool(tc.n_head), "--" * bool(tc.n_embd)  # a flag the user set, or the preset's
    return [f"{set_heads}n_head={heads} does not divide {set_width}n_embd={width}"
            + ("" if tc.n_head and tc.n_embd else f" (the {tc.preset} preset's on {'/'.join(where)})")
            + "; set --n_head and --n_embd so that n_embd is a multiple of n_head"
            for (width, heads), where in found.items()]


def resolve(tc: TrainConfig, backend: str, num_devices: int) -> TrainConfig:
    """Fill the "auto" (zero / empty / -1) settings from the preset's recipe (recipes.RECIPES) and the platform."""
    row = recipe(tc.preset, backend, tc.finetune)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    # Flags left unset; warmup follows the run's length (below), the recipe's value caps it.
    auto = {k: v for k, v in row.items() if k in defaults and getattr(tc, k) == defaults[k] and k != "warmup_steps"}
    if "micro_batch_size" in auto:  # a multiple of the devices, which split it
        auto["micro_batch_size"] = -(-auto["micro_batch_size"] // num_devices) * num_devices
    elif not tc.micro_batch_size:
        auto["micro_batch_size"] = row["micro_per_device"] * num_devices
    tc = dataclasses.replace(tc, **auto)
    block = tc.block_size or PRESETS[tc.preset].block_size
    steps = tc.max_steps
    dtype = tc.dtype or ("float32" if backend == "cpu" else "bfloat16")
    return dataclasses.replace(
        tc, block_size=block, total_batch_size=tc.total_batch_size or tc.micro_batch_size * block,
        warmup_steps=tc.warmup_steps if tc.warmup_steps >= 0 else min(max(1, steps // 10),
                                                                      row.get("warmup_steps", steps)),
        dtype=dtype, attention=tc.attention or default_attention(backend, dtype),
    )


def grad_accum_steps(tc: TrainConfig, dp: int, processes: int) -> int:
    """Micro-batches per optimizer step, after checking the batch arithmetic (before anything compiles)."""
    if tc.micro_batch_size % dp:
        raise ValueError(f"--micro_batch_size={tc.micro_batch_size} is not divisible by the {dp} data-parallel "
                         f"devices of --mesh={tc.mesh or 'data:all'}; use a multiple of {dp}")
    if tc.micro_batch_size % processes:
        raise ValueError(f"--micro_batch_size={tc.micro_batch_size} is not divisible by {processes} processes")
    tokens = tc.micro_batch_size * tc.block_size
    if tc.total_batch_size % tokens:
        raise ValueError(f"--total_batch_size={tc.total_batch_size} is not a multiple of micro_batch_size * "
                         f"block_size = {tc.micro_batch_size} * {tc.block_size} = {tokens}")
    return tc.total_batch_size // tokens


def with_checkpoint_shape(tc: TrainConfig, source: GPTConfig) -> tuple[TrainConfig, str]:
    """`tc` with --init_from's architecture (`source`: the checkpoint's model) as its size flags: n_layer,
    n_head, n_embd and the vocabulary (GPT-2's padded to 50304) from the checkpoint, and its context unless a
    shorter --block_size crops it. A flag, or a GPT-2 --preset, that asks for another shape is a ValueError
    naming both values. Also the log line that says where each value came from."""
    where = f"--init_from={tc.init_from}"
    sized = PRESETS[tc.preset] if tc.preset in GPT2_SIZES else None  # a preset that names a shape
    problems = []
    for name in ("n_layer", "n_head", "n_embd"):
        have, flag = getattr(source, name), getattr(tc, name)
        if flag and flag != have:
            problems.append(f"--{name}={flag} conflicts with {where}, which has {name}={have}")
        elif not flag and sized and getattr(sized, name) != have:
            problems.append(f"--preset={tc.preset} (its {name}={getattr(sized, name)}) conflicts with {where}, "
                            f"which has {name}={have}")
    if tc.vocab_size and tc.vocab_size < source.vocab_size:
        problems.append(f"--vocab_size={tc.vocab_size} is smaller than {where}'s vocabulary ({source.vocab_size}); "
                        "a vocabulary can be padded, never cut")
    fix = "; drop the flag: with --init_from the model's shape comes from the checkpoint"
    problems = [p + fix for p in problems]
    if tc.block_size > source.block_size:
        problems.append(f"--block_size={tc.block_size} is longer than {where}'s context: it learned "
                        f"{source.block_size} positions and has none for the others; use --block_size <= "
                        f"{source.block_size} (a shorter one crops its position embeddings)")
    if problems:
        raise ValueError("\n".join(problems))
    padded = PADDED_VOCAB_SIZE if source.vocab_size == GPT2_VOCAB_SIZE else source.vocab_size
    vocab, block = tc.vocab_size or padded, tc.block_size or source.block_size
    note = (f"model shape from {where}: n_layer={source.n_layer} n_head={source.n_head} n_embd={source.n_embd}, "
            f"vocab {vocab}" + (f" ({source.vocab_size} padded{' by --vocab_size' if tc.vocab_size else ''})"
                                if vocab != source.vocab_size else "")
            + f", context {block}" + (f" (--block_size; cropped from {source.block_size})"
                                      if block < source.block_size else ""))
    return dataclasses.replace(tc, n_layer=source.n_layer, n_head=source.n_head, n_embd=source.n_embd,
                               vocab_size=vocab, block_size=block), note


def model_config(tc: TrainConfig, data_vocab: int) -> GPTConfig:
    """The model of a resolved `tc` for data with `data_vocab` tokens (GPT-2 BPE is padded to 50304)."""
    vocab = tc.vocab_size or (PADDED_VOCAB_SIZE if data_vocab == GPT2_VOCAB_SIZE else data_vocab)
    if vocab < data_vocab:
        if tc.init_from == "scratch":
            raise ValueError(f"--vocab_size={vocab} is smaller than the data's vocabulary ({data_vocab} tokens)")
        raise ValueError(f"--init_from={tc.init_from} has a vocabulary of {vocab} tokens, fewer than the data's "
                         f"({data_vocab}); tokenise the data with that model's tokenizer")
    base = PRESETS[tc.preset]
    sizes = {k: getattr(tc, k) for k in ("n_layer", "n_head", "n_embd") if getattr(tc, k)}
    return preset(tc.preset, vocab_size=vocab, block_size=tc.block_size, dtype=tc.dtype, attention=tc.attention,
                  remat=tc.remat, dropout=base.dropout if tc.dropout < 0 else tc.dropout, **sizes)


# ---------------------------------------------------------------------------------------------------
# Flags: one per field, for train.py and the planner


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _auto_bool(text: str) -> str:
    return "auto" if text.lower() == "auto" else str(_bool(text)).lower()


def add_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None, **defaults: Any) -> None:
    """A --flag per TrainConfig field (`names`: only these), with the field's help and type. A bool flag works
    bare (`--resume`) or with a value (`--tensorboard=false`). `defaults` replace a field's default (the
    planner's --preset=gpt2)."""
    for f in dataclasses.fields(TrainConfig):
        if names is not None and f.name not in names:
            continue
        default = defaults.get(f.name, f.default)
        text = f"{f.metadata['help']} (default: {default!r})".replace('%', '%%')
        if f.type in (bool, "bool"):
            parser.add_argument(f"--{f.name}", type=_bool, nargs="?", const=True, default=default,
                                metavar="BOOL", help=text)
        elif f.metadata["choices"] == AUTO_BOOL:  # --distributed, --distributed=false, --distributed=auto
            parser.add_argument(f"--{f.name}", type=_auto_bool, nargs="?", const="true", default=default,
                                metavar="auto|BOOL", help=text)
        else:
            parser.add_argument(f"--{f.name}", type=type(f.default), default=default,
                                metavar=type(f.default).__name__.upper(), help=text)


def build_parser(prog: str = "train.py", description: str | None = None) -> argparse.ArgumentParser:
    """train.py's parser: a --flag per TrainConfig field (tests/test_docs.py checks the docs' commands with it)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser)
    return parser


def parse_flags(argv: list[str] | None = None, prog: str = "train.py", description: str | None = None) -> TrainConfig:
    """Flags -> TrainConfig. Bad values exit with status 2 and the flag's name: argparse checks the types,
    TrainConfig the values."""
    parser = build_parser(prog, description)
    args = parser.parse_args(argv)
    try:
        return TrainConfig(**vars(args))
    except ValueError as e:
        parser.error(str(e))

