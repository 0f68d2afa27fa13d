"""Pools: ``sky jobs pool apply POOL.yaml``, then ``sky jobs launch --pool P --num-jobs N``.

What it guarantees:

* ``load_pool`` reads the pool YAML and the job YAML with SkyPilot's own parser (an error is
  SkyPilot's, in one line) and merges them the way a pool runs a job: the workers' resources,
  ``file_mounts``, ``setup`` and ``workdir`` come from the pool YAML, and ``run``, ``name``,
  ``envs`` (over the pool's), ``secrets`` and ``job_recovery`` from the job YAML. Without
  ``--pool`` the job YAML alone is the recipe, as ``sky jobs launch --num-jobs N`` runs it.
* ``run_jobs`` runs N single-job rehearsals (managed.Rehearsal, unchanged) at once, one
  thread each, against the same buckets. Each job has its own VMs (namespaces, mounts,
  caches, home), its own ``SKYPILOT_JOB_RANK`` (0..N-1) and ``SKYPILOT_NUM_JOBS`` (N), its
  own managed job id, and its own faults. Each recovers on its own: a lost VM in one job
  never touches another. A pool is a composition of single jobs, not a copy of the loop.
* A Ctrl-C or SIGTERM to rehearse stops every job (their nodes are killed) before it returns.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import yaml

from rehearsal.managed import Interrupted, Rehearsal
from rehearsal.recipe import BadInput, Recipe, load_recipe, one_line

# What a job submitted to a pool takes from the pool's YAML (the workers it runs on).
FROM_POOL = ("resources", "file_mounts", "setup", "workdir", "num_nodes")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise BadInput(f"recipe not found: {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise BadInput(f"{path}: not YAML: {one_line(err)}") from None
    if not isinstance(config, dict):
        raise BadInput(f"{path}: not a SkyPilot task YAML (a mapping)")
    return config


def load_pool(pool_path: Path, job_path: Path, env: list[tuple[str, str]],
              secrets: list[tuple[str, str]], candidate: int = 0) -> tuple[Recipe, int]:
    """(the job as it runs on the pool's workers, the pool's worker count)."""
    pool = _read_yaml(pool_path)
    if not isinstance(pool.get("pool"), dict):
        raise BadInput(f"{pool_path}: no pool: section (a pool YAML has pool: {{workers: N}})")
    try:
        from sky.utils import dag_utils

        dag_utils.load_chain_dag_from_yaml(str(pool_path))  # SkyPilot's own checks first
    except Exception as err:  # SkyPilot reports bad YAML with many exception types
        raise BadInput(f"SkyPilot rejects {pool_path}: {one_line(err)}") from None
    workers = pool["pool"].get("workers", 1)
    if not isinstance(workers, int) or workers < 1:
        raise BadInput(f"{pool_path}: pool.workers must be an integer >= 1, not {workers!r}")
    job = _read_yaml(job_path)
    merged = {key: value for key, value in job.items() if key not in FROM_POOL}
    merged.update({key: pool[key] for key in FROM_POOL if key in pool})
    merged["envs"] = {**(pool.get("envs") or {}), **(job.get("envs") or {})}
    recovery = (job.get("resources") or {}).get("job_recovery")
    if recovery is not None:  # how a job recovers is the job's, on the pool's resources
        merged["resources"] = {**(pool.get("resources") or {}), "job_recovery": recovery}
    if "run" not in job:
        raise BadInput(f"{job_path}: no run: command (the job YAML of a pool holds the run:)")
    # Written next to the job YAML so that relative paths (workdir: .) mean what they did.
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=".rehearse-pool-",
                                     dir=job_path.parent, delete=False) as f:
        yaml.safe_dump(merged, f, sort_keys=False)
        merged_path = Path(f.name)
    try:
        recipe = load_recipe(merged_path, env, secrets, candidate=candidate)
    finally:
        merged_path.unlink()
    recipe.path = job_path
    return recipe, workers


def run_jobs(rehearsals: list[Rehearsal]) -> list[str]:
    """Run every job's managed loop at once; their statuses, in job order."""
    statuses = ["ERROR"] * len(rehearsals)
    errors: list[BaseException | None] = [None] * len(rehearsals)

    def one(index: int) -> None:
        try:
            statuses[index] = rehearsals[index].run()
        except Interrupted:
            statuses[index] = "INTERRUPTED"
            rehearsals[index].end_attempt("interrupted")
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread below
            errors[index] = err
            rehearsals[index].kill_all()

    threads = [threading.Thread(target=one, args=(i,), name=f"job{i}", daemon=True)
               for i in range(len(rehearsals))]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.2)
    except BaseException:
        for rehearsal in rehearsals:  # each job's loop sees it within one poll and stops
            rehearsal.stop.set()
        for thread in threads:
            thread.join(timeout=30)
        raise
    for err in errors:
        if err is not None:
            raise err
    return statuses
