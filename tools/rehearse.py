"""Rehearse a SkyPilot recipe locally, the way a managed spot job runs it, with node-loss faults.

    python tools/rehearse.py recipes/train.yaml --gpus-per-node 1 \\
        --preempt-at step:20,ckpt:40:kill,step:60:proc --bwlimit 8M

What it emulates, and where it deliberately differs from a real managed job:

* The recipe is parsed by SkyPilot itself, exactly as ``sky jobs launch --env/--secret`` does
  (``load_chain_dag_from_yaml`` with the overrides, so an override is visible to everything the
  parser substitutes, e.g. a bucket name written as ``${BUCKET}``).
* Every node is a PID namespace on this machine (``unshare --pid --fork --kill-child
  --mount-proc``). Killing the namespace's init takes the whole tree, setsid'd torch-elastic
  ranks included, like a lost VM. The namespace's init is a ten-line Python reaper that runs
  ``bash -c RUN`` as its child rather than ``bash -c RUN`` itself: a PID 1 only receives the
  signals it installed a handler for, so a bare ``bash -c 'python train.py'`` (which bash execs)
  would make the trainer PID 1 and change what SIGTERM does to it. The reaper also keeps the
  node alive after SIGTERM until every process is gone, as a VM's shutdown grace period does.
  Without ``unshare`` the same reaper runs as a child subreaper and the tree is tracked with
  psutil.
* Buckets are real. Every bucket of the recipe's ``file_mounts`` is a bucket on ONE local S3
  server per rehearsal (``rclone serve s3`` over ``WORKDIR/store/data``, tools/localstore.py),
  and every node mounts it on its own (``WORKDIR/nodes/node<r>/mnt/<bucket>``, with its own
  rclone VFS cache ``WORKDIR/nodes/node<r>/cache/<bucket>``) in the recipe's ``mode:``
  (MOUNT_CACHED with SkyPilot's own rclone flags and ``type:`` preset; MOUNT as a
  close-uploads mount like goofys) and ``--bwlimit`` on each mount's uploads. COPY-mode
  buckets are downloaded into ``WORKDIR/nodes/node<r>/copy/`` on every fresh VM. Envs that
  point into a mount path are rewritten per node to that node's mount. Every node gets
  ``RCLONE_CONFIG`` (the store's remote ``skyspot-local``) and rclone on ``PATH``, so a trainer
  can list the bucket behind its mount, as skyspot.durability does. Mounts are made before an
  attempt's nodes start and stay up across attempts unless a fault takes the VM.
  Without FUSE (no ``/dev/fuse``, no ``fusermount3``, or ``--no-fuse``) buckets fall back to
  plain directories ``WORKDIR/buckets/<bucket>`` shared by every node: no upload lag, and a
  lost VM loses nothing; one line says so and how to get FUSE.
* SkyPilot appends a wait to ``run:`` on clusters with MOUNT_CACHED mounts
  (``TaskCodeGen.get_rclone_flush_script``): the job ends only once rclone has uploaded
  everything. Rehearse appends the same wait, asking each mount's rclone (``vfs/stats``) every
  0.2 s instead of reading its log every 10 s, so a rehearsed job ends up to ~11 s sooner.
* The recipe's ``workdir`` is resolved against the current directory, as ``sky`` does, so run
  this from the repo root (recipes say ``workdir: .``). Without a workdir each node starts in an
  empty ``WORKDIR/home/node<r>``, like a fresh VM's home.
* Restarts follow sky/jobs/recovery_strategy.py (``should_restart_on_failure``) and
  sky/jobs/controller.py: a preemption is recovered and never counted; a failed job (any node
  non-zero; the other nodes are then killed and report 137, as SkyPilot's ``get_or_fail``
  does) restarts without counting if ANY node's exit code is in ``recover_on_exit_codes``,
  otherwise it bumps a counter and restarts while the counter <= ``max_restarts_on_errors``.
  A failing ``setup`` (FAILED_SETUP) goes through the same accounting.
* ``SKYPILOT_TASK_ID`` embeds the jobs controller's start time. It changes on every
  ``--controller-restart-every``-th restart, like a controller restart does; a trainer that keys
  its run name on it starts from scratch and the rehearsal fails with a REGRESSION.

Faults (``--preempt-at``, one per attempt, in order; ``--preempt-every`` after those). A
trigger ``<seconds>s`` (after the attempt's launch), ``step:<N>`` (node 0 reports step >= N)
or ``ckpt:<N>`` (node 0 reports a committed checkpoint of step >= N: its manifest was just
written on the node, its uploads are probably not done), then a kind:

* ``term`` (default, ``--signal``): a preemption with grace. SIGTERM to every process of the
  node; SIGKILL after ``--grace``. The VM (rclone mount and its cache) is lost as soon as the
  node's processes have all exited, or when the grace ends, whichever is first.
* ``kill``: the VM is lost at once: SIGKILL to the whole node, then its mounts' rclone is
  SIGKILLed and its cache deleted; whatever was not uploaded is gone.
* ``proc``: the job's processes die on a live VM (OOM killer, a crash of the launcher): SIGKILL
  every process of the node; its mounts stay up with their caches and keep uploading, and the
  next attempt reuses them. SkyPilot sees exit code 137 on a cluster that is UP: a user
  failure, restarted only through ``max_restarts_on_errors`` / ``recover_on_exit_codes``.
  (Real SkyPilot relaunches on the same cluster only with ``strategy: FAILOVER``;
  EAGER_NEXT_REGION, the default, tears the cluster down before relaunching.)
* ``notice`` (needs ``--cloud aws|gcp|azure``): every node has its own loopback metadata
  endpoint (tools/metadata_server.py, ``SKYSPOT_METADATA_URL``); the struck node's announces
  the preemption at the trigger, SIGTERM follows ``--notice-lead`` seconds later, SIGKILL
  after ``--grace``, and the VM is lost as for ``term`` (not before the SIGTERM: a trainer
  that saved and exited on the notice leaves its uploads running until then). The notice is
  withdrawn before the next attempt.
* ``@<rank>`` strikes one node only (default: every node). The other nodes of a multi-node job
  are then torn down as SkyPilot's recovery does (it terminates the cluster and relaunches
  it): right after the struck node's VM is lost, their processes are SIGKILLed and their VMs
  are lost too. That is the pessimistic end: a real controller notices within ~15 s.

Checks (a rehearsal fails, exit 1, with one line each). After a fault that lost VMs, once they
are gone, the bucket itself is read through the S3 API (never a node's mount or cache): the
newest checkpoint of the run (``<run>/step-NNNNNNNN[.rK]``, the run directory being where
node 0's checkpoint events point) whose ``manifest.json`` is in the bucket and whose every
listed file is there with its size and xxh3-128 checksum. The next attempt must resume from
exactly that step: resuming from an older one, or starting fresh while one existed, is a
REGRESSION; resuming from a checkpoint that was not complete in the bucket is a CORRUPTION.
After a ``proc`` fault or a failure (VM alive, cache kept), and always on the plain-directory
fallback, the next attempt must resume from at least the newest checkpoint node 0 reported
committed (REGRESSION otherwise); on the fallback a resume from a torn directory is a
CORRUPTION too.

Goodput: ``final step / optimizer steps executed across all attempts`` (steps executed in an
attempt = last step seen - step it resumed from). The wall-time version is
``final step * median seconds per step / wall seconds from first launch to the end``.

WORKDIR/rehearsal.json (``"schema": "skyspot-rehearsal/2"``; times are Unix seconds, steps
optimizer steps, null where unknown):

    schema, recipe, workdir, cloud, managed_job_id, num_nodes, pid_namespaces
    status         SUCCEEDED | FAILED | FAILED_SETUP | MAX_ATTEMPTS | INTERRUPTED | ERROR
    ok             status is SUCCEEDED and there are no regressions or corruptions
    regressions    ["REGRESSION: ...", ...]
    corruptions    ["CORRUPTION: ...", ...]
    errors         only when the local object store or a mount failed: ["...", ...]
    storage        {backend: "fuse" | "plain", note, endpoint, store, data_dir, rclone_config,
                    bwlimit}   data_dir/<bucket>/<key> holds the objects once rehearse is done
    mounts         {<recipe path>: {source, bucket, mode: MOUNT_CACHED|MOUNT|COPY, type,
                    nodes: [{rank, local, mount_point, cache_dir, mounted}]}}
                   (local: the path the node's envs point to; mounted: mounts made over the
                   rehearsal, 1 + the VMs lost)
    job_recovery   {strategy, max_restarts_on_errors, recover_on_exit_codes,
                    restart_cnt_on_failure}
    attempts       [{index, task_id, started, ended,
                     ending        exited | failed | failed_setup | preempted:term |
                                   preempted:kill | preempted:notice | interrupted |
                                   error (the store or a mount failed: see errors)
                     fault         null | {kind, trigger, nodes (struck), phase, at, at_step,
                                   sigterm_at, sigkill_at, vm_lost: [{node, at}] in order,
                                   teardown (nodes torn down after the struck ones)}
                     decision, preempt_plan, exit_codes (per node), run_name,
                     resumed_from, resumed_path, resumed_key (bucket/key of resumed_path),
                     preemption_reason (the trainer's), last_step, first_step_at,
                     seconds_to_first_step (from launch), steps_lost,
                     bucket        null | {vm_lost, bucket, run_prefix, newest_complete_step,
                                   newest_complete_key, checkpoints: [{key, step, complete,
                                   reason}] newest first} read after the fault
                     checkpoints   [{step, path, seconds, bytes, async, time, durable_step,
                                   lag_steps}] from node 0's checkpoint events
                     skipped_checkpoints  [step, ...]: periodic saves the trainer skipped
                                   because the previous one was still being written or
                                   not yet in the bucket
                    }]
    totals         {attempts, preemptions: {term, kill, notice}, process_losses,
                    checkpoints: {count, mean_seconds, mean_bytes, max_lag_steps,
                                  skipped},
                    final_step, steps_executed, steps_lost, goodput, wall_seconds,
                    wall_goodput}
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import psutil
import xxhash

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:  # run as a script tools/ is sys.path[0]; loaded by path it is not
    sys.path.insert(0, str(TOOLS))
import localstore  # noqa: E402
import metadata_server  # noqa: E402

SCHEMA = "skyspot-rehearsal/2"
POLL_SECONDS = 0.05
PR_SET_PDEATHSIG = 1
DEV_FUSE = Path("/dev/fuse")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
BWLIMIT = re.compile(r"^\d+(\.\d+)?[bBkKmMgGtTpP]?$")
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's rules; serve s3 checks
CLOUDS = {  # --cloud -> what SkyPilot's str(cloud) reports, with a plausible region/zone
    "local": ("local", None, None),
    "aws": ("AWS", "us-east-1", "us-east-1a"),
    "gcp": ("GCP", "us-central1", "us-central1-a"),
    "azure": ("Azure", "eastus", None),
}
NOTICE_CLOUDS = ("aws", "gcp", "azure")
KINDS = ("term", "kill", "proc", "notice")
VM_LOSS = ("term", "kill", "notice")  # kinds that take the VM; proc leaves it up
BUCKET_MODES = ("MOUNT", "MOUNT_CACHED")
CHECKPOINT_DIR = re.compile(r"^step-(\d{8})(?:\.r(\d+))?$")
CHECKPOINT_FORMAT = "skyspot-checkpoint/1"
MANIFEST = "manifest.json"

# The init of every node. argv[1] is the script. Exits with bash's code (128+N for signal N).
NODE_INIT = r"""
import ctypes, os, signal, subprocess, sys
if os.getpid() != 1:  # no PID namespace: adopt orphans so the node's tree stays whole
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
draining = False
def drain(signum, frame):
    global draining
    draining = True  # preempted: stay up until every process of the node has exited
signal.signal(signal.SIGTERM, drain)
run = subprocess.Popen(["bash", "-c", sys.argv[1]])
code = 143
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    if pid == run.pid:
        code = os.waitstatus_to_exitcode(status)
        code = 128 - code if code < 0 else code
        if not draining:
            break
if os.getpid() != 1:  # what the kernel does to a namespace whose init exits
    import psutil
    for proc in psutil.Process().children(recursive=True):
        proc.kill()
sys.exit(code)
"""

# Appended to run: on a node with MOUNT_CACHED mounts, like SkyPilot's rclone flush script:
# the job ends once every mount of the node has uploaded what was closed. argv: rc URLs.
FLUSH_WAIT = r"""
import json, sys, time, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
start = said = time.time()
while True:
    pending = 0
    for url in sys.argv[1:]:
        request = urllib.request.Request(url + "vfs/stats", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with opener.open(request, timeout=10) as response:
                cache = json.load(response).get("diskCache", {})
        except OSError as err:
            print(f"skypilot (rehearsed): cannot ask the mount at {url}: {err}", flush=True)
            sys.exit(0)
        pending += int(cache.get("uploadsInProgress", 0)) + int(cache.get("uploadsQueued", 0))
    if not pending:
        break
    if time.time() - said >= 5:
        said = time.time()
        print(f"skypilot (rehearsed): cached mount is still uploading ({pending} files, "
              f"elapsed {said - start:.0f}s)", flush=True)
    time.sleep(0.2)
print(f"skypilot (rehearsed): cached mount upload complete (took {time.time() - start:.1f}s)",
      flush=True)
"""


class BadInput(Exception):
    """A user error: printed as one line, exit code 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM to the rehearsal itself."""


class StorageError(Exception):
    """The local object store or a mount failed: printed as one line, the rehearsal stops."""


# ---------------------------------------------------------------------------------------------
# Command line


@dataclass(frozen=True)
class Fault:
    trigger: str  # "time", "step" or "ckpt"
    at: float  # seconds after the attempt started, or the training step
    kind: str  # "term", "kill", "proc" or "notice"
    node: int | None = None  # the node rank it strikes; None: every node

    def describe(self) -> str:
        where = f"{self.at:g}s" if self.trigger == "time" else f"{self.trigger}:{int(self.at)}"
        return f"{where}:{self.kind}" + (f"@{self.node}" if self.node is not None else "")


def parse_preempt_at(text: str, default_kind: str) -> list[Fault]:
    items = []
    for item in (part.strip() for part in text.split(",")):
        body, at_sign, rank = item.partition("@")
        parts = body.split(":")
        kind = default_kind
        if parts[-1] in KINDS:
            kind = parts.pop()
        node = int(rank) if at_sign and rank.isdigit() else None
        if at_sign and node is None:
            pass  # falls through to the error below
        elif len(parts) == 2 and parts[0] in ("step", "ckpt") and parts[1].isdigit():
            items.append(Fault(parts[0], int(parts[1]), kind, node))
            continue
        elif len(parts) == 1 and re.fullmatch(r"\d+(\.\d+)?s", parts[0]):
            items.append(Fault("time", float(parts[0][:-1]), kind, node))
            continue
        raise BadInput(
            f"bad --preempt-at item {item!r}: expected <seconds>s, step:<N> or ckpt:<N>, "
            "optionally with :term, :kill, :proc or :notice and @<node rank> "
            "(e.g. 30s,step:100:kill,ckpt:40:proc@1)"
        )
    return items


def parse_key_values(items: list[str], flag: str) -> list[tuple[str, str]]:
    """KEY=VALUE, or KEY alone to take the caller's value (like sky's --env/--secret)."""
    pairs = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            if key not in os.environ:
                raise BadInput(f"{flag} {key}: not set in the local environment")
            value = os.environ[key]
        if not ENV_KEY.match(key):
            raise BadInput(f"{flag} {item!r}: invalid variable name {key!r}")
        pairs.append((key, value))
    return pairs


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="rehearse",
        description="Run a SkyPilot recipe locally as a managed spot job would, on a real local\n"
        "object store with per-node bucket mounts, with injected preemptions and node losses,\n"
        "and check that every recovery resumes from the newest checkpoint in the bucket.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n"
        "  python tools/rehearse.py recipes/train.yaml --gpus-per-node 1 \\\n"
        "      --env MAX_STEPS=60 --preempt-at step:20,ckpt:40:kill,45s:proc --bwlimit 8M\n\n"
        "faults: <seconds>s | step:<N> | ckpt:<N>, then :term (SIGTERM, SIGKILL after --grace,\n"
        "VM lost once the node's processes are gone) | :kill (VM lost at once) | :proc (job\n"
        "processes SIGKILLed, VM and mount stay: a user failure, exit 137) | :notice (cloud\n"
        "metadata notice, SIGTERM --notice-lead s later; needs --cloud), optionally @<rank>.\n\n"
        "exit code: 0 if the job SUCCEEDED and every resume was from the newest complete\n"
        "checkpoint, 1 otherwise, 2 for bad input, 130 when interrupted.\n"
        "Summary: WORKDIR/rehearsal.json (schema in the module docstring).",
    )
    parser.add_argument("recipe", help="SkyPilot task YAML")
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="override an env (like sky jobs launch --env); K alone takes $K")
    parser.add_argument("--secret", action="append", default=[], metavar="K=V",
                        help="set a secret; K alone takes $K from the caller's environment")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="rehearsal directory (default runs/rehearse-<recipe>-<time>/)")
    parser.add_argument("--gpus-per-node", type=int, metavar="N",
                        help="SKYPILOT_NUM_GPUS_PER_NODE (default: the recipe's accelerators)")
    parser.add_argument("--preempt-at", default="", metavar="ITEMS",
                        help="comma list of faults, one per attempt, in order: <seconds>s, "
                        "step:<N> or ckpt:<N>, each optionally :term, :kill, :proc or :notice "
                        "and @<node rank>")
    parser.add_argument("--preempt-every", type=float, metavar="SECONDS",
                        help="preempt every attempt this long after it starts (after the "
                        "--preempt-at items are used up)")
    parser.add_argument("--signal", choices=KINDS, default="term",
                        help="default fault kind (default term)")
    parser.add_argument("--grace", type=float, default=30.0, metavar="SECONDS",
                        help="seconds between SIGTERM and SIGKILL (default 30)")
    parser.add_argument("--notice-lead", type=float, default=10.0, metavar="SECONDS",
                        help="seconds between a :notice and its SIGTERM (default 10)")
    parser.add_argument("--bwlimit", metavar="RATE",
                        help="cap each mount's upload bandwidth (rclone --bwlimit, bytes/s, "
                        "e.g. 2M), to make the bucket lag behind what the trainer wrote")
    parser.add_argument("--no-fuse", action="store_true",
                        help="buckets as plain shared directories, for machines without FUSE "
                        "(no upload lag, a lost VM loses nothing)")
    parser.add_argument("--max-attempts", type=int, default=20, metavar="N",
                        help="stop after this many attempts (default 20)")
    parser.add_argument("--controller-restart-every", type=int, default=2, metavar="K",
                        help="new controller timestamp in SKYPILOT_TASK_ID on every K-th "
                        "restart (default 2; 0 never)")
    parser.add_argument("--cloud", choices=sorted(CLOUDS), default="local",
                        help="cloud reported in SKYPILOT_CLUSTER_INFO; aws/gcp/azure also get "
                        "a metadata endpoint per node (default local)")
    parser.add_argument("--run-setup", action="store_true",
                        help="run the recipe's setup on every node before each attempt")
    parser.add_argument("--no-pid-namespace", action="store_true",
                        help="track process trees with psutil instead of unshare")
    parser.add_argument("--quiet", action="store_true", help="do not stream node logs")
    return parser


# ---------------------------------------------------------------------------------------------
# The recipe, as SkyPilot reads it


@dataclass(frozen=True)
class StorageSpec:
    """One bucket entry of file_mounts (SkyPilot's Storage)."""

    store: str  # s3, gcs, azure, ...
    bucket: str
    sub: str  # key prefix inside the bucket that is mounted ("" for the whole bucket)
    sources: tuple[str, ...]  # local paths uploaded into the bucket before launch
    mode: str  # MOUNT, MOUNT_CACHED or COPY
    mount_type: str | None  # the MOUNT_CACHED `type:` preset

    @property
    def url(self) -> str:
        return f"{self.store}://{self.bucket}/{self.sub}".rstrip("/")


@dataclass
class Recipe:
    path: Path
    name: str
    num_nodes: int
    envs: dict[str, str]
    secrets: dict[str, str]
    setup: str | None
    run: str
    workdir: Path | None
    gpus_per_node: int
    strategy: str
    max_restarts_on_errors: int
    recover_on_exit_codes: list[int]
    storage_mounts: dict[str, StorageSpec]  # recipe path -> bucket
    copy_mounts: dict[str, str]  # path -> bucket URL or local path


def load_recipe(
    path: Path, env: list[tuple[str, str]], secrets: list[tuple[str, str]]
) -> Recipe:
    if not path.is_file():
        raise BadInput(f"recipe not found: {path}")
    try:
        from sky.utils import dag_utils  # slow import: only once the arguments are fine

        dag = dag_utils.load_chain_dag_from_yaml(str(path), env or None, secrets or None)
    except Exception as e:  # SkyPilot reports bad YAML with many exception types
        raise BadInput(f"SkyPilot rejects {path}: {one_line(e)}") from None
    if len(dag.tasks) != 1:
        raise BadInput(f"{path}: {len(dag.tasks)} tasks; rehearse runs single-task recipes")
    task = dag.tasks[0]
    if not task.run or not isinstance(task.run, str):
        raise BadInput(f"{path}: no run: command to rehearse")

    resources = list(task.resources)
    recovery = resources[0].job_recovery
    if any(r.job_recovery != recovery for r in resources):
        raise BadInput(f"{path}: job_recovery differs between resources (SkyPilot rejects it)")
    # Same defaults as StrategyExecutor.make(): a bare strategy name means no restarts.
    max_restarts, recover_codes, strategy = 0, [], None
    if isinstance(recovery, dict):
        max_restarts = int(recovery.get("max_restarts_on_errors", 0) or 0)
        codes = recovery.get("recover_on_exit_codes")
        recover_codes = [codes] if isinstance(codes, int) else [int(c) for c in codes or []]
        strategy = recovery.get("strategy")
    elif isinstance(recovery, str):
        strategy = recovery
    accelerators = resources[0].accelerators or {}
    gpus = int(math.ceil(sum(accelerators.values()))) if accelerators else 0

    # Secrets without a value are references SkyPilot resolves at launch; ours is the caller.
    secret_values = {k: v.get_secret_value() for k, v in task.secrets.items()}
    for ref in task.managed_secret_refs:
        if ref.name not in secret_values:
            if ref.name not in os.environ:
                raise BadInput(
                    f"secret {ref.name} has no value: pass --secret {ref.name}=VALUE "
                    f"or export {ref.name}"
                )
            secret_values[ref.name] = os.environ[ref.name]

    if isinstance(task.workdir, dict):
        raise BadInput(f"{path}: a git workdir cannot be rehearsed; use a local path")
    workdir = Path(task.workdir).expanduser().resolve() if task.workdir else None
    if workdir is not None and not workdir.is_dir():
        raise BadInput(f"{path}: workdir {task.workdir!r} is not a directory here ({workdir})")

    storage = {}
    for mount_path, obj in (task.storage_mounts or {}).items():
        store = next(iter(obj.stores), None)
        store_name = store.value.lower() if store is not None else "s3"
        sources = obj.source if isinstance(obj.source, list) else [obj.source or ""]
        bucket, sub = obj.name, getattr(obj, "_bucket_sub_path", None) or ""
        if "://" in sources[0]:
            rest = sources[0].split("://", 1)[1]
            bucket = bucket or rest.split("/", 1)[0]
            sub = rest.partition("/")[2] or sub
        mode = getattr(obj.mode, "value", None) or "MOUNT"
        mount_type = getattr(getattr(obj, "file_mount_type", None), "value", None)
        storage[mount_path] = StorageSpec(
            store_name, bucket or "bucket", sub.strip("/"),
            tuple(s for s in sources if s and "://" not in s), mode,
            mount_type if mode == "MOUNT_CACHED" else None)
    return Recipe(
        path=path,
        name=task.name or path.stem,
        num_nodes=task.num_nodes,
        envs=dict(task.envs),
        secrets=secret_values,
        setup=task.setup if isinstance(task.setup, str) else None,
        run=task.run,
        workdir=workdir,
        gpus_per_node=gpus,
        strategy=str(strategy or "EAGER_NEXT_REGION").upper(),  # SkyPilot's default strategy
        max_restarts_on_errors=max_restarts,
        recover_on_exit_codes=recover_codes,
        storage_mounts=storage,
        copy_mounts=dict(task.file_mounts or {}),
    )


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 400 else text[:400] + "..."


# ---------------------------------------------------------------------------------------------
# Buckets: one local object store, one mount per bucket per node (or plain directories)


@dataclass(frozen=True)
class Mount:
    path: str  # where the recipe sees it, e.g. /checkpoints
    source: str  # what SkyPilot would mount or copy, e.g. s3://my-bucket
    local: Path  # where this node has it


@dataclass
class NodeMount:
    """One bucket mount path of the recipe on one node."""

    rank: int
    path: str
    spec: StorageSpec
    mount_point: Path  # where the whole bucket appears on this node
    cache_dir: Path | None = None
    log_file: Path | None = None
    live: localstore.Mount | None = None
    up: bool = False  # mounted (or, for COPY, downloaded) on the node's current VM
    mounted: int = 0  # how many times: 1 + the VMs lost

    @property
    def local(self) -> Path:
        """Where the recipe's mount path is on this node (the bucket's sub path, if any)."""
        return self.mount_point / self.spec.sub if self.spec.sub else self.mount_point


class Buckets:
    """Where every bucket of the recipe lives during a rehearsal, as each node sees it."""

    def __init__(self, recipe: Recipe, workdir: Path, *, fuse: bool, bwlimit: str | None,
                 note: str | None = None) -> None:
        self.recipe, self.workdir, self.fuse, self.bwlimit = recipe, workdir, fuse, bwlimit
        self.note = note
        self.store: localstore.LocalObjectStore | None = None
        self.endpoint: str | None = None
        self.data_dir = workdir / "store" / "data" if fuse else workdir / "buckets"
        self.nodes: dict[int, list[NodeMount]] = {r: [] for r in range(recipe.num_nodes)}
        self.copies: list[Mount] = []  # file_mounts copied to every node: the same everywhere

    @property
    def buckets(self) -> list[str]:
        return sorted({spec.bucket for spec in self.recipe.storage_mounts.values()})

    def start(self) -> None:
        """Create the store and the buckets, upload local sources; mounts come per attempt."""
        if self.fuse:
            try:
                self.store = localstore.LocalObjectStore(self.workdir / "store").start()
                self.endpoint = self.store.endpoint
                for bucket in self.buckets:
                    self.store.create_bucket(bucket)
            except (RuntimeError, ValueError, OSError) as err:
                raise StorageError(f"local object store: {one_line(err)}") from None
        used: dict[str, int] = {}
        for path, spec in self.recipe.storage_mounts.items():
            self._upload_sources(spec)
            name = spec.bucket if spec.bucket not in used else f"{spec.bucket}.{used[spec.bucket]}"
            used[spec.bucket] = used.get(spec.bucket, 0) + 1
            for rank in self.nodes:
                node = self.workdir / "nodes" / f"node{rank}"
                if not self.fuse:  # one directory per bucket, shared by every node
                    nm = NodeMount(rank, path, spec, self.data_dir / spec.bucket, up=True,
                                   mounted=1)
                    nm.local.mkdir(parents=True, exist_ok=True)
                elif spec.mode in BUCKET_MODES:
                    nm = NodeMount(rank, path, spec, node / "mnt" / name,
                                   cache_dir=node / "cache" / name,
                                   log_file=self.workdir / "logs" / f"rclone-node{rank}-{name}.log")
                else:  # COPY: downloaded onto each fresh VM
                    nm = NodeMount(rank, path, spec, node / "copy" / name)
                self.nodes[rank].append(nm)
        for path, source in self.recipe.copy_mounts.items():
            if "://" in source:  # COPY mode of a bucket given as a URL: a plain directory
                scheme, _, rest = source.partition("://")
                bucket, _, sub = rest.partition("/")
                local = self.workdir / "buckets" / bucket / sub
                local.mkdir(parents=True, exist_ok=True)
            else:  # a local file or directory is copied to the node; copy it once
                local = self.workdir / "files" / path.strip("/").replace("/", "_").replace(
                    "~", "home")
                src = Path(source).expanduser()
                if not src.exists():
                    raise BadInput(f"file_mounts source {source!r} for {path} does not exist")
                copy_into(src, local)
            self.copies.append(Mount(path, source, local))

    def _upload_sources(self, spec: StorageSpec) -> None:
        """A local source is uploaded to the bucket before launch, as SkyPilot does."""
        for source in spec.sources:
            src = Path(source).expanduser()
            if not src.exists():
                raise BadInput(f"file_mounts source {source!r} for bucket {spec.bucket} does "
                               "not exist")
            if self.store is None:
                copy_into(src, self.data_dir / spec.bucket / spec.sub)
                continue
            dest = f"{self.store.remote}:{spec.bucket}/{spec.sub}".rstrip("/")
            try:
                self.store.rclone("copy", str(src), dest)
            except (RuntimeError, OSError, subprocess.SubprocessError) as err:
                raise StorageError(f"uploading {source} to {spec.bucket}: {one_line(err)}") \
                    from None

    def mounts_for(self, rank: int) -> list[Mount]:
        return [Mount(nm.path, nm.spec.url, nm.local) for nm in self.nodes[rank]] + self.copies

    def ensure_mounted(self) -> list[int]:
        """Mount on every node what is not mounted (first attempt, or after a lost VM);
        returns the ranks that got fresh mounts."""
        fresh = []
        for rank, mounts in self.nodes.items():
            for nm in mounts:
                if nm.up:
                    continue
                fresh.append(rank)
                try:
                    self._mount(nm)
                except (RuntimeError, ValueError, OSError, subprocess.SubprocessError) as err:
                    raise StorageError(f"mounting {nm.spec.url} on node {rank}: "
                                       f"{one_line(err)}") from None
        return sorted(set(fresh))

    def _mount(self, nm: NodeMount) -> None:
        assert self.store is not None
        spec = nm.spec
        if spec.mode in BUCKET_MODES:
            nm.live = self.store.mount(spec.bucket, nm.mount_point, mode=spec.mode,
                                       cache_dir=nm.cache_dir, bwlimit=self.bwlimit,
                                       mount_type=spec.mount_type, log_file=nm.log_file)
            nm.local.mkdir(parents=True, exist_ok=True)  # a sub path: a "directory" in it
        else:  # COPY: the bucket's contents land on the fresh VM, writes stay there
            shutil.rmtree(nm.mount_point, ignore_errors=True)
            nm.local.mkdir(parents=True)
            self.store.rclone("copy", f"{self.store.remote}:{spec.bucket}/{spec.sub}".rstrip("/"),
                              str(nm.local))
        nm.up = True
        nm.mounted += 1

    def lose_vm(self, rank: int) -> bool:
        """The node's VM is gone: its mounts' rclone dies, their caches with it. Whether
        anything was lost (nothing is, on plain directories)."""
        lost = False
        for nm in self.nodes[rank]:
            if not self.fuse or not nm.up:
                continue
            try:
                if nm.live is not None:
                    nm.live.lose_vm()
                    nm.live = None
                else:
                    shutil.rmtree(nm.mount_point, ignore_errors=True)
            except (RuntimeError, OSError, subprocess.SubprocessError) as err:
                raise StorageError(f"losing node {rank}'s mount of {nm.spec.url}: "
                                   f"{one_line(err)}") from None
            nm.up, lost = False, True
        return lost

    def cached_rc_urls(self, rank: int) -> list[str]:
        """The rc endpoints of the node's MOUNT_CACHED mounts (for the flush wait)."""
        return [nm.live.rc_url for nm in self.nodes[rank]
                if nm.live is not None and nm.spec.mode == "MOUNT_CACHED"]

    def bucket_key(self, rank: int, path: str | Path) -> tuple[str, str] | None:
        """(bucket, key) of a path on a node's bucket mount, or None if it is on none."""
        target = os.path.normpath(str(path))
        for nm in sorted(self.nodes[rank], key=lambda m: len(str(m.local)), reverse=True):
            if nm.spec.mode not in BUCKET_MODES:
                continue
            top = str(nm.mount_point)
            if target == top:
                return nm.spec.bucket, ""
            if target.startswith(top + "/"):
                return nm.spec.bucket, target[len(top) + 1:]
        return None

    def list_objects(self, bucket: str) -> dict[str, int]:
        """key -> size of every object in the bucket: through the S3 API on the store."""
        if self.store is not None:
            return self.store.list_objects(bucket)
        root = self.data_dir / bucket
        return {p.relative_to(root).as_posix(): p.stat().st_size
                for p in root.rglob("*") if p.is_file()} if root.is_dir() else {}

    def read_object(self, bucket: str, key: str) -> bytes:
        if self.store is not None:
            return self.store.read_object(bucket, key)
        return (self.data_dir / bucket / key).read_bytes()

    def close(self, upload_timeout_s: float) -> None:
        if self.store is not None:
            store, self.store = self.store, None
            try:
                store.close(upload_timeout_s=upload_timeout_s)
            except (RuntimeError, OSError, subprocess.SubprocessError) as err:
                raise StorageError(one_line(err)) from None

    def describe(self) -> tuple[dict, dict]:
        """The summary's storage and mounts sections."""
        store = self.workdir / "store"
        storage = {
            "backend": "fuse" if self.fuse else "plain",
            "note": self.note,
            "endpoint": self.endpoint,
            "store": str(store) if self.fuse else None,
            "data_dir": str(self.data_dir),
            "rclone_config": str(store / "rclone.conf") if self.fuse else None,
            "bwlimit": self.bwlimit if self.fuse else None,
        }
        mounts: dict[str, dict] = {}
        for rank, node_mounts in self.nodes.items():
            for nm in node_mounts:
                entry = mounts.setdefault(nm.path, {
                    "source": nm.spec.url, "bucket": nm.spec.bucket, "mode": nm.spec.mode,
                    "type": nm.spec.mount_type, "nodes": []})
                entry["nodes"].append({
                    "rank": rank, "local": str(nm.local),
                    "mount_point": str(nm.mount_point) if self.fuse else None,
                    "cache_dir": str(nm.cache_dir) if nm.cache_dir else None,
                    "mounted": nm.mounted})
        for mount in self.copies:
            mounts[mount.path] = {"source": mount.source, "bucket": None, "mode": "COPY",
                                  "type": None, "nodes": [
                                      {"rank": r, "local": str(mount.local), "mount_point": None,
                                       "cache_dir": None, "mounted": 1} for r in self.nodes]}
        return storage, mounts


def copy_into(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def remap(value: str, mounts: list[Mount]) -> str | None:
    """The local path for an env value that is a mount path or lies under one."""
    for mount in sorted(mounts, key=lambda m: len(m.path), reverse=True):  # deepest first
        root = mount.path.rstrip("/")
        if value in (root, mount.path):
            return str(mount.local)
        if value.startswith(root + "/"):
            return str(mount.local) + value[len(root):]
    return None


# ---------------------------------------------------------------------------------------------
# What each node sees


@dataclass
class Job:
    recipe: Recipe
    workdir: Path
    buckets: Buckets
    job_id: int
    gpus_per_node: int
    cloud: str
    controller_started: str  # timestamp in SKYPILOT_TASK_ID; changes on a controller restart
    cpu_only: bool
    metadata_urls: list[str] = field(default_factory=list)  # per node, for --cloud aws/gcp/azure

    @property
    def task_id(self) -> str:
        return f"sky-managed-{self.controller_started}_{self.recipe.name}_{self.job_id}-0"

    def node_env(self, rank: int) -> dict[str, str]:
        env = dict(os.environ)
        mounts = self.buckets.mounts_for(rank)
        for key, value in self.recipe.envs.items():
            env[key] = remap(value, mounts) or value
        env.update(self.recipe.secrets)
        cloud, region, zone = CLOUDS[self.cloud]
        bins = [os.path.dirname(sys.executable)]
        if self.buckets.store is not None:
            env["RCLONE_CONFIG"] = str(self.buckets.store.rclone_config)
            rclone_dir = os.path.dirname(localstore.rclone_binary())
            if rclone_dir not in bins:
                bins.append(rclone_dir)
        if self.metadata_urls:
            env["SKYSPOT_METADATA_URL"] = self.metadata_urls[rank]
        env.update({
            "SKYPILOT_MANAGED_JOB_ID": str(self.job_id),
            "SKYPILOT_TASK_ID": self.task_id,
            "SKYPILOT_NODE_RANK": str(rank),
            "SKYPILOT_NODE_IPS": "\n".join(node_ips(self.recipe.num_nodes)),
            "SKYPILOT_NUM_NODES": str(self.recipe.num_nodes),
            "SKYPILOT_NUM_GPUS_PER_NODE": str(self.gpus_per_node),
            "SKYPILOT_CLUSTER_INFO": json.dumps({
                "cluster_name": f"{self.recipe.name}-{self.job_id}",
                "cloud": cloud,
                "region": region,
                "zone": zone,
            }),
            "SKYSPOT_EVENTS_FILE": str(self.workdir / "events" / f"node{rank}.jsonl"),
            "PATH": os.pathsep.join([*bins, env.get("PATH", "")]),
        })
        if self.cpu_only:
            env.setdefault("ACCELERATE_USE_CPU", "1")
        return env

    def node_script(self, rank: int, phase: str, script: str) -> str:
        """run: plus SkyPilot's wait for MOUNT_CACHED uploads on nodes that have such mounts."""
        urls = self.buckets.cached_rc_urls(rank) if phase == "run" else []
        if not urls:
            return script
        return (f"{script}\n__skypilot_user_exit_code=$?\n"
                f"{shlex.quote(sys.executable)} -c {shlex.quote(FLUSH_WAIT)} "
                f"{' '.join(shlex.quote(u) for u in urls)}\n"
                "exit $__skypilot_user_exit_code\n")

    def node_cwd(self, rank: int) -> Path:
        if self.recipe.workdir is not None:
            return self.recipe.workdir
        home = self.workdir / "home" / f"node{rank}"
        home.mkdir(parents=True, exist_ok=True)
        return home


def node_ips(num_nodes: int) -> list[str]:
    return [f"127.0.0.{rank + 1}" for rank in range(num_nodes)]


def controller_timestamp() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S-%f")


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# ---------------------------------------------------------------------------------------------
# Nodes: one PID namespace (or one tracked process tree) each

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the rehearsal dies, so does the node.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def pid_namespaces_work() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "true"]
    return subprocess.run(probe, capture_output=True).returncode == 0


@dataclass
class Node:
    rank: int
    proc: subprocess.Popen
    log: Path
    pid_namespace: bool
    log_offset: int = 0
    log_partial: bytes = b""
    killed: bool = False  # SIGKILLed by us: its exit code means nothing

    @property
    def exit_code(self) -> int | None:
        code = self.proc.poll()
        return None if code is None else (128 - code if code < 0 else code)

    def processes(self) -> list[psutil.Process]:
        """Every process of the node. With a namespace: all descendants of unshare, i.e. the
        namespace's init and everything in it (orphans are reparented to that init)."""
        try:
            root = psutil.Process(self.proc.pid)
            procs = root.children(recursive=True)
        except psutil.Error:
            return []
        return procs if self.pid_namespace else [root, *procs]

    def terminate(self) -> None:
        for proc in self.processes():
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass

    def kill(self) -> None:
        """SIGKILL the whole node, like losing the VM; returns once nothing of it is left."""
        if self.proc.poll() is not None:
            return
        self.killed = True
        if self.pid_namespace:
            # SIGKILL to unshare reaches the namespace's init as its parent-death signal
            # (--kill-child); when init dies the kernel kills every process in the namespace,
            # and init is gone only once all of them are. (Killing init directly works too,
            # but makes unshare print a spurious sigprocmask error into the log.)
            try:
                inits = psutil.Process(self.proc.pid).children()
            except psutil.Error:
                inits = []
            self.proc.kill()
            wait_exited(inits, timeout=10)
        else:
            # No namespace: kill the tree until it stays empty; the root is a subreaper, so
            # orphans stay visible under it, and it dies last.
            for _ in range(100):
                rest = self.processes()[1:]
                if not rest:
                    break
                for proc in rest:
                    try:
                        proc.kill()
                    except psutil.Error:
                        pass
                time.sleep(0.01)
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_exited(procs: list[psutil.Process], timeout: float) -> None:
    """Wait until each process is a zombie or gone. Not psutil.wait_procs: an orphaned zombie
    waits for the host's init to reap it, which can take seconds, and a PID namespace's init
    only turns zombie once every process in the namespace is gone."""
    deadline = time.time() + timeout
    for proc in procs:
        while time.time() < deadline:
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.01)


def start_node(job: Job, rank: int, script: str, log: Path, pid_namespace: bool) -> Node:
    command = [sys.executable, "-c", NODE_INIT, script]
    if pid_namespace:
        command = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", *command]
    log.parent.mkdir(parents=True, exist_ok=True)
    offset = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=job.node_cwd(rank),
            env=job.node_env(rank),
            start_new_session=True,  # Ctrl-C in the terminal is ours to handle, not the job's
            preexec_fn=_die_with_parent,
        )
    return Node(rank, proc, log, pid_namespace, log_offset=offset)


def stream_log(node: Node, attempt: int, out: TextIO | None, final: bool = False) -> None:
    """Print the new lines of a node's log with a prefix (the node writes to the file)."""
    try:
        with open(node.log, "rb") as f:
            f.seek(node.log_offset)
            data = f.read()
    except FileNotFoundError:
        return
    node.log_offset += len(data)
    lines = (node.log_partial + data).split(b"\n")
    node.log_partial = lines.pop()
    if final and node.log_partial:
        lines.append(node.log_partial)
        node.log_partial = b""
    if out is not None:
        for line in lines:
            out.write(f"[a{attempt}/n{node.rank}] {line.decode(errors='replace')}\n")
        out.flush()


# ---------------------------------------------------------------------------------------------
# Events written by the trainer (rank 0) to $SKYSPOT_EVENTS_FILE


class EventTail:
    """Reads complete JSON lines appended since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = b""

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a torn or foreign line must not stop the rehearsal
            if isinstance(event, dict) and isinstance(event.get("event"), str):
                events.append(event)
        return events


def event_step(event: dict, key: str = "step") -> int | None:
    step = event.get(key)
    return int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else None


# ---------------------------------------------------------------------------------------------
# Attempts


@dataclass
class Attempt:
    index: int
    task_id: str
    started: float
    ended: float | None = None
    ending: str = ""  # see the module docstring
    fault: dict | None = None
    decision: str = ""  # what the controller did next
    preempt_plan: str | None = None
    exit_codes: list[int] = field(default_factory=list)
    run_name: str | None = None
    resumed_from: int | None = None  # step it started at (0 when fresh); None if unknown
    resumed_path: str | None = None
    resumed_key: str | None = None  # "<bucket>/<key>" of resumed_path
    preemption_reason: str | None = None
    last_step: int | None = None
    first_step_at: float | None = None
    seconds_to_first_step: float | None = None
    steps_lost: int | None = None  # filled once the next attempt reports where it resumed
    bucket: dict | None = None  # the bucket read after this attempt's fault
    checkpoints: list[dict] = field(default_factory=list)
    skipped_checkpoints: list[int] = field(default_factory=list)  # steps; previous uploading
    step_times: list[tuple[int, float]] = field(default_factory=list)
    step_reached: int | None = None  # highest step/log event: the step:<N> trigger
    checkpoint_reached: int | None = None  # highest checkpoint event: the ckpt:<N> trigger

    def observe(self, event: dict) -> None:
        name, step = event["event"], event_step(event)
        when = event.get("time") if isinstance(event.get("time"), (int, float)) else time.time()
        if name == "start":
            self.run_name = event.get("run_name")
            if self.resumed_path is None and step is not None:
                self.resumed_from = step
        elif name == "resumed" and step is not None:
            self.resumed_from, self.resumed_path = step, str(event.get("path"))
        elif name == "step" and step is not None:
            if self.first_step_at is None:
                self.first_step_at = when
                self.seconds_to_first_step = round(when - self.started, 3)
            self.step_times.append((step, when))
        elif name == "checkpoint" and step is not None:
            self.checkpoints.append({
                "step": step,
                "path": event.get("path"),
                "seconds": event.get("seconds"),
                "bytes": event.get("bytes"),
                "async": event.get("async"),
                "time": when,
                "durable_step": event_step(event, "durable_step"),
                "lag_steps": event_step(event, "lag_steps"),
            })
            self.checkpoint_reached = max(step, self.checkpoint_reached or step)
        elif name == "checkpoint_skipped" and step is not None:
            self.skipped_checkpoints.append(step)
        elif name == "preemption":
            self.preemption_reason = str(event.get("reason"))
        if name in ("step", "log") and step is not None:
            self.step_reached = max(step, self.step_reached or step)
        if name in ("step", "log", "checkpoint", "preemption", "exit") and step is not None:
            self.last_step = step if self.last_step is None else max(self.last_step, step)

    @property
    def steps_executed(self) -> int:
        if self.last_step is None:
            return 0
        return max(0, self.last_step - (self.resumed_from or 0))


@dataclass
class RecoveryPolicy:
    """StrategyExecutor.should_restart_on_failure, sky/jobs/recovery_strategy.py."""

    max_restarts_on_errors: int
    recover_on_exit_codes: list[int]
    restart_cnt_on_failure: int = 0

    def should_restart_on_failure(self, exit_codes: list[int]) -> tuple[bool, str]:
        matching = [c for c in exit_codes if c in self.recover_on_exit_codes]
        if matching:  # restarts without touching the counter, however often it happens
            return True, f"exit code(s) {matching} in recover_on_exit_codes"
        self.restart_cnt_on_failure += 1
        count = f"{self.restart_cnt_on_failure}/{self.max_restarts_on_errors}"
        if self.restart_cnt_on_failure > self.max_restarts_on_errors:
            return False, f"max_restarts_on_errors exhausted ({count})"
        return True, f"restart {count} on errors"


@dataclass
class PhaseResult:
    ending: str  # "exited", "failed", "preempted:<kind>"
    exit_codes: list[int]
    fault: dict | None = None


@dataclass
class FaultRun:
    """A fault under way in the current attempt."""

    plan: Fault
    struck: list[int]
    record: dict
    term_at: float = math.inf  # when the struck nodes get SIGTERM (term, notice)
    kill_at: float = math.inf  # when the grace ends
    termed: bool = False
    lost: set[int] = field(default_factory=set)
    done: bool = False  # every VM the fault takes is gone (or none is taken)


# ---------------------------------------------------------------------------------------------
# The bucket itself, read through the S3 API


def scan_bucket(buckets: Buckets, bucket: str, run_prefix: str | None) -> dict:
    """Every checkpoint directory of the bucket (of the run, if known), newest first, with
    whether it is complete: manifest present, every listed file with its size and xxh3."""
    objects = buckets.list_objects(bucket)
    dirs: dict[str, dict[str, int]] = {}
    for key, size in objects.items():
        parts = key.split("/")  # the first step-N component is the checkpoint directory
        for i, part in enumerate(parts[:-1]):
            if CHECKPOINT_DIR.match(part):
                dirs.setdefault("/".join(parts[: i + 1]), {})["/".join(parts[i + 1:])] = size
                break
    if run_prefix is not None:
        dirs = {d: files for d, files in dirs.items() if d.rpartition("/")[0] == run_prefix}
    entries = []
    for directory in sorted(dirs, key=_dir_order, reverse=True):
        reason = verify_in_bucket(buckets, bucket, directory, dirs[directory])
        entries.append({"key": directory, "step": _dir_order(directory)[0],
                        "complete": reason is None, "reason": reason})
    newest = next((e for e in entries if e["complete"]), None)
    return {
        "bucket": bucket,
        "run_prefix": run_prefix,
        "newest_complete_step": newest["step"] if newest else None,
        "newest_complete_key": newest["key"] if newest else None,
        "checkpoints": entries,
    }


def _dir_order(key: str) -> tuple[int, int]:
    match = CHECKPOINT_DIR.match(key.rpartition("/")[2])
    return (int(match[1]), int(match[2] or 0)) if match else (-1, -1)


def verify_in_bucket(buckets: Buckets, bucket: str, directory: str,
                     files: dict[str, int]) -> str | None:
    """None if the checkpoint is complete in the bucket, else why not (skyspot's rules)."""
    if MANIFEST not in files:
        return f"{MANIFEST} missing"
    try:
        manifest = json.loads(buckets.read_object(bucket, f"{directory}/{MANIFEST}"))
    except (OSError, ValueError) as err:
        return f"{MANIFEST} unreadable: {one_line(err)}"
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT or \
            not isinstance(manifest.get("files"), list):
        return f"{MANIFEST} is not a {CHECKPOINT_FORMAT} manifest"
    for entry in manifest["files"]:
        name = str(entry.get("path"))
        if name not in files:
            return f"{name} missing"
        if files[name] != entry.get("size"):
            return f"{name} has {files[name]} bytes, manifest says {entry.get('size')}"
        try:
            data = buckets.read_object(bucket, f"{directory}/{name}")
        except OSError as err:
            return f"{name} unreadable: {one_line(err)}"
        if xxhash.xxh3_128(data).hexdigest() != entry.get("xxh3_128"):
            return f"{name} checksum mismatch"
    return None


# ---------------------------------------------------------------------------------------------
# The managed job


class Rehearsal:
    def __init__(self, job: Job, args: argparse.Namespace, pid_namespace: bool,
                 metadata: list[metadata_server.FakeMetadata] | None = None) -> None:
        self.job = job
        self.args = args
        self.pid_namespace = pid_namespace
        self.plans = parse_preempt_at(args.preempt_at, args.signal) if args.preempt_at else []
        self.metadata = metadata or []
        self.out: TextIO | None = None if args.quiet else sys.stdout
        self.events = EventTail(job.workdir / "events" / "node0.jsonl")
        self.nodes: list[Node] = []
        self.attempts: list[Attempt] = []
        self.policy = RecoveryPolicy(
            job.recipe.max_restarts_on_errors, job.recipe.recover_on_exit_codes
        )
        self.run_location: tuple[str, str] | None = None  # (bucket, run dir key) of node 0
        self.started = time.time()

    def say(self, message: str) -> None:
        print(f"rehearse: {message}", flush=True)

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
            self.attempts.append(attempt)
            fresh = self.job.buckets.ensure_mounted()
            if fresh and attempt.index > 1:
                self.say(f"attempt {attempt.index}: fresh bucket mounts (empty caches) on "
                         f"node(s) {','.join(map(str, fresh))}")
            self.say(
                f"attempt {attempt.index}: launching {self.job.recipe.num_nodes} node(s)"
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
        logs = self.job.workdir / "logs"
        self.nodes = [
            start_node(
                self.job, rank, self.job.node_script(rank, phase, script),
                logs / f"attempt{attempt.index}-node{rank}.log", self.pid_namespace,
            )
            for rank in range(self.job.recipe.num_nodes)
        ]
        fault: FaultRun | None = None
        try:
            while True:
                self.read_events(attempt)
                for node in self.nodes:
                    stream_log(node, attempt.index, self.out)
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
                time.sleep(POLL_SECONDS)
        finally:
            for node in self.nodes:
                node.kill()  # no-op for nodes that exited; never leave one behind
        self.read_events(attempt)
        for node in self.nodes:
            stream_log(node, attempt.index, self.out, final=True)
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
        self.job.buckets.lose_vm(rank)
        fault.lost.add(rank)
        fault.record["vm_lost"].append({"node": rank, "at": time.time()})

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
                location = self.job.buckets.bucket_key(0, str(event["path"]))
                if location is not None:
                    bucket, key = location
                    self.run_location = (bucket, key.rpartition("/")[0])
                    if event["event"] == "resumed":
                        attempt.resumed_key = f"{bucket}/{key}"

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


# ---------------------------------------------------------------------------------------------
# Verdict and summary


def find_problems(attempts: list[Attempt], backend: str) -> tuple[list[str], list[str]]:
    """(REGRESSION lines, CORRUPTION lines): every restart must resume from the newest
    checkpoint that survived the previous attempt (see the module docstring)."""
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


# ---------------------------------------------------------------------------------------------


def check_sources(recipe: Recipe) -> None:
    """Every local source in file_mounts exists (checked before anything is created)."""
    for spec in recipe.storage_mounts.values():
        for source in spec.sources:
            if not Path(source).expanduser().exists():
                raise BadInput(f"file_mounts source {source!r} for bucket {spec.bucket} does "
                               "not exist")
    for path, source in recipe.copy_mounts.items():
        if "://" not in source and not Path(source).expanduser().exists():
            raise BadInput(f"file_mounts source {source!r} for {path} does not exist")


def choose_storage(args: argparse.Namespace, recipe: Recipe) -> tuple[bool, str | None]:
    """(real buckets over FUSE?, the one line that says why not and how to get them).

    Without /dev/fuse or fusermount3 (a fresh machine: fuse3 is not installed by default)
    the rehearsal still runs, on plain directories; the line names what is missing and how
    to get it. BadInput only for what no fallback fixes (rclone missing, a bad bucket name).
    """
    if not recipe.storage_mounts:
        return False, None
    fallback = ("buckets are plain directories under WORKDIR/buckets shared by every node: no "
                "upload lag, and a lost VM loses nothing"
                + ("; --bwlimit has no effect" if args.bwlimit else ""))
    if args.no_fuse:
        return False, f"--no-fuse: {fallback}"
    ok, why = localstore.fuse_available(DEV_FUSE)
    if not ok:
        return False, f"no FUSE here: {why}; {fallback}"
    try:
        localstore.rclone_binary()
    except FileNotFoundError as err:
        raise BadInput(str(err)) from None
    for spec in recipe.storage_mounts.values():
        if not BUCKET_NAME.match(spec.bucket):
            raise BadInput(f"bucket name {spec.bucket!r} is not a valid S3 bucket name (3-63 "
                           "lowercase letters, digits, '.', '-')")
    return True, None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_attempts < 1 or args.grace < 0 or (args.gpus_per_node or 0) < 0:
            raise BadInput("--max-attempts must be >= 1, --grace and --gpus-per-node >= 0")
        if args.preempt_every is not None and args.preempt_every <= 0:
            raise BadInput("--preempt-every must be > 0")
        if args.notice_lead < 0:
            raise BadInput("--notice-lead must be >= 0")
        if args.bwlimit is not None and not BWLIMIT.match(args.bwlimit):
            raise BadInput(f"--bwlimit {args.bwlimit!r}: expected bytes/s like 512K, 2M or 1.5M")
        faults = parse_preempt_at(args.preempt_at, args.signal) if args.preempt_at else []
        kinds = {f.kind for f in faults} | ({args.signal} if args.preempt_every else set())
        if "notice" in kinds and args.cloud not in NOTICE_CLOUDS:
            raise BadInput(":notice faults need --cloud aws, gcp or azure (whose metadata "
                           "endpoint announces them)")
        recipe = load_recipe(
            Path(args.recipe),
            parse_key_values(args.env, "--env"),
            parse_key_values(args.secret, "--secret"),
        )
        for fault in faults:
            if fault.node is not None and fault.node >= recipe.num_nodes:
                raise BadInput(f"--preempt-at {fault.describe()}: no node {fault.node} (the "
                               f"recipe has {recipe.num_nodes} node(s), ranks from 0)")
        check_sources(recipe)
        fuse, note = choose_storage(args, recipe)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        workdir = (args.workdir or Path("runs") / f"rehearse-{recipe.path.stem}-{stamp}")
        workdir = workdir.resolve()
        (workdir / "events").mkdir(parents=True, exist_ok=True)
        buckets = Buckets(recipe, workdir, fuse=fuse, bwlimit=args.bwlimit, note=note)
    except BadInput as e:
        print(f"rehearse: error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("skyspot.localstore").setLevel(logging.WARNING)

    pid_namespace = not args.no_pid_namespace and pid_namespaces_work()
    if not pid_namespace and not args.no_pid_namespace:
        print("rehearse: unshare --pid unavailable; tracking each node's process tree with "
              "psutil instead (a process that leaves the tree survives a kill)", flush=True)
    metadata = ([metadata_server.FakeMetadata() for _ in range(recipe.num_nodes)]
                if args.cloud in NOTICE_CLOUDS else [])
    job = Job(
        recipe=recipe,
        workdir=workdir,
        buckets=buckets,
        job_id=random.randint(1, 99999),
        gpus_per_node=args.gpus_per_node if args.gpus_per_node is not None
        else recipe.gpus_per_node,
        cloud=args.cloud,
        controller_started=controller_timestamp(),
        cpu_only=not cuda_available(),
        metadata_urls=[server.url for server in metadata],
    )
    print(f"rehearse: {recipe.path} -> {workdir} (managed job id {job.job_id}, "
          f"{recipe.num_nodes} node(s), {job.gpus_per_node} GPU(s) each)", flush=True)
    rehearsal = Rehearsal(job, args, pid_namespace, metadata)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Interrupted()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    status, errors = "ERROR", []
    try:
        buckets.start()
        describe_storage(job)
        status = rehearsal.run()
    except (KeyboardInterrupt, Interrupted):
        rehearsal.kill_all()
        status = "INTERRUPTED"
        if rehearsal.attempts and rehearsal.attempts[-1].ended is None:
            rehearsal.attempts[-1].ended = time.time()
            rehearsal.attempts[-1].ending = "interrupted"
    except (StorageError, BadInput) as err:
        errors.append(str(err))
        status = "ERROR"
        if rehearsal.attempts and rehearsal.attempts[-1].ended is None:
            rehearsal.attempts[-1].ended = time.time()
            rehearsal.attempts[-1].ending = "error"
    finally:
        rehearsal.kill_all()
        try:
            # The final model must be in the bucket; anything else is not worth a wait.
            buckets.close(upload_timeout_s=60 if status == "SUCCEEDED" else 2)
        except StorageError as err:
            errors.append(f"cleaning up the local object store: {err}")
        for server in metadata:
            server.close()
        signal.signal(signal.SIGTERM, previous)

    for line in errors:
        print(f"rehearse: error: {line}", file=sys.stderr, flush=True)
    regressions, corruptions = find_problems(rehearsal.attempts,
                                             "fuse" if buckets.fuse else "plain")
    summary = summarize(rehearsal, status, regressions, corruptions)
    if errors:
        summary["ok"] = False
        summary["errors"] = errors
    (workdir / "rehearsal.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, rehearsal.started)
    print(f"rehearse: summary in {workdir / 'rehearsal.json'}")
    if status == "INTERRUPTED":
        return 130
    return 0 if summary["ok"] else 1


def describe_storage(job: Job) -> None:
    buckets = job.buckets
    if buckets.note:
        print(f"rehearse: {buckets.note}")
    elif buckets.store is not None:
        limit = f", uploads capped at {buckets.bwlimit}/s per mount" if buckets.bwlimit else ""
        print(f"rehearse: buckets {', '.join(buckets.buckets)} on a local S3 store (rclone serve "
              f"s3 at {buckets.store.endpoint}, objects in {buckets.data_dir}){limit}")
    for path, spec in job.recipe.storage_mounts.items():
        where = ", ".join(f"node{nm.rank} {nm.local}" for r in buckets.nodes
                          for nm in buckets.nodes[r] if nm.path == path)
        kind = spec.mode + (f" {spec.mount_type}" if spec.mount_type else "")
        print(f"rehearse: mount {path} ({spec.url}, {kind if buckets.fuse else 'plain'}) -> "
              f"{where}")
    for mount in buckets.copies:
        print(f"rehearse: copy {mount.path} ({mount.source}) -> {mount.local}")
    for key, value in job.recipe.envs.items():
        locals_ = {remap(value, buckets.mounts_for(r)) for r in buckets.nodes}
        if locals_ - {None}:
            shown = ", ".join(f"node{r} {remap(value, buckets.mounts_for(r))}"
                              for r in buckets.nodes) if len(locals_) > 1 else locals_.pop()
            print(f"rehearse: env {key}={value} -> {shown}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
