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
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gpt2_jax import data as data_lib
from gpt2_jax import sharding
from gpt2_jax.checkpoint import Checkpointer
from gpt2_jax.config import PADDED_VOCAB_SIZE, PRESETS, GPTConfig, TrainConfig, preset
from gpt2_jax.generate import generate
from gpt2_jax.metrics import MetricsLogger, flops_per_token, format_step_line, mfu, mfu_banner, peak_flops
from gpt2_jax.model import GPT, cross_entropy, default_attention
from gpt2_jax.optim import OptimConfig, lr_at, make_optimizer

GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


class TrainState(nnx.Module):
    """Everything the train step updates: the model and its optimizer (AdamW moments and step)."""

    def __init__(self, model: GPT, tx: optax.GradientTransformation):
        self.model = model
        self.opt = nnx.Optimizer(model, tx, wrt=nnx.Param)


# ---------------------------------------------------------------------------------------------------
# Settings


def resolve(tc: TrainConfig, backend: str, num_devices: int) -> TrainConfig:
    """Fill the "auto" (zero / empty) settings from the preset and the platform."""
    if tc.preset not in PRESETS:
        raise ValueError(f"--preset={tc.preset!r} is unknown; choose one of {sorted(PRESETS)}")
    big = tc.preset in GPT2_SIZES
    cpu = backend == "cpu"
    block = tc.block_size or (PRESETS[tc.preset].block_size if not (cpu and not big) else 128)
    if tc.micro_batch_size:
        micro = tc.micro_batch_size
    elif big:
        micro = (4 if cpu else 16) * num_devices
    else:
        micro = 8 if cpu else 64 * num_devices
    total = tc.total_batch_size or (2**19 if big else micro * block)
    steps = tc.max_steps or (19073 if big else (150 if cpu else 5000))
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
            return cross_entropy(nnx.merge(model_def, params)(x, dropout_rng=key), y, vocab_limit)

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
        return cross_entropy(nnx.merge(graphdef, state).model(x), y, vocab_limit)

    return jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding, batch_sharding),
                   out_shardings=sharding.replicated(batch_sharding.mesh))


# ---------------------------------------------------------------------------------------------------
# Setup helpers


def init_distributed(tc: TrainConfig) -> None:
    """Fake CPU devices and jax.distributed: must run before any JAX backend initialises."""
    if tc.local_device_count:
        jax.config.update("jax_num_cpu_devices", tc.local_device_count)
    on_tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]
    if not (tc.distributed or on_tpu_pod):
        return
    if tc.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(tc.coordinator_address, num_processes=tc.num_processes, process_id=tc.process_id)
    else:
        jax.distributed.initialize()  # Cloud TPU VMs and SLURM/Open MPI clusters describe themselves


def prepare_data(tc: TrainConfig) -> Path:
    """The token shard folder: --data, or Python's bundled docs tokenised char-level into out_dir/data."""
    if tc.data:
        return Path(tc.data)
    folder = Path(tc.out_dir) / "data"
    if not (folder / "meta.json").exists():
        if jax.process_index() == 0:
            data_lib.prepare_text_string(data_lib.default_corpus(), folder, tokenizer="char")
        _sync("prepare_data")
    return folder


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def load_init_params(tc: TrainConfig, cfg: GPTConfig, abstract_state):
    """Params to start from (None = random init): an HF checkpoint, or a training run's latest checkpoint."""
    if tc.init_from == "scratch":
        return None
    path = Path(tc.init_from)
    if (path / "checkpoints").is_dir() or path.name == "checkpoints":
        folder = path if path.name == "checkpoints" else path / "checkpoints"
        with Checkpointer(folder, read_only=True) as source:
            if (meta := source.read_meta()) is not None:
                check_resume(meta, cfg, None)
            # Only the params are read from disk, not the AdamW moments: this run starts a fresh optimizer.
            state, meta, step = source.restore({"model": abstract_state["model"]}, partial=True)
        _log(f"init_from: {folder} step {step} (params only; a fresh optimizer)")
        return state["model"]
    from gpt2_jax.convert import load_hf  # noqa: PLC0415

    model = load_hf(tc.init_from, vocab_size=cfg.vocab_size, **{k: getattr(cfg, k) for k in ("dtype", "attention")})
    if model.config.arch_diff(cfg):
        diff = {f: (getattr(model.config, f), getattr(cfg, f)) for f in model.config.arch_diff(cfg)}
        raise ValueError(f"--init_from={tc.init_from} has a different architecture than --preset={tc.preset}: "
                         f"{diff} (checkpoint, preset); pick the matching --preset")
    return nnx.state(model)


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

    def agreed(self) -> str | None:
        """The name of the signal to stop for (None: go on), the same on every process."""
        if jax.process_count() == 1:
            return self.received
        from jax.experimental import multihost_utils  # noqa: PLC0415

        mine = signal.Signals[self.received].value if self.received else 0
        signum = int(np.max(multihost_utils.process_allgather(np.array(mine, np.int32))))
        return signal.Signals(signum).name if signum else None

    def restore(self):
        signal.set_wakeup_fd(self._old_wakeup)
        os.close(self._write)
        for s, h in self._old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------------
# The run


def run(tc: TrainConfig) -> dict:
    """Train as `tc` says; returns a summary (final step, last train/val loss, out_dir, and "interrupted":
    the signal's name if SIGTERM/SIGINT stopped the run early, after saving a checkpoint).

    Multi-process runs call init_distributed(tc) first (train.py does), before JAX initialises.
    """
    tc = resolve(tc, jax.default_backend(), jax.device_count())
    if tc.on_nan not in ("stop", "skip"):
        raise ValueError(f"--on_nan={tc.on_nan!r}: use stop or skip")
    if tc.max_skips < 0:
        raise ValueError(f"--max_skips={tc.max_skips} is negative; use the most consecutive updates --on_nan=skip "
                         f"may drop before the run stops (0: no limit)")
    mesh = sharding.make_mesh(tc.mesh)
    dp = sharding.data_parallel_size(mesh)
    grad_accum = check_batch(tc, dp, jax.process_count())
    out_dir = Path(tc.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Data first: every bad-input error is raised before anything compiles.
    data_dir = prepare_data(tc)
    tokenizer = data_lib.Tokenizer.load(data_dir)
    cfg = model_config(tc, tokenizer.vocab_size)
    data_lib.check_vocab(data_dir, cfg.vocab_size)
    loader_args = dict(seq_len=tc.block_size, process_index=jax.process_index(),
                       process_count=jax.process_count(), vocab_size=cfg.vocab_size)
    train_loader = data_lib.TokenLoader(data_dir, "train", tc.micro_batch_size, **loader_args)
    val_loader = data_lib.TokenLoader(data_dir, "val", tc.micro_batch_size, **loader_args) if tc.eval_every else None

    # Shapes first, then shardings, then the arrays, created directly where they belong.
    oc = optim_config(tc)
    tx = make_optimizer(oc)
    abstract = nnx.eval_shape(lambda: TrainState(GPT(cfg, rngs=nnx.Rngs(0)), tx))
    graphdef, abstract_state = nnx.split(abstract)
    state_sh = sharding.state_shardings(abstract_state, mesh)
    batch_sh = sharding.batch_sharding(mesh, ndim=3, batch_dim=1)  # (grad_accum, micro_batch, T)
    eval_sh = sharding.batch_sharding(mesh, ndim=2)

    ckpt = Checkpointer(out_dir / "checkpoints", max_to_keep=tc.keep_checkpoints)
    start_step, skipped, in_a_row = 0, 0, 0  # skipped updates: in all, and consecutive ones up to now
    fingerprint = {"dir": str(data_dir.resolve()), "shards": train_loader.state()["shards"]}
    if ckpt.latest_step() is not None:
        if (meta := ckpt.read_meta()) is not None:
            check_resume(meta, cfg, fingerprint)  # a clear error before reading arrays of the wrong shape
        complete = ckpt.all_steps()
        try:  # the newest checkpoint that restores; each damaged one is skipped with a warning
            state, meta, start_step = ckpt.restore(_with_shardings(abstract_state, state_sh))
        except RuntimeError as e:  # none restores
            raise ValueError(f"cannot resume: {e}\nMove {ckpt.directory} away (or use a new --out_dir) to start "
                             f"over") from e
        check_resume(meta, cfg, fingerprint)
        train_loader.restore(meta["loader"])
        skipped, in_a_row = meta.get("skipped_steps", 0), meta.get("consecutive_skips", 0)
        damaged = [s for s in complete if s > start_step]
        _log(f"resumed from {ckpt.directory} at step {start_step}"
             + (f" (could not restore the newer checkpoints {damaged}: see the warnings above)" if damaged else ""))
    elif tc.resume:
        raise FileNotFoundError(f"--resume: no checkpoint in {out_dir / 'checkpoints'}; drop --resume to start fresh")
    else:
        init = jax.jit(lambda: nnx.state(TrainState(GPT(cfg, rngs=nnx.Rngs(tc.seed)), tx)), out_shardings=state_sh)
        state = init()
        params = load_init_params(tc, cfg, _with_shardings(abstract_state, state_sh))
        if params is not None:
            ts = nnx.merge(graphdef, state)
            nnx.update(ts.model, jax.device_put(params, state_sh["model"]))
            state = nnx.state(ts)

    # Padded vocabulary rows (50257 -> 50304) never appear in the data: keep them out of the softmax.
    train_step = make_train_step(graphdef, state_sh, batch_sh, grad_accum, dropout=cfg.dropout > 0,
                                 vocab_limit=tokenizer.vocab_size)
    eval_step = make_eval_step(graphdef, state_sh, eval_sh, vocab_limit=tokenizer.vocab_size)
    logger = MetricsLogger(out_dir, tensorboard=tc.tensorboard, is_primary=jax.process_index() == 0)
    fpt = flops_per_token(cfg, tc.block_size)
    peak = peak_flops(jax.devices()[0])
    n_params = sum(x.size for x in jax.tree.leaves(abstract_state["model"]))
    _log(f"model {tc.preset}: {n_params:,} params, vocab {cfg.vocab_size}, T={tc.block_size}, dtype {cfg.dtype} | "
         f"mesh {dict(mesh.shape)} | batch {tc.total_batch_size:,} tokens = {tc.micro_batch_size} x "
         f"{tc.block_size} x {grad_accum} accum | {tc.max_steps} steps")
    if peak:
        _log(mfu_banner(fpt, jax.devices()[0], jax.device_count()))
    (out_dir / "config.json").write_text(json.dumps({"train": dataclasses.asdict(tc), "model": cfg.to_dict()},
                                                    indent=2) + "\n") if jax.process_index() == 0 else None

    def save(step):
        meta = {"step": step, "model_config": cfg.to_dict(), "train_config": dataclasses.asdict(tc),
                "tokenizer": tokenizer.to_meta(),
                "loader": train_loader.state(), "data": fingerprint, "skipped_steps": skipped,
                "consecutive_skips": in_a_row}
        ckpt.save(step, state, meta)

    def evaluate(step):
        val_loader.reset()
        losses = [eval_step(state, *(_global(b, eval_sh, tc) for b in val_loader.next_batch()))
                  for _ in range(tc.eval_steps)]
        val = float(np.mean(jax.device_get(losses)))
        logger.log(step, val_loss=val)
        _log(f"step {step}: val loss {val:.4f}")
        return val

    # The sample prompt is checked now, not at the first sample 250 steps in.
    sample_ids = tokenizer.encode(tc.sample_prompt or ("Hello, I'm a language model," if tokenizer.name == "gpt2"
                                                       else "\n"))
    sample_new = min(tc.sample_tokens, cfg.block_size - 1)
    if tc.sample_every and not 1 <= len(sample_ids) <= cfg.block_size - sample_new:
        raise ValueError(f"--sample_prompt has {len(sample_ids)} tokens; with --sample_tokens={sample_new} it must "
                         f"have 1 to {cfg.block_size - sample_new} tokens to fit block_size {cfg.block_size}")

    def sample(step):
        ids, new = sample_ids, sample_new
        model = nnx.merge(graphdef, state).model
        out = generate(model, np.tile(ids, (tc.num_samples, 1)), new, temperature=1.0, top_k=50,
                       vocab_limit=tokenizer.vocab_size, seed=tc.seed + step)
        for i, row in enumerate(out):
            _log(f"sample {i}: {tokenizer.decode(row.tolist())!r}")

    hellaswag = None
    if tc.hellaswag_every:
        if tokenizer.name != "gpt2":
            raise ValueError(f"--hellaswag_every={tc.hellaswag_every} needs a GPT-2 BPE model; the data in "
                             f"{data_dir} is {tokenizer.name}-level. Set --hellaswag_every=0")
        from gpt2_jax.evaluate import evaluate_hellaswag, load_hellaswag  # noqa: PLC0415

        hellaswag = load_hellaswag(tc.hellaswag_data or None, limit=tc.hellaswag_limit or None)

    def hellaswag_eval(step):
        model = nnx.merge(graphdef, state).model
        result = evaluate_hellaswag(model, hellaswag, tokenizer.encode, mesh=mesh, progress=False)
        logger.log(step, hellaswag_acc_norm=result["acc_norm"], hellaswag_acc=result["acc"])
        _log(f"step {step}: HellaSwag acc_norm {result['acc_norm']:.4f} acc {result['acc']:.4f} "
             f"({result['n']} examples)")
        return result["acc_norm"]

    stop = StopSignal()
    summary = {"out_dir": str(out_dir), "start_step": start_step, "loss": None, "val_loss": None}
    step = start_step
    base_rng = jax.random.key(tc.seed)
    try:
        t0 = time.perf_counter()
        while step < tc.max_steps:
            xs, ys = zip(*(train_loader.next_batch() for _ in range(grad_accum)), strict=True)
            x, y = _global(np.stack(xs), batch_sh, tc), _global(np.stack(ys), batch_sh, tc)
            state, metrics = train_step(state, x, y, jax.random.fold_in(base_rng, step))
            metrics = jax.device_get(metrics)
            step += 1
            dt = time.perf_counter() - t0
            t0 = time.perf_counter()
            # Skipped updates did not advance the optimizer's step count, nor its schedule.
            lr = lr_at(step - 1 - skipped, oc)
            in_a_row = 0 if metrics["finite"] else in_a_row + 1
            if not metrics["finite"]:
                diverged = tc.on_nan == "skip" and 0 < tc.max_skips < in_a_row
                if tc.on_nan == "stop" or diverged:
                    ckpt.wait()  # the newest save may still be in flight: name the one that is on disk
                    good = ckpt.latest_step()
                    values = f"loss {metrics['loss']}, grad norm {metrics['grad_norm']}"
                    if diverged:
                        what = (f"non-finite loss or gradient norm at {in_a_row} steps in a row ({step - in_a_row + 1}"
                                f"-{step}), more than --max_skips={tc.max_skips}: the run has likely diverged (step "
                                f"{step}: {values})")
                        fix = "Lower --max_lr, or raise --max_skips (0: no limit)"
                    else:
                        what = f"non-finite loss or gradient norm at step {step} ({values})"
                        fix = "Lower --max_lr, or use --on_nan=skip to drop such updates"
                    raise FloatingPointError(f"{what}; the update was not applied. Last good checkpoint: "
                                             f"{'none' if good is None else f'step {good}'} in {ckpt.directory}. {fix}")
                skipped += 1
                limit = f", {in_a_row} in a row of at most --max_skips={tc.max_skips}" if tc.max_skips else ""
                _log(f"step {step}: non-finite loss or gradient norm; update skipped (--on_nan=skip, "
                     f"{skipped} skipped so far){limit}")
            tps = tc.total_batch_size / dt
            row = {"loss": float(metrics["loss"]), "lr": lr,
                   "grad_norm": float(metrics["grad_norm"]), "ms_per_step": dt * 1000, "tokens_per_sec": tps}
            if peak:
                row["mfu"] = mfu(tps, fpt, jax.device_count(), peak)
            if skipped:
                row["skipped_steps"] = skipped
            summary["loss"] = row["loss"]
            if step % tc.log_every == 0 or step == tc.max_steps:
                logger.log(step, **row)
                _log(format_step_line(step, tc.max_steps, row))
            last = step == tc.max_steps
            if tc.eval_every and (step % tc.eval_every == 0 or last):
                summary["val_loss"] = evaluate(step)
            if hellaswag is not None and (step % tc.hellaswag_every == 0 or last):
                summary["hellaswag_acc_norm"] = hellaswag_eval(step)
            if tc.sample_every and (step % tc.sample_every == 0 or last):
                sample(step)
            stopping = stop.agreed()
            if stopping or last or (tc.checkpoint_every and step % tc.checkpoint_every == 0):
                save(step)
            if stopping and not last:
                ckpt.wait()
                _log(f"stopped by {stopping} after step {step}; checkpoint saved in {ckpt.directory}. "
                     f"Resume with the same command (python train.py ... --out_dir={tc.out_dir})")
                summary["interrupted"] = stopping
                break
            t0 = time.perf_counter()  # evals, samples and saves are not part of the step time
    finally:
        try:
            ckpt.wait()
            ckpt.close()
            logger.close()
        finally:
            stop.restore()  # last: a second signal during the final save still exits at once
    summary.update(step=step, skipped_steps=skipped, params=nnx.state(nnx.merge(graphdef, state).model, nnx.Param))
    if jax.process_index() == 0 and not summary.get("interrupted"):
        try:
            from gpt2_jax.plot import plot_run  # noqa: PLC0415

            _log(f"plot: {plot_run(out_dir)}")
        except Exception as e:  # a plot must never fail a finished run
            _log(f"(no plot: {type(e).__name__}: {e})")
    return summary


def load_run(path: str | os.PathLike, step: int | None = None, **overrides):
    """(model, tokenizer, meta) from a training run's out_dir (or its checkpoints/ folder); the newest
    good checkpoint unless `step` is given. `overrides` set runtime model fields (dtype, attention).

    The checkpoint is restored onto one device (use jax.device_put to place it elsewhere).
    """
    path = Path(path)
    folder = path if path.name == "checkpoints" else path / "checkpoints"
    if not folder.is_dir():
        raise FileNotFoundError(f"{path} is not a training run: no checkpoints/ folder in it")
    with Checkpointer(folder, read_only=True) as ckpt:
        meta = ckpt.read_meta(step)
        if meta is None:
            raise FileNotFoundError(f"no readable checkpoint in {folder}")
        cfg = GPTConfig.from_dict(meta["model_config"]).replace(**overrides)
        graphdef, abstract_model = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract_model)
        # The saved TrainState is {"model", "opt"}: read only the model, not the AdamW moments (2x its size).
        state, meta, _ = ckpt.restore({"model": target}, step=step, partial=True)
    tokenizer = data_lib.Tokenizer.from_meta(meta["tokenizer"]) if "tokenizer" in meta else None
    return nnx.merge(graphdef, state["model"]), tokenizer, meta


def _global(local: np.ndarray, sh, tc: TrainConfig) -> jax.Array:
    """Assemble the global batch from this process's rows (the batch dim is split across processes)."""
    shape = list(local.shape)
    batch_dim = 1 if local.ndim == 3 else 0
    shape[batch_dim] *= jax.process_count()
    return sharding.global_batch(local, sh, tuple(shape))


def _with_shardings(abstract_state, shardings):
    """The abstract state with each leaf a ShapeDtypeStruct carrying its target sharding."""
    return jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
                        abstract_state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


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

