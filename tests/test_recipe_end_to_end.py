"""The real recipe, run as SkyPilot runs it (its own run:, through tools/rehearse.py):
a preemption save with 2 real gloo ranks comes out of run: as exit 143, a real failure does
not, and the 2 ranks agree on time-based checkpoints."""

from __future__ import annotations

import json

import pytest
from trainer import assert_bit_identical, rehearsal_weights, rehearse

pytestmark = pytest.mark.slow

JOB = {"CHECKPOINT_BUCKET": "ckpt", "FROM_SCRATCH": "true", "SEQ_LEN": "64", "BATCH_SIZE": "2",
       "GRAD_ACCUM": "2", "LR": "3e-3", "WARMUP_STEPS": "3", "MAX_STEPS": "30", "SEED": "5",
       "MIXED_PRECISION": "no", "CHECKPOINT_EVERY_STEPS": "5", "CHECKPOINT_EVERY_MINUTES": "0",
       "KEEP_LAST": "2", "LOG_EVERY": "5", "NOTICE_POLL_SECONDS": "0"}


def _rehearse(tmp_path, assets, *extra, name="run", **envs):
    workdir = tmp_path / name
    job = {**JOB, "MODEL": str(assets / "model"), "DATASET": str(assets / "data"), **envs}
    result, summary = rehearse("recipes/train-lm-spot.yaml", workdir, job,
                               "--gpus-per-node", "2", "--grace", "30", *extra, timeout_s=600)
    return result, summary, workdir


def test_preemption_exits_143_through_the_recipe_run_and_resumes_bit_exactly(tiny_assets,
                                                                              tmp_path):
    result, summary, workdir = _rehearse(tmp_path, tiny_assets, "--preempt-at", "step:12:term")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    first, second = summary["attempts"]
    assert first["ending"] == "preempted:term" and first["exit_codes"] == [143]
    assert first["steps_lost"] == 0 and second["resumed_from"] == first["last_step"] >= 12
    assert summary["status"] == "SUCCEEDED" and second["exit_codes"] == [0]
    starts = [json.loads(line) for line in (workdir / "events" / "node0.jsonl").open()
              if '"start"' in line]
    assert [e["world_size"] for e in starts] == [2, 2]  # two real ranks, both attempts

    clean, clean_summary, clean_dir = _rehearse(tmp_path, tiny_assets, name="clean")
    assert clean.returncode == 0 and len(clean_summary["attempts"]) == 1
    assert_bit_identical(rehearsal_weights(summary, "ckpt"),
                         rehearsal_weights(clean_summary, "ckpt"))


def test_a_real_failure_does_not_exit_143(tiny_assets, tmp_path):
    result, summary, _ = _rehearse(tmp_path, tiny_assets, "--max-attempts", "1",
                                   DATASET=str(tmp_path / "missing"))
    assert result.returncode != 0
    (attempt,) = summary["attempts"]
    assert attempt["exit_codes"] and attempt["exit_codes"][0] not in (0, 143)


def test_ranks_agree_on_time_based_checkpoints(tiny_assets, tmp_path):
    # Every 0.1 s of wall clock, never by step count: each rank's clock says something
    # different, and a save that only one rank joined would hang the collective.
    result, summary, _ = _rehearse(tmp_path, tiny_assets, CHECKPOINT_EVERY_STEPS="1000",
                                   CHECKPOINT_EVERY_MINUTES="0.00167")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = [c["step"] for a in summary["attempts"] for c in a["checkpoints"]]
    # The clock fires every 0.1 s; a save due while the previous one is still uploading is
    # skipped, and skipping is agreed across ranks too (rank 0 lists the bucket, all act).
    skipped = [s for a in summary["attempts"] for s in a["skipped_checkpoints"]]
    assert steps[-1] == 30 and any(s < 30 for s in steps)
    assert len(steps) - 1 + len(skipped) >= 5, (steps, skipped)
