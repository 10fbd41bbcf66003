"""gpt2-jax: GPT-2 in JAX/Flax NNX, proven against Hugging Face and a PyTorch reference.

Public API: GPTConfig, preset, PRESETS, GPT, load_hf, export_hf. Names are imported lazily so that
`import gpt2_jax.config` (train.py's flag parsing) does not start JAX before the backend is chosen.
"""

import importlib

_EXPORTS = {
    "GPTConfig": "gpt2_jax.config",
    "PRESETS": "gpt2_jax.config",
    "preset": "gpt2_jax.config",
    "GPT": "gpt2_jax.model",
    "load_hf": "gpt2_jax.convert",
    "export_hf": "gpt2_jax.convert",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gpt2_jax' has no attribute {name!r}")
