"""Rehearse a SkyPilot recipe locally, the way a managed spot job runs it, with node-loss faults.

    python tools/rehearse.py recipes/train.yaml --gpus-per-node 1 \\
        --preempt-at step:20,ckpt:40:kill,step:60:proc --bwlimit 8M

The command line only; the rehearsal itself is the package tools/rehearsal/. See
tools/rehearsal/__init__.py for what is emulated and the rehearsal.json schema.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import random
import re
import signal
import sys
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:  # run as a script tools/ is sys.path[0]; loaded by path it is not
    sys.path.insert(0, str(TOOLS))
import metadata_server  # noqa: E402
from rehearsal import SCHEMA, vm  # noqa: E402
from rehearsal.buckets import Buckets, StorageError, choose_storage, remap  # noqa: E402
from rehearsal.faults import (  # noqa: E402
    KINDS,
    NOTICE_CLOUDS,
    Fault,  # noqa: F401 (re-exported: tests use rehearse.Fault)
    parse_preempt_at,
)
from rehearsal.fidelity import fidelity_lines  # noqa: E402
from rehearsal.managed import Interrupted, Rehearsal  # noqa: E402
from rehearsal.nodes import (  # noqa: E402
    CLOUDS,
    ISOLATIONS,
    Job,
    choose_isolation,
    controller_timestamp,
    cuda_available,
    literal_mount_uses,
)
from rehearsal.pool import load_pool, run_jobs  # noqa: E402
from rehearsal.recipe import (  # noqa: E402
    BadInput,
    apply_bucket_sources,
    check_sources,
    load_recipe,
    parse_key_values,
)
from rehearsal.timeline import find_problems, print_summary, summarize  # noqa: E402

BWLIMIT = re.compile(r"^\d+(\.\d+)?[bBkKmMgGtTpP]?$")


# ---------------------------------------------------------------------------------------------
# Command line


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="rehearse",
        description="Run a SkyPilot recipe locally as a managed spot job would, on a real local\n"
        "object store with per-node bucket mounts, with injected preemptions and node losses,\n"
        "and check that every recovery resumes from the newest checkpoint in the bucket.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n"
        "  python tools/rehearse.py recipes/train.yaml --gpus-per-node 1 \\\n"
        "      --env MAX_STEPS=60 --preempt-at step:20,ckpt:40:kill,45s:proc --bwlimit 8M\n\n"
        "faults: <seconds>s | step:<N> | ckpt:<N>, then :term (SIGTERM, SIGKILL after --grace,\n"
        "VM lost once the node's processes are gone) | :kill (VM lost at once) | :proc (job\n"
        "processes SIGKILLed, VM and mount stay: a user failure, exit 137) | :notice (cloud\n"
        "metadata notice, SIGTERM --notice-lead s later; needs --cloud), optionally @<rank>.\n\n"
        "exit code: 0 if the job SUCCEEDED and every resume was from the newest complete\n"
        "checkpoint, 1 otherwise, 2 for bad input, 130 when interrupted.\n"
        "Summary: WORKDIR/rehearsal.json (schema in tools/rehearsal/__init__.py).",
    )
    parser.add_argument("recipe", help="SkyPilot task YAML")
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="override an env (like sky jobs launch --env); K alone takes $K")
    parser.add_argument("--secret", action="append", default=[], metavar="K=V",
                        help="set a secret; K alone takes $K from the caller's environment")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="rehearsal directory (default runs/rehearse-<recipe>-<time>/)")
    gpus = parser.add_mutually_exclusive_group()
    gpus.add_argument("--gpus-per-node", type=int, metavar="N",
                      help="SKYPILOT_NUM_GPUS_PER_NODE (default: the recipe's accelerators)")
    gpus.add_argument("--gpus-per-attempt", metavar="N,N,...",
                      help="GPUs per node of each attempt in turn (SKYPILOT_NUM_GPUS_PER_NODE "
                      "of its nodes), as if each recovery landed on a candidate with that "
                      "many GPUs; the last value repeats, e.g. 2,1,2 (real SkyPilot picks the "
                      "candidate by price: this forces what a recovery may or may not do); "
                      "not with --gpus-per-node")
    parser.add_argument("--preempt-at", default="", metavar="ITEMS",
                        help="comma list of faults, one per attempt, in order: <seconds>s, "
                        "step:<N> or ckpt:<N>, each optionally :term, :kill, :proc or :notice "
                        "and @<node rank>")
    parser.add_argument("--preempt-every", type=float, metavar="SECONDS",
                        help="preempt every attempt this long after it starts (after the "
                        "--preempt-at items are used up)")
    parser.add_argument("--signal", choices=KINDS, default="term",
                        help="default fault kind (default term)")
    parser.add_argument("--grace", type=float, default=30.0, metavar="SECONDS",
                        help="seconds between SIGTERM and SIGKILL (default 30)")
    parser.add_argument("--notice-lead", type=float, default=10.0, metavar="SECONDS",
                        help="seconds between a :notice and its SIGTERM (default 10)")
    parser.add_argument("--bwlimit", metavar="RATE",
                        help="cap each mount's upload bandwidth (rclone --bwlimit, bytes/s, "
                        "e.g. 2M), to make the bucket lag behind what the trainer wrote")
    parser.add_argument("--no-fuse", action="store_true",
                        help="buckets as plain shared directories, for machines without FUSE "
                        "(no upload lag, a lost VM loses nothing)")
    parser.add_argument("--max-attempts", type=int, default=20, metavar="N",
                        help="stop after this many attempts (default 20)")
    parser.add_argument("--controller-restart-every", type=int, default=2, metavar="K",
                        help="new controller timestamp in SKYPILOT_TASK_ID on every K-th "
                        "restart (default 2; 0 never)")
    parser.add_argument("--cloud", choices=sorted(CLOUDS), default="local",
                        help="cloud reported in SKYPILOT_CLUSTER_INFO; aws/gcp/azure also get "
                        "a metadata endpoint per node (default local)")
    parser.add_argument("--run-setup", action="store_true",
                        help="run the recipe's setup on every node before each attempt")
    parser.add_argument("--candidate", type=int, default=0, metavar="N",
                        help="which any_of/ordered resources candidate to rehearse, from 0 in "
                        "the recipe's order (default 0): its GPUs per node and job_recovery")
    parser.add_argument("--bucket-source", action="append", default=[], metavar="NAME=DIR",
                        help="seed bucket NAME (e.g. one with source: s3://NAME) with DIR's "
                        "contents before launch, as a local source: is uploaded; repeatable")
    parser.add_argument("--isolation", choices=ISOLATIONS,
                        help="what each node is: vm (its own PID, mount, network and UTS "
                        "namespaces: mount paths at their literal place, an address of its "
                        "own), pid (a PID namespace), none (a process tree); default: the "
                        "best this machine allows")
    parser.add_argument("--no-pid-namespace", action="store_const", const="none",
                        dest="isolation", help="same as --isolation none")
    parser.add_argument("--pool-jobs", type=int, default=1, metavar="N",
                        help="rehearse N jobs of one pool at once (sky jobs launch --pool P "
                        "--num-jobs N): each its own VMs, SKYPILOT_JOB_RANK 0..N-1 and "
                        "SKYPILOT_NUM_JOBS=N, the same buckets; faults take @job<J>")
    parser.add_argument("--pool", metavar="POOL_YAML",
                        help="the pool's YAML (pool:, resources, file_mounts, setup), as "
                        "given to sky jobs pool apply; RECIPE is then the job YAML (run:)")
    parser.add_argument("--quiet", action="store_true", help="do not stream node logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_attempts < 1 or args.grace < 0 or (args.gpus_per_node or 0) < 0:
            raise BadInput("--max-attempts must be >= 1, --grace and --gpus-per-node >= 0")
        gpus_per_attempt = (parse_gpus_per_attempt(args.gpus_per_attempt)
                            if args.gpus_per_attempt is not None else None)
        if args.preempt_every is not None and args.preempt_every <= 0:
            raise BadInput("--preempt-every must be > 0")
        if args.notice_lead < 0:
            raise BadInput("--notice-lead must be >= 0")
        if args.bwlimit is not None and not BWLIMIT.match(args.bwlimit):
            raise BadInput(f"--bwlimit {args.bwlimit!r}: expected bytes/s like 512K, 2M or 1.5M")
        faults = parse_preempt_at(args.preempt_at, args.signal) if args.preempt_at else []
        kinds = {f.kind for f in faults} | ({args.signal} if args.preempt_every else set())
        if "notice" in kinds and args.cloud not in NOTICE_CLOUDS:
            raise BadInput(":notice faults need --cloud aws, gcp or azure (whose metadata "
                           "endpoint announces them)")
        if args.pool_jobs < 1:
            raise BadInput("--pool-jobs must be >= 1")
        pool_name, pool_workers = None, None
        if args.pool:
            recipe, pool_workers = load_pool(
                Path(args.pool), Path(args.recipe), parse_key_values(args.env, "--env"),
                parse_key_values(args.secret, "--secret"), candidate=args.candidate)
            pool_name = Path(args.pool).stem
            if args.pool_jobs > pool_workers:
                raise BadInput(f"--pool-jobs {args.pool_jobs}: the pool has {pool_workers} "
                               "worker(s) and rehearse runs each job on a worker of its own")
        else:
            recipe = load_recipe(
                Path(args.recipe),
                parse_key_values(args.env, "--env"),
                parse_key_values(args.secret, "--secret"),
                candidate=args.candidate,
            )
            if args.pool_jobs > 1:
                pool_name, pool_workers = "rehearsal", args.pool_jobs
        apply_bucket_sources(recipe, args.bucket_source)
        for fault in faults:
            if fault.job is not None and fault.job >= args.pool_jobs:
                raise BadInput(f"--preempt-at {fault.describe()}: no job {fault.job} (there "
                               f"are {args.pool_jobs} job(s), --pool-jobs, ranks from 0)")
            if fault.node is not None and fault.node >= recipe.num_nodes:
                raise BadInput(f"--preempt-at {fault.describe()}: no node {fault.node} (the "
                               f"recipe has {recipe.num_nodes} node(s), ranks from 0)")
        if args.pool_jobs * recipe.num_nodes > vm.MAX_NODES:
            raise BadInput(f"--pool-jobs {args.pool_jobs} x {recipe.num_nodes} node(s) is more "
                           f"than the {vm.MAX_NODES} nodes one rehearsal can run")
        check_sources(recipe)
        isolation, isolation_note = choose_isolation(args.isolation)
        literal = literal_mount_uses(recipe) if isolation != "vm" else []
        if literal:
            raise BadInput(
                f"run:/setup: use the mount path {literal[0]} literally, and nodes can be VMs "
                f"here only with namespaces ({isolation_note or '--isolation ' + isolation}): "
                "it would write to this machine's own filesystem; run rehearse as root where "
                "unshare works, or reach the mount through an env")
        fuse, note = choose_storage(args, recipe)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        workdir = (args.workdir or Path("runs") / f"rehearse-{recipe.path.stem}-{stamp}")
        workdir = workdir.resolve()
        (workdir / "events").mkdir(parents=True, exist_ok=True)
        buckets = Buckets(recipe, workdir, fuse=fuse, bwlimit=args.bwlimit, note=note)
    except BadInput as e:
        print(f"rehearse: error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("skyspot.localstore").setLevel(logging.WARNING)

    network = None
    if isolation == "vm":
        try:
            network = vm.Network().start()
        except OSError as err:
            isolation, isolation_note = choose_isolation("pid")
            isolation_note = f"the nodes' bridge: {err}"
    if isolation_note:
        print(f"rehearse: nodes are not VMs of their own here ({isolation_note}): "
              f"{vm.FALLBACK}", flush=True)
    host = network.gateway if network is not None else "127.0.0.1"
    buckets.host = host
    pid_namespace = isolation != "none"
    gpus_per_node = args.gpus_per_node if args.gpus_per_node is not None \
        else gpus_per_attempt[0] if gpus_per_attempt else recipe.gpus_per_node
    first_id = random.randint(1, 99999)
    cpu_only = not cuda_available()
    rehearsals, servers = [], []
    for rank in range(args.pool_jobs):  # a pool is N single jobs; a plain job is one of them
        prefix = f"job{rank}-" if args.pool_jobs > 1 else ""
        if rank == 0:
            buckets.prefix = prefix
        metadata = ([metadata_server.FakeMetadata(host) for _ in range(recipe.num_nodes)]
                    if args.cloud in NOTICE_CLOUDS else [])
        servers += metadata
        job = Job(
            recipe=recipe,
            workdir=workdir,
            buckets=buckets if rank == 0 else buckets.for_job(prefix),
            job_id=first_id + rank,
            gpus_per_node=gpus_per_node,
            cloud=args.cloud,
            controller_started=controller_timestamp(),
            cpu_only=cpu_only,
            metadata_urls=[server.url for server in metadata],
            isolation=isolation,
            network=network,
            vm_base=rank * recipe.num_nodes,
            prefix=prefix,
            job_rank=rank,
            num_jobs=args.pool_jobs,
            gpus_per_attempt=gpus_per_attempt,
        )
        rehearsal = Rehearsal(job, args, pid_namespace, metadata)
        rehearsal.plans = [f for f in rehearsal.plans if f.job in (None, rank)]
        rehearsals.append(rehearsal)
    job = rehearsals[0].job
    jobs = (f"{args.pool_jobs} jobs of pool {pool_name} ({pool_workers} workers), managed job "
            f"ids {first_id}-{first_id + args.pool_jobs - 1}, " if args.pool_jobs > 1 or
            args.pool else f"managed job id {job.job_id}, ")
    each = (f"{','.join(map(str, gpus_per_attempt))} GPU(s) each by attempt"
            if gpus_per_attempt else f"{job.gpus_per_node} GPU(s) each")
    print(f"rehearse: {recipe.path} -> {workdir} ({jobs}{recipe.num_nodes} node(s), {each})",
          flush=True)
    fidelity = fidelity_lines(recipe, run_setup=args.run_setup, gpus_per_node=job.gpus_per_node,
                              gpus_per_attempt=gpus_per_attempt)
    if isolation == "vm" and args.run_setup and recipe.setup:
        fidelity.append("rehearse: fidelity: warning: the nodes reach nothing beyond their "
                        "bridge (no internet, no DNS): a setup: that downloads fails here, "
                        "where a cloud VM would succeed")
    for line in fidelity:
        print(line, flush=True)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Interrupted()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    statuses, errors = ["ERROR"] * len(rehearsals), []
    try:
        for rehearsal in rehearsals:
            rehearsal.job.buckets.start()
        describe_storage(job)
        statuses = run_jobs(rehearsals)
    except (KeyboardInterrupt, Interrupted):
        statuses = ["INTERRUPTED"] * len(rehearsals)
        for rehearsal in rehearsals:
            rehearsal.end_attempt("interrupted")
    except (StorageError, BadInput) as err:
        errors.append(str(err))
        for rehearsal in rehearsals:
            rehearsal.end_attempt("error")
    finally:
        for rehearsal in rehearsals:
            rehearsal.kill_all()
        try:
            # The final model must be in the bucket; anything else is not worth a wait.
            succeeded = all(status == "SUCCEEDED" for status in statuses)
            buckets.close(upload_timeout_s=60 if succeeded else 2)
            for rehearsal in rehearsals[1:]:  # the other jobs' views of the closed store
                rehearsal.job.buckets.close(upload_timeout_s=0)
        except StorageError as err:
            errors.append(f"cleaning up the local object store: {err}")
        for server in servers:
            server.close()
        if network is not None:
            network.close()
        signal.signal(signal.SIGTERM, previous)

    for line in errors:
        print(f"rehearse: error: {line}", file=sys.stderr, flush=True)
    summaries = []
    for rehearsal, status in zip(rehearsals, statuses, strict=True):
        regressions, corruptions = find_problems(rehearsal.attempts,
                                                 "fuse" if buckets.fuse else "plain")
        summary = summarize(rehearsal, status, regressions, corruptions)
        summary.update({"isolation": isolation, "node_ips": rehearsal.job.ips(),
                        "job_rank": rehearsal.job.job_rank, "fidelity": fidelity})
        if errors:
            summary["ok"] = False
            summary["errors"] = errors
        summaries.append(summary)
    if len(summaries) == 1 and not args.pool:
        summary = summaries[0]
    else:
        bad = [s for s in statuses if s != "SUCCEEDED"]
        summary = {"schema": SCHEMA, "recipe": str(recipe.path), "workdir": str(workdir),
                   "pool": {"pool_yaml": args.pool, "name": pool_name, "workers": pool_workers,
                            "num_jobs": args.pool_jobs},
                   "status": bad[0] if bad else "SUCCEEDED",
                   "ok": all(s["ok"] for s in summaries), "jobs": summaries}
    (workdir / "rehearsal.json").write_text(json.dumps(summary, indent=2) + "\n")
    for rehearsal, job_summary in zip(rehearsals, summaries, strict=True):
        if len(summaries) > 1:
            print(f"\n=== job {rehearsal.job.job_rank} (SKYPILOT_JOB_RANK={rehearsal.job.job_rank},"
                  f" managed job id {rehearsal.job.job_id})")
        print_summary(job_summary, rehearsal.started)
    if len(summaries) > 1:
        print(f"\npool: {len(summaries)} jobs, " + ", ".join(
            f"job{r.job.job_rank} {s['status']}{'' if s['ok'] else ' (FAILED)'}"
            for r, s in zip(rehearsals, summaries, strict=True)))
    print(f"rehearse: summary in {workdir / 'rehearsal.json'}")
    if "INTERRUPTED" in statuses:
        return 130
    return 0 if summary["ok"] else 1


def parse_gpus_per_attempt(text: str) -> list[int]:
    """--gpus-per-attempt "2,1,2" -> [2, 1, 2]: whole numbers >= 1 (BadInput otherwise)."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip():
        raise BadInput("--gpus-per-attempt is empty: expected GPUs per node of each attempt, "
                       "comma-separated, like 2,1,2")
    for item in items:
        if not re.fullmatch(r"[0-9]+", item) or int(item) < 1:
            raise BadInput(f"--gpus-per-attempt {text!r}: {item!r} is not a whole number of "
                           "GPUs >= 1 (expected e.g. 2,1,2)")
    return [int(item) for item in items]


def describe_storage(job: Job) -> None:
    buckets = job.buckets
    if buckets.note:
        print(f"rehearse: {buckets.note}")
    elif buckets.store is not None:
        limit = f", uploads capped at {buckets.bwlimit}/s per mount" if buckets.bwlimit else ""
        print(f"rehearse: buckets {', '.join(buckets.buckets)} on a local S3 store (rclone serve "
              f"s3 at {buckets.store.endpoint}, objects in {buckets.data_dir}){limit}")
    if job.isolation == "vm":
        print(f"rehearse: each node is a VM of its own: address on bridge {job.network.bridge} "
              f"({', '.join(job.ips())}), its own home, every mount at its literal path")
    for path, spec in job.recipe.storage_mounts.items():
        where = ", ".join(f"node{nm.rank} {nm.local}" for r in buckets.nodes
                          for nm in buckets.nodes[r] if nm.path == path)
        if job.isolation == "vm":
            where = f"{path} in each node (here {where})"
        kind = spec.mode + (f" {spec.mount_type}" if spec.mount_type else "")
        print(f"rehearse: mount {path} ({spec.url}, {kind if buckets.fuse else 'plain'}) -> "
              f"{where}")
    for mount in buckets.copies:
        print(f"rehearse: copy {mount.path} ({mount.source}) -> {mount.local}")
    for key, value in job.recipe.envs.items() if job.isolation != "vm" else ():
        locals_ = {remap(value, buckets.mounts_for(r)) for r in buckets.nodes}
        if locals_ - {None}:
            shown = ", ".join(f"node{r} {remap(value, buckets.mounts_for(r))}"
                              for r in buckets.nodes) if len(locals_) > 1 else locals_.pop()
            print(f"rehearse: env {key}={value} -> {shown}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
