"""What SkyPilot tells a task through its environment.

Guarantee: ``default_run_name()`` is the same on every recovery of a managed job,
including after the jobs controller restarts, and differs between two launches.
It is keyed on ``SKYPILOT_MANAGED_JOB_ID`` and the task's name and index, never on
the controller start time embedded in ``SKYPILOT_TASK_ID``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

# SKYPILOT_TASK_ID of a managed job is
#   sky-managed-<controller start time>_<job name>_<job id>-<task index>
# (sky/utils/common_utils.py: get_global_job_id). The timestamp has no '_',
# the name may.
_MANAGED_TASK_ID = re.compile(r"^sky-managed-[^_]+_(?P<name>.*)_(?P<job>\d+)-(?P<task>\d+)$")


@dataclass(frozen=True)
class SkyEnv:
    managed_job_id: str | None = None
    task_id: str | None = None
    node_rank: int = 0
    node_ips: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    num_nodes: int = 1
    num_gpus_per_node: int = 0
    cluster_info: dict = field(default_factory=dict)

    @property
    def cloud(self) -> str | None:
        """Lower-case cloud name ('aws', 'gcp', 'azure', ...) or None outside SkyPilot."""
        cloud = self.cluster_info.get("cloud")
        return str(cloud).lower() if cloud else None

    @property
    def head_ip(self) -> str:
        return self.node_ips[0]

    def default_run_name(self) -> str | None:
        """Run name that survives recoveries, or None outside a managed job."""
        if not self.managed_job_id:
            return None
        name, task = "task", "0"
        match = _MANAGED_TASK_ID.match(self.task_id or "")
        if match:
            name, task = match["name"] or "task", match["task"]
        return f"{_slug(name)}-job{self.managed_job_id}-task{task}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "task"


def read(environ: dict[str, str] | None = None) -> SkyEnv:
    """Parse SkyPilot's variables; absent ones get single-node local defaults."""
    env = os.environ if environ is None else environ
    ips = [ip for ip in env.get("SKYPILOT_NODE_IPS", "").split() if ip] or ["127.0.0.1"]
    try:
        info = json.loads(env.get("SKYPILOT_CLUSTER_INFO") or "{}")
    except json.JSONDecodeError:
        info = {}
    return SkyEnv(
        managed_job_id=env.get("SKYPILOT_MANAGED_JOB_ID") or None,
        task_id=env.get("SKYPILOT_TASK_ID") or None,
        node_rank=int(env.get("SKYPILOT_NODE_RANK") or 0),
        node_ips=ips,
        num_nodes=int(env.get("SKYPILOT_NUM_NODES") or len(ips)),
        num_gpus_per_node=int(env.get("SKYPILOT_NUM_GPUS_PER_NODE") or 0),
        cluster_info=info if isinstance(info, dict) else {},
    )
