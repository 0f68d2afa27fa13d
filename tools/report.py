"""How a run went: a PNG timeline and a summary (goodput, checkpoint overhead, restarts,
lost steps, cost against on-demand).

    python tools/report.py runs/demo                       # a rehearsal's workdir
    python tools/report.py /checkpoints/train-lm-spot-job42-task0 --accelerator L4:1 \\
        --format markdown --out run.png                    # a real run, in its bucket
    python tools/report.py /data/tiny-64                   # a batch job's unit output

RUN is a rehearsal workdir (or its rehearsal.json: the accelerator and node count come from
its recipe), a run directory in a checkpoint bucket (``<checkpoint-dir>/<run>``, where the
trainer writes ``events/*.jsonl``), a checkpoint dir holding one run, or a batch job's unit
output (``plan.json`` + ``data/part-*.parquet``: units done over time). What goodput, lost
work and checkpoint overhead mean, exactly: tools/reporting/__init__.py. Prices: SkyPilot's
catalog when it is cached on this machine, else the sample shipped in tools/planning/, or
``--prices CSV`` in the catalog's columns.

Exit status: 0; 1 the PNG could not be drawn (the summary is still printed); 2 bad input
(one line: no such path, not a run, no events, a malformed price file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:  # run as a script tools/ is sys.path[0]; loaded by path it is not
    sys.path.insert(0, str(TOOLS))
from reporting import summary  # noqa: E402
from reporting.accounting import Accounting, Cost, account, estimate_cost  # noqa: E402
from reporting.runs import ReportError, Run, load, parse_accelerator  # noqa: E402

PROG = "tools/report.py"
FORMATS = ("text", "markdown", "json")


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{PROG}: {message} (see --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog=PROG, description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, metavar="RUN",
                        help="rehearsal workdir or rehearsal.json, run directory, checkpoint "
                             "dir with one run, or unit output dir")
    parser.add_argument("--out", type=Path, default=Path("report.png"), metavar="PNG",
                        help="where to write the timeline (default: report.png)")
    parser.add_argument("--format", choices=FORMATS, default="text",
                        help="summary on stdout: text (default), markdown or json")
    parser.add_argument("--prices", type=Path, metavar="CSV",
                        help="prices in SkyPilot's catalog columns (default: the cached "
                             "catalog, else tools/planning/'s sample)")
    parser.add_argument("--accelerator", metavar="NAME:COUNT",
                        help="per node, e.g. L4:1 (default: the rehearsed recipe's candidates)")
    return parser.parse_args(argv)


def price(run: Run, acc: Accounting, args: argparse.Namespace) -> tuple[Cost | None, str | None]:
    """The cost estimate, or None and a line saying why there is none."""
    if args.accelerator:
        candidates = [(*parse_accelerator(args.accelerator), None)]
    else:
        candidates = run.candidates
    if not candidates:
        why = ("the recipe names no accelerator" if run.recipe else "no recipe to read the "
               "accelerator from")
        if args.prices is None:
            return None, f"not estimated: {why}; pass --accelerator NAME:COUNT"
        raise ReportError(f"--prices given but {why}: pass --accelerator NAME:COUNT")
    if args.prices is not None and not args.prices.is_file():
        raise ReportError(f"--prices {args.prices}: no such file")
    try:
        from planning.prices import load_prices
    except ImportError as err:
        return None, f"not estimated: the price table is not available here ({err})"
    try:
        table = load_prices(args.prices)
    except (ValueError, OSError) as err:  # prices.PriceError is a ValueError
        raise ReportError(str(err)) from None
    return estimate_cost(acc, run, table, candidates), None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run = load(args.run)
        acc = account(run)
        cost, cost_note = price(run, acc, args)
        if not args.out.parent.is_dir():
            raise ReportError(f"--out {args.out}: no such directory {args.out.parent}")
    except ReportError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    png, failed = str(args.out), None
    try:
        from reporting.plot import draw

        draw(run, acc, summary.headline(run, acc, cost), args.out)
    except ImportError as err:
        png, failed = None, (f"no PNG: matplotlib is not installed ({err}); "
                             f"`{sys.executable} -m pip install matplotlib`")
    except OSError as err:
        png, failed = None, f"no PNG: cannot write {args.out} ({err.strerror or err})"
    render = {"text": summary.text, "markdown": summary.markdown, "json": summary.as_json}
    print(render[args.format](run, acc, cost, cost_note, png))
    if failed:
        print(f"{PROG}: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
