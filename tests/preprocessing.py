"""Helpers shared by the tests of preprocess/tokenize.py (test_preprocess*.py); the ``corpus``
fixture that builds the input and the reference output is in conftest.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "preprocess" / "tokenize.py"
sys.path.insert(0, str(REPO / "tools"))
import localstore  # noqa: E402, F401

PART = re.compile(r"^part-\d{5}\.parquet$")
SEQ_LEN, UNIT_ROWS = 64, 200
FUSE_OK, FUSE_WHY = localstore.fuse_available()


def run_tokenize(corpus: dict, out: Path, *extra: str, check: bool = False,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv(corpus, out, *extra), capture_output=True, text=True,
                          env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def argv(corpus: dict, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--dataset", str(corpus["dataset"]),
            "--tokenizer", str(corpus["tokenizer"]), "--seq-len", str(SEQ_LEN),
            "--unit-rows", str(UNIT_ROWS), "--output-dir", str(out),
            "--notice-poll-seconds", "0", *extra]


def outputs(root: Path) -> dict[str, bytes]:
    """The parts and the manifest, by name: what must equal the reference byte for byte."""
    files = {f"data/{p.name}": p.read_bytes() for p in (root / "data").glob("*.parquet")}
    files["manifest.json"] = (root / "manifest.json").read_bytes()
    return files


def assert_same_as_reference(corpus: dict, root: Path) -> None:
    got, want = outputs(root), corpus["files"]
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    different = [name for name in want if got[name] != want[name]]
    assert not different, f"{len(different)} file(s) differ from the reference: {different[:5]}"
    assert not list((root / "_tmp").glob("*")) if (root / "_tmp").exists() else True


class Sampler(threading.Thread):
    """Lists data/ every ~0.25 s with ``lister`` (name -> size) and records every violation of
    "each unit at most once, nothing partial": a name that is not a unit's, a size other
    than the reference's, bytes other than the reference's (read once per object with
    ``reader``), a part that disappears."""

    def __init__(self, corpus: dict, lister, reader):
        super().__init__(daemon=True)
        self.want = {name[5:]: data for name, data in corpus["files"].items()
                     if name.startswith("data/")}
        self.lister, self.reader = lister, reader
        self.samples, self.most, self.problems = 0, 0, []
        self.checked: set[str] = set()
        self.seen: set[str] = set()
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                listed = self.lister()
            except (OSError, RuntimeError, subprocess.SubprocessError):
                listed = None  # the mount or store is being replaced: no sample
            if listed is not None:
                self.check(listed)
            self.halt.wait(0.25)  # each S3 listing is an rclone process: 2 cores are shared

    def check(self, listed: dict[str, int]) -> None:
        self.samples += 1
        names = [name for name in listed if name.endswith(".parquet")]
        self.most = max(self.most, len(names))
        for name in names:
            if not PART.match(name) or name not in self.want:
                self.problems.append(f"sample {self.samples}: {name} is not a unit's part")
            elif listed[name] != len(self.want[name]):
                self.problems.append(f"sample {self.samples}: {name} is {listed[name]} bytes, "
                                     f"not {len(self.want[name])}: partial")
            elif name not in self.checked:
                self.checked.add(name)
                if self.reader(name) != self.want[name]:
                    self.problems.append(f"{name}: other bytes than the reference")
        for name in self.seen - set(names):
            self.problems.append(f"sample {self.samples}: committed {name} disappeared")
        self.seen |= set(names)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)


def dir_lister(data: Path):
    def listed() -> dict[str, int]:
        out = {}
        for entry in os.scandir(data) if data.is_dir() else []:
            try:
                out[entry.name] = entry.stat().st_size
            except FileNotFoundError:
                pass
        return out
    return listed


def wait_for_parts(out: Path, count: int, proc: subprocess.Popen, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        parts = list((out / "data").glob("part-*.parquet")) if (out / "data").is_dir() else []
        if len(parts) >= count:
            return len(parts)
        assert proc.poll() is None, "the worker ended before it committed enough units"
        time.sleep(0.02)
    raise AssertionError(f"{count} parts not committed within {timeout_s} s")
