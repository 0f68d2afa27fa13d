"""preprocess/tokenize.py rehearsed as SkyPilot runs it (tools/rehearse.py): each node a VM of
its own, the bucket a local S3 server mounted through FUSE, faults injected by rehearse.

- A pool of 2 jobs (`sky jobs launch --pool P --num-jobs 2`): job 1's VM is SIGKILLed and
  lost, job 0's process is killed on its live VM; both recover.
- The real recipes/preprocess-tokenize.yaml as one managed job, with a SIGKILL that takes
  the VM, a process loss and a SIGTERM.

While each runs, a sampler lists the bucket through the S3 API: at every sample each unit is
there at most once and whole. At the end every unit is there exactly once, byte-identical
to an uninterrupted one-worker run, and no temporary file is left.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from preprocessing import FUSE_OK, FUSE_WHY, REPO, Sampler, localstore
from rehearsing import VM_OK, VM_WHY, rehearsal

POOL = REPO / "tests" / "fixtures" / "rehearse" / "preprocess"
pytestmark = [
    pytest.mark.skipif(not VM_OK, reason=f"the mount path needs VMs: {VM_WHY}"),
    pytest.mark.skipif(not FUSE_OK, reason=f"needs FUSE: {FUSE_WHY}"),
]


def s3_sampler(corpus: dict, workdir: Path, bucket: str, prefix: str) -> Sampler:
    """A Sampler reading ``bucket/prefix/data`` through the rehearsal's S3 server, once it
    is up (its rclone.conf appears under WORKDIR/store)."""
    conf = workdir / "store" / "rclone.conf"
    rclone = localstore.rclone_binary()

    def run(*args: str) -> subprocess.CompletedProcess:
        if not conf.exists():
            raise OSError("the store is not up yet")
        return subprocess.run([rclone, *args], capture_output=True, check=True, timeout=30,
                              env={**os.environ, "RCLONE_CONFIG": str(conf)})

    def listed() -> dict[str, int]:
        out = run("lsjson", "-R", "--files-only", "--no-mimetype", "--no-modtime",
                  f"skyspot-local:{bucket}/{prefix}/data").stdout
        return {item["Path"]: int(item["Size"]) for item in json.loads(out or b"[]")}

    def read(name: str) -> bytes:
        return run("cat", f"skyspot-local:{bucket}/{prefix}/data/{name}").stdout

    return Sampler(corpus, listed, read)


def check_bucket(corpus: dict, summary: dict, bucket: str, prefix: str) -> None:
    root = Path(summary["storage"]["data_dir"]) / bucket / prefix
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
             if p.is_file()}
    want = corpus["files"]
    parts = sorted(name for name in files if name.startswith("data/"))
    assert parts == sorted(name for name in want if name.startswith("data/"))
    different = [name for name in want if files.get(name) != want[name]]
    assert not different, f"differ from the uninterrupted run: {different[:5]}"
    assert not [name for name in files if name.startswith("_tmp/")], "temporary files left"


def test_pool_of_two_with_a_lost_vm_and_a_killed_process(rehearse, corpus, tmp_path):
    rng = random.Random(141)
    # After a random number of units committed in the attempt (tokenize.py's "unit" events).
    kill_at, proc_at = rng.randint(2, 12), rng.randint(2, 12)
    workdir = tmp_path / "rh"
    sampler = s3_sampler(corpus, workdir, "skyspot-tok-pool", "tok")
    sampler.start()
    code, summary = rehearsal(
        rehearse, workdir, str(POOL / "job.yaml"), "--pool", str(POOL / "pool.yaml"),
        "--pool-jobs", "2", "--env", f"DATASET={corpus['dataset']}",
        "--env", f"TOKENIZER={corpus['tokenizer']}",
        "--preempt-at", f"step:{kill_at}:kill@job1,step:{proc_at}:proc@job0")
    sampler.stop()
    assert code == 0 and summary["ok"] and summary["status"] == "SUCCEEDED", summary
    job0, job1 = summary["jobs"]
    assert [a["ending"] for a in job1["attempts"]][0] == "preempted:kill", job1["attempts"]
    # A process killed on a live VM exits 137: an error to SkyPilot, restarted on the same VM.
    assert job0["attempts"][0]["ending"] == "failed", job0["attempts"]
    assert job0["attempts"][0]["fault"]["kind"] == "proc" and len(job0["attempts"]) == 2
    check_bucket(corpus, job0, "skyspot-tok-pool", "tok")  # a pool: storage is per job
    assert sampler.samples > 10 and not sampler.problems, sampler.problems[:5]
    assert sampler.most > 0


def test_the_recipe_as_one_managed_job_through_kill_proc_and_term(rehearse, corpus,
                                                                  tmp_path):
    recipe = REPO / "recipes" / "preprocess-tokenize.yaml"
    if not recipe.exists():
        pytest.fail("recipes/preprocess-tokenize.yaml is missing")
    rng = random.Random(142)
    steps = [rng.randint(2, 10) for _ in range(3)]  # units committed in the attempt
    workdir = tmp_path / "rh"
    sampler = s3_sampler(corpus, workdir, "skyspot-tok-data", "tok")
    sampler.start()
    code, summary = rehearsal(
        rehearse, workdir, str(recipe), "--env", "DATA_BUCKET=skyspot-tok-data",
        "--env", f"DATASET={corpus['dataset']}", "--env", f"TOKENIZER={corpus['tokenizer']}",
        "--env", "SEQ_LEN=64", "--env", "UNIT_ROWS=200", "--env", "NUM_PROC=1",
        "--env", "OUTPUT_NAME=tok", "--env", "NOTICE_POLL_SECONDS=0",
        "--preempt-at", ",".join(f"step:{n}:{kind}" for n, kind in
                                 zip(steps, ("kill", "proc", "term"), strict=True)))
    sampler.stop()
    assert code == 0 and summary["ok"] and summary["status"] == "SUCCEEDED", summary
    endings = [a["ending"] for a in summary["attempts"]]
    assert endings[:3] == ["preempted:kill", "failed", "preempted:term"], endings
    check_bucket(corpus, summary, "skyspot-tok-data", "tok")
    assert sampler.samples > 10 and not sampler.problems, sampler.problems[:5]
