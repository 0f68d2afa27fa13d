"""The recipe, as SkyPilot reads it: ``load_recipe`` parses the task YAML with SkyPilot's own
parser (with --env/--secret overrides applied as ``sky jobs launch`` does) into a ``Recipe``.
Every user error is a ``BadInput``, printed as one line with exit code 2.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class BadInput(Exception):
    """A user error: printed as one line, exit code 2."""


def parse_key_values(items: list[str], flag: str) -> list[tuple[str, str]]:
    """KEY=VALUE, or KEY alone to take the caller's value (like sky's --env/--secret)."""
    pairs = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            if key not in os.environ:
                raise BadInput(f"{flag} {key}: not set in the local environment")
            value = os.environ[key]
        if not ENV_KEY.match(key):
            raise BadInput(f"{flag} {item!r}: invalid variable name {key!r}")
        pairs.append((key, value))
    return pairs


@dataclass(frozen=True)
class StorageSpec:
    """One bucket entry of file_mounts (SkyPilot's Storage)."""

    store: str  # s3, gcs, azure, ...
    bucket: str
    sub: str  # key prefix inside the bucket that is mounted ("" for the whole bucket)
    sources: tuple[str, ...]  # local paths uploaded into the bucket before launch
    mode: str  # MOUNT, MOUNT_CACHED or COPY
    mount_type: str | None  # the MOUNT_CACHED `type:` preset

    @property
    def url(self) -> str:
        return f"{self.store}://{self.bucket}/{self.sub}".rstrip("/")


@dataclass
class Recipe:
    path: Path
    name: str
    num_nodes: int
    envs: dict[str, str]
    secrets: dict[str, str]
    setup: str | None
    run: str
    workdir: Path | None
    gpus_per_node: int
    strategy: str
    max_restarts_on_errors: int
    recover_on_exit_codes: list[int]
    storage_mounts: dict[str, StorageSpec]  # recipe path -> bucket
    copy_mounts: dict[str, str]  # path -> bucket URL or local path


def load_recipe(
    path: Path, env: list[tuple[str, str]], secrets: list[tuple[str, str]]
) -> Recipe:
    if not path.is_file():
        raise BadInput(f"recipe not found: {path}")
    try:
        from sky.utils import dag_utils  # slow import: only once the arguments are fine

        dag = dag_utils.load_chain_dag_from_yaml(str(path), env or None, secrets or None)
    except Exception as e:  # SkyPilot reports bad YAML with many exception types
        raise BadInput(f"SkyPilot rejects {path}: {one_line(e)}") from None
    if len(dag.tasks) != 1:
        raise BadInput(f"{path}: {len(dag.tasks)} tasks; rehearse runs single-task recipes")
    task = dag.tasks[0]
    if not task.run or not isinstance(task.run, str):
        raise BadInput(f"{path}: no run: command to rehearse")

    resources = list(task.resources)
    recovery = resources[0].job_recovery
    if any(r.job_recovery != recovery for r in resources):
        raise BadInput(f"{path}: job_recovery differs between resources (SkyPilot rejects it)")
    # Same defaults as StrategyExecutor.make(): a bare strategy name means no restarts.
    max_restarts, recover_codes, strategy = 0, [], None
    if isinstance(recovery, dict):
        max_restarts = int(recovery.get("max_restarts_on_errors", 0) or 0)
        codes = recovery.get("recover_on_exit_codes")
        recover_codes = [codes] if isinstance(codes, int) else [int(c) for c in codes or []]
        strategy = recovery.get("strategy")
    elif isinstance(recovery, str):
        strategy = recovery
    accelerators = resources[0].accelerators or {}
    gpus = int(math.ceil(sum(accelerators.values()))) if accelerators else 0

    # Secrets without a value are references SkyPilot resolves at launch; ours is the caller.
    secret_values = {k: v.get_secret_value() for k, v in task.secrets.items()}
    for ref in task.managed_secret_refs:
        if ref.name not in secret_values:
            if ref.name not in os.environ:
                raise BadInput(
                    f"secret {ref.name} has no value: pass --secret {ref.name}=VALUE "
                    f"or export {ref.name}"
                )
            secret_values[ref.name] = os.environ[ref.name]

    if isinstance(task.workdir, dict):
        raise BadInput(f"{path}: a git workdir cannot be rehearsed; use a local path")
    workdir = Path(task.workdir).expanduser().resolve() if task.workdir else None
    if workdir is not None and not workdir.is_dir():
        raise BadInput(f"{path}: workdir {task.workdir!r} is not a directory here ({workdir})")

    storage = {}
    for mount_path, obj in (task.storage_mounts or {}).items():
        store = next(iter(obj.stores), None)
        store_name = store.value.lower() if store is not None else "s3"
        sources = obj.source if isinstance(obj.source, list) else [obj.source or ""]
        bucket, sub = obj.name, getattr(obj, "_bucket_sub_path", None) or ""
        if "://" in sources[0]:
            rest = sources[0].split("://", 1)[1]
            bucket = bucket or rest.split("/", 1)[0]
            sub = rest.partition("/")[2] or sub
        mode = getattr(obj.mode, "value", None) or "MOUNT"
        mount_type = getattr(getattr(obj, "file_mount_type", None), "value", None)
        storage[mount_path] = StorageSpec(
            store_name, bucket or "bucket", sub.strip("/"),
            tuple(s for s in sources if s and "://" not in s), mode,
            mount_type if mode == "MOUNT_CACHED" else None)
    return Recipe(
        path=path,
        name=task.name or path.stem,
        num_nodes=task.num_nodes,
        envs=dict(task.envs),
        secrets=secret_values,
        setup=task.setup if isinstance(task.setup, str) else None,
        run=task.run,
        workdir=workdir,
        gpus_per_node=gpus,
        strategy=str(strategy or "EAGER_NEXT_REGION").upper(),  # SkyPilot's default strategy
        max_restarts_on_errors=max_restarts,
        recover_on_exit_codes=recover_codes,
        storage_mounts=storage,
        copy_mounts=dict(task.file_mounts or {}),
    )


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 400 else text[:400] + "..."


def check_sources(recipe: Recipe) -> None:
    """Every local source in file_mounts exists (checked before anything is created)."""
    for spec in recipe.storage_mounts.values():
        for source in spec.sources:
            if not Path(source).expanduser().exists():
                raise BadInput(f"file_mounts source {source!r} for bucket {spec.bucket} does "
                               "not exist")
    for path, source in recipe.copy_mounts.items():
        if "://" not in source and not Path(source).expanduser().exists():
            raise BadInput(f"file_mounts source {source!r} for {path} does not exist")
