"""Training: settings (TrainConfig, the flags, resolve; no JAX) -> resolved (ResolvedRun: the settings on a
mesh, decided once) -> setup (a Trainer) -> the loop.

    from gpt2_jax.training import run          # run(TrainConfig(...)) -> summary
"""


def run(tc):
    """Train as `tc` (a training.settings.TrainConfig, or a training.resolved.ResolvedRun) says:
    `loop.train(setup.setup(tc))`. Imported lazily, so that `gpt2_jax.training.settings` stays free of JAX."""
    from gpt2_jax.training.loop import run as run_  # noqa: PLC0415 -- keeps training.settings free of JAX

    return run_(tc)
