"""Targets: what `--target` names (a GPU from its description file in gpt2_jax/targets/, a TPU slice from
libtpu's topology names, or the attached devices), the devices to compile for, and their memory budget.
No JAX here: the devices of a target are loaded by devices.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

TARGETS_DIR = Path(__file__).resolve().parents[1] / "targets"
GPU_TARGETS = {"h100": "h100.txtpb", "h200": "h200.txtpb", "a100": "a100.txtpb"}  # A100 = the 80 GB SXM4
# TPU generations: HBM per chip (GiB, datasheets; the budget is what the compiler allows, see
# devices.compiler_hbm_limit: libtpu 0.0.42 allows v5e 15.75, v4 30.75, v5p 95.74, v6e 31.25 GiB) and whether the
# `-N` of a slice name counts TensorCores (v4, v5p: two per chip, one JAX device per chip in "megacore" mode) or
# chips (v5e, v6e).
TPU_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
TPU_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
# chips -> libtpu topology: v5e/v6e slices are 2-D tori, v4/v5p 3-D (checked against libtpu 0.0.42).
TPU_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
TPU_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
          512: "8x8x8"}
DEFAULT_MEM_FRACTION = 0.75  # JAX's GPU allocator takes 75% of the memory unless told otherwise


# ---------------------------------------------------------------------------------------------------
# Bandwidths per chip, for the step-time floor (step_time.py). Datasheet peaks, in bytes/s; approximations: no
# chip has been measured here, and a real step reaches a fraction of them.
#
# Convention: `link` is what ONE chip can SEND per second over all its links together, in one direction: half the
# "bidirectional" total the vendors quote (a chip sends and receives at once). The collective bytes it is divided
# by are the bytes each chip sends (hlo.collective_sends), so the two agree. `hbm` is the HBM bandwidth per chip,
# reads and writes together.


@dataclasses.dataclass(frozen=True)
class ChipBandwidth:
    hbm: float  # bytes/s
    link: float  # bytes/s one chip sends over its chip-to-chip links together (per direction)
    link_name: str
    source: str


# Sources (vendor datasheets and Cloud TPU system-architecture pages):
#   H100 SXM: NVIDIA H100 Tensor Core GPU datasheet: HBM3 3.35 TB/s; NVLink 4, 900 GB/s bidirectional (18 links).
#   H200 SXM: NVIDIA H200 Tensor Core GPU datasheet: HBM3e 4.8 TB/s; NVLink 4, 900 GB/s bidirectional.
#   A100 80GB SXM4: NVIDIA A100 datasheet: HBM2e 2,039 GB/s; NVLink 3, 600 GB/s bidirectional (12 links).
#   TPU v4: cloud.google.com/tpu/docs/v4: HBM2 1200 GBps. The page gives no ICI figure per chip: 6 ICI links (3-D
#     torus) at about 50 GB/s each way (400 Gbps; the TPU v4 paper, Jouppi et al., ISCA 2023): ~300 GB/s per
#     direction, ~600 GB/s bidirectional. The least certain figure here.
#   TPU v5e: cloud.google.com/tpu/docs/v5e: HBM2 819 GBps; ICI 400 GBps bidirectional per chip (4 ports).
#   TPU v5p: cloud.google.com/tpu/docs/v5p: HBM2e 2765 GBps; ICI 1200 GBps bidirectional per chip (4800 Gbps).
#   TPU v6e: cloud.google.com/tpu/docs/v6e: HBM 1638 GBps (~1.64 TB/s); ICI 800 GBps bidirectional per chip
#     (4 ports).
CHIP_BANDWIDTH: dict[str, ChipBandwidth] = {
    "h100": ChipBandwidth(3.35e12, 450e9, "NVLink 4", "NVIDIA H100 SXM datasheet (HBM3 3.35 TB/s, NVLink 900 GB/s "
                          "bidirectional)"),
    "h200": ChipBandwidth(4.8e12, 450e9, "NVLink 4", "NVIDIA H200 SXM datasheet (HBM3e 4.8 TB/s, NVLink 900 GB/s "
                          "bidirectional)"),
    "a100": ChipBandwidth(2.039e12, 300e9, "NVLink 3", "NVIDIA A100 80GB SXM4 datasheet (HBM2e 2,039 GB/s, NVLink "
                          "600 GB/s bidirectional)"),
    "v4": ChipBandwidth(1.2e12, 300e9, "ICI", "Cloud TPU v4 page (HBM2 1200 GBps); ICI ~600 GB/s bidirectional: 6 "
                        "links x ~50 GB/s each way (TPU v4 paper, ISCA 2023), approximate"),
    "v5e": ChipBandwidth(819e9, 200e9, "ICI", "Cloud TPU v5e page (HBM2 819 GBps, ICI 400 GBps bidirectional)"),
    "v5p": ChipBandwidth(2.765e12, 600e9, "ICI", "Cloud TPU v5p page (HBM2e 2765 GBps, ICI 1200 GBps "
                         "bidirectional)"),
    "v6e": ChipBandwidth(1.638e12, 400e9, "ICI", "Cloud TPU v6e page (HBM 1638 GBps, ICI 800 GBps bidirectional)"),
}
# An attached device's kind (lower case) -> CHIP_BANDWIDTH key, for --target=local; first match wins. H100 PCIe and
# the 40 GB A100 have other bandwidths, and no entry.
_LOCAL_CHIPS = [(r"h200", "h200"), (r"h100(?!.*pcie)", "h100"), (r"a100.*80", "a100"), (r"tpu\s*v4\b", "v4"),
                (r"tpu\s*v5\s*(lite|e)\b", "v5e"), (r"tpu\s*v5\s*p?\b", "v5p"), (r"tpu\s*v6\s*(lite|e)\b", "v6e")]


def chip_of(spec: TargetSpec, device_kind: str) -> str:
    """The CHIP_BANDWIDTH key of a target's chips ("" if none is known): the GPU or TPU generation it names, or
    for --target=local the attached device's kind."""
    if spec.platform == "gpu":
        return {f: k for k, f in GPU_TARGETS.items()}[spec.gpu_file]
    if spec.platform == "tpu":
        return spec.generation
    kind = device_kind.lower()
    return next((key for pattern, key in _LOCAL_CHIPS if re.search(pattern, kind)), "")


class MissingExtra(RuntimeError):
    """The GPU plugin or libtpu is not installed."""


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A --target value, parsed without importing JAX: which platform, and how to get its devices."""

    name: str
    platform: str  # "gpu" | "tpu" | "local"
    gpu_file: str = ""  # gpu: the target description file
    topology: str = ""  # tpu: libtpu topology name, e.g. "v5e:2x4"
    generation: str = ""  # tpu: v4 | v5e | v5p | v6e

    @property
    def deviceless(self) -> bool:
        return self.platform in ("gpu", "tpu")


def parse_target(name: str) -> TargetSpec:
    """'h100' | 'h200' | 'a100' | '<gen>-<N>' TPU slice (v4-8, v5e-8, v5p-16, v6e-8) | 'v5e:2x4' | 'local'."""
    key = name.lower().strip()
    if key == "local":
        return TargetSpec(name, "local")
    if key in GPU_TARGETS:
        return TargetSpec(name, "gpu", gpu_file=GPU_TARGETS[key])
    gens = "|".join(TPU_HBM_GIB)
    if m := re.fullmatch(rf"({gens}):(\d+(?:x\d+)+)", key):  # a libtpu topology name as is
        return TargetSpec(name, "tpu", topology=key, generation=m.group(1))
    if m := re.fullmatch(rf"({gens})-(\d+)", key):
        gen, n = m.group(1), int(m.group(2))
        chips, rest = divmod(n, TPU_CORES_PER_CHIP[gen])
        table = TPU_3D if TPU_CORES_PER_CHIP[gen] == 2 else TPU_2D
        if rest or chips not in table:
            sizes = ", ".join(f"{gen}-{c * TPU_CORES_PER_CHIP[gen]}" for c in table)
            raise ValueError(f"--target={name}: no {gen} slice of {n}; known sizes: {sizes} (or give a libtpu "
                             f"topology such as {gen}:{next(iter(table.values()))})")
        return TargetSpec(name, "tpu", topology=f"{gen}:{table[chips]}", generation=gen)
    raise ValueError(f"--target={name!r} is unknown; use one of {', '.join(GPU_TARGETS)}, a TPU slice "
                     f"<gen>-<N> with gen in {', '.join(TPU_HBM_GIB)} (e.g. v5e-8, v5p-16), or local")


@dataclasses.dataclass
class Target:
    spec: TargetSpec
    platform: str  # what the program is compiled for: "gpu" | "tpu" | "cpu"
    devices: list
    memory_bytes: int  # per device
    budget_bytes: int  # what one program may use per device
    budget_note: str

    @property
    def kind(self) -> str:
        return self.devices[0].device_kind


def missing_extra(spec: TargetSpec) -> str:
    """Why `spec` cannot be compiled for in this environment ("" if it can)."""
    def installed(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is missing
            return False

    if spec.platform == "gpu" and not installed("jax_plugins.xla_cuda13"):
        what = "JAX's CUDA plugin (jax[cuda13], ~4.4 GB)"
    elif spec.platform == "tpu" and not installed("libtpu"):
        what = "libtpu (jax[tpu])"
    else:
        return ""
    return (f"--target={spec.name} needs {what}, which is not installed; install the plan extra: "
            f"pip install -e '.[plan]'")


def require_extra(spec: TargetSpec) -> None:
    if why := missing_extra(spec):
        raise MissingExtra(why)


def gib(b) -> str:
    return f"{b / 2**30:.2f} GiB"
