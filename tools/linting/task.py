"""One task of a recipe as the checks see it: SkyPilot's parsed Task for meaning, the YAML
document for line numbers, and its setup:/run: read as bash."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import shell
from .findings import Finding
from .recipe import Block, Document, Recipe
from .scripts import Invocation, Parsers, invocations


@dataclass
class Section:
    """setup: or run:, its text as bash and where its lines are."""

    key: str  # "setup" or "run"
    block: Block
    script: shell.Script

    def line(self, script_line: int) -> int:
        return self.block.file_line(script_line)


@dataclass
class TaskContext:
    recipe: Recipe
    doc: Document
    task: Any  # sky.Task
    parsers: Parsers
    findings: list[Finding] = field(default_factory=list)

    def __post_init__(self):
        self.sections = {}
        for key in ("setup", "run"):
            block = self.recipe.block(self.doc, key)
            if block is not None:
                self.sections[key] = Section(key, block, shell.parse(block.text))
        self.run_invocations: list[Invocation] = (
            invocations(self.sections["run"].script, self.workdir) if "run" in self.sections
            else [])

    def add(self, line: int, severity: str, rule: str, message: str, fix: str = "") -> None:
        self.findings.append(Finding(self.recipe.shown, line, severity, rule, message, fix))

    @property
    def workdir(self) -> Path | None:
        """The task's workdir resolved as SkyPilot does, against the current directory."""
        return workdir_of(self.task.workdir)

    @property
    def is_pool(self) -> bool:
        service = self.task.service
        return service is not None and bool(getattr(service, "pool", False))

    @property
    def num_nodes(self) -> int:
        return int(self.task.num_nodes or 1)

    @property
    def envs(self) -> dict[str, str]:
        return dict(self.task.envs or {})

    def declared(self) -> set[str]:
        names = set()
        for key in ("envs", "secrets"):
            value = self.doc.get(key)
            if isinstance(value, dict):
                names.update(str(k) for k in value)
        return names | set(self.envs) | set(getattr(self.task, "secrets", {}) or {})

    def mounts(self) -> dict[str, str]:
        """Mount path -> mode (MOUNT, MOUNT_CACHED, COPY, or FILE for a plain file mount)."""
        out = {}
        for target, storage in (self.task.storage_mounts or {}).items():
            mode = getattr(getattr(storage, "mode", None), "value", None) or "MOUNT"
            out[str(target)] = str(mode)
        for target in (self.task.file_mounts or {}):
            out.setdefault(str(target), "FILE")
        return out

    def mount_of(self, path: str) -> tuple[str, str] | None:
        """(mount path, mode) of the mount that holds `path`, or None."""
        for target, mode in self.mounts().items():
            if path == target or path.startswith(target.rstrip("/") + "/"):
                return target, mode
        return None


def workdir_of(workdir: Any) -> Path | None:
    if not isinstance(workdir, str) or not workdir:
        return None
    path = Path(workdir).expanduser().resolve()
    return path if path.is_dir() else None
