"""One trainer per run folder: a lock on --out_dir, taken when a run starts and released when it ends.

Two trainers on one folder would delete each other's checkpoints (a save removes every checkpoint at or
after its own step), so the second one stops at once, naming the holder (host, pid, start time).

- A local folder: `out_dir/.lock`, held with `fcntl.flock`. The kernel drops the lock when its process
  dies (`kill -9` included), so a lock file whose lock is free was left by a dead process: it is taken over,
  and the takeover is logged. The file records the holder as JSON, for the message.
- A bucket (gs://): the object `out_dir/.lock`, created only if absent (a generation precondition,
  `if_generation_match=0`, so that of two starts exactly one wins). It holds an expiry time that a
  heartbeat thread renews every LEASE_S / 4 seconds; each renewal is conditional on the generation this run
  wrote last, so a run that lost its lock finds out (`check`, at each checkpoint) instead of writing on.
  A lock whose expiry has passed, or whose holder was a process of this host that is gone, is taken over.

A multi-process run holds one lock, through process 0; the others follow its outcome.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time

from etils import epath

from gpt2_jax.distributed import broadcast_from_primary, is_primary, log
from gpt2_jax.storage import GCS_EXTRA, bucket_of, is_remote

LOCK_FILE = ".lock"
# Seconds a bucket lock stays valid without a renewal: how long a run killed on one host keeps another
# host from taking its folder (a restart on the same host takes it over at once). GPT2_JAX_LOCK_LEASE sets it.
LEASE_S = 300.0


class RunFolderBusy(OSError):
    """Another trainer holds the run folder (or took it over from this one)."""


def _holder() -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": now,
            "started_at": datetime.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds")}


def describe(info: dict) -> str:
    """`host H, pid P, started T`, from a lock's JSON (whatever part of it could be read)."""
    return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started "
            f"{info.get('started_at', '?')}")


def _parse(text: bytes | str) -> dict:
    try:
        info = json.loads(text or "{}")
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _gone_from_this_host(info: dict) -> bool:
    """Whether the holder ran on this host and its process no longer exists."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class LocalLock:
    """`folder/.lock` under fcntl.flock (see the module docstring)."""

    def __init__(self, folder: epath.Path):
        self.path = os.path.join(os.fspath(folder), LOCK_FILE)
        while True:  # until the file we lock is the one at `path` (a releasing holder unlinks it)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                info = _parse(os.pread(fd, 4096, 0))
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise RunFolderBusy(f"--out_dir={folder} is in use by another trainer ({describe(info)}); "
                                    "wait for it to end or stop it, or use another --out_dir") from None
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            os.close(fd)
        self.fd = fd
        old = _parse(os.pread(fd, 4096, 0))
        if old:
            log(f"{self.path}: taking over the lock of a trainer that is gone ({describe(old)})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)

    def check(self) -> None:
        """(A flock cannot be taken away.)"""

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # before unlocking: a waiting trainer then retries on a fresh file
        os.close(self.fd)
        self.fd = None


class BucketLock:
    """The object `folder/.lock` in Cloud Storage, leased and renewed (see the module docstring)."""

    def __init__(self, folder: epath.Path, lease_s: float | None = None):
        from google.api_core.exceptions import PreconditionFailed  # noqa: PLC0415 -- the gcs extra, for gs:// runs only
        from google.cloud import storage  # noqa: PLC0415 -- the gcs extra, for gs:// runs only

        self.where = f"{folder}/{LOCK_FILE}"
        self.lease_s = lease_s or float(os.environ.get("GPT2_JAX_LOCK_LEASE", LEASE_S))
        key = os.fspath(folder).split("://", 1)[1].partition("/")[2].strip("/")
        name = f"{key}/{LOCK_FILE}" if key else LOCK_FILE
        self.blob = storage.Client().bucket(bucket_of(folder)).blob(name)
        self.info, self.lost, self._precondition = _holder(), None, PreconditionFailed
        try:
            self.generation = self._write(0)
        except PreconditionFailed:
            self.generation = self._take_over_or_fail(folder)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_until_released, name="RunLock", daemon=True)
        self._thread.start()

    def _write(self, generation: int) -> int:
        """Writes this holder's JSON with a new expiry if the object's generation is `generation` (0: absent)."""
        self.info["expires"] = time.time() + self.lease_s
        self.blob.upload_from_string(json.dumps(self.info), content_type="application/json",
                                     if_generation_match=generation)
        return self.blob.generation

    def _take_over_or_fail(self, folder) -> int:
        blob = self.blob.bucket.get_blob(self.blob.name)
        generation = blob.generation if blob else 0
        old = _parse(blob.download_as_bytes(if_generation_match=generation)) if blob else {}
        left = old.get("expires", 0) - time.time()
        if blob and left > 0 and not _gone_from_this_host(old):
            raise RunFolderBusy(f"--out_dir={folder} is in use by another trainer ({describe(old)}); its lock "
                                f"{self.where} expires in {left:.0f} s unless renewed. Wait for it to end or stop "
                                "it, or use another --out_dir (if no trainer runs there, delete the lock)")
        try:
            generation = self._write(generation)
        except self._precondition:  # another start took it over first
            raise RunFolderBusy(f"--out_dir={folder}: another trainer took over its stale lock {self.where} "
                                "just now; use another --out_dir") from None
        why = "its process is gone" if left > 0 else f"it expired {-left:.0f} s ago"
        log(f"{self.where}: taking over the lock of {describe(old)}: {why}")
        return generation

    def _renew_until_released(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                self.generation = self._write(self.generation)
            except self._precondition:
                self.lost = f"another trainer took over the lock {self.where} of this run (its lease ran out)"
                return
            except Exception:  # noqa: BLE001 -- a network error: try again at the next beat, the lease has time left
                continue

    def check(self) -> None:
        """Raises RunFolderBusy if another trainer took the folder over (this run's lease ran out)."""
        if self.lost:
            raise RunFolderBusy(f"{self.lost}: stopping, to not overwrite its checkpoints")

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        if not self.lost:
            with contextlib.suppress(Exception):  # an unreleased lock expires anyway
                self.blob.delete(if_generation_match=self.generation)


class NoLock:
    """What processes other than 0 hold: process 0 holds the lock for the run."""

    def check(self) -> None:
        pass

    def release(self) -> None:
        pass


def acquire(folder: epath.Path) -> LocalLock | BucketLock | NoLock:
    """The lock of the run folder `folder` (a local folder that exists, or gs://), taken by process 0; raises
    RunFolderBusy on every process if another trainer holds it. A collective."""
    lock, error = NoLock(), None
    if is_primary():
        try:
            lock = BucketLock(folder) if is_remote(folder) else LocalLock(folder)
        except RunFolderBusy as e:
            error = [True, str(e)]
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                error = [False, f"--out_dir={folder}: cannot take the run folder's lock: {e}"]
            else:  # a filesystem without locks: run, but say what is not guarded
                log(f"warning: --out_dir={folder} cannot be locked ({e}): nothing stops a second trainer there")
        except ImportError:
            error = [False, f"--out_dir={folder}: its lock needs google-cloud-storage: {GCS_EXTRA}"]
        except Exception as e:  # noqa: BLE001 -- all processes must hear of it, or they would wait for process 0
            error = [False, f"--out_dir={folder}: cannot take the run folder's lock: {type(e).__name__}: {e}"]
    busy, error = broadcast_from_primary(error) or (False, None)
    if error:
        raise RunFolderBusy(error) if busy else OSError(error)
    return lock
