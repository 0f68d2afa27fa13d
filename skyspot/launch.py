"""Run a launcher (``accelerate launch``, ``torchrun``) and hand SkyPilot the right exit code.

Guarantee: this process exits 143 when the trainer committed a preemption save (it writes
the file named by ``SKYSPOT_EXIT_MARKER`` after the commit); otherwise it exits with the
launcher's own code, 128+N if signal N killed it. (So a launcher killed by SIGTERM before
any save also reads 143: the job was terminated, not broken, and recovery is right.) A
launcher that cannot be started exits as a shell would, after one error line: 127 if it is
not found, 126 if it is found but cannot be run (a directory, a file without the x bit).

Why it exists: ``accelerate launch`` and ``torchrun`` turn a child's exit 143 into 1, and
SkyPilot sees only the exit code of ``run:``. A recipe lists 143 in
``job_recovery.recover_on_exit_codes``; without this wrapper a preemption save would
look like a user error.

Usage (in a recipe's ``run:``)::

    python -m skyspot.launch -- accelerate launch --multi_gpu --num_processes 8 train/lm.py ...

Signals: SIGTERM/SIGINT are NOT forwarded. In every case that matters (a VM shutting
down, ``sky jobs cancel``, Ctrl-C in a terminal) the launcher gets the signal itself, and
a second SIGTERM cuts torch elastic's graceful worker shutdown short. The wrapper only
outlives the signal so that it can report the exit code. It is also a child subreaper:
ranks that torch elastic started in sessions of their own, orphaned when the launcher
exits first, are waited for (up to ``--orphan-wait`` seconds) before the marker is read.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from skyspot import PREEMPTED_EXIT_CODE

MARKER_ENV = "SKYSPOT_EXIT_MARKER"
_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def mark_preempted() -> None:
    """Called by a trainer after its preemption save committed, just before exiting 143."""
    marker = os.environ.get(MARKER_ENV)
    if marker:
        Path(marker).write_text("preemption save committed\n")


def _become_subreaper() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: orphans are not waited for; the marker is still read


def _reap_orphans(deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no children left
        if pid == 0:
            time.sleep(0.2)


def _why_not_runnable(program: str, error: OSError) -> str:
    path = Path(program) if os.sep in program else None
    if path is not None and path.is_dir():
        return "is a directory"
    if path is not None and path.is_file() and not os.access(path, os.X_OK):
        return "not executable (chmod +x?)"
    return error.strerror or str(error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m skyspot.launch",
        description="Run a launcher; exit 143 if the trainer committed a preemption save.",
        epilog="example: python -m skyspot.launch -- accelerate launch train/lm.py --model ...",
    )
    parser.add_argument("--orphan-wait", type=float, default=60.0,
                        help="seconds to wait for ranks that outlive the launcher (default 60)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the launcher command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given; usage: python -m skyspot.launch -- accelerate launch ...")

    _become_subreaper()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)  # survive to report the exit code; see docstring

    marker_dir = Path(tempfile.mkdtemp(prefix="skyspot-launch-"))
    marker = marker_dir / "preempted"
    env = {**os.environ, MARKER_ENV: str(marker)}
    try:
        try:
            child = subprocess.Popen(command, env=env)
        except FileNotFoundError:
            print(f"skyspot.launch: error: command not found: {command[0]}", file=sys.stderr)
            return 127
        except OSError as e:  # found but not runnable: a directory, no x bit, not a program
            why = _why_not_runnable(command[0], e)
            print(f"skyspot.launch: error: cannot run {command[0]}: {why}", file=sys.stderr)
            return 126  # the shell's code for a command found but not executable
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:
                continue
        _reap_orphans(args.orphan_wait)
        if marker.exists():
            return PREEMPTED_EXIT_CODE
        return 128 - code if code < 0 else code
    finally:
        shutil.rmtree(marker_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
