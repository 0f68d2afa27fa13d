"""How a run went, from what it wrote: the model behind tools/report.py.

``runs.load(path)`` reads a rehearsal (``WORKDIR`` or its ``rehearsal.json``), a real run's
directory in its checkpoint bucket (``<checkpoint-dir>/<run>``, whose ``events/*.jsonl`` the
trainer writes, or the checkpoint dir holding one such run) or a batch job's unit output
(``plan.json`` + ``data/part-*.parquet``, skyspot.units) into a ``Run``: its attempts, each
with the (step, time) points it reached, its checkpoints and how it ended.
``accounting.account`` splits the wall time, ``plot.draw`` draws the PNG and ``summary``
writes text, markdown or JSON.

Definitions (times are wall-clock seconds; steps are optimizer steps):

* **wall time**: from the first attempt's launch to the last attempt's end (a rehearsal
  records both). A run directory holds only what the trainer wrote, so there it is from the
  first event to the last: provisioning, setup and model loading before the first attempt's
  ``start`` event are not seen, nor are relaunches' (they fall in the gaps between attempts).
* **kept step** of an attempt: the step the next attempt resumed from (capped at the last step
  the attempt reached), or the last step reached for the last attempt. Steps after it were
  done again.
* **lost work** (steps redone): per attempt, ``last step reached - kept step`` (never below
  0), summed over the attempts; **lost time** is the wall time the attempt took from the
  kept step to its last step, less the checkpoint stalls in it. From a run directory this
  is a lower bound: a lost VM takes with it the events written after its last committed
  checkpoint, so the last step it reached may be higher than the events show.
* **useful training time**: per attempt, from its ``start`` event (the loop begins, the
  checkpoint already loaded) to the time it reached its kept step, less the seconds the loop
  waited on checkpoints taken in that span (``stall_seconds`` of saves at steps from the
  attempt's first step up to, not including, its kept step).
* **goodput** = useful training time / wall time. Everything else is overhead: startup
  (launch to ``start``: VM, setup, imports, loading or resuming), checkpoint stalls, lost
  time, the tail (after the last step: the final or preemption save, the wait for the bucket,
  the final model, exit) and gaps between attempts (the recovery). The six add up to the
  wall time. **Step goodput** = useful steps / steps executed, as rehearse prints it.
* **checkpoint overhead**: the seconds the training loop waited for checkpoints (the sum of
  every checkpoint event's ``stall_seconds``, periodic, preemption and final saves of every
  attempt), as a share of the wall time and of the loop's time (``start`` to last step, all
  attempts). The upload to the bucket runs beside the loop and is not counted here: it shows
  as **bucket lag**, step minus the newest step complete in the bucket (``durable_step``) at
  each checkpoint.
* **restarts**: attempts - 1. Preemptions by kind, as rehearse names them: ``term`` (SIGTERM,
  then the VM is lost), ``kill`` (the VM lost at once), ``notice`` (the cloud announces it,
  SIGTERM follows), ``proc`` (processes killed, VM kept). From a run directory: ``term``
  (a preemption event for a signal), ``notice`` (for a cloud notice), ``lost`` (the attempt
  ends without an exit event: a lost VM or killed processes).
* **cost**: spot = the seconds every attempt ran (launch to end; from a run directory, its
  first event to its last) x nodes x the cheapest spot $/h among the recipe's candidates (or
  ``--accelerator``). On-demand = what the same work takes uninterrupted: the first
  attempt's startup + useful training time + the stalls of the checkpoints in it + the last
  attempt's tail, x nodes x the cheapest on-demand $/h. Prices from tools/planning/prices.py.
* **units done over time** (batch jobs): each ``data/part-*.parquet``'s modification time,
  which on a bucket (or the rehearsal's store) is when it reached the bucket: done, in the
  skyspot.units sense.
"""
