"""The summary: terminal text, markdown or JSON, from a Run, its Accounting and its Cost."""

from __future__ import annotations

import json
from dataclasses import asdict

from reporting.accounting import KINDS, Accounting, Cost
from reporting.runs import Run


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def percent(share: float | None) -> str:
    if share is None:
        return "-"
    return f"{100 * share:.1f}%" if share >= 0.001 or share == 0 else f"{100 * share:.2f}%"


def money(value: float | None) -> str:
    if value is None:
        return "-"
    return f"${value:.2f}" if value >= 0.1 else f"${value:.4f}"


def faults_line(acc: Accounting) -> str:
    kinds = [f"{kind} {acc.preemptions[kind]}" for kind in KINDS if acc.preemptions.get(kind)]
    failures = f", {acc.failures} failed" if acc.failures else ""
    return (", ".join(kinds) or "none") + failures


def headline(run: Run, acc: Accounting, cost: Cost | None) -> str:
    """Two lines for the PNG's title: what ran and how it ended, then the key figures."""
    first = [f"{run.name}: {run.source}" + (f", {run.status}" if run.status else ""),
             f"wall {duration(acc.wall)}"]
    if run.attempts:
        first.append(f"{len(run.attempts)} attempts, preemptions: {faults_line(acc)}")
    if run.kind == "training":
        second = [f"goodput {percent(acc.goodput)}", f"{acc.lost_steps} steps lost",
                  f"checkpoint stall {duration(acc.stall)} ({percent(acc.stall_share_wall)} "
                  "of wall)"]
    else:
        second = [f"{acc.units_done}/{acc.units_total} units done"]
        if acc.units_redone:
            second.append(f"{acc.units_redone} committed again")
    if cost is not None and cost.spot is not None:
        second.append(f"spot {money(cost.spot)} vs on-demand {money(cost.on_demand)}")
    return " · ".join(first) + "\n" + " · ".join(second)


def rows(run: Run, acc: Accounting, cost: Cost | None, cost_note: str | None) -> list[tuple]:
    """(label, value) pairs: what text and markdown both print."""
    out: list[tuple[str, str]] = []
    recipe = f" of {run.recipe}" if run.recipe else ""
    out.append(("run", f"{run.name} ({run.source}{recipe}"
                + (f", {run.status})" if run.status else ")")))
    if run.attempts:
        out.append(("attempts", f"{len(run.attempts)} ({acc.restarts} restart"
                    f"{'' if acc.restarts == 1 else 's'}); preemptions: "
                    f"{faults_line(acc)}"))
    out.append(("wall time", duration(acc.wall)))
    if run.kind == "training":
        out.append(("goodput", f"{percent(acc.goodput)}: useful training {duration(acc.useful)}"
                    f" of {duration(acc.wall)} wall"))
        if acc.step_goodput is not None:
            out.append(("step goodput", f"{percent(acc.step_goodput)}: {acc.useful_steps} of "
                        f"{acc.steps_executed} steps executed kept"))
        out.append(("wall time split", " + ".join(
            f"{name} {duration(getattr(acc, attr))}" for name, attr in (
                ("startup", "startup"), ("useful", "useful"), ("checkpoint stall", "stall"),
                ("lost", "lost"), ("tail", "tail"), ("gaps", "gaps")))))
        redone = [f"attempt {s.attempt}: steps {s.kept_step}-{s.last_step}"
                  for s in acc.spans if s.lost_steps]
        out.append(("lost work", f"{acc.lost_steps} steps, {duration(acc.lost)}"
                    + (f" ({'; '.join(redone)} redone)" if redone else "")))
        lag = (f"; bucket lag up to {acc.max_lag_steps} steps"
               if acc.max_lag_steps is not None else "")
        out.append(("checkpoint overhead",
                    f"the loop waited {duration(acc.stall)} for {acc.checkpoints} checkpoints: "
                    f"{percent(acc.stall_share_wall)} of wall, {percent(acc.stall_share_loop)} "
                    f"of the training loop ({acc.skipped_checkpoints} skipped while the "
                    f"previous one uploaded){lag}"))
    else:
        state = "complete (manifest.json)" if run.units_complete else "not complete"
        rate = (f", {acc.units_per_minute:.1f} units/min"
                if acc.units_per_minute is not None else "")
        out.append(("units", f"{acc.units_done}/{acc.units_total} done, {state}{rate}"))
        if acc.units_redone is not None:
            out.append(("lost work", f"{acc.units_redone} units committed again (lost with "
                                     "a VM before they reached the bucket)"))
    if cost is not None:
        out.append(("cost", _cost_line(cost)))
        out.append(("prices", cost.source))
    elif cost_note:
        out.append(("cost", cost_note))
    return out


def _cost_line(cost: Cost) -> str:
    nodes = f" x {cost.nodes} nodes" if cost.nodes != 1 else ""
    spot = (f"spot {money(cost.spot)} ({duration(cost.spot_seconds)} billed{nodes}, "
            f"{cost.spot_what} at {money(cost.spot_per_hour)}/h)"
            if cost.spot is not None else "spot -")
    demand = (f"on-demand {money(cost.on_demand)} ({duration(cost.on_demand_seconds)}"
              f"{nodes}: {cost.on_demand_basis}, {cost.on_demand_what} at "
              f"{money(cost.on_demand_per_hour)}/h)" if cost.on_demand is not None
              else "on-demand -")
    saving = ""
    if cost.saving is not None:
        saving = (f": spot saved {percent(cost.saving)}" if cost.saving >= 0
                  else f": spot cost {percent(-cost.saving)} more")
    return f"{spot} vs {demand}{saving}" + (f" ({cost.note})" if cost.note else "")


def text(run: Run, acc: Accounting, cost: Cost | None, cost_note: str | None,
         png: str | None) -> str:
    pairs = rows(run, acc, cost, cost_note)
    width = max(len(label) for label, _ in pairs) + 1
    lines = [f"{(label + ':').ljust(width)} {value}" for label, value in pairs]
    if png:
        lines.append(f"{'png:'.ljust(width)} {png}")
    lines += [f"note: {note}" for note in run.notes]
    return "\n".join(lines)


def markdown(run: Run, acc: Accounting, cost: Cost | None, cost_note: str | None,
             png: str | None) -> str:
    lines = [f"## Run report: {run.name}", ""]
    if png:
        lines += [f"![timeline]({png})", ""]
    lines += ["| | |", "|---|---|"]
    lines += [f"| {label} | {value.replace('|', '/')} |"
              for label, value in rows(run, acc, cost, cost_note)]
    if run.notes:
        lines.append("")
        lines += [f"- {note}" for note in run.notes]
    return "\n".join(lines)


def as_json(run: Run, acc: Accounting, cost: Cost | None, cost_note: str | None,
            png: str | None) -> str:
    report = {
        "run": run.name, "kind": run.kind, "source": run.source, "path": str(run.path),
        "status": run.status, "recipe": run.recipe, "num_nodes": run.num_nodes,
        "t0": run.t0, "t_end": run.t_end, "png": png,
        "accounting": acc.as_dict(),
        "cost": asdict(cost) if cost is not None else None, "cost_note": cost_note,
        "attempts": [{"index": a.index, "ending": a.ending, "launched": a.launched,
                      "start": a.start, "ended": a.ended, "fault_at": a.fault_at,
                      "start_step": a.start_step, "last_step": a.last_step,
                      "checkpoints": [asdict(c) for c in a.checkpoints]}
                     for a in run.attempts],
        "units": None if run.kind != "units" else {
            "total": run.units_total, "done": len(run.unit_times),
            "complete": run.units_complete, "output_dir": str(run.output_dir),
            "done_times": run.unit_times},
        "notes": run.notes,
    }
    return json.dumps(report, indent=1)
