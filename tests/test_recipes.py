"""The recipes in recipes/*.yaml: SkyPilot accepts them, and what they run is what we mean.

Every recipe is loaded the way ``sky jobs launch recipes/X.yaml --env NAME=value`` loads it
(``sky.utils.dag_utils.load_chain_dag_from_yaml`` with env overrides, which ends in
``sky.Task.from_yaml_config``): no mocks, no cloud. A recipe is one task, a pipeline (one
YAML document per task, after a ``name:``-only header; ``--env`` applies to every task) or
a pool (``pool:``, for ``sky jobs pool apply``: workers, resources, setup, no run). Then each
task's ``run:`` and ``setup:`` are executed for real by bash, with fake ``python``/``uv``/
``pip`` executables first on PATH that record their argv; the recorded ``accelerate launch``
line is parsed by accelerate's own parser, the trainer's arguments by
``train.lm.build_parser()`` and ``preprocess/tokenize.py``'s by its own ``parse_config``,
and the commands in each header by SkyPilot's own CLI, so an unknown or renamed flag fails
here instead of on a cloud VM an hour into a launch.

Nothing here may reach the network: an autouse fixture turns any TCP/UDP connect into a
test failure.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shlex
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import click
import pytest
import sky
import yaml
from sky.utils import dag_utils

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
TRAINER = REPO / "train" / "lm.py"
TOKENIZE = REPO / "preprocess" / "tokenize.py"
PREEMPTED_EXIT_CODE = 143

# Recipe env -> train/lm.py flag, for every valued flag of the trainer's contract
# (--run-name is derived by the trainer and must not be passed; booleans are below).
# --dataset is DATASET, or in a pipeline the preprocess task's output (see trainer_expects).
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
# An elastic recipe (run: passes --elastic) may land on another GPU count at every recovery,
# so it passes the global batch (sequences per optimizer step) instead of --grad-accum: the
# trainer derives grad-accum = GLOBAL_BATCH / (BATCH_SIZE x processes) on whatever it gets.
ELASTIC_FLAG_ENVS = {"--global-batch": "GLOBAL_BATCH"}

# Recipe env -> preprocess/tokenize.py flag. --output-dir is $DATA_DIR/$OUTPUT_NAME, in the
# bucket; --tokenizer is TOKENIZER, or MODEL in a pipeline (one --env MODEL=... sets both
# tasks). Every other field of its Config is left to the script on purpose:
PREPROCESS_FLAG_ENVS = {
    "--dataset": "DATASET",
    "--text-column": "TEXT_COLUMN",
    "--seq-len": "SEQ_LEN",
    "--unit-rows": "UNIT_ROWS",
    "--num-proc": "NUM_PROC",
    "--durable-wait-seconds": "DURABLE_WAIT_SECONDS",
    "--notice-poll-seconds": "NOTICE_POLL_SECONDS",
}
# A pool's SKYPILOT_JOB_RANK/SKYPILOT_NUM_JOBS pick the share; passing them would override.
PREPROCESS_LEFT_TO_THE_SCRIPT = {"--shard-index", "--num-shards"}

# Options of pip / uv pip that take a value (the value is not a package spec).
_PIP_VALUE_OPTIONS = set(
    "-i --index-url --extra-index-url -f --find-links -c --constraint -p --python --target"
    " --prefix".split()
)

# A command in a recipe's header: `# sky jobs launch ...` or `# sky jobs pool apply ...`.
_HEADER_COMMAND = re.compile(r"^#\s*(sky jobs (?:launch|pool apply)\s.*)$", re.M)

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
def documents(path: Path) -> tuple[dict, ...]:
    """The task documents of a recipe: its one mapping, or a pipeline's documents after its
    header (a first document holding only `name:`, as sky.utils.dag_utils reads it)."""
    docs = [d for d in yaml.safe_load_all(raw_text(path)) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), f"{path.name}: not YAML mappings"
    if len(docs) > 1 and set(docs[0]) <= {"name", "execution"}:
        docs = docs[1:]
    return tuple(docs)


def is_pipeline(path: Path) -> bool:
    return len(documents(path)) > 1


def required_envs(path: Path) -> list[str]:
    """Envs with a null value in any task: the user must pass them with --env."""
    names = [k for doc in documents(path) for k, v in (doc.get("envs") or {}).items() if v is None]
    return list(dict.fromkeys(names))


def declared_envs(path: Path) -> set[str]:
    return {k for doc in documents(path) for k in doc.get("envs") or {}}


def load_all(path: Path, **overrides: str) -> list[sky.Task]:
    """Load like `sky jobs launch <path> --env K=V ...`: required envs get test values."""
    envs = {k: f"skyspot-test-{k.lower().replace('_', '-')}" for k in required_envs(path)}
    envs.update(overrides)
    dag = dag_utils.load_chain_dag_from_yaml(str(path), env_overrides=list(envs.items()))
    assert len(dag.tasks) == len(documents(path)), f"{path.name}: {dag.tasks}"
    return dag.tasks


def load(path: Path, **overrides: str) -> sky.Task:
    (task,) = load_all(path, **overrides)
    return task


@functools.cache
def task_of(path: Path) -> sky.Task:
    return load(path)


class Case(NamedTuple):
    """One task of one recipe: the recipe, and the task's index in it."""

    path: Path
    index: int = 0

    @property
    def doc(self) -> dict:
        return documents(self.path)[self.index]

    @property
    def id(self) -> str:
        if not is_pipeline(self.path):
            return self.path.stem
        return f"{self.path.stem}[{self.index}:{self.doc.get('name')}]"

    def load(self, **overrides: str) -> sky.Task:
        return load_all(self.path, **overrides)[self.index]


@functools.cache
def task_at(case: Case) -> sky.Task:
    return case.load()


def is_pool(case: Case) -> bool:
    return "pool" in case.doc


def is_trainer(case: Case) -> bool:
    return "train/lm.py" in (case.doc.get("run") or "")


def is_elastic(case: Case) -> bool:
    """A trainer whose run: passes --elastic: it may resume on another number of processes
    (the test of its run: checks the parsed flag agrees)."""
    return is_trainer(case) and bool(re.search(r"(?<![\w-])--elastic(?![\w-])", case.doc["run"]))


def is_preprocess(case: Case) -> bool:
    return "preprocess/tokenize.py" in (case.doc.get("run") or "")


def is_infer(case: Case) -> bool:
    """Batch inference on a GPU (infer/generate.py, infer/embed.py); test_infer_rehearsed.py
    parses its run: with the scripts' own parsers."""
    return bool(re.search(r"\binfer/(generate|embed)\.py\b", case.doc.get("run") or ""))


def uses_gpus(case: Case) -> bool:
    """A trainer or an inference job, or a pool whose header launches one on its workers."""
    if is_pool(case):
        return any(uses_gpus(Case(c.recipe)) for c in header_commands(case.path)
                   if c.verb == "launch" and c.recipe != case.path)
    return is_trainer(case) or is_infer(case)


def header_of(path: Path) -> str:
    lines = []
    for line in raw_text(path).splitlines():
        if line.strip() and not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


class Command(NamedTuple):
    """A `sky jobs launch` / `sky jobs pool apply` line, as SkyPilot's own CLI parses it."""

    line: str
    verb: str  # "launch" or "pool apply"
    recipe: Path
    envs: list[tuple[str, str]]
    params: dict


def parse_command(line: str) -> Command:
    from sky.client.cli import command as sky_cli

    words = shlex.split(re.sub(r"\[[^\]]*\]", "", line))  # [--secret HF_TOKEN]: optional
    ctx = click.Context(sky_cli.cli, info_name="sky")
    jobs = sky_cli.cli.get_command(ctx, "jobs")
    ctx = click.Context(jobs, info_name="jobs", parent=ctx)
    if words[:3] == ["sky", "jobs", "launch"]:
        verb, command, args = "launch", jobs.get_command(ctx, "launch"), words[3:]
    else:
        assert words[:4] == ["sky", "jobs", "pool", "apply"], line
        pool = jobs.get_command(ctx, "pool")
        ctx = click.Context(pool, info_name="pool", parent=ctx)
        verb, command, args = "pool apply", pool.get_command(ctx, "apply"), words[4:]
    try:
        params = command.make_context(verb.split()[-1], args, parent=ctx).params
    except click.ClickException as exc:
        pytest.fail(f"SkyPilot's CLI rejects `{line}`: {exc.format_message()}")
    (recipe,) = params["entrypoint" if verb == "launch" else "pool_yaml"]
    return Command(line, verb, REPO / recipe, list(params["env"]), params)


def header_commands(path: Path) -> list[Command]:
    return [parse_command(m[1]) for m in _HEADER_COMMAND.finditer(header_of(path))]


def gpu_count(resources) -> int:
    return int(sum((resources.accelerators or {}).values()))


def gpu_counts(task: sky.Task) -> list[int]:
    """The GPUs per node of the task's candidates, each count once, smallest first."""
    return sorted({gpu_count(r) for r in task.resources})


def mount_targets(task: sky.Task) -> list[str]:
    return [*task.storage_mounts, *(task.file_mounts or {})]


def mount_under(task: sky.Task, path: str):
    """(mount path, Storage) of the bucket mount that holds `path`, or None."""
    for target, storage in task.storage_mounts.items():
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return target, storage
    return None


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
        # An elastic recipe's candidates differ: the biggest (tests pass the others).
        "SKYPILOT_NUM_GPUS_PER_NODE": str(max(gpu_counts(task))),
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


def trainer_flag_envs(case: Case) -> dict[str, str]:
    """Trainer flag -> recipe env, every one of which the task's run: must pass."""
    if not is_elastic(case):
        return TRAINER_FLAG_ENVS
    fixed = {f: e for f, e in TRAINER_FLAG_ENVS.items() if f != "--grad-accum"}
    return {**fixed, **ELASTIC_FLAG_ENVS}


def trainer_expects(case: Case, flag: str) -> str:
    """The value a trainer task's run: must pass for `flag`, from its envs."""
    task = task_at(case)
    if flag == "--dataset" and "DATASET" not in task.envs:  # a pipeline's: the preprocessed
        return f"{task.envs['DATA_DIR']}/{task.envs['OUTPUT_NAME']}"
    return task.envs[trainer_flag_envs(case)[flag]]


@functools.cache
def preprocess_module():
    """preprocess/tokenize.py, imported by path under another name: its file name is the
    standard library's `tokenize`, which `import tokenize` must keep meaning."""
    if not TOKENIZE.exists():
        pytest.fail(f"{TOKENIZE.relative_to(REPO)} does not exist (its flags are the contract)")
    spec = importlib.util.spec_from_file_location("skyspot_recipes_test_tokenize", TOKENIZE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def preprocessed(task: sky.Task, tmp_path: Path, **env: str) -> tuple[list[str], object]:
    """Run a preprocess task's run: with fakes: (tokenize.py's argv, its parsed Config)."""
    proc, calls = execute(task, tmp_path, task.run, env=env)
    assert proc.returncode == 0, proc.stderr
    pythons = [c[1:] for c in calls if c[0] in ("python", "python3")]
    assert len(pythons) == 1, f"expected one python call in run:, got {pythons}"
    (argv,) = pythons
    assert argv[0] == "preprocess/tokenize.py", argv
    module = preprocess_module()
    try:
        cfg = module.parse_config(argv[1:])
    except SystemExit as exc:  # argparse error (details on stderr, shown by pytest)
        pytest.fail(
            f"preprocess/tokenize.py rejects the recipe's arguments (exit {exc.code}): {argv}"
        )
    except module.ConfigError as err:
        pytest.fail(f"preprocess/tokenize.py rejects the recipe's values: {err}: {argv}")
    return argv[1:], cfg


def flag_value(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} passed {args.count(flag)} times: {args}"
    return args[args.index(flag) + 1]


def _params(cases: list[Case]):
    return pytest.mark.parametrize("case", cases, ids=[c.id for c in cases])


CASES = [Case(p, i) for p in RECIPES for i in range(len(documents(p)))]
JOBS = [c for c in CASES if not is_pool(c)]
TRAINERS = [c for c in CASES if is_trainer(c)]
ELASTIC = [c for c in TRAINERS if is_elastic(c)]
PREPROCESSORS = [c for c in CASES if is_preprocess(c)]
POOLS = [c for c in CASES if is_pool(c)]
PIPELINES = [p for p in RECIPES if is_pipeline(p)]

recipe_params = pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
task_params = _params(CASES)
job_params = _params(JOBS)
trainer_params = _params(TRAINERS)
elastic_params = _params(ELASTIC)
preprocess_params = _params(PREPROCESSORS)
pool_params = _params(POOLS)
cpu_params = _params([c for c in CASES if not uses_gpus(c)])


# ------------------------------------------------------------------------- every recipe


def test_the_recipes_exist():
    names = {p.name for p in RECIPES}
    for name in (
        "train-lm-spot.yaml",
        "train-lm-spot-ondemand-fallback.yaml",
        "train-lm-multinode.yaml",
        "train-lm-fsdp.yaml",
        "train-lm-elastic.yaml",
        "preprocess-tokenize.yaml",
        "preprocess-tokenize-pool.yaml",
        "pretrain-pipeline.yaml",
    ):
        assert name in names
    # Every task is something this file checks the run: of (or a pool, which has none).
    for case in CASES:
        assert is_trainer(case) or is_preprocess(case) or is_infer(case) or is_pool(case), (
            case.id
        )


@recipe_params
def test_loads_with_skypilot_and_required_envs_are_enforced(path):
    required = required_envs(path)
    if required:
        # No --env: SkyPilot itself refuses a null env.
        with pytest.raises(ValueError, match=required[0]):
            dag_utils.load_chain_dag_from_yaml(str(path))
    else:
        dag_utils.load_chain_dag_from_yaml(str(path))
    for task in load_all(path):
        assert task.name, "every task needs a name:"
        assert task.workdir == ".", "workdir: . (run: executes in the repo root)"
        assert task.setup


@task_params
def test_a_pool_has_no_run_and_satisfies_skypilots_pool_rules(case):
    from sky.serve import serve_utils

    task = task_at(case)
    if not is_pool(case):
        assert task.run and task.service is None
        return
    assert task.service is not None and task.service.pool
    assert not task.run, "a pool's run: is ignored by SkyPilot: the job YAML holds it"
    # What `sky jobs pool apply` checks: no job_recovery, all candidates spot or none, ...
    serve_utils.validate_service_task(task, pool=True)


@recipe_params
def test_header_says_what_hardware_time_cost_and_how_to_launch(path):
    header = header_of(path)
    assert header.startswith("#"), "a recipe opens with a comment header"
    for word in ("hardware", "time", "cost"):
        assert word in header.lower(), f"header does not mention {word}"
    assert re.search(r"\$\s?\d", header), "header gives no $ figure"
    assert re.search(r"(\d|/h)\s*(x|×)\s*~?\$?\d", header), "no cost arithmetic ($/h x h)"
    commands = header_commands(path)
    assert any(c.recipe == path for c in commands), (
        f"header has no `# sky jobs launch` / `# sky jobs pool apply` line for {path.name}"
    )
    for command in commands:
        # SkyPilot's CLI took the line; now the recipe it names takes its --env values.
        assert command.recipe.is_file(), f"`{command.line}`: no such recipe"
        unknown = [k for k, _ in command.envs if k not in declared_envs(command.recipe)]
        assert not unknown, f"`{command.line}`: {command.recipe.name} declares no {unknown}"
        for name in required_envs(command.recipe):
            assert name in dict(command.envs), f"`{command.line}` does not pass {name}"
        dag_utils.load_chain_dag_from_yaml(str(command.recipe), env_overrides=command.envs)


@recipe_params
def test_every_env_has_an_inline_comment(path):
    lines = raw_text(path).splitlines()
    starts = [i + 1 for i, line in enumerate(lines) if re.match(r"^envs:\s*(#.*)?$", line)]
    assert len(starts) == sum(1 for doc in documents(path) if doc.get("envs")), "knobs: envs:"
    commented = {}
    for start in starts:  # one envs: block per task document
        for line in lines[start:]:
            if line.strip() and not line[0].isspace() and not line.startswith("#"):
                break
            match = re.match(r"^\s+([A-Za-z_][A-Za-z0-9_]*):(.*)$", line)
            if match:
                commented.setdefault(match[1], []).append(bool(re.search(r"\s#\s*\S", match[2])))
    for doc in documents(path):
        assert doc.get("envs"), "knobs live in envs:"
    for name in declared_envs(path):
        assert commented.get(name) and all(commented[name]), (
            f"env {name} has no inline comment (meaning, units)"
        )


@job_params
def test_hf_token_is_a_secret_without_a_committed_value(case):
    task = task_at(case)
    refs = {ref.name for ref in task.managed_secret_refs}
    assert "HF_TOKEN" in task.secrets or "HF_TOKEN" in refs
    assert "HF_TOKEN" not in task.envs, "tokens go in secrets:, not envs:"
    for name, value in task.secrets.items():
        assert value.get_secret_value() == "", f"secret {name} has a value in the recipe"


@task_params
def test_setup_pins_what_it_installs(case, tmp_path):
    task = task_at(case)
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


@job_params
def test_job_recovery_relaunches_on_a_preemption_save(case):
    task = task_at(case)
    for resources in task.resources:
        recovery = resources.job_recovery
        assert isinstance(recovery, dict), "job_recovery must be spelled out"
        assert recovery.get("strategy") in ("EAGER_NEXT_REGION", "FAILOVER")
        assert isinstance(recovery.get("max_restarts_on_errors"), int)
        assert PREEMPTED_EXIT_CODE in recovery.get("recover_on_exit_codes", [])


@task_params
def test_candidates_gpu_counts(case):
    # A recovery picks again among all candidates, by price: the world size may change only
    # where the trainer resumes elastically (--elastic). Any other trainer refuses a
    # checkpoint written by another number of processes, so its candidates share one count.
    task = task_at(case)
    counts = gpu_counts(task)
    if is_trainer(case):
        assert min(counts) >= 1
        if not is_elastic(case):
            assert len(counts) == 1, f"GPU counts {counts} differ and run: passes no --elastic"
    elif uses_gpus(case):  # batch inference (or its pool): one GPU per job, one engine
        assert counts == [1]
    else:  # tokenizing is CPU work: a GPU there would be paid for and idle
        assert counts == [0]


@elastic_params
def test_elastic_global_batch_divides_on_every_candidate(case, tmp_path):
    # The trainer keeps GLOBAL_BATCH on any world size by deriving grad-accum =
    # GLOBAL_BATCH / (BATCH_SIZE x processes), and refuses a world size where that is not a
    # whole number: every candidate the job can recover onto must give one.
    task = task_at(case)
    nodes = task.num_nodes or 1
    global_batch, batch = int(task.envs["GLOBAL_BATCH"]), int(task.envs["BATCH_SIZE"])
    for gpus in gpu_counts(task):
        processes = nodes * gpus
        assert global_batch % (batch * processes) == 0, (
            f"GLOBAL_BATCH {global_batch} is not a multiple of BATCH_SIZE {batch} x "
            f"{processes} processes ({nodes} node(s) x {gpus} GPUs)")
        ns, train_args, args = run_and_parse(
            task, tmp_path, SKYPILOT_NUM_GPUS_PER_NODE=str(gpus))
        assert ns.num_processes == processes
        assert args.elastic and args.global_batch == global_batch and args.batch_size == batch
        assert "--grad-accum" not in train_args, "derived from the global batch: not passed"


def test_the_elastic_recipe_mixes_gpu_counts():
    # Its point: more spot capacity to recover onto, at 4 GPUs or 8.
    case = Case(REPO / "recipes" / "train-lm-elastic.yaml")
    assert is_elastic(case) and len(gpu_counts(task_at(case))) > 1


def test_the_fsdp_recipe_shards_its_state_over_8_gpus(tmp_path):
    # 7.62e9 params x 16 B (fp32 weights, grads, two AdamW moments) = ~122 GB: it fits
    # 8 x 80 GB GPUs only sharded, and FSDP takes bf16 (the trainer refuses fp16).
    task = task_of(REPO / "recipes" / "train-lm-fsdp.yaml")
    _, _, args = run_and_parse(task, tmp_path)
    assert args.fsdp and not args.elastic and args.mixed_precision == "bf16"
    assert gpu_counts(task) == [8]


@task_params
def test_spot_candidates(case):
    task = task_at(case)
    spot = [r for r in task.resources if r.use_spot]
    ondemand = [r for r in task.resources if not r.use_spot]
    assert spot, "no use_spot: true candidate"
    if "fallback" in case.path.stem:
        assert ondemand, "an on-demand fallback recipe needs on-demand candidates"
        # Each on-demand candidate mirrors a spot one (same cloud and GPU), so for the same
        # hardware the cheaper spot offer is always tried first.
        hardware = {(str(r.cloud), r.accelerators and tuple(r.accelerators.items())) for r in spot}
        for r in ondemand:
            key = (str(r.cloud), r.accelerators and tuple(r.accelerators.items()))
            assert key in hardware, f"on-demand {r} has no spot twin"
    else:
        assert not ondemand, "on-demand candidates only in *fallback* recipes (silent cost)"
        assert len(task.resources) >= 2, "spot needs several candidates to fail over to"


@cpu_params
def test_cpu_tasks_take_spot_cpu_boxes_on_several_clouds(case):
    task = task_at(case)
    for r in task.resources:
        assert r.accelerators is None and r.use_spot, r
        assert r.cpus and float(r.cpus.rstrip("+")) >= 8, f"{r}: too few vCPUs to fan out"
    assert len({str(r.cloud) for r in task.resources}) >= 3, "AWS, GCP and Azure candidates"


@task_params
def test_mount_paths_reach_run_and_setup_only_through_envs(case):
    task = task_at(case)
    targets = mount_targets(task)
    assert targets, "checkpoints and data live in bucket mounts"
    env_values = set(task.envs.values())
    for target in targets:
        assert target in env_values, f"mount {target} is not named by any env"
        pattern = re.escape(target) + r"(?![\w.-])"
        assert not re.search(pattern, task.run or ""), f"run: names {target} literally"
        assert not re.search(pattern, task.setup), f"setup: names {target} literally"


@task_params
def test_overriding_a_mount_path_env_moves_the_mount(case):
    # What a rehearsal (or a user) gets with --env CHECKPOINT_DIR=...: one source of truth.
    task = task_at(case)
    for target, storage in task.storage_mounts.items():
        (env,) = [k for k, v in task.envs.items() if v == target]
        moved = case.load(**{env: f"/elsewhere/{env.lower()}"})
        assert f"/elsewhere/{env.lower()}" in moved.storage_mounts, env
        assert target not in moved.storage_mounts, env
        assert moved.storage_mounts[f"/elsewhere/{env.lower()}"].name == storage.name


@trainer_params
def test_checkpoint_mount_is_mount_cached_bucket_from_env(case):
    task = case.load(CHECKPOINT_BUCKET="my-ckpt-bucket")
    mount = task.storage_mounts[task.envs["CHECKPOINT_DIR"]]
    assert mount.mode == sky.StorageMode.MOUNT_CACHED
    assert mount.name == "my-ckpt-bucket", "bucket name comes from --env CHECKPOINT_BUCKET"
    assert mount.persistent, "checkpoints outlive the job"
    # The final model goes into the bucket too (or it dies with the cluster): OUTPUT_DIR is
    # either empty (the trainer's default, <checkpoint-dir>/<run>/final) or under the mount.
    output_dir = task.envs["OUTPUT_DIR"]
    assert not output_dir or output_dir.startswith(task.envs["CHECKPOINT_DIR"].rstrip("/") + "/")


@preprocess_params
def test_preprocess_output_goes_to_a_persistent_mount_cached_bucket(case, tmp_path):
    task = case.load(DATA_BUCKET="my-data-bucket")
    args, cfg = preprocessed(task, tmp_path)
    found = mount_under(task, cfg.output_dir)
    assert found, f"--output-dir {cfg.output_dir} is on the VM's disk: it dies with the VM"
    target, mount = found
    assert cfg.output_dir != target, "the output is a subdir (OUTPUT_NAME) of the bucket"
    assert mount.name == "my-data-bucket", "bucket name comes from --env DATA_BUCKET"
    assert mount.mode == sky.StorageMode.MOUNT_CACHED
    assert mount.persistent, "the tokenized data outlives the job"
    config = mount.resolve_mount_cached_config()
    assert not (config and config.read_only), "the preprocess task writes the bucket"


# ------------------------------------------------------ run: against the real parsers


@trainer_params
def test_run_launches_the_trainer_with_flags_its_parser_accepts(case, tmp_path):
    task = task_at(case)
    assert "python -m skyspot.launch --" in task.run
    nodes = task.num_nodes or 1
    for gpus in gpu_counts(task):  # one count, or an elastic recipe's several
        ns, train_args, args = run_and_parse(task, tmp_path, SKYPILOT_NUM_GPUS_PER_NODE=str(gpus))

        assert ns.num_machines == nodes
        assert ns.num_processes == nodes * gpus
        assert ns.multi_gpu == (nodes * gpus > 1)
        assert ns.mixed_precision == task.envs["MIXED_PRECISION"] == args.mixed_precision

        assert "--run-name" not in train_args, "the trainer derives the run name"
        assert args.elastic == is_elastic(case), "--elastic as the parser reads it"
        for flag in trainer_flag_envs(case):
            assert flag in train_args, f"run: does not pass {flag}"
            value = getattr(args, flag.lstrip("-").replace("-", "_"))
            expected = trainer_expects(case, flag)
            assert str(value) == expected or value == type(value)(expected), (
                flag, value, expected)
        for flag, env in TRAINER_BOOL_ENVS.items():
            dest = flag.lstrip("-").replace("-", "_")
            assert getattr(args, dest) == (task.envs[env].lower() == "true"), flag


@preprocess_params
def test_run_tokenizes_with_flags_the_scripts_parser_accepts(case, tmp_path):
    task = task_at(case)
    args, cfg = preprocessed(task, tmp_path, SKYPILOT_JOB_RANK="1", SKYPILOT_NUM_JOBS="4")
    fields = {"--" + name.replace("_", "-") for name in vars(cfg)}
    contract = set(PREPROCESS_FLAG_ENVS) | {"--tokenizer", "--output-dir"}
    # A flag added to tokenize.py fails here until the recipes pass it or leave it on purpose.
    assert fields == contract | PREPROCESS_LEFT_TO_THE_SCRIPT, fields ^ (
        contract | PREPROCESS_LEFT_TO_THE_SCRIPT
    )
    for flag, env in PREPROCESS_FLAG_ENVS.items():
        value = getattr(cfg, flag.lstrip("-").replace("-", "_"))
        assert flag_value(args, flag) == task.envs[env], flag
        assert value == type(value)(task.envs[env]), (flag, value, task.envs[env])
    assert cfg.tokenizer == task.envs.get("TOKENIZER", task.envs.get("MODEL")) != ""
    assert cfg.output_dir == f"{task.envs['DATA_DIR']}/{task.envs['OUTPUT_NAME']}"
    # The worker's share comes from SkyPilot (SKYPILOT_JOB_RANK/NUM_JOBS), not from run:.
    assert not PREPROCESS_LEFT_TO_THE_SCRIPT & set(args)
    assert (cfg.shard_index, cfg.num_shards) == (-1, 0)


@trainer_params
def test_boolean_envs_turn_into_flags(case, tmp_path):
    task = task_at(case)
    on = {env: "true" for env in TRAINER_BOOL_ENVS.values()}
    _, _, args = run_and_parse(task, tmp_path, **on)
    assert args.from_scratch is True and args.async_checkpoint is True
    off = {env: "false" for env in TRAINER_BOOL_ENVS.values()}
    _, train_args, args = run_and_parse(task, tmp_path, **off)
    assert args.from_scratch is False and args.async_checkpoint is False
    assert not set(TRAINER_BOOL_ENVS) & set(train_args)


@trainer_params
def test_a_misspelt_boolean_fails_before_launching(case, tmp_path):
    task = task_at(case)
    proc, calls = execute(task, tmp_path, task.run, env={"FROM_SCRATCH": "yes please"})
    assert proc.returncode != 0
    assert "FROM_SCRATCH" in proc.stderr
    assert not [c for c in calls if c[0].startswith("python")], "launched anyway"


@job_params
@pytest.mark.parametrize("code", [PREEMPTED_EXIT_CODE, 1, 0])
def test_run_exits_with_the_scripts_exit_code(case, tmp_path, code):
    # SkyPilot sees only run:'s exit code; 143 must reach recover_on_exit_codes unchanged.
    task = task_at(case)
    assert task.run.lstrip().startswith("set -euo pipefail")
    proc, calls = execute(task, tmp_path, task.run, fake_exit=code)
    assert proc.returncode == code, proc.stderr
    assert [c for c in calls if c[0] in ("python", "python3")], "run: ran no python"


@job_params
@pytest.mark.parametrize("code", [PREEMPTED_EXIT_CODE, 1, 0])
def test_run_falls_through_to_skypilots_mount_cached_flush(case, tmp_path, code):
    """SkyPilot appends to run: a wait for MOUNT_CACHED uploads, then `exit <run:'s status>`.

    The script below is SkyPilot's own (TaskCodeGen.build_task_bash_script) plus one probe
    line. run: must reach it (no `exec`, no errexit abort on 143), with errexit, nounset and
    pipefail off: under pipefail the wait's `tac | grep -m1` pipeline fails with SIGPIPE
    once rclone's log outgrows a pipe buffer, and the job would never finish.
    """
    from sky.backends.task_codegen import TaskCodeGen

    task = task_at(case)
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
def test_processes_per_node_follow_skypilot_gpus(case, tmp_path, gpus):
    task = task_at(case)
    nodes = task.num_nodes or 1
    ns, _, _ = run_and_parse(task, tmp_path, SKYPILOT_NUM_GPUS_PER_NODE=str(gpus))
    per_node = max(gpus, 1)  # 0 GPUs (a CPU rehearsal): one process per node
    assert ns.num_processes == nodes * per_node
    assert ns.multi_gpu == (nodes * per_node > 1), "accelerate needs --multi_gpu for >1 process"


# ---------------------------------------------------------------------------- pipeline


PIPELINE = REPO / "recipes" / "pretrain-pipeline.yaml"


def test_pipeline_preprocesses_then_trains():
    dag = dag_utils.load_chain_dag_from_yaml(
        str(PIPELINE), env_overrides=[(k, "b") for k in required_envs(PIPELINE)]
    )
    assert dag.name and dag.is_chain()
    preprocess, train = dag.tasks  # in this order: a chain runs them one after the other
    assert [is_preprocess(Case(PIPELINE, 0)), is_trainer(Case(PIPELINE, 1))] == [True, True]
    assert list(dag.graph.successors(preprocess)) == [train]
    for task in dag.tasks:  # each task recovers from a preemption save on its own
        for resources in task.resources:
            assert PREEMPTED_EXIT_CODE in resources.job_recovery["recover_on_exit_codes"]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "DATA_DIR": "/mnt/tok",
            "OUTPUT_NAME": "other-2048",
            "SEQ_LEN": "2048",
            "MODEL": "org/other-model",
            "TEXT_COLUMN": "story",
            "DATA_BUCKET": "my-data",
        },
    ],
    ids=["defaults", "overridden"],
)
def test_pipeline_trains_on_what_it_preprocessed(tmp_path, overrides):
    # `--env` goes to every task: one override moves both sides together.
    preprocess, train = load_all(PIPELINE, **overrides)
    (tmp_path / "pre").mkdir()
    (tmp_path / "train").mkdir()
    args, cfg = preprocessed(preprocess, tmp_path / "pre")
    _, train_args, trained = run_and_parse(train, tmp_path / "train")
    assert trained.dataset == cfg.output_dir, "the trainer reads the preprocessed dir"
    assert trained.seq_len == cfg.seq_len, "the manifest's seq_len must equal --seq-len"
    assert trained.model == cfg.tokenizer, "the manifest's tokenizer must be the model's"
    assert trained.text_column == cfg.text_column
    # Both tasks mount the same bucket at the same path: the data the first one wrote.
    (pre_target, pre_mount) = mount_under(preprocess, cfg.output_dir)
    (train_target, train_mount) = mount_under(train, trained.dataset)
    assert (pre_target, pre_mount.name) == (train_target, train_mount.name)
    assert train_mount.persistent, "the data bucket must outlive the training task too"
    config = train_mount.resolve_mount_cached_config()
    assert config is not None and config.read_only, "training only reads the data"
    for key, value in overrides.items():
        assert preprocess.envs[key] == train.envs[key] == value


def test_pipeline_tasks_agree_on_the_envs_they_share():
    first, second = (doc.get("envs") or {} for doc in documents(PIPELINE))
    shared = set(first) & set(second)
    assert {"MODEL", "SEQ_LEN", "TEXT_COLUMN", "DATA_BUCKET", "DATA_DIR", "OUTPUT_NAME"} <= shared
    for name in shared:
        assert first[name] == second[name], f"{name}: {first[name]!r} != {second[name]!r}"


def test_train_header_points_dataset_at_what_its_preprocess_line_writes():
    # train-lm-spot.yaml's header: preprocess into the checkpoint bucket, then train with
    # DATASET=<that output, seen through the checkpoint mount>. Both lines, as launched.
    spot = REPO / "recipes" / "train-lm-spot.yaml"
    commands = header_commands(spot)
    (pre,) = [c for c in commands if c.recipe.name == "preprocess-tokenize.yaml"]
    (train,) = [c for c in commands if c.recipe == spot and "DATASET" in dict(c.envs)]
    pre_task, train_task = load(pre.recipe, **dict(pre.envs)), load(spot, **dict(train.envs))
    output = f"{pre_task.envs['DATA_DIR']}/{pre_task.envs['OUTPUT_NAME']}"
    pre_target, pre_mount = mount_under(pre_task, output)
    dataset = train_task.envs["DATASET"]
    assert mount_under(train_task, dataset), f"DATASET={dataset} is not in a bucket mount"
    train_target, train_mount = mount_under(train_task, dataset)
    assert train_mount.name == pre_mount.name, "not the bucket the preprocess line wrote"
    assert dataset[len(train_target) :] == output[len(pre_target) :], (dataset, output)


# -------------------------------------------------------------------------------- pools


@pool_params
def test_a_pool_runs_its_job_yaml_on_the_same_machines_setup_and_mounts(case):
    """SkyPilot ignores a pool job's setup: and file_mounts:, and places it on the pool's
    workers: the job YAML (which also launches alone) must ask for what the pool gives."""
    pool = case.doc
    jobs = [c.recipe for c in header_commands(case.path) if c.verb == "launch"]
    assert jobs, "the pool's header names the job YAML to launch on it"
    for job_path in jobs:
        (job,) = documents(job_path)
        assert job["setup"] == pool["setup"], f"{job_path.name}: another setup: than the pool"
        assert job["file_mounts"] == pool["file_mounts"], f"{job_path.name}: other mounts"
        job_resources = {k: v for k, v in job["resources"].items() if k != "job_recovery"}
        assert job_resources == pool["resources"], f"{job_path.name}: other resources"
        assert job.get("workdir") == pool.get("workdir")
        for name, value in pool["envs"].items():  # the mount path and venv the job reads
            assert job["envs"].get(name, "missing") == value, name


def test_pool_commands_agree_on_the_pool_name_and_job_count():
    pool_path = REPO / "recipes" / "preprocess-tokenize-pool.yaml"
    (pool,) = documents(pool_path)
    commands = header_commands(pool_path) + header_commands(
        REPO / "recipes" / "preprocess-tokenize.yaml"
    )
    applies = [c for c in commands if c.verb == "pool apply"]
    launches = [c for c in commands if c.verb == "launch" and c.params.get("pool")]
    assert applies and launches
    names = {c.params["pool"] for c in applies} | {c.params["pool"] for c in launches}
    assert len(names) == 1, f"the commands name different pools: {names}"
    for command in launches:  # one job per worker: each job uses a whole VM's vCPUs
        assert command.params["num_jobs"] == pool["pool"]["workers"], command.line
    for command in applies:
        assert command.recipe == pool_path


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
