"""Before JAX starts: the backend, JAX's environment (the compile cache, the GPU XLA flags) and the other
processes of a multi-host run. JAX and XLA read their settings when they start, so train.py calls
`start_jax` before anything imports JAX.

Which backend, and what to say when it cannot run here: backends.py (the tools share it).
"""

from __future__ import annotations

import os
import re
import sys

from gpt2_jax.backends import INSTALL_HINT, JAX_PLATFORMS, has_accelerator, has_plugin, pin_platform
from gpt2_jax.training.settings import TrainConfig

# XLA flags for NVIDIA GPUs, set by train.py --platform=gpu (and by `python -m gpt2_jax.plan` for GPU targets, so
# that the plan is the program that runs) unless XLA_FLAGS is already set. Each one was checked to exist in the
# jaxlib 0.10.2 CUDA plugin: XLA stops at start with "Unknown flag in XLA_FLAGS" otherwise.
GPU_XLA_FLAGS = (
    # Schedule the program so that collectives (data-parallel all-reduce, FSDP all-gather / reduce-scatter) run
    # while compute proceeds; JAX's GPU performance tips and NVIDIA's JAX containers set it.
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    # Matmuls on cuBLAS(Lt) instead of Triton-generated kernels: the plain GEMMs of a transformer are cuBLAS's
    # home ground, and autotuning Triton configurations for each one lengthens every compile.
    "--xla_gpu_enable_triton_gemm=false",
    # Give the streams that carry those collectives the highest priority, so that they are not queued behind
    # compute kernels (JAX's GPU performance tips).
    "--xla_gpu_enable_highest_priority_async_stream=true",
)

# XLA:CPU aborts a program (SIGABRT, no Python message) when its devices do not all reach a collective within 40 s.
# Several fake CPU devices share the host's cores, and on a loaded machine their threads fall that far apart
# without anything being wrong: a CPU run with several devices allows 10 minutes, unless the user set the flag.
CPU_COLLECTIVE_TIMEOUT = "xla_cpu_collective_call_terminate_timeout_seconds"
CPU_COLLECTIVE_TIMEOUT_FLAG = f"--{CPU_COLLECTIVE_TIMEOUT}=600"

# Programs that compile faster than this are not written to the compile cache. JAX's default (1 s) leaves out
# most of the CPU default run's programs (eval, sampling, the data pipeline's small jits: 0.1-0.9 s each).
CACHE_MIN_COMPILE_SECS = "0.1"


def jax_environment(config: TrainConfig, env) -> tuple[dict, list[str]]:
    """The environment JAX should start in, from `env` (left unchanged), and a log line per decision.

    JAX_PLATFORMS from --platform; the persistent compile cache (JAX_COMPILATION_CACHE_DIR: --compile_cache=DIR,
    else the user's own variable, else the default folder; --compile_cache=off disables it); XLA_FLAGS for
    --platform=gpu: the recommended GPU flags, unless the user set XLA_FLAGS (even empty) themselves.
    """
    from gpt2_jax.storage import cache_dir  # noqa: PLC0415 -- after the flags are checked: etils is not light

    env, notes = dict(env), []
    if config.platform:
        env["JAX_PLATFORMS"] = JAX_PLATFORMS[config.platform]
    if config.compile_cache == "off":
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
        notes.append("compile cache: off (--compile_cache=off)")
    else:
        if config.compile_cache:
            env["JAX_COMPILATION_CACHE_DIR"], source = config.compile_cache, "--compile_cache"
            env["JAX_ENABLE_COMPILATION_CACHE"] = "true"
        elif env.get("JAX_COMPILATION_CACHE_DIR"):
            source = "JAX_COMPILATION_CACHE_DIR in the environment"
        else:
            env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(cache_dir(env), "jax-compile")
            source = "the default; --compile_cache=off disables it"
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", CACHE_MIN_COMPILE_SECS)
        if env.get("JAX_ENABLE_COMPILATION_CACHE", "true").lower() in ("0", "false"):
            notes.append("compile cache: off (JAX_ENABLE_COMPILATION_CACHE in the environment)")
        else:
            notes.append(f"compile cache: {env['JAX_COMPILATION_CACHE_DIR']} ({source})")
    if config.platform == "gpu":
        if "XLA_FLAGS" in env:
            notes.append(f"XLA_FLAGS={env['XLA_FLAGS']!r} from the environment; the recommended GPU flags "
                         f"(gpt2_jax.launch.GPU_XLA_FLAGS) are not added")
        else:
            env["XLA_FLAGS"] = " ".join(GPU_XLA_FLAGS)
            notes.append(f"XLA_FLAGS={env['XLA_FLAGS']!r}: the recommended GPU flags (set XLA_FLAGS to replace them)")
    if several_cpu_devices(config, env) and CPU_COLLECTIVE_TIMEOUT not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {CPU_COLLECTIVE_TIMEOUT_FLAG}".strip()
        notes.append(f"XLA_FLAGS += {CPU_COLLECTIVE_TIMEOUT_FLAG}: several CPU devices share this host's cores, so a "
                     f"collective may wait for a slow one (XLA's default: abort after 40 s)")
    return env, notes


def several_cpu_devices(config: TrainConfig, env) -> bool:
    """Whether the run is on the CPU with several devices: fake ones (--local_device_count, XLA's
    --xla_force_host_platform_device_count) or several processes."""
    on_cpu = config.platform == "cpu" or (not config.platform and env.get("JAX_PLATFORMS", "") in ("", "cpu")
                                          and not has_accelerator())
    forced = re.search(r"xla_force_host_platform_device_count=(\d+)", env.get("XLA_FLAGS", ""))
    return on_cpu and (config.local_device_count > 1 or config.num_processes > 1
                       or (forced is not None and int(forced.group(1)) > 1))


def check_compile_cache(config: TrainConfig, env: dict, notes: list[str]) -> None:
    """JAX turns its cache off without a word where the folder cannot be written. --compile_cache=DIR: a
    ValueError (a bad flag); the default folder or the user's variable: the cache off, and a warning in place
    of jax_environment's note."""
    folder = env.get("JAX_COMPILATION_CACHE_DIR")
    enabled = env.get("JAX_ENABLE_COMPILATION_CACHE", "true").lower() not in ("0", "false")
    if not (enabled and folder) or not (problem := unusable_folder(folder)):
        return
    if config.compile_cache:
        raise ValueError(f"--compile_cache={folder} {problem}; pass a folder you may write to, or --compile_cache=off")
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    notes[:] = [n for n in notes if not n.startswith("compile cache:")] + [
        f"warning: compile cache: off: {folder} {problem}, so every program is compiled anew; pass "
        "--compile_cache=DIR with a folder you may write to"]


def unusable_folder(folder: str) -> str | None:
    """Why a local cache folder cannot be used (made if missing, then written), as the end of a sentence; None
    if it can. A remote one (gs://, which JAX's cache also takes) is not checked here."""
    from gpt2_jax.storage import probe_folder  # noqa: PLC0415 -- etils is not light

    if "://" in folder:
        return None
    try:
        probe_folder(folder)
    except FileExistsError:
        return "is a file, not a folder"
    except OSError as e:
        return f"cannot be written ({e.strerror or e})"
    return None


def start_jax(config: TrainConfig) -> None:
    """Set JAX's environment (jax_environment), pin JAX to one backend and join the other processes, before any
    backend initialises; exit with what to install if the backend is missing."""
    if problem := pin_platform(config.platform):  # the tools' rule too: JAX_PLATFORMS, or the CPU without a device
        sys.exit(problem)
    env, notes = jax_environment(config, os.environ)
    try:
        check_compile_cache(config, env, notes)
    except ValueError as e:  # a bad --compile_cache: a bad flag
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    os.environ.update(env)
    for note in notes:
        print(note, file=sys.stderr if note.startswith("warning:") else sys.stdout, flush=True)
    import jax  # noqa: PLC0415 -- only once the environment JAX reads at import is set

    init_distributed(config)
    try:
        jax.devices()
    except Exception as e:  # RuntimeError, or an AssertionError from some JAX versions
        if not config.platform:
            raise
        hint = "" if has_plugin(config.platform) else f"; install it: {INSTALL_HINT.get(config.platform)}"
        sys.exit(f"--platform={config.platform}: JAX found no {JAX_PLATFORMS[config.platform]} device "
                 f"({type(e).__name__}: {str(e)[:300]}){hint}")


def init_distributed(tc: TrainConfig) -> None:
    """Fake CPU devices and jax.distributed: must run before any JAX backend initialises.

    --distributed=auto joins the other processes on TPU (a Cloud TPU VM finds its pod's hosts itself,
    through the metadata server; on one host it is a no-op JAX recommends anyway) and where
    TPU_WORKER_HOSTNAMES lists several hosts (GKE). --distributed=true: SLURM and Open MPI clusters
    describe themselves; elsewhere pass --coordinator_address, --num_processes and --process_id.
    """
    import jax  # noqa: PLC0415 -- only once the environment JAX reads at import is set

    if tc.local_device_count:
        jax.config.update("jax_num_cpu_devices", tc.local_device_count)
    tpu_hosts = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if tc.distributed == "false" or (tc.distributed == "auto" and not (tc.platform == "tpu" or tpu_hosts)):
        return
    if tc.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(tc.coordinator_address, num_processes=tc.num_processes, process_id=tc.process_id)
    else:
        jax.distributed.initialize()
