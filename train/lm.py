"""Causal-LM pretraining or fine-tuning with Accelerate that survives spot preemptions.

    python -m skyspot.launch -- accelerate launch --multi_gpu --num_processes 8 train/lm.py \\
        --model Qwen/Qwen2.5-0.5B --dataset roneneldan/TinyStories \\
        --checkpoint-dir /checkpoints --max-steps 2000

What it guarantees:
- Checkpoints every --checkpoint-every-steps or --checkpoint-every-minutes (whichever comes
  first) into <checkpoint-dir>/<run-name>/step-N, crash-consistently (skyspot.checkpoint).
  A periodic checkpoint is skipped while the previous one is still being written or is not
  yet in the bucket, so the bucket stays within about one upload of the trainer.
- Resumes automatically from the newest checkpoint that verifies.
- On SIGTERM/SIGINT or a cloud preemption notice, all ranks save at the next optimizer
  step, commit, and exit 143 (skyspot.launch passes that through the launcher).
- Resume is bit-exact: with the same seed and world size, any number of interruptions
  (SIGTERM, or SIGKILL at any instant) ends with the same model.safetensors as an
  uninterrupted run on CPU.

Reads top to bottom: config -> build -> resume -> loop -> save.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Deterministic cuBLAS needs this before CUDA initialises (bit-exact resume on GPU).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from skyspot import PREEMPTED_EXIT_CODE, skyenv  # noqa: E402
from skyspot.checkpoint import Checkpointer, CheckpointError, Committed  # noqa: E402
from skyspot.events import EventLog  # noqa: E402
from skyspot.launch import mark_preempted  # noqa: E402
from skyspot.preemption import Preemption  # noqa: E402

log = logging.getLogger("train.lm")

# Consecutive skipped periodic checkpoints (previous one still uploading) before a warning.
SKIPS_BEFORE_WARNING = 10


# ----------------------------------------------------------------------------- config


@dataclass
class Config:
    # model and data
    model: str = field(default="", metadata={"help": "hub id or local dir (required)"})
    from_scratch: bool = field(default=False, metadata={"help": "random init from the config"})
    dataset: str = field(
        default="", metadata={"help": "hub id, or a local dir/file of .txt/.jsonl/.parquet"}
    )
    text_column: str = "text"
    # optimisation; global batch = batch_size * grad_accum * world_size sequences
    seq_len: int = field(default=512, metadata={"help": "tokens per sequence"})
    batch_size: int = field(default=8, metadata={"help": "sequences per device per micro-step"})
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    warmup_steps: int = 100
    max_steps: int = 1000
    seed: int = 0
    mixed_precision: str = field(default="no", metadata={"choices": ["no", "fp16", "bf16"]})
    # checkpoints
    checkpoint_dir: str = field(default="", metadata={"help": "usually a bucket mount (required)"})
    checkpoint_every_steps: int = 200
    checkpoint_every_minutes: float = field(default=0.0, metadata={"help": "0 disables"})
    keep_last: int = field(default=3, metadata={"help": "checkpoints kept; at least 2"})
    async_checkpoint: bool = field(default=False, metadata={"help": "write on a background thread"})
    save_while_uploading: bool = field(default=False, metadata={
        "help": "take every periodic checkpoint even while the previous one is still being "
                "written or uploaded (default: skip it, so the bucket never falls more than "
                "about one upload behind)"})
    run_name: str = field(default="", metadata={"help": "default: from SKYPILOT_MANAGED_JOB_ID"})
    resume_from: str = field(default="", metadata={"help": "a step-N dir; default: newest valid"})
    durable_wait_seconds: float = field(
        default=120.0, metadata={"help": "at exit, wait this long for the last checkpoint to "
                                 "reach the bucket (MOUNT_CACHED uploads after close)"})
    # output and logging
    output_dir: str = field(default="", metadata={"help": "default: <checkpoint-dir>/<run>/final"})
    log_every: int = field(default=10, metadata={"help": "optimizer steps between log lines"})
    notice_poll_seconds: float = field(
        default=5.0, metadata={"help": "cloud preemption-notice poll interval; 0 disables"}
    )


class ConfigError(Exception):
    """Bad input: reported as one line, exit 2, nothing touched."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="train/lm.py", description=__doc__.split("\n\n")[0],
                     epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=f.metadata.get("help"))
        else:
            parser.add_argument(flag, type={"int": int, "float": float}.get(f.type, str),
                                default=f.default, choices=f.metadata.get("choices"),
                                help=f"{f.metadata.get('help', '')} (default: {f.default!r})")
    return parser


def parse_config(argv: list[str] | None = None) -> Config:
    cfg = Config(**vars(build_parser().parse_args(argv)))
    for name in ("model", "dataset", "checkpoint_dir"):
        if not getattr(cfg, name):
            raise ConfigError(f"--{name.replace('_', '-')} is required")
    for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "checkpoint_every_steps",
                 "log_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.keep_last < 2:
        raise ConfigError(f"--keep-last must be at least 2 (got {cfg.keep_last}): the newest "
                          "checkpoint may be torn by a kill, the one before is the fallback")
    return cfg


# ----------------------------------------------------------------------------- data

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_text(name: str, column: str):
    import datasets

    path = Path(name)
    if path.exists():
        files = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.suffix in _LOADERS and p.is_file())
        kinds = {_LOADERS.get(p.suffix) for p in files}
        if not files or None in kinds or len(kinds) > 1:
            raise ConfigError(f"--dataset {name}: need .txt, .jsonl/.json or .parquet files "
                              "(one kind)")
        ds = datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train")
    elif _HUB_ID.match(name) and not name.startswith("."):
        try:
            ds = datasets.load_dataset(name, split="train")
        except Exception as err:  # offline, gated, misspelt: one line, not a traceback
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"--dataset {name}: could not load from the hub: {first}") from err
    else:
        raise ConfigError(f"--dataset {name}: no such file or directory")
    if column not in ds.column_names:
        raise ConfigError(f"--dataset {name} has no column {column!r} (columns: "
                          f"{', '.join(ds.column_names)}); pass --text-column")
    return ds


def pack(ds, tokenizer, column: str, seq_len: int) -> torch.Tensor:
    """Tokenize, append EOS to each document, concatenate, cut into [n, seq_len] blocks."""
    eos = tokenizer.eos_token_id
    ids = ds.map(lambda b: {"ids": [x + [eos] for x in tokenizer(b[column])["input_ids"]]},
                 batched=True, remove_columns=ds.column_names, desc="tokenizing")
    flat = list(itertools.chain.from_iterable(ids["ids"]))
    blocks = len(flat) // seq_len
    return torch.tensor(flat[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)


class ResumableSampler(torch.utils.data.Sampler):
    """This rank's micro-batches of one epoch, resumable at any micro-batch.

    The epoch's order is a permutation seeded by (seed, epoch) alone, so it does not depend
    on the global RNG or on how often the run was interrupted. Global micro-batches of
    batch_size * world_size indices are cut from it in order; rank r takes slice r.
    ``set_epoch(epoch, start)`` skips ``start`` micro-batches without loading them.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch_size, rank, world_size, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.n // (self.batch * self.world)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(
            self.seed * 100_003 + self.epoch)).tolist()
        for k in range(self.start, len(self)):
            first = (k * self.world + self.rank) * self.batch
            yield order[first : first + self.batch]


def micro_batches(loader, sampler: ResumableSampler, epoch: int, start: int):
    """Endless stream of (epoch, micro-batches consumed in that epoch, batch)."""
    while True:
        sampler.set_epoch(epoch, start)
        for batch in loader:
            start += 1
            yield epoch, start, batch
        epoch, start = epoch + 1, 0


# ----------------------------------------------------------------------------- state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def preflight_checkpoint_dir(run_dir: Path) -> None:
    """Fail now, in one line, if checkpoints can't be written, not after an hour of training."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--checkpoint-dir {run_dir.parent}: not writable "
                          f"({err.strerror or err})") from err


def publish(staging: Path, output_dir: Path) -> None:
    """Copy every file of ``staging`` into ``output_dir`` with plain sequential writes.

    save_pretrained can't write into a MOUNT bucket (goofys, gcsfuse, blobfuse2) directly:
    safetensors preallocates its file with ftruncate, which those mounts refuse (EPERM).
    A file that is already there (a previous attempt's) is overwritten whole. The caller
    stages in $TMPDIR, which needs room for one copy of the model on local disk.
    """
    for src in sorted(staging.rglob("*")):
        if not src.is_file():
            continue
        dst = output_dir / src.relative_to(staging)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as reader, open(dst, "wb") as writer:
            shutil.copyfileobj(reader, writer, 8 << 20)  # bytes per write
            writer.flush()
            os.fsync(writer.fileno())


# ----------------------------------------------------------------------------- main


def train(cfg: Config) -> int:
    env = skyenv.read()
    run_name = cfg.run_name or env.default_run_name()
    if not run_name:
        raise ConfigError("--run-name is required outside a SkyPilot managed job")
    run_dir = Path(cfg.checkpoint_dir) / run_name
    preflight_checkpoint_dir(run_dir)
    dataset = load_text(cfg.dataset, cfg.text_column)

    import transformers
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # --- build ---------------------------------------------------------------------
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                              cpu=not torch.cuda.is_available())
    main_process = accelerator.is_main_process
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    transformers.logging.set_verbosity_error()
    torch.use_deterministic_algorithms(True)
    set_seed(cfg.seed)
    world = accelerator.num_processes
    global_batch = cfg.batch_size * cfg.grad_accum * world  # sequences per optimizer step

    events = EventLog(run_dir, enabled=main_process)
    preemption = Preemption(env.cloud, poll_interval_s=cfg.notice_poll_seconds or 5.0,
                            poll=cfg.notice_poll_seconds > 0).install()

    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model)
    if cfg.from_scratch:
        model_config = transformers.AutoConfig.from_pretrained(cfg.model)
        model = transformers.AutoModelForCausalLM.from_config(model_config)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(cfg.model)
    with accelerator.main_process_first():
        blocks = pack(dataset, tokenizer, cfg.text_column, cfg.seq_len)
    sampler = ResumableSampler(len(blocks), cfg.batch_size, accelerator.process_index, world,
                               cfg.seed)
    if len(sampler) < 1:
        raise ConfigError(f"--dataset {cfg.dataset} gives {len(blocks)} blocks of {cfg.seq_len} "
                          f"tokens; one micro-step needs {cfg.batch_size * world}")
    # A generator of its own keeps the DataLoader from drawing its base seed from the
    # global RNG, which a resume restores and an uninterrupted run does not re-draw.
    loader = torch.utils.data.DataLoader(blocks, batch_sampler=sampler,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Not passed to prepare(): Accelerate's scheduler wrapper steps once per process, which
    # would make the schedule depend on the world size.
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps,
                                                             cfg.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    def on_commit(saved: Committed) -> None:
        # How far the bucket lags what this node wrote (MOUNT_CACHED uploads after close).
        lag = saved.step - saved.durable_step if saved.durable_step is not None else None
        log.info("checkpoint step %d: %.1f MB in %.2fs%s -> %s; in the bucket (%s): %s",
                 saved.step, saved.bytes / 1e6, saved.seconds,
                 " (async)" if saved.async_save else "", saved.path, saved.durability,
                 f"step {saved.durable_step} ({lag} steps behind)" if lag is not None else "none")
        events.emit("checkpoint", step=saved.step, path=str(saved.path), seconds=saved.seconds,
                    bytes=saved.bytes, durable_step=saved.durable_step, lag_steps=lag,
                    **{"async": saved.async_save})

    checkpointer = Checkpointer(run_dir, keep_last=cfg.keep_last,
                                async_save=cfg.async_checkpoint, on_commit=on_commit)

    # --- resume --------------------------------------------------------------------
    step, epoch, consumed, tokens = 0, 0, 0, 0
    resume = checkpointer.resume_point(Path(cfg.resume_from) if cfg.resume_from else None)
    if resume is not None:
        meta = resume.meta
        if resume.manifest["world_size"] != world or meta["global_batch"] != global_batch:
            raise CheckpointError(
                f"checkpoint {resume.path} was written with world size "
                f"{resume.manifest['world_size']} (global batch {meta['global_batch']}); this run "
                f"has world size {world} (global batch {global_batch}). Elastic resume is not "
                "supported yet: relaunch with the same number of processes, or use a new "
                "--run-name")
        accelerator.unwrap_model(model).load_state_dict(resume.load("model.pt"))
        optimizer.load_state_dict(resume.load("optimizer.pt"))
        scheduler.load_state_dict(resume.load("scheduler.pt"))
        step, epoch, consumed, tokens = (meta[k] for k in ("step", "epoch", "consumed", "tokens"))
    stream = micro_batches(loader, sampler, epoch, consumed)
    if resume is not None:
        # After building the stream: nothing between here and the first batch may draw
        # from the global RNG that an uninterrupted run would not draw from.
        set_rng_state(resume.load(f"rng-rank{accelerator.process_index}.pt"))
        events.emit("resumed", step=step, path=str(resume.path))
        log.info("resumed from %s (step %d)", resume.path, step)
    events.emit("start", run_name=run_name, world_size=world, step=step,
                global_batch=global_batch, pid=os.getpid())

    def save(at_step: int) -> None:
        files = {f"rng-rank{accelerator.process_index}.pt": rng_state()}
        if main_process:
            files["model.pt"] = accelerator.get_state_dict(model)
            files["optimizer.pt"] = optimizer.state_dict()
            files["scheduler.pt"] = scheduler.state_dict()
        events.flush()  # everything up to this save reaches the bucket before its manifest
        checkpointer.save(at_step, files, meta={
            "step": at_step, "epoch": epoch, "consumed": consumed, "tokens": tokens,
            "global_batch": global_batch, "seed": cfg.seed, "run_name": run_name})

    # --- loop ----------------------------------------------------------------------
    tokens_per_step = global_batch * cfg.seq_len
    last_save, window_start, window_steps = time.monotonic(), time.monotonic(), 0
    skipped_in_a_row = 0  # periodic saves skipped since the last one taken
    running_loss = torch.zeros((), device=accelerator.device)
    progress = None
    if main_process and sys.stderr.isatty():
        from tqdm import tqdm
        progress = tqdm(total=cfg.max_steps, initial=step, unit="step", dynamic_ncols=True)
    model.train()
    while step < cfg.max_steps:
        for micro in range(cfg.grad_accum):
            epoch, consumed, batch = next(stream)
            batch = batch.to(accelerator.device)
            # Gradients are all-reduced only on the last micro-step of an optimizer step.
            sync = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                loss = model(input_ids=batch, labels=batch).loss / cfg.grad_accum
                accelerator.backward(loss)
            running_loss += loss.detach()
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        window_steps += 1
        events.emit("step", step=step, persist=False)
        if progress is not None:
            progress.update(1)

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            mean_loss = accelerator.reduce(running_loss, reduction="mean").item() / window_steps
            elapsed = time.monotonic() - window_start
            rate = window_steps * tokens_per_step / max(elapsed, 1e-9)
            lr = scheduler.get_last_lr()[0]
            log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", step, cfg.max_steps, mean_loss,
                     lr, rate)
            events.emit("log", step=step, loss=round(mean_loss, 5), lr=lr,
                        tokens_per_s=round(rate, 1))
            if progress is not None:
                progress.set_postfix(loss=f"{mean_loss:.3f}")
            running_loss.zero_()
            window_start, window_steps = time.monotonic(), 0

        # One all-reduce per optimizer step: every rank acts on the same flags, because
        # signals, notices and clocks differ between ranks.
        minutes_due = (cfg.checkpoint_every_minutes > 0 and
                       time.monotonic() - last_save >= cfg.checkpoint_every_minutes * 60)
        preempted, minutes_due = checkpointer.at_step_boundary(preemption.requested, minutes_due)
        if preempted or step == cfg.max_steps:
            save(step)
        elif minutes_due or step % cfg.checkpoint_every_steps == 0:
            # A periodic save while the previous one is still uploading would queue behind
            # it and share its bandwidth: the bucket would fall further behind, not catch up.
            # Skip it; the next trigger tries again.
            backlog = None if cfg.save_while_uploading else checkpointer.backlog()
            if backlog is None:
                save(step)
                skipped_in_a_row = 0
            else:
                skipped_in_a_row += 1
                log.info("skipping the checkpoint at step %d: %s", step, backlog)
                events.emit("checkpoint_skipped", step=step, reason=backlog)
                if skipped_in_a_row % SKIPS_BEFORE_WARNING == 0:
                    log.warning("%d periodic checkpoints in a row skipped: uploads to the "
                                "bucket are not keeping up (slow or failing; see the mount's "
                                "rclone log). Checkpoint less often, or pass "
                                "--save-while-uploading to queue them anyway", skipped_in_a_row)
            last_save = time.monotonic()
        if preempted:
            checkpointer.wait()
            mark_preempted()  # committed: from here on the job must read as preempted
            events.emit("preemption", reason=preemption.reason or "peer rank", step=step,
                        notice=preemption.notice_detail)
            durable = checkpointer.wait_durable(cfg.durable_wait_seconds)
            events.emit("exit", code=PREEMPTED_EXIT_CODE, step=step, durable_step=durable)
            events.close()
            log.info("preempted (%s): checkpoint at step %d committed; exiting %d",
                     preemption.reason or "peer rank", step, PREEMPTED_EXIT_CODE)
            return PREEMPTED_EXIT_CODE

    # --- save ----------------------------------------------------------------------
    checkpointer.wait()
    durable = checkpointer.wait_durable(cfg.durable_wait_seconds)
    if progress is not None:
        progress.close()
    output_dir = Path(cfg.output_dir) if cfg.output_dir else run_dir / "final"
    accelerator.wait_for_everyone()
    if main_process:
        with tempfile.TemporaryDirectory(prefix="skyspot-final-") as staging:
            accelerator.unwrap_model(model).save_pretrained(
                staging, state_dict=accelerator.get_state_dict(model), safe_serialization=True)
            tokenizer.save_pretrained(staging)
            publish(Path(staging), output_dir)
        log.info("saved the final model and tokenizer to %s", output_dir)
    events.emit("exit", code=0, step=step, output_dir=str(output_dir), durable_step=durable)
    events.close()
    preemption.close()
    accelerator.end_training()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        return train(cfg)
    except (ConfigError, CheckpointError) as err:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"train/lm.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
