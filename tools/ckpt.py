"""List, verify and prune the checkpoints of one run (skyspot.checkpoint).

    python tools/ckpt.py ls /checkpoints/lm-7                    # manifests and sizes: fast
    python tools/ckpt.py ls /checkpoints/lm-7 --checksums        # reads every byte
    python tools/ckpt.py verify /checkpoints/lm-7/step-00000600
    python tools/ckpt.py prune /checkpoints/lm-7 --keep-last 2 --keep-best loss
    python tools/ckpt.py prune /checkpoints/lm-7 --keep-last 2 --keep-best loss --apply

Example, on a MOUNT_CACHED bucket where step 600 is closed on this node and not yet uploaded
(a 10 kB/s upload in tools/localstore.py), step 400 is torn and step 300 never committed:

    $ python tools/ckpt.py ls /checkpoints/lm-7
    /checkpoints/lm-7: 5 checkpoint dirs; checked: manifests and sizes (--checksums: every byte)
    in bucket: read from the bucket itself (rclone lsjson), not through the mount
    step  dir            status                            ranks  files      size  in bucket  loss
     600  step-00000600  valid                                 1      2    1.0 MB  no         2.8812
     500  step-00000500  valid                                 1      2    1.0 MB  yes        2.9530
     400  step-00000400  invalid: model.safetensors has        -      2  525.6 kB  -          3.1002
                         524340 bytes, manifest says
                         1048680
     300  step-00000300  invalid: manifest.json missing        -      2    1.0 MB  -          3.2875
                         (the save never committed)
     200  step-00000200  valid                                 1      2    1.0 MB  yes        3.5120
    $ python tools/ckpt.py prune /checkpoints/lm-7 --keep-last 1 --keep-best loss
    /checkpoints/lm-7: 5 checkpoint dirs; checked: manifests and sizes (--checksums: every byte)
    in bucket: read from the bucket itself (rclone lsjson), not through the mount
    step  dir            status   in bucket  loss    action  why
     600  step-00000600  valid    no         2.8812  keep    not yet in the bucket (uploading); best
                                                             loss (2.8812 at step 600)
     500  step-00000500  valid    yes        2.9530  keep    newest valid checkpoint in the bucket
                                                             (checksums verified)
     400  step-00000400  invalid  -          3.1002  delete  invalid: model.safetensors has 524340
                                                             bytes, manifest says 1048680
     300  step-00000300  invalid  -          3.2875  delete  invalid: manifest.json missing (the
                                                             save never committed)
     200  step-00000200  valid    yes        3.5120  delete  older than the last 1 and not the best
                                                             loss
    dry run: would delete 3 checkpoint dirs (2.6 MB), keep 2; nothing was deleted (--apply deletes)
    $ python tools/ckpt.py verify /checkpoints/lm-7/step-00000400; echo "exit $?"
    invalid: /checkpoints/lm-7/step-00000400: model.safetensors has 524340 bytes, manifest
    says 1048680   (one line, wrapped here)
    exit 1

What ``valid`` means: what a resume checks (skyspot.checkpoint.verify): a well-formed manifest
whose step matches the directory, and every file it lists a regular file of the listed size;
a manifest marked sharded (--fsdp) must also list sharded.metadata and every rank's
sharded-rank<r>.safetensors. ``ls`` stops there by default: checksums cost a full read, which
on a bucket mount is a download of every checkpoint. ``ls --checksums`` and ``verify`` also
read and hash every file (xxh3-128). A resume may additionally require the files of its own
trainer (train/lm.py's model, optimizer, scheduler and RNG states); that is not checked here.

``in bucket``: whether the storage itself holds every file of the checkpoint at its size
(skyspot.durability). On a MOUNT_CACHED (rclone) mount a closed file sits in the node's cache
until it is uploaded, and a lost VM loses it: this is read from a listing of the remote, never
through the mount. On a local disk or an upload-on-close mount it is yes once the files
exist. ``unknown``: the bucket could not be listed. Invalid checkpoints show ``-``. On the
node that wrote them, checksums read its cached copy; the bucket's copy is checked by size.

The metric (``loss`` unless --metric says another field) comes from the trainer's ``log``
events under ``<run>/events`` (skyspot.events): for a checkpoint at step S, the value logged
at the greatest logged step <= S (the loss of the log window that ends there; train/lm.py
logs every --log-every steps); when a step was logged more than once (a resume replays the
steps after its checkpoint), the last one written wins: it belongs to the run that went on.

``prune`` keeps, and deletes everything else (a dry run unless --apply):

- every checkpoint newer than the newest valid checkpoint that is complete in the bucket (the
  cut): the newest valid one is always among them, and so are saves still uploading and torn
  or in-flight saves. The cut itself is read in full (checksums) first: it is what a resume
  falls back to once the older ones are gone. No valid checkpoint in the bucket: nothing is
  deleted; the bucket cannot be listed: prune refuses (exit 1).
- the --keep-last K newest valid checkpoints that are in the bucket (K counts what the
  trainer's own retention counts, so a lagging upload never shrinks what is kept; K may be 0,
  the cut is kept anyway);
- with --keep-best METRIC, the valid checkpoint with the best value (--mode min, the default,
  or max; ties go to the newer; nan never wins), valid as listed (by size, or by checksum
  with --checksums). No logged value at all is refused (exit 2).

It deletes as the trainer's retention does: the manifest first (an interrupted prune leaves a
directory that never verifies), then the rest, then the directory, oldest first. It touches
only ``step-N`` directories directly inside RUN_DIR: a symlink is never followed or deleted
(a symlink inside a deleted directory is unlinked, its target kept), and a RUN_DIR that is
itself a symlink is refused. ``--apply`` first takes the run's lease (skyspot.lease, the
trainer's one-writer rule), so a live trainer makes prune refuse in one line (exit 1), and a
trainer started meanwhile is refused; a dead owner's record is taken over as a trainer would
(after a lost VM, once its heartbeat is 10 s old). ``--force`` prunes without the lease,
alongside a trainer that may still be writing: the rules above still keep its newest
checkpoints and its save in flight, but its own retention may delete at the same time.

Output: a table (rich when installed, as it is with skypilot; else plain text) or
``--format json``. Exit status: 0 done (``ls`` also when some checkpoints are invalid);
``verify``: 1 invalid, with the reason on one line; ``prune``: 1 refused (a live owner, an
unlisted bucket) or a delete failed; 2 bad input, one line on stderr, nothing deleted.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import math
import os
import re
import shutil
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from skyspot.checkpoint import MANIFEST, parse_dir_name, verify
from skyspot.durability import LocalView, view_for
from skyspot.events import read_events
from skyspot.lease import LeaseError, LeaseLost, RunLease

try:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text
except ImportError:  # rich comes with skypilot; the plain table does without
    Console = None

PROG = "tools/ckpt.py"
_SHARD = re.compile(r"^sharded-rank\d+\.")
log = logging.getLogger("skyspot.ckpt")


class CkptError(Exception):
    """One line for the user; ``code`` 2 bad input, 1 refused or failed."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclass
class Row:
    """One ``step-N`` entry of a run dir, as listed, verified and (for prune) decided."""

    step: int
    retry: int
    path: Path
    status: str = "invalid"  # "valid", "invalid", or "skipped" (a symlink, not a directory)
    reason: str | None = None
    checked: str = "sizes"  # or "checksums"
    files: int = 0  # listed in the manifest (valid), else present in the directory
    bytes: int = 0
    ranks: int | None = None  # the manifest's world_size
    sharded: bool = False
    in_bucket: bool | None = None  # None: unknown, or not asked (invalid)
    metric: float | None = None
    metric_step: int | None = None  # the logged step the metric comes from
    action: str | None = None  # prune: "keep" or "delete"
    why: str | None = None
    sizes: dict[str, int] = field(default_factory=dict, repr=False)  # for in_bucket

    @property
    def order(self) -> tuple[int, int]:
        return self.step, self.retry

    def as_json(self) -> dict:
        out = {"step": self.step, "retry": self.retry, "dir": self.path.name,
               "path": str(self.path), "status": self.status, "reason": self.reason,
               "checked": self.checked, "files": self.files, "bytes": self.bytes,
               "ranks": self.ranks, "sharded": self.sharded, "in_bucket": self.in_bucket,
               "metric": _json_number(self.metric), "metric_step": self.metric_step}
        if self.action is not None:
            out.update(action=self.action, why=self.why)
        return out


@dataclass
class Listing:
    run: Path
    rows: list[Row]  # newest first
    checksums: bool
    durability: str  # how "in bucket" is known (skyspot.durability's view kind)
    listed: bool  # False: the bucket could not be listed
    metric: str


# ------------------------------------------------------------------------------- reading


def _required(manifest: dict) -> list[str]:
    """The files a sharded manifest must list (every rank's shard); none otherwise."""
    if not manifest["meta"].get("sharded"):
        return []
    from skyspot.sharded import files_of  # torch.distributed.checkpoint: only when needed

    return files_of(manifest["world_size"])


def inspect(path: Path, checksums: bool) -> Row:
    """``path`` (named step-N) checked as a resume would, by size or by checksum."""
    step, retry = parse_dir_name(path.name)
    row = Row(step, retry, path, checked="checksums" if checksums else "sizes")
    if path.is_symlink():  # step_dirs() never lists one: not a checkpoint of this run
        row.status, row.reason = "skipped", "a symlink (never followed, never deleted)"
        return row
    if not path.is_dir():
        row.status, row.reason = "skipped", "not a directory"
        return row
    manifest, reason = verify(path, _required, checksums=checksums)
    if manifest is None:
        row.files, row.bytes = _present(path)
        row.reason = reason if row.files or not _empty(path) else (
            "empty (a save killed before its first file)")
        return row
    entries = manifest["files"]
    row.status, row.files = "valid", len(entries)
    row.bytes = sum(entry["size"] for entry in entries)
    row.ranks = manifest["world_size"]
    row.sharded = bool(manifest["meta"].get("sharded")) or any(
        _SHARD.match(entry["path"]) for entry in entries)
    try:
        manifest_size = (path / MANIFEST).lstat().st_size
    except OSError:
        manifest_size = -1  # gone since: never "in the bucket"
    row.sizes = {**{entry["path"]: entry["size"] for entry in entries}, MANIFEST: manifest_size}
    return row


def _present(path: Path) -> tuple[int, int]:
    """(regular files but the manifest, their bytes) directly in ``path``; symlinks are not
    followed."""
    files = size = 0
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) and entry.name != MANIFEST:
                    files, size = files + 1, size + info.st_size
    except OSError:
        pass
    return files, size


def _empty(path: Path) -> bool:
    try:
        return not any(path.iterdir())
    except OSError:
        return False


def check_bucket(rows: list[Row], run: Path) -> tuple[str, bool]:
    """Fill ``in_bucket`` of the valid rows from one listing; (how it is known, listed)."""
    view = view_for(run)
    valid = [row for row in rows if row.status == "valid"]
    if valid:
        answer = view.in_bucket({row.path: row.sizes for row in valid})
        known = view.knows()
        for row in valid:
            row.in_bucket = True if answer[row.path] else (False if known else None)
    kind = ("yes once written (a local disk or an upload-on-close mount)"
            if type(view) is LocalView else
            "read from the bucket itself (rclone lsjson), not through the mount"
            if view.kind == "bucket listing" else view.kind)
    return kind, view.knows()


def metric_by_step(run: Path, name: str) -> dict[int, float]:
    """{logged step: value of field ``name``} of the trainer's ``log`` events; a step logged
    twice keeps the value written last (a resume replays the steps after its checkpoint)."""
    try:
        events = read_events(run)
    except (OSError, UnicodeDecodeError) as err:
        log.warning("cannot read the events under %s: %s", run / "events", err)
        return {}
    values = {}
    for event in events:
        if not isinstance(event, dict) or event.get("event") != "log":
            continue
        step, value = event.get("step"), event.get(name)
        if isinstance(step, int) and not isinstance(step, bool) and _is_number(value):
            values[step] = float(value)
    return values


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def attach_metric(rows: list[Row], values: dict[int, float]) -> None:
    """The value logged at the greatest logged step <= each checkpoint's step."""
    steps = sorted(values)
    for row in rows:
        at = bisect.bisect_right(steps, row.step) - 1
        if at >= 0:
            row.metric_step = steps[at]
            row.metric = values[row.metric_step]


def run_dir(text: str) -> Path:
    run = Path(text)
    if not run.exists():
        raise CkptError(f"{text}: no such directory")
    if not run.is_dir():
        raise CkptError(f"{text}: not a directory")
    if parse_dir_name(run.name):
        raise CkptError(f"{text} is one checkpoint; give its run dir ({run.parent}), or "
                        f"`verify` it")
    return run


def scan(run: Path, *, checksums: bool, metric: str) -> Listing:
    try:
        children = [child for child in run.iterdir() if parse_dir_name(child.name)]
    except OSError as err:
        raise CkptError(f"cannot list {run}: {err.strerror or err}") from None
    rows = sorted((inspect(child, checksums) for child in children),
                  key=lambda row: row.order, reverse=True)
    kind, listed = check_bucket(rows, run)
    attach_metric(rows, metric_by_step(run, metric))
    return Listing(run, rows, checksums, kind, listed, metric)


# ------------------------------------------------------------------------------- pruning


def plan(listing: Listing, keep_last: int, best: str | None, mode: str) -> Row | None:
    """Decide keep or delete for every row (see the module doc); returns the cut."""
    rows = listing.rows
    cut = None
    for row in rows:  # newest first: the newest valid checkpoint in the bucket, read in full
        if row.status != "valid" or not row.in_bucket:
            continue
        if row.checked != "checksums":
            manifest, reason = verify(row.path, _required, checksums=True)
            row.checked = "checksums"
            if manifest is None:
                row.status, row.reason, row.in_bucket = "invalid", reason, None
                continue
        cut = row
        break
    durable = [row for row in rows if row.status == "valid" and row.in_bucket]
    last = {id(row) for row in durable[:keep_last]}
    best_row = None
    if best is not None:
        ranked = [row for row in rows if row.status == "valid" and row.metric is not None
                  and math.isfinite(row.metric)]
        if ranked:  # ties: the newer (higher step) wins
            sign = 1 if mode == "min" else -1
            best_row = min(ranked, key=lambda row: (sign * row.metric, -row.step, -row.retry))
    for row in rows:
        kept = []
        if row.status == "skipped":
            kept.append("never touched: not a checkpoint directory of this run")
        elif cut is None:
            kept.append("nothing is deleted until a valid checkpoint is in the bucket")
        elif row is cut:
            kept.append("newest valid checkpoint in the bucket (checksums verified)")
        elif row.order > cut.order:
            kept.append("not yet in the bucket (uploading)"
                        if row.status == "valid" else
                        "newer than the newest valid checkpoint in the bucket (a save in "
                        "flight, or torn)")
        if id(row) in last and row is not cut:
            kept.append(f"one of the last {keep_last} in the bucket")
        if row is best_row:
            kept.append(f"best {best} ({row.metric:.6g} at step {row.metric_step})")
        if kept:
            row.action, row.why = "keep", "; ".join(kept)
        elif row.status == "valid":
            row.action = "delete"
            row.why = f"older than the last {keep_last}" + (
                f" and not the best {best}" if best else "")
        else:
            row.action, row.why = "delete", f"invalid: {row.reason}"
    return cut


def delete_checkpoint(run: Path, path: Path) -> str | None:
    """Delete checkpoint directory ``path`` of ``run`` as the trainer's retention does
    (skyspot.checkpoint._delete): manifest first, never through a symlink, never outside the
    run. None, or why it was not (completely) deleted."""
    if (path.parent != run or parse_dir_name(path.name) is None or path.is_symlink()
            or not path.is_dir()):
        return "not a checkpoint directory of the run (a symlink?): left alone"
    try:
        (path / MANIFEST).unlink(missing_ok=True)
    except IsADirectoryError:
        pass  # a manifest.json that is a directory never verified: rmtree removes it
    except OSError as err:
        return f"{MANIFEST}: {err.strerror or err}"
    errors: list[str] = []

    def failed(_func, where, exc_info):
        error = exc_info[1] if isinstance(exc_info, tuple) else exc_info
        errors.append(f"{where}: {getattr(error, 'strerror', None) or error}")

    # rmtree unlinks a symlink inside the directory; it never follows one.
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=failed)
    else:
        shutil.rmtree(path, onerror=failed)
    return errors[0] if errors else None


def take_lease(run: Path) -> RunLease:
    """The run's lease, as a trainer takes it, or CkptError(1) naming the live owner."""
    lease = RunLease(run)
    try:
        lease.acquire()
    except LeaseError:
        owner = lease.read()
        who = owner.describe() if owner is not None else "another writer"
        raise CkptError(f"{run} is held by a live trainer ({who}): not pruning while it "
                        "writes; stop it first, or pass --force", code=1) from None
    except OSError as err:
        raise CkptError(f"cannot take the lease of {run}: {err.strerror or err}",
                        code=1) from None
    return lease


def owner_note(run: Path) -> str | None:
    """Dry run: who holds the run, read only."""
    owner = RunLease(run).read()
    if owner is None:
        return None
    age = time.time() - owner.heartbeat
    return (f"{run} has an owner record ({owner.describe()}, heartbeat {age:.0f}s ago): "
            "--apply takes the run's lease first and refuses while that trainer is alive")


def apply(listing: Listing, lease: RunLease | None) -> tuple[list[Row], list[str]]:
    """Delete the rows marked delete, oldest first; (deleted, errors)."""
    deleted, errors = [], []
    for row in sorted((r for r in listing.rows if r.action == "delete"),
                      key=lambda r: r.order):
        if lease is not None:
            try:
                lease.check()  # as retention does: never delete in a run another writer owns
            except LeaseLost as err:
                errors.append(str(err))
                break
        problem = delete_checkpoint(listing.run, row.path)
        if problem is None:
            deleted.append(row)
        else:
            errors.append(f"could not delete {row.path}: {problem}")
    return deleted, errors


# ------------------------------------------------------------------------------- output


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _json_number(value: float | None) -> float | str | None:
    return value if value is None or math.isfinite(value) else str(value)


def _status(row: Row) -> str:
    return row.status if row.reason is None else f"{row.status}: {row.reason}"


def _bucket(row: Row) -> str:
    if row.status != "valid":
        return "-"
    return {True: "yes", False: "no", None: "unknown"}[row.in_bucket]


def _metric(row: Row) -> str:
    if row.metric is None:
        return "-"
    at = "" if row.metric_step == row.step else f" (step {row.metric_step})"
    return f"{row.metric:.4f}{at}"


def print_table(headers: list[str], rows: list[list[str]], right: set[int]) -> None:
    if Console is not None:
        # A terminal's width on a terminal; piped (grep, a log, a test), whole lines.
        width = shutil.get_terminal_size((200, 24)).columns if sys.stdout.isatty() else 200
        table = Table(box=None, header_style="bold", pad_edge=False)
        for i, header in enumerate(headers):
            table.add_column(header, justify="right" if i in right else "left",
                             overflow="fold")
        for cells in rows:
            table.add_row(*(Text(cell) for cell in cells))  # Text: a reason's [] is no markup
        console = Console(width=width, highlight=False)
        with console.capture() as captured:
            console.print(table)
        print("\n".join(line.rstrip() for line in captured.get().splitlines()))
        return
    widths = [max(len(cells[i]) for cells in [headers, *rows]) for i in range(len(headers))]
    for cells in [headers, *rows]:
        print("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(cells, widths, strict=True))).rstrip())


def header(listing: Listing) -> str:
    checked = ("every byte (checksums)" if listing.checksums
               else "manifests and sizes (--checksums: every byte)")
    return (f"{listing.run}: {len(listing.rows)} checkpoint dirs; checked: {checked}\n"
            f"in bucket: {listing.durability}")


def render_ls(listing: Listing) -> None:
    print(header(listing))
    if not listing.rows:
        return
    print_table(["step", "dir", "status", "ranks", "files", "size", "in bucket", listing.metric],
                [[str(row.step), row.path.name, _status(row),
                  str(row.ranks) if row.ranks else "-", str(row.files), _size(row.bytes),
                  _bucket(row), _metric(row)] for row in listing.rows], right={0, 3, 4, 5})


def render_prune(listing: Listing, metric: str, applied: bool, deleted: list[Row]) -> None:
    print(header(listing))
    if listing.rows:
        print_table(["step", "dir", "status", "in bucket", metric, "action", "why"],
                    [[str(row.step), row.path.name, row.status, _bucket(row), _metric(row),
                      row.action, row.why] for row in listing.rows], right={0})
    doomed = [row for row in listing.rows if row.action == "delete"]
    kept = len(listing.rows) - len(doomed)
    if applied:
        print(f"deleted {len(deleted)} of {len(doomed)} checkpoint dirs "
              f"({_size(sum(row.bytes for row in deleted))}), kept {kept}")
    else:
        print(f"dry run: would delete {len(doomed)} checkpoint dirs "
              f"({_size(sum(row.bytes for row in doomed))}), keep {kept}; nothing was deleted "
              "(--apply deletes)")


def _listing_json(listing: Listing) -> dict:
    return {"run": str(listing.run), "checked": "checksums" if listing.checksums else "sizes",
            "durability": listing.durability, "bucket_listed": listing.listed,
            "metric": listing.metric, "checkpoints": [row.as_json() for row in listing.rows]}


# ------------------------------------------------------------------------------- commands


def cmd_ls(args: argparse.Namespace) -> int:
    listing = scan(run_dir(args.run_dir), checksums=args.checksums, metric=args.metric)
    if args.format == "json":
        print(json.dumps(_listing_json(listing)))
    else:
        render_ls(listing)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    path = Path(args.ckpt_dir)
    if not path.exists() and not path.is_symlink():
        raise CkptError(f"{args.ckpt_dir}: no such directory")
    if parse_dir_name(path.name) is None:
        raise CkptError(f"{args.ckpt_dir} is not a checkpoint directory (expected "
                        "step-NNNNNNNN); `ls` takes a run dir")
    row = inspect(path, checksums=True)
    if row.status == "valid":
        check_bucket([row], path.parent)
    if args.format == "json":
        print(json.dumps(row.as_json()))
    elif row.status == "valid":
        shards = f" ({row.ranks} ranks' shards)" if row.sharded else ""
        print(f"valid: {path}: step {row.step}, {row.files} files{shards}, {_size(row.bytes)}, "
              f"every size and checksum matches; in the bucket: {_bucket(row)}")
    else:
        print(f"invalid: {path}: {row.reason}")
    return 0 if row.status == "valid" else 1


def cmd_prune(args: argparse.Namespace) -> int:
    run = run_dir(args.run_dir)
    if run.is_symlink():
        raise CkptError(f"{args.run_dir} is a symlink (to {os.path.realpath(run)}): prune "
                        "never deletes through one; give the directory itself")
    metric = args.keep_best or "loss"
    listing = scan(run, checksums=args.checksums, metric=metric)
    if args.keep_best and not any(row.metric is not None for row in listing.rows):
        raise CkptError(f"--keep-best {args.keep_best}: no 'log' event under {run / 'events'} "
                        f"carries {args.keep_best!r} at or before any checkpoint's step")
    if not listing.listed and any(row.status == "valid" for row in listing.rows):
        raise CkptError(f"cannot list the bucket behind {run}, so which checkpoints it holds "
                        "is unknown: deleting nothing", code=1)
    plan(listing, args.keep_last, args.keep_best, args.mode)
    deleted, errors = [], []
    doomed = any(row.action == "delete" for row in listing.rows)
    if args.apply and doomed:
        lease = None if args.force else take_lease(run)
        try:
            deleted, errors = apply(listing, lease)
        finally:
            if lease is not None:
                lease.release()
    elif not args.apply and not args.force:
        note = owner_note(run)
        if note:
            print(f"{PROG}: note: {note}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps({**_listing_json(listing), "apply": args.apply,
                          "deleted": [str(row.path) for row in deleted], "errors": errors}))
    else:
        render_prune(listing, metric, args.apply, deleted)
    for error in errors:
        print(f"{PROG}: error: {error}", file=sys.stderr)
    return 1 if errors else 0


# ------------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


count.__name__ = "count >= 0"  # argparse's "invalid count >= 0 value: '-1'"


def parser() -> _Parser:
    top = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                  epilog=__doc__.split("\n\n", 1)[1],
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True, metavar="{ls,verify,prune}")

    def formats(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--format", choices=("table", "json"), default="table",
                         help="json: one object on stdout, for machines")

    ls = commands.add_parser("ls", help="a run's checkpoints and whether each is valid",
                             description="List RUN_DIR's checkpoints: status, size, in the "
                             "bucket, metric. Example: tools/ckpt.py ls /checkpoints/lm-7")
    ls.add_argument("run_dir", metavar="RUN_DIR", help="<checkpoint-dir>/<run-name>")
    ls.add_argument("--checksums", action="store_true",
                    help="read and hash every file (a download on a bucket mount)")
    ls.add_argument("--metric", default="loss", metavar="NAME",
                    help="field of the trainer's log events to show (default: loss)")
    formats(ls)
    ve = commands.add_parser("verify", help="one checkpoint, every byte: exit 0 valid, 1 not",
                             description="Example: tools/ckpt.py verify "
                             "/checkpoints/lm-7/step-00000600")
    ve.add_argument("ckpt_dir", metavar="CKPT_DIR", help="a step-NNNNNNNN directory")
    formats(ve)
    pr = commands.add_parser("prune", help="keep the last K (and the best); dry run unless "
                             "--apply", description="Example: tools/ckpt.py prune "
                             "/checkpoints/lm-7 --keep-last 2 --keep-best loss --apply")
    pr.add_argument("run_dir", metavar="RUN_DIR", help="<checkpoint-dir>/<run-name>")
    pr.add_argument("--keep-last", type=count, required=True, metavar="K",
                    help="valid checkpoints in the bucket to keep, newest first")
    pr.add_argument("--keep-best", default=None, metavar="METRIC",
                    help="also keep the best by this field of the log events (e.g. loss)")
    pr.add_argument("--mode", choices=("min", "max"), default=None,
                    help="best is the lowest (min, the default) or the highest value")
    pr.add_argument("--checksums", action="store_true",
                    help="read every checkpoint in full, not only the one the cut rests on")
    pr.add_argument("--apply", action="store_true", help="delete (default: a dry run)")
    pr.add_argument("--force", action="store_true",
                    help="do not take the run's lease: prune while a trainer may be writing")
    formats(pr)
    return top


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if args.command == "prune":
        if args.mode is not None and args.keep_best is None:
            cli.error("--mode goes with --keep-best")
        args.mode = args.mode or "min"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    loggers = {logging.getLogger("skyspot"): logging.WARNING,
               logging.getLogger("skyspot.lease"): logging.INFO}  # INFO: why --apply waits
    before = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(level)
    loggers_root = next(iter(loggers))
    loggers_root.addHandler(handler)
    try:
        return {"ls": cmd_ls, "verify": cmd_verify, "prune": cmd_prune}[args.command](args)
    except CkptError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return err.code
    finally:  # as they were: main() also runs inside tests
        loggers_root.removeHandler(handler)
        for logger, level in before.items():
            logger.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
