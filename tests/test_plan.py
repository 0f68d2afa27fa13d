"""tools/plan.py: the checkpoint intervals and expected costs match the formulas worked by hand,
a trace whose right policy is known gives it, the real Bamboo trace replays end to end, and
bad input is one line with exit code 2.

Most runs call plan.main() in this process (SkyPilot's parser is imported once); the Bamboo
replay and the bad-input cases run the CLI as a user would.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import plan  # noqa: E402
from planning import interval as iv  # noqa: E402
from planning import prices  # noqa: E402
from planning.measured import read_rehearsal  # noqa: E402
from planning.policies import GreedySpot  # noqa: E402
from planning.prices import PriceError, load_prices  # noqa: E402
from planning.simulate import Job, simulate  # noqa: E402
from planning.traces import PoissonModel, load_trace  # noqa: E402

PLAN = REPO / "tools" / "plan.py"
BAMBOO = REPO / "traces" / "bamboo-p3.csv"  # MIT, copied into the repo with its licence
P3_OD, P3_SPOT = 3.06, 0.9731  # p3.2xlarge, the Can't Be Late paper's anchor


@pytest.fixture(scope="module")
def p3_recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "p3.yaml"
    path.write_text("name: p3\nresources:\n  infra: aws\n  accelerators: V100:1\n"
                    "  use_spot: true\nrun: python train.py\n")
    return path


def run_main(capsys, *args) -> dict:
    code = plan.main([*map(str, args), "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PLAN), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def by_policy(result: dict) -> dict:
    return {p["policy"]: p for p in result["policies"]}


# --- intervals ------------------------------------------------------------------------------

def test_daly_with_5_min_checkpoints_and_24_h_mtbf_is_116_69_min_and_young_120():
    c, m = 5 / 60, 24.0  # hours
    # sqrt(2 * 5 * 1440) = 120 min; C/2M = 5/2880; 120 * (1 + sqrt(5/2880)/3 + 5/2880/9) - 5
    assert iv.young(c, m) * 60 == pytest.approx(120.0, abs=1e-9)
    assert iv.daly(c, m) * 60 == pytest.approx(116.69, abs=0.005)
    assert iv.daly(3.0, 1.0) == 1.0  # C >= 2M: checkpoint every M


def test_interval_in_steps_and_on_demand_cost_by_hand(capsys, p3_recipe):
    # 24 h of work = 8640 steps x 10 s; C = 300 s; one preemption per 24 h.
    r = run_main(capsys, p3_recipe, "--steps", 8640, "--step-seconds", 10,
                 "--checkpoint-seconds", 300, "--restart-seconds", 0, "--changeover-hours",
                 0.1, "--preemptions-per-hour", 1 / 24, "--runs", 20)
    i = r["interval"]
    assert i["young_min"] == pytest.approx(120.0, abs=1e-6)
    assert i["daly_min"] == pytest.approx(116.69, abs=0.005)
    assert i["daly_steps"] == 700  # 116.69 min * 60 / 10 s
    assert i["simulated_from"] == "Daly"
    # On-demand (no periodic saves): one 0.1 h launch + 24 h = 24.1 h; * $3.06 = $73.746.
    assert r["formula"]["on_demand_h"] == pytest.approx(24.1)
    assert r["formula"]["on_demand_cost"] == pytest.approx(73.746)
    od = by_policy(r)["on-demand"]
    assert od["wall_h_mean"] == pytest.approx(24.1) and od["cost_mean"] == pytest.approx(73.746)
    # A policy that saves: 24 h / 1.9448 h -> 13 pieces, 12 saves of 5 min: 25.1 h of it.
    assert iv.on_demand_hours(24.0, 116.69 / 60, 5 / 60, 0.1) == pytest.approx(25.1)


# --- expected costs -------------------------------------------------------------------------

def test_greedy_spot_expected_cost_by_hand_and_simulated():
    # 2 h of work, a checkpoint of 0.1 h after the first hour, a launch of 0.25 h, Poisson
    # preemptions at 0.5/h. Pieces: 1.1 h (work + save) then 1.0 h.
    # First piece, from a launch: (e^(0.5 * (0.25 + 1.1)) - 1) / 0.5 = (1.96403 - 1) / 0.5
    #   = 1.92806 h.
    # Second, on the running instance: (1 - e^-0.5) * (1/0.5 + (e^(0.5 * 1.25) - 1) / 0.5)
    #   = 0.39347 * (2 + 1.73649) = 1.47020 h.
    # Expected 3.39826 h; at $0.9731/h: $3.3069.
    hours = iv.expected_spot_hours(2.0, 1.0, 0.1, 0.25, 0.5)
    assert hours == pytest.approx(3.39826, abs=1e-5)
    assert hours * P3_SPOT == pytest.approx(3.3069, abs=1e-4)

    job = Job(work_h=2.0, interval_h=1.0, checkpoint_h=0.1, restart_h=0.05, changeover_h=0.2,
              deadline_h=None, od_price=P3_OD, spot_price=P3_SPOT)
    model, dt, n = PoissonModel(0.5), 1 / 120, 1500
    walls = [simulate(GreedySpot(), model.market(random.Random(i), 1), job, dt, 100.0).wall_h
             for i in range(n)]
    mean = sum(walls) / n
    sem = math.sqrt(sum((w - mean) ** 2 for w in walls) / (n - 1) / n)
    # Preemptions are seen at tick boundaries: up to dt/2 later each (~1.7 of them a run).
    assert abs(mean - hours) < 3 * sem + dt, (mean, hours, sem)


def test_expected_lost_work_per_preemption():
    # Exp(lam) given X < s: 1/lam - s / (e^(lam s) - 1); lam = 0.5, s = 1.1: 2 - 1.1/0.73325
    assert iv.expected_lost_work(1.0, 0.1, 0.5) == pytest.approx(2 - 1.1 / math.expm1(0.55))
    assert iv.expected_lost_work(1.0, 0.1, 1e-9) == pytest.approx(0.55, abs=1e-6)  # ~ s/2
    assert iv.expected_lost_work(0.0, 0.0, 0.5) == 0.0  # progress never lost


# --- a trace with a known answer ------------------------------------------------------------

@pytest.fixture(scope="module")
def known_trace(tmp_path_factory) -> Path:
    """Spot for 4 h, gone for 10 h, back for 10 h, in ticks of 1 h."""
    path = tmp_path_factory.mktemp("trace") / "known.json"
    path.write_text(json.dumps({"metadata": {"gap_seconds": 3600},
                                "data": [1] * 4 + [0] * 10 + [1] * 10}))
    return path


def test_known_trace_greedy_misses_uniform_progress_meets_and_beats_on_demand(
        capsys, p3_recipe, known_trace):
    # 10 h of work, deadline 14 h, changeover 0.1 h, progress never lost (C = 0).
    r = run_main(capsys, p3_recipe, "--hours", 10, "--deadline-hours", 14, "--trace",
                 known_trace, "--offset-hours", 0, "--checkpoint-seconds", 0,
                 "--restart-seconds", 0, "--changeover-hours", 0.1, "--runs", 3)
    p = by_policy(r)
    # On-demand: 0.1 + 10 = 10.1 h * $3.06 = $30.906.
    assert p["on-demand"]["wall_h_mean"] == pytest.approx(10.1)
    assert p["on-demand"]["cost_mean"] == pytest.approx(30.906)
    # Greedy: 0.1 h launch + 3.9 h of work until spot goes at 4 h; waits to 14 h; 0.1 h
    # launch + 6.1 h: ends at 20.2 h, past the deadline. Paid (4 + 6.2) h * $0.9731 = $9.9256.
    assert p["greedy spot"]["wall_h_mean"] == pytest.approx(20.2)
    assert p["greedy spot"]["cost_mean"] == pytest.approx(9.92562)
    assert p["greedy spot"]["p_miss"] == 1.0
    # Fallback: on-demand at 4 h: 4 + 0.1 + 6.1 = 10.2 h; 4 * 0.9731 + 6.2 * 3.06 = $22.8644.
    assert p["spot, on-demand fallback"]["wall_h_mean"] == pytest.approx(10.2)
    assert p["spot, on-demand fallback"]["cost_mean"] == pytest.approx(22.8644)
    up = p["Uniform Progress"]
    assert up["p_miss"] == 0.0 and up["wall_h_mean"] <= 14.0
    assert up["cost_mean"] < p["on-demand"]["cost_mean"]
    assert up["spot_share"] == pytest.approx(0.39)  # the 3.9 h done on spot
    # Spot in [0, 14 h]: one 4 h stretch, less a 0.1 h changeover: 3.9 h of 10 at most.
    assert r["spot_share_bound"] == pytest.approx(0.39)
    assert r["verdict"].startswith("Spot pays")


def test_uniform_progress_uses_more_spot_than_greedy_under_a_tight_deadline(capsys, p3_recipe,
                                                                             tmp_path):
    # The Can't Be Late setup: 48 h of work, deadline 60 h (job fraction 0.8), d = 0.2 h,
    # progress kept at a preemption; a synthetic heavy-tailed trace, spot up ~65%.
    trace = tmp_path / "synthetic.json"
    subprocess.run([sys.executable, str(REPO / "tools" / "planning" / "synthetic.py"),
                    str(trace), "--hours", "800"], check=True, capture_output=True)
    r = run_main(capsys, p3_recipe, "--hours", 48, "--deadline-hours", 60, "--trace", trace,
                 "--checkpoint-seconds", 0, "--restart-seconds", 0, "--changeover-hours",
                 0.2, "--runs", 12)
    p = by_policy(r)
    assert p["greedy spot"]["p_miss"] > 0.5
    for name in ("greedy + safety net", "Uniform Progress", "on-demand"):
        assert p[name]["p_miss"] == 0.0, name
    assert p["Uniform Progress"]["spot_share"] > p["greedy + safety net"]["spot_share"]
    assert p["Uniform Progress"]["cost_mean"] < p["greedy + safety net"]["cost_mean"]


def test_a_plain_sentence_says_when_spot_does_not_pay(capsys, p3_recipe):
    common = ("--checkpoint-seconds", 300, "--restart-seconds", 0, "--changeover-hours", 0.1,
              "--runs", 5)
    # A preemption every 3 min of the job against 5 min saves and 6 min relaunches.
    r = run_main(capsys, p3_recipe, "--hours", 2, "--preemptions-per-hour", 20, *common)
    assert r["verdict"].startswith("Spot does not pay here: preemptions come every 0.05 h")
    # 10 h of work by 10.15 h: 0.05 h to spare over on-demand's 10.1 h.
    r = run_main(capsys, p3_recipe, "--hours", 10, "--deadline-hours", 10.15,
                 "--preemptions-per-hour", 0.5, *common)
    assert r["verdict"].startswith("Spot does not pay here: the deadline leaves 0.05 h")
    r = run_main(capsys, p3_recipe, "--hours", 10, "--deadline-hours", 9, *common)
    assert r["verdict"].startswith("No policy makes the 9 h deadline")


# --- real traces ----------------------------------------------------------------------------

def test_bamboo_trace_replays_end_to_end_through_the_cli():
    result = cli(REPO / "recipes" / "train-lm-spot.yaml", "--steps", 20000, "--step-seconds",
                 8.6, "--checkpoint-seconds", 5, "--restart-seconds", 90, "--trace", BAMBOO,
                 "--deadline-hours", 60, "--runs", 10, "--format", "json")
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    # The log's own nodes: 167 removals, median uptime 59 min, mean 1.46 h.
    assert "167 removals" in r["preemptions"]["model"]
    assert "median 59 min, mean 1.46 h" in r["preemptions"]["model"]
    assert 0.5 < r["preemptions"]["mtbf_h"] < 3.0  # a job of 1 node, replayed
    assert r["interval"]["trace_min"] and r["interval"]["trace_steps"]
    assert [p["policy"] for p in r["policies"]] == [
        "on-demand", "greedy spot", "spot, on-demand fallback", "greedy + safety net",
        "Uniform Progress"]
    greedy = by_policy(r)["greedy spot"]
    assert greedy["preemptions_mean"] > 10 and greedy["unfinished"] == 0
    assert r["lost_per_preemption"]["work_h_simulated"] > 0
    text = cli(REPO / "recipes" / "train-lm-spot.yaml", "--hours", 4, "--trace", BAMBOO,
               "--capacity", "--runs", 5)
    assert text.returncode == 0, text.stderr
    assert "capacity of bamboo-p3.csv" in text.stdout and "Uniform Progress" not in text.stdout


def test_trace_formats_event_log_and_timestamps(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("0,add,a\n0,add,b\n3600000,remove,a\n7200000,add,c\n10800000,remove,b\n")
    t = load_trace(log)
    assert t.kind == "events" and t.length_h == 3.0
    assert sorted(t.node_uptimes()) == [1.0, 3.0]  # c still up at the end: not an uptime
    assert [t.up_count(h) for h in (0.5, 1.5, 2.5)] == [2, 1, 2]
    stamps = tmp_path / "stamps.csv"
    stamps.write_text("time\n2024-01-01T00:00:00Z\n2024-01-01T02:00:00Z\n"
                      "2024-01-01T03:00:00Z\n")
    s = load_trace(stamps)
    assert s.kind == "preemptions" and s.gaps() == [2.0, 1.0]
    market = s.market(random.Random(0), 1, offset_h=0.5)
    market.launch(0.0)
    assert not market.lost(1.4) and market.lost(1.5)  # the 2 h preemption, 1.5 h in


# --- inputs ---------------------------------------------------------------------------------

def test_checkpoint_and_restart_seconds_come_from_rehearsal_json(tmp_path):
    doc = {"schema": "skyspot-rehearsal/2", "attempts": [
        {"started": 100.0, "ended": 200.0, "seconds_to_first_step": 12.0, "checkpoints": [
            {"seconds": 4.0, "async": True, "stall_seconds": 0.5},
            {"seconds": 3.0, "async": False}]},
        {"started": 203.0, "ended": 300.0, "seconds_to_first_step": 20.0, "checkpoints": [
            {"seconds": 5.0, "async": True, "stall_seconds": 0.7}]}]}
    path = tmp_path / "rehearsal.json"
    path.write_text(json.dumps(doc))
    m = read_rehearsal(path)
    assert m.checkpoint_s == 0.7  # median of the loop's waits: 0.5, 3.0 (sync), 0.7
    assert m.save_s == 4.0  # median of the whole saves
    assert m.restart_s == 23.0  # 203 - 200 to relaunch + 20 to the first step
    assert m.restarts == 1


def test_prices_sample_and_catalog_columns(tmp_path, monkeypatch):
    monkeypatch.setattr(prices, "CATALOG_ROOT", tmp_path / "no-catalog")
    table = load_prices()  # no SkyPilot catalog cached: the shipped sample
    assert "sample prices as of" in table.source
    assert table.hourly("V100", 1, spot=False) == P3_OD
    assert table.hourly("v100", 1, spot=True, cloud="aws") == P3_SPOT
    assert table.hourly("V100", 1, spot=True, cloud="gcp") is None
    assert table.hourly("NOPE", 1, spot=True) is None
    for gpu, n in [("L4", 1), ("A10G", 1), ("T4", 1), ("A10", 1), ("L4", 4), ("A10G", 4),
                   ("L4", 8), ("A10G", 8), ("A100-80GB", 8), ("H100", 8)]:  # the recipes'
        assert table.hourly(gpu, n, spot=True) and table.hourly(gpu, n, spot=False), gpu
    # A cached catalog wins; its directory names the cloud; the cheapest row is taken.
    vms = tmp_path / "catalogs" / "v8" / "gcp" / "vms.csv"
    vms.parent.mkdir(parents=True)
    vms.write_text("InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,"
                   "Price,SpotPrice,Region,AvailabilityZone\n"
                   "g2-standard-4,L4,1,4,16,,0.70,0.30,us-central1,us-central1-a\n"
                   "g2-standard-4,L4,1,4,16,,0.75,0.25,europe-west4,europe-west4-a\n")
    monkeypatch.setattr(prices, "CATALOG_ROOT", tmp_path / "catalogs")
    table = load_prices()
    assert table.source.startswith("SkyPilot catalog")
    assert table.hourly("L4", 1, spot=True, cloud="gcp") == 0.25
    assert table.hourly("L4", 1, spot=False, region="us-central1") == 0.70
    bad = tmp_path / "bad.csv"
    bad.write_text("InstanceType,Price\nx,1\n")
    with pytest.raises(PriceError, match="no column"):
        load_prices(bad)


# --- bad input ------------------------------------------------------------------------------

def one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_bad_input_is_one_line_and_exit_2(tmp_path, p3_recipe, known_trace):
    malformed = tmp_path / "malformed.json"
    malformed.write_text('{"metadata": {"gap_seconds": 600}, "data": [1, 1, "x"]}')
    log = tmp_path / "log.csv"
    log.write_text("0,add,a\n1000,remove,b\n")
    foo = tmp_path / "foo.yaml"
    foo.write_text("resources:\n  infra: aws\n  accelerators: FOO:1\n  use_spot: true\n"
                   "run: echo\n")
    cases = [
        ((tmp_path / "nope.yaml", "--hours", 1), "recipe not found"),
        ((p3_recipe, "--hours", 1, "--trace", tmp_path / "none.json"), "trace not found"),
        ((p3_recipe, "--hours", 1, "--trace", malformed), 'data[2] = \'x\''),
        ((p3_recipe, "--hours", 1, "--trace", log), "b removed but not up"),
        ((p3_recipe, "--hours", 1, "--preemptions-per-hour", -0.5), "must be >= 0"),
        ((p3_recipe, "--steps", 100), "--steps needs --step-seconds"),
        ((p3_recipe, "--hours", 1, "--rehearsal", tmp_path / "r.json"), "not found"),
        ((p3_recipe, "--hours", 1, "--trace", known_trace, "--offset-hours", 30), "past"),
        ((p3_recipe, "--hours", 1, "--bogus"), "unrecognized arguments"),
        ((foo, "--hours", 1), "no spot and on-demand price for any candidate"),
    ]
    for args, fragment in cases:
        one_line_error(cli(*args), fragment)
