"""Where a run's files live: a local folder or a Cloud Storage bucket (`gs://bucket/...`), behind one path
type, `etils.epath.Path` (orbax's too). Every path a user may point at a bucket (--out_dir, a run given to
--init_from, sample / evaluate / export / plot, export's --to, --hellaswag_data) goes through `run_path`.

`--data` too, in its own way: token shards are memory-mapped, so a dataset in a bucket is fetched shard by
shard into a local cache folder of each host (`gpt2_jax.data.remote`).

Object stores have no append and no rename: files that grow (metrics.jsonl, TensorBoard events) are written
locally and copied whole (metrics.MetricsLogger); an object appears complete when its upload finishes, so
no temporary name is needed there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import uuid
from pathlib import Path

from etils import epath

GCS_EXTRA = 'pip install "gpt2-jax[gcs]"'
# Seconds the start-up probe of a bucket may take (gcsfs retries a refused connection 6 times, ~33 s; see
# `check_writable`). Raise it with GPT2_JAX_STORAGE_TIMEOUT on a slow link.
PROBE_TIMEOUT_S = 15.0


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (gs://...) rather than a local path."""
    return "://" in os.fspath(path)


def run_path(text: str | os.PathLike) -> epath.Path:
    """`text` as an epath.Path: gs://bucket/... through gcsfs, anything else a local path (`~` expanded).

    (`pathlib.Path("gs://b/x")` is the local `gs:/b/x`: a run would quietly write to a folder named `gs:`.)
    Raises ImportError naming the extra to install when gcsfs is missing; epath itself would only say
    "Please install gcsfs to access Google Storage", at the first file operation."""
    text = os.fspath(text)
    if text.startswith("gs://"):
        try:
            import gcsfs  # noqa: F401, PLC0415 -- the gcs extra: only whether it is installed, for gs:// paths
        except ImportError as e:
            raise ImportError(f"{text} is in Cloud Storage, which needs gcsfs: {GCS_EXTRA}") from e
        return epath.Path(text)
    if is_remote(text):
        raise ValueError(f"{text}: only local paths and gs:// buckets are supported")
    return epath.Path(os.path.expanduser(text))


def bucket_of(path: str | os.PathLike) -> str:
    """`gs://bucket/a/b` -> `bucket`."""
    return os.fspath(path).split("://", 1)[1].split("/", 1)[0]


def cache_dir(env=None) -> Path:
    """This machine's cache folder, from `env` (default: os.environ): $GPT2_JAX_CACHE, else
    $XDG_CACHE_HOME/gpt2_jax, else ~/.cache/gpt2_jax. The one rule: the compile cache, the bundled corpus
    of bucket runs and HellaSwag's download all live under it."""
    env = os.environ if env is None else env
    if env.get("GPT2_JAX_CACHE"):
        return Path(env["GPT2_JAX_CACHE"]).expanduser()
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(env.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")).expanduser() / "gpt2_jax"


def local_folder_for(remote: str | os.PathLike, what: str) -> Path:
    """A local folder for `what` that belongs to the remote folder `remote`: the same path every time (a
    resumed run finds it again), a different one for each remote folder."""
    key = hashlib.sha256(os.fspath(remote).encode()).hexdigest()[:16]
    return cache_dir() / what / f"{bucket_of(remote)}-{key}"


def check_writable(folder: epath.Path, flag: str, timeout: float | None = None) -> None:
    """Fail fast, before anything compiles, if the remote `folder` can't be written: no network, no bucket,
    no credentials. Writes and deletes a small probe object; raises OSError naming the flag, the bucket and the
    cause (`probe_bucket`). A local folder: nothing to do here."""
    if not is_remote(folder):
        return

    def write_probe():
        # No mkdir: GCS folders are implicit, and gcsfs's makedirs would create a missing bucket.
        probe_file = folder / f".gpt2_jax-probe-{uuid.uuid4().hex[:8]}"
        probe_file.write_text("ok")
        probe_file.unlink()

    probe_bucket(folder, flag, write_probe, "writing a probe object", timeout)


def check_readable(path: str | os.PathLike | None, flag: str, timeout: float | None = None) -> None:
    """The same for a remote path a flag reads (--data, --init_from, --hellaswag_data, a tool's run folder): one
    look-up of it, within the same time budget, so that an unreachable bucket is one line naming the flag
    instead of a minute of gcsfs retries. Whether it exists is for the reader to say; None, "" and local
    paths: nothing to do."""
    if not path or not is_remote(path):
        return
    remote = run_path(path)
    probe_bucket(remote, flag, remote.exists, "looking it up", timeout)


def probe_bucket(path: epath.Path, flag: str, probe, doing: str, timeout: float | None = None) -> None:
    """Run `probe()` (a first request to the bucket of `path`) in a thread; raise if it fails or takes more
    than `timeout` seconds (PROBE_TIMEOUT_S, or $GPT2_JAX_STORAGE_TIMEOUT): TimeoutError or OSError, one
    line naming the flag, the bucket, the cause and what to check.

    gcsfs retries a failed request 6 times with backoff 1, 2, 4, 8, 16 s (`GCSFileSystem.retries`, fixed when
    the class is defined), so an unreachable endpoint takes ~33 s to fail inside gcsfs; the probe gives up
    sooner, reporting the last error gcsfs retried on (it logs each one)."""
    timeout = timeout or float(os.environ.get("GPT2_JAX_STORAGE_TIMEOUT", PROBE_TIMEOUT_S))
    where = f"{flag}={path} (bucket {bucket_of(path)!r})"
    retried, logger = _LastError(), logging.getLogger("gcsfs")
    saved = logger.level, logger.propagate
    logger.addHandler(retried)  # gcsfs logs each retried error at DEBUG: keep the last, print none
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    outcome: list[BaseException | None] = []

    def run():
        try:
            probe()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001  (any failure, even an exit: reported by the caller's thread)
            outcome.append(e)

    thread = threading.Thread(target=run, name="storage-probe", daemon=True)
    try:
        thread.start()
        thread.join(timeout)
    finally:
        logger.removeHandler(retried)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    if not outcome:
        cause = f"; the last error was: {retried.message}" if retried.message else ""
        raise TimeoutError(f"cannot reach {where}: {doing} took more than {timeout:.0f} s{cause}. Check the "
                           "network, the bucket name and the credentials (gcloud auth application-default login, "
                           "or the VM's service account)")
    if outcome[0] is not None:
        e = outcome[0]
        missing = " (no such bucket?)" if isinstance(e, FileNotFoundError) else ""
        verb = "write to" if doing.startswith("writing") else "read"
        raise OSError(f"cannot {verb} {where}{missing}: {type(e).__name__}: {str(e)[:300]}. Check the bucket "
                      f"name, and that the credentials may {verb.split()[0]} there") from e


def probe_folder(folder: str | os.PathLike) -> None:
    """Make a local folder if missing and check that it can be written (a probe file is written and removed);
    raises the OSError of the step that failed (FileExistsError where a file is in the way)."""
    os.makedirs(folder, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".gpt2_jax-probe-")
    os.close(fd)
    os.unlink(probe)


def results_file(text: str | os.PathLike, flag: str) -> epath.Path:
    """The file a CLI will write its results to (`flag`, e.g. --out), checked before any work, so that an
    evaluation never runs to its end and then loses the results: not a folder, its folder made if missing,
    and writable (a probe file is written and removed; a bucket: `check_writable`). Raises OSError naming
    the flag and what to do."""
    path = run_path(text)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder; pass a file name in it, e.g. {path / 'results.json'}")
    if is_remote(path):
        check_writable(path.parent, flag)
        return path
    try:
        probe_folder(path.parent)
    except OSError as e:
        raise type(e)(f"{flag} {path}: cannot write in {path.parent} ({e.strerror or e}); pass a path in a "
                      "folder you may write to") from None
    return path


class _LastError(logging.Handler):
    """Keeps the message of the last exception gcsfs logged (it logs each retry at DEBUG)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.message = ""

    def emit(self, record: logging.LogRecord) -> None:
        if "exception" in record.getMessage():
            self.message = record.getMessage()[-300:]
