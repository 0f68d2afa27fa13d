"""tools/ckpt.py: ls tells each checkpoint valid or why not, verify reads every byte, and prune
keeps exactly what it says, never the newest valid checkpoint, never through a symlink, never
while a live trainer holds the run, and (on a real MOUNT_CACHED mount) never a checkpoint
before a newer one is in the bucket.

Checkpoints are real: written by skyspot.checkpoint.Checkpointer (a sharded one by two gloo
ranks), the metric by skyspot.events.EventLog as the trainer writes it, then damaged as a
kill or a bad disk would. The tool runs in-process through its main(); one test runs it as a
command, for the exit status and stderr a user sees.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from skyspot.checkpoint import MANIFEST, Checkpointer
from skyspot.events import EventLog
from skyspot.lease import OWNER, RunLease

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "ckpt.py"
sys.path.insert(0, str(REPO / "tools"))
import localstore  # noqa: E402

_spec = importlib.util.spec_from_file_location("ckpt_tool", TOOL)
tool = importlib.util.module_from_spec(_spec)
sys.modules["ckpt_tool"] = tool  # dataclasses look their module up here
_spec.loader.exec_module(tool)


def run(capsys, *args) -> tuple[int, str, str]:
    """tools/ckpt.py ARGS in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = tool.main([str(a) for a in args])
    except SystemExit as exit_:  # argparse's errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def listing(capsys, run_dir, *flags) -> dict[int, dict]:
    code, out, err = run(capsys, "ls", run_dir, "--format", "json", *flags)
    assert code == 0, err
    return {row["step"]: row for row in json.loads(out)["checkpoints"]}


def save(run_dir: Path, steps, mbytes: float = 0.01) -> None:
    ckpt = Checkpointer(run_dir, keep_last=100)  # its own retention deletes nothing here
    for step in steps:
        ckpt.save(step, {"model.safetensors": {"w": torch.full((int(mbytes * 2**18),),
                                                               float(step))},
                         "rng-rank0.pt": {"step": step}}, meta={"step": step})
    ckpt.wait()


def log_losses(run_dir: Path, losses: dict[int, float]) -> None:
    """One trainer attempt's 'log' events, as train/lm.py writes them."""
    events = EventLog(run_dir)
    for step, loss in losses.items():
        events.emit("log", step=step, loss=loss, lr=1e-3, tokens_per_s=100.0)
    events.close()
    time.sleep(0.002)  # the next attempt's segments sort after these (ms in their name)


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"step-{step:08d}"


def tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Every entry under root, symlinks as links (never followed), with size and mtime."""
    found = {}
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(here) / name
            if name in skip:
                continue
            info = path.lstat()
            link = os.readlink(path) if path.is_symlink() else None
            found[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns,
                                                  link)
    return found


def steps_left(run_dir: Path) -> set[int]:
    return {int(p.name[5:13]) for p in run_dir.iterdir() if p.name.startswith("step-")}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: only a checksum tells
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------- ls, verify


def test_ls_tells_each_checkpoint_valid_or_why_not(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    save(run_dir, [10, 20, 30, 40, 50])
    log_losses(run_dir, {10: 3.0, 20: 2.5, 30: 2.0, 40: 1.5, 50: 1.25})
    (step_dir(run_dir, 20) / MANIFEST).unlink()  # killed before its manifest
    truncate(step_dir(run_dir, 30) / "model.safetensors")
    flip_last_byte(step_dir(run_dir, 40) / "model.safetensors")
    step_dir(run_dir, 60).mkdir()  # killed before its first file

    fast = listing(capsys, run_dir)
    assert fast[50]["status"] == "valid" and fast[50]["checked"] == "sizes"
    manifest = json.loads((step_dir(run_dir, 50) / MANIFEST).read_text())
    assert fast[50]["files"] == len(manifest["files"]) == 2
    assert fast[50]["bytes"] == sum(entry["size"] for entry in manifest["files"])
    assert fast[50]["ranks"] == 1 and not fast[50]["sharded"]
    assert fast[50]["in_bucket"] is True  # a local disk: durable once written
    assert fast[10]["status"] == "valid"
    assert fast[20]["status"] == "invalid" and fast[20]["reason"].startswith(
        "manifest.json missing")
    assert fast[30]["status"] == "invalid" and "model.safetensors has" in fast[30]["reason"]
    assert "manifest says" in fast[30]["reason"] and fast[30]["in_bucket"] is None
    assert fast[40]["status"] == "valid"  # same size: a stat cannot tell
    assert fast[60]["status"] == "invalid" and fast[60]["reason"].startswith("empty")
    assert (fast[50]["metric"], fast[30]["metric"], fast[60]["metric_step"]) == (1.25, 2.0, 50)

    full = listing(capsys, run_dir, "--checksums")
    assert full[40]["status"] == "invalid"
    assert full[40]["reason"] == "model.safetensors checksum mismatch"
    assert full[50]["status"] == "valid" and full[50]["checked"] == "checksums"

    # The table a person reads: one row per dir, newest first, the reason on its row.
    code, out, _ = run(capsys, "ls", run_dir, "--checksums")
    assert code == 0
    rows = [line for line in out.splitlines() if "step-000000" in line]
    assert [row.split()[1] for row in rows] == [f"step-{s:08d}" for s in (60, 50, 40, 30, 20, 10)]
    assert "invalid: model.safetensors checksum mismatch" in rows[2]
    assert "valid" in rows[1] and "yes" in rows[1] and "1.2500" in rows[1]
    monkeypatch.setattr(tool, "Console", None)  # without rich: the plain table, same rows
    code, plain, _ = run(capsys, "ls", run_dir, "--checksums")
    assert [line.split()[1] for line in plain.splitlines() if "step-000000" in line] == [
        row.split()[1] for row in rows]


def test_verify_exits_0_valid_1_invalid_2_bad_input_in_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    save(run_dir, [1, 2, 3])
    flip_last_byte(step_dir(run_dir, 2) / "rng-rank0.pt")
    (step_dir(run_dir, 3) / MANIFEST).unlink()

    code, out, _ = run(capsys, "verify", step_dir(run_dir, 1))
    assert code == 0 and out.count("\n") == 1 and out.startswith("valid: ")
    assert "every size and checksum matches; in the bucket: yes" in out
    code, out, _ = run(capsys, "verify", step_dir(run_dir, 2))
    assert (code, out) == (1, f"invalid: {step_dir(run_dir, 2)}: rng-rank0.pt checksum "
                              "mismatch\n")
    code, out, _ = run(capsys, "verify", step_dir(run_dir, 3))
    assert code == 1 and out.count("\n") == 1 and "manifest.json missing" in out
    for bad, says in ((run_dir / "step-00000009", "no such directory"),
                      (run_dir, "not a checkpoint directory")):
        code, out, err = run(capsys, "verify", bad)
        assert code == 2 and out == "" and err.count("\n") == 1 and says in err


def test_the_metric_is_the_last_one_logged_at_or_before_each_step(tmp_path, capsys):
    run_dir = tmp_path / "run"
    save(run_dir, [3, 8, 10, 12, 16])
    log_losses(run_dir, {4: 4.0, 8: 3.0, 12: 2.0})  # the first attempt, preempted after 12
    log_losses(run_dir, {12: 2.25, 16: 1.0})  # resumed from 8: step 12 again, then 16
    rows = listing(capsys, run_dir)
    got = {step: (row["metric"], row["metric_step"]) for step, row in rows.items()}
    assert got == {3: (None, None), 8: (3.0, 8), 10: (3.0, 8), 12: (2.25, 12), 16: (1.0, 16)}
    shown = listing(capsys, run_dir, "--metric", "tokens_per_s")
    assert shown[16]["metric"] == 100.0


# ------------------------------------------------------------------------------- prune


def test_prune_dry_run_deletes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    save(run_dir, [10, 20, 30, 40])
    log_losses(run_dir, {10: 2.0, 20: 1.0, 30: 3.0, 40: 4.0})
    truncate(step_dir(run_dir, 30) / "model.safetensors")
    before = tree(tmp_path)
    code, out, _ = run(capsys, "prune", run_dir, "--keep-last", "1", "--keep-best", "loss")
    assert code == 0
    assert tree(tmp_path) == before
    assert "dry run: would delete 2 checkpoint dirs" in out and "nothing was deleted" in out
    code, out, _ = run(capsys, "prune", run_dir, "--keep-last", "1", "--format", "json")
    plan = {row["step"]: row["action"] for row in json.loads(out)["checkpoints"]}
    assert plan == {40: "keep", 30: "delete", 20: "delete", 10: "delete"}
    assert json.loads(out)["deleted"] == [] and tree(tmp_path) == before


def test_prune_apply_keeps_exactly_the_last_k_and_the_best(tmp_path, capsys):
    run_dir = tmp_path / "run"
    save(run_dir, [10, 20, 30, 40, 50, 60])
    log_losses(run_dir, {10: 3.0, 20: 0.5, 30: 2.0, 40: 1.5, 50: 1.0, 60: 0.75})
    torn_old, torn_new = step_dir(run_dir, 35), step_dir(run_dir, 70)
    for torn in (torn_old, torn_new):  # saves killed before their manifest
        torn.mkdir()
        (torn / "model.safetensors").write_bytes(b"half")
    code, out, err = run(capsys, "prune", run_dir, "--keep-last", "2", "--keep-best", "loss",
                         "--apply", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert steps_left(run_dir) == {20, 50, 60, 70}
    assert sorted(report["deleted"]) == sorted(str(step_dir(run_dir, s)) for s in (10, 30, 35, 40))
    why = {row["step"]: row["why"] for row in report["checkpoints"]}
    assert why[20] == "best loss (0.5 at step 20)"
    assert why[60].startswith("newest valid checkpoint in the bucket")
    assert why[70].startswith("newer than the newest valid")  # maybe a save in flight
    assert why[35].startswith("invalid: manifest.json missing")
    assert not (run_dir / OWNER).exists()  # the lease prune took is released
    assert (run_dir / "events").is_dir()  # only step-N directories are ever touched

    code, out, _ = run(capsys, "prune", run_dir, "--keep-last", "1", "--keep-best", "loss",
                       "--mode", "max", "--apply")
    assert code == 0 and steps_left(run_dir) == {50, 60, 70}  # max: 1.0 at 50 beats 0.5 at 20
    assert "deleted 1 of 1 checkpoint dirs" in out


def test_prune_never_deletes_the_newest_valid_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    save(run_dir, [10, 20, 30, 40])
    log_losses(run_dir, {10: 0.1, 20: 2.0, 30: 3.0, 40: 4.0})
    # Step 40 has the right sizes but other bytes: the newest VALID one is 30, and prune
    # finds that out by reading it, even without --checksums.
    flip_last_byte(step_dir(run_dir, 40) / "model.safetensors")
    code, out, err = run(capsys, "prune", run_dir, "--keep-last", "0", "--keep-best", "loss",
                         "--apply", "--format", "json")
    assert code == 0, err
    assert steps_left(run_dir) == {10, 30, 40}  # best, newest valid, newer than it (kept)
    rows = {row["step"]: row for row in json.loads(out)["checkpoints"]}
    assert rows[40]["status"] == "invalid" and "checksum mismatch" in rows[40]["reason"]
    assert rows[30]["why"] == "newest valid checkpoint in the bucket (checksums verified)"

    # Nothing valid at all: nothing deleted, torn or not.
    other = tmp_path / "other"
    save(other, [1, 2])
    for step in (1, 2):
        (step_dir(other, step) / MANIFEST).unlink()
    code, _, _ = run(capsys, "prune", other, "--keep-last", "0", "--apply")
    assert code == 0 and steps_left(other) == {1, 2}


def test_symlinks_are_never_followed_or_deleted(tmp_path, capsys):
    run_dir, other = tmp_path / "run", tmp_path / "other-run"
    save(run_dir, [10, 20, 30])
    save(other, [5])
    (run_dir / "step-00000005").symlink_to(step_dir(other, 5), target_is_directory=True)
    outside = tmp_path / "precious.bin"
    outside.write_bytes(b"not a checkpoint file")
    (step_dir(run_dir, 10) / "extra").symlink_to(outside)  # inside a doomed checkpoint
    (step_dir(run_dir, 10) / "sub").symlink_to(other, target_is_directory=True)
    other_before = tree(other)

    rows = listing(capsys, run_dir)
    assert rows[5]["status"] == "skipped" and rows[5]["reason"].startswith("a symlink")
    code, _, err = run(capsys, "prune", run_dir, "--keep-last", "1", "--apply")
    assert code == 0, err
    assert steps_left(run_dir) == {5, 30}  # the symlink stays; 10 and 20 went
    assert (run_dir / "step-00000005").is_symlink()
    assert tree(other) == other_before and outside.read_bytes() == b"not a checkpoint file"

    # A run dir that is itself a symlink: refused, nothing deleted.
    link = tmp_path / "link-to-run"
    link.symlink_to(run_dir, target_is_directory=True)
    before = tree(tmp_path)
    code, out, err = run(capsys, "prune", link, "--keep-last", "0", "--apply")
    assert code == 2 and out == "" and err.count("\n") == 1 and "is a symlink" in err
    assert tree(tmp_path) == before


def test_a_live_trainer_lease_makes_prune_refuse_unless_forced(tmp_path, capsys):
    run_dir = tmp_path / "run"
    save(run_dir, [1, 2, 3])
    lease = RunLease(run_dir)  # a live trainer of this run: this very process
    lease.acquire()
    try:
        before = tree(tmp_path, skip=(OWNER,))  # its heartbeat rewrites owner.json
        code, out, err = run(capsys, "prune", run_dir, "--keep-last", "1", "--apply")
        assert code == 1 and out == ""
        assert err.count("\n") == 1 and f"pid {os.getpid()}" in err and "--force" in err
        assert tree(tmp_path, skip=(OWNER,)) == before
        code, _, err = run(capsys, "prune", run_dir, "--keep-last", "1")  # a dry run says so
        assert code == 0 and "--apply takes the run's lease first and refuses" in err
        code, _, err = run(capsys, "prune", run_dir, "--keep-last", "2", "--apply", "--force")
        assert code == 0, err
        assert steps_left(run_dir) == {2, 3}
        lease.check()  # the trainer still owns its run
    finally:
        lease.release()
    code, _, err = run(capsys, "prune", run_dir, "--keep-last", "1", "--apply")
    assert code == 0, err
    assert steps_left(run_dir) == {3}


SHARDED_SAVE = """
import sys
from pathlib import Path
import torch, torch.distributed as dist
from skyspot.checkpoint import Checkpointer
rank, store, root = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
ckpt = Checkpointer(root, keep_last=10)
for step in (1, 2, 3):
    files = {f"sharded-rank{rank}.safetensors": {"w@0": torch.full((4096,), float(step))},
             f"rng-rank{rank}.pt": {"step": step}}
    if rank == 0:  # what skyspot.sharded and train/lm.py --fsdp write on rank 0 only
        files.update({"sharded.metadata": b"dcp metadata", "scheduler.pt": {"step": step}})
    ckpt.save(step, files, meta={"step": step, "sharded": True})
dist.destroy_process_group()
"""


def test_a_sharded_checkpoint_is_checked_on_every_rank_file(tmp_path, capsys):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", SHARDED_SAVE, str(rank),
                               str(tmp_path / "store"), str(run_dir)], cwd=REPO, env=env)
             for rank in (0, 1)]
    assert [rank.wait(timeout=120) for rank in ranks] == [0, 0]
    manifest = json.loads((step_dir(run_dir, 3) / MANIFEST).read_text())
    assert manifest["world_size"] == 2 and {entry["path"] for entry in manifest["files"]} == {
        "sharded-rank0.safetensors", "sharded-rank1.safetensors", "rng-rank0.pt",
        "rng-rank1.pt", "sharded.metadata", "scheduler.pt"}

    truncate(step_dir(run_dir, 3) / "sharded-rank1.safetensors")  # one rank's shard torn
    # A manifest that leaves rank 1's shard out is not a checkpoint of 2 ranks.
    path = step_dir(run_dir, 2) / MANIFEST
    edited = json.loads(path.read_text())
    edited["files"] = [e for e in edited["files"] if e["path"] != "sharded-rank1.safetensors"]
    path.write_text(json.dumps(edited))

    rows = listing(capsys, run_dir)
    assert rows[1]["status"] == "valid" and rows[1]["sharded"] and rows[1]["ranks"] == 2
    assert rows[1]["files"] == 6
    assert rows[3]["status"] == "invalid"
    assert rows[3]["reason"].startswith("sharded-rank1.safetensors has")
    assert rows[2]["status"] == "invalid"
    assert "does not list sharded-rank1.safetensors" in rows[2]["reason"]
    code, out, _ = run(capsys, "verify", step_dir(run_dir, 1))
    assert code == 0 and "6 files (2 ranks' shards)" in out
    code, _, err = run(capsys, "prune", run_dir, "--keep-last", "1", "--apply")
    assert code == 0, err
    assert steps_left(run_dir) == {1, 2, 3}  # 1 is the newest valid; 2 and 3 are newer


def test_bad_input_is_one_line_exit_2_and_deletes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    save(run_dir, [1, 2, 3])
    before = tree(tmp_path)
    for args, says in (
        (["prune", run_dir, "--keep-last", "-1", "--apply"], "invalid count >= 0 value"),
        (["prune", run_dir, "--apply"], "--keep-last"),
        (["prune", tmp_path / "absent", "--keep-last", "1", "--apply"], "no such directory"),
        (["prune", run_dir, "--keep-last", "1", "--keep-best", "loss", "--apply"],
         "no 'log' event"),
        (["prune", run_dir, "--keep-last", "1", "--mode", "max", "--apply"], "--keep-best"),
        (["prune", step_dir(run_dir, 1), "--keep-last", "0", "--apply"], "is one checkpoint"),
        (["ls", run_dir / "step-00000001" / MANIFEST], "not a directory"),
        (["ls"], "RUN_DIR"),
        (["rm", run_dir], "invalid choice"),
    ):
        code, out, err = run(capsys, *args)
        assert code == 2 and out == "", (args, out, err)
        assert err.count("\n") == 1 and says in err, (args, err)
    assert tree(tmp_path) == before

    # As a command: the same one line, no traceback. --help shows examples.
    result = subprocess.run([sys.executable, str(TOOL), "prune", str(run_dir), "--keep-last",
                             "x", "--apply"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "python tools/ckpt.py prune" in out
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------- a bucket


FUSE_OK, FUSE_WHY = localstore.fuse_available()


@pytest.mark.skipif(not FUSE_OK, reason=f"needs FUSE: {FUSE_WHY}")
def test_in_bucket_on_a_mount_cached_bucket_and_prune_waits_for_it(tmp_path, capsys,
                                                                   monkeypatch):
    with localstore.LocalObjectStore(tmp_path / "store") as store:
        store.create_bucket("ckpt")
        monkeypatch.setenv("RCLONE_CONFIG", str(store.rclone_config))  # as on a SkyPilot node
        mount = store.mount("ckpt", tmp_path / "node" / "mnt", mode="MOUNT_CACHED",
                            cache_dir=tmp_path / "node" / "cache",
                            mount_type="MODEL_CHECKPOINT_RW")
        run_dir = mount.mount_point / "run"
        try:
            save(run_dir, [1], mbytes=0.25)
            mount.wait_uploaded(60)
            mount.rc("core/bwlimit", rate="10K")  # uploads held back: 1 MB takes ~100 s
            save(run_dir, [2], mbytes=0.25)
            assert mount.pending_uploads() > 0
            rows = listing(capsys, run_dir)
            assert (rows[1]["in_bucket"], rows[2]["in_bucket"]) == (True, False)
            assert rows[2]["status"] == "valid"  # closed on this node, complete locally
            code, out, _ = run(capsys, "verify", step_dir(run_dir, 2))
            assert code == 0 and out.endswith("in the bucket: no\n")
            # keep-last 1 would go to step 2, which a lost VM would lose: 1 stays.
            code, out, err = run(capsys, "prune", run_dir, "--keep-last", "1", "--apply",
                                 "--format", "json")
            assert code == 0, err
            assert steps_left(run_dir) == {1, 2} and json.loads(out)["deleted"] == []
            why = {row["step"]: row["why"] for row in json.loads(out)["checkpoints"]}
            assert why[2] == "not yet in the bucket (uploading)"
            assert why[1].startswith("newest valid checkpoint in the bucket")
        finally:
            mount.rc("core/bwlimit", rate="1G")  # let them go
        mount.wait_uploaded(60)
        rows = listing(capsys, run_dir)
        assert (rows[1]["in_bucket"], rows[2]["in_bucket"]) == (True, True)
        code, _, err = run(capsys, "prune", run_dir, "--keep-last", "1", "--apply")
        assert code == 0, err
        assert steps_left(run_dir) == {2}
        assert not any(key.startswith("run/step-00000001/")
                       for key in store.list_objects("ckpt", "run/"))
