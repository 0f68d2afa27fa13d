"""The checkpoint protocol on a real bucket: a local S3 server mounted through FUSE exactly as
SkyPilot mounts it (tools/localstore.py). What the bucket holds is always read through the
S3 API, never through the node's mount or its cache.

- Retention never leaves the bucket without a complete checkpoint, however far uploads lag.
- After a lost VM (mount killed, cache deleted), resume through a fresh mount picks exactly
  the newest checkpoint that is complete in the bucket, including when a manifest reached
  the bucket before the files it lists.
- MOUNT mode (upload on close, no append) works and reports durability at once.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest
import torch
import xxhash

from skyspot.checkpoint import MANIFEST, Checkpointer, latest_valid

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import localstore  # noqa: E402

FUSE_OK, FUSE_WHY = localstore.fuse_available()
if not FUSE_OK:  # no /dev/fuse, or fuse3 not installed (`make setup` as root installs it)
    pytest.skip(f"needs FUSE: {FUSE_WHY}", allow_module_level=True)

BUCKET = "ckpt"


@pytest.fixture
def store(tmp_path, monkeypatch):
    with localstore.LocalObjectStore(tmp_path / "store") as s:
        s.create_bucket(BUCKET)
        # What a SkyPilot node has: the rclone config of the mount's remote.
        monkeypatch.setenv("RCLONE_CONFIG", str(s.rclone_config))
        yield s


def _mount(store, tmp_path, name, mode="MOUNT_CACHED", **kw):
    preset = "MODEL_CHECKPOINT_RW" if mode == "MOUNT_CACHED" else None  # the recipes' type:
    return store.mount(BUCKET, tmp_path / name / "mnt", cache_dir=tmp_path / name / "cache",
                       mode=mode, mount_type=preset, **kw)


def complete_in_bucket(store, run: str) -> list[int]:
    """Steps whose manifest and every listed file are in the bucket with the listed size
    and checksum, read through the S3 API."""
    import json

    objects = store.list_objects(BUCKET, run + "/")
    steps = []
    for key in sorted(k for k in objects if k.endswith("/" + MANIFEST)):
        directory = key[: -len(MANIFEST) - 1]
        manifest = json.loads(store.read_object(BUCKET, key))
        ok = all(
            objects.get(f"{directory}/{entry['path']}") == entry["size"]
            and xxhash.xxh3_128(store.read_object(BUCKET, f"{directory}/{entry['path']}"))
            .hexdigest() == entry["xxh3_128"]
            for entry in manifest["files"])
        if ok:
            steps.append(manifest["step"])
    return sorted(steps)


def _state(step: int, mbytes: float) -> dict:
    generator = torch.Generator().manual_seed(step)
    return {"model.pt": {"w": torch.randn(int(mbytes * 2**18), generator=generator)},
            "rng-rank0.pt": {"step": step}}


def test_retention_never_empties_the_bucket_while_uploads_lag(store, tmp_path):
    # 2 MB/s for 1 MB checkpoints every 0.2 s: the bucket falls further and further behind.
    mount = _mount(store, tmp_path, "node", bwlimit="2M")
    run = mount.mount_point / "run"
    commits = []
    ckpt = Checkpointer(run, keep_last=2, on_commit=commits.append)
    assert ckpt.durability.kind == "bucket listing"
    ever_complete = False
    for step in range(1, 9):
        ckpt.save(step, _state(step, 1.0), meta={"step": step})  # 1 MB
        time.sleep(0.2)
        complete = complete_in_bucket(store, "run")
        ever_complete = ever_complete or bool(complete)
        if ever_complete:
            assert complete, f"after step {step} the bucket holds no complete checkpoint"
    assert any(c.durable_step is None or c.durable_step < c.step for c in commits), \
        "uploads never lagged: the test did not exercise the protocol"
    assert commits[-1].durable_step is None or commits[-1].durable_step < 8

    mount.lose_vm()  # mid-upload: whatever was not uploaded is gone
    truth = complete_in_bucket(store, "run")
    assert truth, "a lost VM left no complete checkpoint in the bucket"
    fresh = _mount(store, tmp_path, "node2")
    assert latest_valid(fresh.mount_point / "run").step == truth[-1]


def test_manifest_that_beat_its_data_to_the_bucket_is_not_resumed_from(store, tmp_path, caplog):
    mount = _mount(store, tmp_path, "node", bwlimit="1M")
    run = mount.mount_point / "run"
    ckpt = Checkpointer(run, keep_last=2)
    ckpt.save(10, _state(10, 0.25), meta={})
    ckpt.wait_durable(60)
    assert complete_in_bucket(store, "run") == [10]
    ckpt.save(20, _state(20, 6.0), meta={})  # 6 MB at 1 MB/s; the manifest is tiny
    deadline = time.monotonic() + 30
    while True:  # a GET, not a listing: rclone serve s3 holds listings behind uploads
        try:
            store.read_object(BUCKET, "run/step-00000020/manifest.json")
            break
        except FileNotFoundError:
            assert time.monotonic() < deadline, "the manifest never reached the bucket"
            time.sleep(0.1)
    mount.lose_vm()  # strike now: the manifest is in the bucket, its 6 MB of data are not
    assert complete_in_bucket(store, "run") == [10]
    assert "run/step-00000020/manifest.json" in store.list_objects(BUCKET, "run/")

    fresh = _mount(store, tmp_path, "node2")
    with caplog.at_level(logging.WARNING, logger="skyspot.checkpoint"):
        chosen = latest_valid(fresh.mount_point / "run")
    assert chosen.step == 10
    assert any("step-00000020" in r.getMessage() and "model.pt" in r.getMessage()
               for r in caplog.records)


def test_mount_mode_writes_sequentially_and_is_durable_on_close(store, tmp_path):
    mount = _mount(store, tmp_path, "node", mode="MOUNT")
    run = mount.mount_point / "run"
    commits = []
    ckpt = Checkpointer(run, keep_last=2, async_save=True, on_commit=commits.append)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step, 0.5), meta={})
        ckpt.wait()
    assert [c.durable_step for c in commits] == [1, 2, 3]
    assert complete_in_bucket(store, "run") == [2, 3]
    assert latest_valid(run).step == 3


def test_backlog_holds_the_next_save_until_the_previous_is_in_the_bucket(store, tmp_path):
    mount = _mount(store, tmp_path, "node", bwlimit="1M")
    ckpt = Checkpointer(mount.mount_point / "run", keep_last=2)
    ckpt.save(1, _state(1, 2.0), meta={})  # 2 MB at 1 MB/s
    assert ckpt.backlog() == "step 1 is not yet in the bucket (bucket listing)"
    assert complete_in_bucket(store, "run") == []  # the S3 API agrees: not there yet
    assert ckpt.wait_durable(60) == 1
    assert complete_in_bucket(store, "run") == [1]
    assert ckpt.backlog() is None
