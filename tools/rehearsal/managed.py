"""The managed job: ``Rehearsal.run`` launches attempts until the job succeeds, fails for
good or runs out of attempts, strikes each attempt's fault, and reads the bucket after it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from typing import TextIO

import metadata_server

from rehearsal.attempts import (
    LISTING_ERRORS,
    Attempt,
    BucketLog,
    EventTail,
    PhaseResult,
    RecoveryPolicy,
)
from rehearsal.buckets import StorageError, scan_bucket
from rehearsal.faults import Fault, FaultRun, parse_preempt_at
from rehearsal.nodes import Job, Node, controller_timestamp, start_node, stream_log
from rehearsal.recipe import one_line

POLL_SECONDS = 0.05


class Interrupted(Exception):
    """Ctrl-C or SIGTERM to the rehearsal itself."""


class Rehearsal:
    def __init__(self, job: Job, args: argparse.Namespace, pid_namespace: bool,
                 metadata: list[metadata_server.FakeMetadata] | None = None) -> None:
        self.job = job
        self.args = args
        self.pid_namespace = pid_namespace
        self.plans = parse_preempt_at(args.preempt_at, args.signal) if args.preempt_at else []
        self.metadata = metadata or []
        self.out: TextIO | None = None if args.quiet else sys.stdout
        self.events = EventTail(job.workdir / "events" / f"{job.node_name(0)}.jsonl")
        self.node_events = {  # the other nodes': only their start events (a split job)
            r: EventTail(job.workdir / "events" / f"{job.node_name(r)}.jsonl")
            for r in range(1, job.recipe.num_nodes)}
        self.bucket_log = BucketLog(job.buckets)  # every bucket's contents through time
        self.nodes: list[Node] = []
        self.attempts: list[Attempt] = []
        self.policy = RecoveryPolicy(
            job.recipe.max_restarts_on_errors, job.recipe.recover_on_exit_codes
        )
        self.run_location: tuple[str, str] | None = None  # (bucket, run dir key) of node 0
        self.started = time.time()
        self.stop = threading.Event()  # set from another thread: stop within one poll

    def say(self, message: str) -> None:
        job = f"{self.job.prefix.rstrip('-')}: " if self.job.prefix else ""
        print(f"rehearse: {job}{message}", flush=True)

    def end_attempt(self, ending: str) -> None:
        """Stopped from outside (Ctrl-C, SIGTERM: "interrupted"; a store or mount failure:
        "error"): no node left, and the attempt under way ends with ``ending``."""
        self.kill_all()
        if self.attempts and self.attempts[-1].ended is None:
            self.attempts[-1].ended = time.time()
            self.attempts[-1].ending = ending

    def next_plan(self) -> Fault | None:
        if self.plans:
            return self.plans.pop(0)
        if self.args.preempt_every:
            return Fault("time", self.args.preempt_every, self.args.signal)
        return None

    def run(self) -> str:
        restarts = 0
        while True:
            if len(self.attempts) >= self.args.max_attempts:
                self.say(f"giving up after {len(self.attempts)} attempts (--max-attempts)")
                return "MAX_ATTEMPTS"
            if restarts and self.args.controller_restart_every and (
                restarts % self.args.controller_restart_every == 0
            ):
                self.job.controller_started = controller_timestamp()
                self.say("jobs controller restarted: SKYPILOT_TASK_ID has a new timestamp")
            plan = self.next_plan()
            attempt = Attempt(len(self.attempts) + 1, self.job.task_id, time.time())
            attempt.preempt_plan = plan.describe() if plan else None
            # A recovery onto another candidate: this attempt's nodes get its GPU count.
            self.job.gpus_per_node = attempt.gpus_per_node = \
                self.job.gpus_for_attempt(attempt.index)
            self.attempts.append(attempt)
            fresh = self.job.buckets.ensure_mounted()
            if fresh and attempt.index > 1:
                self.say(f"attempt {attempt.index}: fresh bucket mounts (empty caches) on "
                         f"node(s) {','.join(map(str, fresh))}")
            gpus = (f" with {attempt.gpus_per_node} GPU(s) each (--gpus-per-attempt)"
                    if self.job.gpus_per_attempt else "")
            self.say(
                f"attempt {attempt.index}: launching {self.job.recipe.num_nodes} node(s){gpus}"
                + (f", fault at {plan.describe()}" if plan else "")
            )
            result = None
            if self.args.run_setup and self.job.recipe.setup:
                result = self.run_phase(attempt, "setup", self.job.recipe.setup, plan)
                if result.ending == "failed":
                    result.ending = "failed_setup"
            if result is None or (result.ending == "exited" and result.fault is None):
                result = self.run_phase(attempt, "run", self.job.recipe.run, plan)
            attempt.ended, attempt.ending = time.time(), result.ending
            attempt.exit_codes, attempt.fault = result.exit_codes, result.fault
            attempt.buckets_at_end = self.bucket_log.sample()
            for server in self.metadata:
                server.notice = False  # the next attempt runs on fresh VMs
            self.say(f"attempt {attempt.index}: {result.ending}, exit codes {result.exit_codes}")
            if result.fault is not None:
                self.inspect_bucket(attempt)

            if result.ending.startswith("preempted"):
                attempt.decision = "recover (preemption)"
            elif result.ending == "exited":
                attempt.decision = "SUCCEEDED"
                return "SUCCEEDED"
            else:
                restart, why = self.policy.should_restart_on_failure(result.exit_codes)
                attempt.decision = ("restart: " if restart else "stop: ") + why
                if not restart:
                    self.say(f"user program failed: {why}")
                    return "FAILED_SETUP" if result.ending == "failed_setup" else "FAILED"
            self.say(f"attempt {attempt.index}: {attempt.decision}")
            restarts += 1

    def inspect_bucket(self, attempt: Attempt) -> None:
        """Read the bucket through the S3 API after a fault: what survived it."""
        if not any(a.skyspot_events for a in self.attempts):
            self.inspect_bucket_generic(attempt)  # no skyspot checkpoints to look for
            return
        vm_lost = bool(attempt.fault and attempt.fault["vm_lost"])
        if self.run_location is not None:
            bucket, prefix = self.run_location
        elif self.job.buckets.buckets:
            bucket, prefix = self.job.buckets.buckets[0], None
        else:
            return
        try:
            scan = scan_bucket(self.job.buckets, bucket, prefix)
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            raise StorageError(f"reading bucket {bucket}: {one_line(err)}") from None
        attempt.bucket = {"vm_lost": vm_lost, **scan}
        incomplete = [f"{e['key'].rpartition('/')[2]} ({e['reason']})"
                      for e in scan["checkpoints"] if not e["complete"]]
        newest = scan["newest_complete_key"]
        self.say(f"attempt {attempt.index}: bucket {bucket} after the fault"
                 f"{' (VM lost)' if vm_lost else ' (VM up, still uploading)'}: newest complete "
                 f"checkpoint {newest or 'none'}"
                 + (f"; incomplete: {', '.join(incomplete)}" if incomplete else ""))

    def run_phase(
        self, attempt: Attempt, phase: str, script: str, plan: Fault | None
    ) -> PhaseResult:
        self.nodes = []
        for rank in range(self.job.recipe.num_nodes):  # one by one: kill_all sees each
            self.nodes.append(self.start_node(attempt, rank, phase, script))
        fault: FaultRun | None = None
        try:
            while True:
                if self.stop.is_set():
                    raise Interrupted()
                self.read_events(attempt)
                for node in self.nodes:
                    stream_log(node, attempt.index, self.out, tag=self.job.prefix)
                codes = [node.exit_code for node in self.nodes]
                if fault is not None:
                    self.advance(fault, attempt)
                    if fault.done and all(code is not None for code in
                                          (n.exit_code for n in self.nodes)):
                        break
                elif all(code is not None for code in codes):
                    break
                elif any(code not in (None, 0) for code in codes):
                    # One node failed: SkyPilot cancels the rest (reported as 137).
                    for node in self.nodes:
                        if node.exit_code is None:
                            node.kill()
                    break
                elif plan is not None and self.due(plan, attempt):
                    fault = self.strike(plan, attempt, phase)
                    continue
                self.bucket_log.poll()
                time.sleep(POLL_SECONDS)
        finally:
            for node in self.nodes:
                node.kill()  # no-op for nodes that exited; never leave one behind
        self.read_events(attempt)
        for node in self.nodes:
            stream_log(node, attempt.index, self.out, final=True, tag=self.job.prefix)
        # A node we SIGKILLed reports 137, like SkyPilot's CANCELLED_RETURN_CODE.
        codes = [137 if node.killed else node.exit_code or 0 for node in self.nodes]
        self.nodes = []
        if fault is None:
            return PhaseResult("exited" if not any(codes) else "failed", codes)
        kind = fault.plan.kind
        if kind == "proc" or (kind in ("term", "notice") and not any(codes) and phase == "run"):
            # proc: a user failure on a live VM; a job that finished before its VM went is done.
            return PhaseResult("exited" if not any(codes) else "failed", codes, fault.record)
        return PhaseResult(f"preempted:{kind}", codes, fault.record)

    def start_node(self, attempt: Attempt, rank: int, phase: str, script: str) -> Node:
        name = f"attempt{attempt.index}-{phase}"
        log = self.job.workdir / "logs" / f"attempt{attempt.index}-{self.job.node_name(rank)}.log"
        try:
            return start_node(self.job, rank, self.job.node_script(rank, phase, script), log, name,
                              phase)
        except OSError as err:
            self.kill_all()
            raise StorageError(f"starting {self.job.node_name(rank)}: {one_line(err)}") from None

    def strike(self, plan: Fault, attempt: Attempt, phase: str) -> FaultRun:
        now = time.time()
        ranks = list(range(len(self.nodes)))
        struck = [plan.node] if plan.node is not None else ranks
        record = {"kind": plan.kind, "trigger": plan.describe(), "nodes": struck,
                  "phase": phase, "at": now, "at_step": attempt.last_step, "sigterm_at": None,
                  "sigkill_at": None, "vm_lost": [], "teardown": []}
        fault = FaultRun(plan, struck, record)
        where = "every node" if plan.node is None else f"node {plan.node}"
        words = {"term": "preempting", "kill": "losing the VM of", "proc": "killing the job on",
                 "notice": "announcing a preemption of"}
        self.say(f"attempt {attempt.index}: {words[plan.kind]} {where} "
                 f"({plan.describe()}, {phase})")
        if plan.kind == "kill":
            record["sigkill_at"] = now
            for rank in struck:
                self.nodes[rank].kill()
                self.lose_vm(fault, rank)
            self.teardown(fault)
        elif plan.kind == "proc":
            record["sigkill_at"] = now
            for rank in struck:
                self.nodes[rank].kill()
            # A failed node makes SkyPilot cancel the job on the others; the VMs stay up.
            for node in self.nodes:
                node.kill()
            fault.done = True
        elif plan.kind == "term":
            fault.term_at = now
        else:  # notice
            for rank in struck:
                if rank < len(self.metadata):
                    self.metadata[rank].notice = True
            fault.term_at = now + self.args.notice_lead
        if not fault.done:
            self.advance(fault, attempt)
        return fault

    def advance(self, fault: FaultRun, attempt: Attempt) -> None:
        """term and notice: SIGTERM when due, SIGKILL when the grace is over, and each struck
        VM lost once its processes are gone; then the rest of the cluster is torn down."""
        if fault.done:
            return
        now = time.time()
        if not fault.termed and now >= fault.term_at:
            fault.termed, fault.kill_at = True, now + self.args.grace
            fault.record["sigterm_at"] = now
            if fault.plan.kind == "notice":
                self.say(f"attempt {attempt.index}: notice lead over, SIGTERM")
            for rank in fault.struck:
                self.nodes[rank].terminate()
        if not fault.termed:
            return
        for rank in fault.struck:
            if rank in fault.lost:
                continue
            node = self.nodes[rank]
            if node.exit_code is None and now >= fault.kill_at:
                self.say(f"attempt {attempt.index}: grace period over, SIGKILL")
                fault.record["sigkill_at"] = now
                node.kill()
            if node.exit_code is not None:
                self.lose_vm(fault, rank)
        if len(fault.lost) == len(fault.struck):
            self.teardown(fault)

    def lose_vm(self, fault: FaultRun, rank: int) -> None:
        unuploaded = self.unuploaded(rank)  # before its caches go with the VM
        self.job.buckets.lose_vm(rank)
        self.job.lose_vm(rank)
        fault.lost.add(rank)
        fault.record["vm_lost"].append({"node": rank, "at": time.time()})
        self.record_unuploaded(fault, rank, unuploaded)

    def teardown(self, fault: FaultRun) -> None:
        """SkyPilot's recovery terminates the cluster: the nodes that were not struck go too."""
        for rank in range(len(self.nodes)):
            if rank in fault.lost:
                continue
            self.nodes[rank].kill()
            self.lose_vm(fault, rank)
            fault.record["teardown"].append(rank)
        fault.done = True

    def read_events(self, attempt: Attempt) -> None:
        """Feed new node-0 events to the attempt, and note where its run's checkpoints are."""
        for event in self.events.read():
            attempt.observe(event)
            if event["event"] in ("checkpoint", "resumed") and event.get("path"):
                location = self.job.buckets.bucket_key(
                    0, self.job.host_path(0, str(event["path"])))
                if location is not None:
                    bucket, key = location
                    self.run_location = (bucket, key.rpartition("/")[0])
                    if event["event"] == "resumed":
                        attempt.resumed_key = f"{bucket}/{key}"
        self.read_node_events(attempt)

    def due(self, plan: Fault, attempt: Attempt) -> bool:
        if plan.trigger == "time":
            return time.time() - attempt.started >= plan.at
        if plan.trigger == "ckpt":
            return attempt.checkpoint_reached is not None and attempt.checkpoint_reached >= plan.at
        return attempt.step_reached is not None and attempt.step_reached >= plan.at

    def kill_all(self) -> None:
        for node in self.nodes:
            node.kill()
        self.nodes = []

    # -----------------------------------------------------------------------------------------
    # For any recipe: the other nodes' start events, the buckets' contents, lost uploads

    def read_node_events(self, attempt: Attempt) -> None:
        """The start events of nodes 1.. (a trainer emits events from global rank 0 only)."""
        for rank, tail in self.node_events.items():
            for event in tail.read():
                attempt.observe_node(rank, event)

    def inspect_bucket_generic(self, attempt: Attempt) -> None:
        """After a fault of a recipe without skyspot events: what each bucket holds."""
        vm_lost = bool(attempt.fault and attempt.fault["vm_lost"])
        states: dict[str, dict] = {}
        for bucket in self.job.buckets.buckets:
            try:
                objects = self.job.buckets.list_objects(bucket)
            except LISTING_ERRORS as err:
                raise StorageError(f"reading bucket {bucket}: {one_line(err)}") from None
            states[bucket] = {"objects": len(objects), "bytes": sum(objects.values())}
        if not states:
            return
        first = next(iter(states))
        attempt.bucket = {"vm_lost": vm_lost, "bucket": first, "run_prefix": None,
                          "newest_complete_step": None, "newest_complete_key": None,
                          "checkpoints": [], **states[first], "buckets": states}
        held = "; ".join(f"bucket {b} holds {s['objects']} objects, {s['bytes']} bytes"
                         for b, s in states.items())
        self.say(f"attempt {attempt.index}: after the fault"
                 f"{' (VM lost)' if vm_lost else ' (VM up, still uploading)'}: {held}")

    def unuploaded(self, rank: int) -> list[dict] | None:
        """What node rank wrote that its bucket does not hold (None: could not tell)."""
        try:
            return self.job.buckets.unuploaded(rank)
        except LISTING_ERRORS as err:
            self.say(f"cannot tell what node {rank} had not uploaded: {one_line(err)}")
            return None

    def record_unuploaded(self, fault: FaultRun, rank: int, found: list[dict] | None) -> None:
        """Into the VM loss's record: what never reached the bucket. Listed again now that
        the VM's rclone is dead: an upload that ended between the look and the loss counts
        as in the bucket."""
        entry = fault.record["vm_lost"][-1]
        if found:
            try:
                now = {b: self.job.buckets.list_objects(b) for b in {f["bucket"] for f in found}}
                found = [f for f in found if now[f["bucket"]].get(f["key"]) != f["bytes"]]
            except LISTING_ERRORS:
                pass  # keep what was found just before the loss
        entry["unuploaded"] = found
        entry["unuploaded_count"] = None if found is None else len(found)
        entry["unuploaded_bytes"] = None if found is None else sum(f["bytes"] for f in found)
