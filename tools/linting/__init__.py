"""Recipe lint: SkyPilot's own parser first, then the checks a spot ML job needs.

Each recipe is loaded as `sky jobs launch` loads it (skypilot.py): a key SkyPilot does not
know, or has renamed, is an error in SkyPilot's own words. Then every task goes through
the checks, one module per concern, each listing its rules and why in its docstring:

    recovery.py         job_recovery, exit 143, launchers, multi-node teardown
    secrets.py          tokens in envs:/secrets:/scripts, secrets written to files
    reproducibility.py  unpinned pip/uv installs (incl. -r files and the project's
                        pyproject.toml), unpinned git clones
    run.py              set -e, pkill -f/killall, torchrun --nnodes, SkyPilot's MOUNT_CACHED
                        upload wait
    variables.py        $SKYPILOT_* names SkyPilot does not set, literal mount paths
    checkpoints.py      HF --save_total_limit on a bucket mount, checkpoints overwritten
                        in place
    flags.py            --flags a project script's own parser does not have

A finding is `file:line: severity: what is wrong — how to fix` (findings.py). Nothing is
executed from a recipe: setup:/run: are read as bash (shell.py), and a project script only
runs up to its argparse parse call (scripts.py). A check that fails on an odd recipe
reports a note instead of a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoints, flags, recovery, reproducibility, run, secrets, variables
from .findings import ERROR, NOTE, Finding
from .recipe import Recipe, Unreadable, read
from .scripts import PARSERS, Parsers, invocations
from .shell import parse as parse_shell
from .skypilot import error_line, load_tasks
from .task import TaskContext, workdir_of

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "recipes"
CHECKS = (recovery, secrets, reproducibility, run, variables, checkpoints, flags)


@dataclass
class Report:
    files: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    unreadable: bool = False  # a missing file or invalid YAML

    def count(self, severity: str) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    @property
    def exit_code(self) -> int:
        return 2 if self.unreadable else (1 if self.count(ERROR) else 0)


def recipe_files(args: list[str | Path]) -> list[Path]:
    """The files to lint: each file given, each directory's *.yaml/*.yml; recipes/ if none."""
    out = []
    for arg in args or [DEFAULT]:
        path = Path(arg)
        if path.is_dir():
            out.extend(sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")))
        else:
            out.append(path)
    return out


def shown(path: Path) -> str:
    """The path as typed, or relative to the current directory when it is inside it."""
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _prefetch(recipe: Recipe, parsers: Parsers) -> None:
    """Start reading the parsers of the scripts run: starts, while SkyPilot parses."""
    for doc in recipe.task_documents():
        workdir = workdir_of(doc.get("workdir"))
        text = doc.get("run")
        if workdir is None or not isinstance(text, str):
            continue
        try:
            for inv in invocations(parse_shell(text), workdir):
                parsers.start(inv, workdir)
        except Exception:  # the checks will report what matters
            pass


def lint_recipe(recipe: Recipe, parsers: Parsers) -> list[Finding]:
    for doc in recipe.documents:
        if doc.value is not None and not isinstance(doc.value, dict):
            kind = type(doc.value).__name__
            return [Finding(recipe.shown, doc.start_line, ERROR, "skypilot/not-a-task",
                            f"a recipe's YAML documents are mappings of task fields; this "
                            f"one is a {kind}", "write the task as `name: ...`, `run: ...`")]
    tasks, refusal = load_tasks(recipe)
    if tasks is None:
        return [Finding(recipe.shown, error_line(recipe, refusal), ERROR, "skypilot/rejected",
                        f"SkyPilot rejects it: {refusal}",
                        "fix what SkyPilot names (its YAML reference: "
                        "https://docs.skypilot.co/en/latest/reference/yaml-spec.html)")]
    docs = recipe.task_documents()
    findings: list[Finding] = []
    for doc, task in zip(docs, tasks, strict=False):
        ctx = TaskContext(recipe, doc, task, parsers, findings)
        for check in CHECKS:
            try:
                check.check(ctx)
            except Exception as e:  # a finding, never a traceback
                name = check.__name__.rsplit(".", 1)[-1]
                ctx.add(doc.start_line, NOTE, "lint/check-failed",
                        f"the {name} checks could not read this task "
                        f"({type(e).__name__}: {e})", "please report it with the recipe")
    return sorted(findings, key=lambda f: (f.line, f.rule))


def lint(args: list[str | Path]) -> Report:
    report, parsers, recipes = Report(), PARSERS, []
    for path in recipe_files(args):
        name = shown(path)
        report.files.append(name)
        try:
            recipe = read(path, name)
        except Unreadable as e:
            report.unreadable = True
            report.findings.append(Finding(name, e.line, ERROR, "input/unreadable", str(e)))
            continue
        recipes.append(recipe)
        _prefetch(recipe, parsers)
    for recipe in recipes:
        report.findings.extend(lint_recipe(recipe, parsers))
    return report
