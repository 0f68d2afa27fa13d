"""Plan a recipe on spot: expected wall time and cost per policy, the checkpoint interval, and
whether spot pays at all, from a preemption rate or a replayed real trace.

    python tools/plan.py recipes/train-lm-spot.yaml --hours 48 --preemptions-per-hour 0.3
    python tools/plan.py recipes/train-lm-spot.yaml --steps 20000 --step-seconds 8.6 \\
        --trace traces/bamboo-p3.csv --deadline-hours 60 --changeover-hours 0.2

Policies (tools/planning/policies.py): always on-demand, greedy spot, spot with on-demand
fallback and, under --deadline-hours, greedy with a safety net and Uniform Progress (Can't
Be Late, NSDI '24). Checkpoint cost C and restart overhead R come from --checkpoint-seconds
/ --restart-seconds, else from a rehearsal (--rehearsal, else the newest
runs/rehearse-<recipe>-*/rehearsal.json), else assumed and said so. Prices: --prices CSV in
SkyPilot's catalog columns, else SkyPilot's cached catalog, else the shipped sample. The
model and formulas: tools/planning/. Bad input: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from planning import interval as iv  # noqa: E402
from planning.measured import MeasuredError, newest_rehearsal, read_rehearsal  # noqa: E402
from planning.prices import PriceError, load_prices  # noqa: E402
from planning.resources import RecipeError, load_resources  # noqa: E402
from planning.simulate import Job, Summary, monte_carlo, pick_dt, spot_share_bound  # noqa: E402
from planning.traces import (  # noqa: E402
    EventLogTrace,
    PoissonModel,
    TraceError,
    capacity_view,
    load_trace,
    sample_uptimes,
)

ASSUMED_CHECKPOINT_S = 30.0  # without a rehearsal or --checkpoint-seconds
ASSUMED_RESTART_S = 60.0
DEFAULT_CHANGEOVER_H = 0.1  # the cloud getting a VM and running setup: 6 min
MISS_OK = 0.05  # a policy "makes" the deadline if it misses it in at most 5% of runs


class BadInput(Exception):
    """A user error: one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise BadInput(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="plan.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", type=Path, help="SkyPilot task YAML")
    length = p.add_argument_group("job length (one of)")
    length.add_argument("--hours", type=float, metavar="H", help="hours of compute")
    length.add_argument("--steps", type=int, metavar="N",
                        help="optimizer steps (with --step-seconds)")
    length.add_argument("--step-seconds", type=float, metavar="S",
                        help="seconds per step on the target GPUs (also gives intervals in steps)")
    p.add_argument("--checkpoint-seconds", type=float, metavar="C",
                   help="time one checkpoint stops the training loop")
    p.add_argument("--restart-seconds", type=float, metavar="R",
                   help="from launch on a ready VM to the first step after resume")
    p.add_argument("--rehearsal", type=Path, metavar="JSON",
                   help="rehearsal.json to take C and R from")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preemptions-per-hour", type=float, metavar="RATE",
                       help="Poisson preemptions per node per hour")
    model.add_argument("--trace", type=Path, metavar="FILE",
                       help="replay a trace: availability JSON, ms,add|remove,node log, or "
                            "preemption timestamps")
    p.add_argument("--capacity", action="store_true",
                   help="read an event log as capacity only (spot available while >= num_nodes "
                        "are up, as in Can't Be Late) instead of following the job's own nodes")
    p.add_argument("--deadline-hours", type=float, metavar="D")
    p.add_argument("--changeover-hours", type=float, metavar="d", default=None,
                   help=f"the cloud's time to get a VM and run setup, per launch "
                        f"(default {DEFAULT_CHANGEOVER_H})")
    p.add_argument("--interval-minutes", type=float, metavar="M",
                   help="simulate this checkpoint interval instead of the planned one")
    p.add_argument("--candidate", type=int, metavar="N",
                   help="plan this resource candidate (default: the cheapest spot one)")
    p.add_argument("--prices", type=Path, metavar="CSV", help="SkyPilot catalog-style CSV")
    p.add_argument("--runs", type=int, default=200, metavar="N", help="Monte Carlo runs (200)")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--offset-hours", type=float, metavar="H",
                   help="replay the trace from this hour in every run (default: random)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(a: argparse.Namespace) -> None:
    if (a.hours is None) == (a.steps is None):
        raise BadInput("give the job length: --hours H, or --steps N --step-seconds S")
    if a.steps is not None and a.step_seconds is None:
        raise BadInput("--steps needs --step-seconds (seconds per step on the target GPUs)")
    positive = {"--hours": a.hours, "--steps": a.steps, "--step-seconds": a.step_seconds,
                "--deadline-hours": a.deadline_hours, "--runs": a.runs,
                "--interval-minutes": a.interval_minutes}
    at_least_zero = {"--checkpoint-seconds": a.checkpoint_seconds,
                     "--restart-seconds": a.restart_seconds,
                     "--preemptions-per-hour": a.preemptions_per_hour,
                     "--changeover-hours": a.changeover_hours,
                     "--offset-hours": a.offset_hours, "--candidate": a.candidate}
    for flag, value in positive.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise BadInput(f"{flag} must be a positive number, not {value:g}")
    for flag, value in at_least_zero.items():
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise BadInput(f"{flag} must be >= 0, not {value:g}")
    if a.capacity and a.trace is None:
        raise BadInput("--capacity reads an event log given with --trace")


@dataclass
class Inputs:
    work_h: float
    checkpoint_s: float
    save_s: float
    restart_s: float
    changeover_h: float
    sources: dict[str, str]  # where C, R and d came from


def job_inputs(a: argparse.Namespace) -> Inputs:
    work_h = a.hours if a.hours is not None else a.steps * a.step_seconds / 3600.0
    measured = None
    path = a.rehearsal or (None if a.checkpoint_seconds is not None
                           and a.restart_seconds is not None else newest_rehearsal(a.recipe))
    if path is not None:
        measured = read_rehearsal(path)
        if a.rehearsal and measured.checkpoint_s is None and a.checkpoint_seconds is None:
            raise BadInput(f"{path}: no checkpoint events (the recipe wrote no skyspot "
                           f"checkpoints?): pass --checkpoint-seconds")
    src = {}

    def pick(flag_value, measured_value, assumed, what):
        if flag_value is not None:
            src[what] = "given"
            return flag_value
        if measured_value is not None:
            src[what] = f"rehearsal {measured.path}"
            return measured_value
        src[what] = "assumed: no rehearsal; pass it or --rehearsal"
        return assumed

    c = pick(a.checkpoint_seconds, measured and measured.checkpoint_s, ASSUMED_CHECKPOINT_S,
             "checkpoint")
    save = (measured.save_s if measured and measured.save_s and a.checkpoint_seconds is None
            else c)
    r = pick(a.restart_seconds, measured and measured.restart_s, ASSUMED_RESTART_S, "restart")
    d = a.changeover_hours if a.changeover_hours is not None else DEFAULT_CHANGEOVER_H
    src["changeover"] = "given" if a.changeover_hours is not None else "assumed"
    return Inputs(work_h, c, max(save, c), r, d, src)


def spot_model(a: argparse.Namespace):
    if a.trace is not None:
        trace = load_trace(a.trace)
        if a.capacity:
            if not isinstance(trace, EventLogTrace):
                raise BadInput("--capacity applies to an ms,add|remove,node event log")
            trace = capacity_view(trace)
        if a.offset_hours is not None and a.offset_hours >= trace.length_h:
            raise BadInput(f"--offset-hours {a.offset_hours:g} is past the trace's end "
                           f"({trace.length_h:.2f} h)")
        return trace
    return PoissonModel(a.preemptions_per_hour or 0.0)


def choose_candidate(a, resources):
    priced = [c for c in resources.candidates
              if c.spot_per_node is not None and c.od_per_node is not None]
    if a.candidate is not None:
        if a.candidate >= len(resources.candidates):
            raise BadInput(f"--candidate {a.candidate}: the recipe has "
                           f"{len(resources.candidates)} candidate(s), numbered from 0")
        chosen = resources.candidates[a.candidate]
        if chosen not in priced:
            raise BadInput(f"no price for {chosen.candidate.describe()} in the price table: "
                           f"pass --prices CSV with a row for it")
        return chosen
    if not priced:
        names = ", ".join(c.candidate.describe() for c in resources.candidates)
        raise BadInput(f"no spot and on-demand price for any candidate of {a.recipe} ({names}) "
                       f"in the price table: pass --prices CSV with rows for them")
    return min(priced, key=lambda c: c.spot_per_node)


def plan(a: argparse.Namespace, progress=None) -> dict:
    inputs = job_inputs(a)
    model = spot_model(a)
    prices = load_prices(a.prices)
    resources = load_resources(a.recipe, prices)  # imports SkyPilot: after the cheap checks
    chosen = choose_candidate(a, resources)
    nodes = resources.num_nodes
    c_h, launch_h = inputs.checkpoint_s / 3600.0, inputs.changeover_h + inputs.restart_s / 3600.0

    # Mean time between preemptions of the job, and the intervals from it.
    rng = random.Random(f"{a.seed}:uptimes")
    uptimes = sample_uptimes(model, nodes, rng)
    if isinstance(model, PoissonModel):
        rate = model.job_rate(nodes)
        mtbf = 1.0 / rate if rate > 0 else math.inf
        median_up = math.log(2) * mtbf
    else:
        if not uptimes:
            raise BadInput(f"{a.trace}: spot is never available for {nodes} node(s)")
        mtbf, median_up = statistics.fmean(uptimes), statistics.median(uptimes)
        rate = 1.0 / mtbf if math.isfinite(mtbf) else 0.0
    young = iv.young(c_h, mtbf) if math.isfinite(mtbf) else math.inf
    daly = iv.daly(c_h, mtbf) if math.isfinite(mtbf) else math.inf
    from_trace = (None if isinstance(model, PoissonModel) or not math.isfinite(mtbf)
                  else iv.best_interval_for_uptimes(uptimes, c_h, launch_h))
    if a.interval_minutes is not None:
        tau, tau_from = a.interval_minutes / 60.0, "given"
    elif from_trace is not None:
        tau, tau_from = from_trace, "best for the trace's real uptimes"
    else:
        tau, tau_from = daly, "Daly"
    save_h = inputs.save_s / 3600.0
    if 0 < tau < save_h:  # a periodic save is skipped while the previous one is being written
        tau, tau_from = save_h, tau_from + ", raised to one save's duration"

    job = Job(work_h=inputs.work_h, interval_h=tau, checkpoint_h=c_h,
              restart_h=inputs.restart_s / 3600.0, changeover_h=inputs.changeover_h,
              deadline_h=a.deadline_hours, od_price=chosen.od_per_node * nodes,
              spot_price=chosen.spot_per_node * nodes, num_nodes=nodes)
    summaries = monte_carlo(job, model, a.runs, a.seed, a.offset_hours, on_run=progress)

    def steps(hours):
        if a.step_seconds is None or not math.isfinite(hours):
            return None
        return max(1, round(hours * 3600.0 / a.step_seconds))

    greedy = next(s for s in summaries if s.policy == "greedy spot")
    result = {
        "recipe": str(a.recipe),
        "task": {"name": resources.task_name, "index": resources.task_index,
                 "of": resources.tasks},
        "num_nodes": nodes,
        "candidate": {"index": chosen.index, "what": chosen.candidate.describe(),
                      "spot_per_node": chosen.spot_per_node, "od_per_node": chosen.od_per_node},
        "candidates": [{"index": c.index, "what": c.candidate.describe(),
                        "spot_per_node": c.spot_per_node, "od_per_node": c.od_per_node}
                       for c in resources.candidates],
        "prices": prices.source,
        "job": {"work_h": inputs.work_h, "steps": a.steps, "step_seconds": a.step_seconds,
                "checkpoint_s": inputs.checkpoint_s, "save_s": inputs.save_s,
                "restart_s": inputs.restart_s, "changeover_h": inputs.changeover_h,
                "launch_h": launch_h, "deadline_h": a.deadline_hours,
                "sources": inputs.sources},
        "preemptions": {"model": model.describe(nodes), "kind": model.kind,
                        "mtbf_h": _num(mtbf), "median_uptime_h": _num(median_up)},
        "interval": {
            "young_min": _num(young * 60), "young_steps": steps(young),
            "daly_min": _num(daly * 60), "daly_steps": steps(daly),
            "trace_min": _num(from_trace * 60) if from_trace is not None else None,
            "trace_steps": steps(from_trace) if from_trace is not None else None,
            "simulated_min": _num(tau * 60), "simulated_steps": steps(tau),
            "simulated_from": tau_from,
        },
        "lost_per_preemption": {
            "work_h_expected": (_num(iv.expected_lost_work(tau, c_h, rate))
                                if isinstance(model, PoissonModel) and rate > 0 else None),
            "work_h_simulated": greedy.lost_per_preemption,
            "relaunch_h": launch_h,
        },
        "monte_carlo": {"runs": a.runs, "seed": a.seed, "dt_h": pick_dt(job, model),
                        "offset_h": a.offset_hours},
        "policies": [policy_row(s, job) for s in summaries],
        "spot_share_bound": spot_share_bound(job, model, a.runs, a.seed, a.offset_hours),
    }
    if isinstance(model, PoissonModel):
        od_h = iv.on_demand_hours(inputs.work_h, math.inf, c_h, launch_h)  # no periodic saves
        spot_h = iv.expected_spot_hours(inputs.work_h, tau, c_h, launch_h, rate)
        result["formula"] = {"on_demand_h": od_h, "on_demand_cost": od_h * job.od_price,
                             "greedy_spot_h": spot_h, "greedy_spot_cost": spot_h * job.spot_price}
    result["verdict"] = verdict(result, job, mtbf, tau)
    return result


def policy_row(s: Summary, job: Job) -> dict:
    return {"policy": s.policy,
            "wall_h_mean": s.mean("wall_h"), "wall_h_p90": s.quantile("wall_h", 0.9),
            "cost_mean": s.mean("cost"), "cost_p90": s.quantile("cost", 0.9),
            "p_miss": s.p_miss if job.deadline_h is not None else None,
            "unfinished": s.unfinished,
            "spot_share": s.mean("spot_share"), "preemptions_mean": s.mean("preemptions")}


def verdict(result: dict, job: Job, mtbf: float, tau: float) -> str:
    rows = {r["policy"]: r for r in result["policies"]}
    od = rows["on-demand"]
    deadline = job.deadline_h
    if deadline is not None and od["p_miss"] > MISS_OK:
        return (f"No policy makes the {deadline:g} h deadline: the work alone takes "
                f"{od['wall_h_mean']:.2f} h on on-demand.")
    spot = [r for name, r in rows.items() if name != "on-demand"
            and (deadline is None or r["p_miss"] <= MISS_OK) and not r["unfinished"]]
    best = min(spot, key=lambda r: r["cost_mean"], default=None)
    if best is not None and best["cost_mean"] < od["cost_mean"]:
        saved = 1 - best["cost_mean"] / od["cost_mean"]
        made = (f", missing the deadline in {100 * best['p_miss']:.0f}% of runs"
                if deadline is not None else "")
        return (f"Spot pays: {best['policy']} costs ${best['cost_mean']:,.2f} on average "
                f"({100 * saved:.0f}% less than on-demand's ${od['cost_mean']:,.2f}) and takes "
                f"{best['wall_h_mean']:.2f} h{made}.")
    slack = deadline - od["wall_h_mean"] if deadline is not None else None
    if slack is not None and slack < 2 * job.launch_h:
        why = (f"the deadline leaves {slack:.2f} h of slack over on-demand, less than two "
               f"changeovers ({job.launch_h:.2f} h each)")
    elif job.work_h < 4 * job.launch_h:
        why = (f"the job is short: each launch takes {job.launch_h:.2f} h against "
               f"{job.work_h:.2f} h of work")
    elif mtbf < 2 * (job.launch_h + tau + job.checkpoint_h):
        why = (f"preemptions come every {mtbf:.2f} h on average, against {job.launch_h:.2f} h "
               f"to relaunch and {tau:.2f} h of work between checkpoints")
    else:
        why = (f"spot at ${job.spot_price:.4g}/h does not save enough against on-demand's "
               f"${job.od_price:.4g}/h for the time preemptions and waiting cost")
    return f"Spot does not pay here: {why}. Run on-demand."


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


# --- output ---------------------------------------------------------------------------------

def _h(hours: float | None) -> str:
    if hours is None:
        return "-"
    return f"{hours * 60:.1f} min" if hours < 1 else f"{hours:.2f} h"


def print_text(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(110, Console().width), highlight=False)

    def out(line) -> None:
        console.print(line, soft_wrap=True)

    job, cand = r["job"], r["candidate"]
    task = (f" (task {r['task']['index'] + 1} of {r['task']['of']}: {r['task']['name']})"
            if r["task"]["of"] > 1 else "")
    out(f"plan: {r['recipe']}{task}, {r['num_nodes']} node(s), candidate #{cand['index']} "
        f"{cand['what']}: spot ${cand['spot_per_node']:.4g}/h, on-demand "
        f"${cand['od_per_node']:.4g}/h per node")
    out(f"  prices: {r['prices']}")
    unpriced = [c["what"] for c in r["candidates"] if c["spot_per_node"] is None]
    if unpriced:
        out(f"  no price for: {', '.join(unpriced)}")
    src = job["sources"]
    steps = (f" ({job['steps']} steps x {job['step_seconds']:g} s)" if job["steps"] else "")
    out(f"  job: {job['work_h']:.2f} h of work{steps}; checkpoint C {job['checkpoint_s']:.3g} s "
        f"({src['checkpoint']}); restart R {job['restart_s']:.3g} s ({src['restart']}); "
        f"changeover d {job['changeover_h']:g} h ({src['changeover']}); a launch takes "
        f"d + R = {_h(job['launch_h'])}"
        + (f"; deadline {job['deadline_h']:g} h" if job["deadline_h"] else ""))
    pre = r["preemptions"]
    lasts = (f"the job's nodes last {_h(pre['mtbf_h'])} on average (median "
             f"{_h(pre['median_uptime_h'])})" if pre["mtbf_h"] is not None
             else "the job's nodes are never preempted")
    out(f"  preemptions: {pre['model']}; {lasts}")
    i = r["interval"]

    def with_steps(minutes, n):
        if minutes is None:
            return "never (no preemptions)"
        return f"{minutes:.2f} min" + (f" = --checkpoint-every-steps {n}" if n else "")

    out("checkpoint interval (work between saves; C and M = the mean uptime above):")
    out(f"  Young sqrt(2CM)          {with_steps(i['young_min'], i['young_steps'])}")
    out(f"  Daly (higher order)      {with_steps(i['daly_min'], i['daly_steps'])}")
    if i["trace_min"] is not None:
        out(f"  best for real uptimes    {with_steps(i['trace_min'], i['trace_steps'])}")
    out(f"  simulated                {with_steps(i['simulated_min'], i['simulated_steps'])} "
        f"({i['simulated_from']})")
    lost = r["lost_per_preemption"]
    expected = (f"{_h(lost['work_h_expected'])} expected (Poisson), "
                if lost["work_h_expected"] is not None else "")
    if lost["work_h_simulated"] is None and not expected:
        out("lost per preemption: none in the simulation")
    else:
        simulated = (f"{_h(lost['work_h_simulated'])} simulated"
                     if lost["work_h_simulated"] is not None else "none simulated")
        out(f"lost per preemption: {expected}{simulated} of work, then "
            f"{_h(lost['relaunch_h'])} to relaunch")
    mc = r["monte_carlo"]
    start = ("random offsets" if mc["offset_h"] is None else f"hour {mc['offset_h']:g}")
    how = "Poisson" if pre["kind"] == "poisson" else f"trace replayed from {start}"
    table = Table(title=f"{mc['runs']} runs, {how}, tick {_h(mc['dt_h'])}, seed {mc['seed']}")
    for col in ("policy", "wall h mean", "p90", "cost $ mean", "p90", "P(miss)", "spot share",
                "preemptions"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for p in r["policies"]:
        miss = "-" if p["p_miss"] is None else f"{100 * p['p_miss']:.0f}%"
        if p["unfinished"]:
            miss += f" ({p['unfinished']} unfinished)"
        table.add_row(p["policy"], f"{p['wall_h_mean']:.2f}", f"{p['wall_h_p90']:.2f}",
                      f"{p['cost_mean']:,.2f}", f"{p['cost_p90']:,.2f}", miss,
                      f"{100 * p['spot_share']:.0f}%", f"{p['preemptions_mean']:.1f}")
    console.print(table)
    if r["spot_share_bound"] is not None:
        out(f"no policy, even one that knew the trace, can do more than "
            f"{100 * r['spot_share_bound']:.0f}% of the work on spot by the deadline (the spot "
            f"hours in each run's window, less a changeover per stretch)")
    if "formula" in r:
        f = r["formula"]
        out(f"closed form (Poisson, spot always relaunchable): on-demand {f['on_demand_h']:.2f} h "
            f"${f['on_demand_cost']:,.2f}; greedy spot {f['greedy_spot_h']:.2f} h "
            f"${f['greedy_spot_cost']:,.2f}")
    out(r["verdict"])


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        progress = _progress(args)
        with progress or contextlib.nullcontext():
            tick = None
            if progress is not None:
                task = progress.add_task("Monte Carlo", total=args.runs)

                def tick():
                    progress.advance(task)

            result = plan(args, tick)
    except (BadInput, TraceError, PriceError, MeasuredError, RecipeError) as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print_text(result)
    return 0


def _progress(args):
    """A progress bar on a terminal, for a Monte Carlo that takes more than a moment."""
    if not sys.stderr.isatty() or args.runs < 50:
        return None
    from rich.progress import Progress

    return Progress(transient=True)


if __name__ == "__main__":
    sys.exit(main())
