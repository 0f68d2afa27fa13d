"""The recipe, as SkyPilot reads it: ``load_recipe`` parses the task YAML with SkyPilot's own
parser (with --env/--secret overrides applied as ``sky jobs launch`` does) into a ``Recipe``.
Every user error is a ``BadInput``, printed as one line with exit code 2.

The resources' candidates (``any_of`` / ``ordered``) are numbered in the recipe's order and
``--candidate`` picks the one whose GPUs per node and job_recovery the rehearsal uses.
``apply_bucket_sources`` (``--bucket-source NAME=DIR``) seeds a bucket with a local
directory, the way a local ``source:`` is uploaded. A bucket entry SkyPilot would refuse at
launch for its name (none, or one next to a ``source: s3://...``) is refused here.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

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
    cloud_source: str | None = None  # `source: s3://...` (a bucket that exists elsewhere)

    @property
    def url(self) -> str:
        return f"{self.store}://{self.bucket}/{self.sub}".rstrip("/")


@dataclass(frozen=True)
class Candidate:
    """One entry of resources (an `any_of` / `ordered` candidate, or the only one)."""

    cloud: str | None  # "aws", "aws/us-east-1", ... None: any cloud
    accelerators: dict[str, float]
    use_spot: bool
    job_recovery: Any

    @property
    def gpus(self) -> int:
        """Accelerators per node, as SKYPILOT_NUM_GPUS_PER_NODE counts them."""
        return int(math.ceil(sum(self.accelerators.values()))) if self.accelerators else 0

    def describe(self) -> str:
        accs = ",".join(f"{k}:{v:g}" for k, v in self.accelerators.items()) or "no GPU"
        return f"{self.cloud or 'any cloud'} {accs} {'spot' if self.use_spot else 'on-demand'}"


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
    candidates: list[Candidate] = field(default_factory=list)  # numbered as --candidate
    candidate: int = 0  # the one rehearsed: gpus_per_node and job_recovery are its
    # mount path -> cloud URL, for every file_mounts entry whose source is a bucket elsewhere
    # (`source: s3://...` or `/data: gs://...`): rehearse cannot read it, it starts empty
    cloud_sources: dict[str, str] = field(default_factory=dict)
    seeded: dict[str, list[str]] = field(default_factory=dict)  # bucket -> --bucket-source dirs


def load_recipe(
    path: Path, env: list[tuple[str, str]], secrets: list[tuple[str, str]],
    candidate: int = 0,
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
        if task.service is not None and getattr(task.service, "pool", False):
            raise BadInput(f"{path} is a pool YAML (pool:): rehearse a job on it with "
                           f"`rehearse.py JOB.yaml --pool {path} --pool-jobs N`")
        raise BadInput(f"{path}: no run: command to rehearse")

    candidates = resource_candidates(task, path)
    if not 0 <= candidate < len(candidates):
        raise BadInput(f"--candidate {candidate}: the recipe has {len(candidates)} resource "
                       f"candidate(s), numbered from 0")
    chosen = candidates[candidate]
    recovery = chosen.job_recovery
    if any(c.job_recovery != recovery for c in candidates):
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

    storage, cloud_sources = {}, {}
    for mount_path, obj in (task.storage_mounts or {}).items():
        store = next(iter(obj.stores), None)
        store_name = store.value.lower() if store is not None else "s3"
        sources = obj.source if isinstance(obj.source, list) else [obj.source or ""]
        bucket, sub = obj.name, getattr(obj, "_bucket_sub_path", None) or ""
        cloud_source = sources[0] if "://" in sources[0] else None
        # SkyPilot parses these but refuses them at launch (Storage._validate_storage_spec);
        # rehearse used to name such a bucket "bucket" and go on.
        why = None
        if not bucket and not any(sources):
            why = "no name: and no source: (SkyPilot: 'Storage source or storage name must " \
                  "be specified.')"
        elif not bucket and cloud_source is None:
            why = "a local source: and no name: (SkyPilot: 'Storage name must be specified " \
                  "if the source is local.')"
        elif bucket and cloud_source is not None:
            why = f"both name: {bucket!r} and source: {cloud_source} (SkyPilot: 'Storage " \
                  "name should not be specified if the source is a remote URI.')"
        if why:
            raise BadInput(f"{path}: file_mounts {mount_path}: {why}")
        if cloud_source is not None:
            rest = cloud_source.split("://", 1)[1]
            bucket = rest.split("/", 1)[0]
            sub = rest.partition("/")[2] or sub
            cloud_sources[mount_path] = cloud_source
        mode = getattr(obj.mode, "value", None) or "MOUNT"
        mount_type = getattr(getattr(obj, "file_mount_type", None), "value", None)
        storage[mount_path] = StorageSpec(
            store_name, bucket, sub.strip("/"),
            tuple(s for s in sources if s and "://" not in s), mode,
            mount_type if mode == "MOUNT_CACHED" else None, cloud_source)
    for mount_path, source in (task.file_mounts or {}).items():
        if "://" in source:
            cloud_sources[mount_path] = source
    return Recipe(
        path=path,
        name=task.name or path.stem,
        num_nodes=task.num_nodes,
        envs=dict(task.envs),
        secrets=secret_values,
        setup=task.setup if isinstance(task.setup, str) else None,
        run=task.run,
        workdir=workdir,
        gpus_per_node=chosen.gpus,
        strategy=str(strategy or "EAGER_NEXT_REGION").upper(),  # SkyPilot's default strategy
        max_restarts_on_errors=max_restarts,
        recover_on_exit_codes=recover_codes,
        storage_mounts=storage,
        copy_mounts=dict(task.file_mounts or {}),
        candidates=candidates,
        candidate=candidate,
        cloud_sources=cloud_sources,
    )


def resource_candidates(task: Any, path: Path) -> list[Candidate]:
    """The task's resources as numbered candidates: `ordered:` (and a list of accelerators)
    in SkyPilot's order; `any_of` (and a set of accelerators) in the YAML's order.

    SkyPilot keeps `any_of` as a set of Resources, which have no order (and no __hash__:
    iterating the set differs from run to run), so "the first candidate" would be random.
    The YAML's order is recovered by parsing each YAML entry on its own with SkyPilot's
    Resources.from_yaml_config, merged into the base as SkyPilot's _override_resources
    does, and matching what comes out; what matches nothing goes last, in a fixed order.
    """
    resources = task.resources
    if isinstance(resources, (list, tuple)):
        found = list(resources)
    else:
        order = _yaml_candidate_keys(path)
        found = sorted(resources, key=lambda r: (
            order.index(_key(r)) if _key(r) in order else len(order), repr(r)))
    candidates = []
    for r in found:
        try:
            accelerators = dict(r.accelerators or {})
        except Exception as e:  # an instance_type only: SkyPilot asks its catalog
            raise BadInput(f"{path}: SkyPilot cannot tell the accelerators of {r!r}: "
                           f"{one_line(e)}") from None
        cloud = str(r.cloud).lower() if r.cloud is not None else None
        if cloud and r.region:
            cloud += f"/{r.region}"
        candidates.append(Candidate(cloud, accelerators, bool(r.use_spot), r.job_recovery))
    return candidates


def _key(resources: Any) -> tuple:
    accelerators = getattr(resources, "_accelerators", None) or {}
    return (repr(resources.cloud), resources.region, resources.zone,
            tuple(sorted(accelerators.items())), bool(resources.use_spot),
            resources.instance_type)


def _yaml_candidate_keys(path: Path) -> list[tuple]:
    """_key of every candidate, in the order the recipe's YAML lists them ([] if unknown)."""
    from sky import resources as resources_lib
    from sky.utils import yaml_utils

    try:
        config = (yaml_utils.read_yaml_all_str(path.read_text())[-1] or {}).get("resources")
        if not isinstance(config, dict):
            return []
        base = {k: v for k, v in config.items() if k not in ("any_of", "ordered")}
        keys: list[tuple] = []
        for entry in config.get("any_of") or [{}]:
            merged = {**base, **entry}
            accelerators = merged.get("accelerators")
            if isinstance(accelerators, dict):  # {A100: 8, L4: 4} or {"A100:8", "L4:4"}
                accelerators = [k if v is None else f"{k}:{v}" for k, v in accelerators.items()]
            for one in accelerators if isinstance(accelerators, list) else [accelerators]:
                single = {**merged, "accelerators": one} if one is not None else merged
                parsed = resources_lib.Resources.from_yaml_config(copy.deepcopy(single))
                keys += sorted((_key(r) for r in parsed), key=repr)
        return keys
    except Exception:  # the order is cosmetic; SkyPilot itself accepted the recipe
        return []


def apply_bucket_sources(recipe: Recipe, items: list[str]) -> None:
    """--bucket-source NAME=DIR: DIR's contents are what the recipe sees where it mounts
    bucket NAME. For a bucket entry (`name:` or `source: s3://...`) DIR is uploaded into the
    bucket (under the source's prefix) before launch, exactly like a local `source:`; for a
    plain `/path: s3://NAME/...` copy, DIR is what is copied onto every node."""
    names = {spec.bucket for spec in recipe.storage_mounts.values()}
    copies = {path: _url_bucket(url) for path, url in recipe.copy_mounts.items() if "://" in url}
    for item in items:
        name, eq, directory = item.partition("=")
        if not eq or not name or not directory:
            raise BadInput(f"--bucket-source {item!r}: expected NAME=LOCAL_DIR")
        if name not in names and name not in copies.values():
            known = ", ".join(sorted(names | set(copies.values()))) or "none"
            raise BadInput(f"--bucket-source {name}: the recipe has no bucket {name!r} "
                           f"(its buckets: {known})")
        local = Path(directory).expanduser().resolve()
        if not local.is_dir():
            raise BadInput(f"--bucket-source {name}={directory}: not a directory")
        for mount_path, spec in recipe.storage_mounts.items():
            if spec.bucket == name:
                recipe.storage_mounts[mount_path] = replace(
                    spec, sources=(*spec.sources, str(local)))
        for mount_path, bucket in copies.items():
            if bucket == name:
                recipe.copy_mounts[mount_path] = str(local)
        recipe.seeded.setdefault(name, []).append(str(local))


def _url_bucket(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


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
