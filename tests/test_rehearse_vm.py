"""tools/rehearse.py: each emulated node is a VM of its own.

Recipes in the shape users write them (tests/fixtures/rehearse/vm/): a bucket at a hard-coded
``/checkpoint``, ``~/`` mount paths and a ``setup:`` that appends to ``~/.bashrc``, a 2-node
``torchrun`` c10d job with its rendezvous on the first node's address, ``pkill -f`` on the
recipe's own helper. Each must behave as on SkyPilot: files land in the bucket (read from
the store's data directory, never from a node's mount) and nothing appears on this
machine's root. Needs root and namespaces (tools/rehearsal/vm.py's probe); without them the
test that applies is the refusal of literal mount paths.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VM_FIXTURES = REPO / "tests" / "fixtures" / "rehearse" / "vm"
from rehearsing import SCRIPT, bucket_files, needs_vm  # noqa: E402


def run(rehearse, recipe: str, workdir: Path, *args: str) -> tuple[int, dict]:
    code = rehearse.main([str(VM_FIXTURES / recipe), "--workdir", str(workdir), "--quiet",
                          *args])
    return code, json.loads((workdir / "rehearsal.json").read_text())


def texts(summary: dict, bucket: str) -> dict[str, str]:
    return {key: data.decode() for key, data in bucket_files(summary, bucket).items()}


@needs_vm
def test_hard_coded_mount_path_lands_in_the_bucket_not_on_this_machine(rehearse, tmp_path):
    assert not Path("/checkpoint").exists(), "this machine has a /checkpoint: test can't tell"
    code, summary = run(rehearse, "literal_path.yaml", tmp_path / "rh")
    assert code == 0 and summary["status"] == "SUCCEEDED"
    files = texts(summary, "skyspot-vm-literal")
    assert {k: v.strip() for k, v in files.items() if "step-" in k} == {
        f"run1/step-{s}.txt": f"weights at step {s}" for s in (1, 2, 3)}
    assert files["run1/listing.txt"].split() == ["listing.txt", "step-1.txt", "step-2.txt",
                                                  "step-3.txt"]
    assert not Path("/checkpoint").exists()


@needs_vm
def test_home_paths_and_a_setup_that_appends_to_bashrc(rehearse, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "input.txt").write_text("hello from the copied dir\n")
    workdir = tmp_path / "rh"
    code, summary = run(rehearse, "home_paths.yaml", workdir, "--env", f"DATA_SRC={data}",
                        "--run-setup")
    assert code == 0, summary
    files = {k: v.strip() for k, v in texts(summary, "skyspot-vm-home").items()}
    home = workdir / "nodes" / "node0" / "home"
    assert files == {"copied.txt": "hello from the copied dir",
                     "bashrc.txt": "set-by-setup",  # setup's export, sourced by bash -i
                     "home.txt": str(home),
                     "pwd.txt": str(home / "data"),
                     "setup-env.txt": "setup rank=0 node_rank=unset"}
    assert "FROM_BASHRC" in (home / ".bashrc").read_text()


@needs_vm
def test_home_survives_a_restart_on_the_same_vm_and_goes_with_the_vm(rehearse, tmp_path):
    code, summary = run(rehearse, "home_lifetime.yaml", tmp_path / "rh",
                        "--preempt-at", "1s:proc,1s:kill")
    assert code == 0, summary
    endings = [a["ending"] for a in summary["attempts"]]
    assert endings == ["failed", "preempted:kill", "exited"], endings
    seen = [v.strip() for _, v in sorted(texts(summary, "skyspot-vm-lifetime").items())]
    assert seen == ["1", "2", "1"]  # same VM after the process loss; a fresh one after the kill


@needs_vm
def test_c10d_rendezvous_on_the_head_forms_one_world_of_two(rehearse, tmp_path):
    code, summary = run(rehearse, "c10d_2node.yaml", tmp_path / "rh")
    assert code == 0, summary
    ranks = [json.loads(v) for v in texts(summary, "skyspot-vm-c10d").values()]
    assert sorted((r["rank"], r["node_rank"]) for r in ranks) == [(0, 0), (1, 1)]
    assert {(r["world_size"], r["sum"]) for r in ranks} == {(2, 3.0)}  # one all_reduce of 1+2
    ips = summary.get("node_ips") or []
    assert not ips or len(set(ips)) == 2


@needs_vm
def test_pkill_f_on_the_recipes_own_helper_leaves_the_shell_alive(rehearse, tmp_path):
    code, summary = run(rehearse, "pkill.yaml", tmp_path / "rh")
    assert code == 0 and summary["status"] == "SUCCEEDED", summary
    assert texts(summary, "skyspot-vm-pkill") == {"done.txt": "survived pkill\n"}
    assert not Path("/results").exists()


def test_without_vms_a_literal_mount_path_is_refused_in_one_line(tmp_path):
    workdir = tmp_path / "rh"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(VM_FIXTURES / "literal_path.yaml"), "--workdir",
         str(workdir), "--isolation", "pid"], capture_output=True, text=True, cwd=REPO,
        timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "/checkpoint" in lines[0] and "literally" in lines[0], lines
    assert "Traceback" not in result.stderr
    assert not workdir.exists() and not Path("/checkpoint").exists()
