"""`make bench-ckpt`: what a checkpoint costs the training loop, each figure a ratio against
a baseline measured in the same run, on the same model, on the same disk.

    python tools/bench_ckpt.py --workdir runs/bench-ckpt [--repeats 3] [--layers 12]

The model: a Llama-style decoder built from a config (hidden 768, 12 layers, MLP 2048,
vocab 16000: ~110M parameters) plus AdamW state after one step: ~1.3 GB of checkpoint.
The checkpoints go to WORKDIR/ckpt, on the disk WORKDIR is on.

1. Stall per checkpoint, async vs sync. Sync: ``Checkpointer.save`` with async off, from
   call to return (files, fsync, manifest, retention: what the loop waits for). Async: the
   loop's real shape (save after the optimizer step, the next step's forward and backward,
   ``before_update()``, the optimizer step, ``at_step_boundary()`` each step until the
   commit is reported); the stall is ``Committed.stall_seconds``: every second the
   training thread spent inside the checkpointer. Target <= 5%.
2. That stall vs a plain copy of the same tensors into preallocated (already touched)
   buffers on the training thread: what any snapshot must at least cost if it blocked.
   Target <= 1.5x.
3. Checksum time vs the sync save: what hashing adds to the save's wall time, i.e. the
   sync save as it is vs the same save with the hash swapped for a no-op (alternating, in
   a directory of its own), over the save as it is. Target <= 5%. On a local disk the
   writer hashes and copies each 8 MiB chunk while the previous one is on its way to the
   disk, so the hash hides under the disk's time. Shown beside it, not judged: the CPU
   time of xxh3-128 over the same bytes in the same chunks, timed alone.
4. Write throughput: the sync save's bytes over its seconds vs dd writing as many bytes in
   8 MiB blocks to the same directory, with ``oflag=direct`` and with ``conv=fsync``.
   Target >= 70% of the faster dd.
5. Resume: process start to model and optimizer state loaded, in a fresh process each,
   with the files dropped from the page cache first (posix_fadvise DONTNEED): the trainer's
   path (``Checkpointer.resume_point`` picks and verifies, ``load`` deserializes from the
   bytes it read, ``load_state_dict`` of model and optimizer) vs plain
   ``safetensors.torch.load_file`` of the same files with no verification, plus the same
   model construction. load_file maps the file and reads a page when it is first touched,
   so the plain side touches one byte per page of the optimizer's tensors (the model's
   are copied by ``load_state_dict``): both sides end with every byte read. Target <= 1.2x.
6. Mean step time with an async checkpoint every K steps vs none: reported, no target. The
   copy runs on a second thread while the next step computes: on a machine with spare cores
   it is nearly free; on 2 cores the copy and the step share them.

The repeats alternate the two sides of each ratio. min and median over --repeats; the
verdict uses the medians. Writes WORKDIR/bench-ckpt.json and prints a table; exit 0 whether
or not a target is met (the table says which), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHUNK = 8 << 20  # the checkpoint writer's chunk, bytes
SEQ, BATCH = 128, 2  # tokens per sequence, sequences per step: a ~2-4 s step on 2 cores



def build(layers: int):
    """The benchmark's model and optimizer, the same here and in the resume processes."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
        num_attention_heads=12, num_key_value_heads=12, vocab_size=16000,
        max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer


# One resume, in a fresh process: argv = layers, checkpoint root, "skyspot" or "plain".
_RESUME = """
import sys
sys.path[:0] = [sys.argv[4], sys.argv[4] + "/tools"]
from pathlib import Path
from bench_ckpt import build
layers, root, mode = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
model, optimizer = build(layers)
if mode == "skyspot":
    from skyspot.checkpoint import Checkpointer
    ckpt = Checkpointer(root, keep_last=2).resume_point()
    model.load_state_dict(ckpt.load("model.safetensors"))
    optimizer.load_state_dict(ckpt.load("optimizer.safetensors"))
else:
    import safetensors.torch
    import torch
    step = sorted(root.glob("step-*"))[-1]
    model.load_state_dict(safetensors.torch.load_file(step / "model.safetensors"))
    state = safetensors.torch.load_file(step / "optimizer.safetensors")
    # load_file maps the file: a page is read when first touched. Touch one byte per page
    # so this side, too, ends with every byte read (load_state_dict copied the model's).
    for tensor in state.values():
        tensor.reshape(-1).view(torch.uint8)[::4096].sum()
"""


class NoHash:
    """A hasher that does nothing: the sync save without its checksum, for figure 3."""

    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return "0" * 32


def stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "n": len(values)}


def train_step(model, optimizer, checkpointer=None) -> None:
    import torch

    batch = torch.randint(0, 16000, (BATCH, SEQ))
    model(input_ids=batch, labels=batch).loss.backward()
    if checkpointer is not None:
        checkpointer.before_update()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def files_of(model, optimizer) -> dict:
    return {"model.safetensors": model.state_dict(),
            "optimizer.safetensors": optimizer.state_dict()}


def drop_cache(root: Path) -> None:
    """Evict the checkpoint files from the page cache: the resume reads come from disk."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def dd_rate(directory: Path, nbytes: int, flag: str) -> float | None:
    """Bytes/s of dd writing ``nbytes`` in 8 MiB blocks; None where the flag is refused."""
    target = directory / "dd.bin"
    count = max(1, nbytes // CHUNK)
    started = time.perf_counter()
    proc = subprocess.run(["dd", "if=/dev/zero", f"of={target}", f"bs={CHUNK}",
                           f"count={count}", flag], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    target.unlink(missing_ok=True)
    return None if proc.returncode else count * CHUNK / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-ckpt"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--every", type=int, default=3, help="steps between async saves (K)")
    args = parser.parse_args(argv)
    if args.repeats < 3 or args.layers < 1 or args.every < 2:
        parser.error("--repeats must be >= 3, --layers >= 1, --every >= 2")

    import torch
    import xxhash

    from skyspot import checkpoint
    from skyspot.checkpoint import Checkpointer
    from skyspot.statefile import Layout, host_bytes

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    root = work / "ckpt"
    root.mkdir(parents=True)
    model, optimizer = build(args.layers)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.0f}M parameters; threads: {torch.get_num_threads()}")
    train_step(model, optimizer)  # AdamW state exists from here on
    layouts = [Layout.of(state) for state in files_of(model, optimizer).values()]
    nbytes = sum(layout.size for layout in layouts)
    print(f"checkpoint: {nbytes / 1e9:.2f} GB")

    r: dict = {"parameters": params, "checkpoint_bytes": nbytes, "repeats": args.repeats,
               "cpus": os.cpu_count(), "device": "cpu"}
    sync_s, async_stall, async_wait, copy_s, hash_s, dd_direct, dd_fsync, unhashed_s = (
        [] for _ in range(8))
    step = 1
    sync = Checkpointer(root / "sync", keep_last=2)
    unhashed = Checkpointer(root / "unhashed", keep_last=2)
    fast = Checkpointer(root / "async", keep_last=2, async_save=True)
    committed: list = []
    fast.on_commit = committed.append
    tensors = [t for layout in layouts for t in layout.tensors]
    buffers = [torch.empty_like(t) for t in tensors]
    for buffer in buffers:
        buffer.fill_(0)  # touched: no page faults inside the timing
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}/{args.repeats}: sync save, async save, copy, hash, dd")
        sides = ("sync", "unhashed", "async")
        for side in sides if repeat % 2 == 0 else reversed(sides):
            if side in ("sync", "unhashed"):
                hasher = checkpoint._HASHER
                if side == "unhashed":
                    checkpoint._HASHER = NoHash
                try:
                    started = time.perf_counter()
                    (sync if side == "sync" else unhashed).save(
                        step, files_of(model, optimizer), meta={"step": step})
                    (sync_s if side == "sync" else unhashed_s).append(
                        time.perf_counter() - started)
                finally:
                    checkpoint._HASHER = hasher
            else:
                committed.clear()
                fast.save(step, files_of(model, optimizer), meta={"step": step})
                while not committed:
                    train_step(model, optimizer, fast)
                    step += 1
                    fast.at_step_boundary()
                async_stall.append(committed[0].stall_seconds)
                async_wait.append(committed[0].snapshot_wait_seconds)
            train_step(model, optimizer)
            step += 1
        started = time.perf_counter()
        for src, dst in zip(tensors, buffers, strict=True):
            dst.copy_(src)
        copy_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        digest = xxhash.xxh3_128()
        for tensor in tensors:
            view = host_bytes(tensor)
            for start in range(0, len(view), CHUNK):
                digest.update(view[start:start + CHUNK])
        hash_s.append(time.perf_counter() - started)
        for flag, out in (("oflag=direct", dd_direct), ("conv=fsync", dd_fsync)):
            rate = dd_rate(root, nbytes, flag)
            if rate is not None:
                out.append(rate)
    del buffers

    print("resume: trainer's path vs plain safetensors, fresh processes, cold page cache")
    resume_ours, resume_plain = [], []
    for repeat in range(args.repeats):
        for mode in (("skyspot", "plain") if repeat % 2 == 0 else ("plain", "skyspot")):
            drop_cache(root / "sync")
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", _RESUME, str(args.layers), str(root / "sync"),
                            mode, str(REPO)], check=True, cwd=REPO)
            (resume_ours if mode == "skyspot" else resume_plain).append(
                time.perf_counter() - started)

    print(f"step time: {args.every * 3} steps with an async save every {args.every}, and without")
    with_ckpt, without = [], []
    for repeat in range(args.repeats):
        for side in (("with", "without") if repeat % 2 == 0 else ("without", "with")):
            times = []
            for i in range(args.every * 3):
                started = time.perf_counter()
                train_step(model, optimizer, fast if side == "with" else None)
                step += 1
                if side == "with":  # as train/lm.py does: skip while one is in flight
                    fast.at_step_boundary()
                    if (i + 1) % args.every == 0 and fast.backlog() is None:
                        fast.save(step, files_of(model, optimizer), meta={"step": step})
                times.append(time.perf_counter() - started)
            if side == "with":
                fast.wait()
            (with_ckpt if side == "with" else without).append(statistics.mean(times))
    shutil.rmtree(root, ignore_errors=True)

    sync_rates = [nbytes / s for s in sync_s]
    dd_medians = [statistics.median(rates) for rates in (dd_direct, dd_fsync) if rates]
    best_dd = max(dd_medians) if dd_medians else float("nan")

    def paired(a: list[float], b: list[float]) -> list[float]:  # same repeat, same conditions
        return [x / y for x, y in zip(a, b, strict=True)]

    figures = {
        "async_stall_vs_sync_save": (paired(async_stall, sync_s), "<=", 0.05),
        "stall_vs_plain_copy": (paired(async_stall, copy_s), "<=", 1.5),
        "checksum_vs_write": (
            [(h - u) / h for h, u in zip(sync_s, unhashed_s, strict=True)], "<=", 0.05),
        "checksum_cpu_vs_write": (paired(hash_s, sync_s), None, None),
        "write_vs_faster_dd": ([rate / best_dd for rate in sync_rates], ">=", 0.70),
        "resume_vs_plain_load": (paired(resume_ours, resume_plain), "<=", 1.2),
        "step_time_async_every_k_vs_none": (paired(with_ckpt, without), None, None),
    }
    r["figures"] = {}
    for name, (values, op, target) in figures.items():
        entry = {**stats(values), "target": f"{op} {target}" if op else "report"}
        if op:
            entry["met"] = (entry["median"] <= target) if op == "<=" else (
                entry["median"] >= target)
        r["figures"][name] = entry
    r["seconds"] = {
        "sync_save": stats(sync_s), "sync_save_unhashed": stats(unhashed_s),
        "async_stall": stats(async_stall),
        "async_snapshot_wait": stats(async_wait), "plain_copy": stats(copy_s),
        "checksum": stats(hash_s), "resume_skyspot": stats(resume_ours),
        "resume_plain": stats(resume_plain), "step_with_async_every_k": stats(with_ckpt),
        "step_without": stats(without)}
    r["bytes_per_s"] = {"sync_save": stats(sync_rates),
                        "dd_oflag_direct": stats(dd_direct) if dd_direct else None,
                        "dd_conv_fsync": stats(dd_fsync) if dd_fsync else None}
    r["every_k_steps"] = args.every
    r["gpu"] = ("not run: no GPU here; on a GPU also report the stall vs the device-to-host "
                "copy of the same state and async/sync on a 1B model")
    (work / "bench-ckpt.json").write_text(json.dumps(r, indent=1) + "\n")
    print_table(r)
    print(f"wrote {work / 'bench-ckpt.json'}")
    return 0


def print_table(r: dict) -> None:
    labels = {
        "async_stall_vs_sync_save": "stall per checkpoint, async / sync save",
        "stall_vs_plain_copy": "async stall / plain copy into preallocated buffers",
        "checksum_vs_write": "checksum's added time / sync save time",
        "checksum_cpu_vs_write": "checksum CPU time alone / sync save time",
        "write_vs_faster_dd": "write throughput / faster dd",
        "resume_vs_plain_load": "resume / plain safetensors load (+ model build)",
        "step_time_async_every_k_vs_none": f"step time, async every {r['every_k_steps']} / none",
    }
    print(f"\n{r['parameters'] / 1e6:.0f}M parameters + AdamW, {r['checkpoint_bytes'] / 1e9:.2f}"
          f" GB per checkpoint, {r['repeats']} repeats, {r['cpus']} CPUs")
    print(f"{'figure':52} {'min':>8} {'median':>8}  {'target':>8}  verdict")
    for name, entry in r["figures"].items():
        verdict = "report" if "met" not in entry else ("met" if entry["met"] else "NOT MET")
        print(f"{labels[name]:52} {entry['min']:8.3f} {entry['median']:8.3f}  "
              f"{entry['target']:>8}  {verdict}")
    s, b = r["seconds"], r["bytes_per_s"]
    print("\nseconds (min / median):")
    for name, entry in s.items():
        print(f"  {name:28} {entry['min']:8.3f} {entry['median']:8.3f}")
    print("write GB/s (min / median):")
    for name, entry in b.items():
        if entry is None:
            print(f"  {name:28} refused on this disk")
        else:
            print(f"  {name:28} {entry['min'] / 1e9:8.3f} {entry['median'] / 1e9:8.3f}")
    print(f"GPU: {r['gpu']}")


if __name__ == "__main__":
    sys.exit(main())
