"""Recoveries that land on a candidate with another GPU count (--gpus-per-attempt).

- slow: recipes/train-lm-elastic.yaml rehearsed with --gpus-per-attempt 2,1,2: its own run:
  starts 2, then 1, then 2 real gloo ranks on CPU, through a preemption with grace and a lost
  VM, and the trainer keeps the global batch across the changes of world size.
- fast: the toy trainer's world follows each attempt's SKYPILOT_NUM_GPUS_PER_NODE (no SPLIT),
  rehearsal.json records each attempt's count, the fidelity line says which attempt got
  which and that a real recovery's candidate is SkyPilot's choice, and bad values are one
  line and exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from rehearsing import rehearsal
from trainer import read_events, rehearsal_weights, rehearse

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "rehearse"
TOY = str(FIXTURES / "toy.yaml")
sys.path.insert(0, str(REPO / "tools"))
from rehearsal import fidelity  # noqa: E402
from rehearsal.recipe import load_recipe  # noqa: E402

# GLOBAL_BATCH 16 = BATCH_SIZE 4 x grad-accum 2 on 2 ranks, x 4 on 1. Checkpoints every 4
# steps and log events every step, so step:N triggers land where they say.
JOB = {"CHECKPOINT_BUCKET": "ckpt", "FROM_SCRATCH": "true", "SEQ_LEN": "64", "BATCH_SIZE": "4",
       "GLOBAL_BATCH": "16", "LR": "3e-3", "WARMUP_STEPS": "3", "MAX_STEPS": "24", "SEED": "5",
       "MIXED_PRECISION": "no", "CHECKPOINT_EVERY_STEPS": "4", "CHECKPOINT_EVERY_MINUTES": "0",
       "KEEP_LAST": "2", "LOG_EVERY": "1", "NOTICE_POLL_SECONDS": "0"}


@pytest.mark.slow
def test_elastic_recipe_recovers_from_2_to_1_to_2_gpus_keeping_the_global_batch(
        tiny_assets, tmp_path):
    workdir = tmp_path / "run"
    job = {**JOB, "MODEL": str(tiny_assets / "model"), "DATASET": str(tiny_assets / "data")}
    # Attempt 1 (2 GPUs) is preempted with grace at step 6 and saves; attempt 2 (1 GPU)
    # loses its VM at once at step 14 and resumes from what the bucket holds; attempt 3
    # (2 GPUs) finishes.
    result, summary = rehearse("recipes/train-lm-elastic.yaml", workdir, job,
                               "--gpus-per-attempt", "2,1,2", "--grace", "30",
                               "--preempt-at", "step:6:term,step:14:kill", timeout_s=600)
    out = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, out
    assert summary["status"] == "SUCCEEDED" and summary["ok"], out
    assert summary["splits"] == [] and summary["regressions"] == [], out
    attempts = summary["attempts"]
    assert [a["gpus_per_node"] for a in attempts] == [2, 1, 2]
    assert [a["ending"] for a in attempts] == ["preempted:term", "preempted:kill", "exited"]
    assert [[s["world_size"] for s in a["starts"]] for a in attempts] == [[2], [1], [2]]
    assert any("--gpus-per-attempt 2,1,2" in line for line in summary["fidelity"])

    events = read_events(workdir / "events" / "node0.jsonl")
    starts = [e for e in events if e["event"] == "start"]
    assert [e["world_size"] for e in starts] == [2, 1, 2]
    assert [e["global_batch"] for e in starts] == [16, 16, 16]
    assert [e["grad_accum"] for e in starts] == [2, 4, 2]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert [e["from_world_size"] for e in resumed] == [2, 1]
    # Each recovery resumed where rehearsal.json says (the newest checkpoint in the bucket).
    assert [e["step"] for e in resumed] == [a["resumed_from"] for a in attempts[1:]]
    assert all(e["step"] > 0 for e in resumed)
    assert attempts[-1]["last_step"] == 24
    assert rehearsal_weights(summary, "ckpt")  # the final model is in the bucket


# --------------------------------------------------------------------------------------------
# Fast: the toy trainer, the fidelity line, bad input


def test_each_attempt_gets_its_gpu_count_and_its_world_is_no_split(rehearse, tmp_path):
    # The toy trainer reports world_size = SKYPILOT_NUM_NODES x SKYPILOT_NUM_GPUS_PER_NODE.
    code, summary = rehearsal(rehearse, tmp_path, TOY, "--gpus-per-attempt", "8,2",
                              "--preempt-at", "step:5,step:12:kill")
    assert code == 0 and summary["ok"] and summary["splits"] == [], summary["splits"]
    attempts = summary["attempts"]
    assert [a["gpus_per_node"] for a in attempts] == [8, 2, 2]  # the last value repeats
    assert [[s["world_size"] for s in a["starts"]] for a in attempts] == [[8], [2], [2]]
    line = next(line for line in summary["fidelity"] if "--gpus-per-attempt" in line)
    assert line.startswith("rehearse: fidelity: warning: SKYPILOT_NUM_GPUS_PER_NODE per "
                           "attempt (--gpus-per-attempt 8,2): attempt 1 gets 8, attempt 2 "
                           "and every later one 2, ")
    assert "no candidate has 2 GPU(s) per node (the recipe's: 8)" in line


def test_without_the_option_every_attempt_has_the_one_count(rehearse, tmp_path):
    code, summary = rehearsal(rehearse, tmp_path, TOY, "--gpus-per-node", "2",
                              "--preempt-at", "step:5")
    assert code == 0 and summary["ok"]
    assert [a["gpus_per_node"] for a in summary["attempts"]] == [2, 2]
    assert not [line for line in summary["fidelity"] if "--gpus-per-attempt" in line]


def test_the_fidelity_lines_name_each_attempts_count_and_that_it_is_forced():
    recipe = load_recipe(FIXTURES / "fidelity_any_of.yaml", [], [])  # candidates of 8 and 4
    lines = fidelity.fidelity_lines(recipe, run_setup=False, gpus_per_node=8,
                                    gpus_per_attempt=[8, 4, 8], environ={})
    (differ,) = [line for line in lines if "differ in GPUs per node" in line]
    assert differ.endswith("this rehearsal changes it as --gpus-per-attempt says (below)")
    (line,) = [line for line in lines if "--gpus-per-attempt" in line and line != differ]
    assert line == (
        "rehearse: fidelity: warning: SKYPILOT_NUM_GPUS_PER_NODE per attempt "
        "(--gpus-per-attempt 8,4,8): attempt 1 gets 8, attempt 2 gets 4, attempt 3 and every "
        "later one 8, as if each recovery landed on a candidate with that many GPUs per node; "
        "on a real cloud SkyPilot picks the candidate of every (re)launch by price and "
        "capacity, so a real recovery may or may not change the count like this")
    assert not [line for line in lines if "(--gpus-per-node)" in line]
    (one,) = [line for line in fidelity.fidelity_lines(
        recipe, run_setup=False, gpus_per_attempt=[2], environ={}) if "per attempt" in line]
    assert "(--gpus-per-attempt 2): every attempt gets 2, " in one
    assert one.endswith("no candidate has 2 GPU(s) per node (the recipe's: 4, 8)")


@pytest.mark.parametrize(("value", "message"), [
    ("", "--gpus-per-attempt is empty"),
    ("0", "'0' is not a whole number of GPUs >= 1"),
    ("2,-1", "'-1' is not a whole number of GPUs >= 1"),
    ("1.5", "'1.5' is not a whole number of GPUs >= 1"),
    ("2,,1", "'' is not a whole number of GPUs >= 1"),
    ("two", "'two' is not a whole number of GPUs >= 1"),
])
def test_bad_gpus_per_attempt_is_one_line_and_exit_2(rehearse, tmp_path, capsys, value,
                                                    message):
    code = rehearse.main([TOY, f"--gpus-per-attempt={value}", "--workdir", str(tmp_path / "rh")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("rehearse: error: ")
    assert message in err, err
    assert not (tmp_path / "rh").exists()


def test_gpus_per_attempt_and_gpus_per_node_together_is_one_line_and_exit_2(rehearse, capsys):
    with pytest.raises(SystemExit) as exit_:
        rehearse.main([TOY, "--gpus-per-attempt", "2,1", "--gpus-per-node", "2"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "--gpus-per-node: not allowed with argument --gpus-per-attempt" in err
