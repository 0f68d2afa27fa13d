"""Write a synthetic spot availability trace in SkyPilot's JSON format: spot up and down in
turns, each stretch drawn from a lognormal with the median and mean given (real uptimes are
heavy-tailed: the issue's AWS V100 zone had a median of 1.14 h against a mean of 3.13 h).
For tests and for comparing policies where no real trace is at hand; it is not data.

    python tools/planning/synthetic.py /tmp/synthetic.json --hours 2000 --seed 0 \\
        --up 1.14 3.13 --down 0.5 1.5
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path


def stretches(rng: random.Random, median: float, mean: float):
    sigma = math.sqrt(2.0 * math.log(mean / median)) if mean > median else 0.0
    while True:
        yield rng.lognormvariate(math.log(median), sigma)


def two_state(hours: float, gap_h: float, up: tuple[float, float], down: tuple[float, float],
              seed: int) -> list[int]:
    """1 (spot available) or 0 per tick of gap_h, starting up."""
    rng = random.Random(seed)
    ups, downs = stretches(rng, *up), stretches(rng, *down)
    data, state = [], 1
    while len(data) * gap_h < hours:
        length = next(ups if state else downs)
        data += [state] * max(1, round(length / gap_h))
        state ^= 1
    return data[: math.ceil(hours / gap_h)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--hours", type=float, default=2000.0)
    p.add_argument("--gap-seconds", type=int, default=300)
    p.add_argument("--up", type=float, nargs=2, default=(1.14, 3.13), metavar=("MEDIAN", "MEAN"))
    p.add_argument("--down", type=float, nargs=2, default=(0.5, 1.5), metavar=("MEDIAN", "MEAN"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    data = two_state(a.hours, a.gap_seconds / 3600.0, tuple(a.up), tuple(a.down), a.seed)
    a.out.write_text(json.dumps({"metadata": {"gap_seconds": a.gap_seconds, "synthetic": True,
                                              "up_median_mean_h": a.up,
                                              "down_median_mean_h": a.down, "seed": a.seed},
                                 "data": data}) + "\n")
    print(f"{a.out}: {len(data)} ticks, spot up {100 * sum(data) / len(data):.0f}% of the time")


if __name__ == "__main__":
    main()
