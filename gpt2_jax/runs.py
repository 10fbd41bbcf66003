"""Model sources and training runs: the one way from `--init_from` to `(model, tokenizer, meta)`.

`--init_from` (train.py, sample, evaluate, export) is one of:

- a training run's out_dir, or its `checkpoints/` folder: the newest checkpoint that restores (or
  `step`), its params only (not the AdamW moments, twice their size); the run's own tokenizer;
- a Hugging Face GPT-2 folder (`config.json` + `model.safetensors` or `pytorch_model.bin`), such as
  `python -m gpt2_jax.export` writes: the tokenizer it records, else GPT-2's BPE for a GPT-2 vocabulary;
- a Hub name (`gpt2`, `gpt2-medium`, ...), downloaded once into the Hugging Face cache.

A training run's out_dir holds `checkpoints/<step>/{state,meta}`, `config.json`, `metrics.jsonl`, `tb/`
and `loss.png`; the names are defined here, once.

Any of these may be in a bucket (`gs://bucket/run`): paths go through `storage.run_path` (etils.epath). An HF
folder in a bucket is copied to a local temporary folder and loaded from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
from etils import epath
from flax import nnx

from gpt2_jax.checkpoint import Checkpointer
from gpt2_jax.config import GPT2_VOCAB_SIZE, GPTConfig
from gpt2_jax.convert import load_hf, read_hf_config, resolve_checkpoint
from gpt2_jax.model import GPT
from gpt2_jax.sharding import with_shardings
from gpt2_jax.storage import is_remote, run_path
from gpt2_jax.tokenizer import Tokenizer

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TOKENIZER_FILE = "gpt2_jax_tokenizer.json"  # beside an exported HF folder's config.json



@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """What a training checkpoint records beside its arrays (checkpoints/<step>/meta, JSON): the one schema.
    The trainer writes it at every save and reads it to resume; load_run reads the model and tokenizer."""

    step: int
    model_config: dict  # GPTConfig.to_dict()
    train_config: dict  # the resolved TrainConfig
    tokenizer: dict | None = None  # Tokenizer.to_meta(); absent in runs saved before tokenizers were recorded
    loader: dict | None = None  # the train loader's position after `step`
    data: dict | None = None  # the data fingerprint: {"dir", "shards"}
    skipped_steps: int = 0  # --on_nan=skip: updates skipped so far
    consecutive_skips: int = 0  # ... and in a row up to `step`

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def model(self) -> GPTConfig:
        return GPTConfig.from_dict(self.model_config)

def checkpoints_dir(path: str | os.PathLike) -> epath.Path:
    """The checkpoints/ folder of a run, given its out_dir or the folder itself (local or gs://)."""
    path = run_path(path)
    return path if path.name == CHECKPOINTS else path / CHECKPOINTS


def is_training_run(path: str | os.PathLike) -> bool:
    """Whether `path` is a training run's out_dir (it has checkpoints/) or its checkpoints/ folder."""
    return checkpoints_dir(path).is_dir()


def read_tokenizer(folder: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer an exported HF folder records (TOKENIZER_FILE), or None if it records none."""
    path = run_path(folder) / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        return Tokenizer.from_meta(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def write_tokenizer(folder: str | os.PathLike, tokenizer: Tokenizer) -> None:
    (run_path(folder) / TOKENIZER_FILE).write_text(json.dumps(tokenizer.to_meta(), indent=1) + "\n")


def _guess_tokenizer(cfg: GPTConfig) -> Tokenizer | None:
    """GPT-2's BPE for a GPT-2-sized (or padded) vocabulary; None (unknown) otherwise."""
    return Tokenizer.gpt2() if cfg.vocab_size >= GPT2_VOCAB_SIZE else None


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs a warning each time a folder is opened read-only; reading a run is not news."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def load_run(path: str | os.PathLike, step: int | None = None, *, shardings: Any = None, saved: GPTConfig | None = None,
             **overrides: Any) -> tuple[GPT, Tokenizer | None, dict[str, Any]]:
    """(model, tokenizer, meta) from a training run's out_dir (or its checkpoints/ folder): the newest
    checkpoint that restores, or `step`. Only the params are read, not the optimizer state.

    `shardings`: a tree of shardings like `nnx.state(model)` to restore onto (e.g. FSDP shards over a
    mesh); default one device. `overrides` set runtime GPTConfig fields (dtype, attention, remat); a
    shape field (vocab_size, ...) must equal the run's. Checkpoints written before tokenizers were
    recorded get GPT-2's BPE if GPT-2-sized, else None.
    """
    folder = checkpoints_dir(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{path} is not a training run: no {CHECKPOINTS}/ folder in it")
    with _quiet_orbax(), Checkpointer(folder, read_only=True) as ckpt:
        steps = ckpt.all_steps()
        if not steps or (step is not None and step not in steps):
            raise FileNotFoundError(f"no checkpoint{'' if step is None else f' for step {step}'} in {folder} "
                                    f"(complete steps: {steps or 'none'})")
        if saved is None:  # (a caller that read the meta already passes its model: source_config)
            meta = ckpt.read_meta(step)
            if meta is None:
                raise FileNotFoundError(f"no readable checkpoint in {folder}")
            saved = CheckpointMeta.from_dict(meta).model
        cfg = saved.replace(**overrides)
        if diff := saved.arch_diff(cfg):
            detail = ", ".join(f"{f} {getattr(saved, f)} (asked: {getattr(cfg, f)})" for f in diff)
            raise ValueError(f"the run in {path} has {detail}; a checkpoint loads only with its own shapes")
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
        if shardings is None:
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: one, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
        target = with_shardings(abstract, shardings)
        # The saved TrainState is {"model", "opt"}: read only the model, not the AdamW moments.
        state, meta, _ = ckpt.restore({"model": target}, step=step, partial=True)
    model = nnx.merge(graphdef, state["model"])
    recorded = CheckpointMeta.from_dict(meta).tokenizer
    tokenizer = Tokenizer.from_meta(recorded) if recorded else _guess_tokenizer(cfg)
    return model, tokenizer, meta


def source_config(init_from: str) -> GPTConfig:
    """The model `init_from` holds (shapes included), read from its meta or config.json alone, without its
    arrays: train.py sets a run's architecture from it before anything is built."""
    path = run_path(init_from)
    if is_training_run(path):
        with _quiet_orbax(), Checkpointer(checkpoints_dir(path), read_only=True) as ckpt:
            meta = ckpt.read_meta()
        if meta is None:
            raise FileNotFoundError(f"no readable checkpoint in {checkpoints_dir(path)}")
        return CheckpointMeta.from_dict(meta).model
    _check_hf_source(init_from, path)
    return read_hf_config(path if is_remote(path) else resolve_checkpoint(init_from))


def _check_hf_source(init_from: str, path: epath.Path) -> None:
    """`init_from`, not a training run, names an HF folder or could be a Hub name; else FileNotFoundError."""
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is neither a training run's out_dir (no {CHECKPOINTS}/ folder) nor an "
                                "HF checkpoint folder (no config.json)")
    if not path.exists() and (is_remote(path) or path.is_absolute() or init_from.startswith((".", "~"))):
        raise FileNotFoundError(f"{path} does not exist; --init_from takes a training run's out_dir, an HF "
                                "checkpoint folder or an HF GPT-2 name (gpt2, gpt2-medium, ...)")


def load_model(init_from: str, *, step: int | None = None, shardings: Any = None, vocab_size: int | None = None,
               block_size: int | None = None, saved: GPTConfig | None = None,
               **overrides: Any) -> tuple[GPT, Tokenizer | None, dict[str, Any]]:
    """(model, tokenizer, meta) from `init_from`: a training run, an HF folder or an HF Hub name (see the
    module docstring). `meta` is the checkpoint's for a run, else {"source": the HF folder}.

    `vocab_size` pads an HF model's vocabulary with zero rows (e.g. 50304); a run keeps its own.
    `block_size` below the model's crops its learned positions (GPT.crop_block_size); above is an error.
    `overrides` set runtime GPTConfig fields (dtype, attention, remat). Missing paths raise FileNotFoundError.
    `saved`: the model `init_from` holds, where the caller has read it already (source_config): its meta or
    config.json is then not read again.
    """
    if block_size is not None:  # loaded whole on one device, cropped, then placed
        model, tokenizer, meta = load_model(init_from, step=step, vocab_size=vocab_size, saved=saved, **overrides)
        if block_size != model.config.block_size:
            model.crop_block_size(block_size)
        if shardings is not None:
            nnx.update(model, jax.device_put(nnx.state(model), shardings))
        return model, tokenizer, meta
    path = run_path(init_from)
    if is_training_run(path):
        if vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        return load_run(path, step, shardings=shardings, saved=saved, **overrides)
    if step is not None:
        raise ValueError(f"--step={step} applies to training runs only; {init_from} is not one "
                         f"(no {CHECKPOINTS}/ folder)")
    _check_hf_source(init_from, path)
    if is_remote(path):  # an HF folder in a bucket: safetensors and transformers read local files
        with tempfile.TemporaryDirectory(prefix="gpt2_jax-hf-") as tmp:
            for f in path.iterdir():
                if f.is_file():
                    (Path(tmp) / f.name).write_bytes(f.read_bytes())
            model, tokenizer, _ = _load_hf_folder(Path(tmp), vocab_size, shardings, saved, overrides)
        return model, tokenizer, {"source": str(path)}
    folder = resolve_checkpoint(init_from)  # a Hub name is downloaded (or found in the HF cache) once
    return _load_hf_folder(folder, vocab_size, shardings, saved, overrides)


def _load_hf_folder(folder: Path, vocab_size: int | None, shardings: Any, saved: GPTConfig | None, overrides: dict):
    model = load_hf(folder, vocab_size=vocab_size, config=saved, **overrides)
    if shardings is not None:
        nnx.update(model, jax.device_put(nnx.state(model), shardings))
    return model, read_tokenizer(folder) or _guess_tokenizer(model.config), {"source": str(folder)}
