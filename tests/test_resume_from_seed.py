"""--resume-from seeds a run once: a managed job relaunches the same command after every
preemption, and each relaunch resumes from the run's own newest checkpoint, never the seed
again. The relaunched run ends bit-identical to one that was never interrupted."""

from __future__ import annotations

import signal

import pytest
from trainer import (
    assert_bit_identical,
    command,
    env_for,
    kill_tree,
    last_step,
    lm_args,
    read_events,
    start,
    wait_until,
    weights,
)

pytestmark = pytest.mark.slow


def test_a_relaunched_seeded_run_resumes_from_its_own_checkpoint(tiny_assets, tmp_path):
    # The seed: another run's checkpoint at step 8 (killed there, as a donor run might be).
    donor_events = tmp_path / "donor.jsonl"
    donor = start(command(lm_args(tiny_assets, tmp_path / "donor", run_name="donor",
                                  max_steps=40)), env_for(donor_events), tmp_path / "donor.log")
    assert wait_until(lambda: any(e["event"] == "checkpoint" and e["step"] == 8
                                  for e in read_events(donor_events)), donor)
    kill_tree(donor)
    donor.wait()
    seed = tmp_path / "donor" / "donor" / "step-00000008"
    assert (seed / "manifest.json").exists()

    def seeded(root):
        return command(lm_args(tiny_assets, root, max_steps=40, resume_from=seed))

    # The same seeded job, never interrupted.
    clean = start(seeded(tmp_path / "clean"), env_for(tmp_path / "clean.jsonl"),
                  tmp_path / "clean.log")
    assert clean.wait(timeout=600) == 0, (tmp_path / "clean.log").read_text()[-3000:]
    assert [e["step"] for e in read_events(tmp_path / "clean.jsonl")
            if e["event"] == "resumed"] == [8]

    # Preempted (SIGKILL, a lost VM) after its own checkpoint at step 16, then relaunched
    # with the very same command line, as a managed job does.
    first_events = tmp_path / "first.jsonl"
    first = start(seeded(tmp_path / "ckpt"), env_for(first_events), tmp_path / "first.log")
    assert wait_until(lambda: last_step(read_events(first_events)) >= 18, first)
    kill_tree(first, signal.SIGKILL)
    first.wait()
    own = {e["step"] for e in read_events(first_events) if e["event"] == "checkpoint"}
    assert 16 in own

    again_events = tmp_path / "again.jsonl"
    again = start(seeded(tmp_path / "ckpt"), env_for(again_events), tmp_path / "again.log")
    assert again.wait(timeout=600) == 0, (tmp_path / "again.log").read_text()[-3000:]
    resumed = [e["step"] for e in read_events(again_events) if e["event"] == "resumed"]
    assert resumed and resumed[0] >= 16, f"went back to the seed: resumed at {resumed}"
    assert "seed" in (tmp_path / "again.log").read_text()  # says the seed was not used
    assert_bit_identical(weights(tmp_path / "ckpt" / "t" / "final"),
                         weights(tmp_path / "clean" / "t" / "final"))
