"""The spot policies, all in one place. Each run gets fresh instances (they keep state).

Every tick the simulator asks ``choose(now)`` what the job should run on: ``"spot"``,
``"od"`` (on-demand) or ``None`` (nothing: wait, paying nothing). Returning what it already
runs on keeps it; anything else stops it (saving its progress on the way out) and launches
the new kind, which takes the changeover (d + R) before the first step. ``"spot"`` is only
possible while the job still holds its spot nodes or ``now.spot_ok``.

- **on-demand**: always on-demand, with no periodic checkpoints (nothing preempts it): the
  price of not using spot at all. Every other policy saves every interval, on spot or not.
- **greedy spot**: spot whenever it can be had, else wait; no deadline in mind. This is a
  SkyPilot managed spot job (``use_spot: true``, EAGER_NEXT_REGION or FAILOVER).
- **spot, on-demand fallback**: SkyPilot's ``any_of`` with spot and on-demand candidates.
  Each (re)launch takes the cheapest candidate that is there: spot if it can be had, else
  on-demand; on-demand is never preempted, so it keeps it to the end.
- **greedy + safety net** (the Can't Be Late paper's "Greedy"): greedy spot until the slack
  left is less than a changeover, then on-demand for good.
- **Uniform Progress** (Can't Be Late, NSDI '24): spot whenever it can be had; on-demand only
  when progress falls behind the straight line from (0, 0) to (deadline, job), staying there
  until ahead of the line again by two changeovers; on-demand for good once the slack left
  is less than a changeover.

Slack is ``deadline - t - hours the rest takes on a running on-demand instance`` (the rest
counted from the last checkpoint, saves included): what waiting, launches and preemptions
can still use up. Below one changeover plus a tick, on-demand for good still makes it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Now:
    t: float  # hours since the job was submitted
    progress: float  # hours of work done (since the last checkpoint included)
    committed: float  # hours of work a preemption would not lose
    on: str | None  # "spot", "od" or None
    spot_ok: bool  # spot nodes can be launched now
    slack: float | None  # hours to spare if the rest ran on on-demand (None: no deadline)
    changeover: float  # d + R: a launch's hours before the first step
    tick: float  # hours until the next decision


class OnDemand:
    name = "on-demand"
    periodic_saves = False  # never preempted: the baseline saves only at the end

    def choose(self, now: Now) -> str | None:
        return "od"


class GreedySpot:
    name = "greedy spot"

    def choose(self, now: Now) -> str | None:
        return "spot" if now.on == "spot" or now.spot_ok else None


class SpotOnDemandFallback:
    name = "spot, on-demand fallback"

    def choose(self, now: Now) -> str | None:
        if now.on is not None:
            return now.on
        return "spot" if now.spot_ok else "od"


class _SafetyNet:
    """On-demand for good once the slack left is less than one changeover (and the tick
    the decision may wait for)."""

    for_good = False

    def out_of_slack(self, now: Now) -> bool:
        if not self.for_good and now.slack is not None:
            self.for_good = now.slack < now.changeover + now.tick
        return self.for_good


class GreedyWithSafetyNet(_SafetyNet):
    name = "greedy + safety net"

    def choose(self, now: Now) -> str | None:
        if self.out_of_slack(now):
            return "od"
        return "spot" if now.on == "spot" or now.spot_ok else None


class UniformProgress(_SafetyNet):
    name = "Uniform Progress"

    def __init__(self, work_h: float, deadline_h: float):
        self.rate = work_h / deadline_h  # the straight line: work per hour
        self.catching_up = False

    def choose(self, now: Now) -> str | None:
        if self.out_of_slack(now):
            return "od"
        ahead = now.progress - self.rate * now.t
        if self.catching_up and ahead < 2 * now.changeover:
            return "od"
        self.catching_up = False
        if now.on == "spot" or now.spot_ok:
            return "spot"
        if ahead < 0:
            self.catching_up = True
            return "od"
        return None


def policies_for(work_h: float, deadline_h: float | None) -> list:
    """Fresh policy objects for one run: the deadline-aware two only under a deadline."""
    found = [OnDemand(), GreedySpot(), SpotOnDemandFallback()]
    if deadline_h is not None:
        found += [GreedyWithSafetyNet(), UniformProgress(work_h, deadline_h)]
    return found
