"""One run of a job under a policy and a spot market, and the Monte Carlo over many runs.

The model, in hours (discrete time, a tick of ``dt``):

- The job is ``work_h`` of compute. After every ``interval_h`` of work it checkpoints, which
  stops the work for ``checkpoint_h`` (C); the work is committed when the save ends. No save
  after the last piece of work. ``interval_h = 0`` means progress is never lost (saved
  continuously, or on the preemption notice), the Can't Be Late paper's assumption.
- Every launch (the first, a relaunch after a preemption, a switch between spot and
  on-demand) takes ``changeover_h + restart_h`` (d + R: the cloud getting a VM, then the job
  starting and resuming) before the first step. It is paid for; nothing progresses.
- A preemption (the market's ``lost``, checked at every tick) loses the work since the last
  commit (a save in progress included) and the nodes; the policy then picks again.
- A switch the policy makes on its own saves the progress on the way out (no loss).
- Cost: every tick an instance is held (launching, working or saving) at its $/h (spot from
  the trace's prices when it has them). Waiting with nothing held is free.

Within a tick the launch, save and work run in sequence to the exact hour, so the finish
time and cost do not depend on dt; the market and the policy are consulted once per tick.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from planning.policies import Now, policies_for
from planning.traces import AvailabilityTrace, Model


@dataclass(frozen=True)
class Job:
    work_h: float  # compute hours with no overhead
    interval_h: float  # work between checkpoints (0: progress never lost; inf: never saved)
    checkpoint_h: float  # C: the work stops this long for a save
    restart_h: float  # R: the job's own start and resume on a fresh VM
    changeover_h: float  # d: the cloud getting a VM (and its setup)
    deadline_h: float | None
    od_price: float  # $/h, all nodes
    spot_price: float  # $/h, all nodes (a trace's prices replace it per tick)
    num_nodes: int = 1

    @property
    def launch_h(self) -> float:
        return self.changeover_h + self.restart_h

    def on_demand_hours_left(self, done: float) -> float:
        """Hours the rest takes on a running on-demand instance, saves included."""
        left = max(self.work_h - done, 0.0)
        if 0 < self.interval_h < math.inf:
            left += self.checkpoint_h * max(math.ceil(left / self.interval_h) - 1, 0)
        return left


@dataclass
class Run:
    policy: str
    wall_h: float = 0.0
    cost: float = 0.0
    spot_work_h: float = 0.0  # committed work done on spot (lost work not counted)
    od_work_h: float = 0.0
    preemptions: int = 0
    lost_work_h: float = 0.0  # work thrown away by preemptions (saves in progress included)
    finished: bool = False
    missed: bool = False  # finished after the deadline, or never

    @property
    def spot_share(self) -> float:
        done = self.spot_work_h + self.od_work_h
        return self.spot_work_h / done if done else 0.0


def simulate(policy, market, job: Job, dt: float, limit_h: float) -> Run:
    """One run, from submission until the job is done or limit_h passes."""
    run = Run(policy.name)
    if not getattr(policy, "periodic_saves", True):
        job = replace(job, interval_h=math.inf)
    t, progress, committed, since_save = 0.0, 0.0, 0.0, 0.0
    on, launch_left, save_left = None, 0.0, 0.0
    done_on = {"spot": 0.0, "od": 0.0}  # uncommitted work by kind, for the spot share

    def commit() -> None:
        nonlocal committed, since_save
        run.spot_work_h += done_on["spot"]
        run.od_work_h += done_on["od"]
        done_on["spot"] = done_on["od"] = 0.0
        committed, since_save = progress, 0.0

    while t < limit_h:
        if on == "spot" and market.lost(t):
            run.preemptions += 1
            run.lost_work_h += progress - committed + (job.checkpoint_h - save_left
                                                       if save_left > 0 else 0.0)
            progress, since_save, save_left = committed, 0.0, 0.0
            done_on["spot"] = done_on["od"] = 0.0
            on = None
        slack = (None if job.deadline_h is None else job.deadline_h - t
                 - job.on_demand_hours_left(progress if on == "od" else committed))
        spot_ok = on == "spot" or market.can_launch(t)
        want = policy.choose(Now(t, progress, committed, on, spot_ok, slack, job.launch_h, dt))
        if want == "spot" and not spot_ok:
            want = None
        if want != on:
            if on is not None:  # leaving on purpose: save on the way out
                save_left = 0.0
                commit()
            on, launch_left = want, job.launch_h
            if on == "spot":
                market.launch(t)
        if on is None:
            t += dt
            continue
        price = job.od_price if on == "od" else _spot_price(market, job, t)
        budget = dt
        while budget > 1e-12 and progress < job.work_h - 1e-12:
            if launch_left > 0:
                step = min(budget, launch_left)
                launch_left -= step
            elif save_left > 0:
                step = min(budget, save_left)
                save_left -= step
                if save_left <= 1e-12:
                    save_left = 0.0
                    commit()
            else:
                until_save = (job.interval_h - since_save if job.interval_h > 0 else math.inf)
                step = min(budget, job.work_h - progress, until_save)
                progress += step
                since_save += step
                done_on[on] += step
                if job.interval_h == 0:
                    commit()
                elif since_save >= job.interval_h - 1e-12 and progress < job.work_h - 1e-12:
                    save_left = job.checkpoint_h
                    if save_left == 0:
                        commit()
            budget -= step
        if progress >= job.work_h - 1e-12:
            commit()
            run.cost += price * (dt - budget)
            run.wall_h, run.finished = t + dt - budget, True
            break
        run.cost += price * dt
        t += dt
    else:
        run.wall_h = limit_h
    run.missed = not run.finished or (job.deadline_h is not None
                                      and run.wall_h > job.deadline_h + 1e-9)
    return run


def _spot_price(market, job: Job, t: float) -> float:
    per_node = market.spot_price(t)
    return job.spot_price if per_node is None else per_node * job.num_nodes


@dataclass
class Summary:
    """A policy's runs."""

    policy: str
    runs: list[Run] = field(default_factory=list)

    def mean(self, attr: str) -> float:
        return statistics.fmean(getattr(r, attr) for r in self.runs)

    def quantile(self, attr: str, q: float) -> float:
        values = sorted(getattr(r, attr) for r in self.runs)
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]

    @property
    def p_miss(self) -> float:
        return sum(r.missed for r in self.runs) / len(self.runs)

    @property
    def unfinished(self) -> int:
        return sum(not r.finished for r in self.runs)

    @property
    def lost_per_preemption(self) -> float | None:
        n = sum(r.preemptions for r in self.runs)
        return sum(r.lost_work_h for r in self.runs) / n if n else None


def pick_dt(job: Job, model: Model) -> float:
    """A tick of at most 1 min and at most ~3000 per run, never coarser than the trace."""
    horizon = job.deadline_h or 2.0 * (job.work_h + job.launch_h)
    dt = max(1 / 60, horizon / 3000)
    gap = getattr(model, "gap_h", None)
    return min(dt, gap) if gap else dt


def monte_carlo(job: Job, model: Model, runs: int, seed: int,
                offset_h: float | None = None, dt: float | None = None,
                on_run: Callable[[], None] | None = None) -> list[Summary]:
    """`runs` runs of every policy. Run i of each policy sees the same market (the same
    start offset into the trace, the same random numbers), so policies are compared on the
    same luck."""
    dt = dt or pick_dt(job, model)
    limit = max(20.0 * (job.work_h + job.launch_h), 2.0 * (job.deadline_h or 0.0))
    names = [p.name for p in policies_for(job.work_h, job.deadline_h)]
    summaries = [Summary(n) for n in names]
    for i in range(runs):
        for summary, policy in zip(summaries, policies_for(job.work_h, job.deadline_h),
                                   strict=True):
            rng = random.Random(f"{seed}:{i}")
            market = model.market(rng, job.num_nodes, offset_h)
            summary.runs.append(simulate(policy, market, job, dt, limit))
        if on_run:
            on_run()
    return summaries


def spot_share_bound(job: Job, model: Model, runs: int, seed: int,
                     offset_h: float | None = None) -> float | None:
    """An upper bound on the spot share any policy, even an omniscient one, can reach by the
    deadline on an availability trace: the spot hours in [0, deadline] of each run's window,
    less a changeover per stretch, over the work (at most 1). None without a deadline or on
    other models. The windows are the runs' own (the same random offsets)."""
    if job.deadline_h is None or not isinstance(model, AvailabilityTrace):
        return None
    shares = []
    for i in range(runs):
        market = model.market(random.Random(f"{seed}:{i}"), job.num_nodes, offset_h)
        usable, stretch, t = 0.0, 0.0, 0.0
        while t < job.deadline_h:
            if market.can_launch(t):
                stretch += model.gap_h
            else:
                usable += max(0.0, stretch - job.launch_h)
                stretch = 0.0
            t += model.gap_h
        usable += max(0.0, stretch - job.launch_h)
        shares.append(min(1.0, usable / job.work_h))
    return statistics.fmean(shares)
