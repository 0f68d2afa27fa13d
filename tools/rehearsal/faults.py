"""Faults: the ``--preempt-at`` grammar (``parse_preempt_at`` -> ``Fault``, one per attempt)
and ``FaultRun``, the state of a fault under way in an attempt.
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

    def describe(self) -> str:
        where = f"{self.at:g}s" if self.trigger == "time" else f"{self.trigger}:{int(self.at)}"
        return f"{where}:{self.kind}" + (f"@{self.node}" if self.node is not None else "")


def parse_preempt_at(text: str, default_kind: str) -> list[Fault]:
    items = []
    for item in (part.strip() for part in text.split(",")):
        body, at_sign, rank = item.partition("@")
        parts = body.split(":")
        kind = default_kind
        if parts[-1] in KINDS:
            kind = parts.pop()
        node = int(rank) if at_sign and rank.isdigit() else None
        if at_sign and node is None:
            pass  # falls through to the error below
        elif len(parts) == 2 and parts[0] in ("step", "ckpt") and parts[1].isdigit():
            items.append(Fault(parts[0], int(parts[1]), kind, node))
            continue
        elif len(parts) == 1 and re.fullmatch(r"\d+(\.\d+)?s", parts[0]):
            items.append(Fault("time", float(parts[0][:-1]), kind, node))
            continue
        raise BadInput(
            f"bad --preempt-at item {item!r}: expected <seconds>s, step:<N> or ckpt:<N>, "
            "optionally with :term, :kill, :proc or :notice and @<node rank> "
            "(e.g. 30s,step:100:kill,ckpt:40:proc@1)"
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
