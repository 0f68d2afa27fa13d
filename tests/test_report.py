"""tools/report.py: goodput, lost work, checkpoint overhead and cost, hand-computed on small
event lists; the same figures as rehearse's own on a real rehearsal (a lost VM),
from its workdir and from the run's directory in its bucket; a batch job's units over time;
bad input is one line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from trainer import rehearse

from skyspot import units

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "tools" / "report.py"
sys.path.insert(0, str(REPO / "tools"))
from reporting.runs import Attempt  # noqa: E402

PRICES = "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,"\
         "Region,AvailabilityZone\nx1.gpu,L4,1,4,16,L4,1.00,0.40,us-east-1,us-east-1a\n"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def report(*args, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPORT), *map(str, args)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def report_json(*args) -> dict:
    return json.loads(report(*args, "--format", "json").stdout)


def write_events(run_dir: Path, events: list[dict]) -> Path:
    """Events as the trainer persists them: immutable segments under <run>/events/."""
    (run_dir / "events").mkdir(parents=True)
    lines = "\n".join(json.dumps(e) for e in events) + "\n"
    (run_dir / "events" / "0000000001000-1-00000.jsonl").write_text(lines)
    return run_dir


def ev(time: float, event: str, **fields) -> dict:
    return {"time": time, "event": event, **fields}


# Attempt 1 runs steps 0-25 (1 s a step, the loop waits 0.5 s for each of two saves), its VM
# is lost with no exit event; attempt 2 resumes from step 10, the newest step the bucket had.
TWO_ATTEMPTS = [
    ev(1000, "start", step=0, run_name="r"),
    ev(1005, "log", step=5), ev(1010, "log", step=10),
    ev(1011, "checkpoint", step=10, stall_seconds=0.5, durable_step=5, lag_steps=5),
    ev(1015.5, "log", step=15), ev(1020.5, "log", step=20),
    ev(1021, "checkpoint", step=20, stall_seconds=0.5, durable_step=10, lag_steps=10),
    ev(1025.5, "log", step=25),
    ev(1100, "resumed", step=10), ev(1100, "start", step=10, run_name="r"),
    ev(1105, "log", step=15), ev(1110, "log", step=20),
    ev(1110.2, "checkpoint", step=20, stall_seconds=0.2, durable_step=10, lag_steps=10),
    ev(1120, "exit", code=0, step=20, durable_step=20),
]


def test_time_at_interpolates_between_the_known_steps():
    a = Attempt(index=1, points=[(0, 100.0), (10, 110.0), (20, 130.0)])
    assert (a.time_at(5), a.time_at(15), a.time_at(20), a.time_at(25)) == (105, 120, 130, 130)


def test_goodput_lost_steps_and_overhead_of_a_run_dir_are_the_hand_computed_ones(tmp_path):
    write_events(tmp_path / "ckpt" / "r", TWO_ATTEMPTS)
    prices = tmp_path / "prices.csv"
    prices.write_text(PRICES)
    # The checkpoint dir holding one run is read as that run.
    got = report_json(tmp_path / "ckpt", "--out", tmp_path / "r.png", "--prices", prices,
                      "--accelerator", "L4:1")
    acc = got["accounting"]
    assert [a["ending"] for a in got["attempts"]] == ["lost", "exited"]
    # wall 1000 -> 1120. Attempt 1 kept step 10 (where attempt 2 resumed): useful 1000 ->
    # 1010, no save before step 10; steps 10-25 redone: 1010 -> 1025.5 less 2 x 0.5 s of
    # stalls. Attempt 2: useful 1100 -> 1110; its save at the last step falls in the tail,
    # 1110 -> 1120 less 0.2 s. Billed: 25.5 s + 20 s; the rest of the wall is the gap.
    assert acc["wall"] == pytest.approx(120)
    assert acc["useful"] == pytest.approx(20)
    assert acc["goodput"] == pytest.approx(20 / 120)
    assert acc["lost_steps"] == 15 and acc["lost"] == pytest.approx(14.5)
    assert acc["tail"] == pytest.approx(9.8) and acc["startup"] == 0
    assert acc["gaps"] == pytest.approx(120 - 45.5)
    assert acc["useful_steps"] == 20 and acc["steps_executed"] == 35
    assert acc["stall"] == pytest.approx(1.2)
    assert acc["stall_share_wall"] == pytest.approx(0.01)
    assert acc["stall_share_loop"] == pytest.approx(1.2 / 35.5)
    assert acc["restarts"] == 1 and acc["preemptions"]["lost"] == 1
    assert acc["max_lag_steps"] == 10
    # Spot: 45.5 s billed at $0.40/h. On-demand: the same work uninterrupted, 10 + 10 s of
    # useful training + attempt 2's 9.8 s tail, at $1.00/h.
    cost = got["cost"]
    assert cost["spot"] == pytest.approx(45.5 / 3600 * 0.40)
    assert cost["on_demand"] == pytest.approx(29.8 / 3600 * 1.00)
    assert cost["saving"] == pytest.approx(1 - (45.5 * 0.40) / (29.8 * 1.00))
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC


def test_a_rehearsal_counts_startup_and_names_faults_as_rehearse_does(tmp_path):
    # Launched at 0; the trainer starts at 30, reaches step 10 at 40 and is SIGTERMed: it
    # saves step 10 (stall 1 s) and the VM is gone at 50. Relaunched at 52, starts at 80 from
    # step 10, ends at 100 at step 20 (the final save stalls 1 s; exit at 95).
    summary = {"schema": "skyspot-rehearsal/2", "status": "SUCCEEDED", "num_nodes": 2,
               "recipe": None, "skyspot_events": True, "attempts": [
                   {"started": 0, "ended": 50, "ending": "preempted:term", "exit_codes": [143],
                    "fault": {"kind": "term", "at": 39.5}, "run_name": "r"},
                   {"started": 52, "ended": 100, "ending": "exited", "exit_codes": [0],
                    "fault": None, "run_name": "r"}]}
    (tmp_path / "events").mkdir()
    events = [ev(30, "start", step=0), ev(40, "step", step=10),
              ev(41, "checkpoint", step=10, stall_seconds=1.0, durable_step=None),
              ev(41, "preemption", step=10, reason="SIGTERM"), ev(45, "exit", code=143, step=10),
              ev(80, "resumed", step=10), ev(80, "start", step=10), ev(90, "step", step=20),
              ev(91, "checkpoint", step=20, stall_seconds=1.0, durable_step=10),
              ev(95, "exit", code=0, step=20, durable_step=20)]
    (tmp_path / "events" / "node0.jsonl").write_text("".join(json.dumps(e) + "\n"
                                                             for e in events))
    (tmp_path / "rehearsal.json").write_text(json.dumps(summary))
    prices = tmp_path / "prices.csv"
    prices.write_text(PRICES)
    got = report_json(tmp_path, "--out", tmp_path / "r.png", "--prices", prices,
                      "--accelerator", "L4:1")
    acc = got["accounting"]
    assert acc["preemptions"]["term"] == 1 and acc["lost_steps"] == 0
    assert acc["startup"] == pytest.approx(30 + 28)
    assert acc["useful"] == pytest.approx(10 + 10)
    assert acc["tail"] == pytest.approx((50 - 40 - 1) + (100 - 90 - 1))
    assert acc["gaps"] == pytest.approx(2)
    assert acc["goodput"] == pytest.approx(20 / 100)
    # 2 nodes. Uninterrupted: attempt 1's startup (30) + 20 s useful + the last tail (9).
    assert got["cost"]["spot"] == pytest.approx(2 * 98 / 3600 * 0.40)
    assert got["cost"]["on_demand"] == pytest.approx(2 * 59 / 3600 * 1.00)


def test_units_done_over_time_from_a_unit_output(tmp_path):
    out = tmp_path / "tok"
    (out / units.DATA).mkdir(parents=True)
    (out / units.PLAN).write_text(json.dumps({"format": units.FORMAT, "units": 4,
                                              "kind": "tokenize"}))
    t0 = 1_700_000_000
    os.utime(out / units.PLAN, (t0, t0))
    for unit, after in ((0, 10), (1, 20), (3, 30)):
        part = out / units.DATA / f"part-{unit:05d}.parquet"
        part.write_bytes(b"x")
        os.utime(part, (t0 + after, t0 + after))
    (out / units.DATA / "part-00009.parquet").write_bytes(b"x")  # not a unit of this plan
    got = report_json(out, "--out", tmp_path / "u.png")
    acc = got["accounting"]
    assert (acc["units_done"], acc["units_total"], acc["wall"]) == (3, 4, 30)
    assert acc["units_per_minute"] == pytest.approx(60 * 2 / 20)
    assert got["units"]["complete"] is False and got["cost"] is None
    assert (tmp_path / "u.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("case", ["missing", "empty dir", "empty events", "not json",
                                  "bad accelerator", "missing prices", "bad prices"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path):
    run = write_events(tmp_path / "r", TWO_ATTEMPTS)
    args = {
        "missing": [tmp_path / "nope"],
        "empty dir": [tmp_path / "empty"],
        "empty events": [tmp_path / "e"],
        "not json": [tmp_path / "rehearsal.json"],
        "bad accelerator": [run, "--accelerator", "L4:x"],
        "missing prices": [run, "--accelerator", "L4:1", "--prices", tmp_path / "none.csv"],
        "bad prices": [run, "--accelerator", "L4:1", "--prices", tmp_path / "bad.csv"],
    }[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "e" / "events").mkdir(parents=True)
    (tmp_path / "e" / "events" / "a-0.jsonl").write_text("")
    (tmp_path / "rehearsal.json").write_text("{not json")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    result = report(*args, "--out", tmp_path / "x.png", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("tools/report.py: "), result.stderr
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------- a real rehearsal

JOB = {"CHECKPOINT_BUCKET": "ckpt", "FROM_SCRATCH": "true", "SEQ_LEN": "32", "BATCH_SIZE": "2",
       "GRAD_ACCUM": "1", "MAX_STEPS": "20", "MIXED_PRECISION": "no",
       "CHECKPOINT_EVERY_STEPS": "4", "CHECKPOINT_EVERY_MINUTES": "0", "LOG_EVERY": "4",
       "NOTICE_POLL_SECONDS": "0"}


@pytest.fixture(scope="module")
def rehearsed(tiny_assets, tmp_path_factory) -> tuple[Path, dict]:
    """train-lm-spot.yaml rehearsed through a lost VM at step 12 (~1.5 min on 2 cores: each
    attempt's startup is most of it, so one fault; the SIGTERM path is the test above)."""
    workdir = tmp_path_factory.mktemp("report") / "rh"
    job = {**JOB, "MODEL": str(tiny_assets / "model"), "DATASET": str(tiny_assets / "data")}
    result, summary = rehearse("recipes/train-lm-spot.yaml", workdir, job, "--gpus-per-node",
                               "1", "--preempt-at", "step:12:kill", timeout_s=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir, summary


def test_a_rehearsed_run_gives_a_png_and_rehearses_own_figures(rehearsed, tmp_path):
    workdir, summary = rehearsed
    totals = summary["totals"]
    png = tmp_path / "report.png"
    got = report_json(workdir, "--out", png)
    acc = got["accounting"]
    assert [a["ending"] for a in got["attempts"]] == ["preempted:kill", "exited"]
    assert acc["preemptions"] == {"term": 0, "kill": 1, "notice": 0, "proc": 0, "lost": 0}
    assert acc["restarts"] == 1 and acc["lost_steps"] == totals["steps_lost"]
    assert acc["steps_executed"] == totals["steps_executed"]
    assert acc["step_goodput"] == pytest.approx(totals["goodput"], abs=1e-4)
    assert acc["checkpoints"] == totals["checkpoints"]["count"]
    assert acc["wall"] == pytest.approx(totals["wall_seconds"], abs=0.5)
    # The six parts of the wall time add up to it; goodput is the useful part.
    parts = sum(acc[k] for k in ("startup", "useful", "stall", "lost", "tail", "gaps"))
    assert parts == pytest.approx(acc["wall"], rel=0.01)
    assert 0 < acc["goodput"] < 1 and acc["goodput"] == pytest.approx(acc["useful"] / acc["wall"])
    # The recipe's candidates are priced (the cheapest spot one), from the cached catalog or
    # the shipped sample.
    assert got["cost"]["spot"] > 0 and got["cost"]["on_demand"] > 0
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000

    text = report(workdir, "--out", png).stdout
    for label in ("goodput:", "lost work:", "checkpoint overhead:", "cost:", "attempts:"):
        assert label in text, text
    markdown = report(workdir, "--out", png, "--format", "markdown").stdout
    assert f"![timeline]({png})" in markdown and "| goodput |" in markdown


def test_the_same_run_read_from_its_bucket(rehearsed, tmp_path):
    """The run directory in the bucket: the trainer's persisted events only. A lost VM takes
    its unflushed events along, so lost steps can only be fewer than rehearse saw."""
    workdir, summary = rehearsed
    run_name = summary["attempts"][0]["run_name"]
    (run_dir,) = Path(summary["storage"]["data_dir"]).glob(f"ckpt/{run_name}")
    got = report_json(run_dir, "--out", tmp_path / "bucket.png", "--accelerator", "L4:1")
    acc = got["accounting"]
    # The lost VM's events reach the bucket only with checkpoints that were uploaded.
    assert got["source"] == "run directory" and 1 <= len(got["attempts"]) <= 2
    assert got["attempts"][-1]["ending"] == "exited"
    assert got["attempts"][-1]["last_step"] == summary["totals"]["final_step"]
    assert 0 <= acc["lost_steps"] <= summary["totals"]["steps_lost"]
    assert 0 < acc["goodput"] < 1
