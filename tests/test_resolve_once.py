"""Resolve once (issue #26, item 2): train.py turns its flags into one ResolvedRun (training.resolved) -- every
auto value decided, the mesh, grad_accum, --init_from's shape -- and the trainer and the planner take it.
--init_from's meta (or config.json) is read once per start, and the mesh is built once per start and per plan."""

import pytest
from tiny import TINY_RUN, train_flags

import train
from gpt2_jax import convert, plan, runs, sharding
from gpt2_jax.checkpoint import Checkpointer
from gpt2_jax.training.resolved import resolve_run
from gpt2_jax.training.settings import TrainConfig, resolve


def count_calls(monkeypatch) -> dict:
    """From now on: {"mesh": [--mesh specs built], "meta": [checkpoint folders whose meta was read],
    "hf_config": [HF folders whose config.json was read]}."""
    calls = {"mesh": [], "meta": [], "hf_config": []}
    make_mesh, read_meta, read_hf_config = sharding.make_mesh, Checkpointer.read_meta, convert.read_hf_config

    def mesh(spec="", devices=None):
        calls["mesh"].append(spec)
        return make_mesh(spec, devices)

    def meta(self, step=None):
        calls["meta"].append(str(self.directory))
        return read_meta(self, step)

    def hf_config(folder):
        calls["hf_config"].append(str(folder))
        return read_hf_config(folder)

    monkeypatch.setattr(sharding, "make_mesh", mesh)
    monkeypatch.setattr(Checkpointer, "read_meta", meta)
    for module in (convert, runs):
        monkeypatch.setattr(module, "read_hf_config", hf_config)
    return calls


@pytest.fixture
def counted(monkeypatch) -> dict:
    return count_calls(monkeypatch)


def _train(argv, capsys) -> str:
    try:
        code = train.main(["--platform=cpu", "--mesh=data:1", *argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return out


def test_a_resolved_run_has_every_auto_value_decided():
    flags = TrainConfig(preset="char", n_layer=2, mesh="data:2", total_batch_size=4 * 8 * 64)
    run = resolve_run(flags)
    assert run.tc == resolve(flags, "cpu", 2) and run.flags == flags and run.platform == "cpu"
    assert dict(run.mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1}
    assert run.source is None and run.shape_note == ""
    # The char recipe's default micro-batch (12) does not divide the total: said where the run is used, so that
    # train.py's micro-batch search may still choose one that does.
    with pytest.raises(ValueError, match=r"--total_batch_size=2048 is not a multiple of micro_batch_size \* "
                                         r"block_size = 12 \* 64 = 768"):
        _ = run.grad_accum
    # A variant (the planner's search) keeps the mesh object and re-derives the batch arithmetic.
    eight = run.replace(micro_batch_size=8)
    assert eight.mesh is run.mesh and eight.grad_accum == 4 and eight.replace(micro_batch_size=4).grad_accum == 8
    assert eight.replace(grad_accum=3).tc.total_batch_size == 8 * 64 * 3
    with pytest.raises(ValueError, match=r"mesh decide the mesh and the model's shape: resolve_run again"):
        run.replace(mesh="data:1")
    with pytest.raises(ValueError, match=r"--micro_batch_size=6 is not divisible by the 4 data-parallel devices"):
        _ = resolve_run(TrainConfig(preset="char", mesh="data:4", micro_batch_size=6)).grad_accum


@pytest.mark.slow
@pytest.mark.parametrize("source", ["run", "hf"])
def test_init_from_is_read_once_and_the_mesh_built_once(tmp_path, char_data, capsys, monkeypatch, source):
    """A start from a training run reads its newest meta once (it was three times: train.py, setup and the
    params' load); from an HF folder, its config.json once. One mesh, built once, in either case."""
    tiny = {**TINY_RUN, "data": str(char_data), "max_steps": 1}
    first = tmp_path / "first"
    _train(train_flags({**tiny, "out_dir": first, "checkpoint_every": 1}), capsys)
    if source == "hf":
        convert.export_hf(runs.load_model(str(first))[0], tmp_path / "hf")
    init_from = first if source == "run" else tmp_path / "hf"
    calls = count_calls(monkeypatch)  # the second start's calls
    sized = {k: v for k, v in tiny.items() if k not in ("n_layer", "n_head", "n_embd", "block_size")}
    out = _train(train_flags({**sized, "out_dir": tmp_path / "second", "init_from": init_from}), capsys)
    assert f"model shape from --init_from={init_from}: n_layer=2 n_head=2 n_embd=32" in out
    assert f"init_from: {init_from}" in out
    if source == "run":
        assert calls["meta"].count(str(first / "checkpoints")) == 1, calls["meta"]
    else:
        assert calls["hf_config"] == [str(init_from)], calls["hf_config"]
    assert calls["mesh"] == ["data:1"]


def test_the_planner_builds_one_mesh_per_plan(counted, monkeypatch):
    """A search over the remat policies and micro-batch sizes compiles many variants of one resolved run: all
    on the mesh built once (plan_one is replaced here by a record of what it was given)."""
    from gpt2_jax.plan import compile as plan_compile

    local = plan.load_target(plan.parse_target("local"))
    given = []

    def plan_one(run, target, count_flops=True):
        given.append(run)
        return plan.Plan(run.tc.remat, run.tc.micro_batch_size, run.tc.micro_batch_size <= 16, 1, 2)

    monkeypatch.setattr(plan_compile, "plan_one", plan_one)
    run = plan.plan_run(TrainConfig(preset="char", mesh="data:2", micro_batch_size=4), local, grad_accum=3)
    best = plan.search(run, local)
    assert [b.micro_batch_size for b in best] == [16] * len(best) and len(given) >= 3 * len(best)
    assert all(r.mesh is run.mesh and r.grad_accum == 3 for r in given)
    assert {r.tc.remat for r in given} == set(plan_compile.REMATS)
    assert counted["mesh"] == ["data:2"]


def test_train_py_resolves_once_and_hands_the_run_to_the_trainer(counted, monkeypatch, capsys):
    from gpt2_jax import launch, training

    monkeypatch.setattr(launch, "start_jax", lambda config: None)
    ran = []
    monkeypatch.setattr(training, "run", lambda run: ran.append(run) or {})
    assert train.main(["--preset=char", "--mesh=data:2", "--n_layer=1"]) == 0
    (run,) = ran
    assert run.tc == resolve(TrainConfig(preset="char", mesh="data:2", n_layer=1), "cpu", 2)
    assert run.grad_accum == run.tc.total_batch_size // (run.tc.micro_batch_size * run.tc.block_size)
    assert counted["mesh"] == ["data:2"]
