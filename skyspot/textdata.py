"""Local text datasets (.txt, .jsonl/.json, .parquet) or a hub id, loaded and validated.

Guarantee: ``load_text`` returns a dataset every row of whose text column is a non-null,
valid UTF-8 string, or raises ``DatasetError`` with one line naming the first bad file and
line (row, record) where it is local. The check runs on the Arrow table (the column's type,
its null count, Arrow's UTF-8 validation in C++) without copying rows into Python; only
after a file failed to load or a bad row was found are the local files read again, a line
(a Parquet row group) at a time, to say where. ``dataset_files`` checks the names alone.

No torch or transformers here: ``datasets`` and ``pyarrow`` are imported when used, so
later workloads (preprocess/, infer/) can reuse this.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path


class DatasetError(ValueError):
    """Bad input: one line naming the file and row (a trainer reports it and exits 2)."""


_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def dataset_files(name: str) -> list[Path] | None:
    """The local files --dataset names (None for a hub id), checked without reading them."""
    path = Path(name)
    if path.exists():
        files = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.suffix in _LOADERS and p.is_file())
        kinds = {_LOADERS.get(p.suffix) for p in files}
        if not files or None in kinds or len(kinds) > 1:
            raise DatasetError(f"--dataset {name}: need .txt, .jsonl/.json or .parquet files "
                              "(one kind)")
        for file in files:
            if file.stat().st_size == 0:
                raise DatasetError(f"--dataset {file}: the file is empty")
        return files
    if _HUB_ID.match(name) and not name.startswith("."):
        return None
    raise DatasetError(f"--dataset {name}: no such file or directory")


def load_text(name: str, column: str):
    """The dataset, every row of whose ``column`` is a string; a bad row is a DatasetError
    naming it (file and line for local files). Checked on the Arrow table, before any
    tokenizing: the column's type and null count, no pass over the rows in Python."""
    import datasets

    files = dataset_files(name)
    if files is not None:
        quiet = not datasets.are_progress_bars_disabled()
        verbosity = datasets.logging.get_verbosity()
        # A file that fails to load makes datasets log an error and leave a progress bar
        # behind: the one line that says which row is wrong is ours.
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity(logging.CRITICAL)
        try:
            ds = datasets.load_dataset(_LOADERS[files[0].suffix],
                                       data_files=[str(p) for p in files], split="train")
        except Exception as err:  # bad UTF-8, a broken JSON line, mixed kinds of rows
            raise DatasetError(first_bad_row(files, column) or
                              f"--dataset {name}: could not be loaded: {_first_line(err)}"
                              ) from err
        finally:
            datasets.logging.set_verbosity(verbosity)
            if quiet:
                datasets.enable_progress_bars()
    else:
        try:
            ds = datasets.load_dataset(name, split="train")
        except Exception as err:  # offline, gated, misspelt: one line, not a traceback
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DatasetError(f"--dataset {name}: could not load from the hub: {first}") from err
    if column not in ds.column_names:
        raise DatasetError(f"--dataset {name} has no column {column!r} (columns: "
                          f"{', '.join(ds.column_names)}); pass --text-column")
    if len(ds) == 0:
        raise DatasetError(f"--dataset {name}: no rows")
    feature = ds.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DatasetError((files and first_bad_row(files, column)) or
                          f"--dataset {name}: column {column!r} holds {feature}, not strings")
    values = ds.data.table.column(column)
    if values.null_count:
        import pyarrow.compute as pc

        row = pc.index(pc.is_null(values), True).as_py() + 1
        raise DatasetError((files and first_bad_row(files, column)) or
                          f"--dataset {name}: row {row}: {column!r} is null")
    row = _invalid_utf8_row(values)  # Arrow's JSON reader takes bad UTF-8 as it is
    if row is not None:
        raise DatasetError((files and first_bad_row(files, column)) or
                          f"--dataset {name}: row {row + 1}: {column!r} is not UTF-8 text")
    return ds


def _invalid_utf8_row(values) -> int | None:
    """Index of the first string in the Arrow ``values`` that is not valid UTF-8, or None.
    Arrow's full validation, in C++; a bad chunk is halved down to the row."""
    import pyarrow as pa

    first = 0
    for chunk in values.chunks:
        try:
            chunk.validate(full=True)
        except pa.ArrowInvalid:
            low, high = 0, len(chunk)  # the first bad row is in [low, high)
            while high - low > 1:
                middle = (low + high) // 2
                try:
                    chunk.slice(low, middle - low).validate(full=True)
                    low = middle
                except pa.ArrowInvalid:
                    high = middle
            return first + low
        first += len(chunk)
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    cause = err.__cause__ or err.__context__
    if type(err).__name__ == "DatasetGenerationError" and cause is not None:
        return _first_line(cause)  # not "An error occurred while generating the dataset"
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def first_bad_row(files: list[Path], column: str) -> str | None:
    """Where the first unusable row of these local files is, and what is wrong with it:
    "--dataset FILE: line N: WHAT". Reads them a line (a Parquet row group) at a time, and
    only after loading them failed or found a bad row; None if nothing is found."""
    for file in files:
        kind = _LOADERS[file.suffix]
        problem = _parquet_problem(file, column) if kind == "parquet" else (
            _lines_problem(file, column, json_rows=kind == "json"))
        if problem:
            return f"--dataset {file}: {problem}"
    return None


def _lines_problem(file: Path, column: str, json_rows: bool) -> str | None:
    rows = 0
    with open(file, "rb") as reader:
        for number, raw in enumerate(reader, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return (f"line {number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at "
                        f"position {err.start + 1})")
            if not json_rows or not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if rows == 0 and file.suffix == ".json":
                    return _json_document_problem(file, column)  # one JSON value, not lines
                return f"line {number}: not valid JSON ({err.msg} at column {err.colno})"
            rows += 1
            if not isinstance(record, dict):
                return f"line {number}: {_json_kind(record)}, not a JSON object"
            if column not in record:
                return f"line {number}: no {column!r} field"
            if not isinstance(record[column], str):
                return f"line {number}: {column!r} is {_json_kind(record[column])}, not a string"
    return "no rows (only blank lines)" if json_rows and rows == 0 else None


def _json_document_problem(file: Path, column: str) -> str | None:
    """A .json file holding one JSON document (a list of records), read whole: that is how
    datasets reads it too."""
    try:
        document = json.loads(file.read_bytes())
    except json.JSONDecodeError as err:
        return f"line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})"
    records = document if isinstance(document, list) else []
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            return f"record {number}: {_json_kind(record)}, not a JSON object"
        if not isinstance(record.get(column), str):
            what = _json_kind(record[column]) if column in record else "missing"
            return f"record {number}: {column!r} is {what}, not a string"
    return None


def _parquet_problem(file: Path, column: str) -> str | None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
        schema = parquet.schema_arrow
        if column not in schema.names:
            return f"no column {column!r}"
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            return f"column {column!r} is {kind}, not strings"
        first = 0
        for group in range(parquet.num_row_groups):
            values = parquet.read_row_group(group, columns=[column]).column(column)
            if values.null_count:
                row = first + pc.index(pc.is_null(values), True).as_py() + 1
                return f"row {row}: {column!r} is null"
            first += len(values)
    except (OSError, pa.ArrowException) as err:
        return f"not a readable Parquet file ({_first_line(err)})"
    return None


def _json_kind(value) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"),
                       (str, "a string"), (list, "a list"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def tokenizer_identity(tokenizer, name: str) -> dict:
    """What a tokenization depends on, for a preprocessed dataset's manifest and the check
    at train time: ``name`` as given (a hub id or a path; informative only, since one
    tokenizer may be named two ways) and ``sha256`` over the fast tokenizer's canonical
    JSON (vocabulary, merges, normalizer, pre-tokenizer, post-processor, added tokens) and
    the special token ids the packing uses. Equal sha256 means equal token ids."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DatasetError(f"tokenizer {name}: not a fast tokenizer (no tokenizer.json); "
                           "skyspot packs with the Rust tokenizers only")
    digest = hashlib.sha256(backend.to_str().encode())
    digest.update(json.dumps({"eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id},
                             sort_keys=True).encode())
    return {"name": name, "sha256": digest.hexdigest()}
