"""A run's settings: recorded in each checkpoint, and a change refused on resume unless allowed.

Guarantee: a trainer that stores ``record_settings(cfg, names)`` in every checkpoint's meta
and, before it resumes from one, passes ``changed_settings(recorded, current)`` to
``refuse_unallowed`` never resumes with a setting silently different from the one that
checkpoint was written with. Each difference is either named in the allowed list
(``parse_allowed``, from --allow-config-change) or refused with ``SettingsChanged``: one
line naming each refused setting with both values, the checkpoint, and the flag that would
allow it. ``likely_resume_point`` lets that check run before anything is loaded or built,
against the checkpoint a resume will most likely choose, reading only its manifest and the
sizes of its files (``skyspot.checkpoint.peek``).

Settings are named as Python attributes (``seq_len``) and shown as the command-line flags
of the same name (``--seq-len``). Which settings a trainer records, and what an allowed
change must do to its state, are the trainer's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from skyspot.checkpoint import peek, step_dirs

ALLOW_FLAG = "--allow-config-change"


class SettingsError(ValueError):
    """A setting refused: the message is one line, meant to be printed as is (exit 2)."""


class SettingsChanged(SettingsError):
    """A resume would change recorded settings that ALLOW_FLAG does not name."""


class Change(NamedTuple):
    """A setting whose value differs from the one a checkpoint recorded."""

    name: str
    old: Any  # as the checkpoint recorded it
    new: Any  # this run's

    def describe(self, checkpoint: Path) -> str:
        """'--lr changed from 0.003 (checkpoint /ckpt/run/step-00000008) to 0.001'."""
        return (f"{flag(self.name)} changed from {show(self.old)} (checkpoint {checkpoint}) "
                f"to {show(self.new)}")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def show(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def record_settings(cfg: Any, names: Iterable[str]) -> dict:
    """The settings ``names`` of ``cfg`` as a checkpoint records them (in its meta)."""
    return {name: getattr(cfg, name) for name in names}


def parse_allowed(values: Iterable[str], names: Sequence[str]) -> list[str]:
    """ALLOW_FLAG values (repeated, comma-separated, with - or _) as ``names``, each once;
    SettingsError naming the valid ones for anything else."""
    allowed = []
    for value in values:
        for part in value.split(","):
            name = part.strip().removeprefix("--").replace("-", "_")
            if not name:
                continue
            if name not in names:
                raise SettingsError(
                    f"{ALLOW_FLAG} {part.strip()}: not a setting a checkpoint records; "
                    f"valid: {', '.join(s.replace('_', '-') for s in names)}")
            allowed.append(name)
    return list(dict.fromkeys(allowed))


def changed_settings(recorded: dict, current: dict, paths: Collection[str] = ()) -> list[Change]:
    """The settings of ``current`` whose value differs from ``recorded``'s, in ``current``'s
    order; one the checkpoint did not record is no change. The settings in ``paths`` may
    name a local file or directory, and one named two ways (./data and /abs/data) is the
    same."""
    return [Change(name, recorded[name], new) for name, new in current.items()
            if name in recorded and not _same(recorded[name], new, name in paths)]


def _same(old: Any, new: Any, path: bool) -> bool:
    if old == new:
        return True
    if path and isinstance(old, str) and isinstance(new, str):
        with contextlib.suppress(OSError):
            return Path(old).exists() and Path(old).resolve() == Path(new).resolve()
    return False


def refuse_unallowed(changes: Sequence[Change], allowed: Collection[str], checkpoint: Path,
                     ) -> None:
    """Raise SettingsChanged, one line naming every change ``allowed`` does not name, the
    first with the ``checkpoint`` path, and the ALLOW_FLAG value that would apply them."""
    refused = [change for change in changes if change.name not in allowed]
    if not refused:
        return
    first, *more = refused
    what = first.describe(checkpoint)
    what += "".join(f", {flag(name)} from {show(old)} to {show(new)}" for name, old, new in more)
    names = ",".join(change.name.replace("_", "-") for change in refused)
    raise SettingsChanged(f"{what}; pass {ALLOW_FLAG} {names} to apply "
                          f"{'them' if more else 'it'}, or use a new --run-name")


def likely_resume_point(run_dir: Path, seed: Path | None = None) -> tuple[Path, dict] | None:
    """(path, manifest) of the checkpoint a resume will most likely choose: the newest of
    ``run_dir`` whose manifest is well formed and whose files have the listed sizes, else
    ``seed`` (--resume-from) if it is such a checkpoint, else None. A guess, without
    checksums: the checkpoint chosen later, verified, must be checked again."""
    candidates = [path for _, _, path in step_dirs(run_dir)]
    if seed is not None:
        candidates.append(seed)
    for path in candidates:
        manifest = peek(path)
        if manifest is not None:
            return path, manifest
    return None
