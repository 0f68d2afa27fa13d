"""Buckets: one local object store, one mount per bucket per node (or plain directories).

``Buckets`` places every bucket of the recipe where each node sees it, mounts them per VM and
loses a node's mounts (and caches) with its VM. ``scan_bucket`` reads a bucket through the S3
API, never a node's mount or cache, and says which checkpoints are complete in it.
``choose_storage`` decides between real buckets over FUSE and the plain-directory fallback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import localstore
import xxhash

from rehearsal.recipe import BadInput, Recipe, StorageSpec, one_line

DEV_FUSE = Path("/dev/fuse")
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's rules; serve s3 checks
BUCKET_MODES = ("MOUNT", "MOUNT_CACHED")
CHECKPOINT_DIR = re.compile(r"^step-(\d{8})(?:\.r(\d+))?$")
CHECKPOINT_FORMAT = "skyspot-checkpoint/1"
MANIFEST = "manifest.json"


class StorageError(Exception):
    """The local object store or a mount failed: printed as one line, the rehearsal stops."""


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
                 note: str | None = None, host: str = "127.0.0.1") -> None:
        self.recipe, self.workdir, self.fuse, self.bwlimit = recipe, workdir, fuse, bwlimit
        self.note = note
        self.host = host  # where the store and the mounts' remote control listen
        self.store: localstore.LocalObjectStore | None = None
        self.endpoint: str | None = None
        self.data_dir = workdir / "store" / "data" if fuse else workdir / "buckets"
        self.nodes: dict[int, list[NodeMount]] = {r: [] for r in range(recipe.num_nodes)}
        self.copies: list[Mount] = []  # file_mounts copied to every node: the same everywhere
        self.prefix = ""  # "job<J>-" for a job of a pool: its nodes' directory names
        self.parent: Buckets | None = None  # a pool's first job: owns the store and copies

    def for_job(self, prefix: str) -> Buckets:
        """The buckets as another job of the same pool sees them: the same store and buckets,
        mounts of its own on each of its nodes (start() makes them, close() leaves the
        store to this one)."""
        other = Buckets(self.recipe, self.workdir, fuse=self.fuse, bwlimit=self.bwlimit,
                        note=self.note, host=self.host)
        other.prefix, other.parent = prefix, self
        return other

    @property
    def buckets(self) -> list[str]:
        return sorted({spec.bucket for spec in self.recipe.storage_mounts.values()})

    def start(self) -> None:
        """Create the store and the buckets, upload local sources; mounts come per attempt."""
        if self.parent is not None:
            self.store, self.endpoint = self.parent.store, self.parent.endpoint
            self.copies = self.parent.copies
        elif self.fuse:
            try:
                self.store = localstore.LocalObjectStore(self.workdir / "store",
                                                         host=self.host).start()
                self.endpoint = self.store.endpoint
                for bucket in self.buckets:
                    self.store.create_bucket(bucket)
            except (RuntimeError, ValueError, OSError) as err:
                raise StorageError(f"local object store: {one_line(err)}") from None
        used: dict[str, int] = {}
        for path, spec in self.recipe.storage_mounts.items():
            if self.parent is None:
                self._upload_sources(spec)
            name = spec.bucket if spec.bucket not in used else f"{spec.bucket}.{used[spec.bucket]}"
            used[spec.bucket] = used.get(spec.bucket, 0) + 1
            for rank in self.nodes:
                node = self.workdir / "nodes" / f"{self.prefix}node{rank}"
                if not self.fuse:  # one directory per bucket, shared by every node
                    nm = NodeMount(rank, path, spec, self.data_dir / spec.bucket, up=True,
                                   mounted=1)
                    nm.local.mkdir(parents=True, exist_ok=True)
                elif spec.mode in BUCKET_MODES:
                    nm = NodeMount(rank, path, spec, node / "mnt" / name,
                                   cache_dir=node / "cache" / name,
                                   log_file=self.workdir / "logs" /
                                   f"rclone-{self.prefix}node{rank}-{name}.log")
                else:  # COPY: downloaded onto each fresh VM
                    nm = NodeMount(rank, path, spec, node / "copy" / name)
                self.nodes[rank].append(nm)
        for path, source in self.recipe.copy_mounts.items() if self.parent is None else ():
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
        if self.parent is not None:  # the store (and every mount of it) is the parent's
            self.store = None
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

    def unuploaded(self, rank: int) -> list[dict]:
        """What the node wrote that its bucket does not hold: every file in the rclone VFS
        caches of its mounts (``<cache_dir>/vfs/<remote>/<bucket>/<key>``) that is missing
        from the bucket or has another size there, [{bucket, key, bytes}] by bucket and key.
        Read just before its VM is lost, while the caches are still there; the caches first,
        so a file uploaded meanwhile counts as in the bucket. [] on plain directories and for
        MOUNT (no cache: a file is in the bucket once closed, or nowhere)."""
        cached: dict[tuple[str, str], int] = {}
        for nm in self.nodes[rank]:
            if not self.fuse or not nm.up or nm.spec.mode not in BUCKET_MODES:
                continue
            cache_dir = nm.live.cache_dir if nm.live is not None else nm.cache_dir
            if cache_dir is None:
                continue
            for root in sorted(Path(cache_dir).glob(f"vfs/*/{nm.spec.bucket}")):
                for path in root.rglob("*"):
                    try:
                        if path.is_file():
                            key = (nm.spec.bucket, path.relative_to(root).as_posix())
                            cached[key] = max(cached.get(key, 0), path.stat().st_size)
                    except OSError:
                        continue  # rclone moved or removed it meanwhile (uploaded, deleted)
        listings = {bucket: self.list_objects(bucket) for bucket in {b for b, _ in cached}}
        return [{"bucket": bucket, "key": key, "bytes": size}
                for (bucket, key), size in sorted(cached.items())
                if listings[bucket].get(key) != size]


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
        "objects": len(objects),  # the whole bucket's, whatever the recipe wrote
        "bytes": sum(objects.values()),
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
# Which storage a rehearsal gets


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
