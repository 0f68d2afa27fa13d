"""The README's commands run as written: every command of its ```bash blocks is read from the
README text itself (backslash continuations joined) and checked by what it is.

- ``.venv/bin/python ...`` (tiny assets, the rehearsal): run with bash, as written, in order,
  from a scratch copy of the repo root whose ``runs/`` is empty (every other top-level entry
  a symlink to the checkout), so a user's runs/ is neither read nor touched.
- ``sky jobs launch ...``: needs a cloud, so its arguments go through SkyPilot's own CLI
  parser and the recipe through SkyPilot's own loader with the same ``--env`` values, and
  every ``--env`` must be one the recipe declares: a renamed recipe or env fails here.
- ``make <target>``: every ``make`` the README names, in blocks or inline, must be a target
  of the Makefile (``make -n`` succeeds). ``make test`` is not run (it would run this file);
  neither is ``make demo``: it is two full rehearsals of the same recipe (~1.5-3 min) on the
  same tools/rehearse.py path the README's rehearsal command already runs here, on top of a
  suite that takes ~11 min.

Any other kind of command fails the test until it is given a check here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import click
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.M | re.S)
INLINE_MAKE = re.compile(r"`(make [^`]+)`")


def readme_commands() -> list[str]:
    """The commands of the README's ```bash blocks, each on one line, comments kept."""
    commands = []
    for block in BASH_BLOCK.findall(README.read_text()):
        pending = ""
        for line in block.splitlines():
            if line.endswith("\\"):
                pending += line[:-1]
                continue
            command = (pending + line).strip()
            pending = ""
            if command and not command.startswith("#"):
                commands.append(command)
        assert not pending, f"README block ends inside a continued line: {pending!r}"
    return commands


def argv(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def kind(command: str) -> str:
    words = argv(command)
    if words[0] == "make":
        return "make"
    if words[:3] == ["sky", "jobs", "launch"]:
        return "sky"
    if words[0] == ".venv/bin/python":
        return "run"
    return "unknown"


COMMANDS = readme_commands()


def test_every_readme_command_is_checked_here():
    kinds = [kind(c) for c in COMMANDS]
    assert "unknown" not in kinds, [c for c in COMMANDS if kind(c) == "unknown"]
    assert {"make", "sky", "run"} <= set(kinds), COMMANDS


def test_every_make_target_the_readme_names_exists():
    text = README.read_text()
    named = [c for c in COMMANDS if kind(c) == "make"] + INLINE_MAKE.findall(text)
    targets = {argv(c)[1] for c in named}
    assert {"demo", "test", "setup"} <= targets, named
    makefile = (REPO / "Makefile").read_text()
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    for command in sorted(set(named)):
        target = argv(command)[1]
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"no rule for {command!r}"
        # Dry run, with the README's own variables (FUSE=no, TORCH_INDEX=...): nothing runs.
        result = subprocess.run(["make", "-n", *argv(command)[1:]], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{command}: {result.stderr}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if kind(c) == "sky"])
def test_sky_jobs_launch_line_loads_with_skypilots_parser(command, monkeypatch):
    from sky.client.cli import command as sky_cli
    from sky.utils import dag_utils

    # SkyPilot's own CLI parses the arguments: `sky jobs launch`'s options, its --env parser.
    ctx = click.Context(sky_cli.cli, info_name="sky")
    jobs = sky_cli.cli.get_command(ctx, "jobs")
    ctx = click.Context(jobs, info_name="jobs", parent=ctx)
    launch = jobs.get_command(ctx, "launch")
    params = launch.make_context("launch", argv(command)[3:], parent=ctx).params
    (recipe,) = params["entrypoint"]
    envs = list(params["env"])
    monkeypatch.chdir(REPO)  # the README launches from the repo root
    assert Path(recipe).is_file(), f"{command}: no recipe {recipe}"
    # A pipeline has one document per task (after a `name:` header): any may declare it.
    declared = {k for doc in yaml.safe_load_all(Path(recipe).read_text()) if doc
                for k in doc.get("envs") or {}}
    assert [k for k, _ in envs if k not in declared] == [], f"{recipe} declares no such env"
    # SkyPilot's loader, as `sky jobs launch` calls it: it refuses a required env left unset.
    dag = dag_utils.load_chain_dag_from_yaml(recipe, env_overrides=envs,
                                             secret_overrides=list(params["secret"]))
    for task in dag.tasks:  # in a pipeline --env applies to every task
        assert all(task.envs[k] == v for k, v in envs)


@pytest.mark.slow
def test_readme_rehearsal_commands_run_as_written(tmp_path):
    runnable = [c for c in COMMANDS if kind(c) == "run"]
    assert any("tools/rehearse.py" in c for c in runnable), runnable
    root = tmp_path / "repo"
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name != "runs":
            (root / entry.name).symlink_to(entry)
    for command in runnable:
        result = subprocess.run(["bash", "-c", command], cwd=root, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, (f"README command failed ({result.returncode}): "
                                        f"{command}\n{result.stdout[-3000:]}"
                                        f"{result.stderr[-3000:]}")
