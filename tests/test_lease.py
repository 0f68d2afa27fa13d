"""One writer per run: a second trainer on a live run is refused before it writes anything,
a dead owner's run is taken over (at once on the same machine, after the heartbeat timeout
from another), and a trainer that lost its run commits and deletes nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import pytest
import torch
from trainer import (
    REPO,
    assert_bit_identical,
    command,
    env_for,
    last_step,
    lm_args,
    read_events,
    start,
    wait_until,
    weights,
)

from skyspot.checkpoint import MANIFEST, Checkpointer, CheckpointError, step_dirs
from skyspot.lease import OWNER, LeaseError, LeaseLost, Owner, RunLease

HOLDER = """
import sys, time
from pathlib import Path
from skyspot.lease import RunLease
lease = RunLease(Path(sys.argv[1]), ttl_s=float(sys.argv[2]), heartbeat_s=float(sys.argv[3]))
lease.acquire()
print("acquired", flush=True)
time.sleep(600)
"""


def _holder(run_dir, ttl_s=20.0, heartbeat_s=3.0) -> subprocess.Popen:
    """Another process holding the run's lease, as a live trainer would."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(ttl_s),
                             str(heartbeat_s)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "acquired"
    return proc


def _foreign(run_dir, *, heartbeat_ago: float, ttl_s: float = 2.0) -> Owner:
    """A record written by a trainer on another machine (another boot id)."""
    now = time.time()
    owner = Owner(id="other-vm-4242-abcd", host="other-vm", pid=4242, boot_id="not-this-one",
                  pid_ns="pid:[1]", started=now - 100, claimed=now - 100,
                  heartbeat=now - heartbeat_ago, ttl_s=ttl_s)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / OWNER).write_text(json.dumps(asdict(owner)))
    return owner


def test_acquire_writes_a_record_and_release_removes_it(tmp_path):
    lease = RunLease(tmp_path)
    lease.acquire()
    try:
        record = json.loads((tmp_path / OWNER).read_text())
        assert record["id"] == lease.me.id
        lease.check()
    finally:
        lease.release()
    assert not (tmp_path / OWNER).exists()


def test_a_live_owner_on_this_machine_is_refused_at_once(tmp_path):
    holder = _holder(tmp_path)
    try:
        before = (tmp_path / OWNER).read_bytes()
        t0 = time.monotonic()
        with pytest.raises(LeaseError) as refused:
            RunLease(tmp_path).acquire()
        assert time.monotonic() - t0 < 5
        assert f"pid {holder.pid}" in str(refused.value)
        assert "another trainer" in str(refused.value)
        record = json.loads((tmp_path / OWNER).read_bytes())
        assert record["pid"] == holder.pid and record["id"] == json.loads(before)["id"]
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_owner_on_this_machine_is_taken_over_at_once(tmp_path):
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lease = RunLease(tmp_path)
    t0 = time.monotonic()
    lease.acquire()
    try:
        assert time.monotonic() - t0 < 5  # not the 20 s heartbeat timeout
        assert json.loads((tmp_path / OWNER).read_text())["id"] == lease.me.id
    finally:
        lease.release()


def test_a_lost_vm_whose_heartbeat_is_stale_is_taken_over_at_once(tmp_path):
    _foreign(tmp_path, heartbeat_ago=60, ttl_s=20)
    lease = RunLease(tmp_path)
    t0 = time.monotonic()
    lease.acquire()
    try:
        assert time.monotonic() - t0 < 3
    finally:
        lease.release()


def test_a_fresh_record_that_stops_beating_is_taken_over_after_the_timeout(tmp_path):
    """A VM lost a moment ago: its last heartbeat is fresh, and it never beats again."""
    _foreign(tmp_path, heartbeat_ago=0, ttl_s=2.0)
    lease = RunLease(tmp_path, ttl_s=2.0, heartbeat_s=0.5)
    t0 = time.monotonic()
    lease.acquire()
    try:
        waited = time.monotonic() - t0
        assert 1.5 <= waited < 6, waited
        assert json.loads((tmp_path / OWNER).read_text())["id"] == lease.me.id
    finally:
        lease.release()


def test_another_machine_whose_heartbeat_advances_is_refused(tmp_path):
    """A live trainer on another node: its record is not ours to judge by pid, but its
    heartbeat moves."""
    owner = _foreign(tmp_path, heartbeat_ago=0, ttl_s=4.0)
    stop = threading.Event()

    def beat():
        while not stop.wait(0.5):
            record = {**asdict(owner), "heartbeat": time.time()}
            (tmp_path / OWNER).write_text(json.dumps(record))

    beater = threading.Thread(target=beat)
    beater.start()
    try:
        with pytest.raises(LeaseError, match="host other-vm pid 4242.*heartbeat is advancing"):
            RunLease(tmp_path, ttl_s=4.0, heartbeat_s=1.0).acquire()
    finally:
        stop.set()
        beater.join()
    assert json.loads((tmp_path / OWNER).read_text())["id"] == owner.id


def _state(step: int) -> dict:
    return {"model.pt": {"w": torch.full((64,), float(step))}, "rng-rank0.pt": {"step": step}}


def test_a_writer_that_lost_the_run_commits_and_deletes_nothing(tmp_path):
    lease = RunLease(tmp_path, ttl_s=20.0, heartbeat_s=3.0)
    lease.acquire()
    try:
        ckpt = Checkpointer(tmp_path, keep_last=2, owner=lease)
        for step in (1, 2):
            ckpt.save(step, _state(step), meta={"step": step})
        # Another trainer takes the run over (it judged this one dead).
        _foreign(tmp_path, heartbeat_ago=0, ttl_s=20.0)
        with pytest.raises(LeaseLost, match="now owned by host other-vm pid 4242"):
            ckpt.save(3, _state(3), meta={"step": 3})
        # Step 3's files were written but never committed; 1 and 2 were not deleted.
        assert [s for s, _, _ in step_dirs(tmp_path)] == [3, 2, 1]
        assert not (tmp_path / "step-00000003" / MANIFEST).exists()
        assert (tmp_path / "step-00000001" / MANIFEST).exists()
        assert issubclass(LeaseLost, CheckpointError)  # the trainer reports it in one line
    finally:
        lease.release()
    # Release leaves the new owner's record alone.
    assert json.loads((tmp_path / OWNER).read_text())["host"] == "other-vm"


def test_the_heartbeat_stops_once_the_run_is_taken_over(tmp_path):
    lease = RunLease(tmp_path, ttl_s=2.0, heartbeat_s=0.3)
    lease.acquire()
    try:
        _foreign(tmp_path, heartbeat_ago=0)
        time.sleep(1.0)  # three heartbeats: none may overwrite the new owner's record
        assert json.loads((tmp_path / OWNER).read_text())["host"] == "other-vm"
        assert lease.lost_to is not None and lease.lost_to.host == "other-vm"
    finally:
        lease.release()


# --- the trainer -------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_trainer_on_a_live_run_is_refused_and_the_first_is_unharmed(tiny_assets,
                                                                             tmp_path):
    args = lm_args(tiny_assets, tmp_path / "ckpt", max_steps=40)
    base_args = lm_args(tiny_assets, tmp_path / "base", max_steps=40)
    baseline = subprocess.run(command(base_args), env=env_for(tmp_path / "base.jsonl"),
                              cwd=REPO, capture_output=True, text=True, timeout=600)
    assert baseline.returncode == 0, baseline.stderr[-2000:]

    first_events = tmp_path / "first.jsonl"
    first = start(command(args), env_for(first_events), tmp_path / "first.log")
    try:
        assert wait_until(lambda: last_step(read_events(first_events)) >= 6, first)
        second = subprocess.run(command(args), env=env_for(tmp_path / "second.jsonl"),
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        first.kill()
    assert second.returncode != 0
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"pid {first.pid}" in lines[0] and "another trainer" in lines[0]
    # The second wrote nothing: no events, no checkpoint of its own.
    assert read_events(tmp_path / "second.jsonl") == []
    run_dir = tmp_path / "ckpt" / "t"
    segments = [json.loads(line) for seg in sorted((run_dir / "events").glob("*.jsonl"))
                for line in seg.read_text().splitlines()]
    assert {e["pid"] for e in segments if e["event"] == "start"} == {first.pid}
    assert not (run_dir / OWNER).exists()  # released at exit
    assert_bit_identical(weights(run_dir / "final"), weights(tmp_path / "base" / "t" / "final"))


@pytest.mark.slow
def test_a_trainer_whose_run_was_taken_over_stops_without_committing(tiny_assets, tmp_path):
    events = tmp_path / "events.jsonl"
    args = lm_args(tiny_assets, tmp_path / "ckpt", max_steps=200, checkpoint_every_steps=4)
    proc = start(command(args), env_for(events), tmp_path / "log.txt")
    run_dir = tmp_path / "ckpt" / "t"
    try:
        assert wait_until(lambda: any(e["event"] == "checkpoint"
                                      for e in read_events(events)), proc)
        _foreign(run_dir, heartbeat_ago=0, ttl_s=20.0)  # another trainer took the run
        committed_before = {p.parent.name for p in run_dir.glob("step-*/" + MANIFEST)}
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert code not in (0, 143)
    log = (tmp_path / "log.txt").read_text()
    assert "now owned by host other-vm pid 4242" in log and "Traceback" not in log
    assert last_step(read_events(events)) < 200
    # No checkpoint was deleted after the takeover, and at most one commit that had already
    # passed its ownership check when the record changed was written after it.
    manifests = {p.parent.name for p in run_dir.glob("step-*/" + MANIFEST)}
    assert committed_before <= manifests, "a checkpoint was deleted after the takeover"
    assert len(manifests - committed_before) <= 1, "committed after the takeover"
    assert json.loads((run_dir / OWNER).read_text())["host"] == "other-vm"


@pytest.mark.parametrize("content", [b"", b'{"id": "torn-by-a-ki'])
def test_a_torn_record_is_taken_over_after_the_timeout_not_refused(tmp_path, content):
    """A writer killed mid-write leaves an empty or torn owner.json: its owner is dead."""
    import os

    (tmp_path / OWNER).write_bytes(content)
    lease = RunLease(tmp_path, ttl_s=2.0, heartbeat_s=0.5)
    t0 = time.monotonic()
    lease.acquire()
    try:
        assert time.monotonic() - t0 < 6
        assert json.loads((tmp_path / OWNER).read_text())["id"] == lease.me.id
    finally:
        lease.release()
    # An old torn record is taken over at once.
    (tmp_path / OWNER).write_bytes(content)
    os.utime(tmp_path / OWNER, (time.time() - 60, time.time() - 60))
    again = RunLease(tmp_path, ttl_s=2.0, heartbeat_s=0.5)
    t0 = time.monotonic()
    again.acquire()
    again.release()
    assert time.monotonic() - t0 < 3
