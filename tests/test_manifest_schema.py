"""Manifests that lie never crash resume and are never believed: each malformed one makes
its checkpoint invalid with one warning, and resume falls back to the next older one.
Nothing follows a symlink, and retention never leaves the run directory."""

from __future__ import annotations

import builtins
import errno
import json
import logging
import os

import pytest
import torch
import xxhash

from skyspot.checkpoint import MANIFEST, Checkpointer, latest_valid, step_dirs


def _state(step: int) -> dict:
    return {"model.pt": {"w": torch.full((64,), float(step))}, "rng-rank0.pt": {"step": step}}


def _save(root, steps, keep_last=10, **kw) -> Checkpointer:
    ckpt = Checkpointer(root, keep_last=keep_last, **kw)
    for step in steps:
        ckpt.save(step, _state(step), meta={"step": step})
    ckpt.wait()
    return ckpt


def _edit_manifest(d, change):
    manifest = json.loads((d / MANIFEST).read_text())
    manifest = change(manifest)
    (d / MANIFEST).write_text(json.dumps(manifest))


def _entry(manifest, name="model.pt"):
    return next(e for e in manifest["files"] if e["path"] == name)


def _entry_for_bytes(name, data):
    return {"path": name, "size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}


def _point_entry_at(manifest, path_text, data):
    """Swap model.pt's entry for one that names ``path_text`` and matches ``data`` exactly:
    only the path rule can reject it."""
    manifest["files"] = [e for e in manifest["files"] if e["path"] != "model.pt"]
    manifest["files"].append(_entry_for_bytes(path_text, data))
    return manifest


SECRET = b"bytes outside the checkpoint"

MALFORMED = {
    "a list, not an object": (lambda m: [m], "JSON list, not an object"),
    "a string file entry": (lambda m: {**m, "files": ["model.pt"]}, "files[0] is str"),
    "no checksum": (lambda m: (_entry(m).pop("xxh3_128"), m)[1], "checksum None"),
    "checksum not hex": (lambda m: (_entry(m).update(xxh3_128="z" * 32), m)[1], "32 hex"),
    "size negative": (lambda m: (_entry(m).update(size=-1), m)[1], "size -1"),
    "size a string": (lambda m: (_entry(m).update(size="10"), m)[1], "size '10'"),
    "size a bool": (lambda m: (_entry(m).update(size=True), m)[1], "size True"),
    "no world_size": (lambda m: (m.pop("world_size"), m)[1], "world_size is None"),
    "no meta": (lambda m: (m.pop("meta"), m)[1], "meta is NoneType"),
    "meta a list": (lambda m: {**m, "meta": []}, "meta is list"),
    "newer format": (lambda m: {**m, "format": "skyspot-checkpoint/2", "files": {"x": 1}},
                     "format 'skyspot-checkpoint/2'"),
    "no format": (lambda m: (m.pop("format"), m)[1], "not a skyspot-checkpoint/1 manifest"),
    "empty file list": (lambda m: {**m, "files": []}, "files is empty"),
    "listed twice": (lambda m: {**m, "files": m["files"] + [_entry(m)]}, "listed twice"),
    "step disagrees": (lambda m: {**m, "step": 19}, "does not match the directory's step 20"),
    "meta.step disagrees": (lambda m: {**m, "meta": {"step": 19}}, "meta.step 19"),
    "absolute path": (lambda m: _point_entry_at(m, "/etc/hostname", SECRET),
                      "is not a plain file name"),
    "../ path": (lambda m: _point_entry_at(m, "../outside.bin", SECRET),
                 "is not a plain file name"),
    "nested ../ path": (lambda m: _point_entry_at(m, "sub/../../outside.bin", SECRET),
                        "is not a plain file name"),
    "the manifest itself": (lambda m: _point_entry_at(m, MANIFEST, b"{}"),
                            "is not a plain file name"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_manifest_falls_back_with_one_warning(tmp_path, caplog, name):
    change, reason = MALFORMED[name]
    root = tmp_path / "run"
    _save(root, [10, 20])
    (tmp_path / "outside.bin").write_bytes(SECRET)
    newest = root / "step-00000020"
    _edit_manifest(newest, change)
    with caplog.at_level(logging.WARNING, logger="skyspot.checkpoint"):
        chosen = Checkpointer(root).resume_point()
    assert chosen is not None and chosen.step == 10
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(newest) in warnings[0], warnings
    assert reason in warnings[0], warnings[0]


def test_a_manifest_that_omits_a_required_file_is_not_resumed_from(tmp_path, caplog):
    """The weights were left out of the list: resuming from 'other weights' is refused."""
    root = tmp_path / "run"
    _save(root, [10, 20])
    newest = root / "step-00000020"
    _edit_manifest(newest, lambda m: {**m, "files": [e for e in m["files"]
                                                     if e["path"] != "model.pt"]})
    # Without the trainer's list of required files the manifest is self-consistent...
    assert latest_valid(root).step == 20
    needs = lambda manifest: ["model.pt", *(f"rng-rank{r}.pt"  # noqa: E731
                                            for r in range(manifest["world_size"]))]
    with caplog.at_level(logging.WARNING, logger="skyspot.checkpoint"):
        chosen = Checkpointer(root, required=needs).resume_point()
    assert chosen.step == 10
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "does not list model.pt" in warning


def test_a_required_check_that_rejects_meta_is_a_skip(tmp_path, caplog):
    root = tmp_path / "run"
    _save(root, [10, 20])

    def needs(manifest):
        if manifest["meta"]["step"] == 20:
            raise ValueError("meta has no 'epoch'")
        return []

    with caplog.at_level(logging.WARNING, logger="skyspot.checkpoint"):
        assert Checkpointer(root, required=needs).resume_point().step == 10
    assert "meta has no 'epoch'" in caplog.records[0].getMessage()


@pytest.mark.parametrize("kind", ["symlink out", "symlink loop", "device", "fifo", "directory"])
def test_only_regular_files_are_read(tmp_path, caplog, kind):
    root = tmp_path / "run"
    _save(root, [10, 20])
    newest = root / "step-00000020"
    target = newest / "model.pt"
    data = target.read_bytes()
    target.unlink()
    if kind == "symlink out":
        # The outside file has exactly the listed bytes: only the symlink rule rejects it.
        (tmp_path / "elsewhere.pt").write_bytes(data)
        target.symlink_to(tmp_path / "elsewhere.pt")
    elif kind == "symlink loop":
        target.symlink_to(target)
    elif kind == "device":
        # /dev/zero would hash forever if it were read: the size check can't stop it (0).
        os.mknod(target, 0o600 | 0o020000, os.makedev(1, 5))
    elif kind == "fifo":
        os.mkfifo(target)  # opening it would block forever
    else:
        target.mkdir()
    with caplog.at_level(logging.WARNING, logger="skyspot.checkpoint"):
        assert latest_valid(root).step == 10
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "model.pt is not a regular file" in warning


@pytest.mark.parametrize("kind", ["symlink", "device", "huge"])
def test_a_manifest_that_is_not_a_regular_file_is_skipped(tmp_path, caplog, kind):
    root = tmp_path / "run"
    _save(root, [10, 20])
    manifest = root / "step-00000020" / MANIFEST
    real = manifest.read_bytes()
    manifest.unlink()
    if kind == "symlink":
        (tmp_path / "m.json").write_bytes(real)
        manifest.symlink_to(tmp_path / "m.json")
    elif kind == "device":
        os.mknod(manifest, 0o600 | 0o020000, os.makedev(1, 5))  # /dev/zero
    else:
        with open(manifest, "wb") as f:
            f.truncate(200 << 20)  # sparse: a 200 MB "manifest" is never read whole
    with caplog.at_level(logging.WARNING, logger="skyspot.checkpoint"):
        assert latest_valid(root).step == 10
    assert "manifest.json unreadable" in caplog.records[0].getMessage()


@pytest.mark.parametrize("err", [errno.EIO, errno.ELOOP, errno.EACCES, errno.ENOTCONN])
def test_any_io_error_while_verifying_is_a_skip(tmp_path, caplog, monkeypatch, err):
    """A FUSE mount answering EIO (or a dead mount, ENOTCONN) mid-verify: skipped, not a
    crash. The error is injected at open(), the one place a real mount would return it."""
    root = tmp_path / "run"
    _save(root, [10, 20])
    bad = str(root / "step-00000020" / "model.pt")
    real_open = builtins.open

    def failing_open(file, *args, **kwargs):
        if str(file) == bad:
            raise OSError(err, os.strerror(err), bad)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)
    with caplog.at_level(logging.WARNING, logger="skyspot.checkpoint"):
        assert latest_valid(root).step == 10
    assert errno.errorcode[err] in caplog.records[0].getMessage()


def test_retention_never_follows_a_symlink_out_of_the_run(tmp_path):
    other = tmp_path / "other-run"
    _save(other, [5])
    other_manifest = (other / "step-00000005" / MANIFEST).read_bytes()
    root = tmp_path / "run"
    root.mkdir()
    # An old-looking "checkpoint" that is a link into another run's directory.
    (root / "step-00000001").symlink_to(other / "step-00000005")
    _save(root, [10, 20, 30], keep_last=2)
    assert (other / "step-00000005" / MANIFEST).read_bytes() == other_manifest
    assert (root / "step-00000001").is_symlink()
    assert [s for s, _, _ in step_dirs(root)] == [30, 20]
    assert latest_valid(other).step == 5


def test_retention_deletes_inside_a_checkpoint_without_following_its_links(tmp_path):
    outside = tmp_path / "precious.bin"
    outside.write_bytes(b"keep me")
    root = tmp_path / "run"
    _save(root, [10])
    (root / "step-00000010" / "link").symlink_to(outside)
    _save(root, [20, 30], keep_last=2)
    assert not (root / "step-00000010").exists()
    assert outside.read_bytes() == b"keep me"


def test_a_seed_is_used_only_while_the_run_has_no_checkpoint_of_its_own(tmp_path, caplog):
    seed_run = tmp_path / "seed-run"
    _save(seed_run, [100])
    seed = seed_run / "step-00000100"
    root = tmp_path / "run"
    first = Checkpointer(root, keep_last=2)
    assert first.resume_point(seed).path == seed  # the first launch starts from the seed
    first.save(110, _state(110), meta={"step": 110})
    # A managed job relaunches the same command line: the run's own checkpoint wins.
    with caplog.at_level(logging.INFO, logger="skyspot.checkpoint"):
        again = Checkpointer(root, keep_last=2).resume_point(seed)
    assert again.step == 110 and again.path.parent == root
    assert any("seed" in r.getMessage() and str(seed) in r.getMessage()
               for r in caplog.records)
