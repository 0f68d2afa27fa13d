"""The recipes in recipes/*.yaml: SkyPilot accepts them, and what they run is what we mean.

Every recipe is loaded the way ``sky jobs launch recipes/X.yaml --env NAME=value`` loads it
(``sky.utils.dag_utils.load_chain_dag_from_yaml`` with env overrides, which ends in
``sky.Task.from_yaml_config``): no mocks, no cloud. Then its ``run:`` and ``setup:`` are
executed for real by bash, with fake ``python``/``uv``/``pip`` executables first on PATH that
record their argv; the recorded ``accelerate launch`` line is parsed by accelerate's own
parser and the trainer's arguments by ``train.lm.build_parser()``, so an unknown or renamed
flag fails here instead of on a GPU an hour into a launch.

Nothing here may reach the network: an autouse fixture turns any TCP/UDP connect into a
test failure.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import sky
import yaml
from sky.utils import dag_utils

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
TRAINER = REPO / "train" / "lm.py"
PREEMPTED_EXIT_CODE = 143

# Recipe env -> train/lm.py flag, for every valued flag of the trainer's contract
# (--run-name is derived by the trainer and must not be passed; booleans are below).
TRAINER_FLAG_ENVS = {
    "--model": "MODEL",
    "--dataset": "DATASET",
    "--text-column": "TEXT_COLUMN",
    "--seq-len": "SEQ_LEN",
    "--batch-size": "BATCH_SIZE",
    "--grad-accum": "GRAD_ACCUM",
    "--lr": "LR",
    "--warmup-steps": "WARMUP_STEPS",
    "--max-steps": "MAX_STEPS",
    "--seed": "SEED",
    "--mixed-precision": "MIXED_PRECISION",
    "--checkpoint-dir": "CHECKPOINT_DIR",
    "--checkpoint-every-steps": "CHECKPOINT_EVERY_STEPS",
    "--checkpoint-every-minutes": "CHECKPOINT_EVERY_MINUTES",
    "--keep-last": "KEEP_LAST",
    "--output-dir": "OUTPUT_DIR",
    "--log-every": "LOG_EVERY",
    "--notice-poll-seconds": "NOTICE_POLL_SECONDS",
}
TRAINER_BOOL_ENVS = {"--from-scratch": "FROM_SCRATCH", "--async-checkpoint": "ASYNC_CHECKPOINT"}

# Options of pip / uv pip that take a value (the value is not a package spec).
_PIP_VALUE_OPTIONS = set(
    "-i --index-url --extra-index-url -f --find-links -c --constraint -p --python --target"
    " --prefix".split()
)

_LAUNCH_LINE = re.compile(r"^#\s*sky jobs launch recipes/(?P<file>\S+)(?P<rest>.*)$", re.M)

# A fake executable: records "<argc>\0<name>\0<arg>\0..." and exits $FAKE_EXIT.
# As `uv venv ... DIR` it also creates DIR with a bin/activate that keeps the fakes on PATH.
_FAKE = r"""#!/usr/bin/env bash
printf '%s\0' "$#" "$(basename "$0")" "$@" >> "$FAKE_LOG"
if [ "$(basename "$0")" = uv ] && [ "${1:-}" = venv ]; then
  d="${@: -1}"
  mkdir -p "$d/bin"
  printf 'export PATH="%s:$PATH"\n' "$FAKE_BIN" > "$d/bin/activate"
  ln -sf "$FAKE_BIN/python" "$d/bin/python"
fi
exit "${FAKE_EXIT:-0}"
"""
_FAKE_NAMES = ("python", "python3", "uv", "pip", "pip3")


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any IP connect from this process is a bug: these tests must not contact a cloud."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guard(real):
        def connect(self, address):
            if self.family in (socket.AF_INET, socket.AF_INET6):
                raise AssertionError(f"test tried to connect to {address!r}")
            return real(self, address)

        return connect

    monkeypatch.setattr(socket.socket, "connect", guard(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(real_connect_ex))


@functools.cache
def raw_text(path: Path) -> str:
    return path.read_text()


@functools.cache
def raw_config(path: Path) -> dict:
    config = yaml.safe_load(raw_text(path))
    assert isinstance(config, dict), f"{path.name}: not a single YAML mapping"
    return config


def required_envs(path: Path) -> list[str]:
    """Envs with a null value: the user must pass them with --env."""
    return [k for k, v in (raw_config(path).get("envs") or {}).items() if v is None]


def load(path: Path, **overrides: str) -> sky.Task:
    """Load like `sky jobs launch <path> --env K=V ...`: required envs get test values."""
    envs = {k: f"skyspot-test-{k.lower().replace('_', '-')}" for k in required_envs(path)}
    envs.update(overrides)
    dag = dag_utils.load_chain_dag_from_yaml(str(path), env_overrides=list(envs.items()))
    assert len(dag.tasks) == 1, f"{path.name}: expected one task, got {len(dag.tasks)}"
    return dag.tasks[0]


@functools.cache
def task_of(path: Path) -> sky.Task:
    return load(path)


def header_of(path: Path) -> str:
    lines = []
    for line in raw_text(path).splitlines():
        if line.strip() and not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def gpu_count(resources) -> int:
    return int(sum((resources.accelerators or {}).values()))


def gpus_per_node(task: sky.Task) -> int:
    counts = {gpu_count(r) for r in task.resources}
    assert len(counts) == 1, f"candidates differ in GPU count: {sorted(counts)}"
    return counts.pop()


def mount_targets(task: sky.Task) -> list[str]:
    return [*task.storage_mounts, *(task.file_mounts or {})]


def is_trainer_recipe(path: Path) -> bool:
    return "train/lm.py" in (raw_config(path).get("run") or "")


def _read_calls(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    parts = log.read_bytes().decode().split("\0")
    calls, i = [], 0
    while i < len(parts) - 1:
        argc = int(parts[i])
        calls.append(parts[i + 1 : i + 2 + argc])  # [name, *args]
        i += 2 + argc
    return calls


def execute(
    task: sky.Task,
    tmp_path: Path,
    script: str,
    *,
    env: dict[str, str] | None = None,
    fake_exit: int = 0,
    venv_exists: bool = True,
) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run `script` (the task's run: or setup:) under bash as SkyPilot would, with fakes.

    The environment is the task's envs and secrets plus what SkyPilot sets on a node
    (defaults: rank 0 of task.num_nodes, the candidates' GPU count), then `env`.
    """
    fake_bin = tmp_path / "fakebin"
    fake_bin.mkdir(exist_ok=True)
    for name in _FAKE_NAMES:
        exe = fake_bin / name
        exe.write_text(_FAKE)
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    venv = tmp_path / "venv"
    if venv_exists:
        (venv / "bin").mkdir(parents=True, exist_ok=True)
        (venv / "bin" / "activate").write_text(f'export PATH="{fake_bin}:$PATH"\n')
        python = venv / "bin" / "python"
        if not python.exists():
            python.symlink_to(fake_bin / "python")
    log = tmp_path / "calls.bin"
    log.unlink(missing_ok=True)
    (tmp_path / "home").mkdir(exist_ok=True)
    cwd = tmp_path / "workdir"
    cwd.mkdir(exist_ok=True)

    num_nodes = task.num_nodes or 1
    environ = {
        "PATH": f"{fake_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(tmp_path / "home"),
        "FAKE_BIN": str(fake_bin),
        "FAKE_LOG": str(log),
        "FAKE_EXIT": str(fake_exit),
        **task.envs,
        **{ref.name: "" for ref in task.managed_secret_refs},  # resolved at launch
        **{k: v.get_secret_value() for k, v in task.secrets.items()},
        "SKYPILOT_NODE_RANK": "0",
        "SKYPILOT_NODE_IPS": "\n".join(f"10.0.0.{i + 1}" for i in range(num_nodes)),
        "SKYPILOT_NUM_NODES": str(num_nodes),
        "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus_per_node(task)),
        "SKYPILOT_TASK_ID": f"sky-managed-2025-01-01-00-00-00-000000_{task.name}_7-0",
        "SKYPILOT_MANAGED_JOB_ID": "7",
    }
    if "VENV_DIR" in task.envs:
        environ["VENV_DIR"] = str(venv)
    environ.update(env or {})
    proc = subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=environ, capture_output=True, text=True, timeout=30
    )
    return proc, _read_calls(log)


@functools.cache
def accelerate_parser():
    from accelerate.commands.launch import launch_command_parser

    return launch_command_parser()


@functools.cache
def trainer_module():
    """train/lm.py, imported by path with the repo root on sys.path."""
    if not TRAINER.exists():
        pytest.fail(f"{TRAINER.relative_to(REPO)} does not exist (its flags are the contract)")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("skyspot_recipes_test_train_lm", TRAINER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def parse_trainer(args: list[str]):
    module = trainer_module()
    try:
        ns = module.build_parser().parse_args(args)
    except SystemExit as exc:  # argparse error (details on stderr, shown by pytest)
        pytest.fail(f"train/lm.py rejects the recipe's arguments (exit {exc.code}): {args}")
    if hasattr(module, "parse_config"):  # the trainer's own value checks, beyond argparse
        module.parse_config(args)
    return ns


def launched(calls: list[list[str]]):
    """The one `python -m skyspot.launch -- accelerate launch ...` call, parsed.

    Returns (accelerate namespace, trainer argument list).
    """
    launches = [c for c in calls if c[0] in ("python", "python3")]
    assert len(launches) == 1, f"expected one python call in run:, got {launches}"
    argv = launches[0][1:]
    assert argv[:3] == ["-m", "skyspot.launch", "--"], argv
    command = argv[3:]
    assert command[:2] == ["accelerate", "launch"], command
    try:
        ns = accelerate_parser().parse_args(command[2:])
    except SystemExit as exc:
        pytest.fail(f"accelerate launch rejects {command} (exit {exc.code})")
    assert ns.training_script == "train/lm.py", ns.training_script
    return ns, list(ns.training_script_args)


def run_and_parse(task, tmp_path, **env):
    proc, calls = execute(task, tmp_path, task.run, env=env)
    assert proc.returncode == 0, proc.stderr
    ns, train_args = launched(calls)
    return ns, train_args, parse_trainer(train_args)


recipe_params = pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
trainer_recipes = [p for p in RECIPES if is_trainer_recipe(p)]
trainer_params = pytest.mark.parametrize(
    "path", trainer_recipes, ids=[p.stem for p in trainer_recipes]
)


# ------------------------------------------------------------------------- every recipe


def test_the_training_recipes_exist():
    names = {p.name for p in RECIPES}
    for name in (
        "train-lm-spot.yaml",
        "train-lm-spot-ondemand-fallback.yaml",
        "train-lm-multinode.yaml",
    ):
        assert name in names


@recipe_params
def test_loads_with_skypilot_and_required_envs_are_enforced(path):
    required = required_envs(path)
    if required:
        # Plain from_yaml (no --env): SkyPilot itself refuses a null env.
        with pytest.raises(ValueError, match=required[0]):
            sky.Task.from_yaml(str(path))
    else:
        sky.Task.from_yaml(str(path))
    task = task_of(path)
    assert task.name, "recipe needs a name:"
    assert task.workdir == ".", "workdir: . (run: executes in the repo root)"
    assert task.run and task.setup


@recipe_params
def test_header_says_what_hardware_time_cost_and_how_to_launch(path):
    header = header_of(path)
    assert header.startswith("#"), "a recipe opens with a comment header"
    for word in ("hardware", "time", "cost"):
        assert word in header.lower(), f"header does not mention {word}"
    assert re.search(r"\$\s?\d", header), "header gives no $ figure"
    assert re.search(r"(\d|/h)\s*(x|×)\s*~?\$?\d", header), "no cost arithmetic ($/h x h)"
    launches = list(_LAUNCH_LINE.finditer(header))
    assert launches, "header has no `# sky jobs launch recipes/<file>` line"
    for match in launches:
        assert match["file"] == path.name, f"launch line names {match['file']}"
        for name in required_envs(path):
            assert f"--env {name}=" in match["rest"], f"launch line does not pass {name}"


@recipe_params
def test_every_env_has_an_inline_comment(path):
    envs = raw_config(path).get("envs") or {}
    assert envs, "knobs live in envs:"
    lines = raw_text(path).splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^envs:\s*(#.*)?$", line)) + 1
    block = []
    for line in lines[start:]:
        if line.strip() and not line[0].isspace() and not line.startswith("#"):
            break
        block.append(line)
    commented = {}
    for line in block:
        match = re.match(r"^\s+([A-Za-z_][A-Za-z0-9_]*):(.*)$", line)
        if match:
            commented[match[1]] = bool(re.search(r"\s#\s*\S", match[2]))
    for name in envs:
        assert commented.get(name), f"env {name} has no inline comment (meaning, units)"


@recipe_params
def test_hf_token_is_a_secret_without_a_committed_value(path):
    task = task_of(path)
    refs = {ref.name for ref in task.managed_secret_refs}
    assert "HF_TOKEN" in task.secrets or "HF_TOKEN" in refs
    assert "HF_TOKEN" not in task.envs, "tokens go in secrets:, not envs:"
    for name, value in task.secrets.items():
        assert value.get_secret_value() == "", f"secret {name} has a value in the recipe"


@recipe_params
def test_setup_pins_what_it_installs(path, tmp_path):
    task = task_of(path)
    assert "torch==" in task.setup
    proc, calls = execute(task, tmp_path, task.setup, venv_exists=False)
    assert proc.returncode == 0, proc.stderr
    specs = []
    for name, *args in calls:
        if name in ("python", "python3"):
            if args[:2] != ["-m", "pip"]:
                continue
            args = args[2:]
        elif name == "uv":
            if args[:1] != ["pip"]:
                continue
            args = args[1:]
        if args[:1] != ["install"]:
            continue
        skip = False
        for arg in args[1:]:
            if skip:
                skip = False
            elif arg in _PIP_VALUE_OPTIONS:
                skip = True
            elif not arg.startswith("-"):
                specs.append(arg)
    assert specs, f"setup installs nothing: {calls}"
    assert any(s.startswith("torch==") for s in specs), specs
    for spec in specs:
        assert spec == "." or "==" in spec, f"unpinned install in setup: {spec!r}"
    assert "." in specs, "setup installs the repo (pip install -e .)"
    assert specs.index(".") > min(i for i, s in enumerate(specs) if s.startswith("torch==")), (
        "torch goes first, pinned, so the repo's install does not pick its build"
    )


@recipe_params
def test_job_recovery_relaunches_on_a_preemption_save(path):
    task = task_of(path)
    for resources in task.resources:
        recovery = resources.job_recovery
        assert isinstance(recovery, dict), "job_recovery must be spelled out"
        assert recovery.get("strategy") in ("EAGER_NEXT_REGION", "FAILOVER")
        assert isinstance(recovery.get("max_restarts_on_errors"), int)
        assert PREEMPTED_EXIT_CODE in recovery.get("recover_on_exit_codes", [])


@recipe_params
def test_all_candidates_have_the_same_gpu_count(path):
    # The world size must not change on a recovery: no elastic resume yet.
    task = task_of(path)
    count = gpus_per_node(task)
    if is_trainer_recipe(path):
        assert count >= 1


@recipe_params
def test_spot_candidates(path):
    task = task_of(path)
    spot = [r for r in task.resources if r.use_spot]
    ondemand = [r for r in task.resources if not r.use_spot]
    if "spot" in path.stem or is_trainer_recipe(path):
        assert spot, "no use_spot: true candidate"
    if "fallback" in path.stem:
        assert ondemand, "an on-demand fallback recipe needs on-demand candidates"
        # Each on-demand candidate mirrors a spot one (same cloud and GPU), so for the same
        # hardware the cheaper spot offer is always tried first.
        hardware = {(str(r.cloud), r.accelerators and tuple(r.accelerators.items())) for r in spot}
        for r in ondemand:
            key = (str(r.cloud), r.accelerators and tuple(r.accelerators.items()))
            assert key in hardware, f"on-demand {r} has no spot twin"
    elif spot:
        assert not ondemand, "on-demand candidates only in *fallback* recipes (silent cost)"
        assert len(task.resources) >= 2, "spot needs several candidates to fail over to"


@recipe_params
def test_mount_paths_reach_run_and_setup_only_through_envs(path):
    task = task_of(path)
    targets = mount_targets(task)
    assert targets, "checkpoints must live in a bucket mount"
    env_values = set(task.envs.values())
    for target in targets:
        assert target in env_values, f"mount {target} is not named by any env"
        pattern = re.escape(target) + r"(?![\w.-])"
        assert not re.search(pattern, task.run), f"run: names {target} literally"
        assert not re.search(pattern, task.setup), f"setup: names {target} literally"


@trainer_params
def test_checkpoint_mount_is_mount_cached_bucket_from_env(path):
    task = load(path, CHECKPOINT_BUCKET="my-ckpt-bucket")
    mount = task.storage_mounts[task.envs["CHECKPOINT_DIR"]]
    assert mount.mode == sky.StorageMode.MOUNT_CACHED
    assert mount.name == "my-ckpt-bucket", "bucket name comes from --env CHECKPOINT_BUCKET"
    assert mount.persistent, "checkpoints outlive the job"
    # The final model goes into the bucket too (or it dies with the cluster): OUTPUT_DIR is
    # either empty (the trainer's default, <checkpoint-dir>/<run>/final) or under the mount.
    output_dir = task.envs["OUTPUT_DIR"]
    assert not output_dir or output_dir.startswith(task.envs["CHECKPOINT_DIR"].rstrip("/") + "/")


@trainer_params
def test_overriding_checkpoint_dir_moves_the_mount(path):
    # What a rehearsal (or a user) gets with --env CHECKPOINT_DIR=...: one source of truth.
    task = load(path, CHECKPOINT_DIR="/elsewhere/ckpt")
    assert list(task.storage_mounts) == ["/elsewhere/ckpt"]


# ------------------------------------------------------ run: against the real parsers


@trainer_params
def test_run_launches_the_trainer_with_flags_its_parser_accepts(path, tmp_path):
    task = task_of(path)
    assert "python -m skyspot.launch --" in task.run
    assert task.run.lstrip().startswith("set -euo pipefail")
    ns, train_args, args = run_and_parse(task, tmp_path)

    nodes, gpus = task.num_nodes or 1, gpus_per_node(task)
    assert ns.num_machines == nodes
    assert ns.num_processes == nodes * gpus
    assert ns.multi_gpu == (nodes * gpus > 1)
    assert ns.mixed_precision == task.envs["MIXED_PRECISION"] == args.mixed_precision

    assert "--run-name" not in train_args, "the trainer derives the run name"
    for flag, env in TRAINER_FLAG_ENVS.items():
        assert flag in train_args, f"run: does not pass {flag} (env {env})"
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        expected = task.envs[env]
        assert str(value) == expected or value == type(value)(expected), (flag, value, expected)
    for flag, env in TRAINER_BOOL_ENVS.items():
        dest = flag.lstrip("-").replace("-", "_")
        assert getattr(args, dest) == (task.envs[env].lower() == "true"), flag


@trainer_params
def test_boolean_envs_turn_into_flags(path, tmp_path):
    task = task_of(path)
    on = {env: "true" for env in TRAINER_BOOL_ENVS.values()}
    _, _, args = run_and_parse(task, tmp_path, **on)
    assert args.from_scratch is True and args.async_checkpoint is True
    off = {env: "false" for env in TRAINER_BOOL_ENVS.values()}
    _, train_args, args = run_and_parse(task, tmp_path, **off)
    assert args.from_scratch is False and args.async_checkpoint is False
    assert not set(TRAINER_BOOL_ENVS) & set(train_args)


@trainer_params
def test_a_misspelt_boolean_fails_before_launching(path, tmp_path):
    task = task_of(path)
    proc, calls = execute(task, tmp_path, task.run, env={"FROM_SCRATCH": "yes please"})
    assert proc.returncode != 0
    assert "FROM_SCRATCH" in proc.stderr
    assert not [c for c in calls if c[0].startswith("python")], "launched anyway"


@trainer_params
@pytest.mark.parametrize("code", [PREEMPTED_EXIT_CODE, 1, 0])
def test_run_exits_with_the_wrappers_exit_code(path, tmp_path, code):
    # SkyPilot sees only run:'s exit code; 143 must reach recover_on_exit_codes unchanged.
    task = task_of(path)
    proc, _ = execute(task, tmp_path, task.run, fake_exit=code)
    assert proc.returncode == code, proc.stderr


@trainer_params
@pytest.mark.parametrize("code", [PREEMPTED_EXIT_CODE, 1, 0])
def test_run_falls_through_to_skypilots_mount_cached_flush(path, tmp_path, code):
    """SkyPilot appends to run: a wait for MOUNT_CACHED uploads, then `exit <run:'s status>`.

    The script below is SkyPilot's own (TaskCodeGen.build_task_bash_script) plus one probe
    line. run: must reach it (no `exec`, no errexit abort on 143), with errexit, nounset and
    pipefail off: under pipefail the wait's `tac | grep -m1` pipeline fails with SIGPIPE
    once rclone's log outgrows a pipe buffer, and the job would never finish.
    """
    from sky.backends.task_codegen import TaskCodeGen

    task = task_of(path)
    script = TaskCodeGen.build_task_bash_script(task.run)
    hook = "__skypilot_user_exit_code=$?\n"
    assert hook in script, "SkyPilot's appended flush script changed; update this test"
    probe = tmp_path / "probe"
    script = script.replace(hook, f'{hook}echo "$-:$SHELLOPTS" > "{probe}"\n', 1)
    proc, _ = execute(task, tmp_path, script, fake_exit=code)
    assert proc.returncode == code, proc.stderr
    assert probe.exists(), "run: ended before SkyPilot's upload wait (exec? set -e?)"
    flags, options = probe.read_text().strip().split(":", 1)
    assert "e" not in flags and "u" not in flags, f"errexit/nounset still on: {flags}"
    assert "pipefail" not in options.split(":"), "pipefail still on"


@trainer_params
@pytest.mark.parametrize("gpus", [0, 1, 4])
def test_processes_per_node_follow_skypilot_gpus(path, tmp_path, gpus):
    task = task_of(path)
    nodes = task.num_nodes or 1
    ns, _, _ = run_and_parse(task, tmp_path, SKYPILOT_NUM_GPUS_PER_NODE=str(gpus))
    per_node = max(gpus, 1)  # 0 GPUs (a CPU rehearsal): one process per node
    assert ns.num_processes == nodes * per_node
    assert ns.multi_gpu == (nodes * per_node > 1), "accelerate needs --multi_gpu for >1 process"


# -------------------------------------------------------------------------- multi-node


MULTINODE = REPO / "recipes" / "train-lm-multinode.yaml"


def test_multinode_has_two_nodes():
    assert task_of(MULTINODE).num_nodes == 2


@pytest.mark.parametrize("rank", [0, 1])
def test_multinode_accelerate_args_come_from_skypilot(tmp_path, rank):
    task = task_of(MULTINODE)
    ns, _, args = run_and_parse(
        task,
        tmp_path,
        SKYPILOT_NODE_IPS="10.0.0.1\n10.0.0.2",
        SKYPILOT_NODE_RANK=str(rank),
        SKYPILOT_NUM_NODES="2",
        SKYPILOT_NUM_GPUS_PER_NODE="8",
    )
    assert ns.num_machines == 2
    assert ns.machine_rank == rank
    assert ns.main_process_ip == "10.0.0.1"
    assert ns.main_process_port == int(task.envs["MASTER_PORT"])
    assert ns.num_processes == 16
    assert ns.multi_gpu is True
    assert str(args.checkpoint_dir) == task.envs["CHECKPOINT_DIR"]


def test_multinode_master_port_is_a_knob(tmp_path):
    task = task_of(MULTINODE)
    ns, _, _ = run_and_parse(task, tmp_path, MASTER_PORT="41234")
    assert ns.main_process_port == 41234
