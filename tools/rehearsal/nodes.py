"""The nodes of the job: what each node sees (``Job``: its envs, its home, its script, its
cwd) and how it runs (``start_node``).

Guarantees. Every node runs its ``run:``/``setup:`` as SkyPilot does: written to a file and
run by ``/bin/bash -i FILE`` (so ``~/.bashrc`` is sourced), with SkyPilot's environment, in a
``HOME`` of its own (``WORKDIR/nodes/<node>/home``, with a ``.bashrc`` that ``setup:`` may
append to; it survives restarts on the same VM and is emptied when the VM is lost).
Isolation, best first:

* ``vm``: the node is a VM of its own (vm.py, node_init.py): PID, mount, network and UTS
  namespaces, every ``file_mounts`` target at its literal path (``/checkpoint``,
  ``~/data``), the recipe's workdir at ``~/sky_workdir`` (the cwd, as on SkyPilot; a bind,
  so writes there reach the real workdir), an address on the rehearsal's bridge
  (``SKYPILOT_NODE_IPS``) and a hostname that resolves to it.
* ``pid``: a PID namespace per node; mount paths are rewritten in envs and ``~/`` targets are
  links in the node's home.
* ``none``: a tracked process tree per node (psutil), as ``pid`` otherwise.

Killing a node takes its whole tree, like a lost VM.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import getpass
import json
import os
import re
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

from rehearsal import vm
from rehearsal.buckets import Buckets, Mount, remap
from rehearsal.recipe import Recipe

PR_SET_PDEATHSIG = 1
CLOUDS = {  # --cloud -> what SkyPilot's str(cloud) reports, with a plausible region/zone
    "local": ("local", None, None),
    "aws": ("AWS", "us-east-1", "us-east-1a"),
    "gcp": ("GCP", "us-central1", "us-central1-a"),
    "azure": ("Azure", "eastus", None),
}


# The init of every node (PID 1 of its namespaces, or a subreaper without them).
NODE_INIT = Path(__file__).resolve().parent / "node_init.py"
ISOLATIONS = ("vm", "pid", "none")  # namespaces per node: all of them, PID only, none

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
    isolation: str = "none"  # see ISOLATIONS and the module docstring
    network: vm.Network | None = None  # the bridge, with isolation "vm"
    vm_base: int = 0  # index of this job's node 0 among every VM of the rehearsal (pools)
    prefix: str = ""  # "job<J>-" for a job of a pool: its node dirs, events files, hostnames
    job_rank: int = 0  # SKYPILOT_JOB_RANK: a pool's job index, 0 for a plain managed job
    num_jobs: int = 1  # SKYPILOT_NUM_JOBS
    # --gpus-per-attempt: GPUs per node of attempt 1, 2, ...; the last repeats. None: every
    # attempt gets gpus_per_node. Rehearsal.run sets gpus_per_node from it per attempt.
    gpus_per_attempt: list[int] | None = None

    def gpus_for_attempt(self, index: int) -> int:
        """SKYPILOT_NUM_GPUS_PER_NODE of attempt ``index`` (from 1)."""
        if not self.gpus_per_attempt:
            return self.gpus_per_node
        return self.gpus_per_attempt[min(index, len(self.gpus_per_attempt)) - 1]

    @property
    def task_id(self) -> str:
        return f"sky-managed-{self.controller_started}_{self.recipe.name}_{self.job_id}-0"

    def node_name(self, rank: int) -> str:
        return f"{self.prefix}node{rank}"

    def node_dir(self, rank: int) -> Path:
        return self.workdir / "nodes" / self.node_name(rank)

    def home(self, rank: int) -> Path:
        """The node's HOME: fresh on a new VM, with the .bashrc a fresh VM has."""
        home = self.node_dir(rank) / "home"
        if not home.is_dir():
            home.mkdir(parents=True)
            skel = Path("/etc/skel/.bashrc")
            (home / ".bashrc").write_text(skel.read_text() if skel.is_file() else "")
        return home

    def lose_vm(self, rank: int) -> None:
        """The node's VM is gone: its home with it (the next VM gets a fresh one)."""
        shutil.rmtree(self.node_dir(rank) / "home", ignore_errors=True)

    def ips(self) -> list[str]:
        if self.network is not None:
            return [self.network.address(self.vm_base + r) for r in range(self.recipe.num_nodes)]
        return node_ips(self.recipe.num_nodes)

    def node_path(self, rank: int, path: str) -> str:
        """A file_mounts target as the node sees it: ``~`` is the node's home."""
        if path == "~" or path.startswith("~/"):
            return str(self.home(rank)) + path[1:]
        return path

    def node_mounts(self, rank: int) -> list[Mount]:
        """Every file_mounts target of the node, at the path the node sees it."""
        return [dataclasses.replace(m, path=self.node_path(rank, m.path))
                for m in self.buckets.mounts_for(rank)]

    def binds(self, rank: int) -> list[tuple[str, Path]]:
        """(path inside the node, path here) for every file_mounts target, deepest last."""
        pairs = [(m.path, m.local) for m in self.node_mounts(rank)]
        return sorted(pairs, key=lambda pair: pair[0].count("/"))

    def host_path(self, rank: int, path: str) -> str:
        """Where a path the node reported (e.g. a checkpoint under /checkpoint) is here."""
        if self.isolation != "vm":
            return path
        return remap(os.path.normpath(path), self.node_mounts(rank)) or path

    def node_env(self, rank: int, phase: str = "run") -> dict[str, str]:
        """SkyPilot's environment for ``run:`` or ``setup:`` on node ``rank``. setup: gets
        SKYPILOT_SETUP_NODE_RANK/_NODE_IPS/_NUM_GPUS_PER_NODE in place of the run:-only
        SKYPILOT_NODE_RANK, _NODE_IPS and _NUM_GPUS_PER_NODE (cloud_vm_ray_backend._setup
        and task_codegen in SkyPilot 0.14.1)."""
        env = dict(os.environ)
        mounts = self.buckets.mounts_for(rank)
        for key, value in self.recipe.envs.items():
            # In a VM the mount paths are real; elsewhere they are rewritten to this node's.
            env[key] = value if self.isolation == "vm" else remap(value, mounts) or value
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
            "SKYPILOT_NODE_IPS": "\n".join(self.ips()),
            "SKYPILOT_TASK_IDS": self.task_id,
            "SKYPILOT_JOB_RANK": str(self.job_rank),
            "SKYPILOT_NUM_JOBS": str(self.num_jobs),
            "HOME": str(self.home(rank)),
            "SKYPILOT_NUM_NODES": str(self.recipe.num_nodes),
            "SKYPILOT_NUM_GPUS_PER_NODE": str(self.gpus_per_node),
            "SKYPILOT_CLUSTER_INFO": json.dumps({
                "cluster_name": f"{self.recipe.name}-{self.job_id}",
                "cloud": cloud,
                "region": region,
                "zone": zone,
            }),
            "SKYSPOT_EVENTS_FILE": str(self.workdir / "events" / f"{self.node_name(rank)}.jsonl"),
            "PATH": os.pathsep.join([*bins, env.get("PATH", "")]),
        })
        env["SKYPILOT_USER"] = env.get("SKYPILOT_USER") or getpass.getuser()
        if phase == "setup":
            env["SKYPILOT_SETUP_NODE_RANK"] = env.pop("SKYPILOT_NODE_RANK")
            env["SKYPILOT_SETUP_NODE_IPS"] = env.pop("SKYPILOT_NODE_IPS")
            env["SKYPILOT_SETUP_NUM_GPUS_PER_NODE"] = env.pop("SKYPILOT_NUM_GPUS_PER_NODE")
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
        """SkyPilot syncs the workdir to ~/sky_workdir and runs there; without one, ~."""
        if self.recipe.workdir is None:
            return self.home(rank)
        if self.isolation == "vm":
            return self.home(rank) / "sky_workdir"
        return self.recipe.workdir

    def prepare_home(self, rank: int) -> None:
        """Where each file_mounts target under ~ appears: a mount point made in the node's
        home (in a VM), or a link to this node's copy of it (without one)."""
        home = self.home(rank)
        targets = [*self.binds(rank)]
        if self.isolation == "vm" and self.recipe.workdir is not None:
            targets.append((str(home / "sky_workdir"), self.recipe.workdir))
        for inside, local in targets:
            path = Path(inside)
            if home not in path.parents:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            if self.isolation == "vm":
                if local.is_dir():
                    path.mkdir(exist_ok=True)
                elif not path.exists():
                    path.touch()
            elif not path.is_symlink():
                path.symlink_to(local)


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


def choose_isolation(wanted: str | None) -> tuple[str, str]:
    """(isolation, "" or why the nodes are less than VMs): ``wanted``, or the best here."""
    if wanted == "none":
        return "none", "--isolation none"
    if wanted in (None, "vm"):
        ok, why = vm.probe()
        if ok:
            return "vm", ""
    else:
        why = "--isolation pid"
    if pid_namespaces_work():
        return "pid", why
    return "none", f"{why}; unshare --pid unavailable too, so each node is a process tree " \
        "tracked with psutil (a process that leaves the tree survives a kill)"


def literal_mount_uses(recipe: Recipe) -> list[str]:
    """Absolute file_mounts targets that run: or setup: name literally (not through an env).
    Without a mount namespace they would be this machine's own paths."""
    text = f"{recipe.run}\n{recipe.setup or ''}"
    paths = [*recipe.storage_mounts, *recipe.copy_mounts]
    return [p for p in paths if p.startswith("/")
            and re.search(rf"(?<![\w/.-]){re.escape(p.rstrip('/'))}(?![\w.-])", text)]


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


def start_node(job: Job, rank: int, script: str, log: Path, name: str,
               phase: str = "run") -> Node:
    """Start one node running ``script`` (already with SkyPilot's additions) as ``phase``
    (run or setup); ``name`` names its script file, e.g. ``attempt2-run``. OSError if its
    VM cannot be made."""
    node_dir = job.node_dir(rank)
    (node_dir / "scripts").mkdir(parents=True, exist_ok=True)
    script_file = node_dir / "scripts" / f"{name}.sh"
    script_file.write_text(script if script.endswith("\n") else script + "\n")
    job.prepare_home(rank)
    config: dict = {"script": str(script_file), "cwd": str(job.node_cwd(rank))}
    command = [sys.executable, str(NODE_INIT), str(node_dir / "init.json")]
    names = None
    if job.isolation == "vm":
        assert job.network is not None
        names = job.network.reserve()
        address = job.network.address(job.vm_base + rank)
        hostname = job.node_name(rank)
        peers = {job.node_name(r): ip for r, ip in enumerate(job.ips())}
        binds = [*job.binds(rank),
                 ("/etc/hosts", vm.hosts_file(node_dir / "hosts", hostname, address, peers)),
                 ("/etc/resolv.conf", vm.resolv_file(node_dir / "resolv.conf"))]
        if job.recipe.workdir is not None:
            binds.append((str(job.node_cwd(rank)), job.recipe.workdir))
        config["vm"] = vm.vm_config(hostname=hostname, iface=names[1], address=address,
                                    gateway=job.network.gateway, root=node_dir / "root",
                                    binds=binds)
        command = [*vm.UNSHARE, *command]
    elif job.isolation == "pid":
        command = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", *command]
    (node_dir / "init.json").write_text(json.dumps(config, indent=1))
    log.parent.mkdir(parents=True, exist_ok=True)
    offset = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=job.node_dir(rank),  # node_init.py changes to the node's cwd
            env=job.node_env(rank, phase),
            start_new_session=True,  # Ctrl-C in the terminal is ours to handle, not the job's
            preexec_fn=_die_with_parent,
        )
    node = Node(rank, proc, log, job.isolation != "none", log_offset=offset)
    if names is not None:
        try:
            job.network.attach(proc.pid, names)
        except OSError:
            node.kill()
            raise
    return node


def stream_log(node: Node, attempt: int, out: TextIO | None, final: bool = False,
               tag: str = "") -> None:
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
            out.write(f"[{tag}a{attempt}/n{node.rank}] {line.decode(errors='replace')}\n")
        out.flush()
