"""Variables and paths.

- variables/unset-skypilot-variable (error): setup:/run: reads a `$SKYPILOT_*` variable
  that the installed SkyPilot never sets (e.g. SKYPILOT_JOB_ID, SKYPILOT_SPOT_RUN_ID in
  0.14.1): it expands to nothing (or to its default) on the VM. The names SkyPilot sets are
  read from its own source (skypilot.variables_skypilot_sets); one the recipe declares or
  the script assigns is fine.
- variables/literal-mount-path (warning): a mount path written literally in setup:/run:
  instead of through the env that names it: `--env DATA_DIR=/elsewhere` moves the mount
  and leaves the script pointing at the old path.
"""

from __future__ import annotations

import difflib
import re

from .findings import ERROR, WARNING
from .task import Section, TaskContext

_REFERENCE = re.compile(r"\$\{?!?(SKYPILOT_[A-Z0-9_]+)")
_STABLE_ID = "SKYPILOT_MANAGED_JOB_ID"


def _words(section: Section):
    """(script line, text) of every word, redirection target, here-document and array
    element of a script."""
    script = section.script
    for command in script.commands:
        for word in command.words:
            yield word.line, word.text
        for _, target in command.redirects:
            yield target.line, target.text
        for body in command.heredocs:
            yield command.line, body
    for elements in script.arrays.values():
        for word in elements:
            yield word.line, word.text


def _suggest(name: str, known: frozenset[str]) -> str:
    if "JOB_ID" in name or "RUN_ID" in name:
        return (f"{_STABLE_ID} (a managed job's id, the same across recoveries) or "
                "SKYPILOT_TASK_ID")
    close = difflib.get_close_matches(name, sorted(known), n=2, cutoff=0.6)
    return " or ".join(close) if close else "a variable SkyPilot sets, or declare it in envs:"


def _check_variables(ctx: TaskContext, known: frozenset[str]) -> None:
    declared = ctx.declared()
    for section in ctx.sections.values():
        ours = section.script.assigned | declared
        reported = set()
        for line, text in _words(section):
            for name in _REFERENCE.findall(text):
                if name in known or name in ours or name in reported:
                    continue
                reported.add(name)
                ctx.add(section.line(line), ERROR, "variables/unset-skypilot-variable",
                        f"{section.key}: reads ${name}, which SkyPilot does not set: it "
                        "is empty on the VM",
                        f"use {_suggest(name, known)}")


def _check_mount_paths(ctx: TaskContext) -> None:
    envs = ctx.envs
    for target in ctx.mounts():
        if len(target.strip("/")) < 2:
            continue
        literal = re.compile(r"(?<![\w.$/-])" + re.escape(target.rstrip("/")) + r"(?![\w.-])")
        named_by = next((k for k, v in envs.items() if v == target), None)
        fix = (f"write ${named_by} instead" if named_by else
               f"name it with an env (e.g. MOUNT_DIR: {target}), mount ${{MOUNT_DIR}} and "
               "use $MOUNT_DIR")
        for section in ctx.sections.values():
            lines = {line for line, text in _words(section) if literal.search(text)}
            for line in sorted(lines)[:1]:
                ctx.add(section.line(line), WARNING, "variables/literal-mount-path",
                        f"{section.key}: writes the mount path {target} literally: an --env "
                        "that moves the mount leaves this pointing at the old path", fix)


def check(ctx: TaskContext) -> None:
    from .skypilot import variables_skypilot_sets

    _check_variables(ctx, variables_skypilot_sets())
    _check_mount_paths(ctx)
