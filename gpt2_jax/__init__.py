"""gpt2-jax: GPT-2 in JAX/Flax NNX, proven against Hugging Face and a PyTorch reference."""

from gpt2_jax.config import PRESETS, GPTConfig, preset
from gpt2_jax.convert import export_hf, load_hf
from gpt2_jax.model import GPT

__all__ = ["GPT", "GPTConfig", "PRESETS", "export_hf", "load_hf", "preset"]
