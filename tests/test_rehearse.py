"""tools/rehearse.py: a recipe run locally as a managed spot job, with injected preemptions.

The rehearsals run tests/fixtures/rehearse/toy_trainer.py (no ML: a step counter that honours
the events and checkpoint contracts) in-process through ``rehearse.main`` so that SkyPilot and
torch are imported once; the CLI's own process behaviour is checked with a few subprocesses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "rehearse.py"
FIXTURES = REPO / "tests" / "fixtures" / "rehearse"
TOY = str(FIXTURES / "toy.yaml")
TOY_2NODE = str(FIXTURES / "toy_2node.yaml")


@pytest.fixture(scope="module")
def rehearse():
    """tools/ is not a package: load the script as a module, as `python tools/...` would."""
    spec = importlib.util.spec_from_file_location("rehearse", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["rehearse"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("rehearse", None)


def rehearsal(rehearse, workdir: Path, *args: str) -> tuple[int, dict]:
    """Run one rehearsal from the repo root (recipes say `workdir: .`); code and summary."""
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        code = rehearse.main([*args, "--workdir", str(workdir), "--quiet"])
    finally:
        os.chdir(cwd)
    return code, json.loads((workdir / "rehearsal.json").read_text())


class MarkerWatch:
    """Collects pids of processes whose argv[0] is the marker, while a rehearsal runs."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.pids |= set(self.running())
            time.sleep(0.02)

    def running(self) -> list[int]:
        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            cmd = proc.info["cmdline"] or []
            if cmd[:1] == [self.marker] and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        return found

    def __enter__(self) -> MarkerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def term_run(rehearse, tmp_path_factory):
    """One SIGTERM preemption at step 7, shared by the tests that read its summary."""
    return rehearsal(rehearse, tmp_path_factory.mktemp("term"), TOY, "--preempt-at", "step:7")


def test_sigterm_preemption_recovers_with_no_steps_lost(term_run):
    code, summary = term_run
    assert code == 0 and summary["status"] == "SUCCEEDED" and summary["ok"]
    first, second = summary["attempts"]
    assert first["ending"] == "preempted:term" and first["exit_codes"] == [143]
    assert first["decision"] == "recover (preemption)"
    # The trainer committed a save on SIGTERM, and the next attempt resumed exactly there.
    assert first["checkpoints"][-1]["step"] == first["last_step"] >= 7
    assert second["resumed_from"] == first["last_step"] and first["steps_lost"] == 0
    # First recovery: same jobs controller, so the same SKYPILOT_TASK_ID.
    assert first["task_id"] == second["task_id"]
    assert summary["job_recovery"]["restart_cnt_on_failure"] == 0


def test_summary_json_has_the_totals(term_run):
    _, summary = term_run
    attempt = summary["attempts"][0]
    for key in ("started", "ended", "ending", "exit_codes", "resumed_from", "last_step",
                "steps_lost", "seconds_to_first_step", "checkpoints", "task_id"):
        assert key in attempt
    assert 0 < attempt["seconds_to_first_step"] < 10
    totals = summary["totals"]
    assert totals["attempts"] == 2
    assert totals["preemptions"] == {"term": 1, "kill": 0}
    assert totals["final_step"] == 20
    assert totals["steps_executed"] == 20 and totals["goodput"] == 1.0
    assert 0 < totals["wall_goodput"] <= 1
    ckpt = totals["checkpoints"]
    assert ckpt["count"] >= 4 and ckpt["mean_seconds"] >= 0 and ckpt["mean_bytes"] > 0


def test_sigkill_preemption_loses_the_steps_since_the_last_checkpoint(rehearse, tmp_path):
    code, summary = rehearsal(rehearse, tmp_path, TOY, "--preempt-at", "step:7:kill")
    assert code == 0 and summary["status"] == "SUCCEEDED"
    first, second = summary["attempts"]
    assert first["ending"] == "preempted:kill" and first["exit_codes"] == [137]
    # No save on the way out: only the periodic ones (CKPT_EVERY=5), the newest resumed.
    assert [c["step"] % 5 for c in first["checkpoints"]] == [0] * len(first["checkpoints"])
    assert second["resumed_from"] == first["checkpoints"][-1]["step"] >= 5
    assert first["steps_lost"] == first["last_step"] - second["resumed_from"]
    assert summary["totals"]["preemptions"] == {"term": 0, "kill": 1}
    assert summary["totals"]["goodput"] < 1


@pytest.mark.parametrize("isolation", ["pid-namespace", "process-tree"])
def test_kill_preemption_takes_processes_in_their_own_session(rehearse, tmp_path, isolation):
    marker = f"skyspot-rehearse-{uuid.uuid4().hex[:12]}"
    extra = ["--no-pid-namespace"] if isolation == "process-tree" else []
    with MarkerWatch(marker) as watch:
        code, summary = rehearsal(
            rehearse, tmp_path, TOY, "--preempt-at", "step:5:kill", *extra,
            "--env", f"SETSID_MARKER={marker}", "--env", "TOTAL_STEPS=10",
        )
    assert code == 0 and summary["attempts"][0]["ending"] == "preempted:kill"
    assert summary["pid_namespaces"] is (isolation == "pid-namespace")
    assert len(watch.pids) == 2, "each attempt starts one setsid'd process"
    assert watch.running() == [], f"setsid'd processes survived: {watch.pids}"


def test_term_escalates_to_sigkill_after_the_grace_period(rehearse, tmp_path, capsys):
    code, summary = rehearsal(
        rehearse, tmp_path, TOY, "--preempt-at", "step:3", "--grace", "0.4",
        "--env", "IGNORE_TERM=1",
    )
    first, second = summary["attempts"]
    assert first["ending"] == "preempted:term" and first["exit_codes"] == [137]
    assert "grace period over, SIGKILL" in capsys.readouterr().out
    # It ignored SIGTERM and kept training through the grace period, saving every 5 steps.
    assert first["last_step"] > 3
    newest = first["checkpoints"][-1]["step"] if first["checkpoints"] else 0
    assert second["resumed_from"] == newest and code == 0


def test_max_restarts_on_errors_exhausted_fails(rehearse, tmp_path):
    code, summary = rehearsal(
        rehearse, tmp_path, TOY,
        "--env", "FAIL_AT_STEP=3", "--env", "FAIL_CODE=1", "--env", "FAIL_TIMES=99",
    )
    assert code != 0 and summary["status"] == "FAILED"
    # toy.yaml: max_restarts_on_errors 1 -> one restart, then the second failure is final.
    assert [a["exit_codes"] for a in summary["attempts"]] == [[1], [1]]
    assert summary["attempts"][0]["decision"] == "restart: restart 1/1 on errors"
    assert summary["attempts"][1]["decision"].startswith("stop: max_restarts_on_errors")
    assert summary["job_recovery"]["restart_cnt_on_failure"] == 2


def test_recover_on_exit_codes_restart_without_counting(rehearse, tmp_path):
    # Three failures with 42 (in recover_on_exit_codes) although max_restarts_on_errors is 1.
    code, summary = rehearsal(
        rehearse, tmp_path, TOY, "--env", "CKPT_EVERY=2",
        "--env", "FAIL_AT_STEP=3", "--env", "FAIL_CODE=42", "--env", "FAIL_TIMES=3",
    )
    assert code == 0 and summary["status"] == "SUCCEEDED"
    attempts = summary["attempts"]
    assert [a["exit_codes"] for a in attempts] == [[42], [42], [42], [0]]
    assert all("recover_on_exit_codes" in a["decision"] for a in attempts[:3])
    assert summary["job_recovery"]["restart_cnt_on_failure"] == 0
    assert [a["resumed_from"] for a in attempts] == [0, 2, 2, 2]
    assert summary["totals"]["preemptions"] == {"term": 0, "kill": 0}


def test_trainer_keyed_on_task_id_is_reported_as_a_regression(rehearse, tmp_path, capsys):
    code, summary = rehearsal(
        rehearse, tmp_path, TOY, "--preempt-at", "step:7", "--controller-restart-every", "1",
        "--env", "RUN_KEY=task",
    )
    first, second = summary["attempts"]
    assert first["task_id"] != second["task_id"]  # the jobs controller "restarted"
    assert second["resumed_from"] == 0
    assert summary["status"] == "SUCCEEDED" and not summary["ok"] and code != 0
    committed = first["checkpoints"][-1]["step"]
    [line] = summary["regressions"]
    assert f"checkpoint step {committed}" in line and "started fresh at step 0" in line
    assert "REGRESSION: attempt 2" in capsys.readouterr().out


def test_two_nodes_get_ranks_and_loopback_ips(rehearse, tmp_path, capsys, monkeypatch):
    info = tmp_path / "info"
    info.mkdir()
    workdir = tmp_path / "rh"
    monkeypatch.chdir(REPO)  # streamed logs need no --quiet, so no rehearsal() here
    code = rehearse.main([
        TOY_2NODE, "--workdir", str(workdir), "--env", f"NODE_INFO_DIR={info}",
        "--secret", "TOY_SECRET=s3cr3t", "--gpus-per-node", "2", "--cloud", "gcp",
    ])
    assert code == 0
    nodes = [json.loads((info / f"node{r}.json").read_text()) for r in (0, 1)]
    assert [n["SKYPILOT_NODE_RANK"] for n in nodes] == ["0", "1"]
    for node in nodes:
        assert node["SKYPILOT_NODE_IPS"] == "127.0.0.1\n127.0.0.2"
        assert node["SKYPILOT_NUM_NODES"] == "2" and node["SKYPILOT_NUM_GPUS_PER_NODE"] == "2"
        assert node["SKYPILOT_TASK_ID"].startswith("sky-managed-")
        assert node["SKYPILOT_TASK_ID"].endswith(f"_toy-2node_{node['SKYPILOT_MANAGED_JOB_ID']}-0")
        assert json.loads(node["SKYPILOT_CLUSTER_INFO"])["cloud"] == "GCP"
        assert node["TOY_SECRET"] == "s3cr3t" and node["cwd"] == str(REPO)
        assert node["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
        assert node["CKPT_DIR"] == str(workdir / "buckets" / "skyspot-toy-ckpt" / "toy")
    assert nodes[0]["SKYPILOT_MANAGED_JOB_ID"] == nodes[1]["SKYPILOT_MANAGED_JOB_ID"]
    out = capsys.readouterr().out  # node logs are streamed with a prefix and kept per node
    assert "[a1/n1] toy trainer rank 1 starting at step 0" in out
    assert "toy trainer rank 1" in (workdir / "logs" / "attempt1-node1.log").read_text()


def test_env_override_is_remapped_and_secrets_come_from_the_environment(
    rehearse, tmp_path, monkeypatch
):
    info = tmp_path / "info"
    info.mkdir()
    monkeypatch.setenv("TOY_SECRET", "from-env")  # a value-less secret, like SkyPilot's
    code, summary = rehearsal(
        rehearse, tmp_path / "rh", TOY_2NODE,
        "--env", f"NODE_INFO_DIR={info}", "--env", "CKPT_DIR=/ckpt/other/run",
    )
    assert code == 0
    node = json.loads((info / "node0.json").read_text())
    bucket = tmp_path / "rh" / "buckets" / "skyspot-toy-ckpt"
    assert node["CKPT_DIR"] == str(bucket / "other" / "run")
    assert node["TOY_SECRET"] == "from-env"
    assert summary["mounts"] == {"/ckpt": str(bucket)}
    assert (bucket / "other" / "run").is_dir()  # the toy committed its checkpoint there


def test_ctrl_c_cleans_up_every_node(rehearse, tmp_path):
    marker = f"skyspot-rehearse-{uuid.uuid4().hex[:12]}"

    def interrupt_once_running() -> None:
        deadline = time.time() + 30
        while not watch.pids and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    with MarkerWatch(marker) as watch:
        threading.Thread(target=interrupt_once_running, daemon=True).start()
        code, summary = rehearsal(
            rehearse, tmp_path, TOY, "--env", "TOTAL_STEPS=100000",
            "--env", f"SETSID_MARKER={marker}",
        )
    assert code == 130 and summary["status"] == "INTERRUPTED"
    assert summary["attempts"][-1]["ending"] == "interrupted"
    assert watch.pids and watch.running() == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([str(FIXTURES / "missing.yaml")], "recipe not found"),
        ([str(FIXTURES / "rejected.yaml")], "SkyPilot rejects"),
        ([TOY, "--preempt-at", "30s,soon"], "bad --preempt-at item 'soon'"),
        ([TOY, "--preempt-at", "step:x:kill"], "bad --preempt-at item"),
        ([TOY, "--no-such-flag"], "unrecognized arguments"),
        ([TOY_2NODE], "secret TOY_SECRET has no value"),
        ([TOY, "--env", "1BAD=x"], "invalid variable name"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(rehearse, tmp_path, capsys, monkeypatch, args,
                                          message):
    monkeypatch.delenv("TOY_SECRET", raising=False)
    try:
        code = rehearse.main([*args, "--workdir", str(tmp_path / "rh")])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("rehearse: error:") and message in err
    assert not (tmp_path / "rh" / "rehearsal.json").exists()


def test_cli_process_help_and_bad_input():
    run = [sys.executable, str(SCRIPT)]
    help_ = subprocess.run([*run, "--help"], capture_output=True, text=True, cwd=REPO)
    assert help_.returncode == 0 and "example:" in help_.stdout and "--preempt-at" in help_.stdout
    bad = subprocess.run([*run, "nope.yaml"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr == "rehearse: error: recipe not found: nope.yaml\n"
