"""Decisions every rank takes together, in the step's one collective.

A rank must never act alone on what only it saw: a preemption signal, its clock saying a
checkpoint is due, its data reader stopping on data.max_bad_fraction, AGD's limit of skipped
steps. Acting alone would leave the other ranks waiting in a collective (or saving without
it) until the launcher tears them down. So each rank puts its votes beside its share of the
loss in one small tensor, and the loss all-reduce the step makes anyway sums them: every rank
reads the same totals in the same host sync and takes the same decision at the same step
boundary, at no extra collective per step.

When the decision is to stop, the ranks exchange their reasons once (all_gather_object, on
the stop path only), so every rank stops with the same line: the lowest rank's."""

from __future__ import annotations

import torch
import torch.distributed as dist


def several_ranks(env) -> bool:
    return env.distributed and env.world_size > 1


def reduce_loss_and_votes(loss: torch.Tensor, votes: dict, env) -> tuple[torch.Tensor, float, dict[str, bool]]:
    """All-reduce this rank's mean loss (to the mean over ranks) together with its votes
    (bools, or 0-d tensors read as true when non-zero); returns the mean loss as a tensor and a
    float, and for each vote whether any rank cast it. One collective, one host sync."""
    parts = [loss.float().reshape(())]
    for vote in votes.values():  # on the loss's device without a host copy: no sync before the reduction
        parts.append(vote.to(loss.device, torch.float32).reshape(()) if isinstance(vote, torch.Tensor)
                     else loss.new_full((), float(bool(vote)), dtype=torch.float32))
    packed = torch.stack(parts)
    if several_ranks(env):
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        packed[0] /= env.world_size  # as Backend.all_reduce_mean: the same float32 division
    values = packed.tolist()
    return packed[0], values[0], {name: value > 0 for name, value in zip(votes, values[1:])}


def lowest_rank_reason(reason, env):
    """The first non-None `reason` in rank order, the same on every rank (each rank passes its
    own, None where it has none). Every rank must call it: it is a collective."""
    if not several_ranks(env):
        return reason
    reasons = [None] * env.world_size
    dist.all_gather_object(reasons, reason)
    return next((r for r in reasons if r is not None), None)


def max_over_ranks(value: int, env) -> int:
    """`value` maximised over ranks (a collective)."""
    if not several_ranks(env):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())
