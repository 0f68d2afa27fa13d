"""Rehearse a SkyPilot recipe locally, the way a managed spot job runs it, with node-loss faults.

    python tools/rehearse.py recipes/train.yaml --gpus-per-node 1 \\
        --preempt-at step:20,ckpt:40:kill,step:60:proc --bwlimit 8M

What it emulates, and where it deliberately differs from a real managed job:

* The recipe is parsed by SkyPilot itself, exactly as ``sky jobs launch --env/--secret`` does
  (``load_chain_dag_from_yaml`` with the overrides, so an override is visible to everything the
  parser substitutes, e.g. a bucket name written as ``${BUCKET}``).
* Every node is a VM of its own where this machine allows it (root, ``unshare``, ``ip``;
  vm.py, node_init.py, nodes.py): PID, mount, network and UTS namespaces. Every
  ``file_mounts`` target is at its literal path inside the node (``/checkpoint``, ``~/data``;
  nothing is created on this machine's own paths), ``HOME`` is the node's own
  (``WORKDIR/nodes/<node>/home``: kept across restarts on the same VM, emptied with the VM),
  the recipe's workdir is at ``~/sky_workdir`` (a bind: writes reach the real workdir), and
  the node has an address on a private bridge rehearse creates and removes
  (``SKYPILOT_NODE_IPS``) and a hostname that resolves to it. The store, the mounts' remote
  control and the metadata endpoints listen on the bridge's gateway. ``run:`` and ``setup:``
  are written to a file and run by ``/bin/bash -i FILE`` (so ``~/.bashrc`` is sourced), as
  SkyPilot does. Killing the namespace's init takes the whole tree, setsid'd torch-elastic
  ranks included, like a lost VM. The init is a Python reaper that runs bash as its child:
  a PID 1 only receives the signals it installed a handler for, so a trainer as PID 1 would
  ignore SIGTERM. It keeps the node alive after SIGTERM until every process is gone, as a
  VM's shutdown grace period does. ``--isolation pid`` (or where VMs cannot be made) gives a
  PID namespace only, ``none`` a process tree tracked with psutil; both say so in one line,
  rewrite mount paths in envs only, and refuse a recipe that names a mount path literally.
* ``--pool-jobs N`` (with ``--pool POOL.yaml``: pool.py) runs N jobs of one pool at once,
  each a managed job of its own (VMs, mounts, ``SKYPILOT_JOB_RANK``, faults, recovery)
  against the same buckets; rehearsal.json is then ``{pool, status, ok, jobs: [...]}`` with
  one summary per job as below.
* Buckets are real. Every bucket of the recipe's ``file_mounts`` is a bucket on ONE local S3
  server per rehearsal (``rclone serve s3`` over ``WORKDIR/store/data``, tools/localstore.py),
  and every node mounts it on its own (``WORKDIR/nodes/node<r>/mnt/<bucket>``, with its own
  rclone VFS cache ``WORKDIR/nodes/node<r>/cache/<bucket>``) in the recipe's ``mode:``
  (MOUNT_CACHED with SkyPilot's own rclone flags and ``type:`` preset; MOUNT as a
  close-uploads mount like goofys) and ``--bwlimit`` on each mount's uploads. COPY-mode
  buckets are downloaded into ``WORKDIR/nodes/node<r>/copy/`` on every fresh VM. Without VMs,
  envs that point into a mount path are rewritten per node to that node's mount. Every node gets
  ``RCLONE_CONFIG`` (the store's remote ``skyspot-local``) and rclone on ``PATH``, so a trainer
  can list the bucket behind its mount, as skyspot.durability does. Mounts are made before an
  attempt's nodes start and stay up across attempts unless a fault takes the VM.
  Without FUSE (no ``/dev/fuse``, no ``fusermount3``, or ``--no-fuse``) buckets fall back to
  plain directories ``WORKDIR/buckets/<bucket>`` shared by every node: no upload lag, and a
  lost VM loses nothing; one line says so and how to get FUSE.
* SkyPilot appends a wait to ``run:`` on clusters with MOUNT_CACHED mounts
  (``TaskCodeGen.get_rclone_flush_script``): the job ends only once rclone has uploaded
  everything. Rehearse appends the same wait, asking each mount's rclone (``vfs/stats``) every
  0.2 s instead of reading its log every 10 s, so a rehearsed job ends up to ~11 s sooner.
* The recipe's ``workdir`` is resolved against the current directory, as ``sky`` does, so run
  this from the repo root (recipes say ``workdir: .``). Without a workdir each node starts in its
  home, like a fresh VM's.
* Restarts follow sky/jobs/recovery_strategy.py (``should_restart_on_failure``) and
  sky/jobs/controller.py: a preemption is recovered and never counted; a failed job (any node
  non-zero; the other nodes are then killed and report 137, as SkyPilot's ``get_or_fail``
  does) restarts without counting if ANY node's exit code is in ``recover_on_exit_codes``,
  otherwise it bumps a counter and restarts while the counter <= ``max_restarts_on_errors``.
  A failing ``setup`` (FAILED_SETUP) goes through the same accounting.
* GPUs per node: one count for the whole rehearsal (``--gpus-per-node``, default the
  ``--candidate``'s), or, with ``--gpus-per-attempt 2,1,2``, attempt 1's nodes get 2, attempt
  2's 1, attempt 3's and every later one's 2 (``SKYPILOT_NUM_GPUS_PER_NODE``, and
  ``SKYPILOT_SETUP_NUM_GPUS_PER_NODE`` for ``setup:``), as if each recovery landed on an
  ``any_of`` candidate with that many GPUs: the recipe's one-process-per-GPU launch then
  starts another world size. A real recovery's candidate is SkyPilot's choice (by price and
  capacity): this forces what a real recovery may or may not do, and a fidelity line says so,
  which attempt gets which count, and which of the counts no candidate has.
* ``SKYPILOT_TASK_ID`` embeds the jobs controller's start time. It changes on every
  ``--controller-restart-every``-th restart, like a controller restart does; a trainer that keys
  its run name on it starts from scratch and the rehearsal fails with a REGRESSION.

Faults (``--preempt-at``, one per attempt, in order; ``--preempt-every`` after those). A
trigger ``<seconds>s`` (after the attempt's launch), ``step:<N>`` (node 0 reports step >= N)
or ``ckpt:<N>`` (node 0 reports a committed checkpoint of step >= N: its manifest was just
written on the node, its uploads are probably not done), then a kind:

* ``term`` (default, ``--signal``): a preemption with grace. SIGTERM to every process of the
  node; SIGKILL after ``--grace``. The VM (rclone mount and its cache) is lost as soon as the
  node's processes have all exited, or when the grace ends, whichever is first.
* ``kill``: the VM is lost at once: SIGKILL to the whole node, then its mounts' rclone is
  SIGKILLed and its cache deleted; whatever was not uploaded is gone.
* ``proc``: the job's processes die on a live VM (OOM killer, a crash of the launcher): SIGKILL
  every process of the node; its mounts stay up with their caches and keep uploading, and the
  next attempt reuses them. SkyPilot sees exit code 137 on a cluster that is UP: a user
  failure, restarted only through ``max_restarts_on_errors`` / ``recover_on_exit_codes``.
  (Real SkyPilot relaunches on the same cluster only with ``strategy: FAILOVER``;
  EAGER_NEXT_REGION, the default, tears the cluster down before relaunching.)
* ``notice`` (needs ``--cloud aws|gcp|azure``): every node has its own loopback metadata
  endpoint (tools/metadata_server.py, ``SKYSPOT_METADATA_URL``); the struck node's announces
  the preemption at the trigger, SIGTERM follows ``--notice-lead`` seconds later, SIGKILL
  after ``--grace``, and the VM is lost as for ``term`` (not before the SIGTERM: a trainer
  that saved and exited on the notice leaves its uploads running until then). The notice is
  withdrawn before the next attempt.
* ``@<rank>`` strikes one node only (default: every node). The other nodes of a multi-node job
  are then torn down as SkyPilot's recovery does (it terminates the cluster and relaunches
  it): right after the struck node's VM is lost, their processes are SIGKILLed and their VMs
  are lost too. That is the pessimistic end: a real controller notices within ~15 s.

Checks (a rehearsal fails, exit 1, with one line each). After a fault that lost VMs, once they
are gone, the bucket itself is read through the S3 API (never a node's mount or cache): the
newest checkpoint of the run (``<run>/step-NNNNNNNN[.rK]``, the run directory being where
node 0's checkpoint events point) whose ``manifest.json`` is in the bucket and whose every
listed file is there with its size and xxh3-128 checksum. The next attempt must resume from
exactly that step: resuming from an older one, or starting fresh while one existed, is a
REGRESSION; resuming from a checkpoint that was not complete in the bucket is a CORRUPTION.
After a ``proc`` fault or a failure (VM alive, cache kept), and always on the plain-directory
fallback, the next attempt must resume from at least the newest checkpoint node 0 reported
committed (REGRESSION otherwise); on the fallback a resume from a torn directory is a
CORRUPTION too.

Goodput (only with skyspot events, and only when the steps add up): ``useful steps /
optimizer steps executed across all attempts``, useful steps = final step - the step the
first attempt started at (a seeded run starts above 0), steps executed in an attempt = last
step seen - step it resumed from. The wall-time version is ``useful steps * median seconds
per step / wall seconds from first launch to the end``.

WORKDIR/rehearsal.json (``"schema": "skyspot-rehearsal/2"``; times are Unix seconds, steps
optimizer steps, null where unknown):

    schema, recipe, workdir, cloud, managed_job_id, num_nodes, pid_namespaces
    isolation      vm | pid | none (what each node was; see above)
    node_ips       SKYPILOT_NODE_IPS as the nodes got it
    job_rank       SKYPILOT_JOB_RANK (0 unless a job of --pool-jobs)
    fidelity       the "rehearse: fidelity: ..." lines printed at start
    status         SUCCEEDED | FAILED | FAILED_SETUP | MAX_ATTEMPTS | INTERRUPTED | ERROR
    ok             status is SUCCEEDED and there are no regressions, corruptions or splits
    regressions    ["REGRESSION: ...", ...]
    corruptions    ["CORRUPTION: ...", ...]
    splits         ["SPLIT: ...", ...]: an attempt whose nodes did not form one world: a start
                   event in a node other than 0's events file (skyspot trainers emit from
                   global rank 0 only), or a world_size other than num_nodes x GPUs per node
                   (the attempt's SKYPILOT_NUM_GPUS_PER_NODE, 0 counted as 1)
    inconsistencies  ["INCONSISTENT: ...", ...]: a next attempt resumed beyond the last step
                   the previous one reported; its steps_lost is null (never negative)
    skyspot_events whether node 0 wrote any start/step/checkpoint event; false: the resume
                   check does not apply and every step figure below is null
    bucket_timeline  [{time, bucket, objects, bytes}]: every bucket through the S3 API, about
                   every second and after each attempt, an entry only when either changed;
                   the last one per bucket is read from data_dir once rehearse is done
    errors         only when the local object store or a mount failed: ["...", ...]
    storage        {backend: "fuse" | "plain", note, endpoint, store, data_dir, rclone_config,
                    bwlimit}   data_dir/<bucket>/<key> holds the objects once rehearse is done
    mounts         {<recipe path>: {source, bucket, mode: MOUNT_CACHED|MOUNT|COPY, type,
                    nodes: [{rank, local, mount_point, cache_dir, mounted}]}}
                   (local: the path the node's envs point to; mounted: mounts made over the
                   rehearsal, 1 + the VMs lost)
    job_recovery   {strategy, max_restarts_on_errors, recover_on_exit_codes,
                    restart_cnt_on_failure}
    attempts       [{index, task_id, started, ended,
                     ending        exited | failed | failed_setup | preempted:term |
                                   preempted:kill | preempted:notice | interrupted |
                                   error (the store or a mount failed: see errors)
                     fault         null | {kind, trigger, nodes (struck), phase, at, at_step,
                                   sigterm_at, sigkill_at, vm_lost: [{node, at, unuploaded:
                                   [{bucket, key, bytes}], unuploaded_count,
                                   unuploaded_bytes}] in order (unuploaded: what the node's
                                   mount caches held that the bucket did not, read just
                                   before the loss; null if that could not be read),
                                   teardown (nodes torn down after the struck ones)}
                     gpus_per_node  SKYPILOT_NUM_GPUS_PER_NODE of this attempt's nodes
                                   (--gpus-per-attempt, --gpus-per-node or the candidate's)
                     decision, preempt_plan, exit_codes (per node), run_name,
                     resumed_from, resumed_path, resumed_key (bucket/key of resumed_path),
                     preemption_reason (the trainer's), last_step, first_step_at,
                     seconds_to_first_step (from launch), steps_lost,
                     bucket        null | {vm_lost, bucket, run_prefix, newest_complete_step,
                                   newest_complete_key, checkpoints: [{key, step, complete,
                                   reason}] newest first, objects, bytes} read after the
                                   fault (without skyspot events: no checkpoints, and
                                   buckets: {<bucket>: {objects, bytes}})
                     starts        [{node, world_size, time}]: start events of every node
                     buckets_at_end  {<bucket>: {objects, bytes}} once the attempt ended
                     checkpoints   [{step, path, seconds, bytes, async, stall_seconds,
                                   time, durable_step, lag_steps}] from node 0's
                                   checkpoint events
                     skipped_checkpoints  [step, ...]: periodic saves the trainer skipped
                                   because the previous one was still being written or
                                   not yet in the bucket
                    }]
    totals         {attempts, preemptions: {term, kill, notice}, process_losses,
                    checkpoints: {count, mean_seconds, mean_bytes, max_lag_steps,
                                  skipped},
                    final_step, steps_executed, steps_lost, goodput, wall_seconds,
                    wall_goodput}   (null without skyspot events; steps_lost, goodput and
                    wall_goodput null with splits or inconsistencies; goodput counts the
                    steps from where the first attempt started)
"""

SCHEMA = "skyspot-rehearsal/2"
