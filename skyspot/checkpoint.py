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
  gathers their entries and writes the manifest. At most one save is in flight.
- Files are written once and hashed once: tensor states go to ``*.safetensors`` straight
  from tensor memory (skyspot.statefile), hashed (xxh3) on the way; no serializer adds a
  checksum of its own. A resume reads each file once into memory, hashes it, compares, and
  deserializes from those same bytes; files are read several at a time.

The async fast path (``async_save``), and why its snapshot is consistent:

- ``save()`` at the step boundary after ``optimizer.step()`` of step N takes the small,
  non-tensor state (scheduler, RNG, meta) at once, and hands the tensors to the writer
  thread, which copies them into host buffers allocated at the first save and reused by
  every later one (pinned, with the copies on a CUDA stream of their own, when the state
  is on a GPU), then writes the files from those buffers.
- Meanwhile the loop runs step N+1's forward and backward. They read the weights and
  write only gradients and activations; the weights and the optimizer's state change
  only in ``optimizer.step()``, and the loop calls ``before_update()`` right before it,
  which waits until the copy is complete. So no tensor of the snapshot changes while it is
  copied, and it holds exactly step N's state; that wait is the only one, and it is
  measured (``Committed.snapshot_wait_seconds``). A state that a forward changes in
  place (batch-norm statistics) must be cloned by the caller before ``save()``.
- The fast path holds one extra copy of the state's tensors in host memory, for the life
  of the Checkpointer; a save that would not fit is refused in one line before anything is
  written.
- Nothing slow runs on the training thread: once every rank has written its files (seen
  at a step boundary, in the all-reduce the loop does anyway), rank 0 writes the manifest,
  fsyncs it and applies retention on a thread of its own; the outcome is reported at a
  later boundary.
- A final save (a preemption, the last step) abandons a save still being written instead
  of waiting for it: the final one holds newer state and needs the bandwidth within the
  grace period. Each rank stops its writer within one 8 MiB chunk and deletes the files
  it made, so a MOUNT_CACHED mount does not go on uploading them; with no manifest, the
  directory is never chosen, and retention removes it later. The final save is written
  at once from the live state, with no snapshot: the loop ends after it.
- A periodic save can ask ``backlog()`` first: while the previous checkpoint is still being
  written, or is not yet in the bucket itself (MOUNT_CACHED uploads after close), another
  save would only queue behind it and share its upload bandwidth, so the bucket would fall
  further behind. Skipping it bounds the lag to about one checkpoint's upload time.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import io
import json
import logging
import mmap
import os
import queue
import re
import shutil
import stat
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.utils.serialization
import xxhash

import skyspot
from skyspot.divergence import first_nonfinite
from skyspot.durability import mount_of, view_for
from skyspot.statefile import Layout, StateFileError, read_state

log = logging.getLogger("skyspot.checkpoint")

MANIFEST = "manifest.json"
FORMAT = "skyspot-checkpoint/1"
_DIR_RE = re.compile(r"^step-(?P<step>\d{8})(?:\.r(?P<retry>\d+))?$")
_PLAIN_NAME = re.compile(r"^[^/\\\x00]{1,255}$")  # one path component, no separators or NUL
_XXH3 = re.compile(r"^[0-9a-f]{32}$")  # xxh3-128 hexdigest
_MAX_MANIFEST_BYTES = 64 << 20  # a million-file manifest is ~100 MB; ours are kilobytes
_CHUNK = 8 << 20  # bytes per read or write call: big enough for throughput, small enough to
# hash while in cache and to stop an abandoned save soon
_HASHER = xxhash.xxh3_128  # of every file as written (tools/bench_ckpt.py swaps it to time it)
_READERS = 8  # files read at once on resume: a bucket mount serves parallel reads faster
_LIST_GRACE_S = 15.0  # seconds: > SkyPilot's --dir-cache-time 10s on MOUNT_CACHED mounts
# Fault injection for rehearsals and tests: seconds to sleep after each checkpoint file is
# written, so a kill can land mid-checkpoint on purpose. Never set in production.
WRITE_DELAY_ENV = "SKYSPOT_FAULT_WRITE_DELAY_S"
# The same, for the files of async (background) saves only: a slow bucket under periodic
# saves, while the final save of a preemption still runs at full speed.
ASYNC_WRITE_DELAY_ENV = "SKYSPOT_FAULT_ASYNC_WRITE_DELAY_S"
# Seconds to sleep after copying each tensor of an async snapshot: so a test can land the
# next step's forward, and an optimizer step, in the middle of the copy.
COPY_DELAY_ENV = "SKYSPOT_FAULT_COPY_DELAY_S"
_NOTHING_LOST = "; this checkpoint was not committed, the previous ones are intact"


class CheckpointError(RuntimeError):
    """A checkpoint can't be used or written; the message says which and why."""


class NonFiniteState(CheckpointError):
    """A save's state holds nan/inf (``finite=True``): it was not committed, on any rank."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


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
    # name -> the file's verified bytes, kept by the verify that chose this checkpoint so a
    # resume reads each byte once; load() releases each one as it deserializes it.
    data: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def meta(self) -> dict:
        return self.manifest.get("meta", {})

    def load(self, name: str) -> Any:
        """One file of this checkpoint, deserialized from bytes read once and checked
        against the manifest's size and checksum: a nested state from ``*.safetensors``
        (skyspot.statefile), anything else through torch.load. Bytes that ``latest_valid``
        kept while verifying are used (and released) instead of reading the file again."""
        raw = self.data.pop(name, None)
        if raw is None:
            entry = next((e for e in self.manifest["files"] if e["path"] == name), None)
            if entry is None:
                raise CheckpointError(f"checkpoint {self.path} does not list {name}")
            _wait_until_listed([self.path / name])
            try:
                raw = _read_checked(self.path, entry, keep=True)
            except _Unusable as err:
                raise CheckpointError(f"checkpoint {self.path}: {err}") from None
        if name.endswith(".safetensors"):
            try:
                return read_state(raw, str(self.path / name))
            except StateFileError as err:
                raise CheckpointError(str(err)) from None
        # weights_only=False: RNG states hold numpy arrays; the file's checksum was verified.
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)


def _wait_until_listed(files: list[Path]) -> None:
    """Wait up to _LIST_GRACE_S for ``files``, which another rank has listed or verified, to
    show here: another node's mount lists files written elsewhere only after its directory
    cache expires (rclone: --dir-cache-time 10s). A file still absent then is reported by
    the read that follows."""
    deadline = time.monotonic() + _LIST_GRACE_S
    while not all(file.exists() for file in files) and time.monotonic() < deadline:
        time.sleep(0.5)


class _HashingWriter:
    """File-like that checksums and counts the bytes on their way to disk."""

    def __init__(self, raw: io.BufferedWriter, cancel: threading.Event | None = None):
        self.raw, self.hash, self.size, self.cancel = raw, _HASHER(), 0, cancel

    def write(self, data: bytes | memoryview) -> int:
        if self.cancel is not None and self.cancel.is_set():
            raise Abandoned
        view = memoryview(data)
        self.hash.update(view)  # xxh3: ~30 GB/s here, and it lets go of the GIL
        self.size += len(view)
        return self.raw.write(view)

    def flush(self) -> None:
        self.raw.flush()


def write_file(directory: Path, name: str, payload: Any, *,
               tensors: list[torch.Tensor] | None = None,
               cancel: threading.Event | None = None) -> FileEntry:
    """Serialize ``payload`` into ``directory/name``, checksumming the bytes as they are
    written, once: nothing is read back (on a bucket mount that would download the file).

    ``*.safetensors``: a nested state (or its ``statefile.Layout``) through
    skyspot.statefile, each tensor's bytes written straight from its memory; ``tensors``
    (a snapshot of the layout's tensors) replace the live ones. bytes are written as is;
    anything else goes through ``torch.save`` without its own CRC32 (the manifest's
    checksum covers the file). ``cancel`` set: stop at the next chunk (Abandoned).
    On a local disk the file is written with O_DIRECT (``_DirectFile``).
    """
    path = directory / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _create(path) as raw:  # never overwrites: every save has a fresh directory
            out = _HashingWriter(raw, cancel)
            if name.endswith(".safetensors"):
                layout = payload if isinstance(payload, Layout) else Layout.of(payload)
                layout.write_to(out.write, tensors)
            elif isinstance(payload, bytes | bytearray | memoryview):
                view = memoryview(payload)
                for start in range(0, len(view), _CHUNK):
                    out.write(view[start : start + _CHUNK])
            else:
                with _no_torch_crc():
                    torch.save(payload, out)
            raw.flush()
            os.fsync(raw.fileno())
    except OSError as err:
        if err.filename is None:  # write() and fsync() errors name no file: say which
            err.filename = str(path)
        raise
    if delay := float(os.environ.get(WRITE_DELAY_ENV) or 0):
        (cancel or threading.Event()).wait(delay)
    return FileEntry(name, out.size, out.hash.hexdigest())


# Filesystems on a local block device, where O_DIRECT writes beat the page cache: measured
# here (ext4 on a virtio disk), dd oflag=direct ran at ~1.9 GB/s and dd conv=fsync, which
# goes through the page cache, at ~0.35 GB/s. Bucket mounts (FUSE), network filesystems
# and tmpfs keep buffered writes.
_BLOCK_FILESYSTEMS = {"ext4", "ext3", "ext2", "xfs", "btrfs", "f2fs"}
_ALIGN = 4096  # bytes: O_DIRECT wants buffer, offset and length aligned to the block size


def _create(path: Path):
    """A new file at ``path`` (O_EXCL): O_DIRECT on a local disk that takes it, else
    buffered."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    if hasattr(os, "O_DIRECT") and _on_local_disk(path.parent):
        try:
            return _DirectFile(os.open(path, flags | os.O_DIRECT, 0o644))
        except OSError as err:
            if err.errno != errno.EINVAL:  # EINVAL: no O_DIRECT here; anything else is real
                raise
    return open(os.open(path, flags, 0o644), "wb", closefd=True)


class _DirectFile:
    """Writes through O_DIRECT from two page-aligned bounce buffers (tensor memory is not
    block-aligned): while a thread of its own writes one 8 MiB chunk to the disk, the
    caller copies (and hashes) the next into the other, so the checksum and the copy hide
    under the disk's time. The last, unaligned bytes are written after O_DIRECT is switched
    off, and fsync covers both."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buffers = [mmap.mmap(-1, _CHUNK) for _ in range(2)]  # anonymous: page-aligned
        self.views = [memoryview(buffer) for buffer in self.buffers]
        self.current, self.fill = 0, 0
        self.idle = [threading.Event() for _ in range(2)]  # buffer i is not being written
        for event in self.idle:
            event.set()
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: OSError | None = None
        self.thread = threading.Thread(target=self._disk, name="skyspot-direct", daemon=True)
        self.thread.start()

    def _disk(self) -> None:
        while (job := self.queue.get()) is not None:
            index, length = job
            try:
                if self.error is None:
                    self._write_out(self.views[index][:length])
            except OSError as err:
                self.error = err
            finally:
                self.idle[index].set()

    def _write_out(self, view: memoryview) -> None:
        while view:
            view = view[os.write(self.fd, view):]

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def write(self, data: bytes | memoryview) -> int:
        data = memoryview(data).cast("B")
        done = 0
        while done < len(data):
            if self.fill == 0:
                self.idle[self.current].wait()  # its previous chunk is on the disk
                self._raise_if_failed()
            take = min(_CHUNK - self.fill, len(data) - done)
            self.views[self.current][self.fill:self.fill + take] = data[done:done + take]
            self.fill += take
            done += take
            if self.fill == _CHUNK:
                self.idle[self.current].clear()
                self.queue.put((self.current, _CHUNK))
                self.current, self.fill = 1 - self.current, 0
        return done

    def flush(self) -> None:
        """Write what is buffered: the aligned part directly, the rest through the cache."""
        for event in self.idle:
            event.wait()
        self._raise_if_failed()
        view = self.views[self.current]
        aligned = self.fill // _ALIGN * _ALIGN
        if aligned:
            self._write_out(view[:aligned])
        if self.fill > aligned:
            fcntl.fcntl(self.fd, fcntl.F_SETFL,
                        fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self._write_out(view[aligned:self.fill])
        self.fill = 0

    def fileno(self) -> int:
        return self.fd

    def __enter__(self) -> _DirectFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.queue.put(None)
        self.thread.join()
        for view, buffer in zip(self.views, self.buffers, strict=True):
            view.release()
            buffer.close()
        os.close(self.fd)


@contextlib.contextmanager
def _no_torch_crc():
    config = torch.utils.serialization.config.save
    before, config.compute_crc32 = config.compute_crc32, False
    try:
        yield
    finally:
        config.compute_crc32 = before


class Abandoned(Exception):
    """A save was abandoned (``cancel`` set) before its files were all written."""


class _Unusable(Exception):
    """A checkpoint file that is missing, of the wrong size or checksum, or unreadable."""


def _on_local_disk(path: Path) -> bool:
    mount = mount_of(path)
    return mount is not None and mount.fstype in _BLOCK_FILESYSTEMS


def _host_buffer(size: int) -> Any:
    """``size`` writable bytes of host memory, its pages already mapped: one MAP_POPULATE
    call faults them all in at once, faster here than a read faulting them one page at a
    time (0.88 GB: 0.35 s against up to 0.8 s). Tensors made on it keep it alive."""
    if size and hasattr(mmap, "MAP_POPULATE"):
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                         | mmap.MAP_POPULATE)
    return bytearray(size)


def _check_stat(directory: Path, entry: dict) -> None:
    """Raise _Unusable unless file ``entry`` of ``directory`` is a regular file (never a
    symlink, a device or a FIFO) of the listed size."""
    name = entry["path"]
    try:
        info = (directory / name).lstat()
    except FileNotFoundError:
        raise _Unusable(f"{name} missing") from None
    except OSError as err:  # EIO on a FUSE mount, ELOOP, EACCES...: skip, never crash
        raise _Unusable(f"{name} unreadable: {_why(err)}") from None
    if not stat.S_ISREG(info.st_mode):
        raise _Unusable(f"{name} is not a regular file ({_kind(info.st_mode)})")
    if info.st_size != entry["size"]:
        raise _Unusable(f"{name} has {info.st_size} bytes, manifest says {entry['size']}")


def _read_checked(directory: Path, entry: dict, *, keep: bool) -> Any:
    """Read file ``entry`` of ``directory`` once, hashing as it reads; its bytes (keep) or
    None. Raises _Unusable with the reason when it is not exactly what the entry says."""
    name, size = entry["path"], entry["size"]
    digest = xxhash.xxh3_128()
    _check_stat(directory, entry)
    try:
        with open(directory / name, "rb", buffering=0, opener=_open_nofollow) as f:
            if keep and size and _on_local_disk(directory):
                # Mapped, privately: the pages are read once into the page cache, hashed
                # there, and the tensors are views of them (a write, such as the optimizer's
                # first step, copies a page first). Only on a local disk, where a mapped
                # file outlives its deletion by retention: a bucket mount could not re-read
                # an evicted page of a deleted file (SIGBUS).
                data = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
                # Fault the pages in from torch's intra-op threads, several at once: one
                # thread faulting in order read 1.3 GB in ~2.1 s here, two in ~1.1 s.
                torch.frombuffer(data, dtype=torch.uint8)[::mmap.PAGESIZE].sum()
                view = memoryview(data)
                for start in range(0, size, _CHUNK):
                    digest.update(view[start:start + _CHUNK])
                done = os.fstat(f.fileno()).st_size  # grown since the lstat: not as listed
            else:  # into memory of our own, chunk by chunk (a bucket mount streams it)
                data = _host_buffer(size) if keep else bytearray(min(size, _CHUNK))
                view, done = memoryview(data), 0
                while n := f.readinto(view[done:done + _CHUNK] if keep else view):
                    digest.update(view[done:done + n] if keep else view[:n])
                    done += n
                    if keep and done == size:
                        done += len(f.read(1))  # grown since the lstat: not as listed
                        break
    except FileNotFoundError:
        raise _Unusable(f"{name} missing") from None
    except OSError as err:  # EIO on a FUSE mount, ELOOP, EACCES...: skip, never crash
        raise _Unusable(f"{name} unreadable: {_why(err)}") from None
    if done != size:
        raise _Unusable(f"{name} has {done} bytes, manifest says {size}")
    if digest.hexdigest() != entry["xxh3_128"]:
        raise _Unusable(f"{name} checksum mismatch")
    return data if keep else None


def _read_all(directory: Path, manifest: dict, *, keep: bool,
              ) -> tuple[dict[str, Any], str | None]:
    """Check every file the manifest lists, several at once on a bucket mount (which serves
    parallel reads faster); (their bytes if keep, None) or ({}, the first reason in listed
    order)."""
    entries = manifest["files"]

    def check(entry: dict) -> tuple[Any, str | None]:
        try:
            return _read_checked(directory, entry, keep=keep), None
        except _Unusable as err:
            return None, str(err)

    if len(entries) == 1 or _on_local_disk(directory):
        # One at a time on a local disk (mapped, see _read_checked): two readers at once
        # made it seek (measured here: 1.3 GB in 2.2 s in parallel, 1.2 s in turn).
        results = []
        for entry in entries:
            results.append(check(entry))
            if results[-1][1] is not None:
                break
    else:
        with ThreadPoolExecutor(min(_READERS, len(entries)), "skyspot-read") as pool:
            results = list(pool.map(check, entries))
    for _, reason in results:
        if reason is not None:
            return {}, reason
    return ({entry["path"]: data for entry, (data, _) in zip(entries, results, strict=True)} if keep
            else {}), None


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
    if checksums:  # every file read and hashed (which checks its kind and size first)
        _, reason = _read_all(path, manifest, keep=False)
        return (None, reason) if reason is not None else (manifest, None)
    try:
        for entry in manifest["files"]:
            _check_stat(path, entry)
    except _Unusable as err:
        return None, str(err)
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


def latest_valid(root: Path, required: Callable[[dict], list[str]] | None = None, *,
                 keep: bool = False) -> Checkpoint | None:
    """Newest checkpoint under root that verifies; warn once per skipped one. ``keep``: the
    returned checkpoint holds the bytes it was verified with, for load() to use, so each
    byte is read once (peak memory: the checkpoint's size until its files are loaded)."""
    for step, _, path in step_dirs(root):
        manifest, data, reason = _verified(path, required, keep)
        if manifest is not None:
            return Checkpoint(path, step, manifest, data=data)
        if _is_empty(path):
            # An empty directory holds nothing to lose: a save killed before its first
            # file, or a deleted checkpoint whose "directory" a bucket listing still shows.
            log.debug("skipping empty checkpoint directory %s", path)
            continue
        log.warning("skipping checkpoint %s: %s", path, reason)
    return None


_RANK_FILE = re.compile(r"-rank(\d+)\.[^.]+$")


def _checked_by(name: str, world_size: int) -> int:
    """The rank that reads and hashes file ``name`` when a run of ``world_size`` ranks
    resumes: one named for rank r (``rng-rank3.safetensors``), r mod world size, the rest
    (the shared files) rank 0."""
    match = _RANK_FILE.search(name)
    return int(match[1]) % world_size if match else 0


def _is_empty(path: Path) -> bool:
    try:
        return not any(path.iterdir())
    except OSError:
        return False


def load_checkpoint(path: Path, required: Callable[[dict], list[str]] | None = None, *,
                    keep: bool = False) -> Checkpoint:
    """Load one named checkpoint, or raise CheckpointError saying why it can't be used."""
    parsed = parse_dir_name(path.name)
    if not parsed:
        raise CheckpointError(f"{path} is not a checkpoint directory (expected step-NNNNNNNN)")
    manifest, data, reason = _verified(path, required, keep)
    if manifest is None:
        raise CheckpointError(f"checkpoint {path} is not usable: {reason}")
    return Checkpoint(path, parsed[0], manifest, data=data)


def _verified(path: Path, required: Callable[[dict], list[str]] | None, keep: bool,
              ) -> tuple[dict | None, dict[str, Any], str | None]:
    """verify(), plus the bytes it verified ({name: bytes}) when keep: (manifest, data,
    None) or (None, {}, reason)."""
    manifest, reason = verify(path, required, checksums=not keep)
    if manifest is None or not keep:
        return manifest, {}, reason
    data, reason = _read_all(path, manifest, keep=True)
    return (None, {}, reason) if reason is not None else (manifest, data, None)


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
    # Seconds the training loop was blocked by this save, all of it: in save(), in
    # before_update() waiting for the snapshot, and at the step boundaries that committed
    # it. For a synchronous save, the whole save.
    stall_seconds: float = 0.0
    snapshot_wait_seconds: float = 0.0  # of that, in before_update(): the copy outran compute


@dataclass
class _Pending:
    step: int
    path: Path
    meta: dict
    started: float
    background: bool = False  # written on the writer thread (async) or on the caller's
    stage: str = "writing"  # then "committing" (rank 0 writes the manifest), then done
    thread: threading.Thread | None = None
    copied: threading.Event = field(default_factory=threading.Event)  # snapshot taken
    cancel: threading.Event = field(default_factory=threading.Event)
    opened: list[str] = field(default_factory=list)  # files this rank created
    entries: list[FileEntry] = field(default_factory=list)
    error: BaseException | None = None
    commit_thread: threading.Thread | None = None
    committed: Committed | None = None
    commit_error: BaseException | None = None
    stall: float = 0.0  # seconds the loop waited on this save
    snapshot_wait: float = 0.0


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _snapshot(payload: Any) -> Any:
    """Deep copy to CPU so training can go on mutating the originals (for payloads that
    are not safetensors states, which are snapshotted into reused buffers instead)."""
    if isinstance(payload, torch.Tensor):
        return payload.detach().to("cpu", copy=True)
    if isinstance(payload, dict):
        return {key: _snapshot(value) for key, value in payload.items()}
    if isinstance(payload, list | tuple):
        return type(payload)(_snapshot(value) for value in payload)
    return copy.deepcopy(payload)  # numpy RNG arrays and the like: small


def available_memory() -> int | None:
    """Bytes of host memory available for new allocations (MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class _Staging:
    """Host buffers an async save snapshots the state into: allocated at the first save,
    reused by every later one (pinned when the state is on a GPU, so the copy is a DMA).
    One copy of the state's tensors: that is the host memory the fast path holds."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, str], torch.Tensor] = {}

    def missing_bytes(self, layouts: dict[str, Layout]) -> int:
        return sum(t.numel() * t.element_size()
                   for key, t in self._wanted(layouts) if not self._fits(key, t))

    def take(self, layouts: dict[str, Layout]) -> dict[str, list[torch.Tensor]]:
        """The buffers for ``layouts``, allocating any missing one (on the writer thread:
        pinned allocations are slow)."""
        staged: dict[str, list[torch.Tensor]] = {name: [] for name in layouts}
        for (name, tensor_name), tensor in self._wanted(layouts):
            key = (name, tensor_name)
            if not self._fits(key, tensor):
                self.buffers[key] = torch.empty(
                    tensor.shape, dtype=tensor.dtype, device="cpu",
                    pin_memory=tensor.device.type == "cuda")
            staged[name].append(self.buffers[key])
        return staged

    @staticmethod
    def _wanted(layouts: dict[str, Layout]):
        for name, layout in layouts.items():
            for tensor_name, tensor in zip(layout.names, layout.tensors, strict=True):
                yield (name, tensor_name), tensor

    def _fits(self, key: tuple[str, str], tensor: torch.Tensor) -> bool:
        buffer = self.buffers.get(key)
        return buffer is not None and buffer.shape == tensor.shape and (
            buffer.dtype == tensor.dtype)


class Checkpointer:
    """Collective, crash-consistent saves of one run's checkpoints under ``root``.

    Every rank constructs it with the same arguments and calls ``save``,
    ``before_update``, ``at_step_boundary`` and ``wait`` at the same points of the loop.
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
        finite: bool = False,
    ):
        """``required(manifest)`` names the files a resume needs (checked by ``verify``);
        ``owner`` has ``check()``, which raises once another writer owns the run.
        ``finite``: a save whose floating-point tensors hold a nan or an inf is not
        committed and raises NonFiniteState on every rank; what is checked is what is
        written (an async save's snapshot, on the writer thread, off the loop)."""
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
        self.finite = finite
        self._where = f"the checkpoint dir {root}"  # for one-line I/O errors
        self.rank = dist.get_rank() if _dist_on() else 0
        self.world_size = dist.get_world_size() if _dist_on() else 1
        self._pending: _Pending | None = None
        self._staging = _Staging()
        self._stream = None  # CUDA stream of the snapshot copies, made on first use
        # Checkpoints known to be committed and valid: the resumed-from one and those this
        # process committed, each with {file name: size} including the manifest. Retention
        # counts only these, and only once the bucket itself holds them. While a commit
        # runs on its thread only that thread touches them (backlog() waits for no save).
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

        Rank 0 lists the candidates, newest first: a well-formed manifest that lists what
        the trainer requires, every listed file a regular file of the listed size (no byte
        read yet). Then every listed file is read and hashed by one rank: a file named for
        rank r (``*-rank<r>.*``) by rank r mod world size, the rest by rank 0. Each rank
        keeps the bytes it verified for its own ``load()``, so with an unchanged world size
        every byte is read once, spread over the ranks. One all-gather per candidate: a
        file found bad on ANY rank (a torn shard of rank 1 alone, say) makes the candidate
        invalid on every rank, and all of them fall back to the next older one together.
        """
        listing: list[Any] = [None]
        if self.rank == 0:
            try:
                listing[0] = self._candidates(seed)
            except CheckpointError as err:
                listing[0] = err
        if _dist_on():
            # The whole choice, manifests included: on another node's mount the files rank 0
            # listed may not be listed yet (rclone's dir cache).
            dist.broadcast_object_list(listing, src=0)
        if isinstance(listing[0], CheckpointError):
            raise listing[0]
        ckpt = None
        for path, step, manifest, seed_problem in listing[0]:
            if seed_problem is not None:  # the seed, needed, failed rank 0's listing checks
                raise CheckpointError(f"checkpoint {path} is not usable: {seed_problem}")
            data, reason = self._verify_mine(path, manifest)
            reasons = [reason]
            if _dist_on():
                reasons = [None] * self.world_size
                dist.all_gather_object(reasons, reason)
            bad = [(rank, why) for rank, why in enumerate(reasons) if why is not None]
            if not bad:
                ckpt = Checkpoint(path, step, manifest, data=data)
                break
            del data
            why = "; ".join(f"rank {rank}: {why}" if rank else why for rank, why in bad)
            if seed is not None and path == seed:
                raise CheckpointError(f"checkpoint {path} is not usable: {why}")
            if self.rank == 0:
                log.warning("skipping checkpoint %s: %s", path, why)
        if ckpt is None:
            return None
        if self.rank == 0:
            if seed is not None and ckpt.path != seed:
                log.info("resuming from this run's own %s; the seed %s is used only while "
                         "the run has no checkpoint of its own", ckpt.path, seed)
            # Retention runs on rank 0 only.
            files = {entry["path"]: entry["size"] for entry in ckpt.manifest["files"]}
            manifest_size = (ckpt.path / MANIFEST).stat().st_size
            self._committed = {ckpt.path: {**files, MANIFEST: manifest_size}}
        return ckpt

    def _candidates(self, seed: Path | None) -> list[tuple[Path, int, dict, str | None]]:
        """Rank 0: (path, step, manifest, None) of every checkpoint of the run that passes
        verify() without reading file contents, newest first; then the seed, as the last
        resort: (seed, step, manifest, None), or (seed, 0, {}, why it is unusable)."""
        found = []
        for step, _, path in step_dirs(self.root):
            manifest, reason = verify(path, self.required, checksums=False)
            if manifest is not None:
                found.append((path, step, manifest, None))
            elif _is_empty(path):  # nothing to lose: see latest_valid
                log.debug("skipping empty checkpoint directory %s", path)
            else:
                log.warning("skipping checkpoint %s: %s", path, reason)
        if seed is not None:
            parsed = parse_dir_name(seed.name)
            if not parsed:
                raise CheckpointError(
                    f"{seed} is not a checkpoint directory (expected step-NNNNNNNN)")
            manifest, reason = verify(seed, self.required, checksums=False)
            found.append((seed, parsed[0], manifest or {}, reason))
        return found

    def _verify_mine(self, path: Path, manifest: dict) -> tuple[dict[str, Any], str | None]:
        """Read and hash the files of ``path`` that this rank checks (see resume_point):
        ({name: bytes}, None), or ({}, the reason the first bad one is unusable)."""
        mine = {**manifest, "files": [entry for entry in manifest["files"]
                                      if _checked_by(entry["path"], self.world_size) == self.rank]}
        if not mine["files"]:
            return {}, None
        if self.rank != 0:  # rank 0 has listed them all
            _wait_until_listed([path / entry["path"] for entry in mine["files"]])
        return _read_all(path, mine, keep=True)

    # --- save ---------------------------------------------------------------------

    def save(self, step: int, files: dict[str, Any], meta: dict, *,
             final: bool = False) -> int | None:
        """Collective save of this rank's ``files`` (name -> payload) at ``step``.

        Rank-specific names must differ between ranks (``rng-rank1.safetensors``); shared
        state is passed by rank 0 only. ``meta`` (rank 0's) goes into the manifest.

        With async_save, the tensors of ``*.safetensors`` states are copied into reused
        host buffers on the writer thread, and the caller must not change them until
        ``before_update()`` returns (call it right before ``optimizer.step()``). Every
        non-tensor part is taken here.

        ``final``: the loop ends after this save (a preemption, the last step). A save
        still being written is abandoned (returned: its step), and this one is written now
        from the live state, with no snapshot: nothing will change it.
        """
        started = time.monotonic()
        abandoned = self._abandon() if final else None
        self.wait()  # at most one save in flight
        layouts = {name: Layout.of(payload) if name.endswith(".safetensors") else payload
                   for name, payload in files.items()}
        background = self.async_save and not final
        states = {n: lay for n, lay in layouts.items() if isinstance(lay, Layout)}
        if background:
            self._check_memory(states)  # before anything is written
        path = self._fresh_dir(step)
        pending = _Pending(step, path, meta, started)
        if background:
            others = {n: _snapshot(p) for n, p in layouts.items() if n not in states}
            ready = None
            if any(t.device.type == "cuda" for lay in states.values() for t in lay.tensors):
                ready = torch.cuda.Event()
                ready.record()  # the copies start after the work queued so far
            pending.background = True
            pending.thread = threading.Thread(
                target=self._write_in_background, args=(pending, layouts, states, others, ready),
                name="skyspot-ckpt", daemon=True)
            self._pending = pending
            pending.thread.start()
            pending.stall += time.monotonic() - started
        else:
            self._write(pending, layouts, {})
            pending.stall = time.monotonic() - started
            self._pending = pending
            self.wait()
        return abandoned

    def before_update(self) -> float:
        """Call right before every ``optimizer.step()``: waits, if it must, for the snapshot
        of an async save to finish copying, since the step changes the weights. Returns
        the seconds waited (0 when the copy ran entirely under the step's compute)."""
        pending = self._pending
        if pending is None or pending.copied.is_set():
            return 0.0
        started = time.monotonic()
        pending.copied.wait()
        waited = time.monotonic() - started
        pending.snapshot_wait += waited
        pending.stall += waited
        log.debug("waited %.3fs for the step-%d snapshot before the optimizer step",
                  waited, pending.step)
        return waited

    def at_step_boundary(self, *flags: bool) -> tuple[bool, ...]:
        """Agree on ``flags`` across ranks (any rank True -> True on all) in one all-reduce,
        and move an async save along: once every rank has written its files, rank 0 commits
        it on a thread; once that is done, its outcome is reported here."""
        pending = self._pending
        writing = pending is not None and pending.stage == "writing" and (
            pending.thread is not None and pending.thread.is_alive())
        commit_done = pending is not None and pending.stage == "committing" and (
            self.rank == 0 and not pending.commit_thread.is_alive())
        values = [float(bool(flag)) for flag in flags] + [float(writing), float(commit_done)]
        if _dist_on():
            tensor = torch.tensor(values, dtype=torch.float32)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            values = tensor.tolist()
        if pending is not None and pending.stage == "writing" and not values[-2]:
            started = time.monotonic()
            self._start_commit(pending, inline=False)
            pending.stall += time.monotonic() - started
        elif pending is not None and pending.stage == "committing" and values[-1]:
            self._finish_commit(pending)  # counts its own time
        return tuple(bool(value) for value in values[:-2])

    def backlog(self) -> str | None:
        """Collective, right after ``at_step_boundary``: why a periodic save due now would
        only queue up (the previous one is still being written or committed, or is not yet
        whole in the bucket), or None if it can go ahead. Lists the bucket at most once, and
        only while no checkpoint file is open: a subprocess started while a file is open
        for writing flushes it early on upload-on-close mounts. When the bucket can't be
        listed it never skips: a save that may only queue beats no save at all."""
        if self._pending is not None:  # at_step_boundary saw it not yet committed
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
        pending = self._pending
        if pending is None:
            return
        started = time.monotonic()
        if pending.stage == "writing":
            if pending.thread is not None:
                pending.thread.join()
            pending.stall += time.monotonic() - started
            self._start_commit(pending, inline=True)
        elif self.rank == 0:
            pending.commit_thread.join()
            pending.stall += time.monotonic() - started
        self._finish_commit(pending)

    def _abandon(self) -> int | None:
        """Collective: drop a save whose files are still being written (every rank is at
        the same stage). Each rank stops its writer at the next 8 MiB chunk and deletes the
        files it created, so a bucket mount does not go on uploading them; the directory
        never gets a manifest, so it is never chosen, and retention removes it."""
        pending = self._pending
        if pending is None or pending.stage != "writing" or pending.thread is None:
            return None
        pending.cancel.set()
        pending.thread.join()
        for name in pending.opened:
            with contextlib.suppress(OSError):
                (pending.path / name).unlink()
        self._pending = None
        log.info("abandoned the checkpoint at step %d, still being written, for the final save",
                 pending.step)
        return pending.step

    def _check_memory(self, states: dict[str, Layout]) -> None:
        """Collective: one line on every rank, before anything is allocated, when some
        rank's snapshot buffers won't fit."""
        problem = None
        needed = self._staging.missing_bytes(states)
        available = available_memory() if needed else None
        # 1 GiB or 10% of the state left over for everything else the process allocates.
        if available is not None and needed + max(1 << 30, needed // 10) > available:
            problem = (f"async checkpoints keep one copy of the state in host memory: "
                       f"{needed / 1e9:.2f} GB, and this machine has {available / 1e9:.2f} GB "
                       "available (MemAvailable): checkpoint synchronously (drop "
                       "--async-checkpoint) or use a machine with more memory")
        if _dist_on():
            everyone: list[Any] = [None] * self.world_size
            dist.all_gather_object(everyone, problem)
            problem = next((found for found in everyone if found), None)
        if problem:
            raise CheckpointError(problem)

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

    def _write_in_background(self, pending: _Pending, layouts: dict[str, Any],
                             states: dict[str, Layout], others: dict[str, Any],
                             ready: Any) -> None:
        """The writer thread: snapshot, then write from the snapshot."""
        try:
            staged = self._staging.take(states)
            pairs = [(src, dst) for name, layout in states.items()
                     for src, dst in zip(layout.tensors, staged[name], strict=True)]
            if ready is not None:  # state on a GPU: DMA into pinned memory on a side stream
                device = next(src.device for src, _ in pairs if src.device.type == "cuda")
                with torch.cuda.device(device):  # a new thread starts on cuda:0
                    if self._stream is None:
                        self._stream = torch.cuda.Stream()
                    self._stream.wait_event(ready)  # after the optimizer step's kernels
                    with torch.cuda.stream(self._stream):
                        for src, dst in pairs:
                            dst.copy_(src, non_blocking=True)
                    self._stream.synchronize()
            else:
                delay = float(os.environ.get(COPY_DELAY_ENV) or 0)
                for src, dst in pairs:
                    if pending.cancel.is_set():
                        raise Abandoned
                    dst.copy_(src)  # torch lets go of the GIL: the loop runs meanwhile
                    if delay:
                        pending.cancel.wait(delay)
        except BaseException as err:  # reported on the main thread by _start_commit
            pending.error = err
            return
        finally:
            pending.copied.set()  # never leave before_update() waiting
        # In the caller's order (the last file before the manifest is the caller's last).
        self._write(pending, {name: others.get(name, payload)
                              for name, payload in layouts.items()}, staged)

    def _write(self, pending: _Pending, files: dict[str, Any],
               staged: dict[str, list[torch.Tensor]]) -> None:
        delay = float(os.environ.get(ASYNC_WRITE_DELAY_ENV) or 0) if pending.background else 0
        try:
            if self.finite:  # before the first file: a doomed save writes nothing
                for name, layout in files.items():
                    if isinstance(layout, Layout):
                        bad = first_nonfinite(zip(layout.names, staged.get(name, layout.tensors),
                                                  strict=True))
                        if bad is not None:
                            raise NonFiniteState(f"{name}: {bad} is nan/inf", pending.step)
            pending.path.mkdir(parents=True, exist_ok=True)
            for name, payload in files.items():
                pending.opened.append(name)
                pending.entries.append(write_file(pending.path, name, payload,
                                                  tensors=staged.get(name),
                                                  cancel=pending.cancel))
                if delay:
                    pending.cancel.wait(delay)
        except BaseException as err:  # reported on the main thread by _start_commit
            pending.error = err

    def _start_commit(self, pending: _Pending, *, inline: bool) -> None:
        """Collective, once every rank has written: gather the entries; rank 0 writes the
        manifest and applies retention, on a thread of its own unless ``inline``."""
        if pending.thread is not None:
            pending.thread.join()  # already finished on this rank; join publishes its results
        error = pending.error
        nonfinite = [str(error)] if isinstance(error, NonFiniteState) else []
        failed = [error is not None]
        if _dist_on():
            everyone: list[Any] = [None] * self.world_size
            dist.all_gather_object(everyone, (pending.entries, repr(error), nonfinite))
            failed = [err != "None" for _, err, _ in everyone]
            entries = [entry for rank_entries, _, _ in everyone for entry in rank_entries]
            nonfinite = [what for _, _, found in everyone for what in found]
        else:
            entries = pending.entries
        if any(failed):
            # Nothing is committed: the directory has no manifest and will never verify.
            self._pending = None
            if nonfinite:  # on every rank alike, whichever rank found it
                raise NonFiniteState(nonfinite[0], pending.step)
            if isinstance(error, OSError):
                raise CheckpointWriteError(describe_os_error(error, where=self._where)
                                           + _NOTHING_LOST)
            raise CheckpointError(
                f"writing checkpoint {pending.path} failed: {error or 'on another rank'}")
        pending.stage = "committing"
        if self.rank != 0:
            return
        if inline:
            self._commit_job(pending, entries)
        else:
            pending.commit_thread = threading.Thread(
                target=self._commit_job, args=(pending, entries), name="skyspot-commit",
                daemon=True)
            pending.commit_thread.start()

    def _commit_job(self, pending: _Pending, entries: list[FileEntry]) -> None:
        try:
            pending.committed = self._commit_on_rank0(pending, entries)
        except BaseException as err:  # reported on the main thread by _finish_commit
            pending.commit_error = err

    def _finish_commit(self, pending: _Pending) -> None:
        """Collective: every rank learns rank 0's outcome (also the barrier: no rank runs
        ahead of a commit it may need to resume from); rank 0 reports it."""
        self._pending = None
        started = time.monotonic()
        outcome: list[Any] = [None]
        if self.rank == 0 and pending.commit_error is not None:
            error = pending.commit_error
            outcome[0] = error if isinstance(error, CheckpointError) else CheckpointError(
                f"committing checkpoint {pending.path} failed on rank 0: {error}")
        if _dist_on():
            dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            if self.rank == 0 and not isinstance(pending.commit_error, CheckpointError):
                raise pending.commit_error
            raise outcome[0]
        pending.stall += time.monotonic() - started
        saved = pending.committed
        if saved is not None and self.on_commit is not None:
            saved.stall_seconds = pending.stall
            saved.snapshot_wait_seconds = pending.snapshot_wait
            self.on_commit(saved)

    def _commit_on_rank0(self, pending: _Pending, entries: list[FileEntry]) -> Committed:
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
        seconds = time.monotonic() - pending.started
        self._committed[pending.path] = {
            **{entry.path: entry.size for entry in entries}, MANIFEST: written.size}
        durable_step = self._apply_retention()
        return Committed(
            path=pending.path,
            step=pending.step,
            bytes=sum(entry.size for entry in entries),
            seconds=seconds,
            async_save=pending.background,
            durable_step=durable_step,
            durability=self.durability.kind,
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
