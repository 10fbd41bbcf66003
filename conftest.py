"""Session-wide test setup, before any test module initialises JAX: 8 fake CPU devices, so that
multi-device code (meshes, shardings, collectives) is tested on a plain CPU machine."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
