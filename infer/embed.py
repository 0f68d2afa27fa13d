"""Embed every record of a dataset with a sentence-transformers model, exactly once into a bucket.

    python infer/embed.py --dataset data/docs.jsonl \\
        --model sentence-transformers/all-MiniLM-L6-v2 --output-dir /data/docs-minilm

What it guarantees (skyspot.units, skyspot.records):
- The input is checked before the model is loaded: an id and a text column, every id
  present, of one type and unique across the files, every text a string; a bad record
  is one line naming the file and the record, and no output dir is touched.
- Each record's embedding is what ``SentenceTransformer(model).encode(texts)`` gives (the
  parity test: max abs difference 1e-5): the model's tokenizer, truncation at its
  ``max_seq_length`` (--max-length), mean pooling over the attention mask and, where the
  model ends in a Normalize module, L2 normalization. Only models that are a Transformer,
  a mean Pooling and an optional Normalize are accepted (modules.json); others are refused
  in one line rather than embedded differently. A record longer than --max-length tokens
  is truncated, as encode() does, and flagged ``truncated``, not skipped.
- The input is cut into units of --unit-rows records of one file. Each unit lands in
  OUT/data/part-<unit>.parquet: the id column (same name and Arrow type as the input),
  ``embedding`` (fixed_size_list<float32>[dim]), ``tokens`` (int32, before truncation)
  and ``truncated`` (bool), in input order.
- The bytes of a part depend on the input, the model, --max-length, --normalize,
  --batch-size and --unit-rows, and on the hardware and software that computed it: not on
  the number of workers or how often they were killed. (Padding, hence --batch-size, can
  move a float in its last bits, so it is part of the plan: a rerun with another batch
  size is refused. Two GPU types may differ in the last bits too; the embedding column is
  stored uncompressed, so both give a part of the same size and the first commit stays.)
- At any moment ``OUT/data/*.parquet`` holds each finished unit once and nothing partial.
  When every unit is in the bucket, OUT/manifest.json lists the parts, the model's
  identity, the dimension and the counts.
- Workers of a pool (SKYPILOT_JOB_RANK/SKYPILOT_NUM_JOBS) or --shard-index/--num-shards
  split the units; one that finishes its share takes the others' unfinished units.
- On SIGTERM/SIGINT or a cloud preemption notice the unit in flight is given up between
  two batches (it is redone later: units take seconds), what is committed is made
  durable, and the run exits 143. A rerun skips the committed units.

Exit status: 0 complete (manifest.json in the bucket), 143 preempted (committed what it
had), 2 bad input, 1 the environment failed (a full disk, uploads that never land).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from skyspot import PREEMPTED_EXIT_CODE, skyenv, units
from skyspot.preemption import Preemption
from skyspot.records import Records, RunProgress, load_records
from skyspot.textdata import DatasetError, tokenizer_identity

log = logging.getLogger("infer.embed")

PROG = "infer/embed.py"
# What sentence-transformers calls a model's modules (modules.json "type", last component).
TRANSFORMER, POOLING, NORMALIZE = "Transformer", "Pooling", "Normalize"
# When neither sentence_bert_config.json nor the tokenizer gives a usable maximum length
# (tokenizers without one report 1e30), BERT's 512 positions are the safe guess.
FALLBACK_MAX_LENGTH = 512


# ----------------------------------------------------------------------------- config


@dataclass
class Config:
    dataset: str = field(default="", metadata={
        "help": "hub id, or a local .jsonl/.json/.parquet file or dir of them (required)"})
    id_column: str = field(default="id", metadata={"help": "unique id of each record"})
    text_column: str = field(default="text", metadata={"help": "the text to embed"})
    model: str = field(default="", metadata={
        "help": "hub id or local dir of a sentence-transformers model (required)"})
    output_dir: str = field(default="", metadata={"help": "usually a bucket mount (required)"})
    unit_rows: int = field(default=1024, metadata={
        "help": "records per unit: the grain of commits, skips and stealing; a unit should "
                "take seconds, well inside a 30 s preemption notice"})
    batch_size: int = field(default=64, metadata={
        "help": "records per forward pass (part of the plan: padding moves last bits)"})
    max_length: int = field(default=0, metadata={
        "help": "tokens per record, longer ones are truncated; 0 = the model's "
                "max_seq_length (sentence_bert_config.json), else the tokenizer's"})
    normalize: str = field(default="auto", metadata={
        "choices": ("auto", "yes", "no"),
        "help": "L2-normalize; auto = yes where modules.json lists a Normalize module, as "
                "SentenceTransformer(model) does"})
    device: str = field(default="auto", metadata={
        "choices": ("auto", "cpu", "cuda"), "help": "auto = cuda where there is one"})
    shard_index: int = field(default=-1, metadata={
        "help": "this worker's share (default: SKYPILOT_JOB_RANK, or 0)"})
    num_shards: int = field(default=0, metadata={
        "help": "number of workers (default: SKYPILOT_NUM_JOBS, or 1)"})
    durable_wait_seconds: float = field(default=300.0, metadata={
        "help": "at the end, wait this long for the parts to reach the bucket"})
    notice_poll_seconds: float = field(default=5.0, metadata={
        "help": "cloud preemption-notice poll interval; 0 disables"})
    log_every_seconds: float = field(default=30.0, metadata={
        "help": "a progress line this often where there is no progress bar (a job's log)"})


class ConfigError(Exception):
    """Bad input: one line, exit 2, nothing touched."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_config(argv: list[str] | None = None) -> Config:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                     epilog=__doc__.split("\n\n")[1],
                     formatter_class=argparse.RawTextHelpFormatter)
    for f in dataclasses.fields(Config):
        parser.add_argument("--" + f.name.replace("_", "-"),
                            type={"int": int, "float": float}.get(f.type, str),
                            default=f.default, choices=f.metadata.get("choices"),
                            help=f"{f.metadata.get('help', '')} (default: {f.default!r})")
    cfg = Config(**vars(parser.parse_args(argv)))
    for name in ("dataset", "model", "output_dir"):
        if not getattr(cfg, name):
            raise ConfigError(f"--{name.replace('_', '-')} is required")
    for name in ("unit_rows", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.max_length < 0:
        raise ConfigError("--max-length must be >= 0 (0: the model's own)")
    for name in ("durable_wait_seconds", "notice_poll_seconds"):
        if not 0 <= getattr(cfg, name) < float("inf"):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0")
    if not 0 < cfg.log_every_seconds < float("inf"):
        raise ConfigError("--log-every-seconds must be a finite number > 0")
    return cfg


# ----------------------------------------------------------------------------- the model


@dataclass
class ModelSpec:
    """What the model dir says about how to embed: where the transformer is, how long a
    record may be, whether to normalize; and what identifies it in the plan."""

    root: Path  # the dir holding modules.json (or the plain transformers model)
    transformer: Path  # the dir from_pretrained loads (modules.json's Transformer path)
    max_seq_length: int | None  # sentence_bert_config.json's, if any
    normalize: bool  # modules.json lists a Normalize module
    config_files: list[Path]  # the JSON files whose bytes go into the identity


def resolve_model_dir(name: str) -> Path:
    """A local dir as it is; a hub id downloaded (configs, tokenizer, safetensors weights)
    into the Hugging Face cache, or found there when offline."""
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"--model {name}: not a directory (a model dir or a hub id)")
        return path
    if name.startswith((".", "/")) or name.count("/") > 1:
        raise ConfigError(f"--model {name}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=[
            "*.json", "*.txt", "*.model", "*.safetensors"]))
    except Exception as err:  # offline, misspelt, gated: one line
        raise ConfigError(f"--model {name}: could not load: {first_line(err)}") from err


def read_model_spec(root: Path) -> ModelSpec:
    """Check modules.json and the pooling config: this script does a Transformer, mean
    pooling and an optional Normalize, which is what most embedding models are. A model
    without modules.json is a plain transformers model: SentenceTransformer(model) gives
    it mean pooling and no normalization, and so does this script."""
    files = [root / "config.json"]
    modules_file = root / "modules.json"
    if not modules_file.exists():
        return ModelSpec(root, root, None, False, [p for p in files if p.exists()])
    modules = read_json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ConfigError(f"{modules_file}: not a list of modules")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if not kinds or kinds[0] != TRANSFORMER or kinds[1:2] != [POOLING] or any(
            kind != NORMALIZE for kind in kinds[2:]):
        raise ConfigError(f"--model {root}: modules.json lists {' -> '.join(kinds)}; this script "
                          f"embeds {TRANSFORMER} -> {POOLING} (mean) [-> {NORMALIZE}] models only")
    transformer = root / modules[0].get("path", "")
    pooling_file = root / modules[1].get("path", "") / "config.json"
    modes = pooling_modes(read_json(pooling_file)) if pooling_file.exists() else ["mean"]
    if modes != ["mean"]:
        raise ConfigError(f"--model {root}: {pooling_file} pools by {'+'.join(modes)}; this "
                          "script does mean pooling only")
    sbert_file = transformer / "sentence_bert_config.json"
    sbert = read_json(sbert_file) if sbert_file.exists() else {}
    if sbert.get("do_lower_case"):
        raise ConfigError(f"--model {root}: {sbert_file} sets do_lower_case, which this "
                          "script does not do")
    max_seq_length = sbert.get("max_seq_length")
    files = [modules_file, pooling_file, sbert_file, transformer / "config.json"]
    return ModelSpec(root, transformer, max_seq_length if isinstance(max_seq_length, int)
                     else None, NORMALIZE in kinds, [p for p in files if p.exists()])


def pooling_modes(config: dict) -> list[str]:
    """The pooling modes a sentence-transformers Pooling config turns on: the newer
    ``pooling_mode`` key, else the legacy ``pooling_mode_*_tokens`` booleans (none = mean)."""
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        return [mode] if isinstance(mode, str) else list(mode)
    legacy = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
              "pooling_mode_mean_tokens": "mean",
              "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
              "pooling_mode_weightedmean_tokens": "weightedmean",
              "pooling_mode_lasttoken": "lasttoken"}
    return [mode for key, mode in legacy.items() if config.get(key)] or ["mean"]


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable ({first_line(err)})") from err


def model_identity(spec: ModelSpec, tokenizer, name: str) -> dict:
    """What the embeddings depend on, for plan.json and the manifest: ``name`` as given, a
    sha256 over the config files (architecture, modules, pooling, max_seq_length), the
    tokenizer's sha256 (skyspot.textdata) and the weight files' names and sizes. Hashing
    the weights themselves would cost every worker a full read of them at each start."""
    digest = hashlib.sha256()
    for path in spec.config_files:
        digest.update(f"{path.relative_to(spec.root).as_posix()}\0".encode())
        digest.update(path.read_bytes())
    weights = {p.name: p.stat().st_size for p in sorted(spec.transformer.iterdir())
               if p.suffix in (".safetensors", ".bin") and p.is_file()}
    return {"name": name, "sha256": digest.hexdigest(),
            "tokenizer_sha256": tokenizer_identity(tokenizer, name)["sha256"],
            "weights": weights}


def load_model(cfg: Config, spec: ModelSpec, device: str):
    """(tokenizer, model in eval mode on ``device``, float32); one line if it fails."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights": noise in a job's log
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec.transformer)
        model = transformers.AutoModel.from_pretrained(spec.transformer, dtype="float32")
    except Exception as err:  # missing weights, an unknown architecture: one line
        raise ConfigError(f"--model {cfg.model}: could not load: {first_line(err)}") from err
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ConfigError(f"--model {cfg.model}: no fast tokenizer (tokenizer.json)")
    if not isinstance(getattr(model.config, "hidden_size", None), int):
        raise ConfigError(f"--model {cfg.model}: its config has no hidden_size (the "
                          "embedding dimension)")
    return tokenizer, model.to(device).eval()


def resolve_max_length(cfg: Config, spec: ModelSpec, tokenizer, model) -> int:
    """--max-length, else the model's max_seq_length, else the tokenizer's own maximum;
    never more positions than the model has."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if cfg.max_length:
        if positions and cfg.max_length > positions:
            raise ConfigError(f"--max-length {cfg.max_length}: the model has "
                              f"{positions} positions")
        return cfg.max_length
    if spec.max_seq_length:
        return spec.max_seq_length
    limit = tokenizer.model_max_length
    if not isinstance(limit, int) or limit > 100_000:  # "no limit" (1e30)
        limit = FALLBACK_MAX_LENGTH
    return min(limit, positions) if positions else limit


def resolve_device(cfg: Config) -> str:
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        # The machine, not the input, is wrong (a GPU VM whose driver did not come up):
        # exit 1, which a managed job retries, rather than crawl on its CPUs.
        raise OSError("--device cuda: no CUDA device here (torch.cuda.is_available() is "
                      "False)")
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


# ----------------------------------------------------------------------------- embedding


class Embedder:
    """Embeds one unit into a Parquet file, in this process (the model lives here).

    Within a unit the records are sorted by token count, longest first, and cut into
    batches of --batch-size, so a batch pads little (sentence-transformers sorts by
    characters; the sort only groups, each row's result is its own up to padding's last
    bits); the rows are put back in input order before they are written."""

    def __init__(self, records: Records, tokenizer, model, *, device: str, max_length: int,
                 normalize: bool, batch_size: int, id_type, stop):
        self.records, self.tokenizer, self.model = records, tokenizer, model
        self.device, self.max_length, self.normalize = device, max_length, normalize
        self.batch_size, self.id_type, self.stop = batch_size, id_type, stop

    def __call__(self, unit: units.Unit, temp: Path) -> dict:
        import numpy as np
        import pyarrow as pa

        table = self.records.datasets[unit.source].data.table.slice(unit.start, unit.rows)
        texts = table.column(self.records.text_column).to_pylist()
        ids = table.column(self.records.id_column).cast(self.id_type).combine_chunks()
        # Tokens before truncation: what `tokens` and `truncated` report.
        lengths = [len(ids_) for ids_ in self.tokenizer(
            texts, truncation=False, padding=False, return_attention_mask=False,
            return_token_type_ids=False)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: (-min(lengths[i], self.max_length), i))
        vectors = np.empty((len(texts), self.model.config.hidden_size), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            if self.stop():
                raise units.Abandoned(unit.name)  # redone later; the notice is short
            batch = order[start:start + self.batch_size]
            vectors[batch] = self.embed([texts[i] for i in batch])
        stats = {"records": len(texts), "tokens": sum(lengths),
                 "truncated": sum(n > self.max_length for n in lengths)}
        part = pa.table({
            self.records.id_column: ids,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)),
                                                           vectors.shape[1]),
            "tokens": pa.array(lengths, type=pa.int32()),
            "truncated": pa.array([n > self.max_length for n in lengths], type=pa.bool_())})
        part = part.replace_schema_metadata({units.STATS_KEY: json.dumps(stats,
                                                                         sort_keys=True)})
        write_part(part, temp, self.records.id_column)
        return stats

    def embed(self, texts: list[str]):
        """Mean pooling over the attention mask, as sentence-transformers' Pooling does,
        then L2 normalization as its Normalize does: float32 rows as a numpy array."""
        import torch

        features = self.tokenizer(texts, padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt")
        features = {key: value.to(self.device) for key, value in features.items()}
        with torch.inference_mode():
            hidden = self.model(**features).last_hidden_state
            mask = features["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / torch.clamp(mask.sum(dim=1), min=1e-9)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.float().cpu().numpy()


def write_part(part, temp: Path, id_column: str) -> None:
    """Plain sequential writes (MOUNT buckets refuse seeks), flushed and fsynced before the
    commit renames it; no timestamps, so the same rows give the same bytes. The embedding
    column is stored plain and uncompressed (zstd saves ~8% of float32 embeddings): its size
    is then fixed by the row count, whatever the floats."""
    import pyarrow.parquet as pq

    with open(temp, "wb") as writer:
        pq.write_table(part, writer, use_dictionary=False,
                       compression={id_column: "zstd", "embedding": "none", "tokens": "zstd",
                                    "truncated": "zstd"})
        writer.flush()
        os.fsync(writer.fileno())


def summarize(cfg: Config, identity: dict, dim: int, max_length: int, normalize: bool):
    def info(stats: list[dict]) -> dict:
        totals = {key: sum(s[key] for s in stats) for key in ("records", "tokens", "truncated")}
        return {"model": identity, "dim": dim, "normalize": normalize,
                "max_length": max_length, "id_column": cfg.id_column,
                "text_column": cfg.text_column, "dataset": cfg.dataset, **totals}
    return info


def id_type(records: Records):
    """The input's id type; where files disagree in width, the widest of its kind."""
    import pyarrow as pa

    kinds = {ds.data.table.schema.field(records.id_column).type
             for ds in records.datasets if len(ds)}
    if len(kinds) == 1:
        return kinds.pop()
    return pa.int64() if all(pa.types.is_integer(k) for k in kinds) else pa.large_string()


# ----------------------------------------------------------------------------- main


def embed(cfg: Config) -> int:
    worker = units.worker_from(None if cfg.shard_index < 0 else cfg.shard_index,
                               None if cfg.num_shards < 1 else cfg.num_shards)
    output = units.Output(Path(cfg.output_dir), worker)
    # Bad input is found before the slow imports, and before anything is written.
    records = load_records(cfg.dataset, cfg.id_column, cfg.text_column)
    spec = read_model_spec(resolve_model_dir(cfg.model))
    device = resolve_device(cfg)
    tokenizer, model = load_model(cfg, spec, device)
    max_length = resolve_max_length(cfg, spec, tokenizer, model)
    normalize = spec.normalize if cfg.normalize == "auto" else cfg.normalize == "yes"
    identity = model_identity(spec, tokenizer, cfg.model)
    dim = model.config.hidden_size
    plan = units.plan_units(records.sources(), cfg.unit_rows)
    output.ensure_plan({
        "kind": "embed", "unit_rows": cfg.unit_rows, "units": len(plan),
        "sources": [{"name": name, "rows": rows} for name, rows in records.sources()],
        "settings": {"model": identity, "max_length": max_length, "normalize": normalize,
                     "batch_size": cfg.batch_size, "id_column": cfg.id_column,
                     "text_column": cfg.text_column}})
    if units.read_manifest(output.root) is not None:
        return report(output, "already complete")
    output.announce()
    log.info("%d units of up to %d records; worker %d of %d; %s on %s, %d-dim, max %d tokens, "
             "%snormalized", len(plan), cfg.unit_rows, worker.rank, worker.num_workers,
             cfg.model, device, dim, max_length, "" if normalize else "not ")

    env = skyenv.read()
    preemption = Preemption(env.cloud, poll_interval_s=cfg.notice_poll_seconds or 5.0,
                            poll=cfg.notice_poll_seconds > 0).install()
    committed = output.committed()
    progress = RunProgress(total_units=len(plan), done_units=len(committed),
                           total_records=len(records),
                           done_records=sum(u.rows for u in plan if u.index in committed),
                           desc=f"embed w{worker.rank}", log_every_s=cfg.log_every_seconds)
    embedder = Embedder(records, tokenizer, model, device=device, max_length=max_length,
                        normalize=normalize, batch_size=cfg.batch_size,
                        id_type=id_type(records), stop=lambda: preemption.requested)
    try:
        outcome = units.run(output, plan, embedder, kind="embed",
                            summarize=summarize(cfg, identity, dim, max_length, normalize),
                            num_proc=1, stop=lambda: preemption.requested,
                            durable_wait_s=cfg.durable_wait_seconds, progress=progress)
    finally:
        progress.close()
        preemption.close()
    log.info("worker %d: %d unit(s) done here (%d taken from other shares), %d found done; "
             "%.1f records/s", worker.rank, len(outcome.done_here), len(outcome.stolen),
             outcome.skipped, progress.rate())
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
    print(f"{output.root}: {state}: {manifest['units']} parts, {info['records']:,} records, "
          f"{info['dim']}-dim embeddings ({info['truncated']:,} truncated at "
          f"{info['max_length']} tokens, {manifest['bytes'] / 1e6:.1f} MB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return embed(parse_config(argv))
    except (ConfigError, DatasetError, units.UnitsError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
