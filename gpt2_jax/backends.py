"""Which JAX backend a command runs on, decided before JAX starts: --platform -> JAX_PLATFORMS, whether this
machine shows a GPU or TPU (device files, no plugin loaded), whether JAX's support for it is installed, and
the one-line answer when it cannot run. train.py (through launch.start_jax) and the tools (sample, evaluate,
export, plot: pin_platform) follow the same rules.

Without --platform, a machine where no GPU or TPU is visible runs on the CPU outright (JAX_PLATFORMS=cpu):
JAX would otherwise try every installed plugin first, and the CUDA plugin and libtpu print tracebacks and
warnings about hardware that is not there (a newcomer reads that as a broken install).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

PLATFORMS = ("cpu", "gpu", "tpu")  # --platform, in every CLI
PLATFORM_HELP = "JAX backend: cpu | gpu | tpu (empty: the GPU or TPU this machine has, else the CPU)"  # every CLI's
JAX_PLATFORMS = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}  # --platform (PLATFORMS) -> JAX_PLATFORMS
INSTALL_HINT = {"gpu": 'pip install "gpt2-jax[gpu]"  (JAX with CUDA)', "tpu": 'pip install "gpt2-jax[tpu]"'}
# Device files of the accelerators JAX can use, by --platform: NVIDIA GPUs; TPU chips (v2-v4 and v5p:
# /dev/accel*; v5e and v6e: VFIO groups).
DEVICE_FILES = {"gpu": ("/dev/nvidia[0-9]*",), "tpu": ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")}
ACCELERATOR_DEVICES = DEVICE_FILES["gpu"] + DEVICE_FILES["tpu"]
# The modules that give JAX a backend, by --platform: the CUDA plugin (12 or 13, as a jax_plugins entry or the
# older top-level package); libtpu.
PLUGINS = {"gpu": ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12", "jax_cuda13_plugin", "jax_cuda12_plugin"),
           "tpu": ("libtpu",)}


def has_accelerator(platform: str | None = None) -> bool:
    """Whether this machine shows a GPU or TPU device file (`platform`: of that kind only; a cheap look: no
    plugin is loaded)."""
    return any(glob.glob(pattern) for pattern in DEVICE_FILES.get(platform, ACCELERATOR_DEVICES))


def has_plugin(platform: str) -> bool:
    """Whether JAX's backend for --platform=`platform` is installed (found, not imported)."""
    for name in PLUGINS.get(platform, ()):
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):  # a parent package that is missing or broken
            continue
    return False


def missing_backend(platform: str) -> str | None:
    """Why --platform=`platform` cannot run here, in one line with what to do, before JAX starts (None: it may).
    No device file: no plugin is loaded to look (libtpu would ask the cloud metadata server, then fail on
    `coordinator_address`), and the message does not ask to install what is installed."""
    if platform not in DEVICE_FILES or has_accelerator(platform):
        return None
    name, files = platform.upper(), " or ".join(DEVICE_FILES[platform])
    if has_plugin(platform):
        return (f"--platform={platform}: no {name} is visible on this machine (no {files}), although JAX's "
                f"{name} support is installed; run on a machine with a {name} attached, or leave out --platform "
                "to run on the CPU")
    return (f"--platform={platform}: no {name} is visible on this machine (no {files}), and JAX's {name} support "
            f"is not installed; on a {name} machine: {INSTALL_HINT[platform]}")


def cpu_if_no_accelerator(env) -> None:
    """Set JAX_PLATFORMS=cpu in `env` (a dict or os.environ) where none is set and no GPU or TPU is visible, so
    that no plugin probes hardware that is not there (train.py without --platform; the planner's local target)."""
    if "JAX_PLATFORMS" not in env and not has_accelerator():
        env["JAX_PLATFORMS"] = "cpu"


def add_platform_flag(parser) -> None:
    """train.py's --platform on a tool's parser (sample, evaluate, export, plot), with the same help."""
    parser.add_argument("--platform", default="", choices=("", *PLATFORMS), metavar="|".join(PLATFORMS),
                        help=PLATFORM_HELP)


def pin_platform(platform: str) -> str | None:
    """Pin JAX to --platform=`platform` before its backend starts, as train.py does; the tools' version of
    start_jax. Returns None, or why it cannot run here in one line (no such device, or what to install).
    Without --platform, a machine where no GPU or TPU is visible runs on the CPU, quietly (no plugin probes
    hardware that is not there)."""
    if problem := missing_backend(platform):
        return problem
    if platform:
        os.environ["JAX_PLATFORMS"] = JAX_PLATFORMS[platform]
    else:
        cpu_if_no_accelerator(os.environ)
    if "jax" in sys.modules and "JAX_PLATFORMS" in os.environ:  # imported, but no backend started yet
        sys.modules["jax"].config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
    return None
