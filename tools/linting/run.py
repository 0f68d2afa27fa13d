"""Run: what reaches SkyPilot is run:'s exit status, and SkyPilot appends to run: a wait for
MOUNT_CACHED uploads (sky/backends/task_codegen.py, get_rclone_flush_script) that runs in
the same bash, after run:'s last line.

- run/no-errexit (warning): setup:/run: of several commands without `set -e`: a failed
  step is ignored and only the last command's status reaches SkyPilot.
- run/pkill (warning): `pkill -f` or `killall` in run: kill by name every matching process
  on the node, SkyPilot's own agents and other tasks' processes included.
- run/partial-world (error): `torchrun --nnodes=MIN:MAX` with MIN below num_nodes (or a
  fixed --nnodes below it) lets a world smaller than the cluster start.
- run/skips-upload-wait (error), with a MOUNT_CACHED mount: run: ends with errexit still on
  (a failing last command, 143 after a preemption save included, ends bash before the
  wait), `exec`s at top level (the wait never runs), or ends with `exit`; or ends with
  pipefail on, under which the wait's `tac | grep -m1` pipeline fails once rclone's log
  outgrows a pipe buffer, and the job never finishes. The save just written may never
  reach the bucket.
"""

from __future__ import annotations

import re

from . import shell
from .findings import ERROR, WARNING
from .task import Section, TaskContext

_CLOSING = ("status=0; CMD || status=$?` to run the script, then end run: with "
            "`set +euo pipefail; (exit \"$status\")` (as recipes/train-lm-spot.yaml does)")


def _check_errexit(section: Section, ctx: TaskContext) -> None:
    commands = section.script.commands
    if len(commands) < 2:
        return
    if any(shell.set_options(c).get("errexit") for c in commands):
        return
    what = "whether setup failed" if section.key == "setup" else "SkyPilot"
    ctx.add(section.block.key_line, WARNING, "run/no-errexit",
            f"{section.key}: runs {len(commands)} commands without `set -e`: a failing "
            f"step is ignored and only the last command's status reaches {what}",
            f"start {section.key}: with `set -euo pipefail`")


def _check_pkill(section: Section, ctx: TaskContext) -> None:
    for command in section.script.commands:
        words = [w.text for w in command.words]
        while words and words[0] in ("sudo", "command"):
            words = words[1:]
        if not words:
            continue
        name = words[0].rsplit("/", 1)[-1]
        full = name == "pkill" and any(
            a == "--full" or (re.fullmatch(r"-[a-zA-Z]*f[a-zA-Z]*", a)) for a in words[1:])
        if full or name == "killall":
            shown = "pkill -f" if full else "killall"
            ctx.add(section.line(command.line), WARNING, "run/pkill",
                    f"run: uses `{shown}`, which kills every matching process on the node "
                    "(`pkill -f python` kills SkyPilot's own agent too)",
                    "kill the PID you started (`cmd & pid=$!; ...; kill $pid`) or its "
                    "process group")


def _nnodes(command: shell.Command) -> tuple[str, int] | None:
    words = [w.text for w in command.words]
    names = [w.rsplit("/", 1)[-1] for w in words]
    launches = "torchrun" in names or any(
        m in words for m in ("torch.distributed.run", "torch.distributed.launch"))
    if not launches:
        return None
    for i, word in enumerate(words):
        value = None
        if word.startswith("--nnodes="):
            value = word.split("=", 1)[1]
        elif word == "--nnodes" and i + 1 < len(words):
            value = words[i + 1]
        if value is not None:
            match = re.fullmatch(r"(\d+)(?::(\d+))?", value)
            if match:
                return value, int(match[1])
    return None


def _check_torchrun(section: Section, ctx: TaskContext) -> None:
    nodes = ctx.num_nodes
    for command in section.script.commands:
        found = _nnodes(command)
        if found is None or found[1] >= nodes:
            continue
        value, low = found
        ctx.add(section.line(command.line), ERROR, "run/partial-world",
                f"torchrun --nnodes={value} on a task of num_nodes: {nodes}: a world of "
                f"{low} node(s) may start without the others, with another world size than "
                "the checkpoint's",
                f"--nnodes=$SKYPILOT_NUM_NODES (or {nodes}:{nodes})")


def _check_upload_wait(section: Section, ctx: TaskContext) -> None:
    cached = [t for t, mode in ctx.mounts().items() if mode == "MOUNT_CACHED"]
    if not cached:
        return
    mount = cached[0]
    why = f"SkyPilot's appended wait for MOUNT_CACHED uploads ({mount})"
    state: dict[str, tuple[bool, int]] = {}
    top = [c for c in section.script.commands if c.depth == 0]
    for command in top:
        for option, on in shell.set_options(command).items():
            state[option] = (on, command.line)
        if command.name == "exec" and len(command.words) > 1:
            ctx.add(section.line(command.line), ERROR, "run/skips-upload-wait",
                    f"run: execs `{command.words[1].text}`: bash is replaced, so {why} never "
                    "runs and the last save may never reach the bucket",
                    "run it without exec: `" + _CLOSING)
    if top and top[-1].name == "exit":
        ctx.add(section.line(top[-1].line), ERROR, "run/skips-upload-wait",
                f"run: ends with `exit`, which leaves bash before {why}",
                "end with `(exit \"$status\")` (a subshell) instead")
    errexit, line = state.get("errexit", (False, 0))
    if errexit:
        ctx.add(section.line(line), ERROR, "run/skips-upload-wait",
                f"errexit (set -e) is still on when run: ends: a failing last command (exit "
                f"143 after a preemption save included) ends bash before {why}, so the "
                "save may never reach the bucket", "use `" + _CLOSING)
    pipefail, line = state.get("pipefail", (False, 0))
    if pipefail:
        ctx.add(section.line(line), ERROR, "run/skips-upload-wait",
                f"pipefail is still on when run: ends: {why} pipes `tac` into `grep -m1`, "
                "which fails under pipefail once rclone's log outgrows a pipe buffer, and "
                "the job never finishes", "use `" + _CLOSING)


def check(ctx: TaskContext) -> None:
    for section in ctx.sections.values():
        _check_errexit(section, ctx)
    run = ctx.sections.get("run")
    if run is None:
        return
    _check_pkill(run, ctx)
    _check_torchrun(run, ctx)
    _check_upload_wait(run, ctx)
