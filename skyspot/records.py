"""Records for batch inference: an id and a text per row, checked before any work starts.

Guarantee: ``load_records`` returns the sources of a dataset (one per local file, in sorted
order, or one for a hub dataset) whose id column is present, never null, of one integer or
string type and unique across every source, and whose text column holds non-null UTF-8
strings (``skyspot.textdata``); or it raises ``DatasetError`` with one line naming the file
and the record. The checks run on Arrow columns in C++ (a ``value_counts`` over the ids),
so ten million ids cost seconds, not a pass in Python; only a duplicate found is looked up
again to name both records. Nothing is written, so bad input never touches an output dir.

Why before any work: a duplicate id found at unit 900 of 1,000 has by then produced output
that cannot land exactly once (two rows would carry the id), and the spot hours are spent.

Progress of a run (``RunProgress``) is here too: every batch workload shows the same bar.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from skyspot.events import EventLog
from skyspot.textdata import DatasetError, dataset_files, load_text

log = logging.getLogger(__name__)


@dataclass
class Records:
    """The dataset's sources, each a ``datasets.Dataset`` memory-mapped from its Arrow cache
    (picklable, cheap to slice); ``names`` are relative to --dataset, so the unit plan is the
    same on a VM that mounts the input elsewhere."""

    names: list[str]
    datasets: list
    id_column: str
    text_column: str

    def __len__(self) -> int:
        return sum(len(ds) for ds in self.datasets)

    def sources(self) -> list[tuple[str, int]]:
        """(name, rows) per source: what ``skyspot.units.plan_units`` cuts."""
        return [(name, len(ds)) for name, ds in zip(self.names, self.datasets, strict=True)]

    def id_type(self):
        """The id column's Arrow type (outputs carry the ids with the same type)."""
        return self.datasets[0].data.table.schema.field(self.id_column).type

    def rows(self, source: int, start: int, stop: int) -> tuple[list, list[str]]:
        """(ids, texts) of rows [start, stop) of one source."""
        table = self.datasets[source].data.table.slice(start, stop - start)
        return (table.column(self.id_column).to_pylist(),
                table.column(self.text_column).to_pylist())


def load_records(dataset: str, id_column: str, text_column: str) -> Records:
    """Load and check --dataset (see the module docstring); DatasetError on bad input."""
    files = dataset_files(dataset)
    if files is not None and files[0].suffix == ".txt":
        raise DatasetError(f"--dataset {dataset}: .txt files have no id column; use "
                           ".jsonl or .parquet records with an id and a text column")
    if files is None:
        names, where = [dataset], [dataset]
    else:
        root = Path(dataset)
        names = [p.name if root.is_file() else p.relative_to(root).as_posix() for p in files]
        where = [str(p) for p in files]
    loaded = []
    for name in where:
        ds = _load_one(name, id_column, text_column)
        loaded.append(ds)
    if sum(len(ds) for ds in loaded) == 0:
        raise DatasetError(f"--dataset {dataset}: no records")
    _check_ids(loaded, where, id_column)
    return Records(names, loaded, id_column, text_column)


def _load_one(name: str, id_column: str, text_column: str):
    if name.endswith(".parquet"):  # datasets cannot load a Parquet file of no rows
        import pyarrow.parquet as pq

        if pq.read_metadata(name).num_rows == 0:
            return _empty(id_column, text_column)
    try:
        ds = load_text(name, text_column)
    except DatasetError as err:
        if "no rows" in str(err):  # one empty file among others is fine; all empty is not
            return _empty(id_column, text_column)
        raise
    if id_column not in ds.column_names:
        raise DatasetError(f"{name}: no id column {id_column!r} (columns: "
                           f"{', '.join(ds.column_names)}); pass --id-column")
    return ds.select_columns([id_column, text_column])


def _empty(id_column: str, text_column: str):
    import datasets

    return datasets.Dataset.from_dict({id_column: [], text_column: []})


def _check_ids(loaded: list, where: list[str], column: str) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    kinds = set()
    for ds, name in zip(loaded, where, strict=True):
        if not len(ds):
            continue
        ids = ds.data.table.column(column)
        kind = ids.type
        if not (pa.types.is_integer(kind) or pa.types.is_string(kind)
                or pa.types.is_large_string(kind)):
            raise DatasetError(f"{name}: id column {column!r} holds {kind}; ids must be "
                               "integers or strings")
        if ids.null_count:
            row = pc.index(pc.is_null(ids), True).as_py()
            raise DatasetError(f"{name}: record {row + 1}: id {column!r} is missing (null)")
        kinds.add("int" if pa.types.is_integer(kind) else "string")
    if len(kinds) > 1:
        raise DatasetError(f"--dataset: id column {column!r} holds integers in some files and "
                           "strings in others; make them one type")
    columns = [ds.data.table.column(column) for ds in loaded if len(ds)]
    if pa.types.is_integer(columns[0].type):  # int32 in one file, int64 in another
        columns = [c.cast(pa.int64()) for c in columns]
    else:
        columns = [c.cast(pa.large_string()) for c in columns]
    counts = pc.value_counts(pa.chunked_array(columns))
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(repeated):
        value = repeated[0]["values"].as_py()
        places = [f"{name} record {row + 1}" for ds, name in zip(loaded, where, strict=True)
                  if len(ds)
                  for row in pc.indices_nonzero(pc.equal(
                      ds.data.table.column(column).cast(columns[0].type), value)).to_pylist()]
        raise DatasetError(f"--dataset: id {value!r} appears {len(places)} times "
                           f"({', '.join(places[:3])}); ids must be unique, since each output "
                           f"row is keyed by its id ({len(repeated)} id(s) repeated in all)")


class RunProgress:
    """The progress of a units run: a tqdm bar with records/s and an ETA on a terminal; in a
    job's log (no TTY) a line every ``log_every_s`` seconds; a "unit" event per commit for
    tools/rehearse.py (where SKYSPOT_EVENTS_FILE is set)."""

    def __init__(self, *, total_units: int, done_units: int, total_records: int,
                 done_records: int, desc: str, log_every_s: float = 30.0):
        from tqdm import tqdm

        self.total_units, self.units = total_units, done_units
        self.done_here = 0
        self.started = self.logged = time.monotonic()
        self.records = 0
        self.log_every_s = log_every_s
        self.events = EventLog(None)
        self.bar = tqdm(total=total_records, initial=done_records, unit="rec",
                        dynamic_ncols=True, disable=None, desc=desc, smoothing=0.1)

    def __call__(self, unit, stats: dict) -> None:
        self.units += 1
        self.done_here += 1
        self.records += unit.rows
        self.events.emit("unit", step=self.done_here, unit=unit.index, records=unit.rows,
                         persist=False)
        self.bar.update(unit.rows)
        if self.bar.disable and time.monotonic() - self.logged >= self.log_every_s:
            self.logged = time.monotonic()
            rate = self.records / max(self.logged - self.started, 1e-9)
            left = (self.bar.total - self.bar.n) / max(rate, 1e-9)
            log.info("%d/%d units, %.1f records/s, about %.0f min left at this rate (units "
                     "other workers finish come off it)", self.units, self.total_units, rate,
                     left / 60)

    def rate(self) -> float:
        return self.records / max(time.monotonic() - self.started, 1e-9)

    def close(self) -> None:
        self.bar.close()
