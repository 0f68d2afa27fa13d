"""`make bench-lag`: how far a capped MOUNT_CACHED bucket lags the trainer, with and without
skipping periodic saves while the previous checkpoint is still uploading.

    python tools/bench_lag.py --workdir runs/bench-lag [--bwlimit 8M] [--max-steps 90]

Both variants run the same train/lm.py job (tiny model on CPU, a 15 MB checkpoint every 3
optimizer steps, async saves) in the same run, each on its own fresh bucket of one local S3
server, mounted with SkyPilot's MOUNT_CACHED flags and uploads capped at --bwlimit:

- skip (the default): a periodic save is skipped while the previous one is not yet whole
  in the bucket (train/lm.py; skyspot.checkpoint.Checkpointer.backlog).
- baseline (``--save-while-uploading``): every periodic save is taken and queues for upload.

Every 0.25 s it reads the bucket through the S3 API (never the mount) and takes the newest
checkpoint whose manifest and every listed file are there at their listed sizes. Reported:
steps the trainer is ahead of that checkpoint (max and time-mean: the progress a lost VM
would cost), the node's VFS cache at its largest (what is waiting for upload), and seconds
from the last optimizer step until the bucket held the final checkpoint. Ratios are
skip / baseline; lower is better.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))
import localstore  # noqa: E402

SAMPLE_S = 0.25  # seconds between samples of the bucket and the trainer


def newest_complete(store: localstore.LocalObjectStore, bucket: str, run: str) -> int | None:
    """Newest step whose manifest and listed files are all in the bucket at full size."""
    objects = store.list_objects(bucket, run + "/")
    best = None
    for key in objects:
        if not key.endswith("/manifest.json"):
            continue
        directory = key.rpartition("/")[0]
        try:
            manifest = json.loads(store.read_object(bucket, key))
        except (FileNotFoundError, ValueError):
            continue
        if all(objects.get(f"{directory}/{f['path']}") == f["size"] for f in manifest["files"]):
            best = max(best or 0, manifest["step"])
    return best


def last_step(events: Path) -> int:
    step = 0
    if events.exists():
        for line in events.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line being written
            if event.get("event") == "step":
                step = event["step"]
    return step


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_variant(store, workdir: Path, assets: Path, name: str, args: argparse.Namespace,
                extra: list[str]) -> dict:
    bucket = f"bench-{name}"
    store.create_bucket(bucket)
    node = workdir / name
    mount = store.mount(bucket, node / "mnt", cache_dir=node / "cache",
                        mount_type="MODEL_CHECKPOINT_RW", bwlimit=args.bwlimit)
    events = node / "events.jsonl"
    cmd = [sys.executable, str(REPO / "train" / "lm.py"), "--model", str(assets / "model"),
           "--from-scratch", "--dataset", str(assets / "data"), "--seq-len", "64",
           "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-3", "--warmup-steps", "3",
           "--max-steps", str(args.max_steps), "--seed", "5", "--checkpoint-dir",
           str(mount.mount_point), "--run-name", "run", "--checkpoint-every-steps", "3",
           "--keep-last", "2", "--async-checkpoint", "--log-every", "30",
           "--notice-poll-seconds", "0", *extra]
    env = {**store.env(), "SKYSPOT_EVENTS_FILE": str(events), "OMP_NUM_THREADS": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    samples: list[tuple[float, int, int | None, int]] = []  # (time, trainer, bucket, cache)
    done = threading.Event()
    final_at: list[float] = []

    def sample() -> None:
        while not done.is_set():
            trainer = last_step(events)
            in_bucket = newest_complete(store, bucket, "run")
            samples.append((time.monotonic(), trainer, in_bucket, tree_bytes(node / "cache")))
            if in_bucket == args.max_steps and not final_at:
                final_at.append(time.monotonic())
            time.sleep(SAMPLE_S)

    print(f"== {name}: {' '.join(extra) or '(defaults)'}", flush=True)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with open(node / "train.log", "wb") as log:
        code = subprocess.run(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              ).returncode
    if code != 0:
        sys.exit(f"bench-lag: the {name} run failed (exit {code}); see {node / 'train.log'}")
    mount.wait_uploaded(timeout_s=600)
    deadline = time.monotonic() + 60  # s: the listing may trail the upload by a little
    while not final_at and time.monotonic() < deadline:
        time.sleep(SAMPLE_S)
    if not final_at:
        sys.exit(f"bench-lag: the {name} run's step-{args.max_steps} checkpoint never showed "
                 "up complete in the bucket")
    done.set()
    sampler.join()
    mount.unmount()

    steps_at = [(t, s) for t, s, _, _ in samples if s > 0]
    last_step_at = next(t for t, s in steps_at if s == max(s for _, s in steps_at))
    training = [(t, s - (b or 0)) for t, s, b, _ in samples if t <= last_step_at and s > 0]
    gaps = [gap for _, gap in training]
    committed = skipped = 0
    for line in events.read_text().splitlines():
        event = json.loads(line)
        committed += event.get("event") == "checkpoint"
        skipped += event.get("event") == "checkpoint_skipped"
    return {
        "checkpoints": committed,
        "skipped": skipped,
        "max_steps_ahead": max(gaps),
        "mean_steps_ahead": round(statistics.mean(gaps), 2),
        "peak_cache_mb": round(max(c for *_, c in samples) / 1e6, 1),
        "final_upload_s": round(final_at[0] - last_step_at, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-lag"))
    parser.add_argument("--bwlimit", default="8M", help="upload cap per mount (rclone)")
    parser.add_argument("--max-steps", type=int, default=90)
    args = parser.parse_args()
    ok, why = localstore.fuse_available()
    if not ok:
        sys.exit(f"bench-lag: needs FUSE: {why}")
    workdir = args.workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)  # this benchmark's own scratch from a previous run
    assets = workdir / "assets"
    subprocess.run([sys.executable, str(TOOLS / "tiny_assets.py"), str(assets)], check=True,
                   stdout=subprocess.DEVNULL)
    with localstore.LocalObjectStore(workdir / "store") as store:
        results = {
            "skip": run_variant(store, workdir, assets, "skip", args, []),
            "baseline": run_variant(store, workdir, assets, "baseline", args,
                                    ["--save-while-uploading"]),
        }
    skip, base = results["skip"], results["baseline"]
    print(f"\nbucket lag at --bwlimit {args.bwlimit}, {args.max_steps} steps, a 15 MB "
          "checkpoint due every 3 steps")
    print(f"{'':22}{'skip':>10}{'baseline':>10}{'ratio':>8}")
    for key in ("checkpoints", "skipped", "max_steps_ahead", "mean_steps_ahead",
                "peak_cache_mb", "final_upload_s"):
        ratio = f"{skip[key] / base[key]:.2f}" if base[key] else "-"
        print(f"{key:22}{skip[key]:>10}{base[key]:>10}{ratio:>8}")
    (workdir / "bench-lag.json").write_text(json.dumps(
        {"bwlimit": args.bwlimit, "max_steps": args.max_steps, **results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
