"""Checkpoints: an orbax CheckpointManager with atomic saves, resharding restores and a fallback.

Usage (as in training/setup.py):

    ckpt = Checkpointer(directory, max_to_keep=3, async_save=True)
    if ckpt.latest_step() is not None:      # resume; abstract_state: ShapeDtypeStructs + target shardings
        state, meta, step = ckpt.restore(abstract_state)
    part, meta, step = ckpt.restore({"model": abstract_params}, partial=True)  # reads only these arrays
    ...
    ckpt.save(step, state, {"config": ..., "loader": ...})  # state: any pytree of jax.Arrays (nnx.State too)
    ckpt.close()                                             # waits for the last async save

On disk, one folder per step:

    <directory>/1000/state/       the array tree (OCDBT + zarr; each process writes its own shards)
    <directory>/1000/meta/        `meta` as JSON (config, data-loader position, ...)

What makes it safe (checked against orbax-checkpoint 0.12.8's source and by tests/test_checkpoint.py):
- Atomic saves. On a local or network filesystem orbax writes a step into `1000.orbax-checkpoint-tmp`,
  writes `commit_success.txt` last and only then renames the folder to `1000`. A step folder is complete
  iff its name is a bare number (on GCS, where there is no atomic rename, iff it holds
  `commit_success.txt`). A killed save leaves only a `*.orbax-checkpoint-tmp` folder, which step
  listing skips and the next Checkpointer deletes (`cleanup_tmp_directories`).
- Old steps are deleted (`max_to_keep`) after the newer save has finished writing, never before; if
  the save fails, nothing is deleted.
- Orbax's own `CheckpointManager.latest_step()` already counts a step whose async save is still in
  flight, so this class lists complete steps from the disk instead.
- A step that can't be restored (truncated or missing file, bad JSON, a tree that no longer matches) is
  skipped with a warning and the previous one is tried; see `restore`.
- A failed save is one CheckpointWriteError (the folder, the cause, what to do), never a hang: orbax's save
  threads that wait on the failed step are released. A local folder that cannot hold a checkpoint is found
  when the Checkpointer is made (`_probe`), before a run spends any step.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sys
import threading
import traceback
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

try:  # orbax's save threads (private): a failed save's are released, see `_release_stranded_saves`
    from orbax.checkpoint._src.futures import future as _orbax_future
except ImportError:  # another orbax layout: nothing to release
    _orbax_future = None

from gpt2_jax.distributed import all_ok, broadcast_from_primary, is_primary

PyTree = Any
DISK_FULL = ("No space left on device", "os_error_code='28'")  # ENOSPC as tensorstore words it
OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")  # how tensorstore's errors carry the OS's errno

# The longest path orbax 0.12 writes under a checkpoint folder, by its parts: a step's temporary folder, an item's,
# a process's OCDBT folder, a data file (tensorstore's temporary name for it is longer); room for a 10-digit step
# and a 4-digit process index. `Checkpointer` makes one of this length at start-up (`_probe`).
LONGEST_PATH = ("9999999999.orbax-checkpoint-tmp", "state.orbax-checkpoint-tmp", "ocdbt.process_9999", "d",
                "f" * 32 + ".__lock.tmp-0123456789abcdef")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (or the folder cannot hold one). Its message is the whole story:
    the folder, the cause, that the checkpoints already there are intact, what to do."""


class DiskFullError(CheckpointWriteError):
    """A checkpoint could not be written: the disk is full (ENOSPC). Its message is the whole story."""


def _os_errno(error: BaseException | None) -> int | None:
    """The errno of `error` or of an error it was raised from: an OSError's, or the `os_error_code` in
    tensorstore's words (orbax wraps those in ValueErrors); None if there is none."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return error.errno
        if any(m in str(error) for m in DISK_FULL):
            return errno.ENOSPC
        if code := OS_ERROR_CODE.search(str(error)):
            return int(code[1])
        error = error.__cause__ or error.__context__
    return None


def _is_disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, is ENOSPC."""
    return _os_errno(error) == errno.ENOSPC


class _NoSaveErrorTracebacks(logging.Filter):
    """orbax logs a failed write from each of its save threads, traceback included (~50 of them for a full
    disk); the Checkpointer reports it once, as a CheckpointWriteError."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _is_disk_full(record.exc_info[1] if record.exc_info else None) or any(
                m in record.getMessage() for m in DISK_FULL):
            return False
        return not ("orbax" in record.pathname and record.exc_info and _os_errno(record.exc_info[1]) is not None)


for _logger in ("absl", "asyncio"):  # asyncio: tensorstore's failed writes in futures nobody awaited any more
    logging.getLogger(_logger).addFilter(_NoSaveErrorTracebacks())


def _quiet_abandoned_writes() -> None:
    """orbax gives up on a save at its first failed write (a full disk) and closes that save's event loop
    while tensorstore's other writes still run. When they finish, each one's callback meets the closed loop
    ("RuntimeError: Event loop is closed" from call_soon_threadsafe, through sys.unraisablehook, often before
    the main thread hears of the failure) and its coroutine is reported as never awaited. Both are leftovers
    of a save whose failure the Checkpointer reports once; nothing else raises them."""
    warnings.filterwarnings("ignore", r"coroutine .*write_fragment.* was never awaited", RuntimeWarning)
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        value, frames = unraisable.exc_value, traceback.extract_tb(unraisable.exc_traceback)
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
                and any(f.name == "call_soon_threadsafe" for f in frames)):
            previous(unraisable)

    sys.unraisablehook = hook


_quiet_abandoned_writes()


def abstract_like(tree: PyTree) -> PyTree:
    """The restore target for a tree of jax.Arrays: same shapes, dtypes and shardings, no data."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _manager_options(name_format, max_to_keep: int | None, async_save: bool, read_only: bool):
    return ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep,
        save_interval_steps=0 if read_only else 1,  # (orbax warns about anything else when read-only)
        enable_async_checkpointing=async_save,
        step_name_format=name_format,
        # Delete the `*.orbax-checkpoint-tmp` folders of killed saves (on the primary process).
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
    )


class Checkpointer:
    """Saves and restores `(state, meta)` per step under `directory` (local path or gs://...).

    Args:
      directory: folder holding one sub-folder per step; created if missing.
      max_to_keep: keep the newest N complete checkpoints (None keeps all).
      async_save: write to disk in a background thread. `save` returns once the arrays are copied to
        host memory, so the train step may donate or overwrite its buffers right away.
      read_only: only list and restore: never create, clean up or delete anything (another run's checkpoints).

    A local folder that cannot hold a checkpoint raises CheckpointWriteError here; a failed save raises it (a full
    disk: DiskFullError) from `save`, `wait` or `close`, and never leaves the process hanging.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save: bool = True,
                 read_only: bool = False):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep} must be >= 1 (or None to keep every checkpoint)")
        if "://" not in str(directory):
            directory = os.path.abspath(directory)  # orbax wants absolute paths
        self.directory = epath.Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f"checkpoint directory {self.directory} is a file; pass a folder (it is "
                                     "created if missing)")
        # The manager and `all_steps` must agree on step folder names: `<step>`, no prefix or padding.
        self._name_format = ocp.step.standard_name_format()
        self.read_only = read_only
        if not read_only and "://" not in str(directory):
            _probe(self.directory)  # a folder that cannot hold a checkpoint fails now, not at the first save
        options = _manager_options(self._name_format, max_to_keep, async_save, read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / self._name_format.build_name(step)

    def all_steps(self) -> list[int]:
        """Steps with a complete checkpoint on disk, oldest first (saves still in flight excluded).

        As process 0 lists them: on an object store listings are eventually consistent, and processes
        that saw different steps would restore different ones (or one would start fresh) and hang."""
        return broadcast_from_primary(self._list_steps())

    def _list_steps(self) -> list[int]:
        """The complete steps this process sees."""
        return sorted(m.step for m in self._name_format.find_all(self.directory))

    def latest_step(self) -> int | None:
        """Newest complete checkpoint, or None (it may still be damaged: `restore` checks)."""
        return (self.all_steps() or [None])[-1]

    def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
        """Saves a tree of jax.Arrays (any sharding) and a JSON-serialisable dict, atomically.

        Call it on every process: each writes its own shards; orbax writes `meta` and renames the
        folder on the primary process. JSON turns tuples into lists and dict keys into strings.
        """
        if self.read_only:
            raise PermissionError(f"Checkpointer({self.directory}, read_only=True) cannot save step {step}")
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint meta for step {step} is not JSON-serialisable: {e}") from e
        # orbax waits for the previous async save at the start of `save` anyway; waiting first makes
        # the listing below see it.
        self.wait()
        # Checkpoints at or after `step` belong to a run we have rewound from, e.g. because `restore`
        # skipped a damaged newest step. Orbax would silently skip this save (step <= latest) and later
        # fail with "step already exists", so remove them (through orbax: the primary process deletes).
        stale = [s for s in self.all_steps() if s >= step]
        if stale:
            warnings.warn(f"Saving step {step} to {self.directory}: deleting checkpoints {stale}, which are not "
                          f"older than it (e.g. the run resumed from an earlier step).", stacklevel=2)
            self._manager.reload()
            for s in stale:
                self._manager.delete(s)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        # force: skip orbax's should_save (intervals, "step <= latest"); the caller decides when to save.
        with _save_errors(self, step):
            self._manager.save(step, args=args, force=True)

    def wait(self) -> None:
        """Blocks until async saves (and the deletions that follow them) are finished; raises a failed one's error."""
        with _save_errors(self, self._manager.latest_step()):  # (orbax's counts the save in flight)
            self._manager.wait_until_finished()

    def restore(
        self, abstract_state: PyTree, step: int | None = None, *, partial: bool = False
    ) -> tuple[PyTree, dict[str, Any], int]:
        """Restores `(state, meta, step)` with arrays placed on `abstract_state`'s shardings.

        `abstract_state` is a tree of jax.ShapeDtypeStruct with `.sharding` set (see `abstract_like`),
        with the structure of the saved state: optax NamedTuples come back as NamedTuples. The mesh and
        device count may differ from the ones the checkpoint was saved with.

        partial=True: `abstract_state` may hold only some subtrees of the saved state, e.g.
        `{"model": ...}` of a `{"model": ..., "opt": ...}` state, and only their arrays are read from disk
        (inference needs the params, not the optimizer moments that double or triple them).

        step=None restores the newest checkpoint that restores cleanly: a damaged one is skipped with a
        warning and the previous one tried. An explicit step is restored or raises, without fallback.
        """
        self.wait()  # a save still in flight is not complete, and its clean-up may delete old steps
        _check_has_shardings(abstract_state)
        steps = self.all_steps()
        if step is not None and step not in steps:
            raise FileNotFoundError(f"No complete checkpoint for step {step} in {self.directory}; complete steps: "
                                    f"{steps}")
        if not steps:
            raise FileNotFoundError(
                f"No complete checkpoint in {self.directory}. To start from scratch, skip restore when "
                f"latest_step() is None, or use an empty or new checkpoint directory."
            )
        failures = []
        for s in [step] if step is not None else reversed(steps):
            try:
                return (*_restore_step(self._manager, self.step_dir(s), abstract_state, partial), s)
            except Exception as e:
                if step is not None:
                    raise RuntimeError(f"Could not restore step {step} from {self.step_dir(step)}: {_short(e)}") from e
                failures.append(f"step {s} ({self.step_dir(s)}): {_short(e)}")
                warnings.warn(f"Could not restore checkpoint {failures[-1]}; trying the previous one", stacklevel=2)
        raise RuntimeError(
            f"None of the {len(steps)} checkpoints in {self.directory} could be restored:\n  " + "\n  ".join(failures)
        )

    def read_meta(self, step: int | None = None) -> dict[str, Any] | None:
        """The JSON meta of a step (default: the newest), without touching its arrays; None if unreadable.

        Lets a caller check that a checkpoint fits (same model config, same data) before restoring it.
        """
        self.wait()
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception:  # noqa: BLE001  (any damage: a damaged step, which restore() falls back from and reports)
            meta = None
        return broadcast_from_primary(meta)  # every process decides on process 0's reading

    def close(self) -> None:
        """Waits for pending saves (raising a failed one's error, as `wait`), then releases orbax's threads."""
        with _save_errors(self, self._manager.latest_step()):
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# What to do about a checkpoint folder that cannot be written, by the OS's errno.
_FIXES = {
    errno.ENOSPC: "free some space, or lower --keep_checkpoints, or pass an --out_dir on a bigger disk",
    errno.ENAMETOOLONG: "pass a shorter --out_dir",
    errno.EACCES: "make it writable, or pass another --out_dir",
    errno.EPERM: "make it writable, or pass another --out_dir",
    errno.EROFS: "it is on a read-only filesystem: pass an --out_dir on a writable one",
}


def _cause(error: BaseException, code: int | None) -> str:
    """An OS error's words without its (possibly kilobytes long) file name; else the innermost error's."""
    if code is None:
        return _short(error)
    return f"[Errno {code}] {os.strerror(code)}"


@contextlib.contextmanager
def _save_errors(ckpt: Checkpointer, step: int | None):
    """Turn a failed write from orbax (now, or from an async save of `step`) into one CheckpointWriteError
    (DiskFullError for ENOSPC) that names the folder, the cause and what to do. Whatever failed, orbax's save
    threads that wait for it are released (else the process never exits) and the save's partial folder is
    removed."""
    try:
        yield
    except Exception as e:
        _release_stranded_saves()
        code = _os_errno(e)
        local = "://" not in str(ckpt.directory)
        if code is None or not local and code != errno.ENOSPC:  # not an OS error (a bug): as it is
            raise
        for tmp in ckpt.directory.glob("*.orbax-checkpoint-tmp") if local and is_primary() else ():
            shutil.rmtree(tmp, ignore_errors=True)
        steps = ckpt._list_steps()
        which = "" if step is None else f" {step}"
        intact = (f"The checkpoints already there are intact (newest: step {steps[-1] if steps else 'none'}); "
                  f"{_FIXES.get(code, 'pass another --out_dir')}, then run the same command to resume")
        if code == errno.ENOSPC:
            free = f"{shutil.disk_usage(ckpt.directory).free / 2**20:,.1f} MiB free" if local else "no space"
            error = DiskFullError(f"the disk is full: checkpoint{which} could not be written to {ckpt.directory} "
                                  f"({free}). {intact}")
        else:
            error = CheckpointWriteError(f"checkpoint{which} could not be written to {ckpt.directory}: "
                                         f"{_cause(e, code)}. {intact}")
        error.errno = code
        raise error from None


def _release_stranded_saves() -> None:
    """Let the save threads of a failed save end. orbax 0.12 runs a save's steps in threads that each wait for a
    signal from the step before; a step that fails early (making the step's folder: a name too long, a
    read-only folder) never sends it, and the others wait for orbax's 300 s coordination timeout, more than
    once. They are not daemon threads, so the process would not exit after its error. Cancelling one
    (orbax's own `cancel`) and sending the signal it waits for makes it return without running."""
    if _orbax_future is None:
        return
    # The coroutines of the cancelled steps are never run: Python would warn about each when it collects them.
    warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
    for thread in threading.enumerate():
        if isinstance(thread, _orbax_future._SignalingThread) and thread.is_alive():
            with contextlib.suppress(Exception):  # (private API: a changed orbax leaves them to time out)
                thread.cancel()
                _orbax_future.set_signals(thread._receive_signals, operation_id=thread._operation_id)


def _probe(directory: epath.Path) -> None:
    """Check that the local `directory` can hold a checkpoint before any step is spent: make the deepest
    path orbax writes there (LONGEST_PATH, under a name step listing ignores), write a file, remove it all.
    Raises CheckpointWriteError naming the folder, the cause and what to do."""
    top = f".gpt2_jax-probe-{os.getpid()}".ljust(len(LONGEST_PATH[0]), "0")
    path = os.path.join(str(directory), top, *LONGEST_PATH[1:])
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("ok")
    except OSError as e:
        steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []
        detail = (f" (orbax writes paths of {len(path)} characters there; this system allows "
                  f"{os.pathconf('/', 'PC_PATH_MAX')})" if e.errno == errno.ENAMETOOLONG else "")
        error = CheckpointWriteError(
            f"{directory} cannot hold a checkpoint: [Errno {e.errno}] {e.strerror}{detail}. Nothing was trained"
            + (f"; the checkpoints already there are intact (newest: step {steps[-1]})" if steps else "")
            + f"; {_FIXES.get(e.errno, 'pass another --out_dir')}")
        error.errno = e.errno
        raise error from None
    finally:
        shutil.rmtree(os.path.join(str(directory), top), ignore_errors=True)


def _restore_step(manager: ocp.CheckpointManager, step_dir: epath.Path, abstract_state: PyTree,
                  partial: bool) -> tuple[PyTree, dict[str, Any]]:
    """(state, meta) of one step, the same on every process (or an error on every process)."""
    step = int(step_dir.name)
    target, migrate = _old_layout(step_dir / "state", abstract_state)
    state_args = {} if partial else {"state": ocp.args.StandardRestore(target)}
    args = ocp.args.Composite(**state_args, meta=ocp.args.JsonRestore())
    error = state = meta = None
    try:
        restored = manager.restore(step, args=args)
        state = migrate(_read_part(step_dir / "state", target) if partial else restored["state"])
        meta = restored["meta"]
    except Exception as e:  # noqa: BLE001  (any failure: every process must hear of it, below)
        error = e
    # Every process reads only its own shards, so one may fail where others succeed. They must all
    # agree, or they would go on from different steps.
    if not all_ok(error is None):
        raise error or RuntimeError(f"another process failed to restore step {step}")
    return state, broadcast_from_primary(meta)


def _old_layout(state_dir: epath.Path, abstract_state: PyTree):
    """(the restore target, a function that brings the restored tree to `abstract_state`) for checkpoints
    written before c_attn's fused q/k/v axis was unfolded (commit cd3ca52): they hold its kernel as
    (..., C, 3C) and its bias as (..., 3C) -- the optimizer's moments too -- where the model now has
    (..., C, 3, n_head, head_dim) and (..., 3, n_head, head_dim). The same numbers in the same order, so
    such leaves are read in their saved shape and reshaped (the migration is automatic; the next save
    writes the new layout). Any other checkpoint: (abstract_state, identity)."""
    try:
        saved = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree
        saved = {name: tuple(m.shape) for name, m in ocp.tree.to_flat_dict(saved, sep=".").items()
                 if getattr(m, "shape", None) is not None}
        names = ocp.tree.get_param_names(abstract_state)
    except Exception:  # noqa: BLE001  (unreadable metadata: restore as it is, and let that report the damage)
        return abstract_state, lambda state: state

    def fused(name: str, leaf) -> tuple[int, ...] | None:
        shape = tuple(leaf.shape)
        old = shape[:-3] + (int(np.prod(shape[-3:])),) if len(shape) >= 3 else None
        return old if "c_attn" in name and old is not None and saved.get(name) == old else None

    olds = {name: old for name, leaf in zip(jax.tree.leaves(names), jax.tree.leaves(abstract_state))
            if (old := fused(name, leaf)) is not None}
    if not olds:
        return abstract_state, lambda state: state
    warnings.warn(f"{state_dir.parent} holds attention weights (c_attn) in the layout before (C, 3, n_head, "
                  "head_dim): reshaped on restore; the next checkpoint is written in the new layout", stacklevel=3)

    def as_saved(name, leaf):
        if name not in olds:
            return leaf
        sharding = leaf.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):  # its spec has the new rank: replicate, then reshape
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        return jax.ShapeDtypeStruct(olds[name], leaf.dtype, sharding=sharding)

    def migrate(state):
        return jax.tree.map(lambda name, x, leaf: jax.device_put(x.reshape(leaf.shape), leaf.sharding)
                            if name in olds else x, names, state, abstract_state)

    return jax.tree.map(as_saved, names, abstract_state), migrate


def _read_part(state_dir: epath.Path, abstract_part: PyTree) -> PyTree:
    """The arrays of `abstract_part`, a part of the saved state tree, and no others.

    StandardRestore has no partial restore, and orbax binds one handler type to each item of a
    manager (StandardCheckpointHandler to "state", on the first save or restore), so the "state"
    folder is read with orbax's PyTreeCheckpointHandler directly: StandardCheckpointHandler wraps
    it, so the format is the same, and its `partial_restore` reads only the leaves in the target.
    """
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_part)  # target shardings
    args = ocp.args.PyTreeRestore(abstract_part, restore_args=restore_args, partial_restore=True)
    reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        return reader.restore(state_dir, args=args)
    finally:
        reader.close()


def _check_has_shardings(abstract_state: PyTree) -> None:
    leaves = jax.tree_util.tree_leaves_with_path(abstract_state)
    missing = [jax.tree_util.keystr(path) for path, leaf in leaves if getattr(leaf, "sharding", None) is None]
    if missing:
        raise ValueError(
            f"restore needs a target sharding on every leaf of abstract_state; none on {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}. Build it with abstract_like(state) or "
            f"jax.ShapeDtypeStruct(shape, dtype, sharding=...)."
        )


def _short(error: Exception, limit: int = 400) -> str:
    """`Type: message` of the innermost cause (the outer errors of orbax/tensorstore only say that
    reading failed), cut short: tensorstore errors append kilobytes of JSON spec."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[:limit] + " ..."
