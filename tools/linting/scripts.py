"""Project scripts a `run:` starts, and the options their own argparse parsers accept.

A project script is a `.py` file (or `python -m` module) that exists in the task's workdir,
started by a python/accelerate/torchrun/deepspeed launcher or as a command of its own:
`python -m skyspot.launch -- accelerate launch ... train/lm.py "${TRAIN_ARGS[@]}"` starts
two, skyspot.launch (its options end at `--`) and train/lm.py (the rest).

Its options come from its real parser: the script runs in a subprocess, from the workdir,
as `python SCRIPT --help` would, with `argparse.ArgumentParser.parse_args` replaced by a
function that writes the parser's option strings to a file and exits before anything
is parsed. So a parser built from a dataclass, or in a function, is read as it is, and
nothing of the script's work runs: what runs is what `--help` runs. A script that does not
mention argparse is not run at all. The subprocesses start as soon as the recipes are read
and run while SkyPilot parses them (train/lm.py imports torch: seconds).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .shell import Command, Script

_LAUNCHER = re.compile(r"^(python[0-9.]*|torchrun|accelerate|deepspeed|composer)$")
_TIMEOUT_S = 180

_CAPTURE = r"""
import argparse, json, os, runpy, sys
target, out, is_module = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
def capture(self, *args, **kwargs):
    options = sorted({s for a in self._actions for s in a.option_strings})
    with open(out, "w") as f:
        json.dump({"prog": self.prog, "options": options, "allow_abbrev": self.allow_abbrev}, f)
    os._exit(0)
for name in ("parse_args", "parse_known_args", "parse_intermixed_args",
             "parse_known_intermixed_args"):
    setattr(argparse.ArgumentParser, name, capture)
sys.argv = [target, "--help"]
if is_module:
    sys.path[0] = os.getcwd()
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.path[0] = os.path.dirname(os.path.abspath(target))
    runpy.run_path(target, run_name="__main__")
"""


@dataclass
class Invocation:
    """One project script started by a command of run:."""

    shown: str  # as written: "train/lm.py" or "-m skyspot.launch"
    path: Path  # the file
    module: str | None  # "skyspot.launch" for python -m
    command: Command
    start: int  # index of the script's word in command.words
    args: list  # the words after it that are its arguments (shell.Token)

    @property
    def launchers(self) -> list[str]:
        return [w.text.rsplit("/", 1)[-1] for w in self.command.words[:self.start]]

    def source(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def uses_skyspot(self) -> bool:
        """The script runs on skyspot's runtime (and so exits 143 after a preemption save)."""
        if self.module and self.module.split(".")[0] == "skyspot":
            return True
        return bool(re.search(r"^\s*(from|import)\s+skyspot\b", self.source(), re.M))


def _module_file(workdir: Path, module: str) -> Path | None:
    if not re.fullmatch(r"[A-Za-z_][\w.]*", module):
        return None
    base = workdir.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def _script_file(workdir: Path, word: str) -> Path | None:
    if "$" in word or "`" in word or word.startswith(("-", "/", "~")):
        return None
    path = workdir / word
    return path if word.endswith(".py") and path.is_file() else None


def invocations(script: Script, workdir: Path | None) -> list[Invocation]:
    if workdir is None:
        return []
    found = []
    for command in script.commands:
        words = command.words
        starts: list[tuple[int, int, str, Path, str | None]] = []  # (index, first arg, ...)
        for i, word in enumerate(words):
            launched = i == 0 or any(_LAUNCHER.match(w.text.rsplit("/", 1)[-1])
                                     for w in words[:i])
            if word.text == "-m" and i + 1 < len(words) and any(
                    w.text.rsplit("/", 1)[-1].startswith("python") for w in words[:i]):
                path = _module_file(workdir, words[i + 1].text)
                if path is not None:
                    starts.append((i, i + 2, f"-m {words[i + 1].text}", path, words[i + 1].text))
            elif launched:
                path = _script_file(workdir, word.text)
                if path is not None and not (i > 0 and words[i - 1].text == "-m"):
                    starts.append((i, i + 1, word.text, path, None))
        for n, (index, first, shown, path, module) in enumerate(starts):
            end = starts[n + 1][0] if n + 1 < len(starts) else len(words)
            args = []
            for word in words[first:end]:
                if word.text == "--":
                    break
                args.append(word)
            found.append(Invocation(shown, path, module, command, index, args))
    return found


@dataclass(frozen=True)
class ParserOptions:
    options: frozenset[str] | None  # None: could not be read (see why)
    allow_abbrev: bool = True
    why: str = ""


class Parsers:
    """The option strings of each script's parser, read once per script, in the background."""

    def __init__(self):
        self._results: dict[tuple, ParserOptions] = {}
        self._threads: dict[tuple, threading.Thread] = {}
        self._lock = threading.Lock()

    def start(self, inv: Invocation, workdir: Path) -> None:
        key = self._key(inv)
        with self._lock:
            if key in self._threads:
                return
            thread = threading.Thread(target=self._read, args=(key, inv, workdir), daemon=True)
            self._threads[key] = thread
        thread.start()

    def options(self, inv: Invocation, workdir: Path) -> ParserOptions:
        self.start(inv, workdir)
        key = self._key(inv)
        self._threads[key].join()
        return self._results[key]

    @staticmethod
    def _key(inv: Invocation) -> tuple:
        path = inv.path.resolve()
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            stamp = 0
        return path, inv.module, stamp

    def _read(self, key, inv: Invocation, workdir: Path) -> None:
        self._results[key] = _read_options(inv, workdir)


def _read_options(inv: Invocation, workdir: Path) -> ParserOptions:
    if "argparse" not in inv.source():
        return ParserOptions(None, why="it does not use argparse")
    with tempfile.TemporaryDirectory(prefix="skyspot-lint-") as tmp:
        out = Path(tmp) / "options.json"
        target = inv.module or str(inv.path.relative_to(workdir))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(workdir), *filter(None, [os.environ.get("PYTHONPATH")])])}
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _CAPTURE, target, str(out), "1" if inv.module else "0"],
                cwd=workdir, env=env, capture_output=True, text=True, timeout=_TIMEOUT_S,
                stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return ParserOptions(None, why=f"it did not reach its parser in {_TIMEOUT_S} s")
        if not out.exists():
            tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            return ParserOptions(None, why=f"it stopped before its parser: {tail[:200]}")
        data = json.loads(out.read_text())
    return ParserOptions(frozenset(data["options"]), bool(data.get("allow_abbrev", True)))


PARSERS = Parsers()  # one per process: a script's parser is read once (train/lm.py: seconds)
