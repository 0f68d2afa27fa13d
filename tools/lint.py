"""Lint SkyPilot recipes for spot ML jobs: SkyPilot's own parser, then recovery, secrets,
pinned setup, run: hazards, variables, checkpoints and project-script flags.

    python tools/lint.py                       # every recipes/*.yaml
    python tools/lint.py my-recipe.yaml        # any YAML of yours
    python tools/lint.py --format json recipes/train-lm-spot.yaml

Each finding is `file:line: severity: what is wrong — how to fix`. Exit 0 when there is no
error (warnings and notes alone), 1 on errors, 2 when a file is missing or not valid YAML.
The rules and their reasons are in tools/linting/*.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:  # run as a script tools/ is sys.path[0]; loaded by path it is not
    sys.path.insert(0, str(TOOLS))
from linting import lint  # noqa: E402
from linting.findings import ERROR, NOTE, WARNING, as_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/lint.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("recipes", nargs="*", metavar="RECIPE",
                        help="recipe files or directories (default: the repo's recipes/)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    args = parser.parse_args(argv)
    report = lint(args.recipes)
    if args.format == "json":
        print(as_json(report.findings, report.files))
    else:
        for finding in report.findings:
            print(finding.text())
        print(f"{len(report.files)} file(s): {report.count(ERROR)} error(s), "
              f"{report.count(WARNING)} warning(s), {report.count(NOTE)} note(s)",
              file=sys.stderr)
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
