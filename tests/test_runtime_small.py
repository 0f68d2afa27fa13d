"""Small guarantees of the runtime: run names, the event log, and the exit-code wrapper."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from trainer import REPO

from skyspot import skyenv
from skyspot.events import EventLog, read_events

# --- skyenv ---------------------------------------------------------------------------


def _managed(job: str, ts: str, name: str = "train-lm", task: int = 0) -> dict[str, str]:
    return {"SKYPILOT_MANAGED_JOB_ID": job,
            "SKYPILOT_TASK_ID": f"sky-managed-{ts}_{name}_{job}-{task}"}


def test_run_name_survives_a_jobs_controller_restart():
    before = skyenv.read(_managed("42", "2026-11-24-08-01-03-123456")).default_run_name()
    after = skyenv.read(_managed("42", "2026-11-25-19-44-10-000001")).default_run_name()
    assert before == after == "train-lm-job42-task0"


def test_run_names_differ_between_launches_and_tasks():
    names = {skyenv.read(_managed(job, "2026-11-24-08-01-03-1", task=t)).default_run_name()
             for job in ("1", "2") for t in (0, 1)}
    assert len(names) == 4


def test_task_names_with_underscores_parse():
    env = _managed("7", "2026-11-24-08-01-03-1", name="my_big_job")
    assert skyenv.read(env).default_run_name() == "my_big_job-job7-task0"


def test_outside_a_managed_job_there_is_no_default_run_name():
    assert skyenv.read({}).default_run_name() is None


def test_cluster_info_nodes_and_gpus():
    env = skyenv.read({
        "SKYPILOT_CLUSTER_INFO": json.dumps({"cluster_name": "c", "cloud": "AWS",
                                             "region": "us-east-1", "zone": None}),
        "SKYPILOT_NODE_IPS": "10.0.0.1\n10.0.0.2\n", "SKYPILOT_NODE_RANK": "1",
        "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NUM_GPUS_PER_NODE": "8"})
    assert (env.cloud, env.head_ip, env.node_rank, env.num_nodes, env.num_gpus_per_node) == (
        "aws", "10.0.0.1", 1, 2, 8)


# --- events ---------------------------------------------------------------------------


def test_event_segments_are_never_appended_to(tmp_path, monkeypatch):
    monkeypatch.setenv("SKYSPOT_EVENTS_FILE", str(tmp_path / "live.jsonl"))
    log = EventLog(tmp_path)
    log.emit("start", step=0)
    log.emit("step", step=1, persist=False)
    log.flush()
    first = sorted((tmp_path / "events").iterdir())
    frozen = first[0].read_bytes()
    log.emit("checkpoint", step=1)
    log.close()
    segments = sorted((tmp_path / "events").iterdir())
    assert len(segments) == 2 and segments[0].read_bytes() == frozen
    assert [e["event"] for e in read_events(tmp_path)] == ["start", "checkpoint"]
    live = [json.loads(x)["event"] for x in (tmp_path / "live.jsonl").read_text().splitlines()]
    assert live == ["start", "step", "checkpoint"]


def test_events_of_later_attempts_sort_after_earlier_ones(tmp_path):
    first = EventLog(tmp_path)
    first.emit("exit", code=143)
    first.close()
    time.sleep(0.01)
    second = EventLog(tmp_path)
    second.emit("resumed", step=4)
    second.close()
    (tmp_path / "events" / "zz-torn.jsonl").write_text('{"event": "exit"}\n{"ev')
    assert [e["event"] for e in read_events(tmp_path)] == ["exit", "resumed", "exit"]


def test_only_rank_zero_writes(tmp_path):
    log = EventLog(tmp_path, enabled=False)
    log.emit("start")
    log.close()
    assert not (tmp_path / "events").exists()


# --- the exit-code wrapper -----------------------------------------------------------


def _wrap(script: str, timeout: float = 60) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "skyspot.launch", "--orphan-wait", "20", "--",
                             sys.executable, "-c", textwrap.dedent(script)], cwd=REPO)


MARK = "import os; open(os.environ['SKYSPOT_EXIT_MARKER'], 'w').write('x')"


def test_committed_preemption_becomes_143_even_if_the_launcher_says_1():
    assert _wrap(f"{MARK}; raise SystemExit(1)").wait(60) == 143


def test_other_exit_codes_pass_through():
    assert _wrap("raise SystemExit(3)").wait(60) == 3
    assert _wrap("raise SystemExit(0)").wait(60) == 0
    assert _wrap("import os, signal; os.kill(os.getpid(), signal.SIGKILL)").wait(60) == 137


def test_ranks_in_their_own_session_that_outlive_the_launcher_are_waited_for():
    # Like torch elastic: the rank runs in a new session; the launcher exits first.
    proc = _wrap(f"""
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c",
                          "import time; time.sleep(1.5); {MARK}"], start_new_session=True)
        raise SystemExit(1)
    """)
    assert proc.wait(60) == 143


def test_wrapper_outlives_sigterm_to_report_the_exit_code():
    proc = _wrap(f"""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(1.5)
        {MARK}
        raise SystemExit(1)
    """)
    time.sleep(0.7)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(60) == 143
