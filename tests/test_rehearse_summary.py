"""tools/rehearse.py's summary tells the truth for any recipe: what every bucket held through
time (through the S3 API), what a lost VM had written that never reached its bucket, null
figures where the recipe reported none (no skyspot events), never a negative number of steps
lost, and a job whose nodes each started a world of their own FAILS the rehearsal (SPLIT).

The rehearsals run small fixtures under tests/fixtures/rehearse/ in-process through
``rehearse.main`` (as tests/test_rehearse.py does): batch.yaml (plain numbered files into a
MOUNT_CACHED bucket, no events), split.yaml (every node's trainer is global rank 0 of a world
of its own) and toy_2node.yaml (one world over two nodes).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "rehearse"
BATCH = str(FIXTURES / "batch.yaml")
SPLIT = str(FIXTURES / "split.yaml")
TOY_2NODE = str(FIXTURES / "toy_2node.yaml")
BUCKET = "skyspot-batch-out"
NOT_SKYSPOT = "this recipe does not write skyspot checkpoints: the resume check does not apply"
sys.path.insert(0, str(REPO / "tools"))
import localstore  # noqa: E402
from rehearsing import bucket_files, leftovers, rehearsal  # noqa: E402

FUSE, FUSE_WHY = localstore.fuse_available()
needs_fuse = pytest.mark.skipif(not FUSE, reason=f"needs FUSE: {FUSE_WHY}")


@pytest.fixture(autouse=True)
def nothing_left_behind(tmp_path):
    yield
    assert leftovers(tmp_path) == []


def part(key: str) -> int:
    """results/part-0007.bin -> 7"""
    return int(key.rpartition("part-")[2].partition(".")[0])


NULL_FIGURES = ("final_step", "steps_executed", "steps_lost", "goodput", "wall_goodput")


# --------------------------------------------------------------------------------------------
# A recipe that knows nothing of skyspot


def test_recipe_without_skyspot_events_gets_a_generic_summary(rehearse, tmp_path, capsys):
    code, summary = rehearsal(rehearse, tmp_path, BATCH, "--env", "FILE_SECONDS=0.5")
    out = capsys.readouterr().out
    assert code == 0 and summary["ok"] and summary["status"] == "SUCCEEDED"
    assert summary["skyspot_events"] is False
    assert {k: summary["totals"][k] for k in NULL_FIGURES} == dict.fromkeys(NULL_FIGURES)
    assert summary["splits"] == [] and summary["inconsistencies"] == []
    # One line says why the resume check, steps and goodput are absent; none is printed.
    assert out.count(NOT_SKYSPOT) == 1
    assert "goodput" not in out and "final step" not in out and "checkpoints (" not in out
    # Every part is in the bucket, whole.
    files = bucket_files(summary, BUCKET)
    assert files == {f"results/part-{i:04d}.bin": bytes([i]) * 2000 for i in range(1, 9)}
    [attempt] = summary["attempts"]
    assert attempt["buckets_at_end"] == {BUCKET: {"objects": 8, "bytes": 16000}}
    # The bucket through time: sampled about every second while the writer ran (8 parts,
    # 0.5 s apart), so the count grew in steps, and an entry only when it changed.
    timeline = summary["bucket_timeline"]
    assert {e["bucket"] for e in timeline} == {BUCKET}
    counts = [e["objects"] for e in timeline]
    assert counts == sorted(counts) and len(set(counts)) == len(counts) >= 3, timeline
    assert counts[0] < 8 and (timeline[-1]["objects"], timeline[-1]["bytes"]) == (8, 16000)
    assert all(e["bytes"] == 2000 * e["objects"] for e in timeline)
    times = [e["time"] for e in timeline]
    assert times == sorted(times) and attempt["started"] <= times[0]
    assert "attempt 1 end: skyspot-batch-out 8 objects, 16.0 KB" in out
    assert f"{len(timeline)} changes in rehearsal.json bucket_timeline" in out


@needs_fuse
def test_lost_vm_records_what_never_reached_the_bucket(rehearse, tmp_path, capsys):
    # The writer closes a 100 KB part every 0.2 s (faster than the 200 KB/s upload cap, and
    # rclone waits 1 s before uploading any): when the VM goes at 8 s (its mount and the node
    # take ~5 s to start here), the newest parts are only in its mount's cache. One attempt
    # only, so the bucket at the end is what survived.
    code, summary = rehearsal(
        rehearse, tmp_path, BATCH, "--preempt-at", "8s:kill", "--max-attempts", "1",
        "--bwlimit", "200K", "--env", "FILE_BYTES=100000", "--env", "FILE_SECONDS=0.2",
        "--env", "NUM_FILES=1000")
    out = capsys.readouterr().out
    assert code == 1 and summary["status"] == "MAX_ATTEMPTS" and not summary["ok"]
    [attempt] = summary["attempts"]
    assert attempt["ending"] == "preempted:kill"
    [lost] = attempt["fault"]["vm_lost"]
    unuploaded = lost["unuploaded"]
    assert unuploaded, "the VM went with parts still in its cache"
    assert lost["unuploaded_count"] == len(unuploaded)
    assert lost["unuploaded_bytes"] == sum(u["bytes"] for u in unuploaded)
    assert {u["bucket"] for u in unuploaded} == {BUCKET}
    # Indeed never in the bucket: it holds the older parts, whole, the cache had the rest.
    files = bucket_files(summary, BUCKET)
    in_bucket = {part(k) for k in files}
    missing = {part(u["key"]) for u in unuploaded}
    assert files and not in_bucket & missing
    assert in_bucket | missing == set(range(1, max(in_bucket | missing) + 1))
    assert all(len(data) == 100000 for data in files.values())
    newest = max(missing)
    assert all(u["bytes"] == 100000 for u in unuploaded if part(u["key"]) != newest)
    # After the fault the bucket is described as it is, not as a missing checkpoint.
    bucket = attempt["bucket"]
    assert bucket["vm_lost"] and bucket["objects"] == len(files)
    assert bucket["bytes"] == 100000 * len(files) and bucket["newest_complete_step"] is None
    assert (f"attempt 1: after the fault (VM lost): bucket {BUCKET} holds {len(files)} objects"
            in out)
    assert "newest complete checkpoint" not in out
    line = (f"attempt 1: node 0's VM lost {len(unuploaded)} file"
            f"{'s' if len(unuploaded) > 1 else ''}, ")
    [summary_line] = [x for x in out.splitlines() if x.startswith(line)]
    assert summary_line.endswith("that never reached the bucket: "
                                 + ", ".join(f"{BUCKET}/{u['key']}" for u in unuploaded[:5])
                                 + (f", ... ({len(unuploaded) - 5} more)"
                                    if len(unuploaded) > 5 else ""))
    assert attempt["buckets_at_end"] == {BUCKET: {"objects": len(files),
                                                  "bytes": 100000 * len(files)}}
    assert {k: summary["totals"][k] for k in NULL_FIGURES} == dict.fromkeys(NULL_FIGURES)
    assert out.count(NOT_SKYSPOT) == 1


# --------------------------------------------------------------------------------------------
# One world across the nodes


def test_nodes_that_each_start_their_own_world_fail_the_rehearsal(rehearse, tmp_path, capsys):
    code, summary = rehearsal(rehearse, tmp_path, SPLIT, "--gpus-per-node", "1")
    out = capsys.readouterr().out
    # The job itself succeeded; the rehearsal does not.
    assert code == 1 and summary["status"] == "SUCCEEDED" and not summary["ok"]
    line = ("SPLIT: attempt 1: nodes 0 and 1 each started a world of size 1; expected one "
            "world of 2 (2 nodes × 1 GPU)")
    assert summary["splits"] == [line]
    assert line in out.splitlines() and "rehearsal FAILED" in out
    [attempt] = summary["attempts"]
    assert sorted((s["node"], s["world_size"]) for s in attempt["starts"]) == [(0, 1), (1, 1)]
    # Node 0's steps are one world's of two: reported, but no goodput or loss built on them.
    totals = summary["totals"]
    assert totals["final_step"] == 3 and totals["steps_executed"] == 3
    assert totals["goodput"] is None and totals["steps_lost"] is None
    assert totals["wall_goodput"] is None


def test_one_world_over_both_nodes_is_not_a_split(rehearse, tmp_path):
    # No GPUs: one process per node, so the toy's launcher-wide world is 2 x 1. (PID
    # namespaces only: the check reads events files, whatever the nodes are.)
    code, summary = rehearsal(rehearse, tmp_path, TOY_2NODE, "--gpus-per-node", "0",
                              "--secret", "TOY_SECRET=x", "--isolation", "pid")
    assert code == 0 and summary["ok"] and summary["splits"] == []
    [attempt] = summary["attempts"]
    assert [(s["node"], s["world_size"]) for s in attempt["starts"]] == [(0, 2)]
    assert summary["skyspot_events"] is True
    assert summary["totals"]["final_step"] == 2 and summary["totals"]["goodput"] == 1.0


# --------------------------------------------------------------------------------------------
# The accounting itself, on attempts made up here


def made_up(index: int, resumed_from: int | None, last_step: int | None,
            starts: list[tuple[int, int]] = ((0, 1),)) -> object:
    from rehearsal.attempts import Attempt

    attempt = Attempt(index, "task", 1000.0 + index * 10, ended=1000.0 + index * 10 + 9,
                      ending="exited", exit_codes=[0])
    attempt.resumed_from, attempt.last_step = resumed_from, last_step
    attempt.step_times = [(step, 1000.0 + index * 10 + step * 0.1)
                          for step in range((resumed_from or 0) + 1, (last_step or 0) + 1)]
    attempt.starts = [{"node": n, "world_size": w, "time": 0.0} for n, w in starts]
    attempt.skyspot_events = 1 + len(attempt.step_times)
    return attempt


def fake_rehearsal(attempts: list, num_nodes: int = 1, gpus_per_node: int = 1) -> object:
    recipe = SimpleNamespace(path=Path("made-up.yaml"), num_nodes=num_nodes, strategy=None)
    buckets = SimpleNamespace(describe=lambda: ({"backend": "plain"}, {}))
    job = SimpleNamespace(recipe=recipe, workdir=Path("/nowhere"), job_id=1, cloud="local",
                          gpus_per_node=gpus_per_node, buckets=buckets)
    policy = SimpleNamespace(max_restarts_on_errors=0, recover_on_exit_codes=[],
                             restart_cnt_on_failure=0)
    return SimpleNamespace(attempts=attempts, job=job, policy=policy, pid_namespace=True)


def test_resuming_beyond_the_last_reported_step_is_an_inconsistency(rehearse, capsys):
    from rehearsal.timeline import print_summary, summarize

    attempts = [made_up(1, 0, 10), made_up(2, 15, 20)]
    summary = summarize(fake_rehearsal(attempts), "SUCCEEDED", [], [])
    print_summary(summary, 1000.0)
    out = capsys.readouterr().out
    [line] = summary["inconsistencies"]
    assert line.startswith("INCONSISTENT: attempt 2 resumed from step 15, beyond step 10, "
                           "the last attempt 1 reported")
    assert line in out.splitlines()
    assert [a["steps_lost"] for a in summary["attempts"]] == [None, None]
    totals = summary["totals"]
    assert (totals["final_step"], totals["steps_executed"]) == (20, 15)
    assert totals["steps_lost"] is None and totals["goodput"] is None
    assert totals["wall_goodput"] is None
    assert "lost -, goodput - (steps)" in out and "-5" not in out


def test_steps_lost_and_goodput_count_from_where_the_job_started(rehearse):
    from rehearsal.timeline import summarize

    # Started from a seed checkpoint at step 50, lost 5 steps to a preemption.
    attempts = [made_up(1, 50, 60), made_up(2, 55, 100)]
    summary = summarize(fake_rehearsal(attempts), "SUCCEEDED", [], [])
    assert summary["inconsistencies"] == [] and summary["ok"]
    assert [a["steps_lost"] for a in summary["attempts"]] == [5, None]
    totals = summary["totals"]
    assert (totals["final_step"], totals["steps_executed"], totals["steps_lost"]) == (100, 55, 5)
    assert totals["goodput"] == round(50 / 55, 4)


def test_split_lines_name_the_nodes_and_the_expected_world(rehearse):
    from rehearsal.timeline import find_splits

    one_world = [made_up(1, 0, 5, [(0, 8)])]
    assert find_splits(one_world, 2, 4) == []
    assert find_splits([made_up(1, 0, 5, [(0, 1)])], 2, 0) == [
        "SPLIT: attempt 1: node 0 started a world of size 1; expected one world of 2 "
        "(2 nodes × 1 process, no GPUs)"]
    assert find_splits([made_up(1, 0, 5, [(0, 8)]), made_up(2, 0, 5, [(0, 4), (2, 4)])],
                       2, 4) == [
        "SPLIT: attempt 2: nodes 0 and 2 each started a world of size 4; expected one world "
        "of 8 (2 nodes × 4 GPUs)"]
    from rehearsal.timeline import summarize

    summary = summarize(fake_rehearsal([made_up(1, 0, 5, [(0, 1), (1, 1)])], num_nodes=2),
                        "SUCCEEDED", [], [])
    assert not summary["ok"] and len(summary["splits"]) == 1
