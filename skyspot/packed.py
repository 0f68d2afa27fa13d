"""Packed token sequences for training, read without holding the dataset in RAM.

Two sources give the trainer the same thing, a map-style dataset of int64 [seq_len] rows:

- A preprocessed directory (preprocess/tokenize.py's output: manifest.json, data/part-*.parquet).
  ``open_packed`` accepts it only if its manifest says it is complete, of kind "tokenize",
  packed to the --seq-len asked for, and every part it lists exists with the listed size;
  ``PackedSequences.check_tokenizer`` accepts it only if the tokenizer that made it has the
  model's tokenizer's sha256. Anything else is a ``DatasetError`` of one line naming both
  sides. Sequence i is row i of the parts concatenated in manifest order, rows in file order.
  The parts are memory-mapped and decoded one row group at a time, with at most
  ``CACHE_BYTES`` of decoded row groups and ``OPEN_PARTS`` open parts kept: anonymous memory
  is bounded by those and by a few numbers per part, not by the number of tokens. A part
  whose row count or column differs from the manifest is a one-line error naming it when
  it is first read.
- Raw text (``skyspot.textdata.load_text``). ``tokenize_to_memmap`` gives exactly the
  blocks of tokenizing every document with ``tokenizer(texts)["input_ids"]``, appending EOS
  to each, concatenating them in order and cutting [n, seq_len] blocks with the tail
  dropped, but holds only one batch of documents in Python at a time: the tokens go to a
  flat int32 file (4 bytes per token of local disk), fsynced and renamed into place, and
  come back as a read-only memory map.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from skyspot.textdata import DatasetError, tokenizer_identity
from skyspot.units import FORMAT, MANIFEST, PLAN

log = logging.getLogger("skyspot.packed")

KIND = "tokenize"  # what preprocess/tokenize.py's manifest says it holds
COLUMN = "input_ids"  # fixed_size_list<int32>[seq_len], one row per sequence
# Decoded row groups kept for reuse. preprocess/tokenize.py writes ~1 MiB groups (as int64
# tensors here, 2 MiB); the newest is always kept, however large.
CACHE_BYTES = 64 << 20
# Parts kept open (memory-mapped, footer parsed); closed least recently used first.
OPEN_PARTS = 8
# Documents tokenized per call on the raw path: bounds the Python lists (~36 B per token).
BATCH_ROWS = 1000


def looks_preprocessed(name: str) -> bool:
    """Whether --dataset names a preprocess/ output directory, finished or not: one with
    manifest.json, plan.json or data/part-*.parquet. Such a directory is never read as text."""
    path = Path(name)
    return path.is_dir() and ((path / MANIFEST).is_file() or (path / PLAN).is_file()
                              or any((path / "data").glob("part-*.parquet")))


def open_packed(name: str, seq_len: int) -> PackedSequences:
    """The sequences of the preprocessed directory ``name``, after the checks that need no
    part opened (see the module docstring); reads manifest.json and stats each part."""
    root = Path(name)
    unfinished = (f"preprocessing has not finished (run preprocess/tokenize.py to completion; "
                  f"tools/progress.py {name} shows how far it is)")
    if not (root / MANIFEST).is_file():
        raise DatasetError(f"--dataset {name}: no {MANIFEST}: {unfinished}")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"--dataset {name}: {MANIFEST} is not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DatasetError(f"--dataset {name}: {MANIFEST} has format {found!r}, not {FORMAT!r}: "
                           "not written by this version of preprocess/")
    if manifest.get("complete") is not True:
        raise DatasetError(f"--dataset {name}: {MANIFEST} says complete: "
                           f"{json.dumps(manifest.get('complete'))}: {unfinished}")
    if manifest.get("kind") != KIND:
        raise DatasetError(f"--dataset {name}: {MANIFEST} is of kind {manifest.get('kind')!r}, "
                           f"not {KIND!r}: train/lm.py reads the output of "
                           "preprocess/tokenize.py")
    parts, info = _parts_and_info(name, manifest)
    if info["seq_len"] != seq_len:
        raise DatasetError(f"--dataset {name} was packed into sequences of {info['seq_len']} "
                           f"tokens; --seq-len is {seq_len}: pass --seq-len {info['seq_len']}, "
                           f"or preprocess again with --seq-len {seq_len}")
    for part in parts:
        try:
            size = (root / part.path).stat().st_size
        except FileNotFoundError:
            raise DatasetError(f"--dataset {name}: {part.path}, listed in {MANIFEST} with "
                               f"{part.bytes} bytes, is missing: preprocess again") from None
        if size != part.bytes:
            raise DatasetError(f"--dataset {name}: {part.path} is {size} bytes; {MANIFEST} "
                               f"lists {part.bytes}: it changed after preprocessing; "
                               "preprocess again")
    return PackedSequences(name, parts, seq_len, info["tokenizer"])


@dataclass(frozen=True)
class Part:
    path: str  # relative to the dataset directory
    rows: int
    bytes: int


def _parts_and_info(name: str, manifest: dict) -> tuple[list[Part], dict]:
    """The manifest's parts and info, or one line saying what in it is malformed."""
    def malformed(what: str) -> DatasetError:
        return DatasetError(f"--dataset {name}: {MANIFEST} is malformed: {what}")

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    info = manifest.get("info")
    if not isinstance(info, dict) or not count(info.get("seq_len")) or not info["seq_len"]:
        raise malformed("no info.seq_len")
    identity = info.get("tokenizer")
    if not isinstance(identity, dict) or not isinstance(identity.get("sha256"), str):
        raise malformed("no info.tokenizer.sha256")
    if not isinstance(manifest.get("parts"), list):
        raise malformed("no parts list")
    parts = []
    for number, entry in enumerate(manifest["parts"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)
                and count(entry.get("rows")) and count(entry.get("bytes"))):
            raise malformed(f"parts[{number}] needs a path, rows and bytes")
        if Path(entry["path"]).is_absolute() or ".." in Path(entry["path"]).parts:
            raise malformed(f"parts[{number}] path {entry['path']!r} is outside the directory")
        parts.append(Part(entry["path"], entry["rows"], entry["bytes"]))
    total = sum(part.rows for part in parts)
    if manifest.get("rows") != total:
        raise malformed(f"rows is {manifest.get('rows')!r}; its parts hold {total}")
    return parts, info


@dataclass
class _OpenPart:
    file: object  # pq.ParquetFile, memory-mapped
    group_starts: np.ndarray  # first row of each row group, and the part's row count last


class PackedSequences(torch.utils.data.Dataset):
    """Row i of the parts concatenated, as an int64 tensor [seq_len]; ``__getitems__``
    gives [n, seq_len] for a list of indices (what a DataLoader with a batch_sampler asks
    for), decoding each row group it touches once. Not thread-safe: each DataLoader worker
    holds a copy (open files and the cache are not pickled)."""

    def __init__(self, name: str, parts: list[Part], seq_len: int, tokenizer: dict):
        self.name, self.root, self.seq_len, self.tokenizer = name, Path(name), seq_len, tokenizer
        self.parts = parts
        rows = np.array([part.rows for part in parts], dtype=np.int64)
        self._ends = np.cumsum(rows)  # 8 B per part: index -> part by binary search
        self._starts = self._ends - rows
        self._open: OrderedDict[int, _OpenPart] = OrderedDict()
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def check_tokenizer(self, tokenizer, model: str) -> None:
        """Refuse a model whose tokenizer differs from the one that made these sequences."""
        ours = tokenizer_identity(tokenizer, model)["sha256"]
        theirs = self.tokenizer["sha256"]
        if ours != theirs:
            raise DatasetError(
                f"--dataset {self.name} was tokenized with {self.tokenizer.get('name')} "
                f"(sha256 {theirs[:12]}…); --model {model}'s tokenizer is sha256 "
                f"{ours[:12]}…: preprocess again with --tokenizer {model}, or train with the "
                "model whose tokenizer made it")

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        index = np.where(index < 0, index + len(self), index)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} sequences: {indices}")
        out = np.empty((index.size, self.seq_len), dtype=np.int64)
        parts = np.searchsorted(self._ends, index, side="right")
        for part in np.unique(parts):
            at = np.flatnonzero(parts == part)
            rows = index[at] - self._starts[part]
            starts = self._part(int(part)).group_starts
            groups = np.searchsorted(starts, rows, side="right") - 1
            for group in np.unique(groups):
                here = groups == group
                out[at[here]] = self._group(int(part), int(group))[rows[here] - starts[group]]
        return torch.from_numpy(out)

    def _part(self, number: int) -> _OpenPart:
        """The part, open; on opening, its column and row count are checked."""
        if number in self._open:
            self._open.move_to_end(number)
            return self._open[number]
        import pyarrow as pa
        import pyarrow.parquet as pq

        part = self.parts[number]
        where = f"--dataset {self.name}: {part.path}"
        try:
            file = pq.ParquetFile(self.root / part.path, memory_map=True)
            kind = file.schema_arrow.field(COLUMN).type if COLUMN in file.schema_arrow.names \
                else None
        except (OSError, pa.ArrowException) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise DatasetError(f"{where}: not a readable Parquet file ({type(err).__name__}: "
                               f"{first})") from err
        wanted = pa.list_(pa.int32(), self.seq_len)
        if kind != wanted:
            file.close()
            found = f"column {COLUMN} is {kind}" if kind else f"no column {COLUMN}"
            raise DatasetError(f"{where}: {found}, not {wanted} (what preprocess/tokenize.py "
                               f"writes for --seq-len {self.seq_len}): preprocess again")
        if file.metadata.num_rows != part.rows:
            file.close()
            raise DatasetError(f"{where} holds {file.metadata.num_rows} rows; {MANIFEST} lists "
                               f"{part.rows}: preprocess again")
        sizes = [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)]
        self._open[number] = _OpenPart(file, np.cumsum([0, *sizes])[:-1])
        while len(self._open) > OPEN_PARTS:
            _, oldest = self._open.popitem(last=False)
            oldest.file.close()
        return self._open[number]

    def _group(self, part: int, group: int) -> np.ndarray:
        """Row group ``group`` of part ``part``, decoded to int32 [rows, seq_len]."""
        key = (part, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        column = self._part(part).file.read_row_group(group, columns=[COLUMN]).column(0)
        lists = column.combine_chunks()
        if lists.null_count:
            raise DatasetError(f"--dataset {self.name}: {self.parts[part].path}: row group "
                               f"{group} has null rows")
        rows = lists.flatten().to_numpy(zero_copy_only=True).reshape(-1, self.seq_len)
        self._cache[key] = rows
        while len(self._cache) > 1 and sum(a.nbytes for a in self._cache.values()) > CACHE_BYTES:
            self._cache.popitem(last=False)
        return rows

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict(), "_cache": OrderedDict()}


# ----------------------------------------------------------------------------- raw text


class TokenBlocks(torch.utils.data.Dataset):
    """An int32 [n, seq_len] array (a memory map) served as int64 tensors, like
    PackedSequences."""

    def __init__(self, blocks: np.ndarray):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.blocks[index].astype(np.int64))

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return torch.from_numpy(self.blocks[np.asarray(indices, dtype=np.int64)]
                                .astype(np.int64))


def batch_as_is(batch: torch.Tensor) -> torch.Tensor:
    """A DataLoader collate_fn: ``__getitems__`` already stacked the batch."""
    return batch


def token_file(run_dir: Path, dataset: str, tokenizer, model: str, column: str,
               seq_len: int) -> Path:
    """Where this node keeps the raw path's tokens: in $TMPDIR (node-local), named by the
    run and a hash of its checkpoint dir (one run at a time holds it: skyspot.lease) and of
    what the tokens depend on, so two runs on one node never share the file."""
    try:
        identity = tokenizer_identity(tokenizer, model)["sha256"]
    except DatasetError:  # a slow tokenizer: its name stands for it
        identity = model
    where = str(Path(dataset).resolve()) if Path(dataset).exists() else dataset
    key = json.dumps([str(Path(run_dir).resolve()), where, identity, column, seq_len])
    safe_run = re.sub(r"[^\w.-]", "_", Path(run_dir).name)
    return (Path(tempfile.gettempdir())
            / f"skyspot-tokens-{safe_run}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.int32")


def tokenize_to_memmap(dataset, tokenizer, column: str, seq_len: int, path: Path,
                       batch_rows: int = BATCH_ROWS) -> np.ndarray:
    """Tokenize ``dataset[column]`` into ``path`` and return its [n, seq_len] int32 blocks,
    memory-mapped read-only (see the module docstring). Written to ``<path>.tmp-<pid>``,
    fsynced and renamed onto ``path``; a failure removes the temporary file. Python holds
    ``batch_rows`` documents' token lists at a time, whatever the dataset's size."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DatasetError("the tokenizer has no EOS token, which packing puts after each "
                           "document")
    _remove_leftovers(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    documents = tokens = 0
    try:
        with open(tmp, "wb") as out:
            for batch in dataset.select_columns([column]).iter(batch_size=batch_rows):
                ids = tokenizer(batch[column])["input_ids"]
                flat = np.fromiter(itertools.chain.from_iterable(x + [eos] for x in ids),
                                   dtype=np.int32, count=sum(len(x) + 1 for x in ids))
                out.write(flat.tobytes())
                documents, tokens = documents + len(ids), tokens + flat.size
            blocks = tokens // seq_len
            out.truncate(blocks * seq_len * 4)  # the tail shorter than seq_len is dropped
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.debug("tokenized %d documents: %d tokens, %d blocks of %d (%d tail tokens dropped) "
             "in %s", documents, tokens, blocks, seq_len, tokens - blocks * seq_len, path)
    return open_tokens(path, seq_len)


def open_tokens(path: Path, seq_len: int) -> np.ndarray:
    """The [n, seq_len] int32 blocks of a file tokenize_to_memmap wrote, memory-mapped."""
    blocks = path.stat().st_size // (4 * seq_len)  # 4 bytes per int32 token
    if blocks == 0:  # an empty file can't be mapped
        return np.empty((0, seq_len), dtype=np.int32)
    return np.memmap(path, dtype=np.int32, mode="r", shape=(blocks, seq_len))


def _remove_leftovers(path: Path) -> None:
    """Temporary files of writers of ``path`` that were killed (their pid is gone)."""
    for leftover in path.parent.glob(f"{path.name}.tmp-*"):
        pid = leftover.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
