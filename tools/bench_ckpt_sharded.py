"""`make bench-ckpt-sharded`: sharded (FSDP) checkpoints on 2 ranks against today's rank-0
save and against plain DCP, each figure a ratio against a baseline measured in the same
run, on the same model, on the same disk.

    python tools/bench_ckpt_sharded.py --workdir runs/bench-ckpt-sharded [--repeats 5]
                                       [--layers 12] [--quick]

Two real processes (torch.multiprocessing, gloo, one intra-op thread each on 2 cores) hold
the model of ``make bench-ckpt`` (tools/bench_ckpt.py's ``build``: Llama-style, hidden 768,
12 layers, ~110M parameters) twice, each with AdamW state after one real optimizer step:

- sharded: FSDP2 ``fully_shard`` per decoder layer, then the root, as train/lm.py's
  ``shard_model`` does; each rank holds half of the weights and of AdamW's moments.
- replicated: a full copy on each rank under DistributedDataParallel, as train/lm.py runs
  without --fsdp.

The checkpoints go to WORKDIR/ckpt, on the disk WORKDIR is on.

1. Save: seconds the training loop is blocked per checkpoint, measured on SYNC saves (a
   sync save blocks for all of it; an async one would hide the write), from a barrier to
   the slowest rank's return. Sharded: train/lm.py's --fsdp path, ``sharded.save_files``
   (DCP plans the save) then ``Checkpointer.save``; each rank writes its own shard.
   Gather: train/lm.py's path without --fsdp; rank 0 passes model + optimizer state
   (``state_dict()`` of the unwrapped model and of the optimizer) and writes all of it
   alone, rank 1 passes nothing and joins the commit. Ratio sharded / gather, lower is
   better: reported. Beside it, also reported: the sharded save vs DCP's own
   ``FileSystemWriter`` (fsync on, one file per rank) writing the same state.
2. Resume: the sharded checkpoint loaded on the 2 ranks through the skyspot protocol (a
   fresh ``Checkpointer(...).resume_point()``, which lists, reads and hashes every file,
   each rank its own shard, then ``sharded.load_into`` and ``set_state_dict``) vs a plain
   DCP load of the same state from what ``FileSystemWriter`` wrote (``dcp.load`` with a
   ``FileSystemReader``, then ``set_state_dict``). Both start from a cold page cache:
   before every load of either side, rank 0 runs ``sync`` and ``echo 3 >
   /proc/sys/vm/drop_caches`` (as root; otherwise each side's files are evicted with
   posix_fadvise DONTNEED, and the JSON says which). Timed in the running processes, from a
   barrier to the slowest rank's return; the state is zeroed before each load and checked
   bit-exact after it (outside the timing). Target <= 1.5x.

The repeats alternate which side runs first. min and median over --repeats; the verdict
uses the medians. --quick: 1 layer (~32M parameters), for development. Writes
WORKDIR/bench-ckpt-sharded.json and prints a table; exit 0 whether or not a target is met
(the table says which), 1 if a rank failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

WORLD = 2
SEQ, BATCH = 128, 2  # as bench_ckpt: tokens per sequence, sequences per rank per step


def stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "n": len(values)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the ranks


def shard(model) -> None:
    """FSDP2 as train/lm.py's shard_model (fp32): one unit per decoder layer, then the root."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    layer_classes = set(model._no_split_modules)
    for module in [m for m in model.modules() if type(m).__name__ in layer_classes]:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def sharded_state(model, optimizer) -> dict:
    """As train/lm.py's sharded_state: this rank's shards, keyed as DCP saves them."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def local_tensors(model, optimizer) -> list:
    """This rank's part of every parameter and AdamW state tensor (the live ones)."""
    from torch.distributed.tensor import DTensor

    out = [p.data for p in model.parameters()]
    out += [t for s in optimizer.state.values() for t in s.values() if hasattr(t, "dtype")]
    return [t.to_local() if isinstance(t, DTensor) else t for t in out]


def fingerprint(tensors: list) -> list[float]:
    return [float(t.detach().double().sum()) for t in tensors]


def train_step(model, optimizer, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, 16000, (BATCH, SEQ), generator=generator)
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def state_bytes(files: dict) -> int:
    from skyspot.statefile import Layout

    return sum(Layout.of(payload).size for name, payload in files.items()
               if name.endswith(".safetensors"))


def drop_cache(directories: list[Path], how: str) -> None:
    """Rank 0: the page cache emptied (or these directories' files evicted) before a load."""
    if how == "drop_caches":
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return
    for directory in directories:
        for path in directory.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def cache_method() -> str:
    """echo 3 > drop_caches where this process may (root), else posix_fadvise per file."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        return "fadvise"


def rank_main(rank: int, cfg: dict) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from bench_ckpt import build
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from skyspot import sharded
    from skyspot.checkpoint import Checkpointer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(cfg["port"]))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    work = Path(cfg["workdir"])
    root = work / "ckpt"
    say = print if rank == 0 else (lambda *a, **k: None)

    def slowest(seconds: float) -> float:
        """The loop waits for the slowest rank: the max over ranks."""
        everyone = [None] * WORLD
        dist.all_gather_object(everyone, seconds)
        return max(everyone)

    def timed(fn) -> float:
        dist.barrier()
        started = time.perf_counter()
        fn()
        return slowest(time.perf_counter() - started)

    # Replicated (DDP) and sharded (FSDP2) copies of the same model, one real AdamW step each.
    model, optimizer = build(cfg["layers"])
    params = sum(p.numel() for p in model.parameters())
    replica = torch.nn.parallel.DistributedDataParallel(model)
    train_step(replica, optimizer, seed=rank)
    fsdp_model, _ = build(cfg["layers"])
    shard(fsdp_model)
    fsdp_opt = torch.optim.AdamW(fsdp_model.parameters(), lr=1e-4)  # after fully_shard
    train_step(fsdp_model, fsdp_opt, seed=rank)
    say(f"model: {params / 1e6:.0f}M parameters, {WORLD} ranks, "
        f"{torch.get_num_threads()} thread(s) each")

    gather_ckpt = Checkpointer(root / "gather", keep_last=2)
    sharded_ckpt = Checkpointer(root / "sharded", keep_last=2)
    commits: dict[str, list] = {"gather": [], "sharded": []}
    gather_ckpt.on_commit = commits["gather"].append
    sharded_ckpt.on_commit = commits["sharded"].append
    nbytes: dict[str, int] = {}
    plan_s: list[float] = []

    def gather_files() -> dict:
        if rank != 0:
            return {}
        return {"model.safetensors": replica.module.state_dict(),
                "optimizer.safetensors": optimizer.state_dict()}

    def save_gather(step: int) -> None:
        files = gather_files()
        gather_ckpt.save(step, files, meta={"step": step})

    def save_sharded(step: int) -> None:
        started = time.perf_counter()
        files = sharded.save_files(sharded_state(fsdp_model, fsdp_opt))
        plan_s.append(time.perf_counter() - started)
        sharded_ckpt.save(step, files, meta={"step": step, "sharded": True})

    def dcp_dir(step: int) -> Path:
        return root / "dcp" / f"step-{step:08d}"

    def save_dcp(step: int) -> None:
        dcp.save(sharded_state(fsdp_model, fsdp_opt),
                 storage_writer=FileSystemWriter(dcp_dir(step)))

    nbytes["gather"] = slowest(state_bytes(gather_files()))  # rank 0's: all of it
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, state_bytes(sharded.save_files(
        sharded_state(fsdp_model, fsdp_opt))))
    nbytes["sharded_total"], nbytes["sharded_per_rank"] = sum(everyone), everyone

    saves: dict[str, list[float]] = {"sharded": [], "gather": [], "dcp": []}
    sides = ("sharded", "gather", "dcp")
    action = {"sharded": save_sharded, "gather": save_gather, "dcp": save_dcp}
    step = 0
    for repeat in range(cfg["repeats"]):
        order = sides if repeat % 2 == 0 else tuple(reversed(sides))
        say(f"repeat {repeat + 1}/{cfg['repeats']}: sync saves, {' / '.join(order)}")
        step += 1
        for side in order:
            if rank == 0:
                subprocess.run(["sync"], check=True)  # nobody's dirty pages in the timing
            saves[side].append(timed(lambda side=side, step=step: action[side](step)))
        if rank == 0 and step > 1:  # DCP's own format: keep the newest only
            shutil.rmtree(dcp_dir(step - 1), ignore_errors=True)
        dist.barrier()

    # Resume: zero the state, load it on the clock, check it bit-exact off the clock.
    reference = fingerprint(local_tensors(fsdp_model, fsdp_opt))
    how = cache_method() if rank == 0 else None
    how = [how]
    dist.broadcast_object_list(how, src=0)
    how = how[0]
    parts: dict[str, list[float]] = {"resume_point": [], "load_into": [], "set_state_dict": []}

    def load_skyspot() -> None:
        t0 = time.perf_counter()
        ckpt = Checkpointer(root / "sharded", keep_last=2).resume_point()
        t1 = time.perf_counter()
        state = sharded_state(fsdp_model, fsdp_opt)
        sharded.load_into(state, ckpt)
        t2 = time.perf_counter()
        set_state_dict(fsdp_model, fsdp_opt, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        t3 = time.perf_counter()
        for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            parts[name].append(seconds)

    def load_plain() -> None:
        state = sharded_state(fsdp_model, fsdp_opt)
        dcp.load(state, storage_reader=FileSystemReader(dcp_dir(step)))
        set_state_dict(fsdp_model, fsdp_opt, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    loads: dict[str, list[float]] = {"skyspot": [], "plain": []}
    where = {"skyspot": root / "sharded", "plain": dcp_dir(step)}
    for repeat in range(cfg["repeats"]):
        order = ("skyspot", "plain") if repeat % 2 == 0 else ("plain", "skyspot")
        say(f"repeat {repeat + 1}/{cfg['repeats']}: resume, cold page cache, "
            f"{' / '.join(order)}")
        for side in order:
            with torch.no_grad():
                for tensor in local_tensors(fsdp_model, fsdp_opt):
                    tensor.zero_()
            dist.barrier()
            if rank == 0:
                drop_cache([where[side]], how)
            loads[side].append(timed(load_skyspot if side == "skyspot" else load_plain))
            if fingerprint(local_tensors(fsdp_model, fsdp_opt)) != reference:
                raise RuntimeError(f"rank {rank}: the {side} load did not restore the state")

    part_s = {name: [slowest(s) for s in values] for name, values in parts.items()}
    plan = [slowest(s) for s in plan_s]
    if rank == 0:
        raw = {"parameters": params, "bytes": nbytes, "save": saves, "resume": loads,
               "sharded_plan": plan, "resume_parts": part_s, "cache": how,
               "stall": {side: [c.stall_seconds for c in commits[side]]
                         for side in ("sharded", "gather")},
               "threads": torch.get_num_threads()}
        (work / "raw.json").write_text(json.dumps(raw) + "\n")
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- the report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-ckpt-sharded"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--quick", action="store_true",
                        help="1 layer (~32M parameters): a fast check of the benchmark itself")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers = 1
    if args.repeats < 3 or args.layers < 1:
        parser.error("--repeats must be >= 3, --layers >= 1")

    import torch.multiprocessing as mp

    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "ckpt").mkdir(parents=True)
    cfg = {"workdir": str(work), "layers": args.layers, "repeats": args.repeats,
           "port": free_port()}
    started = time.perf_counter()
    try:
        mp.spawn(rank_main, args=(cfg,), nprocs=WORLD, join=True)
    except Exception as err:  # a rank's traceback is printed by torch above
        print(f"bench-ckpt-sharded: a rank failed: {err}", file=sys.stderr)
        return 1
    raw = json.loads((work / "raw.json").read_text())
    (work / "raw.json").unlink()
    shutil.rmtree(work / "ckpt", ignore_errors=True)

    def paired(a: list[float], b: list[float]) -> list[float]:  # same repeat
        return [x / y for x, y in zip(a, b, strict=True)]

    save, resume = raw["save"], raw["resume"]
    figures = {
        "save_stall_sharded_vs_gather": (paired(save["sharded"], save["gather"]), None, None),
        "save_sharded_vs_dcp_filesystemwriter": (paired(save["sharded"], save["dcp"]),
                                                 None, None),
        "resume_skyspot_vs_plain_dcp": (paired(resume["skyspot"], resume["plain"]), "<=", 1.5),
    }
    r: dict = {"parameters": raw["parameters"], "ranks": WORLD, "repeats": args.repeats,
               "layers": args.layers, "quick": args.quick, "cpus": os.cpu_count(),
               "threads_per_rank": raw["threads"], "device": "cpu", "backend": "gloo",
               "launch": "torch.multiprocessing.spawn, 2 processes",
               "save_mode": "sync (the loop's stall is the whole save)",
               "page_cache": ("cold: sync + echo 3 > /proc/sys/vm/drop_caches before every load"
                              if raw["cache"] == "drop_caches" else
                              "cold: each side's files evicted (fsync + posix_fadvise "
                              "DONTNEED) before every load"),
               "bytes": raw["bytes"], "figures": {}}
    for name, (values, op, target) in figures.items():
        entry = {**stats(values), "target": f"{op} {target}" if op else "report"}
        if op:
            entry["met"] = entry["median"] <= target
        r["figures"][name] = entry
    r["seconds"] = {
        "save_sharded": stats(save["sharded"]),
        "save_sharded_dcp_plan": stats(raw["sharded_plan"]),
        "save_gather": stats(save["gather"]),
        "save_dcp_filesystemwriter": stats(save["dcp"]),
        "stall_seconds_sharded": stats(raw["stall"]["sharded"]),
        "stall_seconds_gather": stats(raw["stall"]["gather"]),
        "resume_skyspot": stats(resume["skyspot"]),
        "resume_skyspot_resume_point": stats(raw["resume_parts"]["resume_point"]),
        "resume_skyspot_load_into": stats(raw["resume_parts"]["load_into"]),
        "resume_skyspot_set_state_dict": stats(raw["resume_parts"]["set_state_dict"]),
        "resume_plain_dcp": stats(resume["plain"]),
    }
    r["raw_seconds"] = {"save": save, "resume": resume}
    r["wall_seconds"] = time.perf_counter() - started
    r["gpu"] = ("not run: no GPU here (gloo on CPU, one disk shared by both ranks); on "
                "GPU nodes each rank's shard also skips the gather to rank 0 over NCCL")
    out = work / "bench-ckpt-sharded.json"
    out.write_text(json.dumps(r, indent=1) + "\n")
    print_table(r)
    print(f"wrote {out}")
    return 0


def print_table(r: dict) -> None:
    labels = {
        "save_stall_sharded_vs_gather": "save stall (sync), sharded / rank-0 gather",
        "save_sharded_vs_dcp_filesystemwriter": "sharded save / DCP FileSystemWriter save",
        "resume_skyspot_vs_plain_dcp": "resume, skyspot / plain DCP load (cold cache)",
    }
    b = r["bytes"]
    print(f"\n{r['parameters'] / 1e6:.0f}M parameters + AdamW, {r['ranks']} ranks (gloo, "
          f"{r['threads_per_rank']} thread each), {b['gather'] / 1e9:.2f} GB per checkpoint "
          f"(sharded: {' + '.join(f'{n / 1e9:.2f}' for n in b['sharded_per_rank'])} GB), "
          f"{r['repeats']} repeats, {r['cpus']} CPUs")
    print(f"{'figure':52} {'min':>8} {'median':>8}  {'target':>8}  verdict")
    for name, entry in r["figures"].items():
        verdict = "report" if "met" not in entry else ("met" if entry["met"] else "NOT MET")
        print(f"{labels[name]:52} {entry['min']:8.3f} {entry['median']:8.3f}  "
              f"{entry['target']:>8}  {verdict}")
    print("\nseconds (min / median):")
    for name, entry in r["seconds"].items():
        print(f"  {name:32} {entry['min']:8.3f} {entry['median']:8.3f}")
    print(f"saves: {r['save_mode']}; page cache: {r['page_cache']}")
    print(f"GPU: {r['gpu']}")


if __name__ == "__main__":
    sys.exit(main())
