"""train.py's flags: bool flags bare or with a value, and values that make no sense rejected up front --
by TrainConfig (ValueError naming the flag) and so by train.py (usage error, exit status 2, before JAX)."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_jax import launch
from gpt2_jax.training.settings import TrainConfig, parse_flags

ROOT = Path(__file__).resolve().parents[1]
BOOL_FLAGS = [f.name for f in dataclasses.fields(TrainConfig) if f.type == "bool"]


def parse_error(argv, capsys) -> str:
    """parse_flags(argv) must exit with status 2 (argparse's usage error); returns its stderr."""
    with pytest.raises(SystemExit) as e:
        parse_flags(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


# --- bool flags ------------------------------------------------------------------------------------


def test_bool_flags_are_the_ones_expected():
    assert BOOL_FLAGS == ["finetune", "resume", "tensorboard"]


@pytest.mark.parametrize("argv, value", [([], "auto"), (["--distributed"], "true"), (["--distributed=true"], "true"),
                                         (["--distributed=false"], "false"), (["--distributed", "no"], "false"),
                                         (["--distributed=auto"], "auto")])
def test_distributed_is_auto_or_a_bool(argv, value):
    assert parse_flags(argv).distributed == value


def test_distributed_bad_value(capsys):
    assert "argument --distributed: expected true or false, got 'maybe'" in parse_error(["--distributed=maybe"], capsys)


@pytest.mark.parametrize("flags, tpu_hosts, joins", [
    ({"platform": "tpu"}, "", True),  # a Cloud TPU VM: peers from the metadata server, no env variable
    ({"platform": "tpu", "distributed": "false"}, "", False),
    ({"platform": "cpu"}, "", False),
    ({}, "10.0.0.1,10.0.0.2", True),  # GKE lists the pod's hosts
    ({"platform": "gpu", "distributed": "true"}, "", True),  # SLURM / Open MPI describe themselves
])
def test_init_distributed_joins_the_pod_on_tpu_unless_told_not_to(monkeypatch, flags, tpu_hosts, joins):
    import jax

    from gpt2_jax.launch import init_distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", tpu_hosts)
    init_distributed(TrainConfig(**flags))
    assert calls == ([((), {})] if joins else [])


@pytest.mark.parametrize("name", BOOL_FLAGS)
def test_bare_bool_flag_is_true(name):
    config = parse_flags(["--init_from=gpt2", f"--{name}", "--max_steps=3"])  # bare, followed by another flag
    assert getattr(config, name) is True and config.max_steps == 3


@pytest.mark.parametrize("name", BOOL_FLAGS)
@pytest.mark.parametrize("text, value", [("true", True), ("false", False), ("False", False), ("1", True),
                                         ("0", False), ("yes", True), ("no", False), ("on", True), ("off", False)])
def test_bool_flag_with_a_value(name, text, value):
    source = ["--init_from=gpt2"]  # (--finetune needs one)
    assert getattr(parse_flags([*source, f"--{name}={text}"]), name) is value
    assert getattr(parse_flags([*source, f"--{name}", text]), name) is value  # the value as the next argument


def test_bool_flag_with_a_bad_value(capsys):
    err = parse_error(["--tensorboard=maybe"], capsys)
    assert "argument --tensorboard: expected true or false, got 'maybe'" in err


def test_no_flags_gives_the_defaults():
    assert parse_flags([]) == TrainConfig()


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        parse_flags(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text: undo the line breaks
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name} " in out, f.name
    assert out.count("(default: ") == len(dataclasses.fields(TrainConfig))
    assert "--resume [BOOL]" in out and "(default: False)" in out and "(default: -1.0)" in out


# --- values that make no sense: one place (TrainConfig), named in the message ----------------------

# (field, bad value, what the message must say after "--field=value")
BAD_VALUES = [
    ("max_steps", -5, r"is negative; --max_steps: optimizer steps \(0: 19073"),
    ("micro_batch_size", -8, r"is negative; --micro_batch_size: .*\(0: auto\)"),
    ("total_batch_size", -1, "is negative"),
    ("block_size", -64, "is negative"),
    ("n_layer", -1, "is negative"),
    ("n_head", -2, "is negative"),
    ("n_embd", -32, "is negative"),
    ("vocab_size", -1, "is negative"),
    ("eval_every", -1, "is negative"),
    ("eval_tokens", -1, "is negative"),
    ("sample_every", -250, "is negative"),
    ("sample_tokens", 0, "must be >= 1"),
    ("num_samples", 0, "must be >= 1"),
    ("hellaswag_every", -1, "is negative"),
    ("hellaswag_limit", -10, "is negative"),
    ("checkpoint_every", -1, "is negative"),
    ("keep_checkpoints", 0, "must be >= 1"),
    ("log_every", 0, "must be >= 1"),
    ("max_skips", -1, r"is negative; .*\(0: no limit\)"),
    ("num_processes", -2, "is negative"),
    ("process_id", -2, "must be >= -1"),
    ("local_device_count", -4, "is negative"),
    ("warmup_steps", -2, "must be >= -1"),
    ("max_lr", -6e-4, "is negative"),
    ("max_lr", float("inf"), "is not a finite number"),
    ("max_lr", float("nan"), "is not a finite number"),
    ("min_lr_ratio", -0.1, r"must be in \[0.0, 1.0\]"),
    ("min_lr_ratio", 1.5, r"must be in \[0.0, 1.0\]"),
    ("weight_decay", -0.1, "is negative"),
    ("beta1", 1.0, r"must be in \[0.0, 1.0\)"),
    ("beta1", -0.1, r"must be in \[0.0, 1.0\)"),
    ("beta2", 1.0, r"must be in \[0.0, 1.0\)"),
    ("eps", 0.0, "must be > 0.0"),
    ("eps", -1e-8, "must be > 0.0"),
    ("grad_clip", -1.0, "is negative"),
    ("dropout", 1.0,
     r"must be in \[0.0, 1.0\) or -1.0; --dropout: dropout rate \(-1: the preset's; 0 for char on CPU\)"),
    ("dropout", -0.5, r"must be in \[0.0, 1.0\) or -1.0"),
    ("platform", "cuda", "is unknown; choose one of cpu, gpu, tpu or empty"),
    ("preset", "gpt5", "is unknown; choose one of gpt2, gpt2-medium, gpt2-large, gpt2-xl, char"),
    ("dtype", "float64", "is unknown; choose one of float32, bfloat16, float16 or empty"),
    ("attention", "flash", "is unknown; choose one of xla, cudnn, blocked, einsum, splash or empty"),
    ("remat", "", "is unknown; choose one of none, full, dots;"),  # no "auto" for remat: its default is "none"
    ("on_nan", "ignore", "is unknown; choose one of stop, skip;"),
]


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


@pytest.mark.parametrize("name, value, message", BAD_VALUES, ids=[f"{n}={v}" for n, v, _ in BAD_VALUES])
def test_config_rejects(name, value, message):
    with pytest.raises(ValueError, match=rf"^--{name}={_shown(value)} {message}") as e:
        TrainConfig(**{name: value})
    assert "\n" not in str(e.value)  # one problem, one line


@pytest.mark.parametrize("name, value, message", BAD_VALUES[::5], ids=[f"{n}={v}" for n, v, _ in BAD_VALUES[::5]])
def test_parse_args_rejects_with_exit_status_2(name, value, message, capsys):
    err = parse_error([f"--{name}={value}"], capsys)
    assert err.startswith("usage: train.py")
    assert f"train.py: error: --{name}={_shown(value)} " in err


def test_config_rejects_wrong_types():
    """Python callers (tests, notebooks) get the same checks as the command line."""
    with pytest.raises(ValueError, match=r"^--max_steps='5' is a str, not int"):
        TrainConfig(max_steps="5")
    with pytest.raises(ValueError, match=r"^--resume='false' is a str, not bool"):
        TrainConfig(resume="false")  # a non-empty string would be truthy
    with pytest.raises(ValueError, match=r"^--max_steps=True is a bool, not int"):
        TrainConfig(max_steps=True)


def test_process_id_must_be_below_num_processes():
    with pytest.raises(ValueError, match=r"^--process_id=2 must be < --num_processes=2 \(processes count from 0\)"):
        TrainConfig(distributed="true", num_processes=2, process_id=2)
    TrainConfig(distributed="true", num_processes=2, process_id=1)


def test_every_problem_is_reported_at_once(capsys):
    err = parse_error(["--max_steps=-5", "--beta2=1", "--dtype=fp8"], capsys)
    lines = err.split("train.py: error: ")[1].splitlines()  # in TrainConfig's field order
    assert [line.split(" ")[0] for line in lines] == ["--dtype='fp8'", "--max_steps=-5", "--beta2=1.0"]


# The edge values that mean "auto", "off" or "never" stay valid, as do ones just inside each bound.
GOOD_VALUES = dict(platform="cpu", dtype="bfloat16", attention="cudnn", remat="dots", max_steps=0, warmup_steps=0,
                   max_lr=0.0, min_lr_ratio=1.0, weight_decay=0.0, beta1=0.0, beta2=0.999, eps=1e-12, grad_clip=0.0,
                   dropout=0.0, eval_every=0, sample_every=0, checkpoint_every=0, hellaswag_every=0, max_skips=0,
                   keep_checkpoints=1, log_every=1, eval_tokens=0, sample_tokens=1, num_samples=1, process_id=0,
                   num_processes=1, on_nan="skip", preset="gpt2-xl")


def test_config_accepts_the_edges():
    TrainConfig(**GOOD_VALUES)
    TrainConfig(dropout=-1.0, warmup_steps=-1, process_id=-1, max_lr=1e10)  # the "auto" sentinels; no lr cap
    assert TrainConfig(max_lr=1).max_lr == 1  # an int where a float is declared is fine


def test_cli_bad_value_exits_2_before_jax_starts():
    """The real command: exit status 2 and the flag named, without importing JAX (-X importtime lists every
    module the process imported, on stderr)."""
    r = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "train.py"), "--max_steps=-5"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "train.py: error: --max_steps=-5 is negative; --max_steps: optimizer steps (0: " in r.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert "gpt2_jax.config" in imported
    assert not [m for m in imported if m.split(".")[0] in ("jax", "jaxlib", "numpy")], "imported before the check"


# --- the environment JAX starts in: compile cache, GPU XLA flags (train.jax_environment, a pure function) ----

HOME = {"HOME": "/home/u", "PATH": "/usr/bin"}


@pytest.mark.parametrize("env, folder", [
    (HOME, "/home/u/.cache/gpt2_jax/jax-compile"),
    ({**HOME, "XDG_CACHE_HOME": "/xdg"}, "/xdg/gpt2_jax/jax-compile"),
    ({**HOME, "XDG_CACHE_HOME": "/xdg", "GPT2_JAX_CACHE": "/mine"}, "/mine/jax-compile"),
])
def test_compile_cache_default_folder(env, folder):
    out, notes = launch.jax_environment(TrainConfig(), env)
    assert out["JAX_COMPILATION_CACHE_DIR"] == folder and notes == [f"compile cache: {folder} (the default; "
                                                                    "--compile_cache=off disables it)"]
    assert out["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == launch.CACHE_MIN_COMPILE_SECS
    assert env == {k: v for k, v in out.items() if k in env}, "the input environment's values are kept"


def test_users_cache_variable_wins_over_the_default_not_over_the_flag():
    env = {**HOME, "JAX_COMPILATION_CACHE_DIR": "/theirs", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    out, _ = launch.jax_environment(TrainConfig(), env)
    assert out["JAX_COMPILATION_CACHE_DIR"] == "/theirs"
    assert out["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0"
    out, notes = launch.jax_environment(TrainConfig(compile_cache="/flag"), env)
    assert out["JAX_COMPILATION_CACHE_DIR"] == "/flag" and notes == ["compile cache: /flag (--compile_cache)"]
    out, notes = launch.jax_environment(TrainConfig(compile_cache="off"), env)
    assert out["JAX_ENABLE_COMPILATION_CACHE"] == "false" and notes == ["compile cache: off (--compile_cache=off)"]


def test_gpu_flags_are_set_only_for_gpu_and_only_without_users_xla_flags():
    from gpt2_jax.launch import GPU_XLA_FLAGS

    out, notes = launch.jax_environment(TrainConfig(platform="gpu"), HOME)
    assert out["XLA_FLAGS"] == " ".join(GPU_XLA_FLAGS) and out["JAX_PLATFORMS"] == "cuda"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in GPU_XLA_FLAGS
    assert notes[-1].startswith("XLA_FLAGS='--xla_gpu_enable_latency_hiding_scheduler=true ") and \
        notes[-1].endswith(": the recommended GPU flags (set XLA_FLAGS to replace them)")
    for theirs in ("--xla_dump_to=/tmp/d", ""):  # set by the user, even empty (XLA's defaults): left alone
        out, notes = launch.jax_environment(TrainConfig(platform="gpu"), {**HOME, "XLA_FLAGS": theirs})
        assert out["XLA_FLAGS"] == theirs
        assert notes[-1] == (f"XLA_FLAGS={theirs!r} from the environment; the recommended GPU flags "
                             "(gpt2_jax.launch.GPU_XLA_FLAGS) are not added")
    for platform in ("", "cpu", "tpu"):
        out, _ = launch.jax_environment(TrainConfig(platform=platform), HOME)
        assert "XLA_FLAGS" not in out, platform


@pytest.mark.parametrize("config, env", [
    (TrainConfig(platform="cpu", local_device_count=8), HOME),
    (TrainConfig(platform="cpu", num_processes=2, process_id=0, coordinator_address="127.0.0.1:1234"), HOME),
    (TrainConfig(platform="cpu"), {**HOME, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}),
])
def test_a_cpu_run_with_several_devices_gets_the_collective_timeout_the_tests_use(config, env):
    """XLA:CPU aborts with no message when fake devices fall 40 s apart at a collective (a loaded machine): a user's
    multi-device CPU run gets the 10 minutes that conftest.py gives the tests; the user's own XLA_FLAGS are kept."""
    out, notes = launch.jax_environment(config, env)
    assert out["XLA_FLAGS"] == f"{env.get('XLA_FLAGS', '')} {launch.CPU_COLLECTIVE_TIMEOUT_FLAG}".strip()
    assert launch.CPU_COLLECTIVE_TIMEOUT_FLAG == "--xla_cpu_collective_call_terminate_timeout_seconds=600"
    assert notes[-1].startswith(f"XLA_FLAGS += {launch.CPU_COLLECTIVE_TIMEOUT_FLAG}: several CPU devices")


@pytest.mark.parametrize("config, env", [
    (TrainConfig(platform="cpu"), HOME),  # one device
    (TrainConfig(platform="cpu", local_device_count=8),  # the user's own timeout wins
     {**HOME, "XLA_FLAGS": "--xla_cpu_collective_call_terminate_timeout_seconds=30"}),
    (TrainConfig(platform="tpu"), {**HOME, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}),
])
def test_the_collective_timeout_is_left_alone_elsewhere(config, env):
    out, _ = launch.jax_environment(config, env)
    assert out.get("XLA_FLAGS") == env.get("XLA_FLAGS")
