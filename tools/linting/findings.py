"""A finding: where (file, line), how bad, which rule, what is wrong and how to fix it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

ERROR, WARNING, NOTE = "error", "warning", "note"
SEVERITIES = (ERROR, WARNING, NOTE)


@dataclass(frozen=True)
class Finding:
    file: str
    line: int  # 1-based line of the YAML source (0: the file as a whole)
    severity: str  # error | warning | note
    rule: str  # e.g. "recovery/spot-without-job-recovery"
    message: str  # what is wrong
    fix: str = ""  # how to fix it

    def text(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        fix = f" \u2014 {self.fix}" if self.fix else ""
        return f"{where}: {self.severity}: {self.message}{fix}"


def as_json(findings: list[Finding], files: list[str]) -> str:
    counts = {f"{s}s": sum(1 for f in findings if f.severity == s) for s in SEVERITIES}
    return json.dumps({"files": files, **counts, "findings": [asdict(f) for f in findings]},
                      indent=2)
