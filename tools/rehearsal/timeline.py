"""Verdict and summary: ``find_problems`` (every restart must resume from the newest
checkpoint that survived), ``summarize`` (rehearsal.json) and ``print_summary`` (the table).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

from rehearsal import SCHEMA
from rehearsal.attempts import Attempt
from rehearsal.managed import Rehearsal


def find_problems(attempts: list[Attempt], backend: str) -> tuple[list[str], list[str]]:
    """(REGRESSION lines, CORRUPTION lines): every restart must resume from the newest
    checkpoint that survived the previous attempt (see rehearsal/__init__.py)."""
    regressions: list[str] = []
    corruptions: list[str] = []
    committed: int | None = None  # newest checkpoint known to survive, by events or bucket
    for prev, nxt in zip(attempts, attempts[1:], strict=False):
        if prev.checkpoints:
            committed = prev.checkpoints[-1]["step"]
        bucket = prev.bucket
        how = f"resumed from step {nxt.resumed_from}"
        if nxt.resumed_path is None:
            how = f"started fresh at step {nxt.resumed_from}"
        names = f"run name {prev.run_name!r} -> {nxt.run_name!r}"
        vm_lost = bucket is not None and bucket["vm_lost"]
        by_bucket = backend == "fuse" and vm_lost
        # On plain directories the bucket is also what the node reads: always the truth.
        if bucket is not None and nxt.resumed_path is not None and (by_bucket or
                                                                    backend == "plain"):
            key = nxt.resumed_key.partition("/")[2] if nxt.resumed_key else None
            entry = next((e for e in bucket["checkpoints"] if e["key"] == key), None)
            if (key is None and vm_lost) or (key is not None and entry is None and by_bucket) \
                    or (entry is not None and not entry["complete"]):
                why = ("it is not under a bucket mount" if key is None else
                       "it was not in the bucket" if entry is None else entry["reason"])
                where = nxt.resumed_key or nxt.resumed_path
                corruptions.append(
                    f"CORRUPTION: attempt {nxt.index} resumed from {where} "
                    f"(step {nxt.resumed_from}), which was not complete in the bucket after "
                    f"attempt {prev.index}'s fault ({prev.ending}): {why}")
                continue
        if by_bucket:
            newest = bucket["newest_complete_step"]
            committed = newest
            if newest is not None and nxt.resumed_from is not None and nxt.resumed_from < newest:
                regressions.append(
                    f"REGRESSION: attempt {nxt.index} {how}, but checkpoint step {newest} "
                    f"({bucket['newest_complete_key']}) was complete in the bucket after attempt "
                    f"{prev.index}'s fault ({prev.ending}); {names}")
            continue
        if committed is None or nxt.resumed_from is None:
            continue  # nothing to resume from yet, or the next attempt never said where it began
        if nxt.resumed_from < committed:
            regressions.append(
                f"REGRESSION: attempt {nxt.index} {how}, but checkpoint step {committed} was "
                f"committed before attempt {prev.index} ended ({prev.ending}); {names}"
            )
    return regressions, corruptions


def summarize(rehearsal: Rehearsal, status: str, regressions: list[str],
              corruptions: list[str] | None = None) -> dict:
    corruptions = corruptions or []
    attempts = rehearsal.attempts
    for prev, nxt in zip(attempts, attempts[1:], strict=False):
        if prev.last_step is not None and nxt.resumed_from is not None:
            prev.steps_lost = prev.last_step - nxt.resumed_from
    checkpoints = [c for a in attempts for c in a.checkpoints]
    seconds = [c["seconds"] for c in checkpoints if isinstance(c["seconds"], (int, float))]
    sizes = [c["bytes"] for c in checkpoints if isinstance(c["bytes"], (int, float))]
    lags = [c["lag_steps"] for c in checkpoints if c.get("lag_steps") is not None]
    executed = sum(a.steps_executed for a in attempts)
    final_step = attempts[-1].last_step if attempts else None
    per_step = [
        (t2 - t1) / (s2 - s1)
        for a in attempts
        for (s1, t1), (s2, t2) in zip(a.step_times, a.step_times[1:], strict=False)
        if s2 > s1
    ]
    ended = max((a.ended or time.time() for a in attempts), default=time.time())
    wall = ended - attempts[0].started if attempts else 0.0
    wall_goodput = None
    if final_step and per_step and wall > 0:
        wall_goodput = round(final_step * statistics.median(per_step) / wall, 4)
    preemptions = {"term": 0, "kill": 0, "notice": 0}
    for a in attempts:
        if a.ending.startswith("preempted:"):
            preemptions[a.ending.split(":")[1]] += 1
    storage, mounts = rehearsal.job.buckets.describe()
    return {
        "schema": SCHEMA,
        "recipe": str(rehearsal.job.recipe.path),
        "workdir": str(rehearsal.job.workdir),
        "status": status,
        "ok": status == "SUCCEEDED" and not regressions and not corruptions,
        "regressions": regressions,
        "corruptions": corruptions,
        "managed_job_id": rehearsal.job.job_id,
        "num_nodes": rehearsal.job.recipe.num_nodes,
        "cloud": rehearsal.job.cloud,
        "pid_namespaces": rehearsal.pid_namespace,
        "storage": storage,
        "mounts": mounts,
        "job_recovery": {
            "strategy": rehearsal.job.recipe.strategy,
            "max_restarts_on_errors": rehearsal.policy.max_restarts_on_errors,
            "recover_on_exit_codes": rehearsal.policy.recover_on_exit_codes,
            "restart_cnt_on_failure": rehearsal.policy.restart_cnt_on_failure,
        },
        "attempts": [
            {k: v for k, v in dataclasses.asdict(a).items()
             if k not in ("step_times", "step_reached", "checkpoint_reached")}
            for a in attempts
        ],
        "totals": {
            "attempts": len(attempts),
            "preemptions": preemptions,
            "process_losses": sum(1 for a in attempts
                                  if a.fault is not None and a.fault["kind"] == "proc"),
            "checkpoints": {
                "count": len(checkpoints),
                "mean_seconds": round(statistics.mean(seconds), 4) if seconds else None,
                "mean_bytes": round(statistics.mean(sizes)) if sizes else None,
                "max_lag_steps": max(lags) if lags else None,
                "skipped": sum(len(a.skipped_checkpoints) for a in attempts),
            },
            "final_step": final_step,
            "steps_executed": executed,
            "steps_lost": sum(a.steps_lost or 0 for a in attempts),
            "goodput": round(final_step / executed, 4) if final_step and executed else None,
            "wall_seconds": round(wall, 3),
            "wall_goodput": wall_goodput,
        },
    }


def _size(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1000
    return "-"


def print_summary(summary: dict, t0: float) -> None:
    def fmt(value: Any, suffix: str = "") -> str:
        return "-" if value is None else f"{value}{suffix}"

    header = ("#", "start", "end", "ended", "exit codes", "resumed", "in bucket", "last", "lost",
              "1st step", "ckpts", "max lag")
    rows = [header]
    for a in summary["attempts"]:
        ending = a["ending"]
        if a["fault"] is not None:
            nodes = a["fault"]["nodes"]
            where = "" if len(nodes) == summary["num_nodes"] else f"@{','.join(map(str, nodes))}"
            if not ending.startswith("preempted"):
                ending = f"{ending} ({a['fault']['kind']}{where})"
            else:
                ending += where
        lags = [c["lag_steps"] for c in a["checkpoints"] if c.get("lag_steps") is not None]
        rows.append((
            str(a["index"]),
            f"+{a['started'] - t0:.1f}s",
            f"+{a['ended'] - t0:.1f}s" if a["ended"] else "-",
            ending,
            ",".join(map(str, a["exit_codes"])) or "-",
            fmt(a["resumed_from"]),
            fmt(a["bucket"]["newest_complete_step"]) if a["bucket"] else "-",
            fmt(a["last_step"]),
            fmt(a["steps_lost"]),
            fmt(a["seconds_to_first_step"], "s"),
            str(len(a["checkpoints"])),
            fmt(max(lags) if lags else None),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print()
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    print("\ncheckpoints (step: seconds to commit, bytes, newest step in the bucket then):")
    for a in summary["attempts"]:
        items = [f"{c['step']}: {fmt(_round(c['seconds']), 's')} {_size(c['bytes'])} "
                 f"bucket@{fmt(c.get('durable_step'))}" for c in a["checkpoints"]]
        print(f"  attempt {a['index']}: " + ("; ".join(items) if items else "none"))
    t = summary["totals"]
    ck, pre = t["checkpoints"], t["preemptions"]
    print(
        f"\nattempts {t['attempts']}, preemptions term={pre['term']} kill={pre['kill']} "
        f"notice={pre['notice']}, process losses {t['process_losses']}, checkpoints "
        f"{ck['count']} (mean {fmt(ck['mean_seconds'], 's')}, {fmt(ck['mean_bytes'], ' bytes')}, "
        f"bucket lag up to {fmt(ck['max_lag_steps'], ' steps')}, {ck['skipped']} skipped "
        "while the previous was uploading)"
    )
    print(
        f"final step {fmt(t['final_step'])}, steps executed {t['steps_executed']}, "
        f"lost {t['steps_lost']}, goodput {fmt(t['goodput'])} (steps), "
        f"{fmt(t['wall_goodput'])} (wall, {t['wall_seconds']}s)"
    )
    for line in summary["regressions"] + summary["corruptions"]:
        print(line)
    print(f"status: {summary['status']}" + ("" if summary["ok"] else "  -> rehearsal FAILED"))


def _round(value: Any) -> Any:
    return round(value, 2) if isinstance(value, float) else value
