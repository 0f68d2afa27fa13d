"""skyspot: the small runtime that makes spot and preemptible GPUs safe for ML work.

One module per concern:

- ``skyspot.checkpoint``: crash-consistent checkpoints on object-store mounts.
- ``skyspot.settings``: a run's settings, recorded in each checkpoint; a change refused
  on resume unless allowed.
- ``skyspot.divergence``: nan/inf caught before the optimizer step and before a save,
  with one verdict on every rank.
- ``skyspot.preemption``: SIGTERM/SIGINT flags and the clouds' preemption notices.
- ``skyspot.events``: machine-readable run events that survive a preemption.
- ``skyspot.skyenv``: what SkyPilot tells a task through its environment.
- ``skyspot.launch``: the exit-code wrapper that lets SkyPilot see a preemption exit.
- ``skyspot.textdata``: local text datasets, loaded and checked on the Arrow table.
"""

__version__ = "0.1.0"

#: Exit code of a process that committed a preemption save; recipes list it in
#: ``job_recovery.recover_on_exit_codes`` so SkyPilot relaunches the job.
PREEMPTED_EXIT_CODE = 143
