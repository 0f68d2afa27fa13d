"""Run train/lm.py in tests: build command lines, watch its events, read its weights."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def lm_args(assets: Path, ckpt: Path, **overrides) -> list[str]:
    """A ~20 s CPU run of the tiny model; overrides use flag names with underscores."""
    flags = dict(model=assets / "model", dataset=assets / "data", seq_len=64, batch_size=4,
                 grad_accum=2, lr=3e-3, warmup_steps=3, max_steps=24, seed=7,
                 checkpoint_dir=ckpt, checkpoint_every_steps=4, keep_last=2, run_name="t",
                 log_every=4, notice_poll_seconds=0)
    flags.update(overrides)
    args = ["--from-scratch"]
    for name, value in flags.items():
        if value is True:
            args.append("--" + name.replace("_", "-"))
        elif value is not False and value is not None:
            args += ["--" + name.replace("_", "-"), str(value)]
    return args


def command(args: list[str], ranks: int = 1, wrapper: bool = False) -> list[str]:
    """1 rank: python train/lm.py. 2 ranks: accelerate launch with two real gloo ranks."""
    if ranks == 1:
        cmd = [sys.executable, str(REPO / "train" / "lm.py"), *args]
    else:
        # --num_processes alone starts ONE process on CPU; --multi_gpu gives MULTI_CPU/gloo.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(ranks), "--num_machines", "1", "--main_process_port",
               str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / "train" / "lm.py"), *args]
    return [sys.executable, "-m", "skyspot.launch", "--", *cmd] if wrapper else cmd


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(events: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "SKYSPOT_EVENTS_FILE": str(events),
           "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    env.pop("SKYSPOT_EXIT_MARKER", None)
    env.update(extra)
    return env


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # A session of its own so kill_tree can find the whole tree, ranks included.
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal every process of the run, as a lost VM would: torch elastic puts each rank in
    a session of its own, so a process-group kill would miss them; walk the tree."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    if sig == signal.SIGKILL:
        psutil.wait_procs(tree, timeout=30)


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # torn last line of a killed writer
    return out


def last_step(events: list[dict]) -> int:
    steps = [e["step"] for e in events if e["event"] == "step"]
    return steps[-1] if steps else 0


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Poll predicate until true; False if the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(0.02)
    raise TimeoutError("condition not reached in time")


def rehearse(recipe: str, workdir: Path, envs: dict[str, str], *extra: str,
             timeout_s: float = 900) -> tuple[subprocess.CompletedProcess, dict]:
    """tools/rehearse.py on ``recipe`` with ``envs`` as --env overrides, node logs quiet;
    its completed process and its rehearsal.json."""
    cmd = [sys.executable, "tools/rehearse.py", recipe, "--quiet", "--workdir", str(workdir),
           *extra]
    cmd += [arg for key, value in envs.items() for arg in ("--env", f"{key}={value}")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                            timeout=timeout_s)
    return result, json.loads((workdir / "rehearsal.json").read_text())


def rehearsal_weights(summary: dict, bucket: str) -> dict[str, torch.Tensor]:
    """The final model a rehearsal left in ``bucket`` (the store's objects, or the plain
    directory it fell back to)."""
    (final,) = Path(summary["storage"]["data_dir"]).glob(f"{bucket}/*/final")
    return weights(final)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"tensors differ: {differing[:5]}"


def torn_checkpoint(run_dir: Path) -> Path | None:
    """A step directory with files in it but no manifest: a save in progress."""
    if not run_dir.is_dir():
        return None
    for d in run_dir.glob("step-*"):
        try:
            files = {f.name for f in d.iterdir()}
        except FileNotFoundError:  # retention deleted it meanwhile
            continue
        if files and "manifest.json" not in files:
            return d
    return None


def kill_at_random_instants(assets: Path, root: Path, ranks: int, seed: int,
                            **flags) -> list[Path]:
    """Start lm_args(assets, root / "ckpt", **flags) on ``ranks`` and SIGKILL the whole run
    three times: at two random optimizer steps and once in the middle of a checkpoint write
    (slowed down for that), in a random order; attempt k's events go to root/events-k.jsonl.
    Returns the torn checkpoint directories that the mid-checkpoint kill left."""
    rng = random.Random(seed)
    plan: list = sorted(rng.sample(range(3, 22), 2))
    plan.insert(rng.randrange(3), "mid-checkpoint")
    run_dir = root / "ckpt" / "t"
    torn = []
    for attempt, target in enumerate(plan):
        events = root / f"events-{attempt}.jsonl"
        slow = {"SKYSPOT_FAULT_WRITE_DELAY_S": "0.4"} if target == "mid-checkpoint" else {}
        proc = start(command(lm_args(assets, root / "ckpt", **flags), ranks),
                     env_for(events, **slow), root / "log.txt")
        if target == "mid-checkpoint":
            reached = wait_until(lambda: torn_checkpoint(run_dir) is not None, proc)
        else:
            reached = wait_until(lambda t=target, e=events: last_step(read_events(e)) >= t, proc)
        assert reached, f"attempt {attempt} ended before {target}"
        kill_tree(proc, signal.SIGKILL)
        proc.wait()
        if target == "mid-checkpoint":
            torn.append(torn_checkpoint(run_dir))
    return torn
