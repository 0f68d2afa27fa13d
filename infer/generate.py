"""Generate a completion for every record of a dataset, on spot GPUs, exactly once into a bucket.

    python infer/generate.py --dataset prompts.jsonl --model Qwen/Qwen2.5-0.5B-Instruct \\
        --chat-template --max-new-tokens 256 --output-dir /data/completions --engine vllm

What it guarantees (skyspot.units, skyspot.records):
- The records (an --id-column and a --text-column, the prompt) are checked before any work
  and before torch loads: a missing column, a null or repeated id, no records at all are
  one line and exit 2. The input is cut into units of --unit-rows records of one file; each
  unit is generated on its own into OUT/data/part-<unit>.parquet with one row per record,
  in input order: the id (same column name and Arrow type as the input), ``text`` (the
  completion), ``prompt_tokens``, ``completion_tokens`` (EOS included when it ended the
  completion), ``finish_reason`` ("stop": an EOS token; "length": --max-new-tokens;
  "skipped") and ``skipped`` (why, else null).
- Every id appears exactly once in ``OUT/data/*.parquet`` once OUT/manifest.json is there,
  however many workers ran and however often they were killed; a part is whole or absent.
- A record's completion depends on the record, the model and the flags only: not on the
  other records of its batch, the number of workers or how often they were killed (a
  redone unit is cut into the same batches, from its own records alone). Greedy with
  --temperature 0; with --temperature > 0 a sample seeded per record (below). Padding in a
  batch can move logits in their last bits, so --batch-size is part of the settings.
- A record whose prompt tokens plus --max-new-tokens exceed the model's context is skipped,
  not failed: its row is written (text null, finish_reason "skipped", the reason in
  ``skipped``) and counted in the manifest and the last line. One overlong record among
  millions must not fail a spot job hours in; the reason column lets you find and fix them
  (``WHERE skipped IS NOT NULL``) and run just those again.
- Workers of a pool (SKYPILOT_JOB_RANK/SKYPILOT_NUM_JOBS) or --shard-index/--num-shards
  split the units; one that finishes its share takes the others' unfinished units.
- On SIGTERM/SIGINT or a cloud preemption notice the unit in progress is abandoned between
  two batches (redone later: a unit may take longer than the notice), the run exits 143,
  and a rerun skips the committed units.

Seeded sampling, per record. transformers samples every row of a batch from one global
RNG, so a record's text would depend on its batch-mates and on how often its unit was
redone. Here each record draws from its own generator, seeded from (--seed, id) with
blake2b: the next token is argmax(logits/T + Gumbel noise) after top-p masking, an exact
sample from the top-p softmax(logits/T) (the Gumbel-max trick), with greedy decoding doing
the argmax. vLLM gets the same per-record seed in its SamplingParams. The two engines
sample different streams: a record's text is stable per engine, not across engines.

The model's generation_config.json (its sampling defaults, a repetition penalty) is not
applied, only its EOS tokens: the completions depend on the flags alone.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from skyspot import PREEMPTED_EXIT_CODE, skyenv, units
from skyspot.preemption import Preemption
from skyspot.records import Records, RunProgress, load_records
from skyspot.textdata import DatasetError, tokenizer_identity

log = logging.getLogger("infer.generate")

ENGINES = ("transformers", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
OUTPUT_COLUMNS = ("text", "prompt_tokens", "completion_tokens", "finish_reason", "skipped")
VLLM_CHUNK_BATCHES = 4  # vLLM gets a unit's prompts --batch-size x 4 at a time: it schedules
# them itself, and preemption is checked between chunks
FINGERPRINT_BYTES = 1 << 20  # of each end of each local weight file, for the model identity


# ----------------------------------------------------------------------------- config


@dataclass
class Config:
    dataset: str = field(default="", metadata={
        "help": "hub id, or a local .jsonl/.json/.parquet file or dir of them (required)"})
    id_column: str = field(default="id", metadata={"help": "unique id of each record"})
    text_column: str = field(default="text", metadata={"help": "the prompt"})
    model: str = field(default="", metadata={"help": "hub id or local dir (required)"})
    output_dir: str = field(default="", metadata={"help": "usually a bucket mount (required)"})
    engine: str = field(default="transformers", metadata={
        "help": "transformers (any machine) or vllm (GPU machines, pip install vllm==0.33.0)"})
    chat_template: bool = field(default=False, metadata={
        "help": "wrap each prompt as a user message in the tokenizer's chat template"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens per completion, at most"})
    batch_size: int = field(default=16, metadata={"help": "prompts per generate() call"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (temperature > 0)"})
    seed: int = field(default=0, metadata={"help": "with the id, seeds each record's sample"})
    unit_rows: int = field(default=256, metadata={
        "help": "records per unit: the grain of commits, skips and stealing; a unit should "
                "take seconds to a minute"})
    dtype: str = field(default="auto", metadata={
        "help": "auto|float32|bfloat16|float16 (auto: bfloat16 on cuda, float32 on cpu; "
                "vllm: the model's)"})
    device: str = field(default="auto", metadata={"help": "auto|cpu|cuda (transformers)"})
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
    parser = _Parser(prog="infer/generate.py", description=__doc__.split("\n\n")[0],
                     epilog=__doc__.split("\n\n")[1],
                     formatter_class=argparse.RawTextHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=help_text)
        else:
            parser.add_argument(flag, type={"int": int, "float": float}.get(f.type, str),
                                default=f.default, help=help_text)
    cfg = Config(**vars(parser.parse_args(argv)))
    for name in ("dataset", "model", "output_dir", "id_column", "text_column"):
        if not getattr(cfg, name):
            raise ConfigError(f"--{name.replace('_', '-')} is required")
    for name, choices in (("engine", ENGINES), ("dtype", DTYPES), ("device", DEVICES)):
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"--{name} {getattr(cfg, name)}: choose one of "
                              f"{', '.join(choices)}")
    for name in ("max_new_tokens", "batch_size", "unit_rows"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= cfg.temperature < float("inf"):
        raise ConfigError("--temperature must be a finite number >= 0 (0: greedy)")
    if not 0 < cfg.top_p <= 1:
        raise ConfigError("--top-p must be in (0, 1]")
    if cfg.id_column in OUTPUT_COLUMNS:
        raise ConfigError(f"--id-column {cfg.id_column}: the output has a column of that "
                          f"name ({', '.join(OUTPUT_COLUMNS)}); rename the id column")
    for name in ("durable_wait_seconds", "notice_poll_seconds"):
        if not 0 <= getattr(cfg, name) < float("inf"):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0")
    return cfg


# ----------------------------------------------------------------------------- identity


def record_seed(seed: int, record_id) -> int:
    """The seed of one record's sample: a stable hash of (--seed, id), never Python's hash()
    (salted per process). 63 bits, so that no int64 conversion downstream overflows; ids 5
    and "5" get different seeds."""
    digest = hashlib.blake2b(repr((seed, record_id)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def model_identity(name: str, config) -> dict:
    """What the completions depend on, for the plan: ``name`` as given, sha256 of
    config.json, the hub revision where the model came from the hub, and for a local dir a
    fingerprint of its weight files (name, size, sha256 of the first and last MiB of each):
    two fine-tunes of one base share their config.json, and a rerun must not mix them."""
    from transformers.utils import cached_file

    identity = {"name": name}
    path = cached_file(name, "config.json")
    identity["config_sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    revision = getattr(config, "_commit_hash", None)
    if revision:
        identity["revision"] = revision
    root = Path(name)
    if root.is_dir():
        weights = hashlib.sha256()
        for file in sorted(p for p in root.iterdir()
                           if p.suffix in (".safetensors", ".bin", ".pt", ".pth")):
            size = file.stat().st_size
            weights.update(f"{file.name}\0{size}\0".encode())
            with open(file, "rb") as reader:
                weights.update(reader.read(FINGERPRINT_BYTES))
                reader.seek(max(0, size - FINGERPRINT_BYTES))
                weights.update(reader.read(FINGERPRINT_BYTES))
        identity["weights_fingerprint"] = weights.hexdigest()
    return identity


def tokenizer_digest(tokenizer, name: str) -> dict:
    try:
        identity = tokenizer_identity(tokenizer, name)
    except DatasetError:  # a slow tokenizer: its vocabulary
        vocab = json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()
        identity = {"name": name, "sha256": hashlib.sha256(vocab).hexdigest()}
    return identity


# ----------------------------------------------------------------------------- engines


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" or "length"


class GumbelMaxSampler:
    """A transformers LogitsProcessor (the protocol, ``__call__(input_ids, scores)``; not
    subclassed so this module imports without transformers) that turns greedy decoding
    into seeded sampling, one generator per row: row r's next token is
    argmax(top_p(scores/T) + G) with G ~ Gumbel(0, 1) from its own generator, advanced once
    per step. That argmax is an exact sample from the top-p softmax(scores/T), and row r's
    draws do not depend on the other rows: its t-th token always uses its t-th draw."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device):
        import torch

        self.temperature, self.top_p = temperature, top_p
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            # Keep the most likely tokens whose mass reaches top_p (at least one): a token
            # goes when the mass before it already does.
            ordered, order = torch.sort(scores, dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            drop = probs.cumsum(dim=-1) - probs >= self.top_p
            drop[:, 0] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        noise = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device,
                                        dtype=torch.float32) for g in self.generators])
        # -log(-log(u)): u = 0 gives -inf (never chosen); rand() never returns 1.
        return scores - torch.log(-torch.log(noise))


class TransformersEngine:
    """model.generate() on left-padded batches of prompts of similar length."""

    def __init__(self, cfg: Config, tokenizer, config):
        import torch
        import transformers

        self.torch, self.cfg, self.tokenizer = torch, cfg, tokenizer
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device here; use --device cpu or auto")
        self.device = torch.device(device)
        self.dtype_name = cfg.dtype if cfg.dtype != "auto" else (
            "bfloat16" if device == "cuda" else "float32")
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                cfg.model, dtype=getattr(torch, self.dtype_name))
        except Exception as err:  # offline, misspelt, gated, not a causal LM: one line
            raise ConfigError(f"--model {cfg.model}: could not load the model: "
                              f"{_first_line(err)}") from err
        self.model = model.to(self.device).eval()
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = config.eos_token_id if config.eos_token_id is not None else \
                tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        if not self.eos:
            raise ConfigError(f"--model {cfg.model} has no EOS token: completions could only "
                              "end at --max-new-tokens")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos)
        # Only these settings, not the model's generation_config.json (its sampling defaults
        # would be merged into an explicit config wherever that leaves a value unset).
        self.model.generation_config = transformers.GenerationConfig(
            eos_token_id=sorted(self.eos), pad_token_id=self.pad,
            bos_token_id=model.generation_config.bos_token_id)
        self.context = _context_of(config, tokenizer)

    def complete(self, prompts: list[list[int]], seeds: list[int],
                 stop: Callable[[], bool]) -> list[Completion]:
        """Completions of ``prompts`` (in their order), in batches of --batch-size cut from
        the prompts sorted longest first (ties in input order): the same prompts give the
        same batches. Raises units.Abandoned when ``stop()`` is true between two batches."""
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        results: list[Completion | None] = [None] * len(prompts)
        for start in range(0, len(order), self.cfg.batch_size):
            if stop():
                raise units.Abandoned()
            batch = order[start:start + self.cfg.batch_size]
            for i, completion in zip(batch, self._batch([prompts[i] for i in batch],
                                                        [seeds[i] for i in batch]), strict=True):
                results[i] = completion
        return results

    def _batch(self, prompts: list[list[int]], seeds: list[int]) -> list[Completion]:
        torch = self.torch
        width = max(map(len, prompts))
        input_ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every row ends at the same place
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            attention[row, width - len(prompt):] = 1
        processors = None
        if self.cfg.temperature > 0:
            processors = [GumbelMaxSampler(seeds, self.cfg.temperature, self.cfg.top_p,
                                           self.device)]
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                do_sample=False, num_beams=1, use_cache=True,
                max_new_tokens=self.cfg.max_new_tokens, pad_token_id=self.pad,
                logits_processor=processors)
        completions = []
        for tokens in out[:, width:].tolist():
            # A row that ended early is padded to the batch's longest: cut at its first EOS.
            end = next((i for i, token in enumerate(tokens) if token in self.eos), None)
            if end is None:
                tokens, reason = tokens[:self.cfg.max_new_tokens], "length"
            else:
                tokens, reason = tokens[:end + 1], "stop"
            completions.append(Completion(tokens, self.tokenizer.decode(
                tokens, skip_special_tokens=True), reason))
        return completions


class VllmEngine:
    """vllm.LLM.generate() on the unit's token prompts, a few batches at a time."""

    def __init__(self, cfg: Config, vllm):
        self.cfg, self.vllm = cfg, vllm
        try:
            self.llm = vllm.LLM(model=cfg.model, dtype=cfg.dtype, seed=cfg.seed)
        except Exception as err:
            raise ConfigError(f"--model {cfg.model}: vLLM could not load it: "
                              f"{_first_line(err)}") from err
        self.context = int(self.llm.llm_engine.model_config.max_model_len)

    def complete(self, prompts: list[list[int]], seeds: list[int],
                 stop: Callable[[], bool]) -> list[Completion]:
        cfg, chunk = self.cfg, self.cfg.batch_size * VLLM_CHUNK_BATCHES
        results: list[Completion] = []
        for start in range(0, len(prompts), chunk):
            if stop():
                raise units.Abandoned()
            params = [self.vllm.SamplingParams(
                max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                seed=seed if cfg.temperature > 0 else None) for seed in seeds[start:start + chunk]]
            outputs = self.llm.generate(
                [{"prompt_token_ids": p} for p in prompts[start:start + chunk]], params,
                use_tqdm=False)
            for prompt, output in zip(prompts[start:start + chunk], outputs, strict=True):
                if list(output.prompt_token_ids) != prompt:  # the order is vLLM's contract
                    raise RuntimeError("vLLM returned the completions in another order")
                best = output.outputs[0]
                results.append(Completion(list(best.token_ids), best.text,
                                          str(best.finish_reason)))
        return results


def _context_of(config, tokenizer) -> int | None:
    """The model's context in tokens: config.max_position_embeddings, else the tokenizer's
    model_max_length unless that is transformers' "no limit" placeholder (~1e30)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    context = getattr(text_config, "max_position_embeddings", None)
    if context is None and 0 < getattr(tokenizer, "model_max_length", 0) < 1 << 40:
        context = tokenizer.model_max_length
    return int(context) if context else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ----------------------------------------------------------------------------- units


class UnitGenerator:
    """The work function: one unit's records to one Parquet part (same bytes every time)."""

    def __init__(self, cfg: Config, records: Records, tokenizer, engine, id_type,
                 stop: Callable[[], bool]):
        self.cfg, self.records, self.tokenizer = cfg, records, tokenizer
        self.engine, self.id_type, self.stop = engine, id_type, stop

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.cfg.chat_template:
            texts = [self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
                for text in texts]
        # A chat template writes its own BOS; a plain prompt gets the tokenizer's specials.
        return self.tokenizer(texts, add_special_tokens=not self.cfg.chat_template)["input_ids"]

    def __call__(self, unit: units.Unit, temp: Path) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        ids, texts = self.records.rows(unit.source, unit.start, unit.stop)
        prompts = self.encode(texts)
        context, new = self.engine.context, self.cfg.max_new_tokens
        skipped = [None if context is None or len(p) + new <= context else
                   f"prompt of {len(p):,} tokens + {new:,} new tokens exceeds the model's "
                   f"context of {context:,}" for p in prompts]
        todo = [i for i, reason in enumerate(skipped) if reason is None]
        done = self.engine.complete([prompts[i] for i in todo],
                                    [record_seed(self.cfg.seed, ids[i]) for i in todo],
                                    self.stop)
        completions: list[Completion | None] = [None] * len(ids)
        for i, completion in zip(todo, done, strict=True):
            completions[i] = completion
        columns = {
            self.cfg.id_column: pa.array(ids, type=self.id_type),
            "text": pa.array([c.text if c else None for c in completions], type=pa.string()),
            "prompt_tokens": pa.array([len(p) for p in prompts], type=pa.int32()),
            "completion_tokens": pa.array([len(c.token_ids) if c else 0 for c in completions],
                                          type=pa.int32()),
            "finish_reason": pa.array([c.finish_reason if c else "skipped"
                                       for c in completions], type=pa.string()),
            "skipped": pa.array(skipped, type=pa.string()),
        }
        stats = {"records": len(ids), "prompt_tokens": sum(len(p) for p in prompts),
                 "completion_tokens": sum(len(c.token_ids) for c in completions if c),
                 "skipped": sum(reason is not None for reason in skipped)}
        part = pa.table(columns).replace_schema_metadata(
            {units.STATS_KEY: json.dumps(stats, sort_keys=True)})
        # Plain sequential writes (MOUNT buckets refuse seeks), flushed and fsynced before
        # the commit renames it; no timestamps: the same bytes every time.
        with open(temp, "wb") as writer:
            pq.write_table(part, writer, compression="zstd")
            writer.flush()
            os.fsync(writer.fileno())
        return stats


def output_id_type(records: Records):
    """The input's id type; where files differ (int32 and int64, string and large_string),
    the wider one, so every part has one schema."""
    import pyarrow as pa

    kinds = {ds.data.table.schema.field(records.id_column).type
             for ds in records.datasets if len(ds)}
    if len(kinds) == 1:
        return kinds.pop()
    return pa.int64() if all(pa.types.is_integer(k) for k in kinds) else pa.large_string()


def summarize(settings: dict):
    def info(stats: list[dict]) -> dict:
        totals = {key: sum(s[key] for s in stats)
                  for key in ("records", "prompt_tokens", "completion_tokens", "skipped")}
        return {**settings, **totals}
    return info


# ----------------------------------------------------------------------------- main


def generate(cfg: Config) -> int:
    worker = units.worker_from(None if cfg.shard_index < 0 else cfg.shard_index,
                               None if cfg.num_shards < 1 else cfg.num_shards)
    output = units.Output(Path(cfg.output_dir), worker)
    # Bad input is found before the slow imports, and before anything is written.
    records = load_records(cfg.dataset, cfg.id_column, cfg.text_column)
    vllm = None
    if cfg.engine == "vllm":
        try:
            import vllm
        except ImportError as err:
            raise ConfigError("--engine vllm: vLLM is not installed here (GPU machines: pip "
                              "install vllm==0.33.0); use --engine transformers") from err

    import transformers

    transformers.logging.set_verbosity_error()
    try:
        config = transformers.AutoConfig.from_pretrained(cfg.model)
        tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model, padding_side="left")
        identity = model_identity(cfg.model, config)
    except Exception as err:  # offline, misspelt, gated: one line
        raise ConfigError(f"--model {cfg.model}: could not load: {_first_line(err)}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.chat_template and not tokenizer.chat_template:
        raise ConfigError(f"--chat-template: the tokenizer of --model {cfg.model} has no chat "
                          "template; drop --chat-template to give it the prompts as they are")
    dtype = cfg.dtype
    if cfg.engine == "transformers" and dtype == "auto":  # as TransformersEngine resolves it
        import torch

        cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        dtype = "bfloat16" if cuda else "float32"
    settings = {
        "model": identity, "tokenizer": tokenizer_digest(tokenizer, cfg.model),
        "engine": cfg.engine, "chat_template": cfg.chat_template,
        "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
        "top_p": cfg.top_p, "seed": cfg.seed, "batch_size": cfg.batch_size, "dtype": dtype,
        "id_column": cfg.id_column, "text_column": cfg.text_column}
    plan = units.plan_units(records.sources(), cfg.unit_rows)
    output.ensure_plan({
        "kind": "generate", "unit_rows": cfg.unit_rows, "units": len(plan),
        "sources": [{"name": name, "rows": rows} for name, rows in records.sources()],
        "settings": settings})
    if units.read_manifest(output.root) is not None:
        return report(output, "already complete")
    output.announce()

    if cfg.engine == "vllm":
        engine = VllmEngine(cfg, vllm)
    else:
        engine = TransformersEngine(cfg, tokenizer, config)
    if engine.context is not None and cfg.max_new_tokens >= engine.context:
        raise ConfigError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt "
                          f"in the model's context of {engine.context:,} tokens")
    log.info("%d units of up to %d records; worker %d of %d; %s engine, %s", len(plan),
             cfg.unit_rows, worker.rank, worker.num_workers, cfg.engine, dtype)

    env = skyenv.read()
    preemption = Preemption(env.cloud, poll_interval_s=cfg.notice_poll_seconds or 5.0,
                            poll=cfg.notice_poll_seconds > 0).install()
    committed = output.committed()
    progress = RunProgress(total_units=len(plan), done_units=len(committed),
                           total_records=len(records),
                           done_records=sum(u.rows for u in plan if u.index in committed),
                           desc=f"generate w{worker.rank}")
    work = UnitGenerator(cfg, records, tokenizer, engine, output_id_type(records),
                         stop=lambda: preemption.requested)
    try:
        outcome = units.run(output, plan, work, kind="generate", summarize=summarize(settings),
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
          f"{info['completion_tokens']:,} completion tokens, {info['skipped']:,} skipped "
          f"(prompt over the model's context; see the skipped column)")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return generate(parse_config(argv))
    except (ConfigError, DatasetError, units.UnitsError) as err:
        print(f"infer/generate.py: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"infer/generate.py: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
