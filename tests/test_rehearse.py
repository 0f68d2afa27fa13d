"""tools/rehearse.py: a recipe run locally as a managed spot job, on a real local object store
with per-node bucket mounts, with injected preemptions and node losses.

The rehearsals run tests/fixtures/rehearse/toy_trainer.py (no ML: a step counter that writes
skyspot-format checkpoints and events) in-process through ``rehearse.main`` so that SkyPilot
is imported once; the CLI's own process behaviour is checked with a few subprocesses. With
FUSE (/dev/fuse and fusermount3), buckets are ``rclone serve s3`` plus one ``rclone mount`` per
node (the FUSE-only tests are skipped without it, saying what is missing); every test checks
that it left no mount and no rclone behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "rehearse"
TOY = str(FIXTURES / "toy.yaml")
TOY_2NODE = str(FIXTURES / "toy_2node.yaml")
TOY_CACHED = str(FIXTURES / "toy_cached.yaml")
sys.path.insert(0, str(REPO / "tools"))
import localstore  # noqa: E402
from rehearsing import SCRIPT, bucket_files, leftovers, rehearsal  # noqa: E402

# /dev/fuse and fusermount3: without either, rehearse falls back to plain directories.
FUSE, FUSE_WHY = localstore.fuse_available()
needs_fuse = pytest.mark.skipif(not FUSE, reason=f"needs FUSE: {FUSE_WHY}")
# The save at step 10 is slow enough to be cut by a lost VM half-uploaded: its 100 KB state
# file is closed, uploaded within ~1.2 s (rclone's 1 s write-back, then 1 MB/s), and the
# manifest follows 2 s after it, so a kill right after the manifest (well within its 1 s
# write-back) leaves the state file in the bucket and the manifest in the dead node's cache.
SLOW_SAVE = ["--bwlimit", "1M", "--env", "STATE_BYTES=100000", "--env", "WRITE_DELAY=2",
             "--env", "WRITE_DELAY_AT=10", "--env", "TOTAL_STEPS=10"]


@pytest.fixture(autouse=True)
def nothing_left_behind(tmp_path):
    yield
    assert leftovers(tmp_path) == []


class MarkerWatch:
    """Collects pids of processes whose argv[0] is the marker, while a rehearsal runs."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.pids |= set(self.running())
            time.sleep(0.02)

    def running(self) -> list[int]:
        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            cmd = proc.info["cmdline"] or []
            if cmd[:1] == [self.marker] and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        return found

    def __enter__(self) -> MarkerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class RcloneWatch(MarkerWatch):
    """Collects the command lines of `rclone mount` processes that name a directory."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.mounts: dict[int, list[str]] = {}

    def _watch(self) -> None:
        while not self._stop.is_set():
            for proc in psutil.process_iter(["cmdline"]):
                cmd = proc.info["cmdline"] or []
                if cmd[:1] and cmd[0].endswith("rclone") and cmd[1:2] == ["mount"] and \
                        any(self.marker in arg for arg in cmd):
                    self.mounts[proc.pid] = cmd
            time.sleep(0.05)


def flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


# --------------------------------------------------------------------------------------------
# Preemptions and failures, accounted as SkyPilot does


@pytest.fixture(scope="module")
def term_run(rehearse, tmp_path_factory):
    """One SIGTERM preemption at step 7, shared by the tests that read its summary."""
    workdir = tmp_path_factory.mktemp("term")
    result = rehearsal(rehearse, workdir, TOY, "--preempt-at", "step:7")
    assert leftovers(workdir) == []
    return result


def test_sigterm_preemption_recovers_with_no_steps_lost(term_run):
    code, summary = term_run
    assert code == 0 and summary["status"] == "SUCCEEDED" and summary["ok"]
    first, second = summary["attempts"]
    assert first["ending"] == "preempted:term" and first["exit_codes"] == [143]
    assert first["decision"] == "recover (preemption)"
    assert first["fault"]["kind"] == "term" and first["fault"]["nodes"] == [0]
    assert first["preemption_reason"] == "SIGTERM"
    # The trainer committed a save on SIGTERM, and the next attempt resumed exactly there.
    assert first["checkpoints"][-1]["step"] == first["last_step"] >= 7
    assert first["bucket"]["newest_complete_step"] == first["last_step"]
    assert second["resumed_from"] == first["last_step"] and first["steps_lost"] == 0
    # First recovery: same jobs controller, so the same SKYPILOT_TASK_ID.
    assert first["task_id"] == second["task_id"]
    assert summary["job_recovery"]["restart_cnt_on_failure"] == 0


def test_summary_json_has_the_totals(term_run):
    _, summary = term_run
    assert summary["schema"] == "skyspot-rehearsal/2"
    attempt = summary["attempts"][0]
    for key in ("started", "ended", "ending", "fault", "exit_codes", "resumed_from",
                "resumed_key", "last_step", "steps_lost", "seconds_to_first_step", "bucket",
                "checkpoints", "task_id"):
        assert key in attempt
    assert 0 < attempt["seconds_to_first_step"] < 10
    for checkpoint in attempt["checkpoints"]:
        assert checkpoint["durable_step"] == checkpoint["step"] and checkpoint["lag_steps"] == 0
    totals = summary["totals"]
    assert totals["attempts"] == 2
    assert totals["preemptions"] == {"term": 1, "kill": 0, "notice": 0}
    assert totals["process_losses"] == 0
    assert totals["final_step"] == 20
    assert totals["steps_executed"] == 20 and totals["goodput"] == 1.0
    assert 0 < totals["wall_goodput"] <= 1
    ckpt = totals["checkpoints"]
    assert ckpt["count"] >= 4 and ckpt["mean_seconds"] >= 0 and ckpt["mean_bytes"] > 0
    assert ckpt["max_lag_steps"] == 0  # MOUNT: a closed file is in the bucket


def test_sigkill_preemption_loses_the_steps_since_the_last_checkpoint(rehearse, tmp_path):
    code, summary = rehearsal(rehearse, tmp_path, TOY, "--preempt-at", "step:7:kill")
    assert code == 0 and summary["status"] == "SUCCEEDED"
    first, second = summary["attempts"]
    assert first["ending"] == "preempted:kill" and first["exit_codes"] == [137]
    # No save on the way out: only the periodic ones (CKPT_EVERY=5), the newest resumed.
    assert [c["step"] % 5 for c in first["checkpoints"]] == [0] * len(first["checkpoints"])
    assert second["resumed_from"] == first["checkpoints"][-1]["step"] >= 5
    assert first["steps_lost"] == first["last_step"] - second["resumed_from"]
    assert summary["totals"]["preemptions"] == {"term": 0, "kill": 1, "notice": 0}
    assert summary["totals"]["goodput"] < 1


@pytest.mark.parametrize("isolation", ["pid-namespace", "process-tree"])
def test_kill_preemption_takes_processes_in_their_own_session(rehearse, tmp_path, isolation):
    marker = f"skyspot-rehearse-{uuid.uuid4().hex[:12]}"
    extra = ["--no-pid-namespace"] if isolation == "process-tree" else []
    with MarkerWatch(marker) as watch:
        code, summary = rehearsal(
            rehearse, tmp_path, TOY, "--preempt-at", "step:5:kill", *extra,
            "--env", f"SETSID_MARKER={marker}", "--env", "TOTAL_STEPS=10",
        )
    assert code == 0 and summary["attempts"][0]["ending"] == "preempted:kill"
    assert summary["pid_namespaces"] is (isolation == "pid-namespace")
    assert len(watch.pids) == 2, "each attempt starts one setsid'd process"
    assert watch.running() == [], f"setsid'd processes survived: {watch.pids}"


def test_term_escalates_to_sigkill_after_the_grace_period(rehearse, tmp_path, capsys):
    code, summary = rehearsal(
        rehearse, tmp_path, TOY, "--preempt-at", "step:3", "--grace", "0.4",
        "--env", "IGNORE_TERM=1",
    )
    first, second = summary["attempts"]
    assert first["ending"] == "preempted:term" and first["exit_codes"] == [137]
    assert "grace period over, SIGKILL" in capsys.readouterr().out
    fault = first["fault"]
    assert fault["sigkill_at"] - fault["sigterm_at"] == pytest.approx(0.4, abs=0.3)
    assert fault["vm_lost"][0]["at"] >= fault["sigkill_at"]
    # It ignored SIGTERM and kept training through the grace period, saving every 5 steps;
    # the next attempt resumed from the newest save the bucket holds whole (the SIGKILL may
    # have landed after a save's manifest but before its checkpoint event).
    assert first["last_step"] > 3
    reported = first["checkpoints"][-1]["step"] if first["checkpoints"] else 0
    newest = first["bucket"]["newest_complete_step"] or 0
    assert newest >= reported and second["resumed_from"] == newest and code == 0


def test_max_restarts_on_errors_exhausted_fails(rehearse, tmp_path):
    code, summary = rehearsal(
        rehearse, tmp_path, TOY,
        "--env", "FAIL_AT_STEP=3", "--env", "FAIL_CODE=1", "--env", "FAIL_TIMES=99",
    )
    assert code != 0 and summary["status"] == "FAILED"
    # toy.yaml: max_restarts_on_errors 1 -> one restart, then the second failure is final.
    assert [a["exit_codes"] for a in summary["attempts"]] == [[1], [1]]
    assert summary["attempts"][0]["decision"] == "restart: restart 1/1 on errors"
    assert summary["attempts"][1]["decision"].startswith("stop: max_restarts_on_errors")
    assert summary["job_recovery"]["restart_cnt_on_failure"] == 2


def test_recover_on_exit_codes_restart_without_counting(rehearse, tmp_path):
    # Three failures with 42 (in recover_on_exit_codes) although max_restarts_on_errors is 1.
    code, summary = rehearsal(
        rehearse, tmp_path, TOY, "--env", "CKPT_EVERY=2",
        "--env", "FAIL_AT_STEP=3", "--env", "FAIL_CODE=42", "--env", "FAIL_TIMES=3",
    )
    assert code == 0 and summary["status"] == "SUCCEEDED"
    attempts = summary["attempts"]
    assert [a["exit_codes"] for a in attempts] == [[42], [42], [42], [0]]
    assert all("recover_on_exit_codes" in a["decision"] for a in attempts[:3])
    assert summary["job_recovery"]["restart_cnt_on_failure"] == 0
    assert [a["resumed_from"] for a in attempts] == [0, 2, 2, 2]
    assert summary["totals"]["preemptions"] == {"term": 0, "kill": 0, "notice": 0}


def test_trainer_keyed_on_task_id_is_reported_as_a_regression(rehearse, tmp_path, capsys):
    code, summary = rehearsal(
        rehearse, tmp_path, TOY, "--preempt-at", "step:7", "--controller-restart-every", "1",
        "--env", "RUN_KEY=task",
    )
    first, second = summary["attempts"]
    assert first["task_id"] != second["task_id"]  # the jobs controller "restarted"
    assert second["resumed_from"] == 0
    assert summary["status"] == "SUCCEEDED" and not summary["ok"] and code != 0
    committed = first["checkpoints"][-1]["step"]
    [line] = summary["regressions"]
    assert f"checkpoint step {committed}" in line and "started fresh at step 0" in line
    assert "REGRESSION: attempt 2" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Buckets: one store, a mount per node in the recipe's mode


def test_two_nodes_get_ranks_loopback_ips_and_their_own_mounts(rehearse, tmp_path, capsys,
                                                               monkeypatch):
    info = tmp_path / "info"
    info.mkdir()
    workdir = tmp_path / "rh"
    monkeypatch.chdir(REPO)  # streamed logs need no --quiet, so no rehearsal() here
    with RcloneWatch(workdir) as watch:
        code = rehearse.main([
            TOY_2NODE, "--workdir", str(workdir), "--env", f"NODE_INFO_DIR={info}",
            "--secret", "TOY_SECRET=s3cr3t", "--gpus-per-node", "2", "--cloud", "gcp",
            "--isolation", "pid",  # the fallback's loopback addresses; VMs: test_rehearse_vm
        ])
    assert code == 0
    summary = json.loads((workdir / "rehearsal.json").read_text())
    nodes = [json.loads((info / f"node{r}.json").read_text()) for r in (0, 1)]
    assert [n["SKYPILOT_NODE_RANK"] for n in nodes] == ["0", "1"]
    for node in nodes:
        assert node["SKYPILOT_NODE_IPS"] == "127.0.0.1\n127.0.0.2"
        assert node["SKYPILOT_NUM_NODES"] == "2" and node["SKYPILOT_NUM_GPUS_PER_NODE"] == "2"
        assert node["SKYPILOT_TASK_ID"].startswith("sky-managed-")
        assert node["SKYPILOT_TASK_ID"].endswith(f"_toy-2node_{node['SKYPILOT_MANAGED_JOB_ID']}-0")
        assert json.loads(node["SKYPILOT_CLUSTER_INFO"])["cloud"] == "GCP"
        assert node["TOY_SECRET"] == "s3cr3t" and node["cwd"] == str(REPO)
        assert node["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
        assert node["SKYSPOT_METADATA_URL"].startswith("http://127.0.0.1:")
    assert nodes[0]["SKYPILOT_MANAGED_JOB_ID"] == nodes[1]["SKYPILOT_MANAGED_JOB_ID"]
    assert nodes[0]["SKYSPOT_METADATA_URL"] != nodes[1]["SKYSPOT_METADATA_URL"]  # one per VM
    out = capsys.readouterr().out  # node logs are streamed with a prefix and kept per node
    assert "[a1/n1] toy trainer rank 1 starting at step 0" in out
    assert "toy trainer rank 1" in (workdir / "logs" / "attempt1-node1.log").read_text()
    # Both nodes wrote through their own mount; the one bucket has both files.
    assert {"toy/hello-rank0.txt", "toy/hello-rank1.txt"} <= set(
        bucket_files(summary, "skyspot-toy-ckpt"))
    if summary["storage"]["backend"] == "plain":
        for node in nodes:
            assert node["CKPT_DIR"] == str(workdir / "buckets" / "skyspot-toy-ckpt" / "toy")
        return
    mount_points = [workdir / "nodes" / f"node{r}" / "mnt" / "skyspot-toy-ckpt" for r in (0, 1)]
    for rank, node in enumerate(nodes):
        assert node["CKPT_DIR"] == str(mount_points[rank] / "toy")
        assert node["mount"] == {"mount_point": str(mount_points[rank]), "fstype": "fuse.rclone",
                                 "source": "skyspot-local:skyspot-toy-ckpt"}
        assert node["RCLONE_CONFIG"] == str(workdir / "store" / "rclone.conf")
        assert node["rclone"] is not None and Path(node["rclone"]).name == "rclone"
    # Two rclone mounts of one bucket, each with its own mount point and cache, as MOUNT.
    # One per mount point: a mount whose rc port another process took first is started
    # again (localstore retries), which is a second rclone process for the same mount.
    cmds = list({cmd[3]: cmd for cmd in watch.mounts.values()}.values())
    assert len(cmds) == 2
    assert {cmd[2] for cmd in cmds} == {"skyspot-local:skyspot-toy-ckpt"}
    assert {cmd[3] for cmd in cmds} == {str(p) for p in mount_points}
    assert {flag(cmd, "--cache-dir") for cmd in cmds} == {
        str(workdir / "nodes" / f"node{r}" / "cache" / "skyspot-toy-ckpt") for r in (0, 1)}
    assert {flag(cmd, "--vfs-cache-mode") for cmd in cmds} == {"off"}
    entry = summary["mounts"]["/ckpt"]
    assert entry["mode"] == "MOUNT" and [n["mounted"] for n in entry["nodes"]] == [1, 1]


@needs_fuse
def test_mount_cached_bucket_uses_skypilots_flags_preset_and_bwlimit(rehearse, tmp_path):
    with RcloneWatch(tmp_path) as watch:
        code, summary = rehearsal(rehearse, tmp_path, TOY_CACHED, "--bwlimit", "4M",
                                  "--env", "TOTAL_STEPS=5")
    assert code == 0 and summary["ok"]
    [cmd] = watch.mounts.values()
    assert flag(cmd, "--vfs-cache-mode") == "full" and flag(cmd, "--vfs-write-back") == "1s"
    assert flag(cmd, "--transfers") == "8"  # type: MODEL_CHECKPOINT_RW
    assert flag(cmd, "--bwlimit") == "4M"
    entry = summary["mounts"]["/ckpt"]
    assert (entry["mode"], entry["type"]) == ("MOUNT_CACHED", "MODEL_CHECKPOINT_RW")
    assert summary["storage"]["bwlimit"] == "4M"
    # SkyPilot's wait for uploads at the end of run: the final checkpoint is in the bucket.
    assert "cached mount upload complete" in (tmp_path / "logs" / "attempt1-node0.log").read_text()
    files = bucket_files(summary, "skyspot-toy-cached")
    run = summary["attempts"][0]["run_name"]
    assert f"toy/{run}/step-00000005/manifest.json" in files


def test_env_override_is_remapped_and_secrets_come_from_the_environment(
    rehearse, tmp_path, monkeypatch
):
    info = tmp_path / "info"
    info.mkdir()
    monkeypatch.setenv("TOY_SECRET", "from-env")  # a value-less secret, like SkyPilot's
    code, summary = rehearsal(
        rehearse, tmp_path / "rh", TOY_2NODE,
        "--env", f"NODE_INFO_DIR={info}", "--env", "CKPT_DIR=/ckpt/other/run",
        "--isolation", "pid",  # envs are rewritten only where nodes are not VMs
    )
    assert code == 0
    node = json.loads((info / "node0.json").read_text())
    local = Path(summary["mounts"]["/ckpt"]["nodes"][0]["local"])
    assert node["CKPT_DIR"] == str(local / "other" / "run")
    assert node["TOY_SECRET"] == "from-env"
    run = summary["attempts"][0]["run_name"]
    # The toy committed its checkpoint there, i.e. in the bucket under other/run/.
    assert f"other/run/{run}/step-00000002/manifest.json" in bucket_files(
        summary, "skyspot-toy-ckpt")


@pytest.mark.parametrize("how", ["--no-fuse", "no /dev/fuse"])
def test_without_fuse_buckets_are_plain_directories(rehearse, tmp_path, capsys, monkeypatch,
                                                     how):
    args = ["--no-fuse"] if how == "--no-fuse" else []
    if how == "no /dev/fuse":
        monkeypatch.setattr("rehearsal.buckets.DEV_FUSE", tmp_path / "no-such-device")
    code, summary = rehearsal(rehearse, tmp_path / "rh", TOY, "--preempt-at", "step:7:kill",
                              *args)
    assert code == 0 and summary["ok"]
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if "plain directories" in line]
    assert line.startswith("rehearse: --no-fuse:" if args else "rehearse: no FUSE here")
    assert summary["storage"]["backend"] == "plain"
    assert summary["mounts"]["/ckpt"]["nodes"][0]["local"] == str(
        tmp_path / "rh" / "buckets" / "skyspot-toy-ckpt")
    assert summary["attempts"][1]["resumed_from"] == 5  # the events-based check still runs


def test_fuse_without_fusermount_falls_back_and_says_how_to_get_it(rehearse, tmp_path, capsys,
                                                                  monkeypatch):
    """A fresh machine: /dev/fuse is there (a stand-in here, so this runs anywhere), fuse3 is
    not installed. The rehearsal runs on plain directories and one line says how to get the
    real stack."""
    device = tmp_path / "dev-fuse"
    device.touch()
    monkeypatch.setattr("rehearsal.buckets.DEV_FUSE", device)
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None if name.startswith(
        "fusermount") else which(name, *args, **kwargs))
    code, summary = rehearsal(rehearse, tmp_path / "rh", TOY, "--env", "TOTAL_STEPS=5")
    out, err = capsys.readouterr()
    assert code == 0 and summary["ok"] and err == ""
    [line] = [line for line in out.splitlines() if "plain directories" in line]
    assert line.startswith("rehearse: no FUSE here: fusermount3 (or fusermount) is not on PATH")
    assert "sudo apt-get install -y fuse3" in line and "`make setup` as root" in line
    assert str(device) not in line  # the device is there: only what is missing is named
    assert summary["storage"]["backend"] == "plain" and summary["storage"]["note"] in line
    bucket = tmp_path / "rh" / "buckets" / "skyspot-toy-ckpt"
    assert summary["mounts"]["/ckpt"]["nodes"][0]["local"] == str(bucket)
    run = summary["attempts"][0]["run_name"]
    assert f"toy/{run}/step-00000005/manifest.json" in bucket_files(summary, "skyspot-toy-ckpt")


# --------------------------------------------------------------------------------------------
# Node-loss faults, checked against what the bucket itself holds


@needs_fuse
def test_vm_lost_mid_upload_resumes_from_newest_complete_checkpoint(rehearse, tmp_path):
    code, summary = rehearsal(rehearse, tmp_path, TOY_CACHED, "--preempt-at", "ckpt:10:kill",
                              *SLOW_SAVE)
    assert code == 0 and summary["ok"], summary["corruptions"] + summary["regressions"]
    first, second = summary["attempts"]
    # The checkpoint at step 10 was committed on the node, then the VM went: the bucket has
    # its state file but not its manifest, so the newest complete checkpoint is step 5.
    assert first["checkpoints"][-1]["step"] == 10
    bucket = first["bucket"]
    assert bucket["vm_lost"] and bucket["newest_complete_step"] == 5
    newest = bucket["checkpoints"][0]
    assert newest["step"] == 10 and not newest["complete"]
    assert newest["reason"] == "manifest.json missing"
    assert f"{newest['key']}/state.bin" in bucket_files(summary, "skyspot-toy-cached")
    assert second["resumed_from"] == 5 and second["resumed_key"].endswith("/step-00000005")
    assert first["steps_lost"] == 5
    # How far the bucket lagged when step 10 was committed (the trainer's rclone listing).
    assert first["checkpoints"][-1]["durable_step"] == 5
    assert first["checkpoints"][-1]["lag_steps"] == 5
    assert summary["totals"]["checkpoints"]["max_lag_steps"] == 5


@needs_fuse
def test_skyspot_checkpointer_resumes_from_what_the_bucket_holds(rehearse, tmp_path):
    """The same fault against skyspot.checkpoint itself (manifest last, verify on resume,
    retention counting only what the bucket holds)."""
    code, summary = rehearsal(rehearse, tmp_path, TOY_CACHED, "--preempt-at", "ckpt:10:kill",
                              "--bwlimit", "1M", "--env", "TOY_CHECKPOINTER=skyspot",
                              "--env", "STATE_BYTES=200000", "--env", "STEP_SECONDS=0.3",
                              "--env", "TOTAL_STEPS=10")
    assert code == 0 and summary["ok"], summary["corruptions"] + summary["regressions"]
    first, second = summary["attempts"]
    # Killed ~0.1 s after step 10's manifest: rclone's 1 s write-back had not even started it.
    assert first["checkpoints"][-1]["step"] == 10
    assert first["bucket"]["newest_complete_step"] == 5
    assert second["resumed_from"] == 5 and second["resumed_key"].endswith("/step-00000005")


@needs_fuse
def test_resuming_a_checkpoint_the_bucket_does_not_hold_whole_fails(rehearse, tmp_path, capsys):
    code, summary = rehearsal(rehearse, tmp_path, TOY_CACHED, "--preempt-at", "ckpt:10:kill",
                              *SLOW_SAVE, "--env", "BAD_RESUME=1")
    assert code == 1 and summary["status"] == "SUCCEEDED" and not summary["ok"]
    [line] = summary["corruptions"]
    assert line.startswith("CORRUPTION: attempt 2 resumed from skyspot-toy-cached/toy/")
    assert "step-00000010 (step 10)" in line and line.endswith(": manifest.json missing")
    assert line in capsys.readouterr().out


@needs_fuse
def test_process_loss_keeps_the_mount_and_counts_as_a_user_failure(rehearse, tmp_path):
    code, summary = rehearsal(rehearse, tmp_path, TOY_CACHED, "--preempt-at", "step:7:proc",
                              "--env", "TOTAL_STEPS=10")
    assert code == 0 and summary["ok"]
    first, second = summary["attempts"]
    assert first["ending"] == "failed" and first["exit_codes"] == [137]
    assert first["fault"]["kind"] == "proc" and first["fault"]["vm_lost"] == []
    assert first["decision"] == "restart: restart 1/1 on errors"
    assert summary["job_recovery"]["restart_cnt_on_failure"] == 1
    assert summary["totals"]["process_losses"] == 1
    assert summary["totals"]["preemptions"] == {"term": 0, "kill": 0, "notice": 0}
    # Same mount, same cache: the checkpoint at step 5 is there even if not uploaded yet.
    assert summary["mounts"]["/ckpt"]["nodes"][0]["mounted"] == 1
    assert not first["bucket"]["vm_lost"]
    assert second["resumed_from"] == 5


@needs_fuse
def test_notice_from_the_metadata_endpoint_reaches_the_trainer(rehearse, tmp_path):
    code, summary = rehearsal(rehearse, tmp_path, TOY_CACHED, "--preempt-at", "step:5:notice",
                              "--cloud", "aws", "--notice-lead", "1", "--env", "NOTICE_POLL=1",
                              "--env", "TOTAL_STEPS=10")
    assert code == 0 and summary["ok"]
    first, second = summary["attempts"]
    # The trainer saw the notice itself, saved and exited 143 before any signal.
    assert first["ending"] == "preempted:notice" and first["exit_codes"] == [143]
    assert first["preemption_reason"] == "notice:aws"
    fault = first["fault"]
    assert fault["sigterm_at"] - fault["at"] >= 1.0  # --notice-lead
    assert fault["vm_lost"][0]["at"] >= fault["sigterm_at"]  # the VM lives until then
    saved = first["checkpoints"][-1]["step"]
    assert saved == first["last_step"] and first["bucket"]["newest_complete_step"] == saved
    # The notice was withdrawn: the next attempt ran to the end.
    assert second["resumed_from"] == saved and second["ending"] == "exited"
    assert summary["totals"]["preemptions"]["notice"] == 1


@needs_fuse
def test_one_node_of_two_lost_tears_down_the_other(rehearse, tmp_path):
    code, summary = rehearsal(rehearse, tmp_path, TOY_2NODE, "--preempt-at", "step:5:term@1",
                              "--secret", "TOY_SECRET=x", "--env", "TOTAL_STEPS=10")
    assert code == 0 and summary["ok"]
    first, second = summary["attempts"]
    fault = first["fault"]
    assert fault["nodes"] == [1] and fault["teardown"] == [0]
    assert [lost["node"] for lost in fault["vm_lost"]] == [1, 0]  # struck first, then the rest
    # Node 1 saved nothing (rank 0 checkpoints), got SIGTERM and exited 143; node 0 was
    # killed when the cluster was torn down.
    assert first["exit_codes"] == [137, 143] and first["ending"] == "preempted:term"
    assert [n["mounted"] for n in summary["mounts"]["/ckpt"]["nodes"]] == [2, 2]
    assert second["resumed_from"] == first["bucket"]["newest_complete_step"] == 5


def test_ctrl_c_cleans_up_every_node(rehearse, tmp_path):
    marker = f"skyspot-rehearse-{uuid.uuid4().hex[:12]}"

    def interrupt_once_running() -> None:
        deadline = time.time() + 30
        while not watch.pids and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    # Ctrl-C as in a terminal: pytest started as a background job by a shell without job
    # control (`make test &` in a script) inherits SIGINT ignored and would never stop.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with MarkerWatch(marker) as watch:
            threading.Thread(target=interrupt_once_running, daemon=True).start()
            code, summary = rehearsal(
                rehearse, tmp_path, TOY_CACHED, "--env", "TOTAL_STEPS=100000",
                "--env", f"SETSID_MARKER={marker}",
            )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130 and summary["status"] == "INTERRUPTED"
    assert summary["attempts"][-1]["ending"] == "interrupted"
    assert watch.pids and watch.running() == []
    assert leftovers(tmp_path) == []  # mounts and the store are gone too


# --------------------------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([str(FIXTURES / "missing.yaml")], "recipe not found"),
        ([str(FIXTURES / "rejected.yaml")], "SkyPilot rejects"),
        ([TOY, "--preempt-at", "30s,soon"], "bad --preempt-at item 'soon'"),
        ([TOY, "--preempt-at", "step:x:kill"], "bad --preempt-at item"),
        ([TOY, "--preempt-at", "ckpt:3:kill@x"], "bad --preempt-at item"),
        ([TOY, "--preempt-at", "step:3:kill@1"], "no node 1"),
        ([TOY, "--preempt-at", "step:3:notice"], "need --cloud aws, gcp or azure"),
        ([TOY, "--bwlimit", "fast"], "--bwlimit 'fast'"),
        ([TOY, "--no-such-flag"], "unrecognized arguments"),
        ([TOY_2NODE], "secret TOY_SECRET has no value"),
        ([TOY, "--env", "1BAD=x"], "invalid variable name"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(rehearse, tmp_path, capsys, monkeypatch, args,
                                          message):
    monkeypatch.delenv("TOY_SECRET", raising=False)
    try:
        code = rehearse.main([*args, "--workdir", str(tmp_path / "rh")])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("rehearse: error:") and message in err
    assert not (tmp_path / "rh" / "rehearsal.json").exists()


def test_preempt_at_grammar(rehearse):
    parse = rehearse.parse_preempt_at
    assert [f.describe() for f in parse("30s,step:20:kill@1,ckpt:40:proc,5.5s:notice", "term")] \
        == ["30s:term", "step:20:kill@1", "ckpt:40:proc", "5.5s:notice"]
    assert parse("ckpt:3@0", "kill") == [rehearse.Fault("ckpt", 3, "kill", 0)]


def test_cli_process_help_and_bad_input():
    run = [sys.executable, str(SCRIPT)]
    help_ = subprocess.run([*run, "--help"], capture_output=True, text=True, cwd=REPO)
    assert help_.returncode == 0 and "example:" in help_.stdout and "--preempt-at" in help_.stdout
    assert "--bwlimit" in help_.stdout and "--no-fuse" in help_.stdout
    bad = subprocess.run([*run, "nope.yaml"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr == "rehearse: error: recipe not found: nope.yaml\n"
