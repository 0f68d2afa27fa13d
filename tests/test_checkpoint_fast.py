"""The checkpoint fast path: an async snapshot taken while the next step computes holds the
state of its own step, buffers are reused, the commit runs off the training thread, a final
save abandons one still being written, and a resume reads every byte once."""

from __future__ import annotations

import copy
import ctypes
import json
import random
import threading
import time

import numpy as np
import pytest
import safetensors.torch
import torch

from skyspot import checkpoint as ckpt_module
from skyspot.checkpoint import (
    ASYNC_WRITE_DELAY_ENV,
    COPY_DELAY_ENV,
    MANIFEST,
    Checkpointer,
    CheckpointError,
    NonFiniteState,
    latest_valid,
    verify,
)
from skyspot.statefile import Layout, read_state

# ----------------------------------------------------------------------------- statefile


def _bytes_of(state) -> bytearray:
    out = bytearray()
    Layout.of(state).write_to(out.extend)
    return out


def _same(a, b) -> bool:
    """Equal value for value, types included; tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return type(a) is type(b) and a == b


def _trained_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    for _ in range(2):
        model(torch.randn(3, 8)).pow(2).sum().backward()
        optimizer.step()
    return model, optimizer


def test_every_kind_of_training_state_round_trips_exactly():
    model, optimizer = _trained_optimizer()
    states = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),  # int keys, a tuple of betas, tensor steps
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                "torch": torch.get_rng_state()},
        "odd": {"nan": float("nan"), "inf": -float("inf"), "bytes": b"\x00\xff",
                "empty": torch.empty(0, 3), "scalar": torch.tensor(2.5, dtype=torch.float64),
                "bf16": torch.randn(7, dtype=torch.bfloat16), "bool": torch.tensor([True]),
                "$dollar": 1, 3: None, (1, 2): "tuple key"},
    }
    for what, state in states.items():
        data = _bytes_of(state)
        assert _same(state, read_state(data)), what


def test_files_are_plain_safetensors_and_a_state_dict_loads_as_itself(tmp_path):
    model, optimizer = _trained_optimizer()
    for name, state in (("model", model.state_dict()), ("optimizer", optimizer.state_dict())):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(_bytes_of(state))
        loaded = safetensors.torch.load_file(path)  # the reference reader accepts it
        if name == "model":
            assert _same(dict(model.state_dict()), loaded)
        else:
            assert torch.equal(loaded["state.0.exp_avg"], state["state"][0]["exp_avg"])


def test_shared_tensors_are_written_once_and_stay_shared():
    weight = torch.randn(64, 32)
    state = {"embed.weight": weight, "lm_head.weight": weight, "bias": torch.zeros(32)}
    data = _bytes_of(state)
    assert len(data) < 64 * 32 * 4 * 2  # one copy of the tied weight, not two
    back = read_state(data)
    assert torch.equal(back["embed.weight"], weight)
    assert back["embed.weight"].data_ptr() == back["lm_head.weight"].data_ptr()


def test_a_value_that_cannot_be_stored_is_named():
    with pytest.raises(TypeError, match=r"optimizer\.hook: a object can't be stored"):
        Layout.of({"optimizer": {"hook": object()}})


# ----------------------------------------------------------------------------- the snapshot


def _model_and_optimizer(width: int = 64):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(8)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer


def _step(model, optimizer, checkpointer=None, fence=True):
    """One training step: forward and backward, the fence, the update."""
    model(torch.randn(16, model[0].in_features)).pow(2).mean().backward()
    if checkpointer is not None and fence:
        checkpointer.before_update()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _files(model, optimizer):
    return {"model.safetensors": model.state_dict(),
            "optimizer.safetensors": optimizer.state_dict()}


@pytest.mark.parametrize("fence", [True, False])
def test_a_snapshot_taken_while_the_next_step_runs_restores_the_state_of_its_step(
        tmp_path, monkeypatch, fence):
    """Save at step 3, then run step 4's forward and backward while the snapshot is still
    being copied (slowed to make sure), then step 4's update. With the fence the checkpoint
    holds step 3's state bit for bit; without it (the control) the update lands mid-copy
    and the checkpoint holds a mix: so the check below can fail, and the fence is why it
    does not."""
    monkeypatch.setenv(COPY_DELAY_ENV, "0.02")  # seconds per tensor: 32 tensors, ~0.6 s
    model, optimizer = _model_and_optimizer()
    checkpointer = Checkpointer(tmp_path, keep_last=2, async_save=True)
    for _ in range(3):
        _step(model, optimizer, checkpointer)
    expected = copy.deepcopy(_files(model, optimizer))

    checkpointer.save(3, _files(model, optimizer), meta={"step": 3})
    pending = checkpointer._pending
    _step(model, optimizer, checkpointer, fence=fence)  # step 4
    if fence:
        assert pending.snapshot_wait > 0, "the copy was over before the update: no overlap"
    checkpointer.wait()

    saved = latest_valid(tmp_path)
    restored = {name: saved.load(name) for name in expected}
    assert saved.step == 3
    assert not _same(model.state_dict(), expected["model.safetensors"])  # step 4 did change it
    if fence:
        assert _same(restored, expected)
    else:
        assert not _same(restored, expected)


def test_snapshot_buffers_are_allocated_once_and_reused(tmp_path):
    model, optimizer = _model_and_optimizer()
    checkpointer = Checkpointer(tmp_path, keep_last=2, async_save=True)
    _step(model, optimizer, checkpointer)
    checkpointer.save(1, _files(model, optimizer), meta={"step": 1})
    checkpointer.wait()
    first = {key: buffer.data_ptr() for key, buffer in checkpointer._staging.buffers.items()}
    state_bytes = sum(t.numel() * t.element_size() for state in _files(model, optimizer).values()
                      for t in Layout.of(state).tensors)
    assert sum(b.numel() * b.element_size()
               for b in checkpointer._staging.buffers.values()) == state_bytes  # one copy
    for step in (2, 3):
        _step(model, optimizer, checkpointer)
        checkpointer.save(step, _files(model, optimizer), meta={"step": step})
        checkpointer.wait()
    assert {key: b.data_ptr() for key, b in checkpointer._staging.buffers.items()} == first
    assert _same(latest_valid(tmp_path).load("model.safetensors"), model.state_dict())


def test_the_commit_and_retention_run_off_the_training_thread(tmp_path, monkeypatch):
    threads = {"manifest": set(), "delete": set()}
    real_write, real_delete = ckpt_module.write_file, ckpt_module._delete

    def write_file(directory, name, payload, **kw):
        if name == MANIFEST:
            threads["manifest"].add(threading.current_thread().name)
        return real_write(directory, name, payload, **kw)

    def delete(root, path):
        threads["delete"].add(threading.current_thread().name)
        real_delete(root, path)

    monkeypatch.setattr(ckpt_module, "write_file", write_file)
    monkeypatch.setattr(ckpt_module, "_delete", delete)
    model, optimizer = _model_and_optimizer()
    committed = []
    checkpointer = Checkpointer(tmp_path, keep_last=2, async_save=True,
                                on_commit=committed.append)
    for step in range(1, 5):
        _step(model, optimizer, checkpointer)
        checkpointer.save(step, _files(model, optimizer), meta={"step": step})
        deadline = time.monotonic() + 30
        while checkpointer._pending is not None and time.monotonic() < deadline:
            checkpointer.at_step_boundary()  # as the loop does, once per step
            time.sleep(0.01)
    assert [c.step for c in committed] == [1, 2, 3, 4]
    assert threads == {"manifest": {"skyspot-commit"}, "delete": {"skyspot-commit"}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000004"]
    assert all(c.async_save and c.stall_seconds >= 0 for c in committed)


def test_a_final_save_abandons_a_save_still_being_written(tmp_path, monkeypatch):
    monkeypatch.setenv(ASYNC_WRITE_DELAY_ENV, "20")  # seconds after each file: a slow bucket
    model, optimizer = _model_and_optimizer()
    checkpointer = Checkpointer(tmp_path, keep_last=2, async_save=True)
    _step(model, optimizer, checkpointer)
    checkpointer.save(1, _files(model, optimizer), meta={"step": 1})
    slow = tmp_path / "step-00000001"
    deadline = time.monotonic() + 30
    while not (slow / "model.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    _step(model, optimizer, checkpointer)
    started = time.monotonic()
    abandoned = checkpointer.save(2, _files(model, optimizer), meta={"step": 2}, final=True)
    took = time.monotonic() - started
    assert abandoned == 1
    assert took < 5, f"the final save waited {took:.1f}s for the abandoned one"
    assert not (slow / MANIFEST).exists() and not list(slow.iterdir())  # its files deleted
    assert latest_valid(tmp_path).step == 2
    assert _same(latest_valid(tmp_path).load("model.safetensors"), model.state_dict())


def test_async_buffers_that_do_not_fit_are_refused_before_anything_is_written(
        tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_module, "available_memory", lambda: 100 << 20)  # 100 MiB
    checkpointer = Checkpointer(tmp_path, keep_last=2, async_save=True)
    big = {"model.safetensors": {"w": torch.zeros(64 << 20, dtype=torch.uint8)}}
    with pytest.raises(CheckpointError) as err:
        checkpointer.save(1, big, meta={"step": 1})
    message = str(err.value)
    assert "\n" not in message and "0.07 GB" in message and "--async-checkpoint" in message
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- read once


def _read_bytes_so_far() -> int:
    """Bytes this process has read through read() calls (rchar): a file read twice counts
    twice even when the second read comes from the page cache."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@pytest.mark.parametrize("local_disk", [True, False], ids=["mapped", "read"])
def test_a_resume_reads_every_byte_once(tmp_path, monkeypatch, local_disk):
    """On a local disk each file is mapped once, hashed in place and deserialized from the
    same pages: no read() of the data at all, and the tensors live in the mapping. On a
    bucket mount each file is read once into memory: rchar counts each byte once."""
    monkeypatch.setattr(ckpt_module, "_on_local_disk", lambda path: local_disk)
    model, optimizer = _model_and_optimizer(width=512)  # 25 MB of state
    _step(model, optimizer)
    Checkpointer(tmp_path, keep_last=2).save(1, _files(model, optimizer), meta={"step": 1})
    listed = json.loads((tmp_path / "step-00000001" / MANIFEST).read_text())["files"]
    total = sum(entry["size"] for entry in listed)
    assert total > 20 << 20

    before = _read_bytes_so_far()
    chosen = Checkpointer(tmp_path, keep_last=2).resume_point()
    kept = dict(chosen.data)
    states = {entry["path"]: chosen.load(entry["path"]) for entry in listed}
    read = _read_bytes_so_far() - before
    if local_disk:
        assert read < total * 0.05, (read, total)  # the manifest, and nothing of the data
        start = ctypes.addressof(ctypes.c_char.from_buffer(kept["optimizer.safetensors"]))
        inside = start <= states["optimizer.safetensors"]["state"][0]["exp_avg"].data_ptr() < (
            start + len(kept["optimizer.safetensors"]))
        assert inside, "the tensors are not views of the verified pages"
    else:
        # Each file once, plus the manifest and small reads (Python's own): never twice.
        assert total <= read < total * 1.1, (read, total)
    assert _same(states["model.safetensors"], model.state_dict())
    assert _same(states["optimizer.safetensors"], optimizer.state_dict())
    assert not chosen.data  # every kept buffer was handed over and released


def test_a_corrupt_file_found_while_reading_falls_back_to_the_previous_checkpoint(tmp_path):
    model, optimizer = _model_and_optimizer()
    checkpointer = Checkpointer(tmp_path, keep_last=3)
    for step in (1, 2):
        _step(model, optimizer)
        checkpointer.save(step, _files(model, optimizer), meta={"step": step})
    target = tmp_path / "step-00000002" / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 1  # same size: only the checksum can tell
    target.write_bytes(bytes(data))
    assert verify(tmp_path / "step-00000002")[1] == "optimizer.safetensors checksum mismatch"
    assert Checkpointer(tmp_path, keep_last=3).resume_point().step == 1


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_state_with_nan_is_never_committed_and_says_which_tensor(tmp_path, async_save):
    model, optimizer = _model_and_optimizer()
    checkpointer = Checkpointer(tmp_path, keep_last=2, async_save=async_save, finite=True)
    _step(model, optimizer, checkpointer)
    checkpointer.save(1, _files(model, optimizer), meta={"step": 1})
    checkpointer.wait()
    _step(model, optimizer, checkpointer)
    with torch.no_grad():
        model[3].bias[5] = float("inf")
    with pytest.raises(NonFiniteState, match=r"model.safetensors: 3.bias is nan/inf") as err:
        checkpointer.save(2, _files(model, optimizer), meta={"step": 2})
        checkpointer.wait()
    assert err.value.step == 2
    assert not list((tmp_path / "step-00000002").iterdir())  # not one file written
    assert latest_valid(tmp_path).step == 1
    checkpointer.save(3, {"model.safetensors": {"w": torch.zeros(3)}}, meta={"step": 3})
    checkpointer.wait()  # the checkpointer goes on working after a refused save
    assert latest_valid(tmp_path).step == 3
