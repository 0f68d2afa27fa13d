"""Helpers shared by the tests that run tools/rehearse.py in-process (tests/test_rehearse*.py);
the ``rehearse`` fixture that loads it is in conftest.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "rehearse.py"
sys.path.insert(0, str(REPO / "tools"))
from rehearsal import vm  # noqa: E402

# Nodes as VMs of their own need root and namespaces; without them the tests that need a
# literal mount path, or a network per node, are skipped saying why.
VM_OK, VM_WHY = vm.probe()
needs_vm = pytest.mark.skipif(not VM_OK, reason=f"nodes cannot be VMs here: {VM_WHY}")


def leftovers(path: Path) -> list[str]:
    """FUSE mounts under path still in /proc/mounts, and live rclone processes naming path."""
    found = [line for line in Path("/proc/mounts").read_text().splitlines()
             if str(path) in line and "fuse" in line]
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if cmd and cmd[0].endswith("rclone") and any(str(path) in arg for arg in cmd) and \
                proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(f"pid {proc.pid}: {' '.join(cmd)}")
    return found


def rehearsal(rehearse, workdir: Path, *args: str) -> tuple[int, dict]:
    """Run one rehearsal from the repo root (recipes say `workdir: .`); code and summary."""
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        code = rehearse.main([*args, "--workdir", str(workdir), "--quiet"])
    finally:
        os.chdir(cwd)
    return code, json.loads((workdir / "rehearsal.json").read_text())


def bucket_files(summary: dict, bucket: str) -> dict[str, bytes]:
    """What the bucket holds once the rehearsal is over (the store's backing directory)."""
    root = Path(summary["storage"]["data_dir"]) / bucket
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".")}
