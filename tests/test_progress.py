"""tools/progress.py counts what an exactly-once unit output holds, per shard and overall.

The output dirs are made by running preprocess/tokenize.py on the tiny assets (worker 0 of
2: it does its share, then takes worker 1's). States before completion are that output with
committed parts taken away (they are not committed yet) and temporary files added, and the
numbers printed are checked against the files there. The same dirs are then read through
the S3 API of a real local server (tools/localstore.py: rclone serve s3).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from skyspot import units

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import localstore  # noqa: E402

PROGRESS = REPO / "tools" / "progress.py"
UNIT_ROWS = 150  # 2,805 documents -> 19 units; 2 shards own units 0-8 and 9-18
UNITS = 19
PART = re.compile(r"^part-(\d{5,})\.parquet$")


def progress(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROGRESS), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=120)


def report(*args, env: dict | None = None) -> dict:
    result = progress(*args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def one_line_error(result: subprocess.CompletedProcess, fragment: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    return lines[0]


def on_disk(out: Path, num_shards: int) -> dict:
    """What the files say: the done units per shard and overall, the temporary files."""
    done = {int(m[1]) for p in (out / "data").iterdir() if (m := PART.match(p.name))}
    shards = [sorted(set(units.share(UNITS, units.Worker(rank, num_shards))) - done)
              for rank in range(num_shards)]
    temps = [p for p in (out / "_tmp").glob("*.tmp")] if (out / "_tmp").is_dir() else []
    return {"done": len(done), "missing": shards, "temp_files": len(temps)}


@pytest.fixture(scope="module")
def tokenized(tiny_assets, tmp_path_factory) -> tuple[Path, list]:
    """(a complete output dir, the progress.py --json runs taken while its worker ran)."""
    out = tmp_path_factory.mktemp("progress") / "ts"
    log = out.parent / "worker.log"
    with open(log, "w") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "preprocess/tokenize.py", "--dataset",
             tiny_assets / "data" / "train.jsonl", "--tokenizer", tiny_assets / "model",
             "--seq-len", "64", "--unit-rows", str(UNIT_ROWS), "--num-proc", "1",
             "--shard-index", "0", "--num-shards", "2", "--output-dir", out,
             "--notice-poll-seconds", "0"], cwd=REPO, stdout=log_file,
            stderr=subprocess.STDOUT)
        polls = []
        while worker.poll() is None:
            if out.exists():  # not before: importing transformers takes the worker seconds
                polls.append(progress(out, "--json"))
            time.sleep(0.05)
    assert worker.wait() == 0, log.read_text()
    return out, polls


@pytest.fixture
def partial(tokenized, tmp_path) -> Path:
    """The output as it is mid-run: 7 units not committed yet, 2 of them being written."""
    out = tmp_path / "ts"
    shutil.copytree(tokenized[0], out)
    (out / "manifest.json").unlink()
    for unit in (2, 3, 8, 15, 16, 17, 18):
        (out / "data" / f"part-{unit:05d}.parquet").unlink()
    (out / "_tmp").mkdir(exist_ok=True)
    half = (tokenized[0] / "data" / "part-00015.parquet").read_bytes()
    (out / "_tmp" / "part-00015.parquet.w1-4242.tmp").write_bytes(half[: len(half) // 2])
    (out / "_tmp" / "part-00002.parquet.w0-77.tmp").write_bytes(b"")
    (out / "_workers" / "worker-1-of-2").touch()
    return out


def test_progress_reads_a_running_worker_and_never_crashes(tokenized):
    out, polls = tokenized
    assert polls, "the worker ended before a single poll"
    seen = []
    for poll in polls:
        assert "Traceback" not in poll.stderr, poll.stderr
        if poll.returncode == 2:  # before the worker made the dir and wrote plan.json
            assert not seen, "plan.json went away"
            assert re.search(r"no such directory$|no plan\.json", one_line_error(poll, ""))
            continue
        assert poll.returncode == 0, poll.stderr
        got = json.loads(poll.stdout)
        assert got["total"] == UNITS and 0 <= got["done"] <= UNITS
        assert got["done"] == sum(shard["done"] for shard in got["shards"])
        assert [s["total"] for s in got["shards"]] == [9, 10]
        assert got["complete"] is False or got["done"] == UNITS
        seen.append(got["done"])
    assert seen == sorted(seen), f"done went backwards: {seen}"
    final = report(out)
    assert final["complete"] and final["done"] == UNITS and final["temp_files"] == 0


def test_partial_output_counts_each_shard_and_the_temp_files(partial):
    truth = on_disk(partial, 2)
    assert truth == {"done": 12, "missing": [[2, 3, 8], [15, 16, 17, 18]], "temp_files": 2}
    got = report(partial)
    assert got["num_shards"] == 2 and got["shards_from"] == "markers"
    assert [s["units"] for s in got["shards"]] == [[0, 9], [9, 19]]
    assert [s["missing"] for s in got["shards"]] == truth["missing"]
    assert [s["done"] for s in got["shards"]] == [6, 6]
    assert [s["started"] for s in got["shards"]] == [True, True]
    assert (got["done"], got["total"], got["percent"]) == (12, UNITS, 63.2)
    assert got["temp_files"] == 2 and got["complete"] is False and got["manifest"] is None

    text = progress(partial)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == f"{partial}: tokenize, 19 units of {UNIT_ROWS} rows from 1 source"
    assert lines[1:] == [
        "shards: 2 (from the _workers markers)",
        "  shard 0: 6/9 units (66.7%), units 0-8, missing 2-3, 8",
        "  shard 1: 6/10 units (60.0%), units 9-18, missing 15-18",
        "overall: 12/19 units (63.2%)",
        "temporary files in flight: 2",
        "complete: no (no manifest.json yet)"]


def test_complete_output_shows_the_manifest_totals(tokenized):
    out = tokenized[0]
    manifest = json.loads((out / "manifest.json").read_text())
    info = manifest["info"]
    got = report(out)
    assert got["complete"] and (got["done"], got["percent"]) == (UNITS, 100.0)
    assert got["manifest"] == {key: manifest[key] for key in ("units", "rows", "bytes", "info")}
    # Only worker 0 ran, and did worker 1's share too.
    assert [(s["done"], s["started"]) for s in got["shards"]] == [(9, True), (10, False)]

    text = progress(out).stdout
    assert f"complete: yes (manifest.json: {UNITS} parts, {manifest['rows']:,} rows" in text
    totals = next(line for line in text.splitlines() if line.startswith("totals: "))
    for key in ("tokens", "sequences", "documents"):
        assert f"{key} {info[key]:,}" in totals
    assert "has not started" not in text  # done shards need no worker
    assert "overall: 19/19 units (100.0%)" in text


def test_number_of_shards_from_option_markers_or_default(partial):
    got = report(partial, "--num-shards", "3")
    assert got["shards_from"] == "--num-shards"
    assert [s["units"] for s in got["shards"]] == [[0, 6], [6, 12], [12, 19]]
    assert [s["missing"] for s in got["shards"]] == on_disk(partial, 3)["missing"]
    assert [s["started"] for s in got["shards"]] == [False, False, False]  # markers say 2

    (partial / "_workers" / "worker-2-of-3").touch()  # a worker started with another count
    got = report(partial)
    assert (got["num_shards"], got["shards_from"], got["marker_counts"]) == (
        3, "markers disagree", [2, 3])
    assert got["shards"][2]["started"] is True
    text = progress(partial).stdout
    assert "shards: 3 (the largest in the _workers markers, which disagree: 2, 3 workers)" in text
    assert "  shard 1: 5/6 units (83.3%), units 6-11, missing 8; its worker has not started" \
        in text

    shutil.rmtree(partial / "_workers")
    got = report(partial)
    assert (got["num_shards"], got["shards_from"]) == (1, "default")
    assert got["shards"][0]["missing"] == [2, 3, 8, 15, 16, 17, 18]
    assert got["shards"][0]["started"] is None  # no markers: not known
    assert "one worker assumed" in progress(partial).stdout


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_s3_output_is_read_through_the_s3_api(tokenized, partial, tmp_path):
    with localstore.LocalObjectStore(tmp_path / "store") as store:
        store.create_bucket("progress")
        store.rclone("copy", str(partial), f"{store.remote}:progress/runs/ts")
        store.rclone("copy", str(tokenized[0]), f"{store.remote}:progress/done/ts")
        assert "runs/ts/_workers/worker-1-of-2" in store.list_objects("progress")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("AWS_") and k != "RCLONE_CONFIG"}
        env |= {"AWS_ACCESS_KEY_ID": store.access_key,
                "AWS_SECRET_ACCESS_KEY": store.secret_key}
        local = report(partial)

        got = report("s3://progress/runs/ts", "--endpoint-url", store.endpoint, env=env)
        assert got["output"] == "s3://progress/runs/ts"
        assert {**got, "output": None} == {**local, "output": None}
        text = progress("s3://progress/runs/ts/", env={**env, "AWS_ENDPOINT_URL":
                                                        store.endpoint})
        assert text.returncode == 0, text.stderr
        assert "overall: 12/19 units (63.2%)" in text.stdout
        assert "temporary files in flight: 2" in text.stdout

        done = report("s3://progress/done/ts", env={**env, "AWS_ENDPOINT_URL_S3":
                                                    store.endpoint})
        assert {**done, "output": None} == {**report(tokenized[0]), "output": None}
        assert done["complete"] and done["manifest"]["info"]["tokens"] > 0

        endpoint = ["--endpoint-url", store.endpoint]
        one_line_error(progress("s3://progress/runs", *endpoint, env=env), "no plan.json")
        one_line_error(progress("s3://no-such-bucket/ts", *endpoint, env=env),
                       "directory not found")
        wrong = {**env, "AWS_SECRET_ACCESS_KEY": "x" * 40}
        one_line_error(progress("s3://progress/runs/ts", *endpoint, env=wrong), "403")
    started = time.monotonic()
    one_line_error(progress("s3://progress/runs/ts", "--endpoint-url",
                            f"http://127.0.0.1:{_closed_port()}", env=env),
                   "connection refused")
    assert time.monotonic() - started < 20  # one try, not rclone's minutes of retries


@pytest.mark.parametrize("case, fragment", [
    ("missing", "no such directory"),
    ("file", "not a directory"),
    ("empty", "not a skyspot unit output (no plan.json); has a worker started"),
    ("not json", "plan.json: malformed"),
    ("other format", "plan.json: malformed (format 'something/2'"),
    ("no unit count", "plan.json: malformed (units: 'ten'"),
    ("bad manifest", "manifest.json: malformed"),
    ("zero shards", "--num-shards"),
    ("no bucket", "no bucket"),
    ("other scheme", "only local paths and s3:// are read"),
])
def test_bad_input_is_one_line_and_exit_2(case, fragment, tokenized, tmp_path):
    out, args = tmp_path / "out", []
    plan = json.loads((tokenized[0] / "plan.json").read_text())
    if case == "file":
        out.write_text("x")
    elif case != "missing":
        out.mkdir()
    if case == "not json":
        (out / "plan.json").write_text('{"format": "skyspot.units/1", "units": ')
    elif case == "other format":
        (out / "plan.json").write_text(json.dumps({**plan, "format": "something/2"}))
    elif case == "no unit count":
        (out / "plan.json").write_text(json.dumps({**plan, "units": "ten"}))
    elif case == "bad manifest":
        (out / "plan.json").write_text(json.dumps(plan))
        (out / "manifest.json").write_text("[")
    elif case == "zero shards":
        args = ["--num-shards", "0"]
    target = {"no bucket": "s3://", "other scheme": "gs://bucket/ts"}.get(case, out)
    one_line_error(progress(target, *args), fragment)
