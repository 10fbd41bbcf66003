"""The multi-process helpers: the only place that knows a run may span several JAX processes (the hosts of
a pod, or several CPU processes in the tests). Each is a collective where it says so: every process must
call it, in the same order. In a single-process run each is a plain local operation.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding


def is_primary() -> bool:
    """Process 0: the one that prints, writes config.json and plots."""
    return jax.process_index() == 0


def log(msg: str) -> None:
    """Print once per run (on process 0)."""
    if is_primary():
        print(msg, flush=True)


def broadcast_from_primary(value: Any) -> Any:
    """Process 0's `value` (anything JSON can hold) on every process. A collective. Decisions taken from a
    listing, a file or a clock go through it, so that the processes of one run never go different ways."""
    if jax.process_count() == 1:
        return value
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
    data = multihost_utils.broadcast_one_to_all(data if is_primary() else np.zeros(size, np.uint8))
    return json.loads(np.asarray(data, np.uint8).tobytes())


def all_ok(ok: bool) -> bool:
    """True iff `ok` on every process. A collective."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


def max_over_processes(value: int) -> int:
    """The largest of the processes' `value`s. A collective."""
    if jax.process_count() == 1:
        return value
    return int(np.max(multihost_utils.process_allgather(np.array(value, np.int32))))


def sync(name: str) -> None:
    """Wait until every process gets here. A collective."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def global_batch(local: np.ndarray, sharding: NamedSharding, batch_dim: int = 0) -> jax.Array:
    """The global array whose `batch_dim` is split over the processes, from this process's rows of it."""
    shape = list(local.shape)
    shape[batch_dim] *= jax.process_count()
    return jax.make_array_from_process_local_data(sharding, local, tuple(shape))


def gather_rows(out: jax.Array) -> jax.Array:
    """An array split by rows over several hosts, whole on each process (unchanged where it is addressable)."""
    if out.is_fully_addressable:
        return out
    return multihost_utils.process_allgather(out, tiled=True)
