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
  uninterrupted run on CPU, with and without --fsdp.
- --fsdp shards the weights, gradients and optimizer state (FSDP2). Every rank writes its
  own shard file of each checkpoint (skyspot.sharded); rank 0's manifest, written last,
  lists all of them, and a checkpoint with a torn shard on any rank is skipped by every
  rank. Only the final model is gathered (on rank 0, in the Hugging Face layout).
- --elastic --global-batch N resumes onto another number of processes: the state is
  resharded, grad-accum becomes N / (batch size x processes) (refused in one line when it
  does not divide), and the data goes on from the same global sample, so each optimizer
  step takes the same sequences as on the old world size and every sequence is seen once
  per epoch. Not bit-exact across the change (gradients are summed in another order).
- A nan/inf loss or gradient norm is caught before the optimizer step, on every rank alike:
  the step is skipped (--skip-nonfinite-steps) or the run stops with one line and exit 3.
  No checkpoint and no final model ever holds nan/inf.
- A full disk or a read-only mount ends the run with one line naming the path; the
  committed checkpoints and a previous final model stay whole.
- The data is never held in RAM whole. --dataset is raw text, tokenized by one process per
  node into a memory-mapped token file in $TMPDIR (4 bytes per token), or the output dir of
  preprocess/tokenize.py, read in place (skyspot.packed); one made with another tokenizer
  or --seq-len, or not finished, is refused in one line before the model is built.

Reads top to bottom: config -> build -> resume -> loop -> save.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import json
import logging
import math
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
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor  # noqa: E402

from skyspot import PREEMPTED_EXIT_CODE, packed, sharded, skyenv  # noqa: E402
from skyspot.checkpoint import (  # noqa: E402
    MANIFEST,
    Checkpointer,
    CheckpointError,
    CheckpointWriteError,
    Committed,
    NonFiniteState,
    describe_os_error,
    step_dirs,
)
from skyspot.divergence import nan_faults, nan_weight_faults, nonfinite_at_step  # noqa: E402
from skyspot.events import EventLog  # noqa: E402
from skyspot.launch import mark_preempted  # noqa: E402
from skyspot.lease import RunLease  # noqa: E402
from skyspot.preemption import Preemption  # noqa: E402
from skyspot.settings import (  # noqa: E402
    Change,
    SettingsError,
    changed_settings,
    likely_resume_point,
    parse_allowed,
    record_settings,
    refuse_unallowed,
)
from skyspot.textdata import DatasetError, dataset_files, load_text  # noqa: E402

log = logging.getLogger("train.lm")

# Consecutive skipped periodic checkpoints (previous one still uploading) before a warning.
SKIPS_BEFORE_WARNING = 10
# Exit codes besides 0, 2 (bad input or an unusable checkpoint) and 143 (preempted, saved):
# the loss or gradients became nan/inf (not 143: a recovery would only diverge again), and
# a failure of the environment such as a full disk or a read-only mount.
DIVERGED_EXIT_CODE = 3
IO_ERROR_EXIT_CODE = 1
# Tests only: a directory where every rank appends, per micro-batch, the optimizer step it
# feeds and the indices of its sequences (JSON lines), so a test can count every sample.
TRACE_SAMPLES_ENV = "SKYSPOT_TRACE_SAMPLES"


# ----------------------------------------------------------------------------- config


@dataclass
class Config:
    # model and data
    model: str = field(default="", metadata={"help": "hub id or local dir (required)"})
    from_scratch: bool = field(default=False, metadata={"help": "random init from the config"})
    dataset: str = field(
        default="", metadata={"help": "hub id, a local dir/file of .txt/.jsonl/.parquet, or "
                                      "a preprocess/tokenize.py output dir"}
    )
    text_column: str = "text"
    # optimisation; global batch = batch_size * grad_accum * world_size sequences
    seq_len: int = field(default=512, metadata={"help": "tokens per sequence"})
    batch_size: int = field(default=8, metadata={"help": "sequences per device per micro-step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step; "
                                                 "derived when --global-batch is given"})
    global_batch: int = field(default=0, metadata={
        "help": "sequences per optimizer step, kept on any world size: --grad-accum becomes "
                "global batch / (--batch-size x processes), which must divide evenly. "
                "0: --batch-size x --grad-accum x processes"})
    fsdp: bool = field(default=False, metadata={
        "help": "shard the weights, gradients and optimizer state over the processes "
                "(torch FSDP2 fully_shard, one unit per decoder layer); every process writes "
                "its own shard of each checkpoint"})
    elastic: bool = field(default=False, metadata={
        "help": "allow a resume onto another number of processes: the global batch and the "
                "position in the data (in samples) are kept and the state is resharded. Set "
                "it from the first launch: it fixes the epoch to whole global batches"})
    lr: float = 3e-4
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    skip_nonfinite_steps: int = field(default=0, metadata={
        "help": "skip an optimizer step whose loss or gradient norm is nan/inf (no update, "
                "not counted; its data is not retried), up to N in a row; past that, or with "
                "0, the run stops with exit 3 and saves nothing of the bad step"})
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
    allow_config_change: list[str] = field(default_factory=list, metadata={
        "help": "resume although this setting differs from the checkpoint's, and apply it "
                "(repeatable, or comma-separated: lr,weight-decay); without it a changed "
                "setting is refused"})
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
        elif f.type == "list[str]":
            parser.add_argument(flag, action="append", default=None, metavar="NAME",
                                help=f.metadata.get("help"))
        else:
            parser.add_argument(flag, type={"int": int, "float": float}.get(f.type, str),
                                default=f.default, choices=f.metadata.get("choices"),
                                help=f"{f.metadata.get('help', '')} (default: {f.default!r})")
    return parser


def parse_config(argv: list[str] | None = None) -> Config:
    args = vars(build_parser().parse_args(argv))
    args["allow_config_change"] = parse_allowed(args["allow_config_change"] or [], SETTINGS)
    cfg = Config(**args)
    for name in ("model", "dataset", "checkpoint_dir"):
        if not getattr(cfg, name):
            raise ConfigError(f"--{name.replace('_', '-')} is required")
    for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "checkpoint_every_steps",
                 "log_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    for name, (low, low_ok, high) in _RANGES.items():
        value = getattr(cfg, name)
        allowed = (f"between {low} and {high}" if high is not None
                   else f"{'>=' if low_ok else '>'} {low}")
        if not math.isfinite(value):
            raise ConfigError(f"{_flag(name)} must be a finite number {allowed} (got {value})")
        if value < low or (value == low and not low_ok) or (high is not None and value > high):
            raise ConfigError(f"{_flag(name)} must be {allowed} (got {value})")
    if cfg.elastic and not cfg.global_batch:
        raise ConfigError("--elastic needs --global-batch N: the number of sequences per "
                          "optimizer step that it keeps on every number of processes")
    if cfg.fsdp and cfg.mixed_precision == "fp16":
        raise ConfigError("--fsdp takes --mixed-precision bf16 or no, not fp16 (sharded "
                          "gradients have no loss scaler here): use bf16")
    if cfg.keep_last < 2:
        raise ConfigError(f"--keep-last must be at least 2 (got {cfg.keep_last}): the newest "
                          "checkpoint may be torn by a kill, the one before is the fallback")
    return cfg


# Settings that alter the math of a run. Every checkpoint records them (meta["config"]); a
# resume whose value differs is refused unless --allow-config-change names the setting
# (skyspot.settings).
SETTINGS = ("model", "dataset", "text_column", "seq_len", "batch_size", "grad_accum",
            "global_batch", "elastic", "lr", "warmup_steps", "max_steps", "weight_decay",
            "max_grad_norm", "seed", "mixed_precision")

# Allowed values of the numeric flags not checked for >= 1 above: name -> (lowest, whether
# the lowest itself is allowed, highest or None). Every float flag is here (nan and inf
# are refused); numpy, seeded by accelerate's set_seed, takes a 32-bit seed.
_RANGES = {
    "lr": (0, False, None), "weight_decay": (0, True, None), "max_grad_norm": (0, False, None),
    "warmup_steps": (0, True, None), "seed": (0, True, 2**32 - 1),
    "checkpoint_every_minutes": (0, True, None), "durable_wait_seconds": (0, True, None),
    "notice_poll_seconds": (0, True, None), "skip_nonfinite_steps": (0, True, None),
    "global_batch": (0, True, None),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def set_global_batch(cfg: Config, world: int) -> None:
    """With --global-batch, make cfg.grad_accum the run's on ``world`` processes: global
    batch / (batch size x world), refused in one line naming what would divide evenly when
    it does not (never rounded: that would change the global batch silently). Without it,
    the global batch is batch size x grad-accum x world, as given."""
    if not cfg.global_batch:
        return
    per_micro_step = cfg.batch_size * world
    if cfg.global_batch % per_micro_step:
        worlds = [w for w in range(1, cfg.global_batch // cfg.batch_size + 1)
                  if cfg.global_batch % (cfg.batch_size * w) == 0]
        batches = [b for b in range(1, cfg.global_batch // world + 1)
                   if cfg.global_batch % (b * world) == 0]
        raise ConfigError(
            f"--global-batch {cfg.global_batch} is not divisible by --batch-size "
            f"{cfg.batch_size} x {world} processes = {per_micro_step}: process counts that "
            f"keep it with --batch-size {cfg.batch_size}: {_listed(worlds)}; --batch-size "
            f"values that keep it on {world} processes: {_listed(batches)}")
    derived = cfg.global_batch // per_micro_step
    if cfg.grad_accum not in (1, derived):
        raise ConfigError(f"--grad-accum {cfg.grad_accum} contradicts --global-batch "
                          f"{cfg.global_batch} on {world} processes of --batch-size "
                          f"{cfg.batch_size} (that is --grad-accum {derived}): drop --grad-accum")
    cfg.grad_accum = derived


def _listed(values: list[int]) -> str:
    return ", ".join(map(str, values)) if values else "none"


def check_resume(cfg: Config, path: Path, step: int, manifest: dict, world: int,
                 ) -> list[Change] | None:
    """Refuse to resume from checkpoint ``path`` (at ``step``) in a way that would change
    the run silently: a --max-steps below its step (even if allowed), another world size
    unless the run is --elastic from its first launch, sharded state without --fsdp (or
    the reverse), or a setting that differs from the one it recorded and
    --allow-config-change does not name (SettingsChanged). One line each. ``cfg`` holds
    grad-accum for ``world`` (set_global_batch). Returns the accepted changes, or None for
    a checkpoint written before settings were recorded (only the global batch is
    checked)."""
    meta = manifest.get("meta") or {}
    if cfg.max_steps < step:
        raise ConfigError(f"--max-steps {cfg.max_steps} is below step {step} of checkpoint "
                          f"{path}, which this run resumes from; pass --max-steps {step} or "
                          "more, or use a new --run-name")
    global_batch = cfg.batch_size * cfg.grad_accum * world
    recorded = meta.get("config")
    if manifest["world_size"] != world and not (
            cfg.elastic and isinstance(recorded, dict) and recorded.get("elastic")):
        raise CheckpointError(
            f"checkpoint {path} was written with world size "
            f"{manifest['world_size']} (global batch {meta.get('global_batch')}); this run "
            f"has world size {world} (global batch {global_batch}). Relaunch with "
            f"{manifest['world_size']} processes, or use a new --run-name; to resume onto "
            "another number of processes, launch the run with --elastic --global-batch N "
            "from the start")
    if bool(meta.get("sharded")) != cfg.fsdp:
        raise ConfigError(
            f"checkpoint {path} holds {'sharded' if meta.get('sharded') else 'unsharded'} "
            f"state; this run {'shards' if cfg.fsdp else 'does not shard'} it: relaunch "
            f"{'with' if meta.get('sharded') else 'without'} --fsdp, or use a new --run-name")
    if not isinstance(recorded, dict):
        if meta.get("global_batch") != global_batch:
            raise CheckpointError(
                f"checkpoint {path} was written with global batch {meta.get('global_batch')} "
                f"(--batch-size x --grad-accum x world size {world}); this run has "
                f"{global_batch}: relaunch with the checkpoint's --batch-size and "
                "--grad-accum, or use a new --run-name")
        return None
    current = record_settings(cfg, SETTINGS)
    if cfg.elastic:  # derived from the global batch, on each world size anew
        current.pop("grad_accum")
    # --model and --dataset may name a local path: one named two ways is no change.
    changes = changed_settings(recorded, current, paths=("model", "dataset"))
    refuse_unallowed(changes, cfg.allow_config_change, path)
    return changes


def check_resume_early(cfg: Config, run_dir: Path) -> None:
    """check_resume before anything is loaded, built or written, against the checkpoint the
    run will most likely resume from: its newest one whose manifest is well formed and whose
    files have the listed sizes, else --resume-from. Checksums are verified only when the
    resume point is chosen, after the build, and check_resume runs again there on that one."""
    likely = likely_resume_point(run_dir, Path(cfg.resume_from) if cfg.resume_from else None)
    if likely is not None:
        path, manifest = likely
        world = int(os.environ.get("WORLD_SIZE") or 1)  # as torchrun/accelerate set it
        check_resume(cfg, path, manifest["step"], manifest, world)


def apply_setting_changes(changes: list[Change], cfg: Config, scheduler,
                          recorded: dict, cursor: int) -> int:
    """Make the accepted changes hold from the first resumed step, after the optimizer's and
    scheduler's state were loaded; returns the sequences of the epoch already consumed.

    That state carries the checkpoint's lr and weight decay (scheduler.base_lrs, each
    group's initial_lr, lr and weight_decay): they are set from cfg, and the lr of the step
    about to run is recomputed with the schedule, which is built from cfg's warmup and max
    steps. A --batch-size or --seq-len change keeps the position in the epoch in tokens, not
    micro-batches (the caller turns sequences into micro-batches of the new size). The
    rest (data, model, the seed of the data order, precision, clipping, accumulation) is
    built from cfg already."""
    names = {name for name, _, _ in changes}
    if names & {"lr", "weight_decay", "warmup_steps", "max_steps"}:
        groups = scheduler.optimizer.param_groups
        scheduler.base_lrs = [cfg.lr] * len(groups)
        for group, schedule in zip(groups, scheduler.lr_lambdas, strict=True):
            group["initial_lr"] = cfg.lr
            group["weight_decay"] = cfg.weight_decay
            group["lr"] = cfg.lr * schedule(scheduler.last_epoch)  # as LambdaLR.get_lr
        scheduler._last_lr = [group["lr"] for group in groups]
    if "seq_len" in names:
        cursor = cursor * recorded["seq_len"] // cfg.seq_len
    return cursor


# ----------------------------------------------------------------------------- data


class ResumableSampler(torch.utils.data.Sampler):
    """This rank's micro-batches of one epoch, resumable at any micro-batch.

    The epoch's order is a permutation seeded by (seed, epoch) alone, so it does not depend
    on the global RNG, on the world size or on how often the run was interrupted. Global
    micro-batches of batch_size * world_size indices are cut from it in order; rank r takes
    slice r. So after c sequences of the epoch (the global cursor), the next optimizer step
    takes the next global_batch of the order on any world size whose micro-batches divide
    it. ``epoch_size`` (sequences) cuts the epoch: to whole global batches for --elastic,
    so that every world size sees the same sequences in the same optimizer steps.
    ``set_epoch(epoch, start)`` skips ``start`` micro-batches without loading them;
    ``last`` holds the indices of the micro-batch yielded last.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int,
                 epoch_size: int | None = None):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch_size, rank, world_size, seed
        self.epoch_size = n if epoch_size is None else epoch_size
        self.epoch, self.start = 0, 0
        self.last: list[int] = []

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.epoch_size // (self.batch * self.world)

    def __iter__(self) -> Iterator[list[int]]:
        # A tensor, 8 B per sequence; only a micro-batch at a time becomes Python ints
        # (~36 B each).
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(
            self.seed * 100_003 + self.epoch))
        for k in range(self.start, len(self)):
            first = (k * self.world + self.rank) * self.batch
            self.last = order[first : first + self.batch].tolist()
            yield self.last


def micro_batches(loader, sampler: ResumableSampler, epoch: int, start: int):
    """Endless stream of (epoch, micro-batches consumed in that epoch, batch)."""
    while True:
        sampler.set_epoch(epoch, start)
        for batch in loader:
            start += 1
            yield epoch, start, batch
        epoch, start = epoch + 1, 0


# ----------------------------------------------------------------------------- state


def shard_model(model, device: torch.device, mixed_precision: str) -> None:
    """FSDP2 (torch's fully_shard, which Accelerate's FSDP2 plugin also calls): one unit per
    decoder layer, whose full weights exist only during its own forward and backward, then
    the root (embeddings, final norm, head). Every rank holds 1/world of the weights, the
    gradients and AdamW's moments. bf16 computes in bf16 and keeps the weights, the
    gradient reduction and the optimizer state in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision == "bf16" else MixedPrecisionPolicy())
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in layer_classes]
    if not layers:
        raise ConfigError(f"--fsdp: {type(model).__name__} names no decoder-layer class "
                          "(_no_split_modules) to shard by; train it without --fsdp")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def sharded_state(model, optimizer) -> dict:
    """This rank's shards of the model's and the optimizer's state (DTensors, the live
    tensors, not copies), keyed as DCP saves and loads them."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


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


def resume_needs(manifest: dict) -> list[str]:
    """The files a resume reads; a manifest that lists fewer, or lacks the position in the
    data, is not this trainer's checkpoint and is skipped (skyspot.checkpoint.verify)."""
    meta = manifest["meta"]
    absent = [key for key in ("step", "epoch", "consumed", "tokens", "global_batch")
              if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool)]
    if absent:
        raise ValueError(f"meta has no integer {', '.join(absent)}")
    ext = state_file_ext(manifest)
    ranks = [f"rng-rank{rank}{ext}" for rank in range(manifest["world_size"])]
    if meta.get("sharded"):  # --fsdp: every rank's shard of the model and optimizer
        return [*sharded.files_of(manifest["world_size"]), f"scheduler{ext}", *ranks]
    return [f"model{ext}", f"optimizer{ext}", f"scheduler{ext}", *ranks]


def state_file_ext(manifest: dict) -> str:
    """".safetensors", or ".pt" for a checkpoint written before skyspot's checkpoints moved
    to safetensors (torch.save files): both are read."""
    listed = {entry.get("path") for entry in manifest.get("files", [])
              if isinstance(entry, dict)}
    return ".pt" if "model.pt" in listed and "model.safetensors" not in listed else (
        ".safetensors")


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
    """Copy every file of ``staging`` into ``output_dir``. No final name ever holds a partial
    file, and a publish that fails leaves what was there (a previous attempt's model) whole.

    save_pretrained can't write into a MOUNT bucket (goofys, gcsfuse, blobfuse2) directly:
    safetensors preallocates its file with ftruncate, which those mounts refuse (EPERM). So
    each file is copied with plain sequential writes to a temporary name next to its final
    one (``.<name>.tmp-<pid>``) and fsynced; once every file is written, each is renamed onto
    its final name (on a bucket a rename is copy + delete, which still never shows a partial
    object under the final name). On a failure (a full disk, a read-only mount) the temporary
    files are removed and the OSError is raised, naming the final path. The caller stages in
    $TMPDIR, which needs room for one copy of the model on local disk; ``output_dir`` needs
    room for the new copy next to a previous one.
    """
    written: list[tuple[Path, Path]] = []  # (temporary, final)
    try:
        for src in sorted(staging.rglob("*")):
            if not src.is_file():
                continue
            dst = output_dir / src.relative_to(staging)
            tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
            with _named(dst, tmp):
                dst.parent.mkdir(parents=True, exist_ok=True)
                with open(src, "rb") as reader, open(tmp, "wb") as writer:
                    written.append((tmp, dst))
                    shutil.copyfileobj(reader, writer, 8 << 20)  # bytes per write
                    writer.flush()
                    os.fsync(writer.fileno())
        for tmp, dst in written:
            with _named(dst, tmp):
                os.replace(tmp, dst)
    except BaseException:
        for tmp, _ in written:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _named(dst: Path, tmp: Path):
    """An OSError about ``tmp``, or about no file (a write() that hits ENOSPC names none),
    is reported as one about ``dst``: the name the user knows."""
    try:
        yield
    except OSError as err:
        if err.filename is None or str(err.filename) == str(tmp):
            err.filename, err.filename2 = str(dst), None
        raise


class Diverged(Exception):
    """The loss, the gradients or the weights became nan/inf: one line, exit 3."""


class IOFailure(Exception):
    """A write failed for a reason of the environment (a full disk, a read-only mount): one
    line naming the path, what happened and what to do; exit 1."""


@contextlib.contextmanager
def io_errors(path: Path, where: str):
    """Writes inside that fail with an OSError raise IOFailure (see describe_os_error)."""
    try:
        yield
    except OSError as err:
        raise IOFailure(describe_os_error(err, path, where)) from err


def wrapped_os_error(err: Exception, path: Path) -> OSError | None:
    """The OS error that a library reports in its message only: safetensors raises
    SafetensorError('Error while serializing: I/O error: No space left on device (os error
    28)') on a full disk."""
    match = re.search(r"\(os error (\d+)\)", str(err))
    return OSError(int(match[1]), os.strerror(int(match[1])), str(path)) if match else None


def newest_committed(run_dir: Path) -> Path | None:
    """The newest checkpoint directory with a manifest. Not verified again: on a bucket
    mount that would download it, and only an error message needs it."""
    for _, _, path in step_dirs(run_dir):
        if (path / MANIFEST).exists():
            return path
    return None


# ----------------------------------------------------------------------------- main


def train(cfg: Config) -> int:
    env = skyenv.read()
    run_name = cfg.run_name or env.default_run_name()
    if not run_name:
        raise ConfigError("--run-name is required outside a SkyPilot managed job")
    run_dir = Path(cfg.checkpoint_dir) / run_name

    def run_dir_errors():  # a write into the run dir that fails is one line (IOFailure)
        return io_errors(run_dir, f"the checkpoint dir {run_dir}")

    # A preprocess/ output is checked by its manifest now (a stat of each part, no more).
    preprocessed = (packed.open_packed(cfg.dataset, cfg.seq_len)
                    if packed.looks_preprocessed(cfg.dataset) else None)
    if preprocessed is None:
        dataset_files(cfg.dataset)  # a missing dataset is that, not a changed --dataset
    # The global batch on this many processes (a world size that can't keep it is refused).
    set_global_batch(cfg, int(os.environ.get("WORLD_SIZE") or 1))  # as accelerate sets it
    check_resume_early(cfg, run_dir)  # refused now, it costs nothing and touches nothing
    preflight_checkpoint_dir(run_dir)
    # One writer per run (a second launch, a zombie from a lost node): refused here, before
    # it writes anything. Global rank 0 holds the lease; released at exit, however it exits.
    lease = RunLease(run_dir) if int(os.environ.get("RANK", "0")) == 0 else None
    if lease is not None:
        lease.acquire()
        atexit.register(lease.release)
    text = load_text(cfg.dataset, cfg.text_column) if preprocessed is None else None

    import transformers
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model)
    if preprocessed is not None:  # before anything is built
        preprocessed.check_tokenizer(tokenizer, cfg.model)

    # --- build ---------------------------------------------------------------------
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                              cpu=not torch.cuda.is_available())
    main_process = accelerator.is_main_process
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.use_deterministic_algorithms(True)
    set_seed(cfg.seed)
    world = accelerator.num_processes
    global_batch = cfg.batch_size * cfg.grad_accum * world  # sequences per optimizer step
    if cfg.fsdp and world == 1 and not torch.distributed.is_initialized():
        # FSDP2 shards over a process group, even a group of one (python train/lm.py).
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(),
                                             rank=0, world_size=1)

    events = EventLog(run_dir, enabled=main_process)
    preemption = Preemption(env.cloud, poll_interval_s=cfg.notice_poll_seconds or 5.0,
                            poll=cfg.notice_poll_seconds > 0).install()

    if cfg.from_scratch:
        model_config = transformers.AutoConfig.from_pretrained(cfg.model)
        model = transformers.AutoModelForCausalLM.from_config(model_config)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(cfg.model)
    sequences = preprocessed
    if sequences is None:
        # One process per node tokenizes, into a flat token file in node-local $TMPDIR
        # (4 bytes per token); every rank of the node memory-maps it. Once all have, it is
        # unlinked: the mappings keep it readable, and its disk space returns when the last
        # rank exits, however it exits.
        tokens = packed.token_file(run_dir, cfg.dataset, tokenizer, cfg.model,
                                   cfg.text_column, cfg.seq_len)
        with accelerator.local_main_process_first():
            sequences = packed.TokenBlocks(
                packed.tokenize_to_memmap(text, tokenizer, cfg.text_column, cfg.seq_len, tokens)
                if accelerator.is_local_main_process else packed.open_tokens(tokens, cfg.seq_len))
        accelerator.wait_for_everyone()
        if accelerator.is_local_main_process:
            tokens.unlink(missing_ok=True)
    # --elastic: the epoch is whole global batches, the same on every world size.
    epoch_size = len(sequences) // global_batch * global_batch if cfg.elastic else None
    sampler = ResumableSampler(len(sequences), cfg.batch_size, accelerator.process_index, world,
                               cfg.seed, epoch_size)
    if len(sampler) < 1:
        needs = (f"one optimizer step needs {global_batch}" if cfg.elastic
                 else f"one micro-step needs {cfg.batch_size * world}")
        raise ConfigError(f"--dataset {cfg.dataset} gives {len(sequences)} blocks of "
                          f"{cfg.seq_len} tokens; {needs}")
    # A generator of its own keeps the DataLoader from drawing its base seed from the
    # global RNG, which a resume restores and an uninterrupted run does not re-draw.
    loader = torch.utils.data.DataLoader(sequences, batch_sampler=sampler,
                                         collate_fn=packed.batch_as_is,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.fsdp:
        shard_model(model, accelerator.device, cfg.mixed_precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Not passed to prepare(): Accelerate's scheduler wrapper steps once per process, which
    # would make the schedule depend on the world size.
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps,
                                                             cfg.max_steps)
    if not cfg.fsdp:
        # DDP. (FSDP is not prepared: Accelerate's FSDP plugin is not used on CPU, where
        # accelerate runs gloo ranks as MULTI_CPU and would wrap the model in DDP again.)
        model, optimizer = accelerator.prepare(model, optimizer)

    def on_commit(saved: Committed) -> None:
        # How far the bucket lags what this node wrote (MOUNT_CACHED uploads after close).
        lag = saved.step - saved.durable_step if saved.durable_step is not None else None
        log.info("checkpoint step %d: %.1f MB in %.2fs%s, the loop waited %.3fs%s -> %s; in "
                 "the bucket (%s): %s", saved.step, saved.bytes / 1e6, saved.seconds,
                 " (async)" if saved.async_save else "", saved.stall_seconds,
                 f" ({saved.snapshot_wait_seconds:.3f}s of it for the snapshot)"
                 if saved.snapshot_wait_seconds else "", saved.path, saved.durability,
                 f"step {saved.durable_step} ({lag} steps behind)" if lag is not None else "none")
        events.emit("checkpoint", step=saved.step, path=str(saved.path), seconds=saved.seconds,
                    bytes=saved.bytes, durable_step=saved.durable_step, lag_steps=lag,
                    stall_seconds=round(saved.stall_seconds, 4),
                    snapshot_wait_seconds=round(saved.snapshot_wait_seconds, 4),
                    **{"async": saved.async_save})

    # finite: a save whose state holds nan/inf is never committed; the check runs on what
    # is written (an async save's snapshot, on the writer thread, not on the loop's time).
    checkpointer = Checkpointer(run_dir, keep_last=cfg.keep_last,
                                async_save=cfg.async_checkpoint, on_commit=on_commit,
                                required=resume_needs, owner=lease, finite=True)

    # --- resume --------------------------------------------------------------------
    step, epoch, consumed, tokens = 0, 0, 0, 0
    resume = checkpointer.resume_point(Path(cfg.resume_from) if cfg.resume_from else None)
    if resume is not None:
        meta = resume.meta
        # Again, on the checkpoint actually chosen (check_resume_early could only guess it).
        changes = check_resume(cfg, resume.path, resume.step, resume.manifest, world)
        if changes is None:
            log.warning("checkpoint %s records no settings (written before they were): --lr, "
                        "--seq-len and the rest could not be checked against it", resume.path)
        ext = state_file_ext(resume.manifest)
        try:
            if cfg.fsdp:  # every rank reads the chunks its shard needs, from any world size
                state = sharded_state(model, optimizer)
                sharded.load_into(state, resume)
                set_state_dict(model, optimizer, model_state_dict=state["model"],
                               optim_state_dict=state["optimizer"])
            else:
                accelerator.unwrap_model(model).load_state_dict(resume.load(f"model{ext}"))
        except RuntimeError as err:  # another architecture (an allowed --model change)
            details = " ".join(str(err).split())[:300]
            raise CheckpointError(f"checkpoint {resume.path}: its weights do not fit --model "
                                  f"{cfg.model}: {details}") from err
        if not cfg.fsdp:
            optimizer.load_state_dict(resume.load(f"optimizer{ext}"))
        scheduler.load_state_dict(resume.load(f"scheduler{ext}"))
        step, epoch, consumed, tokens = (meta[k] for k in ("step", "epoch", "consumed", "tokens"))
        # The position in the epoch in sequences (global), as written; a checkpoint from
        # before the cursor was recorded has micro-batches of its own batch and world size.
        saved_world = resume.manifest["world_size"]
        saved_batch = (meta["config"].get("batch_size", cfg.batch_size) if changes is not None
                       else cfg.batch_size)  # no settings recorded: its batch was checked equal
        cursor = meta.get("cursor", consumed * saved_batch * saved_world)
        if changes:
            cursor = apply_setting_changes(changes, cfg, scheduler, meta["config"], cursor)
        consumed = cursor // (cfg.batch_size * world)  # micro-batches of this world size
        if saved_world != world:
            log.info("elastic resume: world size %d -> %d, global batch %d kept (grad-accum "
                     "%d), from sequence %d of epoch %d", saved_world, world, global_batch,
                     cfg.grad_accum, cursor, epoch)
        for change in changes or []:
            events.emit("config_change", name=change.name, old=change.old, new=change.new,
                        step=step)
            log.info("%s: applied from step %d on", change.describe(resume.path), step + 1)
    stream = micro_batches(loader, sampler, epoch, consumed)
    if resume is not None:
        # After building the stream: nothing between here and the first batch may draw
        # from the global RNG that an uninterrupted run would not draw from.
        if accelerator.process_index < saved_world:  # a rank new to the run keeps set_seed's
            set_rng_state(resume.load(f"rng-rank{accelerator.process_index}{ext}"))
        events.emit("resumed", step=step, path=str(resume.path), from_world_size=saved_world,
                    lr=optimizer.param_groups[0]["lr"])  # the lr of the next step
        log.info("resumed from %s (step %d)", resume.path, step)
    events.emit("start", run_name=run_name, world_size=world, step=step,
                global_batch=global_batch, grad_accum=cfg.grad_accum, pid=os.getpid())

    def save(at_step: int, final: bool) -> None:
        files = {f"rng-rank{accelerator.process_index}.safetensors": rng_state()}
        if cfg.fsdp:  # each rank its own shard (collective), no gather
            files.update(sharded.save_files(sharded_state(model, optimizer)))
        elif main_process:
            files["model.safetensors"] = model_state()
            files["optimizer.safetensors"] = optimizer.state_dict()
        if main_process:
            files["scheduler.safetensors"] = scheduler.state_dict()
        events.flush()  # everything up to this save reaches the bucket before its manifest
        # An async save copies the weights and the optimizer's moments on its thread while
        # the next step's forward and backward run: they change only in optimizer.step(),
        # which waits for that copy (checkpointer.before_update). The scheduler's and the
        # RNG's state are small and are taken here, now.
        abandoned = checkpointer.save(at_step, files, final=final, meta={
            "step": at_step, "epoch": epoch, "consumed": consumed, "tokens": tokens,
            # the position in the epoch in sequences, on any world size (--elastic)
            "cursor": consumed * cfg.batch_size * world,
            "global_batch": global_batch, "sharded": cfg.fsdp,
            "seed": cfg.seed, "run_name": run_name,
            "config": record_settings(cfg, SETTINGS)})
        if abandoned is not None:
            events.emit("checkpoint_abandoned", step=abandoned, for_step=at_step)

    params = {param.data_ptr() for param in accelerator.unwrap_model(model).parameters()}

    def model_state() -> dict:
        """The model's state dict; buffers (which a forward may update in place, such as
        batch-norm statistics) are cloned now, parameters are handed over as they are."""
        state = accelerator.get_state_dict(model)
        return {name: tensor if tensor.data_ptr() in params else tensor.clone()
                for name, tensor in state.items()}

    # --- loop ----------------------------------------------------------------------
    tokens_per_step = global_batch * cfg.seq_len
    last_save, window_start, window_steps = time.monotonic(), time.monotonic(), 0
    skipped_in_a_row = 0  # periodic saves skipped since the last one taken
    nonfinite_in_a_row, nonfinite_skipped = 0, 0  # optimizer steps skipped: nan/inf
    # With fp16, GradScaler itself skips a step whose gradients overflowed and lowers the
    # scale: routine, not divergence. There only a nan/inf loss counts.
    check_grad = accelerator.scaler is None
    faults = nan_faults(accelerator.process_index)
    weight_faults = nan_weight_faults()
    running_loss = torch.zeros((), device=accelerator.device)
    trace = None
    if os.environ.get(TRACE_SAMPLES_ENV):
        trace = open(Path(os.environ[TRACE_SAMPLES_ENV]) /  # noqa: SIM115 (lives as the run)
                     f"rank{accelerator.process_index}-{os.getpid()}.jsonl", "a")
    progress = None
    if main_process and sys.stderr.isatty():
        from tqdm import tqdm
        progress = tqdm(total=cfg.max_steps, initial=step, unit="step", dynamic_ncols=True)

    def save_finite(at_step: int, final: bool = False) -> None:
        """save(), never of nan/inf state; a failed write (events, files) is one line."""
        with run_dir_errors(), finite_or_stop():
            save(at_step, final)

    @contextlib.contextmanager
    def finite_or_stop():
        """Around every checkpointer call that can commit: a save whose state turned out
        nan/inf (found on any rank, agreed on all) was not committed, and the run stops."""
        try:
            yield
        except NonFiniteState as err:
            stop_diverged(err.step, "the weights or the optimizer state are nan/inf after "
                                    f"the optimizer step ({err})")

    def stop_diverged(at_step: int, what: str) -> None:
        """Raise Diverged on every rank together, having committed the save in flight (an
        earlier step's, finite) and saved nothing of the state at hand."""
        try:
            checkpointer.wait()
        except NonFiniteState:  # the save in flight held it too: not committed, nothing lost
            pass
        newest = [newest_committed(run_dir) if main_process else None]
        if world > 1:
            from accelerate.utils import broadcast_object_list
            broadcast_object_list(newest)  # every node's first rank prints it
        durable = checkpointer.wait_durable(cfg.durable_wait_seconds)
        if progress is not None:
            progress.close()
        with run_dir_errors():
            events.emit("diverged", step=at_step, what=what, skipped=nonfinite_skipped,
                        newest_checkpoint=str(newest[0]) if newest[0] else None)
            events.emit("exit", code=DIVERGED_EXIT_CODE, step=step, durable_step=durable)
            events.close()
        preemption.close()
        raise Diverged(
            f"training diverged at step {at_step}: {what}; nothing of that state was saved. "
            f"Newest committed checkpoint: {newest[0] or 'none'}. Lower --lr (to resume with "
            "it: --allow-config-change lr), or, for rare bad batches, pass "
            "--skip-nonfinite-steps N to skip up to N such steps in a row")

    model.train()
    while step < cfg.max_steps:
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(cfg.grad_accum):
            epoch, consumed, batch = next(stream)
            if trace is not None:  # TRACE_SAMPLES_ENV: tests only
                print(json.dumps({"step": step + 1, "epoch": epoch, "ids": sampler.last}),
                      file=trace, flush=True)
            batch = batch.to(accelerator.device)
            # Gradients are all-reduced (reduce-scattered with --fsdp) only on the last
            # micro-step of an optimizer step.
            sync = micro == cfg.grad_accum - 1
            if cfg.fsdp:
                model.set_requires_gradient_sync(sync)
            with contextlib.nullcontext() if sync or cfg.fsdp else accelerator.no_sync(model):
                loss = model(input_ids=batch, labels=batch).loss / cfg.grad_accum
                if micro == 0 and faults.get(step + 1):  # NAN_AT_STEP_ENV: tests only
                    faults[step + 1] -= 1
                    loss = loss + float("nan")
                accelerator.backward(loss)
            step_loss += loss.detach()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        if isinstance(grad_norm, DTensor):  # --fsdp: the norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        # Before optimizer.step() could write nan/inf into the weights, with one verdict on
        # every rank: a small all-reduce, and this optimizer step's one host sync.
        nonfinite = nonfinite_at_step(accelerator, step_loss, grad_norm, check_grad)
        advanced = nonfinite is None
        if advanced:
            checkpointer.before_update()  # an async save's snapshot must be taken first
            optimizer.step()
            if step + 1 in weight_faults:  # NAN_WEIGHTS_AT_STEP_ENV: tests only
                with torch.no_grad():
                    first = next(model.parameters())
                    first = first.to_local() if isinstance(first, DTensor) else first
                    first.view(-1)[0] = float("nan")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += tokens_per_step
            window_steps += 1
            running_loss += step_loss
            nonfinite_in_a_row = 0
            events.emit("step", step=step, persist=False)
            if progress is not None:
                progress.update(1)
        else:
            what = f"{nonfinite} {'are' if ' and ' in nonfinite else 'is'} nan/inf"
            if nonfinite_in_a_row >= cfg.skip_nonfinite_steps:
                stop_diverged(step + 1, f"{what} before the optimizer step, which was not taken"
                              + (f" ({nonfinite_in_a_row + 1} steps in a row, more than "
                                 f"--skip-nonfinite-steps {cfg.skip_nonfinite_steps})"
                                 if cfg.skip_nonfinite_steps > 0 else ""))
            # Skipped: no update, and the step is not counted, so the schedule and
            # --max-steps still count real updates. Its micro-batches stay consumed: the
            # step is tried again on the next ones.
            optimizer.zero_grad(set_to_none=True)
            if accelerator.scaler is not None:
                accelerator.scaler.update()  # clip_grad_norm_ unscaled: reset for the next try
            nonfinite_in_a_row += 1
            nonfinite_skipped += 1
            log.warning("step %d: %s; optimizer step skipped (%d in a row, at most %d; %d in "
                        "all)", step + 1, what, nonfinite_in_a_row, cfg.skip_nonfinite_steps,
                        nonfinite_skipped)
            events.emit("nonfinite_skipped", step=step + 1, what=nonfinite,
                        in_a_row=nonfinite_in_a_row, total=nonfinite_skipped, epoch=epoch,
                        consumed=consumed)

        if advanced and (step % cfg.log_every == 0 or step == cfg.max_steps):
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

        # One all-reduce per optimizer step (tried or skipped): every rank acts on the same
        # flags, because signals, notices and clocks differ between ranks.
        minutes_due = (cfg.checkpoint_every_minutes > 0 and
                       time.monotonic() - last_save >= cfg.checkpoint_every_minutes * 60)
        with finite_or_stop():
            preempted, minutes_due = checkpointer.at_step_boundary(preemption.requested,
                                                                   minutes_due)
        if preempted or step == cfg.max_steps:
            # After a skipped step too: its micro-batches are consumed. final: a periodic
            # save still being written is abandoned for this newer one, which is written
            # now, so a preemption never waits on an older save's upload.
            save_finite(step, final=True)
        elif advanced and (minutes_due or step % cfg.checkpoint_every_steps == 0):
            # A periodic save while the previous one is still uploading would queue behind
            # it and share its bandwidth: the bucket would fall further behind, not catch up.
            # Skip it; the next trigger tries again.
            backlog = None if cfg.save_while_uploading else checkpointer.backlog()
            if backlog is None:
                save_finite(step)
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
            try:
                events.close()
            except OSError as err:  # the checkpoint is committed: still exit 143
                log.warning("could not write the last run events: %s",
                            describe_os_error(err, run_dir))
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
    # The whole model on rank 0 (in host memory), in the Hugging Face layout. With --fsdp
    # every rank takes part in the gather.
    final_state = (get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True)) if cfg.fsdp
        else accelerator.get_state_dict(model) if main_process else None)
    if main_process:
        # Finite: the last save checked it. A failure below leaves a previous model in
        # output_dir whole and no partial file under a final name (publish).
        with tempfile.TemporaryDirectory(prefix="skyspot-final-") as staging:
            with io_errors(Path(staging), f"$TMPDIR ({Path(staging).parent}), where the final "
                                          "model is staged"):
                try:
                    accelerator.unwrap_model(model).save_pretrained(
                        staging, state_dict=final_state, safe_serialization=True)
                    tokenizer.save_pretrained(staging)
                except Exception as err:  # SafetensorError: the OS error is in its message
                    if (os_error := wrapped_os_error(err, Path(staging))) is None:
                        raise
                    raise os_error from err
            with io_errors(output_dir, f"the output dir {output_dir}"):
                publish(Path(staging), output_dir)
        log.info("saved the final model and tokenizer to %s", output_dir)
    with run_dir_errors():
        events.emit("exit", code=0, step=step, output_dir=str(output_dir), durable_step=durable,
                    nonfinite_skipped=nonfinite_skipped)
        events.close()
    preemption.close()
    accelerator.end_training()
    if world > 1:
        # A gloo worker thread may still hold the last collective's tensors and need the GIL
        # to free them; freeing the DDP model next joins that thread with the GIL held
        # (pytorch#56297): seen here once as a hang at exit under load. Let it finish first.
        time.sleep(0.5)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        return train(cfg)
    except (IOFailure, CheckpointWriteError) as err:  # before CheckpointError, its base
        return _error(err, IO_ERROR_EXIT_CODE)
    except (ConfigError, DatasetError, SettingsError, CheckpointError) as err:
        return _error(err, 2)
    except Diverged as err:
        return _error(err, DIVERGED_EXIT_CODE)
    except OSError as err:  # any other I/O the environment failed (the disk, a mount)
        return _error(describe_os_error(err), IO_ERROR_EXIT_CODE)


def _error(message: object, code: int) -> int:
    """One line on stderr, from the first process of each node only."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"train/lm.py: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
