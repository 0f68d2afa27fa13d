"""How often to checkpoint, and what a preemption costs, in closed form.

Units are hours throughout (the CLI converts). C is the time one checkpoint stops the work,
M the mean time between preemptions of the job, L the time from a launch to the first
productive step (changeover delay d + restart overhead R), lam = 1/M.

- Young (1974): tau = sqrt(2 C M).
- Daly (2006), the higher-order form: tau = sqrt(2 C M) [1 + (1/3) sqrt(C/2M) + (1/9) (C/2M)] - C
  for C < 2M, else tau = M. With C = 5 min and M = 24 h: 116.69 min (Daly states ~117),
  Young 120 min.
- Both assume exponential uptimes. ``best_interval_for_uptimes`` takes real ones instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def young(c: float, m: float) -> float:
    """Young's interval sqrt(2CM): work between checkpoints, same unit as C and M."""
    return math.sqrt(2.0 * c * m)


def daly(c: float, m: float) -> float:
    """Daly's higher-order interval (Daly 2006, eq. 37)."""
    if c >= 2.0 * m:
        return m
    x = c / (2.0 * m)
    return math.sqrt(2.0 * c * m) * (1.0 + math.sqrt(x) / 3.0 + x / 9.0) - c


def segments(work: float, tau: float) -> list[float]:
    """The work between checkpoints: full intervals of tau, then the rest (no save at the end)."""
    if tau <= 0 or math.isinf(tau) or tau >= work:
        return [work]
    full = math.ceil(work / tau) - 1
    return [tau] * full + [work - full * tau]


def expected_lost_work(tau: float, c: float, lam: float) -> float:
    """Mean time lost by one preemption (work since the last commit, a save in progress
    included) under Poisson preemptions: E[X | X < s] for X ~ Exp(lam), s = tau + C.
    About s/2 when lam s is small; 0 when progress is saved continuously (tau = 0)."""
    s = tau + c
    if s <= 0:
        return 0.0
    if lam <= 0 or math.isinf(s):
        return s / 2.0 if not math.isinf(s) else math.inf
    return 1.0 / lam - s / math.expm1(lam * s)


def expected_spot_hours(work: float, tau: float, c: float, launch: float, lam: float) -> float:
    """Expected wall hours of a spot job that is always relaunchable (Poisson preemptions of
    rate lam, every launch taking `launch` before the first step, preemptions possible then
    too; a checkpoint of C after every tau of work but the last).

    A segment of s that starts with a launch: E_L(s) = (e^(lam (L+s)) - 1) / lam (restart from
    the launch until L + s passes without a preemption). A later segment starts on a running
    instance: T(s) = E[min(X, s)] + P(X < s) E_L(s) = (1 - e^(-lam s)) (1/lam + E_L(s)),
    X ~ Exp(lam) the instance's remaining life (memoryless).
    """
    parts = segments(work, tau)
    lengths = [p + c for p in parts[:-1]] + [parts[-1]]
    if lam <= 0:
        return launch + sum(lengths)

    def with_launch(s: float) -> float:
        return math.expm1(lam * (launch + s)) / lam

    def on_running(s: float) -> float:
        return -math.expm1(-lam * s) * (1.0 / lam + with_launch(s))

    return with_launch(lengths[0]) + sum(on_running(s) for s in lengths[1:])


def on_demand_hours(work: float, tau: float, c: float, launch: float) -> float:
    """Wall hours with no preemption: one launch, the work, a checkpoint after every tau."""
    return launch + work + c * (len(segments(work, tau)) - 1)


def committed_work(uptime: float, tau: float, c: float, launch: float) -> float:
    """Work an instance that lives `uptime` hours commits: whole (tau + C) periods after
    its launch (what is not saved when it goes is lost)."""
    productive = uptime - launch
    if productive <= 0:
        return 0.0
    if tau <= 0:
        return productive
    return math.floor(productive / (tau + c)) * tau


def best_interval_for_uptimes(uptimes: Sequence[float], c: float, launch: float,
                              grid: int = 400) -> float:
    """The interval that commits the most work per hour over these real uptimes (each a
    launch's life, from a trace), searched on a log grid from C/10 to the longest uptime.
    A long-lived instance is cut off by the job's end, so this is the steady-state optimum."""
    ups = [u for u in uptimes if u > launch]
    if not ups or c <= 0:
        return 0.0 if c <= 0 else max(uptimes, default=0.0)
    total = sum(uptimes)
    lo, hi = max(c / 10.0, 1e-4), max(ups)
    best, best_rate = hi, -1.0
    for i in range(grid + 1):
        tau = lo * (hi / lo) ** (i / grid)
        rate = sum(committed_work(u, tau, c, launch) for u in ups) / total
        if rate > best_rate + 1e-12:
            best, best_rate = tau, rate
    return best
