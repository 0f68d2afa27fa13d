"""Rehearse a SkyPilot recipe locally, the way a managed spot job runs it, with preemptions.

    python tools/rehearse.py recipes/train.yaml --gpus-per-node 1 --preempt-at step:20,45s:kill

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
* Buckets in ``file_mounts`` become directories under ``WORKDIR/buckets/`` (see ``bucket_dir``);
  envs that point into a mount path are rewritten to the directory.
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

Goodput: ``final step / optimizer steps executed across all attempts`` (steps executed in an
attempt = last step seen - step it resumed from). The wall-time version is
``final step * median seconds per step / wall seconds from first launch to the end``.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import json
import math
import os
import random
import re
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

POLL_SECONDS = 0.05
PR_SET_PDEATHSIG = 1
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
CLOUDS = {  # --cloud -> what SkyPilot's str(cloud) reports, with a plausible region/zone
    "local": ("local", None, None),
    "aws": ("AWS", "us-east-1", "us-east-1a"),
    "gcp": ("GCP", "us-central1", "us-central1-a"),
    "azure": ("Azure", "eastus", None),
}

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


class BadInput(Exception):
    """A user error: printed as one line, exit code 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM to the rehearsal itself."""


# ---------------------------------------------------------------------------------------------
# Command line


@dataclass(frozen=True)
class Preemption:
    trigger: str  # "time" or "step"
    at: float  # seconds after the attempt started, or the training step
    signal: str  # "term" or "kill"

    def describe(self) -> str:
        where = f"{self.at:g}s" if self.trigger == "time" else f"step:{int(self.at)}"
        return f"{where}:{self.signal}"


def parse_preempt_at(text: str, default_signal: str) -> list[Preemption]:
    items = []
    for item in (part.strip() for part in text.split(",")):
        parts = item.split(":")
        sig = default_signal
        if parts[-1] in ("term", "kill"):
            sig = parts.pop()
        if len(parts) == 2 and parts[0] == "step" and parts[1].isdigit():
            items.append(Preemption("step", int(parts[1]), sig))
        elif len(parts) == 1 and re.fullmatch(r"\d+(\.\d+)?s", parts[0]):
            items.append(Preemption("time", float(parts[0][:-1]), sig))
        else:
            raise BadInput(
                f"bad --preempt-at item {item!r}: expected <seconds>s or step:<N>, "
                "optionally with :term or :kill (e.g. 30s,step:100:kill)"
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
        description="Run a SkyPilot recipe locally as a managed spot job would, with injected\n"
        "preemptions, and check that every recovery resumes from the newest checkpoint.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n"
        "  python tools/rehearse.py recipes/train.yaml --gpus-per-node 1 \\\n"
        "      --env MAX_STEPS=60 --preempt-at step:20,45s:kill --grace 10\n\n"
        "exit code: 0 if the job SUCCEEDED and no resume regression was seen, 1 otherwise,\n"
        "2 for bad input, 130 when interrupted. Summary: WORKDIR/rehearsal.json.",
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
                        help="comma list of <seconds>s or step:<N>, each optionally :term or "
                        ":kill; one per attempt, in order")
    parser.add_argument("--preempt-every", type=float, metavar="SECONDS",
                        help="preempt every attempt this long after it starts (after the "
                        "--preempt-at items are used up)")
    parser.add_argument("--signal", choices=("term", "kill"), default="term",
                        help="default preemption kind: SIGTERM then SIGKILL after --grace, or "
                        "SIGKILL at once (default term)")
    parser.add_argument("--grace", type=float, default=30.0, metavar="SECONDS",
                        help="seconds between SIGTERM and SIGKILL (default 30)")
    parser.add_argument("--max-attempts", type=int, default=20, metavar="N",
                        help="stop after this many attempts (default 20)")
    parser.add_argument("--controller-restart-every", type=int, default=2, metavar="K",
                        help="new controller timestamp in SKYPILOT_TASK_ID on every K-th "
                        "restart (default 2; 0 never)")
    parser.add_argument("--cloud", choices=sorted(CLOUDS), default="local",
                        help="cloud reported in SKYPILOT_CLUSTER_INFO (default local)")
    parser.add_argument("--run-setup", action="store_true",
                        help="run the recipe's setup on every node before each attempt")
    parser.add_argument("--no-pid-namespace", action="store_true",
                        help="track process trees with psutil instead of unshare")
    parser.add_argument("--quiet", action="store_true", help="do not stream node logs")
    return parser


# ---------------------------------------------------------------------------------------------
# The recipe, as SkyPilot reads it


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
    max_restarts_on_errors: int
    recover_on_exit_codes: list[int]
    storage_mounts: dict[str, tuple[str, str, list[str]]]  # path -> (store, bucket, sources)
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
    max_restarts, recover_codes = 0, []
    if isinstance(recovery, dict):
        max_restarts = int(recovery.get("max_restarts_on_errors", 0) or 0)
        codes = recovery.get("recover_on_exit_codes")
        recover_codes = [codes] if isinstance(codes, int) else [int(c) for c in codes or []]
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
        bucket = obj.name
        if not bucket and "://" in sources[0]:
            bucket = sources[0].split("://", 1)[1].split("/", 1)[0]
        storage[mount_path] = (store_name, bucket or "bucket", [s for s in sources if s])
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
        max_restarts_on_errors=max_restarts,
        recover_on_exit_codes=recover_codes,
        storage_mounts=storage,
        copy_mounts=dict(task.file_mounts or {}),
    )


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 400 else text[:400] + "..."


# ---------------------------------------------------------------------------------------------
# Mounts: buckets become local directories


@dataclass(frozen=True)
class Mount:
    path: str  # where the recipe sees it, e.g. /checkpoints
    source: str  # what SkyPilot would mount or copy, e.g. s3://my-bucket
    local: Path  # where the rehearsal puts it


def bucket_dir(workdir: Path, store: str, bucket: str) -> Path:
    """Where a bucket lives during a rehearsal.

    The one place to swap in a local S3 server with a FUSE mount; everything else only sees
    the returned directory.
    """
    del store  # every store is a plain directory for now
    return workdir / "buckets" / bucket


def map_mounts(recipe: Recipe, workdir: Path) -> list[Mount]:
    mounts = []
    for path, (store, bucket, sources) in recipe.storage_mounts.items():
        local = bucket_dir(workdir, store, bucket)
        sub = ""
        if sources and "://" in sources[0]:
            sub = sources[0].split("://", 1)[1].partition("/")[2]
        local = local / sub if sub else local
        local.mkdir(parents=True, exist_ok=True)
        for source in sources:  # a local source is uploaded to the bucket before launch
            if "://" not in source and Path(source).expanduser().exists():
                copy_into(Path(source).expanduser(), local)
        mounts.append(Mount(path, f"{store}://{bucket}/{sub}".rstrip("/"), local))
    for path, source in recipe.copy_mounts.items():
        if "://" in source:  # COPY mode of a bucket: the files land on every node
            scheme, _, rest = source.partition("://")
            bucket, _, sub = rest.partition("/")
            local = bucket_dir(workdir, scheme, bucket) / sub
            local.mkdir(parents=True, exist_ok=True)
        else:  # a local file or directory is copied to the node; copy it once
            local = workdir / "files" / path.strip("/").replace("/", "_").replace("~", "home")
            src = Path(source).expanduser()
            if not src.exists():
                raise BadInput(f"file_mounts source {source!r} for {path} does not exist")
            copy_into(src, local)
        mounts.append(Mount(path, source, local))
    return mounts


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
    mounts: list[Mount]
    job_id: int
    gpus_per_node: int
    cloud: str
    controller_started: str  # timestamp in SKYPILOT_TASK_ID; changes on a controller restart
    cpu_only: bool

    @property
    def task_id(self) -> str:
        return f"sky-managed-{self.controller_started}_{self.recipe.name}_{self.job_id}-0"

    def node_env(self, rank: int) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in self.recipe.envs.items():
            env[key] = remap(value, self.mounts) or value
        env.update(self.recipe.secrets)
        cloud, region, zone = CLOUDS[self.cloud]
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
            "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        })
        if self.cpu_only:
            env.setdefault("ACCELERATE_USE_CPU", "1")
        return env

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


def event_step(event: dict) -> int | None:
    step = event.get("step")
    return int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else None


# ---------------------------------------------------------------------------------------------
# Attempts


@dataclass
class Attempt:
    index: int
    task_id: str
    started: float
    ended: float | None = None
    ending: str = ""  # "preempted:term", "preempted:kill", "exited", "failed", "failed_setup"
    preempt_plan: str | None = None
    exit_codes: list[int] = field(default_factory=list)
    run_name: str | None = None
    resumed_from: int | None = None  # step it started at (0 when fresh); None if unknown
    resumed_path: str | None = None
    last_step: int | None = None
    first_step_at: float | None = None
    seconds_to_first_step: float | None = None
    steps_lost: int | None = None  # filled once the next attempt reports where it resumed
    checkpoints: list[dict] = field(default_factory=list)
    step_times: list[tuple[int, float]] = field(default_factory=list)
    decision: str = ""  # what the controller did next

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
            })
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
    ending: str  # "exited", "failed", "preempted:term", "preempted:kill"
    exit_codes: list[int]


class Rehearsal:
    def __init__(self, job: Job, args: argparse.Namespace, pid_namespace: bool) -> None:
        self.job = job
        self.args = args
        self.pid_namespace = pid_namespace
        self.plans = parse_preempt_at(args.preempt_at, args.signal) if args.preempt_at else []
        self.out: TextIO | None = None if args.quiet else sys.stdout
        self.events = EventTail(job.workdir / "events" / "node0.jsonl")
        self.nodes: list[Node] = []
        self.attempts: list[Attempt] = []
        self.policy = RecoveryPolicy(
            job.recipe.max_restarts_on_errors, job.recipe.recover_on_exit_codes
        )
        self.started = time.time()

    def say(self, message: str) -> None:
        print(f"rehearse: {message}", flush=True)

    def next_plan(self) -> Preemption | None:
        if self.plans:
            return self.plans.pop(0)
        if self.args.preempt_every:
            return Preemption("time", self.args.preempt_every, self.args.signal)
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
            self.say(
                f"attempt {attempt.index}: launching {self.job.recipe.num_nodes} node(s)"
                + (f", preemption at {plan.describe()}" if plan else "")
            )
            result = None
            if self.args.run_setup and self.job.recipe.setup:
                result = self.run_phase(attempt, "setup", self.job.recipe.setup, plan)
                if result.ending == "failed":
                    result.ending = "failed_setup"
            if result is None or result.ending == "exited":
                result = self.run_phase(attempt, "run", self.job.recipe.run, plan)
            attempt.ended, attempt.ending = time.time(), result.ending
            attempt.exit_codes = result.exit_codes
            self.say(f"attempt {attempt.index}: {result.ending}, exit codes {result.exit_codes}")

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

    def run_phase(
        self, attempt: Attempt, phase: str, script: str, plan: Preemption | None
    ) -> PhaseResult:
        logs = self.job.workdir / "logs"
        self.nodes = [
            start_node(
                self.job, rank, script, logs / f"attempt{attempt.index}-node{rank}.log",
                self.pid_namespace,
            )
            for rank in range(self.job.recipe.num_nodes)
        ]
        preempted: str | None = None
        deadline = math.inf  # SIGKILL after the grace period
        try:
            while True:
                step_reached = self.read_events(attempt)
                for node in self.nodes:
                    stream_log(node, attempt.index, self.out)
                codes = [node.exit_code for node in self.nodes]
                if all(code is not None for code in codes):
                    break
                if preempted is None and any(code not in (None, 0) for code in codes):
                    # One node failed: SkyPilot cancels the rest (reported as 137).
                    for node in self.nodes:
                        if node.exit_code is None:
                            node.kill()
                    break
                if preempted is None and plan is not None and self.due(
                    plan, attempt, step_reached
                ):
                    preempted = plan.signal
                    self.say(f"attempt {attempt.index}: preempting ({plan.describe()}, {phase})")
                    if plan.signal == "kill":
                        for node in self.nodes:
                            node.kill()
                        continue
                    for node in self.nodes:
                        node.terminate()
                    deadline = time.time() + self.args.grace
                if time.time() >= deadline:
                    self.say(f"attempt {attempt.index}: grace period over, SIGKILL")
                    for node in self.nodes:
                        node.kill()
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
        if preempted:
            return PhaseResult(f"preempted:{preempted}", codes)
        return PhaseResult("exited" if not any(codes) else "failed", codes)

    def read_events(self, attempt: Attempt) -> int | None:
        """Feed new node-0 events to the attempt; returns the highest step among them."""
        highest = None
        for event in self.events.read():
            attempt.observe(event)
            step = event_step(event)
            if event["event"] in ("step", "log") and step is not None:
                highest = step if highest is None else max(highest, step)
        return highest

    def due(self, plan: Preemption, attempt: Attempt, step_reached: int | None) -> bool:
        if plan.trigger == "time":
            return time.time() - attempt.started >= plan.at
        return step_reached is not None and step_reached >= plan.at

    def kill_all(self) -> None:
        for node in self.nodes:
            node.kill()
        self.nodes = []


# ---------------------------------------------------------------------------------------------
# Verdict and summary


def find_regressions(attempts: list[Attempt]) -> list[str]:
    """A restart must resume from the newest checkpoint committed before the previous attempt
    ended. Only checkpoints with an event count: a save cut by SIGKILL never committed."""
    problems = []
    committed: int | None = None  # step of the newest checkpoint event so far
    for prev, nxt in zip(attempts, attempts[1:], strict=False):
        if prev.checkpoints:
            committed = prev.checkpoints[-1]["step"]
        if committed is None or nxt.resumed_from is None:
            continue  # nothing to resume from yet, or the next attempt never said where it began
        if nxt.resumed_from < committed:
            how = f"resumed from step {nxt.resumed_from}"
            if nxt.resumed_path is None:
                how = f"started fresh at step {nxt.resumed_from}"
            problems.append(
                f"REGRESSION: attempt {nxt.index} {how}, but checkpoint step {committed} was "
                f"committed before attempt {prev.index} ended ({prev.ending}); "
                f"run name {prev.run_name!r} -> {nxt.run_name!r}"
            )
    return problems


def summarize(rehearsal: Rehearsal, status: str, regressions: list[str]) -> dict:
    attempts = rehearsal.attempts
    for prev, nxt in zip(attempts, attempts[1:], strict=False):
        if prev.last_step is not None and nxt.resumed_from is not None:
            prev.steps_lost = prev.last_step - nxt.resumed_from
    checkpoints = [c for a in attempts for c in a.checkpoints]
    seconds = [c["seconds"] for c in checkpoints if isinstance(c["seconds"], (int, float))]
    sizes = [c["bytes"] for c in checkpoints if isinstance(c["bytes"], (int, float))]
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
    preemptions = {"term": 0, "kill": 0}
    for a in attempts:
        if a.ending.startswith("preempted:"):
            preemptions[a.ending.split(":")[1]] += 1
    return {
        "recipe": str(rehearsal.job.recipe.path),
        "workdir": str(rehearsal.job.workdir),
        "status": status,
        "ok": status == "SUCCEEDED" and not regressions,
        "regressions": regressions,
        "managed_job_id": rehearsal.job.job_id,
        "num_nodes": rehearsal.job.recipe.num_nodes,
        "pid_namespaces": rehearsal.pid_namespace,
        "mounts": {m.path: str(m.local) for m in rehearsal.job.mounts},
        "job_recovery": {
            "max_restarts_on_errors": rehearsal.policy.max_restarts_on_errors,
            "recover_on_exit_codes": rehearsal.policy.recover_on_exit_codes,
            "restart_cnt_on_failure": rehearsal.policy.restart_cnt_on_failure,
        },
        "attempts": [
            {k: v for k, v in dataclasses.asdict(a).items() if k != "step_times"}
            for a in attempts
        ],
        "totals": {
            "attempts": len(attempts),
            "preemptions": preemptions,
            "checkpoints": {
                "count": len(checkpoints),
                "mean_seconds": round(statistics.mean(seconds), 4) if seconds else None,
                "mean_bytes": round(statistics.mean(sizes)) if sizes else None,
            },
            "final_step": final_step,
            "steps_executed": executed,
            "steps_lost": sum(a.steps_lost or 0 for a in attempts),
            "goodput": round(final_step / executed, 4) if final_step and executed else None,
            "wall_seconds": round(wall, 3),
            "wall_goodput": wall_goodput,
        },
    }


def print_summary(summary: dict, t0: float) -> None:
    def fmt(value: Any, suffix: str = "") -> str:
        return "-" if value is None else f"{value}{suffix}"

    header = ("#", "start", "end", "ended", "exit codes", "resumed", "last", "lost", "1st step")
    rows = [header]
    for a in summary["attempts"]:
        rows.append((
            str(a["index"]),
            f"+{a['started'] - t0:.1f}s",
            f"+{a['ended'] - t0:.1f}s" if a["ended"] else "-",
            a["ending"],
            ",".join(map(str, a["exit_codes"])) or "-",
            fmt(a["resumed_from"]),
            fmt(a["last_step"]),
            fmt(a["steps_lost"]),
            fmt(a["seconds_to_first_step"], "s"),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print()
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    t = summary["totals"]
    ck = t["checkpoints"]
    print(
        f"\nattempts {t['attempts']}, preemptions term={t['preemptions']['term']} "
        f"kill={t['preemptions']['kill']}, checkpoints {ck['count']} "
        f"(mean {fmt(ck['mean_seconds'], 's')}, {fmt(ck['mean_bytes'], ' bytes')})"
    )
    print(
        f"final step {fmt(t['final_step'])}, steps executed {t['steps_executed']}, "
        f"lost {t['steps_lost']}, goodput {fmt(t['goodput'])} (steps), "
        f"{fmt(t['wall_goodput'])} (wall, {t['wall_seconds']}s)"
    )
    for line in summary["regressions"]:
        print(line)
    print(f"status: {summary['status']}" + ("" if summary["ok"] else "  -> rehearsal FAILED"))


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_attempts < 1 or args.grace < 0 or (args.gpus_per_node or 0) < 0:
            raise BadInput("--max-attempts must be >= 1, --grace and --gpus-per-node >= 0")
        if args.preempt_every is not None and args.preempt_every <= 0:
            raise BadInput("--preempt-every must be > 0")
        if args.preempt_at:
            parse_preempt_at(args.preempt_at, args.signal)
        recipe = load_recipe(
            Path(args.recipe),
            parse_key_values(args.env, "--env"),
            parse_key_values(args.secret, "--secret"),
        )
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        workdir = (args.workdir or Path("runs") / f"rehearse-{recipe.path.stem}-{stamp}")
        workdir = workdir.resolve()
        (workdir / "events").mkdir(parents=True, exist_ok=True)
        mounts = map_mounts(recipe, workdir)
    except BadInput as e:
        print(f"rehearse: error: {e}", file=sys.stderr)
        return 2

    pid_namespace = not args.no_pid_namespace and pid_namespaces_work()
    if not pid_namespace and not args.no_pid_namespace:
        print("rehearse: unshare --pid unavailable; tracking each node's process tree with "
              "psutil instead (a process that leaves the tree survives a kill)", flush=True)
    job = Job(
        recipe=recipe,
        workdir=workdir,
        mounts=mounts,
        job_id=random.randint(1, 99999),
        gpus_per_node=args.gpus_per_node if args.gpus_per_node is not None
        else recipe.gpus_per_node,
        cloud=args.cloud,
        controller_started=controller_timestamp(),
        cpu_only=not cuda_available(),
    )
    print(f"rehearse: {recipe.path} -> {workdir} (managed job id {job.job_id}, "
          f"{recipe.num_nodes} node(s), {job.gpus_per_node} GPU(s) each)")
    for mount in mounts:
        print(f"rehearse: mount {mount.path} ({mount.source}) -> {mount.local}")
    for key, value in recipe.envs.items():
        local = remap(value, mounts)
        if local:
            print(f"rehearse: env {key}={value} -> {local}")
    sys.stdout.flush()

    rehearsal = Rehearsal(job, args, pid_namespace)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Interrupted()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        status = rehearsal.run()
    except (KeyboardInterrupt, Interrupted):
        rehearsal.kill_all()
        status = "INTERRUPTED"
        if rehearsal.attempts and rehearsal.attempts[-1].ended is None:
            rehearsal.attempts[-1].ended = time.time()
            rehearsal.attempts[-1].ending = "interrupted"
    finally:
        rehearsal.kill_all()
        signal.signal(signal.SIGTERM, previous)

    regressions = find_regressions(rehearsal.attempts)
    summary = summarize(rehearsal, status, regressions)
    (workdir / "rehearsal.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, rehearsal.started)
    print(f"rehearse: summary in {workdir / 'rehearsal.json'}")
    if status == "INTERRUPTED":
        return 130
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
