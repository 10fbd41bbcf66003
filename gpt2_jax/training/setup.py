"""Setup: everything the loop needs, built and checked before anything compiles.

a resolved run (training.resolved: settings, mesh, --init_from's shape) -> the run folder's lock -> data -> the
train step's shapes and shardings -> the state: resumed from out_dir's newest good checkpoint, else fresh (or
--init_from's params) -> Trainer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding

from gpt2_jax import data as data_lib
from gpt2_jax import hellaswag, runlock, runs, sharding, storage
from gpt2_jax.checkpoint import Checkpointer
from gpt2_jax.config import GPT2_SIZES, GPTConfig
from gpt2_jax.distributed import broadcast_from_primary, is_primary, log, sync
from gpt2_jax.metrics import MetricsLogger, flops_per_token, mfu_banner, peak_flops
from gpt2_jax.model import GPT
from gpt2_jax.optim import OptimConfig, lr_at
from gpt2_jax.tokenizer import Tokenizer
from gpt2_jax.training.guards import NanPolicy
from gpt2_jax.training.resolved import ResolvedRun, resolve_run
from gpt2_jax.training.settings import TrainConfig
from gpt2_jax.training.step import TrainStep, build_step, make_eval_step


@dataclasses.dataclass
class Trainer:
    """What `setup` builds and the loop uses. `state` (params + AdamW) is replaced by every step."""

    tc: TrainConfig  # resolved: no "auto" values left
    cfg: GPTConfig
    mesh: jax.sharding.Mesh
    out_dir: epath.Path  # local or gs:// (storage.run_path)
    tokenizer: Tokenizer
    train_loader: data_lib.TokenLoader
    val_windows: data_lib.EvalWindows | None  # the in-loop val loss's batches
    fingerprint: dict  # the data folder and its shards: a checkpoint resumes only on the same data
    step: TrainStep  # the jitted train step, its state's shapes and shardings, grad_accum, the batch sharding
    state: Any
    eval_sharding: NamedSharding  # of a val batch (micro_batch, T)
    eval_step: Callable
    ckpt: Checkpointer
    logger: MetricsLogger
    nan: NanPolicy
    start_step: int
    hellaswag: list | None  # examples, when --hellaswag_every
    sample_ids: list[int]  # the sample prompt
    loader_position: dict  # the train loader's state after the newest dispatched step's batches
    lock: Any = dataclasses.field(default_factory=runlock.NoLock)  # this run's hold on out_dir; the loop releases it

    @property
    def model(self) -> GPT:
        return nnx.merge(self.step.graphdef, self.state).model


def setup(run: ResolvedRun | TrainConfig) -> Trainer:
    """Take the run folder's lock, then build the data, state (fresh, resumed or initialised), compiled steps,
    logger and checkpointer for a resolved run (training.resolved; a TrainConfig is resolved here). Bad input
    raises here, before anything compiles; a failed start releases the lock and removes the out_dir it made.

    Multi-process runs call launch.init_distributed(tc) first (train.py does), before JAX initialises.
    """
    tc = run.flags if isinstance(run, ResolvedRun) else run
    out_dir = storage.run_path(tc.out_dir)
    storage.check_writable(out_dir, "--out_dir")  # a bucket: fail now, not at the first checkpoint
    for flag, path in (("--data", tc.data), ("--hellaswag_data", tc.hellaswag_data)):  # (--init_from: resolve_run)
        storage.check_readable(path, flag)  # the same for the buckets the run reads: one line, in seconds
    if not isinstance(run, ResolvedRun):
        run = resolve_run(run)
    if run.shape_note:
        log(run.shape_note)
    _ = run.grad_accum  # the batch arithmetic: a ValueError now, before anything is made
    made = []  # the local folders this start makes: a failed start removes them
    if not storage.is_remote(out_dir):  # (a bucket has no folders to make)
        made = [f for f in (out_dir, out_dir / runs.CHECKPOINTS) if broadcast_from_primary(not f.exists())]
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a read-only parent, a file in the way, a name too long
            shorter = " with a shorter path" if e.errno == errno.ENAMETOOLONG else ""
            raise type(e)(f"--out_dir={tc.out_dir}: cannot make the folder {out_dir} ([Errno {e.errno}] "
                          f"{e.strerror}); pass an --out_dir{shorter} in a folder you may write to") from None
    lock = runlock.acquire(out_dir)  # a second trainer on this folder stops here
    try:
        return _build(run, out_dir, lock)
    except BaseException:
        lock.release()
        if made and is_primary():
            if made[0] == out_dir:
                shutil.rmtree(out_dir, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    made[0].rmdir()  # the empty checkpoints/ of a folder that held no run
        raise


def _build(run: ResolvedRun, out_dir: epath.Path, lock) -> Trainer:
    """setup's work, once the run folder is this run's."""
    tc, mesh = run.tc, run.mesh
    # A folder that cannot hold a checkpoint (read-only, a path too long) fails first, before any other work.
    ckpt = Checkpointer(out_dir / runs.CHECKPOINTS, max_to_keep=tc.keep_checkpoints)
    # Then the data: every bad-input error is raised before anything compiles.
    data_dir = prepare_data(tc, out_dir)
    tokenizer = Tokenizer.load(data_dir)
    cfg = run.model_config(tokenizer.vocab_size)
    data_lib.check_vocab(data_dir, cfg.vocab_size)
    per_process = dict(process_index=jax.process_index(), process_count=jax.process_count(), vocab_size=cfg.vocab_size)
    train_loader = data_lib.TokenLoader(data_dir, "train", tc.micro_batch_size, tc.block_size, order=tc.data_order,
                                        seed=tc.seed, **per_process)
    where = tc.data if storage.is_remote(tc.data) else str(data_dir.resolve())  # (not the cache of this machine)
    fingerprint = {"dir": where, "shards": train_loader.state()["shards"]}
    val_windows = (data_lib.EvalWindows(data_dir, tc.block_size, tc.micro_batch_size, tc.eval_tokens or None,
                                        **per_process) if tc.eval_every else None)
    first_batches(train_loader, val_windows)  # tokens outside meta.json's vocabulary: now, not after the build
    check_run_folder(ckpt, cfg, fingerprint, tc)  # before the checks below: a changed --data explains them
    sample_ids = sample_prompt(tc, cfg, tokenizer)
    hellaswag_examples = load_hellaswag_for(tc, tokenizer, data_dir)

    # Shapes first, then shardings, then the arrays, created directly where they belong.
    # Padded vocabulary rows (50257 -> 50304) never appear in the data: keep them out of the softmax.
    step = build_step(run, cfg, vocab_limit=tokenizer.vocab_size)
    nan = NanPolicy(tc.on_nan, tc.max_skips)
    restored = restore_latest(ckpt, step, cfg, fingerprint, train_loader, nan)
    if restored:
        drop_metrics_past(out_dir, restored[1])
    state, start_step = restored or (init_params(run, cfg, step, step.init_state(cfg, tc.seed), tokenizer), 0)
    eval_sh = sharding.batch_sharding(mesh, ndim=2)
    trainer = Trainer(
        tc=tc, cfg=cfg, mesh=mesh, out_dir=out_dir, tokenizer=tokenizer, train_loader=train_loader,
        val_windows=val_windows, fingerprint=fingerprint, step=step, state=state, eval_sharding=eval_sh,
        eval_step=make_eval_step(step.graphdef, step.shardings, eval_sh, vocab_limit=tokenizer.vocab_size),
        ckpt=ckpt, logger=MetricsLogger(out_dir, tensorboard=tc.tensorboard, is_primary=is_primary(),
                                        wandb=wandb_options(tc, cfg)),
        nan=nan, start_step=start_step, hellaswag=hellaswag_examples, sample_ids=sample_ids,
        loader_position=train_loader.state(), lock=lock)
    log_start(trainer)
    if start_step < tc.max_steps:  # (else nothing will train: the loop says so)
        write_run_config(trainer)
    return trainer


def prepare_data(tc: TrainConfig, out_dir: epath.Path) -> Path:
    """The token shard folder: --data, or Python's bundled docs tokenised char-level into out_dir/data.

    Shards are memory-mapped, so they are always a local folder: for --data=gs://... the dataset's cache folder
    on this machine (data.remote); for a bucket out_dir the bundled corpus goes to a cache folder of this
    machine, keyed by the out_dir (each host of a pod makes its own)."""
    if tc.data:
        if storage.is_remote(tc.data):  # a local cache folder; the shards are fetched as the loader needs them
            return data_lib.open_remote(tc.data, tc.data_cache_gb)
        if Path(tc.data).is_file():
            raise ValueError(f"--data={tc.data} is a file; training reads a folder of token shards. Make one from a "
                             f"text file with `python -m gpt2_jax.data text {tc.data} --out DIR`, then pass --data=DIR")
        return Path(tc.data)
    if storage.is_remote(out_dir):
        folder = storage.local_folder_for(out_dir, "char-data")
        if not (folder / data_lib.META_FILE).exists():
            _prepare_bundled_corpus(folder)
        sync("prepare_data")
        return folder
    folder = Path(out_dir) / "data"
    if not broadcast_from_primary((folder / data_lib.META_FILE).exists()):  # all must reach sync, or none
        if is_primary():
            data_lib.prepare_text_string(data_lib.default_corpus(), folder, tokenizer="char")
        sync("prepare_data")
    return folder


def first_batches(train_loader: data_lib.TokenLoader, val_windows: data_lib.EvalWindows | None) -> None:
    """Read the first train batch (the loader then starts over) and the first val batch: their tokens are
    checked against the vocabulary, so data whose meta.json does not match its shards stops the start here,
    before the model is built (and the start removes the out_dir it made), not at the first step."""
    train_loader.next_batch()
    train_loader.reset()
    if val_windows is not None and len(val_windows):
        next(iter(val_windows))


def _prepare_bundled_corpus(folder: Path) -> None:
    """Tokenise the bundled corpus into a temporary folder, then rename it to `folder`: processes that
    share this machine may race here, and the first rename wins (their folders are identical)."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    data_lib.prepare_text_string(data_lib.default_corpus(), tmp, tokenizer="char")
    try:
        os.rename(tmp, folder)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)


def check_run_folder(ckpt: Checkpointer, cfg: GPTConfig, fingerprint: dict, tc: TrainConfig) -> None:
    """What out_dir already holds fits what was asked: a checkpoint for --resume; a run to resume that was
    trained on the same data with the same model; --init_from only for a new run (or the same command again)."""
    latest = ckpt.latest_step()
    if latest is None:
        if tc.resume:
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt.directory}; drop --resume to start fresh")
        return
    meta = ckpt.read_meta()
    if meta is None:  # damaged: restore_latest falls back to an older one and checks it
        return
    meta = runs.CheckpointMeta.from_dict(meta)
    check_resume(meta, cfg, fingerprint)  # before reading arrays of a wrong shape
    started_from = meta.train_config.get("init_from", "scratch")
    if tc.init_from != "scratch" and tc.init_from != started_from:
        raise ValueError(f"--init_from={tc.init_from}: --out_dir={tc.out_dir} already holds a run (checkpoint of "
                         f"step {latest}, started from {started_from}), which would resume and ignore "
                         "--init_from. Use a new --out_dir to start from --init_from, or drop --init_from to "
                         "resume that run")


def restore_latest(ckpt: Checkpointer, step: TrainStep, cfg: GPTConfig, fingerprint: dict,
                   train_loader: data_lib.TokenLoader, nan: NanPolicy) -> tuple[Any, int] | None:
    """(state, step) of the newest checkpoint in out_dir that restores, with the loader and NaN counts
    restored too; None to start fresh (there is none; check_run_folder has checked the rest)."""
    if ckpt.latest_step() is None:
        return None
    complete = ckpt.all_steps()
    try:  # the newest checkpoint that restores; each damaged one is skipped with a warning
        state, meta, at = ckpt.restore(sharding.with_shardings(step.abstract, step.shardings))
    except RuntimeError as e:  # none restores
        raise ValueError(f"cannot resume: {e}\nMove {ckpt.directory} away (or use a new --out_dir) to start "
                         f"over") from e
    meta = runs.CheckpointMeta.from_dict(meta)
    check_resume(meta, cfg, fingerprint)
    train_loader.restore(meta.loader)
    nan.skipped, nan.in_a_row = meta.skipped_steps, meta.consecutive_skips
    damaged = [s for s in complete if s > at]
    log(f"resumed from {ckpt.directory} at step {at}"
        + (f" (could not restore the newer checkpoints {damaged}: see the warnings above)" if damaged else ""))
    if note := schedule_change(meta.train_config, step.optim, at - nan.skipped):
        log(note)
    return state, at


SCHEDULE = ("max_steps", "warmup_steps", "max_lr", "min_lr_ratio")  # the flags that shape the learning rate


def schedule_change(saved: dict, optim: OptimConfig, done: int) -> str | None:
    """A line saying how the learning-rate schedule of a resumed run differs from the one it was trained with
    (e.g. a new --max_steps stretches the cosine: the rate jumps at the resume), or None if it does not."""
    changed = {k: saved[k] for k in SCHEDULE if k in saved and saved[k] != getattr(optim, k)}
    if not changed:
        return None
    before = dataclasses.replace(optim, **changed)
    flags = ", ".join(f"--{k} {v} -> {getattr(optim, k)}" for k, v in changed.items())
    return (f"note: the learning-rate schedule changed since the checkpoint ({flags}): the next step trains at "
            f"lr {lr_at(done, optim):.3g}, where the run's own schedule had {lr_at(done, before):.3g}")


def drop_metrics_past(out_dir: epath.Path, step: int) -> None:
    """A resumed run: metrics.jsonl rows of steps after `step`, written by the run before it was killed (after its
    last checkpoint), are removed, so that the file holds each step once (the resumed run logs them again).
    Lines that are not JSON rows stay as they are."""
    path = out_dir / runs.METRICS_FILE
    if not is_primary() or not path.exists():
        return
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
    kept = [line for line in lines if not _row_after(line, step)]
    if len(kept) == len(lines):
        return
    text = "".join(kept)
    if storage.is_remote(path):  # an object is replaced whole
        path.write_text(text)
    else:  # a temporary name, then rename: a kill now leaves the old file or the new one
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    log(f"{path}: removed {len(lines) - len(kept)} rows of steps after {step}, logged before the run stopped without "
        "a checkpoint of them; they are trained and logged again")


def _row_after(line: str, step: int) -> bool:
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step


def check_resume(meta: runs.CheckpointMeta, cfg: GPTConfig, fingerprint: dict) -> None:
    """A checkpoint only resumes the run that wrote it: same data, same architecture. The data first: other
    data may also change the vocabulary, and "the model config changed" would hide the cause."""
    old = meta.data or {}
    if fingerprint and old and (old.get("dir") != fingerprint["dir"] or old.get("shards") != fingerprint["shards"]):
        raise ValueError(f"cannot resume: the data changed (checkpoint trained on {old.get('dir')}, now "
                         f"{fingerprint['dir']}, or its shards differ); use the original --data or a new --out_dir")
    saved = meta.model
    if diff := saved.arch_diff(cfg):
        detail = ", ".join(f"{f}: checkpoint {getattr(saved, f)} vs now {getattr(cfg, f)}" for f in diff)
        raise ValueError(f"cannot resume: the model config changed ({detail}); use the original flags or "
                         f"a new --out_dir")


def init_params(run: ResolvedRun, cfg: GPTConfig, step: TrainStep, state, tokenizer: Tokenizer):
    """`state` with the model params of --init_from (an HF model or a training run's; runs.load_model),
    its context cropped to the run's, or unchanged for --init_from=scratch. The optimizer stays fresh. The
    checkpoint's tokenizer, where it records one, must be the data's."""
    tc = run.tc
    if run.source is None:
        return state
    shardings = step.shardings["model"]
    model, theirs, meta = runs.load_model(tc.init_from, shardings=shardings, vocab_size=cfg.vocab_size,
                                          block_size=cfg.block_size, saved=run.source, dtype=cfg.dtype,
                                          attention=cfg.attention)
    if theirs is not None and theirs.to_meta() != tokenizer.to_meta():
        raise ValueError(f"--init_from={tc.init_from} was trained on {theirs.name}-level tokens ({theirs.vocab_size}) "
                         f"but the data ({tc.data or 'the bundled corpus'}) is {tokenizer.name}-level "
                         f"({tokenizer.vocab_size}); tokenise the data with the checkpoint's tokenizer "
                         "(python -m gpt2_jax.data ... --tokenizer)")
    log(f"init_from: {tc.init_from}" + (f" step {meta['step']} (params only; a fresh optimizer)" if "step" in meta
                                        else ""))
    ts = nnx.merge(step.graphdef, state)
    nnx.update(ts.model, jax.device_put(nnx.state(model), shardings))
    return nnx.state(ts)


def sample_prompt(tc: TrainConfig, cfg: GPTConfig, tokenizer: Tokenizer) -> list[int]:
    """The sample prompt's ids, checked now rather than at the first sample, 250 steps in; [] without samples
    (--sample_every=0): a prompt nobody uses must not stop a run."""
    if not tc.sample_every:
        return []
    default = "Hello, I'm a language model," if tokenizer.name == "gpt2" else "\n"
    flag = f"--sample_prompt={tc.sample_prompt!r}" if tc.sample_prompt else f"--sample_prompt (empty: {default!r})"
    fix = "set --sample_prompt, or --sample_every=0 for no samples"
    try:
        ids = tokenizer.encode(tc.sample_prompt or default)
    except ValueError as e:  # a character the char-level vocabulary lacks
        raise ValueError(f"{flag}: {e}; {fix}") from None
    if not 1 <= len(ids) < cfg.block_size:
        raise ValueError(f"{flag} has {len(ids)} tokens; a sample needs 1 to {cfg.block_size - 1}, to leave room in "
                         f"block_size {cfg.block_size} for new tokens; {fix}")
    return ids


def load_hellaswag_for(tc: TrainConfig, tokenizer: Tokenizer, data_dir: Path) -> list | None:
    if not tc.hellaswag_every:
        return None
    if tokenizer.name != "gpt2":
        raise ValueError(f"--hellaswag_every={tc.hellaswag_every} needs a GPT-2 BPE model; the data in "
                         f"{data_dir} is {tokenizer.name}-level. Set --hellaswag_every=0")
    return hellaswag.load_hellaswag(tc.hellaswag_data or None, limit=tc.hellaswag_limit or None)


def log_start(t: Trainer) -> None:
    """The start-up lines: model, mesh, batch, steps; MFU's convention where the device's peak is known."""
    tc, cfg = t.tc, t.cfg
    n_params = sum(x.size for x in jax.tree.leaves(t.step.abstract["model"]))
    name = tc.preset if tc.init_from == "scratch" else f"from {tc.init_from}"
    log(f"model {name}: {n_params:,} params, vocab {cfg.vocab_size}, T={tc.block_size}, dtype {cfg.dtype} | "
        f"mesh {dict(t.mesh.shape)} | batch {tc.total_batch_size:,} tokens = {tc.micro_batch_size} x "
        f"{tc.block_size} x {t.step.grad_accum} accum | {tc.max_steps} steps")
    if jax.default_backend() == "cpu" and tc.preset in GPT2_SIZES:
        log(f"note: {tc.preset} on a CPU: a step is --total_batch_size={tc.total_batch_size:,} tokens, "
            f"{t.step.grad_accum} micro-steps of {tc.micro_batch_size} x {tc.block_size}; it may take minutes or "
            "hours (how long is logged once a step has run without its compile). A smaller --total_batch_size "
            f"makes shorter steps, e.g. --total_batch_size={tc.micro_batch_size * tc.block_size}")
    if peak_flops(jax.devices()[0]):
        log(mfu_banner(flops_per_token(cfg, tc.block_size), jax.devices()[0], jax.device_count()))


def wandb_options(tc: TrainConfig, cfg: GPTConfig) -> dict | None:
    """MetricsLogger's W&B settings: the run's project, name, entity, and the resolved config (as config.json)."""
    if not tc.wandb_project:
        return None
    return dict(project=tc.wandb_project, name=tc.wandb_run_name, entity=tc.wandb_entity,
                config={"train": dataclasses.asdict(tc), "model": cfg.to_dict()})


def write_run_config(t: Trainer) -> None:
    """config.json beside the checkpoints: the resolved settings and the model."""
    if is_primary():
        config = {"train": dataclasses.asdict(t.tc), "model": t.cfg.to_dict()}
        (t.out_dir / runs.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
