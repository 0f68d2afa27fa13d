"""One writer per run: an owner record in the run directory, with a heartbeat.

Guarantee: while a trainer holds a run's lease, a second trainer started on the same run
is refused before it writes anything, with one line naming the owner's host and pid. A
trainer that has lost the run (another took it over) never commits a checkpoint into it
and never deletes from it: ``skyspot.checkpoint`` calls ``check()`` before every commit
and every delete, and ``check()`` raises ``LeaseLost``.

Why a record and not a lock: object stores have no file locks, and on a bucket mount
``O_EXCL`` and rename are not atomic across nodes. So ``<run>/owner.json`` holds the
owner's identity and a wall-clock heartbeat, rewritten every ``heartbeat_s`` seconds.

Taking over, and why it is safe:

- A run with no record, or whose owner released it (a clean exit, an error exit, or a
  preemption exit after its last commit), is taken at once.
- An owner on this same machine and PID namespace (same boot id) whose process is gone is
  dead: taken at once. This is a relaunch after a crash or a ``kill -9`` on one VM.
- Otherwise (a lost VM, another node) the newcomer watches the record. If the heartbeat
  advances, the owner is alive: refused. If it does not advance and is older than
  ``ttl_s`` (default 10 s, five heartbeats), the owner is taken to be dead and the run
  is taken over. A managed job's recovery takes minutes to provision a new VM, so on a
  cloud this wait has always passed already; a rehearsal waits it out.
- Safety does not rest on that timeout. A live owner whose heartbeats were late (a
  saturated upload queue on a MOUNT_CACHED bucket) and was taken over finds the newcomer's
  record at its next commit or delete and stops there, committing and deleting nothing.
  The newcomer resumes from the newest checkpoint that verifies, as after any preemption.
- The record is read through the bucket itself on an rclone (MOUNT_CACHED) mount, never
  through the node's cache, so it reflects other nodes' writes; elsewhere through the file
  system. Heartbeats are written through the file system from a thread, so no subprocess
  starts while a checkpoint file is open (that would end its upload early on
  upload-on-close mounts).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from skyspot.checkpoint import CheckpointError
from skyspot.durability import RcloneRemoteView, mount_of, view_for

log = logging.getLogger("skyspot.lease")

OWNER = "owner.json"
HEARTBEAT_S = 2.0  # seconds between heartbeats: one small PUT each on a bucket (~$0.2/day)
TTL_S = 10.0  # seconds without a heartbeat before the owner is taken to be dead


class LeaseError(CheckpointError):
    """The run is owned by a live trainer: this one must not start."""


class LeaseLost(CheckpointError):
    """Another trainer took the run over: this one must stop without committing."""


@dataclass(frozen=True)
class Owner:
    id: str
    host: str
    pid: int
    boot_id: str  # same machine (containers share it)
    pid_ns: str  # same PID namespace: only then does ``pid`` name a process we can see
    started: float  # the process's start time (epoch s): a reused pid is another process
    claimed: float  # wall clock, epoch seconds
    heartbeat: float  # wall clock, epoch seconds
    ttl_s: float

    def describe(self) -> str:
        return f"host {self.host} pid {self.pid}"


def _machine() -> tuple[str, str]:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    return boot, pid_ns


def _process_alive(pid: int, started: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


class RunLease:
    """The lease of one run directory, held by this process (global rank 0)."""

    def __init__(self, run_dir: Path, *, ttl_s: float = TTL_S,
                 heartbeat_s: float = HEARTBEAT_S):
        if not heartbeat_s < ttl_s:
            raise ValueError("the heartbeat must come more often than the timeout")
        self.path = run_dir / OWNER
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        boot, pid_ns = _machine()
        now = time.time()
        self.me = Owner(id=f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}",
                        host=socket.gethostname(), pid=os.getpid(), boot_id=boot,
                        pid_ns=pid_ns, started=psutil.Process().create_time(), claimed=now,
                        heartbeat=now, ttl_s=ttl_s)
        view = view_for(run_dir)
        self._remote = view if isinstance(view, RcloneRemoteView) else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost_to: Owner | None = None
        self._first_unreadable: float | None = None
        # Where a rename is atomic (a local or network disk), a record is written to a
        # temporary name and renamed, so a kill never leaves a torn one; on a bucket mount
        # rename is copy+delete, and an object is published whole anyway.
        mount = mount_of(run_dir)
        self._atomic_rename = mount is None or not mount.fstype.startswith("fuse")

    # --- reading and writing the record --------------------------------------------

    def read(self, *, through_bucket: bool = True) -> Owner | None:
        """The current record, None if there is none. An unreadable one (empty or torn: a
        writer killed mid-write) is re-read for up to a second, then reported as an unknown
        owner whose heartbeat is the file's modification time, which stays put unless
        someone writes it again: it is taken over once that is older than the timeout."""
        for _ in range(10):
            raw = self._read_bytes(through_bucket)
            if raw is None:
                return None
            try:
                return Owner(**json.loads(raw))
            except (ValueError, TypeError):
                time.sleep(0.1)
        try:
            written = self.path.stat().st_mtime
        except OSError:
            written = self._first_unreadable = self._first_unreadable or time.time()
        return Owner(id=f"unreadable-{written}", host="unknown (unreadable owner.json)", pid=0,
                     boot_id="", pid_ns="", started=0, claimed=written, heartbeat=written,
                     ttl_s=self.ttl_s)

    def _read_bytes(self, through_bucket: bool) -> bytes | None:
        if through_bucket and self._remote is not None:
            try:
                out = subprocess.run([self._remote.rclone, "cat", self._remote.remote_path(
                    self.path)], capture_output=True, timeout=60)
            except (OSError, subprocess.SubprocessError) as err:
                log.warning("cannot read %s from the bucket (%s); reading the mount", self.path,
                            err)
            else:
                # rclone cat of a missing object prints nothing and exits 0, like an empty
                # one: only a listing tells them apart (a torn record is an empty object).
                if out.returncode == 0 and (out.stdout or self._listed_in_bucket()):
                    return out.stdout
                if out.returncode == 0 or b"not found" in out.stderr.lower():
                    return None
                log.warning("cannot read %s from the bucket (%s); reading the mount",
                            self.path, out.stderr.decode(errors="replace").strip()[-200:])
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def _listed_in_bucket(self) -> bool:
        try:
            out = subprocess.run([self._remote.rclone, "lsf", "--files-only", self._remote.
                                  remote_path(self.path.parent)], capture_output=True, text=True,
                                 timeout=60)
        except (OSError, subprocess.SubprocessError):
            return True  # unknown: an unreadable record, judged by its age
        return out.returncode != 0 or OWNER in out.stdout.splitlines()

    def _write(self, record: Owner) -> None:
        target = self.path.with_name(f".{OWNER}.{os.getpid()}") if self._atomic_rename else (
            self.path)
        with open(target, "w") as f:
            f.write(json.dumps(asdict(record), indent=1))
            f.flush()
            os.fsync(f.fileno())
        if target != self.path:
            os.replace(target, self.path)

    # --- the protocol -----------------------------------------------------------------

    def acquire(self) -> None:
        """Take the run, or raise LeaseError naming its live owner. Writes nothing unless
        the run is taken; may wait up to ``ttl_s`` to tell a dead owner from a live one."""
        current = self.read()
        if current is not None and current.id != self.me.id:
            self._wait_out(current)
        now = time.time()
        self.me = Owner(**{**asdict(self.me), "claimed": now, "heartbeat": now})
        self._write(self.me)
        self._confirm(previous=current)
        self._thread = threading.Thread(target=self._beat, name="skyspot-lease", daemon=True)
        self._thread.start()

    def _wait_out(self, seen: Owner) -> None:
        """Return once ``seen`` is known dead; raise LeaseError once it is known alive."""
        boot, pid_ns = _machine()
        if seen.boot_id == boot and seen.pid_ns == pid_ns and seen.boot_id and seen.pid_ns:
            if _process_alive(seen.pid, seen.started):
                raise LeaseError(self._refusal(seen, "its process is running on this machine"))
            log.info("taking over %s: its owner (%s) is no longer running", self.path.parent,
                     seen.describe())
            return
        age = time.time() - seen.heartbeat
        if age <= seen.ttl_s:
            log.info("%s is owned by %s (last heartbeat %.0fs ago): waiting up to %.0fs to see "
                     "whether it is alive", self.path.parent, seen.describe(), age,
                     seen.ttl_s - age)
        while time.time() - seen.heartbeat <= max(seen.ttl_s, self.ttl_s):
            time.sleep(min(1.0, self.heartbeat_s / 3))
            now_seen = self.read()
            if now_seen is None:
                return  # released meanwhile
            if now_seen.id != seen.id or now_seen.heartbeat != seen.heartbeat:
                raise LeaseError(self._refusal(now_seen, "its heartbeat is advancing"))
        log.warning("taking over %s from %s: no heartbeat for %.0fs (owner lost)",
                    self.path.parent, seen.describe(), time.time() - seen.heartbeat)

    def _refusal(self, owner: Owner, evidence: str) -> str:
        return (f"run {self.path.parent} is being written by another trainer ({owner.describe()}"
                f", {evidence}); not starting a second writer. Stop that one first, or use a "
                "new --run-name")

    def _confirm(self, previous: Owner | None) -> None:
        """Wait (up to 10 s) until the bucket holds our record; a different, newer record
        means another trainer claimed the run at the same moment, and it wins."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            seen = self.read()
            if seen is not None and seen.id == self.me.id:
                return
            if seen is not None and (previous is None or seen.id != previous.id):
                raise LeaseError(self._refusal(seen, "it claimed the run at the same time"))
            time.sleep(0.25)
        log.warning("%s: our owner record is not in the bucket after 10 s; going on",
                    self.path)

    def _beat(self) -> None:
        failures = 0
        while not self._stop.wait(self.heartbeat_s):
            try:
                # The file system's view: no subprocess here (see the module docstring).
                seen = self.read(through_bucket=False)
                if seen is not None and seen.id != self.me.id:
                    self.lost_to = seen
                    log.error("run %s was taken over by %s; stopping at the next checkpoint",
                              self.path.parent, seen.describe())
                    return
                self.me = Owner(**{**asdict(self.me), "heartbeat": time.time()})
                self._write(self.me)
            except OSError as err:  # a full disk must not kill training; the TTL covers it
                # Once: the save that hits the same disk reports it, in one line of its own.
                (log.debug if failures else log.warning)("lease heartbeat failed: %s", err)
                failures += 1

    def check(self) -> None:
        """Raise LeaseLost unless this process still owns the run."""
        seen = self.lost_to or self.read()
        if seen is None or seen.id != self.me.id:
            who = seen.describe() if seen is not None else "nobody (the record is gone)"
            raise LeaseLost(f"run {self.path.parent} is now owned by {who}: this trainer "
                            f"(pid {os.getpid()}) stops without committing or deleting anything")

    def release(self) -> None:
        """Stop the heartbeat and delete the record if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            try:
                seen = self.read()
                if seen is not None and seen.id == self.me.id:
                    self.path.unlink(missing_ok=True)
            except OSError as err:  # a full or read-only disk, already reported by the caller
                log.debug("could not release %s: %s (the next trainer waits %.0fs)",
                          self.path, err, self.ttl_s)
