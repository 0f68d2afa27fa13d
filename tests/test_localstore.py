"""tools/localstore.py: a real S3 server and real FUSE mounts with SkyPilot's semantics.

What the checkpoint protocol depends on, shown through real ``rclone mount`` processes and
read back through the S3 API (never the server's backing directory):

- MOUNT_CACHED: a closed file reaches the bucket only after write-back, uploads run in
  parallel so a small manifest written after a big file lands first, and a lost VM loses
  what was not uploaded (the bucket then holds a manifest without its data).
- A process killed mid-write on a live VM leaves its partial file, which is uploaded under
  its final name.
- MOUNT (goofys-like): no appends, a file is an object once closed and not before.
- Nothing is left mounted or running afterwards, even when the body raises.

The FUSE tests are skipped where /dev/fuse or fusermount3 is absent, saying which and how to
get it (`make setup` as root installs fuse3).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import localstore  # noqa: E402

MiB = 1 << 20


@pytest.fixture
def fuse() -> None:
    ok, reason = localstore.fuse_available()
    if not ok:
        pytest.skip(f"needs FUSE: {reason}")


@pytest.fixture
def store(tmp_path):
    s = localstore.LocalObjectStore(tmp_path / "store").start()
    try:
        yield s
    finally:
        s.close()
        assert not _our_mounts(tmp_path), "close() left a mount behind"


def _our_mounts(under: Path) -> list[str]:
    """fuse.rclone mount points under ``under``, from /proc/mounts."""
    found = []
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "fuse.rclone" and fields[1].startswith(str(under)):
            found.append(fields[1])
    return found


def _our_processes(under: Path) -> list[int]:
    """Live processes whose command line mentions ``under`` (our rclone server and mounts)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(under) in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


def _mountinfo_source(mount_point: Path) -> tuple[str, str]:
    """(fstype, source) of mount_point in /proc/self/mountinfo."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if left.split()[4] == str(mount_point):
            fstype, source = right.split()[:2]
            return fstype, source
    raise AssertionError(f"{mount_point} not in mountinfo")


def _wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)
    return result


# --- flags and server (no FUSE needed) ---------------------------------------------------


def test_mount_cached_flags_are_skypilots():
    flags = " ".join(localstore.mount_cached_flags())
    for expected in ("--vfs-cache-mode full", "--dir-cache-time 10s",
                     "--vfs-cache-poll-interval 10s", "--vfs-fast-fingerprint",
                     "--vfs-write-back 1s"):
        assert expected in flags
    for vm_only in ("--daemon", "--log-file", "--log-level", "--allow-other", "--cache-dir"):
        assert vm_only not in flags.split()
    rw = " ".join(localstore.mount_cached_flags("MODEL_CHECKPOINT_RW"))
    assert "--transfers 8" in rw and "--vfs-write-back 1s" in rw
    with pytest.raises(ValueError, match="unknown mount type"):
        localstore.mount_cached_flags("NOT_A_TYPE")


def test_server_serves_buckets_through_the_s3_api(store, tmp_path):
    # serve s3 refuses very short access keys (403 InvalidAccessKeyId).
    assert len(store.access_key) >= 16 and len(store.secret_key) >= 16
    store.create_bucket("ckpt-bucket")
    source = tmp_path / "hello.txt"
    source.write_bytes(b"hello")
    store.rclone("copyto", str(source), f"{store.remote}:ckpt-bucket/run/a/hello.txt")
    store.rclone("copyto", str(source), f"{store.remote}:ckpt-bucket/other.txt")
    assert store.list_objects("ckpt-bucket") == {"run/a/hello.txt": 5, "other.txt": 5}
    assert store.list_objects("ckpt-bucket", prefix="run/") == {"run/a/hello.txt": 5}
    assert store.read_object("ckpt-bucket", "run/a/hello.txt") == b"hello"
    with pytest.raises(FileNotFoundError):
        store.read_object("ckpt-bucket", "missing")
    (tmp_path / "empty").write_bytes(b"")
    store.rclone("copyto", str(tmp_path / "empty"), f"{store.remote}:ckpt-bucket/empty")
    assert store.read_object("ckpt-bucket", "empty") == b""
    with pytest.raises(ValueError, match="bucket name"):
        store.create_bucket("x")
    # The config file alone is enough for the rclone CLI, as on a SkyPilot node.
    out = subprocess.run([localstore.rclone_binary(), "lsjson", "-R", "--files-only",
                          f"{localstore.REMOTE}:ckpt-bucket"], capture_output=True, text=True,
                         env={**os.environ, "RCLONE_CONFIG": str(store.rclone_config)},
                         check=True).stdout
    assert sorted(item["Path"] for item in json.loads(out)) == [
        "empty", "other.txt", "run/a/hello.txt"]
    # Authentication is enforced: a wrong secret is refused.
    bad = tmp_path / "bad.conf"
    bad.write_text(store.rclone_config.read_text().replace(store.secret_key, "x" * 40))
    refused = subprocess.run([localstore.rclone_binary(), "lsjson", "--retries", "1",
                              f"{localstore.REMOTE}:ckpt-bucket"], capture_output=True,
                             env={**os.environ, "RCLONE_CONFIG": str(bad)})
    assert refused.returncode != 0


# --- MOUNT_CACHED ------------------------------------------------------------------------


def test_mount_cached_uploads_after_write_back(fuse, store, tmp_path):
    store.create_bucket("wb-bucket")
    mnt = tmp_path / "mnt"
    m = store.mount("wb-bucket", mnt, cache_dir=tmp_path / "cache", bwlimit="1M")
    # The trainer finds the remote behind its checkpoint dir from mountinfo.
    assert _mountinfo_source(mnt) == ("fuse.rclone", f"{localstore.REMOTE}:wb-bucket")

    (mnt / "small.txt").write_bytes(b"s" * 1000)  # written and closed
    assert "small.txt" not in store.list_objects("wb-bucket"), "uploaded before write-back"
    big = os.urandom(2 * MiB)
    (mnt / "big.bin").write_bytes(big)
    assert m.pending_uploads() > 0
    m.wait_uploaded(timeout_s=30)
    assert m.pending_uploads() == 0
    assert store.list_objects("wb-bucket") == {"small.txt": 1000, "big.bin": 2 * MiB}
    assert store.read_object("wb-bucket", "big.bin") == big


def test_manifest_lands_first_and_a_lost_vm_loses_the_data(fuse, store, tmp_path):
    """The fault the checkpoint code must survive: a manifest in the bucket without its data."""
    store.create_bucket("ckpt")
    m = store.mount("ckpt", tmp_path / "mnt", cache_dir=tmp_path / "cache", bwlimit="1M",
                    mount_type="MODEL_CHECKPOINT_RW")
    step = tmp_path / "mnt" / "step-00000010"
    step.mkdir()
    (step / "model.safetensors").write_bytes(os.urandom(4 * MiB))  # closed first
    (step / "manifest.json").write_text('{"files": ["model.safetensors"]}')  # closed last

    listed = _wait_for(
        lambda: (objs := store.list_objects("ckpt")) and "step-00000010/manifest.json" in objs
        and objs, timeout_s=20, what="the manifest in the bucket")
    # serve s3 publishes a PUT atomically, so "not yet complete" is "not listed".
    assert "step-00000010/model.safetensors" not in listed, listed
    assert m.pending_uploads() > 0  # the big file is still uploading

    m.lose_vm()
    assert not (tmp_path / "cache").exists()
    assert localstore.mounted_fstype(tmp_path / "mnt") is None
    assert not m.alive()
    after = store.list_objects("ckpt")
    assert "step-00000010/manifest.json" in after
    assert "step-00000010/model.safetensors" not in after, after  # the upload died with it

    # A fresh VM mounts the bucket with an empty cache: manifest yes, complete data no.
    fresh = tmp_path / "mnt2"
    store.mount("ckpt", fresh, cache_dir=tmp_path / "cache2")
    assert (fresh / "step-00000010" / "manifest.json").exists()
    data = fresh / "step-00000010" / "model.safetensors"
    assert not data.exists() or data.stat().st_size < 4 * MiB


WRITER = textwrap.dedent("""
    import os, sys
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    os.write(fd, b"p" * int(sys.argv[2]))
    print("written", flush=True)
    sys.stdin.readline()  # told to close, or killed while waiting
    os.close(fd)
    print("closed", flush=True)
    sys.stdin.readline()
""")


def _writer(path: Path, size: int) -> subprocess.Popen:
    """A separate process holding ``path`` open for writing after ``size`` bytes.

    The test process must not hold the file itself: every fork+exec here (rclone lsjson)
    would close an inherited copy of the fd, and FUSE turns each close into a FLUSH, which
    ends a MOUNT-mode upload early.
    """
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(size)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    return proc


def test_process_killed_mid_write_leaves_partial_file_uploaded(fuse, store, tmp_path):
    store.create_bucket("ckpt")
    mnt = tmp_path / "mnt"
    m = store.mount("ckpt", mnt, cache_dir=tmp_path / "cache")
    writer = _writer(mnt / "model.safetensors", MiB)  # meant to be bigger: killed mid-write
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)
    writer.stdin.close()
    writer.stdout.close()

    # The VM lives on: the mount is up and rclone uploads the partial file as it is.
    assert localstore.mounted_fstype(mnt) == "fuse.rclone" and m.alive()
    listed = _wait_for(lambda: store.list_objects("ckpt"), timeout_s=20, what="the upload")
    m.wait_uploaded(timeout_s=20)
    assert listed == {"model.safetensors": MiB}  # final name, partial size, no temp names
    assert store.read_object("ckpt", "model.safetensors") == b"p" * MiB
    assert (mnt / "model.safetensors").stat().st_size == MiB


def test_mount_failures_are_clear_and_a_taken_port_is_retried(fuse, store, tmp_path,
                                                              monkeypatch):
    store.create_bucket("bkt")
    busy_dir = tmp_path / "not-empty"
    busy_dir.mkdir()
    (busy_dir / "file").write_text("x")
    with pytest.raises(RuntimeError, match="not empty"):  # rclone's own words, from its log
        store.mount("bkt", busy_dir, cache_dir=tmp_path / "c0")
    assert localstore.mounted_fstype(busy_dir) is None

    # The "free" rc port is taken by the time rclone binds it: a second port is tried.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        ports = iter([taken_port])
        real_free_port = localstore._free_port
        monkeypatch.setattr(localstore, "_free_port",
                            lambda host="127.0.0.1": next(ports, None) or real_free_port(host))
        m = store.mount("bkt", tmp_path / "mnt", mode="MOUNT", cache_dir=tmp_path / "c1")
    assert m.alive() and f":{taken_port}/" not in m.rc_url
    assert m.rc("vfs/stats")["fs"] == f"{localstore.REMOTE}:bkt"


# --- MOUNT (goofys-like) -----------------------------------------------------------------


def test_mount_mode_uploads_on_close_and_refuses_appends(fuse, store, tmp_path):
    store.create_bucket("plain")
    mnt = tmp_path / "mnt"
    m = store.mount("plain", mnt, mode="MOUNT", cache_dir=tmp_path / "cache")
    assert m.pending_uploads() == 0

    writer = _writer(mnt / "events-0001.jsonl", 300 * 1024)
    time.sleep(0.3)  # let the stream reach the server
    assert "events-0001.jsonl" not in store.list_objects("plain"), "visible before close"
    writer.stdin.write("close\n")
    writer.stdin.flush()
    assert writer.stdout.readline().strip() == "closed"
    # No write-back delay: in the bucket as soon as close() returned.
    assert store.list_objects("plain") == {"events-0001.jsonl": 300 * 1024}
    writer.stdin.close()
    writer.wait(timeout=10)
    writer.stdout.close()

    with pytest.raises(OSError):  # append to an existing object
        with open(mnt / "events-0001.jsonl", "ab") as f:
            f.write(b"more")
    with pytest.raises(OSError):  # random write
        with open(mnt / "random.bin", "wb") as f:
            f.write(b"x" * 100)
            f.seek(0)
            f.write(b"y")
    assert store.list_objects("plain")["events-0001.jsonl"] == 300 * 1024


# --- cleanup -----------------------------------------------------------------------------


def test_close_leaves_nothing_behind(fuse, tmp_path):
    root = tmp_path / "a"
    with localstore.LocalObjectStore(root) as s:
        s.create_bucket("bkt")
        cached = s.mount("bkt", root / "mnt-cached", cache_dir=root / "c1")
        s.mount("bkt", root / "mnt-plain", mode="MOUNT", cache_dir=root / "c2")
        (root / "mnt-cached" / "x.bin").write_bytes(b"x" * 1000)
        busy = open(root / "mnt-cached" / "x.bin", "rb")  # held open: unmount is busy
        pids = [s.server_pid, *(mount.pid for mount in s.mounts)]
        assert len(_our_processes(root)) == 3
    try:
        assert not _our_mounts(root)  # the busy one went lazily
        assert not _our_processes(root), "rclone processes left running"
        assert all(not Path(f"/proc/{pid}/cmdline").exists() for pid in pids)
        assert not cached.mounted and not cached.alive()
        s.close()  # idempotent
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: its filesystem is gone
            busy.close()

    root = tmp_path / "b"
    with pytest.raises(RuntimeError, match="boom"):
        with localstore.LocalObjectStore(root) as s:
            s.create_bucket("bkt")
            s.mount("bkt", root / "mnt", cache_dir=root / "cache")
            (root / "mnt" / "y.bin").write_bytes(b"y")
            raise RuntimeError("boom")
    assert not _our_mounts(root)
    assert not _our_processes(root)


def test_killed_owner_does_not_leave_a_mount(fuse, tmp_path):
    """If the Python that owns the store is SIGKILLed, its rclone processes follow it."""
    root = tmp_path / "owner"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO / "tools")!r})
        import localstore
        s = localstore.LocalObjectStore({str(root)!r}).start()
        s.create_bucket("bkt")
        s.mount("bkt", {str(root / "mnt")!r}, mode="MOUNT", cache_dir={str(root / "c")!r})
        print("mounted", flush=True)
        time.sleep(60)
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "mounted"
        assert _our_mounts(root)
    finally:
        owner.kill()
        owner.wait(timeout=10)
        owner.stdout.close()
    _wait_for(lambda: not _our_processes(root), timeout_s=10, what="rclone to exit")
    assert not _our_mounts(root)


# Last: it clears the cached flags, which the next mount would have to read again.
def test_mount_cached_flags_fallback_is_a_faithful_copy(monkeypatch):
    live = {t: localstore.mount_cached_flags(t) for t in localstore._SKYPILOT_0_14_1_EXTRA}
    # Without skypilot (its import fails in the child) the hard-coded copy is used.
    localstore._skypilot_mount_commands.cache_clear()
    monkeypatch.setattr(localstore, "_FLAGS_SCRIPT",
                        "import sys; sys.modules['sky'] = None\n" + localstore._FLAGS_SCRIPT)
    try:
        copies = {t: localstore.mount_cached_flags(t) for t in live}
        with pytest.raises(ValueError, match="unknown mount type"):
            localstore.mount_cached_flags("NOT_A_TYPE")
    finally:
        localstore._skypilot_mount_commands.cache_clear()
    assert copies[None][:2] == ["--vfs-cache-mode", "full"]
    if importlib.metadata.version("skypilot") == "0.14.1":
        assert copies == live
