"""Checkpoint and restart times measured by a rehearsal (``tools/rehearse.py``'s
``rehearsal.json``, schema in ``tools/rehearsal/__init__.py``).

- C, what one checkpoint costs the training loop: the median over the checkpoint events of
  ``stall_seconds`` for an async save (the loop waited only that long; the rest of the save
  overlapped the next steps) and ``seconds`` for a synchronous one. A rehearsal from before
  ``stall_seconds`` existed gives ``seconds`` (an upper bound).
- The save's own duration (median ``seconds``): a periodic save is skipped while the
  previous one is still being written, so an interval below it does not checkpoint more.
- R, restart overhead: the median, over the attempts after a preemption, of the gap from the
  previous attempt's end to this one's launch plus its ``seconds_to_first_step`` (start,
  find and verify the newest checkpoint, resume). Without a restart, the first attempt's
  ``seconds_to_first_step``. A local rehearsal does not provision a VM: that is the
  changeover d, given apart.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path


class MeasuredError(ValueError):
    """A rehearsal.json that cannot be used: one line for the user."""


@dataclass(frozen=True)
class Measured:
    path: Path
    checkpoint_s: float | None  # C
    save_s: float | None  # a whole save, start to commit
    restart_s: float | None  # R
    checkpoints: int
    restarts: int


def newest_rehearsal(recipe: Path, runs: Path = Path("runs")) -> Path | None:
    """runs/rehearse-<recipe>-<stamp>/rehearsal.json, the newest (rehearse's default workdir)."""
    found = sorted(runs.glob(f"rehearse-{recipe.stem}-*/rehearsal.json"),
                   key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def read_rehearsal(path: Path) -> Measured:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MeasuredError(f"rehearsal summary not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MeasuredError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise MeasuredError(f"{path}: bad JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith(
            "skyspot-rehearsal/"):
        raise MeasuredError(f"{path}: not a rehearsal.json (no skyspot-rehearsal schema)")
    jobs = doc["jobs"] if isinstance(doc.get("jobs"), list) else [doc]  # a pool: every job
    costs, saves, restarts = [], [], []
    try:
        for job in jobs:
            attempts = job.get("attempts") or []
            for a in attempts:
                for c in a.get("checkpoints") or []:
                    stall = c.get("stall_seconds")
                    costs.append(stall if c.get("async") and stall is not None else c["seconds"])
                    saves.append(c["seconds"])
            for prev, a in zip(attempts, attempts[1:], strict=False):
                if a.get("seconds_to_first_step") is not None and prev.get("ended"):
                    restarts.append(a["started"] - prev["ended"] + a["seconds_to_first_step"])
            if not restarts and attempts and attempts[0].get("seconds_to_first_step"):
                restarts.append(attempts[0]["seconds_to_first_step"])
    except (KeyError, TypeError) as e:
        raise MeasuredError(f"{path}: malformed attempts ({e!r})") from None
    return Measured(
        path,
        checkpoint_s=statistics.median(costs) if costs else None,
        save_s=statistics.median(saves) if saves else None,
        restart_s=statistics.median(restarts) if restarts else None,
        checkpoints=len(costs),
        restarts=max(0, sum(len(j.get("attempts") or []) - 1 for j in jobs)),
    )
