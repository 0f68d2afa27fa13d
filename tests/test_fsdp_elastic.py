"""Sharded FSDP checkpoints and elastic resume, with real gloo ranks on CPU.

- --fsdp, 2 ranks, SIGKILL at random steps and once mid-checkpoint: the final
  model.safetensors is bit-identical (torch.equal, every tensor) to an uninterrupted
  --fsdp run, and every checkpoint lists both ranks' shard files.
- A shard of rank 1 alone that is torn (its size right, one byte wrong: only rank 1 reads
  it) makes that checkpoint invalid on every rank: the run resumes from the one before and
  still ends bit-identical.
- --elastic, with --fsdp (DCP reshards) and without (every rank loads the whole state):
  2 ranks -> SIGKILL -> 1 rank -> SIGKILL -> 2 ranks. Every sample id is
  consumed exactly once per epoch, counted from the trainer's instrumented data path
  (TRACE_SAMPLES_ENV), each optimizer step takes the same sample ids as in the
  uninterrupted 2-rank run, the global batch is the same in every attempt, and the loss at
  every step is within LOSS_TOLERANCE of the uninterrupted run's.
- Refusals, one line each: an indivisible global batch (naming what divides), --elastic
  without --global-batch, and another world size without --elastic.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
from trainer import (
    assert_bit_identical,
    command,
    env_for,
    kill_at_random_instants,
    kill_tree,
    last_step,
    lm_args,
    read_events,
    start,
    wait_until,
    weights,
)

from skyspot.checkpoint import MANIFEST, step_dirs

pytestmark = pytest.mark.slow

TRACE_ENV = "SKYSPOT_TRACE_SAMPLES"
# The loss after a change of world size vs. the uninterrupted run's, relative. Not 0: on
# one rank the 4 micro-batches' gradients are summed in another order than 2 ranks' 2 each
# plus an all-reduce (and FSDP reduce-scatters shards of the sum), so the fp32 weights
# differ in their last bits from the first changed step on; the difference then grows
# with every step. Measured: the test prints both figures (about 1e-6 here; the events
# round the loss to 5 decimals, so that is their resolution).
LOSS_TOLERANCE = 1e-4
# The same for the final weights: the largest difference of each tensor over its largest
# magnitude, after 30 steps of which ~20 ran on another world size than the baseline's.
WEIGHT_TOLERANCE = 1e-3


def _run(assets: Path, root: Path, ranks: int, attempt: int, trace: Path | None = None,
         **flags) -> subprocess.Popen:
    env = env_for(root / f"events-{attempt}.jsonl",
                  **({TRACE_ENV: str(trace)} if trace else {}))
    return start(command(lm_args(assets, root / "ckpt", **flags), ranks), env,
                 root / "log.txt")


def _finish(assets, root, ranks, attempt, trace=None, **flags) -> list[dict]:
    proc = _run(assets, root, ranks, attempt, trace, **flags)
    assert proc.wait(timeout=600) == 0, (root / "log.txt").read_text()[-3000:]
    return read_events(root / f"events-{attempt}.jsonl")


def _kill_at(assets, root, ranks, attempt, step, trace=None, **flags) -> None:
    proc = _run(assets, root, ranks, attempt, trace, **flags)
    events = root / f"events-{attempt}.jsonl"
    assert wait_until(lambda: last_step(read_events(events)) >= step, proc), \
        (root / "log.txt").read_text()[-3000:]
    kill_tree(proc, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def fsdp_baseline(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-baseline")
    events = _finish(tiny_assets, root, 2, 0, fsdp=True, async_checkpoint=True)
    assert [e["world_size"] for e in events if e["event"] == "start"] == [2]
    return weights(root / "ckpt" / "t" / "final"), root


def test_fsdp_resume_is_bit_exact_after_sigkill_at_random_instants(
        tiny_assets, tmp_path, fsdp_baseline):
    torn = kill_at_random_instants(tiny_assets, tmp_path, 2, 17, fsdp=True,
                                   async_checkpoint=True)
    assert torn and torn[0] is not None
    run_dir = tmp_path / "ckpt" / "t"
    final = _finish(tiny_assets, tmp_path, 2, 3, fsdp=True, async_checkpoint=True)
    resumed = [e for e in final if e["event"] == "resumed"]
    assert resumed and resumed[0]["step"] > 0, "the last attempt restarted from step 0"
    assert_bit_identical(weights(run_dir / "final"), fsdp_baseline[0])
    # Every committed checkpoint lists both ranks' shards, DCP's metadata and each rank's RNG.
    for _, _, path in step_dirs(run_dir):
        if (path / MANIFEST).exists():
            listed = {e["path"] for e in json.loads((path / MANIFEST).read_text())["files"]}
            assert {"sharded-rank0.safetensors", "sharded-rank1.safetensors",
                    "sharded.metadata", "rng-rank1.safetensors"} <= listed, listed
            assert "model.safetensors" not in listed  # nothing gathered on rank 0


def test_the_final_fsdp_model_loads_with_from_pretrained(tiny_assets, fsdp_baseline):
    import transformers

    final = fsdp_baseline[1] / "ckpt" / "t" / "final"
    model = transformers.AutoModelForCausalLM.from_pretrained(final)
    saved = weights(final)
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    ids = torch.arange(16)[None]
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_a_torn_shard_of_rank_1_alone_is_never_chosen(tiny_assets, tmp_path, fsdp_baseline):
    _kill_at(tiny_assets, tmp_path, 2, 0, 13, fsdp=True, async_checkpoint=True)
    run_dir = tmp_path / "ckpt" / "t"
    newest = next(path for _, _, path in step_dirs(run_dir) if (path / MANIFEST).exists())
    shard = newest / "sharded-rank1.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: rank 0's listing checks pass, rank 1's hash not
    shard.write_bytes(bytes(data))

    final = _finish(tiny_assets, tmp_path, 2, 1, fsdp=True, async_checkpoint=True)
    (resumed,) = [e for e in final if e["event"] == "resumed"]
    assert resumed["path"] != str(newest) and resumed["step"] < int(newest.name[5:13])
    log = (tmp_path / "log.txt").read_text()
    assert f"skipping checkpoint {newest}: rank 1: sharded-rank1.safetensors checksum " \
           "mismatch" in log
    assert_bit_identical(weights(run_dir / "final"), fsdp_baseline[0])


# ----------------------------------------------------------------------------- elastic

ELASTIC = dict(fsdp=True, elastic=True, global_batch=16, batch_size=4, grad_accum=None,
               max_steps=30, log_every=1, checkpoint_every_steps=3, async_checkpoint=True)


@pytest.fixture(scope="module")
def small_data(tiny_assets, tmp_path_factory) -> Path:
    """A dataset of a few dozen sequences: 30 optimizer steps of 16 run over 2+ epochs."""
    root = tmp_path_factory.mktemp("small-data")
    lines = (tiny_assets / "data" / "train.jsonl").read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join(lines[:40]) + "\n")
    return root


def _history(root: Path, attempts: int, max_steps: int) -> dict[int, tuple[int, list]]:
    """{optimizer step: (epoch, sorted sample ids)} of the steps that made the final model:
    of each attempt (its ranks traced into trace-<attempt>/), the steps after its resume
    point up to the next attempt's; the rest were redone after a kill."""
    begins = [next(e["step"] for e in read_events(root / f"events-{a}.jsonl")
                   if e["event"] == "start") for a in range(attempts)]
    steps: dict[int, tuple[set, list]] = {}
    for attempt, begin in enumerate(begins):
        end = begins[attempt + 1] if attempt + 1 < attempts else max_steps
        for file in (root / f"trace-{attempt}").glob("rank*.jsonl"):
            for line in file.read_text().splitlines():
                if not line.endswith("}"):
                    continue  # torn by the kill
                record = json.loads(line)
                if begin < record["step"] <= end:
                    epochs, ids = steps.setdefault(record["step"], (set(), []))
                    epochs.add(record["epoch"])
                    ids.extend(record["ids"])
    return {step: (min(epochs), sorted(ids)) for step, (epochs, ids) in sorted(steps.items())}


@pytest.mark.parametrize("fsdp", [True, False], ids=["fsdp", "ddp"])
def test_elastic_2_then_1_then_2_ranks_sees_every_sample_once_per_epoch(
        tiny_assets, small_data, tmp_path, fsdp):
    base_root, run_root = tmp_path / "uninterrupted", tmp_path / "elastic"
    for root, attempts in ((base_root, 1), (run_root, 3)):
        for attempt in range(attempts):
            (root / f"trace-{attempt}").mkdir(parents=True)
    flags = dict(ELASTIC, dataset=small_data, fsdp=fsdp)
    base_events = _finish(tiny_assets, base_root, 2, 0, base_root / "trace-0", **flags)

    _kill_at(tiny_assets, run_root, 2, 0, 8, run_root / "trace-0", **flags)
    _kill_at(tiny_assets, run_root, 1, 1, 19, run_root / "trace-1", **flags)
    _finish(tiny_assets, run_root, 2, 2, run_root / "trace-2", **flags)

    starts = [next(e for e in read_events(run_root / f"events-{a}.jsonl")
                   if e["event"] == "start") for a in range(3)]
    assert [s["world_size"] for s in starts] == [2, 1, 2]
    assert [s["global_batch"] for s in starts] == [16, 16, 16]
    assert [s["grad_accum"] for s in starts] == [2, 4, 2]
    resumed = [next(e for e in read_events(run_root / f"events-{a}.jsonl")
                    if e["event"] == "resumed") for a in (1, 2)]
    assert [r["from_world_size"] for r in resumed] == [2, 1]

    base = _history(base_root, 1, 30)
    run = _history(run_root, 3, 30)
    assert sorted(run) == list(range(1, 31)) == sorted(base)
    # Each optimizer step took exactly the samples it took without interruption.
    assert run == base
    epochs: dict[int, Counter] = {}
    for epoch, ids in run.values():
        epochs.setdefault(epoch, Counter()).update(ids)
        assert len(ids) == 16  # the global batch, whatever the world size
    assert len(epochs) >= 2, "the run should cover more than one epoch"
    # The epoch is cut to whole global batches of its own permutation: a completed one
    # holds that many distinct samples (which ones are left out differs by epoch).
    epoch_size = len(epochs[0])
    assert epoch_size % 16 == 0
    for epoch, seen in epochs.items():
        assert max(seen.values()) == 1, f"epoch {epoch}: a sample seen twice"
        if epoch < max(epochs):  # completed: every sample of the epoch, each once
            assert sum(seen.values()) == len(seen) == epoch_size

    base_loss = {e["step"]: e["loss"] for e in base_events if e["event"] == "log"}
    run_loss = {e["step"]: e["loss"] for a in range(3)
                for e in read_events(run_root / f"events-{a}.jsonl") if e["event"] == "log"}
    assert sorted(base_loss) == sorted(run_loss) == list(range(1, 31))
    worst = max(abs(run_loss[s] - base_loss[s]) / abs(base_loss[s]) for s in base_loss)
    assert worst <= LOSS_TOLERANCE, f"largest relative loss difference {worst:.2e}"
    # Until the first change of world size, the runs are the same run, bit for bit.
    first_resume = resumed[0]["step"]
    assert all(run_loss[s] == base_loss[s] for s in range(1, first_resume + 1))
    # The weights are where reduction order shows first (the logged loss has 5 decimals).
    a, b = weights(run_root / "ckpt" / "t" / "final"), weights(base_root / "ckpt" / "t" / "final")
    drift = max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item()
                for k in b)
    assert drift <= WEIGHT_TOLERANCE, f"final weights differ by up to {drift:.2e} (relative)"
    print(f"elastic ({'fsdp' if fsdp else 'ddp'}): largest relative loss difference "
          f"{worst:.2e} (tolerance {LOSS_TOLERANCE:.0e}); final weights: largest difference "
          f"{drift:.2e} of the tensor's largest magnitude (tolerance {WEIGHT_TOLERANCE:.0e})")


def _refused(args: list[str], ranks: int = 1) -> subprocess.CompletedProcess:
    from trainer import REPO

    result = subprocess.run(command(args, ranks), env=env_for(Path("/dev/null")), cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "train/lm.py: error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return result


def test_an_indivisible_global_batch_is_refused_naming_what_divides(tiny_assets, tmp_path):
    result = _refused(lm_args(tiny_assets, tmp_path / "ckpt", global_batch=6, batch_size=4,
                              grad_accum=None))
    assert ("--global-batch 6 is not divisible by --batch-size 4 x 1 processes = 4: process "
            "counts that keep it with --batch-size 4: none; --batch-size values that keep it "
            "on 1 processes: 1, 2, 3, 6") in result.stderr
    assert not (tmp_path / "ckpt").exists()  # nothing written


def test_elastic_needs_a_global_batch(tiny_assets, tmp_path):
    result = _refused(lm_args(tiny_assets, tmp_path / "ckpt", elastic=True))
    assert "--elastic needs --global-batch N" in result.stderr


def test_another_world_size_without_elastic_is_refused(tiny_assets, small_data, tmp_path):
    flags = dict(fsdp=True, global_batch=16, batch_size=4, grad_accum=None, max_steps=4,
                 dataset=small_data)
    _finish(tiny_assets, tmp_path, 2, 0, **flags)
    run_dir = tmp_path / "ckpt" / "t"
    before = sorted(p.name for p in run_dir.rglob("*"))
    result = _refused(lm_args(tiny_assets, tmp_path / "ckpt", **dict(flags, max_steps=8)))
    assert "was written with world size 2" in result.stderr
    assert "launch the run with --elastic --global-batch N from the start" in result.stderr
    assert sorted(p.name for p in run_dir.rglob("*")) == before  # nothing touched
