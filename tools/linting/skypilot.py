"""What SkyPilot itself says: its parser's verdict on a recipe, and the variables it sets.

`load_tasks` loads a recipe as `sky jobs launch recipe.yaml` does (a job group through
`load_job_group_from_yaml`, anything else through `load_chain_dag_from_yaml`), with a dummy
`--env` for every env whose value is null (SkyPilot refuses to parse without one). Offline:
a connect attempt during the parse fails at once instead of hanging on a cloud.

`variables_skypilot_sets` reads the installed SkyPilot's source for the `SKYPILOT_*` names it
writes into a task's environment (`...env...[NAME] = `, `update_envs({NAME: ...})`,
`export NAME=`, the keys of its `*env*` functions' dicts), so the list follows the installed
version instead of being typed here.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import re
import socket
import sys
from pathlib import Path
from typing import Any

from .recipe import Document, Recipe


class _Offline(OSError):
    pass


@contextlib.contextmanager
def _offline():
    real = socket.socket.connect, socket.socket.connect_ex

    def refuse(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise _Offline(f"tools/lint.py is offline (connect to {address!r})")
        return real[0](self, address)

    socket.socket.connect, socket.socket.connect_ex = refuse, refuse
    limit = getattr(sys, "tracebacklimit", None)
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex = real
        # SkyPilot's print_exception_no_traceback sets tracebacklimit = 0 and leaves it
        # there when the exception escapes.
        if limit is None:
            with contextlib.suppress(AttributeError):
                del sys.tracebacklimit
        else:
            sys.tracebacklimit = limit


def _mount_keys(docs: list[Document]) -> str:
    keys = []
    for doc in docs:
        mounts = doc.get("file_mounts")
        if isinstance(mounts, dict):
            keys.extend(str(k) for k in mounts)
    return "\n".join(keys)


def dummy_envs(recipe: Recipe) -> list[tuple[str, str]]:
    """A value for every env declared null: an absolute path where a mount path starts with
    it, else a name that is also a valid bucket name."""
    docs = recipe.task_documents()
    mount_keys = _mount_keys(docs)
    names = []
    for doc in docs:
        envs = doc.get("envs")
        if isinstance(envs, dict):
            names.extend(str(k) for k, v in envs.items() if v is None)
    out = []
    for name in dict.fromkeys(names):
        slug = "skyspot-lint-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        starts_mount = re.search(r"(?m)^\$\{?" + re.escape(name) + r"\b", mount_keys)
        out.append((name, f"/{slug}" if starts_mount else slug))
    return out


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 500 else text[:497] + "..."


def load_tasks(recipe: Recipe) -> tuple[list[Any] | None, str | None]:
    """(SkyPilot's tasks, None), or (None, SkyPilot's own message when it refuses)."""
    from sky.utils import dag_utils  # slow (seconds): only once there is a recipe

    envs = dummy_envs(recipe)
    quiet = logging.getLogger("sky")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with _offline():
            if dag_utils.is_job_group_yaml(str(recipe.path)):
                dag = dag_utils.load_job_group_from_yaml(str(recipe.path), env_overrides=envs)
            else:
                dag = dag_utils.load_chain_dag_from_yaml(str(recipe.path), env_overrides=envs)
    except _Offline as e:
        return None, f"its parser needed the network, which lint does not use ({e})"
    except Exception as e:  # any refusal is a finding, never a traceback
        return None, one_line(e)
    finally:
        quiet.setLevel(level)
    return list(dag.tasks), None


def error_line(recipe: Recipe, message: str) -> int:
    """The line SkyPilot's message is about: a `$.a.b[0]` path, or a quoted field name."""
    docs = recipe.task_documents() or recipe.documents
    if not docs:
        return 1
    path = re.search(r"problematic field\(s\): \$((?:\.[\w-]+|\[\d+\])+)", message)
    if path:
        keys = [int(k[1:-1]) if k.startswith("[") else k[1:]
                for k in re.findall(r"\.[\w-]+|\[\d+\]", path[1])]
        for doc in docs:
            if doc.entry(*keys[:1]) is not None:
                return doc.line(*keys)
    under = ("resources",) if "resources" in message.lower() else ()
    for name in re.findall(r"'([^'\s]+)'", message):
        for doc in docs:
            line = doc.find_key(name, under) or doc.find_key(name)
            if line:
                return line
    return docs[0].start_line


@functools.cache
def variables_skypilot_sets() -> frozenset[str]:
    import sky

    root = Path(sky.__file__).parent
    modules = {}
    for name in ("sky.skylet.constants", "sky.jobs.constants", "sky.serve.constants"):
        with contextlib.suppress(ImportError):
            modules[name.split(".")[1]] = importlib.import_module(name)

    def resolve(key: str) -> str | None:
        if key.startswith("SKYPILOT_"):
            return key
        attr = key.rpartition(".")[2]
        for module in modules.values():
            value = getattr(module, attr, None)
            if isinstance(value, str) and value.startswith("SKYPILOT_"):
                return value
        return None

    key = r"""(?:['"]\{?(?P<lit>[\w.]+)\}?['"]|(?P<ref>[A-Za-z_][\w.]*))"""
    writes = [
        re.compile(r"env\w*\[\s*" + key + r"\s*\]\s*="),
        re.compile(r"update_envs\(\s*\{\s*" + key + r"\s*:"),
        re.compile(r"\bexport\s+\{?(?P<ref>[\w.]+)\}?="),
    ]
    env_function = re.compile(r"^(\s*)def \w*env\w*\(.*?(?=^\1(?:def|class) |\Z)", re.M | re.S)
    dict_key = re.compile(r"^\s*" + key + r"\s*:", re.M)
    names: set[str] = set()
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8", errors="replace")
        if "SKYPILOT" not in text and "ENV_VAR" not in text:
            continue
        found = [m for pattern in writes for m in pattern.finditer(text)]
        for function in env_function.finditer(text):
            found.extend(dict_key.finditer(function[0]))
        for m in found:
            name = resolve(m["lit"] or m["ref"] if "lit" in m.re.groupindex else m["ref"])
            if name:
                names.add(name)
    return frozenset(names)
