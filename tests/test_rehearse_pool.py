"""tools/rehearse.py --pool-jobs: N jobs of one pool at once, against the same buckets.

The fixture is a pool YAML (workers, bucket, a setup that appends to ~/.bashrc) and a job
YAML (run:) in the shape of `sky jobs pool apply` + `sky jobs launch --pool P --num-jobs 2`.
Each job has its own VMs and SKYPILOT_JOB_RANK; a VM loss on one job is recovered by that
job alone while the other runs on. The items in the bucket are counted one by one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
POOL = REPO / "tests" / "fixtures" / "rehearse" / "pool"
from rehearsing import VM_OK, VM_WHY  # noqa: E402


@pytest.mark.skipif(not VM_OK, reason=f"the job's mount path /outputs needs VMs: {VM_WHY}")
def test_pool_of_two_jobs_with_a_vm_loss_on_one(rehearse, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    workdir = tmp_path / "rh"
    code = rehearse.main([str(POOL / "job.yaml"), "--pool", str(POOL / "pool.yaml"),
                          "--pool-jobs", "2", "--run-setup", "--preempt-at", "1s:kill@job1",
                          "--workdir", str(workdir), "--quiet"])
    summary = json.loads((workdir / "rehearsal.json").read_text())
    assert code == 0 and summary["ok"] and summary["status"] == "SUCCEEDED", summary
    assert summary["pool"]["num_jobs"] == 2 and summary["pool"]["workers"] == 2
    job0, job1 = summary["jobs"]
    assert (job0["job_rank"], job1["job_rank"]) == (0, 1)
    assert [a["ending"] for a in job0["attempts"]] == ["exited"]
    assert [a["ending"] for a in job1["attempts"]] == ["preempted:kill", "exited"]
    fault = job1["attempts"][0]["fault"]
    assert fault["kind"] == "kill" and fault["vm_lost"]
    # Job 0 ran on through job 1's VM loss: its one attempt spans the loss.
    lost_at = fault["vm_lost"][0]["at"]
    assert job0["attempts"][0]["started"] < lost_at < job0["attempts"][0]["ended"]
    assert job0["managed_job_id"] != job1["managed_job_id"]
    assert len(set(job0["node_ips"] + job1["node_ips"])) == 2  # a VM each

    root = Path(job0["storage"]["data_dir"]) / "skyspot-pool-out"
    items = {p.name: p.read_text().strip() for p in root.glob("item-*.txt")}
    assert sorted(items) == sorted(f"item-{i}.txt" for i in range(16))
    for name, text in items.items():  # every item by the job whose rank owns it
        i = int(name[5:-4])
        assert text == f"item {i} by job {i % 2}", (name, text)
    started = sorted(p.read_text().strip() for p in root.glob("started-*.txt"))
    # Each rank ran with SKYPILOT_NUM_JOBS=2 and the pool's setup in ~/.bashrc; job 1's first
    # start may have died in its VM's cache, its second is in the bucket.
    assert set(started) == {"0/2 yes", "1/2 yes"}
    assert started.count("0/2 yes") == 1


def test_fault_for_a_job_that_does_not_exist_is_one_line(rehearse, tmp_path, capsys):
    code = rehearse.main([str(POOL / "job.yaml"), "--pool", str(POOL / "pool.yaml"),
                          "--pool-jobs", "2", "--preempt-at", "1s:kill@job2",
                          "--workdir", str(tmp_path / "rh"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no job 2" in err[0], err


def test_more_jobs_than_workers_is_one_line(rehearse, tmp_path, capsys):
    code = rehearse.main([str(POOL / "job.yaml"), "--pool", str(POOL / "pool.yaml"),
                          "--pool-jobs", "3", "--workdir", str(tmp_path / "rh"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "2 worker(s)" in err[0], err


def test_a_pool_yaml_given_as_the_recipe_says_what_to_do(rehearse, tmp_path, capsys):
    code = rehearse.main([str(POOL / "pool.yaml"), "--workdir", str(tmp_path / "rh"),
                          "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--pool" in err[0], err
