"""Sharded (FSDP) model and optimizer state inside skyspot's crash-consistent checkpoints.

Guarantee: a sharded checkpoint is an ordinary skyspot checkpoint (skyspot.checkpoint).
Every rank's shard is one file, listed with its size and xxh3 in the single manifest that
rank 0 writes last, so the checkpoint is chosen for resume only when every rank's file is
whole (a torn shard of one rank makes it invalid for all), nothing relies on rename, and
async saves, retention and bucket durability work as for any other file. It loads onto any
number of ranks: DCP plans the load for the ranks at hand and reshards.

How: torch.distributed.checkpoint (DCP) plans the save, as for its own formats: which rank
writes which chunk of which tensor, replicated values once. The storage writer here writes
nothing itself: it hands each rank's chunks, by reference and uncopied, back to the caller,
who saves them as that rank's ``sharded-rank<r>.safetensors`` through the Checkpointer
(hashed as written, snapshot off the loop when async). DCP's own FileSystemWriter could not
be used on a bucket: it makes ``.metadata`` visible last by a rename, which a bucket mount
turns into copy + delete (or, Mountpoint-S3, refuses), and it has no checksum a resume
could check. DCP's metadata (where each chunk is) becomes rank 0's ``sharded.metadata``.
The reader serves DCP's load plan from the files the Checkpointer verified, each read once.
"""

from __future__ import annotations

import io
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import (
    LoadPlan,
    LoadPlanner,
    Metadata,
    SavePlan,
    SavePlanner,
    StorageReader,
    StorageWriter,
)
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from skyspot.checkpoint import Checkpoint, CheckpointError

METADATA_FILE = "sharded.metadata"


def shard_file(rank: int) -> str:
    return f"sharded-rank{rank}.safetensors"


def files_of(world_size: int) -> list[str]:
    """The files of a sharded state saved by ``world_size`` ranks."""
    return [METADATA_FILE, *(shard_file(rank) for rank in range(world_size))]


def save_files(state: dict[str, Any]) -> dict[str, Any]:
    """Collective: plan the save of ``state`` (a state dict with DTensors, as
    ``torch.distributed.checkpoint.state_dict.get_state_dict`` returns it) and return this
    rank's files for ``Checkpointer.save``: its shard ({chunk key: tensor}, the tensors
    themselves, not copies), and on rank 0 also DCP's metadata."""
    writer = _Writer()
    dcp.save(state, storage_writer=writer, no_dist=not _dist_on())
    files: dict[str, Any] = {shard_file(_rank()): writer.chunks}
    if writer.metadata is not None:
        files[METADATA_FILE] = writer.metadata
    return files


def load_into(state: dict[str, Any], ckpt: Checkpoint) -> None:
    """Collective: fill ``state`` (this rank's state dict, the template DCP loads into in
    place) from the sharded state of ``ckpt``, saved by any number of ranks."""
    metadata = ckpt.load(METADATA_FILE)
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint {ckpt.path}: {METADATA_FILE} is not DCP metadata")
    dcp.load(state, storage_reader=_Reader(ckpt, metadata), no_dist=not _dist_on())


def _key(index: MetadataIndex) -> str:
    """The safetensors name of one chunk: its fully qualified name and its offset."""
    offset = "" if index.offset is None else ",".join(str(int(o)) for o in index.offset)
    return f"{index.fqn}@{offset}"


class _Writer(StorageWriter):
    """Collects this rank's chunks of DCP's save plan in memory; writes no file."""

    def __init__(self) -> None:
        self.chunks: dict[str, torch.Tensor] = {}
        self.metadata: Metadata | None = None

    def reset(self, checkpoint_id=None) -> None:
        self.chunks, self.metadata = {}, None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        name = shard_file(_rank())
        results = []
        for item in plan.items:
            data = planner.resolve_data(item)
            key = _key(item.index)
            if item.type == WriteItemType.BYTE_IO:  # pickled non-tensor state (param groups)
                raw = bytearray(data.getvalue())
                tensor = (torch.frombuffer(raw, dtype=torch.uint8) if raw
                          else torch.empty(0, dtype=torch.uint8))
            else:
                tensor = data.detach()
                if not tensor.is_contiguous():  # safetensors stores dense tensors
                    tensor = tensor.contiguous()
            self.chunks[key] = tensor
            results.append(WriteResult(index=item.index,
                                       size_in_bytes=tensor.numel() * tensor.element_size(),
                                       storage_data=(name, key)))
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        # Coordinator only: where every chunk of every rank is.
        metadata.storage_data = {r.index: r.storage_data for rank in results for r in rank}
        self.metadata = metadata

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True

    def storage_meta(self):
        return None


class _Reader(StorageReader):
    """Serves DCP's load plan from a verified skyspot checkpoint."""

    def __init__(self, ckpt: Checkpoint, metadata: Metadata) -> None:
        self.ckpt, self.metadata = ckpt, metadata

    def reset(self, checkpoint_id=None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool,
                              *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        where = self.metadata.storage_data
        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(where[item.storage_index][0], []).append(item)
        for name in sorted(by_file):
            chunks = self.ckpt.load(name)  # checked against the manifest; read once
            for item in by_file[name]:
                key = where[item.storage_index][1]
                if key not in chunks:
                    raise CheckpointError(f"checkpoint {self.ckpt.path}: {name} has no {key}")
                source = chunks[key]
                if item.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(item, io.BytesIO(source.numpy().tobytes()))
                    continue
                source = narrow_tensor_by_index(source, item.storage_offsets, item.lengths)
                target = planner.resolve_tensor(item).detach()
                if target.size() != source.size():
                    raise CheckpointError(
                        f"checkpoint {self.ckpt.path}: {key} has shape {tuple(source.size())},"
                        f" the model wants {tuple(target.size())}")
                target.copy_(source)
                planner.commit_tensor(item, target)
            del chunks  # this file's bytes are released before the next is read
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0
