"""preprocess/tokenize.py and skyspot.units: every unit exactly once, the same bytes however
the work was split or interrupted.

The reference is one uninterrupted run of one worker with one process on a local dir. Every
other run must end with byte-identical parts and manifest: a SIGTERM with 2 processes and a
rerun; 3 workers at once; a worker SIGKILLed for good while the other takes its units;
SIGKILLs at random points on a live VM (the mount stays up, so the killed writer's
temporary file is closed and uploaded) and a lost VM (mount and cache gone) on a real
MOUNT_CACHED bucket; MOUNT. While those run, a sampler lists ``data/`` (through the S3 API
on the bucket) and checks, at every sample, that each name is a unit's and each object is
complete (the reference's size, and its bytes when first seen).
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from preprocessing import (
    FUSE_OK,
    FUSE_WHY,
    SCRIPT,
    SEQ_LEN,
    UNIT_ROWS,
    Sampler,
    argv,
    assert_same_as_reference,
    dir_lister,
    localstore,
    run_tokenize,
    wait_for_parts,
)

# ------------------------------------------------------------------- same bytes, any split


def test_sigterm_commits_what_is_in_flight_exits_143_and_two_processes_resume(corpus,
                                                                              tmp_path):
    """A preemption with 2 processes: no new unit starts, the ones in flight are committed,
    exit 143; the rerun (2 processes again) ends byte-identical to 1 process uninterrupted."""
    out = tmp_path / "out"
    sampler = Sampler(corpus, dir_lister(out / "data"), lambda n: (out / "data" / n).read_bytes())
    sampler.start()
    proc = subprocess.Popen(argv(corpus, out, "--num-proc", "2"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_parts(out, 4, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "preempted (SIGTERM)" in err, err[-2000:]
    committed = len(list((out / "data").glob("*.parquet")))
    assert 4 <= committed < len(corpus["files"]) - 1, committed
    assert not (out / "manifest.json").exists()
    run_tokenize(corpus, out, "--num-proc", "2", check=True)
    sampler.stop()
    assert_same_as_reference(corpus, out)
    assert not sampler.problems, sampler.problems[:5]


def test_three_workers_at_once_give_the_reference_bytes_each_unit_once(corpus, tmp_path):
    # Two workers: test_preprocess_rehearsed.py (a pool) and the lost-for-good test below.
    workers, out = 3, tmp_path / "out"
    sampler = Sampler(corpus, dir_lister(out / "data"), lambda n: (out / "data" / n).read_bytes())
    sampler.start()
    procs = [subprocess.Popen(argv(corpus, out, "--num-proc", "1", "--shard-index", str(rank),
                                   "--num-shards", str(workers)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(workers)]
    results = [proc.communicate(timeout=600) for proc in procs]
    sampler.stop()
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-2000:]
    assert_same_as_reference(corpus, out)
    assert sampler.samples > 5 and not sampler.problems, sampler.problems[:5]
    markers = sorted(p.name for p in (out / "_workers").iterdir())
    assert markers == [f"worker-{r}-of-{workers}" for r in range(workers)]


def test_a_worker_lost_for_good_has_its_units_taken_by_the_other(corpus, tmp_path):
    out = tmp_path / "out"
    lost = subprocess.Popen(argv(corpus, out, "--num-proc", "1", "--shard-index", "1",
                                 "--num-shards", "2"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_parts(out, 3, lost)
    lost.kill()  # SIGKILL, and it never comes back
    lost.wait()
    survivor = run_tokenize(corpus, out, "--num-proc", "1", "--shard-index", "0",
                            "--num-shards", "2", check=True)
    assert_same_as_reference(corpus, out)
    # Worker 1's share is the second half: worker 0 took what worker 1 had not committed.
    match = re.search(r"(\d+) unit\(s\) done here \((\d+) taken from other shares\), (\d+) "
                      r"found done", survivor.stderr)
    done, stolen, found = map(int, match.groups())
    units = len(corpus["files"]) - 1
    assert stolen > 0 and done + found == units, survivor.stderr[-1500:]


# ------------------------------------------------------------------- kills on a real bucket


@pytest.mark.skipif(not FUSE_OK, reason=f"needs FUSE: {FUSE_WHY}")
def test_sigkills_and_a_lost_vm_on_mount_cached_each_unit_once_nothing_partial(
        corpus, tmp_path, monkeypatch):
    rng = random.Random(14)
    bucket = "tok"
    with localstore.LocalObjectStore(tmp_path / "store") as store:
        store.create_bucket(bucket)
        monkeypatch.setenv("RCLONE_CONFIG", str(store.rclone_config))  # as on a node

        def mount(n: int):
            return store.mount(bucket, tmp_path / f"vm{n}" / "mnt",
                               cache_dir=tmp_path / f"vm{n}" / "cache", mode="MOUNT_CACHED",
                               mount_type="MODEL_CHECKPOINT_RW")

        def listed() -> dict[str, int]:  # through the S3 API: what any reader sees
            return {key[len("out/data/"):]: size
                    for key, size in store.list_objects(bucket).items()
                    if key.startswith("out/data/")}

        sampler = Sampler(corpus, listed,
                          lambda name: store.read_object(bucket, f"out/data/{name}"))
        sampler.start()
        vm, n_vm = mount(0), 0
        endings = []
        # Two SIGKILLs on a live VM and one lost VM, each after a random number of
        # committed units and a random fraction of a unit more; then a run to the end.
        plan = ["kill", "lose_vm", "kill", None]
        for fault in plan:
            out = vm.mount_point / "out"
            proc = subprocess.Popen(argv(corpus, out, "--num-proc", "1"),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if fault is None:
                _, err = proc.communicate(timeout=600)
                assert proc.returncode == 0, err[-3000:]
                break
            have = len(list((out / "data").glob("*.parquet"))) if (out / "data").is_dir() else 0
            wait_for_parts(out, have + rng.randint(1, 6), proc)
            time.sleep(rng.uniform(0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            endings.append(fault)
            if fault == "lose_vm":
                vm.lose_vm()  # the mount and its unuploaded cache are gone
                n_vm += 1
                vm = mount(n_vm)
            assert proc.returncode == -signal.SIGKILL
        vm.wait_uploaded(timeout_s=60)
        sampler.stop()
        final = {key[len("out/"):]: store.read_object(bucket, key)
                 for key in store.list_objects(bucket) if key.startswith("out/")}
        vm.unmount()
    want = corpus["files"]
    parts = {name: data for name, data in final.items() if name.startswith("data/")}
    assert sorted(parts) == sorted(n for n in want if n.startswith("data/"))
    assert all(parts[name] == want[name] for name in parts)
    assert final["manifest.json"] == want["manifest.json"]
    assert not [name for name in final if name.startswith("_tmp/")], "temporary files left"
    assert sampler.samples > 10 and not sampler.problems, sampler.problems[:5]
    assert 0 < sampler.most, "the sampler never saw a part while the run went on"


@pytest.mark.skipif(not FUSE_OK, reason=f"needs FUSE: {FUSE_WHY}")
def test_mount_mode_gives_the_reference_bytes(corpus, tmp_path, monkeypatch):
    with localstore.LocalObjectStore(tmp_path / "store") as store:
        store.create_bucket("tok")
        monkeypatch.setenv("RCLONE_CONFIG", str(store.rclone_config))
        vm = store.mount("tok", tmp_path / "mnt", cache_dir=tmp_path / "cache", mode="MOUNT")
        out = vm.mount_point / "out"
        proc = subprocess.Popen(argv(corpus, out, "--num-proc", "2"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_parts(out, 5, proc)
        proc.kill()
        proc.wait()
        run_tokenize(corpus, out, "--num-proc", "2", check=True)
        final = {key[len("out/"):]: store.read_object("tok", key)
                 for key in store.list_objects("tok") if key.startswith("out/")}
        vm.unmount()
    want = corpus["files"]
    assert {n: d for n, d in final.items() if n in want} == want
    assert sorted(n for n in final if n not in want) == ["_workers/worker-0-of-1", "plan.json"]


# ------------------------------------------------------------------- restart and bad input


def test_a_rerun_skips_committed_units_and_removes_its_leftover_temporary_files(corpus,
                                                                               tmp_path):
    out = tmp_path / "out"
    run_tokenize(corpus, out, "--num-proc", "1", check=True)
    (out / "manifest.json").unlink()  # as if the run had been killed before its last unit
    # What a killed writer leaves: a half-written file under a temporary name.
    (out / "_tmp").mkdir(exist_ok=True)
    (out / "_tmp" / "part-00003.parquet.w0-999.tmp").write_bytes(b"PAR1 half")
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet")}
    (out / "data" / "part-00003.parquet").unlink()
    del kept["part-00003.parquet"]
    proc = run_tokenize(corpus, out, "--num-proc", "1", check=True)
    assert "1 unit(s) done here" in proc.stderr, proc.stderr[-1500:]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet")
            if p.name in kept} == kept, "a committed unit was rewritten"
    assert_same_as_reference(corpus, out)


def test_a_complete_output_is_left_as_it_is(corpus):
    out = corpus["reference"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    proc = run_tokenize(corpus, out, "--num-proc", "1", check=True)
    assert ": already complete: 57 parts" in proc.stdout, proc.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr[-2000:]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return errors[0]


def test_bad_input_is_one_line_and_deletes_nothing(corpus, tmp_path):
    base = {**corpus}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "nocol.jsonl").write_text('{"body": "a"}\n')
    (bad / "empty.jsonl").write_text("")
    (bad / "blank.jsonl").write_text("\n\n")
    (bad / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    (bad / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "cut\n')
    cases = {
        "nocol.jsonl": "no column 'text'",
        "empty.jsonl": "the file is empty",
        "blank.jsonl": "no rows",
        "corrupt.parquet": "corrupt.parquet",
        "broken.jsonl": "line 2",
    }
    procs = {name: subprocess.Popen(argv({**base, "dataset": bad / name},
                                        tmp_path / f"out-{name}"),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in cases}
    for name, expected in cases.items():
        out, err = procs[name].communicate(timeout=300)
        line = one_line_error(subprocess.CompletedProcess([], procs[name].returncode, out, err))
        assert expected in line, (name, line)
        data = tmp_path / f"out-{name}" / "data"
        assert not data.exists() or not list(data.iterdir()), name
    # An output dir planned for other input keeps what it has and says so.
    out = tmp_path / "out"
    run_tokenize(corpus, out, "--num-proc", "1", check=True)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = one_line_error(run_tokenize(corpus, out, "--seq-len", "32"))
    assert "plan.json differs in: settings" in line, line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    line = one_line_error(run_tokenize(corpus, tmp_path / "o2", "--shard-index", "2",
                                       "--num-shards", "2"))
    assert "shard 2 of 2" in line, line
    line = one_line_error(subprocess.run([sys.executable, str(SCRIPT), "--bogus"],
                                         capture_output=True, text=True))
    assert "unrecognized arguments: --bogus" in line, line


def test_manifest_lists_every_part_with_its_rows_and_bytes(corpus):
    manifest = json.loads(corpus["files"]["manifest.json"])
    parts = {p["path"]: p for p in manifest["parts"]}
    assert sorted(parts) == sorted(n for n in corpus["files"] if n.startswith("data/"))
    for name, part in parts.items():
        assert part["bytes"] == len(corpus["files"][name])
    import pyarrow.parquet as pq

    rows = sum(pq.read_metadata(corpus["reference"] / n).num_rows for n in parts)
    info = manifest["info"]
    assert manifest["rows"] == rows == info["sequences"]
    assert info["tokens"] == info["sequences"] * SEQ_LEN + info["dropped_tail_tokens"]
    assert info["documents"] == len(corpus["dataset"].read_text().splitlines())
    assert info["seq_len"] == SEQ_LEN and len(info["tokenizer"]["sha256"]) == 64


def test_each_part_is_its_documents_tokens_with_eos_cut_into_sequences(corpus):
    """The packing itself, against the tokenizer called the plain way: unit k holds the
    documents [k*UNIT_ROWS, (k+1)*UNIT_ROWS), each followed by EOS, cut into rows of
    SEQ_LEN tokens, the tail dropped."""
    import pyarrow.parquet as pq
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(corpus["tokenizer"])
    texts = [json.loads(line)["text"] for line in corpus["dataset"].read_text().splitlines()]
    for unit in (0, 13, len(corpus["files"]) - 2):  # the first, one inside, the last
        docs = texts[unit * UNIT_ROWS:(unit + 1) * UNIT_ROWS]
        flat = [t for ids in tokenizer(docs)["input_ids"] for t in [*ids,
                                                                     tokenizer.eos_token_id]]
        table = pq.read_table(corpus["reference"] / "data" / f"part-{unit:05d}.parquet")
        rows = table.column("input_ids").to_pylist()
        kind = table.schema.field("input_ids").type
        assert (kind.list_size, kind.value_type) == (SEQ_LEN, "int32"), kind
        assert rows == [flat[i:i + SEQ_LEN] for i in range(0, len(flat) - SEQ_LEN + 1, SEQ_LEN)]
