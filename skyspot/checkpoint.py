"""Crash-consistent checkpoints on object-store mounts.

Guarantee: a checkpoint is chosen for resume only if its manifest exists, is well formed
(format version, step matching the directory, plain file names, sizes and checksums of the
right shape, every file the trainer requires listed), and every file it lists is a regular
file inside the checkpoint directory with exactly the listed size and xxh3-128 checksum.
A kill at any instant (mid-write, mid-manifest, mid-delete), a manifest that lies, or an
I/O error while verifying therefore leaves either a checkpoint that verifies or one that is
skipped with a one-line warning naming the file and the reason, and resume falls back to
the next older one. Nothing here follows a symlink, and retention deletes only directories
of this run, never a file of a save another live writer is making (``owner``).

How, and why each rule exists:

- Each save is a NEW directory ``<root>/step-<N:08d>``. A retry of the same step (after a
  crash and a resume from an older checkpoint) gets ``step-<N:08d>.r<k>``: we never
  write into a directory that may hold a half-written earlier attempt.
- Every file is written and closed first; ``manifest.json`` is written last. Checksums
  are computed on the bytes as they are written: on a bucket mount, reading a file back
  downloads it. Nothing relies on rename, which on buckets is copy+delete.
- Retention keeps the ``keep_last`` (>= 2) newest committed checkpoints and deletes an
  older one only after a newer one is committed. A delete removes the manifest first,
  so a half-deleted checkpoint can never verify.
- With an ``owner`` (``skyspot.lease.RunLease``), every commit and every delete first
  checks that this process still owns the run; one that lost it stops with an error.
- An I/O error while saving (a full disk, a read-only mount) is a CheckpointError of one
  line naming the path; the directory of that save never verifies, and nothing older is
  touched.
- Saves are collective: every rank writes its own files (its RNG state, say), rank 0
  gathers their entries and writes the manifest. With ``async_save`` the state is
  snapshotted to CPU memory at a step boundary and written on a background thread; at
  most one save is in flight, and it is committed at the first step boundary where
  every rank has finished writing (``at_step_boundary``), or by ``wait()``.
- A periodic save can ask ``backlog()`` first: while the previous checkpoint is still being
  written, or is not yet in the bucket itself (MOUNT_CACHED uploads after close), another
  save would only queue behind it and share its upload bandwidth, so the bucket would fall
  further behind. Skipping it bounds the lag to about one checkpoint's upload time.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import json
import logging
import os
import re
import shutil
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
import xxhash

import skyspot
from skyspot.durability import view_for

log = logging.getLogger("skyspot.checkpoint")

MANIFEST = "manifest.json"
FORMAT = "skyspot-checkpoint/1"
_DIR_RE = re.compile(r"^step-(?P<step>\d{8})(?:\.r(?P<retry>\d+))?$")
_PLAIN_NAME = re.compile(r"^[^/\\\x00]{1,255}$")  # one path component, no separators or NUL
_XXH3 = re.compile(r"^[0-9a-f]{32}$")  # xxh3-128 hexdigest
_MAX_MANIFEST_BYTES = 64 << 20  # a million-file manifest is ~100 MB; ours are kilobytes
_CHUNK = 8 << 20  # bytes per write call: big enough for throughput, small enough to hash in cache
_LIST_GRACE_S = 15.0  # seconds: > SkyPilot's --dir-cache-time 10s on MOUNT_CACHED mounts
# Fault injection for rehearsals and tests: seconds to sleep after each checkpoint file is
# written, so a kill can land mid-checkpoint on purpose. Never set in production.
WRITE_DELAY_ENV = "SKYSPOT_FAULT_WRITE_DELAY_S"
_NOTHING_LOST = "; this checkpoint was not committed, the previous ones are intact"


class CheckpointError(RuntimeError):
    """A checkpoint can't be used or written; the message says which and why."""


class CheckpointWriteError(CheckpointError):
    """The environment failed a save (a full disk, a read-only mount): nothing was committed,
    and the message, one line, names the path and what happened."""


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the checkpoint directory
    size: int  # bytes
    xxh3_128: str


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    manifest: dict

    @property
    def meta(self) -> dict:
        return self.manifest.get("meta", {})

    def load(self, name: str) -> Any:
        """Load one file of this checkpoint: tensors from .safetensors, else torch.load."""
        file = self.path / name
        # Another node's mount lists files written elsewhere only after its directory cache
        # expires (rclone: --dir-cache-time 10s); rank 0 has verified the file exists.
        deadline = time.monotonic() + _LIST_GRACE_S
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        if name.endswith(".safetensors"):
            return safetensors.torch.load_file(file)
        # weights_only=False: RNG states hold numpy arrays; the file's checksum was verified.
        return torch.load(file, map_location="cpu", weights_only=False)


class _HashingWriter:
    """File-like that checksums and counts the bytes on their way to disk."""

    def __init__(self, raw: io.BufferedWriter):
        self.raw, self.hash, self.size = raw, xxhash.xxh3_128(), 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        self.hash.update(view)
        self.size += len(view)
        return self.raw.write(view)

    def flush(self) -> None:
        self.raw.flush()


def write_file(directory: Path, name: str, payload: Any) -> FileEntry:
    """Serialize ``payload`` into ``directory/name``, checksumming as it writes.

    bytes are written as is; a dict of tensors to ``*.safetensors`` goes through
    safetensors; anything else through ``torch.save``.
    """
    path = directory / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as raw:  # "x": never overwrite; every save has a fresh directory
            out = _HashingWriter(raw)
            if name.endswith(".safetensors"):
                payload = safetensors.torch.save(payload, metadata={"format": "pt"})
            if isinstance(payload, bytes | bytearray | memoryview):
                view = memoryview(payload)
                for start in range(0, len(view), _CHUNK):
                    out.write(view[start : start + _CHUNK])
            else:
                torch.save(payload, out)
            raw.flush()
            os.fsync(raw.fileno())
    except OSError as err:
        if err.filename is None:  # write() and fsync() errors name no file: say which
            err.filename = str(path)
        raise
    if delay := float(os.environ.get(WRITE_DELAY_ENV) or 0):
        time.sleep(delay)
    return FileEntry(name, out.size, out.hash.hexdigest())


def verify(path: Path, required: Callable[[dict], list[str]] | None = None, *,
           checksums: bool = True) -> tuple[dict | None, str | None]:
    """(manifest, None) if the checkpoint at ``path`` is complete, else (None, reason).

    Never raises: a manifest of the wrong shape, a file that is not a regular file, or any
    I/O error while reading is a reason to skip this checkpoint. ``required(manifest)``
    (called only on a well-formed manifest) names the files the caller needs (a trainer's
    weights, say), each of which must be listed; it may raise ValueError to reject the
    manifest (a missing meta field, say), with a message that says why. ``checksums=False``
    checks everything but the file contents (see ``peek``)."""
    try:
        manifest = json.loads(_read_regular(path / MANIFEST, _MAX_MANIFEST_BYTES))
    except FileNotFoundError:
        return None, f"{MANIFEST} missing (the save never committed)"
    except (OSError, ValueError) as err:
        return None, f"{MANIFEST} unreadable: {_why(err)}"
    reason = manifest_problem(manifest, parse_dir_name(path.name))
    if reason is None and required is not None:
        try:
            needed = required(manifest)
        except (ValueError, KeyError, TypeError) as err:
            return None, f"{MANIFEST}: {err}"
        listed = {entry["path"] for entry in manifest["files"]}
        missing = [name for name in needed if name not in listed]
        if missing:
            reason = f"{MANIFEST} does not list {', '.join(missing)}, which a resume needs"
    if reason is not None:
        return None, reason
    for entry in manifest["files"]:
        name = entry["path"]
        try:
            info = (path / name).lstat()
            if not stat.S_ISREG(info.st_mode):
                return None, f"{name} is not a regular file ({_kind(info.st_mode)})"
            if info.st_size != entry["size"]:
                return None, f"{name} has {info.st_size} bytes, manifest says {entry['size']}"
            if not checksums:
                continue
            digest = xxhash.xxh3_128()
            with open(path / name, "rb", opener=_open_nofollow) as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
        except FileNotFoundError:
            return None, f"{name} missing"
        except OSError as err:  # EIO on a FUSE mount, ELOOP, EACCES...: skip, never crash
            return None, f"{name} unreadable: {_why(err)}"
        if digest.hexdigest() != entry["xxh3_128"]:
            return None, f"{name} checksum mismatch"
    return manifest, None


def manifest_problem(manifest: Any, dir_name: tuple[int, int] | None) -> str | None:
    """Why ``manifest`` is not a well-formed manifest of the checkpoint directory named
    ``dir_name`` ((step, retry), or None for a directory not named step-N), else None."""
    if not isinstance(manifest, dict):
        return f"{MANIFEST} is a JSON {type(manifest).__name__}, not an object"
    fmt = manifest.get("format")
    if fmt != FORMAT:
        if isinstance(fmt, str) and fmt.startswith(FORMAT.split("/")[0] + "/"):
            return (f"{MANIFEST} is format {fmt!r}; this skyspot {skyspot.__version__} reads "
                    f"{FORMAT!r} (written by another version?)")
        return f"{MANIFEST} is not a {FORMAT} manifest"
    step, world, files, meta = (manifest.get(k) for k in ("step", "world_size", "files", "meta"))
    if not _is_int(step) or step < 0:
        return f"{MANIFEST}: step is {step!r}, not a non-negative integer"
    if dir_name is not None and step != dir_name[0]:
        return f"{MANIFEST}: step {step} does not match the directory's step {dir_name[0]}"
    if not _is_int(world) or world < 1:
        return f"{MANIFEST}: world_size is {world!r}, not a positive integer"
    if not isinstance(meta, dict):
        return f"{MANIFEST}: meta is {type(meta).__name__}, not an object"
    if "step" in meta and meta["step"] != step:
        return f"{MANIFEST}: meta.step {meta['step']!r} does not match step {step}"
    if not isinstance(files, list) or not files:
        return f"{MANIFEST}: files is {'empty' if files == [] else repr(files)[:40]}"
    seen = set()
    for i, entry in enumerate(files):
        if not isinstance(entry, dict):
            return f"{MANIFEST}: files[{i}] is {type(entry).__name__}, not an object"
        name, size, digest = entry.get("path"), entry.get("size"), entry.get("xxh3_128")
        if not isinstance(name, str) or not _PLAIN_NAME.match(name) or name in (
                ".", "..", MANIFEST):
            return f"{MANIFEST}: files[{i}].path {name!r} is not a plain file name"
        if name in seen:
            return f"{MANIFEST}: {name} is listed twice"
        seen.add(name)
        if not _is_int(size) or size < 0:
            return f"{MANIFEST}: {name} size {size!r} is not a non-negative integer"
        if not isinstance(digest, str) or not _XXH3.match(digest):
            return f"{MANIFEST}: {name} checksum {digest!r} is not 32 hex digits"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _open_nofollow(file: str, flags: int) -> int:
    # O_NOFOLLOW: a file swapped for a symlink after the lstat is not followed.
    return os.open(file, flags | os.O_NOFOLLOW)


def _read_regular(file: Path, limit: int) -> bytes:
    """The bytes of ``file`` if it is a regular file (never a symlink, device or FIFO, which
    could point elsewhere or never end) of at most ``limit`` bytes."""
    info = file.lstat()
    if not stat.S_ISREG(info.st_mode):
        raise OSError(f"not a regular file ({_kind(info.st_mode)})")
    if info.st_size > limit:
        raise OSError(f"{info.st_size} bytes, more than a manifest ever has ({limit})")
    with open(file, "rb", opener=_open_nofollow) as f:
        return f.read(limit + 1)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _why(err: BaseException) -> str:
    """One line for an I/O error: its strerror and errno name, without the noise."""
    if isinstance(err, OSError) and err.errno is not None:
        return f"{(err.strerror or str(err)).lower()} ({errno.errorcode.get(err.errno, err.errno)})"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def describe_os_error(err: OSError, path: Path | str | None = None, where: str = "") -> str:
    """One line for an I/O error of the environment: 'no space left on device (ENOSPC)
    writing /ckpt/t/step-00000008/optimizer.pt: free space in the checkpoint dir /ckpt/t, or
    use another one'. ``path`` stands in when the error names no file (a write() that hits
    ENOSPC names none); ``where`` (what the path is) turns on the advice."""
    line = _why(err)
    target = err.filename if err.filename is not None else path
    if target is not None:
        line += f" writing {target}" if where else f": {target}"
    if where and err.errno in (errno.ENOSPC, errno.EDQUOT):
        line += f": free space in {where}, or use another one"
    elif where and err.errno == errno.EROFS:
        line += f": {where} is mounted read-only"
    return line


def parse_dir_name(name: str) -> tuple[int, int] | None:
    """(step, retry) of a checkpoint directory name ``step-NNNNNNNN[.rK]``, else None."""
    match = _DIR_RE.match(name)
    return (int(match["step"]), int(match["retry"] or 0)) if match else None


def step_dirs(root: Path) -> list[tuple[int, int, Path]]:
    """(step, retry, path) of every checkpoint directory under root, newest first."""
    if not root.is_dir():
        return []
    found = []
    try:
        children = list(root.iterdir())
    except OSError as err:
        log.warning("cannot list checkpoints in %s: %s", root, _why(err))
        return []
    for child in children:
        parsed = parse_dir_name(child.name)
        # A symlink is never a checkpoint of this run: following it would let retention
        # delete, and resume read, another run's files.
        if parsed and not child.is_symlink() and child.is_dir():
            found.append((*parsed, child))
    return sorted(found, reverse=True)


def latest_valid(root: Path, required: Callable[[dict], list[str]] | None = None,
                 ) -> Checkpoint | None:
    """Newest checkpoint under root that verifies; warn once per skipped one."""
    for step, _, path in step_dirs(root):
        manifest, reason = verify(path, required)
        if manifest is not None:
            return Checkpoint(path, step, manifest)
        if _is_empty(path):
            # An empty directory holds nothing to lose: a save killed before its first
            # file, or a deleted checkpoint whose "directory" a bucket listing still shows.
            log.debug("skipping empty checkpoint directory %s", path)
            continue
        log.warning("skipping checkpoint %s: %s", path, reason)
    return None


def _is_empty(path: Path) -> bool:
    try:
        return not any(path.iterdir())
    except OSError:
        return False


def load_checkpoint(path: Path, required: Callable[[dict], list[str]] | None = None,
                    ) -> Checkpoint:
    """Load one named checkpoint, or raise CheckpointError saying why it can't be used."""
    parsed = parse_dir_name(path.name)
    if not parsed:
        raise CheckpointError(f"{path} is not a checkpoint directory (expected step-NNNNNNNN)")
    manifest, reason = verify(path, required)
    if manifest is None:
        raise CheckpointError(f"checkpoint {path} is not usable: {reason}")
    return Checkpoint(path, parsed[0], manifest)


def versions() -> dict[str, str]:
    import accelerate
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "transformers": transformers.__version__,
        "skyspot": skyspot.__version__,
    }


@dataclass
class Committed:
    """What a commit reports: for logs and the event stream."""

    path: Path
    step: int
    bytes: int
    seconds: float  # from the step boundary that started the save to the manifest
    async_save: bool
    durable_step: int | None  # newest step whose every file is in the bucket itself
    durability: str  # how that is known: "on close" or "bucket listing"


@dataclass
class _Pending:
    step: int
    path: Path
    meta: dict
    started: float
    thread: threading.Thread | None = None
    entries: list[FileEntry] = field(default_factory=list)
    error: BaseException | None = None


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _snapshot(payload: Any) -> Any:
    """Deep copy to CPU so training can go on mutating the originals."""
    if isinstance(payload, torch.Tensor):
        return payload.detach().to("cpu", copy=True)
    if isinstance(payload, dict):
        return {key: _snapshot(value) for key, value in payload.items()}
    if isinstance(payload, list | tuple):
        return type(payload)(_snapshot(value) for value in payload)
    return copy.deepcopy(payload)  # numpy RNG arrays and the like: small


class Checkpointer:
    """Collective, crash-consistent saves of one run's checkpoints under ``root``.

    Every rank constructs it with the same arguments and calls ``save``,
    ``at_step_boundary`` and ``wait`` at the same points of the loop.
    """

    def __init__(
        self,
        root: Path,
        *,
        keep_last: int = 3,
        async_save: bool = False,
        on_commit: Callable[[Committed], None] | None = None,
        required: Callable[[dict], list[str]] | None = None,
        owner: Any = None,
    ):
        """``required(manifest)`` names the files a resume needs (checked by ``verify``);
        ``owner`` has ``check()``, which raises once another writer owns the run."""
        if keep_last < 2:
            # The newest checkpoint may still be uploading or be torn by a kill; the one
            # before it is what a resume falls back to.
            raise CheckpointError(f"--keep-last must be at least 2, got {keep_last}")
        self.root = root
        self.keep_last = keep_last
        self.async_save = async_save
        self.on_commit = on_commit
        self.required = required
        self.owner = owner
        self._where = f"the checkpoint dir {root}"  # for one-line I/O errors
        self.rank = dist.get_rank() if _dist_on() else 0
        self.world_size = dist.get_world_size() if _dist_on() else 1
        self._pending: _Pending | None = None
        # Checkpoints known to be committed and valid: the resumed-from one and those this
        # process committed, each with {file name: size} including the manifest. Retention
        # counts only these, and only once the bucket itself holds them.
        self._committed: dict[Path, dict[str, int]] = {}
        self._durable: set[Path] = set()  # of those, the ones seen whole in the bucket
        self.durability = view_for(root) if self.rank == 0 else None

    # --- resume -------------------------------------------------------------------

    def resume_point(self, seed: Path | None = None) -> Checkpoint | None:
        """The checkpoint to resume from, identical on every rank.

        The newest valid checkpoint of this run, skipping (with a warning) any that are
        incomplete or corrupt. Only when the run has none is ``seed`` used (it must verify
        or CheckpointError is raised): a managed job relaunches the same command after
        every preemption, and going back to the seed each time would lose everything since.
        """
        # Rank 0 chooses and sends the whole choice, manifest included: on another node's
        # mount the files rank 0 verified may not be listed yet (rclone's dir cache).
        chosen: list[Any] = [None]
        if self.rank == 0:
            try:
                own = latest_valid(self.root, self.required)
                if own is not None and seed is not None:
                    log.info("resuming from this run's own %s; the seed %s is used only while "
                             "the run has no checkpoint of its own", own.path, seed)
                chosen[0] = own if own is not None or seed is None else load_checkpoint(
                    seed, self.required)
            except CheckpointError as err:
                chosen[0] = err
        if _dist_on():
            dist.broadcast_object_list(chosen, src=0)
        if isinstance(chosen[0], CheckpointError):
            raise chosen[0]
        ckpt: Checkpoint | None = chosen[0]
        if ckpt is not None and self.rank == 0:  # retention runs on rank 0 only
            files = {entry["path"]: entry["size"] for entry in ckpt.manifest["files"]}
            manifest_size = (ckpt.path / MANIFEST).stat().st_size
            self._committed = {ckpt.path: {**files, MANIFEST: manifest_size}}
        return ckpt

    # --- save ---------------------------------------------------------------------

    def save(self, step: int, files: dict[str, Any], meta: dict) -> None:
        """Collective save of this rank's ``files`` (name -> payload) at ``step``.

        Rank-specific names must differ between ranks (``rng-rank1.pt``); shared state
        is passed by rank 0 only. ``meta`` (rank 0's) goes into the manifest.
        """
        started = time.monotonic()
        self.wait()  # at most one save in flight
        path = self._fresh_dir(step)
        pending = _Pending(step, path, meta, started)
        if self.async_save:
            snapshot = {name: _snapshot(payload) for name, payload in files.items()}
            pending.thread = threading.Thread(
                target=self._write, args=(pending, snapshot), name="skyspot-ckpt", daemon=True
            )
            self._pending = pending
            pending.thread.start()
        else:
            self._write(pending, files)
            self._pending = pending
            self._commit()

    def at_step_boundary(self, *flags: bool) -> tuple[bool, ...]:
        """Agree on ``flags`` across ranks (any rank True -> True on all) in one all-reduce,
        and commit an async save once every rank has finished writing it."""
        busy = self._pending is not None and self._pending.thread is not None and (
            self._pending.thread.is_alive()
        )
        values = [float(bool(flag)) for flag in flags] + [float(busy)]
        if _dist_on():
            tensor = torch.tensor(values, dtype=torch.float32)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            values = tensor.tolist()
        if self._pending is not None and not values[-1]:
            self._commit()
        return tuple(bool(value) for value in values[:-1])

    def backlog(self) -> str | None:
        """Collective, right after ``at_step_boundary``: why a periodic save due now would
        only queue up (the previous one is still being written on some rank, or is not yet
        whole in the bucket), or None if it can go ahead. Lists the bucket at most once, and
        only while no checkpoint file is open: a subprocess started while a file is open
        for writing flushes it early on upload-on-close mounts. When the bucket can't be
        listed it never skips: a save that may only queue beats no save at all."""
        if self._pending is not None:  # at_step_boundary saw some rank still writing
            return f"step {self._pending.step} is still being written"
        reason: list[Any] = [None]
        if self.rank == 0 and self._committed:
            newest = max(self._committed, key=_order)
            if newest not in self._durable:
                if self.durability.in_bucket({newest: self._committed[newest]})[newest]:
                    self._durable.add(newest)
                elif self.durability.knows():
                    reason[0] = (f"step {_order(newest)[0]} is not yet in the bucket "
                                 f"({self.durability.kind})")
        if _dist_on():
            dist.broadcast_object_list(reason, src=0)
        return reason[0]

    def wait(self) -> None:
        """Block until the in-flight save (if any) is written on every rank and committed."""
        if self._pending is None:
            return
        if self._pending.thread is not None:
            self._pending.thread.join()
        self._commit()

    def _fresh_dir(self, step: int) -> Path:
        name: list[Any] = [None]
        if self.rank == 0:
            retry = 0
            while True:
                candidate = f"step-{step:08d}" + (f".r{retry}" if retry else "")
                if not (self.root / candidate).exists():
                    break
                retry += 1
            try:
                (self.root / candidate).mkdir(parents=True)
                name[0] = candidate
            except OSError as err:
                name[0] = CheckpointWriteError(describe_os_error(
                    err, where=self._where) + _NOTHING_LOST)
        if _dist_on():
            dist.broadcast_object_list(name, src=0)
        if isinstance(name[0], CheckpointError):
            raise name[0]
        return self.root / name[0]

    def _write(self, pending: _Pending, files: dict[str, Any]) -> None:
        try:
            pending.path.mkdir(parents=True, exist_ok=True)
            pending.entries = [write_file(pending.path, n, p) for n, p in files.items()]
        except BaseException as err:  # reported on the main thread by _commit
            pending.error = err

    def _commit(self) -> None:
        """Collective: gather every rank's entries, write the manifest, apply retention."""
        pending, self._pending = self._pending, None
        if pending.thread is not None:
            pending.thread.join()  # already finished on this rank; join publishes its results
        failed = [pending.error is not None]
        if _dist_on():
            everyone: list[Any] = [None] * self.world_size
            dist.all_gather_object(everyone, (pending.entries, repr(pending.error)))
            failed = [err != "None" for _, err in everyone]
            entries = [entry for rank_entries, _ in everyone for entry in rank_entries]
        else:
            entries = pending.entries
        if any(failed):
            # Nothing is committed: the directory has no manifest and will never verify.
            error = pending.error
            if isinstance(error, OSError):
                raise CheckpointWriteError(describe_os_error(error, where=self._where)
                                           + _NOTHING_LOST)
            raise CheckpointError(
                f"writing checkpoint {pending.path} failed: {error or 'on another rank'}")
        outcome: list[Any] = [None]
        if self.rank == 0:
            try:
                self._commit_on_rank0(pending, entries)
            except CheckpointError as err:
                outcome[0] = err
        if _dist_on():
            # Also the barrier: no rank runs ahead of a commit it may need to resume from.
            dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise outcome[0]

    def _commit_on_rank0(self, pending: _Pending, entries: list[FileEntry]) -> None:
        if self.owner is not None:
            self.owner.check()  # a writer that lost the run must not commit into it
        manifest = {
            "format": FORMAT,
            "step": pending.step,
            "world_size": self.world_size,
            "files": [vars(entry) for entry in entries],
            "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "meta": pending.meta,
        }
        try:
            written = write_file(pending.path, MANIFEST,
                                 json.dumps(manifest, indent=1).encode())
        except OSError as err:
            with contextlib.suppress(OSError):  # a torn manifest never verifies anyway
                (pending.path / MANIFEST).unlink()
            raise CheckpointWriteError(describe_os_error(err, where=self._where)
                                       + _NOTHING_LOST) from err
        self._committed[pending.path] = {
            **{entry.path: entry.size for entry in entries}, MANIFEST: written.size}
        durable_step = self._apply_retention()
        if self.on_commit is not None:
            self.on_commit(
                Committed(
                    path=pending.path,
                    step=pending.step,
                    bytes=sum(entry.size for entry in entries),
                    seconds=time.monotonic() - pending.started,
                    async_save=pending.thread is not None,
                    durable_step=durable_step,
                    durability=self.durability.kind,
                )
            )

    def _apply_retention(self) -> int | None:
        """Keep the keep_last newest checkpoints that are in the bucket itself, and every
        newer one; delete all older checkpoint directories. Returns the newest durable step.

        Counting only durable checkpoints matters on MOUNT_CACHED: uploads can lag several
        checkpoints behind, and deleting on local close can leave the bucket with nothing
        complete after a lost VM."""
        durable = sorted((p for p, ok in self.durability.in_bucket(self._committed).items() if ok),
                         key=_order)
        self._durable = set(durable)
        if len(durable) >= self.keep_last:
            oldest_kept = _order(durable[-self.keep_last])
            doomed = [path for step, retry, path in step_dirs(self.root)
                      if (step, retry) < oldest_kept]
            if doomed and self.owner is not None:
                self.owner.check()  # never delete in a run another writer now owns
            for path in doomed:
                _delete(self.root, path)
                self._committed.pop(path, None)
                self._durable.discard(path)
        return _order(durable[-1])[0] if durable else None

    def wait_durable(self, timeout_s: float) -> int | None:
        """Rank 0: wait until the newest committed checkpoint is in the bucket (or timeout),
        then apply retention; return the newest durable step. A preemption exit uses it to
        spend its grace on the upload rather than leave the checkpoint in a cache that dies
        with the VM."""
        if self.rank != 0 or not self._committed:
            return None
        newest = max(self._committed, key=_order)
        deadline = time.monotonic() + timeout_s
        while True:
            # Retention on each check (one listing): the one at the last commit may have
            # waited on this upload, and the job must not end with more than keep_last.
            durable_step = self._apply_retention()
            if newest in self._durable or time.monotonic() >= deadline:
                return durable_step
            time.sleep(0.5)


def _order(path: Path) -> tuple[int, int]:
    return parse_dir_name(path.name)  # only ever called on directories this module named


def _delete(root: Path, path: Path) -> None:
    """Delete checkpoint directory ``path`` of ``root``: never a symlink, never outside."""
    if path.is_symlink() or path.parent != root or not parse_dir_name(path.name):
        log.warning("not deleting %s: not a checkpoint directory of %s", path, root)
        return
    try:
        # Manifest first: a delete interrupted halfway leaves a directory that never verifies.
        (path / MANIFEST).unlink(missing_ok=True)
    except OSError as err:
        log.warning("could not delete old checkpoint %s: %s", path, _why(err))
        return
    shutil.rmtree(path, ignore_errors=True)  # removes symlinks inside, never follows them


def peek(path: Path) -> dict | None:
    """The manifest of checkpoint directory ``path`` (named step-N) if it is well formed and
    every file it lists is a regular file of the listed size, else None; never raises.

    A cheap look, not a verify: no checksum is read (on a bucket mount that downloads the
    checkpoint), so a file of the right size may still be corrupt. Like verify, it never
    follows a symlink or reads a device."""
    if parse_dir_name(path.name) is None:
        return None
    return verify(path, checksums=False)[0]
