"""Tokenize and pack a text dataset once, on cheap spot CPUs, exactly once into a bucket.

    python preprocess/tokenize.py --dataset roneneldan/TinyStories \\
        --tokenizer HuggingFaceTB/SmolLM2-360M --seq-len 1024 --output-dir /data/ts-1024

What it guarantees (skyspot.units):
- The input is cut into units of --unit-rows documents of one file. Each unit is tokenized
  and packed on its own into OUT/data/part-<unit>.parquet: one column ``input_ids`` of
  fixed-length int32 sequences of --seq-len tokens, the documents' tokens in order with
  the EOS token after each document. A unit's tail, fewer than --seq-len tokens, is
  dropped and counted (``dropped_tail_tokens``): at most seq_len-1 tokens per unit, 0.03%
  of a 10,000-document TinyStories unit at 1024 tokens.
- The bytes of every part depend on the input, the tokenizer, --seq-len and --unit-rows
  only: not on --num-proc, the number of workers, or how often they were killed.
- At any moment ``OUT/data/*.parquet`` holds each finished unit once and nothing partial.
  When every unit is in the bucket, OUT/manifest.json lists the parts, the tokenizer's
  identity, --seq-len and the counts; train/lm.py --dataset OUT reads that.
- Workers of a pool (SKYPILOT_JOB_RANK/SKYPILOT_NUM_JOBS) or --shard-index/--num-shards
  split the units; one that finishes its share takes the others' unfinished units.
- On SIGTERM/SIGINT or a cloud preemption notice no new unit starts; the ones in flight
  are committed and the run exits 143. A rerun skips the committed units.

Exit status: 0 complete (manifest.json in the bucket), 143 preempted (committed what it
had), 2 bad input, 1 the environment failed (a full disk, uploads that never land).
"""

from __future__ import annotations

import os
import sys

# This file is named like the standard library's `tokenize`, and Python puts a script's own
# directory first on sys.path: `import inspect` (torch, transformers) would import this
# file again instead. Nothing here imports a sibling module, so drop that entry first.
if sys.path and os.path.realpath(sys.path[0] or ".") == os.path.dirname(
        os.path.realpath(__file__)):
    del sys.path[0]

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from skyspot import PREEMPTED_EXIT_CODE, skyenv, units  # noqa: E402
from skyspot.events import EventLog  # noqa: E402
from skyspot.preemption import Preemption  # noqa: E402
from skyspot.textdata import (  # noqa: E402
    DatasetError,
    dataset_files,
    load_text,
    tokenizer_identity,
)

log = logging.getLogger("preprocess.tokenize")

# Bytes of int32 tokens per Parquet row group (at least one sequence). train/lm.py reads
# sequences in a random order and decodes a whole row group for each: 1024-row groups cost
# ~54 ms per sequence at seq_len 2048, ~1 MiB ones a few ms.
ROW_GROUP_BYTES = 1 << 20
CHECK_DOCS = 8  # documents per unit re-tokenized the slow way, to check the fast path
LOG_EVERY_S = 30.0  # progress lines in a job's log, where there is no progress bar


# ----------------------------------------------------------------------------- config


@dataclass
class Config:
    dataset: str = field(default="", metadata={
        "help": "hub id, or a local .txt/.jsonl/.parquet file or dir of them (required)"})
    text_column: str = "text"
    tokenizer: str = field(default="", metadata={
        "help": "hub id or local dir of the model whose tokenizer to use (required)"})
    seq_len: int = field(default=1024, metadata={"help": "tokens per packed sequence"})
    output_dir: str = field(default="", metadata={"help": "usually a bucket mount (required)"})
    unit_rows: int = field(default=10_000, metadata={
        "help": "documents per unit: the grain of commits, skips and stealing; a unit should "
                "take seconds, well inside a 30 s preemption notice"})
    num_proc: int = field(default=0, metadata={"help": "processes; 0 = every CPU available"})
    shard_index: int = field(default=-1, metadata={
        "help": "this worker's share (default: SKYPILOT_JOB_RANK, or 0)"})
    num_shards: int = field(default=0, metadata={
        "help": "number of workers (default: SKYPILOT_NUM_JOBS, or 1)"})
    durable_wait_seconds: float = field(default=300.0, metadata={
        "help": "at the end, wait this long for the parts to reach the bucket"})
    notice_poll_seconds: float = field(default=5.0, metadata={
        "help": "cloud preemption-notice poll interval; 0 disables"})


class ConfigError(Exception):
    """Bad input: one line, exit 2, nothing touched."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_config(argv: list[str] | None = None) -> Config:
    parser = _Parser(prog="preprocess/tokenize.py", description=__doc__.split("\n\n")[0],
                     epilog=__doc__.split("\n\n")[1],
                     formatter_class=argparse.RawTextHelpFormatter)
    for f in dataclasses.fields(Config):
        parser.add_argument("--" + f.name.replace("_", "-"),
                            type={"int": int, "float": float}.get(f.type, str),
                            default=f.default,
                            help=f"{f.metadata.get('help', '')} (default: {f.default!r})")
    cfg = Config(**vars(parser.parse_args(argv)))
    for name in ("dataset", "tokenizer", "output_dir"):
        if not getattr(cfg, name):
            raise ConfigError(f"--{name.replace('_', '-')} is required")
    for name in ("seq_len", "unit_rows"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.num_proc < 0:
        raise ConfigError("--num-proc must be >= 0 (0: every CPU available)")
    for name in ("durable_wait_seconds", "notice_poll_seconds"):
        if not 0 <= getattr(cfg, name) < float("inf"):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0")
    return cfg


# ----------------------------------------------------------------------------- build


def load_sources(cfg: Config) -> tuple[list[str], list]:
    """(names, datasets): one per local file, in sorted order, or one for a hub dataset.
    Every row of the text column is checked to be a string first (skyspot.textdata)."""
    files = dataset_files(cfg.dataset)
    if files is None:
        return [cfg.dataset], [load_text(cfg.dataset, cfg.text_column)]
    root = Path(cfg.dataset)
    # Names relative to --dataset: the plan must be the same on a VM that mounts it elsewhere.
    names = [p.name if root.is_file() else p.relative_to(root).as_posix() for p in files]
    return names, [load_text(str(p), cfg.text_column) for p in files]


class Packer:
    """Tokenizes and packs one unit into a Parquet file. Picklable (the tokenizer, datasets
    memory-mapped from their Arrow cache files): --num-proc processes each get a copy."""

    def __init__(self, cfg: Config, tokenizer, datasets: list):
        self.tokenizer, self.datasets = tokenizer, datasets
        self.column, self.seq_len = cfg.text_column, cfg.seq_len
        self.eos = tokenizer.eos_token_id

    def __call__(self, unit: units.Unit, temp: Path) -> dict:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = self.datasets[unit.source].data.table
        texts = table.slice(unit.start, unit.rows).column(self.column).to_pylist()
        # The Rust tokenizer without offsets (encode_batch_fast) is ~30% faster than
        # tokenizer(texts); both give the same ids, checked on the first documents.
        encodings = self.tokenizer.backend_tokenizer.encode_batch_fast(
            texts, add_special_tokens=True)
        ids = [encoding.ids for encoding in encodings]
        slow = self.tokenizer(texts[:CHECK_DOCS])["input_ids"]
        if slow != ids[:CHECK_DOCS]:
            raise DatasetError(f"--tokenizer: unit {unit.name}: encode_batch_fast gives other "
                               "ids than tokenizer(texts) for this tokenizer; please report it")
        total = sum(len(doc) for doc in ids) + len(ids)  # each document + its EOS
        flat = np.fromiter(itertools.chain.from_iterable(
            itertools.chain(doc, (self.eos,)) for doc in ids), dtype=np.int32, count=total)
        sequences = total // self.seq_len
        values = pa.array(flat[: sequences * self.seq_len], type=pa.int32())
        stats = {"documents": len(ids), "tokens": total, "sequences": sequences,
                 "dropped_tail_tokens": total - sequences * self.seq_len}
        part = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(values, self.seq_len)})
        part = part.replace_schema_metadata({units.STATS_KEY: json.dumps(stats,
                                                                         sort_keys=True)})
        # Plain sequential writes (MOUNT buckets refuse seeks), flushed and fsynced before
        # the commit renames it. zstd halves token ids; no timestamps: same bytes every time.
        with open(temp, "wb") as writer:
            pq.write_table(part, writer, compression="zstd",
                           row_group_size=max(1, ROW_GROUP_BYTES // (4 * self.seq_len)))
            writer.flush()
            os.fsync(writer.fileno())
        return stats


def summarize(cfg: Config, identity: dict, eos: int):
    def info(stats: list[dict]) -> dict:
        totals = {key: sum(s[key] for s in stats)
                  for key in ("documents", "tokens", "sequences", "dropped_tail_tokens")}
        return {"tokenizer": identity, "seq_len": cfg.seq_len, "text_column": cfg.text_column,
                "dataset": cfg.dataset, "eos_token_id": eos, **totals}
    return info


# ----------------------------------------------------------------------------- main


def preprocess(cfg: Config) -> int:
    worker = units.worker_from(None if cfg.shard_index < 0 else cfg.shard_index,
                               None if cfg.num_shards < 1 else cfg.num_shards)
    num_proc = cfg.num_proc or len(os.sched_getaffinity(0))
    if num_proc > 1:
        # Each process tokenizes single-threaded: one process per core needs no threads, and
        # Rust's thread pool would oversubscribe the cores (and deadlocks across a fork).
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    output = units.Output(Path(cfg.output_dir), worker)
    names, datasets = load_sources(cfg)  # bad input is found before the slow imports

    import transformers

    transformers.logging.set_verbosity_error()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.tokenizer)
    except Exception as err:  # offline, misspelt, gated: one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--tokenizer {cfg.tokenizer}: could not load: {first}") from err
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"--tokenizer {cfg.tokenizer} has no EOS token to put between "
                          "documents")
    identity = tokenizer_identity(tokenizer, cfg.tokenizer)
    plan = units.plan_units([(name, len(ds)) for name, ds in zip(names, datasets, strict=True)],
                            cfg.unit_rows)
    output.ensure_plan({
        "kind": "tokenize", "unit_rows": cfg.unit_rows, "units": len(plan),
        "sources": [{"name": name, "rows": len(ds)} for name, ds in zip(names, datasets,
                                                                         strict=True)],
        "settings": {"tokenizer": identity, "seq_len": cfg.seq_len,
                     "text_column": cfg.text_column}})
    if units.read_manifest(output.root) is not None:
        return report(output, "already complete")
    output.announce()
    log.info("%d units of up to %d documents; worker %d of %d, %d process(es)", len(plan),
             cfg.unit_rows, worker.rank, worker.num_workers, num_proc)

    env = skyenv.read()
    preemption = Preemption(env.cloud, poll_interval_s=cfg.notice_poll_seconds or 5.0,
                            poll=cfg.notice_poll_seconds > 0).install()
    from tqdm import tqdm

    bar = tqdm(total=len(plan), initial=len(output.committed()), unit="unit",
               dynamic_ncols=True, disable=None, desc=f"tokenize w{worker.rank}")
    started, tokens, done = time.monotonic(), 0, 0
    events = EventLog(None)  # a live local log only where SKYSPOT_EVENTS_FILE is set (rehearse)

    logged = started

    def progress(unit: units.Unit, stats: dict) -> None:
        nonlocal tokens, done, logged
        tokens, done = tokens + stats["tokens"], done + 1
        events.emit("unit", step=done, unit=unit.index, tokens=stats["tokens"], persist=False)
        rate = tokens / max(time.monotonic() - started, 1e-9)
        bar.update(1)
        bar.set_postfix_str(f"{rate:,.0f} tok/s")
        if bar.disable and time.monotonic() - logged >= LOG_EVERY_S:  # no TTY: a job's log
            logged = time.monotonic()
            left = len(plan) - bar.n
            eta = left * (time.monotonic() - started) / done
            log.info("%d/%d units, %.0f tokens/s, about %.0f min left at this rate (units "
                     "others finish come off it)", bar.n, len(plan), rate, eta / 60)

    try:
        outcome = units.run(output, plan, Packer(cfg, tokenizer, datasets), kind="tokenize",
                            summarize=summarize(cfg, identity, tokenizer.eos_token_id),
                            num_proc=num_proc, stop=lambda: preemption.requested,
                            durable_wait_s=cfg.durable_wait_seconds, progress=progress)
    finally:
        bar.close()
        preemption.close()
    rate = tokens / max(outcome.seconds, 1e-9)
    log.info("worker %d: %d unit(s) done here (%d taken from other shares), %d found done; "
             "%.0f tokens/s", worker.rank, len(outcome.done_here), len(outcome.stolen),
             outcome.skipped, rate)
    if outcome.preempted:
        log.info("preempted (%s): %d unit(s) committed; exiting %d", preemption.reason,
                 len(outcome.done_here), PREEMPTED_EXIT_CODE)
        return PREEMPTED_EXIT_CODE
    if outcome.not_durable:
        raise OSError(f"{len(outcome.not_durable)} unit(s) written here did not reach the bucket "
                      f"within {cfg.durable_wait_seconds:.0f} s (first: part-"
                      f"{outcome.not_durable[0]:05d}); see the mount's upload log. A rerun "
                      "redoes what is missing")
    if units.read_manifest(output.root) is None:  # another worker's upload still pending
        raise OSError(f"{output.root}: every unit is committed but the bucket does not list "
                      "them all yet; rerun, or let another worker write manifest.json")
    return report(output, "complete")


def report(output: units.Output, state: str) -> int:
    manifest = units.read_manifest(output.root)
    info = manifest["info"]
    print(f"{output.root}: {state}: {manifest['units']} parts, {info['sequences']:,} sequences "
          f"of {info['seq_len']} tokens ({info['tokens']:,} tokens, {info['documents']:,} "
          f"documents, {manifest['bytes'] / 1e6:.1f} MB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return preprocess(parse_config(argv))
    except (ConfigError, DatasetError, units.UnitsError) as err:
        print(f"preprocess/tokenize.py: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"preprocess/tokenize.py: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
