"""reference_torch.GPT <-> gpt2_jax.GPT, through HF-named tensors (the converter's common currency)."""

from __future__ import annotations

import numpy as np
import torch

from gpt2_jax.convert import model_from_hf_tensors, model_to_hf_tensors
from gpt2_jax.model import GPT as JaxGPT
from reference_torch.model import GPT


def to_jax(model: GPT, **overrides) -> JaxGPT:
    """The same weights as a gpt2_jax model; `overrides` set runtime fields such as dtype."""
    tensors = {k: v.detach().cpu().float().numpy() for k, v in model.hf_state_dict().items()}
    return model_from_hf_tensors(tensors, model.config.replace(**overrides))


def from_jax(model: JaxGPT) -> GPT:
    """The same weights as a reference_torch model (full vocab, padded rows included)."""
    ref = GPT(model.config)
    tensors = model_to_hf_tensors(model)
    ref.load_hf_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()})
    return ref
