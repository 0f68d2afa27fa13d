"""Read a run into a ``Run``: a rehearsal, a run directory's events, or a unit output.

``load(path)`` tells them apart by what is there:

* ``rehearsal.json`` (the path, or a directory holding it): the attempts, launch and end times
  and faults from it; each attempt's steps from the trainer's events that rehearse collected
  (``WORKDIR/events/node0.jsonl``, every step), else from the events in the rehearsal's
  bucket store, else from rehearsal.json's own checkpoints. A batch job's rehearsal (no
  trainer events) is read as a unit output: the output dir in the store, and each
  attempt's ``unit`` events.
* a directory with ``events/*.jsonl`` (``<checkpoint-dir>/<run>``), or a checkpoint dir
  holding exactly one: the trainer's persisted events (skyspot.events), split into attempts
  at each ``start`` (``resumed`` comes just before it).
* a directory with ``plan.json`` (skyspot.units): units done over time.

Anything else is a ``ReportError``: one line for the user.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from skyspot import units as unitlib
from skyspot.events import read_events

REPO = Path(__file__).resolve().parents[2]
MAX_PLAN_DEPTH = 4  # how deep under a rehearsal's store a unit output's plan.json is looked for


class ReportError(Exception):
    """Bad input: one line, exit 2."""


@dataclass
class Checkpoint:
    step: int
    time: float  # when it was committed (on the node)
    stall: float | None  # seconds the training loop waited for it
    durable_step: int | None  # newest step complete in the bucket itself then
    seconds: float | None = None  # seconds to commit
    bytes: int | None = None


@dataclass
class Attempt:
    index: int
    launched: float | None = None  # launch time (a rehearsal knows it; a run dir does not)
    start: float | None = None  # the trainer's start event: the loop begins
    start_step: int | None = None
    resumed: bool = False
    ended: float | None = None
    ending: str = ""  # exited | preempted:<term|kill|notice> | proc | lost | failed | ...
    fault_at: float | None = None  # when the fault struck (or the preemption was seen)
    exit_code: int | None = None
    points: list[tuple[int, float]] = field(default_factory=list)  # (step, time reached)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    skipped: list[tuple[int, float]] = field(default_factory=list)  # (step, time)
    durable: list[tuple[float, int]] = field(default_factory=list)  # (time, step in bucket)
    units: list[tuple[int, float]] = field(default_factory=list)  # (unit index, time)

    @property
    def last_step(self) -> int | None:
        return self.points[-1][0] if self.points else None

    def time_at(self, step: int) -> float | None:
        """When the attempt reached ``step``: linear between the nearest known points,
        clamped to the first and last."""
        if not self.points:
            return None
        steps = [s for s, _ in self.points]
        i = bisect_left(steps, step)
        if i == 0:
            return self.points[0][1]
        if i == len(steps):
            return self.points[-1][1]
        (s0, t0), (s1, t1) = self.points[i - 1], self.points[i]
        return t1 if s1 == step else t0 + (t1 - t0) * (step - s0) / (s1 - s0)


@dataclass
class Run:
    kind: str  # "training" or "units"
    name: str
    source: str  # "rehearsal", "run directory" or "unit output"
    path: Path
    attempts: list[Attempt]
    t0: float
    t_end: float
    num_nodes: int = 1
    status: str | None = None
    recipe: str | None = None
    candidates: list[tuple[str, int, str | None]] = field(default_factory=list)
    units_total: int | None = None
    unit_times: list[float] = field(default_factory=list)  # each done part's time, sorted
    units_complete: bool = False
    output_dir: Path | None = None
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ entry point


def load(path: Path) -> Run:
    if not path.exists():
        raise ReportError(f"{path}: no such file or directory")
    if path.is_file():
        if path.name.endswith(".json"):
            return from_rehearsal(path)
        raise ReportError(f"{path}: not a run (expected a rehearsal workdir or its "
                          "rehearsal.json, a run directory with events/, or a unit output)")
    if (path / "rehearsal.json").is_file():
        return from_rehearsal(path / "rehearsal.json")
    if (path / "events").is_dir():
        return from_run_dir(path)
    if (path / unitlib.PLAN).is_file():
        return from_unit_output(path)
    runs = sorted(p.parent for p in path.glob("*/events") if p.is_dir())
    if len(runs) == 1:
        return from_run_dir(runs[0])
    if runs:
        names = ", ".join(r.name for r in runs[:6]) + (", ..." if len(runs) > 6 else "")
        raise ReportError(f"{path}: {len(runs)} runs in this checkpoint dir ({names}): "
                          "name one of them")
    raise ReportError(f"{path}: not a run: no rehearsal.json, no events/ (a run directory "
                      "<checkpoint-dir>/<run>), no plan.json (a unit output)")


# ------------------------------------------------------------------------------ events


def read_jsonl(path: Path) -> list[dict]:
    """Events of a JSON-lines file; torn or foreign lines are skipped."""
    events = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as err:
        raise ReportError(f"{path}: unreadable ({err.strerror or err})") from None
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("event"), str) \
                and _number(event.get("time")) is not None:
            events.append(event)
    return events


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _int(value) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None


def observe(attempt: Attempt, events: list[dict]) -> None:
    """Fill an attempt from its trainer's events (in order)."""
    for e in events:
        name, when, step = e["event"], float(e["time"]), _int(e.get("step"))
        if name == "resumed" and step is not None:
            attempt.resumed = True
        elif name == "start" and step is not None:
            if attempt.start is None:
                attempt.start, attempt.start_step = when, step
        elif name == "checkpoint" and step is not None:
            durable = _int(e.get("durable_step"))
            attempt.checkpoints.append(Checkpoint(
                step, when, _number(e.get("stall_seconds")), durable,
                _number(e.get("seconds")), _int(e.get("bytes"))))
            if durable is not None:
                attempt.durable.append((when, durable))
        elif name == "checkpoint_skipped" and step is not None:
            attempt.skipped.append((step, when))
        elif name == "exit":
            attempt.exit_code = _int(e.get("code"))
            if (durable := _int(e.get("durable_step"))) is not None:
                attempt.durable.append((when, durable))
        elif name == "preemption":
            attempt.fault_at = attempt.fault_at or when
            attempt.ending = ("preempted:notice" if str(e.get("reason", "")).startswith("notice")
                              else "preempted:term")
        elif name == "unit" and _int(e.get("unit")) is not None:
            attempt.units.append((int(e["unit"]), when))
        if name in ("start", "step", "log") and step is not None:
            _reach(attempt, step, when)
        elif name in ("preemption", "exit") and step is not None:
            # after the save: a late time for this step, used only where nothing was nearer
            if attempt.last_step is None or step > attempt.last_step:
                _reach(attempt, step, when)


def _reach(attempt: Attempt, step: int, when: float) -> None:
    if attempt.points and step <= attempt.points[-1][0]:
        return  # a step is reached once; the first time counts
    attempt.points.append((step, when))


def split_attempts(events: list[dict]) -> list[list[dict]]:
    """A run's events split into attempts: one begins at a ``resumed`` event, or at a
    ``start`` event in a group that already has one (``resumed`` comes right before
    ``start`` in a resumed attempt)."""
    groups: list[list[dict]] = [[]]
    for e in events:
        names = {x["event"] for x in groups[-1]}
        if (e["event"] == "resumed" and names & {"start", "resumed"}) or \
                (e["event"] == "start" and "start" in names):
            groups.append([])
        groups[-1].append(e)
    return [g for g in groups if g]


# ------------------------------------------------------------------------------ run dirs


def from_run_dir(run_dir: Path) -> Run:
    try:
        events = [e for e in read_events(run_dir)
                  if isinstance(e, dict) and isinstance(e.get("event"), str)
                  and _number(e.get("time")) is not None]
    except OSError as err:
        raise ReportError(f"{run_dir}/events: unreadable ({err.strerror or err})") from None
    if not events:
        raise ReportError(f"{run_dir}/events: no events (has the trainer started?)")
    attempts = []
    groups = split_attempts(events)
    for i, group in enumerate(groups, start=1):
        a = Attempt(index=i)
        observe(a, group)
        a.ended = float(group[-1]["time"])
        if a.exit_code is not None:
            a.ending = _ending_of_exit(a.exit_code, a.ending)
        elif i < len(groups):
            a.ending, a.fault_at = "lost", a.ended
        else:
            a.ending = "running or lost"
        attempts.append(a)
    if not any(a.start is not None for a in attempts):
        raise ReportError(f"{run_dir}/events: no start event: not a skyspot trainer's run")
    name = next((e.get("run_name") for e in events if e["event"] == "start"), None)
    run = Run("training", str(name or run_dir.name), "run directory", run_dir, attempts,
              t0=float(events[0]["time"]), t_end=float(events[-1]["time"]))
    run.notes.append("from the run's own events: provisioning, setup and loading before each "
                     "attempt's first event are not seen (they fall in the gaps), and a lost "
                     "VM's last events may be missing, so lost work is a lower bound")
    return run


def _ending_of_exit(code: int, preemption: str) -> str:
    if code == 0:
        return "exited"
    if code == 143:
        return preemption or "preempted:term"
    if code == 3:
        return "diverged"
    return f"failed (exit {code})"


# ------------------------------------------------------------------------------ rehearsals


def from_rehearsal(path: Path) -> Run:
    try:
        summary = json.loads(path.read_text())
    except OSError as err:
        raise ReportError(f"{path}: unreadable ({err.strerror or err})") from None
    except ValueError as err:
        raise ReportError(f"{path}: not JSON ({err})") from None
    if not isinstance(summary, dict) or not (
            isinstance(summary.get("attempts"), list) or isinstance(summary.get("jobs"), list)):
        raise ReportError(f"{path}: not a rehearsal summary (no attempts)")
    jobs = summary["jobs"] if "jobs" in summary else [summary]
    records = [(j, a) for j in jobs if isinstance(j, dict)
               for a in j.get("attempts") or [] if isinstance(a, dict)]
    if not records:
        raise ReportError(f"{path}: the rehearsal has no attempts")
    workdir = path.parent
    if any(j.get("skyspot_events") for j in jobs):
        if len(jobs) > 1:
            raise ReportError(f"{path}: a pool of {len(jobs)} training jobs: report each "
                              "job's own workdir")
        run = _training_rehearsal(summary, workdir, path)
    else:
        run = _units_rehearsal(summary, jobs, workdir, path)
    run.status = summary.get("status")
    run.recipe = summary.get("recipe") or jobs[0].get("recipe")
    run.num_nodes = _int(jobs[0].get("num_nodes")) or 1
    run.candidates = recipe_candidates(run.recipe, workdir)
    return run


def _attempt_from_record(index: int, record: dict) -> Attempt:
    a = Attempt(index=index, launched=_number(record.get("started")),
                ended=_number(record.get("ended")), ending=str(record.get("ending") or ""))
    fault = record.get("fault") if isinstance(record.get("fault"), dict) else None
    if fault is not None:
        a.fault_at = _number(fault.get("at"))
        if fault.get("kind") == "proc":
            a.ending = "proc"
    codes = record.get("exit_codes") or []
    a.exit_code = _int(codes[0]) if codes else None
    return a


def _assign(attempts: list[Attempt], events: list[dict]) -> None:
    """Each event to the last attempt launched at or before it. No slack: rehearse stamps
    launches and the trainer its events with the same clock, and a relaunch can follow a
    lost VM within 0.1 s, so the last steps before a kill would go to the next attempt."""
    groups: list[list[dict]] = [[] for _ in attempts]
    for e in events:
        when = float(e["time"])
        i = max((k for k, a in enumerate(attempts)
                 if a.launched is None or a.launched <= when), default=0)
        groups[i].append(e)
    for a, group in zip(attempts, groups, strict=True):
        ending = a.ending
        observe(a, group)
        a.ending = ending  # rehearse's own name for how it ended


def _training_rehearsal(summary: dict, workdir: Path, path: Path) -> Run:
    records = summary["attempts"]
    attempts = [_attempt_from_record(i, r) for i, r in enumerate(records, start=1)]
    events_file = workdir / "events" / "node0.jsonl"
    run_name = next((r.get("run_name") for r in records if r.get("run_name")), None)
    notes = []
    if events_file.is_file():
        events = read_jsonl(events_file)
    else:
        events = _bucket_events(summary, run_name)
        notes.append("no events/node0.jsonl next to rehearsal.json: steps from the events "
                     "in the bucket (every log line's step, not every step)")
    if events:
        _assign(attempts, events)
    else:
        notes.append("no trainer events found: steps from rehearsal.json's checkpoints only")
        for a, r in zip(attempts, records, strict=True):
            _from_summary_only(a, r)
    launched = [a.launched for a in attempts if a.launched is not None]
    ended = [a.ended for a in attempts if a.ended is not None]
    if not launched or not ended:
        raise ReportError(f"{path}: attempts without start and end times")
    run = Run("training", str(run_name or workdir.name), "rehearsal", path, attempts,
              t0=min(launched), t_end=max(ended), notes=notes)
    return run


def _bucket_events(summary: dict, run_name: str | None) -> list[dict]:
    data_dir = (summary.get("storage") or {}).get("data_dir")
    if not data_dir or not run_name:
        return []
    for run_dir in sorted(Path(data_dir).glob(f"*/{run_name}")):
        if (run_dir / "events").is_dir():
            return [e for e in read_events(run_dir) if isinstance(e, dict)
                    and isinstance(e.get("event"), str) and _number(e.get("time")) is not None]
    return []


def _from_summary_only(a: Attempt, record: dict) -> None:
    first = _int(record.get("resumed_from"))
    first_at = _number(record.get("first_step_at"))
    if first is None or first_at is None:
        return
    a.start, a.start_step, a.resumed = first_at, first, record.get("resumed_path") is not None
    a.points.append((first, first_at))
    for c in record.get("checkpoints") or []:
        step, when = _int(c.get("step")), _number(c.get("time"))
        if step is None or when is None:
            continue
        a.checkpoints.append(Checkpoint(step, when, None, _int(c.get("durable_step")),
                                        _number(c.get("seconds")), _int(c.get("bytes"))))
        if c.get("durable_step") is not None:
            a.durable.append((when, int(c["durable_step"])))
        _reach(a, step, when)
    last = _int(record.get("last_step"))
    if last is not None and a.ended is not None:
        _reach(a, last, a.ended)


def _units_rehearsal(summary: dict, jobs: list[dict], workdir: Path, path: Path) -> Run:
    attempts: list[Attempt] = []
    for j, job in enumerate(jobs):
        records = [r for r in job.get("attempts") or [] if isinstance(r, dict)]
        job_attempts = [_attempt_from_record(len(attempts) + i, r)
                        for i, r in enumerate(records, start=1)]
        # rehearse names a pool job's nodes job<J>-node<R>, a single job's node<R>
        prefix = f"job{_int(job.get('job_rank')) or j}-" if len(jobs) > 1 else ""
        events: list[dict] = []
        for node_file in sorted((workdir / "events").glob(f"{prefix}node*.jsonl")):
            events += read_jsonl(node_file)
        events.sort(key=lambda e: float(e["time"]))
        if job_attempts:
            _assign(job_attempts, events)
        attempts += job_attempts
    launched = [a.launched for a in attempts if a.launched is not None]
    ended = [a.ended for a in attempts if a.ended is not None]
    if not launched or not ended:
        raise ReportError(f"{path}: attempts without start and end times")
    data_dir = (summary.get("storage") or jobs[0].get("storage") or {}).get("data_dir")
    plans = _find_plans(Path(data_dir)) if data_dir else []
    if not plans:
        raise ReportError(f"{path}: neither trainer events nor a unit output (plan.json) in "
                          "the rehearsal's buckets: nothing to report")
    output = max(plans, key=lambda p: len(list((p / unitlib.DATA).glob("part-*.parquet"))))
    run = Run("units", output.name, "rehearsal", path, attempts, t0=min(launched),
              t_end=max(ended))
    _read_units(run, output)
    if len(plans) > 1:
        run.notes.append(f"{len(plans)} unit outputs in the rehearsal's buckets; reporting "
                         f"{output} (the most parts)")
    if len(jobs) > 1:
        run.notes.append(f"a pool of {len(jobs)} jobs: their attempts overlap in time")
    return run


def _find_plans(root: Path) -> list[Path]:
    found = []
    for depth in range(1, MAX_PLAN_DEPTH + 1):
        found += [p.parent for p in root.glob("/".join(["*"] * depth) + "/" + unitlib.PLAN)]
    return sorted(set(found))


# ------------------------------------------------------------------------------ unit outputs


def from_unit_output(output: Path) -> Run:
    run = Run("units", output.name, "unit output", output, [], 0.0, 0.0)
    _read_units(run, output)
    times = run.unit_times
    try:
        began = (output / unitlib.PLAN).stat().st_mtime
    except OSError:
        began = times[0] if times else 0.0
    run.t0 = min([began, *times])
    run.t_end = max([run.t0, *times])
    run.notes.append("from the output dir alone: attempts and preemptions are not recorded "
                     "there; the time starts when plan.json was written")
    return run


def _read_units(run: Run, output: Path) -> None:
    try:
        plan = json.loads((output / unitlib.PLAN).read_text())
    except (OSError, ValueError) as err:
        raise ReportError(f"{output}/{unitlib.PLAN}: unreadable or malformed ({err})") from None
    total = plan.get("units") if isinstance(plan, dict) else None
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise ReportError(f"{output}/{unitlib.PLAN}: malformed (units: {total!r})")
    times = []
    for part in (output / unitlib.DATA).glob("part-*.parquet"):
        match = unitlib.PART_NAME.match(part.name)
        if match and int(match[1]) < total:
            try:
                times.append(part.stat().st_mtime)
            except OSError:
                continue  # taken away while listing
    run.units_total, run.unit_times = total, sorted(times)
    run.units_complete = (output / unitlib.MANIFEST).is_file()
    run.output_dir = output
    run.name = f"{output.name} ({plan.get('kind') or 'units'})"


# ------------------------------------------------------------------------------ recipes

_ACCELERATOR = re.compile(r"^\s*([A-Za-z][\w.-]*)\s*(?::\s*(\d+(?:\.\d+)?))?\s*$")


def parse_accelerator(text: str) -> tuple[str, int]:
    """"L4:1" -> ("L4", 1); "A100-80GB" -> ("A100-80GB", 1)."""
    match = _ACCELERATOR.match(str(text))
    if not match:
        raise ReportError(f"--accelerator {text!r}: expected NAME:COUNT, e.g. L4:1")
    count = float(match[2]) if match[2] else 1.0
    if count < 1 or count != int(count):
        raise ReportError(f"--accelerator {text!r}: the count must be a whole number >= 1")
    return match[1], int(count)


def recipe_candidates(recipe: str | None, workdir: Path) -> list[tuple[str, int, str | None]]:
    """(accelerator, count, cloud) of every candidate of the recipe's resources; [] where the
    recipe cannot be found or names no accelerator."""
    if not recipe:
        return []
    path = Path(recipe)
    for place in (path, Path.cwd() / path, REPO / path, workdir / path):
        if place.is_file():
            path = place
            break
    else:
        return []
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    except (OSError, yaml.YAMLError):
        return []
    found = []
    for doc in docs:
        resources = doc.get("resources")
        if not isinstance(resources, dict):
            continue
        options = [resources]
        for key in ("any_of", "ordered"):
            if isinstance(resources.get(key), list):
                options = [{**resources, **o} for o in resources[key] if isinstance(o, dict)]
        for option in options:
            cloud = option.get("infra") or option.get("cloud")
            cloud = str(cloud).split("/")[0].lower() if cloud else None
            for name, count in _accelerators(option.get("accelerators")):
                found.append((name, count, cloud))
    return list(dict.fromkeys(found))


def _accelerators(value) -> list[tuple[str, int]]:
    if isinstance(value, str):
        try:
            return [parse_accelerator(value)]
        except ReportError:
            return []
    if isinstance(value, dict):
        return [(str(k), int(v)) for k, v in value.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1]
    if isinstance(value, (list, set, tuple)):
        return [a for item in value for a in _accelerators(item)]
    return []
