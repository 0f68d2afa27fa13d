"""The checkpoint store: only complete checkpoints are chosen, retention never deletes the
newest valid one, and saves never write into an earlier attempt's directory."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from skyspot.checkpoint import (
    MANIFEST,
    Checkpointer,
    CheckpointError,
    latest_valid,
    load_checkpoint,
    step_dirs,
    write_file,
)


def _state(step: int) -> dict:
    return {"model.pt": {"w": torch.full((64,), float(step))}, "rng-rank0.pt": {"step": step}}


def _save_steps(root, steps, keep_last=10, **kw) -> Checkpointer:
    ckpt = Checkpointer(root, keep_last=keep_last, **kw)
    for step in steps:
        ckpt.save(step, _state(step), meta={"step": step})
    ckpt.wait()
    return ckpt


def _corrupt_missing_manifest(d):
    (d / MANIFEST).unlink()


def _corrupt_missing_file(d):
    (d / "model.pt").unlink()


def _corrupt_truncated(d):
    data = (d / "model.pt").read_bytes()
    (d / "model.pt").write_bytes(data[: len(data) // 2])


def _corrupt_checksum(d):
    data = bytearray((d / "model.pt").read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    (d / "model.pt").write_bytes(bytes(data))


def _corrupt_manifest_json(d):
    (d / MANIFEST).write_text('{"format": "skyspot-checkpoint/1", "fi')


@pytest.mark.parametrize(
    "corrupt,reason",
    [
        (_corrupt_missing_manifest, "manifest.json missing"),
        (_corrupt_missing_file, "model.pt missing"),
        (_corrupt_truncated, "model.pt has"),
        (_corrupt_checksum, "model.pt checksum mismatch"),
        (_corrupt_manifest_json, "manifest.json unreadable"),
    ],
)
def test_damaged_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, caplog, corrupt,
                                                                    reason):
    _save_steps(tmp_path, [10, 20])
    newest = tmp_path / "step-00000020"
    corrupt(newest)
    with caplog.at_level(logging.WARNING, logger="skyspot.checkpoint"):
        chosen = latest_valid(tmp_path)
    assert chosen is not None and chosen.step == 10
    assert torch.equal(chosen.load("model.pt")["w"], torch.full((64,), 10.0))
    warning = [r.getMessage() for r in caplog.records]
    assert len(warning) == 1 and str(newest) in warning[0] and reason in warning[0]
    assert newest.exists(), "a damaged checkpoint must not be deleted by resume"


def test_no_valid_checkpoint_means_none(tmp_path):
    _save_steps(tmp_path, [5])
    _corrupt_checksum(tmp_path / "step-00000005")
    assert latest_valid(tmp_path) is None
    assert latest_valid(tmp_path / "absent") is None


def test_explicit_resume_from_a_corrupt_checkpoint_is_an_error(tmp_path):
    _save_steps(tmp_path, [5])
    _corrupt_truncated(tmp_path / "step-00000005")
    with pytest.raises(CheckpointError, match="model.pt has .* bytes"):
        load_checkpoint(tmp_path / "step-00000005")


def test_keep_last_below_two_is_refused(tmp_path):
    for k in (0, 1):
        with pytest.raises(CheckpointError, match="at least 2"):
            Checkpointer(tmp_path, keep_last=k)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("async_save", [False, True])
def test_retention_keeps_the_newest_k_and_deletes_only_after_commit(tmp_path, async_save):
    ckpt = Checkpointer(tmp_path, keep_last=2, async_save=async_save)
    for step in (1, 2, 3, 4):
        ckpt.save(step, _state(step), meta={})
        ckpt.wait()
        steps = [s for s, _, _ in step_dirs(tmp_path)]
        assert steps == sorted(range(max(1, step - 1), step + 1), reverse=True)
        assert latest_valid(tmp_path).step == step


def test_retention_never_deletes_the_newest_valid_when_newer_saves_are_torn(tmp_path):
    _save_steps(tmp_path, [10])
    # Two later saves that never committed (killed before the manifest).
    for step in (20, 30):
        (tmp_path / f"step-{step:08d}").mkdir()
        write_file(tmp_path / f"step-{step:08d}", "model.pt", {"w": torch.zeros(3)})
    ckpt = Checkpointer(tmp_path, keep_last=2)
    assert ckpt.resume_point().step == 10
    ckpt.save(11, _state(11), meta={})
    # Only two committed checkpoints are known (10 and 11): nothing may be deleted yet.
    assert {s for s, _, _ in step_dirs(tmp_path)} == {10, 11, 20, 30}
    assert latest_valid(tmp_path).step == 11  # the torn 20 and 30 are skipped
    ckpt.save(12, _state(12), meta={})
    # Now 11 and 12 are the two newest committed: 10 goes, the torn newer ones stay.
    assert {s for s, _, _ in step_dirs(tmp_path)} == {11, 12, 20, 30}


def test_retry_of_a_step_gets_a_directory_of_its_own(tmp_path):
    torn = tmp_path / "step-00000020"
    torn.mkdir(parents=True)
    (torn / "model.pt").write_bytes(b"half of an earlier attempt")
    ckpt = Checkpointer(tmp_path, keep_last=3)
    ckpt.save(20, _state(20), meta={})
    assert (torn / "model.pt").read_bytes() == b"half of an earlier attempt"
    retry = tmp_path / "step-00000020.r1"
    assert (retry / MANIFEST).exists()
    assert latest_valid(tmp_path).path == retry


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    _save_steps(tmp_path, [7])
    manifest = json.loads((tmp_path / "step-00000007" / MANIFEST).read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {p.name for p in (tmp_path / "step-00000007").iterdir()} - {MANIFEST}
    assert set(listed) == on_disk
    for name, entry in listed.items():
        assert entry["size"] == (tmp_path / "step-00000007" / name).stat().st_size
        assert len(entry["xxh3_128"]) == 32
    assert manifest["step"] == 7 and manifest["world_size"] == 1
    assert {"torch", "accelerate", "transformers", "skyspot"} <= set(manifest["versions"])


def test_async_save_snapshots_state_at_the_step_boundary(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=2, async_save=True)
    weights = torch.zeros(1000)
    ckpt.save(1, {"model.pt": {"w": weights}}, meta={})
    weights.add_(1.0)  # training goes on mutating the live tensor
    ckpt.wait()
    assert torch.equal(latest_valid(tmp_path).load("model.pt")["w"], torch.zeros(1000))


def test_an_empty_step_directory_is_skipped_without_a_warning(tmp_path, caplog):
    _save_steps(tmp_path, [10])
    (tmp_path / "step-00000020").mkdir()  # a save killed before its first file
    with caplog.at_level(logging.WARNING, logger="skyspot.checkpoint"):
        assert latest_valid(tmp_path).step == 10
    assert not caplog.records


def test_backlog_skips_only_while_the_previous_save_is_being_written(tmp_path, monkeypatch):
    # A local disk: durable on close, so only a save still being written holds the next back.
    monkeypatch.setenv("SKYSPOT_FAULT_WRITE_DELAY_S", "0.3")  # seconds after each file
    ckpt = Checkpointer(tmp_path, keep_last=2, async_save=True)
    assert ckpt.backlog() is None  # nothing saved yet
    ckpt.save(1, _state(1), meta={})
    ckpt.at_step_boundary()
    assert ckpt.backlog() == "step 1 is still being written"
    ckpt.wait()
    assert ckpt.backlog() is None


def test_backlog_never_skips_when_the_bucket_cannot_be_listed(tmp_path):
    from skyspot.durability import _NeverDurable

    ckpt = Checkpointer(tmp_path, keep_last=2)
    ckpt.durability = _NeverDurable()  # an rclone mount without rclone on PATH
    ckpt.save(1, _state(1), meta={})
    assert ckpt.backlog() is None  # unknown is not "still uploading": keep checkpointing
    ckpt.save(2, _state(2), meta={})
    assert [s for s, _, _ in step_dirs(tmp_path)] == [2, 1]  # and nothing was deleted
