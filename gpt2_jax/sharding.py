"""The device mesh and where every array lives on it: the only module that knows about the mesh.

Model code names logical axes (`embed`, `mlp`, `heads`, `vocab`, `layers`, `norm`); `RULES` maps them to
mesh axes. Mesh axes:
  data    pure data parallelism: params replicated, the batch split;
  fsdp    data parallelism with params and optimizer state split on their `embed` dim (ZeRO-3 style);
  tensor  Megatron's layout (Shoeybi et al. 2019, "Megatron-LM", section 3): the `mlp`/`heads`/`vocab`
          dims split, the batch replicated.
Switching strategy changes the mesh flag only (`--mesh=data:8`, `--mesh=data:2,fsdp:4`).

Tensor parallelism as in Megatron: c_fc and c_attn are split on their outputs (columns), mlp.c_proj and
attn.c_proj on their inputs (rows), so each device runs whole attention heads and its part of the MLP
with no communication inside a block, and the block's forward needs one all-reduce after each row-split
projection (the backward one more before each column-split one). For attention this needs the split to
fall on head boundaries of q, k and v alike. c_attn's fused q/k/v output is therefore stored unfolded as
(3, n_head, head_dim) with `heads` on the n_head dim (model.py; convert.py reshapes from and to HF's 3C):
split as one 3C dim, tensor:2 would give shard 0 all of q and half of k, and XLA reshuffles q/k/v every
step to get heads (data:4,tensor:2, 2 layers, measured with benchmarks/collectives.py: 8 all-to-alls +
4 collective-permutes per step before, none after; the all-reduces, 14, are the same). Storing the kernel
so was chosen over keeping HF's shape and resharding inside the model: a logical axis names one stored
dim, and no split of a (C, 3C) dim into contiguous blocks is a split by heads.

Keep `tensor` a divisor of n_head. A dim that the mesh axis does not divide stays replicated (correct,
only not split): for the vocabulary (50257) that costs memory only, but with n_head % tensor != 0 c_attn
is replicated while attn.c_proj's input dim (C) may still split, off head boundaries, and XLA reshards.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gpt2_jax import distributed

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dim is split over both data-parallel axes
RULES = {  # logical axis -> mesh axis (None: replicated)
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "vocab": "tensor",
    "layers": None,
    "norm": None,
}


def parse_mesh(spec: str, num_devices: int, allow_fewer: bool = False) -> dict[str, int]:
    """'data:2,fsdp:4' -> {'data': 2, 'fsdp': 4, 'tensor': 1}; '' -> every device on `data`.

    One axis may be -1 (or omitted size): it takes the remaining devices. With allow_fewer, a mesh
    may use only the first devices (e.g. data:1 on an 8-device host).
    """
    sizes = {a: 1 for a in MESH_AXES}
    if not spec:
        sizes["data"] = num_devices
        return sizes
    fill = None
    for part in spec.split(","):
        name, _, size = part.strip().partition(":")
        if name not in MESH_AXES:
            raise ValueError(f"--mesh={spec!r}: unknown axis {name!r}; axes are {MESH_AXES}, e.g. --mesh=data:2,fsdp:4")
        try:
            n = int(size) if size else -1
        except ValueError:
            raise ValueError(f"--mesh={spec!r}: size {size!r} of axis {name!r} is not an integer") from None
        if n == -1:
            fill = name
        elif n < 1:
            raise ValueError(f"--mesh={spec!r}: axis {name!r} has size {n}; sizes must be >= 1")
        sizes[name] = max(n, 1)
    used = math.prod(sizes.values())
    if fill is not None:
        if num_devices % used:
            raise ValueError(f"--mesh={spec!r}: {num_devices} devices cannot fill axis {fill!r}")
        sizes[fill] = num_devices // used
    if math.prod(sizes.values()) > num_devices or (not allow_fewer and math.prod(sizes.values()) != num_devices):
        raise ValueError(f"--mesh={spec!r} uses {math.prod(sizes.values())} devices but there are {num_devices}; "
                         f"the product of the axis sizes must equal the device count")
    return sizes


def make_mesh(spec: str = "", devices=None) -> Mesh:
    """The mesh of --mesh=`spec` over the attached devices (topology-aware order), or over `devices` (a
    target's, for the planner's deviceless compiles). A single process may use fewer devices than it has."""
    attached = devices is None
    devices = jax.devices() if attached else list(devices)
    sizes = parse_mesh(spec, len(devices), allow_fewer=jax.process_count() == 1)
    shape = tuple(sizes[a] for a in MESH_AXES)
    auto = (AxisType.Auto,) * len(MESH_AXES)  # shardings given at jit boundaries; XLA propagates inside
    if attached and math.prod(shape) == len(devices):
        return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=auto)  # topology-aware order
    return Mesh(np.asarray(devices[: math.prod(shape)]).reshape(shape), MESH_AXES, axis_types=auto)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def logical_to_spec(axes: tuple | None, shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for one array: each logical axis through RULES, replicated where the mesh axis
    has size 1 or does not divide the dimension (e.g. vocab 50257 over tensor:2)."""
    if not axes:
        return P()
    out = []
    for name, dim in zip(axes, shape, strict=True):
        mesh_axis = RULES.get(name) if name else None
        if mesh_axis is None or mesh.shape[mesh_axis] == 1 or dim % mesh.shape[mesh_axis]:
            out.append(None)
        else:
            out.append(mesh_axis)
    return P(*out)


def state_shardings(abstract_state, mesh: Mesh):
    """NamedShardings for an nnx.State whose Variables carry `out_sharding` logical axes (params and
    the optimizer's moment estimates alike); everything else is replicated."""

    def one(var):
        axes = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
        shape = var.shape if hasattr(var, "shape") else ()
        return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def with_shardings(abstract_state, shardings):
    """`abstract_state` (from nnx.eval_shape) with each Variable's value a ShapeDtypeStruct carrying its
    sharding from `shardings` (as `state_shardings` returns): the target of a restore."""
    return jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
                        abstract_state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
    """Split dimension `batch_dim` of a batch over the data-parallel axes; replicate the rest."""
    spec = [None] * ndim
    spec[batch_dim] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def mesh_batch_axes() -> tuple[str, ...]:
    """The batch axes (BATCH_AXES) of the mesh context set by `jax.sharding.use_abstract_mesh` (the train
    and eval steps set it while tracing) that are not manual; () where none is set: decoding, HellaSwag,
    unsharded tests."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    # Inside the train step's shard_map over `data` (each device's own gradient sums) that axis is manual: the
    # rows are already this replica's, and only the automatic axes are left to split them.
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names and a not in mesh.manual_axes)


def constrain_batch(x: jax.Array) -> jax.Array:
    """x with its leading (batch) dim split over the batch axes of the mesh context and the rest replicated;
    x unchanged where no mesh context is set.

    Sharding propagation alone may choose otherwise: at the token-embedding lookup it follows the table
    (split on `embed` over `fsdp`) instead of the ids, all-gathers the ids, and every chip then runs every
    block on the whole batch (FSDP measured 6.4x the temporaries of data parallelism on a v5e-8; issue 17).
    """
    axes = mesh_batch_axes()
    if not axes:
        return x
    return jax.lax.with_sharding_constraint(x, P(axes, *(None,) * (x.ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ---------------------------------------------------------------------------------------------------
# Evaluation: batches of rows split over the data axes, outside the trainer's jitted step.


def eval_mesh() -> Mesh | None:
    """Every device on the data axis (params replicated, rows split), or None on one device."""
    return make_mesh() if jax.device_count() > 1 else None


def _row_spec(mesh: Mesh) -> tuple[P, int]:
    """PartitionSpec that splits rows over the mesh's data-parallel axes, and the row multiple that needs."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    if not axes:
        raise ValueError(f"mesh axes {mesh.axis_names} include none of the batch axes {BATCH_AXES}")
    return P(axes), math.prod(mesh.shape[a] for a in axes)


def _on_mesh(state, mesh: Mesh):
    """Parameters already laid out on `mesh`'s devices and axes keep their layout (e.g. FSDP or tensor
    shards placed with sharding.state_shardings); the others are replicated over the mesh."""

    def place(x):
        s = getattr(x, "sharding", None)
        same_mesh = (isinstance(s, NamedSharding) and s.mesh.axis_names == mesh.axis_names
                     and s.mesh.devices.shape == mesh.devices.shape and (s.mesh.devices == mesh.devices).all())
        return jax.device_put(x, NamedSharding(mesh, s.spec if same_mesh else P()))

    return jax.tree.map(place, state)


def place_for_rows(state, mesh: Mesh | None, num_rows: int):
    """(state, row sharding, num_rows) for batches of `num_rows` rows: without a mesh, unchanged (the
    default device); with one, rows split over its batch axes (num_rows rounded up to a multiple of
    their size) and parameters not yet on the mesh replicated."""
    if mesh is None:
        return state, None, num_rows
    # The model leaves sharding to XLA's propagation, which needs Auto axes; jax.make_mesh's default
    # Explicit axes would make its embedding gather ambiguous. Same devices, so no data moves.
    mesh = mesh.update(axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    spec, multiple = _row_spec(mesh)
    return _on_mesh(state, mesh), NamedSharding(mesh, spec), -(-num_rows // multiple) * multiple


def run_on_rows(fn, graphdef, state, row_sharding, *arrays, vocab_limit: int) -> np.ndarray:
    """fn(graphdef, state, *arrays, vocab_limit) on host arrays split by rows; the result as float64 numpy."""
    if row_sharding is not None:  # global arrays split by rows; every process holds the whole batch
        arrays = [jax.make_array_from_callback(a.shape, row_sharding, lambda idx, a=a: a[idx]) for a in arrays]
    out = distributed.gather_rows(fn(graphdef, state, *arrays, vocab_limit))  # multi-host: every row on each
    return np.asarray(out, dtype=np.float64)


