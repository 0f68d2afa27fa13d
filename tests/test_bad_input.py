"""Bad input gets one clear line on stderr, a non-zero exit, and nothing is deleted."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from trainer import REPO, command, env_for, lm_args, read_events

from skyspot.checkpoint import MANIFEST


def _lm(args, tmp_path, ranks=1):
    return subprocess.run(command(args, ranks), env=env_for(tmp_path / "events.jsonl"), cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def _tree_digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def existing_run(tiny_assets, tmp_path):
    """A finished short run whose checkpoints any bad invocation must leave alone."""
    result = _lm(lm_args(tiny_assets, tmp_path / "ckpt", max_steps=8), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp_path / "ckpt"


def test_unknown_flag(tiny_assets, tmp_path):
    result = _lm([*lm_args(tiny_assets, tmp_path / "ckpt"), "--learning-rate", "1"], tmp_path)
    assert result.returncode == 2
    assert "unrecognized arguments: --learning-rate" in _one_error_line(result)
    assert not (tmp_path / "ckpt").exists()


def test_missing_dataset_touches_nothing(tiny_assets, tmp_path, existing_run):
    before = _tree_digest(existing_run)
    result = _lm(lm_args(tiny_assets, existing_run, dataset=tmp_path / "nope.jsonl"), tmp_path)
    assert result.returncode == 2
    assert "nope.jsonl: no such file or directory" in _one_error_line(result)
    assert _tree_digest(existing_run) == before


def test_unwritable_checkpoint_dir(tiny_assets, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = _lm(lm_args(tiny_assets, blocker / "ckpt"), tmp_path)
    assert result.returncode == 2
    assert "not writable" in _one_error_line(result)
    assert blocker.read_text() == "not a directory"


def test_resume_from_a_corrupt_checkpoint_is_refused_and_kept(tiny_assets, tmp_path,
                                                              existing_run):
    newest = sorted((existing_run / "t").glob("step-*"))[-1]
    (newest / "optimizer.safetensors").write_bytes(b"garbage")
    before = _tree_digest(existing_run)
    # A new run seeded from it: it has no checkpoint of its own, so the seed must be used.
    result = _lm(lm_args(tiny_assets, existing_run, run_name="seeded", resume_from=newest,
                         max_steps=8), tmp_path)
    assert result.returncode == 2
    line = _one_error_line(result)
    assert str(newest) in line and "optimizer.safetensors has 7 bytes" in line
    assert _tree_digest(existing_run) == before


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tiny_assets, tmp_path,
                                                             existing_run):
    newest = sorted((existing_run / "t").glob("step-*"))[-1]
    (newest / MANIFEST).write_text("{")
    result = _lm(lm_args(tiny_assets, existing_run, max_steps=8), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    warning = [line for line in result.stderr.splitlines() if "skipping checkpoint" in line]
    assert len(warning) == 1 and str(newest) in warning[0] and "unreadable" in warning[0]
    resumed = [e["step"] for e in read_events(tmp_path / "events.jsonl") if e["event"] == "resumed"]
    assert resumed[-1] < int(newest.name.split("-")[1])


@pytest.mark.parametrize("dropped", ["model.safetensors", "rng-rank0.safetensors"])
def test_a_manifest_that_omits_a_file_the_trainer_needs_is_not_resumed_from(
        tiny_assets, tmp_path, existing_run, dropped):
    """The newest manifest no longer lists the weights (or this rank's RNG state), but the
    file is still there and the manifest is otherwise self-consistent: the trainer must not
    load unverified bytes, nor resume without them. It falls back to the older checkpoint."""
    newest = sorted((existing_run / "t").glob("step-*"))[-1]
    manifest = json.loads((newest / MANIFEST).read_text())
    manifest["files"] = [e for e in manifest["files"] if e["path"] != dropped]
    (newest / MANIFEST).write_text(json.dumps(manifest))
    result = _lm(lm_args(tiny_assets, existing_run, max_steps=8), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    warning = [line for line in result.stderr.splitlines() if "skipping checkpoint" in line]
    assert len(warning) == 1 and f"does not list {dropped}" in warning[0], result.stderr
    resumed = [e["step"] for e in read_events(tmp_path / "events.jsonl") if e["event"] == "resumed"]
    assert resumed == [4]


def test_resume_on_another_world_size_stops_with_both_sizes(tiny_assets, tmp_path,
                                                            existing_run):
    before = _tree_digest(existing_run)
    result = _lm(lm_args(tiny_assets, existing_run, max_steps=12), tmp_path, ranks=2)
    assert result.returncode != 0
    assert "written with world size 1" in result.stderr
    assert "this run has world size 2" in result.stderr
    assert _tree_digest(existing_run) == before


def test_wrapper_without_a_command_is_a_one_line_error():
    result = subprocess.run([sys.executable, "-m", "skyspot.launch", "--"], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 2 and "no command given" in result.stderr
