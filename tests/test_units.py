"""skyspot.units' process pool and Abandoned, and skyspot.records' checks, on their own (the
scripts' tests exercise them end to end)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from skyspot import units
from skyspot.records import load_records
from skyspot.textdata import DatasetError

REPO = Path(__file__).resolve().parents[1]


class Rows:
    """A work function: the unit's row numbers as a one-column Parquet file."""

    def __call__(self, unit: units.Unit, temp: Path) -> dict:
        pq.write_table(pa.table({"row": list(range(unit.start, unit.stop))}), str(temp))
        return {"rows": unit.rows}


def test_a_pool_run_ends_every_time(tmp_path):
    """Pool.terminate() on idle processes hung now and then (they waited on the task queue's
    lock terminate() holds): one run in four under load, in CI a tokenize rerun that never
    ended. 25 runs of 2 processes in a row must all end."""
    script = textwrap.dedent(f"""
        import sys, tempfile
        from pathlib import Path
        sys.path.insert(0, {str(REPO / "tests")!r})
        from test_units import Rows
        from skyspot import units
        for i in range(25):
            root = Path(tempfile.mkdtemp(dir={str(tmp_path)!r}))
            out = units.Output(root, units.Worker())
            plan = units.plan_units([("a", 12)], 2)
            outcome = units.run(out, plan, Rows(), kind="t", summarize=lambda s: {{}},
                                num_proc=2)
            assert outcome.complete and len(outcome.done_here) == 6, outcome
        print("ended")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=240, cwd=REPO)
    assert proc.returncode == 0 and "ended" in proc.stdout, proc.stderr[-2000:]


def test_an_abandoned_unit_is_not_committed_and_is_redone(tmp_path):
    out = units.Output(tmp_path / "out", units.Worker())
    plan = units.plan_units([("a", 10)], 2)
    stopping = {"now": False}

    def work(unit: units.Unit, temp: Path) -> dict:
        Rows()(unit, temp)
        if unit.index == 2:  # a preemption notice arrives while unit 2 is being done
            stopping["now"] = True
            raise units.Abandoned
        return {"rows": unit.rows}

    first = units.run(out, plan, work, kind="t", summarize=lambda s: {},
                      stop=lambda: stopping["now"])
    assert first.preempted and not first.complete
    assert sorted(first.done_here) == [0, 1]
    assert sorted(p.name for p in (tmp_path / "out" / "data").iterdir()) == [
        "part-00000.parquet", "part-00001.parquet"]
    assert not list((tmp_path / "out" / "_tmp").glob("part-00002*")), "temporary file left"

    stopping["now"] = False
    second = units.run(out, plan, Rows(), kind="t", summarize=lambda s: {"n": len(s)})
    assert second.complete and sorted(second.done_here) == [2, 3, 4]
    rows = [r for p in sorted((tmp_path / "out" / "data").glob("*.parquet"))
            for r in pq.read_table(p).column("row").to_pylist()]
    assert rows == list(range(10))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["info"] == {"n": 5}


# ---------------------------------------------------------------------------- records


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_records_load_every_file_in_order_with_their_ids(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"id": "x3", "text": "c"}])
    write_jsonl(tmp_path / "a.jsonl", [{"id": "x1", "text": "a", "extra": 1},
                                       {"id": "x2", "text": "b", "extra": 2}])
    records = load_records(str(tmp_path), "id", "text")
    assert records.names == ["a.jsonl", "b.jsonl"] and len(records) == 3
    assert records.sources() == [("a.jsonl", 2), ("b.jsonl", 1)]
    assert records.rows(0, 1, 2) == (["x2"], ["b"])
    assert records.id_type() == pa.string()


@pytest.mark.parametrize("files, args, message", [
    ({"a.jsonl": [{"id": 1, "text": "a"}], "b.jsonl": [{"id": 2, "text": "b"},
                                                       {"id": 1, "text": "c"}]},
     ("id", "text"), "id 1 appears 2 times ("),
    ({"a.jsonl": [{"uid": 1, "text": "a"}]}, ("id", "text"),
     "no id column 'id' (columns: uid, text); pass --id-column"),
    ({"a.jsonl": [{"id": 1, "body": "a"}]}, ("id", "text"), "pass --text-column"),
    ({"a.jsonl": [{"id": 1, "text": "a"}, {"id": None, "text": "b"}]}, ("id", "text"),
     "record 2: id 'id' is missing"),
    ({"a.jsonl": [{"id": 1.5, "text": "a"}]}, ("id", "text"), "ids must be integers or strings"),
    ({"a.jsonl": [{"id": 1, "text": "a"}], "b.jsonl": [{"id": "2", "text": "b"}]},
     ("id", "text"), "integers in some files and strings in others"),
])
def test_records_refuse_bad_input_in_one_line_naming_where(tmp_path, files, args, message):
    for name, rows in files.items():
        write_jsonl(tmp_path / name, rows)
    with pytest.raises(DatasetError) as err:
        load_records(str(tmp_path), *args)
    assert message in str(err.value) and "\n" not in str(err.value)
    if "appears" in message:
        assert "a.jsonl record 1, " in str(err.value) and "b.jsonl record 2)" in str(err.value)


def test_records_refuse_an_empty_dataset_and_txt_files(tmp_path):
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(DatasetError, match="empty"):
        load_records(str(tmp_path / "empty.parquet"), "id", "text")
    pq.write_table(pa.table({"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())}),
                   tmp_path / "none.parquet")
    with pytest.raises(DatasetError, match="no records"):
        load_records(str(tmp_path / "none.parquet"), "id", "text")
    (tmp_path / "t.txt").write_text("hello\n")
    with pytest.raises(DatasetError, match="no id column"):
        load_records(str(tmp_path / "t.txt"), "id", "text")


def test_a_temporary_file_the_mount_loses_is_redone_and_losing_it_again_and_again_fails(
        tmp_path):
    """Seen on an rclone mount without a cache, under load: a unit's temporary file gone
    before its commit. The unit is not committed, so it is redone; the third loss of the same
    unit is an error, not a loop."""
    losses = {"left": 1}

    def lossy(unit: units.Unit, temp: Path) -> dict:
        stats = Rows()(unit, temp)
        if unit.index == 1 and losses["left"]:
            losses["left"] -= 1
            temp.unlink()
            raise FileNotFoundError(2, "No such file or directory", str(temp))
        return stats

    out = units.Output(tmp_path / "out", units.Worker())
    plan = units.plan_units([("a", 6)], 2)
    outcome = units.run(out, plan, lossy, kind="t", summarize=lambda s: {})
    assert outcome.complete and outcome.vanished == {1: 1}
    assert sorted(outcome.done_here) == [0, 1, 2]

    losses["left"] = 99
    again = units.Output(tmp_path / "again", units.Worker())
    with pytest.raises(FileNotFoundError):
        units.run(again, plan, lossy, kind="t", summarize=lambda s: {})
    assert "part-00001.parquet" not in {p.name for p in (tmp_path / "again/data").iterdir()}
