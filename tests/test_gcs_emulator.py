"""gs:// paths against a local GCS emulator (fake-gcs-server on 127.0.0.1, see gcs_emulator.py): etils.epath
file operations (gcsfs), tensorboardX's log writer (google-cloud-storage), and gpt2_jax.checkpoint.Checkpointer
on a bucket (orbax: gcsfs for folders and JSON, tensorstore for the arrays, google-cloud-storage when it
deletes).

What is in the bucket is read back through the emulator's own JSON API (plain HTTP, `objects`), not through
the clients under test, so a client that quietly wrote to a local folder named `gs:` cannot pass. Every test
also checks that no such folder appeared (`no_local_gs_folder`), and `test_in_private_network` reruns the
file in a network namespace that has nothing but loopback.
"""

import json
import os
import socket
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import gcs_emulator
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gpt2_jax.checkpoint import Checkpointer, abstract_like

ROOT = Path(__file__).resolve().parents[1]
IN_PRIVATE_NETWORK = gcs_emulator.IN_PRIVATE_NETWORK  # set by test_in_private_network for its inner run


def objects(env: dict, prefix: str) -> list[str]:
    """Names of the objects under gs://test-bucket/<prefix>, straight from the emulator's JSON API."""
    query = urllib.parse.urlencode({"prefix": prefix})
    url = f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/{gcs_emulator.BUCKET}/o?{query}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return sorted(item["name"] for item in json.load(response).get("items", []))


def key(gs_path: str) -> str:
    """`gs://test-bucket/a/b` -> `a/b`, the object-name prefix."""
    return gs_path.removeprefix(f"gs://{gcs_emulator.BUCKET}/")


@pytest.fixture(autouse=True)
def no_local_gs_folder(tmp_path_factory):
    """A gs:// path that falls through to a local-file code path shows up as a folder `gs:` (from `gs://b/x`
    normalised to `gs:/b/x`) relative to the working directory. None may exist after a test."""
    yield
    places = {Path.cwd(), ROOT, ROOT / "tests", Path(tempfile.gettempdir()), tmp_path_factory.getbasetemp()}
    found = [str(p / "gs:") for p in places if (p / "gs:").exists()]
    found += [str(p) for p in tmp_path_factory.getbasetemp().rglob("gs:")]
    assert not found, f"a gs:// path was written to local disk: {found}"


def test_epath_file_operations(gcs_emulator_env, gcs_dir):
    from etils import epath

    root = epath.Path(gcs_dir)
    assert type(root).__name__ == "PosixGPath" and str(root) == gcs_dir  # not a local pathlib path
    assert not root.exists()
    (root / "logs").mkdir(parents=True, exist_ok=True)
    (root / "meta.json").write_text(json.dumps({"step": 3}))
    (root / "logs" / "metrics.jsonl").write_text('{"loss": 1.5}\n')
    (root / "sample.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    assert json.loads((root / "meta.json").read_text()) == {"step": 3}
    assert (root / "sample.png").read_bytes()[-3:] == bytes([253, 254, 255])
    assert root.is_dir() and (root / "logs").is_dir() and (root / "meta.json").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["logs", "meta.json", "sample.png"]
    assert [p.name for p in root.glob("*.json")] == ["meta.json"]
    assert objects(gcs_emulator_env, key(gcs_dir)) == [
        f"{key(gcs_dir)}/logs/metrics.jsonl", f"{key(gcs_dir)}/meta.json", f"{key(gcs_dir)}/sample.png"]

    (root / "meta.json").rename(root / "meta-old.json")  # GCS has no rename: copy, then delete
    assert not (root / "meta.json").exists()
    assert json.loads((root / "meta-old.json").read_text()) == {"step": 3}
    with pytest.raises(FileExistsError, match="already exists"):
        (root / "sample.png").rename(root / "meta-old.json")

    (root / "logs").rmtree()
    assert objects(gcs_emulator_env, key(gcs_dir)) == [f"{key(gcs_dir)}/meta-old.json", f"{key(gcs_dir)}/sample.png"]
    root.rmtree()
    assert not root.exists() and objects(gcs_emulator_env, key(gcs_dir)) == []


def test_tensorboard_writer(gcs_emulator_env, gcs_dir):
    """tensorboardX (metrics.py's TensorBoard log) writes gs:// paths itself, through google-cloud-storage."""
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(f"{gcs_dir}/tb", flush_secs=3600)
    for step in range(3):
        writer.add_scalar("train/loss", 4.0 - step, step)
    gcs_file = writer._get_file_writer().event_writer._ev_writer._py_recordio_writer._writer
    assert type(gcs_file).__name__ == "GCSRecordWriter"
    writer.close()
    # Each flush uploads the whole file again, and so does the writer's __del__, which runs at exit (the
    # SummaryWriter stays referenced by an atexit hook): by then the emulator is gone, and the upload would
    # retry for 120 s. The file is complete here; make that last upload a no-op.
    gcs_file.close = lambda: None
    [name] = objects(gcs_emulator_env, key(gcs_dir))
    assert name.startswith(f"{key(gcs_dir)}/tb/events.out.tfevents."), name
    from etils import epath

    assert (epath.Path(f"gs://{gcs_emulator.BUCKET}") / name).read_bytes().count(b"train/loss") == 3


def make_state(seed: int, mesh: Mesh):
    """Params and AdamW state, each array split over every device of `mesh` along its first axis."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"wte": jax.random.normal(k1, (16, 8)), "h": {"c_fc": {"bias": jax.random.normal(k2, (32,))}}}
    tx = optax.adamw(1e-3)
    opt = tx.init(params)
    for _ in range(seed + 1):  # non-zero moments and count, different per seed
        updates, opt = tx.update(jax.tree.map(jnp.ones_like, params), opt, params)
        params = optax.apply_updates(params, updates)
    state = {"params": params, "opt": opt}
    def shard(x):
        return jax.device_put(x, NamedSharding(mesh, P("data") if x.ndim else P()))

    return jax.tree.map(shard, state)


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)  # optax NamedTuples included
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype and a.sharding.is_equivalent_to(e.sharding, a.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))  # bit-exact: no arithmetic


@pytest.mark.filterwarnings("ignore:Saving step:UserWarning")
def test_checkpointer_on_bucket(gcs_emulator_env, gcs_dir):
    """Save (async) / list / restore / partial restore / max_to_keep / resume, all on gs://.

    On GCS there is no atomic rename: orbax writes a step straight into `<step>/` and marks it complete
    with `<step>/commit_success.txt`, written last; a step folder without it is a killed save."""
    mesh = Mesh(np.array(jax.devices()), ("data",))  # 8 fake CPU devices (root conftest.py), or fewer
    states = {step: make_state(step, mesh) for step in (1, 2, 3)}
    assert len(states[1]["params"]["wte"].addressable_shards) == len(jax.devices())
    with Checkpointer(gcs_dir, max_to_keep=2, async_save=True) as ckpt:
        assert ckpt.all_steps() == [] and ckpt.latest_step() is None
        for step, state in states.items():
            ckpt.save(step, state, {"step": step, "loader": {"shard": 0, "position": 64 * step}})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]
        restored, meta, step = ckpt.restore(abstract_like(states[3]))
        part, _, _ = ckpt.restore({"params": abstract_like(states[2]["params"])}, step=2, partial=True)
    assert (step, meta) == (3, {"step": 3, "loader": {"shard": 0, "position": 192}})
    assert_trees_equal(restored, states[3])
    assert isinstance(restored["opt"][0], optax.ScaleByAdamState)
    assert_trees_equal(part, {"params": states[2]["params"]})

    names = objects(gcs_emulator_env, key(gcs_dir))
    steps = sorted({name.split("/")[1] for name in names})
    assert steps == ["2", "3"], names  # step 1 deleted from the bucket, no tmp folders left
    for s in steps:
        assert f"{key(gcs_dir)}/{s}/commit_success.txt" in names
        assert f"{key(gcs_dir)}/{s}/meta/metadata" in names
        assert any(n.startswith(f"{key(gcs_dir)}/{s}/state/ocdbt.process_0/d/") for n in names), names

    # A save killed before its commit: step 4's folder holds arrays but no commit_success.txt.
    from etils import epath

    (epath.Path(gcs_dir) / "4" / "state").mkdir(parents=True, exist_ok=True)
    (epath.Path(gcs_dir) / "4" / "state" / "_METADATA").write_text("{}")
    with Checkpointer(gcs_dir, max_to_keep=2, read_only=True) as reader:
        assert reader.all_steps() == [2, 3]  # not listed, so never restored
    # The resumed run (from step 3): opening the checkpoints for writing deletes the half-written folder
    # (orbax's cleanup of killed saves), and step 4 is saved again.
    with Checkpointer(gcs_dir, max_to_keep=2) as ckpt:
        assert not [name for name in objects(gcs_emulator_env, key(gcs_dir)) if name.split("/")[1] == "4"]
        ckpt.save(4, states[1], {"step": 4})
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
        again, meta, step = ckpt.restore(abstract_like(states[1]))
    assert (step, meta) == (4, {"step": 4})
    assert_trees_equal(again, states[1])


@pytest.mark.e2e
@pytest.mark.skipif(os.environ.get(IN_PRIVATE_NETWORK) == "1", reason="already inside the private network")
def test_in_private_network(tmp_path):
    """Reruns the tests above in a network namespace with nothing but loopback, emulator included: a client
    that tried to reach anything but 127.0.0.1 (storage.googleapis.com, a metadata server, a credential
    endpoint) would fail there instead of passing."""
    out = gcs_emulator.rerun_in_private_network(__file__, tmp_path / "inner", ROOT, timeout=600)
    assert "4 passed, 1 skipped" in out, out[-2000:]


@pytest.mark.skipif(os.environ.get(IN_PRIVATE_NETWORK) != "1", reason="runs inside test_in_private_network")
def test_network_is_loopback_only():
    """The namespace's only interface is `lo` (read from the kernel, no packet sent)."""
    assert [name for _, name in socket.if_nameindex()] == ["lo"]
