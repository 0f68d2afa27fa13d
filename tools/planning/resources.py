"""What the recipe runs on, read by SkyPilot's own parser, and what each candidate costs.

Envs the recipe leaves empty (a bucket name it wants with --env) get a placeholder: the
planner needs the resources, not the buckets. A multi-task pipeline is planned for its last
task (the one that trains). Candidates are numbered in the recipe's order, as rehearse
numbers them (``tools/rehearsal/recipe.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rehearsal.recipe import Candidate, one_line, resource_candidates

from planning.prices import PriceTable


class RecipeError(ValueError):
    """A recipe the planner cannot use: one line for the user."""


@dataclass(frozen=True)
class PricedCandidate:
    index: int
    candidate: Candidate
    spot_per_node: float | None  # $/h of one node
    od_per_node: float | None

    @property
    def label(self) -> str:
        return f"#{self.index} {self.candidate.describe()}"


@dataclass(frozen=True)
class Resources:
    path: Path
    task_name: str
    task_index: int
    tasks: int
    num_nodes: int
    candidates: tuple[PricedCandidate, ...]
    cpus: float | None  # for candidates without accelerators (cpus: 8+)
    memory: float | None


def load_resources(path: Path, prices: PriceTable) -> Resources:
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        from sky.utils import dag_utils, yaml_utils  # slow: only once the inputs are fine

        docs = [d for d in yaml_utils.read_yaml_all_str(path.read_text()) if d]
        placeholders = [(k, "skyspot-plan") for d in docs if isinstance(d, dict)
                        for k, v in (d.get("envs") or {}).items() if v is None]
        dag = dag_utils.load_chain_dag_from_yaml(str(path), placeholders or None, None)
    except Exception as e:  # SkyPilot reports bad YAML with many exception types
        raise RecipeError(f"SkyPilot rejects {path}: {one_line(e)}") from None
    if not dag.tasks:
        raise RecipeError(f"{path}: no task")
    task = dag.tasks[-1]
    try:
        found = resource_candidates(task, path)
    except Exception as e:  # BadInput, or SkyPilot asking its (offline) catalog
        raise RecipeError(one_line(e)) from None
    first = next(iter(task.resources))
    cpus, memory = _at_least(first.cpus), _at_least(first.memory)
    priced = tuple(PricedCandidate(i, c, *_prices(c, prices, cpus, memory))
                   for i, c in enumerate(found))
    return Resources(path, task.name or path.stem, len(dag.tasks) - 1, len(dag.tasks),
                     task.num_nodes, priced, cpus, memory)


def _prices(c: Candidate, table: PriceTable, cpus: float | None, memory: float | None):
    cloud, _, region = (c.cloud or "").partition("/")
    where = {"cloud": cloud or None, "region": region or None}
    if not c.accelerators:
        if cpus is None:
            return None, None
        return (table.hourly_cpu(cpus, memory or 0.0, spot=True, **where),
                table.hourly_cpu(cpus, memory or 0.0, spot=False, **where))
    if len(c.accelerators) != 1:
        return None, None
    (name, count), = c.accelerators.items()
    return (table.hourly(name, count, spot=True, **where),
            table.hourly(name, count, spot=False, **where))


def _at_least(value) -> float | None:
    """SkyPilot's "8+" / "16" / 8 as a number (the minimum), or None."""
    if value is None:
        return None
    found = re.match(r"\s*([0-9.]+)", str(value))
    return float(found.group(1)) if found else None
