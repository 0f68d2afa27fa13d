"""Faults: the ``--preempt-at`` grammar (``parse_preempt_at`` -> ``Fault``, one per attempt)
and ``FaultRun``, the state of a fault under way in an attempt.

A fault may target a node (``@1``), a job of a pool (``@job1``, SKYPILOT_JOB_RANK 1) or a node
of one (``@job1.node0``). Each job of a pool takes, in order, the faults that target it or no
job; a fault with no ``@job`` strikes every job's attempt.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from rehearsal.recipe import BadInput

NOTICE_CLOUDS = ("aws", "gcp", "azure")
KINDS = ("term", "kill", "proc", "notice")
VM_LOSS = ("term", "kill", "notice")  # kinds that take the VM; proc leaves it up


@dataclass(frozen=True)
class Fault:
    trigger: str  # "time", "step" or "ckpt"
    at: float  # seconds after the attempt started, or the training step
    kind: str  # "term", "kill", "proc" or "notice"
    node: int | None = None  # the node rank it strikes; None: every node
    job: int | None = None  # the pool job (SKYPILOT_JOB_RANK) it strikes; None: every job

    def describe(self) -> str:
        where = f"{self.at:g}s" if self.trigger == "time" else f"{self.trigger}:{int(self.at)}"
        target = "" if self.job is None else f"job{self.job}"
        if self.node is not None:
            target += f".node{self.node}" if target else str(self.node)
        return f"{where}:{self.kind}" + (f"@{target}" if target else "")


# @<node rank> | @job<J> | @job<J>.node<R>
TARGET = re.compile(r"^(?:(?P<node>\d+)|job(?P<job>\d+)(?:\.node(?P<jnode>\d+))?)$")


def parse_preempt_at(text: str, default_kind: str) -> list[Fault]:
    items = []
    for item in (part.strip() for part in text.split(",")):
        body, at_sign, rank = item.partition("@")
        parts = body.split(":")
        kind = default_kind
        if parts[-1] in KINDS:
            kind = parts.pop()
        target = TARGET.match(rank) if at_sign else None
        node = job = None
        if target is not None:
            node = target["node"] or target["jnode"]
            node = int(node) if node is not None else None
            job = int(target["job"]) if target["job"] is not None else None
        if at_sign and target is None:
            pass  # falls through to the error below
        elif len(parts) == 2 and parts[0] in ("step", "ckpt") and parts[1].isdigit():
            items.append(Fault(parts[0], int(parts[1]), kind, node, job))
            continue
        elif len(parts) == 1 and re.fullmatch(r"\d+(\.\d+)?s", parts[0]):
            items.append(Fault("time", float(parts[0][:-1]), kind, node, job))
            continue
        raise BadInput(
            f"bad --preempt-at item {item!r}: expected <seconds>s, step:<N> or ckpt:<N>, "
            "optionally with :term, :kill, :proc or :notice and @<node rank>, @job<J> or "
            "@job<J>.node<R> (e.g. 30s,step:100:kill,ckpt:40:proc@1,5s:kill@job1)"
        )
    return items


@dataclass
class FaultRun:
    """A fault under way in the current attempt."""

    plan: Fault
    struck: list[int]
    record: dict
    term_at: float = math.inf  # when the struck nodes get SIGTERM (term, notice)
    kill_at: float = math.inf  # when the grace ends
    termed: bool = False
    lost: set[int] = field(default_factory=set)
    done: bool = False  # every VM the fault takes is gone (or none is taken)
