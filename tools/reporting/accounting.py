"""Where a run's wall time went, and what it cost: the definitions are in __init__.py."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from reporting.runs import Attempt, Run

# Rehearse's names for how an attempt ended, and what the summary calls them.
KINDS = ("term", "kill", "notice", "proc", "lost")


@dataclass
class Span:
    """One attempt's time, split: launched -> start (startup) -> kept step (useful) ->
    last step (lost) -> end (tail). Stalls are taken out of the span they fall in."""

    attempt: int
    ending: str
    first_step: int | None = None
    kept_step: int | None = None
    last_step: int | None = None
    lost_steps: int = 0
    t_start: float | None = None
    t_kept: float | None = None
    t_last: float | None = None
    t_end: float | None = None
    seconds: float = 0.0  # launched (or start) -> end
    startup: float = 0.0
    useful: float = 0.0
    stall: float = 0.0  # every checkpoint stall of the attempt
    stall_kept: float = 0.0  # of saves before the kept step: an uninterrupted run has them
    lost: float = 0.0
    tail: float = 0.0


@dataclass
class Accounting:
    wall: float
    spans: list[Span]
    startup: float = 0.0
    useful: float = 0.0
    stall: float = 0.0
    lost: float = 0.0
    tail: float = 0.0
    gaps: float = 0.0
    goodput: float | None = None
    useful_steps: int | None = None
    steps_executed: int = 0
    step_goodput: float | None = None
    lost_steps: int = 0
    restarts: int = 0
    preemptions: dict[str, int] = field(default_factory=dict)
    failures: int = 0
    loop_seconds: float = 0.0  # start -> last step, every attempt
    checkpoints: int = 0
    skipped_checkpoints: int = 0
    stall_share_wall: float | None = None
    stall_share_loop: float | None = None
    max_lag_steps: int | None = None
    billed_seconds: float = 0.0  # what every attempt ran, launch (or start) to end
    uninterrupted_seconds: float | None = None  # the same work without preemptions
    # batch jobs
    units_done: int | None = None
    units_total: int | None = None
    units_redone: int | None = None
    units_per_minute: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def kept_step(attempt: Attempt, following: Attempt | None) -> int | None:
    """The step of ``attempt`` that survived: where the next attempt resumed, capped to what
    the attempt reached; the last step reached for the last attempt."""
    last = attempt.last_step
    if last is None:
        return None
    if following is None or following.start_step is None:
        return last
    return max(attempt.start_step or 0, min(following.start_step, last))


def span_of(attempt: Attempt, following: Attempt | None) -> Span:
    span = Span(attempt.index, attempt.ending, t_end=attempt.ended)
    begin = attempt.launched if attempt.launched is not None else attempt.start
    end = attempt.ended if attempt.ended is not None else attempt.start
    if begin is not None and end is not None:
        span.seconds = max(0.0, end - begin)
    span.stall = sum(c.stall or 0.0 for c in attempt.checkpoints)
    kept = kept_step(attempt, following)
    if attempt.start is None or kept is None:
        span.startup = span.seconds  # never reached the training loop
        return span
    last = attempt.last_step
    span.first_step, span.kept_step, span.last_step = attempt.start_step, kept, last
    span.lost_steps = max(0, last - kept)
    span.t_start = attempt.start
    span.t_kept, span.t_last = attempt.time_at(kept), attempt.time_at(last)
    in_kept = sum(c.stall or 0.0 for c in attempt.checkpoints if c.step < kept)
    in_lost = sum(c.stall or 0.0 for c in attempt.checkpoints if kept <= c.step < last)
    in_tail = span.stall - in_kept - in_lost
    span.stall_kept = in_kept
    if attempt.launched is not None:
        span.startup = max(0.0, attempt.start - attempt.launched)
    span.useful = max(0.0, span.t_kept - attempt.start - in_kept)
    span.lost = max(0.0, span.t_last - span.t_kept - in_lost)
    if end is not None:
        span.tail = max(0.0, end - span.t_last - in_tail)
    return span


def account(run: Run) -> Accounting:
    attempts = run.attempts
    wall = max(0.0, run.t_end - run.t0)
    # What an attempt kept is where the next attempt that reached the training loop
    # resumed: relaunches killed during startup resumed nothing.
    spans = [span_of(a, next((b for b in attempts[i + 1:] if b.start_step is not None), None))
             for i, a in enumerate(attempts)]
    acc = Accounting(wall=wall, spans=spans)
    for name in ("startup", "useful", "stall", "lost", "tail"):
        setattr(acc, name, sum(getattr(s, name) for s in spans))
    acc.billed_seconds = sum(s.seconds for s in spans)
    acc.gaps = max(0.0, wall - acc.billed_seconds)  # a pool's attempts overlap: none
    acc.restarts = max(0, len(attempts) - 1)
    acc.preemptions = {kind: 0 for kind in KINDS}
    for a in attempts:
        kind = a.ending.split(":", 1)[1] if a.ending.startswith("preempted:") else a.ending
        if kind in acc.preemptions:
            acc.preemptions[kind] += 1
        elif kind not in ("exited", "running or lost", "interrupted", ""):
            acc.failures += 1
    acc.checkpoints = sum(len(a.checkpoints) for a in attempts)
    acc.skipped_checkpoints = sum(len(a.skipped) for a in attempts)
    acc.lost_steps = sum(s.lost_steps for s in spans)
    lags = [c.step - c.durable_step for a in attempts for c in a.checkpoints
            if c.durable_step is not None]
    acc.max_lag_steps = max(lags) if lags else None
    trained = [s for s in spans if s.t_start is not None]
    acc.loop_seconds = sum(s.t_last - s.t_start for s in trained)
    acc.steps_executed = sum(s.last_step - s.first_step for s in trained)
    if trained:
        acc.useful_steps = sum(s.kept_step - s.first_step for s in trained)
        if acc.steps_executed > 0:
            acc.step_goodput = acc.useful_steps / acc.steps_executed
    if wall > 0 and run.kind == "training":
        acc.goodput = acc.useful / wall
        acc.stall_share_wall = acc.stall / wall
    if acc.loop_seconds > 0:
        acc.stall_share_loop = acc.stall / acc.loop_seconds
    if trained:
        acc.uninterrupted_seconds = (spans[0].startup + sum(s.useful + s.stall_kept
                                                            for s in spans) + spans[-1].tail)
    if run.kind == "units":
        _units(run, acc)
    return acc


def _units(run: Run, acc: Accounting) -> None:
    acc.units_total, acc.units_done = run.units_total, len(run.unit_times)
    committed = [u for a in run.attempts for u, _ in a.units]
    if committed:  # a unit committed again was lost with a VM before it reached the bucket
        acc.units_redone = len(committed) - len(set(committed))
    times = run.unit_times
    if len(times) >= 2 and times[-1] > times[0]:
        acc.units_per_minute = 60 * (len(times) - 1) / (times[-1] - times[0])
    acc.uninterrupted_seconds = None


@dataclass
class Cost:
    source: str  # where the prices come from
    nodes: int
    spot_per_hour: float | None
    spot_what: str | None  # "L4:1 (aws)"
    on_demand_per_hour: float | None
    on_demand_what: str | None
    spot: float | None  # $ for what this run was billed
    on_demand: float | None  # $ for the same work uninterrupted (training) or the same hours
    on_demand_basis: str
    saving: float | None  # 1 - spot / on_demand
    spot_seconds: float = 0.0  # per node
    on_demand_seconds: float = 0.0  # per node
    note: str | None = None


def estimate_cost(acc: Accounting, run: Run, table, candidates) -> Cost:
    """Spot and on-demand $ from the cheapest candidate of each; see __init__.py."""
    spot = _cheapest(table, candidates, spot=True)
    demand = _cheapest(table, candidates, spot=False)
    hours = acc.billed_seconds / 3600 * run.num_nodes
    if acc.uninterrupted_seconds is not None:
        basis = "the same work uninterrupted"
        demand_hours = acc.uninterrupted_seconds / 3600 * run.num_nodes
    else:
        basis = "the same node-hours"
        demand_hours = hours
    cost = Cost(table.source, run.num_nodes, spot and spot[0], spot and spot[1],
                demand and demand[0], demand and demand[1],
                spot[0] * hours if spot else None,
                demand[0] * demand_hours if demand else None, basis, None,
                spot_seconds=acc.billed_seconds, on_demand_seconds=demand_hours * 3600
                / run.num_nodes)
    if cost.spot is not None and cost.on_demand:
        cost.saving = 1 - cost.spot / cost.on_demand
    missing = [what for what, price in (("spot", spot), ("on-demand", demand)) if not price]
    if missing:
        names = ", ".join(f"{a}:{n}" + (f" ({c})" if c else "") for a, n, c in candidates)
        cost.note = f"no {' or '.join(missing)} price for {names} in {table.source}"
    return cost


def _cheapest(table, candidates, *, spot: bool) -> tuple[float, str] | None:
    best = None
    for name, count, cloud in candidates:
        price = table.hourly(name, count, spot=spot, cloud=cloud)
        if price is None and cloud is not None:
            continue
        if price is not None and (best is None or price < best[0]):
            best = (price, f"{name}:{count}" + (f" ({cloud})" if cloud else ""))
    return best
