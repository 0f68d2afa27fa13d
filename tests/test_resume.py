"""Resume is bit-exact: SIGKILL at random instants (one mid-checkpoint) or SIGTERM, with 1
process and with 2 real gloo ranks, ends with the same model.safetensors as an
uninterrupted run, compared tensor by tensor with torch.equal."""

from __future__ import annotations

import json
import signal

import pytest
from trainer import (
    assert_bit_identical,
    command,
    env_for,
    kill_at_random_instants,
    kill_tree,
    last_step,
    lm_args,
    read_events,
    start,
    torn_checkpoint,
    wait_until,
    weights,
)

from skyspot import PREEMPTED_EXIT_CODE
from skyspot.checkpoint import ASYNC_WRITE_DELAY_ENV, MANIFEST, latest_valid, write_file

pytestmark = pytest.mark.slow


def _finish(assets, root, ranks, attempt, **flags) -> list[dict]:
    """Run to completion; return that attempt's events."""
    events = root / f"events-{attempt}.jsonl"
    proc = start(command(lm_args(assets, root / "ckpt", **flags), ranks), env_for(events),
                 root / "log.txt")
    assert proc.wait(timeout=600) == 0, (root / "log.txt").read_text()[-3000:]
    return read_events(events)


@pytest.fixture(scope="module")
def baselines(tiny_assets, tmp_path_factory):
    """Uninterrupted runs, computed once per world size."""
    cache = {}

    def get(ranks: int):
        if ranks not in cache:
            root = tmp_path_factory.mktemp(f"baseline{ranks}")
            events = _finish(tiny_assets, root, ranks, 0)
            assert [e["world_size"] for e in events if e["event"] == "start"] == [ranks]
            cache[ranks] = weights(root / "ckpt" / "t" / "final")
        return cache[ranks]

    return get


@pytest.mark.parametrize(
    "ranks,async_save,seed",
    [(1, False, 11), (1, True, 12), (2, True, 13)],
    ids=["1proc-sync", "1proc-async", "2ranks-async"],
)
def test_resume_is_bit_exact_after_sigkill_at_random_instants(
    tiny_assets, tmp_path, baselines, ranks, async_save, seed
):
    torn = kill_at_random_instants(tiny_assets, tmp_path, ranks, seed,
                                   async_checkpoint=async_save)
    assert torn and torn[0] is not None
    run_dir = tmp_path / "ckpt" / "t"

    final = _finish(tiny_assets, tmp_path, ranks, 3, async_checkpoint=async_save)
    resumed = [e for e in final if e["event"] == "resumed"]
    assert resumed and resumed[0]["step"] > 0, "the last attempt restarted from step 0"
    assert [e["world_size"] for e in final if e["event"] == "start"] == [ranks]
    assert_bit_identical(weights(run_dir / "final"), baselines(ranks))


@pytest.mark.parametrize("ranks", [1, 2], ids=["1proc", "2ranks"])
def test_sigterm_exits_143_through_the_wrapper_and_loses_no_steps(
    tiny_assets, tmp_path, baselines, ranks
):
    events = tmp_path / "events-0.jsonl"
    cmd = command(lm_args(tiny_assets, tmp_path / "ckpt"), ranks, wrapper=True)
    proc = start(cmd, env_for(events), tmp_path / "log.txt")
    assert wait_until(lambda: last_step(read_events(events)) >= 6, proc)
    kill_tree(proc, signal.SIGTERM)  # every process of the node, as a VM shutdown does
    grace_s = 30
    assert proc.wait(timeout=grace_s) == PREEMPTED_EXIT_CODE, (tmp_path / "log.txt").read_text()
    before = read_events(events)
    saved = [e for e in before if e["event"] == "checkpoint"][-1]["step"]
    assert saved == last_step(before), "the preemption save is not at the last step run"
    assert [e["event"] for e in before][-2:] == ["preemption", "exit"]

    after = _finish(tiny_assets, tmp_path, ranks, 1)
    assert [e["step"] for e in after if e["event"] == "resumed"] == [saved]  # zero steps lost
    assert_bit_identical(weights(tmp_path / "ckpt" / "t" / "final"), baselines(ranks))


def test_a_preemption_during_a_slow_periodic_save_abandons_it_within_a_30s_grace(
    tiny_assets, tmp_path, baselines
):
    """2 ranks, async saves to a slow bucket: every file of a periodic save takes 15 s more,
    so that save alone needs over a minute. A SIGTERM while it is being written must not
    wait for it: the preemption save abandons it (its files deleted, no manifest), writes
    the current state and exits 143 inside a 30 s grace; the resume from it is bit-exact."""
    events = tmp_path / "events-0.jsonl"
    run_dir = tmp_path / "ckpt" / "t"
    cmd = command(lm_args(tiny_assets, tmp_path / "ckpt", async_checkpoint=True), 2,
                  wrapper=True)
    proc = start(cmd, env_for(events, **{ASYNC_WRITE_DELAY_ENV: "15"}), tmp_path / "log.txt")
    assert wait_until(lambda: torn_checkpoint(run_dir) is not None, proc)
    slow = torn_checkpoint(run_dir)
    kill_tree(proc, signal.SIGTERM)
    grace_s = 30
    assert proc.wait(timeout=grace_s) == PREEMPTED_EXIT_CODE, (tmp_path / "log.txt").read_text()
    before = read_events(events)
    assert [e["world_size"] for e in before if e["event"] == "start"] == [2]
    (abandoned,) = [e for e in before if e["event"] == "checkpoint_abandoned"]
    assert f"step-{abandoned['step']:08d}" == slow.name
    saved = [e for e in before if e["event"] == "checkpoint"][-1]
    assert saved["step"] == abandoned["for_step"] == last_step(before) > abandoned["step"]
    assert not list(slow.iterdir()), "the abandoned save's files were left to upload"

    after = _finish(tiny_assets, tmp_path, 2, 1, async_checkpoint=True)
    assert [e["step"] for e in after if e["event"] == "resumed"] == [saved["step"]]
    assert_bit_identical(weights(run_dir / "final"), baselines(2))


def test_a_checkpoint_of_the_torch_save_format_still_resumes_bit_exactly(
    tiny_assets, tmp_path, baselines
):
    """Runs checkpointed before the move to safetensors have model.pt, optimizer.pt,
    scheduler.pt and rng-rank0.pt (torch.save): a relaunch after upgrading resumes from
    them. The newest checkpoint of a preempted run is rewritten in that format, with a
    manifest of its own, and the run finishes bit-identical to an uninterrupted one."""
    events = tmp_path / "events-0.jsonl"
    proc = start(command(lm_args(tiny_assets, tmp_path / "ckpt"), 1), env_for(events),
                 tmp_path / "log.txt")
    assert wait_until(lambda: last_step(read_events(events)) >= 6, proc)
    kill_tree(proc, signal.SIGTERM)
    assert proc.wait(timeout=30) == PREEMPTED_EXIT_CODE, (tmp_path / "log.txt").read_text()
    newest = latest_valid(tmp_path / "ckpt" / "t")
    manifest = newest.manifest
    entries = []
    for entry in manifest["files"]:
        state = newest.load(entry["path"])
        (newest.path / entry["path"]).unlink()
        old_name = entry["path"].replace(".safetensors", ".pt")
        entries.append(vars(write_file(newest.path, old_name, state)))
    (newest.path / MANIFEST).unlink()
    write_file(newest.path, MANIFEST, json.dumps({**manifest, "files": entries}).encode())
    assert latest_valid(tmp_path / "ckpt" / "t").path == newest.path

    after = _finish(tiny_assets, tmp_path, 1, 1)
    (resumed,) = [e for e in after if e["event"] == "resumed"]
    assert resumed["path"] == str(newest.path) and resumed["step"] == newest.step
    assert_bit_identical(weights(tmp_path / "ckpt" / "t" / "final"), baselines(1))


def test_a_real_failure_is_not_reported_as_a_preemption(tiny_assets, tmp_path):
    cmd = command(lm_args(tiny_assets, tmp_path / "ckpt", dataset=tmp_path / "missing"), 2,
                  wrapper=True)
    proc = start(cmd, env_for(tmp_path / "events.jsonl"), tmp_path / "log.txt")
    code = proc.wait(timeout=300)
    assert code not in (0, PREEMPTED_EXIT_CODE)
    assert "no such file or directory" in (tmp_path / "log.txt").read_text()


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_cloud_preemption_notice_saves_and_exits_143(tiny_assets, tmp_path, cloud):
    from test_preemption import FakeMetadata

    fake = FakeMetadata()
    try:
        events = tmp_path / "events.jsonl"
        env = env_for(events, SKYSPOT_METADATA_URL=fake.url,
                      SKYPILOT_CLUSTER_INFO=f'{{"cloud": "{cloud.upper()}"}}')
        args = lm_args(tiny_assets, tmp_path / "ckpt", notice_poll_seconds=0.2)
        proc = start(command(args), env, tmp_path / "log.txt")
        assert wait_until(lambda: last_step(read_events(events)) >= 5, proc)
        fake.notice = True  # the cloud announces the preemption; no signal is sent
        assert proc.wait(timeout=60) == PREEMPTED_EXIT_CODE
    finally:
        fake.close()
    seen = read_events(events)
    (notice,) = [e for e in seen if e["event"] == "preemption"]
    assert notice["reason"] == f"notice:{cloud}" and notice["notice"]
    assert [e for e in seen if e["event"] == "checkpoint"][-1]["step"] == last_step(seen)
