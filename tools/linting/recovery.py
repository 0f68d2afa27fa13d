"""Recovery: a preemption must relaunch the job, and the runtime's exit 143 must say so.

- recovery/spot-without-job-recovery (error): spot resources without `job_recovery`. A
  notice-driven save exits 143 while the VM is still up: with no job_recovery, SkyPilot
  counts that as the job failing (max_restarts_on_errors 0) and does not relaunch.
- recovery/exit-code-missing (error): the task runs a skyspot script (one that imports
  skyspot, or `python -m skyspot.launch`) and `recover_on_exit_codes` lacks 143.
- recovery/launcher-hides-exit-code (error): a skyspot script started by accelerate launch,
  torchrun or deepspeed without `python -m skyspot.launch --` in front: the launcher turns
  the script's 143 into 1, so SkyPilot sees a user error instead of a preemption save.
- recovery/multinode-teardown (note): num_nodes > 1 with EAGER_NEXT_REGION (SkyPilot's
  default strategy): one preempted node terminates the whole cluster and relaunches every
  node in another region (sky/jobs/recovery_strategy.py).
"""

from __future__ import annotations

from skyspot import PREEMPTED_EXIT_CODE

from .findings import ERROR, NOTE
from .task import TaskContext

_LAUNCHERS = ("accelerate", "torchrun", "deepspeed")


def _spot_line(ctx: TaskContext) -> int:
    doc = ctx.doc
    if doc.entry("resources", "use_spot") is not None:
        return doc.line("resources", "use_spot")
    resources = doc.get("resources")
    if isinstance(resources, dict):
        for key in ("any_of", "ordered"):
            for i, candidate in enumerate(resources.get(key) or []):
                if isinstance(candidate, dict) and candidate.get("use_spot"):
                    return doc.line("resources", key, i, "use_spot")
    return doc.line("resources")


def _recovery_line(ctx: TaskContext, key: str = "") -> int:
    doc = ctx.doc
    keys = ("resources", "job_recovery", key) if key else ("resources", "job_recovery")
    if doc.entry("resources", "job_recovery") is not None:
        return doc.line(*keys)
    return doc.find_key("job_recovery") or doc.line("resources")


def _codes(recovery: dict) -> list[int]:
    codes = recovery.get("recover_on_exit_codes")
    if codes is None:
        return []
    codes = codes if isinstance(codes, list) else [codes]
    return [int(c) for c in codes if str(c).lstrip("-").isdigit()]


def check(ctx: TaskContext) -> None:
    if ctx.is_pool:  # `sky jobs pool apply` refuses job_recovery: the job YAML holds it
        return
    resources = list(ctx.task.resources)
    skyspot = [inv for inv in ctx.run_invocations if inv.uses_skyspot()]
    code_hint = (f" and recover_on_exit_codes: [{PREEMPTED_EXIT_CODE}]" if skyspot else
                 " (and recover_on_exit_codes for your script's preemption exit code)")
    if any(r.use_spot and not r.job_recovery for r in resources):
        ctx.add(_spot_line(ctx), ERROR, "recovery/spot-without-job-recovery",
                "spot resources without job_recovery: an exit after a preemption notice, "
                "while the VM is still up, counts as the job failing and is not relaunched",
                "add resources.job_recovery with strategy (EAGER_NEXT_REGION), "
                "max_restarts_on_errors" + code_hint)

    recoveries = [r.job_recovery for r in resources if r.job_recovery]
    if skyspot and recoveries and any(PREEMPTED_EXIT_CODE not in _codes(r) for r in recoveries):
        names = ", ".join(dict.fromkeys(inv.shown for inv in skyspot))
        ctx.add(_recovery_line(ctx, "recover_on_exit_codes"), ERROR,
                "recovery/exit-code-missing",
                f"run: starts {names}, which exits {PREEMPTED_EXIT_CODE} after a committed "
                f"preemption save, but job_recovery.recover_on_exit_codes lacks "
                f"{PREEMPTED_EXIT_CODE}: the save is retried as an error (counted against "
                "max_restarts_on_errors) or not at all",
                f"add recover_on_exit_codes: [{PREEMPTED_EXIT_CODE}] to job_recovery")

    run = ctx.sections.get("run")
    for inv in skyspot:
        words = [w.text for w in inv.command.words[:inv.start]]
        launched = [w for w in inv.launchers if w in _LAUNCHERS] or (
            ["torch.distributed.run"] if "torch.distributed.run" in words else [])
        if launched and "skyspot.launch" not in words and run is not None:
            ctx.add(run.line(inv.command.line), ERROR, "recovery/launcher-hides-exit-code",
                    f"{launched[0]} starts {inv.shown} without skyspot.launch: it reports "
                    f"the script's exit {PREEMPTED_EXIT_CODE} as 1, so a preemption save "
                    "looks like a user error to SkyPilot",
                    f"start it as `python -m skyspot.launch -- {launched[0]} ...`")

    if ctx.num_nodes > 1 and (recoveries or any(r.use_spot for r in resources)):
        strategies = {(r.job_recovery or {}).get("strategy") or "EAGER_NEXT_REGION"
                      for r in resources}
        if "EAGER_NEXT_REGION" in strategies:
            line = (_recovery_line(ctx, "strategy") if recoveries
                    else ctx.doc.line("num_nodes"))
            ctx.add(line, NOTE, "recovery/multinode-teardown",
                    f"num_nodes: {ctx.num_nodes} with EAGER_NEXT_REGION: one preempted node "
                    f"terminates all {ctx.num_nodes} and relaunches the whole cluster in "
                    "another region, and every rank restarts from the last checkpoint",
                    "keep checkpoints frequent, or use FAILOVER, which first relaunches in "
                    "the same region without terminating the cluster")
