"""A readable PyTorch GPT-2 (nanoGPT style) used as the yardstick for gpt2_jax."""

from reference_torch.convert import from_jax, to_jax
from reference_torch.model import GPT

__all__ = ["GPT", "from_jax", "to_jax"]
