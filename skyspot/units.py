"""Exactly-once outputs of work units in a bucket, shared by workers that may die anywhere.

Guarantee: at every instant, ``<output>/data/part-<unit>.parquet`` (``data/*.parquet``,
listed through the S3 API or a fresh mount of the bucket) holds each committed unit at most
once and never a partial file; when ``manifest.json`` exists every unit is in the bucket
exactly once, whole, with the same bytes whichever worker wrote it, however many workers
ran and however often they were killed. A worker that exits 0 has seen ``manifest.json``
written (by itself or another) or found it already there.

How, and why each rule exists:

- **Units.** The input (a list of sources, each a file or a dataset, with its row count) is
  cut into units of ``unit_rows`` consecutive rows of one source (``plan_units``): the cut
  depends on the input and the unit size only, never on the number of workers, so a unit's
  identity (``part-00042``) is the same in every worker and on every recovery. Nothing is
  keyed on ``SKYPILOT_TASK_ID``, whose embedded controller start time changes when the jobs
  controller restarts: units keyed on it are orphaned by a restart. ``plan.json`` records
  the plan; a worker whose input gives another plan is refused before it writes anything.
- **Deterministic bytes.** A unit's output depends on its rows alone (the work function's
  contract: no timestamps, no worker ids, no dependence on the number of processes), so
  two workers that both finish a unit commit identical objects and a double commit is
  harmless. That is what makes work stealing safe without any coordination.
- **Commit = rename of a complete file.** A unit is written to ``_tmp/part-<unit>.parquet.
  <worker>.tmp``, flushed, fsynced and closed, then renamed to ``data/part-<unit>.parquet``.
  Only complete files ever carry a ``data/*.parquet`` name. A process killed mid-write on a
  live VM leaves its temporary file, which the kernel closes and a MOUNT_CACHED mount then
  uploads, under a ``_tmp`` name that no glob of ``data/*.parquet`` matches. On a bucket a
  rename is a server-side copy then a delete (rclone, goofys, gcsfuse): an object store
  publishes an object whole, so the final name appears whole or not at all; a kill between
  the copy and the delete leaves a stray temporary object, never a partial final one. On a
  MOUNT_CACHED mount a file renamed before its upload finished is uploaded under its new
  name; on local disk ``rename(2)`` is atomic.
- **Done means in the bucket.** A committed unit counts as done only once the bucket itself
  lists it at its full size (``skyspot.durability``: the remote behind an rclone mount,
  not the node's cache). A worker waits for its own commits before it exits; units
  committed on a VM that was lost before they uploaded are missing from the bucket and are
  redone, by their owner on recovery or by any worker that runs out of its own work.
- **Skip and redo.** On start a worker skips the units the bucket (or its own mount) lists
  and redoes the rest; its own leftover temporary files (same worker rank) are removed.
  Temporary files are never counted. The worker that writes ``manifest.json`` removes every
  remaining temporary file: by then no unit needs one.
- **Fan-out.** Worker ``rank`` of ``num_workers`` (``SKYPILOT_JOB_RANK``/``SKYPILOT_NUM_JOBS``
  of a pool, or ``--shard-index``/``--num-shards``) owns a contiguous share of the units
  and does it front to back. When its share is done it takes the others' uncommitted units
  from the back of their shares, so it rarely collides with their owners.
- **Completion.** When the bucket lists every unit, any worker writes ``manifest.json``
  (every part with its rows, bytes and the work function's per-unit stats, plus the
  workload's summary) to a temporary name and renames it into place. Its content depends
  only on the parts, so two workers writing it write the same object.
- **Preemption.** ``stop()`` is checked between units: once it is true no unit is started,
  the ones in flight finish and are committed (size units to take seconds, well inside a
  30 s notice), and the run returns ``preempted``. A work function that runs in this
  process (``num_proc=1``: a model on a GPU) may check ``stop()`` itself between batches
  and raise ``Abandoned``: that unit is not committed (its temporary file is removed) and
  is redone later, so a long unit need not outlast the notice.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from skyspot import durability

log = logging.getLogger("skyspot.units")

FORMAT = "skyspot.units/1"
DATA, TMP, WORKERS = "data", "_tmp", "_workers"
PLAN, MANIFEST = "plan.json", "manifest.json"
STATS_KEY = b"skyspot.unit"  # Parquet key-value metadata: the unit's stats, as JSON
PART_NAME = re.compile(r"^part-(\d{5,})\.parquet$")
_LIST_EVERY_S = 5.0  # how stale the listing of committed units may get while stealing
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class UnitsError(Exception):
    """Bad input or an output dir that belongs to other input: one line, nothing deleted."""


@dataclass(frozen=True)
class Unit:
    """Rows [start, stop) of source ``source`` (the index into the plan's sources)."""

    index: int
    source: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_units(sources: list[tuple[str, int]], unit_rows: int) -> list[Unit]:
    """Cut each (name, rows) source into units of ``unit_rows`` rows, in order; a source's
    last unit may be shorter. An empty source gives no unit."""
    if unit_rows < 1:
        raise UnitsError(f"unit size must be at least 1 row (got {unit_rows})")
    units: list[Unit] = []
    for number, (_, rows) in enumerate(sources):
        for start in range(0, rows, unit_rows):
            units.append(Unit(len(units), number, start, min(rows, start + unit_rows)))
    return units


@dataclass(frozen=True)
class Worker:
    """Which share of the units this process owns."""

    rank: int = 0
    num_workers: int = 1

    @property
    def label(self) -> str:
        return f"w{self.rank}"


def worker_from(shard_index: int | None, num_shards: int | None,
                environ: dict[str, str] | None = None) -> Worker:
    """--shard-index/--num-shards if given, else a pool's SKYPILOT_JOB_RANK/SKYPILOT_NUM_JOBS
    (set by ``sky jobs launch --pool P --num-jobs N``), else the only worker."""
    env = os.environ if environ is None else environ
    if (shard_index is None) != (num_shards is None):
        raise UnitsError("--shard-index and --num-shards go together (e.g. --shard-index 0 "
                         "--num-shards 4)")
    if shard_index is None:
        try:
            shard_index = int(env.get("SKYPILOT_JOB_RANK") or 0)
            num_shards = int(env.get("SKYPILOT_NUM_JOBS") or 1)
        except ValueError as err:
            raise UnitsError(f"SKYPILOT_JOB_RANK/SKYPILOT_NUM_JOBS are not integers ({err})"
                             ) from err
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise UnitsError(f"shard {shard_index} of {num_shards}: need 0 <= index < count")
    return Worker(shard_index, num_shards)


def share(n_units: int, worker: Worker) -> range:
    """The contiguous run of units that ``worker`` owns."""
    return range(worker.rank * n_units // worker.num_workers,
                 (worker.rank + 1) * n_units // worker.num_workers)


def work_order(n_units: int, worker: Worker) -> list[int]:
    """This worker's own share front to back, then each other share (next ranks first, so
    two idle workers spread out) from the back, where its owner gets to last."""
    order = list(share(n_units, worker))
    for offset in range(1, worker.num_workers):
        other = Worker((worker.rank + offset) % worker.num_workers, worker.num_workers)
        order.extend(reversed(share(n_units, other)))
    return order


class Output:
    """One output directory: its plan, its committed parts, its temporary files."""

    def __init__(self, root: Path, worker: Worker = Worker()):
        self.root, self.worker = Path(root), worker
        self.data, self.tmp = self.root / DATA, self.root / TMP
        self._view = None

    # ---------------------------------------------------------------- plan and listing
    def ensure_plan(self, plan: dict) -> None:
        """Write plan.json, or check that the one there is this plan: an output dir is for
        one input, unit size and settings. Refused in one line before anything is written."""
        path = self.root / PLAN
        plan = {"format": FORMAT, **plan}
        if path.exists():
            try:
                recorded = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise UnitsError(f"{path}: unreadable ({err}); move the output dir aside or "
                                 "use a new --output-dir") from err
            if recorded != plan:
                diff = [key for key in sorted(set(plan) | set(recorded))
                        if plan.get(key) != recorded.get(key)]
                raise UnitsError(f"--output-dir {self.root} holds the output of other input or "
                                 f"settings (plan.json differs in: {', '.join(diff)}); use a "
                                 "new --output-dir, or the same input and settings as before")
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_whole(path, json.dumps(plan, indent=1, sort_keys=True) + "\n")

    def committed(self) -> dict[int, int]:
        """unit index -> size of every ``data/part-*.parquet`` this node sees: the bucket's
        own listing where the mount has one, plus what the mount shows (its cache)."""
        seen: dict[int, int] = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.data):
                match = PART_NAME.match(entry.name)
                if match and entry.is_file(follow_symlinks=False):
                    seen[int(match[1])] = entry.stat(follow_symlinks=False).st_size
        for name, size in (self.in_bucket() or {}).items():
            match = PART_NAME.match(name)
            if match:
                seen.setdefault(int(match[1]), size)
        return seen

    def in_bucket(self) -> dict[str, int] | None:
        """name -> size of the parts the bucket itself holds, where that can be read apart
        from this node's cache (an rclone mount); None where a closed file is in the bucket
        (local disk, upload-on-close mounts)."""
        view = self.view()
        if not isinstance(view, durability.RcloneRemoteView):
            return None
        return view.list_sizes(self.data) or {}

    def view(self):
        if self._view is None:
            self.data.mkdir(parents=True, exist_ok=True)
            self._view = durability.view_for(self.data)
        return self._view

    def durable(self, parts: dict[int, int]) -> set[int]:
        """The units among ``parts`` (index -> size) that the bucket holds at that size."""
        listed = self.in_bucket()
        if listed is None:
            return set(parts)
        return {index for index, size in parts.items()
                if listed.get(f"part-{index:05d}.parquet") == size}

    def file_durable(self, path: Path) -> bool:
        """Whether the bucket holds ``path`` (a file directly under the output dir) whole."""
        view = self.view()
        if not isinstance(view, durability.RcloneRemoteView):
            return True
        listed = view.list_sizes(self.root) or {}
        return listed.get(path.name) == path.stat().st_size

    # ---------------------------------------------------------------- writing
    def temp_for(self, unit: Unit) -> Path:
        self.tmp.mkdir(parents=True, exist_ok=True)
        return self.tmp / f"{unit.name}.parquet.{self.worker.label}-{os.getpid()}.tmp"

    def commit(self, unit: Unit, temp: Path) -> int:
        """Publish the complete file ``temp`` as ``data/part-<unit>.parquet``; its size.
        A unit another worker committed first is left as it is: same bytes."""
        final = self.data / f"{unit.name}.parquet"
        size = temp.stat().st_size
        if final.exists() and final.stat().st_size == size:
            temp.unlink(missing_ok=True)
            return size
        os.replace(temp, final)
        return size

    def remove_temps(self, everyone: bool = False) -> int:
        """Remove this worker rank's temporary files (left by its killed attempts), or with
        ``everyone`` all of them (only once the manifest is written). Returns how many."""
        mark = "" if everyone else f".{self.worker.label}-"
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.tmp):
                if entry.name.endswith(".tmp") and mark in entry.name:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
        if everyone:
            with contextlib.suppress(OSError):
                self.tmp.rmdir()
        return removed

    def announce(self) -> None:
        """An empty marker ``_workers/worker-<rank>-of-<n>`` for tools/progress.py."""
        markers = self.root / WORKERS
        markers.mkdir(parents=True, exist_ok=True)
        (markers / f"worker-{self.worker.rank}-of-{self.worker.num_workers}").touch()

    def write_manifest(self, units: list[Unit], sizes: dict[int, int], kind: str,
                       summarize: Callable[[list[dict]], dict]) -> dict:
        """manifest.json, from every part's footer (rows and the unit's stats) and size."""
        import pyarrow.parquet as pq

        parts = []
        for unit in units:
            path = self.data / f"{unit.name}.parquet"
            meta = pq.read_metadata(path)
            stats = json.loads((meta.metadata or {}).get(STATS_KEY, b"{}"))
            parts.append({"unit": unit.index, "path": f"{DATA}/{path.name}",
                          "rows": meta.num_rows, "bytes": sizes[unit.index], "stats": stats})
        manifest = {"format": FORMAT, "complete": True, "kind": kind, "units": len(units),
                    "parts": parts, "rows": sum(p["rows"] for p in parts),
                    "bytes": sum(p["bytes"] for p in parts),
                    "info": summarize([p["stats"] for p in parts])}
        self._write_whole(self.root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True)
                          + "\n")
        return manifest

    def _write_whole(self, path: Path, text: str) -> None:
        """``path`` appears whole or not at all (temporary file, fsync, rename)."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        temp = self.tmp / f"{path.name}.{self.worker.label}-{os.getpid()}.tmp"
        with open(temp, "w") as writer:
            writer.write(text)
            writer.flush()
            os.fsync(writer.fileno())
        os.replace(temp, path)


def read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((Path(root) / MANIFEST).read_text())
    except FileNotFoundError:
        return None


# ------------------------------------------------------------------------------- running


@dataclass
class Outcome:
    complete: bool = False  # manifest.json is written
    preempted: bool = False  # stop() came before the end; what was in flight is committed
    done_here: list[int] = field(default_factory=list)  # units this worker committed
    stolen: list[int] = field(default_factory=list)  # of those, units of other shares
    skipped: int = 0  # units found committed when this worker came to them
    not_durable: list[int] = field(default_factory=list)  # committed here, not yet in bucket
    vanished: dict[int, int] = field(default_factory=dict)  # unit -> temporary files lost
    seconds: float = 0.0


class Abandoned(Exception):
    """Raised by an in-process work function that saw ``stop()`` mid-unit: the unit is
    left uncommitted, its temporary file removed, and redone by a later attempt."""


WorkFn = Callable[[Unit, Path], dict]  # writes the unit's file to the path; returns stats


def _child_init(work: WorkFn, closing) -> None:
    """Pool processes: the parent decides what a SIGTERM means (finish and commit), so a
    SIGTERM sent to every process (a VM shutting down, a process-tree kill) leaves them
    working; one from the parent's ``Pool.terminate()`` (``closing`` set) ends them. A
    parent that dies (SIGKILL, a lost VM) takes them along instead of leaving them writing."""
    global _WORK, _CLOSING
    _WORK, _CLOSING = work, closing
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _on_sigterm(signum, frame) -> None:
    # A lock-free shared byte: a signal handler must not take a lock the interrupted code
    # may hold. Ignoring every SIGTERM made Pool.terminate() wait forever on an idle child
    # (seen in CI: a rerun that hung after its last unit).
    if _CLOSING is not None and _CLOSING.value:
        os._exit(128 + signal.SIGTERM)


_WORK: WorkFn | None = None  # the work function, in a pool process
_CLOSING = None  # multiprocessing.RawValue("b"): 1 once the parent shuts the pool down


def _run_in_child(unit: Unit, temp: str) -> dict:
    return _WORK(unit, Path(temp))


def run(output: Output, units: list[Unit], work: WorkFn, *, kind: str,
        summarize: Callable[[list[dict]], dict], num_proc: int = 1,
        stop: Callable[[], bool] = lambda: False, durable_wait_s: float = 120.0,
        progress: Callable[[Unit, dict], None] | None = None) -> Outcome:
    """Do every unit not yet committed, in ``work_order``, with ``num_proc`` processes
    (``work`` must be picklable and its output must not depend on them), committing each as
    it finishes; then, when the bucket holds every unit, write the manifest. See the module
    docstring."""
    started = time.monotonic()
    outcome = Outcome()
    by_index = {unit.index: unit for unit in units}
    own = set(share(len(units), output.worker))
    left = output.remove_temps()
    if left:
        log.info("removed %d temporary file(s) of an earlier attempt of %s", left,
                 output.worker.label)
    pool = closing = None
    if num_proc > 1:
        # forkserver, not fork: this process has threads by now (the preemption-notice
        # poller, a progress bar's monitor, rclone readers), and a child forked while one
        # of them held a lock deadlocks on it. ``work`` is pickled once per process.
        context = multiprocessing.get_context("forkserver")
        closing = context.RawValue("b", 0)
        pool = context.Pool(num_proc, initializer=_child_init, initargs=(work, closing))
    in_flight: dict[int, tuple[object, Path]] = {}  # unit -> (async result or stats, temp)
    outcome.skipped = len(output.committed())
    try:
        while not stop():
            committed, listed_at = output.committed(), time.monotonic()
            order = [i for i in work_order(len(units), output.worker) if i not in committed]
            for index in order:
                if stop():
                    break
                if index not in own and time.monotonic() - listed_at > _LIST_EVERY_S:
                    committed, listed_at = output.committed(), time.monotonic()
                    if (output.root / MANIFEST).exists():
                        break  # another worker saw every unit in the bucket
                if index in committed:
                    continue  # another worker got there first
                unit = by_index[index]
                temp = output.temp_for(unit)
                if pool is None:
                    try:
                        in_flight[index] = (work(unit, temp), temp)
                    except Abandoned:
                        temp.unlink(missing_ok=True)
                        break
                    except FileNotFoundError as err:
                        _temp_vanished(output, index, outcome, err)
                        if (output.root / MANIFEST).exists():
                            break
                        continue
                else:
                    in_flight[index] = (pool.apply_async(_run_in_child, (unit, str(temp))), temp)
                _collect(output, by_index, in_flight, outcome, own, progress,
                         block=len(in_flight) >= num_proc)
            while in_flight:  # the end, or stop(): what was started finishes and is committed
                _collect(output, by_index, in_flight, outcome, own, progress, block=True)
            if stop():
                break
            # Everything is committed as far as this node sees. The bucket may still lack
            # units: this node's uploads (wait for them), or units another node committed
            # and lost with its VM before they uploaded (nobody sees those any more: redo).
            outcome.not_durable = wait_durable(output, _mine(output, outcome),
                                               durable_wait_s, stop)
            unseen = [unit.index for unit in units if unit.index not in output.committed()]
            if not unseen:
                break
            log.info("%d unit(s) are not in the bucket any more (lost before upload): "
                     "redoing them", len(unseen))
    finally:
        if pool is not None:
            # Nothing in flight (the end, or a preemption once the units in flight are
            # committed): close() lets the idle processes take their end-of-work marker and
            # exit. Pool.terminate() there hung now and then on an idle process, waiting on
            # the task queue's lock that terminate() itself holds. After an error, what
            # still runs is abandoned: terminate(), whose SIGTERM ``closing`` makes count.
            closing.value = 1
            if in_flight:
                pool.terminate()
            else:
                pool.close()
            pool.join()
    outcome.preempted = stop()
    outcome.not_durable = wait_durable(output, _mine(output, outcome), durable_wait_s,
                                       lambda: False)
    if not outcome.preempted and not outcome.not_durable:
        sizes = output.committed()
        listed = output.in_bucket()
        in_bucket = set(sizes) if listed is None else {
            int(m[1]) for m in map(PART_NAME.match, listed) if m}
        if all(unit.index in in_bucket for unit in units):
            if read_manifest(output.root) is None:
                try:
                    output.write_manifest(units, sizes, kind, summarize)
                except FileNotFoundError:  # another worker wrote it and cleared _tmp
                    if read_manifest(output.root) is None:
                        raise
            deadline = time.monotonic() + durable_wait_s
            while not output.file_durable(output.root / MANIFEST):
                if time.monotonic() > deadline:
                    raise OSError(f"{output.root / MANIFEST} did not reach the bucket within "
                                  f"{durable_wait_s:.0f} s")
                time.sleep(0.5)
            output.remove_temps(everyone=True)
            outcome.complete = True
    outcome.seconds = time.monotonic() - started
    return outcome


def _mine(output: Output, outcome: Outcome) -> dict[int, int]:
    done = set(outcome.done_here)
    return {i: size for i, size in output.committed().items() if i in done}


def _collect(output: Output, by_index: dict[int, Unit], in_flight: dict, outcome: Outcome,
             own: set[int], progress, block: bool) -> None:
    """Commit the units in flight that have finished; with ``block``, wait until at least
    one has. A failed unit raises its error (the work function's)."""
    while in_flight:
        finished = [i for i, (result, _) in in_flight.items()
                    if isinstance(result, dict) or result.ready()]
        if not finished and block:
            time.sleep(0.05)
            continue
        for index in finished:
            result, temp = in_flight.pop(index)
            try:
                stats = result if isinstance(result, dict) else result.get()
                output.commit(by_index[index], temp)
            except FileNotFoundError as err:
                _temp_vanished(output, index, outcome, err)
                continue
            outcome.done_here.append(index)
            if index not in own:
                outcome.stolen.append(index)
            if progress is not None:
                progress(by_index[index], stats)
        return


_VANISHED_TRIES = 3  # times one unit's temporary file may vanish before that is an error


def _temp_vanished(output: Output, index: int, outcome: Outcome,
                   err: FileNotFoundError) -> None:
    """A unit's temporary file (or ``_tmp``) was gone before its commit. Once the manifest
    exists that is its writer's cleanup: the unit is committed, by another worker.
    Otherwise the mount lost it (seen on an rclone mount without a cache, under load, just
    after a rerun removed a killed writer's files): the unit is not committed, so it is
    redone; a unit whose file vanishes again and again raises ``err``."""
    if (output.root / MANIFEST).exists():
        return
    outcome.vanished[index] = outcome.vanished.get(index, 0) + 1
    if outcome.vanished[index] >= _VANISHED_TRIES:
        raise err
    log.warning("unit %d: its temporary file vanished before the commit (%s); redoing it",
                index, err)


def wait_durable(output: Output, parts: dict[int, int], timeout_s: float,
                 stop: Callable[[], bool]) -> list[int]:
    """Wait up to ``timeout_s`` until the bucket holds ``parts``; the ones it still lacks."""
    deadline = time.monotonic() + timeout_s
    pending = dict(parts)
    while pending:
        pending = {i: s for i, s in pending.items() if i not in output.durable(pending)}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    return sorted(pending)


