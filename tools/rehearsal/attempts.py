"""Attempts: the events the trainer writes (``EventTail``), what one attempt did
(``Attempt``), SkyPilot's restart accounting for failures (``RecoveryPolicy``), and what the
buckets held through time, for any recipe (``BucketLog``).
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rehearsal.buckets import Buckets

# Node 0 writing any of these means the recipe speaks skyspot's events: the resume check,
# steps lost and goodput apply. Without them the summary claims none of those.
SKYSPOT_EVENTS = ("start", "step", "checkpoint")

# ---------------------------------------------------------------------------------------------
# Events written by the trainer (rank 0) to $SKYSPOT_EVENTS_FILE


class EventTail:
    """Reads complete JSON lines appended since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = b""

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a torn or foreign line must not stop the rehearsal
            if isinstance(event, dict) and isinstance(event.get("event"), str):
                events.append(event)
        return events


def event_step(event: dict, key: str = "step") -> int | None:
    step = event.get(key)
    return int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else None


# ---------------------------------------------------------------------------------------------
# Attempts


@dataclass
class Attempt:
    index: int
    task_id: str
    started: float
    ended: float | None = None
    ending: str = ""  # see the package docstring (rehearsal/__init__.py)
    fault: dict | None = None
    decision: str = ""  # what the controller did next
    preempt_plan: str | None = None
    # SKYPILOT_NUM_GPUS_PER_NODE this attempt's nodes got (--gpus-per-attempt varies it)
    gpus_per_node: int | None = None
    exit_codes: list[int] = field(default_factory=list)
    run_name: str | None = None
    resumed_from: int | None = None  # step it started at (0 when fresh); None if unknown
    resumed_path: str | None = None
    resumed_key: str | None = None  # "<bucket>/<key>" of resumed_path
    preemption_reason: str | None = None
    last_step: int | None = None
    first_step_at: float | None = None
    seconds_to_first_step: float | None = None
    steps_lost: int | None = None  # filled once the next attempt reports where it resumed
    bucket: dict | None = None  # the bucket read after this attempt's fault
    checkpoints: list[dict] = field(default_factory=list)
    skipped_checkpoints: list[int] = field(default_factory=list)  # steps; previous uploading
    step_times: list[tuple[int, float]] = field(default_factory=list)
    step_reached: int | None = None  # highest step/log event: the step:<N> trigger
    checkpoint_reached: int | None = None  # highest checkpoint event: the ckpt:<N> trigger
    # start events of EVERY node's events file: [{node, world_size, time}] (a trainer emits
    # them from global rank 0 only, so more than node 0's, or another size, is a split)
    starts: list[dict] = field(default_factory=list)
    buckets_at_end: dict | None = None  # {bucket: {objects, bytes}} once the attempt ended
    skyspot_events: int = 0  # node 0's start/step/checkpoint events

    def observe(self, event: dict) -> None:
        """One event of node 0's events file."""
        name, step = event["event"], event_step(event)
        when = event.get("time") if isinstance(event.get("time"), (int, float)) else time.time()
        if name in SKYSPOT_EVENTS:
            self.skyspot_events += 1
        if name == "start":
            self.observe_node(0, event)
            self.run_name = event.get("run_name")
            if self.resumed_path is None and step is not None:
                self.resumed_from = step
        elif name == "resumed" and step is not None:
            self.resumed_from, self.resumed_path = step, str(event.get("path"))
        elif name == "step" and step is not None:
            if self.first_step_at is None:
                self.first_step_at = when
                self.seconds_to_first_step = round(when - self.started, 3)
            self.step_times.append((step, when))
        elif name == "checkpoint" and step is not None:
            self.checkpoints.append({
                "step": step,
                "path": event.get("path"),
                "seconds": event.get("seconds"),
                "bytes": event.get("bytes"),
                "async": event.get("async"),
                # seconds the training loop waited for this save (an async one: the snapshot)
                "stall_seconds": event.get("stall_seconds"),
                "time": when,
                "durable_step": event_step(event, "durable_step"),
                "lag_steps": event_step(event, "lag_steps"),
            })
            self.checkpoint_reached = max(step, self.checkpoint_reached or step)
        elif name == "checkpoint_skipped" and step is not None:
            self.skipped_checkpoints.append(step)
        elif name == "preemption":
            self.preemption_reason = str(event.get("reason"))
        # A skyspot.units worker (preprocess/, infer/) reports each committed unit as a
        # "unit" event whose step counts the units of this attempt: --preempt-at step:N.
        if name in ("step", "log", "unit") and step is not None:
            self.step_reached = max(step, self.step_reached or step)
        if name in ("step", "log", "checkpoint", "preemption", "exit") and step is not None:
            self.last_step = step if self.last_step is None else max(self.last_step, step)

    def observe_node(self, rank: int, event: dict) -> None:
        """One event of node ``rank``'s events file: only its start events count here."""
        if event["event"] != "start":
            return
        when = event.get("time") if isinstance(event.get("time"), (int, float)) else time.time()
        self.starts.append({"node": rank, "world_size": event_step(event, "world_size"),
                            "time": when})

    @property
    def steps_executed(self) -> int:
        if self.last_step is None:
            return 0
        return max(0, self.last_step - (self.resumed_from or 0))


@dataclass
class RecoveryPolicy:
    """StrategyExecutor.should_restart_on_failure, sky/jobs/recovery_strategy.py."""

    max_restarts_on_errors: int
    recover_on_exit_codes: list[int]
    restart_cnt_on_failure: int = 0

    def should_restart_on_failure(self, exit_codes: list[int]) -> tuple[bool, str]:
        matching = [c for c in exit_codes if c in self.recover_on_exit_codes]
        if matching:  # restarts without touching the counter, however often it happens
            return True, f"exit code(s) {matching} in recover_on_exit_codes"
        self.restart_cnt_on_failure += 1
        count = f"{self.restart_cnt_on_failure}/{self.max_restarts_on_errors}"
        if self.restart_cnt_on_failure > self.max_restarts_on_errors:
            return False, f"max_restarts_on_errors exhausted ({count})"
        return True, f"restart {count} on errors"


@dataclass
class PhaseResult:
    ending: str  # "exited", "failed", "preempted:<kind>"
    exit_codes: list[int]
    fault: dict | None = None


# ---------------------------------------------------------------------------------------------
# What the buckets held through time (any recipe: objects and bytes, never their format)

LISTING_ERRORS = (RuntimeError, OSError, ValueError, subprocess.SubprocessError)


class BucketLog:
    """Every bucket's object count and bytes through time, read through the S3 API
    (``Buckets.list_objects``): a new entry only when either changed. ``poll`` is called
    from the managed loop; it lists at most every ``every_s`` (or 5x what a listing took,
    whichever is longer), so a slow listing never takes more than a fifth of the loop."""

    def __init__(self, buckets: Buckets, every_s: float = 1.0) -> None:
        self.buckets = buckets
        self.every_s = every_s
        self.entries: list[dict] = []  # [{time, bucket, objects, bytes}]
        self.current: dict[str, dict] = {}
        self.next_at = 0.0  # time.monotonic() of the next poll's listing

    def poll(self) -> None:
        if time.monotonic() >= self.next_at:
            self.sample()

    def sample(self) -> dict[str, dict]:
        """List every bucket now; {bucket: {objects, bytes}} of those that could be listed."""
        began = time.monotonic()
        now: dict[str, dict] = {}
        for bucket in self.buckets.buckets:
            try:
                objects = self.buckets.list_objects(bucket)
            except LISTING_ERRORS:
                continue  # the store is gone or busy: no entry rather than a wrong one
            state = {"objects": len(objects), "bytes": sum(objects.values())}
            now[bucket] = state
            if self.current.get(bucket) != state:
                self.current[bucket] = state
                self.entries.append({"time": time.time(), "bucket": bucket, **state})
        took = time.monotonic() - began
        self.next_at = time.monotonic() + max(self.every_s, 5 * took)
        return now


def unuploaded_line(rank: int, entries: list[dict], shown: int = 5) -> str:
    """One line for a lost VM's files that never reached the bucket."""
    total = sum(e["bytes"] for e in entries)
    names = [f"{e['bucket']}/{e['key']}" for e in entries[:shown]]
    more = f", ... ({len(entries) - shown} more)" if len(entries) > shown else ""
    return (f"node {rank}'s VM lost {len(entries)} file{'s' if len(entries) != 1 else ''}, "
            f"{human_bytes(total)}, that never reached the bucket: {', '.join(names)}{more}")


def human_bytes(value: float | None, sep: str = " ") -> str:
    """1234567 -> "1.2 MB" (decimal units); "-" for no number. sep goes between the two."""
    if not isinstance(value, (int, float)):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f}{sep}{unit}" if unit == "B" else f"{value:.1f}{sep}{unit}"
        value /= 1000
    return "-"
