"""Verdict and summary: ``find_problems`` (every restart must resume from the newest
checkpoint that survived), ``find_splits`` (one world of the expected size per attempt),
``account`` (steps lost and goodput, only from what the trainer reported), ``summarize``
(rehearsal.json) and ``print_summary`` (the table).

A summary claims nothing it did not see. A recipe whose node 0 writes no skyspot events gets
the generic part only (its buckets through time, what lost VMs had not uploaded) and null
goodput, steps and steps lost; a next attempt that resumed beyond the last step the previous
one reported is an inconsistency, never a negative number of steps lost.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

from rehearsal import SCHEMA
from rehearsal.attempts import LISTING_ERRORS, Attempt, human_bytes, unuploaded_line
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


def find_splits(attempts: list[Attempt], num_nodes: int, gpus_per_node: int) -> list[str]:
    """SPLIT lines: skyspot trainers emit events from global rank 0 only, so a start event
    on a node other than 0, or one whose world_size is not num_nodes x GPUs per node (0 GPUs
    count as one process), means the nodes did not form one world: each trained on its own.
    An attempt's own gpus_per_node (--gpus-per-attempt) comes before the job's."""
    lines = []
    for a in attempts:
        gpus = a.gpus_per_node if a.gpus_per_node is not None else gpus_per_node
        expected = num_nodes * max(1, gpus or 0)
        shape = (f"{num_nodes} node{'s' if num_nodes != 1 else ''} × "
                 + (f"{gpus} GPU{'s' if gpus != 1 else ''}" if gpus else "1 process, no GPUs"))
        nodes = sorted({s["node"] for s in a.starts})
        sizes = sorted({s["world_size"] for s in a.starts if s["world_size"] is not None})
        if not nodes or (nodes == [0] and all(size == expected for size in sizes)):
            continue
        unknown = any(s["world_size"] is None for s in a.starts)
        size = " or ".join([*map(str, sizes), *(["unknown"] if unknown else [])])
        if len(nodes) == 1:
            who = f"node {nodes[0]} started a world of size {size}"
        else:
            names = ", ".join(map(str, nodes[:-1])) + f" and {nodes[-1]}"
            who = f"nodes {names} each started a world of size {size}"
        lines.append(f"SPLIT: attempt {a.index}: {who}; expected one world of {expected} "
                     f"({shape})")
    return lines


def account(attempts: list[Attempt]) -> dict:
    """Steps and goodput from what node 0's trainer reported, null where it reported
    nothing; fills each attempt's steps_lost. Keys: skyspot_events, final_step,
    steps_executed, steps_lost, goodput, wall_seconds, wall_goodput, inconsistencies."""
    skyspot = any(a.skyspot_events for a in attempts)
    inconsistencies = []
    for prev, nxt in zip(attempts, attempts[1:], strict=False):
        prev.steps_lost = None
        if prev.last_step is None or nxt.resumed_from is None:
            continue
        if nxt.resumed_from > prev.last_step:
            inconsistencies.append(
                f"INCONSISTENT: attempt {nxt.index} resumed from step {nxt.resumed_from}, "
                f"beyond step {prev.last_step}, the last attempt {prev.index} reported: steps "
                "lost unknown (the job split into separate worlds, or the trainer saved "
                "steps it never reported)")
        else:
            prev.steps_lost = prev.last_step - nxt.resumed_from
    ended = max((a.ended or time.time() for a in attempts), default=time.time())
    wall = ended - attempts[0].started if attempts else 0.0
    result: dict[str, Any] = {
        "skyspot_events": skyspot, "final_step": None, "steps_executed": None,
        "steps_lost": None, "goodput": None, "wall_seconds": round(wall, 3),
        "wall_goodput": None, "inconsistencies": inconsistencies}
    if not skyspot:
        return result
    executed = sum(a.steps_executed for a in attempts)
    final_step = attempts[-1].last_step
    result.update(final_step=final_step, steps_executed=executed)
    if inconsistencies:
        return result  # the steps do not add up: no figure built on them
    result["steps_lost"] = sum(a.steps_lost or 0 for a in attempts)
    # Useful steps: what this job advanced, from where its first attempt started (a seed).
    useful = None if final_step is None else final_step - (attempts[0].resumed_from or 0)
    if useful is not None and executed and 0 <= useful <= executed:
        result["goodput"] = round(useful / executed, 4)
    per_step = [
        (t2 - t1) / (s2 - s1)
        for a in attempts
        for (s1, t1), (s2, t2) in zip(a.step_times, a.step_times[1:], strict=False)
        if s2 > s1
    ]
    if useful and per_step and wall > 0:
        result["wall_goodput"] = round(useful * statistics.median(per_step) / wall, 4)
    return result


def summarize(rehearsal: Rehearsal, status: str, regressions: list[str],
              corruptions: list[str] | None = None) -> dict:
    corruptions = corruptions or []
    attempts = rehearsal.attempts
    job = rehearsal.job
    accounted = account(attempts)
    inconsistencies = accounted.pop("inconsistencies")
    splits = find_splits(attempts, job.recipe.num_nodes, job.gpus_per_node)
    if splits:  # node 0's steps are one world's of several: no goodput, no steps lost
        accounted.update(steps_lost=None, goodput=None, wall_goodput=None)
    bucket_log = getattr(rehearsal, "bucket_log", None)
    if bucket_log is not None:
        try:  # the end state: once the store is closed, its backing directory
            bucket_log.sample()
        except LISTING_ERRORS:
            pass
    checkpoints = [c for a in attempts for c in a.checkpoints]
    seconds = [c["seconds"] for c in checkpoints if isinstance(c["seconds"], (int, float))]
    sizes = [c["bytes"] for c in checkpoints if isinstance(c["bytes"], (int, float))]
    lags = [c["lag_steps"] for c in checkpoints if c.get("lag_steps") is not None]
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
        "ok": status == "SUCCEEDED" and not regressions and not corruptions and not splits,
        "regressions": regressions,
        "corruptions": corruptions,
        "splits": splits,
        "inconsistencies": inconsistencies,
        "skyspot_events": accounted.pop("skyspot_events"),
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
             if k not in ("step_times", "step_reached", "checkpoint_reached", "skyspot_events")}
            for a in attempts
        ],
        "bucket_timeline": list(bucket_log.entries) if bucket_log is not None else [],
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
            **accounted,
        },
    }


NOT_SKYSPOT = "this recipe does not write skyspot checkpoints: the resume check does not apply"


def print_summary(summary: dict, t0: float) -> None:
    def fmt(value: Any, suffix: str = "") -> str:
        return "-" if value is None else f"{value}{suffix}"

    skyspot = summary.get("skyspot_events", True)
    header = ("#", "start", "end", "ended", "exit codes")
    # A GPUs column only when the attempts had different counts (--gpus-per-attempt).
    gpus = len({a.get("gpus_per_node") for a in summary["attempts"]}) > 1
    if gpus:
        header += ("GPUs",)
    if skyspot:
        header += ("resumed", "in bucket", "last", "lost", "1st step", "ckpts", "max lag")
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
        row: tuple[str, ...] = (
            str(a["index"]),
            f"+{a['started'] - t0:.1f}s",
            f"+{a['ended'] - t0:.1f}s" if a["ended"] else "-",
            ending,
            ",".join(map(str, a["exit_codes"])) or "-",
        )
        if gpus:
            row += (fmt(a.get("gpus_per_node")),)
        if skyspot:
            lags = [c["lag_steps"] for c in a["checkpoints"] if c.get("lag_steps") is not None]
            row += (
                fmt(a["resumed_from"]),
                fmt(a["bucket"]["newest_complete_step"]) if a["bucket"] else "-",
                fmt(a["last_step"]),
                fmt(a["steps_lost"]),
                fmt(a["seconds_to_first_step"], "s"),
                str(len(a["checkpoints"])),
                fmt(max(lags) if lags else None),
            )
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print()
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    if skyspot:
        print("\ncheckpoints (step: seconds to commit, bytes, newest step in the bucket then):")
        for a in summary["attempts"]:
            items = [f"{c['step']}: {fmt(_round(c['seconds']), 's')} "
                     f"{human_bytes(c['bytes'], sep='')} bucket@{fmt(c.get('durable_step'))}"
                     for c in a["checkpoints"]]
            print(f"  attempt {a['index']}: " + ("; ".join(items) if items else "none"))
    print_buckets(summary)
    t = summary["totals"]
    ck, pre = t["checkpoints"], t["preemptions"]
    line = (f"\nattempts {t['attempts']}, preemptions term={pre['term']} kill={pre['kill']} "
            f"notice={pre['notice']}, process losses {t['process_losses']}")
    if not skyspot:
        print(line)
        print(NOT_SKYSPOT)
    else:
        print(
            f"{line}, checkpoints {ck['count']} (mean {fmt(ck['mean_seconds'], 's')}, "
            f"{fmt(ck['mean_bytes'], ' bytes')}, bucket lag up to "
            f"{fmt(ck['max_lag_steps'], ' steps')}, {ck['skipped']} skipped while the previous "
            "was uploading)"
        )
        print(
            f"final step {fmt(t['final_step'])}, steps executed {fmt(t['steps_executed'])}, "
            f"lost {fmt(t['steps_lost'])}, goodput {fmt(t['goodput'])} (steps), "
            f"{fmt(t['wall_goodput'])} (wall, {t['wall_seconds']}s)"
        )
    for line in (summary.get("inconsistencies", []) + summary.get("splits", [])
                 + summary["regressions"] + summary["corruptions"]):
        print(line)
    print(f"status: {summary['status']}" + ("" if summary["ok"] else "  -> rehearsal FAILED"))


def print_buckets(summary: dict) -> None:
    """For every recipe: what each bucket held at the end of each attempt and at the end,
    and what every lost VM had written that never reached the bucket."""
    timeline = summary.get("bucket_timeline") or []
    ends = [(f"attempt {a['index']} end", a.get("buckets_at_end")) for a in summary["attempts"]]
    final: dict[str, dict] = {}
    for entry in timeline:
        final[entry["bucket"]] = entry
    ends.append(("at the end", final or None))
    if not timeline and not any(state for _, state in ends):
        return
    print(f"\nbuckets (objects, bytes, through the S3 API; {len(timeline)} changes in "
          "rehearsal.json bucket_timeline):")
    width = max(len(label) for label, _ in ends) + 1
    for label, state in ends:
        held = "; ".join(f"{bucket} {s['objects']} objects, {human_bytes(s['bytes'])}"
                         for bucket, s in sorted((state or {}).items()))
        print(f"  {(label + ':').ljust(width)} {held or '-'}")
    for a in summary["attempts"]:
        for lost in (a["fault"] or {}).get("vm_lost", []):
            if lost.get("unuploaded"):
                print(f"attempt {a['index']}: {unuploaded_line(lost['node'], lost['unuploaded'])}")


def _round(value: Any) -> Any:
    return round(value, 2) if isinstance(value, float) else value
