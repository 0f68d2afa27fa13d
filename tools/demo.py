"""`make demo`: a spot job preempted twice ends bit-identical to one that never was.

    python tools/demo.py --workdir runs/demo

1. Builds offline tiny assets (a small Llama, its tokenizer, stdlib docstrings as text).
2. Rehearses recipes/train-lm-spot.yaml on CPU through tools/rehearse.py: SkyPilot's own
   parser, the recipe's own run: (exit-code wrapper + accelerate launch + train/lm.py), one
   SIGTERM preemption with grace and one SIGKILL preemption (the VM lost, with whatever its
   MOUNT_CACHED bucket mount had not uploaded yet), relaunched as a managed job. With FUSE the
   checkpoint bucket is a real local S3 server mounted with SkyPilot's MOUNT_CACHED rclone
   flags, uploads capped at BWLIMIT so the bucket visibly lags the trainer; without FUSE
   rehearse falls back to a plain directory and says so.
3. Runs the same job uninterrupted (no upload cap: only the final model matters).
4. Compares the two final model.safetensors tensor by tensor and says whether they are
   bit-identical; exits 1 if not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/train-lm-spot.yaml"

# A ~15 s CPU job per attempt: 50 optimizer steps of 4 x 2 x 64 tokens, a checkpoint every
# 5 steps, async saves as the recipe's default.
JOB_ENVS = {
    "CHECKPOINT_BUCKET": "skyspot-demo",
    "FROM_SCRATCH": "true",
    "SEQ_LEN": "64",
    "BATCH_SIZE": "4",
    "GRAD_ACCUM": "2",
    "LR": "3e-3",
    "WARMUP_STEPS": "5",
    "MAX_STEPS": "50",
    "SEED": "1234",
    "MIXED_PRECISION": "no",
    "CHECKPOINT_EVERY_STEPS": "5",
    "CHECKPOINT_EVERY_MINUTES": "0",
    "KEEP_LAST": "2",
    "LOG_EVERY": "10",
    "NOTICE_POLL_SECONDS": "0",
}
# SIGTERM at step 17 (saves at 18 and waits for the bucket, loses nothing), SIGKILL at step 33
# (loses the steps since the newest checkpoint the bucket holds whole).
PREEMPTIONS = "step:17:term,step:33:kill"
# Upload cap per bucket mount: a ~15 MB checkpoint takes ~2 s to reach the bucket while a
# save is due every ~0.5-1.5 s, so the bucket lags the trainer and the trainer skips saves
# while the previous one is still uploading (the timeline counts them).
BWLIMIT = "8M"


def rehearse(workdir: Path, assets: Path, preempt: str | None) -> Path:
    """Run one rehearsal; return the final model.safetensors it left in the bucket."""
    if workdir.exists():
        shutil.rmtree(workdir)  # the demo's own scratch from a previous `make demo`
    cmd = [sys.executable, "tools/rehearse.py", RECIPE, "--workdir", str(workdir),
           "--gpus-per-node", "1", "--grace", "20", "--quiet",
           "--env", f"MODEL={assets / 'model'}", "--env", f"DATASET={assets / 'data'}"]
    cmd += [arg for key, value in JOB_ENVS.items() for arg in ("--env", f"{key}={value}")]
    if preempt:
        cmd += ["--preempt-at", preempt, "--bwlimit", BWLIMIT]
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        sys.exit(f"demo: the rehearsal in {workdir} failed; see its logs/")
    # The bucket's objects, once rehearse is done (a local S3 server's backing directory, or
    # the plain directory it fell back to).
    data_dir = Path(json.loads((workdir / "rehearsal.json").read_text())["storage"]["data_dir"])
    finals = sorted(data_dir.glob("*/*/final/model.safetensors"))
    if len(finals) != 1:
        sys.exit(f"demo: expected one final model.safetensors under {workdir}, found {finals}")
    return finals[0]


def compare(a: Path, b: Path) -> tuple[int, list[str]]:
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(a), load_file(b)
    differing = sorted(k for k in ta.keys() | tb.keys()
                       if k not in ta or k not in tb or not torch.equal(ta[k], tb[k]))
    return len(ta), differing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example: python tools/demo.py --workdir runs/demo")
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    started = time.monotonic()

    assets = workdir / "assets"
    subprocess.run([sys.executable, "tools/tiny_assets.py", str(assets)], cwd=REPO, check=True)
    print(f"\n== rehearsing {RECIPE} with preemptions {PREEMPTIONS}", flush=True)
    preempted = rehearse(workdir / "preempted", assets, PREEMPTIONS)
    print("\n== the same job, uninterrupted", flush=True)
    clean = rehearse(workdir / "uninterrupted", assets, None)

    count, differing = compare(preempted, clean)
    print(f"\npreempted:     {preempted.relative_to(workdir.parent)}")
    print(f"uninterrupted: {clean.relative_to(workdir.parent)}")
    if differing:
        print(f"NOT bit-identical: {len(differing)} of {count} tensors differ "
              f"({', '.join(differing[:3])} ...)")
        return 1
    print(f"bit-identical: all {count} tensors equal (torch.equal) after 1 SIGTERM and "
          f"1 SIGKILL preemption; demo took {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
