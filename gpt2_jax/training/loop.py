"""The training loop and its periodic tasks: `run(tc)` is `train(setup(tc))`.

The loop is plain Python around the jitted step: dispatch a step, read the previous one's metrics, then run
the tasks that are due, from a table of (every N steps, task): validation loss, HellaSwag, samples, a
checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from gpt2_jax import hellaswag, runs
from gpt2_jax.distributed import global_batch, is_primary, log
from gpt2_jax.generate import generate
from gpt2_jax.metrics import flops_per_token, format_step_line, mfu, peak_flops
from gpt2_jax.optim import lr_at
from gpt2_jax.plot import plot_run
from gpt2_jax.training.guards import StopSignal
from gpt2_jax.training.profile import StepProfiler
from gpt2_jax.training.resolved import ResolvedRun
from gpt2_jax.training.settings import TrainConfig
from gpt2_jax.training.setup import Trainer, setup


def train(t: Trainer) -> dict:
    """Train from `t.start_step` to --max_steps; returns a summary (final step, last train/val loss,
    out_dir, params, and "interrupted": the signal's name if SIGTERM/SIGINT stopped the run early,
    after saving a checkpoint).

    The host never waits for the device without need: step N+1 is dispatched before step N's metrics
    are read (they are logged and checked one step behind, which is safe: a non-finite step leaves the
    state unchanged), and batch N+2 is read and placed while step N+1 runs. Where a periodic task or a
    stop is due, the loop catches up first, so tasks see the state and counts of their own step. A step is one
    program (step.build_step, the one the planner compiles): a stop signal waits for the step in progress, and
    the log says how long a step takes once it is known.
    """
    tc = t.tc
    tasks = periodic_tasks(t)
    stop = StopSignal()
    profiler = StepProfiler(tc.profile_steps, t.out_dir)
    summary = {"out_dir": str(t.out_dir), "start_step": t.start_step, "loss": None, "val_loss": None}
    step, rng = t.start_step, jax.random.key(tc.seed)
    if step >= tc.max_steps:
        log(f"nothing to train: the run in {t.out_dir} is at step {step} and --max_steps={tc.max_steps}; raise "
            "--max_steps to train it further")
    batch = next_batch(t) if step < tc.max_steps else None
    pending, saved = None, step  # (step, its metrics, still on the device); the newest step with a checkpoint
    try:
        clock = StepClock()
        while step < tc.max_steps:
            profiler.before(step + 1)
            t.state, metrics = t.step.fn(t.state, *batch, jax.random.fold_in(rng, step))
            step += 1
            profiler.after(step, t.state)
            if pending is not None:  # the previous step's metrics, while this one runs
                summary["loss"] = record_step(t, *pending, clock, stop)
            t.loader_position = t.train_loader.state()  # where a resume after `step` goes on
            batch = next_batch(t) if step < tc.max_steps else None
            pending = (step, metrics)
            last = step == tc.max_steps
            due = [task for every, task in tasks if every and (step % every == 0 or last)]
            stopping = stop.agreed(step)
            if not (due or stopping):
                continue
            summary["loss"], pending = record_step(t, *pending, clock, stop), None
            for task in due:
                summary.update(task(t, step))
            saved = step if save in due else saved
            if stopping and not last:
                stop_here(t, step, stopping, step != saved, summary)
                break
            clock.restart()  # evals, samples and saves are not part of the step time
    finally:  # each step runs even if one before it raised (a full disk fails the wait)
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(stop.restore)  # last: a second signal during the final save still exits at once
            cleanup.callback(t.lock.release)
            cleanup.callback(t.logger.close)
            cleanup.callback(t.ckpt.close)
            cleanup.callback(profiler.close, step)
            t.ckpt.wait()
    return finish(t, step, summary)


def stop_here(t: Trainer, step: int, signal_name: str, unsaved: bool, summary: dict) -> None:
    """A stop signal: checkpoint `step` (unless it has one) with its loader position, so that the same
    command resumes exactly."""
    if unsaved and step > 0:
        save(t, step)
    t.ckpt.wait()
    where = f"checkpoint saved in {t.ckpt.directory}" if step > 0 else "no step to save: the same command starts over"
    log(f"stopped by {signal_name} after step {step}; {where}. Resume with the same command "
        f"(python train.py ... --out_dir={t.tc.out_dir})")
    summary["interrupted"] = signal_name


def finish(t: Trainer, step: int, summary: dict) -> dict:
    summary.update(step=step, skipped_steps=t.nan.skipped, params=nnx.state(t.model, nnx.Param))
    if is_primary() and not summary.get("interrupted") and step > t.start_step:
        try:
            log(f"plot: {plot_run(t.out_dir)}")
        except Exception as e:  # noqa: BLE001 -- a plot must never fail a finished run
            log(f"(no plot: {type(e).__name__}: {e})")
    return summary


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def run(tc: ResolvedRun | TrainConfig) -> dict:
    """Train as `tc` says (a resolved run, or a TrainConfig resolved here): `train(setup(tc))`."""
    return train(setup(tc))


def periodic_tasks(t: Trainer) -> list[tuple[int, Callable[[Trainer, int], dict]]]:
    """(every N steps, task): each also runs at the last step, none where N is 0. Saving comes last,
    so a checkpoint records the evals before it; without --checkpoint_every it saves at the end only."""
    tc = t.tc
    return [(tc.eval_every, evaluate), (tc.hellaswag_every, hellaswag_eval), (tc.sample_every, sample),
            (tc.checkpoint_every or tc.max_steps, save)]


def next_batch(t: Trainer) -> tuple[jax.Array, jax.Array]:
    """The next optimizer step's (grad_accum, micro_batch, T) inputs and targets, as global arrays."""
    xs, ys = zip(*(t.train_loader.next_batch() for _ in range(t.step.grad_accum)), strict=True)
    return (global_batch(np.stack(xs), t.step.batch_sharding, batch_dim=1),
            global_batch(np.stack(ys), t.step.batch_sharding, batch_dim=1))


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


def record_step(t: Trainer, step: int, metrics: dict, clock: StepClock, stop: StopSignal) -> float:
    """Read a step's metrics (waiting for the device), apply --on_nan, log every --log_every steps;
    returns the loss. The first step timed without its compile says how long a step takes (for the stop
    message, and in the log where a step has several micro-batches)."""
    tc = t.tc
    metrics = jax.device_get(metrics)
    dt = clock.lap()
    t.nan.check(step, metrics, t.ckpt)  # raises to stop; else counts a skipped update
    tps = tc.total_batch_size / dt
    # Skipped updates did not advance the optimizer's step count, nor its schedule.
    row = {"loss": float(metrics["loss"]), "lr": lr_at(step - 1 - t.nan.skipped, t.step.optim),
           "grad_norm": float(metrics["grad_norm"]), "ms_per_step": dt * 1000, "tokens_per_sec": tps}
    if peak := peak_flops(jax.devices()[0]):
        row["mfu"] = mfu(tps, flops_per_token(t.cfg, tc.block_size), jax.device_count(), peak)
    if t.nan.skipped:
        row["skipped_steps"] = t.nan.skipped
    if step % tc.log_every == 0 or step == tc.max_steps:
        t.logger.log(step, **row)
        log(format_step_line(step, tc.max_steps, row))
    if step == t.start_step + 2:  # the first step timed without its compile
        stop.step_time = _duration(dt)
        if t.step.grad_accum > 1:
            log(f"a step takes about {_duration(dt)} ({t.step.grad_accum} micro-steps of {tc.micro_batch_size} x "
                f"{tc.block_size}): {_duration(dt * (tc.max_steps - t.start_step))} for --max_steps={tc.max_steps}; "
                f"a stop signal waits for the step in progress, then saves")
    return row["loss"]


def evaluate(t: Trainer, step: int) -> dict:
    """Mean loss over --eval_tokens of the val split (data.EvalWindows: spread evenly, the same every time).
    All batches have the same size, so the mean of the batch means is the mean over the tokens."""
    losses = [t.eval_step(t.state, global_batch(x, t.eval_sharding), global_batch(y, t.eval_sharding))
              for x, y in t.val_windows]
    val = float(np.mean(jax.device_get(losses)))
    t.logger.log(step, val_loss=val)
    log(f"step {step}: val loss {val:.4f}")
    return {"val_loss": val}


def hellaswag_eval(t: Trainer, step: int) -> dict:
    result = hellaswag.evaluate_hellaswag(t.model, t.hellaswag, t.tokenizer.encode, mesh=t.mesh,
                                          progress=False)
    t.logger.log(step, hellaswag_acc_norm=result["acc_norm"], hellaswag_acc=result["acc"])
    log(f"step {step}: HellaSwag acc_norm {result['acc_norm']:.4f} acc {result['acc']:.4f} "
        f"({result['n']} examples)")
    return {"hellaswag_acc_norm": result["acc_norm"]}


def sample(t: Trainer, step: int) -> dict:
    tc = t.tc
    prompts = np.tile(t.sample_ids, (tc.num_samples, 1))
    new = min(tc.sample_tokens, t.cfg.block_size - len(t.sample_ids))  # one window: setup checked the prompt fits
    out = generate(t.model, prompts, new, temperature=1.0, top_k=50,
                   vocab_limit=t.tokenizer.vocab_size, seed=tc.seed + step)
    texts = [t.tokenizer.decode(row.tolist()) for row in out]
    for i, text in enumerate(texts):
        log(f"sample {i}: {text!r}")
    t.logger.log_samples(step, texts)  # W&B: a table (metrics.jsonl keeps numbers)
    return {}


def save(t: Trainer, step: int) -> dict:
    """A checkpoint of the state and everything an exact resume needs (async: the loop goes on), while out_dir
    is still this run's."""
    t.lock.check()
    meta = runs.CheckpointMeta(step=step, model_config=t.cfg.to_dict(), train_config=dataclasses.asdict(t.tc),
                               tokenizer=t.tokenizer.to_meta(), loader=t.loader_position, data=t.fingerprint,
                               skipped_steps=t.nan.skipped, consecutive_skips=t.nan.in_a_row)
    t.ckpt.save(step, t.state, meta.to_dict())
    t.logger.sync()  # a bucket out_dir: metrics.jsonl and TensorBoard files, uploaded whole
    return {}
