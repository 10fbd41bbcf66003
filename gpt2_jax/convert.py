"""Hugging Face GPT-2 checkpoints <-> gpt2_jax models.

The common currency is a flat dict of numpy arrays with HF's GPT2LMHeadModel names and layouts
(`transformer.h.0.attn.c_attn.weight`, ...). HF's Conv1D stores weights as (in, out), which is also
`nnx.Linear`'s kernel layout, so no tensor is transposed here; the per-layer `h.{i}` tensors are stacked
on the model's leading `layers` axis. One tensor is reshaped: the model keeps c_attn's fused q/k/v axis
(3C) unfolded as (3, n_head, head_dim), HF's own order, so that tensor parallelism can split it by heads
(see sharding.py). Every tensor's shape is checked against the model's, in HF's layout.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from huggingface_hub import snapshot_download
from safetensors.numpy import load_file, save_file

from gpt2_jax.config import GPT2_VOCAB_SIZE, GPTConfig
from gpt2_jax.model import GPT

# HF name -> path in nnx.state(GPT). Block tensors are listed without their "h.{i}." prefix.
TOP_LEVEL = {
    "wte.weight": ("wte", "embedding"),
    "wpe.weight": ("wpe", "embedding"),
    "ln_f.weight": ("ln_f", "scale"),
    "ln_f.bias": ("ln_f", "bias"),
}
PER_BLOCK = {
    "ln_1.weight": ("ln_1", "scale"),
    "ln_1.bias": ("ln_1", "bias"),
    "attn.c_attn.weight": ("attn", "c_attn", "kernel"),
    "attn.c_attn.bias": ("attn", "c_attn", "bias"),
    "attn.c_proj.weight": ("attn", "c_proj", "kernel"),
    "attn.c_proj.bias": ("attn", "c_proj", "bias"),
    "ln_2.weight": ("ln_2", "scale"),
    "ln_2.bias": ("ln_2", "bias"),
    "mlp.c_fc.weight": ("mlp", "c_fc", "kernel"),
    "mlp.c_fc.bias": ("mlp", "c_fc", "bias"),
    "mlp.c_proj.weight": ("mlp", "c_proj", "kernel"),
    "mlp.c_proj.bias": ("mlp", "c_proj", "bias"),
}
# Stored by the model with their last HF axis (3C) unfolded to (3, n_head, head_dim): a plain reshape.
UNFOLDED = ("attn.c_attn.weight", "attn.c_attn.bias")
PREFIX = "transformer."  # GPT2LMHeadModel's prefix; the original `gpt2` files have none
# Tensors in HF files that are not parameters: causal-mask buffers, and the LM head tied to wte.
IGNORED = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$|^lm_head\.weight$")
HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def config_from_hf(hf: dict, where: str = "config.json") -> GPTConfig:
    """GPTConfig from an HF GPT-2 config.json dict; refuses anything that is not GPT-2 shaped."""
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{where}: model_type is {hf.get('model_type')!r}, not 'gpt2'; "
                         "load_hf reads GPT-2 checkpoints only")
    missing = [k for k in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd") if k not in hf]
    if missing:
        raise ValueError(f"{where}: missing GPT-2 size fields {missing}")
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": (hf.get("n_inner"), (None, 4 * hf["n_embd"])),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5), (1e-5,)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "reorder_and_upcast_attn": (hf.get("reorder_and_upcast_attn", False), (False,)),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), (True,)),
    }
    for field, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise ValueError(f"{where}: {field}={value!r} is not supported (expected one of {allowed})")
    return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True)


def config_to_hf(cfg: GPTConfig, vocab_size: int) -> dict:
    """An HF GPT2Config dict (config.json) for `cfg` with `vocab_size` rows."""
    eot = GPT2_VOCAB_SIZE - 1 if vocab_size >= GPT2_VOCAB_SIZE else None
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new",
        "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "vocab_size": vocab_size,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_inner": None,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "tie_word_embeddings": True,
        "attn_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "resid_pdrop": cfg.dropout,
        "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": "float32",
    }


def model_from_hf_tensors(tensors: dict[str, np.ndarray], cfg: GPTConfig, *,
                          checkpoint_vocab_size: int | None = None) -> GPT:
    """A GPT whose parameters are the given HF-named tensors; wte is zero-padded to cfg.vocab_size.

    `checkpoint_vocab_size`: the rows wte must have (the checkpoint config's vocab_size), so a wte that
    disagrees with its own config.json is refused instead of padded; None accepts any count up to
    cfg.vocab_size.
    """
    tensors = {k.removeprefix(PREFIX): v for k, v in tensors.items() if not IGNORED.search(k.removeprefix(PREFIX))}
    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))  # shapes only, nothing allocated
    graphdef, state = nnx.split(abstract)
    expected = nnx.to_pure_dict(state)  # nested dict of ShapeDtypeStructs
    pure: dict = {}

    def check(name, value, want):
        if tuple(value.shape) != tuple(want):
            raise ValueError(f"tensor {name}: checkpoint shape {tuple(value.shape)} does not match the "
                             f"model's {tuple(want)} for config {cfg}")

    used = set()
    for name, path in TOP_LEVEL.items():
        value, want = _take(tensors, name, used), _get(expected, path).shape
        if name == "wte.weight":  # pad 50257 -> 50304 with zeros
            rows = checkpoint_vocab_size or min(value.shape[0], cfg.vocab_size)
            check(name, value, (rows, want[1]))
            if want[0] > rows:
                value = np.concatenate([value, np.zeros((want[0] - rows, value.shape[1]), value.dtype)])
        check(name, value, want)
        _set(pure, path, jnp.asarray(value, dtype=jnp.float32))
    for name, path in PER_BLOCK.items():
        want = _get(expected, ("h", *path)).shape  # (n_layer, ...)
        layers = [_take(tensors, f"h.{i}.{name}", used) for i in range(cfg.n_layer)]
        for i, value in enumerate(layers):  # per layer, so the message names the one bad tensor
            check(f"h.{i}.{name}", value, _hf_shape(name, want[1:]))
        stacked = np.stack(layers).reshape(want)  # (n_layer, ...); c_attn's 3C -> (3, nh, hs)
        _set(pure, ("h", *path), jnp.asarray(stacked, dtype=jnp.float32))
    extra = sorted(set(tensors) - used)
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise ValueError(f"checkpoint has tensors the model does not use: {extra[:5]}{more} "
                         f"(is n_layer={cfg.n_layer} right?)")
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def model_to_hf_tensors(model: GPT, vocab_size: int | None = None) -> dict[str, np.ndarray]:
    """HF-named float32 numpy tensors (with the `transformer.` prefix); wte sliced to `vocab_size`."""
    cfg = model.config
    if not cfg.bias:
        raise ValueError("HF GPT-2 has biases everywhere; a bias=False model cannot be exported")
    pure = jax.tree.map(lambda x: np.asarray(jax.device_get(x), dtype=np.float32),
                        nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    out = {}
    for name, path in TOP_LEVEL.items():
        out[PREFIX + name] = _get(pure, path)
    out[PREFIX + "wte.weight"] = out[PREFIX + "wte.weight"][: vocab_size or cfg.vocab_size]
    for name, path in PER_BLOCK.items():
        stacked = _get(pure, ("h", *path))
        stacked = stacked.reshape(stacked.shape[:1] + _hf_shape(name, stacked.shape[1:]))  # (3, nh, hs) -> 3C
        for i in range(cfg.n_layer):
            out[f"{PREFIX}h.{i}.{name}"] = np.ascontiguousarray(stacked[i])
    return out


def export_vocab_size(cfg: GPTConfig) -> int:
    """The vocabulary an exported checkpoint should have: the padded GPT-2 vocab is sliced to 50257."""
    return GPT2_VOCAB_SIZE if cfg.vocab_size >= GPT2_VOCAB_SIZE else cfg.vocab_size


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local folder with config.json + weights: `name_or_path` itself, or a Hub download."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; pass the folder that holds config.json and the weights")
        return path
    name = str(name_or_path)
    looks_like_path = path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1
    if looks_like_path or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise FileNotFoundError(f"checkpoint folder {path} does not exist; pass a folder written by "
                                f"save_pretrained/export_hf or a Hub name such as {HUB_NAMES}")
    try:
        return Path(snapshot_download(name, allow_patterns=["config.json", "*.safetensors", "*.json"]))
    except Exception as e:
        raise FileNotFoundError(f"{name!r} is not a local folder and could not be fetched from the Hugging "
                                f"Face Hub ({type(e).__name__}: {e}); pass a local checkpoint folder") from e


def _damaged(path: Path, e: Exception) -> ValueError:
    return ValueError(f"{path} is damaged or not a weights file ({type(e).__name__}: {e}); download or "
                      "export the checkpoint again")


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except OSError:
        raise
    except Exception as e:  # safetensors' SafetensorError: truncated, or not a safetensors file at all
        raise _damaged(path, e) from e


def read_hf_tensors(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of an HF checkpoint folder as float32 numpy: safetensors (numpy only) or torch .bin.
    A damaged file is a ValueError naming it."""
    if (folder / "model.safetensors").exists():
        return _load_safetensors(folder / "model.safetensors")
    if (folder / "model.safetensors.index.json").exists():
        index_file = folder / "model.safetensors.index.json"
        try:
            shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise _damaged(index_file, e) from e
        tensors = {}
        for shard in shards:
            tensors.update(_load_safetensors(folder / shard))
        return tensors
    if (folder / "pytorch_model.bin").exists():
        try:
            import torch  # noqa: PLC0415 -- optional (the torch extra), only for a pytorch_model.bin
        except ImportError as e:
            raise ImportError(f"{folder}/pytorch_model.bin needs torch to read: pip install torch, "
                              "or convert the checkpoint to safetensors") from e
        try:
            state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception as e:  # pickle's UnpicklingError, torch's RuntimeError: truncated or not a checkpoint
            raise _damaged(folder / "pytorch_model.bin", e) from e
        return {k: v.float().numpy() for k, v in state.items()}
    raise FileNotFoundError(f"no weights in {folder}: expected one of {WEIGHT_FILES}")


def read_hf_config(folder: Path) -> GPTConfig:
    """The GPTConfig of an HF GPT-2 checkpoint folder, from its config.json alone."""
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{folder} has no config.json; is it an HF GPT-2 checkpoint folder?")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    return config_from_hf(hf_config, where=str(config_file))


def load_hf(name_or_path: str | os.PathLike, *, vocab_size: int | None = None, config: GPTConfig | None = None,
            **overrides) -> GPT:
    """A GPT from an HF GPT-2 checkpoint: a Hub name (`gpt2`, `gpt2-medium`, ...) or a local folder.

    `vocab_size=50304` pads the embedding with zero rows. `config`: the folder's, where the caller has read it
    (read_hf_config), else read here. Other keyword arguments override runtime GPTConfig fields (`dtype`,
    `attention`, `remat`, `dropout`).
    """
    folder = resolve_checkpoint(name_or_path)
    cfg = config or read_hf_config(folder)
    if vocab_size is not None and vocab_size < cfg.vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the checkpoint's {cfg.vocab_size}; "
                         "it can only pad the embedding (e.g. 50257 -> 50304), never cut it")
    tensors = read_hf_tensors(folder)
    return model_from_hf_tensors(tensors, cfg.replace(vocab_size=vocab_size or cfg.vocab_size, **overrides),
                                 checkpoint_vocab_size=cfg.vocab_size)


def export_hf(model: GPT, out_dir: str | os.PathLike, *, vocab_size: int | None = None) -> Path:
    """Write `model` as an HF folder (config.json + model.safetensors) for GPT2LMHeadModel.from_pretrained."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = vocab_size or export_vocab_size(model.config)
    tensors = model_to_hf_tensors(model, vocab_size)
    # Write to temporary names, then rename: a crash never leaves a half-written file under the real name.
    tmp = out / ".model.safetensors.tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    umask = os.umask(0o022)  # safetensors creates 0600 files; give it the mode any other file gets here
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, out / "model.safetensors")
    tmp = out / ".config.json.tmp"
    tmp.write_text(json.dumps(config_to_hf(model.config, vocab_size), indent=2) + "\n")
    os.replace(tmp, out / "config.json")
    return out


def _hf_shape(name: str, model_shape: tuple[int, ...]) -> tuple[int, ...]:
    """One layer's tensor shape in HF's layout: (C, 3, nh, hs) -> (C, 3C) for c_attn, else unchanged."""
    model_shape = tuple(model_shape)
    return model_shape[:-3] + (int(np.prod(model_shape[-3:])),) if name in UNFOLDED else model_shape


def _take(tensors: dict, name: str, used: set) -> np.ndarray:
    if name not in tensors:
        raise ValueError(f"checkpoint has no tensor {name!r} (has {len(tensors)} tensors, e.g. "
                         f"{sorted(tensors)[:3]})")
    used.add(name)
    return tensors[name]


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
