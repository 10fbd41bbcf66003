"""A readable PyTorch GPT-2, the yardstick the Flax model is tested against.

Written in the style of nanoGPT's model.py: four small classes and HF's parameter names. Linear layers
are torch `nn.Linear`, whose weights are (out, in); HF's Conv1D stores (in, out), so loading from HF
transposes exactly the four kinds of matmul weight listed in `TRANSPOSED`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2_jax.config import GPTConfig  # the shared, JAX-free config dataclass

TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE = True
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (a.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for a in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return F.dropout(self.c_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE = True
        self.dropout = config.dropout

    def forward(self, x):
        x = F.gelu(self.c_fc(x), approximate="tanh")  # GPT-2 uses the tanh approximation
        return F.dropout(self.c_proj(x), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # pre-LayerNorm residual branches
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02 * ((2 * self.config.n_layer) ** -0.5 if getattr(module, "RESIDUAL_SCALE", False) else 1)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters under HF GPT2LMHeadModel names and layouts (Conv1D weights as (in, out))."""
        out = {}
        for k, v in self.state_dict().items():
            if k == "lm_head.weight":  # tied to wte
                continue
            out[k] = v.t() if k.endswith(TRANSPOSED) else v
        return out

    def load_hf_state_dict(self, tensors: dict) -> None:
        """Copy HF-named tensors in, transposing Conv1D weights; asserts every shape."""
        own = self.state_dict()
        tensors = {k if k.startswith("transformer.") else "transformer." + k: v for k, v in tensors.items()}
        for k in own:
            if k == "lm_head.weight":
                continue
            src = torch.as_tensor(tensors[k])
            src = src.t() if k.endswith(TRANSPOSED) else src
            assert src.shape == own[k].shape, f"{k}: {tuple(src.shape)} vs {tuple(own[k].shape)}"
            with torch.no_grad():
                own[k].copy_(src)

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "GPT":
        """Load HF GPT-2 weights (a Hub name or a save_pretrained folder) through `transformers`."""
        from transformers import GPT2LMHeadModel  # noqa: PLC0415

        hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        c = hf.config
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                           n_head=c.n_head, n_embd=c.n_embd, bias=True)
        model = cls(config)
        model.load_hf_state_dict({k: v for k, v in hf.state_dict().items() if not k.endswith(".attn.bias")})
        return model

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

