"""Training: settings (TrainConfig, the flags, resolve; no JAX) -> setup (a Trainer) -> the loop.

    from gpt2_jax.training import run          # run(TrainConfig(...)) -> summary
"""


def run(tc):
    """Train as `tc` (a training.settings.TrainConfig) says: `loop.train(setup.setup(tc))`. Imported lazily, so
    that `gpt2_jax.training.settings` stays free of JAX."""
    from gpt2_jax.training.loop import run as run_  # noqa: PLC0415 -- keeps training.settings free of JAX

    return run_(tc)
