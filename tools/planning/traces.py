"""Where spot capacity comes from in a simulation: a Poisson rate or a replayed real trace.

A model hands each Monte Carlo run a ``Market`` (its own random start offset into the trace,
its own random numbers) that answers, at hour t of the run:

- ``can_launch(t)``: could the job get its spot nodes now;
- ``launch(t)``: it takes them;
- ``lost(t)``: the nodes it took are gone (a preemption);
- ``spot_price(t)``: $/h per node when the trace carries prices, else None.

Trace formats (``load_trace`` tells them apart by content):

- **Availability JSON** (SkyPilot's public spot traces, Can't Be Late NSDI '24):
  ``{"metadata": {"gap_seconds": N}, "data": [n0, n1, ...], "prices": [...]}``; each value is
  how many spot instances were available in that tick, so a job of num_nodes nodes can run
  while the value is >= num_nodes and loses its nodes when it drops below. ``prices``
  (optional, $/h) is the spot price per tick. (A trace that marks *preempted* ticks with 1
  means the opposite: invert it before replaying.)
- **Event log** ``ms,add|remove,node`` (Bamboo, NSDI '23; ``traces/bamboo-p3.csv``):
  a cluster's nodes coming and going. A job of N nodes launches when N nodes are up, takes N
  of them at random and is preempted when any of those is removed; so both the gaps and
  the real per-node uptimes come from the log.
- **Preemption timestamps**: one per line, seconds from the start or ISO 8601 times (an
  optional header line). The job is preempted at each and can relaunch at once.

A run longer than the trace wraps around to its start. Nodes still up at the end of an event
log were not seen to be preempted: at the wrap the job keeps running on nodes that are up
at the trace's start. Nothing is fitted: uptimes are the trace's own.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
import random
import statistics
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby, pairwise
from pathlib import Path
from typing import Protocol


class TraceError(ValueError):
    """A trace that cannot be read: one line for the user."""


class Market(Protocol):
    def can_launch(self, t: float) -> bool: ...
    def launch(self, t: float) -> None: ...
    def lost(self, t: float) -> bool: ...
    def spot_price(self, t: float) -> float | None: ...


# --- Poisson ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PoissonModel:
    """Each node is preempted at `rate_per_node` per hour, independently; spot is always
    there to relaunch on (a rate says nothing about gaps: use a trace for those)."""

    rate_per_node: float
    kind: str = "poisson"

    def job_rate(self, num_nodes: int) -> float:
        return self.rate_per_node * num_nodes

    def describe(self, num_nodes: int) -> str:
        nodes = f"{num_nodes} nodes x " if num_nodes > 1 else ""
        return (f"Poisson preemptions, {nodes}{self.rate_per_node:g}/h per node "
                f"(the job: one every {_hours(1 / self.job_rate(num_nodes))})"
                if self.rate_per_node > 0 else "no preemptions (rate 0)")

    def market(self, rng: random.Random, num_nodes: int, offset_h: float | None = None):
        return _PoissonMarket(self.job_rate(num_nodes), rng)


@dataclass
class _PoissonMarket:
    rate: float
    rng: random.Random
    until: float = math.inf

    def can_launch(self, t: float) -> bool:
        return True

    def launch(self, t: float) -> None:
        self.until = t + self.rng.expovariate(self.rate) if self.rate > 0 else math.inf

    def lost(self, t: float) -> bool:
        return t >= self.until

    def spot_price(self, t: float) -> float | None:
        return None


# --- availability JSON ----------------------------------------------------------------------

@dataclass(frozen=True)
class AvailabilityTrace:
    path: Path
    gap_h: float
    counts: tuple[float, ...]
    prices: tuple[float, ...] | None
    kind: str = "availability"

    @property
    def length_h(self) -> float:
        return self.gap_h * len(self.counts)

    def describe(self, num_nodes: int) -> str:
        up = sum(1 for c in self.counts if c >= num_nodes) / len(self.counts)
        price = ", with spot prices" if self.prices else ""
        what = "availability trace" if self.kind == "availability" else "capacity of"
        return (f"{what} {self.path.name}: {_hours(self.length_h)} in ticks of "
                f"{_hours(self.gap_h)}, spot available for {num_nodes} node(s) "
                f"{100 * up:.0f}% of the time{price}")

    def market(self, rng: random.Random, num_nodes: int, offset_h: float | None = None):
        start = rng.uniform(0, self.length_h) if offset_h is None else offset_h
        return _AvailabilityMarket(self, num_nodes, start)


@dataclass
class _AvailabilityMarket:
    trace: AvailabilityTrace
    num_nodes: int
    start: float

    def _tick(self, t: float) -> int:
        return int((self.start + t) / self.trace.gap_h + 1e-9) % len(self.trace.counts)

    def can_launch(self, t: float) -> bool:
        return self.trace.counts[self._tick(t)] >= self.num_nodes

    def launch(self, t: float) -> None:
        pass

    def lost(self, t: float) -> bool:
        return not self.can_launch(t)

    def spot_price(self, t: float) -> float | None:
        return self.trace.prices[self._tick(t)] if self.trace.prices else None


# --- event log (Bamboo) ---------------------------------------------------------------------

@dataclass(frozen=True)
class EventLogTrace:
    path: Path
    length_h: float
    lives: tuple[tuple[float, float | None], ...]  # (added, removed or None if still up), h
    changes: tuple[float, ...]  # times the number of nodes up changes
    counts: tuple[int, ...]  # nodes up from changes[i] on
    kind: str = "events"

    def up_count(self, local: float) -> int:
        i = bisect.bisect_right(self.changes, local) - 1
        return self.counts[i] if i >= 0 else 0

    def up_nodes(self, local: float) -> list[int]:
        return [i for i, (a, r) in enumerate(self.lives)
                if a <= local and (r is None or r > local)]

    def node_uptimes(self) -> list[float]:
        """Real uptimes of the nodes the log saw removed (those still up at the end left out)."""
        return [r - a for a, r in self.lives if r is not None]

    def describe(self, num_nodes: int) -> str:
        ups = self.node_uptimes()
        span = [t2 - t1 for t1, t2 in pairwise(self.changes + (self.length_h,))]
        avail = sum(s for s, c in zip(span, self.counts, strict=True)
                    if c >= num_nodes) / self.length_h
        return (f"event log {self.path.name}: {_hours(self.length_h)}, {len(self.lives)} node "
                f"lives, {len(ups)} removals; node uptime median {_hours(statistics.median(ups))}"
                f", mean {_hours(statistics.mean(ups))}; {num_nodes} node(s) up "
                f"{100 * avail:.0f}% of the time")

    def market(self, rng: random.Random, num_nodes: int, offset_h: float | None = None):
        start = rng.uniform(0, self.length_h) if offset_h is None else offset_h
        return _EventLogMarket(self, num_nodes, start, rng)


@dataclass
class _EventLogMarket:
    trace: EventLogTrace
    num_nodes: int
    start: float
    rng: random.Random
    ends_at: float = math.inf  # absolute trace hour the first of our nodes is removed
    wraps_at: float = math.inf  # our nodes outlive the log: pick up at its start again

    def _where(self, t: float) -> tuple[int, float]:
        u = self.start + t
        cycle = math.floor(u / self.trace.length_h)
        return cycle, u - cycle * self.trace.length_h

    def can_launch(self, t: float) -> bool:
        return self.trace.up_count(self._where(t)[1]) >= self.num_nodes

    def launch(self, t: float) -> None:
        self._take(*self._where(t))

    def _take(self, cycle: int, local: float) -> None:
        up = self.trace.up_nodes(local)
        if len(up) < self.num_nodes:
            self.ends_at, self.wraps_at = -math.inf, math.inf
            return
        ours = self.rng.sample(up, self.num_nodes)
        base = cycle * self.trace.length_h
        removed = [self.trace.lives[i][1] for i in ours]
        self.ends_at = min((base + r for r in removed if r is not None), default=math.inf)
        self.wraps_at = base + self.trace.length_h

    def lost(self, t: float) -> bool:
        u = self.start + t
        if u >= self.ends_at:
            return True
        if u >= self.wraps_at:  # still up at the end of the log: carry on at its start
            self._take(math.floor(u / self.trace.length_h), 0.0)
            return u >= self.ends_at
        return False

    def hours_until_lost(self, cap_h: float) -> float:
        """From a launch at run hour 0: hours until our nodes go (following them across
        wraps of the log), at most cap_h."""
        length = self.trace.length_h
        while self.ends_at >= self.wraps_at and self.wraps_at - self.start < cap_h:
            self._take(round(self.wraps_at / length), 0.0)
        return min(self.ends_at - self.start, cap_h)

    def spot_price(self, t: float) -> float | None:
        return None


# --- preemption timestamps ------------------------------------------------------------------

@dataclass(frozen=True)
class TimestampTrace:
    path: Path
    length_h: float
    times: tuple[float, ...]  # preemptions, hours from the start
    kind: str = "preemptions"

    def gaps(self) -> list[float]:
        return [b - a for a, b in pairwise(self.times)]

    def describe(self, num_nodes: int) -> str:
        gaps = self.gaps()
        spread = (f"; uptime median {_hours(statistics.median(gaps))}, mean "
                  f"{_hours(statistics.mean(gaps))}" if gaps else "")
        return (f"preemption timestamps {self.path.name}: {len(self.times)} preemptions of the "
                f"job in {_hours(self.length_h)}{spread}")

    def market(self, rng: random.Random, num_nodes: int, offset_h: float | None = None):
        start = rng.uniform(0, self.length_h) if offset_h is None else offset_h
        return _TimestampMarket(self, start)


@dataclass
class _TimestampMarket:
    trace: TimestampTrace
    start: float
    ends_at: float = math.inf

    def can_launch(self, t: float) -> bool:
        return True

    def launch(self, t: float) -> None:
        u = self.start + t
        length = self.trace.length_h
        cycle = math.floor(u / length)
        i = bisect.bisect_right(self.trace.times, u - cycle * length)
        if i < len(self.trace.times):
            self.ends_at = cycle * length + self.trace.times[i]
        else:
            self.ends_at = (cycle + 1) * length + self.trace.times[0]

    def lost(self, t: float) -> bool:
        return self.start + t >= self.ends_at

    def spot_price(self, t: float) -> float | None:
        return None


def capacity_view(trace: EventLogTrace, gap_h: float = 1 / 60) -> AvailabilityTrace:
    """An event log read as capacity only: the number of nodes up, every minute. A job of N
    nodes then runs while N are up and loses them only when fewer are (Can't Be Late's
    reading of a trace), whichever node the cloud took back."""
    ticks = math.ceil(trace.length_h / gap_h)
    counts = tuple(float(trace.up_count(i * gap_h)) for i in range(ticks))
    return AvailabilityTrace(trace.path, gap_h, counts, None, kind="capacity")


Model = PoissonModel | AvailabilityTrace | EventLogTrace | TimestampTrace


def sample_uptimes(model: Model, num_nodes: int, rng: random.Random, n: int = 400,
                   cap_h: float = 1e4) -> list[float]:
    """How long the job's spot nodes last from a launch, as the simulation replays it (capped
    at cap_h; [inf] when spot is never lost):

    - availability: the stretches with >= num_nodes available (a job that waited for spot
      launches at a stretch's start);
    - event log: `n` launches at random moments when num_nodes are up, on nodes picked as
      the replay picks them;
    - timestamps: the gaps between preemptions;
    - Poisson: `n` draws of the exponential.
    """
    if isinstance(model, PoissonModel):
        rate = model.job_rate(num_nodes)
        return [rng.expovariate(rate) if rate > 0 else math.inf for _ in range(n)]
    if isinstance(model, AvailabilityTrace):
        ok = [c >= num_nodes for c in model.counts]
        if all(ok):
            return [math.inf]
        first_gap = ok.index(False)  # start on a gap: no stretch straddles the wrap
        ok = ok[first_gap:] + ok[:first_gap]
        return [len(list(ticks)) * model.gap_h for up, ticks in groupby(ok) if up]
    if isinstance(model, TimestampTrace):
        return [g for g in model.gaps() if g > 0] or [model.length_h]
    found: list[float] = []
    for _ in range(n * 20):
        if len(found) == n:
            break
        market = model.market(rng, num_nodes)
        if market.can_launch(0.0):
            market.launch(0.0)
            found.append(market.hours_until_lost(cap_h))
    return found


# --- reading --------------------------------------------------------------------------------

def load_trace(path: Path) -> AvailabilityTrace | EventLogTrace | TimestampTrace:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceError(f"trace not found: {path}") from None
    except IsADirectoryError:
        raise TraceError(f"trace {path} is a directory") from None
    except OSError as e:
        raise TraceError(f"trace {path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise TraceError(f"trace {path}: not a text file") from None
    if not text.strip():
        raise TraceError(f"trace {path} is empty")
    if text.lstrip().startswith("{"):
        return _availability(path, text)
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    if not rows:
        raise TraceError(f"trace {path} has no rows")
    if len(rows[0]) == 3 or (len(rows) > 1 and len(rows[1]) == 3):
        return _event_log(path, rows)
    if all(len(r) == 1 for r in rows):
        return _timestamps(path, rows)
    raise TraceError(f"trace {path}: not an availability JSON, an `ms,add|remove,node` log or "
                     f"one preemption timestamp per line (line 1: {','.join(rows[0])[:60]!r})")


def _availability(path: Path, text: str) -> AvailabilityTrace:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise TraceError(f"trace {path}: bad JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list) or not doc["data"]:
        raise TraceError(f"trace {path}: no \"data\" list of availability counts")
    gap = (doc.get("metadata") or {}).get("gap_seconds") if isinstance(
        doc.get("metadata"), dict) else None
    if not _is_number(gap) or gap <= 0:
        raise TraceError(f"trace {path}: metadata.gap_seconds must be a positive number")
    counts = doc["data"]
    bad = next((i for i, c in enumerate(counts)
                if not (_is_number(c) or isinstance(c, bool)) or c < 0), None)
    if bad is not None:
        raise TraceError(f"trace {path}: data[{bad}] = {counts[bad]!r} is not a count >= 0")
    prices = doc.get("prices")
    if prices is not None:
        if not isinstance(prices, list) or len(prices) != len(counts):
            raise TraceError(f"trace {path}: \"prices\" must be a list as long as \"data\"")
        bad = next((i for i, p in enumerate(prices) if not _is_number(p) or p < 0), None)
        if bad is not None:
            raise TraceError(f"trace {path}: prices[{bad}] = {prices[bad]!r} is not a $/h >= 0")
    return AvailabilityTrace(path, gap / 3600.0, tuple(float(c) for c in counts),
                             tuple(float(p) for p in prices) if prices else None)


def _event_log(path: Path, rows: list[list[str]]) -> EventLogTrace:
    if rows and not rows[0][0].strip().isdigit():
        rows = rows[1:]  # a header
    up: dict[str, float] = {}
    lives: list[tuple[float, float | None]] = []
    changes, counts, last = [], [], 0.0
    for n, row in enumerate(rows, start=1):
        if len(row) != 3:
            raise TraceError(f"trace {path}: line {n}: expected ms,add|remove,node")
        ms, kind, node = (c.strip() for c in row)
        try:
            at = int(ms) / 3.6e6
        except ValueError:
            raise TraceError(f"trace {path}: line {n}: {ms!r} is not milliseconds") from None
        if at < last or at < 0:
            raise TraceError(f"trace {path}: line {n}: time {ms} goes backwards")
        if kind == "add":
            if node in up:
                raise TraceError(f"trace {path}: line {n}: {node} added twice")
            up[node] = at
        elif kind == "remove":
            if node not in up:
                raise TraceError(f"trace {path}: line {n}: {node} removed but not up")
            lives.append((up.pop(node), at))
        else:
            raise TraceError(f"trace {path}: line {n}: {kind!r} is not add or remove")
        if changes and changes[-1] == at:
            counts[-1] = len(up)
        else:
            changes.append(at)
            counts.append(len(up))
        last = at
    lives += [(a, None) for a in up.values()]
    if last <= 0 or not lives:
        raise TraceError(f"trace {path}: the log spans no time")
    return EventLogTrace(path, last, tuple(lives), tuple(changes), tuple(counts))


def _timestamps(path: Path, rows: list[list[str]]) -> TimestampTrace:
    cells = [r[0].strip() for r in rows]
    if _stamp(cells[0]) is None:
        cells = cells[1:]  # a header
    stamps = []
    for cell in cells:
        value = _stamp(cell)
        if value is None:
            raise TraceError(f"trace {path}: {cell!r} is neither seconds nor an ISO 8601 time")
        stamps.append(value)
    if not stamps:
        raise TraceError(f"trace {path}: no preemption timestamps")
    if len({type(s) for s in stamps}) > 1:
        raise TraceError(f"trace {path}: mixes seconds and ISO 8601 times")
    if any(b < a for a, b in pairwise(stamps)):
        raise TraceError(f"trace {path}: timestamps are not in order")
    if isinstance(stamps[0], datetime):
        zero = stamps[0]
        hours = [(s - zero).total_seconds() / 3600.0 for s in stamps]
    else:
        hours = [s / 3600.0 for s in stamps]
    if hours[0] < 0 or hours[-1] <= 0:
        raise TraceError(f"trace {path}: the timestamps span no time")
    return TimestampTrace(path, hours[-1], tuple(hours))


def _stamp(cell: str) -> float | datetime | None:
    try:
        value = float(cell)
        return value if math.isfinite(value) else None
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(cell.replace("Z", "+00:00"))
    except ValueError:
        return None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _hours(h: float) -> str:
    if math.isinf(h):
        return "never"
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.2f} h"


__all__ = ["AvailabilityTrace", "EventLogTrace", "Market", "Model", "PoissonModel",
           "TimestampTrace", "TraceError", "load_trace", "sample_uptimes"]
