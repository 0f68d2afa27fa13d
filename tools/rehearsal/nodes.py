"""The nodes of the job: what each node sees (``Job``: its envs, its script, its cwd) and how
it runs (``start_node``: a PID namespace, or a tracked process tree, per node, whose kill takes
the whole tree like a lost VM).
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import localstore
import psutil

from rehearsal.buckets import Buckets, remap
from rehearsal.recipe import Recipe

PR_SET_PDEATHSIG = 1
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
