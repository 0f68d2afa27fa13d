"""Catching nan/inf before it is applied or saved, with one verdict on every rank.

Guarantee: ``nonfinite_at_step``, called after the gradients are reduced and clipped and
before ``optimizer.step()``, says whether the loss or the gradient norm is nan/inf on ANY
rank, and every rank gets the same answer (one all-reduce of two flags, the step's one host
sync), so all ranks skip or stop together and none applies a non-finite update.
``state_is_finite``, called before each save, says whether every weight and optimizer-state
tensor is finite on every rank (same answer everywhere), so a caller that saves only on True
never writes nan/inf into a checkpoint or a final model.

What to do about it (skip the step, stop the run) is the trainer's decision, not this
module's. ``nan_faults`` reads the fault-injection hook the tests use (NAN_AT_STEP_ENV).
"""

from __future__ import annotations

import os

import torch

# Fault injection for tests: "STEP[@RANK],..." adds nan to the loss (its value only, the
# gradients stay finite) of optimizer step STEP, on every rank or on RANK only, once per
# entry ("5,5" for two attempts at step 5). Never set in production.
NAN_AT_STEP_ENV = "SKYSPOT_FAULT_NAN_AT_STEP"


def nan_faults(rank: int) -> dict[int, int]:
    """{optimizer step: times its loss is made nan on this rank} from NAN_AT_STEP_ENV."""
    faults: dict[int, int] = {}
    for entry in os.environ.get(NAN_AT_STEP_ENV, "").replace(" ", "").split(","):
        if entry:
            at, _, only = entry.partition("@")
            if not only or int(only) == rank:
                faults[int(at)] = faults.get(int(at), 0) + 1
    return faults


def nonfinite_at_step(accelerator, loss: torch.Tensor, grad_norm, check_grad: bool,
                      ) -> str | None:
    """What is nan/inf at this optimizer step on any rank ('the loss (on 1 of 2 ranks) and
    the gradient norm'), else None. Each rank has a loss of its own, so the verdict is agreed
    in one all-reduce of two flags (the norm of all-reduced gradients is the same everywhere
    already); reading it is this optimizer step's one host sync."""
    bad_norm = (~torch.isfinite(torch.as_tensor(grad_norm, device=loss.device))
                if check_grad and grad_norm is not None  # DeepSpeed clips itself: None
                else torch.zeros_like(loss, dtype=torch.bool))
    flags = torch.stack([~torch.isfinite(loss), bad_norm]).float()
    world = accelerator.num_processes
    if world > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    bad_loss, bad_norm = (round(value) for value in flags.tolist())
    what = []
    if bad_loss:
        what.append("the loss" + (f" (on {bad_loss} of {world} ranks)" if world > 1 else ""))
    if bad_norm:
        what.append("the gradient norm")
    return " and ".join(what) or None


def state_is_finite(accelerator, model, optimizer) -> bool:
    """Whether every weight and optimizer-state tensor is finite on every rank: checked
    before each save, so that no checkpoint and no final model ever holds nan/inf (an
    optimizer step can overflow weights that finite gradients led to)."""
    tensors = [p.detach() for p in model.parameters()]
    tensors += [value for state in optimizer.state.values() for value in state.values()
                if torch.is_tensor(value) and value.is_floating_point()]
    device = accelerator.device
    bad = torch.zeros(1, device=device)
    if tensors:
        finite = [torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all().to(device)
                  for t in tensors]  # a DTensor's own shard
        bad = (~torch.stack(finite).all()).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bad.item() == 0
