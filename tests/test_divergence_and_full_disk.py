"""A diverging run never costs a good checkpoint; a full disk or a read-only mount ends a run
with one line and loses nothing.

- A nan/inf loss or gradient norm is caught before the optimizer step, with one verdict on
  every rank: the run stops with exit 3 (not 143: a recovery would diverge again) and one
  line naming the step and the newest committed checkpoint; no checkpoint holds nan/inf,
  retention keeps the newest finite one, and no final model is published.
- --skip-nonfinite-steps N skips such steps, up to N in a row. The bad steps are injected
  with SKYSPOT_FAULT_NAN_AT_STEP (never set in production), on one rank of two real gloo
  ranks for the agreement.
- A full disk (a real tmpfs shrunk to what it holds, by size or by inodes, at the intended
  moment) or a read-only remount, at a checkpoint's files, at its manifest, at the run
  events, or at the final publish: a non-zero exit, one error line saying what happened and
  where, no traceback; the previous checkpoint still verifies, and a previous final model
  stays whole with no partial file under a final name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from trainer import REPO, command, env_for, kill_tree, lm_args, read_events, wait_until, weights

from skyspot import PREEMPTED_EXIT_CODE
from skyspot.checkpoint import MANIFEST, WRITE_DELAY_ENV, step_dirs, verify
from skyspot.statefile import read_state

pytestmark = pytest.mark.slow

NAN_AT_STEP = "SKYSPOT_FAULT_NAN_AT_STEP"
NAN_WEIGHTS_AT_STEP = "SKYSPOT_FAULT_NAN_WEIGHTS_AT_STEP"
DIVERGED = 3  # train/lm.py DIVERGED_EXIT_CODE
IO_ERROR = 1  # train/lm.py IO_ERROR_EXIT_CODE: the environment failed a write
ERROR = "train/lm.py: error:"


# ----------------------------------------------------------------------------- helpers


def _run(args, tmp_path, ranks=1, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(command(args, ranks), env=env_for(tmp_path / "events.jsonl", **env),
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


class _Started:
    """The trainer in the background, its stdout and stderr in files of their own."""

    def __init__(self, args, tmp_path, **env):
        self.events, self.err = tmp_path / "events.jsonl", tmp_path / "stderr.txt"
        self.proc = subprocess.Popen(
            command(args), env=env_for(self.events, **env), cwd=REPO,
            stdout=open(tmp_path / "stdout.txt", "wb"), stderr=open(self.err, "wb"),  # noqa: SIM115
            start_new_session=True)

    def wait_for(self, predicate, what: str) -> None:
        assert wait_until(predicate, self.proc, timeout=180), (
            f"the run ended before {what}:\n{self.stderr()[-3000:]}")

    def checkpoint_committed(self, step: int) -> bool:
        return any(e["event"] == "checkpoint" and e["step"] == step
                   for e in read_events(self.events))

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        return self.proc.wait(timeout=timeout), self.stderr()

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            kill_tree(self.proc)
            self.proc.wait()


@pytest.fixture
def started():
    runs: list[_Started] = []

    def start(*args, **env) -> _Started:
        runs.append(_Started(*args, **env))
        return runs[-1]

    yield start
    for run in runs:  # nothing may keep a file open on a tmpfs being unmounted
        run.stop()


def _error_line(stderr: str) -> str:
    """The one error line, and no traceback. (Log lines share stderr: the progress of the
    run before, and the lease's warning that it could not be released on a dead disk.)"""
    assert "Traceback" not in stderr, stderr[-4000:]
    errors = [line for line in stderr.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1, stderr[-4000:]
    return errors[0]


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _tensors(value)


def _committed(run_dir: Path) -> list[Path]:
    """Every checkpoint that verifies, newest first, each checked free of nan/inf."""
    good = [path for _, _, path in step_dirs(run_dir) if verify(path)[0] is not None]
    for path in good:
        for name in ("model.safetensors", "optimizer.safetensors"):
            state = read_state(bytearray((path / name).read_bytes()))
            bad = [t for t in _tensors(state) if t.is_floating_point() and not t.isfinite().all()]
            assert not bad, f"{path / name} holds nan/inf"
    return good


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, **options): a fresh tmpfs at tmp_path/name; all unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(name: str, **options) -> Path:
        point = tmp_path / name
        point.mkdir()
        opts = ",".join(f"{k}={v}" for k, v in {"size": "256m", **options}.items())
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(point)], check=True)


def _remount(point: Path, options) -> None:
    """Remount with ``options()``, computed afresh on each try: a write that grows the file
    system between the look and the remount makes a smaller size fail (EINVAL), and a file
    open for writing makes a read-only remount fail (EBUSY)."""
    for _ in range(100):
        opts = options()
        result = subprocess.run(["mount", "-o", f"remount,{opts}", str(point)],
                                capture_output=True, text=True)
        if result.returncode == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"remount,{opts} of {point} failed: {result.stderr}")


def _fill(point: Path, spare: int = 0) -> None:
    """Leave ``spare`` bytes free: the tmpfs shrinks to what it holds now, plus that."""
    def size():
        st = os.statvfs(point)
        return f"size={(st.f_blocks - st.f_bfree) * st.f_frsize + spare}"
    _remount(point, size)


def _no_inodes(point: Path) -> None:
    """Room for data, none for a new file or directory."""
    def inodes():
        st = os.statvfs(point)
        return f"nr_inodes={st.f_files - st.f_ffree}"
    _remount(point, inodes)


def _read_only(point: Path) -> None:
    _remount(point, lambda: "ro")


# ----------------------------------------------------------------------------- divergence


def test_a_diverging_run_stops_before_nan_reaches_a_checkpoint(tiny_assets, tmp_path):
    # lr 1e4 blows the tiny model up within a few steps (the gradient norm is inf at step 3).
    # The step-2 save is async and slowed, so it is still being written when the run stops:
    # it is finite, and it is committed.
    ckpt = tmp_path / "ckpt"
    args = lm_args(tiny_assets, ckpt, lr=1e4, max_steps=12, checkpoint_every_steps=2,
                   async_checkpoint=True)
    result = _run(args, tmp_path, **{WRITE_DELAY_ENV: "0.3"})
    assert result.returncode == DIVERGED != PREEMPTED_EXIT_CODE, result.stderr[-3000:]
    line = _error_line(result.stderr)
    assert "diverged at step" in line and "nan/inf" in line, line
    assert "--lr" in line and "--skip-nonfinite-steps" in line, line

    run_dir = ckpt / "t"
    committed = _committed(run_dir)
    events = read_events(tmp_path / "events.jsonl")
    (diverged,) = [e for e in events if e["event"] == "diverged"]
    assert committed, "no checkpoint is left"
    newest = committed[0]
    assert int(newest.name.split("-")[1]) < diverged["step"]
    assert f"Newest committed checkpoint: {newest}." in line, line
    assert newest == Path(diverged["newest_checkpoint"])
    assert [e["code"] for e in events if e["event"] == "exit"] == [DIVERGED]
    assert not (run_dir / "final").exists(), "a diverged model was published"


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_weights_that_turn_nan_after_the_optimizer_step_are_never_saved(
        tiny_assets, tmp_path, async_save):
    """Finite loss and gradients, then a weight overflows in the update of step 8, the step
    of a save: the checkpointer checks what it writes (an async save's snapshot, on its
    thread) and commits nothing; the run stops with exit 3 naming the last good checkpoint
    (with async saves step 9's nan loss may be seen first: the same stop)."""
    ckpt = tmp_path / "ckpt"
    args = lm_args(tiny_assets, ckpt, max_steps=12, async_checkpoint=async_save)
    result = _run(args, tmp_path, **{NAN_WEIGHTS_AT_STEP: "8"})
    assert result.returncode == DIVERGED, result.stderr[-3000:]
    line = _error_line(result.stderr)
    assert "nan/inf" in line and "Newest committed checkpoint" in line, line
    if not async_save:
        assert "after the optimizer step (model.safetensors: " in line, line
    run_dir = ckpt / "t"
    assert [p.name for p in _committed(run_dir)] == ["step-00000004"]
    assert not (run_dir / "step-00000008" / MANIFEST).exists()
    assert not (run_dir / "final").exists()


def test_skip_nonfinite_steps_skips_them_and_finishes_finite(tiny_assets, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = lm_args(tiny_assets, ckpt, max_steps=12, skip_nonfinite_steps=2)
    result = _run(args, tmp_path, **{NAN_AT_STEP: "6,6,10"})  # step 6 twice, step 10 once
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(tmp_path / "events.jsonl")
    skipped = [(e["step"], e["in_a_row"]) for e in events if e["event"] == "nonfinite_skipped"]
    assert skipped == [(6, 1), (6, 2), (10, 1)]
    # A skipped step is not counted: the run still makes 12 updates; its data is not retried.
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, 13))
    meta = verify(_committed(ckpt / "t")[0])[0]["meta"]
    assert (meta["step"], meta["epoch"], meta["consumed"]) == (12, 0, (12 + 3) * 2)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in events if e["event"] == "log")
    final = weights(ckpt / "t" / "final")
    assert all(t.isfinite().all() for t in final.values())
    assert [e["code"] for e in events if e["event"] == "exit"] == [0]


def test_nan_on_one_rank_is_skipped_then_stops_on_both_ranks(tiny_assets, tmp_path):
    # Only rank 1's loss is nan (its gradients stay finite): rank 0 knows only through the
    # agreement. Step 5 is skipped on both; step 9 twice in a row is one more than allowed.
    ckpt = tmp_path / "ckpt"
    args = lm_args(tiny_assets, ckpt, max_steps=12, skip_nonfinite_steps=1)
    result = _run(args, tmp_path, ranks=2, timeout=300, **{NAN_AT_STEP: "5@1,9@1,9@1"})
    assert result.returncode not in (0, PREEMPTED_EXIT_CODE), result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1, result.stderr[-4000:]  # from the first rank only
    line = errors[0]
    assert "diverged at step 9: the loss (on 1 of 2 ranks) is nan/inf" in line, line
    assert "2 steps in a row, more than --skip-nonfinite-steps 1" in line, line

    events = read_events(tmp_path / "events.jsonl")  # rank 0's
    assert [e["step"] for e in events if e["event"] == "nonfinite_skipped"] == [5, 9]
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, 9))
    committed = _committed(ckpt / "t")
    assert committed and committed[0].name == "step-00000008"
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors"} <= {
        p.name for p in committed[0].iterdir()}
    assert f"Newest committed checkpoint: {committed[0]}." in line
    assert not (ckpt / "t" / "final").exists()


# ----------------------------------------------------------------------------- full disk


def test_full_disk_while_writing_checkpoint_files(tiny_assets, tmp_path, tmpfs, started):
    disk = tmpfs("ckpt")
    run_dir, target = disk / "t", disk / "t" / "step-00000008"
    run = started(lm_args(tiny_assets, disk, max_steps=12), tmp_path, **{WRITE_DELAY_ENV: "0.3"})
    run.wait_for(lambda: (target / "rng-rank0.safetensors").exists(), "the step-8 save")
    _fill(disk)  # during the step-8 save: its next file does not fit
    code, stderr = run.finish()
    assert code == IO_ERROR, stderr[-3000:]  # not 143, not bad input (2)
    line = _error_line(stderr)
    assert "no space left on device" in line and str(target) in line, line
    assert not (target / MANIFEST).exists()
    assert [p.name for p in _committed(run_dir)] == ["step-00000004"]
    assert not (run_dir / "final").exists()


def test_full_disk_at_the_manifest(tiny_assets, tmp_path, tmpfs, started):
    disk = tmpfs("ckpt")
    run_dir, target = disk / "t", disk / "t" / "step-00000008"
    run = started(lm_args(tiny_assets, disk, max_steps=12), tmp_path, **{WRITE_DELAY_ENV: "0.3"})
    # scheduler.safetensors is the last file before the manifest: its data still fits, no
    # new file does.
    run.wait_for(lambda: (target / "scheduler.safetensors").exists(), "the step-8 save's last file")
    _no_inodes(disk)
    code, stderr = run.finish()
    assert code == IO_ERROR, stderr[-3000:]  # not 143, not bad input (2)
    line = _error_line(stderr)
    assert "no space left on device" in line and str(target / MANIFEST) in line, line
    # It failed at the manifest: every data file is there, whole, and nothing else.
    assert {p.name for p in target.iterdir()} == {
        "rng-rank0.safetensors", "model.safetensors", "optimizer.safetensors",
        "scheduler.safetensors"}
    assert verify(target)[0] is None
    assert [p.name for p in _committed(run_dir)] == ["step-00000004"]


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_checkpoint_dir_full_or_read_only_between_saves(tiny_assets, tmp_path, tmpfs, started,
                                                        how):
    # Full mid-run (after step 4, the step-8 save fails), read-only before the final save
    # (after step 8): either way the run events flushed before the save hit it first.
    disk = tmpfs("ckpt")
    run_dir = disk / "t"
    last_good = 4 if how == "full" else 8
    run = started(lm_args(tiny_assets, disk, max_steps=12), tmp_path)
    run.wait_for(lambda: run.checkpoint_committed(last_good), f"the step-{last_good} checkpoint")
    if how == "full":
        _fill(disk)
    else:
        _read_only(disk)
    code, stderr = run.finish()
    assert code == IO_ERROR, stderr[-3000:]  # not 143, not bad input (2)
    line = _error_line(stderr)
    said = "no space left on device" if how == "full" else "read-only file system"
    assert said in line and str(run_dir) in line, line
    assert [p.name for p in _committed(run_dir)][0] == f"step-{last_good:08d}"
    assert not (run_dir / "final").exists()


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_final_publish_keeps_a_previous_model_whole(tiny_assets, tmp_path, tmpfs, how):
    out = tmpfs("out", size="64m")
    final = out / "final"
    shutil.copytree(tiny_assets / "model", final)  # a previous attempt's final model
    before = _digests(final)
    if how == "full":
        _fill(out, spare=2 << 20)  # the small files fit, the 5 MB model.safetensors does not
    else:
        _read_only(out)
    ckpt = tmp_path / "ckpt"
    result = _run(lm_args(tiny_assets, ckpt, max_steps=4, output_dir=final), tmp_path)
    assert result.returncode == IO_ERROR, result.stderr[-3000:]
    line = _error_line(result.stderr)
    if how == "full":
        assert "no space left on device" in line, line
        assert str(final / "model.safetensors") in line, line
    else:
        assert "read-only file system" in line and str(final) in line, line
    assert ".tmp-" not in line  # the final name, not the temporary one
    assert _digests(final) == before  # untouched, and no temporary file left behind
    assert [p.name for p in _committed(ckpt / "t")][0] == "step-00000004"
