"""The training recipes: what a run's "auto" settings become (RECIPES, one table), the AdamW and schedule
defaults every preset shares (ADAMW), and how much of a bucket dataset each machine caches. training/settings.py
resolves a run's flags from them, and optim.OptimConfig's defaults are the GPT-2 row. No JAX here.
"""

from __future__ import annotations

from typing import Any

from gpt2_jax.config import GPT2_SIZES

DATA_CACHE_GB = 16.0  # --data=gs://...: shards kept on each machine (FineWeb-Edu 10B: ~100 of 200 MB; a fifth)

# What a run's "auto" settings (0 / -1 / empty flags) become: the one table of recipe numbers. A row is a
# family of presets ("gpt2": the GPT-2 sizes, "char": the char preset); a "<family>/cpu" row overrides it on
# a CPU. training/settings.py's resolve() fills the flags a user left unset from it, the flags' help reads it,
# and so do OptimConfig's defaults. `micro_per_device`: sequences per micro-step and device; where a row
# gives `micro_batch_size` instead, that many over all devices (rounded up to a multiple of them).
RECIPES: dict[str, dict[str, Any]] = {
    # build-nanogpt's GPT-2 124M run (the GPT-3 paper's 125M settings): 2**19 tokens per step, 10B tokens
    # = 19073 steps, warmup over 375M tokens = 715 steps, peak learning rate 6e-4.
    "gpt2": dict(total_batch_size=2**19, micro_per_device=16, max_steps=19073, warmup_steps=715, max_lr=6e-4),
    "gpt2/cpu": dict(micro_per_device=4),
    # nanoGPT's Shakespeare-char run; the total batch is one micro-batch, warmup 10% of the steps.
    "char": dict(micro_per_device=64, max_steps=5000, max_lr=1e-3),
    # The char preset on a CPU (the default `python train.py`): the settings that learned the most in about
    # 3 minutes on 2 cores (benchmarks/convergence.py --corpus bundled; benchmarks/NOTES.md).
    "char/cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, micro_batch_size=12, max_steps=2000,
                     warmup_steps=100, dropout=0.0),
    # Fine-tuning a checkpoint (--finetune, with --init_from), over any family's row: nanoGPT's
    # finetune_shakespeare settings (2**15 tokens per step, a constant 3e-5, no warmup, 20 steps, an eval every
    # 5), with the micro-batch at 8 sequences so that the step splits evenly at any context up to 4096.
    "finetune": dict(total_batch_size=2**15, micro_batch_size=8, max_steps=20, warmup_steps=0, max_lr=3e-5,
                     min_lr_ratio=1.0, dropout=0.0, eval_every=5),
}
# AdamW and the schedule's shape, the same for every preset (GPT-3 paper, Appendix B).
ADAMW: dict[str, float] = dict(min_lr_ratio=0.1, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0)


def recipe(preset_name: str, backend: str, finetune: bool = False) -> dict[str, Any]:
    """The RECIPES row of a preset on a backend ("cpu", "gpu", "tpu"): the family's, with its backend's overrides,
    and the fine-tuning row over both for `finetune`."""
    family = "gpt2" if preset_name in GPT2_SIZES else "char"
    row = {**RECIPES[family], **RECIPES.get(f"{family}/{backend}", {})}
    return {**row, **RECIPES["finetune"]} if finetune else row
