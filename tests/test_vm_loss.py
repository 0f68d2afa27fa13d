"""The real recipes on the real stack lose VMs at many points and still end bit-identical.

Each test rehearses a recipe through tools/rehearse.py: SkyPilot's own parser, the recipe's
own run: (skyspot.launch + accelerate launch + train/lm.py), its checkpoint bucket on a local
S3 server mounted per node in the recipe's mode, uploads capped with --bwlimit so the bucket
lags the trainer. Faults SIGKILL a node's whole PID namespace and its rclone mount, then
delete its VFS cache: whatever had not reached the bucket is gone, as on a reclaimed VM.
``ckpt:N`` strikes right after the trainer wrote a checkpoint's manifest on the node, while
its files are still uploading.

After every lost VM, rehearse reads the bucket through the S3 API (never a node's mount or
cache) and finds the newest checkpoint whose manifest and every listed file (size and
xxh3-128) are there. These tests require that the next attempt resumed from exactly that
one: never from an incomplete checkpoint, never from an older one or from step 0 while a
complete one existed. The final weights are compared tensor by tensor with an uninterrupted
run of the same job (plain directories: storage does not change the math).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from trainer import REPO, assert_bit_identical, rehearsal_weights, rehearse

sys.path.insert(0, str(REPO / "tools"))
import localstore  # noqa: E402

pytestmark = pytest.mark.slow
FUSE_OK, FUSE_WHY = localstore.fuse_available()
if not FUSE_OK:  # rehearse would fall back to plain directories, where no VM loses anything
    pytest.skip(f"needs FUSE: {FUSE_WHY}", allow_module_level=True)

# ~0.1 s per optimizer step on 2 CPU cores, a 15 MB checkpoint every 3 steps; at 8 MB/s an
# upload takes ~2 s, so the trainer writes checkpoints far faster than the bucket takes them.
JOB = {"CHECKPOINT_BUCKET": "ckpt", "FROM_SCRATCH": "true", "SEQ_LEN": "64", "BATCH_SIZE": "4",
       "GRAD_ACCUM": "2", "LR": "3e-3", "WARMUP_STEPS": "3", "MAX_STEPS": "60", "SEED": "5",
       "MIXED_PRECISION": "no", "CHECKPOINT_EVERY_STEPS": "3", "CHECKPOINT_EVERY_MINUTES": "0",
       "KEEP_LAST": "2", "LOG_EVERY": "10", "NOTICE_POLL_SECONDS": "0"}
BWLIMIT = "8M"
SPOT = "recipes/train-lm-spot.yaml"
MULTINODE = "recipes/train-lm-multinode.yaml"


def rehearse_ok(workdir: Path, assets: Path, recipe: str, *extra: str, **envs: str) -> dict:
    job = {**JOB, "MODEL": str(assets / "model"), "DATASET": str(assets / "data"), **envs}
    result, summary = rehearse(recipe, workdir, job, "--gpus-per-node", "1", "--grace", "20",
                               *extra)
    assert result.returncode == 0 and summary["ok"], (
        f"rehearsal failed: {summary['status']} {summary['regressions']} "
        f"{summary['corruptions']} {summary.get('errors')}\n{result.stdout[-4000:]}")
    return summary


def final_weights(summary: dict):
    return rehearsal_weights(summary, JOB["CHECKPOINT_BUCKET"])


@pytest.fixture(scope="module")
def uninterrupted(tiny_assets, tmp_path_factory):
    """Final weights of each recipe's job run once without faults, on plain directories."""
    cache: dict[str, dict] = {}

    def get(recipe: str):
        if recipe not in cache:
            workdir = tmp_path_factory.mktemp("uninterrupted")
            summary = rehearse_ok(workdir, tiny_assets, recipe, "--no-fuse")
            assert len(summary["attempts"]) == 1
            cache[recipe] = final_weights(summary)
        return cache[recipe]

    return get


def check_vm_losses(summary: dict, mode: str) -> list[dict]:
    """Every lost VM was followed by a resume from exactly the newest checkpoint complete in
    the bucket; return the attempts that lost VMs."""
    assert all(m["mode"] == mode for m in summary["mounts"].values()), summary["mounts"]
    assert summary["storage"]["backend"] == "fuse"
    attempts = summary["attempts"]
    assert attempts[-1]["ending"] == "exited" and attempts[-1]["exit_codes"] == [0] * len(
        attempts[-1]["exit_codes"])
    lost = [a for a in attempts if a["fault"] and a["fault"]["vm_lost"]]
    for attempt, following in zip(attempts, attempts[1:], strict=False):
        if attempt not in lost:
            continue
        bucket = attempt["bucket"]
        assert bucket["vm_lost"], attempt
        newest = bucket["newest_complete_step"] or 0  # None: nothing complete, start fresh
        assert following["resumed_from"] == newest, (
            f"attempt {following['index']} resumed from {following['resumed_from']}, the bucket "
            f"held a complete checkpoint at {newest}: {bucket['checkpoints']}")
        if newest:
            assert following["resumed_key"] == f"ckpt/{bucket['newest_complete_key']}"
    return lost


def check_lag_bound(summary: dict) -> None:
    """A periodic checkpoint is taken only once the previous one is whole in the bucket."""
    for attempt in summary["attempts"]:
        previous = attempt["resumed_from"] or None
        for ckpt in attempt["checkpoints"]:
            final = ckpt["step"] == int(JOB["MAX_STEPS"])  # the last save is never skipped
            if previous is not None and not final:
                assert ckpt["durable_step"] is not None and ckpt["durable_step"] >= previous, (
                    f"attempt {attempt['index']} saved step {ckpt['step']} while step "
                    f"{previous} was not yet in the bucket")
            previous = ckpt["step"]


def test_vm_loss_at_many_points_on_mount_cached(tiny_assets, tmp_path, uninterrupted):
    strikes = "ckpt:9:kill,step:25:kill,ckpt:40:kill,step:50:kill"
    summary = rehearse_ok(tmp_path / "run", tiny_assets, SPOT, "--bwlimit", BWLIMIT,
                       "--preempt-at", strikes)
    lost = check_vm_losses(summary, "MOUNT_CACHED")
    assert [a["fault"]["trigger"] for a in lost] == strikes.split(",")

    # A ckpt:N strike lands right after a manifest was written on the node, before that
    # checkpoint reached the bucket: the resume must fall back to an older, complete one.
    behind = [a for a in lost if a["fault"]["trigger"].startswith("ckpt:")
              and a["checkpoints"] and a["checkpoints"][-1]["step"]
              > (a["bucket"]["newest_complete_step"] or 0)]
    assert behind, "no ckpt:N strike caught a checkpoint still uploading: the test is too slow"
    # Progress that had reached the bucket was kept: some attempt resumed past step 0.
    assert any(a["resumed_from"] for a in summary["attempts"][1:]), summary["attempts"]
    # The lag bound engaged (the trainer skipped saves) and held.
    assert summary["totals"]["checkpoints"]["skipped"] > 0
    check_lag_bound(summary)
    assert summary["totals"]["final_step"] == int(JOB["MAX_STEPS"])
    assert_bit_identical(final_weights(summary), uninterrupted(SPOT))


def test_process_loss_and_a_notice_on_mount_cached(tiny_assets, tmp_path, uninterrupted):
    # proc: the job's processes die on a live VM; the mount keeps its cache and goes on
    # uploading what was closed, so nothing committed is lost. notice: the cloud's metadata
    # endpoint announces the preemption; the trainer saves, waits until the bucket holds
    # the save, and exits 143 before the SIGTERM.
    summary = rehearse_ok(tmp_path / "run", tiny_assets, SPOT, "--bwlimit", BWLIMIT,
                       "--preempt-at", "step:20:proc,step:40:notice", "--cloud", "aws",
                       "--notice-lead", "20", NOTICE_POLL_SECONDS="0.5")
    proc, notice, last = summary["attempts"]
    assert proc["ending"] == "failed" and proc["fault"]["kind"] == "proc"
    assert notice["resumed_from"] >= max(c["step"] for c in proc["checkpoints"])
    assert notice["ending"] == "preempted:notice" and notice["exit_codes"] == [143]
    assert notice["preemption_reason"] == "notice:aws"
    assert notice["bucket"]["newest_complete_step"] == notice["last_step"]  # uploaded first
    assert last["resumed_from"] == notice["last_step"] and notice["steps_lost"] == 0
    # Retention caught up once the last upload finished: keep_last (2) checkpoints are left.
    (run,) = Path(summary["storage"]["data_dir"]).glob("ckpt/*/")
    kept = sorted(d.name for d in run.glob("step-*") if any(f.is_file() for f in d.rglob("*")))
    assert len(kept) == 2 and kept[-1] == "step-00000060", kept
    assert_bit_identical(final_weights(summary), uninterrupted(SPOT))


def test_two_node_job_losing_one_node(tiny_assets, tmp_path, uninterrupted):
    # Node 1 is lost; SkyPilot then restarts the whole job (node 0's VM is torn down too).
    strikes = "ckpt:9:kill@1,step:30:kill@1"
    summary = rehearse_ok(tmp_path / "run", tiny_assets, MULTINODE, "--bwlimit", BWLIMIT,
                       "--preempt-at", strikes)
    assert summary["num_nodes"] == 2
    lost = check_vm_losses(summary, "MOUNT_CACHED")
    assert len(lost) == 2
    for attempt in lost:
        assert attempt["fault"]["nodes"] == [1]
        assert [v["node"] for v in attempt["fault"]["vm_lost"]] == [1, 0]
    assert any(a["resumed_from"] for a in summary["attempts"][1:]), summary["attempts"]
    events = (tmp_path / "run" / "events" / "node0.jsonl").read_text().splitlines()
    worlds = [json.loads(line)["world_size"] for line in events if '"start"' in line]
    assert worlds == [2, 2, 2]  # one rank on each of the 2 nodes, in every attempt
    check_lag_bound(summary)
    assert_bit_identical(final_weights(summary), uninterrupted(MULTINODE))


def test_vm_loss_on_mount_mode(tiny_assets, tmp_path, uninterrupted):
    # The same recipe with its bucket in MOUNT mode (goofys/gcsfuse: a file is in the bucket
    # once closed), as a user switching modes would write it.
    text = (REPO / SPOT).read_text()
    text, modes = re.subn(r"mode: MOUNT_CACHED\b.*", "mode: MOUNT", text)
    text, presets = re.subn(r"\n\s*type: MODEL_CHECKPOINT_RW.*", "", text)
    assert modes == presets == 1
    recipe = tmp_path / "train-lm-spot-mount.yaml"
    recipe.write_text(text)

    strikes = "ckpt:9:kill,step:30:kill,ckpt:45:kill"
    summary = rehearse_ok(tmp_path / "run", tiny_assets, str(recipe), "--bwlimit", BWLIMIT,
                       "--preempt-at", strikes)
    lost = check_vm_losses(summary, "MOUNT")
    assert len(lost) == 3
    # Closed is uploaded: a ckpt:N strike loses nothing the trainer committed.
    for attempt in lost:
        if attempt["fault"]["trigger"].startswith("ckpt:"):
            assert attempt["bucket"]["newest_complete_step"] == attempt["checkpoints"][-1]["step"]
    check_lag_bound(summary)
    assert_bit_identical(final_weights(summary), uninterrupted(SPOT))
