"""Machine-readable run events that survive a preemption.

Guarantee: every persisted event emitted before a checkpoint commit is in the bucket
once that commit is, and the log works on a goofys-style mount, where a file uploads
only on close and nothing can be appended. Each ``flush`` writes the events since the
last flush as a NEW, immutable segment file ``<run>/events/<attempt>-<seq>.jsonl``;
segment names sort chronologically, so ``read_events`` is a sorted concatenation.

Every event, persisted or not, is also appended to a local JSON-lines file when
``SKYSPOT_EVENTS_FILE`` is set (rehearse sets it to watch a run live).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

EVENTS_FILE_ENV = "SKYSPOT_EVENTS_FILE"


class EventLog:
    def __init__(self, run_dir: Path | None, *, enabled: bool = True):
        """``enabled`` is False on every rank but 0, so a run has one log."""
        self.dir = run_dir / "events" if run_dir is not None else None
        self.enabled = enabled
        # Attempt id: wall-clock ms then pid, so segments of later attempts sort later.
        self.attempt = f"{int(time.time() * 1000):013d}-{os.getpid()}"
        self._seq = 0
        self._buffer: list[str] = []
        local = os.environ.get(EVENTS_FILE_ENV)
        self._local = open(local, "a", buffering=1) if local and enabled else None  # noqa: SIM115

    def emit(self, event: str, *, persist: bool = True, **fields) -> dict:
        record = {"time": round(time.time(), 3), "event": event, **fields}
        if not self.enabled:
            return record
        line = json.dumps(record, default=str)
        if self._local is not None:
            self._local.write(line + "\n")
        if persist:
            self._buffer.append(line)
        return record

    def flush(self) -> None:
        """Write the buffered events as one new segment file (never appends)."""
        if not self.enabled or self.dir is None or not self._buffer:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        segment = self.dir / f"{self.attempt}-{self._seq:05d}.jsonl"
        with open(segment, "x") as f:
            f.write("\n".join(self._buffer) + "\n")
        self._seq += 1
        self._buffer.clear()

    def close(self) -> None:
        self.flush()
        if self._local is not None:
            self._local.close()
            self._local = None


def read_events(run_dir: Path) -> list[dict]:
    """All persisted events of a run, in order; a torn last line (kill mid-write) is skipped."""
    events = []
    for segment in sorted((run_dir / "events").glob("*.jsonl")):
        for line in segment.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events
