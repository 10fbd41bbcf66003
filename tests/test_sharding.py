"""Tensor parallelism splits attention by whole heads (Megatron's layout, see sharding.py's docstring):
c_attn's q, k and v are split alike, and the compiled train step moves no activations between devices
except the all-reduces of the row-split projections and of the data-parallel gradients."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from tiny import TINY_MODEL

from gpt2_jax import sharding
from gpt2_jax.model import GPT

ROOT = Path(__file__).resolve().parents[1]


def test_c_attn_is_split_on_its_heads_dim():
    cfg = TINY_MODEL.replace(block_size=16, vocab_size=128, n_head=4, n_embd=64)  # 4 heads: 2 per tensor shard
    abstract = nnx.state(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
    shardings = sharding.state_shardings(abstract, sharding.make_mesh("data:4,tensor:2"))
    attn = shardings["h"]["attn"]
    # (layers, C, 3, n_head, head_dim): q, k and v each split into the same two halves of their heads.
    assert attn["c_attn"]["kernel"].spec == P(None, None, None, "tensor", None)
    assert attn["c_attn"]["bias"].spec == P(None, None, "tensor", None)
    assert attn["c_proj"]["kernel"].spec == P(None, "tensor", None)  # rows = the heads' outputs, same order


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data:4,tensor:2", "data:2,tensor:4"])
def test_tensor_parallel_step_reshuffles_nothing(mesh):
    """The collectives in the trainer's compiled step (benchmarks/collectives.py: 2 layers, 4 heads,
    C=64, vocab 128, T=64, batch 8; static counts, bytes per device). Measured, JAX 0.10.2 on CPU:

        mesh             c_attn kernel      all-gather  all-reduce       all-to-all     collective-permute
        data:4,tensor:2  (C, 3C), 3C split  0           14 (580,412 B)   8 (196,608 B)  4 (131,072 B)
        data:4,tensor:2  (C, 3, nh, hs)     0           14 (580,412 B)   0              0
        data:2,tensor:4  (C, 3C), 3C split  0           14 (794,044 B)   8 (196,608 B)  14 (327,680 B)
        data:2,tensor:4  (C, 3, nh, hs)     0           14 (794,044 B)   0              0

    The all-to-alls and permutes were q/k/v reshuffled to whole heads (forward split, backward concat).
    What is left, per layer: 2 all-reduces forward (after attn.c_proj and mlp.c_proj), 2 backward
    (before c_attn and c_fc), plus those of the embeddings, the loss and the gradients. Since the gradients are
    summed over `data` once after the micro-batches (step._gradient_sums), that sum is one all-reduce of its own:
    15 all-reduces, of fewer bytes (564,028 B on data:4,tensor:2; 785,852 B on data:2,tensor:4)."""
    most_bytes = {"data:4,tensor:2": 580_412, "data:2,tensor:4": 794_044}  # before: no more than then
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "collectives.py"), f"--mesh={mesh}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout.strip().splitlines()[-1])["meshes"][mesh]
    assert counts["all-gather"]["count"] == 0
    assert counts["all-to-all"]["count"] == 0
    assert counts["collective-permute"]["count"] == 0
    assert counts["reduce-scatter"]["count"] == 0
    assert counts["all-reduce"]["count"] <= 15 and counts["all-reduce"]["bytes"] <= most_bytes[mesh]
