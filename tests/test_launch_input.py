"""skyspot.launch given a launcher it cannot start: one error line and the shell's exit code
(127 not found, 126 found but not runnable), never a traceback. SkyPilot shows a job's last
lines and its exit code; a traceback from the wrapper hides which command was wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def launch(*command: str, cwd: Path, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, "-m", "skyspot.launch", "--", *command], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("kind", ["file without x bit", "directory", "not a program",
                                  "on PATH without x bit"])
def test_a_launcher_that_cannot_run_exits_126_with_one_line(tmp_path, kind):
    path = None
    if kind == "file without x bit":
        target = tmp_path / "train.sh"
        target.write_text("#!/bin/sh\necho never\n")
        shown, reason = str(target), "not executable (chmod +x?)"
    elif kind == "directory":
        target = tmp_path / "train"
        target.mkdir()
        shown, reason = str(target), "is a directory"
    elif kind == "not a program":  # x bit set, but neither an ELF binary nor a #! script
        target = tmp_path / "weights.bin"
        target.write_bytes(b"\x00\x01binary junk")
        target.chmod(0o755)
        shown, reason = str(target), "Exec format error"
    else:  # a bare name, found in a PATH directory, not executable
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "mylauncher").write_text("#!/bin/sh\necho never\n")
        path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
        shown, reason = "mylauncher", "Permission denied"
    result = launch(shown, cwd=tmp_path, path=path)
    assert (result.returncode, result.stdout) == (126, "")
    assert result.stderr == f"skyspot.launch: error: cannot run {shown}: {reason}\n"


def test_a_launcher_not_found_still_exits_127(tmp_path):
    result = launch(str(tmp_path / "no-such-launcher"), cwd=tmp_path)
    assert (result.returncode, result.stdout) == (127, "")
    assert result.stderr == (f"skyspot.launch: error: command not found: "
                             f"{tmp_path / 'no-such-launcher'}\n")
