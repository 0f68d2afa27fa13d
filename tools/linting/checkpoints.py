"""Checkpoint hazards: a preemption can land in the middle of any save.

- checkpoints/retention-on-mount (error on MOUNT_CACHED, warning on MOUNT): HF
  `--save_total_limit` with `--output_dir` on a bucket mount. The Trainer deletes the oldest
  checkpoint as soon as the new one is closed; on MOUNT_CACHED that is before the new one
  is uploaded, so a lost VM can leave the bucket with neither (skyspot's --keep-last deletes
  only what a newer checkpoint complete in the bucket itself replaces).
- checkpoints/overwritten-in-place (warning): a project script in the workdir saves a
  checkpoint to a fixed file name (torch.save, safetensors save_file, save_pretrained,
  save_state, np.save), in a loop or under a checkpoint-like name (ckpt, checkpoint,
  latest, last, state), in a function that never renames a file into place
  (os.replace/os.rename/shutil.move/Path.replace): a preemption mid-write leaves a torn
  file and no older one. Heuristic, on the script's AST: the path is a string constant, a
  join or `/` ending in one, an f-string whose last component has no `{}`, or a local
  variable assigned one of those in the same function. Scripts that use skyspot's
  checkpointer (they import skyspot.checkpoint or skyspot.sharded) are skipped.
"""

from __future__ import annotations

import ast
import re

from .findings import ERROR, WARNING
from .shell import Command
from .task import TaskContext

_SAVERS = {"save", "save_file", "save_pretrained", "save_state"}
_CHECKPOINT_NAME = re.compile(r"ckpt|checkpoint|latest|last|state", re.I)
_RENAMES = {"replace", "rename", "move", "renames"}


def _expand(value: str, envs: dict[str, str]) -> str | None:
    """`$VAR`/`${VAR}` replaced by the task's envs; None when one is unknown."""
    unknown = False

    def sub(match: re.Match) -> str:
        nonlocal unknown
        name = match[1] or match[2]
        if name not in envs:
            unknown = True
            return ""
        return envs[name]

    out = re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, value)
    return None if unknown else out


def _flag_value(words: list[str], names: tuple[str, ...]) -> tuple[int, str] | None:
    for i, word in enumerate(words):
        for name in names:
            if word == name and i + 1 < len(words):
                return i, words[i + 1]
            if word.startswith(name + "="):
                return i, word.split("=", 1)[1]
    return None


def _check_retention(ctx: TaskContext, command: Command) -> None:
    words = [w.text for w in command.words]
    limit = _flag_value(words, ("--save_total_limit", "--save-total-limit"))
    out = _flag_value(words, ("--output_dir", "--output-dir"))
    if limit is None or out is None or limit[1] in ("0", "None", "none"):
        return
    path = _expand(out[1], ctx.envs)
    mount = ctx.mount_of(path) if path else None
    if mount is None or mount[1] not in ("MOUNT", "MOUNT_CACHED"):
        return
    target, mode = mount
    severity = ERROR if mode == "MOUNT_CACHED" else WARNING
    ctx.add(ctx.sections["run"].line(command.words[limit[0]].line), severity,
            "checkpoints/retention-on-mount",
            f"--save_total_limit {limit[1]} with --output_dir {out[1]} on the {mode} bucket "
            f"mount {target}: the Trainer deletes the oldest checkpoint once the new one is "
            "written locally, before it is durable in the bucket, so a lost VM can leave "
            "neither",
            "drop --save_total_limit (prune later, once newer checkpoints are in the bucket), "
            "or save to a local disk and copy complete checkpoints to the bucket")


def _fixed_path(node: ast.AST, assigned: dict[str, ast.AST], depth: int = 0) -> str | None:
    """The fixed file name a path expression ends in, or None if it varies or is unknown."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.rsplit("/", 1)[-1] or None
    if isinstance(node, ast.JoinedStr) and node.values:
        last = node.values[-1]
        if isinstance(last, ast.Constant) and isinstance(last.value, str) and "/" in last.value:
            return last.value.rsplit("/", 1)[-1] or None
        return None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        return _fixed_path(node.right, assigned, depth)
    if isinstance(node, ast.Call) and node.args:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("join", "joinpath", "Path", "str", "fspath"):
            return _fixed_path(node.args[-1], assigned, depth)
    if isinstance(node, ast.Name) and node.id in assigned and depth < 3:
        return _fixed_path(assigned[node.id], assigned, depth + 1)
    return None


def _walk_scope(scope: ast.AST):
    """The nodes of a module or function, not descending into the functions it defines."""
    stack = list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def _saves_in_place(source: str) -> list[tuple[int, str, str]]:
    """(line, call, file name) of saves to a fixed name in functions that never rename."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    found = []
    for scope in [tree, *scopes]:
        body = list(_walk_scope(scope))
        calls = [n for n in body if isinstance(n, ast.Call)]
        names = {c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", "")
                 for c in calls}
        if names & _RENAMES:
            continue
        assigned = {t.id: n.value for n in body if isinstance(n, ast.Assign)
                    for t in n.targets if isinstance(t, ast.Name)}
        in_loop = {id(c) for loop in body if isinstance(loop, (ast.For, ast.While))
                   for c in ast.walk(loop) if isinstance(c, ast.Call)}
        for call in calls:
            func = call.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name not in _SAVERS:
                continue
            if name in ("save", "save_file") and len(call.args) >= 2:
                path = call.args[1]
                if name == "save" and isinstance(func, ast.Attribute) and \
                        getattr(func.value, "id", "") in ("np", "numpy"):
                    path = call.args[0]
            elif name in ("save_pretrained", "save_state") and call.args:
                path = call.args[0]
            else:
                continue
            fixed = _fixed_path(path, assigned)
            if fixed and (id(call) in in_loop or _CHECKPOINT_NAME.search(fixed)):
                found.append((call.lineno, ast.unparse(func), fixed))
    return sorted(set(found))


def _check_in_place(ctx: TaskContext) -> None:
    run = ctx.sections["run"]
    seen = set()
    for inv in ctx.run_invocations:
        if inv.path in seen:
            continue
        seen.add(inv.path)
        source = inv.source()
        if re.search(r"\bskyspot\.(checkpoint|sharded)\b|from skyspot import .*\b"
                     r"(checkpoint|sharded)\b", source):
            continue
        for line, call, name in _saves_in_place(source)[:1]:
            ctx.add(run.line(inv.command.line), WARNING, "checkpoints/overwritten-in-place",
                    f"{inv.shown}:{line}: {call}(...) writes the checkpoint '{name}' in place: "
                    "a preemption mid-write leaves a torn file and no older one to resume from",
                    "write to a temporary name and os.replace() it into place, or save "
                    "step-numbered checkpoints and delete old ones only once a newer one is "
                    "complete (skyspot.checkpoint does both)")


def check(ctx: TaskContext) -> None:
    run = ctx.sections.get("run")
    if run is None:
        return
    for command in run.script.commands:
        _check_retention(ctx, command)
    _check_in_place(ctx)
