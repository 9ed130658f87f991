"""Whole matrices from sharded pieces, each on one owner rank: the distributed form of a
per-matrix function (Newton-Schulz for AGD's spectral variants or for Muon) that needs a
matrix whole while FSDP2 or DeepSpeed ZeRO spreads its elements over the ranks.

The pieces a rank holds are flat ranges of flat *regions* (a parameter, or one part of one:
a q/k/v block); a *job* is the regions one function call needs together (a matrix, or a
[W|b] pair). Each job is given to one owner, balanced by the caller's cost (torchtitan's
greedy longest-first). One `all_to_all_single` sends every piece to its job's owner, the
owner runs the function on its whole regions, and a second `all_to_all_single` returns each
rank exactly its own elements of the result. Every rank sends and receives about (N-1)/N of
its pieces twice: 2(N-1)/N^2 of the matrices per rank, instead of the whole gradient an
all-reduce would assemble everywhere. No rank holds more than its pieces, the regions it
owns, and the two exchange buffers.

The layout (which rank holds which range) is exchanged once, at construction, with one
all_gather_object of plain integer tuples; the owner checks that its regions are covered
exactly once, so a rank that misses its rows, or two that send the same rows, is an error,
not a silently wrong matrix (a partial sum would be)."""

from __future__ import annotations

import heapq
from typing import Callable

import torch
import torch.distributed as dist

Piece = tuple[int, int, int]  # (region, offset in the region, number of elements)


def newton_schulz_cost(rows: int, cols: int) -> float:
    """Newton-Schulz's flops on a rows x cols matrix, up to a constant: s^2 (2l + s)."""
    short, long = min(rows, cols), max(rows, cols)
    return float(short * short * (2 * long + short))


def balance_owners(costs: list[float], world: int) -> list[int]:
    """Greedy longest-first: the costliest job goes to the least-loaded rank (ties: lowest rank)."""
    owners = [0] * len(costs)
    loads = [(0.0, r) for r in range(world)]
    heapq.heapify(loads)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        load, rank = heapq.heappop(loads)
        owners[job] = rank
        heapq.heappush(loads, (load + costs[job], rank))
    return owners


def check_coverage(everyone: list[list[Piece]], region_sizes: list[int]) -> None:
    """Every element of every region held by exactly one rank's piece."""
    marks = [torch.zeros(n, dtype=torch.int32) for n in region_sizes]
    for pieces in everyone:
        for region, offset, n in pieces:
            marks[region][offset : offset + n] += 1
    for region, m in enumerate(marks):
        if m.numel() and not bool((m == 1).all()):
            held = "missing" if bool((m == 0).any()) else "held twice"
            raise RuntimeError(f"owner exchange: region {region} ({region_sizes[region]} elements) has elements {held} "
                               "in the ranks' pieces")


class OwnerExchange:
    """`run(values, fn)`: values[i] holds this rank's elements of local piece i; fn receives
    {job: [whole region tensors]} for the jobs this rank owns and returns {job: [result
    regions, same sizes]}; `run` returns per local piece its elements of the result."""

    def __init__(self, group, region_sizes: list[int], jobs: list[list[int]], costs: list[float],
                 local_pieces: list[Piece]):
        self.group = group
        # one process (no group: a test's stand-in binding) owns every job; nothing is sent
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
        self.world = dist.get_world_size(group) if self.distributed else 1
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.region_sizes, self.jobs = region_sizes, jobs
        self.owners = balance_owners(costs, self.world)
        job_of = {region: j for j, regions in enumerate(jobs) for region in regions}
        owner_of_region = {region: self.owners[j] for region, j in job_of.items()}
        self.local_pieces = [p for p in local_pieces]
        everyone: list = [None] * self.world
        if self.distributed:
            dist.all_gather_object(everyone, self.local_pieces, group=self.group)
        else:
            everyone = [self.local_pieces]
        # this rank's pieces in send order: grouped by destination, in local order within
        self.send_order = sorted(range(len(local_pieces)), key=lambda i: owner_of_region[local_pieces[i][0]])
        self.send_splits = [0] * self.world
        for i in self.send_order:
            self.send_splits[owner_of_region[local_pieces[i][0]]] += local_pieces[i][2]
        # what this rank receives as an owner: every rank's pieces of its regions, in that rank's send order
        check_coverage(everyone, region_sizes)  # on every rank alike: all refuse, or none
        self.recv: list[tuple[int, list[Piece]]] = []
        for src, pieces in enumerate(everyone):
            order = sorted(range(len(pieces)), key=lambda i: owner_of_region[pieces[i][0]])
            self.recv.append((src, [pieces[i] for i in order if owner_of_region[pieces[i][0]] == self.rank]))
        self.owned_jobs = [j for j, owner in enumerate(self.owners) if owner == self.rank]
        self.recv_splits = [sum(n for _, _, n in pieces) for _, pieces in self.recv]
        self.bytes_sent = 0  # both exchanges of the last run, this rank

    def run(self, values: list[torch.Tensor], fn: Callable[[dict], dict], dtype: torch.dtype,
            device: torch.device) -> list[torch.Tensor]:
        # Each buffer is dropped as soon as the next one is filled: at most the pieces, the
        # owned regions and one exchange buffer are alive together.
        send = (torch.cat([values[i].reshape(-1).to(dtype) for i in self.send_order]) if self.send_order
                else torch.zeros(0, dtype=dtype, device=device))
        sent_numel, element_size = send.numel(), send.element_size()
        recv = torch.empty(sum(self.recv_splits), dtype=dtype, device=device)
        self._all_to_all(recv, send, self.recv_splits, self.send_splits)
        del send
        regions = {r: torch.empty(self.region_sizes[r], dtype=dtype, device=device)
                   for j in self.owned_jobs for r in self.jobs[j]}
        at = 0
        for _, pieces in self.recv:
            for region, offset, n in pieces:
                regions[region][offset : offset + n] = recv[at : at + n]
                at += n
        del recv
        results = fn({j: [regions[r] for r in self.jobs[j]] for j in self.owned_jobs})
        del regions
        result_regions = {r: out.reshape(-1) for j in self.owned_jobs for r, out in zip(self.jobs[j], results[j])}
        del results
        back = torch.empty(sum(self.recv_splits), dtype=dtype, device=device)
        at = 0
        for _, pieces in self.recv:  # the same order the pieces came in: each rank's own elements
            for region, offset, n in pieces:
                back[at : at + n] = result_regions[region][offset : offset + n]
                at += n
        del result_regions
        returned = torch.empty(sent_numel, dtype=dtype, device=device)
        self._all_to_all(returned, back, self.send_splits, self.recv_splits)
        self.bytes_sent = (sent_numel - self.send_splits[self.rank] + back.numel() - self.recv_splits[self.rank]) \
            * element_size
        del back
        out: list[torch.Tensor | None] = [None] * len(values)
        at = 0
        for i in self.send_order:
            n = self.local_pieces[i][2]
            out[i] = returned[at : at + n]
            at += n
        return out  # type: ignore[return-value]

    def _all_to_all(self, out: torch.Tensor, send: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> None:
        if self.distributed:
            dist.all_to_all_single(out, send, out_splits, in_splits, group=self.group)
        else:
            out.copy_(send)
