"""A fresh machine: /dev/fuse may be there, fuse3 (fusermount3) is not installed, because
nothing but `make setup` as root installs it. The first thing a user runs must still work:
tools/rehearse.py falls back to plain directories and says in one line how to get the real
stack, instead of refusing to run (as it did, exit 2, while CI, which installed fuse3 itself,
stayed green)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "tests" / "fixtures" / "rehearse" / "toy.yaml"
FUSERMOUNTS = ("fusermount3", "fusermount")


def path_without_fusermount(scratch: Path) -> str:
    """This process's PATH minus fusermount3/fusermount: every PATH directory that holds one
    (e.g. /usr/bin on a CI machine with fuse3) is replaced by a directory of symlinks to
    everything else in it, so the run still finds bash, unshare, python and the rest."""
    dirs = []
    for index, entry in enumerate(os.environ["PATH"].split(os.pathsep)):
        directory = Path(entry)
        if not any((directory / name).exists() for name in FUSERMOUNTS):
            dirs.append(entry)
            continue
        shim = scratch / f"path{index}"
        shim.mkdir(parents=True)
        for item in directory.iterdir():
            if item.name not in FUSERMOUNTS:
                (shim / item.name).symlink_to(item)
        dirs.append(str(shim))
    path = os.pathsep.join(dirs)
    assert not any(shutil.which(name, path=path) for name in FUSERMOUNTS)
    return path


def test_rehearse_without_fusermount_runs_on_plain_directories_and_says_how_to_get_fuse(
        tmp_path):
    workdir = tmp_path / "rh"
    env = {**os.environ, "PATH": path_without_fusermount(tmp_path / "bin")}
    # From the repo root, as a user would (the toy recipe says `workdir: .`).
    result = subprocess.run(
        [sys.executable, "tools/rehearse.py", str(TOY), "--workdir", str(workdir), "--quiet",
         "--env", "TOTAL_STEPS=5"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "error" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    # One line says that buckets are plain directories, why, and how to get the real stack.
    [line] = [line for line in result.stdout.splitlines() if "plain directories" in line]
    assert line.startswith("rehearse: no FUSE here: ")
    assert "fusermount3 (or fusermount) is not on PATH" in line
    assert "sudo apt-get install -y fuse3" in line and "`make setup` as root" in line
    summary = json.loads((workdir / "rehearsal.json").read_text())
    assert summary["ok"] and summary["status"] == "SUCCEEDED"
    assert summary["storage"]["backend"] == "plain"
    # The job's checkpoint landed in the plain bucket directory, committed (manifest last).
    bucket = workdir / "buckets" / "skyspot-toy-ckpt"
    assert summary["mounts"]["/ckpt"]["nodes"][0]["local"] == str(bucket)
    run = summary["attempts"][0]["run_name"]
    step = bucket / "toy" / run / "step-00000005"
    assert sorted(p.name for p in step.iterdir()) == ["manifest.json", "state.bin"]
