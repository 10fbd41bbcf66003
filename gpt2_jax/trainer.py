"""The training loop: flags -> mesh -> sharded model and optimizer -> data -> jitted steps -> logs,
evals, samples and checkpoints.

One `jax.jit` train step with explicit in/out shardings does a whole optimizer step: the gradients of
`grad_accum` micro-batches are summed inside it with `lax.scan`, then clipped and applied. Its state
argument is donated, so params and optimizer state are updated in place. The loop around it is plain
Python.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding

from gpt2_jax import data as data_lib
from gpt2_jax import hellaswag, runs, sharding, storage
from gpt2_jax.checkpoint import Checkpointer, agree
from gpt2_jax.config import PADDED_VOCAB_SIZE, PRESETS, GPTConfig, TrainConfig, preset
from gpt2_jax.generate import generate
from gpt2_jax.metrics import MetricsLogger, flops_per_token, format_step_line, mfu, mfu_banner, peak_flops
from gpt2_jax.model import GPT, default_attention
from gpt2_jax.optim import OptimConfig, lr_at, make_optimizer
from gpt2_jax.plot import plot_run

GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
STOP_CHECK_EVERY = 10  # steps between the stop-signal exchanges of a multi-process run


class TrainState(nnx.Module):
    """Everything the train step updates: the model and its optimizer (AdamW moments and step)."""

    def __init__(self, model: GPT, tx: optax.GradientTransformation):
        self.model = model
        self.opt = nnx.Optimizer(model, tx, wrt=nnx.Param)


# ---------------------------------------------------------------------------------------------------
# Settings


# The char preset on a CPU (the default `python train.py`): the settings that learned the most in about
# 3 minutes on 2 cores (benchmarks/convergence.py --corpus bundled; benchmarks/NOTES.md). On GPU/TPU the
# char preset keeps its full size (6 layers, 384 wide, T=256, dropout 0.2).
CPU_CHAR = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, micro_batch_size=12, max_steps=2000,
                warmup_steps=100, dropout=0.0)


def resolve(tc: TrainConfig, backend: str, num_devices: int) -> TrainConfig:
    """Fill the "auto" (zero / empty / -1) settings from the preset and the platform."""
    big = tc.preset in GPT2_SIZES
    cpu = backend == "cpu"
    if cpu and not big:
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        auto = {k: v for k, v in CPU_CHAR.items() if getattr(tc, k) == defaults[k]}  # flags left unset
        if "micro_batch_size" in auto:  # a multiple of the devices, which split it
            auto["micro_batch_size"] = -(-auto["micro_batch_size"] // num_devices) * num_devices
        tc = dataclasses.replace(tc, **auto)
    block = tc.block_size or PRESETS[tc.preset].block_size
    if tc.micro_batch_size:
        micro = tc.micro_batch_size
    else:
        micro = ((4 if cpu else 16) if big else 64) * num_devices
    total = tc.total_batch_size or (2**19 if big else micro * block)
    steps = tc.max_steps or (19073 if big else 5000)
    dtype = tc.dtype or ("float32" if cpu else "bfloat16")
    return dataclasses.replace(
        tc, block_size=block, micro_batch_size=micro, total_batch_size=total, max_steps=steps,
        warmup_steps=tc.warmup_steps if tc.warmup_steps >= 0 else (715 if big else max(1, steps // 10)),
        max_lr=tc.max_lr or (6e-4 if big else 1e-3),
        dtype=dtype, attention=tc.attention or default_attention(backend, dtype),
    )


def check_batch(tc: TrainConfig, dp: int, processes: int) -> int:
    """Validate the batch arithmetic before anything compiles; returns grad_accum."""
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


def optim_config(tc: TrainConfig) -> OptimConfig:
    return OptimConfig(max_lr=tc.max_lr, min_lr_ratio=tc.min_lr_ratio, warmup_steps=tc.warmup_steps,
                       max_steps=tc.max_steps, weight_decay=tc.weight_decay, beta1=tc.beta1, beta2=tc.beta2,
                       eps=tc.eps, grad_clip=tc.grad_clip)


def model_config(tc: TrainConfig, data_vocab: int) -> GPTConfig:
    vocab = tc.vocab_size or (PADDED_VOCAB_SIZE if data_vocab == 50257 else data_vocab)
    if vocab < data_vocab:
        raise ValueError(f"--vocab_size={vocab} is smaller than the data's vocabulary ({data_vocab} tokens)")
    base = PRESETS[tc.preset]
    sizes = {k: getattr(tc, k) for k in ("n_layer", "n_head", "n_embd") if getattr(tc, k)}
    return preset(tc.preset, vocab_size=vocab, block_size=tc.block_size, dtype=tc.dtype, attention=tc.attention,
                  remat=tc.remat, dropout=base.dropout if tc.dropout < 0 else tc.dropout, **sizes)


# ---------------------------------------------------------------------------------------------------
# The jitted steps


def make_train_step(graphdef, state_shardings, batch_sharding, grad_accum: int, dropout: bool,
                    vocab_limit: int | None = None):
    repl = sharding.replicated(batch_sharding.mesh)

    def train_step(state, x, y, rng):
        """x, y: (grad_accum, micro_batch, T). Returns the new state and scalar metrics."""
        # copy=True: without it `ts` shares its Variables with `state`, so the update below would
        # overwrite `state` too, and a non-finite step could not be undone.
        ts = nnx.merge(graphdef, state, copy=True)
        model_def, params = nnx.split(ts.model)

        def loss_fn(params, x, y, key):
            return nnx.merge(model_def, params).loss(x, y, vocab_limit, dropout_rng=key)

        def micro_step(carry, batch):
            loss_sum, grad_sum = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        keys = jax.random.split(rng, grad_accum) if dropout else None
        zeros = jax.tree.map(jnp.zeros_like, params)
        (loss, grads), _ = jax.lax.scan(micro_step, (jnp.zeros((), jnp.float32), zeros), (x, y, keys))
        loss, grads = loss / grad_accum, jax.tree.map(lambda g: g / grad_accum, grads)
        grad_norm = optax.tree.norm(grads)
        ts.opt.update(ts.model, grads)
        # A non-finite loss or gradient leaves the state as it was; the host decides to stop or go on.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), nnx.state(ts), state)
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    return jax.jit(train_step, donate_argnums=0,
                   in_shardings=(state_shardings, batch_sharding, batch_sharding, repl),
                   out_shardings=(state_shardings, repl))


def make_eval_step(graphdef, state_shardings, batch_sharding, vocab_limit: int | None = None):
    def eval_step(state, x, y):
        return nnx.merge(graphdef, state).model.loss(x, y, vocab_limit)

    return jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding, batch_sharding),
                   out_shardings=sharding.replicated(batch_sharding.mesh))


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The jitted train step of a config on a mesh, and what it is built from: one code path for the
    trainer and for plan.py's ahead-of-time compiles (for a target that need not be attached)."""

    graphdef: Any
    abstract: Any  # the TrainState as an nnx.State of ShapeDtypeStructs: shapes, no arrays
    shardings: Any  # of `abstract`
    tx: optax.GradientTransformation
    optim: OptimConfig
    grad_accum: int  # micro-batches per optimizer step
    batch_sharding: NamedSharding  # of a train batch (grad_accum, micro_batch, T)
    fn: Callable  # (state, x, y, rng) -> (state, metrics)
    batch_shape: tuple[int, int, int]  # (grad_accum, micro_batch, T)

    def abstract_args(self) -> tuple:
        """`fn`'s arguments as ShapeDtypeStructs with their shardings: `step.fn.lower(*step.abstract_args())`."""
        batch = jax.ShapeDtypeStruct(self.batch_shape, jnp.int32, sharding=self.batch_sharding)
        rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                   sharding=sharding.replicated(self.batch_sharding.mesh))
        return sharding.with_shardings(self.abstract, self.shardings), batch, batch, rng


def build_step(tc: TrainConfig, cfg: GPTConfig, mesh, vocab_limit: int | None = None) -> TrainStep:
    """The train step for a resolved `tc` and its model `cfg` on `mesh` (any devices, attached or not)."""
    grad_accum = check_batch(tc, sharding.data_parallel_size(mesh), jax.process_count())
    oc = optim_config(tc)
    tx = make_optimizer(oc)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TrainState(GPT(cfg, rngs=nnx.Rngs(0)), tx)))
    shardings = sharding.state_shardings(abstract, mesh)
    batch_sh = sharding.batch_sharding(mesh, ndim=3, batch_dim=1)
    fn = make_train_step(graphdef, shardings, batch_sh, grad_accum, dropout=cfg.dropout > 0, vocab_limit=vocab_limit)
    return TrainStep(graphdef, abstract, shardings, tx, oc, grad_accum, batch_sh, fn,
                     batch_shape=(grad_accum, tc.micro_batch_size, tc.block_size))


# ---------------------------------------------------------------------------------------------------
# Setup helpers


def init_distributed(tc: TrainConfig) -> None:
    """Fake CPU devices and jax.distributed: must run before any JAX backend initialises.

    --distributed=auto joins the other processes on TPU (a Cloud TPU VM finds its pod's hosts itself,
    through the metadata server; on one host it is a no-op JAX recommends anyway) and where
    TPU_WORKER_HOSTNAMES lists several hosts (GKE). --distributed=true: SLURM and Open MPI clusters
    describe themselves; elsewhere pass --coordinator_address, --num_processes and --process_id.
    """
    if tc.local_device_count:
        jax.config.update("jax_num_cpu_devices", tc.local_device_count)
    tpu_hosts = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if tc.distributed == "false" or (tc.distributed == "auto" and not (tc.platform == "tpu" or tpu_hosts)):
        return
    if tc.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(tc.coordinator_address, num_processes=tc.num_processes, process_id=tc.process_id)
    else:
        jax.distributed.initialize()


def prepare_data(tc: TrainConfig, out_dir: epath.Path) -> Path:
    """The token shard folder: --data, or Python's bundled docs tokenised char-level into out_dir/data.

    Shards are memory-mapped, so they are always a local folder: for a bucket out_dir the bundled corpus
    goes to a cache folder of this machine, keyed by the out_dir (each host of a pod makes its own)."""
    if tc.data:
        if storage.is_remote(tc.data):
            raise ValueError(f"--data={tc.data}: the token shards must be a local folder (they are memory-mapped) "
                             "on every host; copy them there first, e.g. gcloud storage cp -r")
        return Path(tc.data)
    if storage.is_remote(out_dir):
        folder = storage.local_folder_for(out_dir, "char-data")
        if not (folder / data_lib.META_FILE).exists():
            _prepare_bundled_corpus(folder)
        _sync("prepare_data")
        return folder
    folder = Path(out_dir) / "data"
    if not agree((folder / data_lib.META_FILE).exists()):  # process 0 decides: all must reach _sync or none
        if jax.process_index() == 0:
            data_lib.prepare_text_string(data_lib.default_corpus(), folder, tokenizer="char")
        _sync("prepare_data")
    return folder


def _prepare_bundled_corpus(folder: Path) -> None:
    """Tokenise the bundled corpus into a temporary folder, then rename it to `folder`: processes that
    share this machine may race here, and the first rename wins (their folders are identical)."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    data_lib.prepare_text_string(data_lib.default_corpus(), tmp, tokenizer="char")
    try:
        os.rename(tmp, folder)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------
# Setup: everything the loop needs, checked before anything compiles


@dataclasses.dataclass
class Run:
    """What `setup` builds and `train` uses. `state` (params + AdamW) is replaced by every step."""

    tc: TrainConfig  # resolved: no "auto" values left
    cfg: GPTConfig
    mesh: jax.sharding.Mesh
    out_dir: epath.Path  # local or gs:// (storage.run_path)
    tokenizer: data_lib.Tokenizer
    train_loader: data_lib.TokenLoader
    val_windows: data_lib.EvalWindows | None  # the in-loop val loss's batches
    fingerprint: dict  # the data folder and its shards: a checkpoint resumes only on the same data
    graphdef: Any
    state: Any
    shardings: Any  # of `state`
    grad_accum: int  # micro-batches per optimizer step
    batch_sharding: NamedSharding  # of a train batch (grad_accum, micro_batch, T)
    eval_sharding: NamedSharding  # of a val batch (micro_batch, T)
    optim: OptimConfig
    train_step: Callable
    eval_step: Callable
    ckpt: Checkpointer
    logger: MetricsLogger
    nan: NanPolicy
    start_step: int
    hellaswag: list | None  # examples, when --hellaswag_every
    sample_ids: list[int]  # the sample prompt
    loader_position: dict  # the train loader's state after the newest dispatched step's batches

    @property
    def model(self) -> GPT:
        return nnx.merge(self.graphdef, self.state).model


def setup(tc: TrainConfig) -> Run:
    """Resolve the settings, then build the mesh, data, state (fresh, resumed or initialised), compiled
    steps, logger and checkpointer. Bad input raises here, before anything compiles.

    Multi-process runs call init_distributed(tc) first (train.py does), before JAX initialises.
    """
    out_dir = storage.run_path(tc.out_dir)
    storage.check_writable(out_dir, "--out_dir")  # a bucket: fail now, not at the first checkpoint
    tc = resolve(tc, jax.default_backend(), jax.device_count())
    mesh = sharding.make_mesh(tc.mesh)
    check_batch(tc, sharding.data_parallel_size(mesh), jax.process_count())
    if not storage.is_remote(out_dir):  # (a bucket has no folders to make)
        out_dir.mkdir(parents=True, exist_ok=True)

    # Data first: every bad-input error is raised before anything compiles.
    data_dir = prepare_data(tc, out_dir)
    tokenizer = data_lib.Tokenizer.load(data_dir)
    cfg = model_config(tc, tokenizer.vocab_size)
    data_lib.check_vocab(data_dir, cfg.vocab_size)
    per_process = dict(process_index=jax.process_index(), process_count=jax.process_count(), vocab_size=cfg.vocab_size)
    train_loader = data_lib.TokenLoader(data_dir, "train", tc.micro_batch_size, tc.block_size, order=tc.data_order,
                                        seed=tc.seed, **per_process)
    fingerprint = {"dir": str(data_dir.resolve()), "shards": train_loader.state()["shards"]}
    sample_ids = sample_prompt(tc, cfg, tokenizer)
    hellaswag_examples = load_hellaswag_for(tc, tokenizer, data_dir)

    # Shapes first, then shardings, then the arrays, created directly where they belong.
    # Padded vocabulary rows (50257 -> 50304) never appear in the data: keep them out of the softmax.
    step = build_step(tc, cfg, mesh, vocab_limit=tokenizer.vocab_size)
    graphdef, abstract, shardings, tx = step.graphdef, step.abstract, step.shardings, step.tx
    ckpt = Checkpointer(out_dir / runs.CHECKPOINTS, max_to_keep=tc.keep_checkpoints)
    nan = NanPolicy(tc.on_nan, tc.max_skips)
    resumed = resume(ckpt, sharding.with_shardings(abstract, shardings), cfg, fingerprint, train_loader, nan, tc)
    if resumed is None:
        state = jax.jit(lambda: nnx.state(TrainState(GPT(cfg, rngs=nnx.Rngs(tc.seed)), tx)), out_shardings=shardings)()
        state = init_params(tc, cfg, graphdef, state, shardings)
        start_step = 0
    else:
        state, start_step = resumed

    eval_sh = sharding.batch_sharding(mesh, ndim=2)
    run = Run(
        tc=tc, cfg=cfg, mesh=mesh, out_dir=out_dir, tokenizer=tokenizer, train_loader=train_loader,
        val_windows=data_lib.EvalWindows(data_dir, tc.block_size, tc.micro_batch_size, tc.eval_tokens or None,
                                         **per_process) if tc.eval_every else None, fingerprint=fingerprint, graphdef=graphdef,
        state=state, shardings=shardings, grad_accum=step.grad_accum, batch_sharding=step.batch_sharding,
        eval_sharding=eval_sh, optim=step.optim, train_step=step.fn,
        eval_step=make_eval_step(graphdef, shardings, eval_sh, vocab_limit=tokenizer.vocab_size),
        ckpt=ckpt, logger=MetricsLogger(out_dir, tensorboard=tc.tensorboard, is_primary=jax.process_index() == 0),
        nan=nan, start_step=start_step, hellaswag=hellaswag_examples, sample_ids=sample_ids,
        loader_position=train_loader.state())
    announce(run, abstract)
    return run


def resume(ckpt: Checkpointer, target, cfg: GPTConfig, fingerprint: dict, train_loader: data_lib.TokenLoader,
           nan: NanPolicy, tc: TrainConfig) -> tuple[Any, int] | None:
    """(state, step) of the newest checkpoint that restores, with the loader and NaN counts restored
    too; None to start fresh (no checkpoint)."""
    if ckpt.latest_step() is None:
        if tc.resume:
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt.directory}; drop --resume to start fresh")
        return None
    if (meta := ckpt.read_meta()) is not None:
        check_resume(meta, cfg, fingerprint)  # a clear error before reading arrays of the wrong shape
    complete = ckpt.all_steps()
    try:  # the newest checkpoint that restores; each damaged one is skipped with a warning
        state, meta, step = ckpt.restore(target)
    except RuntimeError as e:  # none restores
        raise ValueError(f"cannot resume: {e}\nMove {ckpt.directory} away (or use a new --out_dir) to start "
                         f"over") from e
    check_resume(meta, cfg, fingerprint)
    train_loader.restore(meta["loader"])
    nan.skipped, nan.in_a_row = meta.get("skipped_steps", 0), meta.get("consecutive_skips", 0)
    damaged = [s for s in complete if s > step]
    _log(f"resumed from {ckpt.directory} at step {step}"
         + (f" (could not restore the newer checkpoints {damaged}: see the warnings above)" if damaged else ""))
    return state, step


def init_params(tc: TrainConfig, cfg: GPTConfig, graphdef, state, shardings):
    """`state` with the model params of --init_from (an HF model or a training run's; runs.load_model),
    or unchanged for --init_from=scratch. The optimizer stays fresh."""
    if tc.init_from == "scratch":
        return state
    try:
        model, _, meta = runs.load_model(tc.init_from, shardings=shardings["model"], vocab_size=cfg.vocab_size,
                                         dtype=cfg.dtype, attention=cfg.attention)
    except ValueError as e:  # e.g. a training run of another shape
        raise ValueError(f"--init_from={tc.init_from}: {e}; pick the matching --preset and size flags") from e
    if diff := model.config.arch_diff(cfg):
        detail = {f: (getattr(model.config, f), getattr(cfg, f)) for f in diff}
        raise ValueError(f"--init_from={tc.init_from} has a different architecture than --preset={tc.preset}: "
                         f"{detail} (checkpoint, preset); pick the matching --preset")
    _log(f"init_from: {tc.init_from}" + (f" step {meta['step']} (params only; a fresh optimizer)" if "step" in meta
                                         else ""))
    ts = nnx.merge(graphdef, state)
    nnx.update(ts.model, jax.device_put(nnx.state(model), shardings["model"]))
    return nnx.state(ts)


def sample_prompt(tc: TrainConfig, cfg: GPTConfig, tokenizer: data_lib.Tokenizer) -> list[int]:
    """The sample prompt's ids, checked now rather than at the first sample, 250 steps in."""
    ids = tokenizer.encode(tc.sample_prompt or ("Hello, I'm a language model," if tokenizer.name == "gpt2" else "\n"))
    new = min(tc.sample_tokens, cfg.block_size - 1)
    if tc.sample_every and not 1 <= len(ids) <= cfg.block_size - new:
        raise ValueError(f"--sample_prompt has {len(ids)} tokens; with --sample_tokens={new} it must "
                         f"have 1 to {cfg.block_size - new} tokens to fit block_size {cfg.block_size}")
    return ids


def load_hellaswag_for(tc: TrainConfig, tokenizer: data_lib.Tokenizer, data_dir: Path) -> list | None:
    if not tc.hellaswag_every:
        return None
    if tokenizer.name != "gpt2":
        raise ValueError(f"--hellaswag_every={tc.hellaswag_every} needs a GPT-2 BPE model; the data in "
                         f"{data_dir} is {tokenizer.name}-level. Set --hellaswag_every=0")
    return hellaswag.load_hellaswag(tc.hellaswag_data or None, limit=tc.hellaswag_limit or None)


def announce(run: Run, abstract) -> None:
    """The start-up lines, and config.json beside the checkpoints."""
    tc, cfg = run.tc, run.cfg
    n_params = sum(x.size for x in jax.tree.leaves(abstract["model"]))
    _log(f"model {tc.preset}: {n_params:,} params, vocab {cfg.vocab_size}, T={tc.block_size}, dtype {cfg.dtype} | "
         f"mesh {dict(run.mesh.shape)} | batch {tc.total_batch_size:,} tokens = {tc.micro_batch_size} x "
         f"{tc.block_size} x {run.grad_accum} accum | {tc.max_steps} steps")
    if peak_flops(jax.devices()[0]):
        _log(mfu_banner(flops_per_token(cfg, tc.block_size), jax.devices()[0], jax.device_count()))
    if jax.process_index() == 0:
        config = {"train": dataclasses.asdict(tc), "model": cfg.to_dict()}
        (run.out_dir / runs.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------
# The loop and its periodic tasks


def train(run: Run) -> dict:
    """Train from `run.start_step` to --max_steps; returns a summary (final step, last train/val loss,
    out_dir, params, and "interrupted": the signal's name if SIGTERM/SIGINT stopped the run early,
    after saving a checkpoint).

    The host never waits for the device without need: step N+1 is dispatched before step N's metrics
    are read (they are logged and checked one step behind, which is safe: a non-finite step leaves the
    state unchanged), and batch N+2 is read and placed while step N+1 runs. Where a periodic task or a
    stop is due, the loop catches up first, so tasks see the state and counts of their own step.
    """
    tc = run.tc
    tasks = periodic_tasks(run)
    stop = StopSignal()
    summary = {"out_dir": str(run.out_dir), "start_step": run.start_step, "loss": None, "val_loss": None}
    step, rng = run.start_step, jax.random.key(tc.seed)
    batch = next_batch(run) if step < tc.max_steps else None
    pending = None  # (step, its metrics, still on the device)
    try:
        clock = StepClock()
        while step < tc.max_steps:
            run.state, metrics = run.train_step(run.state, *batch, jax.random.fold_in(rng, step))
            step += 1
            if pending is not None:  # the previous step's metrics, while this one runs
                summary["loss"] = finish_step(run, *pending, clock)
            run.loader_position = run.train_loader.state()  # where a resume after `step` goes on
            batch = next_batch(run) if step < tc.max_steps else None
            pending = (step, metrics)
            last = step == tc.max_steps
            due = [task for every, task in tasks if every and (step % every == 0 or last)]
            stopping = stop.agreed(step)
            if not (due or stopping):
                continue
            summary["loss"], pending = finish_step(run, *pending, clock), None
            for task in due:
                summary.update(task(run, step))
            if stopping and not last:
                if save not in due:
                    save(run, step)
                run.ckpt.wait()
                _log(f"stopped by {stopping} after step {step}; checkpoint saved in {run.ckpt.directory}. "
                     f"Resume with the same command (python train.py ... --out_dir={tc.out_dir})")
                summary["interrupted"] = stopping
                break
            clock.restart()  # evals, samples and saves are not part of the step time
    finally:
        try:
            run.ckpt.wait()
            run.ckpt.close()
            run.logger.close()
        finally:
            stop.restore()  # last: a second signal during the final save still exits at once
    summary.update(step=step, skipped_steps=run.nan.skipped, params=nnx.state(run.model, nnx.Param))
    if jax.process_index() == 0 and not summary.get("interrupted"):
        try:
            _log(f"plot: {plot_run(run.out_dir)}")
        except Exception as e:  # a plot must never fail a finished run
            _log(f"(no plot: {type(e).__name__}: {e})")
    return summary


def run(tc: TrainConfig) -> dict:
    """Train as `tc` says: `train(setup(tc))`."""
    return train(setup(tc))


def periodic_tasks(run: Run) -> list[tuple[int, Callable[[Run, int], dict]]]:
    """(every N steps, task): each also runs at the last step, none where N is 0. Saving comes last,
    so a checkpoint records the evals before it; without --checkpoint_every it saves at the end only."""
    tc = run.tc
    return [(tc.eval_every, evaluate), (tc.hellaswag_every, hellaswag_eval), (tc.sample_every, sample),
            (tc.checkpoint_every or tc.max_steps, save)]


def next_batch(run: Run) -> tuple[jax.Array, jax.Array]:
    """The next optimizer step's (grad_accum, micro_batch, T) inputs and targets, as global arrays."""
    xs, ys = zip(*(run.train_loader.next_batch() for _ in range(run.grad_accum)), strict=True)
    return _global(np.stack(xs), run.batch_sharding), _global(np.stack(ys), run.batch_sharding)


class StepClock:
    """Seconds per step, measured between the moments two consecutive steps' results are read."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.mark = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.mark = now - self.mark, now
        return dt


def finish_step(run: Run, step: int, metrics: dict, clock: StepClock) -> float:
    """Read a step's metrics (waiting for the device), apply --on_nan, log every --log_every steps;
    returns the loss."""
    tc = run.tc
    metrics = jax.device_get(metrics)
    dt = clock.lap()
    run.nan.check(step, metrics, run.ckpt)  # raises to stop; else counts a skipped update
    tps = tc.total_batch_size / dt
    # Skipped updates did not advance the optimizer's step count, nor its schedule.
    row = {"loss": float(metrics["loss"]), "lr": lr_at(step - 1 - run.nan.skipped, run.optim),
           "grad_norm": float(metrics["grad_norm"]), "ms_per_step": dt * 1000, "tokens_per_sec": tps}
    if peak := peak_flops(jax.devices()[0]):
        row["mfu"] = mfu(tps, flops_per_token(run.cfg, tc.block_size), jax.device_count(), peak)
    if run.nan.skipped:
        row["skipped_steps"] = run.nan.skipped
    if step % tc.log_every == 0 or step == tc.max_steps:
        run.logger.log(step, **row)
        _log(format_step_line(step, tc.max_steps, row))
    return row["loss"]


def evaluate(run: Run, step: int) -> dict:
    """Mean loss over --eval_tokens of the val split (data.EvalWindows: spread evenly, the same every time).
    All batches have the same size, so the mean of the batch means is the mean over the tokens."""
    losses = [run.eval_step(run.state, _global(x, run.eval_sharding), _global(y, run.eval_sharding))
              for x, y in run.val_windows]
    val = float(np.mean(jax.device_get(losses)))
    run.logger.log(step, val_loss=val)
    _log(f"step {step}: val loss {val:.4f}")
    return {"val_loss": val}


def hellaswag_eval(run: Run, step: int) -> dict:
    result = hellaswag.evaluate_hellaswag(run.model, run.hellaswag, run.tokenizer.encode, mesh=run.mesh,
                                          progress=False)
    run.logger.log(step, hellaswag_acc_norm=result["acc_norm"], hellaswag_acc=result["acc"])
    _log(f"step {step}: HellaSwag acc_norm {result['acc_norm']:.4f} acc {result['acc']:.4f} "
         f"({result['n']} examples)")
    return {"hellaswag_acc_norm": result["acc_norm"]}


def sample(run: Run, step: int) -> dict:
    tc = run.tc
    prompts = np.tile(run.sample_ids, (tc.num_samples, 1))
    out = generate(run.model, prompts, min(tc.sample_tokens, run.cfg.block_size - 1), temperature=1.0, top_k=50,
                   vocab_limit=run.tokenizer.vocab_size, seed=tc.seed + step)
    for i, row in enumerate(out):
        _log(f"sample {i}: {run.tokenizer.decode(row.tolist())!r}")
    return {}


def save(run: Run, step: int) -> dict:
    """A checkpoint of the state and everything an exact resume needs (async: the loop goes on)."""
    meta = {"step": step, "model_config": run.cfg.to_dict(), "train_config": dataclasses.asdict(run.tc),
            "tokenizer": run.tokenizer.to_meta(), "loader": run.loader_position, "data": run.fingerprint,
            "skipped_steps": run.nan.skipped, "consecutive_skips": run.nan.in_a_row}
    run.ckpt.save(step, run.state, meta)
    run.logger.sync()  # a bucket out_dir: metrics.jsonl and TensorBoard files, uploaded whole
    return {}


@dataclasses.dataclass
class NanPolicy:
    """--on_nan: a non-finite loss or gradient norm left the state unchanged (the train step's guard);
    `stop` ends the run there, `skip` goes on, but stops too after more than `max_skips` in a row."""

    mode: str  # "stop" | "skip"
    max_skips: int  # 0: no limit
    skipped: int = 0  # skipped updates in all (they did not advance the LR schedule)
    in_a_row: int = 0  # consecutive ones up to now

    def check(self, step: int, metrics: dict, ckpt: Checkpointer) -> None:
        self.in_a_row = 0 if metrics["finite"] else self.in_a_row + 1
        if metrics["finite"]:
            return
        values = f"loss {metrics['loss']}, grad norm {metrics['grad_norm']}"
        if self.mode == "stop":
            self._stop(f"non-finite loss or gradient norm at step {step} ({values})",
                       "Lower --max_lr, or use --on_nan=skip to drop such updates", ckpt)
        if 0 < self.max_skips < self.in_a_row:
            self._stop(f"non-finite loss or gradient norm at {self.in_a_row} steps in a row "
                       f"({step - self.in_a_row + 1}-{step}), more than --max_skips={self.max_skips}: the run has "
                       f"likely diverged (step {step}: {values})", "Lower --max_lr, or raise --max_skips (0: no limit)",
                       ckpt)
        self.skipped += 1
        limit = f", {self.in_a_row} in a row of at most --max_skips={self.max_skips}" if self.max_skips else ""
        _log(f"step {step}: non-finite loss or gradient norm; update skipped (--on_nan=skip, "
             f"{self.skipped} skipped so far){limit}")

    @staticmethod
    def _stop(what: str, fix: str, ckpt: Checkpointer):
        ckpt.wait()  # the newest save may still be in flight: name the one that is on disk
        good = ckpt.latest_step()
        raise FloatingPointError(f"{what}; the update was not applied. Last good checkpoint: "
                                 f"{'none' if good is None else f'step {good}'} in {ckpt.directory}. {fix}")


class StopSignal:
    """SIGTERM/SIGINT: finish the step, checkpoint, exit. A second signal exits at once (status 128+N),
    without waiting for the step or a save: the checkpoints on disk stay complete (orbax commits a step
    by renaming its folder, so a save cut short leaves only a temp folder that restore ignores).

    Python runs signal handlers only between bytecodes of the main thread, which may be blocked for
    minutes (a first compile, a collective waiting for a dead process). So the handler only records
    the signal; a thread reads the signal numbers that CPython's C-level handler writes at once to the
    "wakeup fd", prints, and exits on the second.

    Processes of one run must stop after the same step, because they save the checkpoint together:
    `agreed()` is the decision of all of them, so a signal to any one process stops the whole run.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None  # name of the first signal, as the main thread saw it
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._old_wakeup = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="StopSignal", daemon=True).start()

    def _handle(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name

    def _watch(self):
        count = 0
        while data := os.read(self._read, 64):  # b"" once restore() closes the write end
            for signum in data:
                if signum not in self.SIGNALS:
                    continue
                count += 1
                name = signal.Signals(signum).name
                if count == 1:
                    print(f"\n{name}: finishing this step and writing a checkpoint (send again to exit at once)",
                          file=sys.stderr, flush=True)
                else:
                    print(f"\nsecond signal ({name}): exiting now; the checkpoints on disk are intact",
                          file=sys.stderr, flush=True)
                    os._exit(128 + signum)
        os.close(self._read)

    def agreed(self, step: int) -> str | None:
        """The name of the signal to stop for (None: go on), the same on every process. Several processes
        exchange it (a collective) only every STOP_CHECK_EVERY steps, so a stop comes at most that many
        steps late; one process checks at every step."""
        if jax.process_count() == 1:
            return self.received
        if step % STOP_CHECK_EVERY:
            return None
        from jax.experimental import multihost_utils  # noqa: PLC0415

        mine = signal.Signals[self.received].value if self.received else 0
        signum = int(np.max(multihost_utils.process_allgather(np.array(mine, np.int32))))
        return signal.Signals(signum).name if signum else None

    def restore(self):
        signal.set_wakeup_fd(self._old_wakeup)
        os.close(self._write)
        for s, h in self._old.items():
            signal.signal(s, h)



def _global(local: np.ndarray, sh) -> jax.Array:
    """Assemble the global batch from this process's rows (the batch dim is split across processes)."""
    shape = list(local.shape)
    batch_dim = 1 if local.ndim == 3 else 0
    shape[batch_dim] *= jax.process_count()
    return sharding.global_batch(local, sh, tuple(shape))


def check_resume(meta: dict, cfg: GPTConfig, fingerprint: dict) -> None:
    """A checkpoint only resumes the run that wrote it: same architecture, same data."""
    saved = GPTConfig.from_dict(meta["model_config"])
    diff = saved.arch_diff(cfg)
    if diff:
        detail = ", ".join(f"{f}: checkpoint {getattr(saved, f)} vs now {getattr(cfg, f)}" for f in diff)
        raise ValueError(f"cannot resume: the model config changed ({detail}); use the original flags or "
                         f"a new --out_dir")
    old = meta.get("data", {})
    if fingerprint and old and (old.get("dir") != fingerprint["dir"] or old.get("shards") != fingerprint["shards"]):
        raise ValueError(f"cannot resume: the data changed (checkpoint trained on {old.get('dir')}, now "
                         f"{fingerprint['dir']}, or its shards differ); use the original --data or a new --out_dir")

