"""The devices of a target, compile-only for a GPU or TPU that need not be attached (JAX's deviceless
topologies), or the attached ones, and the memory budget of each."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from gpt2_jax.plan.hardware import (
    DEFAULT_MEM_FRACTION,
    TARGETS_DIR,
    TPU_HBM_GIB,
    Target,
    TargetSpec,
    gib,
    require_extra,
)
from gpt2_jax.plan.hlo import _parse_exhausted


def load_target(spec: TargetSpec) -> Target:
    """The devices of `spec` (compile-only for GPU/TPU targets) and their memory."""
    if spec.platform == "gpu":
        require_extra(spec)
        text = (TARGETS_DIR / spec.gpu_file).read_text()
        topo = topologies.get_topology_desc(platform="cuda", target_config=text, topology="1x1x1")
        memory = int(re.search(r"device_memory_size:\s*(\d+)", text).group(1))
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_MEM_FRACTION))
        note = f"{fraction:.0%} of {gib(memory)}: JAX's GPU pool (XLA_PYTHON_CLIENT_MEM_FRACTION={fraction:g})"
        return Target(spec, "gpu", list(topo.devices), memory, int(fraction * memory), note)
    if spec.platform == "tpu":
        require_extra(spec)
        # v4 and v5p chips have two TensorCores that JAX uses as one device ("megacore"), as on a TPU VM.
        extra = {"chip_config_name": "megacore"} if spec.generation == "v4" else {}
        topo = topologies.get_topology_desc(spec.topology, platform="tpu", **extra)
        memory = TPU_HBM_GIB[spec.generation] * 2**30
        if limit := compiler_hbm_limit(topo.devices[0]):
            return Target(spec, "tpu", list(topo.devices), memory, limit,
                          f"what libtpu allows per chip, of {gib(memory)} HBM")
        return Target(spec, "tpu", list(topo.devices), memory, memory, f"HBM per chip ({gib(memory)}); "
                      f"libtpu did not say what it allows")
    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    if "bytes_limit" in stats:
        memory, note = stats["bytes_limit"], "the allocator's limit on this device"
    else:  # CPU: host memory
        memory, note = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this host's RAM"
    return Target(spec, jax.default_backend(), devices, memory, memory, note)


def compiler_hbm_limit(device) -> int | None:
    """The bytes per chip that libtpu lets a program use (less than the HBM: v5e 15.75 of 16 GiB), read from
    its refusal of a program that no chip holds (256 GiB of temporaries; a refused compile takes ~1 s)."""
    n = 2**18  # (n, n) float32 = 256 GiB; the sort keeps XLA from fusing it away
    x = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))
    try:
        jax.jit(lambda x: jnp.sort(jnp.sin(jnp.outer(x, x)), axis=1)[:, :1]).lower(x).compile()
    except Exception as e:  # noqa: BLE001 -- the refusal is the answer; anything else: no figure
        return _parse_exhausted(str(e))[1] if "RESOURCE_EXHAUSTED" in str(e) else None
    return None
