"""A run's settings decided once: the flags with every "auto" value filled, the mesh, the micro-batches per
step and where the model's shape came from. train.py resolves its flags here once; the trainer (setup), the
planner and the micro-batch search all take the result.

    run = resolve_run(parse_flags())            # reads --init_from's meta, builds the mesh: once
    run.tc, run.mesh, run.grad_accum, run.source
    run.replace(micro_batch_size=32)            # a variant on the same mesh and source (the planner's search)
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from gpt2_jax import runs, sharding, storage
from gpt2_jax.config import GPTConfig
from gpt2_jax.training.settings import TrainConfig, grad_accum_steps, model_config, resolve, with_checkpoint_shape


@dataclasses.dataclass(frozen=True)
class ResolvedRun:
    """What a TrainConfig means on a set of devices. Build it with `resolve_run`."""

    tc: TrainConfig  # every auto value decided; --init_from's architecture in its size flags
    mesh: jax.sharding.Mesh
    source: GPTConfig | None  # the model --init_from holds (read once, from its meta or config.json); None: scratch
    shape_note: str  # where the model's shape came from ("" for flags and presets)
    flags: TrainConfig  # as given: `replace` resolves a variant from them
    platform: str  # the backend the settings were resolved for (cpu | gpu | tpu)
    fixed_accum: int | None = None  # resolve_run's grad_accum (the planner's), which `replace` keeps

    @functools.cached_property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step. Raises ValueError where the batch arithmetic fails (the micro-batch
        does not split over the data-parallel devices, or does not divide the total): checked where the run is
        used, so that train.py's micro-batch search may still replace a default that does not divide."""
        return grad_accum_steps(self.tc, sharding.data_parallel_size(self.mesh), jax.process_count())

    def model_config(self, data_vocab: int) -> GPTConfig:
        """The model of this run for data with `data_vocab` tokens (settings.model_config)."""
        return model_config(self.tc, data_vocab)

    def replace(self, **changes) -> ResolvedRun:
        """This run with other flag values (e.g. micro_batch_size, remat), resolved on the same mesh and
        --init_from, without reading or building either again; `grad_accum=N` as resolve_run's (default: this
        run's)."""
        if fixed := {"mesh", "init_from"} & changes.keys():
            raise ValueError(f"{', '.join(sorted(fixed))} decide the mesh and the model's shape: resolve_run again")
        accum = changes.pop("grad_accum", self.fixed_accum)
        return _resolve(dataclasses.replace(self.flags, **changes), self.mesh, self.source, self.platform, accum)


def resolve_run(flags: TrainConfig, devices=None, platform: str | None = None,
                grad_accum: int | None = None) -> ResolvedRun:
    """`flags` resolved on `devices` (default: the attached ones) for `platform` (default: JAX's backend):
    reads --init_from's architecture (its meta or config.json, not its arrays), builds the mesh, fills the auto
    values. `grad_accum` (the planner's): the step has that many micro-batches,
    whatever --total_batch_size says. Bad values raise ValueError, a missing --init_from FileNotFoundError."""
    source = None
    if flags.init_from != "scratch":
        storage.check_readable(flags.init_from, "--init_from")  # a bucket: one line in seconds
        source = runs.source_config(flags.init_from)
    mesh = sharding.make_mesh(flags.mesh, devices)
    return _resolve(flags, mesh, source, platform or jax.default_backend(), grad_accum)


def _resolve(flags: TrainConfig, mesh, source: GPTConfig | None, platform: str, grad_accum: int | None) -> ResolvedRun:
    tc, note = with_checkpoint_shape(flags, source) if source is not None else (flags, "")
    tc = resolve(tc, platform, mesh.size)
    if grad_accum is not None:
        tc = dataclasses.replace(tc, total_batch_size=tc.micro_batch_size * tc.block_size * grad_accum)
    return ResolvedRun(tc, mesh, source, note, flags, platform, grad_accum)
